//! The programs the bench starts (wrk, nginx, haproxy), each inside one of
//! its namespaces, owned by a guard that ends it on drop.

use std::{
    fs::File,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lb_lab::netns::NetNs;

/// A child process; drop sends SIGTERM, waits up to [`GRACE`], then
/// SIGKILL. Only this child is ever signalled, by its pid, and only while it
/// is not reaped (so the pid is still its own).
pub struct Proc {
    name: String,
    child: Child,
    exited: Option<ExitStatus>,
}

const GRACE: Duration = Duration::from_secs(5);

impl Proc {
    /// `program args` inside `ns` (`ip netns exec`, which execs the program
    /// itself, so the child's pid is the program's), stdout and stderr to
    /// `log`.
    pub fn spawn_in(ns: &NetNs, name: &str, program: &str, args: &[String], log: &Path) -> Result<Proc> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone().with_context(|| format!("dup {}", log.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("start {name}: ip netns exec {} {program}", ns.name()))?;
        Ok(Proc { name: name.to_owned(), child, exited: None })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exit status, once it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().with_context(|| format!("wait for {}", self.name))?;
        }
        Ok(self.exited)
    }

    fn stop(&mut self) {
        if matches!(self.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child, not reaped yet (try_wait said it
        // runs), so the pid cannot belong to anyone else.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if matches!(self.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("[bench] warning: {} (pid {pid}) ignored SIGTERM for {GRACE:?}; sending SIGKILL", self.name);
        // Child::kill is SIGKILL to this unreaped child.
        if let Err(e) = self.child.kill() {
            eprintln!("[bench] warning: SIGKILL {} (pid {pid}): {e}", self.name);
        }
        self.exited = self.child.wait().ok();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}
