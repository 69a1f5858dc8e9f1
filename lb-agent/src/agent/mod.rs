//! `lb-agent run`: load, attach, apply the config, then serve: follow config
//! changes, control-API calls and health results, end drains, publish
//! snapshots, and detach everything on SIGINT or SIGTERM.
//!
//! One task owns all state; everything else (API connections, probes, the
//! metrics server) talks to it through channels, so no change ever races
//! another.

pub mod scaler;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use self::scaler::{Scaler, ScalerEvent, TickOutcome};
use crate::{
    adapters::{
        dataplane::{netdev, AyaDataplane},
        host_facts,
        probe::probe,
    },
    config::{Config, HealthCheckConfig},
    core::{
        deploy,
        health::Transition,
        reconcile::{ApplySummary, Reconciler},
        registry::Registry,
        replicas::FlowFigures,
    },
    serve::api::{self, Call, Request, Response},
    snapshot::{SnapshotBuilder, Sources},
    status::{Event, Snapshot, MAX_EVENTS},
};

/// How often the config file is checked, drains are reviewed and a new
/// snapshot (with rates) is published.
const TICK: Duration = Duration::from_millis(500);

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

struct ProbeResult {
    service: String,
    addr: SocketAddrV4,
    error: Option<String>,
}

/// A running probe loop and the check it was started with.
struct ProbeTask {
    check: HealthCheckConfig,
    handle: JoinHandle<()>,
}

pub struct Agent {
    dataplane: AyaDataplane,
    reconciler: Reconciler,
    registry: Registry,
    config: Config,
    options: Options,
    events: VecDeque<Event>,
    errors: u64,
    probes: BTreeMap<(String, SocketAddrV4), ProbeTask>,
    probe_tx: mpsc::Sender<ProbeResult>,
    probe_rx: mpsc::Receiver<ProbeResult>,
    snapshots: SnapshotBuilder,
    published: watch::Sender<Arc<Snapshot>>,
    /// `lb-agent stop` asked for a shutdown that removes everything.
    stop_requested: bool,
    scalers: BTreeMap<String, Scaler>,
    scaler_tx: mpsc::Sender<ScalerEvent>,
    scaler_rx: mpsc::Receiver<ScalerEvent>,
}

/// How often scaling decisions are taken.
const SCALE_TICK: Duration = Duration::from_secs(1);
/// How often scaled instances are checked for exits between decisions.
const EXIT_TICK: Duration = Duration::from_millis(250);

impl Agent {
    /// Validate the config, load the program, attach it and write the maps.
    /// A bad config or interface stops here with nothing left attached.
    pub async fn start(options: Options) -> anyhow::Result<Agent> {
        let config = Config::load(&options.config)?;
        let dataplane = AyaDataplane::load(options.pin_dir.as_deref())?;
        let reconciler = if dataplane.adopted() {
            let state = dataplane.read_pinned_state().context("read the pinned maps back")?;
            info!(services = state.services.len(), backends = state.backends.len(), "adopting pinned state");
            Reconciler::adopt(state)
        } else {
            Reconciler::default()
        };
        let (probe_tx, probe_rx) = mpsc::channel(256);
        let (scaler_tx, scaler_rx) = mpsc::channel(256);
        let adopted = dataplane.adopted();
        let mut agent = Agent {
            dataplane,
            reconciler,
            registry: Registry::default(),
            config: Config::default(),
            snapshots: SnapshotBuilder::new(options.config.display().to_string()),
            options,
            events: VecDeque::new(),
            errors: 0,
            probes: BTreeMap::new(),
            probe_tx,
            probe_rx,
            published: watch::Sender::new(Arc::new(Snapshot::default())),
            stop_requested: false,
            scalers: BTreeMap::new(),
            scaler_tx,
            scaler_rx,
        };
        let summary = agent.switch_to(config).await?;
        for stale in agent.dataplane.stale_link_pins() {
            info!(pin = %stale.display(), "removing the pinned link of an interface no longer configured");
            std::fs::remove_file(&stale).with_context(|| format!("unpin {}", stale.display()))?;
        }
        agent.event(format!(
            "{}: {} service(s), {} table(s) written",
            if adopted { "restarted, adopted the running data plane" } else { "started" },
            agent.config.services.len(),
            summary.tables_rebuilt
        ));
        Ok(agent)
    }

