//! lb-load: an open-loop HTTP/1.1 load generator (or closed loop with
//! `--concurrency`) that reports every second what was offered, what
//! succeeded, what failed and why, latency, and which backends answered.
//! The library part, with the exactness rules, is this crate's lib.
//!
//! ```text
//! lb-load --target 127.0.0.1:8080 --rate 100 --duration 30s
//! lb-load --target 10.200.255.1:80 --ramp "0s:10,20s:200,40s:200,60s:10" \
//!         --netns lbt-123-0-client --json run.json --svg run.svg
//! lb-load --target 127.0.0.1:8080 --concurrency 20 --duration 10s --keep-alive
//! ```

use std::{fs, io::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context as _};
use clap::{ArgGroup, Parser};
use lb_load::{self as load, plot, stop, LoadConfig, Mode, Ramp};

/// Send HTTP/1.1 GETs at a fixed rate (open loop: a slow server shows up as
/// latency and failures, not as a lower rate) or from a fixed number of
/// clients, and report each second.
#[derive(Parser, Debug)]
#[command(name = "lb-load")]
#[command(group(ArgGroup::new("pace").required(true).args(["rate", "ramp", "concurrency"])))]
struct Cli {
    /// Where to send requests: IP:PORT (no name lookups).
    #[arg(long)]
    target: SocketAddr,
    /// Requests per second, constant (open loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Requests per second over time, straight lines between TIME:RATE
    /// points, e.g. "0s:10,20s:200,40s:200,60s:10" (open loop).
    #[arg(long)]
    ramp: Option<String>,
    /// Clients, each sending its next request when the last one ended
    /// (closed loop).
    #[arg(long)]
    concurrency: Option<usize>,
    /// How long to send requests, e.g. 30s, 500ms, 2m [default: the ramp's
    /// last point, else 30s].
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Per request, from its scheduled time: connect, send and receive.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,
    /// Reuse connections (one per worker) instead of one per request.
    #[arg(long)]
    keep_alive: bool,
    /// Run the workers inside this named network namespace (a plain name,
    /// as `ip netns list` shows it).
    #[arg(long)]
    netns: Option<String>,
    /// Most worker threads in open loop (started as needed).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=20_000))]
    workers: u64,
    /// Request path, e.g. "/" or "/?work_ms=20".
    #[arg(long, default_value = "/")]
    path: String,
    /// Write the per-second series and the summary as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the per-second series as CSV.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Draw the run as an SVG chart (900x500).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Print only the summary, not a line per second.
    #[arg(long)]
    quiet: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    load::parse_duration(s).map_err(|e| e.to_string())
}

/// Each worker holds a socket: lift the soft open-files limit to the hard
/// one (no privilege needed), capped, so a large pool does not hit EMFILE.
fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit read and write only the struct we pass.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(65_536);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                eprintln!("lb-load: warning: cannot raise the open-files limit: {}", std::io::Error::last_os_error());
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-load: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (mode, pace, default_duration) = match (&cli.rate, &cli.ramp, cli.concurrency) {
        (Some(rate), None, None) => (Mode::Open(Ramp::constant(*rate)?), format!("{rate}/s"), 30.0),
        (None, Some(spec), None) => {
            let ramp = Ramp::parse(spec)?;
            let end = ramp.end();
            (Mode::Open(ramp), format!("ramp {spec}"), if end > 0.0 { end } else { 30.0 })
        }
        (None, None, Some(c)) => (Mode::Closed { concurrency: c }, format!("{c} clients (closed loop)"), 30.0),
        _ => bail!("give exactly one of --rate, --ramp and --concurrency"),
    };
    let duration = cli.duration.unwrap_or(Duration::from_secs_f64(default_duration));
    let mut cfg = LoadConfig::new(cli.target, mode, duration);
    cfg.timeout = cli.timeout;
    cfg.keep_alive = cli.keep_alive;
    cfg.netns = cli.netns.clone();
    cfg.max_workers = cli.workers as usize;
    cfg.path = cli.path.clone();

    stop::stop_on(&[libc::SIGINT, libc::SIGTERM])?;
    raise_nofile_limit();
    let connection = if cli.keep_alive { "keep-alive" } else { "new connection per request" };
    let netns = cli.netns.as_deref().map(|n| format!(", in netns {n}")).unwrap_or_default();
    let describe = format!(
        "{}{}, {pace}, {:.1} s, {connection}, timeout {:?}{netns}",
        cli.target,
        cli.path,
        duration.as_secs_f64(),
        cli.timeout,
    );
    println!("lb-load: {describe}");
    let mut rows = 0usize;
    let report = load::run(&cfg, &stop::STOP, |p| {
        if cli.quiet {
            return;
        }
        if rows.is_multiple_of(30) {
            println!("{}", load::format_header());
        }
        rows += 1;
        println!("{}", load::format_point(p));
        let _ = std::io::stdout().flush();
    })?;
    if stop::stopped() {
        println!("stopped early by a signal");
    }
    println!();
    print!("{}", load::format_summary(&report.summary));

    if let Some(path) = &cli.json {
        let doc = serde_json::json!({
            "target": cli.target.to_string(),
            "path": cli.path,
            "pace": pace,
            "duration_s": duration.as_secs_f64(),
            "timeout_s": cli.timeout.as_secs_f64(),
            "keep_alive": cli.keep_alive,
            "netns": cli.netns,
            "series": report.series,
            "summary": report.summary,
        });
        let text = serde_json::to_string_pretty(&doc).context("encode the report as JSON")?;
        fs::write(path, text + "\n").with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &cli.csv {
        fs::write(path, load::series_to_csv(&report.series)).with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &cli.svg {
        let title = format!(
            "lb-load {pace} to {}{}\n{connection}, timeout {:?}, {:.1} s{netns}",
            cli.target,
            cli.path,
            cli.timeout,
            duration.as_secs_f64()
        );
        let svg = plot::render_svg_titled(&title, &report.series, &[]);
        fs::write(path, svg).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}
