//! `--scenario load`: the Prometheus + Grafana setup's table. Two instances
//! at a base load, then five times the load with scaling up to 10
//! instances: requests/s, mean and p99 latency, CPU per instance, before
//! and after.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _};
use lb_load::{self as load, stop::stopped, LoadConfig, Mode, Ramp, Report};

use super::{
    report::{self, ResultsFile},
    table::Table,
    watch::{self, ready_count, Setup, Watch},
    Common, Outcome,
};
use crate::{
    autoscale::{VIP, VIP_PORT},
    lab::Lab,
};

/// Requests per second at the base load; the peak is five times it.
pub(crate) const BASE_RATE: f64 = 110.0;
pub(crate) const FACTOR: f64 = 5.0;
/// CPU per request: five times the base load must fit on this machine's
/// cores beside the load generator and the load balancer.
pub(crate) const WORK_MS: u64 = 1;
pub(crate) const MIN: u32 = 2;
pub(crate) const MAX: u32 = 10;
/// The policy's target, requests per second per instance: the base load
/// keeps 2 instances (55/s each), five times it asks for 10 (a proposal
/// within 10 % of the current count changes nothing, so the target is the
/// base load's rate per instance, not a little above it).
pub(crate) const TARGET_RPS: f64 = 55.0;
/// How long each measured phase runs, and how long the scale-up may take.
const PHASE: Duration = Duration::from_secs(20);
const SCALE_UP_LIMIT: Duration = Duration::from_secs(60);

/// One phase's figures.
struct Figures {
    rate: f64,
    mean_ms: Option<f64>,
    p99_ms: Option<f64>,
    cpu: Option<f64>,
    instances: u32,
    ok: u64,
    failed: u64,
    peak_in_flight: usize,
}

pub(crate) fn run(c: &Common<'_>) -> anyhow::Result<Outcome> {
    let peak = BASE_RATE * FACTOR;
    println!(
        "scenario load: {MIN} instances at {BASE_RATE:.0} req/s, then {peak:.0} req/s with scaling up to {MAX} \
         ({WORK_MS} ms of CPU per request, target {TARGET_RPS:.0} req/s per instance)"
    );
    let scaling = format!(
        "min_replicas = {MIN}\nmax_replicas = {MAX}\ntarget = {{ requests_per_second = {TARGET_RPS:.1} }}\n\
         [service.scaling.scale_up]\nmax_step = {}\nperiod = \"5s\"\n",
        MAX - MIN
    );
    let setup = Setup {
        kind: c.kind,
        backend: c.backend,
        max_connections: None,
        scaling,
        instances: "requests = { path = \"/metrics\", counter = 'demo_backend_requests_total{route=\"/\"}' }\n",
        ready: MIN,
    };
    println!("== starting the agent and {MIN} instances ...");
    let Some(mut lab) = watch::start(&setup)? else { return Ok(Outcome::Interrupted) };
    let mut w = Watch::new("load", 0.0);
    let result = phases(&mut lab, &mut w, peak);
    let notes = lab.cleanup();
    println!("cleaned up: {}", notes.join("; "));
    let Some((before, after, marks)) = result? else { return Ok(Outcome::Interrupted) };

    let table = table(&before, &after);
    println!();
    print!("{}", table.text());
    let title = format!(
        "load: {BASE_RATE:.0} -> {peak:.0} req/s, {WORK_MS} ms CPU per request\n\
         {MIN} instances, then scaling on {TARGET_RPS:.0} req/s per instance up to {MAX}"
    );
    let svg = report::chart(&title, &w.series, &w.samples, 0.0, &marks);
    let reference = "The Prometheus + Grafana setup (Nginx containers behind HAProxy, an autoscaler script on \
         CPU and request rate, 2-10 instances) published this benchmark. Theirs, and ours with the same shape: \
         2 instances at a base load, then five times the load with scaling up to 10 instances:";
    let method = format!(
        "- Load: lb-load, open loop (requests at a fixed rate, not a fixed number of users), one connection per \
         request, from a client namespace: {BASE_RATE:.0} req/s for {} s with {MIN} instances (\"before\"), then \
         {peak:.0} req/s until {MAX} instances are ready, then {} s more at {peak:.0} req/s (\"after\"). The figures \
         are of the two measured phases; CPU per instance is the agent's reading (mean of the ready instances, \
         percent of one core) over each phase after its first 5 s.\n\
         - Per-request work: {WORK_MS} ms of CPU per request (`GET /?work_ms={WORK_MS}`). This machine has 2 cores: \
         theirs ran 2500 req/s at 70 % CPU on 10 instances, 7 cores of work. Here five times the base load is \
         {:.1} cores of work, which fits beside the load generator and the load balancer; so the per-instance CPU \
         is far below theirs, and the rates are a fifth of theirs, with the same 5x step.\n\
         - Policy: target tracking on requests/s per instance (theirs: CPU above 70 % or above 100 req/s adds \
         instances): `target = {{ requests_per_second = {TARGET_RPS:.0} }}`, {MIN}-{MAX} instances, scale-up up to \
         {} instances per 5 s.\n\
         - Instances: {}.",
        PHASE.as_secs(),
        PHASE.as_secs(),
        peak * WORK_MS as f64 / 1000.0,
        MAX - MIN,
        c.kind_name
    );
    let files = report::write(
        c.results_dir,
        "load",
        &ResultsFile {
            title: "Load step with scale-up (the Prometheus + Grafana setup's table)",
            reference,
            table: &table.markdown(),
            method: &method,
            notes: "Latency is from the scheduled send time to the end of the answer, over all successful \
                    requests of the phase. The chart's CPU panel shows the mean CPU per ready instance.",
        },
        &svg,
    )?;
    println!("written: {}", files.join(", "));
    Ok(Outcome::Done)
}

