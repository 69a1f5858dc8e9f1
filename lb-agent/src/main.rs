//! lb-agent: the XDP load balancer's daemon and command line.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Parser, Subcommand};
use lb_agent::{
    adapters::{
        dataplane::{pins::remove_pinned_dir, AyaDataplane},
        host_dirs::MadeDirs,
        host_facts,
        lock::{socket_holder, wait_until_gone, AgentLock},
        orchestrator::HostOrchestrators,
        probe::NetProber,
    },
    agent::{Agent, Options, Ports},
    config::Config,
    core::deploy,
    serve::api::{self, Request, DEFAULT_SOCKET},
};

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb-agent";
use tracing_subscriber::EnvFilter;

/// An XDP layer-4 load balancer: the kernel forwards, this agent keeps the
/// kernel's maps in step with your config and reports what flows where.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the XDP program, apply the config, and serve.
    ///
    /// The config is re-read on SIGHUP and whenever the file changes; a bad
    /// config is refused whole and the running one stays. Backends can also
    /// be changed at run time with `lb-agent backend ...`. SIGINT or SIGTERM
    /// detaches the program and releases its maps. Needs root (CAP_BPF,
    /// CAP_NET_ADMIN).
    Run {
        /// TOML config naming services (VIP, port, protocol, interfaces) and backends.
        #[arg(long, short)]
        config: PathBuf,
        /// Control socket (root only) for `status` and `backend`.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        api_socket: PathBuf,
        /// Where to serve Prometheus metrics (`/metrics`); "off" to disable.
        #[arg(long, default_value = "127.0.0.1:9641", value_parser = parse_metrics_address)]
        metrics_address: MetricsAddress,
        /// bpffs directory for pinned maps and links (mounted if needed). A
        /// restarted agent adopts what it finds there: flows, tables and
        /// counters carry on, and traffic never stops.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Pin nothing: the data plane lives and dies with this process.
        #[arg(long, conflicts_with = "keep_on_exit")]
        no_pin: bool,
        /// On SIGINT/SIGTERM, leave the data plane running for the next agent
        /// (an upgrade or restart). Without it, exiting detaches and removes
        /// everything; a crash or SIGKILL always leaves it running.
        #[arg(long)]
        keep_on_exit: bool,
    },
    /// Stop the running agent for good: detach and remove pinned state, and
    /// wait until it has exited ("stopped (pid N) in 1.2s"). With no agent
    /// running, removes what a killed agent left pinned.
    Stop {
        /// The running agent's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        api_socket: PathBuf,
        /// Its pin directory (what to remove when no agent answers).
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// How long to wait for the agent to exit (it stops its instances
        /// first), e.g. 30s or 2m; past it, stop fails and says so.
        #[arg(long, default_value = "60s", value_parser = lb_agent::config::duration::parse)]
        timeout: std::time::Duration,
    },
    /// Validate a config file and print what it describes; changes nothing.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show services, backends, traffic and recent events of the running agent.
    Status {
        /// Print JSON (the same data) for scripts.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        api_socket: PathBuf,
    },
    /// Change a running agent's backends (lasts until the config is reloaded).
    Backend {
        #[command(subcommand)]
        change: BackendChange,
        #[arg(long, default_value = DEFAULT_SOCKET, global = true)]
        api_socket: PathBuf,
    },
    /// Ask the running agent to re-read its config file now.
    Reload {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        api_socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum BackendChange {
    /// Add a backend; it takes new flows at once.
    Add {
        service: String,
        address: SocketAddrV4,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Drain a backend: no new flows; open ones go on until they close or
    /// the service's drain_timeout passes.
    Remove { service: String, address: SocketAddrV4 },
    /// Change a backend's weight (0 takes it out of the table without draining it away).
    Weight { service: String, address: SocketAddrV4, weight: u32 },
}

#[derive(Clone, Copy, Debug)]
enum MetricsAddress {
    Off,
    On(SocketAddr),
}

fn parse_metrics_address(s: &str) -> Result<MetricsAddress, String> {
    if s == "off" {
        return Ok(MetricsAddress::Off);
    }
    s.parse().map(MetricsAddress::On).map_err(|_| format!("{s:?} is not an address like 127.0.0.1:9641, or \"off\""))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config, api_socket, metrics_address, pin_dir, no_pin, keep_on_exit } => {
            let metrics_address = match metrics_address {
                MetricsAddress::Off => None,
                MetricsAddress::On(a) => Some(a),
            };
            let pin_dir = (!no_pin).then_some(pin_dir);
            run(Options { config, api_socket, metrics_address, pin_dir, keep_on_exit })
        }
        Command::Stop { api_socket, pin_dir, timeout } => stop(api_socket, pin_dir, timeout),
        Command::Check { config } => check(config),
        Command::Status { json, api_socket } => status(api_socket, json),
        Command::Backend { change, api_socket } => backend(api_socket, change),
        Command::Reload { api_socket } => call_and_print(api_socket, Request::Reload),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lb-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// The one place the agent meets the real world: the aya data plane,
/// Docker or process orchestrators, and probes over the network.
fn run(options: Options) -> anyhow::Result<ExitCode> {
    // Before anything else: one agent per control socket and pin directory
    // (the locks last as long as this process).
    let made = MadeDirs::prepare(&options.api_socket, options.pin_dir.as_deref())?;
    let lock = AgentLock::acquire(&options.api_socket, options.pin_dir.as_deref())?;
    let code = runtime()?.block_on(async {
        // A bad config stops here, before anything is loaded.
        let config = Config::load(&options.config)?;
        let dataplane = AyaDataplane::load(options.pin_dir.as_deref(), &config.dataplane)?;
        let orchestrators = HostOrchestrators { agent: options.identity() };
        let ports = Ports { dataplane, orchestrators, prober: NetProber };
        Agent::start(options, config, ports).await?.run().await?;
        anyhow::Ok(ExitCode::SUCCESS)
    })?;
    // A clean exit leaves nothing it made (a crash leaves all for the next).
    made.remove(lock);
    Ok(code)
}

fn stop(socket: PathBuf, pin_dir: PathBuf, timeout: std::time::Duration) -> anyhow::Result<ExitCode> {
    let pid = socket_holder(&socket);
    match runtime()?.block_on(api::call(&socket, &Request::Stop)) {
        Ok(r) if r.ok => {
            println!("{}", r.message.unwrap_or_default());
            let Some(pid) = pid else { return Ok(ExitCode::SUCCESS) };
            let every = std::time::Duration::from_millis(50);
            match wait_until_gone(|| socket_holder(&socket) == Some(pid), timeout, every) {
                Some(took) => println!("stopped (pid {pid}) in {:.1}s", took.as_secs_f64()),
                None => anyhow::bail!(
                    "the agent (pid {pid}) accepted the stop but is still running after {:.0}s (stopping its \
                     instances?); wait longer with --timeout, look at its log, or end it with `kill {pid}`",
                    timeout.as_secs_f64()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Ok(r) => anyhow::bail!("the agent refused: {}", r.error.unwrap_or_default()),
        Err(e) => {
            // No agent answers: clean up what a killed one left behind,
            // unless an agent still runs there (on another socket, or hung).
            let _lock = AgentLock::for_removal(&pin_dir)?;
            let removed = remove_pinned_dir(&pin_dir)?;
            println!("{e:#}; removed {removed} pinned object(s) under {}", pin_dir.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check(path: PathBuf) -> anyhow::Result<ExitCode> {
    let config = Config::load(&path)?;
    println!("{}: ok, {} service(s)", path.display(), config.services.len());
    for s in &config.services {
        let to = match (&s.scaling, s.instances.as_ref().and_then(|i| i.process.as_ref())) {
            (Some(p), Some(proc_)) => format!(
                "{}..={} instance(s) of {} (process, bridge {})",
                p.min_replicas, p.max_replicas, proc_.command[0], proc_.bridge
            ),
            _ => format!("{} backend(s)", s.backends.len()),
        };
        println!("  {:<16} {}:{}/{} on {} -> {to}", s.name, s.vip, s.port, s.protocol, s.interfaces.join(","));
        for b in &s.backends {
            println!("    {:<24} weight {}", b.address, b.weight);
        }
    }
    // What this host can serve of it (addresses, interfaces, hooks, fast path).
    let facts = host_facts::gather(&config)?;
    for (name, f) in &facts.interfaces {
        println!("  interface {name}: hook {} ({})", f.hook, f.hook_why);
    }
    match deploy::socket_lb_cgroup(&config, &facts) {
        Some(cgroup) => println!("  socket lb: clients on this host, in cgroup {}", cgroup.display()),
        None => println!("  socket lb: off"),
    }
    let findings = deploy::judge(&config, &facts);
    for f in &findings {
        println!("{f}");
    }
    if findings.iter().any(|f| f.severity == deploy::Severity::Refuse) {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn status(socket: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let response = runtime()?.block_on(api::call(&socket, &Request::Status))?;
    let Some(snapshot) = response.status else {
        anyhow::bail!("the agent answered without a status: {}", response.error.unwrap_or_default());
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
    } else {
        print!("{}", snapshot.render_table());
    }
    Ok(ExitCode::SUCCESS)
}

fn backend(socket: PathBuf, change: BackendChange) -> anyhow::Result<ExitCode> {
    let request = match change {
        BackendChange::Add { service, address, weight } => Request::AddBackend { service, address, weight },
        BackendChange::Remove { service, address } => Request::RemoveBackend { service, address },
        BackendChange::Weight { service, address, weight } => Request::SetWeight { service, address, weight },
    };
    call_and_print(socket, request)
}

fn call_and_print(socket: PathBuf, request: Request) -> anyhow::Result<ExitCode> {
    let response = runtime()?.block_on(api::call(&socket, &request))?;
    if response.ok {
        println!("{}", response.message.unwrap_or_else(|| "ok".into()));
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("lb-agent: refused: {}", response.error.unwrap_or_default());
        Ok(ExitCode::FAILURE)
    }
}
