//! lb-demo: what `cargo xtask run` shows. Needs root.
//!
//! Default: the autoscaling demo. It builds a client namespace and a load
//! balancer namespace joined by a veth pair, starts lb-agent in the LB
//! namespace with an autoscaled service whose instances are `lb-backend`
//! processes (lb-agent's process orchestrator: one namespace per instance on a
//! bridge inside the LB namespace), then drives an open-loop HTTP load ramp
//! from the client namespace to the VIP and shows, once per second, what was
//! offered and answered, how fast, which instances are serving (and their CPU)
//! and the agent's latest scaling decision. At the end it prints a summary,
//! writes the agent's decision timeline, the per-second series and an SVG
//! chart to a results directory, and removes everything else it made.
//!
//! ```text
//!  client ns                      LB ns (ip_forward=1)                       instance namespaces
//!  10.220.0.2 [to-lb] ==== [lbc] 10.220.0.1
//!  route 10.220.255.1/32          [lbd<pid>] bridge 10.212.0.1/24 ---- [eth0] 10.212.0.2  web-2
//!        via 10.220.0.1           XDP on lbc and the bridge        `--- [eth0] 10.212.0.3  web-3 ...
//! ```
//!
//! With Docker installed (the default `--orchestrator auto`), the instances
//! are containers of `lb-demo-backend:dev` (built here from the static
//! lb-backend) on a Docker network the agent makes, and the agent runs in the
//! host's namespace beside dockerd, attached to the client veth's host end
//! (`lbc<pid>`) and the network's bridge (`lbdd<pid>`). dockerd is started
//! for the run if it is not running, and stopped again.
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

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs::{self, File},
    io::{self, IsTerminal as _, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _};
use clap::{Parser, ValueEnum};
use lb_agent::{
    adapters::docker::{LABEL_OWNER, LABEL_SERVICE, OWNER},
    status::{ReplicaStatus, ScalingStatus, Snapshot},
};
use lb_tests::{
    docker::{build_demo_image_from, docker_try, Dockerd, DEMO_IMAGE},
    load::{self, LoadConfig, Mode, Ramp, TimePoint},
    plot,
    root::is_root,
    stop::{self, stopped},
    topology::{agent_bin, api_call_within, tcp_request, Options, Topology, VIP as STATIC_VIP},
};

/// Show the XDP load balancer at work in throw-away network namespaces.
///
/// By default: an autoscaling demo. A load ramp goes up, lb-agent starts more
/// backend instances, the load drops, and it stops them again; live in the
/// terminal, with a summary, a decision timeline and an SVG chart at the end.
#[derive(Parser)]
#[command(name = "lb-demo", about, long_about)]
struct Cli {
    /// The first demo instead: fixed backends, one request at a time,
    /// printing which backend answered each.
    #[arg(long = "static")]
    static_mode: bool,
    /// (--static) Stop after this many requests (default: run until Ctrl-C).
    #[arg(long, requires = "static_mode")]
    count: Option<u64>,
    /// (--static) Number of backends (web-1 .. web-N).
    #[arg(long, requires = "static_mode", default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=32))]
    backends: u8,
    /// (--static) Pause between requests, in milliseconds.
    #[arg(long, requires = "static_mode", default_value_t = 300)]
    interval_ms: u64,

    /// Where the instances come from: Docker containers when the engine is
    /// installed (it is started for the run if it is not running, and
    /// stopped again), local processes otherwise.
    #[arg(long, value_enum, default_value_t = OrchestratorKind::Auto, conflicts_with = "static_mode")]
    orchestrator: OrchestratorKind,
    /// The offered load over time: requests per second as straight lines
    /// between TIME:RATE points; the last rate is held until the instances
    /// are back to the minimum [default: 0s:20,10s:20,25s:140,55s:140,56s:10].
    #[arg(long, conflicts_with_all = ["static_mode", "quick"])]
    ramp: Option<String>,
    /// A short run for CI smoke tests (about 45 s): a lighter, compressed
    /// ramp (0s:20,3s:20,13s:100,25s:100,26s:10) and a 5 s scale-down window.
    #[arg(long, conflicts_with = "static_mode")]
    quick: bool,
    /// After the ramp's last point, give up waiting for the scale-in after
    /// this long (e.g. 90s, 3m).
    #[arg(long, value_parser = parse_duration, conflicts_with = "static_mode")]
    scale_in_timeout: Option<Duration>,
    /// Directory for the results (timeline, SVG, CSV, summary, agent log)
    /// [default: $LB_DEMO_RESULTS/<UTC time>, else /tmp/lb-demo/<UTC time>].
    #[arg(long, value_name = "DIR", conflicts_with = "static_mode")]
    out: Option<PathBuf>,
    /// The instances' program [default: $LB_BACKEND_BIN, else lb-backend
    /// next to this binary].
    #[arg(long, value_name = "PATH", conflicts_with = "static_mode")]
    backend_bin: Option<PathBuf>,
    /// One plain line per second even on a terminal (no redrawn panel).
    #[arg(long, conflicts_with = "static_mode")]
    plain: bool,
}

/// Where the autoscaled instances come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OrchestratorKind {
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
    fn resolve(self) -> (OrchestratorKind, Option<&'static str>) {
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

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    load::parse_duration(s).map_err(|e| e.to_string())
}

/// SIGINT, SIGTERM and SIGHUP (the terminal went away) all stop the run in
/// order: whatever was made is removed.
fn install_signal_handlers() -> anyhow::Result<()> {
    stop::stop_on(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = if cli.static_mode { run_static(&cli) } else { run_autoscale(&cli) };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn require_root() -> anyhow::Result<()> {
    if !is_root() {
        bail!("lb-demo needs root (network namespaces, XDP); try `sudo -E cargo xtask run`");
    }
    Ok(())
}

// ===========================================================================
// The autoscaling demo

/// The service address; on no interface, the client routes it via the LB.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 220, 255, 1);
const VIP_PORT: u16 = 80;
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 220, 0, 1);
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 220, 0, 2);
/// The LB's client-facing interface (in the LB namespace).
const LB_IFACE: &str = "lbc";
/// Its peer in the client namespace.
const CLIENT_IFACE: &str = "to-lb";
const SERVICE: &str = "web";
const INSTANCE_PORT: u16 = 8080;
/// lb-agent's default instance subnet (`prefix`), inside the LB namespace.
const INSTANCE_NET: &str = "10.212.0.0/24";
const DEFAULT_RAMP: &str = "0s:20,10s:20,25s:140,55s:140,56s:10";
const QUICK_RAMP: &str = "0s:20,3s:20,13s:100,25s:100,26s:10";
const MIN_REPLICAS: u32 = 1;
const MAX_REPLICAS: u32 = 4;
const CPU_TARGET: f64 = 50.0;
/// How often the agent's status is read.
const STATUS_EVERY: Duration = Duration::from_millis(500);
/// How long the instances must stay at the minimum before the load stops.
const SETTLE: f64 = 3.0;
/// Where named network namespaces live (`ip netns add`).
const NETNS_DIR: &str = "/run/netns";

fn run_autoscale(cli: &Cli) -> anyhow::Result<()> {
    let (kind, why) = cli.orchestrator.resolve();
    require_root()?;
    if let Some(why) = why {
        println!("lb-demo: instances as {} ({why}; --orchestrator chooses)", kind_name(kind));
    }
    install_signal_handlers()?;
    let ramp_text = match (&cli.ramp, cli.quick) {
        (Some(r), _) => r.clone(),
        (None, true) => QUICK_RAMP.to_owned(),
        (None, false) => DEFAULT_RAMP.to_owned(),
    };
    let ramp = Ramp::parse(&ramp_text).map_err(|e| anyhow!("--ramp: {e}"))?;
    let shape = Shape::of(&ramp);
    if shape.peak <= 0.0 {
        bail!("--ramp {ramp_text:?} never offers any load");
    }
    let scale_in_timeout =
        cli.scale_in_timeout.unwrap_or(if cli.quick { Duration::from_secs(60) } else { Duration::from_secs(120) });
    let agent = find_binary("lb-agent", "LB_AGENT_BIN", None)?;
    let backend = find_binary("lb-backend", "LB_BACKEND_BIN", cli.backend_bin.as_deref())?;
    let plan = InstancePlan::new(kind, &backend);
    let view =
        View::new(!cli.plain && io::stdout().is_terminal() && std::env::var_os("TERM").is_none_or(|t| t != "dumb"));

    let mut lab = Lab::new(plan)?;
    let out = ResultsDir::create(cli.out.as_deref())?;
    let result = demo(&mut lab, &out, &ramp_text, &ramp, &shape, scale_in_timeout, cli.quick, &agent, view);
    // The run's own records go into the results before the scratch directory goes.
    out.copy_in(&lab.agent_log(), "agent.log");
    out.copy_in(&lab.config_path(), "lb.toml");
    let notes = lab.cleanup();
    println!("cleaned up: {}", notes.join("; "));
    out.finish(result.is_ok());
    result
}

