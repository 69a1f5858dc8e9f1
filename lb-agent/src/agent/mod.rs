//! `lb-agent run`: load, attach, apply the config, then serve: follow config
//! changes, control-API calls and health results, end drains, publish
//! snapshots, and detach everything on SIGINT or SIGTERM.
//!
//! One task owns all state; everything else (API connections, probes, the
//! metrics server) talks to it through channels, so no change ever races
//! another. That task never waits on slow I/O: orchestrator calls (and the
//! Docker and iptables work behind them), probes, connection-table walks and
//! timeline writes run in tasks of their own or on tokio's blocking pool,
//! and report back through channels. A `status` call is answered from a walk
//! that began after the call came in.
//!
//! The agent is generic over its ports (`ports`): `main.rs` wires the real
//! ones, the unit tests (`tests.rs`) the fakes of `testing`.
//!
//! - this file: the state, start-up, the loop, API calls and probes;
//! - `reload`: applying a config, with the orchestrators it needs;
//! - `walks`: the connection-table results: drains, flushes, snapshots;
//! - `flows`: the worker that walks and flushes the connection table;
//! - `scaler`: one scaled service's replicas.

mod config_file;
mod explain;
pub mod flows;
mod reload;
pub mod scaler;
#[cfg(test)]
mod tests;
mod walks;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::Instant,
};
use tracing::{info, warn};

use self::{
    flows::{FlowReport, FlowWorker, FlushFor},
    scaler::{ScaleCommand, Scaler, ScalerEvent, TickOutcome},
};
use crate::{
    config::{Config, ForwardMode, HealthCheckConfig, ServiceConfig, Tunnel},
    core::{
        deploy,
        health::Transition,
        overlay::Overlay,
        reconcile::{ApplySummary, Reconciler},
        registry::{Origin, Registry},
        replicas::FlowFigures,
    },
    ports::{ConntrackScan, Dataplane, OrchestratorFactory, Prober},
    serve::api::{self, Call, Request, Response},
    snapshot::SnapshotBuilder,
    status::{Event, HealthCheckCounts, Snapshot, MAX_EVENTS},
};

/// How often the config file is checked, drains are reviewed and a new
/// snapshot (with rates) is published.
const TICK: Duration = Duration::from_millis(500);
/// How often scaling decisions are taken.
pub const SCALE_TICK: Duration = Duration::from_secs(1);
/// How often scaled instances are checked for exits between decisions.
const EXIT_TICK: Duration = Duration::from_millis(250);

/// Where the agent listens, besides its config.
#[derive(Clone, Debug)]
pub struct Options {
    pub config: PathBuf,
    pub api_socket: PathBuf,
    pub metrics_address: Option<SocketAddr>,
    /// Where maps and links are pinned; `None` pins nothing.
    pub pin_dir: Option<PathBuf>,
    /// On SIGINT/SIGTERM, leave the pinned data plane running for the next
    /// agent to adopt, instead of removing it.
    pub keep_on_exit: bool,
}

impl Options {
    /// Who this agent is, on what it leaves behind (container labels): its
    /// pin directory, or its control socket when it pins nothing. Each is
    /// one running agent's (`adapters::lock`), and a restarted agent given
    /// the same options is the same agent.
    pub fn identity(&self) -> String {
        self.pin_dir.as_deref().unwrap_or(&self.api_socket).display().to_string()
    }
}

/// The outside world the agent drives.
pub struct Ports<D, F, P> {
    pub dataplane: D,
    /// Makes each scaled service's orchestrator.
    pub orchestrators: F,
    pub prober: P,
}

/// What the agent's loop listens to besides its own timers; `run` feeds
/// them from the control socket and signals.
pub struct Inputs {
    pub calls: mpsc::Receiver<Call>,
    /// SIGHUP: re-read the config.
    pub hangups: mpsc::Receiver<()>,
    /// SIGINT or SIGTERM (its name): shut down.
    pub shutdown: oneshot::Receiver<&'static str>,
}

struct ProbeResult {
    service: String,
    addr: SocketAddr,
    error: Option<String>,
    /// The error was a timeout.
    timed_out: bool,
    took: Duration,
}

