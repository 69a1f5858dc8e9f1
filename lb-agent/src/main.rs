//! lb-agent: the XDP load balancer's daemon and command line.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Parser, Subcommand};
use lb_agent::{
    adapters::{
        dataplane::{
            pins::{prepare_pin_dir, remove_pinned_dir},
            AyaDataplane,
        },
        lock::AgentLock,
        orchestrator::HostOrchestrators,
        probe::NetProber,
    },
    agent::{Agent, Options, Ports},
    config::Config,
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
    /// Stop the running agent for good: detach and remove pinned state. With
    /// no agent running, removes what a killed agent left pinned.
    Stop {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        api_socket: PathBuf,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Validate a config file and print what it describes; changes nothing.
    ///
    /// Runs every check `run` makes before it attaches anything: the file's
    /// own rules, then this host's facts (the interfaces exist, each
    /// backend's route leaves through one of its service's interfaces, the
    /// VIP and reply paths work). Scaling policies are printed in words.
    /// Exits 0 when `run` would take the config (warnings allowed), 1 when
    /// it would refuse it; every error and warning names its place.
    #[command(
        after_help = "Examples:\n  lb-agent check lb.toml\n  lb-agent check --file-only examples/web.toml   # in CI, or for another host"
    )]
    Check {
        /// The config file (or give it with --config).
        #[arg(value_name = "CONFIG", required_unless_present = "config", conflicts_with = "config")]
        file: Option<PathBuf>,
        /// The config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Check the file alone, not this host's interfaces, routes and
        /// addresses: for a config meant for another machine, or CI.
        #[arg(long)]
        file_only: bool,
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
    /// Add a backend; it takes new flows at once. Refused: a loopback
    /// address, and one the host routes out of an interface the service
    /// does not list (the data plane could not reach it).
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
        Command::Stop { api_socket, pin_dir } => stop(api_socket, pin_dir),
        Command::Check { file, config, file_only } => check(file.or(config).unwrap_or_default(), file_only),
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
    api::prepare_socket_dir(&options.api_socket)?;
    if let Some(dir) = &options.pin_dir {
        prepare_pin_dir(dir)?;
    }
    let _lock = AgentLock::acquire(&options.api_socket, options.pin_dir.as_deref())?;
    runtime()?.block_on(async {
        // A bad config stops here, before anything is loaded.
        let config = Config::load(&options.config)?;
        let dataplane = AyaDataplane::load(options.pin_dir.as_deref(), &config.dataplane)?;
        let orchestrators = HostOrchestrators { agent: options.identity() };
        let ports = Ports { dataplane, orchestrators, prober: NetProber };
        Agent::start(options, config, ports).await?.run().await?;
        Ok(ExitCode::SUCCESS)
    })
}

fn stop(socket: PathBuf, pin_dir: PathBuf) -> anyhow::Result<ExitCode> {
    match runtime()?.block_on(api::call(&socket, &Request::Stop)) {
        Ok(r) if r.ok => {
            println!("{}", r.message.unwrap_or_default());
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

fn check(path: PathBuf, file_only: bool) -> anyhow::Result<ExitCode> {
    let report = lb_agent::check::check(&path, file_only)?;
    print!("{}", report.text);
    Ok(if report.refused { ExitCode::FAILURE } else { ExitCode::SUCCESS })
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
