//! What the loop does with the connection-table worker's results
//! (`flows`): a walk ends the drains it shows over, publishes the periodic
//! snapshot and answers the `status` calls waiting for it; a flush reports
//! the end of a drain, or of an exited instance's flows.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use tokio::time::Instant;
use tracing::{info, warn};

use super::{flows::FlushFor, scaler::Scaler, Agent};
use crate::{
    ports::{ConntrackScan, Dataplane, OrchestratorFactory, Prober},
    serve::api::Response,
    snapshot::Sources,
    status::Snapshot,
};

impl<D: Dataplane, F: OrchestratorFactory, P: Prober> Agent<D, F, P> {
    /// A walk is in: end the drains it shows over and publish a snapshot
    /// (for the tick that asked), and answer the `status` calls it covers.
    pub(super) fn on_scanned(&mut self, ticket: u64, result: anyhow::Result<Arc<ConntrackScan>>) {
        if let Ok(scan) = &result {
            self.latest_scan = scan.clone();
        }
        if self.tick_ticket.is_some_and(|t| t <= ticket) {
            self.tick_ticket = None;
            if self.registry.is_draining() && ticket > self.changed_at {
                let ended = match &result {
                    Ok(scan) => self.finish_drains(scan),
                    Err(e) => Err(anyhow::anyhow!("walk the connection table: {e:#}")),
                };
                if let Err(e) = ended {
                    warn!(error = format!("{e:#}"), "drain check failed");
                    self.error(format!("drain check failed: {e:#}"));
                }
            }
            let snapshot = self.build_snapshot(true, &result);
            self.published.send_replace(Arc::new(snapshot));
        }
        let (answered, waiting) = std::mem::take(&mut self.status_waiters).into_iter().partition(|(t, _)| *t <= ticket);
        self.status_waiters = waiting;
        for (_, reply) in answered {
            let _ = reply.send(Response::status(self.build_snapshot(false, &result)));
        }
    }

    /// Every registered backend's id in the data plane.
    fn backend_ids(&self) -> BTreeMap<(String, SocketAddr), u32> {
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

    /// End the drains that are over: their flows are flushed (reported by
    /// `on_flushed`), and their ids held until then.
    fn finish_drains(&mut self, scan: &ConntrackScan) -> anyhow::Result<()> {
        let ids = self.backend_ids();
        let open_of =
            |name: &str, addr| ids.get(&(name.to_owned(), addr)).and_then(|id| scan.open.get(id)).copied().unwrap_or(0);
        let done = self.registry.finish_drains(Instant::now(), open_of);
        if done.is_empty() {
            return Ok(());
        }
        for (service, d) in done {
            match ids.get(&(service.clone(), d.addr)) {
                // Only closed (or idle UDP) flows remain, or the deadline
                // passed: forget them either way.
                Some(id) => {
                    self.reconciler.hold(*id);
                    self.flows.flush(*id, FlushFor::Drain { service, addr: d.addr, expired: d.expired });
                }
                None => self.drain_ended(&service, d.addr, None),
            }
        }
        self.sync()?;
        Ok(())
    }

    pub(super) fn on_flushed(&mut self, backend_id: u32, why: FlushFor, result: anyhow::Result<u64>) {
        self.reconciler.release(backend_id);
        let (addr, of) = match why {
            FlushFor::Drain { service, addr, expired } => {
                let cut = match result {
                    Ok(cut) => expired.then_some(cut),
                    Err(e) => {
                        self.error(format!("flushing flows of {addr} failed: {e:#}"));
                        None
                    }
                };
                return self.drain_ended(&service, addr, cut);
            }
            FlushFor::Exited { addr } => (addr, "an exited instance"),
            FlushFor::Down { addr } => (addr, "a UDP backend that went down"),
        };
        match result {
            Ok(cut) => info!(backend = %addr, open_flows = cut, "flows of {of} flushed"),
            Err(e) => self.error(format!("flushing flows of {addr} failed: {e:#}")),
        }
    }

    /// A drain is over (`cut`: at its deadline, with that many flows open);
    /// the instance behind it, if any, is stopped.
    fn drain_ended(&mut self, service: &str, addr: SocketAddr, cut: Option<u64>) {
        match cut {
            Some(cut) => {
                warn!(service, backend = %addr, open_flows = cut, "drain deadline passed; open flows cut");
                self.event(format!("{service}: {addr} drain deadline passed, {cut} open flow(s) cut"));
            }
            None => {
                info!(service, backend = %addr, "drained");
                self.event(format!("{service}: {addr} drained"));
            }
        }
        if let Some(s) = self.scalers.get_mut(service) {
            s.on_drained(addr);
        }
    }

    /// Each backend's health-check counts, from its probe loop, and for one
    /// out of the table with no other reason, its last probe's error.
    fn add_health_checks(&self, snapshot: &mut Snapshot) {
        for s in &mut snapshot.services {
            for b in &mut s.backends {
                let Ok(addr) = b.address.parse() else { continue };
                let task = self.probes.get(&(s.name.clone(), addr));
                b.health_checks = task.map(|t| t.counts);
                if !b.in_table && b.reason.is_none() {
                    b.reason = task.and_then(|t| t.last_error.clone());
                }
            }
        }
    }

    fn build_snapshot(&mut self, advance: bool, scan: &anyhow::Result<Arc<ConntrackScan>>) -> Snapshot {
        let built = match scan {
            Ok(scan) => {
                let run_time = self.overlay.entries(&self.file_config);
                let sources = Sources {
                    registry: &self.registry,
                    reconciler: &self.reconciler,
                    dataplane: &self.dataplane,
                    scan,
                    events: &self.events,
                    errors: self.errors,
                    scaling: self.scalers.values().map(Scaler::status).collect(),
                    socket_lb_note: &self.socket_lb_note,
                    config_refused: self.config_refused.as_ref(),
                    run_time: &run_time,
                };
                self.snapshots.build(advance, sources).map(|mut s| {
                    self.add_health_checks(&mut s);
                    s
                })
            }
            Err(e) => Err(anyhow::anyhow!("walk the connection table: {e:#}")),
        };
        match built {
            Ok(s) => s,
            Err(e) => {
                warn!(error = format!("{e:#}"), "reading the data plane's counters failed");
                self.errors += 1;
                (**self.published.borrow()).clone()
            }
        }
    }
}
