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
//!
//! Instances outlive an agent that is killed (SIGKILL: nothing runs to stop
//! them), as the Docker orchestrator's containers do. A new orchestrator
//! for the same bridge looks at what is left: a namespace `<bridge>-<n>`
//! whose host-side veth (same name) is a port of our bridge, whose `eth0`
//! has the slot's address and which holds one running process tree is an
//! instance: it is adopted (tracked by pid, without cut connections), and
//! the scaler carries on with it. Anything else left under our names (a
//! namespace without its process, a veth without its namespace) is removed,
//! its processes killed, so that the slot can be used again.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddrV4,
    os::fd::{AsRawFd as _, FromRawFd as _},
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

/// The alias a bridge the orchestrator made carries (`ip link show` prints
/// it), so that the agent that stops its last instance removes it, even when
/// an earlier agent (killed since) made it, and never removes a bridge the
/// user made.
pub(crate) const BRIDGE_ALIAS: &str = "lb-agent instances";

/// Create the instances' bridge with its address if missing. Idempotent.
pub async fn prepare_bridge(spec: &ProcessSpec) -> Result<(), OrchestratorError> {
    let br = spec.bridge.as_str();
    if ip(&["link", "show", "dev", br]).await.is_err() {
        ip(&["link", "add", br, "type", "bridge"]).await?;
        ip(&["link", "set", "dev", br, "alias", BRIDGE_ALIAS]).await?;
    }
    let cidr = format!("{}/24", spec.ip(1));
    if !output("ip", &["-o", "-4", "addr", "show", "dev", br]).await?.contains(&cidr) {
        ip(&["addr", "add", &cidr, "dev", br]).await?;
    }
    ip(&["link", "set", br, "up"]).await
}

/// Remove the instances' bridge if the orchestrator made it (see
/// [`BRIDGE_ALIAS`]) and no instance is left on it.
pub async fn remove_bridge(spec: &ProcessSpec) -> Result<bool, OrchestratorError> {
    let br = spec.bridge.as_str();
    let Ok(link) = output("ip", &["-o", "link", "show", "dev", br]).await else { return Ok(false) };
    let ports = output("ip", &["-o", "link", "show", "master", br]).await?;
    if !is_our_bridge(&link) || !ports.trim().is_empty() {
        return Ok(false);
    }
    ip(&["link", "del", "dev", br]).await?;
    Ok(true)
}

/// Whether a line of `ip -o link show` is a bridge the orchestrator made.
fn is_our_bridge(line: &str) -> bool {
    line.contains(&format!("alias {BRIDGE_ALIAS}"))
}

/// An instance's name: the service's name and an ordinal from 1, which is
/// its slot's (slot 2, the first instance address, is `web-1`), so the
/// lowest free ordinal is the lowest free slot, and an adopted instance
/// keeps its name.
fn instance_name(service: &str, slot: u8) -> String {
    format!("{service}-{}", slot - FIRST + 1)
}

struct Instance {
    name: String,
    addr: SocketAddrV4,
    process: Process,
    pid: u32,
    /// Last CPU sample: (utime + stime in clock ticks, when).
    cpu_sample: Option<(u64, Instant)>,
}

/// How the orchestrator holds an instance's process.
enum Process {
    /// Started by this orchestrator: our child.
    Child(Child),
    /// Started by an agent before us, which was killed: its orphan, known
    /// by pid and start time (so a reused pid is never taken for it).
    Adopted { start_time: u64 },
}

impl Instance {
    fn is_running(&mut self) -> bool {
        match &mut self.process {
            Process::Child(child) => matches!(child.try_wait(), Ok(None)),
            Process::Adopted { start_time } => is_alive(self.pid, *start_time),
        }
    }