#[allow(clippy::too_many_arguments)]
fn demo(
    lab: &mut Lab,
    out: &ResultsDir,
    ramp_text: &str,
    ramp: &Ramp,
    shape: &Shape,
    scale_in_timeout: Duration,
    quick: bool,
    agent_bin: &Path,
    mut view: View,
) -> anyhow::Result<()> {
    println!("lb-demo: autoscaling service {SERVICE:?} on {VIP}:{VIP_PORT}, {}", lab.plan.describe());
    println!("Building a throw-away network (removed again on exit):");
    lab.build()?;
    print!("{}", lab.describe());
    let config = lab.write_config(&lab.config_toml(&out.path.join("timeline.jsonl"), quick))?;
    println!(
        "  policy   min {MIN_REPLICAS}, max {MAX_REPLICAS} instances, target {CPU_TARGET:.0}% CPU per instance{}",
        if quick { ", scale-down window 5 s (--quick)" } else { "" }
    );
    println!("  config   {}", config.display());
    println!("  results  {}", out.path.display());
    lab.start_agent(agent_bin)?;
    let a = lab.agent.as_ref().expect("just started");
    println!(
        "  agent    {} (pid {}, in {}), log {}",
        agent_bin.display(),
        a.child.id(),
        lab.lb_ns.as_deref().unwrap_or("the host's namespace"),
        lab.agent_log().display()
    );
    println!("           control socket {}", a.socket.display());

    let first = wait_first_instance(lab)?;
    let Some(first) = first else {
        println!("interrupted before the load started");
        return Ok(());
    };
    println!();
    println!(
        "load: {ramp_text} (requests per second over time), one HTTP GET per connection from {} to {VIP}:{VIP_PORT};",
        lab.client_ns
    );
    println!(
        "      the last rate holds until the instances are back to {MIN_REPLICAS} (at most {} s more). Ctrl-C stops early.",
        scale_in_timeout.as_secs()
    );
    if let Some(start) = shape.start {
        println!("      the ramp starts at +{start:.0} s, peaks at {:.0} req/s", shape.peak);
    }
    println!();

    let record = run_load(lab, ramp, shape, scale_in_timeout, &first, &mut view)?;
    view.finish();
    let summary = summarize(&record, shape, ramp_text);
    println!();
    print!("{summary}");
    let files = write_results(out, &record, &summary, ramp_text)?;
    println!("results in {}: {}", out.path.display(), files.join(", "));
    if let Some(e) = &record.agent_died {
        bail!("{e}");
    }
    let s = &record.report.summary;
    if s.failed > 0 {
        let hint = if s.delayed > 0 {
            format!(
                " ({} requests also started late: this machine may have been short of CPU for the load \
                 generator and the instances)",
                s.delayed
            )
        } else {
            String::new()
        };
        bail!("{} of {} requests failed{hint}", s.failed, s.offered);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The ramp's shape: when it starts rising, its peak, when it drops.

struct Shape {
    /// When the rate first rises; `None` if it never does.
    start: Option<f64>,
    peak: f64,
    /// When the rate starts falling after the peak.
    drop: Option<f64>,
    /// The last point: the rate after it holds.
    end: f64,
}

impl Shape {
    fn of(ramp: &Ramp) -> Shape {
        const STEP: f64 = 0.05;
        let end = ramp.end();
        let n = (end / STEP).ceil() as usize + 1;
        let times: Vec<f64> = (0..=n).map(|i| i as f64 * STEP).collect();
        let peak = times.iter().map(|&t| ramp.rate_at(t)).fold(0.0, f64::max);
        let rises = |t: f64| ramp.rate_at(t + STEP) > ramp.rate_at(t) + 1e-9;
        let falls = |t: f64| ramp.rate_at(t + STEP) < ramp.rate_at(t) - 1e-9;
        let start = times.iter().copied().find(|&t| t < end && rises(t)).map(|t| round_to(t, STEP));
        let peak_at = times.iter().copied().find(|&t| ramp.rate_at(t) >= peak - 1e-9).unwrap_or(0.0);
        let drop = times.iter().copied().find(|&t| t >= peak_at && t < end && falls(t)).map(|t| round_to(t, STEP));
        Shape { start, peak, drop, end }
    }

    /// What the load is doing at `t`, for the panel.
    fn phase(&self, ramp: &Ramp, t: f64) -> String {
        let rate = ramp.rate_at(t);
        let next = ramp.rate_at(t + 1.0);
        if t >= self.end {
            format!("tail at {rate:.0} req/s, waiting for the scale-in")
        } else if self.start.is_some_and(|s| t < s) {
            format!("warm-up at {rate:.0} req/s")
        } else if next > rate + 1e-6 {
            format!("ramping up, {rate:.0} -> {:.0} req/s", self.peak)
        } else if next < rate - 1e-6 {
            format!("load dropping from {rate:.0} req/s")
        } else {
            format!("holding {rate:.0} req/s")
        }
    }
}

fn kind_name(kind: OrchestratorKind) -> &'static str {
    match kind {
        OrchestratorKind::Docker => "Docker containers",
        _ => "local processes",
    }
}

fn round_to(v: f64, step: f64) -> f64 {
    (v / step).round() * step
}

// ---------------------------------------------------------------------------
// Instances: what the orchestrator needs from the demo.

struct InstancePlan {
    kind: OrchestratorKind,
    /// The instances' bridge: in the LB namespace for processes (also the
    /// name prefix of their namespaces, `<bridge>-<n>`), in the host's for
    /// Docker. Unique to this run.
    bridge: String,
    backend_bin: PathBuf,
    /// Docker only: the network the agent makes for the containers.
    network: String,
}

impl InstancePlan {
    fn new(kind: OrchestratorKind, backend_bin: &Path) -> InstancePlan {
        let pid = std::process::id();
        let (bridge, network) = match kind {
            OrchestratorKind::Docker => (format!("lbdd{pid}"), format!("lb-demo-{pid}")),
            _ => (format!("lbd{pid}"), String::new()),
        };
        InstancePlan { kind, bridge, backend_bin: backend_bin.to_owned(), network }
    }

    fn docker(&self) -> bool {
        self.kind == OrchestratorKind::Docker
    }

    /// The image needs lb-backend linked statically: `$LB_BACKEND_STATIC_BIN`,
    /// else the static build beside this binary's target directory.
    fn static_backend_bin(&self) -> anyhow::Result<PathBuf> {
        let path = match std::env::var_os("LB_BACKEND_STATIC_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                let exe = std::env::current_exe().context("current_exe")?;
                // target/release/lb-demo -> target/x86_64-unknown-linux-gnu/release/lb-backend
                let target = exe.ancestors().nth(2).context("lb-demo is not in a cargo target directory")?;
                target.join("x86_64-unknown-linux-gnu/release/lb-backend")
            }
        };
        if !path.is_file() {
            bail!(
                "the static lb-backend for the container image is not at {}: build it with `RUSTFLAGS=\"-C \
                 target-feature=+crt-static\" cargo build --release -p lb-backend --target x86_64-unknown-linux-gnu` \
                 (`cargo xtask run` does), set LB_BACKEND_STATIC_BIN, or use --orchestrator process",
                path.display()
            );
        }
        Ok(path)
    }

    fn describe(&self) -> String {
        if self.docker() {
            format!(
                "instances as Docker containers of {DEMO_IMAGE} (lb-agent's Docker orchestrator, network {}, bridge {})",
                self.network, self.bridge
            )
        } else {
            format!("instances as local lb-backend processes (lb-agent's process orchestrator, bridge {})", self.bridge)
        }
    }

    /// The interface where the instances' replies arrive.
    fn reply_interface(&self) -> &str {
        &self.bridge
    }

    /// `[service.instances.*]` and below.
    fn toml(&self) -> String {
        if self.docker() {
            return format!(
                "[service.instances.docker]\nimage = {}\nport = {INSTANCE_PORT}\nnetwork = {}\nbridge = {}\n\
                 subnet = \"{INSTANCE_NET}\"\ncpus = 1.0\nstop_grace = \"3s\"\n\
                 env = {{ LB_BACKEND_NAME = \"{{name}}\", LB_BACKEND_LISTEN = \"0.0.0.0:{{port}}\", \
                 LB_BACKEND_WORK_MS = \"10\", LB_BACKEND_CPU_WORKERS = \"1\" }}\n",
                toml_string(DEMO_IMAGE),
                toml_string(&self.network),
                toml_string(&self.bridge),
            );
        }
        let command = [
            self.backend_bin.to_string_lossy().as_ref(),
            "--listen",
            "{addr}",
            "--name",
            "{name}",
            "--work-ms",
            "10",
            "--cpu-workers",
            "1",
        ]
        .iter()
        .map(|a| toml_string(a))
        .collect::<Vec<_>>()
        .join(", ");
        format!(
            "[service.instances.process]\ncommand = [{command}]\nport = {INSTANCE_PORT}\nbridge = {}\n",
            toml_string(&self.bridge)
        )
    }

    /// Namespaces of this run's process instances that are still there.
    fn leftover_namespaces(&self) -> Vec<String> {
        if self.docker() {
            return Vec::new();
        }
        let prefix = format!("{}-", self.bridge);
        let Ok(dir) = fs::read_dir(NETNS_DIR) else { return Vec::new() };
        let mut out: Vec<String> = dir
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.strip_prefix(&prefix).is_some_and(|rest| rest.parse::<u8>().is_ok()))
            .collect();
        out.sort();
        out
    }

    /// Containers the agent made for this run (its labels, on this run's
    /// network) that are still there.
    fn leftover_containers(&self) -> Vec<String> {
        if !self.docker() {
            return Vec::new();
        }
        let owner = format!("label={LABEL_OWNER}={OWNER}");
        let service = format!("label={LABEL_SERVICE}={SERVICE}");
        let network = format!("network={}", self.network);
        let args = ["ps", "-aq", "--no-trunc", "--filter", &owner, "--filter", &service, "--filter", &network];
        run("docker", &args).map(|out| out.split_whitespace().map(str::to_owned).collect()).unwrap_or_default()
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `explicit`, else `$env`, else `name` next to this executable.
fn find_binary(name: &str, env: &str, explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match (explicit, std::env::var_os(env)) {
        (Some(p), _) => p.to_owned(),
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => {
            let exe = std::env::current_exe().context("current_exe")?;
            exe.parent().context("the executable has no directory")?.join(name)
        }
    };
    if !path.is_file() {
        bail!(
            "{name} not found at {}; build it with `cargo build --release -p lb-agent -p lb-tests --bins` \
             (`cargo xtask run` does), or set {env}",
            path.display()
        );
    }
    fs::canonicalize(&path).with_context(|| format!("resolve {}", path.display()))
}

// ---------------------------------------------------------------------------
// The lab: namespaces, veths, the agent and its instances. Everything it
// makes it records, and `cleanup` (also run by Drop, so on errors and
// panics) removes exactly that.

struct Lab {
    /// The agent's namespace: a namespace of ours for processes, the host's
    /// (`None`) for Docker, where dockerd's bridge is.
    lb_ns: Option<String>,
    /// The LB's client-facing veth: in `lb_ns`, or in the host's namespace
    /// (named after our pid) for Docker.
    lb_iface: String,
    client_ns: String,
    plan: InstancePlan,
    /// Scratch directory: config, control socket, pins (bpffs), agent log.
    scratch: PathBuf,
    made_scratch: bool,
    /// Namespaces this run created, in order.
    namespaces: Vec<String>,
    agent: Option<AgentProc>,
    /// Docker: the engine, stopped again at the end if this run started it.
    dockerd: Option<Dockerd>,
    /// Docker: the network was absent when we started, so the one there at
    /// the end is the agent's, made for this run.
    network_is_ours: bool,
    cleaned: bool,
}

impl Lab {
    fn new(plan: InstancePlan) -> anyhow::Result<Lab> {
        let pid = std::process::id();
        let docker = plan.docker();
        let lab = Lab {
            lb_ns: (!docker).then(|| format!("lbd-{pid}-lb")),
            lb_iface: if docker { format!("lbc{pid}") } else { LB_IFACE.to_owned() },
            client_ns: format!("lbd-{pid}-client"),
            plan,
            scratch: std::env::temp_dir().join(format!("lbd-{pid}")),
            made_scratch: false,
            namespaces: Vec::new(),
            agent: None,
            dockerd: None,
            network_is_ours: false,
            cleaned: false,
        };
        // Names carry our pid; anything by these names is a leftover of an
        // earlier run that had the same pid. Refuse rather than touch it.
        let mut taken: Vec<String> = lab
            .lb_ns
            .iter()
            .chain([&lab.client_ns])
            .filter(|n| Path::new(NETNS_DIR).join(n).exists())
            .cloned()
            .collect();
        taken.extend(lab.plan.leftover_namespaces());
        if !taken.is_empty() {
            bail!(
                "network namespace(s) {} exist already (left by an earlier run?); this run does not touch what it \
                 did not create: remove them with `ip netns del NAME` and try again",
                taken.join(", ")
            );
        }
        if lab.scratch.exists() {
            bail!("{} exists already (left by an earlier run?); remove it and try again", lab.scratch.display());
        }
        if lab.lb_ns.is_none() && Path::new("/sys/class/net").join(&lab.lb_iface).exists() {
            bail!("interface {} exists already (left by an earlier run?); this run does not touch it", lab.lb_iface);
        }
        Ok(lab)
    }

    fn config_path(&self) -> PathBuf {
        self.scratch.join("lb.toml")
    }

    fn agent_log(&self) -> PathBuf {
        self.scratch.join("agent.log")
    }

    fn bpf_dir(&self) -> PathBuf {
        self.scratch.join("bpf")
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Client ns ⇄ LB ns; the agent makes the instances' bridge itself.
    fn build(&mut self) -> anyhow::Result<()> {
        fs::create_dir(&self.scratch).with_context(|| format!("create {}", self.scratch.display()))?;
        self.made_scratch = true;
        fs::create_dir(self.bpf_dir()).with_context(|| format!("create {}", self.bpf_dir().display()))?;
        if self.plan.docker() {
            return self.build_docker();
        }
        let (lb, client) = (self.lb_ns.clone().expect("processes: an LB namespace"), self.client_ns.clone());
        self.add_netns(&lb)?;
        // Before any interface exists, so that the veth and the bridge
        // inherit rp_filter=0: replies from the instances come back from the
        // VIP, which is not routed via the bridge.
        for setting in ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"] {
            run("ip", &["netns", "exec", &lb, "sysctl", "-qw", setting])?;
        }
        self.add_netns(&client)?;
        // Created directly inside the two namespaces: nothing ever appears
        // in the host's namespace.
        ip(&[
            "link",
            "add",
            "name",
            LB_IFACE,
            "netns",
            &lb,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_IFACE,
            "netns",
            &client,
        ])?;
        ip(&["-n", &lb, "addr", "add", &format!("{LB_ADDR}/24"), "dev", LB_IFACE])?;
        ip(&["-n", &lb, "link", "set", LB_IFACE, "up"])?;
        ip(&["-n", &client, "addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", CLIENT_IFACE])?;
        ip(&["-n", &client, "link", "set", CLIENT_IFACE, "up"])?;
        // Only the VIP goes via the LB: the client has no default route.
        ip(&["-n", &client, "route", "add", &format!("{VIP}/32"), "via", &LB_ADDR.to_string()])?;
        Ok(())
    }

    /// Docker: the client namespace with a veth into the host's namespace,
    /// where the agent runs beside dockerd; the engine started if needed and
    /// the demo image built. The agent makes the network and its bridge.
    fn build_docker(&mut self) -> anyhow::Result<()> {
        let (exists, _) = docker_try(&["network", "inspect", &self.plan.network]);
        if exists {
            bail!("docker network {} exists already; this run does not touch it", self.plan.network);
        }
        let bin = self.plan.static_backend_bin()?;
        // Panics (with the engine's log) if dockerd cannot start; the lab's
        // Drop still cleans up.
        let dockerd = Dockerd::ensure();
        println!(
            "  docker   {}",
            if dockerd.started_here() {
                "engine started for this run (stopped again at the end)"
            } else {
                "engine running"
            }
        );
        self.dockerd = Some(dockerd);
        let t = Instant::now();
        let image = build_demo_image_from(&bin);
        println!(
            "  image    {DEMO_IMAGE} ({}) built in {:.1} s",
            &image[..image.len().min(19)],
            t.elapsed().as_secs_f64()
        );
        self.network_is_ours = true;
        let client = self.client_ns.clone();
        self.add_netns(&client)?;
        let lb = self.lb_iface.clone();
        ip(&["link", "add", "name", &lb, "type", "veth", "peer", "name", CLIENT_IFACE, "netns", &client])?;
        ip(&["addr", "add", &format!("{LB_ADDR}/24"), "dev", &lb])?;
        ip(&["link", "set", &lb, "up"])?;
        ip(&["-n", &client, "addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", CLIENT_IFACE])?;
        ip(&["-n", &client, "link", "set", CLIENT_IFACE, "up"])?;
        // Only the VIP goes via the host: the client has no default route.
        ip(&["-n", &client, "route", "add", &format!("{VIP}/32"), "via", &LB_ADDR.to_string()])?;
        Ok(())
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        let lb = self.lb_ns.as_deref().unwrap_or("(the host's)");
        let _ = writeln!(
            s,
            "  client   ns {:<20} {CLIENT_ADDR}/24 on {CLIENT_IFACE}, route {VIP}/32 via {LB_ADDR} (no default route)",
            self.client_ns
        );
        let _ = writeln!(
            s,
            "  LB       ns {lb:<20} {LB_ADDR}/24 on {}, ip_forward=1; the VIP {VIP} is on no interface",
            self.lb_iface
        );
        if self.plan.docker() {
            let _ = writeln!(
                s,
                "  network  {:<23} bridge {}: containers get {INSTANCE_NET} addresses and listen on :{INSTANCE_PORT}",
                self.plan.network, self.plan.bridge
            );
        } else {
            let _ = writeln!(
                s,
                "  bridge   {:<23} in {lb}: instances {}-<n> get {INSTANCE_NET} addresses and listen on :{INSTANCE_PORT}",
                self.plan.bridge, self.plan.bridge
            );
        }
        let _ = writeln!(
            s,
            "  XDP      on {} and {} (both directions cross it)",
            self.lb_iface,
            self.plan.reply_interface()
        );
        s
    }

    fn config_toml(&self, timeline: &Path, quick: bool) -> String {
        let mut s = format!(
            "# Written by lb-demo (pid {}); removed on exit.\n\n[[service]]\nname = \"{SERVICE}\"\nvip = \"{VIP}\"\n\
             port = {VIP_PORT}\ninterfaces = [{}, {}]\n\
             health_check = {{ kind = \"http\", path = \"/healthz\", interval = \"500ms\" }}\ndrain_timeout = \"10s\"\n\n\
             [service.scaling]\nmin_replicas = {MIN_REPLICAS}\nmax_replicas = {MAX_REPLICAS}\n\
             target = {{ cpu = {CPU_TARGET:.1} }}\n",
            std::process::id(),
            toml_string(&self.lb_iface),
            toml_string(self.plan.reply_interface()),
        );
        if quick {
            s += "[service.scaling.scale_down]\nstabilization_window = \"5s\"\nperiod = \"5s\"\n";
        }
        let _ = write!(s, "\n[service.instances]\ntimeline = {}\n", toml_string(&timeline.to_string_lossy()));
        s += &self.plan.toml();
        s
    }

    fn write_config(&self, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.config_path();
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    fn start_agent(&mut self, bin: &Path) -> anyhow::Result<()> {
        let args: [std::ffi::OsString; 9] = [
            "run".into(),
            "--config".into(),
            self.config_path().into_os_string(),
            "--api-socket".into(),
            self.scratch.join("api.sock").into_os_string(),
            "--metrics-address".into(),
            "off".into(),
            "--pin-dir".into(),
            self.bpf_dir().join("lb").into_os_string(),
        ];
        self.agent = Some(AgentProc::spawn(
            bin,
            &args,
            self.lb_ns.as_deref(),
            &self.agent_log(),
            &self.scratch.join("api.sock"),
        )?);
        Ok(())
    }

    /// Remove everything this run made, in order: the agent (SIGTERM: it
    /// stops its instances and detaches XDP), instance namespaces it left,
    /// our namespaces (their veths and the bridge go with them), the bpffs
    /// the agent mounted for its pins, the scratch directory. Returns what
    /// it did, for the user.
    fn cleanup(&mut self) -> Vec<String> {
        if self.cleaned {
            return Vec::new();
        }
        self.cleaned = true;
        let mut notes = Vec::new();
        if let Some(mut agent) = self.agent.take() {
            let status = agent.stop(Duration::from_secs(20));
            notes.push(format!("lb-agent stopped ({})", status.map_or("killed".into(), |s| s.to_string())));
        }
        for id in self.plan.leftover_containers() {
            match run("docker", &["rm", "-f", "-v", &id]) {
                Ok(_) => notes.push(format!("removed leftover container {}", &id[..id.len().min(12)])),
                Err(e) => notes.push(format!("WARNING: {e:#}")),
            }
        }
        if self.network_is_ours && docker_try(&["network", "inspect", &self.plan.network]).0 {
            match run("docker", &["network", "rm", &self.plan.network]) {
                Ok(_) => notes.push(format!("docker network {} removed", self.plan.network)),
                Err(e) => notes.push(format!("WARNING: {e:#}")),
            }
        }
        for ns in self.plan.leftover_namespaces() {
            // Only this run's agent makes `<bridge>-<n>` (the bridge name
            // holds our pid); a process still in one is an instance it lost.
            let pids = run("ip", &["netns", "pids", &ns]).unwrap_or_default();
            for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                if pid > 1 && pid as u32 != std::process::id() {
                    // SAFETY: kill(2) on a pid listed in a namespace that only this run's agent created.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            match ip(&["netns", "del", &ns]) {
                Ok(_) => notes.push(format!("removed leftover instance namespace {ns}")),
                Err(e) => notes.push(format!("WARNING: {e:#}")),
            }
        }
        let mut removed = Vec::new();
        for ns in self.namespaces.drain(..).rev() {
            match ip(&["netns", "del", &ns]) {
                Ok(_) => removed.push(ns),
                Err(e) => notes.push(format!("WARNING: {e:#}")),
            }
        }
        if !removed.is_empty() {
            let bridge = if self.plan.docker() { String::new() } else { format!(" and bridge {}", self.plan.bridge) };
            notes.push(format!(
                "namespaces {} removed (with veth {}/{CLIENT_IFACE}{bridge})",
                removed.join(", "),
                self.lb_iface
            ));
        }
        if let Some(d) = self.dockerd.take() {
            let started = d.started_here();
            drop(d);
            if started {
                notes.push("dockerd (started for this run) stopped".into());
            }
        }
        if self.made_scratch {
            if let Some(w) = unmount_bpffs(&self.bpf_dir()) {
                notes.push(format!("WARNING: {w}"));
            }
            match fs::remove_dir_all(&self.scratch) {
                Ok(()) => notes.push(format!("{} removed", self.scratch.display())),
                Err(e) => notes.push(format!("WARNING: remove {}: {e}", self.scratch.display())),
            }
        }
        if notes.is_empty() {
            notes.push("nothing was created".into());
        }
        notes
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.cleaned {
            // Not eprintln: this may run while unwinding from a failed
            // write, and a second panic would abort before the cleanup.
            for n in self.cleanup() {
                let _ = writeln!(io::stderr(), "lb-demo cleanup: {n}");
            }
        }
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: a zeroed statfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Unmount the bpffs the agent mounted on `path` (a directory this run made,
/// so whatever is mounted there our agent mounted). Returns a warning.
fn unmount_bpffs(path: &Path) -> Option<String> {
    for _ in 0..4 {
        if !is_bpffs(path) {
            return None;
        }
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: a NUL-terminated path; MNT_DETACH cannot fail on a straggler.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Some(format!("umount {}: {}", path.display(), io::Error::last_os_error()));
        }
    }
    Some(format!("{} is still a bpffs after 4 unmounts", path.display()))
}

/// Run a command to completion, in its own process group (so a Ctrl-C on
/// the terminal, meant for lb-demo, cannot cut a setup or cleanup step
/// short); stdout, or an error with its output.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .process_group(0)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run("ip", args)
}

// ---------------------------------------------------------------------------
// The agent process

struct AgentProc {
    child: Child,
    exited: Option<ExitStatus>,
    socket: PathBuf,
    log: PathBuf,
}

impl AgentProc {
    /// Start `bin args` in `ns`'s network namespace only (it shares our
    /// mount namespace, so the bpffs it mounts for its pins is one we can
    /// unmount), in its own process group, with SIGTERM if we die.
    fn spawn(
        bin: &Path,
        args: &[std::ffi::OsString],
        ns: Option<&str>,
        log: &Path,
        socket: &Path,
    ) -> anyhow::Result<AgentProc> {
        let log_file = File::create(log).with_context(|| format!("create {}", log.display()))?;
        // Our own namespace when there is none to enter (setns to it is a no-op).
        let ns_path = ns.map_or_else(|| PathBuf::from("/proc/self/ns/net"), |ns| Path::new(NETNS_DIR).join(ns));
        let netns = File::open(&ns_path).with_context(|| format!("open {}", ns_path.display()))?;
        let fd = netns.as_raw_fd();
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("dup log fd")?)
            .stderr(log_file)
            .process_group(0);
        // SAFETY: between fork and exec the child calls only setns(2) and
        // prctl(2), both async-signal-safe, on a descriptor that stays open
        // until spawn returns. This runs on the main thread, which lives as
        // long as lb-demo, so PDEATHSIG fires only when lb-demo dies.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {} in {}", bin.display(), ns.unwrap_or("the host's namespace")))?;
        drop(netns);
        Ok(AgentProc { child, exited: None, socket: socket.to_owned(), log: log.to_owned() })
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// SIGTERM, wait up to `grace` (it stops its instances first), then
    /// SIGKILL.
    fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_exit() {
            return Some(s);
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child, not yet reaped (try_wait said it
        // runs), so the pid is still its.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = writeln!(io::stderr(), "warning: lb-agent (pid {pid}) ignored SIGTERM for {grace:?}; sending SIGKILL");
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
        self.exited
    }

    /// The status snapshot over the control socket.
    fn status(&self) -> anyhow::Result<Snapshot> {
        let answer = api_call(&self.socket, r#"{"op":"status"}"#)?;
        let mut v: serde_json::Value = serde_json::from_str(&answer).context("unreadable status answer")?;
        if v["ok"] != true {
            bail!("the agent refused status: {answer}");
        }
        serde_json::from_value(v["status"].take()).context("unexpected status layout")
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// One request line on the control socket, one answer line back (3 s
/// limits: the panel reads it twice a second).
fn api_call(socket: &Path, line: &str) -> anyhow::Result<String> {
    api_call_within(socket, line, Duration::from_secs(3))
        .with_context(|| format!("control socket {}", socket.display()))
}

fn scaling_of(s: &Snapshot) -> Option<&ScalingStatus> {
    s.scaling.iter().find(|sc| sc.service == SERVICE)
}

/// Wait for the agent to answer and its first instance to be ready, then
/// send one request through the VIP. `None` on Ctrl-C.
fn wait_first_instance(lab: &mut Lab) -> anyhow::Result<Option<String>> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(45);
    let mut said = BTreeSet::new();
    print!("waiting for the agent and its first instance ...");
    let _ = io::stdout().flush();
    let name = loop {
        if stopped() {
            println!();
            return Ok(None);
        }
        let agent = lab.agent.as_mut().expect("agent started");
        if let Some(status) = agent.try_exit() {
            println!();
            bail!("lb-agent exited ({status}) while starting; the end of its log:\n{}", agent.log_tail(30));
        }
        if Instant::now() > deadline {
            println!();
            bail!("no instance was ready within 45 s; the end of the agent's log:\n{}", agent.log_tail(30));
        }
        if let Ok(snap) = agent.status() {
            if let Some(sc) = scaling_of(&snap) {
                for r in &sc.replicas {
                    if said.insert((r.name.clone(), r.phase.clone())) {
                        print!(" {} {}", r.name, r.phase);
                        let _ = io::stdout().flush();
                    }
                }
                if let Some(r) = sc.replicas.iter().find(|r| r.phase == "ready") {
                    break r.name.clone();
                }
            }
        }
        thread::sleep(Duration::from_millis(100));
    };
    println!(" ({:.1} s)", started.elapsed().as_secs_f64());
    // The first request through the VIP, so that the load starts on a
    // working path (the table update follows "ready" closely).
    let client = lab.client_ns.clone();
    let mut last_err = String::new();
    for _ in 0..50 {
        if stopped() {
            return Ok(None);
        }
        match in_netns(&client, || http_get(SocketAddrV4::new(VIP, VIP_PORT)))? {
            Ok((backend, took)) => {
                println!(
                    "first request: {CLIENT_ADDR} -> {VIP}:{VIP_PORT} answered by {backend} in {:.1} ms",
                    took * 1e3
                );
                return Ok(Some(name));
            }
            Err(e) => last_err = e.to_string(),
        }
        thread::sleep(Duration::from_millis(200));
    }
    bail!("{name} is ready but requests to {VIP}:{VIP_PORT} from {client} fail: {last_err}")
}

/// Run `f` on a thread inside the named network namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let path = Path::new(NETNS_DIR).join(ns);
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on an open namespace descriptor; it moves only
            // this short-lived thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow!("setns into {ns}: {}", io::Error::last_os_error()));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("a thread in {ns} panicked"))?
    })
}

/// One `GET /`: the body's first line (the backend's name) and the time taken.
fn http_get(addr: SocketAddrV4) -> io::Result<(String, f64)> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("answer {:?}", head.lines().next().unwrap_or(""))));
    }
    Ok((body.lines().next().unwrap_or("").trim().to_owned(), started.elapsed().as_secs_f64()))
}

