//! `cargo xtask run`: setup and build, then the demo or the agent.

use std::process::{Command, ExitCode};

use anyhow::Result;
use clap::Args;

use crate::build::build_release;
use crate::setup;
use crate::util::{self, describe, exit_code, stream, Step, GREEN, RED};

#[derive(Args)]
pub struct Options {
    /// Arguments after `--`. `--config FILE` runs `lb-agent run --config FILE`;
    /// anything else (or nothing) goes to lb-demo.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<ExitCode> {
    let args = &opts.args;
    let agent = args.iter().any(|a| a == "--config" || a.starts_with("--config="));
    let help = args.iter().any(|a| a == "--help" || a == "-h");
    if !help {
        util::require_root("run", "it loads XDP programs and sets up network namespaces")?;
    }
    setup::ensure_all(false)?;
    build_release("run", &["-p", "lb-agent", "-p", "lb-tests", "--bins"])?;

    let mut cmd = if agent {
        let mut cmd = Command::new(util::built_binary("lb-agent", "lb-agent")?);
        cmd.arg("run");
        cmd
    } else {
        Command::new(util::built_binary("lb-demo", "lb-tests")?)
    };
    cmd.args(args);
    let name = if agent { "lb-agent" } else { "lb-demo" };
    let step = Step::new("run", name);
    step.say("running; Ctrl-C stops it and it cleans up");
    let status = stream(&mut cmd)?;
    let color = if status.success() { GREEN } else { RED };
    step.finish(color, &describe(status));
    Ok(exit_code(status))
}
