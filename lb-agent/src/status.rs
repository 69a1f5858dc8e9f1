//! One snapshot of what the agent and the data plane are doing. `lb-agent
//! status` prints it (a table, or JSON with `--json`) and `/metrics` renders
//! it for Prometheus, so the two never disagree.

use std::collections::VecDeque;

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
    /// Decisions, most recent first; a run of equal no-op decisions is one
    /// entry with its `repeats` (see `record_decision`).
    pub decisions: Vec<DecisionSummary>,
    /// The value each rule acts on and its target, as the last decision saw
    /// them.
    #[serde(default)]
    pub metrics: Vec<ScalingMetric>,
    /// An operator's pin or pause (`lb-agent scale`), while it lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<ScalingHold>,
}

/// One metric a scaling rule acts on, with the value it holds to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScalingMetric {
    /// The config key: "cpu", "host_cpu", "connections",
    /// "new_flows_per_second" or "requests_per_second".
    pub metric: String,
    /// Its name in status and reasons: "cpu", "requests/s", ...
    pub label: String,
    /// "target" (target tracking), "up" (a threshold above which it scales
    /// up) or "down" (below which it may scale down).
    pub rule: String,
    /// The average over ready instances (the host's, for host CPU) that the
    /// last decision saw; none without a sample.
    pub value: Option<f64>,
    pub target: f64,
    /// "%" for CPU, "" otherwise.
    pub unit: String,
}

/// The operator holds the instance count: the policy does not decide.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScalingHold {
    /// "pinned" (`scale --replicas N`) or "paused" (`scale --pause`).
    pub mode: String,
    pub replicas: u32,
    /// When it began, seconds since the Unix epoch.
    pub since_unix_time: f64,
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
    /// When it was taken (the first of a collapsed run).
    pub unix_time: f64,
    /// When the last decision of a collapsed run was taken.
    #[serde(default)]
    pub last_unix_time: f64,
    pub replicas: u32,
    /// Instances that existed.
    pub current: u32,
    /// What the decision before asked for.
    #[serde(default)]
    pub previous: u32,
    pub rule: String,
    pub reason: String,
    /// Equal decisions in a row that changed nothing, collapsed into this one.
    #[serde(default = "one")]
    pub repeats: u32,
}

impl ReplicaStatus {
    /// Its row in `status` and `top`: name, address, phase, CPU, requests/s, age.
    pub fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.address.clone(),
            self.phase.clone(),
            self.cpu_percent.map_or("-".into(), |c| format!("{c:.0}%")),
            self.requests_per_second.map_or("-".into(), human_rate),
            human_duration(self.age_seconds),
        ]
    }
}

impl DecisionSummary {
    /// When it was last taken, by `now`.
    pub fn latest(&self) -> f64 {
        self.last_unix_time.max(self.unix_time)
    }

    /// Its row in `status` and `top`: when, the change (`2 -> 2 x14`), rule, reason.
    pub fn cells(&self, now: f64) -> Vec<String> {
        let repeats = if self.repeats > 1 { format!(" x{}", self.repeats) } else { String::new() };
        vec![
            ago(now, self.latest()),
            format!("{} -> {}{repeats}", self.previous, self.replicas),
            self.rule.clone(),
            self.reason.clone(),
        ]
    }
}

fn one() -> u32 {
    1
}

/// Put `d` at the front of `decisions` (most recent first), keeping at most
/// `keep`: a decision that changes nothing, after one with the same count
/// and rule that changed nothing either, only adds to that one's `repeats`
/// (and gives it its `last_unix_time` and reason), so a quiet hour is one
/// line.
pub fn record_decision(decisions: &mut VecDeque<DecisionSummary>, d: DecisionSummary, keep: usize) {
    let no_op = |x: &DecisionSummary| x.replicas == x.previous;
    if let Some(front) = decisions.front_mut() {
        if no_op(&d) && no_op(front) && front.replicas == d.replicas && front.rule == d.rule {
            let repeats = front.repeats.saturating_add(d.repeats);
            *front = DecisionSummary { repeats, unix_time: front.unix_time, last_unix_time: d.last_unix_time, ..d };
            return;
        }
    }
    decisions.push_front(d);
    decisions.truncate(keep);
}

