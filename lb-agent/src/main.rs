//! lb-agent: the XDP load balancer's daemon and command line.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_agent::{agent::Agent, config::Config};
use tracing_subscriber::EnvFilter;

/// An XDP layer-4 load balancer: the kernel forwards, this agent keeps the
/// kernel's maps in step with your config.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the XDP program, apply the config, follow its changes.
    ///
    /// The config is re-read on SIGHUP and whenever the file changes; a bad
    /// config is refused whole and the running one stays. SIGINT or SIGTERM
    /// detaches the program and releases its maps. Needs root (CAP_BPF,
    /// CAP_NET_ADMIN).
    Run {
        /// TOML config naming services (VIP, port, protocol, interfaces) and backends.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print what it describes; changes nothing.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => check(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: PathBuf) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let agent = Agent::start(&config)?;
        agent.run().await
    })
}

fn check(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    println!("{}: ok, {} service(s)", path.display(), config.services.len());
    for s in &config.services {
        println!(
            "  {:<16} {}:{}/{} on {} -> {} backend(s)",
            s.name,
            s.vip,
            s.port,
            s.protocol,
            s.interfaces.join(","),
            s.backends.len()
        );
        for b in &s.backends {
            println!("    {:<24} weight {}", b.address, b.weight);
        }
    }
    Ok(())
}
