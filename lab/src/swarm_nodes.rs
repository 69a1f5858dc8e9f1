//! A multi-node Docker Swarm on one machine: one Docker engine per network
//! namespace, each with its own data root, exec root, pid file, API socket
//! and managed containerd, joined into one swarm over the namespaces'
//! addresses (2377, 7946 and 4789 stay inside them).
//!
//! The mount namespace trap: `ip netns exec` gives the engine a private
//! mount namespace with a fresh /sys for the network namespace, and that
//! /sys has no cgroup mounts ("Devices cgroup isn't mounted"). The engine's
//! start script mounts again, inside that mount namespace only, the cgroup
//! file systems the host has under /sys/fs/cgroup (read from
//! /proc/self/mounts, so a v1, hybrid or v2 host all work). Everything the
//! engine mounts (overlay2 layers, its namespaces) stays in that mount
//! namespace and goes with its last process.
//!
//! Every node is an RAII value: dropping it stops its engine (SIGTERM, then
//! SIGKILL), which stops its containerd and containers, then removes its
//! directory and its namespace.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{netns::NetNs, scratch::TempDir};

/// One Docker engine in a network namespace of its own.
pub struct SwarmNode {
    pub name: String,
    pub addr: Ipv4Addr,
    engine: Option<Child>,
    // Fields drop in order: the engine is stopped in `drop`, then the
    // namespace's name goes, then the directory.
    ns: NetNs,
    dir: TempDir,
}

/// The shell lines that mount the host's cgroup file systems again under a
/// fresh /sys (see the module's text); from /proc/self/mounts' text.
pub fn cgroup_mount_script(mounts: &str) -> String {
    let mut script = String::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [_, target, fstype, options, ..] = f[..] else { continue };
        if !target.starts_with("/sys/fs/cgroup") || !matches!(fstype, "tmpfs" | "cgroup" | "cgroup2") {
            continue;
        }
        // Only the options that say what to mount (e.g. `cpu`, `name=systemd`).
        let mut keep: Vec<&str> = options
            .split(',')
            .filter(|o| !matches!(*o, "rw" | "ro" | "relatime" | "nosuid" | "nodev" | "noexec" | "seclabel"))
            .collect();
        // A named v1 hierarchy without controllers (`name=systemd`): `none`
        // says so, or the mount would ask for every free controller.
        if fstype == "cgroup" && keep.iter().all(|o| o.starts_with("name=")) {
            keep.insert(0, "none");
        }
        let opts = if keep.is_empty() { String::new() } else { format!(" -o {}", keep.join(",")) };
        script += &format!("mkdir -p {target} && mount -t {fstype}{opts} {fstype} {target} || exit 1\n");
    }
    script
}

