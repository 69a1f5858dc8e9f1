//! lb-bench-e2e: this load balancer beside no balancer at all, HAProxy and
//! NGINX stream, in one run and one topology:
//!
//! ```text
//!  client ns (wrk) -> LB ns (lb-agent | haproxy | nginx stream | routing only) -> 3 backend ns (nginx)
//! ```
//!
//! Every mode gets the same load: wrk, `--connections` (50) split over three
//! processes (17, 17, 16), each with one thread, with keep-alive and with a
//! new connection per request. In the direct mode each process sends to its
//! own backend, so the three backends share the load as they do behind a
//! balancer, and the packets are routed through the LB namespace; otherwise
//! all three send to the balancer. Each process prints its exact latency
//! histogram, and the three merge without loss ([`wrk`]).
//!
//! Everything it makes (namespaces, processes, the scratch directory, its
//! cgroup) belongs to RAII guards, which also clean up on an error, a panic
//! or Ctrl-C (SIGINT/SIGTERM set a flag the bench checks; wrk, nginx,
//! haproxy and lb-agent share its process group, so they get the signal
//! too). Traffic stays inside the namespaces it creates.
//!
//! Run as root: `cargo xtask bench e2e [-- --duration 10s --runs 3 --json]`.

mod cpu;
mod proc;
mod report;
mod servers;
mod wrk;

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::Parser;
use lb_lab::{
    agent::Agent,
    root::is_root,
    topology::{self, Topology, LB_CLIENT_ADDR, NODE_IFACE, TCP_PORT},
};
use lb_load::stop::{stop_on, stopped};

use crate::{
    cpu::{Cgroup, Sample},
    proc::Proc,
    report::{compare_to_direct, render_table, Case, Meta, Mode, Report, Run},
    wrk::{Share, Style},
};

