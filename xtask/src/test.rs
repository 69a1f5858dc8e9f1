//! `cargo xtask test`: setup, unit tests, then root tests.

use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::setup;
use crate::util::{self, describe, paint, secs, stream, Step, BOLD, GREEN, RED, YELLOW};

#[derive(Args)]
pub struct Options {
    /// Run only the unit tests (no root needed) and skip the root tests.
    #[arg(long)]
    unit_only: bool,

    /// Run only tests whose names contain FILTER (in both stages).
    #[arg(value_name = "FILTER")]
    filter: Option<String>,
}

struct Stage {
    name: &'static str,
    color: &'static str,
    outcome: String,
    took: Duration,
    ok: bool,
}

/// Packages with tests that need root: lb-tests holds nothing else; the lab
/// and lb-load have a few `root_` unit tests beside plain ones, which
/// therefore run in both stages.
const ROOT_PACKAGES: [&str; 3] = ["lb-tests", "lb-lab", "lb-load"];

/// lb-lab's `root::ROOT_STAGE_LATER` (xtask does not depend on the lab):
/// set for the unit stage, it makes root tests skip there.
const ROOT_STAGE_LATER: &str = "LB_ROOT_STAGE_LATER";

pub fn run(opts: &Options) -> Result<ExitCode> {
    setup::ensure_all(false)?;
    let filter: Vec<&str> = opts.filter.as_deref().into_iter().collect();
    let mut stages = Vec::new();

    // Pure unit tests: no root, no kernel objects beyond building lb-ebpf.
    let mut unit = util::cargo();
    unit.args(["test", "--workspace", "--exclude", "lb-tests"]).args(&filter).env(ROOT_STAGE_LATER, "1");
    stages.push(run_stage("unit tests", &mut unit)?);

    // BPF fixtures and network namespaces. One thread: the tests create
    // namespaces and attach programs, and must not see each other's.
    let mut root = util::cargo();
    root.args(["test", "--release"]);
    for package in ROOT_PACKAGES {
        root.args(["-p", package]);
    }
    root.args(&filter).args(["--", "--test-threads=1"]);
    if opts.unit_only {
        stages.push(skip_stage("root tests", "skipped (--unit-only)", true));
    } else if util::is_root()? {
        // The end-to-end tests run the real daemon, the demo backend, the
        // load generator and the e2e bench (its smoke test); the container
        // image needs the backend fully static (FROM scratch).
        let mut bins = util::cargo();
        bins.args(["build", "--release", "-p", "lb-agent", "-p", "lb-backend", "-p", "lb-load", "-p", "lb-bench-e2e"]);
        bins.arg("--bins");
        let mut static_backend = util::cargo();
        static_backend
            .args(["build", "--release", "-p", "lb-backend", "--target", "x86_64-unknown-linux-gnu"])
            .env("RUSTFLAGS", "-C target-feature=+crt-static");
        let mut ok = true;
        for (name, cmd) in [
            ("build lb-agent, lb-backend, lb-load, lb-bench-e2e (release)", &mut bins),
            ("build static lb-backend", &mut static_backend),
        ] {
            let stage = run_stage(name, cmd)?;
            ok &= stage.ok;
            stages.push(stage);
            if !ok {
                break;
            }
        }
        if ok {
            stages.push(run_stage("root tests", &mut root)?);
        }
    } else {
        let why = format!("SKIPPED: not root (uid {}); run as root, or pass --unit-only", util::euid()?);
        stages.push(skip_stage("root tests", &why, false));
    }

    println!("{}", paint(BOLD, "[test] summary"));
    for s in &stages {
        println!("[test]   {}: {} ({})", s.name, paint(s.color, &s.outcome), secs(s.took));
    }
    Ok(if stages.iter().all(|s| s.ok) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Runs one `cargo test` and records its outcome; a failing stage does not
/// stop the next one, so one run reports both.
fn run_stage(name: &'static str, cmd: &mut Command) -> Result<Stage> {
    let step = Step::new("test", name);
    step.say("running");
    let status = stream(cmd)?;
    let (ok, color, outcome) = if status.success() {
        (true, GREEN, "passed".to_owned())
    } else {
        (false, RED, format!("FAILED: cargo test {}", describe(status)))
    };
    let took = step.finish(color, &outcome);
    Ok(Stage { name, color, outcome, took, ok })
}

fn skip_stage(name: &'static str, why: &str, ok: bool) -> Stage {
    let step = Step::new("test", name);
    let color = if ok { YELLOW } else { RED };
    let took = step.finish(color, why);
    Stage { name, color, outcome: why.to_owned(), took, ok }
}