type Marks = Vec<(f64, String)>;

/// Base, scale-up, after; the figures of the first and the last. `None` on
/// Ctrl-C.
fn phases(lab: &mut Lab, w: &mut Watch, peak: f64) -> anyhow::Result<Option<(Figures, Figures, Marks)>> {
    let mut marks = vec![(0.0, format!("{BASE_RATE:.0} req/s"))];
    let (from, base) = phase(lab, w, BASE_RATE, PHASE, "measured: before", |_| false)?;
    if stopped() {
        return Ok(None);
    }
    let before = figures(w, &base, from);
    marks.push((w.clock(), format!("{peak:.0} req/s")));
    let up = format!("until {MAX} instances are ready");
    let (_, scaling) =
        phase(lab, w, peak, SCALE_UP_LIMIT, &up, |w| w.status.as_ref().is_some_and(|s| ready_count(s) >= MAX))?;
    if stopped() {
        return Ok(None);
    }
    let ready = w.status.as_ref().map_or(0, ready_count);
    if ready < MAX {
        bail!(
            "{ready} of {MAX} instances ready after {} s at {peak:.0} req/s ({} failed requests meanwhile)",
            SCALE_UP_LIMIT.as_secs(),
            scaling.summary.failed
        );
    }
    marks.push((w.clock(), format!("{MAX} ready")));
    let (from, last) = phase(lab, w, peak, PHASE, "measured: after", |_| false)?;
    if stopped() {
        return Ok(None);
    }
    let after = figures(w, &last, from);
    Ok(Some((before, after, marks)))
}

/// `rate` req/s until `duration` passes or `done` says so; the phase's
/// start on the shared clock and its report.
fn phase(
    lab: &mut Lab,
    w: &mut Watch,
    rate: f64,
    duration: Duration,
    what: &str,
    done: impl Fn(&Watch) -> bool,
) -> anyhow::Result<(f64, Report)> {
    let ramp = Ramp::constant(rate).map_err(|e| anyhow!("{e}"))?;
    let mut cfg = LoadConfig::new(SocketAddr::V4(SocketAddrV4::new(VIP, VIP_PORT)), Mode::Open(ramp), duration);
    cfg.netns = Some(lab.client_ns.clone());
    cfg.path = format!("/?work_ms={WORK_MS}");
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let stop_for_load = Arc::clone(&stop);
    let handle = thread::Builder::new()
        .name("load".into())
        .spawn(move || load::run(&cfg, &stop_for_load, |p| drop(tx.send(p.clone()))))
        .context("start the load thread")?;
    let start = w.t();
    println!("[load +{start:>3.0}s] {rate:.0} req/s for {} s at most ({what})", duration.as_secs());
    let result = (|| -> anyhow::Result<()> {
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(mut p) => {
                    p.t += start;
                    w.point(p);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
            w.poll(lab)?;
            if stopped() || done(w) {
                stop.store(true, Ordering::SeqCst);
            }
        }
    })();
    stop.store(true, Ordering::SeqCst);
    let report = match handle.join() {
        Ok(r) => r.context("the load generator")?,
        Err(_) => bail!("the load generator panicked"),
    };
    result?;
    Ok((start, report))
}