    /// Snapshots as they are published (for the metrics server).
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.published.subscribe()
    }

    /// Apply `config`: attach new interfaces, write the maps, detach the
    /// interfaces no service names any more. If attaching fails, the running
    /// config stays as it was.
    async fn switch_to(&mut self, config: Config) -> anyhow::Result<ApplySummary> {
        // Scalers first: their orchestrators make the bridges or networks
        // the service's interfaces name.
        self.prepare_scalers(&config).await?;
        check_interfaces(&config)?;
        check_deployment(&config)?;
        let wanted = interfaces(&config);
        let had = interfaces(&self.config);
        let mut attached_now = Vec::new();
        // Every wanted interface: new ones are attached, and one whose
        // `checksums` setting changed gets the other program in place.
        for iface in &wanted {
            let new = !had.contains(iface);
            let attached = self
                .dataplane
                .attach(iface, config.checksums(iface))
                .and_then(|mode| self.dataplane.set_fast_path(iface, config.fast_path(iface)).map(|_| mode));
            match attached {
                Ok(_) if new => attached_now.push(iface.clone()),
                Ok(_) => {}
                Err(e) => {
                    for done in &attached_now {
                        if let Err(e) = self.dataplane.detach(done) {
                            warn!(error = %e, interface = done, "rollback detach failed");
                        }
                    }
                    return Err(e);
                }
            }
        }
        self.registry.set_config(&config, tokio::time::Instant::now());
        let summary = self.sync()?;
        for iface in had.difference(&wanted) {
            self.dataplane.detach(iface)?;
        }
        self.config = config;
        self.retire_scalers().await;
        Ok(summary)
    }

    /// Write the registry's desired state to the maps, and start or stop
    /// probes to match.
    fn sync(&mut self) -> anyhow::Result<ApplySummary> {
        let summary = self
            .reconciler
            .apply(&self.registry.desired(), &mut self.dataplane)
            .context("write the load balancer's maps")?;
        self.sync_probes();
        Ok(summary)
    }

    fn sync_probes(&mut self) {
        let mut wanted: BTreeMap<(String, SocketAddrV4), HealthCheckConfig> = BTreeMap::new();
        for (name, svc) in self.registry.services() {
            let Some(check) = &svc.config.health_check else { continue };
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
            let handle = tokio::spawn(probe_loop(key.0.clone(), key.1, check.clone(), self.probe_tx.clone()));
            self.probes.insert(key, ProbeTask { check, handle });
        }
    }

    fn event(&mut self, message: String) {
        let unix_time =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        self.events.push_front(Event { unix_time, message });
        self.events.truncate(MAX_EVENTS);
    }

    fn error(&mut self, message: String) {
        self.errors += 1;
        self.event(message);
    }

    /// Re-read the config; a bad one is refused whole and the running one
    /// stays in force.
    async fn reload(&mut self, why: &str) -> Result<String, String> {
        let result = match Config::load(&self.options.config) {
            Err(e) => Err(anyhow::Error::from(e)),
            Ok(c) if c == self.config => Ok(None),
            Ok(c) => self.switch_to(c).await.map(Some),
        };
        match result {
            Ok(Some(s)) => {
                info!(
                    trigger = why,
                    services_added = s.services_added,
                    services_removed = s.services_removed,
                    backends_added = s.backends_added,
                    backends_removed = s.backends_removed,
                    tables_rebuilt = s.tables_rebuilt,
                    slots_written = s.slots_written,
                    "config applied"
                );
                let msg = format!(
                    "config applied ({why}): {} table(s) rebuilt, {} slot(s) written",
                    s.tables_rebuilt, s.slots_written
                );
                self.event(msg.clone());
                Ok(msg)
            }
            Ok(None) => {
                info!(trigger = why, "config unchanged");
                Ok("config unchanged".into())
            }
            Err(e) => {
                let msg = format!("config refused ({why}); keeping the running one: {e:#}");
                warn!(trigger = why, error = format!("{e:#}"), "config refused; keeping the running one");
                self.error(msg.clone());
                Err(msg)
            }
        }
    }

    async fn handle_call(&mut self, request: Request) -> Response {
        let now = tokio::time::Instant::now();
        let change = match &request {
            Request::Status => return Response::status(self.build_snapshot(false)),
            Request::Stop => {
                self.stop_requested = true;
                return Response::ok("stopping: detaching and removing pinned state");
            }
            Request::Reload => {
                return match self.reload("api").await {
                    Ok(m) => Response::ok(m),
                    Err(e) => Response::error(e),
                }
            }
            Request::AddBackend { service, address, weight } => {
                self.registry.add_backend(service, *address, *weight).map(|()| format!("{service}: added {address}"))
            }
            Request::RemoveBackend { service, address } => {
                self.registry.remove_backend(service, *address, now).map(|()| format!("{service}: draining {address}"))
            }
            Request::SetWeight { service, address, weight } => self
                .registry
                .set_weight(service, *address, *weight)
                .map(|()| format!("{service}: {address} weight {weight}")),
        };
        let message = match change {
            Ok(m) => m,
            Err(e) => return Response::error(e),
        };
        match self.sync() {
            Ok(_) => {
                info!(change = message, "api change applied");
                self.event(format!("api: {message}"));
                Response::ok(message)
            }
            Err(e) => {
                self.error(format!("api change {message} failed: {e:#}"));
                Response::error(format!("{e:#}"))
            }
        }
    }

    fn handle_probe(&mut self, r: ProbeResult) {
        match self.registry.observe_health(&r.service, r.addr, r.error.is_none()) {
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
        if let Err(e) = self.sync() {
            warn!(error = format!("{e:#}"), "applying a health change failed");
            self.error(format!("applying a health change failed: {e:#}"));
        }
    }

    /// Every registered backend's id in the data plane.
    fn backend_ids(&self) -> BTreeMap<(String, SocketAddrV4), u32> {
        let mut ids = BTreeMap::new();
        for (name, e) in self.registry.services() {
            let key = e.config.key();
            for addr in e.backends.keys() {
                if let Some(id) = self.reconciler.backend_id(&key, *addr) {
                    ids.insert((name.clone(), *addr), id);
                }
            }
        }
        ids
    }

    /// End the drains that are over; flush the flows of those that hit their
    /// deadline with connections still open.
    fn finish_drains(&mut self) -> anyhow::Result<()> {
        // The connection-table walk below is only needed during a drain.
        if !self.registry.is_draining() {
            return Ok(());
        }
        let open = self.dataplane.open_flows()?;
        let ids = self.backend_ids();
        let open_of =
            |name: &str, addr| ids.get(&(name.to_owned(), addr)).and_then(|id| open.get(id)).copied().unwrap_or(0);
        let done = self.registry.finish_drains(tokio::time::Instant::now(), open_of);
        if done.is_empty() {
            return Ok(());
        }
        for (service, d) in &done {
            let id = ids.get(&(service.clone(), d.addr)).copied();
            if let (true, Some(id)) = (d.expired, id) {
                let cut = self.dataplane.flush_backend_flows(id)?;
                warn!(service, backend = %d.addr, open_flows = cut, "drain deadline passed; open flows cut");
                self.event(format!("{service}: {} drain deadline passed, {cut} open flow(s) cut", d.addr));
            } else {
                // Only closed (or idle UDP) flows remain; forget them too.
                if let Some(id) = id {
                    self.dataplane.flush_backend_flows(id)?;
                }
                info!(service, backend = %d.addr, "drained");
                self.event(format!("{service}: {} drained", d.addr));
            }
            if let Some(s) = self.scalers.get_mut(service) {
                s.on_drained(d.addr);
            }
        }
        self.sync()?;
        Ok(())
    }

    /// Create the scalers `config` adds and give the others their new
    /// policy. A scaler that cannot be made refuses the config.
    async fn prepare_scalers(&mut self, config: &Config) -> anyhow::Result<()> {
        for svc in config.services.iter().filter(|s| s.scaling.is_some()) {
            if let Some(s) = self.scalers.get_mut(&svc.name) {
                if let Some(p) = svc.scaling.clone() {
                    s.set_policy(p);
                }
                continue;
            }
            let s = Scaler::new(svc, self.scaler_tx.clone())
                .await
                .with_context(|| format!("service {:?}: set up its instances", svc.name))?;
            info!(service = svc.name, "autoscaling");
            self.scalers.insert(svc.name.clone(), s);
        }
        Ok(())
    }

    /// Stop the scalers of services the running config no longer scales.
    async fn retire_scalers(&mut self) {
        let gone: Vec<String> = self
            .scalers
            .keys()
            .filter(|n| !self.config.services.iter().any(|s| &s.name == *n && s.scaling.is_some()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(mut s) = self.scalers.remove(&name) {
                s.stop_all().await;
                self.event(format!("{name}: no longer scaled; its instances were stopped"));
            }
        }
    }

    /// Per-instance open connections and new-flow totals, by address.
    fn flow_figures(&self) -> anyhow::Result<HashMap<SocketAddrV4, FlowFigures>> {
        let open = self.dataplane.open_flows()?;
        let mut out = HashMap::new();
        for (name, entry) in self.registry.services() {
            if !self.scalers.contains_key(name) {
                continue;
            }
            let key = entry.config.key();
            for addr in entry.backends.keys() {
                let Some(id) = self.reconciler.backend_id(&key, *addr) else { continue };
                let c = self.dataplane.backend_counters(id)?;
                out.insert(
                    *addr,
                    FlowFigures { open: open.get(&id).copied().unwrap_or(0), new_flows_total: c.new_flows },
                );
            }
        }
        Ok(out)
    }

    async fn scale_tick(&mut self) {
        if self.scalers.is_empty() {
            return;
        }
        let flows = match self.flow_figures() {
            Ok(f) => f,
            Err(e) => {
                self.error(format!("reading flows for scaling failed: {e:#}"));
                return;
            }
        };
        let mut scalers = std::mem::take(&mut self.scalers);
        let mut changed = false;
        for s in scalers.values_mut() {
            let outcome = s.tick(&mut self.registry, &flows).await;
            changed |= self.take_outcome(s.service(), outcome);
        }
        self.scalers = scalers;
        self.sync_if(changed);
    }

    /// Between decisions, only look for instances that exited.
    async fn exit_check(&mut self) {
        let mut scalers = std::mem::take(&mut self.scalers);
        let mut changed = false;
        for s in scalers.values_mut() {
            let outcome = s.check_exits(&mut self.registry).await;
            changed |= self.take_outcome(s.service(), outcome);
        }
        self.scalers = scalers;
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
            match self.dataplane.flush_backend_flows(id) {
                Ok(cut) => info!(backend = %addr, open_flows = cut, "flows of an exited instance flushed"),
                Err(e) => self.error(format!("flushing flows of {addr} failed: {e}")),
            }
        }
        outcome.registry_changed
    }

    fn sync_if(&mut self, changed: bool) {
        if changed {
            if let Err(e) = self.sync() {
                self.error(format!("applying a scaling change failed: {e:#}"));
            }
        }
    }

    fn handle_scaler_event(&mut self, event: ScalerEvent) {
        let service = match &event {
            ScalerEvent::Started { service, .. }
            | ScalerEvent::Probed { service, .. }
            | ScalerEvent::Stopped { service, .. } => service.clone(),
        };
        let Some(s) = self.scalers.get_mut(&service) else { return };
        let (msg, changed) = s.on_event(event, &mut self.registry);
        if let Some(m) = msg {
            info!("{m}");
            self.event(m);
        }
        if changed {
            if let Err(e) = self.sync() {
                self.error(format!("applying a scaling change failed: {e:#}"));
            }
        }
    }

    fn build_snapshot(&mut self, advance: bool) -> Snapshot {
        let scaling = self.scalers.values().map(Scaler::status).collect();
        let sources = Sources {
            registry: &self.registry,
            reconciler: &self.reconciler,
            dataplane: &self.dataplane,
            events: &self.events,
            errors: self.errors,
            scaling,
        };
        match self.snapshots.build(advance, sources) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = format!("{e:#}"), "reading the data plane's counters failed");
                self.errors += 1;
                (**self.published.borrow()).clone()
            }
        }
    }

    async fn tick(&mut self, mtime: &mut Option<SystemTime>) {
        let now = modified(&self.options.config);
        if now != *mtime {
            *mtime = now;
            let _ = self.reload("file changed").await;
        }
        if let Err(e) = self.finish_drains() {
            warn!(error = format!("{e:#}"), "drain check failed");
            self.error(format!("drain check failed: {e:#}"));
        }
        let snapshot = self.build_snapshot(true);
        self.published.send_replace(Arc::new(snapshot));
    }

    /// Serve until SIGINT or SIGTERM.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let listener = api::bind(&self.options.api_socket).await?;
        let (call_tx, mut calls) = mpsc::channel::<Call>(64);
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
        let mut mtime = modified(&self.options.config);
        let mut tick = tokio::time::interval(TICK);
        let mut scale_tick = tokio::time::interval(SCALE_TICK);
        let mut exit_tick = tokio::time::interval(EXIT_TICK);
        exit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        scale_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.describe();
        info!(config = %self.options.config.display(), api = %self.options.api_socket.display(), "ready");
        loop {
            tokio::select! {
                _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
                _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
                _ = sighup.recv() => { mtime = modified(&self.options.config); let _ = self.reload("SIGHUP").await; }
                Some((request, reply)) = calls.recv() => {
                    let _ = reply.send(self.handle_call(request).await);
                    if self.stop_requested { info!("stop requested"); break; }
                }
                Some(result) = self.probe_rx.recv() => self.handle_probe(result),
                Some(event) = self.scaler_rx.recv() => self.handle_scaler_event(event),
                _ = scale_tick.tick() => self.scale_tick().await,
                _ = exit_tick.tick(), if !self.scalers.is_empty() => self.exit_check().await,
                _ = tick.tick() => self.tick(&mut mtime).await,
            }
        }
        if let Some(t) = metrics_task {
            t.abort();
        }
        for (_, task) in std::mem::take(&mut self.probes) {
            task.handle.abort();
        }
        for (_, mut s) in std::mem::take(&mut self.scalers) {
            s.stop_all().await;
        }
        if let Err(e) = std::fs::remove_file(&self.options.api_socket) {
            warn!(error = %e, "could not remove the control socket");
        }
        if self.options.keep_on_exit && !self.stop_requested && self.options.pin_dir.is_some() {
            self.dataplane.keep_on_drop();
            info!("left the pinned data plane running for the next agent (--keep-on-exit)");
        } else {
            self.dataplane.remove_all();
            info!("detached; maps released");
        }
        if self.stop_requested {
            // Let the connection that asked read its answer.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        api_task.abort();
        Ok(())
    }

    fn describe(&self) {
        for (_, s) in self.reconciler.services() {
            info!(service = s.name, id = s.id, backends = s.backends.len(), "service live");
        }
        for (iface, mode, l4) in self.dataplane.attachments() {
            info!(interface = iface, mode = %mode, checksums = %l4, "xdp");
        }
    }
}

