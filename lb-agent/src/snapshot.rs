//! Builds `status::Snapshot` from the registry, the reconciler, the data
//! plane's counters and a walk of its connection table, with rates from the
//! previous build.

use std::collections::{BTreeMap, HashMap, VecDeque};

use lb_common::{Counters, Reason, CONNTRACK_MAX, MAGLEV_TABLE_SIZE, MAX_BACKENDS, MAX_SERVICES};

use tokio::time::Instant;

use crate::{
    core::{
        reconcile::Reconciler,
        registry::{BackendState, Registry},
    },
    ports::{ConntrackScan, DataplaneReads},
    status::{
        AgentInfo, BackendStatus, Event, InterfaceStatus, MapFill, ReasonCount, ScalingStatus, ServiceStatus, Snapshot,
        Traffic,
    },
};

/// Everything a snapshot is read from.
pub struct Sources<'a> {
    pub registry: &'a Registry,
    pub reconciler: &'a Reconciler,
    pub dataplane: &'a dyn DataplaneReads,
    /// A walk of the connection table taken for this build.
    pub scan: &'a ConntrackScan,
    pub events: &'a VecDeque<Event>,
    pub errors: u64,
    pub scaling: Vec<ScalingStatus>,
}

pub struct SnapshotBuilder {
    config_path: String,
    started: Instant,
    /// Last counters seen per service ("s/name") and backend ("b/name/addr").
    previous: HashMap<String, (Counters, Instant)>,
}

impl SnapshotBuilder {
    pub fn new(config_path: String) -> SnapshotBuilder {
        SnapshotBuilder { config_path, started: Instant::now(), previous: HashMap::new() }
    }

    /// Rates are measured against the previous build that had `advance`
    /// set; only the agent's periodic tick sets it, so an on-demand `status`
    /// does not shorten the window `/metrics` sees.
    pub fn build(&mut self, advance: bool, src: Sources<'_>) -> anyhow::Result<Snapshot> {
        let Sources { registry, reconciler, dataplane, scan, events, errors, scaling } = src;
        let now = Instant::now();
        let live: BTreeMap<_, _> = reconciler.services().map(|(k, s)| (*k, s)).collect();
        let mut services = Vec::new();
        let mut seen = HashMap::new();
        for (name, entry) in registry.services() {
            let key = entry.config.key();
            let Some(state) = live.get(&key) else { continue };
            let shares = table_shares(state.live_table());
            let svc_key = format!("s/{name}");
            let counters = dataplane.service_counters(state.id)?;
            let mut backends = Vec::new();
            for (addr, b) in &entry.backends {
                let Some(id) = reconciler.backend_id(&key, *addr) else { continue };
                let c = dataplane.backend_counters(id)?;
                let bkey = format!("b/{name}/{addr}");
                backends.push(BackendStatus {
                    address: addr.to_string(),
                    state: b.state_name().into(),
                    weight: b.weight,
                    in_table: b.in_table(),
                    table_share: shares.get(&id).copied().unwrap_or(0.0),
                    open_connections: scan.open.get(&id).copied().unwrap_or(0),
                    drain_seconds_left: match b.state {
                        BackendState::Draining { deadline } => {
                            Some(deadline.saturating_duration_since(now).as_secs_f64())
                        }
                        BackendState::Active => None,
                    },
                    counters: self.traffic(&bkey, c, now),
                });
                seen.insert(bkey, (c, now));
            }
            services.push(ServiceStatus {
                name: name.clone(),
                vip: entry.config.vip.to_string(),
                port: entry.config.port,
                protocol: entry.config.protocol.to_string(),
                mode: "dnat".into(),
                interfaces: entry.config.interfaces.clone(),
                counters: self.traffic(&svc_key, counters, now),
                backends,
            });
            seen.insert(svc_key, (counters, now));
        }
        if advance {
            self.previous = seen;
        }
        let reasons = dataplane
            .reason_counters()?
            .into_iter()
            .map(|(r, packets)| ReasonCount { reason: r.name().into(), verdict: verdict(r).into(), packets })
            .collect();
        let backend_count: usize = services.iter().map(|s| s.backends.len()).sum();
        Ok(Snapshot {
            agent: AgentInfo {
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                uptime_seconds: now.duration_since(self.started).as_secs_f64(),
                config_path: self.config_path.clone(),
                errors_total: errors,
                interfaces: dataplane
                    .attachments()
                    .into_iter()
                    .map(|a| InterfaceStatus {
                        name: a.interface,
                        xdp_mode: a.mode.to_string(),
                        checksums: a.checksums.to_string(),
                    })
                    .collect(),
            },
            maps: vec![
                fill(lb_common::SERVICES, services.len() as u64, MAX_SERVICES),
                fill(lb_common::BACKENDS, backend_count as u64, MAX_BACKENDS),
                fill(lb_common::CONNTRACK, scan.entries, CONNTRACK_MAX),
            ],
            services,
            reasons,
            events: events.iter().cloned().collect(),
            scaling,
        })
    }

    fn traffic(&self, key: &str, c: Counters, now: Instant) -> Traffic {
        let mut t = Traffic {
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            reply_packets: c.reply_packets,
            reply_bytes: c.reply_bytes,
            closed_flows: c.closed_flows,
            ..Traffic::default()
        };
        if let Some((p, at)) = self.previous.get(key) {
            let secs = now.duration_since(*at).as_secs_f64();
            // A counter that went down belongs to a reused id: no rate yet.
            if secs > 0.0 && c.packets >= p.packets && c.new_flows >= p.new_flows {
                t.packets_per_second = (c.packets + c.reply_packets - p.packets - p.reply_packets) as f64 / secs;
                t.bytes_per_second = (c.bytes + c.reply_bytes).saturating_sub(p.bytes + p.reply_bytes) as f64 / secs;
                t.new_flows_per_second = (c.new_flows - p.new_flows) as f64 / secs;
            }
        }
        t
    }
}

fn verdict(r: Reason) -> &'static str {
    match r {
        Reason::Forwarded | Reason::ReplyTranslated => "forward",
        r if r.is_drop() => "drop",
        _ => "pass",
    }
}

fn fill(name: &str, entries: u64, max: u32) -> MapFill {
    MapFill { name: name.into(), entries, max_entries: max as u64 }
}

/// Each backend id's share of a Maglev table.
fn table_shares(table: &[u32]) -> BTreeMap<u32, f64> {
    let mut counts = BTreeMap::new();
    for id in table {
        if *id != 0 {
            *counts.entry(*id).or_insert(0u32) += 1;
        }
    }
    counts.into_iter().map(|(id, n)| (id, n as f64 / MAGLEV_TABLE_SIZE as f64)).collect()
}
