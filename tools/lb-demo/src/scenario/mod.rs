//! `--scenario`: the reference setups' own tables, reproduced against this
//! load balancer and its autoscaler. Each scenario prints its table and
//! writes it, with a chart and the command that made it, to
//! `docs/results/<scenario>.md` (and `.svg`).
//!
//! - `availability`: the KVM + HAProxy setup: siege with 30 users against 1
//!   instance, 2 instances, the autoscaled service, and one instance killed.
//! - `load`: the Prometheus + Grafana setup: 2 instances at a base load,
//!   then five times the load with scaling up to 10 instances.
//!
//! Every configuration runs in a lab of its own (namespaces, agent,
//! instances), removed again before the next starts, and on Ctrl-C or
//! failure.

mod availability;
mod load;
mod report;
mod siege;
mod table;
mod watch;

use std::{path::Path, time::Duration};

use anyhow::bail;
use clap::ValueEnum;

use crate::{
    autoscale::backend_bin,
    cli::{kind_name, Cli, OrchestratorKind},
    install_signal_handlers, require_root,
};

/// A reference setup's table to reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// The KVM + HAProxy setup: siege availability (-c 30 -d 1) with 1
    /// instance, 2 instances, autoscaled 1-4 on CPU 60 %/10 %, and one
    /// instance killed mid-run (about 4 minutes).
    Availability,
    /// The Prometheus + Grafana setup: requests/s, mean and p99 latency and
    /// CPU per instance with 2 instances at a base load, then at 5x the load
    /// after scaling to 10 (about 1.5 minutes).
    Load,
    /// Both, one after the other.
    All,
}

/// What every scenario needs.
pub(crate) struct Common<'a> {
    pub(crate) kind: OrchestratorKind,
    pub(crate) kind_name: &'static str,
    pub(crate) backend: &'a Path,
    pub(crate) results_dir: &'a Path,
    pub(crate) siege_time: Duration,
}

/// The shortest siege run: long enough for a scale-up and a replacement.
const MIN_SIEGE_TIME: Duration = Duration::from_secs(10);

/// How a scenario ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    Interrupted,
}

pub(crate) fn run_scenarios(cli: &Cli, scenario: Scenario) -> anyhow::Result<()> {
    if cli.siege_time < MIN_SIEGE_TIME || cli.siege_time.subsec_nanos() != 0 {
        bail!(
            "--siege-time {:?}: give whole seconds, at least {} s (siege's -t counts seconds; the kill comes at half time)",
            cli.siege_time,
            MIN_SIEGE_TIME.as_secs()
        );
    }
    let (kind, why) = cli.orchestrator.resolve();
    require_root()?;
    if let Some(why) = why {
        println!("lb-demo: instances as {} ({why}; --orchestrator chooses)", kind_name(kind));
    }
    install_signal_handlers()?;
    let backend = backend_bin(cli)?;
    let c = Common {
        kind,
        kind_name: kind_name(kind),
        backend: &backend,
        results_dir: &cli.results_dir,
        siege_time: cli.siege_time,
    };
    let runs: &[fn(&Common<'_>) -> anyhow::Result<Outcome>] = match scenario {
        Scenario::Availability => &[availability::run],
        Scenario::Load => &[load::run],
        Scenario::All => &[availability::run, load::run],
    };
    for run in runs {
        if run(&c)? == Outcome::Interrupted {
            println!("interrupted: nothing written");
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn a_short_or_fractional_siege_time_is_refused_before_anything_runs() {
        for (given, shown) in [("5s", "--siege-time 5s:"), ("30500ms", "--siege-time 30.5s:")] {
            let cli = Cli::parse_from(["lb-demo", "--scenario", "availability", "--siege-time", given]);
            let e = run_scenarios(&cli, Scenario::Availability).unwrap_err().to_string();
            assert!(e.starts_with(shown) && e.contains("at least 10 s"), "{e}");
        }
    }
}
