//! The scaling loop of one service: collect metrics, decide, act.
//!
//! Scale-up starts an instance, waits for its first good health check, and
//! only then adds it to the table. Scale-down drains an instance (no new
//! flows; open ones finish or hit the drain deadline) and stops it once the
//! drain is over. An instance that exits leaves the table at once and the
//! next decision replaces it. Every orchestrator call (list, start, stop)
//! and every probe runs in a task that reports back through a
//! `ScalerEvent`, so the agent's loop never waits on them: a round is
//! `poll` (list the instances), then, when the list is in, `on_listed`
//! (notice exits) and `decide`.
//!
//! The decision is `core::policy::decide`, the phase bookkeeping
//! `core::replicas`; this module does the I/O around them: the
//! orchestrator, probes, samplers and the timeline.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{sync::mpsc, time::Instant};
use tracing::{info, warn};

use crate::{
    adapters::{sampling::Samplers, timeline::Timeline},
    config::{instances::InstancesConfig, scaling::ScalingPolicy, CheckKind, HealthCheckConfig, ServiceConfig},
    core::{
        policy::{Decision, History, Hold, Inputs},
        registry::Registry,
        replicas::{FlowFigures, Phase, Replicas},
        zero::{busy, decide_from_zero, Demand},
    },
    ports::{Orchestrator, Prober, Replica},
    status::{record_decision, DecisionSummary, ReplicaStatus, ScalingHold, ScalingMetric, ScalingStatus},
};

/// Decisions kept for `status`.
const KEEP_DECISIONS: usize = 20;
/// While waking from zero, a starting instance is probed this often, so it
/// joins the table the moment it is ready (a waiting client's next SYN
/// retransmission connects).
const WAKE_PROBE_EVERY: Duration = Duration::from_millis(50);

/// A wake from zero under way: when it began, for the record of how long
/// each step took.
#[derive(Clone, Copy, Debug)]
struct Waking {
    /// The client's first packet (the data plane's timestamp).
    first_packet: Instant,
    /// The data plane's report reached the scaler.
    reported: Instant,
    /// The orchestrator answered the start.
    started: Option<Instant>,
}

/// What spawned orchestrator work reports back to the agent's loop.
pub enum ScalerEvent {
    Started {
        service: String,
        result: Result<Replica, String>,
    },
    Probed {
        service: String,
        id: String,
        error: Option<String>,
    },
    Stopped {
        service: String,
        id: String,
        result: Result<(), String>,
    },
    /// The instances as listed; the list was asked for under the replicas'
    /// `generation`, at `asked_at`.
    Listed {
        service: String,
        generation: u64,
        asked_at: Instant,
        result: Result<Vec<Replica>, String>,
    },
}

impl ScalerEvent {
    pub fn service(&self) -> &str {
        match self {
            ScalerEvent::Started { service, .. }
            | ScalerEvent::Probed { service, .. }
            | ScalerEvent::Stopped { service, .. }
            | ScalerEvent::Listed { service, .. } => service,
        }
    }
}

/// What the operator asks of a scaled service (`lb-agent scale`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleCommand {
    /// Hold the count at this many instances.
    Pin(u32),
    /// Hold the count where it is.
    Pause,
    /// Hand the count back to the policy.
    Resume,
}

/// A hold and when it began (seconds since the Unix epoch).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Held {
    hold: Hold,
    since_unix_time: f64,
}

/// What a round changed that the caller must write to the maps.
#[derive(Default)]
pub struct TickOutcome {
    pub registry_changed: bool,
    pub events: Vec<String>,
    /// Instances that exited and left the table at once: their flows
    /// should be flushed so clients fail fast instead of timing out.
    pub exited: Vec<SocketAddr>,
    /// The listing of a deciding round is in: the caller reads the flow
    /// figures and calls `decide`.
    pub decide: bool,
}

pub struct Scaler<O, P> {
    service: String,
    policy: ScalingPolicy,
    instances: InstancesConfig,
    check: HealthCheckConfig,
    orch: Arc<O>,
    prober: Arc<P>,
    /// Instance and host CPU, and request rates, kept by sampler tasks.
    samplers: Samplers,
    /// Where decisions are written, if the config names a file.
    timeline: Option<Timeline>,
    history: History,
    replicas: Replicas,
    decisions: VecDeque<DecisionSummary>,
    last: Option<Decision>,
    /// A listing under way, and whether a decision waits for it.
    listing: Option<bool>,
    events: mpsc::Sender<ScalerEvent>,
    /// The operator's pin or pause. It outlives config reloads (the scaler
    /// does) but not the agent.
    held: Option<Held>,
    /// Scale from zero: a wake under way.
    waking: Option<Waking>,
    /// The last time a client showed (a flow, a wake): the idle window runs
    /// from here.
    last_busy: Instant,
}