/// A running probe loop, the check it was started with, and its results.
struct ProbeTask {
    check: HealthCheckConfig,
    handle: JoinHandle<()>,
    counts: HealthCheckCounts,
    /// The last probe's error, shown as the reason of a backend out of the
    /// table by health (one that never came up has no down event).
    last_error: Option<String>,
}

/// Agent-level work done off the loop.
enum Done<O> {
    /// The orchestrators of a reloaded config's newly scaled services.
    Prepared(anyhow::Result<Vec<(ServiceConfig, O)>>),
    /// A service that is no longer scaled has stopped its instances.
    Retired(String),
}

/// A reload whose orchestrators are being made, and who waits for it.
struct Preparing {
    config: Config,
    why: String,
    replies: Vec<oneshot::Sender<Response>>,
    task: JoinHandle<()>,
}

pub struct Agent<D: Dataplane, F: OrchestratorFactory, P: Prober> {
    dataplane: D,
    orchestrators: Arc<F>,
    prober: Arc<P>,
    reconciler: Reconciler,
    registry: Registry,
    /// The effective config: the file's with the overlay laid over it.
    config: Config,
    /// The config file as last applied.
    file_config: Config,
    /// Run-time changes (`backend add/remove/weight`) kept across reloads.
    overlay: Overlay,
    options: Options,
    events: VecDeque<Event>,
    errors: u64,
    probes: BTreeMap<(String, SocketAddr), ProbeTask>,
    probe_tx: mpsc::Sender<ProbeResult>,
    probe_rx: mpsc::Receiver<ProbeResult>,
    snapshots: SnapshotBuilder,
    published: watch::Sender<Arc<Snapshot>>,
    /// `lb-agent stop` asked for a shutdown that removes everything.
    stop_requested: bool,
    /// The last route lookup failed (reported once, not every tick).
    routes_failing: bool,
    scalers: BTreeMap<String, Scaler<F::Orchestrator, P>>,
    scaler_tx: mpsc::Sender<ScalerEvent>,
    scaler_rx: mpsc::Receiver<ScalerEvent>,
    /// Scalers of services no longer scaled, stopping their instances.
    retiring: Vec<JoinHandle<()>>,
    done_tx: mpsc::UnboundedSender<Done<F::Orchestrator>>,
    done_rx: mpsc::UnboundedReceiver<Done<F::Orchestrator>>,
    preparing: Option<Preparing>,
    /// Reloads asked for while one is being prepared: they run after it.
    queued_reload: Option<(String, Vec<oneshot::Sender<Response>>)>,
    /// Walks and flushes of the connection table.
    flows: FlowWorker,
    flow_rx: mpsc::Receiver<FlowReport>,
    /// The latest walk, for scaling decisions.
    latest_scan: Arc<ConntrackScan>,
    /// The walk the periodic tick waits for.
    tick_ticket: Option<u64>,
    /// The last walk ticket given out when the registry last changed: only
    /// a later walk may end a drain (it saw the flows the change left).
    changed_at: u64,
    /// `status` calls waiting for a walk, with their tickets.
    status_waiters: Vec<(u64, oneshot::Sender<Response>)>,
    /// Why socket load balancing is not attached, for `status`.
    socket_lb_note: String,
    /// The last reload refused, until one is applied (for `status`).
    config_refused: Option<Event>,
    /// The config file as the periodic tick last took it.
    watch: config_file::Watch,
    /// After a restart, until the first config is applied: instances left
    /// running that the adopted table has (`reload::serving_instances`).
    serving_at_start: Vec<(String, crate::ports::Replica)>,
    /// Clients waiting for a service at zero, as the data plane reports them.
    wakes: Option<mpsc::Receiver<crate::ports::Wake>>,
}

