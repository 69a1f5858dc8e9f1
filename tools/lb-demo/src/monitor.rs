//! The run: load in one thread, this one watches the agent and draws.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use lb_agent::status::{ReplicaStatus, ScalingStatus, Snapshot};
use lb_lab::agent::Agent;
use lb_load::{self as load, stop::stopped, LoadConfig, Mode, Ramp, TimePoint};

use crate::{
    agent::read_status,
    autoscale::{scaling_of, MAX_REPLICAS, MIN_REPLICAS, SERVICE, SETTLE, STATUS_EVERY, VIP, VIP_PORT},
    lab::Lab,
    shape::Shape,
    view::{fmt_cpu, fmt_ms, fmt_secs, spark, View},
};

/// One reading of the instances.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sample {
    pub(crate) t: f64,
    pub(crate) ready: u32,
    pub(crate) starting: u32,
    pub(crate) draining: u32,
    pub(crate) desired: u32,
    /// The metric the policy scales on: mean CPU of the ready instances, in
    /// percent of one core (none before the first sample).
    pub(crate) cpu: Option<f64>,
}

impl Sample {
    /// The instances as the agent's status has them at `t`.
    pub(crate) fn of(t: f64, sc: &ScalingStatus) -> Sample {
        let count = |phase: &str| sc.replicas.iter().filter(|r| r.phase == phase).count() as u32;
        Sample {
            t,
            ready: count("ready"),
            starting: count("starting"),
            draining: count("draining"),
            desired: sc.desired,
            cpu: mean_cpu(sc.replicas.iter().filter(|r| r.phase == "ready").map(|r| r.cpu_percent)),
        }
    }
}

/// The mean of the samples there are, if any.
pub(crate) fn mean_cpu(cpus: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let known: Vec<f64> = cpus.flatten().collect();
    (!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64)
}

/// Milestones, in seconds since the load started.
#[derive(Default)]
pub(crate) struct Milestones {
    pub(crate) first_up_decision: Option<f64>,
    pub(crate) first_new_started: Option<(f64, String)>,
    pub(crate) first_new_ready: Option<(f64, String)>,
    /// Window start of the first second a new instance answered in.
    pub(crate) first_new_answer: Option<(f64, String)>,
    pub(crate) back_to_min: Option<f64>,
}

pub(crate) struct Record {
    pub(crate) report: load::Report,
    pub(crate) samples: Vec<Sample>,
    pub(crate) milestones: Milestones,
    pub(crate) initial: BTreeSet<String>,
    pub(crate) stop_reason: String,
    pub(crate) agent_died: Option<String>,
}

pub(crate) struct Monitor<'a> {
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

pub(crate) fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub(crate) fn run_load(
    lab: &mut Lab,
    ramp: &Ramp,
    shape: &Shape,
    scale_in_timeout: Duration,
    first: &str,
    view: &mut View,
) -> anyhow::Result<Record> {
    let client_ns = lab.client_ns.clone();
    let agent = lab.agent.as_mut().expect("agent started");
    let snap = read_status(agent).context("agent status")?;
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
            } else if let Some(status) = agent.try_exit_status() {
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

    pub(crate) fn note(&mut self, t: f64, text: &str) {
        self.view.note(t, text);
        self.redraw();
    }

    /// Read the agent's status; report what changed.
    fn poll(&mut self, agent: &Agent) {
        let snap = match read_status(agent) {
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
        let sample = Sample::of(t, &sc);
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