pub const MAX_EVENTS: usize = 50;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: f64,
    /// When the agent started, in seconds since the Unix epoch.
    #[serde(default)]
    pub start_time_seconds: f64,
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
    /// Forwarding mode: "dnat" or "full-nat".
    pub mode: String,
    /// Full NAT: the addresses flows are sent from, each with where it
    /// comes from ("10.0.0.1 (configured)", "10.200.1.1 (route)").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snat_sources: Vec<String>,
    pub interfaces: Vec<String>,
    pub counters: Traffic,
    pub backends: Vec<BackendStatus>,
    /// Backends new flows can go to (in the Maglev table). At 0 new flows
    /// are refused at once: a TCP reset, an ICMP port unreachable for UDP.
    #[serde(default)]
    pub usable_backends: u32,
}

impl ServiceStatus {
    /// `vip:port` as an address is written: `[2001:db8::10]:80` for IPv6.
    pub fn endpoint(&self) -> String {
        match self.vip.parse::<std::net::IpAddr>() {
            Ok(ip) => std::net::SocketAddr::new(ip, self.port).to_string(),
            Err(_) => format!("{}:{}", self.vip, self.port),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// "ip:port".
    pub address: String,
    /// "active", "draining", "unroutable" or "down".
    pub state: String,
    /// Why it cannot take flows, where `state` alone does not say
    /// ("unroutable": how the host routes it, and the service's interfaces).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub weight: u32,
    /// While slow start ramps it up after it joined: the percent of its
    /// weight it has now (see `effective_weight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp_percent: Option<u32>,
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
    /// The run-time change (`lb-agent backend`) laid over the file's entry,
    /// e.g. "weight 3, file says 1"; reloads keep it until `backend reset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_time: Option<String>,
    /// Its health checks by result (none without a `health_check`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_checks: Option<HealthCheckCounts>,
}

/// A backend's health checks since its probing started (a changed check
/// starts it again), by result, and the time they took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthCheckCounts {
    pub ok: u64,
    /// Refused, reset, a wrong status, ...: an answer that was not good.
    pub fail: u64,
    /// No answer within the check's timeout.
    pub timeout: u64,
    /// Seconds all of them took, summed.
    pub seconds_total: f64,
}

impl BackendStatus {
    /// The weight it has in the table now: its weight, or its ramp's part
    /// of it while slow start ramps it up.
    pub fn effective_weight(&self) -> f64 {
        f64::from(self.weight) * f64::from(self.ramp_percent.unwrap_or(100)) / 100.0
    }
}

impl HealthCheckCounts {
    /// Count one probe: passed, or failed (by a timeout or otherwise), in `took`.
    pub fn record(&mut self, passed: bool, timed_out: bool, took: std::time::Duration) {
        match (passed, timed_out) {
            (true, _) => self.ok += 1,
            (false, true) => self.timeout += 1,
            (false, false) => self.fail += 1,
        }
        self.seconds_total += took.as_secs_f64();
    }

    /// Probes counted.
    pub fn count(&self) -> u64 {
        self.ok + self.fail + self.timeout
    }
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
    /// The human table `lb-agent status` prints, with ages counted to now.
    pub fn render_table(&self) -> String {
        self.render_at(now_unix())
    }

