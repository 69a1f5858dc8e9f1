//! A cgroup v2 directory of a test's own, for socket load balancing: the
//! agent attaches its socket programs there (`[socket_lb] cgroup`), and
//! only the processes the test puts in it are balanced, so nothing else on
//! the machine is touched. The agent's default is the cgroup v2 mount
//! itself, which holds every process here: every config the lab writes
//! turns socket load balancing off ([`socket_lb_toml`] with `None`) unless
//! a test names its own cgroup.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use lb_agent::adapters::host_facts::find_cgroup2_mount;

use crate::netns::{set_thread_netns, NetNs};

/// The `[socket_lb]` table of an agent config: attached to `cgroup`, or off.
pub fn socket_lb_toml(cgroup: Option<&Path>) -> String {
    match cgroup {
        Some(c) => format!("\n[socket_lb]\ncgroup = {:?}\n", c.display().to_string()),
        None => "\n[socket_lb]\nenabled = false\n".to_owned(),
    }
}

/// `<cgroup v2 mount>/lb-test-<pid>-<n>`, removed on drop after the
/// processes still in it are moved back to the cgroup this process is in.
pub struct TestCgroup {
    path: PathBuf,
    /// Where leftovers go: this process's own cgroup v2.
    home: PathBuf,
}

impl TestCgroup {
    /// Creates a fresh one; fails when no cgroup v2 is mounted.
    pub fn create() -> io::Result<TestCgroup> {
        static N: AtomicU32 = AtomicU32::new(0);
        let mount = find_cgroup2_mount()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup v2 mount in /proc/self/mountinfo"))?;
        let own = fs::read_to_string("/proc/self/cgroup")?
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(|p| p.trim_start_matches('/').to_owned()))
            .unwrap_or_default();
        let path = mount.join(format!("lb-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir(&path).map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", path.display())))?;
        Ok(TestCgroup { path, home: mount.join(own) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The processes in it now.
    pub fn pids(&self) -> Vec<u32> {
        let text = fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
        text.lines().filter_map(|l| l.trim().parse().ok()).collect()
    }

    /// Moves the process `pid` (all its threads) in.
    pub fn add(&self, pid: u32) -> io::Result<()> {
        fs::write(self.path.join("cgroup.procs"), pid.to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("move pid {pid} into {}: {e}", self.path.display())))
    }

    /// Makes `cmd`'s process start inside this cgroup and, with `ns`, in
    /// that network namespace: the child moves itself between fork and
    /// exec, so nothing it runs is ever outside.
    pub fn confine(&self, ns: Option<&NetNs>, cmd: &mut Command) -> io::Result<()> {
        let procs = CString::new(self.path.join("cgroup.procs").into_os_string().into_encoded_bytes())?;
        let netns: Option<OwnedFd> = ns.map(|ns| ns.as_fd().try_clone_to_owned()).transpose()?;
        // SAFETY: between fork and exec the child calls only open(2),
        // write(2), close(2) and setns(2), all async-signal-safe, on memory
        // and descriptors the closure owns. Writing "0" to cgroup.procs
        // moves the writer itself.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, c"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(err);
                }
                if let Some(fd) = &netns {
                    set_thread_netns(fd.as_fd())?;
                }
                Ok(())
            });
        }
        Ok(())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let home = self.home.join("cgroup.procs");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for pid in self.pids() {
                // A process that exits meanwhile cannot be moved; fine.
                let _ = fs::write(&home, pid.to_string());
            }
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    eprintln!("warning: cannot remove the test cgroup {}: {e}", self.path.display());
                    return;
                }
                // EBUSY while an exiting process is still counted.
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}
