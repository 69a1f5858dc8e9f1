//! `cargo xtask bench`: setup, build lb-bench, run it as root.

use std::process::{Command, ExitCode};

use anyhow::Result;
use clap::Args;

use crate::build::build_release;
use crate::setup;
use crate::util::{self, describe, exit_code, stream, Step, GREEN, RED};

#[derive(Args)]
pub struct Options {
    /// Arguments after `--`, passed to lb-bench (e.g. `-- --repeat 1000000 --json`).
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<ExitCode> {
    if !opts.args.iter().any(|a| a == "--help" || a == "-h") {
        util::require_root("bench", "BPF_PROG_TEST_RUN needs CAP_BPF and CAP_SYS_ADMIN")?;
    }
    setup::ensure_all(false)?;
    build_release("bench", &["-p", "lb-bench"])?;
    let step = Step::new("bench", "lb-bench");
    step.say("running");
    let status = stream(Command::new(util::built_binary("lb-bench", "lb-bench")?).args(&opts.args))?;
    let color = if status.success() { GREEN } else { RED };
    step.finish(color, &describe(status));
    Ok(exit_code(status))
}