async fn probe_loop(service: String, addr: SocketAddrV4, check: HealthCheckConfig, tx: mpsc::Sender<ProbeResult>) {
    let mut every = tokio::time::interval(check.interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let error = probe(addr, &check).await.err().map(|e| e.to_string());
        if tx.send(ProbeResult { service: service.clone(), addr, error }).await.is_err() {
            return;
        }
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn interfaces(config: &Config) -> BTreeSet<String> {
    config.services.iter().flat_map(|s| s.interfaces.iter().cloned()).collect()
}

/// Refuse a config the data plane cannot serve here; log what it can serve
/// only in part (see `core::deploy`).
fn check_deployment(config: &Config) -> anyhow::Result<()> {
    let facts = host_facts::gather(config).context("read this host's addresses and interfaces")?;
    let mut refused = Vec::new();
    for f in deploy::judge(config, &facts) {
        match f.severity {
            deploy::Severity::Warn => warn!(finding = %f.text, "config can be served only in part"),
            deploy::Severity::Refuse => refused.push(f.text),
        }
    }
    anyhow::ensure!(refused.is_empty(), "config refused:\n  - {}", refused.join("\n  - "));
    Ok(())
}

/// Every named interface must exist before anything is attached (scaled
/// services' orchestrators have made their bridges by now).
fn check_interfaces(config: &Config) -> anyhow::Result<()> {
    let missing: Vec<String> = config
        .services
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.interfaces.iter().enumerate().map(move |(j, ifname)| (i, s, j, ifname)))
        .filter(|(_, _, _, ifname)| netdev::if_index(ifname).is_none())
        .map(|(i, s, j, ifname)| {
            format!("service[{i}] {:?}: interfaces[{j}]: no interface named {ifname:?} here", s.name)
        })
        .collect();
    anyhow::ensure!(missing.is_empty(), "config refused:\n  - {}", missing.join("\n  - "));
    Ok(())
}
