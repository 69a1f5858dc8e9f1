//! The scaling loop of one service: collect metrics, decide, act.
//!
//! Scale-up starts an instance, waits for its first good health check, and
//! only then adds it to the table. Scale-down drains an instance (no new
//! flows; open ones finish or hit the drain deadline) and stops it once the
//! drain is over. An instance that exits leaves the table at once and the
//! next decision replaces it. Orchestrator calls that take time (start,
//! stop, first probe) run in tasks that report back through `ScalerEvent`s,
//! so the agent's loop never waits on them.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    io::Write as _,
    net::SocketAddrV4,
    sync::Arc,
    time::SystemTime,
};

use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};
use tracing::{info, warn};

use crate::{
    adapters::{
        docker::DockerOrchestrator,
        orchestrator::AnyOrchestrator,
        probe::probe,
        process::ProcessOrchestrator,
        requests::{rate, scrape},
    },
    config::{
        instances::{InstancesConfig, RequestsMetric, Selector},
        scaling::ScalingPolicy,
        CheckKind, HealthCheckConfig, ServiceConfig,
    },
    core::{
        policy::{decide, Decision, History, MetricsSnapshot, ReplicaMetrics},
        registry::Registry,
    },
    ports::{Orchestrator, Replica},
    status::{DecisionSummary, ReplicaStatus, ScalingStatus},
};

/// Decisions kept for `status`.
const KEEP_DECISIONS: usize = 20;

/// What spawned orchestrator work reports back to the agent's loop.
pub enum ScalerEvent {
    Started { service: String, result: Result<Replica, String> },
    Probed { service: String, id: String, error: Option<String> },
    Stopped { service: String, id: String, result: Result<(), String> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Running, not yet through its first health check: not in the table.
    Starting,
    /// In the table.
    Ready,
    /// Out of the table, connections finishing.
    Draining,
    /// Being stopped.
    Stopping,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
            Phase::Stopping => "stopping",
        }
    }
}

struct Tracked {
    replica: Replica,
    started_at: Instant,
    phase: Phase,
    probing: bool,
    cpu_percent: Option<f64>,
    /// From the instance's own counter (`[service.instances.requests]`).
    requests_per_second: Option<f64>,
}

/// Sample instance and host CPU once a second, until aborted.
async fn sample_cpu(
    service: String,
    orch: Arc<AnyOrchestrator>,
    into: Arc<std::sync::Mutex<HashMap<String, f64>>>,
    host: Arc<std::sync::Mutex<Option<f64>>>,
) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut host_before = read_host_cpu();
    loop {
        every.tick().await;
        let host_now = read_host_cpu();
        if let (Some(b), Some(n), Ok(mut h)) = (host_before, host_now, host.lock()) {
            *h = host_busy_percent(b, n);
        }
        host_before = host_now;
        match orch.cpu_percent().await {
            Ok(cpu) => {
                if let Ok(mut m) = into.lock() {
                    *m = cpu;
                }
            }
            Err(e) => warn!(service, error = %e, "reading instance CPU failed"),
        }
    }
}

/// Scrape each instance's request counter once a second, until aborted;
/// `into` gets a rate for every instance read twice in a row.
async fn sample_requests(
    metric: RequestsMetric,
    targets: Arc<std::sync::Mutex<Vec<(String, SocketAddrV4)>>>,
    into: Arc<std::sync::Mutex<HashMap<String, f64>>>,
) {
    // Validated with the config.
    let Ok(selector) = metric.counter.parse::<Selector>() else { return };
    let (selector, path) = (Arc::new(selector), Arc::new(metric.path));
    let mut last: HashMap<String, (f64, Instant)> = HashMap::new();
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let now: Vec<(String, SocketAddrV4)> = targets.lock().map(|t| t.clone()).unwrap_or_default();
        // All at once: one slow instance must not hold up the others.
        let reads: Vec<_> = now
            .into_iter()
            .map(|(id, addr)| {
                let (selector, path) = (selector.clone(), path.clone());
                tokio::spawn(async move {
                    let body = scrape(addr, &path, std::time::Duration::from_millis(800)).await;
                    (id, body.ok().and_then(|b| selector.sum(&b)), Instant::now())
                })
            })
            .collect();
        let (mut seen, mut rates) = (HashMap::new(), HashMap::new());
        for read in reads {
            let Ok((id, Some(value), at)) = read.await else { continue };
            if let Some(r) = last.get(&id).and_then(|before| rate(*before, (value, at))) {
                rates.insert(id.clone(), r);
            }
            seen.insert(id, (value, at));
        }
        last = seen;
        if let Ok(mut m) = into.lock() {
            *m = rates;
        }
    }
}

