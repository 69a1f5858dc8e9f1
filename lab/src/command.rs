//! Running the system's tools (`ip`, `ethtool`, `sysctl`, `docker`, ...).

use std::{
    io,
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
};

/// Runs `program args` to completion; its stdout, or an error that names the
/// command and holds its output.
///
/// The command runs in a process group of its own, so that a Ctrl-C on the
/// terminal, meant for the caller, cannot cut a setup or cleanup step short
/// (lb-demo cleans up after a Ctrl-C with these).
pub fn try_run_cmd(program: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .process_group(0)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{program} {}` failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`try_run_cmd`] for tests: panics with the command's output if it fails.
pub fn run_cmd(program: &str, args: &[&str]) -> String {
    try_run_cmd(program, args).unwrap_or_else(|e| panic!("{e}"))
}