impl<D: Dataplane, F: OrchestratorFactory, P: Prober> Agent<D, F, P> {
    /// Attach and write the maps for `config` (loaded from
    /// `options.config`). A bad interface stops here with nothing left
    /// attached.
    pub async fn start(options: Options, config: Config, ports: Ports<D, F, P>) -> anyhow::Result<Self> {
        let Ports { dataplane, orchestrators, prober } = ports;
        let adopted = dataplane.adopted_state().context("read the pinned maps back")?;
        let restarted = adopted.is_some();
        let reconciler = match adopted {
            Some(state) => {
                info!(
                    services = state.services.len() + state.services6.len(),
                    backends = state.backends.len(),
                    "adopting pinned state"
                );
                Reconciler::adopt(state)
            }
            None => Reconciler::default(),
        };
        let mut registry = Registry::default();
        registry.start_down(reconciler.out_of_table());
        let (flow_tx, flow_rx) = mpsc::channel(64);
        let flows = FlowWorker::start(dataplane.connection_table()?, flow_tx);
        let mut dataplane = dataplane;
        let wakes = dataplane.wake_events();
        let (probe_tx, probe_rx) = mpsc::channel(256);
        let (scaler_tx, scaler_rx) = mpsc::channel(256);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let mut agent = Agent {
            dataplane,
            orchestrators: Arc::new(orchestrators),
            prober: Arc::new(prober),
            reconciler,
            registry,
            config: Config::default(),
            file_config: Config::default(),
            overlay: Overlay::default(),
            snapshots: SnapshotBuilder::new(options.config.display().to_string()),
            options,
            events: VecDeque::new(),
            errors: 0,
            probes: BTreeMap::new(),
            probe_tx,
            probe_rx,
            published: watch::Sender::new(Arc::new(Snapshot::default())),
            stop_requested: false,
            routes_failing: false,
            scalers: BTreeMap::new(),
            scaler_tx,
            scaler_rx,
            retiring: Vec::new(),
            done_tx,
            done_rx,
            preparing: None,
            queued_reload: None,
            flows,
            flow_rx,
            latest_scan: Arc::default(),
            tick_ticket: None,
            changed_at: 0,
            status_waiters: Vec::new(),
            socket_lb_note: String::new(),
            config_refused: None,
            watch: config_file::Watch::default(),
            serving_at_start: Vec::new(),
            wakes,
        };
        let made = reload::make_orchestrators(agent.orchestrators.clone(), agent.newly_scaled(&config)).await?;
        agent.serving_at_start = reload::serving_instances(&agent.reconciler, &made).await;
        let (summary, _) = agent.switch_to(config, made)?;
        for stale in agent.dataplane.stale_link_pins() {
            info!(pin = %stale.display(), "removing the pinned link of an interface no longer configured");
            std::fs::remove_file(&stale).with_context(|| format!("unpin {}", stale.display()))?;
        }
        agent.event(format!(
            "{}: {} service(s), {} table(s) written",
            if restarted { "restarted, adopted the running data plane" } else { "started" },
            agent.config.services.len(),
            summary.tables_rebuilt
        ));
        Ok(agent)
    }