// ---------------------------------------------------------------------------
// The run: load in one thread, this one watches the agent and draws.

/// One reading of the instances.
#[derive(Clone, Debug, Default)]
struct Sample {
    t: f64,
    ready: u32,
    starting: u32,
    draining: u32,
    desired: u32,
}

/// Milestones, in seconds since the load started.
#[derive(Default)]
struct Milestones {
    first_up_decision: Option<f64>,
    first_new_started: Option<(f64, String)>,
    first_new_ready: Option<(f64, String)>,
    /// Window start of the first second a new instance answered in.
    first_new_answer: Option<(f64, String)>,
    back_to_min: Option<f64>,
}

struct Record {
    report: load::Report,
    samples: Vec<Sample>,
    milestones: Milestones,
    initial: BTreeSet<String>,
    stop_reason: String,
    agent_died: Option<String>,
}

struct Monitor<'a> {
    view: &'a mut View,
    ramp: &'a Ramp,
    shape: &'a Shape,
    start: Instant,
    start_unix: f64,
    status: Option<ScalingStatus>,
    status_error: Option<String>,
    /// Replica id -> (name, phase), as last seen.
    seen: BTreeMap<String, (String, String)>,
    last_decision: f64,
    initial: BTreeSet<String>,
    samples: Vec<Sample>,
    points: Vec<TimePoint>,
    totals: (u64, u64, u64),
    milestones: Milestones,
    at_min_since: Option<f64>,
    /// Why the load is stopping, once it is.
    stopping: Option<String>,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn run_load(
    lab: &mut Lab,
    ramp: &Ramp,
    shape: &Shape,
    scale_in_timeout: Duration,
    first: &str,
    view: &mut View,
) -> anyhow::Result<Record> {
    let client_ns = lab.client_ns.clone();
    let agent = lab.agent.as_mut().expect("agent started");
    let snap = agent.status().context("agent status")?;
    let sc = scaling_of(&snap).cloned();
    let initial: BTreeSet<String> = sc
        .as_ref()
        .map(|s| s.replicas.iter().filter(|r| r.phase == "ready").map(|r| r.name.clone()).collect())
        .unwrap_or_else(|| [first.to_owned()].into());
    let last_decision = sc.as_ref().and_then(|s| s.decisions.first()).map_or(0.0, |d| d.unix_time);

    // A little longer than the scale-in may take, so that the timeout below
    // stops the load, with its reason, before the load ends on its own.
    let duration = Duration::from_secs_f64(shape.end) + scale_in_timeout + Duration::from_secs(5);
    let mut cfg = LoadConfig::new(SocketAddr::V4(SocketAddrV4::new(VIP, VIP_PORT)), Mode::Open(ramp.clone()), duration);
    cfg.netns = Some(client_ns);
    cfg.keep_alive = false; // one connection per request: each is a new flow for Maglev to place
    let load_stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<TimePoint>();
    let stop_for_load = Arc::clone(&load_stop);
    let start = Instant::now();
    let start_unix = unix_now();
    let handle = thread::Builder::new()
        .name("load".into())
        .spawn(move || {
            load::run(&cfg, &stop_for_load, |p| {
                let _ = tx.send(p.clone());
            })
        })
        .context("start the load thread")?;

    let mut m = Monitor {
        view,
        ramp,
        shape,
        start,
        start_unix,
        status: sc,
        status_error: None,
        seen: BTreeMap::new(),
        last_decision,
        initial: initial.clone(),
        samples: Vec::new(),
        points: Vec::new(),
        totals: (0, 0, 0),
        milestones: Milestones::default(),
        at_min_since: None,
        stopping: None,
    };
    if let Some(sc) = &m.status {
        for r in &sc.replicas {
            m.seen.insert(r.id.clone(), (r.name.clone(), r.phase.clone()));
        }
    }
    m.view.header();
    let mut stop_reason: Option<String> = None;
    let mut agent_died = None;
    let mut next_poll = Instant::now();
    loop {
        let t = start.elapsed().as_secs_f64();
        if stop_reason.is_none() {
            if stopped() {
                stop_reason = Some(format!("stopped by Ctrl-C (or a signal) at +{t:.0} s"));
            } else if let Some(status) = agent.try_exit() {
                let msg =
                    format!("lb-agent exited unexpectedly ({status}); the end of its log:\n{}", agent.log_tail(30));
                m.note(t, &format!("ERROR: lb-agent exited ({status})"));
                agent_died = Some(msg);
                stop_reason = Some(format!("lb-agent exited at +{t:.0} s"));
            } else if t >= shape.end + scale_in_timeout.as_secs_f64() {
                stop_reason = Some(format!(
                    "the instances did not return to {MIN_REPLICAS} within {} s after the ramp ended",
                    scale_in_timeout.as_secs()
                ));
            } else if m.at_min_since.is_some_and(|since| t - since >= SETTLE) {
                stop_reason = Some(format!("instances back to {MIN_REPLICAS}"));
            }
            if let Some(r) = &stop_reason {
                m.stopping = Some(r.clone());
                m.note(t, &format!("stopping the load: {r}"));
                load_stop.store(true, Ordering::SeqCst);
            }
        }
        if Instant::now() >= next_poll {
            next_poll += STATUS_EVERY;
            if agent_died.is_none() {
                m.poll(agent);
            }
        }
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(p) => m.point(p),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let report = match handle.join() {
        Ok(r) => r.context("the load generator")?,
        Err(_) => bail!("the load generator panicked"),
    };
    let t_end = start.elapsed().as_secs_f64();
    if let Some(last) = m.samples.last().cloned() {
        m.samples.push(Sample { t: t_end, ..last });
    }
    Ok(Record {
        report,
        samples: m.samples,
        milestones: m.milestones,
        initial,
        stop_reason: stop_reason.unwrap_or_else(|| "the load ran its whole course".into()),
        agent_died,
    })
}

impl Monitor<'_> {
    fn t(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn note(&mut self, t: f64, text: &str) {
        self.view.note(t, text);
        self.redraw();
    }

    /// Read the agent's status; report what changed.
    fn poll(&mut self, agent: &AgentProc) {
        let snap = match agent.status() {
            Ok(s) => s,
            Err(e) => {
                self.status_error = Some(format!("{e:#}"));
                return;
            }
        };
        let t = self.t();
        let Some(sc) = scaling_of(&snap).cloned() else {
            self.status_error = Some(format!("no scaling status for {SERVICE}"));
            return;
        };
        self.status_error = None;
        self.milestones_from_events(&snap);
        // New decisions, oldest first.
        let mut fresh: Vec<_> = sc.decisions.iter().filter(|d| d.unix_time > self.last_decision).cloned().collect();
        fresh.reverse();
        for d in fresh {
            self.last_decision = d.unix_time;
            let dt = d.unix_time - self.start_unix;
            if d.replicas > d.current && self.milestones.first_up_decision.is_none() {
                self.milestones.first_up_decision = Some(dt);
            }
            let text = format!("decision {} -> {} ({}): {}", d.current, d.replicas, d.rule, d.reason);
            self.view.note(dt.max(0.0), &text);
        }
        // Instances that appeared, changed phase or went.
        let mut now_seen = BTreeMap::new();
        for r in &sc.replicas {
            let before = self.seen.get(&r.id);
            let what = match before {
                None => Some(format!("{} started ({}), {}", r.name, r.address, r.phase)),
                Some((_, phase)) if *phase != r.phase => Some(match r.phase.as_str() {
                    "ready" => {
                        format!("{} ready after {:.1} s: in the table, taking new connections", r.name, r.age_seconds)
                    }
                    "draining" => format!("{} draining: no new connections, open ones finish", r.name),
                    "stopping" => format!("{} stopping", r.name),
                    other => format!("{} {other}", r.name),
                }),
                _ => None,
            };
            if let Some(w) = what {
                self.view.note(t, &w);
            }
            now_seen.insert(r.id.clone(), (r.name.clone(), r.phase.clone()));
        }
        for (id, (name, _)) in &self.seen {
            if !now_seen.contains_key(id) {
                self.view.note(t, &format!("{name} stopped and removed"));
            }
        }
        self.seen = now_seen;
        let count = |phase: &str| sc.replicas.iter().filter(|r| r.phase == phase).count() as u32;
        let sample = Sample {
            t,
            ready: count("ready"),
            starting: count("starting"),
            draining: count("draining"),
            desired: sc.desired,
        };
        // Back at the minimum after the ramp: nothing starting, draining or
        // stopping, and the agent wants no more.
        let at_min = t >= self.shape.end
            && sc.replicas.len() as u32 == sc.min_replicas
            && sample.ready == sc.min_replicas
            && sc.desired == sc.min_replicas
            && sc.pending_starts == 0;
        match (at_min, self.at_min_since) {
            (true, None) => {
                self.at_min_since = Some(t);
                let scaled = self.samples.iter().any(|s| s.ready > sc.min_replicas);
                if scaled && self.milestones.back_to_min.is_none() {
                    self.milestones.back_to_min = Some(t);
                }
            }
            (false, Some(_)) => self.at_min_since = None,
            _ => {}
        }
        self.samples.push(sample);
        self.status = Some(sc);
        self.redraw();
    }

    /// When the first new instance started and became ready, to the
    /// agent's own clock (its events), not the half-second of our polling.
    fn milestones_from_events(&mut self, snap: &Snapshot) {
        let started = format!("{SERVICE}: started instance ");
        let ready = format!("{SERVICE}: instance ");
        // Oldest first.
        for e in snap.events.iter().rev().filter(|e| e.unix_time >= self.start_unix) {
            let t = e.unix_time - self.start_unix;
            let new = |name: &str| !self.initial.contains(name);
            if let Some(rest) = e.message.strip_prefix(&started) {
                let name = rest.split_whitespace().next().unwrap_or("");
                if new(name) && self.milestones.first_new_started.is_none() {
                    self.milestones.first_new_started = Some((t, name.to_owned()));
                }
            } else if let Some(rest) = e.message.strip_prefix(&ready) {
                let name = rest.split_whitespace().next().unwrap_or("");
                if rest.contains(" ready after ") && new(name) && self.milestones.first_new_ready.is_none() {
                    self.milestones.first_new_ready = Some((t, name.to_owned()));
                }
            }
        }
    }

    /// A second of load is complete.
    fn point(&mut self, p: TimePoint) {
        self.totals.0 += p.offered;
        self.totals.1 += p.ok;
        self.totals.2 += p.failed;
        if self.milestones.first_new_answer.is_none() && self.shape.start.is_some_and(|s| p.t + p.span > s) {
            if let Some(name) = p.backends.keys().find(|n| !self.initial.contains(*n)) {
                self.milestones.first_new_answer = Some((p.t, name.clone()));
            }
        }
        if !self.view.panel {
            let line = self.plain_line(&p);
            self.view.line(&line);
        }
        self.points.push(p);
        self.redraw();
    }

    fn plain_line(&self, p: &TimePoint) -> String {
        let mut s = format!(
            "[+{:>5.0}s] offered {:>3.0}/s ok {:>3} failed {:>2}  p50 {:>4} p99 {:>4} ms |",
            p.t,
            p.offered_rate(),
            p.ok,
            p.failed,
            fmt_ms(p.p50_ms),
            fmt_ms(p.p99_ms)
        );
        match &self.status {
            Some(sc) => {
                let count = |phase: &str| sc.replicas.iter().filter(|r| r.phase == phase).count();
                let _ = write!(
                    s,
                    " instances {} ready, {} starting, {} draining (desired {}):",
                    count("ready"),
                    count("starting"),
                    count("draining"),
                    sc.desired
                );
                for r in &sc.replicas {
                    let _ = write!(s, " {} {} cpu {}", r.name, r.phase, fmt_cpu(r.cpu_percent));
                    if let Some(n) = p.backends.get(&r.name) {
                        let _ = write!(s, " {n}/s");
                    }
                    s.push(',');
                }
                s.pop();
            }
            None => s.push_str(" instances: no status yet"),
        }
        s
    }

    fn redraw(&mut self) {
        if !self.view.panel {
            return;
        }
        let lines = self.panel_lines();
        self.view.draw(lines);
    }

    fn panel_lines(&self) -> Vec<String> {
        let v = &*self.view;
        let t = self.t();
        let mut out = Vec::new();
        out.push(format!(
            "{}  +{:.0} s  {}   {}",
            v.paint("1", &format!("lb-demo  {SERVICE} @ {VIP}:{VIP_PORT}")),
            t,
            match &self.stopping {
                Some(r) => format!("load stopping: {r}"),
                None => self.shape.phase(self.ramp, t),
            },
            if self.stopping.is_some() { String::new() } else { v.paint("2", "(Ctrl-C stops)") }
        ));
        let last = self.points.last();
        match last {
            Some(p) => out.push(format!(
                "  requests   offered {:>4.0}/s   ok {}   failed {}   p50 {} ms   p99 {} ms   (second +{:.0})",
                p.offered_rate(),
                v.paint("32", &format!("{:>4.0}/s", p.ok_rate())),
                if p.failed > 0 { v.paint("31", &format!("{:.0}/s", p.failed_rate())) } else { "0/s".into() },
                fmt_ms(p.p50_ms),
                fmt_ms(p.p99_ms),
                p.t
            )),
            None => out.push("  requests   (first second under way)".into()),
        }
        let (offered, ok, failed) = self.totals;
        let avail = if offered == 0 { 100.0 } else { 100.0 * ok as f64 / offered as f64 };
        out.push(format!(
            "  so far     {offered} sent, {ok} ok, {} failed: availability {avail:.3} %",
            if failed > 0 { v.paint("31", &failed.to_string()) } else { "0".into() }
        ));
        match &self.status {
            Some(sc) => {
                let count = |phase: &str| sc.replicas.iter().filter(|r| r.phase == phase).count();
                out.push(format!(
                    "  instances  {} ready, {} starting, {} draining   desired {} (min {}, max {})",
                    v.paint("32", &count("ready").to_string()),
                    count("starting"),
                    count("draining"),
                    sc.desired,
                    sc.min_replicas,
                    sc.max_replicas
                ));
                for r in &sc.replicas {
                    out.push(self.replica_line(r, last));
                }
                match sc.decisions.first() {
                    Some(d) => {
                        let ago = (unix_now() - d.unix_time).max(0.0);
                        out.push(format!(
                            "  decision   {} ago: {} -> {} ({})",
                            fmt_secs(ago),
                            d.current,
                            d.replicas,
                            v.paint("1", &d.rule)
                        ));
                        out.push(format!("             {}", d.reason));
                    }
                    None => out.push("  decision   none yet".into()),
                }
            }
            None => out.push("  instances  (no status yet)".into()),
        }
        if let Some(e) = &self.status_error {
            out.push(format!("  {}", v.paint("31", &format!("status: {e}"))));
        }
        // The last minute, one character per second.
        let width = 60usize;
        let secs: Vec<&TimePoint> = self.points.iter().rev().take(width).rev().collect();
        let load: String = secs.iter().map(|p| spark(p.offered_rate() / self.shape.peak.max(1.0))).collect();
        let max = self.status.as_ref().map_or(MAX_REPLICAS, |s| s.max_replicas).max(1);
        let inst: String = secs
            .iter()
            .map(|p| {
                let n = self.samples.iter().rev().find(|s| s.t <= p.t + p.span).map_or(0, |s| s.ready);
                spark(f64::from(n) / f64::from(max))
            })
            .collect();
        out.push(format!("  load       {}", v.paint("36", &load)));
        out.push(format!("  instances  {}  (last {} s)", v.paint("35", &inst), secs.len()));
        out
    }

    fn replica_line(&self, r: &ReplicaStatus, last: Option<&TimePoint>) -> String {
        let v = &*self.view;
        let color = match r.phase.as_str() {
            "ready" => "32",
            "starting" => "33",
            _ => "35",
        };
        let cpu = r.cpu_percent.unwrap_or(0.0);
        let filled = ((cpu / 10.0).round() as usize).min(10);
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(10 - filled));
        let answers = last.and_then(|p| p.backends.get(&r.name)).map_or("-".into(), |n| format!("{n}/s"));
        format!(
            "    {:<8} {:<13} {}  cpu {:>4} [{}]  answered {:>5}  up {}",
            r.name,
            r.address,
            v.paint(color, &format!("{:<9}", r.phase)),
            fmt_cpu(r.cpu_percent),
            bar,
            answers,
            fmt_secs(r.age_seconds)
        )
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

fn fmt_cpu(v: Option<f64>) -> String {
    v.map_or("-".into(), |c| format!("{c:.0}%"))
}

fn fmt_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.0}s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

fn spark(fraction: f64) -> char {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if fraction <= 0.0 {
        return ' ';
    }
    BARS[((fraction * 8.0).ceil() as usize).clamp(1, 8) - 1]
}

// ---------------------------------------------------------------------------
// The terminal: plain lines, or a panel redrawn in place under scrolling notes.

struct View {
    /// Redraw a panel in place (a terminal), or print plain lines.
    panel: bool,
    color: bool,
    /// Lines of the panel on screen now.
    drawn: usize,
    last: Vec<String>,
}

impl View {
    fn new(panel: bool) -> View {
        let color = panel && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        View { panel, color, drawn: 0, last: Vec::new() }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn header(&mut self) {
        if self.panel {
            print!("\x1b[?25l"); // hide the cursor while redrawing
        } else {
            println!("one line per second of load; instance changes and scaling decisions as they happen:");
        }
        let _ = io::stdout().flush();
    }

    fn erase(&mut self, out: &mut String) {
        if self.drawn > 0 {
            let _ = write!(out, "\r\x1b[{}A\x1b[J", self.drawn);
            self.drawn = 0;
        }
    }

    /// A line that stays (scrolls above the panel).
    fn note(&mut self, t: f64, text: &str) {
        self.line(&format!("[+{t:>5.1}s] {text}"));
    }

    fn line(&mut self, text: &str) {
        if self.panel {
            let mut out = String::new();
            self.erase(&mut out);
            let width = term_width();
            // Wrap long notes by hand, so the panel's line count stays exact.
            let chars: Vec<char> = text.chars().collect();
            for chunk in chars.chunks(width.saturating_sub(1).max(20)) {
                out.extend(chunk);
                out.push('\n');
            }
            let last = std::mem::take(&mut self.last);
            self.render(&mut out, &last);
            self.last = last;
            print!("{out}");
        } else {
            println!("{text}");
        }
        let _ = io::stdout().flush();
    }

    fn render(&mut self, out: &mut String, lines: &[String]) {
        let width = term_width().saturating_sub(1).max(20);
        for l in lines {
            out.push_str(&truncate_visible(l, width));
            out.push('\n');
        }
        self.drawn = lines.len();
    }

    fn draw(&mut self, lines: Vec<String>) {
        let mut out = String::new();
        self.erase(&mut out);
        self.render(&mut out, &lines);
        self.last = lines;
        print!("{out}");
        let _ = io::stdout().flush();
    }

    /// Leave the last panel on screen and the cursor visible.
    fn finish(&mut self) {
        if self.panel {
            // Not print!: this also runs while unwinding.
            let mut out = io::stdout();
            let _ = out.write_all(b"\x1b[?25h");
            let _ = out.flush();
            self.panel = false;
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        self.finish();
    }
}

fn term_width() -> usize {
    // SAFETY: TIOCGWINSZ fills a winsize; a zeroed one is a valid out-parameter.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: as above, on stdout's descriptor.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    if rc == 0 && ws.ws_col > 0 {
        ws.ws_col as usize
    } else {
        100
    }
}

/// At most `width` visible characters of `s` (ANSI sequences do not count).
fn truncate_visible(s: &str, width: usize) -> String {
    let mut out = String::new();
    let mut visible = 0;
    let mut chars = s.chars().peekable();
    let mut cut = false;
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            out.push(c);
            for c in chars.by_ref() {
                out.push(c);
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        if visible == width {
            cut = true;
            break;
        }
        out.push(c);
        visible += 1;
    }
    if cut && out.contains('\x1b') {
        out.push_str("\x1b[0m");
    }
    out
}

// ---------------------------------------------------------------------------
// Summary and results

fn summarize(r: &Record, shape: &Shape, ramp_text: &str) -> String {
    let s = &r.report.summary;
    let m = &r.milestones;
    let mut out = String::new();
    let _ = writeln!(out, "summary ({}; ramp {ramp_text})", r.stop_reason);
    let _ = writeln!(
        out,
        "  requests       {} offered over {:.0} s, {} ok, {} failed: availability {:.3} %",
        s.offered,
        s.duration_s,
        s.ok,
        s.failed,
        100.0 * s.availability
    );
    for (kind, e) in &s.first_errors {
        let _ = writeln!(out, "    first {kind} failure: {e}");
    }
    let l = &s.latency;
    let _ = writeln!(
        out,
        "  latency        p50 {} ms, p99 {} ms, max {} ms",
        fmt_ms(l.p50_ms),
        fmt_ms(l.p99_ms),
        fmt_ms(l.max_ms)
    );
    let max_ready = r.samples.iter().map(|s| s.ready).max().unwrap_or(0);
    let initial: Vec<&str> = r.initial.iter().map(String::as_str).collect();
    let _ = writeln!(
        out,
        "  instances      {}   (max {max_ready} ready at once; {} at the start)",
        instance_path(&r.samples),
        initial.join(", ")
    );
    match (shape.start, &m.first_new_answer) {
        (Some(start), Some((window, name))) => {
            // It answered in that second, and not before it was in the table.
            let ready = m.first_new_ready.as_ref().filter(|(_, n)| n == name).map(|(t, _)| *t);
            let at = ready.map_or(*window, |r| r.max(*window));
            let _ = writeln!(
                out,
                "  scale-up       reaction {:.1} s: the ramp started at +{start:.0} s, a new instance ({name}) first \
                 answered at +{at:.1} s",
                at - start
            );
            let mut steps = Vec::new();
            if let Some(d) = m.first_up_decision {
                steps.push(format!("decided at +{d:.1} s"));
            }
            if let Some((t, n)) = &m.first_new_started {
                steps.push(format!("{n} started at +{t:.1} s"));
            }
            if let Some((t, n)) = &m.first_new_ready {
                steps.push(format!("{n} ready by +{t:.1} s"));
            }
            if !steps.is_empty() {
                let _ = writeln!(out, "                 ({})", steps.join(", "));
            }
        }
        (Some(_), None) => {
            let _ =
                writeln!(out, "  scale-up       none: no new instance answered (the load stayed within the target?)");
        }
        (None, _) => {
            let _ = writeln!(out, "  scale-up       n/a: the ramp never rises");
        }
    }
    match (m.back_to_min, shape.drop) {
        (Some(t), Some(d)) => {
            let _ = writeln!(
                out,
                "  scale-in       back to {MIN_REPLICAS} instance at +{t:.0} s, {:.0} s after the load dropped at +{d:.0} s",
                t - d
            );
        }
        (Some(t), None) => {
            let _ = writeln!(out, "  scale-in       back to {MIN_REPLICAS} instance at +{t:.0} s");
        }
        (None, _) if max_ready > MIN_REPLICAS => {
            let _ = writeln!(out, "  scale-in       not back to {MIN_REPLICAS} instance when the load stopped");
        }
        (None, _) => {}
    }
    if !s.backends.is_empty() {
        let parts: Vec<String> = s
            .backends
            .iter()
            .map(|(n, c)| format!("{n} {c} ({:.0}%)", if s.ok == 0 { 0.0 } else { 100.0 * *c as f64 / s.ok as f64 }))
            .collect();
        let _ = writeln!(out, "  answered by    {}", parts.join(", "));
    }
    if s.delayed > 0 {
        let _ = writeln!(
            out,
            "  note           {} requests started over 10 ms late: the load generator was short of CPU",
            s.delayed
        );
    }
    out
}

/// Ready counts as they changed, e.g. "1 -> 2 -> 4 -> 2 -> 1".
fn instance_path(samples: &[Sample]) -> String {
    let mut steps: Vec<u32> = Vec::new();
    for s in samples {
        if steps.last() != Some(&s.ready) {
            steps.push(s.ready);
        }
    }
    if steps.len() > 14 {
        let tail = steps.split_off(steps.len() - 6);
        steps.truncate(7);
        let head: Vec<String> = steps.iter().map(u32::to_string).collect();
        let tail: Vec<String> = tail.iter().map(u32::to_string).collect();
        return format!("{} -> ... -> {}", head.join(" -> "), tail.join(" -> "));
    }
    steps.iter().map(u32::to_string).collect::<Vec<_>>().join(" -> ")
}

fn write_results(out: &ResultsDir, r: &Record, summary: &str, ramp_text: &str) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    let s = &r.report.summary;
    let max_ready = r.samples.iter().map(|s| s.ready).max().unwrap_or(0);
    let title = format!(
        "lb-demo: autoscaling {SERVICE} (process instances, target {CPU_TARGET:.0}% CPU)\nramp {ramp_text}: {} requests, \
         availability {:.3} %, instances {}, max {max_ready}",
        s.offered,
        100.0 * s.availability,
        instance_path(&r.samples)
    );
    let instances: Vec<(f64, u32)> = r.samples.iter().map(|s| (s.t, s.ready)).collect();
    let mut write = |name: &str, text: &str| -> anyhow::Result<()> {
        let path = out.path.join(name);
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        files.push(name.to_owned());
        Ok(())
    };
    write("demo.svg", &plot::render_svg_titled(&title, &r.report.series, &instances))?;
    write("summary.txt", summary)?;
    write("load.csv", &load::series_to_csv(&r.report.series))?;
    let mut csv = String::from("t,ready,starting,draining,desired\n");
    for s in &r.samples {
        let _ = writeln!(csv, "{:.2},{},{},{},{}", s.t, s.ready, s.starting, s.draining, s.desired);
    }
    write("instances.csv", &csv)?;
    if out.path.join("timeline.jsonl").is_file() {
        files.push("timeline.jsonl (the agent's decisions)".into());
    }
    Ok(files)
}

/// Where the results go. Created before the agent starts (the agent writes
/// its timeline there); kept at the end, unless nothing was written to it.
struct ResultsDir {
    path: PathBuf,
}

impl ResultsDir {
    fn create(explicit: Option<&Path>) -> anyhow::Result<ResultsDir> {
        let path = match explicit {
            Some(p) => p.to_owned(),
            None => {
                let parent = std::env::var_os("LB_DEMO_RESULTS")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| std::env::temp_dir().join("lb-demo"));
                let stamp = utc_stamp(SystemTime::now());
                let mut p = parent.join(&stamp);
                if p.exists() {
                    p = parent.join(format!("{stamp}-{}", std::process::id()));
                }
                p
            }
        };
        fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        let path = fs::canonicalize(&path).with_context(|| format!("resolve {}", path.display()))?;
        Ok(ResultsDir { path })
    }

    fn copy_in(&self, from: &Path, name: &str) {
        if from.is_file() {
            let _ = fs::copy(from, self.path.join(name));
        }
    }

    /// Remove the directory if nothing was written to it; after a failure,
    /// say what is kept there.
    fn finish(&self, ok: bool) {
        let mut names: Vec<String> = fs::read_dir(&self.path)
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        names.sort();
        if names.is_empty() {
            let _ = fs::remove_dir(&self.path);
        } else if !ok {
            println!("kept for a look: {} ({})", self.path.display(), names.join(", "));
        }
    }
}

