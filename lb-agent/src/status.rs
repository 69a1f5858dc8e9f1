//! One snapshot of what the agent and the data plane are doing. `lb-agent
//! status` prints it (a table, or JSON with `--json`) and `/metrics` renders
//! it for Prometheus, so the two never disagree.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub agent: AgentInfo,
    pub services: Vec<ServiceStatus>,
    /// Packets per verdict reason (`lb_common::Reason::name`), since load.
    pub reasons: Vec<ReasonCount>,
    pub maps: Vec<MapFill>,
    /// Most recent first, at most `MAX_EVENTS`.
    pub events: Vec<Event>,
    /// One entry per autoscaled service.
    #[serde(default)]
    pub scaling: Vec<ScalingStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ScalingStatus {
    pub service: String,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// What the last decision asked for.
    pub desired: u32,
    /// Starts asked for and not yet running.
    pub pending_starts: u32,
    pub replicas: Vec<ReplicaStatus>,
    /// Decisions that changed the count or the rule, most recent first.
    pub decisions: Vec<DecisionSummary>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub id: String,
    pub name: String,
    pub address: String,
    /// "starting", "ready", "draining" or "stopping".
    pub phase: String,
    pub cpu_percent: Option<f64>,
    /// From the instance's own request counter, where configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    pub age_seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecisionSummary {
    pub unix_time: f64,
    pub replicas: u32,
    pub current: u32,
    pub rule: String,
    pub reason: String,
}

pub const MAX_EVENTS: usize = 50;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: f64,
    pub config_path: String,
    /// Config (re)loads refused, map writes failed, probes that errored, ...
    pub errors_total: u64,
    pub interfaces: Vec<InterfaceStatus>,
    /// Socket load balancing, for clients on this host.
    #[serde(default)]
    pub socket_lb: SocketLbStatus,
    /// The last config reload refused, with its reason and time, while the
    /// config in force is older than it (cleared by the next one applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_refused: Option<Event>,
}

