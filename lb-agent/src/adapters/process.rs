//! Backends as local processes, each in a network namespace of its own.
//!
//! An instance is a namespace `<bridge>-<n>` joined to a bridge in the
//! agent's namespace by a veth pair, with address `<prefix>.<n>` and a route
//! back through the bridge; the command runs inside it. The load balancer
//! forwards to those addresses like to any host, and the replies come back
//! across the bridge, where the XDP program (attached to the bridge) turns
//! them back into the VIP. Processes cannot share the agent's own address:
//! traffic to a local address is delivered, not forwarded, and its replies
//! would never cross an XDP ingress hook.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddrV4,
    os::fd::AsRawFd as _,
    process::Stdio,
    sync::Mutex,
    time::Instant,
};

use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::{
    config::instances::{fill_placeholders, ProcessSpec},
    ports::{Orchestrator, OrchestratorError, Replica},
};

/// Create the instances' bridge with its address if missing. Idempotent.
pub async fn prepare_bridge(spec: &ProcessSpec) -> Result<(), OrchestratorError> {
    let br = spec.bridge.as_str();
    if ip(&["link", "show", "dev", br]).await.is_err() {
        ip(&["link", "add", br, "type", "bridge"]).await?;
    }
    let cidr = format!("{}/24", spec.ip(1));
    if !output("ip", &["-o", "-4", "addr", "show", "dev", br]).await?.contains(&cidr) {
        ip(&["addr", "add", &cidr, "dev", br]).await?;
    }
    ip(&["link", "set", br, "up"]).await
}

struct Instance {
    name: String,
    addr: SocketAddrV4,
    child: Child,
    pid: u32,
    /// Last CPU sample: (utime + stime in clock ticks, when).
    cpu_sample: Option<(u64, Instant)>,
}

pub struct ProcessOrchestrator {
    spec: ProcessSpec,
    service: String,
    instances: Mutex<BTreeMap<u8, Instance>>,
    /// Slots being set up or torn down: not in `instances`, yet not free.
    /// Without this, two starts at once (scaling up by more than one) pick
    /// the same slot, and a start right after a stop picks the slot whose
    /// namespace is still being deleted; either fails with "File exists".
    busy: Mutex<BTreeSet<u8>>,
}

const FIRST: u8 = 2;
const LAST: u8 = 254;

impl ProcessOrchestrator {
    /// Make sure the bridge exists with its address; start nothing.
    pub async fn new(service: &str, spec: ProcessSpec) -> Result<Self, OrchestratorError> {
        let o = ProcessOrchestrator {
            spec,
            service: service.into(),
            instances: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(BTreeSet::new()),
        };
        prepare_bridge(&o.spec).await?;
        o.remove_leftovers().await;
        Ok(o)
    }