impl<O: Orchestrator + 'static, P: Prober> Scaler<O, P> {
    /// The scaler of `svc`, with the orchestrator made for it.
    pub fn new(
        svc: &ServiceConfig,
        orch: O,
        prober: Arc<P>,
        events: mpsc::Sender<ScalerEvent>,
    ) -> anyhow::Result<Self> {
        let (Some(policy), Some(instances)) = (svc.scaling.clone(), svc.instances.clone()) else {
            anyhow::bail!("service {} is not scaled", svc.name);
        };
        let orch = Arc::new(orch);
        let samplers = Samplers::start(&svc.name, orch.clone(), instances.requests.as_ref());
        // Readiness is the service's own check, or a TCP connect.
        let check = svc.health_check.clone().unwrap_or(HealthCheckConfig {
            kind: CheckKind::Tcp,
            path: "/".into(),
            expect_status: 200,
            interval: std::time::Duration::from_millis(200),
            timeout: None,
            rise: 1,
            fall: 1,
            through_tunnel: None,
        });
        Ok(Scaler {
            service: svc.name.clone(),
            history: History::for_policy(&policy),
            timeline: instances
                .timeline
                .clone()
                .map(|path| Timeline::open(path, instances.timeline_rotation(), &svc.name)),
            policy,
            instances,
            check,
            orch,
            prober,
            samplers,
            replicas: Replicas::default(),
            decisions: VecDeque::new(),
            last: None,
            listing: None,
            events,
            held: None,
            waking: None,
            last_busy: Instant::now(),
        })
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// Take a new policy from a reloaded config.
    pub fn set_policy(&mut self, policy: ScalingPolicy) {
        self.history.set_keep(policy.history_window());
        self.policy = policy;
    }

    /// Instance addresses this scaler owns, in any phase.
    pub fn owns(&self, addr: SocketAddr) -> bool {
        self.replicas.owns(addr)
    }

    /// Instances a previous agent had in the table and left running:
    /// tracked as ready at once (the caller registers them before its first
    /// sync), so that a restart keeps serving through them. Returns the
    /// events to record.
    pub fn adopt_serving(&mut self, serving: Vec<Replica>) -> Vec<String> {
        let now = Instant::now();
        let mut events = Vec::new();
        for r in serving {
            let msg = format!("{}: adopted running instance {} ({}), serving", self.service, r.name, r.addr);
            info!("{msg}");
            events.push(msg);
            let id = r.id.clone();
            self.replicas.track(r, now);
            if let Some(t) = self.replicas.get_mut(&id) {
                t.phase = Phase::Ready;
            }
        }
        events
    }

    /// The data plane held a client's packet `waited` ago for this service,
    /// which has no instance in the table: wake it at once (a decision
    /// follows as soon as the instances are listed), unless a wake is
    /// already under way.
    pub fn wake(&mut self, waited: Duration) {
        let now = Instant::now();
        self.last_busy = now;
        if self.waking.is_some() || !self.policy.scales_from_zero() {
            return;
        }
        let first_packet = now.checked_sub(waited).unwrap_or(now);
        self.waking = Some(Waking { first_packet, reported: now, started: None });
        self.poll(true);
    }

    /// Ask the orchestrator for its instances (answered through `on_event`);
    /// with `decide`, a decision follows once the list is in. One listing
    /// at a time: asking while one is under way only adds the decision.
    pub fn poll(&mut self, decide: bool) {
        if let Some(d) = &mut self.listing {
            *d |= decide;
            return;
        }
        self.listing = Some(decide);
        let (orch, tx, service) = (self.orch.clone(), self.events.clone(), self.service.clone());
        let (generation, asked_at) = (self.replicas.generation(), Instant::now());
        tokio::spawn(async move {
            let result = orch.list().await.map_err(|e| e.to_string());
            let _ = tx.send(ScalerEvent::Listed { service, generation, asked_at, result }).await;
        });
    }

    /// The instances as listed: notice exits (a crashed instance leaves the
    /// table within a fraction of a second) and adopt ours from before a
    /// restart.
    fn on_listed(
        &mut self,
        generation: u64,
        asked_at: Instant,
        result: Result<Vec<Replica>, String>,
        registry: &mut Registry,
    ) -> TickOutcome {
        let mut out = TickOutcome { decide: self.listing.take().unwrap_or(false), ..TickOutcome::default() };
        match result {
            Ok(listed) => {
                let may_adopt = generation == self.replicas.generation();
                self.notice_exits(&listed, may_adopt, asked_at, registry, &mut out)
            }
            Err(e) => warn!(service = self.service, error = e, "listing instances failed"),
        }
        out
    }

    /// Probe new instances, decide, act.
    pub fn decide(&mut self, registry: &mut Registry, flows: &HashMap<SocketAddr, FlowFigures>) -> TickOutcome {
        let mut out = TickOutcome::default();
        let now = Instant::now();
        self.probe_starting();
        if let Some(cpu) = self.samplers.cpu() {
            self.replicas.set_cpu(&cpu);
        }
        if let Some(rps) = self.samplers.requests() {
            self.replicas.set_requests(&rps);
        }
        let snapshot = self.replicas.metrics(flows, self.samplers.host_cpu(), now);
        self.samplers.set_scrape_targets(self.replicas.active_addrs());
        if busy(&snapshot) {
            self.last_busy = now;
        }
        let demand = Demand {
            waiting: self.waking.map(|w| now.saturating_duration_since(w.first_packet)),
            idle: now.saturating_duration_since(self.last_busy),
        };
        let mut decision = decide_from_zero(&snapshot, &self.policy, &self.history, demand, now);
        if decision.replicas == 0 {
            self.waking = None;
        }
        if let Some(h) = self.held {
            decision = h.hold.apply(decision, self.policy.min_replicas, self.policy.max_replicas);
        }
        self.history.record(&decision, now);
        self.record(&decision, &mut out);
        self.act(&decision, registry, flows, &mut out);
        self.last = Some(decision);
        out
    }

    fn notice_exits(
        &mut self,
        listed: &[Replica],
        may_adopt: bool,
        asked_at: Instant,
        registry: &mut Registry,
        out: &mut TickOutcome,
    ) {
        // Running instances we do not track yet are ours from before an
        // agent restart: adopt them; they join the table after a good health
        // check, like new ones.
        for r in self.replicas.untracked_running(listed).into_iter().filter(|_| may_adopt) {
            let msg = format!("{}: adopted running instance {} ({})", self.service, r.name, r.addr);
            info!("{msg}");
            out.events.push(msg);
            self.replicas.track(r, Instant::now());
        }
        for r in listed.iter().filter(|r| !r.running) {
            let Some(t) = self.replicas.get_mut(&r.id) else { continue };
            // A listing asked for before the instance's start was answered
            // may show it created but not yet running: not an exit.
            if t.phase == Phase::Stopping || t.started_at > asked_at {
                continue;
            }
            // Out of the table at once: there is nothing to drain to.
            if registry.forget(&self.service, t.replica.socket()) {
                out.registry_changed = true;
                out.exited.push(t.replica.socket());
            }
            let msg = format!("{}: instance {} ({}) exited; removed, will be replaced", self.service, r.name, r.addr);
            warn!("{msg}");
            out.events.push(msg);
            t.phase = Phase::Stopping;
            self.spawn_stop(r.id.clone());
        }
    }

    /// Start a readiness probe of each starting instance not being probed.
    fn probe_starting(&mut self) {
        for (id, addr) in self.replicas.take_unprobed() {
            self.spawn_probe(id, addr, Duration::ZERO);
        }
    }

    /// Probe an instance for readiness after `delay`.
    fn spawn_probe(&self, id: String, addr: SocketAddr, delay: Duration) {
        let (tx, service, check) = (self.events.clone(), self.service.clone(), self.check.clone());
        let prober = self.prober.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let error = prober.probe(addr, &check).await.err().map(|e| e.to_string());
            let _ = tx.send(ScalerEvent::Probed { service, id, error }).await;
        });
    }

    fn record(&mut self, d: &Decision, out: &mut TickOutcome) {
        let unix_time =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        if let Some(t) = &self.timeline {
            t.record(unix_time, d);
        }
        let summary = DecisionSummary {
            unix_time,
            last_unix_time: unix_time,
            replicas: d.replicas,
            current: d.current,
            previous: d.previous,
            rule: d.rule.clone(),
            reason: d.reason.clone(),
            repeats: 1,
        };
        record_decision(&mut self.decisions, summary, KEEP_DECISIONS);
        if d.is_scaling() {
            let msg = format!("{}: scale {} -> {} ({}: {})", self.service, d.previous, d.replicas, d.rule, d.reason);
            info!("{msg}");
            out.events.push(msg);
        }
    }

    fn act(
        &mut self,
        d: &Decision,
        registry: &mut Registry,
        flows: &HashMap<SocketAddr, FlowFigures>,
        out: &mut TickOutcome,
    ) {
        let active = self.replicas.active();
        if d.replicas > active {
            for _ in active..d.replicas {
                self.spawn_start();
            }
        } else if d.replicas < active {
            for id in self.replicas.victims(active - d.replicas, flows) {
                let Some(t) = self.replicas.get_mut(&id) else { continue };
                if t.phase == Phase::Starting {
                    t.phase = Phase::Stopping;
                    self.spawn_stop(id);
                } else if registry.remove_backend(&self.service, t.replica.socket(), Instant::now()).is_ok() {
                    t.phase = Phase::Draining;
                    out.registry_changed = true;
                    out.events.push(format!(
                        "{}: draining instance {} ({})",
                        self.service,
                        t.replica.name,
                        t.replica.socket()
                    ));
                }
            }
        }
    }

    fn spawn_start(&mut self) {
        self.replicas.start_asked();
        let (orch, tx, service) = (self.orch.clone(), self.events.clone(), self.service.clone());
        tokio::spawn(async move {
            let result = orch.start().await.map_err(|e| e.to_string());
            let _ = tx.send(ScalerEvent::Started { service, result }).await;
        });
    }

    fn spawn_stop(&self, id: String) {
        let (orch, tx, service) = (self.orch.clone(), self.events.clone(), self.service.clone());
        tokio::spawn(async move {
            let result = orch.stop(&id).await.map_err(|e| e.to_string());
            let _ = tx.send(ScalerEvent::Stopped { service, id, result }).await;
        });
    }

    /// Handle a report from spawned work: what changed, and whether the
    /// caller should now `decide` (a listing for a deciding round is in).
    pub fn on_event(&mut self, event: ScalerEvent, registry: &mut Registry) -> TickOutcome {
        let (message, registry_changed) = match event {
            ScalerEvent::Listed { generation, asked_at, result, .. } => {
                return self.on_listed(generation, asked_at, result, registry)
            }
            ScalerEvent::Started { result: Ok(r), .. } => {
                let msg = format!("{}: started instance {} ({})", self.service, r.name, r.addr);
                self.replicas.start_answered(Some(r), Instant::now());
                if let Some(w) = &mut self.waking {
                    // A client waits: probe now, not at the next round.
                    w.started.get_or_insert_with(Instant::now);
                    self.probe_starting();
                }
                (Some(msg), false)
            }
            ScalerEvent::Started { result: Err(e), .. } => {
                self.replicas.start_answered(None, Instant::now());
                (Some(format!("{}: starting an instance failed: {e}", self.service)), false)
            }
            ScalerEvent::Probed { id, error, .. } => self.on_probe(&id, error, registry),
            ScalerEvent::Stopped { id, result, .. } => {
                // Events name instances as status does, never by the
                // orchestrator's id (a container id, a namespace).
                let name = self.replicas.forget(&id).map_or(id, |t| t.replica.name);
                match result {
                    Ok(()) => (Some(format!("{}: stopped instance {name}", self.service)), false),
                    Err(e) => (Some(format!("{}: stopping instance {name} failed: {e}", self.service)), false),
                }
            }
        };
        if let Some(m) = &message {
            info!("{m}");
        }
        TickOutcome { registry_changed, events: message.into_iter().collect(), ..TickOutcome::default() }
    }

    fn on_probe(&mut self, id: &str, error: Option<String>, registry: &mut Registry) -> (Option<String>, bool) {
        let Some(t) = self.replicas.get_mut(id) else { return (None, false) };
        t.probing = false;
        if t.phase != Phase::Starting {
            return (None, false);
        }
        match error {
            None => match registry.add_instance(&self.service, t.replica.socket()) {
                Ok(()) => {
                    t.phase = Phase::Ready;
                    let took = t.started_at.elapsed().as_secs_f64();
                    let mut msg =
                        format!("{}: instance {} ready after {took:.1}s; in the table", self.service, t.replica.name);
                    if let Some(w) = self.waking.take() {
                        msg.push_str(&w.describe(Instant::now()));
                    }
                    (Some(msg), true)
                }
                Err(e) => (Some(format!("{}: adding instance {} failed: {e}", self.service, t.replica.name)), false),
            },
            Some(_) if t.started_at.elapsed() < self.instances.ready_timeout => {
                if self.waking.is_some() {
                    t.probing = true;
                    let addr = t.replica.socket();
                    self.spawn_probe(id.to_owned(), addr, WAKE_PROBE_EVERY);
                }
                (None, false)
            }
            Some(e) => {
                t.phase = Phase::Stopping;
                let name = t.replica.name.clone();
                self.spawn_stop(id.to_owned());
                (
                    Some(format!(
                        "{}: instance {name} not ready within {} ({e}); stopping it",
                        self.service,
                        crate::status::human_duration(self.instances.ready_timeout.as_secs_f64())
                    )),
                    false,
                )
            }
        }
    }

    /// A drain the registry finished: stop the instance behind it.
    pub fn on_drained(&mut self, addr: SocketAddr) {
        if let Some(id) = self.replicas.drained(addr) {
            self.spawn_stop(id);
        }
    }

    /// Stop every instance (the service stops scaling, or the agent stops):
    /// drains are cut short. Then write out the timeline and undo the host
    /// set-up the orchestrator made.
    /// Let go of a scaler that never ran a round (its config was refused):
    /// the instances it adopted keep running, and what serves them (the
    /// orchestrator's host set-up) stays, for the agent that adopts them
    /// next. With nothing adopted it is a plain shut-down.
    pub async fn abandon(mut self) {
        if self.replicas.iter().next().is_none() {
            return self.shut_down().await;
        }
        self.samplers.stop();
        if let Some(t) = self.timeline.take() {
            t.close().await;
        }
        self.orch.keep_host_setup();
    }

    pub async fn shut_down(mut self) {
        self.samplers.stop();
        for (id, t) in self.replicas.take_all() {
            if let Err(e) = self.orch.stop(&id).await {
                warn!(service = self.service, instance = t.replica.name, error = %e, "stop failed");
            }
        }
        if let Some(t) = self.timeline.take() {
            t.close().await;
        }
        self.orch.release().await;
    }

    /// Pin, pause or resume; the message says what changed, the error why
    /// nothing did. A pin must lie within min_replicas ..= max_replicas: the
    /// bounds are the config's promise, and a reload is how to move them.
    /// The next decision (`poll(true)`) acts on it.
    pub fn command(&mut self, c: ScaleCommand, unix_time: f64) -> Result<String, String> {
        let (svc, min, max) = (&self.service, self.policy.min_replicas, self.policy.max_replicas);
        let hold = match c {
            ScaleCommand::Pin(n) if n < min || n > max => {
                return Err(format!(
                    "{svc}: {n} is outside min_replicas {min} ..= max_replicas {max}; \
                     change the bounds in the config to go beyond them"
                ))
            }
            ScaleCommand::Pin(n) => Hold::Pinned(n),
            ScaleCommand::Pause => {
                Hold::Paused(self.last.as_ref().map_or_else(|| self.replicas.active(), |d| d.replicas))
            }
            ScaleCommand::Resume => {
                return Ok(match self.held.take() {
                    Some(h) => format!(
                        "{svc}: scaling resumed; the policy decides again (was {} at {})",
                        h.hold.mode(),
                        h.hold.replicas()
                    ),
                    None => format!("{svc}: scaling was neither pinned nor paused; the policy decides"),
                })
            }
        };
        self.held = Some(Held { hold, since_unix_time: unix_time });
        Ok(format!("{svc}: {} at {} by operator until `lb-agent scale {svc} --resume`", hold.mode(), hold.replicas()))
    }

    pub fn status(&self) -> ScalingStatus {
        ScalingStatus {
            service: self.service.clone(),
            min_replicas: self.policy.min_replicas,
            max_replicas: self.policy.max_replicas,
            desired: self.last.as_ref().map_or(0, |d| d.replicas),
            pending_starts: self.replicas.pending_starts(),
            replicas: self
                .replicas
                .iter()
                .map(|(_, t)| ReplicaStatus {
                    id: t.replica.id.clone(),
                    name: t.replica.name.clone(),
                    address: t.replica.socket().to_string(),
                    phase: t.phase.name().into(),
                    cpu_percent: t.cpu_percent,
                    requests_per_second: t.requests_per_second,
                    age_seconds: t.started_at.elapsed().as_secs_f64(),
                })
                .collect(),
            decisions: self.decisions.iter().cloned().collect(),
            metrics: self.last.as_ref().map_or_else(Vec::new, |d| scaling_metrics(&self.policy, &d.inputs)),
            hold: self.held.map(|h| ScalingHold {
                mode: h.hold.mode().into(),
                replicas: h.hold.replicas(),
                since_unix_time: h.since_unix_time,
            }),
        }
    }
}