    /// SIGTERM, then SIGKILL once `grace` has passed.
    async fn end(&mut self, grace: std::time::Duration) {
        match &mut self.process {
            Process::Child(child) => {
                if let Ok(None) = child.try_wait() {
                    // SAFETY: plain kill(2) on our own child's pid.
                    unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
                    if tokio::time::timeout(grace, child.wait()).await.is_err() {
                        warn!(instance = self.name, "did not stop within the grace period; killing it");
                        let _ = child.kill().await;
                    }
                }
            }
            Process::Adopted { start_time } => {
                let (pid, start_time) = (self.pid, *start_time);
                if !signal_if_alive(pid, start_time, libc::SIGTERM) {
                    return;
                }
                if tokio::time::timeout(grace, gone(pid, start_time)).await.is_err() {
                    warn!(instance = self.name, "did not stop within the grace period; killing it");
                    signal_if_alive(pid, start_time, libc::SIGKILL);
                    // Its parent (init) reaps it; not ours to wait on for long.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), gone(pid, start_time)).await;
                }
            }
        }
    }

    /// The net under `end`, for `Drop`: SIGKILL, no wait.
    fn kill_now(&mut self) {
        match &mut self.process {
            Process::Child(child) => {
                let _ = child.start_kill();
            }
            Process::Adopted { start_time } => {
                signal_if_alive(self.pid, *start_time, libc::SIGKILL);
            }
        }
    }
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
    _claim: BridgeClaim,
}

/// The bridges the process orchestrators of this agent hold. A bridge is
/// held until its orchestrator is dropped (its instances stopped), so that
/// a reload that gives a bridge to another service while the old one's
/// instances are still stopping is refused instead of taking them for a
/// killed agent's leftovers.
static BRIDGES: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// One orchestrator's hold on its bridge (see [`BRIDGES`]).
struct BridgeClaim(String);

impl BridgeClaim {
    fn take(bridge: &str, service: &str) -> Result<BridgeClaim, OrchestratorError> {
        let mut held = BRIDGES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(holder) = held.get(bridge) {
            return Err(OrchestratorError::Command {
                what: format!("service {service}: instances.process.bridge {bridge:?}"),
                detail: format!(
                    "still used by the instances of service {holder:?}, which are being stopped; \
                     apply this config again once they are gone, or give the service another bridge"
                ),
            });
        }
        held.insert(bridge.to_owned(), service.to_owned());
        Ok(BridgeClaim(bridge.to_owned()))
    }
}

impl Drop for BridgeClaim {
    fn drop(&mut self) {
        BRIDGES.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&self.0);
    }
}

const FIRST: u8 = 2;
const LAST: u8 = 254;

impl ProcessOrchestrator {
    /// Make sure the bridge exists with its address; start nothing.
    pub async fn new(service: &str, spec: ProcessSpec) -> Result<Self, OrchestratorError> {
        let claim = BridgeClaim::take(&spec.bridge, service)?;
        let o = ProcessOrchestrator {
            spec,
            service: service.into(),
            instances: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(BTreeSet::new()),
            _claim: claim,
        };
        prepare_bridge(&o.spec).await?;
        o.take_over_leftovers().await?;
        Ok(o)
    }

    /// What a previous agent of this bridge left (it was killed): adopt its
    /// running instances, remove the rest (see the module's doc).
    async fn take_over_leftovers(&self) -> Result<(), OrchestratorError> {
        let netns = output("ip", &["netns", "list"]).await?;
        let veths = output("ip", &["-o", "link", "show", "master", &self.spec.bridge]).await?;
        let mut slots: BTreeSet<u8> =
            netns.lines().filter_map(|l| self.slot_of(l.split_whitespace().next()?)).collect();
        // A veth whose namespace is gone (an older agent deleted only the
        // name) still blocks its slot's `ip link add`.
        slots.extend(veths.lines().filter_map(|l| self.slot_of(link_name(l)?)));
        for n in slots {
            match self.adoptable(n).await {
                Some((pid, start_time)) => self.adopt(n, pid, start_time)?,
                None => self.remove_leftover(n).await,
            }
        }
        Ok(())
    }

    /// The slot of an instance namespace's (or host veth's) name.
    fn slot_of(&self, name: &str) -> Option<u8> {
        let n: u8 = name.strip_prefix(&self.spec.bridge)?.strip_prefix('-')?.parse().ok()?;
        (FIRST..=LAST).contains(&n).then_some(n)
    }

