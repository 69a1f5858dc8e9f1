//! `cargo xtask run`: setup and build, then the demo or the agent.

use std::env;
use std::process::{Command, ExitCode};

use anyhow::Result;
use clap::Args;

use crate::build::{build_release, build_static_backend};
use crate::setup;
use crate::util::{self, describe, exit_code, stream, Step, GREEN, RED};

#[derive(Args)]
pub struct Options {
    /// Arguments after `--`. `--config FILE` runs `lb-agent run --config FILE`;
    /// anything else (or nothing) goes to lb-demo: the autoscaling demo by
    /// default, `--quick` a short one, `--static` the fixed-backends one,
    /// `--scenario availability|load|all` the reference setups' tables
    /// (written to docs/results/), `--help` all of its options.
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
    // The agent, the demo, and lb-backend (the demo's instances).
    build_release("run", &["-p", "lb-agent", "-p", "lb-demo", "-p", "lb-backend", "--bins"])?;
    let agent_bin = util::built_binary("lb-agent", "lb-agent")?;
    // The demo's container image needs lb-backend linked statically (FROM
    // scratch); only the Docker demo uses it.
    let static_backend = if agent { None } else { Some(build_static_backend()?) };

    let mut cmd = if agent {
        let mut cmd = Command::new(&agent_bin);
        cmd.arg("run");
        cmd
    } else {
        let backend_bin = util::built_binary("lb-backend", "lb-backend")?;
        let mut cmd = Command::new(util::built_binary("lb-demo", "lb-demo")?);
        // The exact binaries just built, whatever lb-demo finds next to itself.
        cmd.env("LB_AGENT_BIN", &agent_bin).env("LB_BACKEND_BIN", &backend_bin);
        if let Some(bin) = &static_backend {
            cmd.env("LB_BACKEND_STATIC_BIN", bin);
        }
        // Results (timeline, SVG, CSV) under target/lb-demo/<time>, unless
        // the caller chose a place.
        if env::var_os("LB_DEMO_RESULTS").is_none() {
            let results = util::release_binary("lb-demo").parent().and_then(|p| p.parent()).map(|t| t.join("lb-demo"));
            if let Some(results) = results {
                cmd.env("LB_DEMO_RESULTS", results);
            }
        }
        // `--scenario` tables go to the repository's docs/results/, from
        // wherever this was started.
        if env::var_os("LB_SCENARIO_RESULTS").is_none() {
            cmd.env("LB_SCENARIO_RESULTS", util::workspace_root().join("docs/results"));
        }
        cmd
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
