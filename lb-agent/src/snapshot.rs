//! Builds `status::Snapshot` from the registry, the reconciler, the data
//! plane's counters and a walk of its connection table, with rates from the
//! previous build.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::SystemTime,
};

use lb_common::{Counters, Reason, MAGLEV_TABLE_SIZE, MAX_BACKENDS, MAX_SERVICES};

use tokio::time::Instant;

use crate::{
    core::{
        overlay,
        reconcile::Reconciler,
        registry::{BackendState, Registry},
    },
    ports::{ConntrackScan, DataplaneReads},
    status::{
        AgentInfo, BackendStatus, Event, InterfaceStatus, MapFill, PathCount, ReasonCount, ScalingStatus,
        ServiceStatus, Snapshot, SockOpCount, SocketLbStatus, Traffic,
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
    /// Why socket load balancing is not attached, when it is not.
    pub socket_lb_note: &'a str,
    /// The last reload refused, while the running config is older.
    pub config_refused: Option<&'a Event>,
    /// The run-time changes laid over the file (`core::overlay`).
    pub run_time: &'a [overlay::Entry],
}

pub struct SnapshotBuilder {
    config_path: String,
    started: Instant,
    /// `started` as seconds since the Unix epoch.
    started_unix: f64,
    /// Last counters seen per service ("s/name") and backend ("b/name/addr").
    previous: HashMap<String, (Counters, Instant)>,
}

impl SnapshotBuilder {
    pub fn new(config_path: String) -> SnapshotBuilder {
        let started_unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        SnapshotBuilder { config_path, started: Instant::now(), started_unix, previous: HashMap::new() }
    }

    /// Rates are measured against the previous build that had `advance`
    /// set; only the agent's periodic tick sets it, so an on-demand `status`
    /// does not shorten the window `/metrics` sees.
    pub fn build(&mut self, advance: bool, src: Sources<'_>) -> anyhow::Result<Snapshot> {
        let Sources {
            registry,
            reconciler,
            dataplane,
            scan,
            events,
            errors,
            scaling,
            socket_lb_note,
            config_refused,
            run_time,
        } = src;
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
                    reason: b.unroutable.clone(),
                    weight: b.weight,
                    ramp_percent: registry.ramp_percent(name, *addr),
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
                    run_time: run_time.iter().find(|e| &e.service == name && e.addr == *addr).map(|e| e.to_string()),
                    health_checks: None,
                });
                seen.insert(bkey, (c, now));
            }
            services.push(ServiceStatus {
                name: name.clone(),
                vip: entry.config.vip.to_string(),
                port: entry.config.port,
                protocol: entry.config.protocol.to_string(),
                mode: entry.config.mode.to_string(),
                snat_sources: snat_sources(reconciler, &entry.config, entry.backends.keys()),
                interfaces: entry.config.interfaces.clone(),
                counters: self.traffic(&svc_key, counters, now),
                usable_backends: backends.iter().filter(|b| b.in_table).count() as u32,
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
                start_time_seconds: self.started_unix,
                config_path: self.config_path.clone(),
                errors_total: errors,
                interfaces: dataplane
                    .attachments()
                    .into_iter()
                    .map(|a| InterfaceStatus {
                        name: a.interface,
                        hook: a.mode.hook().to_string(),
                        xdp_mode: a.mode.to_string(),
                        checksums: a.checksums.map_or("skb".to_owned(), |c| c.to_string()),
                        fast_path: a.fast_path,
                        fast_path_reason: a.fast_path_reason,
                        paths: a
                            .paths
                            .into_iter()
                            .filter(|(_, n)| *n > 0)
                            .map(|(p, packets)| PathCount { path: p.name().into(), fast: p.is_fast(), packets })
                            .collect(),
                    })
                    .collect(),
                socket_lb: socket_lb_status(dataplane, socket_lb_note),
                config_refused: config_refused.cloned(),
            },
            maps: vec![
                fill(lb_common::SERVICES, services.len() as u64, MAX_SERVICES),
                fill(lb_common::BACKENDS, backend_count as u64, MAX_BACKENDS),
                fill(lb_common::CONNTRACK, scan.entries, scan.max_entries),
                // Full NAT's held source ports (one claim per flow).
                fill(lb_common::SNAT_FLOWS, scan.snat_claims, scan.max_entries),
                fill(lb_common::v6::CONNTRACK6, scan.entries6, scan.max_entries6),
                // The same over IPv6 (SNAT_FLOWS6 is sized as CONNTRACK6).
                fill(lb_common::v6::SNAT_FLOWS6, scan.snat_claims6, scan.max_entries6),
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

fn socket_lb_status(dataplane: &dyn DataplaneReads, note: &str) -> SocketLbStatus {
    let state = dataplane.socket_lb();
    SocketLbStatus {
        attached: state.cgroup.is_some(),
        cgroup: state.cgroup.map(|c| c.display().to_string()),
        note: note.to_owned(),
        operations: state.counters.into_iter().map(|(op, count)| SockOpCount { op: op.name().into(), count }).collect(),
    }
}

fn verdict(r: Reason) -> &'static str {
    match r {
        r if r.is_translated() => "forward",
        r if r.is_refused() => "refuse",
        r if r.is_drop() => "drop",
        _ => "pass",
    }
}

/// Full NAT: where the service's flows are sent from, each source once
/// ("configured" or "route"); "none" for a backend no route gives one.
/// Empty for other modes.
fn snat_sources<'a>(
    reconciler: &Reconciler,
    config: &crate::config::ServiceConfig,
    backends: impl Iterator<Item = &'a std::net::SocketAddr>,
) -> Vec<String> {
    if config.mode != crate::config::ForwardMode::FullNat {
        return Vec::new();
    }
    if let Some(source) = config.source {
        return vec![format!("{source} (configured)")];
    }
    let found: std::collections::BTreeSet<String> = backends
        .map(|a| {
            reconciler.snat_source(config, a.ip()).map_or_else(|| format!("none for {a}"), |s| format!("{s} (route)"))
        })
        .collect();
    found.into_iter().collect()
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

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use lb_common::CONNTRACK;

    use super::*;
    use crate::{
        config::{ChecksumMode, Config, HookMode, InterfaceConfig},
        ports::Dataplane as _,
        testing::SharedDataplane,
    };

    const CONFIG: &str = r#"
[[service]]
name = "web"
vip = "10.0.0.100"
port = 80
interfaces = ["eth0"]
drain_timeout = "10s"
[[service.backend]]
address = "10.1.0.1:80"
[[service.backend]]
address = "10.1.0.2:80"
weight = 3
"#;

    /// The registry and maps for `CONFIG`, written to a fake data plane.
    fn world() -> (Registry, Reconciler, SharedDataplane) {
        let config = Config::parse(CONFIG, Path::new("lb.toml")).unwrap();
        let mut registry = Registry::default();
        registry.set_config(&config, Instant::now());
        let mut reconciler = Reconciler::default();
        let mut dp = SharedDataplane::default();
        reconciler.apply(&registry.desired(), &mut dp).unwrap();
        dp.attach(
            "eth0",
            InterfaceConfig { hook: HookMode::Xdp, checksums: ChecksumMode::Complete, ..Default::default() },
        )
        .unwrap();
        (registry, reconciler, dp)
    }

    fn build(
        b: &mut SnapshotBuilder,
        advance: bool,
        (registry, reconciler, dp): &(Registry, Reconciler, SharedDataplane),
        scan: &ConntrackScan,
    ) -> Snapshot {
        let events = VecDeque::new();
        let sources = Sources {
            registry,
            reconciler,
            dataplane: dp,
            scan,
            events: &events,
            errors: 2,
            scaling: Vec::new(),
            socket_lb_note: "",
            config_refused: None,
            run_time: &[],
        };
        b.build(advance, sources).unwrap()
    }

    fn counters(packets: u64, new_flows: u64) -> Counters {
        Counters { packets, bytes: packets * 100, new_flows, ..Counters::default() }
    }

    #[tokio::test(start_paused = true)]
    async fn rates_are_measured_between_ticks_and_a_status_does_not_move_the_window() {
        let w = world();
        let id = |a: &str| w.2.lock().backend_id(a.parse().unwrap()).unwrap();
        let (b1, b2) = (id("10.1.0.1:80"), id("10.1.0.2:80"));
        let mut builder = SnapshotBuilder::new("lb.toml".into());
        let scan = ConntrackScan::default();
        w.2.lock().backend_counters.insert(b1, counters(1000, 10));
        let first = build(&mut builder, true, &w, &scan);
        assert_eq!(first.services[0].backends[0].counters.packets_per_second, 0.0, "no rate before two ticks");

        tokio::time::advance(Duration::from_millis(250)).await;
        w.2.lock().backend_counters.insert(b1, counters(1250, 12));
        let status = build(&mut builder, false, &w, &scan);
        assert_eq!(status.services[0].backends[0].counters.packets_per_second, 1000.0);

        tokio::time::advance(Duration::from_millis(250)).await;
        w.2.lock().backend_counters.insert(b1, counters(1500, 15));
        let tick = build(&mut builder, true, &w, &scan);
        let t = &tick.services[0].backends[0].counters;
        // Over the whole half second since the last tick, not since the status.
        assert_eq!((t.packets, t.packets_per_second, t.new_flows_per_second), (1500, 1000.0, 10.0));
        assert_eq!(t.bytes_per_second, 100_000.0);

        // A counter that went down (the id was reused) gives no rate.
        tokio::time::advance(Duration::from_millis(500)).await;
        w.2.lock().backend_counters.insert(b1, counters(10, 1));
        assert_eq!(build(&mut builder, true, &w, &scan).services[0].backends[0].counters.packets_per_second, 0.0);
        assert_eq!(tick.services[0].backends[1].counters, Traffic::default(), "b2 {b2} saw nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn backends_show_their_share_open_flows_and_drain() {
        let mut w = world();
        let id = |a: &str| w.2.lock().backend_id(a.parse().unwrap()).unwrap();
        let (b1, b2) = (id("10.1.0.1:80"), id("10.1.0.2:80"));
        w.0.remove_backend("web", "10.1.0.1:80".parse().unwrap(), Instant::now()).unwrap();
        let (registry, reconciler, dp) = &mut w;
        reconciler.apply(&registry.desired(), dp).unwrap();
        tokio::time::advance(Duration::from_secs(4)).await;
        dp.lock().reasons = vec![(Reason::Forwarded, 7), (Reason::DropNoBackend, 2), (Reason::PassNotIpv4, 1)];
        let scan = ConntrackScan {
            open: [(b1, 3), (b2, 1)].into(),
            entries: 8,
            max_entries: lb_common::CONNTRACK_MAX,
            snat_claims: 0,
            entries6: 2,
            max_entries6: lb_common::CONNTRACK_MAX,
            snat_claims6: 0,
        };
        let s = build(&mut SnapshotBuilder::new("lb.toml".into()), false, &w, &scan);

        let [one, two] = &s.services[0].backends[..] else { panic!("{:#?}", s.services) };
        assert_eq!((one.state.as_str(), one.in_table, one.open_connections), ("draining", false, 3));
        assert_eq!(one.drain_seconds_left, Some(6.0));
        assert_eq!(one.table_share, 0.0);
        assert_eq!((two.state.as_str(), two.in_table, two.open_connections, two.weight), ("active", true, 1, 3));
        assert_eq!(two.table_share, 1.0);
        assert_eq!(two.drain_seconds_left, None);

        let conntrack = s.maps.iter().find(|m| m.name == CONNTRACK).unwrap();
        assert_eq!((conntrack.entries, conntrack.max_entries), (8, lb_common::CONNTRACK_MAX as u64));
        let conntrack6 = s.maps.iter().find(|m| m.name == lb_common::v6::CONNTRACK6).unwrap();
        assert_eq!(conntrack6.entries, 2);
        let verdicts: Vec<(&str, &str, u64)> =
            s.reasons.iter().map(|r| (r.reason.as_str(), r.verdict.as_str(), r.packets)).collect();
        assert_eq!(
            verdicts,
            [("forwarded", "forward", 7), ("drop_no_backend", "drop", 2), ("pass_not_ipv4", "pass", 1)]
        );
        assert_eq!(s.agent.interfaces[0].name, "eth0");
        assert_eq!(s.agent.interfaces[0].checksums, "complete");
        assert_eq!(s.agent.errors_total, 2);
        assert_eq!(s.agent.config_path, "lb.toml");
    }
}