    /// The human table, with ages counted to `now` (seconds since the Unix
    /// epoch): a pure function of the snapshot.
    pub fn render_at(&self, now: f64) -> String {
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
            let _ = writeln!(
                out,
                "last reload refused {} (the config in force is older): {}",
                ago(now, r.unix_time),
                r.message
            );
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
        let full_nat = self.services.iter().any(|s| !s.snat_sources.is_empty());
        let mut claims =
            self.maps.iter().filter(|m| [lb_common::SNAT_FLOWS, lb_common::v6::SNAT_FLOWS6].contains(&&*m.name));
        if let Some(first) = claims.next().filter(|_| full_nat) {
            let _ = writeln!(
                out,
                "full nat: {} source port(s) held, one per flow (each source address has [dataplane] \
                 snat_port_min..=snat_port_max per backend)",
                first.entries + claims.map(|m| m.entries).sum::<u64>()
            );
        }
        for s in &self.services {
            let mode = match s.snat_sources.as_slice() {
                [] => s.mode.clone(),
                sources => format!("{} from {}", s.mode, sources.join(", ")),
            };
            let _ = writeln!(
                out,
                "\nservice {}  {}/{}  mode {}  on {}  {} pkt/s  {} new flows/s",
                s.name,
                s.endpoint(),
                s.protocol,
                mode,
                s.interfaces.join(","),
                human_rate(s.counters.packets_per_second),
                human_rate(s.counters.new_flows_per_second),
            );
            let mut rows = vec![cells(["BACKEND", "STATE", "WEIGHT", "SHARE", "OPEN", "NEW/S", "PKT/S", "BYTES/S"])];
            for b in &s.backends {
                let state = match b.drain_seconds_left {
                    Some(left) => format!("{} {}", b.state, human_duration(left.ceil())),
                    None => b.state.clone(),
                };
                rows.push(vec![
                    b.address.clone(),
                    state,
                    {
                        let ramp = b.ramp_percent.map_or(String::new(), |p| format!(" (ramp {p}%)"));
                        let star = if b.run_time.is_some() { " *" } else { "" };
                        format!("{}{ramp}{star}", b.weight)
                    },
                    format!("{:.1}%", b.table_share * 100.0),
                    b.open_connections.to_string(),
                    human_rate(b.counters.new_flows_per_second),
                    human_rate(b.counters.packets_per_second),
                    human_rate(b.counters.bytes_per_second),
                ]);
            }
            if !s.backends.is_empty() {
                out.push_str(&columns("  ", &rows, &[2, 3, 4, 5, 6, 7]));
            }
            for b in &s.backends {
                if let Some(why) = &b.reason {
                    let _ = writeln!(out, "  {} {}: {why}", b.address, b.state);
                }
                if let Some(note) = &b.run_time {
                    let _ = writeln!(out, "  * {} run-time: {note} (`lb-agent backend reset` drops it)", b.address);
                }
            }
            if s.usable_backends == 0 {
                let why = if s.backends.is_empty() { "no backends" } else { "none active, weighted and up" };
                let _ =
                    writeln!(out, "  0 usable backends ({why}): new clients are refused (TCP reset, ICMP unreachable)");
            }
        }
        render_scaling(&mut out, &self.scaling, now);
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
            let rows: Vec<Vec<String>> =
                self.events.iter().take(10).map(|e| vec![ago(now, e.unix_time), e.message.clone()]).collect();
            out.push_str(&columns("  ", &rows, &[0]));
        }
        out
    }
}

