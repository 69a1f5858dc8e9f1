//! The replica lifecycle of one scaled service, as bookkeeping: which
//! instances exist, in which phase, with their latest samples. No I/O and
//! no clock: the scaler (`agent::scaler`) starts, probes and stops
//! instances, and records here what it asked for and what came back.
//!
//! ```text
//! starting --first good probe--> ready --scale-down--> draining --drained--> stopping
//! starting --scale-down, or not ready in time--> stopping
//! any phase --the instance exited--> stopping --stopped--> (gone)
//! ```

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
};

use tokio::time::Instant;

use crate::{
    core::policy::{MetricsSnapshot, ReplicaMetrics},
    ports::Replica,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
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
    /// The word `status` shows.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
            Phase::Stopping => "stopping",
        }
    }
}

/// One instance and what the scaler knows of it.
pub struct Tracked {
    pub replica: Replica,
    pub started_at: Instant,
    pub phase: Phase,
    /// A readiness probe is under way.
    pub probing: bool,
    pub cpu_percent: Option<f64>,
    /// From the instance's own counter (`[service.instances.requests]`).
    pub requests_per_second: Option<f64>,
}

impl Tracked {
    /// Starting or ready: the instances a decision counts.
    pub fn is_active(&self) -> bool {
        matches!(self.phase, Phase::Starting | Phase::Ready)
    }
}

/// Per-instance figures from the data plane, by backend address.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowFigures {
    pub open: u64,
    pub new_flows_total: u64,
}

/// The instances of one service, by orchestrator id.
#[derive(Default)]
pub struct Replicas {
    tracked: BTreeMap<String, Tracked>,
    /// Starts asked for and not yet reported back.
    pending_starts: u32,
    /// New-flow totals at the previous snapshot, for per-instance rates.
    flows_before: HashMap<SocketAddr, (u64, Instant)>,
    /// Bumped whenever instances are forgotten.
    generation: u64,
}

