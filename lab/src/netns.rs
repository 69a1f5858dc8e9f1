//! Network namespaces as RAII values (the shape of aya's `NetNsGuard` in
//! `aya/src/test_helpers.rs`).
//!
//! A [`NetNs`] is an open file descriptor on a namespace; the kernel frees
//! the namespace when the last descriptor, the last thread or process
//! inside it and its name (if it has one) are gone. Three kinds:
//!
//! - anonymous ([`NetNs::new`]): nothing is left behind even if the process
//!   is killed. Uses only syscalls, no `ip` binary, so it also works from a
//!   static test binary in a bare initramfs.
//! - named by this process ([`NetNs::create`], [`NetNs::attach_process`]):
//!   `ip`, `ethtool` and `sysctl` reach a namespace by its name under
//!   [`NETNS_DIR`]. Dropping removes the name, and with it a namespace made
//!   here (and its veths) once nothing else holds it. The cost: a process
//!   killed with SIGKILL leaves its names behind for `ip netns del`.
//! - named by someone else ([`NetNs::open`]): left as it is.
//!
//! [`NetNs::enter`] moves the calling thread in and returns a guard that
//! moves it back on drop, also while unwinding from a panic; [`NetNs::run`]
//! and [`NetNs::spawn`] run code on a thread inside. Needs CAP_SYS_ADMIN.

use std::{
    fs::{self, File},
    io,
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread::{self, JoinHandle},
};

use crate::command::{run_cmd, try_run_cmd};

/// Where `ip netns` keeps the names of namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// The calling thread's namespace (`/proc/self/ns/net` would name the main
/// thread's, and tests run on other threads).
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// The path of the namespace named `name`; refuses names that would leave
/// [`NETNS_DIR`].
pub fn netns_path(name: &str) -> io::Result<PathBuf> {
    let bad =
        |reason: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("network namespace {name:?}: {reason}"));
    if name.is_empty() || name == "." || name == ".." {
        return Err(bad("empty or a dot name"));
    }
    if name.contains(['/', '\0']) {
        return Err(bad("must be a plain name, as `ip netns list` shows it"));
    }
    Ok(PathBuf::from(NETNS_DIR).join(name))
}

/// A network namespace that lives as long as this value (or longer, while a
/// thread, a process or a device still sits in it).
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    /// Its name under [`NETNS_DIR`], if it has one.
    name: Option<String>,
    /// This value gave it the name, and removes it on drop.
    owns_name: bool,
}