/// The scaling block, like `kubectl get hpa`: one row per scaled service,
/// then each one's instances and recent decisions.
fn render_scaling(out: &mut String, scaling: &[ScalingStatus], now: f64) {
    use std::fmt::Write as _;
    if scaling.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nscaling:");
    let mut rows =
        vec![cells(["SERVICE", "METRICS (CURRENT/TARGET)", "MIN", "MAX", "DESIRED", "READY", "STARTING", "CONTROL"])];
    for sc in scaling {
        let ready = sc.replicas.iter().filter(|r| r.phase == "ready").count();
        let starting = sc.replicas.iter().filter(|r| r.phase == "starting").count() as u32 + sc.pending_starts;
        rows.push(vec![
            sc.service.clone(),
            render_metrics(&sc.metrics),
            sc.min_replicas.to_string(),
            sc.max_replicas.to_string(),
            sc.desired.to_string(),
            ready.to_string(),
            starting.to_string(),
            sc.hold.as_ref().map_or("policy".into(), |h| render_hold(h, now)),
        ]);
    }
    out.push_str(&columns("  ", &rows, &[2, 3, 4, 5, 6]));
    for sc in scaling {
        if !sc.replicas.is_empty() {
            let _ = writeln!(out, "\n  {} instances:", sc.service);
            let mut rows = vec![cells(["NAME", "ADDRESS", "PHASE", "CPU", "REQ/S", "UP"])];
            rows.extend(sc.replicas.iter().map(ReplicaStatus::cells));
            out.push_str(&columns("    ", &rows, &[3, 4, 5]));
        }
        if !sc.decisions.is_empty() {
            let _ = writeln!(out, "\n  {} decisions:", sc.service);
            let mut rows = vec![cells(["WHEN", "CHANGE", "RULE", "REASON"])];
            rows.extend(sc.decisions.iter().take(5).map(|d| d.cells(now)));
            out.push_str(&columns("    ", &rows, &[]));
        }
    }
}

/// `cpu 41%/50%, requests/s 120/100`; a threshold metric shows its limits
/// (`cpu 41%/>70%,<30%`), a metric without a sample `-`.
pub fn render_metrics(metrics: &[ScalingMetric]) -> String {
    let mut order: Vec<&str> = Vec::new();
    for m in metrics {
        if !order.contains(&m.metric.as_str()) {
            order.push(&m.metric);
        }
    }
    let shown: Vec<String> = order
        .into_iter()
        .filter_map(|key| {
            let of: Vec<&ScalingMetric> = metrics.iter().filter(|m| m.metric == key).collect();
            let first = of.first()?;
            let value = first.value.map_or("-".into(), |v| format!("{}{}", short_number(v), first.unit));
            let targets: Vec<String> = of
                .iter()
                .map(|m| {
                    let sign = match m.rule.as_str() {
                        "up" => ">",
                        "down" => "<",
                        _ => "",
                    };
                    format!("{sign}{}{}", short_number(m.target), m.unit)
                })
                .collect();
            Some(format!("{} {value}/{}", first.label, targets.join(",")))
        })
        .collect();
    if shown.is_empty() {
        "-".into()
    } else {
        shown.join(", ")
    }
}

/// `pinned at 3 by operator 2m05s ago`.
pub fn render_hold(h: &ScalingHold, now: f64) -> String {
    format!("{} at {} by operator {}", h.mode, h.replicas, ago(now, h.since_unix_time))
}

