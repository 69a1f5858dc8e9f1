//! The command line.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use lb_load as load;

use crate::scenario::Scenario;

/// `cargo xtask run -- ARGS` runs this demo with ARGS, except for one: the
/// agent on a config of yours.
const AGENT_MODE: &str = "Agent mode (through cargo xtask run):\n  \
    cargo xtask run -- --config FILE   runs `lb-agent run --config FILE` instead of a demo\n  \
    (examples/*.toml are configs to start from; docs/config.md lists every key)";

/// Show the XDP load balancer at work in throw-away network namespaces.
///
/// By default: an autoscaling demo. A load ramp goes up, lb-agent starts more
/// backend instances, the load drops, and it stops them again; live in the
/// terminal, with a summary, a decision timeline and an SVG chart at the end.
#[derive(Parser)]
#[command(name = "lb-demo", about, long_about, after_help = AGENT_MODE)]
pub(crate) struct Cli {
    /// The first demo instead: fixed backends, one request at a time,
    /// printing which backend answered each.
    #[arg(long = "static")]
    pub(crate) static_mode: bool,
    /// (--static) Stop after this many requests (default: run until Ctrl-C).
    #[arg(long, requires = "static_mode")]
    pub(crate) count: Option<u64>,
    /// (--static) Number of backends (web-1 .. web-N).
    #[arg(long, requires = "static_mode", default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub(crate) backends: u8,
    /// (--static) Pause between requests, in milliseconds.
    #[arg(long, requires = "static_mode", default_value_t = 300)]
    pub(crate) interval_ms: u64,

    /// Where the instances come from: Docker containers when the engine is
    /// installed (it is started for the run if it is not running, and
    /// stopped again), local processes otherwise.
    #[arg(long, value_enum, default_value_t = OrchestratorKind::Auto, conflicts_with = "static_mode")]
    pub(crate) orchestrator: OrchestratorKind,
    /// The offered load over time: requests per second as straight lines
    /// between TIME:RATE points; the last rate is held until the instances
    /// are back to the minimum [default: 0s:20,10s:20,25s:140,55s:140,56s:10].
    #[arg(long, conflicts_with_all = ["static_mode", "quick"])]
    pub(crate) ramp: Option<String>,
    /// A short run for CI smoke tests (about 45 s): a lighter, compressed
    /// ramp (0s:20,3s:20,13s:100,25s:100,26s:10) and a 5 s scale-down window.
    #[arg(long, conflicts_with = "static_mode")]
    pub(crate) quick: bool,
    /// After the ramp's last point, give up waiting for the scale-in after
    /// this long (e.g. 90s, 3m).
    #[arg(long, value_parser = parse_duration, conflicts_with = "static_mode")]
    pub(crate) scale_in_timeout: Option<Duration>,
    /// Directory for the results (timeline, SVG, CSV, summary, agent log)
    /// [default: $LB_DEMO_RESULTS/<UTC time>, else /tmp/lb-demo/<UTC time>].
    #[arg(long, value_name = "DIR", conflicts_with = "static_mode")]
    pub(crate) out: Option<PathBuf>,
    /// The instances' program [default: $LB_BACKEND_BIN, else lb-backend
    /// next to this binary].
    #[arg(long, value_name = "PATH", conflicts_with = "static_mode")]
    pub(crate) backend_bin: Option<PathBuf>,
    /// One plain line per second even on a terminal (no redrawn panel).
    #[arg(long, conflicts_with = "static_mode")]
    pub(crate) plain: bool,

    /// Reproduce a reference setup's table instead of the demo: print it and
    /// write it with a chart and the command to --results-dir/<scenario>.md.
    #[arg(long, value_enum, conflicts_with_all = ["static_mode", "ramp", "quick", "out"])]
    pub(crate) scenario: Option<Scenario>,
    /// (--scenario) Where the tables and charts go (`cargo xtask run` sets
    /// $LB_SCENARIO_RESULTS to the repository's docs/results).
    #[arg(long, value_name = "DIR", env = "LB_SCENARIO_RESULTS", default_value = "docs/results")]
    pub(crate) results_dir: PathBuf,
    /// (--scenario availability) siege's -t for each of its 4 runs (e.g. 45s).
    #[arg(long, value_parser = parse_duration, default_value = "45s", requires = "scenario")]
    pub(crate) siege_time: Duration,
}

/// Where the autoscaled instances come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OrchestratorKind {
    /// Docker if `docker` and `dockerd` are installed, else processes.
    Auto,
    /// Local processes, each in a network namespace of its own.
    Process,
    /// Containers of the demo image (`lb-demo-backend:dev`, built here from
    /// the static lb-backend) on a Docker network of their own.
    Docker,
}

impl OrchestratorKind {
    /// `Auto` made definite, with why.
    pub(crate) fn resolve(self) -> (OrchestratorKind, Option<&'static str>) {
        match self {
            OrchestratorKind::Auto if on_path("docker") && on_path("dockerd") => {
                (OrchestratorKind::Docker, Some("Docker is installed"))
            }
            OrchestratorKind::Auto => {
                (OrchestratorKind::Process, Some("docker/dockerd not installed (`cargo xtask setup` installs them)"))
            }
            k => (k, None),
        }
    }
}

pub(crate) fn kind_name(kind: OrchestratorKind) -> &'static str {
    match kind {
        OrchestratorKind::Docker => "Docker containers",
        _ => "local processes",
    }
}

pub(crate) fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    load::parse_duration(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn every_argument_has_help_and_the_agent_mode_is_listed() {
        lb_agent::cli_help::assert_documented(&Cli::command());
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("cargo xtask run -- --config FILE"), "{help}");
    }
}