impl Replicas {
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Tracked> {
        self.tracked.get_mut(id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tracked)> {
        self.tracked.iter()
    }

    pub fn pending_starts(&self) -> u32 {
        self.pending_starts
    }

    /// Changes whenever instances are forgotten: a listing the orchestrator
    /// began under another generation may still show a stopped instance
    /// running, and must not adopt it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether an instance in any phase serves at `addr`.
    pub fn owns(&self, addr: SocketAddr) -> bool {
        self.tracked.values().any(|t| t.replica.socket() == addr)
    }

    /// Running instances in `listed` that are not tracked: ours from before
    /// an agent restart (containers outlive the agent). None while starts
    /// are in flight: a container just started may be listed before its
    /// start is reported back.
    pub fn untracked_running(&self, listed: &[Replica]) -> Vec<Replica> {
        listed
            .iter()
            .filter(|r| self.pending_starts == 0 && r.running && !self.tracked.contains_key(&r.id))
            .cloned()
            .collect()
    }

    /// Track a new or adopted instance, starting at `now`; it joins the
    /// table after a good health check.
    pub fn track(&mut self, replica: Replica, now: Instant) {
        let tracked = Tracked {
            replica,
            started_at: now,
            phase: Phase::Starting,
            probing: false,
            cpu_percent: None,
            requests_per_second: None,
        };
        self.tracked.insert(tracked.replica.id.clone(), tracked);
    }

    /// A start was asked of the orchestrator.
    pub fn start_asked(&mut self) {
        self.pending_starts += 1;
    }

    /// The orchestrator answered a start: with the new instance, or `None`
    /// when it failed.
    pub fn start_answered(&mut self, started: Option<Replica>, now: Instant) {
        self.pending_starts = self.pending_starts.saturating_sub(1);
        if let Some(r) = started {
            self.track(r, now);
        }
    }

    /// The instance is gone (stopped, or its stop failed).
    pub fn forget(&mut self, id: &str) -> Option<Tracked> {
        self.generation += 1;
        self.tracked.remove(id)
    }

    /// Every instance, for a shutdown that stops them all.
    pub fn take_all(&mut self) -> BTreeMap<String, Tracked> {
        self.generation += 1;
        std::mem::take(&mut self.tracked)
    }

    /// Starting instances with no probe under way, marked as being probed.
    pub fn take_unprobed(&mut self) -> Vec<(String, SocketAddr)> {
        self.tracked
            .iter_mut()
            .filter(|(_, t)| t.phase == Phase::Starting && !t.probing)
            .map(|(id, t)| {
                t.probing = true;
                (id.clone(), t.replica.socket())
            })
            .collect()
    }

    /// The draining instance at `addr`, whose drain is over, moves on to
    /// being stopped; returns its id to stop.
    pub fn drained(&mut self, addr: SocketAddr) -> Option<String> {
        let (id, t) = self.tracked.iter_mut().find(|(_, t)| t.replica.socket() == addr)?;
        (t.phase == Phase::Draining).then(|| {
            t.phase = Phase::Stopping;
            id.clone()
        })
    }

    /// The latest CPU samples; an instance without one keeps its last.
    pub fn set_cpu(&mut self, cpu: &HashMap<String, f64>) {
        for (id, t) in self.tracked.iter_mut() {
            t.cpu_percent = cpu.get(id).copied().or(t.cpu_percent);
        }
    }

    /// The latest request rates; an instance without one has none.
    pub fn set_requests(&mut self, rps: &HashMap<String, f64>) {
        for (id, t) in self.tracked.iter_mut() {
            t.requests_per_second = rps.get(id).copied();
        }
    }

    /// What the policy decides from: the active instances with their
    /// samples, and new flows per second since the previous snapshot.
    pub fn metrics(
        &mut self,
        flows: &HashMap<SocketAddr, FlowFigures>,
        host_cpu_percent: Option<f64>,
        now: Instant,
    ) -> MetricsSnapshot {
        let mut replicas = Vec::new();
        let mut seen = HashMap::new();
        for (id, t) in self.tracked.iter().filter(|(_, t)| t.is_active()) {
            let f = flows.get(&t.replica.socket()).copied().unwrap_or_default();
            let rate = match self.flows_before.get(&t.replica.socket()) {
                Some((before, at)) if now > *at && f.new_flows_total >= *before => {
                    (f.new_flows_total - before) as f64 / now.duration_since(*at).as_secs_f64()
                }
                _ => 0.0,
            };
            seen.insert(t.replica.socket(), (f.new_flows_total, now));
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
        MetricsSnapshot { replicas, host_cpu_percent }
    }

    /// The active instances, by id and address.
    pub fn active_addrs(&self) -> Vec<(String, std::net::SocketAddrV4)> {
        self.tracked.iter().filter(|(_, t)| t.is_active()).map(|(id, t)| (id.clone(), t.replica.addr)).collect()
    }

    /// The instances a decision compares its count with: active ones and
    /// those asked for but not yet started.
    pub fn active(&self) -> u32 {
        self.count(Phase::Starting) + self.count(Phase::Ready) + self.pending_starts
    }

    fn count(&self, phase: Phase) -> u32 {
        self.tracked.values().filter(|t| t.phase == phase).count() as u32
    }

    /// Which `n` instances to let go: not-yet-ready ones first, then those
    /// with the fewest open connections, newest first among equals.
    pub fn victims(&self, n: u32, flows: &HashMap<SocketAddr, FlowFigures>) -> Vec<String> {
        let mut candidates: Vec<(&String, &Tracked)> = self.tracked.iter().filter(|(_, t)| t.is_active()).collect();
        candidates.sort_by_key(|(_, t)| {
            let open = flows.get(&t.replica.socket()).map_or(0, |f| f.open);
            (t.phase == Phase::Ready, open, std::cmp::Reverse(t.started_at))
        });
        candidates.into_iter().take(n as usize).map(|(id, _)| id.clone()).collect()
    }
}
