//! Shared helpers: workspace paths, progress lines, child processes, root check.

use std::env;
use std::ffi::{c_int, OsString};
use std::fs;
use std::io::{ErrorKind, IsTerminal};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const GREEN: &str = "32";
pub const YELLOW: &str = "33";
pub const RED: &str = "31";
pub const BOLD: &str = "1";

/// ANSI styling only when stdout is a terminal and `NO_COLOR` is unset, so
/// CI logs (`CI=true`, stdout a pipe or file) stay plain text.
fn styled() -> bool {
    static STYLED: OnceLock<bool> = OnceLock::new();
    *STYLED.get_or_init(|| {
        std::io::stdout().is_terminal()
            && env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            && env::var_os("TERM").is_none_or(|t| t != "dumb")
    })
}

pub fn paint(code: &str, text: &str) -> String {
    if styled() {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// Environment for xtask and every child it starts.
pub fn prepare_env() {
    // `cargo install` puts bpf-linker in $CARGO_HOME/bin, and lb-agent's
    // build.rs looks for it on PATH, so that directory must be on it.
    let bin = cargo_home().join("bin");
    let path = env::var_os("PATH").unwrap_or_default();
    if !env::split_paths(&path).any(|p| p == bin) {
        let joined = env::join_paths(std::iter::once(bin).chain(env::split_paths(&path)));
        if let Ok(joined) = joined {
            // xtask is still single-threaded here.
            env::set_var("PATH", joined);
        }
    }
    if !styled() {
        // Children inherit our stdout; keep their output plain too.
        env::set_var("NO_COLOR", "1");
        env::set_var("CARGO_TERM_COLOR", "never");
        env::set_var("CARGO_TERM_PROGRESS_WHEN", "never");
    }
    ignore_sigint_in_self();
}

/// Ctrl-C goes to the whole foreground process group: the child (lb-demo,
/// lb-agent, cargo) gets it and cleans up, and xtask must outlive the child
/// to report how it ended. A handler that does nothing, unlike SIG_IGN, is
/// reset to the default by exec, so children still see SIGINT normally.
fn ignore_sigint_in_self() {
    const SIGINT: c_int = 2;
    unsafe extern "C" {
        // glibc `signal()`; `sighandler_t` is a pointer-sized function pointer.
        fn signal(signum: c_int, handler: usize) -> usize;
    }
    extern "C" fn on_sigint(_: c_int) {}
    // SAFETY: `on_sigint` is async-signal-safe (it does nothing) and lives
    // for the whole program; installing a handler has no other precondition.
    unsafe {
        signal(SIGINT, on_sigint as extern "C" fn(c_int) as usize);
    }
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"))
}

pub fn workspace_root() -> &'static Path {
    // xtask/Cargo.toml sits one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."))
}

/// The cargo target directory: $CARGO_TARGET_DIR, else `target`.
pub fn target_dir() -> PathBuf {
    let target = env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    if target.is_relative() {
        workspace_root().join(target)
    } else {
        target
    }
}

/// The release binaries the end-to-end tests run. The examples stage builds
/// them first and the root and VM stages again: one command, so the same
/// packages and features each time, and the later builds find it all done
/// (a build of fewer packages can unify features differently and rebuild).
pub fn release_bins() -> Command {
    let mut bins = cargo();
    bins.args(["build", "--release", "-p", "lb-agent", "-p", "lb-backend", "-p", "lb-load", "-p", "lb-bench-e2e"]);
    bins.arg("--bins");
    bins
}

pub fn release_binary(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

/// A binary the release build should have produced, with a clear error if
/// its package does not define it (yet).
pub fn built_binary(name: &str, package: &str) -> Result<PathBuf> {
    let path = release_binary(name);
    if !path.is_file() {
        bail!("{} is missing after the build: does package {package} define the `{name}` binary?", path.display());
    }
    Ok(path)
}

/// The channel pinned in rust-toolchain.toml, e.g. "1.95.0".
pub fn toolchain_channel() -> Result<String> {
    let path = workspace_root().join("rust-toolchain.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .next()
        .with_context(|| format!("no `channel = \"...\"` in {}", path.display()))
}

/// `cargo` of the toolchain that runs xtask (cargo sets $CARGO for `cargo run`).
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")));
    cmd.current_dir(workspace_root());
    cmd
}

/// Effective user id, from /proc/self/status ("Uid: real effective saved fs").
pub fn euid() -> Result<u32> {
    let status = fs::read_to_string("/proc/self/status").context("read /proc/self/status")?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:")).context("no Uid line in /proc/self/status")?;
    let effective = line.split_whitespace().nth(1).context("short Uid line")?;
    effective.parse().with_context(|| format!("parse effective uid {effective:?}"))
}

/// True when `CI` is `true` or `1`, as CI services set it.
pub fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

pub fn is_root() -> Result<bool> {
    Ok(euid()? == 0)
}

/// Fails early, before any setup or build, when a task needs root.
pub fn require_root(task: &str, why: &str) -> Result<()> {
    let uid = euid()?;
    if uid != 0 {
        bail!("`cargo xtask {task}` needs root ({why}); running as uid {uid}");
    }
    Ok(())
}

/// A line per step: "[tag] what ... status (1.2s)".
pub struct Step {
    tag: &'static str,
    what: String,
    start: Instant,
}

impl Step {
    pub fn new(tag: &'static str, what: impl Into<String>) -> Self {
        Step { tag, what: what.into(), start: Instant::now() }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// An intermediate status, e.g. "installing", before child output streams.
    pub fn say(&self, status: &str) {
        println!("{} {} ... {}", paint(BOLD, &format!("[{}]", self.tag)), self.what, paint(YELLOW, status));
    }

    /// The final status with the step's duration.
    pub fn finish(&self, color: &str, status: &str) -> Duration {
        let elapsed = self.elapsed();
        println!(
            "{} {} ... {} ({})",
            paint(BOLD, &format!("[{}]", self.tag)),
            self.what,
            paint(color, status),
            secs(elapsed)
        );
        elapsed
    }
}

pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// The command as a shell line, with the variables it sets; $CARGO shows
/// as plain `cargo`.
pub fn show(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={:?}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    let program = cmd.get_program();
    if env::var_os("CARGO").is_some_and(|c| c == program) {
        parts.push("cargo".to_owned());
    } else {
        parts.push(program.to_string_lossy().into_owned());
    }
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs a command with inherited stdio (its output streams through) and
/// returns its status; a missing program is an error with context.
pub fn stream(cmd: &mut Command) -> Result<ExitStatus> {
    println!("  $ {}", show(cmd));
    cmd.status().with_context(|| format!("start `{}`", show(cmd)))
}

/// Like [`stream`], but a non-zero exit is an error.
pub fn stream_ok(cmd: &mut Command) -> Result<()> {
    let status = stream(cmd)?;
    if !status.success() {
        bail!("`{}` {}", show(cmd), describe(status));
    }
    Ok(())
}

/// Runs a command quietly and captures its output. `Ok(None)` when the
/// program does not exist.
pub fn capture(cmd: &mut Command) -> Result<Option<Output>> {
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) => Ok(Some(out)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("run `{}`", show(cmd))),
    }
}

pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(2)) => "was interrupted (SIGINT)".to_owned(),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        (None, None) => "ended abnormally".to_owned(),
    }
}

/// Our exit code mirrors the child's, shell style (128 + signal).
pub fn exit_code(status: ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
        (None, None) => ExitCode::FAILURE,
    }
}

/// Owned copies of string literals, for tests' expected lists.
#[cfg(test)]
pub fn owned(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}