    /// The process to adopt in slot `n`'s namespace, with its start time:
    /// the namespace is wired as `make_netns` does it, and holds one
    /// running process tree.
    async fn adoptable(&self, n: u8) -> Option<(u32, u64)> {
        let ns = self.netns(n);
        let veth = output("ip", &["-o", "link", "show", "dev", &ns]).await.ok()?;
        if !veth.contains(&format!(" master {} ", self.spec.bridge)) {
            return None;
        }
        let addr = output("ip", &["-n", &ns, "-o", "-4", "addr", "show", "dev", "eth0"]).await.ok()?;
        if !addr.contains(&format!(" {}/24 ", self.spec.ip(n))) {
            return None;
        }
        let pids: Vec<u32> = output("ip", &["netns", "pids", &ns])
            .await
            .ok()?
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        // Read after the listing: a pid may have been reused since, so the
        // process must still be in the namespace once its stat is read.
        let stats: Vec<(u32, ProcStat)> =
            pids.iter().filter_map(|p| Some((*p, ProcStat::read(*p)?))).filter(|(p, _)| in_netns(*p, &ns)).collect();
        let mut roots = stats.iter().filter(|(_, st)| st.is_running() && !pids.contains(&st.ppid));
        match (roots.next(), roots.next()) {
            (Some((pid, st)), None) => Some((*pid, st.start_time)),
            _ => None,
        }
    }

    fn adopt(&self, n: u8, pid: u32, start_time: u64) -> Result<(), OrchestratorError> {
        let name = instance_name(&self.service, n);
        let addr = SocketAddrV4::new(self.spec.ip(n), self.spec.port);
        info!(service = self.service, instance = name, %addr, pid, "adopted a running instance a previous agent left");
        let process = Process::Adopted { start_time };
        self.instances.lock().map_err(poisoned)?.insert(n, Instance { name, addr, process, pid, cpu_sample: None });
        Ok(())
    }

    /// Remove what is left in slot `n`: its processes (in a namespace of
    /// ours, so ours), its veth and its namespace.
    async fn remove_leftover(&self, n: u8) {
        let ns = self.netns(n);
        let pids = output("ip", &["netns", "pids", &ns]).await.unwrap_or_default();
        warn!(netns = ns, pids = pids.trim(), "removing what a previous agent left of an instance");
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
            // Only a process still in that namespace once its start time is
            // known: the pid may have been reused since the listing.
            if let Some(st) = ProcStat::read(pid).filter(|_| in_netns(pid, &ns)) {
                signal_if_alive(pid, st.start_time, libc::SIGKILL);
            }
        }
        // Either may be gone already.
        let _ = ip(&["link", "del", &ns]).await;
        let _ = ip(&["netns", "del", &ns]).await;
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
        let name = instance_name(&self.service, n);
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
        let process = Process::Child(child);
        self.instances
            .lock()
            .map_err(poisoned)?
            .insert(n, Instance { name: name.clone(), addr, process, pid, cpu_sample: None });
        Ok(Replica { id: self.netns(n), name, addr, running: true })
    }

    /// Stop the instance taken out of slot `n` (busy until the caller
    /// releases it) and remove its namespace.
    async fn stop_in(&self, n: u8, mut inst: Instance) -> Result<(), OrchestratorError> {
        inst.end(self.spec.stop_grace).await;
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
            .map(|(n, i)| Replica { id: self.netns(*n), name: i.name.clone(), addr: i.addr, running: i.is_running() })
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

    async fn release(&self) {
        let left = self.instances.lock().map_or(1, |t| t.len());
        if left > 0 {
            return;
        }
        match remove_bridge(&self.spec).await {
            Ok(true) => info!(service = self.service, bridge = self.spec.bridge, "instances' bridge removed"),
            Ok(false) => {}
            Err(e) => {
                warn!(service = self.service, bridge = self.spec.bridge, error = %e, "removing the bridge failed")
            }
        }
    }
}

