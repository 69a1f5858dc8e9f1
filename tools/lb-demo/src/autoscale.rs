//! The autoscaling demo: the run from start to end.

use std::{
    collections::BTreeSet,
    fs::{self},
    io::{self, IsTerminal as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use lb_agent::status::{ScalingStatus, Snapshot};
use lb_lab::{agent::try_agent_bin, bins::try_built_bin};
use lb_load::{stop::stopped, Ramp};

use crate::{
    agent::read_status,
    cli::{kind_name, Cli},
    install_signal_handlers,
    instances::InstancePlan,
    lab::Lab,
    monitor::run_load,
    require_root,
    results::{summarize, write_results, ResultsDir},
    shape::Shape,
    view::View,
};

/// The service address: the load balancer host's own address on the
/// clients' side (the host-address deployment, as HAProxy's `bind *:80`),
/// which clients reach with no route of their own.
pub(crate) const VIP: Ipv4Addr = LB_ADDR;
pub(crate) const VIP_PORT: u16 = 80;
pub(crate) const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 220, 0, 1);
pub(crate) const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 220, 0, 2);
/// The LB's client-facing interface (in the LB namespace).
pub(crate) const LB_IFACE: &str = "lbc";
/// Its peer in the client namespace.
pub(crate) const CLIENT_IFACE: &str = "to-lb";
pub(crate) const SERVICE: &str = "web";
pub(crate) const INSTANCE_PORT: u16 = 8080;
/// lb-agent's default instance subnet (`prefix`), inside the LB namespace.
pub(crate) const INSTANCE_NET: &str = "10.212.0.0/24";
pub(crate) const DEFAULT_RAMP: &str = "0s:20,10s:20,25s:140,55s:140,56s:10";
pub(crate) const QUICK_RAMP: &str = "0s:20,3s:20,13s:100,25s:100,26s:10";
pub(crate) const MIN_REPLICAS: u32 = 1;
pub(crate) const MAX_REPLICAS: u32 = 4;
pub(crate) const CPU_TARGET: f64 = 50.0;
/// How often the agent's status is read.
pub(crate) const STATUS_EVERY: Duration = Duration::from_millis(500);
/// How long the instances must stay at the minimum before the load stops.
pub(crate) const SETTLE: f64 = 3.0;

pub(crate) fn run_autoscale(cli: &Cli) -> anyhow::Result<()> {
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
    let agent = try_agent_bin()?;
    let backend = backend_bin(cli)?;
    let plan = InstancePlan::new(kind, &backend);
    let view =
        View::new(!cli.plain && io::stdout().is_terminal() && std::env::var_os("TERM").is_none_or(|t| t != "dumb"));

    let mut lab = Lab::new(plan)?;
    let out = ResultsDir::create(cli.out.as_deref())?;
    let result = demo(&mut lab, &out, &ramp_text, &ramp, &shape, scale_in_timeout, cli.quick, &agent, view);
    // The run's own records go into the results before the scratch directory goes.
    out.copy_in(&lab.scratch().log_path(), "agent.log");
    out.copy_in(&lab.scratch().config_path(), "lb.toml");
    let notes = lab.cleanup();
    println!("cleaned up: {}", notes.join("; "));
    out.finish(result.is_ok());
    result
}

/// The instances' program, absolute (their command line names it, whatever
/// the cwd).
pub(crate) fn backend_bin(cli: &Cli) -> anyhow::Result<PathBuf> {
    let backend = match &cli.backend_bin {
        Some(p) => p.clone(),
        None => try_built_bin("lb-backend", "LB_BACKEND_BIN")?,
    };
    fs::canonicalize(&backend).with_context(|| format!("resolve {}", backend.display()))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn demo(
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
    lab.start_agent()?;
    let a = lab.agent.as_ref().expect("just started");
    println!(
        "  agent    {} (pid {}, in {}), log {}",
        agent_bin.display(),
        a.pid(),
        lab.lb_ns.as_deref().unwrap_or("the host's namespace"),
        a.log_path().display()
    );
    println!("           control socket {}", a.args().api_socket.display());
    // Paths that work from the user's shell: the socket is a file (any
    // network namespace reaches it), the metrics are on the host's loopback.
    println!("  look     sudo {} status --api-socket {}", agent_bin.display(), a.args().api_socket.display());
    if let Some(m) = lab.metrics {
        println!("           curl -s http://{m}/metrics | grep ^lb_scaling");
    }

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
    let orchestrator = if lab.plan.docker() { "docker" } else { "process" };
    let files = write_results(out, &record, &summary, ramp_text, orchestrator)?;
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

pub(crate) fn scaling_of(s: &Snapshot) -> Option<&ScalingStatus> {
    s.scaling.iter().find(|sc| sc.service == SERVICE)
}

/// Wait for the agent to answer and its first instance to be ready, then
/// send one request through the VIP. `None` on Ctrl-C.
pub(crate) fn wait_first_instance(lab: &mut Lab) -> anyhow::Result<Option<String>> {
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
        if let Some(status) = agent.try_exit_status() {
            println!();
            bail!("lb-agent exited ({status}) while starting; the end of its log:\n{}", agent.log_tail(30));
        }
        if Instant::now() > deadline {
            println!();
            bail!("no instance was ready within 45 s; the end of the agent's log:\n{}", agent.log_tail(30));
        }
        if let Ok(snap) = read_status(agent) {
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
    let client = lab.client().context("the client namespace")?;
    let mut last_err = String::new();
    for _ in 0..50 {
        if stopped() {
            return Ok(None);
        }
        match client.try_run(|| http_get(SocketAddrV4::new(VIP, VIP_PORT)))? {
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
    bail!("{name} is ready but requests to {VIP}:{VIP_PORT} from {} fail: {last_err}", client.name())
}

/// One `GET /`: the body's first line (the backend's name) and the time taken.
pub(crate) fn http_get(addr: SocketAddrV4) -> io::Result<(String, f64)> {
    let started = Instant::now();
    let body = lb_lab::http::get_ok(addr, "/", Duration::from_secs(3))?;
    Ok((body.lines().next().unwrap_or("").trim().to_owned(), started.elapsed().as_secs_f64()))
}