/// Whole numbers (and anything from 10 up) without decimals, others with one.
fn short_number(v: f64) -> String {
    if v.abs() >= 10.0 || (v - v.round()).abs() < 0.05 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// `12s ago`, from Unix times.
fn ago(now: f64, then: f64) -> String {
    format!("{} ago", human_duration((now - then).max(0.0)))
}

fn cells<const N: usize>(names: [&str; N]) -> Vec<String> {
    names.into_iter().map(str::to_owned).collect()
}

/// `rows` as aligned columns: each column as wide as its widest cell, the
/// columns in `right` (numbers) aligned right, two spaces between, the last
/// column not padded; every line starts with `indent`.
pub fn columns(indent: &str, rows: &[Vec<String>], right: &[usize]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(max) => *max = (*max).max(w),
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::from(indent);
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = widths[i] - cell.chars().count();
            let last = i + 1 == row.len();
            if right.contains(&i) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if !last {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Seconds since the Unix epoch, as snapshots and events carry time.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Whole seconds for people: `45s`, `3m12s`, `2h05m`, `3d04h`.
pub fn human_duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// One frame of `status --watch`: on a terminal the screen is cleared and
/// drawn from the top, so the table refreshes in place; anywhere else
/// (a pipe, a file) frames follow one another, each under a `---` line.
pub fn watch_frame(body: &str, terminal: bool, interval: std::time::Duration) -> String {
    if terminal {
        // Cursor home, clear the screen.
        format!("\x1b[H\x1b[2J{body}\nevery {}; Ctrl-C to quit\n", human_duration(interval.as_secs_f64()))
    } else {
        format!("---\n{body}")
    }
}

/// `1.5k`, `42`, `0.5`: a rate in few characters.
pub fn human_rate(x: f64) -> String {
    match x {
        x if x >= 1e9 => format!("{:.1}G", x / 1e9),
        x if x >= 1e6 => format!("{:.1}M", x / 1e6),
        x if x >= 1e3 => format!("{:.1}k", x / 1e3),
        x if x >= 10.0 => format!("{x:.0}"),
        x => format!("{x:.1}"),
    }
}

/// `web` on 10.0.0.100:80/tcp, for tests: no interfaces or backends.
#[cfg(test)]
pub(crate) fn web_service(counters: Traffic) -> ServiceStatus {
    ServiceStatus {
        name: "web".into(),
        vip: "10.0.0.100".into(),
        port: 80,
        protocol: "tcp".into(),
        mode: "dnat".into(),
        counters,
        ..ServiceStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_brackets_an_ipv6_vip_only() {
        let v4 = ServiceStatus { vip: "10.0.0.100".into(), port: 80, ..ServiceStatus::default() };
        let v6 = ServiceStatus { vip: "2001:db8::10".into(), port: 80, ..ServiceStatus::default() };
        assert_eq!(v4.endpoint(), "10.0.0.100:80");
        assert_eq!(v6.endpoint(), "[2001:db8::10]:80");
    }

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
                start_time_seconds: 0.0,
            },
            services: vec![ServiceStatus {
                interfaces: vec!["eth0".into()],
                backends: vec![BackendStatus {
                    address: "10.1.0.1:80".into(),
                    state: "draining".into(),
                    reason: None,
                    weight: 1,
                    ramp_percent: None,
                    in_table: false,
                    table_share: 0.0,
                    open_connections: 3,
                    drain_seconds_left: Some(9.2),
                    counters: Traffic { new_flows_per_second: 1500.0, ..Traffic::default() },
                    run_time: Some("weight 1, file says 2".into()),
                    health_checks: None,
                }],
                ..web_service(Traffic::default())
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
        assert!(
            t.lines().any(|l| l.contains("10.1.0.1:80") && l.contains(" 1 * "))
                && t.contains(
                    "\n  * 10.1.0.1:80 run-time: weight 1, file says 2 (`lb-agent backend reset` drops it)\n"
                ),
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
        s.services[0].backends[0].ramp_percent = Some(40);
        let t = s.render_table();
        assert!(t.contains("socket lb: attached to /sys/fs/cgroup (clients on this host); translated 5"), "{t}");
        assert!(t.lines().any(|l| l.contains("10.1.0.1:80") && l.contains(" 1 (ramp 40%) * ")), "{t}");
        assert!(!t.contains("full nat:"), "{t}");
        s.services[0].mode = "full-nat".into();
        s.services[0].snat_sources = vec!["10.1.0.254 (route)".into()];
        s.maps = vec![MapFill { name: lb_common::SNAT_FLOWS.into(), entries: 7, max_entries: 65536 }];
        let t = s.render_table();
        assert!(t.contains("service web  10.0.0.100:80/tcp  mode full-nat from 10.1.0.254 (route)  on eth0"), "{t}");
        assert!(t.contains("full nat: 7 source port(s) held, one per flow"), "{t}");
        // IPv6's claims count with IPv4's.
        s.maps.push(MapFill { name: lb_common::v6::SNAT_FLOWS6.into(), entries: 3, max_entries: 65536 });
        assert!(s.render_table().contains("full nat: 10 source port(s) held"), "{}", s.render_table());
    }

    fn decision(ago: f64, previous: u32, replicas: u32, rule: &str) -> DecisionSummary {
        DecisionSummary {
            unix_time: 1_000_000.0 - ago,
            last_unix_time: 1_000_000.0 - ago,
            replicas,
            current: previous,
            previous,
            rule: rule.into(),
            reason: format!("{rule} reason"),
            repeats: 1,
        }
    }

    #[test]
    fn decisions_that_change_nothing_collapse_into_one_entry() {
        let mut list = VecDeque::new();
        record_decision(&mut list, decision(100.0, 1, 2, "target cpu"), 3);
        for i in 0..14 {
            record_decision(&mut list, decision(90.0 - f64::from(i), 2, 2, "tolerance"), 3);
        }
        let summary: Vec<(u32, u32, &str, u32)> =
            list.iter().map(|d| (d.previous, d.replicas, d.rule.as_str(), d.repeats)).collect();
        assert_eq!(summary, [(2, 2, "tolerance", 14), (1, 2, "target cpu", 1)]);
        assert_eq!(list[0].unix_time, 1_000_000.0 - 90.0, "the run keeps its first time");
        assert_eq!(list[0].last_unix_time, 1_000_000.0 - 77.0, "and carries its latest");
        // Another rule, or a change, starts a new entry; the oldest go.
        record_decision(&mut list, decision(50.0, 2, 2, "starting"), 3);
        record_decision(&mut list, decision(40.0, 2, 3, "target cpu"), 3);
        record_decision(&mut list, decision(30.0, 3, 3, "tolerance"), 3);
        let summary: Vec<(u32, u32, &str, u32)> =
            list.iter().map(|d| (d.previous, d.replicas, d.rule.as_str(), d.repeats)).collect();
        assert_eq!(summary, [(3, 3, "tolerance", 1), (2, 3, "target cpu", 1), (2, 2, "starting", 1)]);
    }

    fn replica(name: &str, phase: &str, cpu: Option<f64>, age_seconds: f64) -> ReplicaStatus {
        ReplicaStatus {
            id: name.into(),
            name: name.into(),
            address: format!("10.212.0.{}:8080", name.len()),
            phase: phase.into(),
            cpu_percent: cpu,
            requests_per_second: Some(120.4),
            age_seconds,
        }
    }

    fn metric(metric: &str, label: &str, rule: &str, value: Option<f64>, target: f64, unit: &str) -> ScalingMetric {
        ScalingMetric {
            metric: metric.into(),
            label: label.into(),
            rule: rule.into(),
            value,
            target,
            unit: unit.into(),
        }
    }

    #[test]
    fn the_scaling_block_reads_like_kubectl_get_hpa() {
        let now = 1_000_000.0;
        let mut decisions = VecDeque::new();
        record_decision(&mut decisions, decision(500.0, 1, 2, "target cpu"), 20);
        for i in 0..14 {
            record_decision(&mut decisions, decision(192.347 - f64::from(i), 2, 2, "tolerance"), 20);
        }
        let s = Snapshot {
            scaling: vec![
                ScalingStatus {
                    service: "web".into(),
                    min_replicas: 1,
                    max_replicas: 10,
                    desired: 2,
                    pending_starts: 0,
                    replicas: vec![
                        replica("web-1", "ready", Some(41.2), 192.347),
                        replica("web-2", "starting", None, 4.9),
                    ],
                    decisions: decisions.into(),
                    metrics: vec![
                        metric("cpu", "cpu", "target", Some(41.2), 50.0, "%"),
                        metric("requests_per_second", "requests/s", "target", Some(120.4), 100.0, ""),
                    ],
                    hold: Some(ScalingHold { mode: "pinned".into(), replicas: 3, since_unix_time: now - 125.0 }),
                },
                ScalingStatus {
                    service: "api-long-name".into(),
                    min_replicas: 2,
                    max_replicas: 4,
                    desired: 2,
                    metrics: vec![
                        metric("cpu", "cpu", "up", None, 70.0, "%"),
                        metric("cpu", "cpu", "down", None, 30.0, "%"),
                    ],
                    ..ScalingStatus::default()
                },
            ],
            events: vec![
                Event { unix_time: now - 12.4, message: "web: pinned".into() },
                Event { unix_time: now - 192.347, message: "started".into() },
            ],
            ..Snapshot::default()
        };
        let t = s.render_at(now);
        let lines: Vec<&str> = t.lines().collect();
        let at = |needle: &str| {
            lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?} in\n{t}"))
        };
        let head = lines[at("SERVICE")];
        let (web, api) = (lines[at("  web ")], lines[at("  api-long-name ")]);
        assert_eq!(
            head.split_whitespace().collect::<Vec<_>>(),
            ["SERVICE", "METRICS", "(CURRENT/TARGET)", "MIN", "MAX", "DESIRED", "READY", "STARTING", "CONTROL"]
        );
        assert!(web.contains("  cpu 41%/50%, requests/s 120/100  "), "{t}");
        assert!(web.ends_with("  pinned at 3 by operator 2m05s ago"), "{t}");
        assert!(api.contains("  cpu -/>70%,<30%  "), "{t}");
        assert!(api.ends_with("  policy"), "{t}");
        // Aligned: every column of the three rows starts (numbers: ends) at
        // the same place.
        let end_of = |line: &str, col: &str| line.find(col).map(|i| i + col.len());
        assert_eq!(end_of(head, "MIN"), end_of(web, "  1  ").map(|i| i - 2), "{t}");
        assert_eq!(end_of(head, "MIN"), end_of(api, "  2  ").map(|i| i - 2), "{t}");
        assert_eq!(head.find("CONTROL"), web.find("pinned"), "{t}");
        assert_eq!(head.find("CONTROL"), api.find("policy"), "{t}");
        // Instances and decisions, durations rounded, no-ops collapsed.
        assert!(lines[at("web-1")].ends_with("ready     41%    120  3m12s"), "{t}");
        assert!(lines[at("web-2")].contains("starting    -"), "{t}");
        assert!(lines[at("2 -> 2 x14")].starts_with("    2m59s ago  2 -> 2 x14  tolerance   tolerance reason"), "{t}");
        assert!(lines[at("1 -> 2")].starts_with("    8m20s ago  1 -> 2      target cpu"), "{t}");
        assert!(lines[at("WHEN")].starts_with("    WHEN       CHANGE"), "{t}");
        assert!(lines[at("web: pinned")].starts_with("    12s ago  web: pinned"), "{t}");
        assert!(lines[at("started")].starts_with("  3m12s ago  started"), "{t}");
        assert!(!t.contains("192.3") && !t.contains(".347"), "{t}");
    }

    #[test]
    fn columns_fit_the_widest_cell_and_numbers_align_right() {
        let rows = vec![cells(["NAME", "N", "NOTE"]), cells(["a", "1234", "x"]), cells(["longer", "5", ""])];
        assert_eq!(columns("  ", &rows, &[1]), "  NAME       N  NOTE\n  a       1234  x\n  longer     5\n");
    }

    #[test]
    fn a_watch_frame_redraws_on_a_terminal_and_follows_on_elsewhere() {
        let every = std::time::Duration::from_secs(2);
        let frame = watch_frame("body\n", true, every);
        assert!(frame.starts_with("\x1b[H\x1b[2Jbody\n"), "{frame:?}");
        assert!(frame.ends_with("every 2s; Ctrl-C to quit\n"), "{frame:?}");
        assert_eq!(watch_frame("body\n", false, every), "---\nbody\n");
    }
}
