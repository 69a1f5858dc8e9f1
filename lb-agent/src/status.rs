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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    /// "native" or "generic".
    pub xdp_mode: String,
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
    /// "pass" or "drop" or "forward".
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