/// `YYYYmmdd-HHMMSS` in UTC.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

// ===========================================================================
// The static demo (`--static`): fixed backends, one request at a time.

fn run_static(cli: &Cli) -> anyhow::Result<()> {
    require_root()?;
    install_signal_handlers()?;
    let bin = agent_bin();
    let names: Vec<String> = (1..=cli.backends).map(|i| format!("web-{i}")).collect();

    let topo = Topology::build(Options::with_backends(&names));
    let config = topo.write_config_all();
    println!("Built a throw-away network (removed again on exit):");
    print!("{}", topo.describe());
    println!("  config  {}", config.display());
    println!("  agent   {} run --config {} (in {})", bin.display(), config.display(), topo.lb.name());

    let mut agent = topo.start_agent();
    println!("  agent   pid {}, log {}", agent.pid(), agent.log_path().display());
    for (iface, mode) in agent.modes() {
        println!("  xdp     {iface}: {mode}");
    }
    println!("Edit the config while this runs: the agent applies changes on save.");
    println!();

    let result = drive_traffic(&topo, &names, cli);

    // Drop order: agent (SIGTERM, detach) before the namespaces.
    if let Some(status) = agent.try_exit_status() {
        eprintln!("lb-agent exited early ({status}); its log:\n{}", agent.log());
    }
    let status = agent.stop();
    drop(agent);
    drop(topo);
    println!("cleaned up (agent {}, namespaces and veths removed)", status.map_or("killed".into(), |s| s.to_string()));
    result
}