/// (busy, total) jiffies over all CPUs, from the first line of /proc/stat.
fn read_host_cpu() -> Option<(u64, u64)> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3)? + f.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn host_busy_percent((busy0, total0): (u64, u64), (busy1, total1): (u64, u64)) -> Option<f64> {
    let total = total1.checked_sub(total0).filter(|t| *t > 0)?;
    Some(100.0 * busy1.saturating_sub(busy0) as f64 / total as f64)
}

/// What forwarding to containers needs on the host, set up for as long as
/// the service scales with Docker and undone exactly on drop: an ACCEPT rule
/// in DOCKER-USER from each client interface to the network's bridge
/// (dockerd's FORWARD policy is DROP), and loose reverse-path filtering on
/// the bridge (translated replies come from the VIP, which is not routed
/// there; strict filtering would drop them).
pub struct DockerForwarding {
    rules: Vec<Vec<String>>,
}

impl DockerForwarding {
    fn set_up(clients: &[String], bridge: &str) -> anyhow::Result<DockerForwarding> {
        let mut done = DockerForwarding { rules: Vec::new() };
        for client in clients {
            let rule: Vec<String> =
                ["DOCKER-USER", "-i", client, "-o", bridge, "-j", "ACCEPT"].iter().map(|s| s.to_string()).collect();
            // -C: already there (left by an agent that was killed): take it
            // over rather than add a twin, so that our stop removes it.
            if iptables("-C", &rule).is_err() {
                iptables("-I", &rule)?;
            }
            done.rules.push(rule);
        }
        let key = format!("/proc/sys/net/ipv4/conf/{bridge}/rp_filter");
        if std::fs::read_to_string(&key).map(|v| v.trim() == "1").unwrap_or(false) {
            std::fs::write(&key, "0").map_err(|e| anyhow::anyhow!("set {key} to 0: {e}"))?;
            info!(bridge, "reverse-path filtering on the instances' bridge set to off");
        }
        if std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").map(|v| v.trim() == "1").unwrap_or(false) {
            warn!(
                "net.ipv4.conf.all.rp_filter is 1 (strict): replies from containers will be dropped; set it to 0 or 2"
            );
        }
        Ok(done)
    }
}

impl Drop for DockerForwarding {
    fn drop(&mut self) {
        for rule in &self.rules {
            if let Err(e) = iptables("-D", rule) {
                warn!(error = %e, "removing our DOCKER-USER rule failed");
            }
        }
    }
}

