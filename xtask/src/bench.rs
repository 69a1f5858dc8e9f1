//! `cargo xtask bench [xdp|e2e]`: setup, build the benchmark, run it as root.

use std::process::{Command, ExitCode};

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::build::build_release;
use crate::setup;
use crate::util::{self, describe, exit_code, stream, Step, GREEN, RED};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Options {
    #[command(subcommand)]
    which: Option<Which>,
    /// Without a subcommand: `bench xdp`'s arguments (the default bench).
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

#[derive(Subcommand)]
enum Which {
    /// The XDP program per packet under BPF_PROG_TEST_RUN (lb-bench); the default
    Xdp(Pass),
    /// End to end in namespaces: direct, this LB, HAProxy, NGINX stream, with wrk (lb-bench-e2e)
    #[command(long_about = "End to end in network namespaces (client ns -> LB ns -> 3 nginx backends):\n\
        direct, this load balancer, HAProxy (tcp) and NGINX stream, with keep-alive and a new\n\
        connection per request; req/s, p50, p99 and CPU per request, each against direct.\n\
        Builds lb-agent and lb-bench-e2e, then runs target/release/lb-bench-e2e ARGS, e.g.\n\n\
        \x20 cargo xtask bench e2e -- --duration 10s --runs 3 --json")]
    E2e(Pass),
}

#[derive(Args)]
struct Pass {
    /// Arguments after `--`, passed to the bench (`-- --help` lists them).
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

const XDP_ROOT: &str = "BPF_PROG_TEST_RUN needs CAP_BPF and CAP_SYS_ADMIN";

pub fn run(opts: &Options) -> Result<ExitCode> {
    let (packages, binary, why, args): (&[&str], _, _, _) = match &opts.which {
        None => (&["-p", "lb-bench"], "lb-bench", XDP_ROOT, &opts.args),
        Some(Which::Xdp(p)) => (&["-p", "lb-bench"], "lb-bench", XDP_ROOT, &p.args),
        Some(Which::E2e(p)) => (
            // lb-agent runs as its own process in the LB namespace.
            &["-p", "lb-agent", "-p", "lb-bench-e2e"],
            "lb-bench-e2e",
            "it creates network namespaces and attaches XDP",
            &p.args,
        ),
    };
    if !args.iter().any(|a| a == "--help" || a == "-h") {
        util::require_root("bench", why)?;
    }
    setup::ensure_all(false)?;
    build_release("bench", packages)?;
    let step = Step::new("bench", binary);
    step.say("running");
    let status = stream(Command::new(util::built_binary(binary, binary)?).args(args))?;
    let color = if status.success() { GREEN } else { RED };
    step.finish(color, &describe(status));
    Ok(exit_code(status))
}
