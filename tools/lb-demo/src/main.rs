//! lb-demo: what `cargo xtask run` shows. Needs root.
//!
//! Default: the autoscaling demo. It builds a client namespace and a load
//! balancer namespace joined by a veth pair, starts lb-agent in the LB
//! namespace with an autoscaled service whose instances are `lb-backend`
//! processes (lb-agent's process orchestrator: one namespace per instance on a
//! bridge inside the LB namespace), then drives an open-loop HTTP load ramp
//! from the client namespace to the VIP, which is the LB namespace's own
//! address on the client's link (the host-address deployment), and shows, once per second, what was
//! offered and answered, how fast, which instances are serving (and their CPU)
//! and the agent's latest scaling decision. Once the agent is up it prints
//! the `lb-agent status` command and the metrics address to use from
//! another shell. At the end it prints a summary,
//! writes the agent's decision timeline, the per-second series and an SVG
//! chart to a results directory, and removes everything else it made.
//!
//! ```text
//!  client ns                      LB ns (ip_forward=1)                       instance namespaces
//!  10.220.0.2 [to-lb] ==== [lbc] 10.220.0.1 = the VIP, port 80
//!  (no route beyond the link)     [lbd<pid>] bridge 10.212.0.1/24 ---- [eth0] 10.212.0.2  web-1
//!                                 tc_lb on lbc and the bridge      `--- [eth0] 10.212.0.3  web-2 ...
//! ```
//!
//! With Docker installed (the default `--orchestrator auto`), the instances
//! are containers of `lb-demo-backend:dev` (built here from the static
//! lb-backend) on a Docker network the agent makes, and the agent runs in the
//! host's namespace beside dockerd, attached to the client veth's host end
//! (`lbc<pid>`) and the network's bridge (`lbdd<pid>`). dockerd is started
//! for the run if it is not running, and stopped again.
//!
//! `--scenario availability|load|all`: the reference setups' tables,
//! reproduced and written to docs/results/ (see `scenario`).
//!
//! `--static`: the first demo: three fixed backends, one request every
//! 300 ms, printing which backend answered (`--count N` stops by itself).
//!
//! Safety: everything is named after this process's pid (`lbd-<pid>-*`
//! namespaces, bridge `lbd<pid>` whose instance namespaces are
//! `lbd<pid>-<n>`; Docker: network `lb-demo-<pid>`, veth `lbc<pid>`), nothing
//! but that veth end and the Docker network is created in the host's
//! network namespace, only
//! the instance namespaces have a default route (to the bridge, inside the LB
//! namespace), and a guard removes all of it on every exit path: normal end,
//! error, panic, Ctrl-C or SIGTERM. The agent runs in its own process group
//! (a Ctrl-C reaches only lb-demo, which then stops it in order) and gets
//! SIGTERM if lb-demo dies (PR_SET_PDEATHSIG).

mod agent;
mod autoscale;
mod cli;
mod instances;
mod lab;
mod metrics_port;
mod monitor;
mod results;
mod scenario;
mod shape;
mod static_demo;
mod view;

use std::process::ExitCode;

use anyhow::bail;
use clap::Parser;
use lb_lab::root::is_root;
use lb_load::stop;

use crate::{autoscale::run_autoscale, cli::Cli, static_demo::run_static};

/// SIGINT, SIGTERM and SIGHUP (the terminal went away) all stop the run in
/// order: whatever was made is removed.
pub(crate) fn install_signal_handlers() -> anyhow::Result<()> {
    stop::stop_on(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match (cli.static_mode, cli.scenario) {
        (true, _) => run_static(&cli),
        (false, Some(s)) => scenario::run_scenarios(&cli, s),
        (false, None) => run_autoscale(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn require_root() -> anyhow::Result<()> {
    if !is_root() {
        bail!("lb-demo needs root (network namespaces, XDP); try `sudo -E cargo xtask run`");
    }
    Ok(())
}