impl SwarmNode {
    /// A namespace `ns_name` with `eth0` at `addr`/24 (its peer, `peer`, is
    /// left in the caller's namespace for the caller to wire), default route
    /// via `gw`, and an engine in it.
    pub fn start(ns_name: &str, peer: &str, addr: Ipv4Addr, gw: Ipv4Addr, dir_name: &str) -> SwarmNode {
        let ns = NetNs::create(ns_name).unwrap_or_else(|e| panic!("{e}"));
        let dir = TempDir::create_new(dir_name).unwrap_or_else(|e| panic!("{e}"));
        let mut node = SwarmNode { name: ns_name.to_owned(), addr, engine: None, ns, dir };
        crate::command::run_cmd("ip", &["link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns_name]);
        node.ns.exec("ip", &["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        node.ns.exec("ip", &["link", "set", "eth0", "up"]);
        node.ns.exec("ip", &["link", "set", "lo", "up"]);
        node.ns.exec("ip", &["route", "add", "default", "via", &gw.to_string()]);

        // A task's image is built on every node, and there is no registry:
        // without DOCKER_SERVICE_PREFER_OFFLINE_IMAGE the engine tries a
        // pull before each task and waits for it to fail (about 20 s here).
        let d = node.dir.path().to_owned();
        let mounts = fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
        let script = format!(
            "{}DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 exec dockerd --data-root {data} --exec-root {exec} --pidfile {exec}/docker.pid -H unix://{sock} \
             --iptables=false --ip6tables=false --bridge=none\n",
            cgroup_mount_script(&mounts),
            data = d.join("data").display(),
            exec = d.join("exec").display(),
            sock = node.socket().display(),
        );
        fs::write(d.join("start.sh"), script).expect("write the engine's start script");
        let log = fs::File::create(d.join("dockerd.log")).expect("create the engine's log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns_name, "sh"])
            .arg(d.join("start.sh"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn dockerd in {ns_name}: {e}"));
        node.engine = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node.try_docker(&["info", "--format", "{{.ServerVersion}}"]).0 {
            if let Some(Ok(Some(status))) = node.engine.as_mut().map(Child::try_wait) {
                panic!("dockerd in {ns_name} exited ({status}); its log:\n{}", node.log());
            }
            assert!(Instant::now() < deadline, "dockerd in {ns_name} did not answer within 30 s:\n{}", node.log());
            thread::sleep(Duration::from_millis(100));
        }
        node
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// `docker -H <this engine> <args>`: success and combined output.
    pub fn try_docker(&self, args: &[&str]) -> (bool, String) {
        let host = format!("unix://{}", self.socket().display());
        let mut all = vec!["-H", host.as_str()];
        all.extend_from_slice(args);
        crate::docker::docker_try(&all)
    }

    /// `docker -H <this engine> <args>`; panics with its output on failure.
    pub fn docker(&self, args: &[&str]) -> String {
        let (ok, out) = self.try_docker(args);
        assert!(ok, "docker {} on {}: {out}", args.join(" "), self.name);
        out
    }

    /// `docker build` of a directory into this engine (the classic builder).
    pub fn build(&self, tag: &str, context: &Path) {
        let out = Command::new("docker")
            .args(["-H", &format!("unix://{}", self.socket().display()), "build", "-q", "-t", tag])
            .arg(context)
            .env("DOCKER_BUILDKIT", "0")
            .stdin(Stdio::null())
            .output()
            .expect("run docker build");
        assert!(out.status.success(), "docker build on {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
    }

    /// Make this node the swarm's manager, listening and advertising on its
    /// own address.
    pub fn init_swarm(&self) {
        let listen = format!("{}:2377", self.addr);
        self.docker(&["swarm", "init", "--listen-addr", &listen, "--advertise-addr", &self.addr.to_string()]);
    }

    /// Join `manager`'s swarm as a worker.
    pub fn join(&self, manager: &SwarmNode) {
        let token = manager.docker(&["swarm", "join-token", "-q", "worker"]);
        let listen = format!("{}:2377", self.addr);
        let remote = format!("{}:2377", manager.addr);
        self.docker(&[
            "swarm",
            "join",
            "--listen-addr",
            &listen,
            "--advertise-addr",
            &self.addr.to_string(),
            "--token",
            token.trim(),
            &remote,
        ]);
    }

    /// Processes whose command line names this node's directory (its
    /// engine, containerd, shims); empty once it is stopped.
    pub fn processes(&self) -> Vec<u32> {
        let dir = self.dir.path().to_string_lossy().into_owned();
        let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&dir))
            })
            .collect()
    }
}

impl Drop for SwarmNode {
    fn drop(&mut self) {
        if let Some(child) = self.engine.as_mut() {
            crate::docker::stop_engine(child, &format!("dockerd in {}", self.name));
        }
        // containerd and its shims go a moment after the engine.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.processes().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        for pid in self.processes() {
            eprintln!("warning: pid {pid} of node {} outlived its engine; killing it", self.name);
            // SAFETY: a process whose command line names this node's own
            // directory: one this node started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_mounts_are_made_again_from_the_hosts() {
        let mounts = "sysfs /sys sysfs rw,nosuid 0 0\n\
                      tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n\
                      cgroup /sys/fs/cgroup/devices cgroup rw,relatime,devices 0 0\n\
                      cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            cgroup_mount_script(mounts),
            "mkdir -p /sys/fs/cgroup && mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup || exit 1\n\
             mkdir -p /sys/fs/cgroup/devices && mount -t cgroup -o devices cgroup /sys/fs/cgroup/devices || exit 1\n\
             mkdir -p /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd || \
             exit 1\n\
             mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified || exit 1\n"
        );
        let v2 = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime,nsdelegate 0 0\n";
        assert_eq!(
            cgroup_mount_script(v2),
            "mkdir -p /sys/fs/cgroup && mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || exit 1\n"
        );
    }
}