/// Socket load balancing: where its programs are attached, and what they did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketLbStatus {
    pub attached: bool,
    /// The cgroup v2 directory whose processes it serves (with the subtree).
    pub cgroup: Option<String>,
    /// Why it is not attached, when it is not.
    #[serde(default)]
    pub note: String,
    /// Calls by what the programs did (`lb_common::SockOp::name`).
    #[serde(default)]
    pub operations: Vec<SockOpCount>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockOpCount {
    pub op: String,
    pub count: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    /// Where the program runs: "xdp" or "tc".
    #[serde(default)]
    pub hook: String,
    /// "native" or "generic" (XDP), or "tc".
    pub xdp_mode: String,
    /// "complete" (`xdp_lb`) or "may-be-partial" (`xdp_lb_local`); "skb" at
    /// tc, where the kernel's helpers follow the skb's checksum state.
    #[serde(default)]
    pub checksums: String,
    /// Whether translated packets may leave by this interface on the fast
    /// path (XDP_REDIRECT/XDP_TX), skipping the kernel's stack.
    #[serde(default)]
    pub fast_path: bool,
    /// Why (or why not).
    #[serde(default)]
    pub fast_path_reason: String,
    /// Translated packets that arrived here, by the way they left
    /// (`lb_common::Path::name`); zeros left out.
    #[serde(default)]
    pub paths: Vec<PathCount>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathCount {
    pub path: String,
    /// Whether this path skips the kernel's stack.
    pub fast: bool,
    pub packets: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub port: u16,
    /// "tcp" or "udp".
    pub protocol: String,
    /// Forwarding mode, e.g. "dnat".
    pub mode: String,
    pub interfaces: Vec<String>,
    pub counters: Traffic,
    pub backends: Vec<BackendStatus>,
    /// Backends new flows can go to (in the Maglev table). At 0 new flows
    /// are refused at once: a TCP reset, an ICMP port unreachable for UDP.
    #[serde(default)]
    pub usable_backends: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// "ip:port".
    pub address: String,
    /// "active", "draining" or "down".
    pub state: String,
    pub weight: u32,
    /// Whether new flows can be sent to it (in the Maglev table).
    pub in_table: bool,
    /// Share of the service's Maglev slots, 0..1.
    pub table_share: f64,
    /// Open flows from the connection table (TCP without FIN/RST, UDP active
    /// within 30 s).
    pub open_connections: u64,
    /// Seconds left before a drain cuts the remaining flows.
    pub drain_seconds_left: Option<f64>,
    pub counters: Traffic,
}

/// Totals since the backend (or service) appeared, and rates over the last
/// sampling interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub closed_flows: u64,
    pub packets_per_second: f64,
    pub bytes_per_second: f64,
    pub new_flows_per_second: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCount {
    pub reason: String,
    /// "pass", "drop", "forward" or "refuse" (answered for want of a backend).
    pub verdict: String,
    pub packets: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapFill {
    pub name: String,
    pub entries: u64,
    pub max_entries: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub unix_time: f64,
    pub message: String,
}

impl Snapshot {
    /// The human table `lb-agent status` prints.
    pub fn render_table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let a = &self.agent;
        let _ = writeln!(
            out,
            "lb-agent {}  pid {}  up {}  errors {}  config {}",
            a.version,
            a.pid,
            human_duration(a.uptime_seconds),
            a.errors_total,
            a.config_path
        );
        if let Some(r) = &a.config_refused {
            let ago = human_duration((now_unix() - r.unix_time).max(0.0));
            let _ = writeln!(out, "last reload refused {ago} ago (the config in force is older): {}", r.message);
        }
        let hooks: Vec<String> = a
            .interfaces
            .iter()
            .map(|i| match i.xdp_mode.as_str() {
                "tc" => format!("{} (tc)", i.name),
                mode => format!("{} (xdp {mode}, checksums {})", i.name, i.checksums),
            })
            .collect();
        let _ = writeln!(out, "attached: {}", if hooks.is_empty() { "nowhere".into() } else { hooks.join(", ") });
        for i in &a.interfaces {
            let onoff = if i.fast_path { "on" } else { "off" };
            let paths: Vec<String> = i.paths.iter().map(|p| format!("{} {}", p.path, p.packets)).collect();
            let paths = if paths.is_empty() { "no translated packets yet".into() } else { paths.join(", ") };
            // At tc, what arrives leaves by bpf_redirect whatever the fast
            // path says; the fast path is then only XDP's way into it.
            let fast = match i.hook.as_str() {
                "tc" => format!("tc, redirects into any device; XDP fast path into it {onoff}"),
                _ => format!("fast path {onoff}"),
            };
            let _ = writeln!(out, "  {}: {fast} ({}); arrived here: {paths}", i.name, i.fast_path_reason);
        }
        let sock = &a.socket_lb;
        match &sock.cgroup {
            Some(cgroup) if sock.attached => {
                let ops: Vec<String> = sock.operations.iter().map(|o| format!("{} {}", o.op, o.count)).collect();
                let _ = writeln!(out, "socket lb: attached to {cgroup} (clients on this host); {}", ops.join(", "));
            }
            _ if sock.note.is_empty() => {
                let _ = writeln!(out, "socket lb: not attached");
            }
            _ => {
                let _ = writeln!(out, "socket lb: not attached ({})", sock.note);
            }
        }
        for s in &self.services {
            let _ = writeln!(
                out,
                "\nservice {}  {}:{}/{}  mode {}  on {}  {} pkt/s  {} new flows/s",
                s.name,
                s.vip,
                s.port,
                s.protocol,
                s.mode,
                s.interfaces.join(","),
                human_rate(s.counters.packets_per_second),
                human_rate(s.counters.new_flows_per_second),
            );
            let _ = writeln!(
                out,
                "  {:<22} {:<9} {:>6} {:>6} {:>6} {:>8} {:>8} {:>9}",
                "BACKEND", "STATE", "WEIGHT", "SHARE", "OPEN", "NEW/S", "PKT/S", "BYTES/S"
            );
            for b in &s.backends {
                let state = match b.drain_seconds_left {
                    Some(left) => format!("{} {}s", b.state, left.ceil() as u64),
                    None => b.state.clone(),
                };
                let _ = writeln!(
                    out,
                    "  {:<22} {:<9} {:>6} {:>5.1}% {:>6} {:>8} {:>8} {:>9}",
                    b.address,
                    state,
                    b.weight,
                    b.table_share * 100.0,
                    b.open_connections,
                    human_rate(b.counters.new_flows_per_second),
                    human_rate(b.counters.packets_per_second),
                    human_rate(b.counters.bytes_per_second),
                );
            }
            if s.usable_backends == 0 {
                let why = if s.backends.is_empty() { "no backends" } else { "none active, weighted and up" };
                let _ = writeln!(out, "  0 usable backends ({why}): new clients are refused (TCP reset, ICMP unreachable)");
            }
        }
        for sc in &self.scaling {
            let _ = writeln!(
                out,
                "\nscaling {}  desired {}  (min {}, max {})  starting now {}",
                sc.service, sc.desired, sc.min_replicas, sc.max_replicas, sc.pending_starts
            );
            for r in &sc.replicas {
                let cpu = r.cpu_percent.map_or("-".into(), |c| format!("{c:.0}%"));
                let _ = writeln!(
                    out,
                    "  {:<16} {:<22} {:<9} cpu {:>5}  up {}",
                    r.name,
                    r.address,
                    r.phase,
                    cpu,
                    human_duration(r.age_seconds)
                );
            }
            for d in sc.decisions.iter().take(5) {
                let ago = (now_unix() - d.unix_time).max(0.0);
                let _ = writeln!(
                    out,
                    "  {:>8} ago  {} -> {}  {}: {}",
                    human_duration(ago),
                    d.current,
                    d.replicas,
                    d.rule,
                    d.reason
                );
            }
        }
        for (verdict, title) in [("refuse", "refused"), ("drop", "drops")] {
            let counts: Vec<String> = self
                .reasons
                .iter()
                .filter(|r| r.verdict == verdict && r.packets > 0)
                .map(|r| format!("{} {}", r.reason, r.packets))
                .collect();
            if !counts.is_empty() {
                let _ = writeln!(out, "\n{title}: {}", counts.join(", "));
            }
        }
        if !self.events.is_empty() {
            let _ = writeln!(out, "\nrecent events:");
            for e in self.events.iter().take(10) {
                let ago = (now_unix() - e.unix_time).max(0.0);
                let _ = writeln!(out, "  {:>8} ago  {}", human_duration(ago), e.message);
            }
        }
        out
    }
}

fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn human_duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn human_rate(x: f64) -> String {
    match x {
        x if x >= 1e9 => format!("{:.1}G", x / 1e9),
        x if x >= 1e6 => format!("{:.1}M", x / 1e6),
        x if x >= 1e3 => format!("{:.1}k", x / 1e3),
        x if x >= 10.0 => format!("{x:.0}"),
        x => format!("{x:.1}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_backends_states_and_drops() {
        let s = Snapshot {
            agent: AgentInfo {
                version: "0.1.0".into(),
                pid: 7,
                uptime_seconds: 75.0,
                config_path: "/etc/lb.toml".into(),
                errors_total: 1,
                interfaces: vec![
                    InterfaceStatus {
                        name: "eth0".into(),
                        hook: "xdp".into(),
                        xdp_mode: "native".into(),
                        checksums: "complete".into(),
                        ..Default::default()
                    },
                    InterfaceStatus {
                        name: "br0".into(),
                        hook: "tc".into(),
                        xdp_mode: "tc".into(),
                        checksums: "skb".into(),
                        fast_path_reason: "bridge: cannot transmit XDP frames".into(),
                        ..Default::default()
                    },
                ],
                socket_lb: Default::default(),
                config_refused: None,
            },
            services: vec![ServiceStatus {
                name: "web".into(),
                vip: "10.0.0.100".into(),
                port: 80,
                protocol: "tcp".into(),
                mode: "dnat".into(),
                interfaces: vec!["eth0".into()],
                counters: Traffic::default(),
                backends: vec![BackendStatus {
                    address: "10.1.0.1:80".into(),
                    state: "draining".into(),
                    weight: 1,
                    in_table: false,
                    table_share: 0.0,
                    open_connections: 3,
                    drain_seconds_left: Some(9.2),
                    counters: Traffic { new_flows_per_second: 1500.0, ..Traffic::default() },
                }],
                usable_backends: 0,
            }],
            reasons: vec![ReasonCount { reason: "drop_no_backend".into(), verdict: "drop".into(), packets: 4 }],
            maps: vec![],
            events: vec![],
            scaling: vec![],
        };
        let t = s.render_table();
        assert!(t.contains("up 1m15s  errors 1"), "{t}");
        assert!(t.contains("attached: eth0 (xdp native, checksums complete), br0 (tc)"), "{t}");
        assert!(t.contains("  eth0: fast path off"), "{t}");
        assert!(t.contains("  br0: tc, redirects into any device; XDP fast path into it off (bridge: "), "{t}");
        assert!(t.contains("service web  10.0.0.100:80/tcp  mode dnat"), "{t}");
        assert!(
            t.lines().any(|l| l.contains("10.1.0.1:80") && l.contains("draining 10s") && l.contains("1.5k")),
            "{t}"
        );
        assert!(t.contains("drops: drop_no_backend 4"), "{t}");
        assert!(
            t.contains("  0 usable backends (none active, weighted and up): new clients are refused (TCP reset, ICMP unreachable)"),
            "{t}"
        );
        assert!(t.contains("socket lb: not attached\n"), "{t}");
        let mut s = s;
        s.agent.socket_lb = SocketLbStatus {
            attached: true,
            cgroup: Some("/sys/fs/cgroup".into()),
            note: String::new(),
            operations: vec![SockOpCount { op: "translated".into(), count: 5 }],
        };
        let t = s.render_table();
        assert!(t.contains("socket lb: attached to /sys/fs/cgroup (clients on this host); translated 5"), "{t}");
    }
}