impl NetNs {
    /// Creates an anonymous namespace without moving the caller: a
    /// short-lived thread unshares into it and hands back a descriptor
    /// before it exits.
    pub fn new() -> io::Result<Self> {
        thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: plain syscall; it only changes this helper thread.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(Self { fd: File::open(THREAD_NETNS)?.into(), name: None, owns_name: false })
            })
            .join()
            .map_err(|_| io::Error::other("netns helper thread panicked"))?
        })
    }

    /// Creates the namespace `name` (`ip netns add`) with its loopback up
    /// and no IPv6 duplicate address detection (see [`Self::without_dad`]);
    /// dropping the value deletes it. Refuses a name that exists already:
    /// this run did not create that namespace.
    pub fn create(name: &str) -> io::Result<Self> {
        let path = netns_path(name)?;
        if path.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "network namespace {name} already exists; refusing to reuse a namespace this run did not create"
                ),
            ));
        }
        try_run_cmd("ip", &["netns", "add", name])?;
        Self::adopt(name, true)?.with_loopback_up()?.without_dad()
    }

    /// Names this process's own network namespace `name` (`ip netns attach
    /// NAME PID`), so that what needs a name can reach it. Dropping removes
    /// only the name, never the namespace.
    pub fn attach_process(name: &str) -> io::Result<Self> {
        let path = netns_path(name)?;
        if path.exists() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists already", path.display())));
        }
        try_run_cmd("ip", &["netns", "attach", name, &std::process::id().to_string()])?;
        Self::adopt(name, true)
    }

    /// The existing namespace `name`, made by someone else: dropping the
    /// value leaves it as it is.
    pub fn open(name: &str) -> io::Result<Self> {
        Self::adopt(name, false)
    }

    fn adopt(name: &str, owns_name: bool) -> io::Result<Self> {
        let path = netns_path(name)?;
        match File::open(&path) {
            Ok(f) => Ok(Self { fd: f.into(), name: Some(name.to_owned()), owns_name }),
            Err(e) => {
                if owns_name {
                    // Named just now by us: do not leave the name behind.
                    let _ = try_run_cmd("ip", &["netns", "del", name]);
                }
                Err(io::Error::new(e.kind(), format!("open {}: {e}", path.display())))
            }
        }
    }

    fn with_loopback_up(self) -> io::Result<Self> {
        try_run_cmd("ip", &["-n", self.name(), "link", "set", "lo", "up"])?;
        Ok(self)
    }

    /// Turns IPv6 duplicate address detection off for every interface made
    /// in (or moved into) the namespace from now on. Tests give addresses
    /// `nodad`, but the kernel's own link-local addresses stay tentative
    /// for about a second after a link comes up, and a namespace that
    /// forwards has no other source for its neighbour solicitations (the
    /// forwarded packet's source is not its own): the first packet it
    /// forwards to a neighbour waits for the second or third solicitation,
    /// some two seconds, which is a test's whole I/O timeout. Nothing in a
    /// test's namespace can collide with anything. `-e`: a kernel without
    /// IPv6 has no such key.
    fn without_dad(self) -> io::Result<Self> {
        try_run_cmd(
            "ip",
            &[
                "netns",
                "exec",
                self.name(),
                "sysctl",
                "-q",
                "-e",
                "-w",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        Ok(self)
    }

    /// The namespace's name under [`NETNS_DIR`].
    ///
    /// # Panics
    /// For an anonymous namespace ([`NetNs::new`]), which has none.
    pub fn name(&self) -> &str {
        self.name.as_deref().expect("an anonymous network namespace has no name")
    }

    /// Moves the calling thread into this namespace until the guard drops.
    /// The guard does not borrow `self`: a thread inside a namespace keeps
    /// it alive on its own.
    pub fn enter(&self) -> io::Result<Entered> {
        let previous: OwnedFd = File::open(THREAD_NETNS)?.into();
        set_thread_netns(self.fd.as_fd())?;
        Ok(Entered { previous, _not_send: PhantomData })
    }

    /// Moves the calling thread into this namespace for good: for threads
    /// that were started to work in there until they end.
    pub fn enter_for_good(&self) -> io::Result<()> {
        set_thread_netns(self.fd.as_fd())
    }

    /// Runs `f` on a short-lived thread inside this namespace and returns
    /// its result; a panic in `f` is raised again here. Fails only if the
    /// thread cannot enter.
    pub fn try_run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        thread::scope(|s| {
            let handle = s.spawn(|| {
                self.enter_for_good()?;
                Ok(f())
            });
            match handle.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    /// [`NetNs::try_run`] for tests: panics if the thread cannot enter.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.try_run(f).unwrap_or_else(|e| panic!("enter network namespace {self}: {e}"))
    }

    /// Spawns a thread that enters this namespace, then runs `f`.
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
        let fd = self.fd.try_clone().expect("dup the namespace descriptor");
        let label = self.to_string();
        thread::Builder::new()
            .name(format!("in-{label}"))
            .spawn(move || {
                set_thread_netns(fd.as_fd()).unwrap_or_else(|e| panic!("enter network namespace {label}: {e}"));
                drop(fd);
                f()
            })
            .expect("spawn thread")
    }

    /// Runs a program inside this namespace (via `ip netns exec`, which also
    /// remounts /sys for it); panics on failure, returns stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name(), program];
        all.extend_from_slice(args);
        run_cmd("ip", &all)
    }

    /// Like [`NetNs::exec`] but returns the status and combined output
    /// instead of panicking.
    pub fn exec_status(&self, program: &str, args: &[&str]) -> (ExitStatus, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", self.name(), program])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run ip netns exec {} {program}: {e}", self.name()));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status, text)
    }

    /// Packets this namespace's stack dropped for a bad checksum:
    /// (TCP InCsumErrors, UDP InCsumErrors) from its /proc/net/snmp.
    pub fn csum_errors(&self) -> (u64, u64) {
        // /proc/thread-self/net follows the thread's namespace; /proc/net
        // would show the main thread's.
        let snmp = self
            .run(|| fs::read_to_string("/proc/thread-self/net/snmp"))
            .unwrap_or_else(|e| panic!("read snmp counters in {self}: {e}"));
        (snmp_counter(&snmp, "Tcp", "InCsumErrors"), snmp_counter(&snmp, "Udp", "InCsumErrors"))
    }

    /// The namespace's inode number, which identifies it (as `ip netns
    /// identify` and `/proc/*/ns/net` links show).
    pub fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(File::from(self.fd.try_clone()?).metadata()?.ino())
    }

    /// Removes the name this value gave (as drop does), with the error if
    /// that fails.
    pub fn remove(mut self) -> io::Result<()> {
        self.remove_name()
    }

    fn remove_name(&mut self) -> io::Result<()> {
        match (&self.name, std::mem::take(&mut self.owns_name)) {
            // Deleting a namespace's name deletes the namespace once nothing
            // else holds it, and with it the veths in it (and their peers).
            (Some(name), true) => try_run_cmd("ip", &["netns", "del", name]).map(drop),
            _ => Ok(()),
        }
    }
}