fn drive_traffic(topo: &Topology, names: &[String], cli: &Cli) -> anyhow::Result<()> {
    let vip = topo.vip_tcp();
    let interval = Duration::from_millis(cli.interval_ms);
    let count = cli.count;
    let names = names.to_vec();
    topo.client
        .run(move || -> anyhow::Result<()> {
            let mut counts: BTreeMap<String, u64> = names.iter().map(|n| (n.clone(), 0)).collect();
            let mut failures = 0u64;
            let mut n = 0u64;
            while !stopped() && count.is_none_or(|c| n < c) {
                n += 1;
                let started = Instant::now();
                match tcp_request(vip) {
                    Ok((backend, local)) => {
                        println!("#{n:<4} {local} -> VIP {vip} -> answered by {backend}  ({:.1} ms)", ms(started));
                        *counts.entry(backend).or_insert(0) += 1;
                    }
                    Err(e) => {
                        failures += 1;
                        println!("#{n:<4} {STATIC_VIP}:{} -> FAILED: {e}", vip.port());
                    }
                }
                if n.is_multiple_of(10) {
                    print_table(&counts, failures);
                }
                sleep_unless_stopped(interval);
            }
            if !n.is_multiple_of(10) {
                print_table(&counts, failures);
            }
            if failures > 0 {
                bail!("{failures} of {n} requests failed");
            }
            Ok(())
        })
        .context("traffic from the client namespace")
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn sleep_unless_stopped(total: Duration) {
    let deadline = Instant::now() + total;
    while !stopped() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        thread::sleep(left.min(Duration::from_millis(50)));
    }
}

