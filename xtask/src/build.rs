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
    build_release(
        "build",
        &["-p", "lb-agent", "-p", "lb-demo", "-p", "lb-load", "-p", "lb-bench", "-p", "lb-backend", "--bins"],
    )?;
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

/// The target triple of the fully static lb-backend (the demo image's only
/// file).
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Build lb-backend linked statically, for a `FROM scratch` container image;
/// returns its path.
pub fn build_static_backend() -> Result<std::path::PathBuf> {
    let step = Step::new("build", format!("static lb-backend (--target {STATIC_TARGET}, crt-static)"));
    step.say("building");
    stream_ok(
        util::cargo()
            .args(["build", "--release", "-p", "lb-backend", "--target", STATIC_TARGET])
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )?;
    let path = util::release_binary("lb-backend")
        .parent()
        .and_then(|release| release.parent())
        .map(|target| target.join(STATIC_TARGET).join("release").join("lb-backend"))
        .ok_or_else(|| anyhow::anyhow!("no target directory"))?;
    anyhow::ensure!(path.is_file(), "{} is missing after the build", path.display());
    step.finish(GREEN, "built");
    Ok(path)
}