/// Its name, or `(anonymous)`.
impl std::fmt::Display for NetNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name.as_deref().unwrap_or("(anonymous)"))
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = self.remove_name() {
            eprintln!("warning: {e}");
        }
    }
}

/// Whether a link of that name is in the calling thread's namespace.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// `ip link del <name>` if it is there; a failure is only a warning (for
/// guards).
pub fn del_link(name: &str) {
    if link_exists(name) {
        if let Err(e) = try_run_cmd("ip", &["link", "del", name]) {
            eprintln!("warning: ip link del {name}: {e}");
        }
    }
}

/// A link in the host's namespace that a test made (e.g. the host end of a
/// veth into a namespace): deleted on drop, at once, instead of whenever
/// the kernel gets round to tearing down the namespace at its other end.
pub struct LinkGuard(pub String);

impl Drop for LinkGuard {
    fn drop(&mut self) {
        del_link(&self.0);
    }
}

/// The calling thread is inside a `NetNs`; dropping this moves it back.
/// Not `Send`: namespaces belong to threads, so the guard must drop on the
/// thread that entered.
#[must_use = "the thread leaves the namespace when the guard drops"]
pub struct Entered {
    previous: OwnedFd,
    _not_send: PhantomData<*mut ()>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Err(e) = set_thread_netns(self.previous.as_fd()) {
            // A thread stranded in a test namespace would make every later
            // result on it meaningless, and panicking while unwinding would
            // abort anyway: stop here, loudly.
            eprintln!("cannot return to the previous network namespace: {e}");
            std::process::abort();
        }
    }
}

/// The inode of the calling thread's current namespace.
pub fn current_inode() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(THREAD_NETNS)?.ino())
}

/// Moves the calling thread into the namespace `fd` refers to. The one
/// place that calls setns(2): also between fork and exec, where only
/// async-signal-safe calls may run (this is one syscall and errno).
pub(crate) fn set_thread_netns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid namespace descriptor; it only changes
    // the calling thread.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates a fresh namespace, moves the calling thread in, and on drop moves
/// it back and releases the namespace: the usual one-liner for a test.
pub struct NetNsGuard {
    _entered: Entered,
    ns: NetNs,
}

impl NetNsGuard {
    pub fn new() -> io::Result<Self> {
        let ns = NetNs::new()?;
        Ok(Self { _entered: ns.enter()?, ns })
    }

    pub fn netns(&self) -> &NetNs {
        &self.ns
    }
}

/// One counter from /proc/net/snmp, whose sections are a header line and a
/// value line with the same prefix ("Tcp: ... InCsumErrors" / "Tcp: ... 0").
fn snmp_counter(snmp: &str, section: &str, name: &str) -> u64 {
    let prefix = format!("{section}:");
    let mut lines = snmp.lines().filter(|l| l.starts_with(&prefix));
    let (Some(header), Some(values)) = (lines.next(), lines.next()) else {
        panic!("no {section} section in snmp:\n{snmp}");
    };
    let i = header.split_whitespace().position(|h| h == name).unwrap_or_else(|| panic!("no {section} {name} in snmp"));
    values
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad {section} {name} value"))
}