fn iptables(op: &str, rule: &[String]) -> anyhow::Result<()> {
    let out = std::process::Command::new("iptables")
        .arg("-w")
        .arg(op)
        .args(rule)
        .output()
        .map_err(|e| anyhow::anyhow!("run iptables: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "iptables {op} {}: {}",
        rule.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Per-instance figures from the data plane, by backend address.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowFigures {
    pub open: u64,
    pub new_flows_total: u64,
}

/// What a tick changed that the caller must write to the maps.
#[derive(Default)]
pub struct TickOutcome {
    pub registry_changed: bool,
    pub events: Vec<String>,
    /// Instances that exited and left the table at once: their flows
    /// should be flushed so clients fail fast instead of timing out.
    pub exited: Vec<SocketAddrV4>,
}

pub struct Scaler {
    service: String,
    policy: ScalingPolicy,
    instances: InstancesConfig,
    check: HealthCheckConfig,
    orch: Arc<AnyOrchestrator>,
    /// Latest CPU per instance, kept by a sampler task (Docker's stats API
    /// can take a second to answer; the agent's loop must not wait on it).
    cpu: Arc<std::sync::Mutex<HashMap<String, f64>>>,
    /// Host CPU busy, percent of all CPUs, from the same sampler.
    host_cpu: Arc<std::sync::Mutex<Option<f64>>>,
    /// Latest requests per second per instance, and the instances to read
    /// (both empty without `[service.instances.requests]`).
    requests: Arc<std::sync::Mutex<HashMap<String, f64>>>,
    scrape_targets: Arc<std::sync::Mutex<Vec<(String, SocketAddrV4)>>>,
    /// The CPU sampler, and the request counter's when configured.
    samplers: Vec<tokio::task::JoinHandle<()>>,
    /// Docker only: the firewall and sysctl settings forwarding needs.
    _forwarding: Option<DockerForwarding>,
    history: History,
    replicas: BTreeMap<String, Tracked>,
    /// Starts asked for and not yet reported back.
    pending_starts: u32,
    decisions: VecDeque<DecisionSummary>,
    last: Option<Decision>,
    /// New-flow totals at the previous tick, for per-instance rates.
    flows_before: HashMap<SocketAddrV4, (u64, Instant)>,
    events: mpsc::Sender<ScalerEvent>,
}

impl Scaler {
    pub async fn new(svc: &ServiceConfig, events: mpsc::Sender<ScalerEvent>) -> anyhow::Result<Scaler> {
        let (Some(policy), Some(instances)) = (svc.scaling.clone(), svc.instances.clone()) else {
            anyhow::bail!("service {} is not scaled", svc.name);
        };
        let (orch, forwarding) = match (&instances.process, &instances.docker) {
            (Some(spec), _) => {
                (AnyOrchestrator::Process(ProcessOrchestrator::new(&svc.name, spec.clone()).await?), None)
            }
            (None, Some(spec)) => {
                let o = DockerOrchestrator::new(&svc.name, spec.clone()).await?;
                let clients: Vec<String> = svc.interfaces.iter().filter(|i| **i != spec.bridge).cloned().collect();
                (AnyOrchestrator::Docker(Box::new(o)), Some(DockerForwarding::set_up(&clients, &spec.bridge)?))
            }
            (None, None) => anyhow::bail!("service {}: no orchestrator", svc.name),
        };
        let orch = Arc::new(orch);
        let cpu = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let host_cpu = Arc::new(std::sync::Mutex::new(None));
        let mut samplers =
            vec![tokio::spawn(sample_cpu(svc.name.clone(), orch.clone(), cpu.clone(), host_cpu.clone()))];
        let requests = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let scrape_targets = Arc::new(std::sync::Mutex::new(Vec::new()));
        if let Some(metric) = &instances.requests {
            samplers.push(tokio::spawn(sample_requests(metric.clone(), scrape_targets.clone(), requests.clone())));
        }
        // Readiness is the service's own check, or a TCP connect.
        let check = svc.health_check.clone().unwrap_or(HealthCheckConfig {
            kind: CheckKind::Tcp,
            path: "/".into(),
            expect_status: 200,
            interval: std::time::Duration::from_millis(200),
            timeout: None,
            rise: 1,
            fall: 1,
        });
        Ok(Scaler {
            service: svc.name.clone(),
            history: History::for_policy(&policy),
            policy,
            instances,
            check,
            orch,
            cpu,
            host_cpu,
            requests,
            scrape_targets,
            samplers,
            _forwarding: forwarding,
            replicas: BTreeMap::new(),
            pending_starts: 0,
            decisions: VecDeque::new(),
            last: None,
            flows_before: HashMap::new(),
            events,
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
    pub fn owns(&self, addr: SocketAddrV4) -> bool {
        self.replicas.values().any(|t| t.replica.addr == addr)
    }

    /// One round: notice exits, probe new instances, decide, act.
    pub async fn tick(&mut self, registry: &mut Registry, flows: &HashMap<SocketAddrV4, FlowFigures>) -> TickOutcome {
        let mut out = TickOutcome::default();
        let now = Instant::now();
        self.notice_exits(registry, &mut out).await;
        self.probe_starting();
        if let Ok(cpu) = self.cpu.lock() {
            for (id, t) in self.replicas.iter_mut() {
                t.cpu_percent = cpu.get(id).copied().or(t.cpu_percent);
            }
        }
        if let Ok(rps) = self.requests.lock() {
            for (id, t) in self.replicas.iter_mut() {
                t.requests_per_second = rps.get(id).copied();
            }
        }
        let snapshot = self.snapshot(flows, now);
        let decision = decide(&snapshot, &self.policy, &self.history, now);
        self.history.record(&decision, now);
        self.record(&decision, &mut out);
        self.act(&decision, registry, flows, &mut out);
        self.last = Some(decision);
        out
    }

    /// Only the exit check, between decisions: a crashed instance leaves
    /// the table within a fraction of a second, not at the next tick.
    pub async fn check_exits(&mut self, registry: &mut Registry) -> TickOutcome {
        let mut out = TickOutcome::default();
        self.notice_exits(registry, &mut out).await;
        out
    }

    async fn notice_exits(&mut self, registry: &mut Registry, out: &mut TickOutcome) {
        let listed = match self.orch.list().await {
            Ok(l) => l,
            Err(e) => {
                warn!(service = self.service, error = %e, "listing instances failed");
                return;
            }
        };
        // Running instances we do not track yet are ours from before an
        // agent restart (containers outlive the agent): adopt them; they join
        // the table after a good health check, like new ones.
        // (Not while starts are in flight: a container just started may be
        // listed before its Started event arrives.)
        let adopt: Vec<Replica> = listed
            .iter()
            .filter(|r| self.pending_starts == 0 && r.running && !self.replicas.contains_key(&r.id))
            .cloned()
            .collect();
        for r in adopt {
            let msg = format!("{}: adopted running instance {} ({})", self.service, r.name, r.addr);
            info!("{msg}");
            out.events.push(msg);
            let tracked = Tracked {
                replica: r.clone(),
                started_at: Instant::now(),
                phase: Phase::Starting,
                probing: false,
                cpu_percent: None,
                requests_per_second: None,
            };
            self.replicas.insert(r.id.clone(), tracked);
        }
        for r in listed.iter().filter(|r| !r.running) {
            let Some(t) = self.replicas.get_mut(&r.id) else { continue };
            if t.phase == Phase::Stopping {
                continue;
            }
            // Out of the table at once: there is nothing to drain to.
            if registry.forget(&self.service, t.replica.addr) {
                out.registry_changed = true;
                out.exited.push(t.replica.addr);
            }
            let msg = format!("{}: instance {} ({}) exited; removed, will be replaced", self.service, r.name, r.addr);
            warn!("{msg}");
            out.events.push(msg);
            t.phase = Phase::Stopping;
            self.spawn_stop(r.id.clone());
        }
    }

    fn probe_starting(&mut self) {
        for (id, t) in self.replicas.iter_mut().filter(|(_, t)| t.phase == Phase::Starting && !t.probing) {
            t.probing = true;
            let (tx, service, id, addr, check) =
                (self.events.clone(), self.service.clone(), id.clone(), t.replica.addr, self.check.clone());
            tokio::spawn(async move {
                let error = probe(addr, &check).await.err().map(|e| e.to_string());
                let _ = tx.send(ScalerEvent::Probed { service, id, error }).await;
            });
        }
    }

    fn snapshot(&mut self, flows: &HashMap<SocketAddrV4, FlowFigures>, now: Instant) -> MetricsSnapshot {
        let mut replicas = Vec::new();
        let mut seen = HashMap::new();
        for (id, t) in &self.replicas {
            if !matches!(t.phase, Phase::Starting | Phase::Ready) {
                continue;
            }
            let f = flows.get(&t.replica.addr).copied().unwrap_or_default();
            let rate = match self.flows_before.get(&t.replica.addr) {
                Some((before, at)) if now > *at && f.new_flows_total >= *before => {
                    (f.new_flows_total - before) as f64 / now.duration_since(*at).as_secs_f64()
                }
                _ => 0.0,
            };
            seen.insert(t.replica.addr, (f.new_flows_total, now));
            replicas.push(ReplicaMetrics {
                id: id.clone(),
                ready: t.phase == Phase::Ready,
                started_at: t.started_at,
                cpu_percent: t.cpu_percent,
                open_connections: f.open,
                new_flows_per_second: rate,
                requests_per_second: t.requests_per_second,
            });
        }
        self.flows_before = seen;
        if let Ok(mut targets) = self.scrape_targets.lock() {
            *targets = self
                .replicas
                .iter()
                .filter(|(_, t)| matches!(t.phase, Phase::Starting | Phase::Ready))
                .map(|(id, t)| (id.clone(), t.replica.addr))
                .collect();
        }
        let host_cpu_percent = self.host_cpu.lock().ok().and_then(|h| *h);
        MetricsSnapshot { replicas, host_cpu_percent }
    }

    fn record(&mut self, d: &Decision, out: &mut TickOutcome) {
        let unix_time =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        if let Some(path) = &self.instances.timeline {
            #[derive(Serialize)]
            struct Line<'a> {
                unix_time: f64,
                service: &'a str,
                #[serde(flatten)]
                decision: &'a Decision,
            }
            let line = serde_json::to_string(&Line { unix_time, service: &self.service, decision: d });
            let written = line.map_err(std::io::Error::other).and_then(|l| {
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
                writeln!(f, "{l}")
            });
            if let Err(e) = written {
                warn!(service = self.service, error = %e, path = %path.display(), "writing the timeline failed");
            }
        }
        let changed = self.last.as_ref().is_none_or(|l| l.replicas != d.replicas || l.rule != d.rule);
        if changed {
            self.decisions.push_front(DecisionSummary {
                unix_time,
                replicas: d.replicas,
                current: d.current,
                rule: d.rule.clone(),
                reason: d.reason.clone(),
            });
            self.decisions.truncate(KEEP_DECISIONS);
        }
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
        flows: &HashMap<SocketAddrV4, FlowFigures>,
        out: &mut TickOutcome,
    ) {
        let active = self.count(Phase::Starting) + self.count(Phase::Ready) + self.pending_starts;
        if d.replicas > active {
            for _ in active..d.replicas {
                self.spawn_start();
            }
        } else if d.replicas < active {
            for id in self.victims(active - d.replicas, flows) {
                let Some(t) = self.replicas.get_mut(&id) else { continue };
                if t.phase == Phase::Starting {
                    t.phase = Phase::Stopping;
                    self.spawn_stop(id);
                } else if registry.remove_backend(&self.service, t.replica.addr, Instant::now()).is_ok() {
                    t.phase = Phase::Draining;
                    out.registry_changed = true;
                    out.events
                        .push(format!("{}: draining instance {} ({})", self.service, t.replica.name, t.replica.addr));
                }
            }
        }
    }

    /// Which instances to let go: not-yet-ready ones first, then those with
    /// the fewest open connections, newest first among equals.
    fn victims(&self, n: u32, flows: &HashMap<SocketAddrV4, FlowFigures>) -> Vec<String> {
        let mut candidates: Vec<(&String, &Tracked)> =
            self.replicas.iter().filter(|(_, t)| matches!(t.phase, Phase::Starting | Phase::Ready)).collect();
        candidates.sort_by_key(|(_, t)| {
            let open = flows.get(&t.replica.addr).map_or(0, |f| f.open);
            (t.phase == Phase::Ready, open, std::cmp::Reverse(t.started_at))
        });
        candidates.into_iter().take(n as usize).map(|(id, _)| id.clone()).collect()
    }

    fn count(&self, phase: Phase) -> u32 {
        self.replicas.values().filter(|t| t.phase == phase).count() as u32
    }

    fn spawn_start(&mut self) {
        self.pending_starts += 1;
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

    /// Handle a report from spawned work. Returns an event message and
    /// whether the registry changed.
    pub fn on_event(&mut self, event: ScalerEvent, registry: &mut Registry) -> (Option<String>, bool) {
        match event {
            ScalerEvent::Started { result: Ok(r), .. } => {
                self.pending_starts = self.pending_starts.saturating_sub(1);
                let msg = format!("{}: started instance {} ({})", self.service, r.name, r.addr);
                self.replicas.insert(
                    r.id.clone(),
                    Tracked {
                        replica: r,
                        started_at: Instant::now(),
                        phase: Phase::Starting,
                        probing: false,
                        cpu_percent: None,
                        requests_per_second: None,
                    },
                );
                (Some(msg), false)
            }
            ScalerEvent::Started { result: Err(e), .. } => {
                self.pending_starts = self.pending_starts.saturating_sub(1);
                (Some(format!("{}: starting an instance failed: {e}", self.service)), false)
            }
            ScalerEvent::Probed { id, error, .. } => self.on_probe(&id, error, registry),
            ScalerEvent::Stopped { id, result, .. } => {
                self.replicas.remove(&id);
                match result {
                    Ok(()) => (Some(format!("{}: stopped instance {id}", self.service)), false),
                    Err(e) => (Some(format!("{}: stopping instance {id} failed: {e}", self.service)), false),
                }
            }
        }
    }

    fn on_probe(&mut self, id: &str, error: Option<String>, registry: &mut Registry) -> (Option<String>, bool) {
        let Some(t) = self.replicas.get_mut(id) else { return (None, false) };
        t.probing = false;
        if t.phase != Phase::Starting {
            return (None, false);
        }
        match error {
            None => match registry.add_instance(&self.service, t.replica.addr) {
                Ok(()) => {
                    t.phase = Phase::Ready;
                    let took = t.started_at.elapsed().as_secs_f64();
                    (
                        Some(format!(
                            "{}: instance {} ready after {took:.1}s; in the table",
                            self.service, t.replica.name
                        )),
                        true,
                    )
                }
                Err(e) => (Some(format!("{}: adding instance {} failed: {e}", self.service, t.replica.name)), false),
            },
            Some(_) if t.started_at.elapsed() < self.instances.ready_timeout => (None, false),
            Some(e) => {
                t.phase = Phase::Stopping;
                let name = t.replica.name.clone();
                self.spawn_stop(id.to_owned());
                (
                    Some(format!(
                        "{}: instance {name} not ready within {:?} ({e}); stopping it",
                        self.service, self.instances.ready_timeout
                    )),
                    false,
                )
            }
        }
    }

    /// A drain the registry finished: stop the instance behind it.
    pub fn on_drained(&mut self, addr: SocketAddrV4) {
        let Some((id, t)) = self.replicas.iter_mut().find(|(_, t)| t.replica.addr == addr) else { return };
        if t.phase == Phase::Draining {
            t.phase = Phase::Stopping;
            let id = id.clone();
            self.spawn_stop(id);
        }
    }

    /// Stop every instance (agent shutdown): drains are cut short.
    pub async fn stop_all(&mut self) {
        self.samplers.iter().for_each(|s| s.abort());
        for (id, t) in std::mem::take(&mut self.replicas) {
            if let Err(e) = self.orch.stop(&id).await {
                warn!(service = self.service, instance = t.replica.name, error = %e, "stop failed");
            }
        }
    }

    pub fn status(&self) -> ScalingStatus {
        ScalingStatus {
            service: self.service.clone(),
            min_replicas: self.policy.min_replicas,
            max_replicas: self.policy.max_replicas,
            desired: self.last.as_ref().map_or(0, |d| d.replicas),
            pending_starts: self.pending_starts,
            replicas: self
                .replicas
                .values()
                .map(|t| ReplicaStatus {
                    id: t.replica.id.clone(),
                    name: t.replica.name.clone(),
                    address: t.replica.addr.to_string(),
                    phase: t.phase.name().into(),
                    cpu_percent: t.cpu_percent,
                    requests_per_second: t.requests_per_second,
                    age_seconds: t.started_at.elapsed().as_secs_f64(),
                })
                .collect(),
            decisions: self.decisions.iter().cloned().collect(),
        }
    }
}

impl Drop for Scaler {
    fn drop(&mut self) {
        self.samplers.iter().for_each(|s| s.abort());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_cpu_from_proc_stat() {
        let a = parse_proc_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3\n").unwrap();
        assert_eq!(a, (200, 1000));
        let b = parse_proc_stat("cpu  250 0 150 800 100 0 0 0 0 0\n").unwrap();
        assert_eq!(host_busy_percent(a, b), Some(100.0 * 200.0 / 300.0));
        assert_eq!(host_busy_percent(b, b), None);
        assert!(parse_proc_stat("intr 1 2").is_none());
        assert!(read_host_cpu().is_some());
    }
}