impl Drop for ProcessOrchestrator {
    /// Instances do not outlive the orchestrator: kill them and remove their
    /// namespaces (a clean `stop` of each is the normal path; this is the
    /// net under it).
    /// Adopted instances are left alone: they served before this agent
    /// and still do through the pinned table (a start-up that failed must
    /// not cut them); the next agent adopts them again.
    fn drop(&mut self) {
        let Ok(mut table) = self.instances.lock() else { return };
        for (n, inst) in table.iter_mut().filter(|(_, i)| matches!(i.process, Process::Child(_))) {
            inst.kill_now();
            let _ =
                std::process::Command::new("ip").args(["netns", "del", &format!("{}-{n}", self.spec.bridge)]).status();
        }
    }
}

/// utime + stime of a process, in clock ticks, from /proc/<pid>/stat.
fn cpu_ticks(pid: u32) -> Option<u64> {
    ProcStat::read(pid).map(|st| st.cpu_ticks)
}

/// What the orchestrator reads of /proc/<pid>/stat (proc(5)).
#[derive(Debug, PartialEq, Eq)]
struct ProcStat {
    state: char,
    ppid: u32,
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    /// When it started, in clock ticks after boot: with the pid, it names
    /// one process for good.
    start_time: u64,
}

impl ProcStat {
    fn read(pid: u32) -> Option<ProcStat> {
        Self::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    fn parse(stat: &str) -> Option<ProcStat> {
        // The command name may contain spaces; fields start after its ')',
        // with field 3 (state) first.
        let rest = stat.get(stat.rfind(')')? + 2..)?;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i)?.parse::<u64>().ok();
        Some(ProcStat {
            state: f.first()?.chars().next()?,
            ppid: u32::try_from(num(1)?).ok()?,
            cpu_ticks: num(11)? + num(12)?,
            start_time: num(19)?,
        })
    }

    /// Not a zombie (exited, waiting for its parent) nor dead.
    fn is_running(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Whether `pid` is still the process that started at `start_time`, and
/// running.
fn is_alive(pid: u32, start_time: u64) -> bool {
    ProcStat::read(pid).is_some_and(|st| st.start_time == start_time && st.is_running())
}

/// Send `signal` to `pid` if it is still the process that started at
/// `start_time`; returns whether it was alive.
fn signal_if_alive(pid: u32, start_time: u64, signal: i32) -> bool {
    // A pidfd first, then the check: if the pid still has that start time
    // once the fd is open, the fd is that process (a reused pid would be a
    // younger one), and the signal cannot reach another that took the pid
    // in between, as kill(2) after a check could.
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: a descriptor pidfd_open just returned, owned by nothing else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    if !is_alive(pid, start_time) {
        return false;
    }
    // SAFETY: pidfd_send_signal(2) on our pidfd; no siginfo, no flags.
    unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0)
    };
    true
}

/// Whether `pid` is (still) in the named network namespace `ns`.
fn in_netns(pid: u32, ns: &str) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let id = |path: String| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
    id(format!("/proc/{pid}/ns/net")).is_some_and(|own| Some(own) == id(format!("/run/netns/{ns}")))
}