/// Pids of the processes in the named network namespace `ns` (`ip netns
/// pids`, which compares each process's /proc/<pid>/ns/net, so it also finds
/// processes that entered with setns). Empty when there are none, or no
/// such namespace.
pub fn netns_pids(ns: &str) -> Vec<u32> {
    try_run_cmd("ip", &["netns", "pids", ns])
        .map(|out| out.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// The namespaces `<bridge>-<n>` that lb-agent's process orchestrator makes
/// for its instances, and a guard for them.
///
/// Their names are global (`ip netns` keeps them in [`NETNS_DIR`]), so each
/// agent gets a bridge of its own name. An agent that stops normally stops
/// its instances and deletes their namespaces; one that was killed leaves
/// them behind with its instance processes still running inside. Dropping
/// this guard (declare it before the agent, so that it drops after it)
/// SIGKILLs, by pid, the processes in each namespace of this bridge that is
/// left, and deletes the namespace.
#[derive(Debug)]
pub struct InstanceNamespaces {
    bridge: String,
}

impl InstanceNamespaces {
    /// Claim `bridge`'s instance namespaces; refuses when some exist
    /// already, since they are not this run's.
    pub fn try_claim(bridge: &str) -> io::Result<InstanceNamespaces> {
        let guard = InstanceNamespaces { bridge: bridge.to_owned() };
        let existing = guard.list();
        if !existing.is_empty() {
            // Not ours: forget them rather than let Drop remove them.
            std::mem::forget(guard);
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "instance namespaces {} exist already; refusing to touch what this run did not create",
                    existing.join(", ")
                ),
            ));
        }
        Ok(guard)
    }

    /// [`InstanceNamespaces::try_claim`] for tests: panics on refusal.
    pub fn claim(bridge: &str) -> InstanceNamespaces {
        Self::try_claim(bridge).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The instance namespaces of this bridge that exist now, sorted.
    pub fn list(&self) -> Vec<String> {
        let prefix = format!("{}-", self.bridge);
        let Ok(entries) = fs::read_dir(NETNS_DIR) else { return Vec::new() };
        let mut out: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| {
                n.strip_prefix(&prefix).is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect();
        out.sort();
        out
    }

    /// SIGKILL the processes in each namespace of this bridge that is left
    /// and delete it; a line for each, saying what was done.
    pub fn remove_left(&self) -> Vec<String> {
        let me = std::process::id();
        let mut notes = Vec::new();
        for ns in self.list() {
            let pids = netns_pids(&ns);
            for &pid in &pids {
                if pid <= 1 || pid == me {
                    continue;
                }
                // SAFETY: kill(2) with a pid read just now from a namespace
                // that only our agent's instances use.
                if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } != 0 {
                    notes.push(format!("SIGKILL {pid} in {ns}: {}", io::Error::last_os_error()));
                }
            }
            notes.push(match try_run_cmd("ip", &["netns", "del", &ns]) {
                Ok(_) => format!("instance namespace {ns} was left behind (processes {pids:?}); removed it"),
                Err(e) => format!("instance namespace {ns} was left behind (processes {pids:?}): {e}"),
            });
        }
        notes
    }
}

impl Drop for InstanceNamespaces {
    fn drop(&mut self) {
        for note in self.remove_left() {
            eprintln!("warning: {note}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links_in_current_netns() -> Vec<String> {
        // /proc/thread-self/net follows the thread's namespace (sysfs would
        // show the namespace it was mounted in).
        let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(|n| n.trim().to_owned()).collect()
    }

    #[test]
    fn root_guard_enters_a_fresh_namespace_and_returns() {
        crate::require_root!("root_guard_enters_a_fresh_namespace_and_returns");
        let outside = current_inode().unwrap();
        {
            let guard = NetNsGuard::new().unwrap();
            let inside = current_inode().unwrap();
            assert_ne!(inside, outside);
            assert_eq!(inside, guard.netns().inode().unwrap());
            assert_eq!(links_in_current_netns(), ["lo"]);
        }
        assert_eq!(current_inode().unwrap(), outside);
    }

    #[test]
    fn root_guard_returns_when_the_test_panics() {
        crate::require_root!("root_guard_returns_when_the_test_panics");
        let outside = current_inode().unwrap();
        let result = std::panic::catch_unwind(|| {
            let _guard = NetNsGuard::new().unwrap();
            panic!("a failing test inside the namespace");
        });
        assert!(result.is_err());
        assert_eq!(current_inode().unwrap(), outside);
    }

    #[test]
    fn root_new_does_not_move_the_caller() {
        crate::require_root!("root_new_does_not_move_the_caller");
        let outside = current_inode().unwrap();
        let ns = NetNs::new().unwrap();
        assert_eq!(current_inode().unwrap(), outside);
        assert_ne!(ns.inode().unwrap(), outside);
    }

    #[test]
    fn netns_names_stay_in_the_netns_dir() {
        assert_eq!(netns_path("lbt-1-client").unwrap(), PathBuf::from(NETNS_DIR).join("lbt-1-client"));
        for bad in ["", ".", "..", "../../proc/1/ns/net", "a/b", "x\0"] {
            assert!(netns_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn snmp_counters_are_found_by_name() {
        let snmp = "Tcp: RtoAlgorithm RtoMin InCsumErrors\nTcp: 1 200 7\nUdp: InDatagrams InCsumErrors\nUdp: 10 3\n";
        assert_eq!(snmp_counter(snmp, "Tcp", "InCsumErrors"), 7);
        assert_eq!(snmp_counter(snmp, "Udp", "InCsumErrors"), 3);
    }
}