    /// Namespaces of instances a previous agent started and lost track of
    /// (it crashed): their processes died with the namespace's last user or
    /// are orphans we cannot adopt safely, so the namespaces go.
    async fn remove_leftovers(&self) {
        let Ok(list) = output("ip", &["netns", "list"]).await else { return };
        let prefix = format!("{}-", self.spec.bridge);
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(&prefix)) {
            if ns[prefix.len()..].parse::<u8>().is_ok() {
                warn!(netns = ns, "removing a leftover instance namespace");
                let _ = ip(&["netns", "del", ns]).await;
            }
        }
    }

    fn netns(&self, n: u8) -> String {
        format!("{}-{n}", self.spec.bridge)
    }

    /// Take a free slot; it stays busy until [`Self::release_slot`].
    fn reserve_slot(&self) -> Result<u8, OrchestratorError> {
        let taken = self.instances.lock().map_err(poisoned)?;
        let mut busy = self.busy.lock().map_err(poisoned)?;
        let n = (FIRST..=LAST)
            .find(|n| !taken.contains_key(n) && !busy.contains(n))
            .ok_or(OrchestratorError::Full((LAST - FIRST + 1) as usize))?;
        busy.insert(n);
        Ok(n)
    }

    fn release_slot(&self, n: u8) {
        match self.busy.lock() {
            Ok(mut busy) => {
                busy.remove(&n);
            }
            Err(_) => warn!(slot = n, "process table lock poisoned; slot stays taken"),
        }
    }

    /// Start an instance in slot `n`, reserved by the caller.
    async fn start_in(&self, n: u8) -> Result<Replica, OrchestratorError> {
        let name = format!("{}-{n}", self.service);
        self.make_netns(n).await?;
        let argv = self.command_for(n, &name);
        let child = match self.spawn_in(n, &argv) {
            Ok(c) => c,
            Err(e) => {
                let _ = ip(&["netns", "del", &self.netns(n)]).await;
                return Err(e);
            }
        };
        let pid = child.id().unwrap_or(0);
        let addr = SocketAddrV4::new(self.spec.ip(n), self.spec.port);
        info!(service = self.service, instance = name, %addr, pid, "process started");
        self.instances
            .lock()
            .map_err(poisoned)?
            .insert(n, Instance { name: name.clone(), addr, child, pid, cpu_sample: None });
        Ok(Replica { id: self.netns(n), name, addr, running: true })
    }

    /// Stop the instance taken out of slot `n` (busy until the caller
    /// releases it) and remove its namespace.
    async fn stop_in(&self, n: u8, mut inst: Instance) -> Result<(), OrchestratorError> {
        if let Ok(None) = inst.child.try_wait() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(inst.pid as i32, libc::SIGTERM) };
            if tokio::time::timeout(self.spec.stop_grace, inst.child.wait()).await.is_err() {
                warn!(instance = inst.name, "did not stop within the grace period; killing it");
                let _ = inst.child.kill().await;
            }
        }
        // Delete the veth pair first: that is synchronous, while a deleted
        // namespace's devices go later, in the kernel's cleanup work. Until
        // then the old instance's end could still answer ARP for its
        // address, and the host end's name would block the slot's next
        // `ip link add`.
        if let Err(e) = ip(&["link", "del", &self.netns(n)]).await {
            warn!(instance = inst.name, error = %e, "deleting the instance's veth failed; deleting its namespace anyway");
        }
        ip(&["netns", "del", &self.netns(n)]).await?;
        info!(service = self.service, instance = inst.name, "process stopped");
        Ok(())
    }

    async fn make_netns(&self, n: u8) -> Result<(), OrchestratorError> {
        let ns = self.netns(n);
        let host_end = ns.clone();
        let cidr = format!("{}/24", self.spec.ip(n));
        let gw = self.spec.ip(1).to_string();
        let addr = self.spec.ip(n).to_string();
        ip(&["netns", "add", &ns]).await?;
        let steps: [&[&str]; 8] = [
            &["link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &ns],
            &["link", "set", &host_end, "master", &self.spec.bridge, "up"],
            &["-n", &ns, "link", "set", "lo", "up"],
            &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"],
            &["-n", &ns, "link", "set", "eth0", "up"],
            &["-n", &ns, "route", "add", "default", "via", &gw],
            &["link", "set", &self.spec.bridge, "up"],
            // A neighbour entry left by this slot's previous instance still
            // holds that instance's MAC; while it stays REACHABLE (up to
            // ~45 s) nothing reaches the new one, which then fails its
            // readiness check. Deleting a bridge port does not flush the
            // bridge's neighbours.
            &["neigh", "flush", "to", &addr, "dev", &self.spec.bridge],
        ];
        for args in steps {
            if let Err(e) = ip(args).await {
                let _ = ip(&["netns", "del", &ns]).await;
                return Err(e);
            }
        }
        Ok(())
    }

    fn command_for(&self, n: u8, name: &str) -> Vec<String> {
        let addr = SocketAddrV4::new(self.spec.ip(n), self.spec.port);
        self.spec.command.iter().map(|a| fill_placeholders(a, addr, name)).collect()
    }

    fn spawn_in(&self, n: u8, argv: &[String]) -> Result<Child, OrchestratorError> {
        let ns_path = format!("/var/run/netns/{}", self.netns(n));
        let ns = std::fs::File::open(&ns_path)
            .map_err(|source| OrchestratorError::Io { what: format!("open {ns_path}"), source })?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit()).kill_on_drop(false);
        let fd = ns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; only the child's thread moves.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child =
            cmd.spawn().map_err(|source| OrchestratorError::Io { what: format!("start {}", argv[0]), source })?;
        drop(ns);
        Ok(child)
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> OrchestratorError {
    OrchestratorError::Command { what: "process table".into(), detail: "lock poisoned".into() }
}

impl Orchestrator for ProcessOrchestrator {
    async fn list(&self) -> Result<Vec<Replica>, OrchestratorError> {
        let mut table = self.instances.lock().map_err(poisoned)?;
        Ok(table
            .iter_mut()
            .map(|(n, i)| Replica {
                id: self.netns(*n),
                name: i.name.clone(),
                addr: i.addr,
                running: matches!(i.child.try_wait(), Ok(None)),
            })
            .collect())
    }

    async fn start(&self) -> Result<Replica, OrchestratorError> {
        let n = self.reserve_slot()?;
        let started = self.start_in(n).await;
        self.release_slot(n);
        started
    }

    async fn stop(&self, id: &str) -> Result<(), OrchestratorError> {
        let n = id
            .strip_prefix(&format!("{}-", self.spec.bridge))
            .and_then(|s| s.parse::<u8>().ok())
            .ok_or_else(|| OrchestratorError::Unknown(id.into()))?;
        let inst = {
            let mut table = self.instances.lock().map_err(poisoned)?;
            let inst = table.remove(&n).ok_or_else(|| OrchestratorError::Unknown(id.into()))?;
            // Busy until its namespace is gone, taken under the same lock,
            // so that no start picks the slot in between.
            self.busy.lock().map_err(poisoned)?.insert(n);
            inst
        };
        let stopped = self.stop_in(n, inst).await;
        self.release_slot(n);
        stopped
    }

    async fn cpu_percent(&self) -> Result<HashMap<String, f64>, OrchestratorError> {
        let mut out = HashMap::new();
        let ticks = clock_ticks();
        let mut table = self.instances.lock().map_err(poisoned)?;
        for (n, inst) in table.iter_mut() {
            let Some(now_ticks) = cpu_ticks(inst.pid) else { continue };
            let now = Instant::now();
            if let Some((before, at)) = inst.cpu_sample {
                let secs = now.duration_since(at).as_secs_f64();
                if secs > 0.0 {
                    let used = now_ticks.saturating_sub(before) as f64 / ticks;
                    out.insert(format!("{}-{n}", self.spec.bridge), 100.0 * used / secs);
                }
            }
            inst.cpu_sample = Some((now_ticks, now));
        }
        Ok(out)
    }
}

impl Drop for ProcessOrchestrator {
    /// Instances do not outlive the orchestrator: kill them and remove their
    /// namespaces (a clean `stop` of each is the normal path; this is the
    /// net under it).
    fn drop(&mut self) {
        let Ok(mut table) = self.instances.lock() else { return };
        for (n, inst) in table.iter_mut() {
            let _ = inst.child.start_kill();
            let _ =
                std::process::Command::new("ip").args(["netns", "del", &format!("{}-{n}", self.spec.bridge)]).status();
        }
    }
}

/// utime + stime of a process, in clock ticks, from /proc/<pid>/stat.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields start after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

async fn ip(args: &[&str]) -> Result<(), OrchestratorError> {
    output("ip", args).await.map(|_| ())
}

async fn output(prog: &str, args: &[&str]) -> Result<String, OrchestratorError> {
    let what = format!("{prog} {}", args.join(" "));
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| OrchestratorError::Io { what: what.clone(), source })?;
    if !out.status.success() {
        return Err(OrchestratorError::Command {
            what,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::instances::tests::process_spec;

    #[test]
    fn placeholders_are_filled_per_instance() {
        let o = ProcessOrchestrator {
            spec: process_spec(),
            service: "web".into(),
            instances: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(BTreeSet::new()),
        };
        assert_eq!(o.command_for(7, "web-7"), ["/bin/srv", "--listen", "10.212.0.7:8080", "--name=web-7"]);
        assert_eq!(o.netns(7), "lbp0-7");
    }

    #[test]
    fn cpu_ticks_reads_our_own_process() {
        assert!(cpu_ticks(std::process::id()).is_some());
        assert_eq!(cpu_ticks(u32::MAX), None);
    }
}
