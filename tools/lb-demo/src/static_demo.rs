//! The static demo (`--static`): fixed backends, one request at a time.

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use lb_lab::{
    agent::try_agent_bin,
    topology::{tcp_request, Options, Topology, VIP as STATIC_VIP},
};
use lb_load::stop::stopped;

use crate::{cli::Cli, install_signal_handlers, require_root};

pub(crate) fn run_static(cli: &Cli) -> anyhow::Result<()> {
    require_root()?;
    install_signal_handlers()?;
    let bin = try_agent_bin()?;
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

pub(crate) fn drive_traffic(topo: &Topology, names: &[String], cli: &Cli) -> anyhow::Result<()> {
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

pub(crate) fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

pub(crate) fn sleep_unless_stopped(total: Duration) {
    let deadline = Instant::now() + total;
    while !stopped() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        thread::sleep(left.min(Duration::from_millis(50)));
    }
}

pub(crate) fn print_table(counts: &BTreeMap<String, u64>, failures: u64) {
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