/// Resolves once `pid` is no longer the running process that started at
/// `start_time`.
async fn gone(pid: u32, start_time: u64) {
    while is_alive(pid, start_time) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The interface name in a line of `ip -o link show` (`5: name@peer: ...`).
fn link_name(line: &str) -> Option<&str> {
    let name = line.split(": ").nth(1)?;
    Some(name.split('@').next().unwrap_or(name))
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

pub(crate) async fn ip(args: &[&str]) -> Result<(), OrchestratorError> {
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

    #[test]
    fn a_bridge_is_held_until_its_orchestrator_lets_go() {
        let web = BridgeClaim::take("lbtest-claim0", "web").unwrap();
        let err = BridgeClaim::take("lbtest-claim0", "api").err().expect("a held bridge was taken twice");
        let msg = err.to_string();
        assert!(msg.contains("\"lbtest-claim0\"") && msg.contains("service \"web\""), "{msg}");
        let other = BridgeClaim::take("lbtest-claim1", "api").unwrap();
        drop(web);
        let _again = BridgeClaim::take("lbtest-claim0", "api").unwrap();
        drop(other);
    }

    #[test]
    fn a_signal_reaches_only_the_process_of_that_start_time() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let st = ProcStat::read(pid).unwrap();
        assert!(!signal_if_alive(pid, st.start_time + 1, libc::SIGKILL), "signalled another start time");
        assert!(child.try_wait().unwrap().is_none(), "the process was killed");
        assert!(signal_if_alive(pid, st.start_time, libc::SIGKILL));
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!signal_if_alive(pid, st.start_time, libc::SIGKILL), "a reaped process was signalled");
    }
    use crate::config::instances::tests::process_spec;

    /// An orchestrator of `process_spec` that has done nothing yet.
    fn orchestrator() -> ProcessOrchestrator {
        ProcessOrchestrator {
            spec: process_spec(),
            service: "web".into(),
            instances: Mutex::new(BTreeMap::new()),
            busy: Mutex::new(BTreeSet::new()),
            // Not registered: these tests make many at once.
            _claim: BridgeClaim(String::new()),
        }
    }

    #[test]
    fn placeholders_are_filled_per_instance() {
        let o = orchestrator();
        assert_eq!(o.command_for(7, "web-7"), ["/bin/srv", "--listen", "10.212.0.7:8080", "--name=web-7"]);
        assert_eq!(o.netns(7), "lbp0-7");
    }

    #[test]
    fn instances_are_named_from_one_by_their_slot() {
        assert_eq!(instance_name("web", FIRST), "web-1");
        assert_eq!(instance_name("web", 4), "web-3");
        assert_eq!(instance_name("api", LAST), "api-253");
    }

    #[test]
    fn only_a_bridge_the_orchestrator_made_is_removed() {
        let ours = format!("7: lbp0: <BROADCAST,MULTICAST,UP> mtu 1500 state UP \\    link/ether 02:00:00:00:00:01 brd ff:ff:ff:ff:ff:ff\\    alias {BRIDGE_ALIAS}");
        assert!(is_our_bridge(&ours));
        assert!(!is_our_bridge(
            "7: br0: <BROADCAST,MULTICAST,UP> mtu 1500 state UP \\    link/ether 02:00:00:00:00:01"
        ));
    }

    #[test]
    fn cpu_ticks_reads_our_own_process() {
        assert!(cpu_ticks(std::process::id()).is_some());
        assert_eq!(cpu_ticks(u32::MAX), None);
    }

    #[test]
    fn proc_stat_parses_names_with_spaces_and_tells_our_process_by_its_start() {
        let line = "4242 (lb backend) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0 123456 1000 10";
        let st = ProcStat::parse(line).unwrap();
        assert_eq!(st, ProcStat { state: 'S', ppid: 1, cpu_ticks: 12, start_time: 123456 });
        assert!(st.is_running());
        assert!(!ProcStat::parse(&line.replace(") S", ") Z")).unwrap().is_running());
        assert_eq!(ProcStat::parse("4242 (x"), None);
        let me = std::process::id();
        let started = ProcStat::read(me).unwrap().start_time;
        assert!(is_alive(me, started));
        assert!(!is_alive(me, started + 1), "a reused pid taken for the process");
    }

    #[test]
    fn leftovers_are_known_by_the_bridge_and_a_slot() {
        let o = orchestrator();
        assert_eq!(o.slot_of("lbp0-7"), Some(7));
        for other in ["lbp0-1", "lbp0-255", "lbp0-x", "lbp00-7", "lbp0", "lbp1-7", "lbp0-7x"] {
            assert_eq!(o.slot_of(other), None, "{other}");
        }
        assert_eq!(link_name("12: lbp0-7@if2: <BROADCAST,MULTICAST,UP> mtu 1500 master lbp0"), Some("lbp0-7"));
        assert_eq!(link_name("3: lbp0: <BROADCAST> mtu 1500"), Some("lbp0"));
    }
}