fn figures(w: &Watch, r: &Report, from: f64) -> Figures {
    let s = &r.summary;
    Figures {
        rate: if s.duration_s > 0.0 { s.ok as f64 / s.duration_s } else { 0.0 },
        mean_ms: s.latency.mean_ms,
        p99_ms: s.latency.p99_ms,
        cpu: w.mean_cpu_since(from + 5.0),
        instances: w.status.as_ref().map_or(0, ready_count),
        ok: s.ok,
        failed: s.failed,
        peak_in_flight: s.peak_workers,
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1} ms"))
}

fn table(before: &Figures, after: &Figures) -> Table {
    let mut t = Table::new(&[
        "Metric",
        "Theirs: baseline (2 instances)",
        "Theirs: auto-scaled (10 instances)",
        "Ours: baseline",
        "Ours: auto-scaled",
    ]);
    let both = |f: &dyn Fn(&Figures) -> String| [f(before), f(after)];
    let rows: [(&str, &str, &str, [String; 2]); 7] = [
        ("Requests/sec", "500", "2500", both(&|f| format!("{:.0}", f.rate))),
        ("Avg Response Time", "45ms", "52ms", both(&|f| ms(f.mean_ms))),
        ("99th Percentile", "120ms", "145ms", both(&|f| ms(f.p99_ms))),
        ("CPU Utilization (per instance)", "65%", "70%", both(&|f| f.cpu.map_or("-".into(), |c| format!("{c:.0}%")))),
        ("Instances", "2", "10", both(&|f| f.instances.to_string())),
        ("Concurrent Users", "1000", "5000", both(&|f| format!("open loop, {} in flight at most", f.peak_in_flight))),
        ("Failed requests", "-", "-", both(&|f| format!("{} of {}", f.failed, f.ok + f.failed))),
    ];
    for (metric, a, b, [c, d]) in rows {
        t.row(vec![metric.into(), a.into(), b.into(), c, d]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(rate: f64, mean: f64, p99: f64, cpu: Option<f64>, instances: u32) -> Figures {
        Figures { rate, mean_ms: Some(mean), p99_ms: Some(p99), cpu, instances, ok: 2200, failed: 3, peak_in_flight: 4 }
    }

    #[test]
    fn the_table_has_their_rows_with_ours_before_and_after() {
        let t = table(&figures(110.2, 2.34, 9.6, Some(7.4), 2), &figures(549.6, 2.2, 17.45, None, 10)).text();
        let row = |name: &str| {
            let line = t.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} row in\n{t}"));
            line.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect::<Vec<_>>()
        };
        assert_eq!(row("Requests/sec"), ["Requests/sec", "500", "2500", "110", "550"]);
        assert_eq!(row("Avg Response Time"), ["Avg Response Time", "45ms", "52ms", "2.3 ms", "2.2 ms"]);
        assert_eq!(row("99th Percentile"), ["99th Percentile", "120ms", "145ms", "9.6 ms", "17.4 ms"]);
        assert_eq!(row("CPU Utilization"), ["CPU Utilization (per instance)", "65%", "70%", "7%", "-"]);
        assert_eq!(row("Instances"), ["Instances", "2", "10", "2", "10"]);
        assert_eq!(row("Failed requests"), ["Failed requests", "-", "-", "3 of 2203", "3 of 2203"]);
    }
}