#[derive(Parser)]
#[command(about = "End-to-end bench: this LB beside direct, HAProxy and NGINX stream, with wrk (needs root)")]
struct Cli {
    /// How long each run sends, in whole seconds (e.g. 10s, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_whole_seconds)]
    duration: Duration,
    /// Runs per case; each figure is the median of the runs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Connections in all, split over the wrk processes.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(3..))]
    connections: u32,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_whole_seconds(s: &str) -> Result<Duration, String> {
    let d = lb_load::parse_duration(s).map_err(|e| e.to_string())?;
    if d.as_secs() == 0 || d.subsec_nanos() != 0 {
        return Err("wrk takes whole seconds, at least 1s".to_owned());
    }
    Ok(d)
}

const BACKENDS: [&str; 3] = ["web-1", "web-2", "web-3"];
/// One wrk process per backend (see the module comment).
const WRK_PROCESSES: u32 = BACKENDS.len() as u32;
/// Where HAProxy and NGINX stream listen: the LB's own address on the
/// client side, port 80 (the VIP is lb-agent's, and is on no interface).
const PROXY: SocketAddrV4 = SocketAddrV4::new(LB_CLIENT_ADDR, TCP_PORT);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(report) => {
            if cli.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("[bench] error: JSON: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", render_table(&report));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("[bench] error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<Report> {
    if !is_root() {
        bail!("lb-bench-e2e needs root: it creates network namespaces and attaches XDP (try `sudo cargo xtask bench e2e`)");
    }
    let versions = check_tools()?;
    stop_on(&[libc::SIGINT, libc::SIGTERM])?;
    // First, so that it drops last: every process below has been reaped by
    // then, and the cgroup can go.
    let cgroup = Cgroup::enter(&format!("lb-bench-e2e-{}", std::process::id()))?;
    let loadavg_start = loadavg();
    let lab = Lab::build()?;
    let mut cases = Vec::new();
    for mode in Mode::ALL {
        cases.extend(lab.measure_mode(mode, cli, &cgroup)?);
    }
    compare_to_direct(&mut cases);
    let split = wrk::split(cli.connections, WRK_PROCESSES);
    let meta = Meta {
        topology: format!(
            "client ns -> LB ns -> {} backend ns running nginx (one process each); the LB ns runs lb-agent \
             (its program at tc, then at XDP), HAProxy (tcp mode, nbthread 1) or NGINX stream (one process), \
             or only routes (direct)",
            BACKENDS.len(),
        ),
        load: format!(
            "wrk, {} connections as {WRK_PROCESSES} processes of one thread ({}); direct: process i sends to backend i",
            cli.connections,
            split.iter().map(u32::to_string).collect::<Vec<_>>().join("+"),
        ),
        connections: cli.connections,
        wrk_processes: WRK_PROCESSES,
        duration_s: cli.duration.as_secs(),
        runs: cli.runs,
        cpu: "CPU time of the bench's processes (wrk, nginx backends, lb-agent or the proxy; their softirq \
              work included, from a cgroup v2) plus ksoftirqd, over the run, per request"
            .to_owned(),
        loadavg_start,
        loadavg_end: loadavg(),
        versions,
    };
    drop(lab);
    drop(cgroup);
    Ok(Report { meta, cases })
}

/// The programs the bench runs, with their versions; a clear error for
/// what is missing.
fn check_tools() -> Result<Vec<String>> {
    let mut missing = Vec::new();
    let mut versions = Vec::new();
    for (program, flag) in [("wrk", "-v"), ("haproxy", "-v"), ("nginx", "-v")] {
        match Command::new(program).arg(flag).output() {
            Ok(out) => {
                // wrk prints its version and usage to stdout, nginx to stderr.
                let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
                versions.push(text.lines().next().unwrap_or(program).trim().to_owned());
            }
            Err(_) => missing.push(program),
        }
    }
    if !Path::new(servers::NGINX_STREAM_MODULE).exists() {
        missing.push("libnginx-mod-stream");
    }
    if !missing.is_empty() {
        bail!(
            "missing: {}; run `cargo xtask setup` as root (it installs wrk haproxy nginx libnginx-mod-stream)",
            missing.join(" ")
        );
    }
    Ok(versions)
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// The topology with nginx running in every backend namespace.
struct Lab {
    /// Declared first, so they stop before the namespaces go.
    backends: Vec<Proc>,
    topo: Topology,
}

/// What runs in the LB namespace for one mode (dropped after its runs).
enum Balancer {
    None,
    Agent(Agent),
    Proxy(Proc),
}

impl Lab {
    fn build() -> Result<Lab> {
        eprintln!("[bench] building client ns -> LB ns -> {} backend namespaces", BACKENDS.len());
        // Each LB mode writes its own hook into the config (`Lab::start`).
        let mut topo =
            Topology::build(topology::Options { hook: Some("xdp"), ..topology::Options::with_backends(&BACKENDS) });
        let mut backends = Vec::new();
        for b in BACKENDS {
            // The lab's own test servers hold the backend port: nginx
            // takes their place.
            topo.stop_backend(b);
        }
        // A new connection per request leaves a TIME_WAIT socket per
        // request (wrk closes first, so do the proxies towards it); without
        // reuse, connect() runs out of free ports within seconds and then
        // scans the whole range on each call, and the runs after the first
        // ones crawl: a mode measured later would inherit the ports an
        // earlier one left. With timestamps (the default) reuse is safe.
        for ns in [&topo.client, &topo.lb] {
            ns.exec("sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"]);
        }
        let lb = LB_CLIENT_ADDR.to_string();
        for b in &topo.backends {
            // Direct: the client reaches each backend via the LB namespace,
            // which routes (the backends route the client's subnet back via
            // it already).
            let subnet = format!("{}/24", Ipv4Addr::from(u32::from(b.addr) & 0xffff_ff00));
            topo.client.exec("ip", &["route", "add", &subnet, "via", &lb, "dev", NODE_IFACE]);
            let dir = topo.dir().join(&b.name);
            let conf = servers::nginx_backend_conf(&dir, &b.name, b.tcp_addr());
            backends.push(servers::start_nginx(&b.ns, &format!("nginx {}", b.name), &dir, &conf)?);
        }
        let mut lab = Lab { backends, topo };
        for i in 0..lab.topo.backends.len() {
            let (addr, log) =
                (lab.topo.backends[i].tcp_addr(), lab.topo.dir().join(&lab.topo.backends[i].name).join("error.log"));
            let body = servers::wait_http(&lab.topo.client, addr, Some(&mut lab.backends[i]), &log)?;
            ensure!(body == lab.topo.backends[i].name, "{addr} answered {body:?}");
        }
        Ok(lab)
    }

    fn upstreams(&self) -> Vec<SocketAddrV4> {
        self.topo.backends.iter().map(|b| b.tcp_addr()).collect()
    }

    /// Starts what `mode` runs in the LB namespace and waits until it
    /// answers; returns it with the address wrk sends to (direct: none).
    fn start(&self, mode: Mode) -> Result<(Balancer, Option<SocketAddrV4>)> {
        let dir = self.topo.dir().join(format!("{mode:?}").to_lowercase());
        let (mut balancer, target, log) = match mode {
            Mode::Direct => return Ok((Balancer::None, None)),
            Mode::LbTc | Mode::LbXdp => {
                let hook = if mode == Mode::LbTc { "tc" } else { "xdp" };
                let members: Vec<(&str, u32)> = BACKENDS.iter().map(|b| (*b, 1)).collect();
                // The lab writes `hook = "xdp"` for every LB interface.
                let config = self.topo.config_toml(&members).replace("hook = \"xdp\"", &format!("hook = {hook:?}"));
                self.topo.write_raw_config(&config);
                let agent = self.topo.start_agent();
                let log = self.topo.agent_args().log;
                (Balancer::Agent(agent), self.topo.vip_tcp(), log)
            }
            Mode::Haproxy => {
                let conf = servers::haproxy_conf(PROXY, &self.upstreams());
                (Balancer::Proxy(servers::start_haproxy(&self.topo.lb, &dir, &conf)?), PROXY, dir.join("haproxy.log"))
            }
            Mode::NginxStream => {
                let conf = servers::nginx_stream_conf(&dir, PROXY, &self.upstreams());
                let p = servers::start_nginx(&self.topo.lb, "nginx stream", &dir, &conf)?;
                (Balancer::Proxy(p), PROXY, dir.join("error.log"))
            }
        };
        let proc = match &mut balancer {
            Balancer::Proxy(p) => Some(p),
            _ => None,
        };
        let body = servers::wait_http(&self.topo.client, target, proc, &log)?;
        ensure!(BACKENDS.contains(&body.as_str()), "{target} answered {body:?}, not a backend's name");
        Ok((balancer, Some(target)))
    }

    /// Every style and run of one mode.
    fn measure_mode(&self, mode: Mode, cli: &Cli, cgroup: &Cgroup) -> Result<Vec<Case>> {
        check_stop()?;
        eprintln!("[bench] {}: starting", mode.label());
        let (balancer, target) = self.start(mode)?;
        let split = wrk::split(cli.connections, WRK_PROCESSES);
        let shares: Vec<Share> = split
            .iter()
            .zip(&self.topo.backends)
            .map(|(&connections, b)| Share { target: target.unwrap_or_else(|| b.tcp_addr()), connections })
            .collect();
        let mut cases = Vec::new();
        for style in Style::ALL {
            let mut runs = Vec::new();
            for r in 1..=cli.runs {
                check_stop()?;
                let flows_before = agent_flows(&balancer)?;
                let mut run = self
                    .measure_run(&shares, style, cli.duration, cgroup)
                    .with_context(|| format!("{} {}, run {r}", mode.label(), style.label()))?;
                run.flows_per_backend = agent_flows(&balancer)?
                    .map(|after| after.iter().zip(flows_before.unwrap_or_default()).map(|(a, b)| a - b).collect());
                let split = run.flows_per_backend.as_ref().map_or(String::new(), |f| {
                    format!(", flows per backend {}", f.iter().map(u64::to_string).collect::<Vec<_>>().join("/"))
                });
                eprintln!(
                    "[bench] {} {} run {r}/{}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, {:.1} us CPU/req, {} errors{split}",
                    mode.label(),
                    style.label(),
                    cli.runs,
                    run.req_per_s,
                    run.p50_us as f64 / 1000.0,
                    run.p99_us as f64 / 1000.0,
                    run.cpu_us_per_req,
                    run.errors.total()
                );
                runs.push(run);
            }
            cases.push(Case::of_runs(mode, style, runs));
        }
        drop(balancer);
        Ok(cases)
    }

    fn measure_run(&self, shares: &[Share], style: Style, duration: Duration, cgroup: &Cgroup) -> Result<Run> {
        let before = Sample::take(cgroup)?;
        let running = wrk::start(&self.topo.client, self.topo.dir(), shares, style, duration)?;
        running.sleep_through(&stopped)?;
        // At the end of the load, before wrk prints its histogram: that
        // costs wrk seconds of CPU with a long tail (it scans the buckets
        // once per entry), which would count as the balancer's otherwise.
        // wrk's own clock starts a few ms after `before`, so this can miss
        // the last few ms of the load's CPU time out of `duration`.
        let spent = Sample::take(cgroup)?.since(&before);
        let load = running.finish(&stopped)?;
        ensure!(load.requests > 0, "no request was answered ({:?})", load.errors);
        let per = |us: f64| us / load.requests as f64;
        Ok(Run {
            requests: load.requests,
            req_per_s: load.rate,
            p50_us: load.quantile_us(0.50).unwrap_or(0),
            p99_us: load.quantile_us(0.99).unwrap_or(0),
            errors: load.errors,
            cpu_us_per_req: per(spent.bench_us),
            system_cpu_us_per_req: per(spent.system_us),
            softirq_us_per_req: per(spent.softirq_us),
            flows_per_backend: None,
        })
    }
}

/// The web service's new flows per backend so far, from `lb-agent status
/// --json`; `None` when no agent runs.
fn agent_flows(balancer: &Balancer) -> Result<Option<Vec<u64>>> {
    let Balancer::Agent(agent) = balancer else { return Ok(None) };
    let out = agent.cli(&["status", "--json"]);
    ensure!(out.status.success(), "lb-agent status --json: {}{}", out.stdout, out.stderr);
    let status: serde_json::Value = serde_json::from_str(&out.stdout).context("lb-agent status --json")?;
    let web = status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .context("no service \"web\" in lb-agent's status")?;
    let flows = web["backends"]
        .as_array()
        .context("no backends in lb-agent's status")?
        .iter()
        .map(|b| b["counters"]["new_flows"].as_u64().unwrap_or(0))
        .collect();
    Ok(Some(flows))
}

fn check_stop() -> Result<()> {
    if stopped() {
        bail!("interrupted");
    }
    Ok(())
}