    /// Snapshots as they are published (for the metrics server).
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.published.subscribe()
    }

    /// Write the registry's desired state to the maps, and start or stop
    /// probes to match.
    fn sync(&mut self) -> anyhow::Result<ApplySummary> {
        self.changed_at = self.flows.last_ticket();
        self.registry.advance_ramps(Instant::now());
        self.refresh_snat_sources();
        let summary = self
            .reconciler
            .apply(&self.registry.desired(), &mut self.dataplane)
            .context("write the load balancer's maps")?;
        self.sync_probes();
        Ok(summary)
    }

    /// Full NAT's default sources: the route's source towards each backend
    /// of a full-NAT service without a `source` of its own. A lookup that
    /// fails keeps the ones known (said once until it works).
    fn refresh_snat_sources(&mut self) {
        let desired = self.registry.desired();
        let addrs = crate::core::reconcile::route_sourced_backends(&desired);
        if addrs.is_empty() {
            return;
        }
        match self.dataplane.sources(&addrs) {
            Ok(sources) => {
                self.routes_failing = false;
                self.reconciler.set_route_sources(sources);
            }
            Err(e) => {
                if !std::mem::replace(&mut self.routes_failing, true) {
                    self.error(format!(
                        "looking up full NAT's source addresses failed: {e:#} (said once until it works)"
                    ));
                }
            }
        }
    }

    fn sync_if(&mut self, changed: bool) {
        if changed {
            if let Err(e) = self.sync() {
                self.error(format!("applying a scaling change failed: {e:#}"));
            }
        }
    }

    fn sync_probes(&mut self) {
        let mut wanted: BTreeMap<(String, SocketAddr), HealthCheckConfig> = BTreeMap::new();
        for (name, svc) in self.registry.services() {
            let Some(check) = &svc.config.health_check else { continue };
            let mut check = check.clone();
            if svc.config.mode == ForwardMode::DsrIpip {
                let vip = SocketAddr::new(svc.config.vip, svc.config.port);
                check.through_tunnel = Some(Tunnel { vip, protocol: svc.config.protocol });
            }
            for addr in svc.backends.keys() {
                wanted.insert((name.clone(), *addr), check.clone());
            }
        }
        self.probes.retain(|key, task| {
            let keep = wanted.get(key) == Some(&task.check);
            if !keep {
                task.handle.abort();
            }
            keep
        });
        for (key, check) in wanted {
            if self.probes.contains_key(&key) {
                continue;
            }
            let task = probe_loop(key.0.clone(), key.1, check.clone(), self.prober.clone(), self.probe_tx.clone());
            self.probes.insert(
                key,
                ProbeTask { check, handle: tokio::spawn(task), counts: Default::default(), last_error: None },
            );
        }
    }

    fn event(&mut self, message: String) {
        self.events.push_front(stamped(message));
        self.events.truncate(MAX_EVENTS);
    }

    fn error(&mut self, message: String) {
        self.errors += 1;
        self.event(message);
    }

    // -----------------------------------------------------------------------
    // Control-API calls and health results.

    /// Put the registry back as it was before a change whose map sync
    /// failed, so the refused change holds no backend (and no id) and the
    /// next sync does not retry it; the maps are brought back to match.
    fn roll_back(&mut self, before: Registry) {
        self.registry = before;
        if let Err(e) = self.sync() {
            self.error(format!("restoring the maps after a failed change failed: {e:#}"));
        }
    }

    fn handle_call(&mut self, request: Request, reply: oneshot::Sender<Response>) {
        let now = Instant::now();
        // What a failed map sync restores (see `roll_back`); small next to a
        // sync, and a status call's walk.
        let before = self.registry.clone();
        let change = match &request {
            Request::Status => {
                // Answered by the walk this asks for (`on_scanned`).
                let ticket = self.flows.request_scan();
                self.status_waiters.push((ticket, reply));
                return;
            }
            Request::Stop => {
                self.stop_requested = true;
                let _ = reply.send(Response::ok("stopping: detaching and removing pinned state"));
                return;
            }
            Request::Reload => return self.reload("api", vec![reply]),
            Request::PinReplicas { service, replicas } => {
                return self.scale_command(service, ScaleCommand::Pin(*replicas), reply)
            }
            Request::PauseScaling { service } => return self.scale_command(service, ScaleCommand::Pause, reply),
            Request::ResumeScaling { service } => return self.scale_command(service, ScaleCommand::Resume, reply),
            Request::ResetBackends { service, address } => {
                let response = self.reset_overlay(service, *address);
                let _ = reply.send(response);
                return;
            }
            Request::DumpConfig => {
                let _ = reply.send(self.dump_config());
                return;
            }
            Request::Explain { service, client, protocol, vip } => {
                return self.explain_flow(service, *client, *protocol, *vip, reply)
            }
            Request::AddBackend { service, address, weight } => self
                .registry
                .add_backend(service, *address, *weight)
                .map_err(|e| e.to_string())
                .and_then(|()| self.refuse_unroutable(service, *address))
                .map(|()| format!("{service}: added {address}")),
            Request::RemoveBackend { service, address } => self
                .registry
                .remove_backend(service, *address, now)
                .map(|()| format!("{service}: draining {address}"))
                .map_err(|e| e.to_string()),
            Request::SetWeight { service, address, weight } => self
                .registry
                .set_weight(service, *address, *weight)
                .map(|()| format!("{service}: {address} weight {weight}"))
                .map_err(|e| e.to_string()),
        };
        let response = match change {
            Err(e) => {
                // Nothing was synced: the registry goes back as it was (a
                // backend added, then refused for its route).
                self.registry = before;
                Response::error(e)
            }
            Ok(message) => match self.sync() {
                Ok(_) => {
                    self.record_run_time(&before, &request);
                    info!(change = message, "api change applied");
                    self.event(format!("api: {message}"));
                    Response::ok(message)
                }
                Err(e) => {
                    self.error(format!("api change {message} failed: {e:#}"));
                    self.roll_back(before);
                    Response::error(format!("{e:#}"))
                }
            },
        };
        let _ = reply.send(response);
    }

    /// `lb-agent scale`: pin, pause or resume a scaled service, then decide
    /// at once so the change acts without waiting for the next round.
    fn scale_command(&mut self, service: &str, command: ScaleCommand, reply: oneshot::Sender<Response>) {
        let Some(s) = self.scalers.get_mut(service) else {
            let why = match self.registry.service(service) {
                Some(_) => format!("{service} is not scaled (its config has no [service.scaling])"),
                None => format!("no service {service:?}"),
            };
            let _ = reply.send(Response::error(why));
            return;
        };
        let response = match s.command(command, crate::status::now_unix()) {
            Ok(message) => {
                s.poll(true);
                info!(change = message, "api scaling change");
                self.event(format!("api: {message}"));
                Response::ok(message)
            }
            Err(e) => Response::error(e),
        };
        let _ = reply.send(response);
    }

    /// Keep an applied API change in the overlay, so reloads keep it too;
    /// a scaled service's instances are its scaler's, and stay out of it.
    fn record_run_time(&mut self, before: &Registry, request: &Request) {
        let (Request::AddBackend { service, address, .. }
        | Request::SetWeight { service, address, .. }
        | Request::RemoveBackend { service, address }) = request
        else {
            return;
        };
        let entry = before.service(service).and_then(|e| e.backends.get(address));
        if entry.is_some_and(|b| b.origin == Origin::Scaler) {
            return;
        }
        let (file, addr) = (&self.file_config, *address);
        match request {
            Request::AddBackend { weight, .. } => self.overlay.add(file, service, addr, *weight),
            Request::SetWeight { weight, .. } => self.overlay.reweight(file, service, addr, *weight),
            _ => self.overlay.remove(file, service, addr),
        }
        self.config = self.overlay.apply(&self.file_config);
    }

    /// A backend added at run time must be one the data plane can reach:
    /// routed out of one of its service's interfaces.
    fn refuse_unroutable(&self, service: &str, addr: SocketAddr) -> Result<(), String> {
        let Some(entry) = self.registry.service(service) else { return Ok(()) };
        // Routes are looked up for IPv4 only; an IPv6 backend is not judged.
        let Some(ip) = crate::core::vip::ipv4(addr.ip()) else { return Ok(()) };
        let routes = self.dataplane.routes(&[ip].into()).map_err(|e| format!("{e:#}"))?;
        match routes.get(&ip).and_then(|r| deploy::unroutable(&entry.config, r)) {
            Some(why) => Err(format!("backend {addr} cannot be served: {why}")),
            None => Ok(()),
        }
    }

    /// Routes change while the agent runs: flag the backends the host no
    /// longer routes out of their service's interfaces (out of the table
    /// while flagged), and take back those it does again.
    fn check_routes(&mut self) {
        let addrs = self.registry.backend_ips();
        if addrs.is_empty() {
            return;
        }
        let routes = match self.dataplane.routes(&addrs) {
            Ok(r) => r,
            Err(e) => {
                if !std::mem::replace(&mut self.routes_failing, true) {
                    self.error(format!("looking up the routes to backends failed: {e:#} (said once until it works)"));
                }
                return;
            }
        };
        self.routes_failing = false;
        let changed = self.registry.judge_routes(&routes);
        self.report_route_flags(&changed);
        if !changed.is_empty() {
            if let Err(e) = self.sync() {
                self.error(format!("applying a route change failed: {e:#}"));
            }
        }
    }

    /// Log and record backends flagged `unroutable`, or routable again.
    fn report_route_flags(&mut self, changed: &[(String, SocketAddr, Option<String>)]) {
        for (service, addr, why) in changed {
            match why {
                Some(why) => {
                    warn!(service, backend = %addr, why, "backend unroutable: out of the table");
                    self.event(format!("{service}: {addr} unroutable ({why})"));
                }
                None => {
                    info!(service, backend = %addr, "backend routable again: back in the table");
                    self.event(format!("{service}: {addr} routable again"));
                }
            }
        }
    }

    fn handle_probe(&mut self, r: ProbeResult) {
        if let Some(task) = self.probes.get_mut(&(r.service.clone(), r.addr)) {
            task.counts.record(r.error.is_none(), r.timed_out, r.took);
            task.last_error.clone_from(&r.error);
        }
        let transition = self.registry.observe_health(&r.service, r.addr, r.error.is_none());
        match transition {
            Some(Transition::Down) => {
                let why = r.error.unwrap_or_default();
                warn!(service = r.service, backend = %r.addr, error = why, "backend down: out of the table");
                self.event(format!("{}: {} down ({why})", r.service, r.addr));
            }
            Some(Transition::Up) => {
                info!(service = r.service, backend = %r.addr, "backend up: back in the table");
                self.event(format!("{}: {} up", r.service, r.addr));
            }
            None => return,
        }
        match self.sync() {
            // Once the backend is out of the table: a flow flushed before
            // would be put back on it by its next datagram.
            Ok(_) if transition == Some(Transition::Down) => self.flush_udp_flows(&r.service, r.addr),
            Ok(_) => {}
            Err(e) => {
                warn!(error = format!("{e:#}"), "applying a health change failed");
                self.error(format!("applying a health change failed: {e:#}"));
            }
        }
    }

    /// A UDP backend that went down loses its flows: a UDP flow has no end,
    /// so a client that keeps sending would stay on the dead backend for as
    /// long as the entry lives. Its next datagram picks a live one. TCP
    /// flows stay: a failed check does not mean their connections did.
    fn flush_udp_flows(&mut self, service: &str, addr: SocketAddr) {
        let Some(key) = self.registry.service(service).map(|e| e.config.key()) else { return };
        if key.proto() != lb_common::PROTO_UDP {
            return;
        }
        if let Some(id) = self.reconciler.backend_id(&key, addr) {
            self.reconciler.hold(id);
            self.flows.flush(id, FlushFor::Down { addr });
        }
    }

    // -----------------------------------------------------------------------
    // Scaling.

    /// Per-instance open connections (from the latest walk) and new-flow
    /// totals, by address.
    fn flow_figures(&self, service: &str) -> anyhow::Result<HashMap<SocketAddr, FlowFigures>> {
        let mut out = HashMap::new();
        let Some(entry) = self.registry.service(service) else { return Ok(out) };
        let key = entry.config.key();
        for addr in entry.backends.keys() {
            let Some(id) = self.reconciler.backend_id(&key, *addr) else { continue };
            let c = self.dataplane.backend_counters(id)?;
            let open = self.latest_scan.open.get(&id).copied().unwrap_or(0);
            out.insert(*addr, FlowFigures { open, new_flows_total: c.new_flows });
        }
        Ok(out)
    }

    /// A client waits for a service at zero: its scaler wakes it now.
    fn handle_wake(&mut self, wake: crate::ports::Wake) {
        let name = self.reconciler.services().find(|(_, s)| s.id == wake.service_id).map(|(_, s)| s.name.clone());
        if let Some(s) = name.and_then(|n| self.scalers.get_mut(&n)) {
            s.wake(wake.waited);
        }
    }

    fn handle_scaler_event(&mut self, event: ScalerEvent) {
        let Some((service, mut s)) = self.scalers.remove_entry(event.service()) else { return };
        let outcome = s.on_event(event, &mut self.registry);
        let decide = outcome.decide;
        let mut changed = self.take_outcome(&service, outcome);
        if decide {
            match self.flow_figures(&service) {
                Ok(flows) => {
                    let outcome = s.decide(&mut self.registry, &flows);
                    changed |= self.take_outcome(&service, outcome);
                }
                Err(e) => self.error(format!("reading flows for scaling failed: {e:#}")),
            }
        }
        self.scalers.insert(service, s);
        self.sync_if(changed);
    }

    /// Record a scaler's events and flush the flows of its exited
    /// instances; returns whether the registry changed.
    fn take_outcome(&mut self, service: &str, outcome: TickOutcome) -> bool {
        for e in outcome.events {
            self.event(e);
        }
        // The ids are still known until the next sync frees them.
        let key = self.registry.service(service).map(|e| e.config.key());
        for addr in outcome.exited {
            let Some(id) = key.and_then(|k| self.reconciler.backend_id(&k, addr)) else { continue };
            self.reconciler.hold(id);
            self.flows.flush(id, FlushFor::Exited { addr });
        }
        outcome.registry_changed
    }

    // -----------------------------------------------------------------------
    // The loop.

    fn tick(&mut self) {
        if self.watch.changed(config_file::FileSeen::of(&self.options.config)) {
            self.reload("file changed", Vec::new());
        }
        self.check_routes();
        // Slow start: ramping weights move on a step at a time.
        if self.registry.ramping() && self.registry.advance_ramps(Instant::now()) {
            if let Err(e) = self.sync() {
                self.error(format!("applying a slow-start step failed: {e:#}"));
            }
        }
        // Drains and the snapshot follow when the walk is in; a tick that
        // comes while the last one's walk is still under way adds nothing.
        if self.tick_ticket.is_none() {
            self.tick_ticket = Some(self.flows.request_scan());
        }
    }

    fn handle_done(&mut self, done: Done<F::Orchestrator>) {
        match done {
            Done::Prepared(made) => self.on_prepared(made),
            Done::Retired(name) => self.event(format!("{name}: no longer scaled; its instances were stopped")),
        }
    }

    /// Serve until SIGINT or SIGTERM (or `lb-agent stop`): the control
    /// socket, metrics, and the loop.
    pub async fn run(self) -> anyhow::Result<()> {
        let signals = Signals::new()?;
        let listener = api::bind(&self.options.api_socket).await?;
        let (call_tx, calls) = mpsc::channel::<Call>(64);
        let api_task = tokio::spawn(api::serve(listener, call_tx));
        let metrics_task = match self.options.metrics_address {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listen for metrics on {addr} (--metrics-address off to disable)"))?;
                info!(address = %addr, "serving Prometheus metrics on /metrics");
                Some(tokio::spawn(crate::serve::metrics::serve(listener, self.snapshots())))
            }
            None => None,
        };
        let (hup_tx, hangups) = mpsc::channel(4);
        let (stop_tx, shutdown) = oneshot::channel();
        let signal_task = tokio::spawn(signals.forward(hup_tx, stop_tx));
        let socket = self.options.api_socket.clone();
        let stopped = self.serve(Inputs { calls, hangups, shutdown }).await;
        signal_task.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        if let Err(e) = std::fs::remove_file(&socket) {
            warn!(error = %e, "could not remove the control socket");
        }
        if stopped {
            // Let the connection that asked read its answer.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        api_task.abort();
        Ok(())
    }

    /// The loop, until `inputs.shutdown` fires or a `stop` call comes; then
    /// stop every scaler's instances and detach (or, with `keep_on_exit`,
    /// leave the pinned data plane serving). Returns whether `stop` ended
    /// it.
    pub async fn serve(mut self, mut inputs: Inputs) -> bool {
        self.watch = config_file::Watch::new(config_file::FileSeen::of(&self.options.config));
        let mut tick = tokio::time::interval(TICK);
        let mut scale_tick = tokio::time::interval(SCALE_TICK);
        let mut exit_tick = tokio::time::interval(EXIT_TICK);
        exit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        scale_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.describe();
        info!(config = %self.options.config.display(), api = %self.options.api_socket.display(), "ready");
        loop {
            tokio::select! {
                why = &mut inputs.shutdown => {
                    info!("{}: shutting down", why.unwrap_or("input closed"));
                    break;
                }
                Some(()) = inputs.hangups.recv() => {
                    self.watch = config_file::Watch::new(config_file::FileSeen::of(&self.options.config));
                    self.reload("SIGHUP", Vec::new());
                }
                Some((request, reply)) = inputs.calls.recv() => {
                    self.handle_call(request, reply);
                    if self.stop_requested { info!("stop requested"); break; }
                }
                Some(result) = self.probe_rx.recv() => self.handle_probe(result),
                Some(event) = self.scaler_rx.recv() => self.handle_scaler_event(event),
                Some(report) = self.flow_rx.recv() => match report {
                    FlowReport::Scanned { ticket, result } => self.on_scanned(ticket, result),
                    FlowReport::Flushed { backend_id, why, result } => self.on_flushed(backend_id, why, result),
                },
                Some(done) = self.done_rx.recv() => self.handle_done(done),
                Some(wake) = recv_some(&mut self.wakes) => self.handle_wake(wake),
                _ = scale_tick.tick() => self.scalers.values_mut().for_each(|s| s.poll(true)),
                _ = exit_tick.tick(), if !self.scalers.is_empty() => self.scalers.values_mut().for_each(|s| s.poll(false)),
                _ = tick.tick() => self.tick(),
            }
        }
        self.shut_down().await
    }

    async fn shut_down(mut self) -> bool {
        for (_, task) in std::mem::take(&mut self.probes) {
            task.handle.abort();
        }
        if let Some(p) = self.preparing.take() {
            p.task.abort();
        }
        for (_, s) in std::mem::take(&mut self.scalers) {
            s.shut_down().await;
        }
        for t in std::mem::take(&mut self.retiring) {
            if let Err(e) = t.await {
                warn!(error = %e, "stopping a retired service's instances failed");
            }
        }
        if self.options.keep_on_exit && !self.stop_requested && self.options.pin_dir.is_some() {
            self.dataplane.keep_on_drop();
            info!("left the pinned data plane running for the next agent (--keep-on-exit)");
        } else {
            self.dataplane.remove_all();
            info!("detached; maps released");
        }
        self.stop_requested
    }

    fn describe(&self) {
        for (_, s) in self.reconciler.services() {
            info!(service = s.name, id = s.id, backends = s.backends.len(), "service live");
        }
        for a in self.dataplane.attachments() {
            info!(interface = a.interface, hook = %a.mode.hook(), mode = %a.mode, checksums = ?a.checksums, "hook");
        }
    }
}