impl Waking {
    /// "; woke from zero: ..." with each step's time since the first packet.
    fn describe(&self, ready: Instant) -> String {
        let ms = |at: Instant| at.saturating_duration_since(self.first_packet).as_millis();
        let started = self.started.map_or_else(String::new, |s| format!(", instance started +{}ms", ms(s)));
        format!(
            "; woke from zero: first packet, reported +{}ms{started}, ready and in the table +{}ms",
            ms(self.reported),
            ms(ready)
        )
    }
}

/// Each metric a rule of `policy` acts on, with the value the decision saw
/// (`inputs`) and the rule's target or limit: targets first, then the
/// threshold rules' limits, up before down.
fn scaling_metrics(policy: &ScalingPolicy, inputs: &Inputs) -> Vec<ScalingMetric> {
    let targets = policy.target.iter().flat_map(|t| t.metrics()).map(|(m, v)| ("target", m, v));
    let thresholds = policy.threshold.iter().flat_map(|t| {
        let up = t.up.iter().flat_map(|r| r.conditions()).map(|(m, v)| ("up", m, v));
        up.chain(t.down.iter().flat_map(|r| r.conditions()).map(|(m, v)| ("down", m, v)))
    });
    targets
        .chain(thresholds)
        .map(|(rule, m, target)| ScalingMetric {
            metric: m.key().into(),
            label: m.label().into(),
            rule: rule.into(),
            value: inputs.value(m),
            target,
            unit: m.unit().into(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        config::Config,
        testing::{scaled, Answer, FakeOrchestrator, FakeProber},
    };

    type TestScaler = Scaler<FakeOrchestrator, FakeProber>;

    fn scaler(orch: &FakeOrchestrator) -> (TestScaler, Registry, mpsc::Receiver<ScalerEvent>) {
        let config = Config::parse(&scaled(1, 1, ""), Path::new("lb.toml")).unwrap();
        let mut registry = Registry::default();
        registry.set_config(&config, Instant::now());
        let (tx, rx) = mpsc::channel(16);
        let s = Scaler::new(&config.services[0], orch.clone(), Arc::new(FakeProber::default()), tx).unwrap();
        (s, registry, rx)
    }

    fn replica(id: &str, running: bool) -> Replica {
        Replica { id: id.into(), name: format!("web-{id}"), addr: "10.9.0.1:8080".parse().unwrap(), running }
    }

    fn listed(generation: u64, replicas: &[Replica]) -> ScalerEvent {
        ScalerEvent::Listed {
            service: "web".into(),
            generation,
            asked_at: Instant::now(),
            result: Ok(replicas.to_vec()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_listing_begun_before_a_stop_does_not_adopt_the_stopped_instance() {
        let orch = FakeOrchestrator::default();
        let (mut s, mut registry, _rx) = scaler(&orch);
        // Ours from before a restart: adopted.
        let g = s.replicas.generation();
        let out = s.on_event(listed(g, &[replica("c1", true)]), &mut registry);
        assert_eq!(out.events, ["web: adopted running instance web-c1 (10.9.0.1:8080)"]);
        // Stopped and forgotten; a listing asked for before that still
        // shows it running, and must not bring it back.
        let out =
            s.on_event(ScalerEvent::Stopped { service: "web".into(), id: "c1".into(), result: Ok(()) }, &mut registry);
        assert_eq!(out.events, ["web: stopped instance web-c1"], "named as status names it, not by its id");
        let out = s.on_event(listed(g, &[replica("c1", true)]), &mut registry);
        assert!(out.events.is_empty(), "{:?}", out.events);
        assert_eq!(s.replicas.iter().count(), 0);
        let out = s.on_event(listed(s.replicas.generation(), &[replica("c1", true)]), &mut registry);
        assert_eq!(out.events.len(), 1, "a fresh listing adopts it");
    }

    #[tokio::test(start_paused = true)]
    async fn one_listing_at_a_time_and_a_round_that_decides_waits_for_it() {
        let orch = FakeOrchestrator::default();
        orch.lock().list = Answer::Hang;
        let (mut s, mut registry, mut rx) = scaler(&orch);
        s.poll(false);
        s.poll(true);
        s.poll(false);
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(rx.try_recv().is_err(), "the hung listing answered");
        // Its answer (here made by hand) is for a deciding round.
        let out = s.on_event(listed(s.replicas.generation(), &[]), &mut registry);
        assert!(out.decide);
        let out = s.on_event(listed(s.replicas.generation(), &[]), &mut registry);
        assert!(!out.decide, "decided twice on one round");
    }

    #[tokio::test(start_paused = true)]
    async fn an_exited_instance_leaves_the_registry_and_is_stopped() {
        let orch = FakeOrchestrator::default();
        let (mut s, mut registry, mut rx) = scaler(&orch);
        let r = replica("c1", true);
        s.on_event(ScalerEvent::Started { service: "web".into(), result: Ok(r.clone()) }, &mut registry);
        s.on_event(ScalerEvent::Probed { service: "web".into(), id: "c1".into(), error: None }, &mut registry);
        assert!(registry.service("web").unwrap().backends.contains_key(&r.socket()));
        orch.lock().instances.insert("c1".into(), r.clone());
        let out = s.on_event(listed(s.replicas.generation(), &[replica("c1", false)]), &mut registry);
        assert!(out.registry_changed);
        assert_eq!(out.exited, [r.socket()]);
        assert!(!registry.service("web").unwrap().backends.contains_key(&r.socket()));
        let Some(ScalerEvent::Stopped { id, result: Ok(()), .. }) = rx.recv().await else { panic!("no stop") };
        assert_eq!(id, "c1");
        assert_eq!(orch.lock().stopped, ["c1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_listing_asked_for_before_a_start_was_answered_is_no_exit() {
        let orch = FakeOrchestrator::default();
        let (mut s, mut registry, _rx) = scaler(&orch);
        let (generation, asked_at) = (s.replicas.generation(), Instant::now());
        tokio::time::advance(std::time::Duration::from_millis(300)).await;
        // The start is answered while the listing is under way; the listing
        // saw the container created, not yet running.
        let r = replica("c1", true);
        s.on_event(ScalerEvent::Started { service: "web".into(), result: Ok(r.clone()) }, &mut registry);
        let stale =
            ScalerEvent::Listed { service: "web".into(), generation, asked_at, result: Ok(vec![replica("c1", false)]) };
        let out = s.on_event(stale, &mut registry);
        assert!(out.events.is_empty(), "{:?}", out.events);
        assert!(out.exited.is_empty());
        assert_eq!(s.replicas.iter().count(), 1, "the new instance was taken for an exit");
        // A listing asked for afterwards that shows it stopped is an exit.
        let out = s.on_event(listed(s.replicas.generation(), &[replica("c1", false)]), &mut registry);
        assert_eq!(out.events.len(), 1, "{:?}", out.events);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_scaler_leaves_what_it_adopted_running() {
        let orch = FakeOrchestrator::default();
        let (mut s, mut registry, _rx) = scaler(&orch);
        let out = s.on_event(listed(s.replicas.generation(), &[replica("c1", true)]), &mut registry);
        assert_eq!(out.events.len(), 1, "{:?}", out.events);
        s.abandon().await;
        assert!(orch.lock().stopped.is_empty(), "stopped {:?}", orch.lock().stopped);
        assert!(!orch.lock().released, "the host set-up its instances need was undone");
        // With nothing adopted it shuts down.
        let orch = FakeOrchestrator::default();
        let (s, _registry, _rx) = scaler(&orch);
        s.abandon().await;
        assert!(orch.lock().released);
    }
}
