//! The agent process.

use std::{
    fs::{self, File},
    io::{self, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use lb_agent::status::Snapshot;
use lb_lab::{netns::NetNs, topology::api_call_within};

pub(crate) struct AgentProc {
    pub(crate) child: Child,
    exited: Option<ExitStatus>,
    pub(crate) socket: PathBuf,
    log: PathBuf,
}

impl AgentProc {
    /// Start `bin args` in `ns`'s network namespace only (it shares our
    /// mount namespace, so the bpffs it mounts for its pins is one we can
    /// unmount), in its own process group, with SIGTERM if we die.
    pub(crate) fn spawn(
        bin: &Path,
        args: &[std::ffi::OsString],
        ns: Option<&NetNs>,
        log: &Path,
        socket: &Path,
    ) -> anyhow::Result<AgentProc> {
        let log_file = File::create(log).with_context(|| format!("create {}", log.display()))?;
        // Our own namespace when there is none to enter.
        let netns = ns.map(|ns| NetNs::open(ns.name())).transpose()?;
        let ns_name = ns.map_or("the host's namespace", |ns| ns.name());
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("dup log fd")?)
            .stderr(log_file)
            .process_group(0);
        // SAFETY: between fork and exec the child calls only setns(2) and
        // prctl(2), both async-signal-safe, on a descriptor that stays open
        // until spawn returns. This runs on the main thread, which lives as
        // long as lb-demo, so PDEATHSIG fires only when lb-demo dies.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(ns) = &netns {
                    ns.enter_for_good()?;
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("start {} in {ns_name}", bin.display()))?;
        Ok(AgentProc { child, exited: None, socket: socket.to_owned(), log: log.to_owned() })
    }

    pub(crate) fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// SIGTERM, wait up to `grace` (it stops its instances first), then
    /// SIGKILL.
    pub(crate) fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_exit() {
            return Some(s);
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child, not yet reaped (try_wait said it
        // runs), so the pid is still its.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = writeln!(io::stderr(), "warning: lb-agent (pid {pid}) ignored SIGTERM for {grace:?}; sending SIGKILL");
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
        self.exited
    }

    /// The status snapshot over the control socket.
    pub(crate) fn status(&self) -> anyhow::Result<Snapshot> {
        let answer = api_call(&self.socket, r#"{"op":"status"}"#)?;
        let mut v: serde_json::Value = serde_json::from_str(&answer).context("unreadable status answer")?;
        if v["ok"] != true {
            bail!("the agent refused status: {answer}");
        }
        serde_json::from_value(v["status"].take()).context("unexpected status layout")
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// One request line on the control socket, one answer line back (3 s
/// limits: the panel reads it twice a second).
pub(crate) fn api_call(socket: &Path, line: &str) -> anyhow::Result<String> {
    api_call_within(socket, line, Duration::from_secs(3))
        .with_context(|| format!("control socket {}", socket.display()))
}