/// The next item of an optional channel; never, without one.
async fn recv_some<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn probe_loop<P: Prober>(
    service: String,
    addr: SocketAddr,
    check: HealthCheckConfig,
    prober: Arc<P>,
    tx: mpsc::Sender<ProbeResult>,
) {
    let mut every = tokio::time::interval(check.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let started = Instant::now();
        let result = prober.probe(addr, &check).await;
        let took = started.elapsed();
        let timed_out = result.as_ref().is_err_and(|e| prober.is_timeout(e));
        let error = result.err().map(|e| e.to_string());
        if tx.send(ProbeResult { service: service.clone(), addr, error, timed_out, took }).await.is_err() {
            return;
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP, registered before anything is served.
struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Hand SIGHUPs to `hangups`, and the first SIGINT or SIGTERM to `stop`.
    async fn forward(mut self, hangups: mpsc::Sender<()>, stop: oneshot::Sender<&'static str>) {
        let name = loop {
            tokio::select! {
                _ = self.int.recv() => break "SIGINT",
                _ = self.term.recv() => break "SIGTERM",
                _ = self.hup.recv() => { let _ = hangups.send(()).await; }
            }
        };
        let _ = stop.send(name);
    }
}

/// `message`, with the time now.
fn stamped(message: String) -> Event {
    let unix_time = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    Event { unix_time, message }
}
