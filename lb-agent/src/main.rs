//! lb-agent: the XDP load balancer's daemon and command line.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use lb_agent::{
    adapters::{
        dataplane::{pins::remove_pinned_dir, AyaDataplane},
        host_dirs::MadeDirs,
        lock::{socket_holder, wait_until_gone, AgentLock},
        orchestrator::HostOrchestrators,
        probe::NetProber,
    },
    agent::{Agent, Options, Ports},
    config::{Config, Protocol},
    core::backend_setup::Decap,
    serve::api::{self, Request, DEFAULT_SOCKET},
    status::{human_duration, watch_frame},
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
        /// The running agent's control socket (`run --api-socket`).
        #[arg(long, default_value = DEFAULT_SOCKET)]
        api_socket: PathBuf,
        /// bpffs directory the agent pinned to (`run --pin-dir`); cleaned up
        /// when no agent answers.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// How long to wait for the agent to exit (it stops its instances
        /// first), e.g. 30s or 2m; past it, stop fails and says so.
        #[arg(long, default_value = "60s", value_parser = lb_agent::config::duration::parse)]
        timeout: std::time::Duration,
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
        after_help = "Examples:\n  lb-agent check lb.toml\n  lb-agent check --file-only examples/static-backends.toml   # in CI, or for another host"
    )]
    Check {
        /// The TOML config to check (see docs/config.md for every key).
        #[arg(value_name = "CONFIG", required_unless_present = "config", conflicts_with = "config")]
        file: Option<PathBuf>,
        /// The same file, given as an option.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Check the file alone, not this host's interfaces, routes and
        /// addresses: for a config meant for another machine, or CI.
        #[arg(long)]
        file_only: bool,
    },
    /// Show services, backends, scaling, traffic and recent events of the
    /// running agent.
    ///
    /// The scaling block reads like `kubectl get hpa`: per scaled service the
    /// metric each rule acts on as current/target (`cpu 41%/50%`), min, max,
    /// desired and ready instances, and who decides (the policy, or a pin or
    /// pause by `lb-agent scale`); then its instances and recent decisions,
    /// a run of equal no-op decisions shown once (`2 -> 2 x14`).
    Status {
        /// Print JSON (the same data, metric values and targets as numbers)
        /// for scripts; with --watch, one JSON document per line.
        #[arg(long)]
        json: bool,
        /// Refresh every --interval until Ctrl-C: redrawn in place on a
        /// terminal, one snapshot after another (under `---`) otherwise. If
        /// the agent goes away the watch says so and keeps asking, so it
        /// picks up a restarted agent by itself.
        #[arg(long)]
        watch: bool,
        /// How often --watch refreshes, e.g. "2s" or "500ms".
        #[arg(long, default_value = "2s", value_parser = lb_agent::config::duration::parse, requires = "watch")]
        interval: Duration,
        /// The running agent's control socket (`run --api-socket`).
        #[arg(long, default_value = DEFAULT_SOCKET)]
        api_socket: PathBuf,
    },
    /// A full-screen live view of the running agent, like top.
    ///
    /// Services (VIP, mode, packets and new flows per second, usable
    /// backends), the instances of scaled services with their CPU and
    /// requests per second, each scaled service's metric against its target
    /// over the last 5 minutes, and the latest scaling decisions with their
    /// reasons. q, Esc or Ctrl-C quits. Needs a terminal (it works over
    /// SSH; no mouse); for a pipe or a script use `status --watch` or
    /// `status --json`. An agent that stops answering is said so on the top
    /// line, and picked up again when it is back.
    Top {
        /// How often to refresh, e.g. "1s" or "500ms".
        #[arg(long, default_value = "1s", value_parser = lb_agent::config::duration::parse)]
        interval: Duration,
        /// The running agent's control socket (`run --api-socket`).
        #[arg(long, default_value = DEFAULT_SOCKET)]
        api_socket: PathBuf,
    },
    /// Pin, pause or resume a scaled service's instance count at run time.
    ///
    /// `--replicas N` holds the count at N: the policy stops deciding and the
    /// orchestrator starts or drains instances to reach N. N must lie within
    /// the config's min_replicas ..= max_replicas (change those in the config
    /// to go beyond). `--pause` holds the count where it is; `--resume`
    /// hands it back to the policy. Crashed instances are still replaced
    /// while held. A hold shows in `status` and is recorded in the events
    /// and the scaling timeline (rule "pinned" or "paused"); it survives
    /// config reloads, but not an agent restart: a new agent scales by policy.
    #[command(group(clap::ArgGroup::new("action").required(true).args(["replicas", "pause", "resume"])))]
    Scale {
        /// The scaled service, as named in the config.
        service: String,
        /// Hold the service at this many instances.
        #[arg(long)]
        replicas: Option<u32>,
        /// Hold the service at its current count.
        #[arg(long)]
        pause: bool,
        /// Let the scaling policy decide again.
        #[arg(long)]
        resume: bool,
        /// The running agent's control socket (`run --api-socket`).
        #[arg(long, default_value = DEFAULT_SOCKET)]
        api_socket: PathBuf,
    },
    /// Change a running agent's backends at run time.
    ///
    /// A change is an overlay on the config file: it takes effect at once and
    /// every reload (a file edit, SIGHUP, `lb-agent reload`) keeps it, until
    /// `lb-agent backend reset` drops it. A change the file comes to agree
    /// with (the same weight; a removed backend the file no longer lists) is
    /// dropped as redundant, a weight change to a backend the file drops goes
    /// with it, and a service the file drops takes its changes with it. The overlay lives in the agent's memory: a restarted agent
    /// starts from the file. `lb-agent status` marks overlaid backends and
    /// `lb-agent config dump` prints the file with them.
    Backend {
        #[command(subcommand)]
        change: BackendChange,
        /// The running agent's control socket (`run --api-socket`).
        #[arg(long, default_value = DEFAULT_SOCKET, global = true)]
        api_socket: PathBuf,
    },
    /// Ask the running agent to re-read its config file now.
    ///
    /// The reply (like the log and `status`'s events, whatever the trigger)
    /// says what changed per service: backends added, removed (draining) and
    /// reweighted, and the Maglev slots that moved (the share of new flows
    /// that go elsewhere). Run-time changes from `lb-agent backend` are kept
    /// and counted ("2 run-time change(s) kept").
    Reload {
        /// The running agent's control socket (`run --api-socket`).
        #[arg(long, default_value = DEFAULT_SOCKET)]
        api_socket: PathBuf,
    },
    /// Say which backend a client's flow goes to, and why.
    ///
    /// A flow in the connection table goes to the backend its entry holds
    /// (shown with its state and when it last saw a packet); a new one to the
    /// backend the service's Maglev table names for its hash (shown: the
    /// hash, the slot, the live table half and the backends and weights that
    /// built it). Also says where the flow would go if that backend left.
    /// Every load balancer node with the same config makes the same Maglev
    /// pick. Example: `lb-agent explain 10.0.9.2:40000 --service web`, or
    /// for an IPv6 service `lb-agent explain [2001:db8::5]:40000 --service web6`.
    Explain {
        /// The client's address and source port, e.g. 10.0.9.2:40000 or
        /// [2001:db8::5]:40000 (of the service's family).
        client: SocketAddr,
        /// The service, by its name in the config.
        #[arg(long)]
        service: String,
        /// The flow's protocol; refused unless it is the service's.
        #[arg(long, value_parser = ["tcp", "udp"])]
        protocol: Option<String>,
        /// The VIP; refused unless it is the service's.
        #[arg(long)]
        vip: Option<std::net::IpAddr>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        /// The running agent's control socket (`run --api-socket`).
        #[arg(long, default_value = DEFAULT_SOCKET)]
        api_socket: PathBuf,
    },
    /// The running agent's effective config.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Run on a backend host of a `mode = "dsr-ipip"` service: take its
    /// load balancer's IP-in-IP packets and answer clients from the VIP.
    ///
    /// Creates the ipip device --dev in external mode (it takes IP-in-IP
    /// packets from any load balancer), up; puts each --vip on it as a /32;
    /// sets rp_filter=0 on it and on "all" (the inner source is a client
    /// routed elsewhere) and arp_ignore=1, arp_announce=2 on "all" (the host
    /// never answers ARP for a VIP). Prints each change; a second run
    /// changes nothing. --undo takes the VIPs off and deletes the device
    /// once nothing else is on it (the sysctls stay). Needs root.
    ///
    /// IPv6 VIPs (one family per run): an ip6tnl device in mode ip6ip6,
    /// external, the VIPs as /128s, no sysctl (IPv6 has no rp_filter, and
    /// neighbour discovery never answers for the VIP); --bpf-decap strips
    /// IPv6-in-IPv6 too.
    #[command(
        name = "backend-setup",
        after_help = "Examples:\n  lb-agent backend-setup --vip 10.0.0.10\n  lb-agent backend-setup --vip 10.0.0.10 --vip 10.0.0.11 --dev lbtun0\n  lb-agent backend-setup --vip 10.0.0.10 --undo\n  lb-agent backend-setup --vip 10.0.0.10 --bpf-decap eth0   # a kernel without ipip\n  lb-agent backend-setup --vip 2001:db8::10 --dev lbtun6   # IPv6: ip6tnl, ip6ip6"
    )]
    BackendSetup {
        /// A VIP of a dsr-ipip service this host is a backend of (repeat for several).
        #[arg(long = "vip", required = true, value_name = "ADDRESS")]
        vips: Vec<std::net::IpAddr>,
        /// The ipip device to create (not tunl0, the kernel's own).
        #[arg(long, default_value = "lbtun0")]
        dev: String,
        /// On a kernel without IP-in-IP devices (CONFIG_NET_IPIP unset):
        /// attach lb-agent's tc program `tc_decap` at this interface's
        /// ingress (where the load balancer's packets arrive) instead of
        /// making --dev, and put the VIPs on lo.
        #[arg(long, value_name = "IFACE", conflicts_with = "dev")]
        bpf_decap: Option<String>,
        /// Remove what a set-up with the same --vip and --dev made.
        #[arg(long)]
        undo: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective config: the file the agent last applied, with the
    /// run-time changes of `lb-agent backend` edited in, each changed line
    /// commented (`# run-time: weight 3, file says 1`). The output is a
    /// config `lb-agent check` accepts: save it over the file to make the
    /// changes permanent (they are then dropped as redundant).
    Dump {
        /// The running agent's control socket.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        api_socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum BackendChange {
    /// Add a backend; it takes new flows at once. Refused when the data
    /// plane could not reach it: a loopback address, an address of this
    /// host, one with no route, or one the host routes out of an interface
    /// the service does not list.
    Add {
        /// The service's `name` in the config.
        service: String,
        /// The backend's IPv4 address and port, e.g. 10.0.1.4:8080.
        address: SocketAddr,
        /// Its share of new flows, relative to the other backends' weights.
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Drain a backend: no new flows; open ones go on until they close or
    /// the service's drain_timeout passes.
    Remove {
        /// The service's `name` in the config.
        service: String,
        /// The backend's IPv4 address and port, as listed by `status`.
        address: SocketAddr,
    },
    /// Change a backend's weight (0 takes it out of the table without draining it away).
    Weight {
        /// The service's `name` in the config.
        service: String,
        /// The backend's IPv4 address and port, as listed by `status`.
        address: SocketAddr,
        /// The new weight: its share of new flows, relative to the others'.
        weight: u32,
    },
    /// Drop the run-time changes of a service (or of one of its backends):
    /// what the config file says applies again, at once.
    Reset {
        /// The service, by its name in the config.
        service: String,
        /// Only this backend's change (ip:port); without it, all the service's.
        address: Option<SocketAddr>,
    },
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
        Command::Check { file, config, file_only } => check(file.or(config).unwrap_or_default(), file_only),
        Command::Status { json, watch, interval, api_socket } => status(api_socket, json, watch.then_some(interval)),
        Command::Top { interval, api_socket } => {
            lb_agent::top::run(&api_socket, interval.max(Duration::from_millis(100))).map(|()| ExitCode::SUCCESS)
        }
        Command::Scale { service, replicas, pause, resume: _, api_socket } => {
            let request = match (replicas, pause) {
                (Some(replicas), _) => Request::PinReplicas { service, replicas },
                (None, true) => Request::PauseScaling { service },
                (None, false) => Request::ResumeScaling { service },
            };
            call_and_print(api_socket, request)
        }
        Command::Backend { change, api_socket } => backend(api_socket, change),
        Command::Reload { api_socket } => call_and_print(api_socket, Request::Reload),
        Command::Explain { client, service, protocol, vip, json, api_socket } => {
            let protocol = protocol.map(|p| if p == "udp" { Protocol::Udp } else { Protocol::Tcp });
            explain(api_socket, Request::Explain { service, client, protocol, vip }, json)
        }
        Command::BackendSetup { vips, dev, bpf_decap, undo } => {
            let decap = bpf_decap.as_deref().map_or(Decap::Device(&dev), Decap::Bpf);
            lb_agent::adapters::backend_setup::run(decap, &vips, undo).map(|_| ExitCode::SUCCESS)
        }
        Command::Config { command: ConfigCommand::Dump { api_socket } } => {
            call_and_print(api_socket, Request::DumpConfig)
        }
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

fn check(path: PathBuf, file_only: bool) -> anyhow::Result<ExitCode> {
    let report = lb_agent::check::check(&path, file_only)?;
    print!("{}", report.text);
    Ok(if report.refused { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn status(socket: PathBuf, json: bool, watch: Option<Duration>) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    match watch {
        None => {
            let snapshot = rt.block_on(api::status(&socket))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print!("{}", snapshot.render_table());
            }
        }
        Some(interval) => rt.block_on(watch_status(&socket, json, interval))?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `status --watch`: a frame every `interval` until Ctrl-C. An agent that
/// does not answer is said so in the frame (on stderr with --json), and
/// asked again at the next one.
async fn watch_status(socket: &Path, json: bool, interval: Duration) -> anyhow::Result<()> {
    use std::io::{IsTerminal as _, Write as _};
    let terminal = std::io::stdout().is_terminal();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let fetched = tokio::select! {
            _ = &mut ctrl_c => break,
            r = api::status(socket) => r,
        };
        let frame = match (fetched, json) {
            (Ok(s), true) => format!("{}\n", serde_json::to_string(&s)?),
            (Ok(s), false) => watch_frame(&s.render_table(), terminal, interval),
            (Err(e), true) => {
                eprintln!("lb-agent: {e:#}; asking again in {}", human_duration(interval.as_secs_f64()));
                String::new()
            }
            (Err(e), false) => {
                let body = format!("lb-agent: {e:#}; asking again in {}\n", human_duration(interval.as_secs_f64()));
                watch_frame(&body, terminal, interval)
            }
        };
        let mut out = std::io::stdout().lock();
        // A closed pipe (`| head`) ends the watch.
        if out.write_all(frame.as_bytes()).and_then(|()| out.flush()).is_err() {
            break;
        }
        drop(out);
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    Ok(())
}

fn backend(socket: PathBuf, change: BackendChange) -> anyhow::Result<ExitCode> {
    let request = match change {
        BackendChange::Add { service, address, weight } => Request::AddBackend { service, address, weight },
        BackendChange::Remove { service, address } => Request::RemoveBackend { service, address },
        BackendChange::Weight { service, address, weight } => Request::SetWeight { service, address, weight },
        BackendChange::Reset { service, address } => Request::ResetBackends { service, address },
    };
    call_and_print(socket, request)
}

fn explain(socket: PathBuf, request: Request, json: bool) -> anyhow::Result<ExitCode> {
    let response = runtime()?.block_on(api::call(&socket, &request))?;
    match response.explain {
        Some(e) if json => println!("{}", serde_json::to_string_pretty(&e)?),
        Some(e) => print!("{}", e.render()),
        None => {
            eprintln!("lb-agent: refused: {}", response.error.unwrap_or_default());
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// Every subcommand and argument says what it is for in `--help`, so a
    /// new one cannot slip in without.
    #[test]
    fn every_command_and_argument_has_help() {
        lb_agent::cli_help::assert_documented(&Cli::command());
    }
}
