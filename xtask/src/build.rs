//! `cargo xtask build`: setup, then a release build of every binary.

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use crate::setup;
use crate::util::{self, stream_ok, Step, GREEN};

#[derive(Args)]
pub struct Options {}

pub fn run(_opts: &Options) -> Result<ExitCode> {
    setup::ensure_all(false)?;
    build_release("build", &["-p", "lb-agent", "-p", "lb-tests", "-p", "lb-backend", "--bins"])?;
    Ok(ExitCode::SUCCESS)
}

/// `cargo build --release ARGS`, streaming cargo's output. lb-agent's
/// build.rs builds the eBPF object, so this needs bpf-linker (setup).
pub fn build_release(tag: &'static str, args: &[&str]) -> Result<()> {
    let step = Step::new(tag, format!("cargo build --release {}", args.join(" ")));
    step.say("building");
    stream_ok(util::cargo().args(["build", "--release"]).args(args))?;
    step.finish(GREEN, "built");
    Ok(())
}