fn print_table(counts: &BTreeMap<String, u64>, failures: u64) {
    let total: u64 = counts.values().sum::<u64>() + failures;
    println!("  ---------------------------------");
    for (backend, c) in counts {
        let pct = if total == 0 { 0.0 } else { 100.0 * *c as f64 / total as f64 };
        println!("  {backend:<10} {c:>6}  {pct:5.1}%  {}", "#".repeat((pct / 5.0).round() as usize));
    }
    if failures > 0 {
        println!("  {:<10} {failures:>6}", "failed");
    }
    println!("  ---------------------------------");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_ramp_has_its_shape() {
        let ramp = Ramp::parse(DEFAULT_RAMP).unwrap();
        let s = Shape::of(&ramp);
        assert_eq!(s.start, Some(10.0));
        assert_eq!(s.peak, 140.0);
        assert_eq!(s.drop, Some(55.0));
        assert_eq!(s.end, 56.0);
        assert!(s.phase(&ramp, 5.0).starts_with("warm-up"));
        assert!(s.phase(&ramp, 15.0).starts_with("ramping up"));
        assert!(s.phase(&ramp, 40.0).starts_with("holding 140"));
        assert!(s.phase(&ramp, 60.0).starts_with("tail at 10"));
    }

    #[test]
    fn stamps_are_utc_civil_time() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(utc_stamp(t), "20231114-221320");
        assert_eq!(utc_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)), "20000229-000000");
    }

    #[test]
    fn instance_paths_collapse_repeats() {
        let s = |ready| Sample { ready, ..Sample::default() };
        assert_eq!(instance_path(&[s(1), s(1), s(2), s(4), s(4), s(2), s(1)]), "1 -> 2 -> 4 -> 2 -> 1");
    }

    #[test]
    fn truncation_skips_escapes() {
        assert_eq!(truncate_visible("\x1b[32mabcdef\x1b[0m", 3), "\x1b[32mabc\x1b[0m");
        assert_eq!(truncate_visible("abc", 5), "abc");
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
