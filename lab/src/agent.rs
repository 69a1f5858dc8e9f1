//! lb-agent as a process: `lb-agent run` inside a network namespace
//! ([`Agent`]), its command line ([`run_agent_cli`]) and its control socket
//! ([`api_call`]).
//!
//! Helpers that panic are for tests (a panic keeps the backtrace); the
//! `try_` forms return errors, for the tools.

use std::{
    fs,
    io::{self, BufRead, BufReader, ErrorKind, Write as _},
    net::SocketAddr,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{
    bins::try_built_bin,
    netns::{set_thread_netns, NetNs},
};

/// Where `lb-agent` is: `$LB_AGENT_BIN`, else beside the running
/// executable (see [`try_built_bin`]).
pub fn try_agent_bin() -> io::Result<PathBuf> {
    try_built_bin("lb-agent", "LB_AGENT_BIN")
}

/// [`try_agent_bin`] for tests: panics with the error.
pub fn agent_bin() -> PathBuf {
    try_agent_bin().unwrap_or_else(|e| panic!("{e}"))
}

/// How to run one `lb-agent run`: the flags it gets and where its log goes.
/// [`crate::scratch::Scratch::agent_args`] (and
/// [`crate::topology::Topology::agent_args`] with it) gives
/// every agent its own control socket and pin directory inside a scratch
/// directory, so tests never meet the system's defaults (`/run/lb-agent`,
/// `/sys/fs/bpf/lb-agent`) or each other.
#[derive(Clone, Debug)]
pub struct AgentArgs {
    pub config: PathBuf,
    pub api_socket: PathBuf,
    /// `None` passes `--metrics-address off`.
    pub metrics_address: Option<SocketAddr>,
    /// `None` passes `--no-pin`. The agent mounts bpffs on the directory's
    /// parent if it is not on one already.
    pub pin_dir: Option<PathBuf>,
    pub keep_on_exit: bool,
    /// stderr and stdout, appended to (a restarted agent adds to the log).
    pub log: PathBuf,
    /// Start it in a process group of its own, so that a Ctrl-C on the
    /// terminal reaches only the caller, which then stops it in order; and
    /// have the kernel send it SIGTERM when the thread that spawned it ends
    /// (PR_SET_PDEATHSIG), so that it never outlives a caller that dies.
    /// For lb-demo, which spawns from its main thread.
    pub own_process_group: bool,
    /// Extra environment, e.g. `DOCKER_HOST` for an engine of the test's.
    pub env: Vec<(String, String)>,
}

/// A running `lb-agent run` inside a network namespace, with its output
/// going to a log file. Drop sends SIGTERM, waits up to 5 s, then SIGKILL.
/// Only the processes this guard spawned are ever signalled, by pid.
///
/// The agent enters only the namespace's *network* namespace (setns in the
/// child before exec, as `nsenter --net` does); it stays in the test's mount
/// namespace. `ip netns exec` would give it a private mount namespace, and
/// the bpffs it mounts for its pins would vanish with it, so a restarted
/// agent could never adopt them.
pub struct Agent {
    child: Child,
    /// The namespace it runs in (`None`: the caller's), for a respawn.
    netns: Option<OwnedFd>,
    /// Where it runs, for messages.
    place: String,
    args: AgentArgs,
    /// Where this process's part of the log starts.
    log_start: usize,
    exited: Option<ExitStatus>,
}

impl Agent {
    /// Spawn the agent in `ns`'s network namespace; panics on failure. The
    /// child's pid is the agent's. Does not wait for anything.
    pub fn spawn(ns: &NetNs, args: &AgentArgs) -> Agent {
        Agent::try_spawn(Some(ns), args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Spawn the agent in `ns`'s network namespace, or in the caller's when
    /// `None`. Does not wait for anything.
    pub fn try_spawn(ns: Option<&NetNs>, args: &AgentArgs) -> io::Result<Agent> {
        let netns = ns.map(|ns| ns.as_fd().try_clone_to_owned()).transpose()?;
        let place =
            ns.map_or_else(|| "the caller's network namespace".to_owned(), |ns| format!("network namespace {ns}"));
        let (child, log_start) = spawn_agent_process(netns.as_ref().map(AsFd::as_fd), args)
            .map_err(|e| io::Error::new(e.kind(), format!("start lb-agent in {place}: {e}")))?;
        Ok(Agent { child, netns, place, args: args.clone(), log_start, exited: None })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn args(&self) -> &AgentArgs {
        &self.args
    }

    pub fn log_path(&self) -> &Path {
        &self.args.log
    }

    /// This process's log so far (not its predecessors'), without ANSI
    /// colour codes.
    pub fn log(&self) -> String {
        let all = fs::read(&self.args.log).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(&all[self.log_start.min(all.len())..]))
    }

    /// The last `lines` lines of [`Agent::log`].
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The whole log file, every agent this guard started.
    pub fn full_log(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(&fs::read(&self.args.log).unwrap_or_default()))
    }

    /// Lines of the log whose message is `message` (matched as `": message"`
    /// or `" message "`-style at a word boundary).
    pub fn count(&self, message: &str) -> usize {
        self.log().lines().filter(|l| has_message(l, message)).count()
    }

    /// Has the process exited? Remembers the status.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Wait until `message` has appeared `n` times; panic (with the log) if
    /// the agent exits or `timeout` passes first.
    pub fn wait_for(&mut self, message: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count(message) >= n {
                return;
            }
            if let Some(status) = self.try_exit_status() {
                panic!("lb-agent exited ({status}) before logging {message:?}; its log:\n{}", self.log());
            }
            if Instant::now() >= deadline {
                panic!("lb-agent did not log {message:?} (x{n}) within {timeout:?}; its log:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_ready(&mut self) {
        self.wait_for("ready", 1, Duration::from_secs(20));
    }

    /// Run `change` (which rewrites the config file) and wait for the next
    /// "config applied"; panics if the agent logs "config refused" instead.
    pub fn reload_with(&mut self, change: impl FnOnce()) {
        let applied = self.count("config applied");
        let refused = self.count("config refused; keeping the running one");
        change();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.count("config applied") > applied {
                return;
            }
            if self.count("config refused; keeping the running one") > refused {
                panic!("lb-agent refused the new config; its log:\n{}", self.log());
            }
            if let Some(status) = self.try_exit_status() {
                panic!("lb-agent exited ({status}) during a reload; its log:\n{}", self.log());
            }
            if Instant::now() >= deadline {
                panic!("lb-agent did not log \"config applied\" within 10 s; its log:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// XDP modes the agent reported, as (interface, "native" | "generic").
    pub fn modes(&self) -> Vec<(String, String)> {
        self.attached("mode")
    }

    /// (interface, checksums) for each attach the agent logged: which of the
    /// two programs it chose ("complete" or "may-be-partial").
    pub fn checksum_modes(&self) -> Vec<(String, String)> {
        self.attached("checksums")
    }

    /// (interface, the value of `key`) for each attach the agent logged.
    fn attached(&self, key: &str) -> Vec<(String, String)> {
        self.log()
            .lines()
            .filter(|l| has_message(l, "attached"))
            .filter_map(|l| Some((field(l, "interface")?, field(l, key)?)))
            .collect()
    }

    /// Wait (bounded) for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, wait up to 5 s, SIGKILL if needed; returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.stop_within(Duration::from_secs(5))
    }

    /// SIGTERM, wait up to `grace` (it stops its instances and detaches
    /// first), SIGKILL if needed; returns the exit status.
    pub fn stop_within(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_exit_status() {
            return Some(s);
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped
        // (try_wait said it is still running), so the pid cannot be reused yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if let Some(s) = self.wait_exit(grace) {
            return Some(s);
        }
        // Not eprintln: this also runs while unwinding, and a second panic
        // would abort.
        let _ = writeln!(io::stderr(), "warning: lb-agent (pid {pid}) ignored SIGTERM for {grace:?}; sending SIGKILL");
        self.kill()
    }

    /// SIGKILL now (a crash: nothing is cleaned up, pinned state stays) and
    /// reap; returns the exit status.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.try_exit_status() {
            return Some(s);
        }
        // Child::kill is SIGKILL to this child's pid, which is not reaped yet.
        if let Err(e) = self.child.kill() {
            eprintln!("warning: SIGKILL lb-agent (pid {}): {e}", self.child.id());
        }
        self.exited = self.child.wait().ok();
        self.exited
    }

    /// Start a new agent with the same arguments (config, socket, pins) in
    /// place of this one, which must have exited (see [`Agent::kill`]).
    /// Does not wait for it to be ready; `log` and `count` now see only the
    /// new process's lines.
    pub fn respawn(&mut self) {
        assert!(self.try_exit_status().is_some(), "respawn: lb-agent (pid {}) is still running", self.child.id());
        let (child, log_start) = spawn_agent_process(self.netns.as_ref().map(AsFd::as_fd), &self.args)
            .unwrap_or_else(|e| panic!("restart lb-agent in {}: {e}", self.place));
        self.child = child;
        self.log_start = log_start;
        self.exited = None;
    }

    /// One request line on the control socket (a fresh connection); the
    /// answer parsed as JSON. `line` goes as it is, plus a newline. Panics if
    /// the agent does not answer within 5 s.
    pub fn api(&self, line: &str) -> serde_json::Value {
        let sock = &self.args.api_socket;
        let answer = api_call(sock, line).unwrap_or_else(|e| panic!("control socket {}: {e}", sock.display()));
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("unreadable answer {answer:?} to {line:.200}: {e}"))
    }

    /// [`Agent::api`] for a change that must be accepted.
    pub fn api_ok(&self, line: &str) -> serde_json::Value {
        let v = self.api(line);
        assert_eq!(v["ok"], true, "the agent refused {line}: {v}");
        v
    }

    /// The agent's status snapshot (what `lb-agent status --json` prints),
    /// straight from the control socket.
    pub fn status(&self) -> serde_json::Value {
        let mut v = self.api_ok(r#"{"op":"status"}"#);
        v["status"].take()
    }

    /// Polls the status until `done` holds; after `timeout`, panics with
    /// what was awaited and the last status's scaling part (the agent's log
    /// follows from the guard's drop).
    pub fn wait_status(
        &self,
        what: &str,
        timeout: std::time::Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let s = self.status();
            if done(&s) {
                return s;
            }
            if std::time::Instant::now() >= deadline {
                panic!("{what}: not within {timeout:?}; last status:\n{:#}", one_scaling(&s));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// The new flows the agent counted for `service`, all its backends.
    pub fn new_flows(&self, service: &str) -> u64 {
        let status = self.status();
        let svc = status["services"].as_array().and_then(|s| s.iter().find(|s| s["name"] == service)).cloned();
        let svc = svc.unwrap_or_else(|| panic!("no service {service} in the status: {status}"));
        svc["backends"].as_array().into_iter().flatten().map(|b| b["counters"]["new_flows"].as_u64().unwrap_or(0)).sum()
    }

    /// Run the `lb-agent` command line with `args` plus `--api-socket` of
    /// this agent (in the test's namespaces: the control socket is a path,
    /// reachable from any network namespace).
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        all.push("--api-socket".as_ref());
        all.push(self.args.api_socket.as_os_str());
        run_agent_cli(&all)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!(
                "---- lb-agent log ({}) ----\n{}---- end of lb-agent log ----",
                self.args.log.display(),
                self.full_log()
            );
        }
    }
}

/// The one place that starts `lb-agent run`: in the namespace `netns`
/// refers to (the caller's when `None`), its output appended to the log;
/// returns the child and where its part of the log starts.
fn spawn_agent_process(netns: Option<BorrowedFd<'_>>, args: &AgentArgs) -> io::Result<(Child, usize)> {
    let bin = try_agent_bin()?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", args.log.display())))?;
    let log_start = log.metadata().map(|m| m.len() as usize).unwrap_or(0);
    let mut cmd = Command::new(&bin);
    cmd.arg("run").arg("--config").arg(&args.config).arg("--api-socket").arg(&args.api_socket);
    cmd.arg("--metrics-address").arg(args.metrics_address.map_or("off".to_owned(), |a| a.to_string()));
    match &args.pin_dir {
        Some(dir) => cmd.arg("--pin-dir").arg(dir),
        None => cmd.arg("--no-pin"),
    };
    if args.keep_on_exit {
        cmd.arg("--keep-on-exit");
    }
    cmd.env("NO_COLOR", "1").env("RUST_LOG", "info").stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    cmd.envs(args.env.iter().map(|(k, v)| (k, v)));
    if args.own_process_group {
        cmd.process_group(0);
    }
    let netns = netns.map(|fd| fd.try_clone_to_owned()).transpose()?;
    let die_with_parent = args.own_process_group;
    // SAFETY: between fork and exec the child calls only setns(2) and
    // prctl(2), both async-signal-safe, on a descriptor the closure owns
    // (O_CLOEXEC closes it in the agent).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = &netns {
                set_thread_netns(fd.as_fd())?;
            }
            if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("spawn {}: {e}", bin.display())))?;
    Ok((child, log_start))
}

/// What a run of the `lb-agent` command line printed.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Run `lb-agent <args>` (not `run`: it waits for the process to end, at
/// most 30 s, then SIGKILLs it and panics).
pub fn run_agent_cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> CliOutput {
    let bin = agent_bin();
    let mut child = Command::new(&bin)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let (mut out, mut err) = (child.stdout.take().expect("stdout"), child.stderr.take().expect("stderr"));
    let out_reader = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = io::Read::read_to_end(&mut out, &mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = io::Read::read_to_end(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for lb-agent") {
            break s;
        }
        if Instant::now() >= deadline {
            // Still unreaped, so the pid is still this child's.
            let _ = child.kill();
            let _ = child.wait();
            panic!("`lb-agent` CLI did not finish within 30 s");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().expect("stdout reader")).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().expect("stderr reader")).into_owned();
    CliOutput { status, stdout, stderr }
}

/// Send `line` (plus a newline) on a fresh connection to the control socket
/// and read one answer line; 5 s limits on each step.
pub fn api_call(socket: &Path, line: &str) -> io::Result<String> {
    api_call_within(socket, line, Duration::from_secs(5))
}

/// [`api_call`] with `limit` on each step (connect aside).
pub fn api_call_within(socket: &Path, line: &str, limit: Duration) -> io::Result<String> {
    use std::os::unix::net::UnixStream;
    let limit = Some(limit);
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(limit)?;
    stream.set_write_timeout(limit)?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    if !answer.ends_with('\n') {
        return Err(io::Error::new(ErrorKind::UnexpectedEof, format!("no whole answer line, got {answer:?}")));
    }
    answer.pop();
    Ok(answer)
}

fn has_message(line: &str, message: &str) -> bool {
    // tracing's fmt layout: "<time>  INFO <target>: <message> <k>=<v> ..."
    line.split_once(": ").is_some_and(|(_, rest)| {
        rest == message || rest.starts_with(&format!("{message} ")) || rest.contains(&format!(" {message} "))
    }) || line.ends_with(&format!(" {message}"))
}

/// The value of `key=value` in a tracing line (unquoted).
fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(|v| v.trim_matches('"').to_owned())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The one scaled service's part of a status snapshot.
pub fn one_scaling(status: &serde_json::Value) -> &serde_json::Value {
    match status["scaling"].as_array().map(Vec::as_slice) {
        Some([one]) => one,
        _ => panic!("expected one scaling entry in status: {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_matched_by_message() {
        let l = "2025-01-01T00:00:00.000000Z  INFO lb_agent::agent: ready config=/tmp/x/lb.toml";
        assert!(has_message(l, "ready"));
        assert!(!has_message(l, "config applied"));
        let a = "2025-01-01T00:00:00Z  INFO lb_agent::dataplane: attached interface=\"lb-c\" mode=native";
        assert!(has_message(a, "attached"));
        assert_eq!(field(a, "interface").as_deref(), Some("lb-c"));
        assert_eq!(field(a, "mode").as_deref(), Some("native"));
        assert_eq!(strip_ansi("\u{1b}[3mmode\u{1b}[0m\u{1b}[2m=\u{1b}[0mnative"), "mode=native");
    }
}
