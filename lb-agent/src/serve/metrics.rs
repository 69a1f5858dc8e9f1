//! `/metrics`: the status [`Snapshot`] as Prometheus text exposition
//! (format 0.0.4), and the HTTP/1.1 server (hyper) that serves it.
//!
//! The data plane's counters live in kernel maps and the snapshot already
//! holds their absolute values. `prometheus::Counter` can only be
//! incremented, so the families are built directly as `proto::MetricFamily`
//! values (typed counter or gauge) and encoded with `TextEncoder`.
//! [`SnapshotCollector`] offers the same families to a `prometheus::Registry`.
//!
//! Every family is declared once below as a `Family<L>`, where `L` is its
//! label set: a sample cannot be built with the wrong labels.

use std::{
    collections::HashMap, convert::Infallible, future::poll_fn, marker::PhantomData, net::SocketAddr, sync::Arc,
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{
    core::{Collector, Desc},
    proto::{self, LabelPair, Metric, MetricFamily, MetricType},
    Registry, TextEncoder,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{watch, Semaphore},
    time::timeout,
};
use tracing::{debug, warn};

use crate::status::{BackendStatus, ServiceStatus, Snapshot, Traffic};

/// `Content-Type` of the text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metric family {name} has an invalid descriptor")]
    Descriptor {
        name: String,
        #[source]
        source: prometheus::Error,
    },
    #[error("encode the text exposition")]
    Encode {
        #[source]
        source: prometheus::Error,
    },
    #[error("register the snapshot collector")]
    Register {
        #[source]
        source: prometheus::Error,
    },
}

// ---- Families ---------------------------------------------------------------

/// The value of a gauge that only marks that something exists.
const TRUE: f64 = 1.0;

/// The states a backend can be in; `lb_backend_state` has a series for each,
/// so an alert can select `state="down"` even while no backend is down.
const BACKEND_STATES: [&str; 3] = ["active", "draining", "down"];

/// A counter family and the `Traffic` field it exports.
type TrafficFamily<L> = (Family<L>, fn(&Traffic) -> u64);

/// A service's kernel counters, one family per `Traffic` field.
const SERVICE_TRAFFIC: [TrafficFamily<ServiceLabels>; 5] = [
    (
        Family::counter(
            "lb_service_packets_total",
            "Client packets to the service's VIP and port that the XDP program forwarded to a backend.",
        ),
        |t| t.packets,
    ),
    (
        Family::counter(
            "lb_service_bytes_total",
            "Bytes (Ethernet frame length) of the client packets forwarded for the service.",
        ),
        |t| t.bytes,
    ),
    (
        Family::counter("lb_service_new_flows_total", "Flows of the service that got a backend from its Maglev table."),
        |t| t.new_flows,
    ),
    (
        Family::counter(
            "lb_service_reply_packets_total",
            "Backend reply packets of the service whose source was rewritten back to the VIP.",
        ),
        |t| t.reply_packets,
    ),
    (
        Family::counter(
            "lb_service_reply_bytes_total",
            "Bytes (Ethernet frame length) of the service's backend replies rewritten back to the VIP.",
        ),
        |t| t.reply_bytes,
    ),
];

/// A backend's kernel counters, one family per `Traffic` field.
const BACKEND_TRAFFIC: [TrafficFamily<BackendLabels>; 6] = [
    (Family::counter("lb_backend_packets_total", "Client packets the XDP program forwarded to the backend."), |t| {
        t.packets
    }),
    (
        Family::counter(
            "lb_backend_bytes_total",
            "Bytes (Ethernet frame length) of the client packets forwarded to the backend.",
        ),
        |t| t.bytes,
    ),
    (Family::counter("lb_backend_new_flows_total", "Flows the Maglev table assigned to the backend."), |t| t.new_flows),
    (
        Family::counter(
            "lb_backend_reply_packets_total",
            "Reply packets from the backend whose source was rewritten back to the VIP.",
        ),
        |t| t.reply_packets,
    ),
    (
        Family::counter(
            "lb_backend_reply_bytes_total",
            "Bytes (Ethernet frame length) of the backend's replies rewritten back to the VIP.",
        ),
        |t| t.reply_bytes,
    ),
    (
        Family::counter(
            "lb_backend_closed_flows_total",
            "TCP flows to the backend that saw a FIN or RST from the client side.",
        ),
        |t| t.closed_flows,
    ),
];

const SERVICE_USABLE_BACKENDS: Family<ServiceLabels> = Family::gauge(
    "lb_service_usable_backends",
    "Backends new flows of the service can go to (active, weight above 0, not down); at 0 clients are refused at once.",
);
const SERVICE_MODE: Family<ServiceModeLabels> = Family::gauge(
    "lb_service_mode",
    "1 for the service's forwarding mode (dnat or full-nat); full NAT's held source ports are lb_map_entries of map SNAT_FLOWS (SNAT_FLOWS6 for IPv6).",
);
const BACKEND_OPEN_CONNECTIONS: Family<BackendLabels> = Family::gauge(
    "lb_backend_open_connections",
    "Open flows to the backend in the connection table: TCP without FIN or RST, UDP active within the last 30 s.",
);
const BACKEND_WEIGHT: Family<BackendLabels> =
    Family::gauge("lb_backend_weight", "Configured weight of the backend in its service's Maglev table.");
const BACKEND_EFFECTIVE_WEIGHT: Family<BackendLabels> = Family::gauge(
    "lb_backend_effective_weight",
    "Weight the backend has in its service's Maglev table now: its weight, or less while slow start ramps it up.",
);
const BACKEND_UP: Family<BackendLabels> =
    Family::gauge("lb_backend_up", "1 unless the backend is down: active and draining backends count as up.");
const BACKEND_STATE: Family<BackendStateLabels> = Family::gauge(
    "lb_backend_state",
    "Backend state (active, draining or down): 1 for the backend's current state, 0 for the others.",
);
const BACKEND_IN_TABLE: Family<BackendLabels> = Family::gauge(
    "lb_backend_in_table",
    "1 if the backend is in its service's Maglev table and so can receive new flows, else 0.",
);
const BACKEND_TABLE_SHARE: Family<BackendLabels> = Family::gauge(
    "lb_backend_table_share",
    "Fraction (0 to 1) of its service's Maglev table slots that point at the backend.",
);
const PACKETS: Family<VerdictLabels> = Family::counter(
    "lb_packets_total",
    "Packets the XDP program handled, by the reason for its verdict (forward, refuse: answered with a reset or ICMP unreachable, pass or drop), since it was loaded.",
);
const XDP_ATTACHED: Family<InterfaceLabels> = Family::gauge(
    "lb_xdp_attached",
    "1 for each interface the program is attached to, labelled with its hook (xdp or tc), the attach mode (native, generic or tc) and the program's checksum handling (complete or may-be-partial for XDP, skb for tc).",
);
const FAST_PATH: Family<FastPathLabels> = Family::gauge(
    "lb_xdp_fast_path",
    "1 if translated packets may leave by this interface on the fast path (XDP_REDIRECT/XDP_TX, skipping the kernel's stack), 0 if they pass up to the kernel's forwarding path.",
);
const PATH_PACKETS: Family<PathLabels> = Family::counter(
    "lb_xdp_path_packets_total",
    "Translated packets that arrived on the interface, by the way they left: fast (redirected, tx_back, replied_flow_macs, redirected_neigh) or passed up to the kernel, with the reason (pass_fib_no_neigh, pass_egress_not_ready, ...).",
);
const SOCKET_LB_ATTACHED: Family<CgroupLabels> = Family::gauge(
    "lb_socket_lb_attached",
    "1 if socket load balancing (for clients on this host) is attached to the cgroup in the label, 0 (cgroup \"none\") if not.",
);
const SOCKET_LB_OPERATIONS: Family<SockOpLabels> = Family::counter(
    "lb_socket_lb_operations_total",
    "connect/sendmsg calls to a service that got a backend (translated) or were refused for want of one (no_backend), and recvmsg/getpeername addresses shown as the VIP again (restored).",
);
const MAP_ENTRIES: Family<MapLabels> = Family::gauge("lb_map_entries", "Entries currently in the eBPF map.");
const MAP_MAX_ENTRIES: Family<MapLabels> =
    Family::gauge("lb_map_max_entries", "Capacity (max_entries) of the eBPF map.");
const SCALING_DESIRED: Family<ScalingLabels> =
    Family::gauge("lb_scaling_desired_replicas", "Instances the last scaling decision asked for.");
const SCALING_LIMIT: Family<ScalingLimitLabels> =
    Family::gauge("lb_scaling_replicas_limit", "The service's min_replicas and max_replicas, by bound.");
const SCALING_INSTANCES: Family<ScalingPhaseLabels> = Family::gauge(
    "lb_scaling_instances",
    "Instances of a scaled service by phase: starting (not yet healthy), ready (in the table), draining, stopping.",
);
const SCALING_INSTANCE_CPU: Family<ScalingInstanceLabels> =
    Family::gauge("lb_scaling_instance_cpu_ratio", "CPU use of each instance, in cores (1 = one full core).");
const SCALING_METRIC_VALUE: Family<ScalingMetricLabels> = Family::gauge(
    "lb_scaling_metric_value",
    "The value a scaled service's rules act on, as its last decision saw it: the average over ready instances (the host's, for host_cpu), in the config's units (CPU in percent of one core).",
);
const SCALING_METRIC_TARGET: Family<ScalingTargetLabels> = Family::gauge(
    "lb_scaling_metric_target",
    "What a scaling rule holds its metric to, in the config's units: the target (rule=\"target\"), or the threshold above which it scales up (rule=\"up\") or below which it may scale down (rule=\"down\").",
);
const SCALING_MODE: Family<ScalingModeLabels> = Family::gauge(
    "lb_scaling_mode",
    "Who sets a scaled service's count: 1 for the current mode, 0 for the others: policy, pinned (lb-agent scale --replicas) or paused (lb-agent scale --pause).",
);
const BACKEND_HEALTH_CHECKS: Family<HealthCheckLabels> = Family::counter(
    "lb_backend_health_checks_total",
    "Health checks of the backend by result: ok, fail (an answer that was not good: refused, reset, a wrong status) or timeout (no answer within the check's timeout). Counted from when its probing started.",
);
const BACKEND_HEALTH_CHECK_DURATION: Family<BackendLabels> = Family::summary(
    "lb_backend_health_check_duration_seconds",
    "Time the backend's health checks took, connect included (sum and count; rate(sum)/rate(count) is the mean).",
);
const SCALING_INSTANCE_REQUESTS: Family<ScalingInstanceLabels> = Family::gauge(
    "lb_scaling_instance_requests_per_second",
    "Requests per second each instance of a scaled service served, from its own counter ([service.instances] requests).",
);
const PROCESS_START_TIME: Family<NoLabels> =
    Family::gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds.");
const AGENT_ERRORS: Family<NoLabels> = Family::counter(
    "lb_agent_errors_total",
    "Errors the agent met and logged: config reloads refused, map writes failed, probes that errored, ...",
);
const AGENT_UPTIME: Family<NoLabels> = Family::gauge("lb_agent_uptime_seconds", "Seconds since the agent started.");
const AGENT_INFO: Family<VersionLabels> =
    Family::gauge("lb_agent_info", "Always 1; the agent's version is in the label.");

/// All families for `snapshot`, in a fixed order, including empty ones (a
/// snapshot without services has no service series).
fn collect(snapshot: &Snapshot) -> Vec<Collected> {
    let services = &snapshot.services;
    let backends = || services.iter().flat_map(|s| s.backends.iter().map(move |b| (s, b)));
    let per_backend = |family: &Family<BackendLabels>, value: fn(&BackendStatus) -> f64| {
        family.collect(backends().map(|(s, b)| (BackendLabels::of(s, b), value(b))))
    };

    let mut out = Vec::new();
    for (family, value) in &SERVICE_TRAFFIC {
        out.push(family.collect(services.iter().map(|s| (ServiceLabels::of(s), value(&s.counters) as f64))));
    }
    out.push(SERVICE_MODE.collect(
        services.iter().map(|s| (ServiceModeLabels { service: ServiceLabels::of(s), mode: s.mode.clone() }, TRUE)),
    ));
    out.push(
        SERVICE_USABLE_BACKENDS.collect(services.iter().map(|s| (ServiceLabels::of(s), f64::from(s.usable_backends)))),
    );
    for (family, value) in &BACKEND_TRAFFIC {
        out.push(family.collect(backends().map(|(s, b)| (BackendLabels::of(s, b), value(&b.counters) as f64))));
    }
    out.push(per_backend(&BACKEND_OPEN_CONNECTIONS, |b| b.open_connections as f64));
    out.push(per_backend(&BACKEND_WEIGHT, |b| f64::from(b.weight)));
    out.push(per_backend(&BACKEND_EFFECTIVE_WEIGHT, BackendStatus::effective_weight));
    out.push(per_backend(&BACKEND_UP, |b| flag(b.state != "down")));
    out.push(BACKEND_STATE.collect(backends().flat_map(|(s, b)| {
        // An unexpected state still gets its series, so it is never invisible.
        let unknown = (!BACKEND_STATES.contains(&b.state.as_str())).then_some(b.state.as_str());
        BACKEND_STATES.into_iter().chain(unknown).map(move |state| {
            let labels = BackendStateLabels { backend: BackendLabels::of(s, b), state: state.to_owned() };
            (labels, flag(b.state == state))
        })
    })));
    out.push(per_backend(&BACKEND_IN_TABLE, |b| flag(b.in_table)));
    out.push(per_backend(&BACKEND_TABLE_SHARE, |b| b.table_share));
    out.push(
        PACKETS.collect(
            snapshot
                .reasons
                .iter()
                .map(|r| (VerdictLabels { reason: r.reason.clone(), verdict: r.verdict.clone() }, r.packets as f64)),
        ),
    );
    let interfaces = &snapshot.agent.interfaces;
    out.push(XDP_ATTACHED.collect(interfaces.iter().map(|i| {
        let labels = InterfaceLabels {
            interface: i.name.clone(),
            hook: i.hook.clone(),
            mode: i.xdp_mode.clone(),
            checksums: i.checksums.clone(),
        };
        (labels, TRUE)
    })));
    out.push(
        FAST_PATH.collect(interfaces.iter().map(|i| (FastPathLabels { interface: i.name.clone() }, flag(i.fast_path)))),
    );
    out.push(PATH_PACKETS.collect(interfaces.iter().flat_map(|i| {
        i.paths.iter().map(|p| {
            let labels = PathLabels { interface: i.name.clone(), path: p.path.clone(), fast: p.fast.to_string() };
            (labels, p.packets as f64)
        })
    })));
    let sock = &snapshot.agent.socket_lb;
    // Prometheus takes an empty label value for no label at all: "none".
    let cgroup =
        CgroupLabels { cgroup: sock.cgroup.clone().filter(|_| sock.attached).unwrap_or_else(|| "none".into()) };
    out.push(SOCKET_LB_ATTACHED.collect([(cgroup, flag(sock.attached))]));
    out.push(
        SOCKET_LB_OPERATIONS
            .collect(sock.operations.iter().map(|o| (SockOpLabels { op: o.op.clone() }, o.count as f64))),
    );
    let maps = &snapshot.maps;
    out.push(MAP_ENTRIES.collect(maps.iter().map(|m| (MapLabels { map: m.name.clone() }, m.entries as f64))));
    out.push(MAP_MAX_ENTRIES.collect(maps.iter().map(|m| (MapLabels { map: m.name.clone() }, m.max_entries as f64))));
    let scaling = &snapshot.scaling;
    out.push(
        SCALING_DESIRED
            .collect(scaling.iter().map(|s| (ScalingLabels { service: s.service.clone() }, f64::from(s.desired)))),
    );
    out.push(SCALING_LIMIT.collect(scaling.iter().flat_map(|s| {
        [("min", s.min_replicas), ("max", s.max_replicas)]
            .map(|(bound, v)| (ScalingLimitLabels { service: s.service.clone(), bound }, f64::from(v)))
    })));
    out.push(SCALING_INSTANCES.collect(scaling.iter().flat_map(|s| {
        SCALING_PHASES.map(|phase| {
            let n = s.replicas.iter().filter(|r| r.phase == phase).count() as f64;
            (ScalingPhaseLabels { service: s.service.clone(), phase }, n)
        })
    })));
    out.push(SCALING_INSTANCE_CPU.collect(scaling.iter().flat_map(|s| {
        s.replicas.iter().filter_map(move |r| {
            let labels = ScalingInstanceLabels { service: s.service.clone(), instance: r.name.clone() };
            Some((labels, r.cpu_percent? / 100.0))
        })
    })));
    out.extend(collect_scaling_rules(scaling));
    let agent = &snapshot.agent;
    out.push(AGENT_ERRORS.collect([(NoLabels, agent.errors_total as f64)]));
    out.push(AGENT_UPTIME.collect([(NoLabels, agent.uptime_seconds)]));
    out.push(AGENT_INFO.collect([(VersionLabels { version: agent.version.clone() }, TRUE)]));
    out.extend(collect_operations(snapshot));
    out
}

/// What each scaling rule acts on and its target, and who sets the count.
fn collect_scaling_rules(scaling: &[crate::status::ScalingStatus]) -> [Collected; 3] {
    let values = scaling.iter().flat_map(|s| {
        let mut seen = Vec::new();
        s.metrics.iter().filter_map(move |m| {
            // One series per metric, however many rules look at it.
            if seen.contains(&m.metric) {
                return None;
            }
            seen.push(m.metric.clone());
            Some((ScalingMetricLabels { service: s.service.clone(), metric: m.metric.clone() }, m.value?))
        })
    });
    let targets = scaling.iter().flat_map(|s| {
        s.metrics.iter().map(|m| {
            let labels =
                ScalingTargetLabels { service: s.service.clone(), metric: m.metric.clone(), rule: m.rule.clone() };
            (labels, m.target)
        })
    });
    let modes = scaling.iter().flat_map(|s| {
        let current = s.hold.as_ref().map_or("policy", |h| h.mode.as_str());
        SCALING_MODES.map(|mode| (ScalingModeLabels { service: s.service.clone(), mode }, flag(mode == current)))
    });
    [SCALING_METRIC_VALUE.collect(values), SCALING_METRIC_TARGET.collect(targets), SCALING_MODE.collect(modes)]
}

/// What an operator watches besides traffic: each backend's health checks
/// by result and their duration, each scaled instance's request rate, and
/// the process's start time (the Prometheus convention).
fn collect_operations(snapshot: &Snapshot) -> Vec<Collected> {
    let checked = || {
        snapshot
            .services
            .iter()
            .flat_map(|s| s.backends.iter().filter_map(move |b| Some((BackendLabels::of(s, b), b.health_checks?))))
    };
    let by_result = BACKEND_HEALTH_CHECKS.collect(checked().flat_map(|(labels, c)| {
        [("ok", c.ok), ("fail", c.fail), ("timeout", c.timeout)].map(|(result, n)| {
            let labels = HealthCheckLabels { backend: labels.clone(), result };
            (labels, n as f64)
        })
    }));
    let duration = BACKEND_HEALTH_CHECK_DURATION
        .collect_summary(checked().map(|(labels, c)| (labels, c.seconds_total, c.count())));
    let requests = SCALING_INSTANCE_REQUESTS.collect(snapshot.scaling.iter().flat_map(|s| {
        s.replicas.iter().filter_map(move |r| {
            let labels = ScalingInstanceLabels { service: s.service.clone(), instance: r.name.clone() };
            Some((labels, r.requests_per_second?))
        })
    }));
    let started = PROCESS_START_TIME.collect([(NoLabels, snapshot.agent.start_time_seconds)]);
    vec![by_result, duration, requests, started]
}

fn flag(condition: bool) -> f64 {
    if condition {
        1.0
    } else {
        0.0
    }
}

/// `snapshot` as Prometheus text exposition (format 0.0.4). Families without
/// series are left out, as a `Registry` would.
pub fn render(snapshot: &Snapshot) -> Result<String, MetricsError> {
    let families: Vec<MetricFamily> =
        collect(snapshot).into_iter().map(|c| c.family).filter(|f| !f.get_metric().is_empty()).collect();
    TextEncoder::new().encode_to_string(&families).map_err(|source| MetricsError::Encode { source })
}

/// The name of every series the agent can serve (a summary's as `_sum` and
/// `_count`), for checking what dashboards and alert rules query.
pub fn series_names() -> Vec<String> {
    collect(&Snapshot::default())
        .iter()
        .flat_map(|c| {
            let name = c.family.name();
            match c.family.get_field_type() {
                MetricType::SUMMARY => vec![format!("{name}_sum"), format!("{name}_count")],
                _ => vec![name.to_owned()],
            }
        })
        .collect()
}

/// The snapshot families as a `prometheus` collector, for a `Registry` that
/// also holds other metrics. Reads the latest published snapshot per gather.
pub struct SnapshotCollector {
    descs: Vec<Desc>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
}

impl SnapshotCollector {
    /// Checks every family's name, help and label names.
    pub fn new(snapshot: watch::Receiver<Arc<Snapshot>>) -> Result<Self, MetricsError> {
        let descs = collect(&Snapshot::default()).iter().map(Collected::desc).collect::<Result<_, _>>()?;
        Ok(SnapshotCollector { descs, snapshot })
    }
}

impl Collector for SnapshotCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snapshot = Arc::clone(&self.snapshot.borrow());
        collect(&snapshot).into_iter().map(|c| c.family).collect()
    }
}

/// Registers a [`SnapshotCollector`] over `snapshot` in `registry`.
pub fn register(registry: &Registry, snapshot: watch::Receiver<Arc<Snapshot>>) -> Result<(), MetricsError> {
    let collector = SnapshotCollector::new(snapshot)?;
    registry.register(Box::new(collector)).map_err(|source| MetricsError::Register { source })
}

/// One family, typed by its label set `L`.
struct Family<L> {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    labels: PhantomData<fn() -> L>,
}

#[derive(Clone, Copy)]
enum Kind {
    /// A total kept by the kernel or the agent, exported as is.
    Counter,
    Gauge,
    /// A sum and a count (no quantiles); built by `collect_summary` only.
    Summary,
}

/// A built family with the label names it was built with (for its `Desc`).
struct Collected {
    label_names: &'static [&'static str],
    family: MetricFamily,
}

impl<L: LabelSet> Family<L> {
    const fn counter(name: &'static str, help: &'static str) -> Self {
        Family { name, help, kind: Kind::Counter, labels: PhantomData }
    }

    const fn gauge(name: &'static str, help: &'static str) -> Self {
        Family { name, help, kind: Kind::Gauge, labels: PhantomData }
    }

    const fn summary(name: &'static str, help: &'static str) -> Self {
        Family { name, help, kind: Kind::Summary, labels: PhantomData }
    }

    /// A summary family from `(labels, sum, count)` samples.
    fn collect_summary(&self, samples: impl IntoIterator<Item = (L, f64, u64)>) -> Collected {
        let mut collected = self.collect([]);
        let metrics = samples.into_iter().map(|(labels, sum, count)| {
            let mut metric = self.labelled(labels);
            let mut summary = proto::Summary::default();
            summary.set_sample_sum(sum);
            summary.set_sample_count(count);
            metric.set_summary(summary);
            metric
        });
        collected.family.set_metric(metrics.collect());
        collected
    }

    fn collect(&self, samples: impl IntoIterator<Item = (L, f64)>) -> Collected {
        let mut family = MetricFamily::default();
        family.set_name(self.name.to_owned());
        family.set_help(self.help.to_owned());
        family.set_field_type(match self.kind {
            Kind::Counter => MetricType::COUNTER,
            Kind::Gauge => MetricType::GAUGE,
            Kind::Summary => MetricType::SUMMARY,
        });
        family.set_metric(samples.into_iter().map(|(labels, value)| self.sample(labels, value)).collect());
        Collected { label_names: L::NAMES, family }
    }

    fn sample(&self, labels: L, value: f64) -> Metric {
        let mut metric = self.labelled(labels);
        match self.kind {
            Kind::Counter => {
                let mut counter = proto::Counter::default();
                counter.set_value(value);
                metric.set_counter(counter);
            }
            Kind::Gauge => {
                let mut gauge = proto::Gauge::default();
                gauge.set_value(value);
                metric.set_gauge(gauge);
            }
            Kind::Summary => debug_assert!(false, "{}: a summary takes collect_summary", self.name),
        }
        metric
    }

    /// A metric with `labels` and no value yet.
    fn labelled(&self, labels: L) -> Metric {
        let values = labels.into_values();
        debug_assert_eq!(values.len(), L::NAMES.len(), "{}: label values do not match names", self.name);
        let pairs = L::NAMES
            .iter()
            .zip(values)
            .map(|(&name, value)| {
                let mut pair = LabelPair::default();
                pair.set_name(name.to_owned());
                pair.set_value(value);
                pair
            })
            .collect();
        Metric::from_label(pairs)
    }
}

impl Collected {
    fn desc(&self) -> Result<Desc, MetricsError> {
        let name = self.family.name();
        let labels = self.label_names.iter().map(|&l| l.to_owned()).collect();
        Desc::new(name.to_owned(), self.family.help().to_owned(), labels, HashMap::new())
            .map_err(|source| MetricsError::Descriptor { name: name.to_owned(), source })
    }
}

// ---- Label sets -------------------------------------------------------------

/// A label set: its names, declared once, and its values in the same order.
trait LabelSet {
    const NAMES: &'static [&'static str];
    fn into_values(self) -> Vec<String>;
}

struct NoLabels;

impl LabelSet for NoLabels {
    const NAMES: &'static [&'static str] = &[];
    fn into_values(self) -> Vec<String> {
        Vec::new()
    }
}

struct ServiceLabels {
    service: String,
    vip: String,
    port: u16,
    protocol: String,
}

impl ServiceLabels {
    fn of(s: &ServiceStatus) -> Self {
        ServiceLabels { service: s.name.clone(), vip: s.vip.clone(), port: s.port, protocol: s.protocol.clone() }
    }
}

impl LabelSet for ServiceLabels {
    const NAMES: &'static [&'static str] = &["service", "vip", "port", "protocol"];
    fn into_values(self) -> Vec<String> {
        vec![self.service, self.vip, self.port.to_string(), self.protocol]
    }
}

#[derive(Clone)]
struct BackendLabels {
    service: String,
    /// "ip:port".
    backend: String,
}

impl BackendLabels {
    fn of(s: &ServiceStatus, b: &BackendStatus) -> Self {
        BackendLabels { service: s.name.clone(), backend: b.address.clone() }
    }
}

impl LabelSet for BackendLabels {
    const NAMES: &'static [&'static str] = &["service", "backend"];
    fn into_values(self) -> Vec<String> {
        vec![self.service, self.backend]
    }
}

#[derive(Clone)]
struct HealthCheckLabels {
    backend: BackendLabels,
    /// "ok", "fail" or "timeout".
    result: &'static str,
}

impl LabelSet for HealthCheckLabels {
    const NAMES: &'static [&'static str] = &["service", "backend", "result"];
    fn into_values(self) -> Vec<String> {
        let mut values = self.backend.into_values();
        values.push(self.result.to_owned());
        values
    }
}

struct BackendStateLabels {
    backend: BackendLabels,
    state: String,
}

impl LabelSet for BackendStateLabels {
    const NAMES: &'static [&'static str] = &["service", "backend", "state"];
    fn into_values(self) -> Vec<String> {
        let mut values = self.backend.into_values();
        values.push(self.state);
        values
    }
}

struct VerdictLabels {
    /// `lb_common::Reason::name`.
    reason: String,
    /// "forward", "refuse", "pass" or "drop".
    verdict: String,
}

impl LabelSet for VerdictLabels {
    const NAMES: &'static [&'static str] = &["reason", "verdict"];
    fn into_values(self) -> Vec<String> {
        vec![self.reason, self.verdict]
    }
}

struct InterfaceLabels {
    interface: String,
    /// "xdp" or "tc".
    hook: String,
    /// "native" or "generic", or "tc".
    mode: String,
    /// The program: "complete" (`xdp_lb`) or "may-be-partial" (`xdp_lb_local`);
    /// "skb" for `tc_lb`.
    checksums: String,
}

impl LabelSet for InterfaceLabels {
    const NAMES: &'static [&'static str] = &["interface", "hook", "mode", "checksums"];
    fn into_values(self) -> Vec<String> {
        vec![self.interface, self.hook, self.mode, self.checksums]
    }
}

struct FastPathLabels {
    interface: String,
}

impl LabelSet for FastPathLabels {
    const NAMES: &'static [&'static str] = &["interface"];
    fn into_values(self) -> Vec<String> {
        vec![self.interface]
    }
}

struct PathLabels {
    interface: String,
    /// `lb_common::Path::name`.
    path: String,
    /// "true" if the path skips the kernel's stack.
    fast: String,
}

impl LabelSet for PathLabels {
    const NAMES: &'static [&'static str] = &["interface", "path", "fast"];
    fn into_values(self) -> Vec<String> {
        vec![self.interface, self.path, self.fast]
    }
}

struct CgroupLabels {
    cgroup: String,
}

impl LabelSet for CgroupLabels {
    const NAMES: &'static [&'static str] = &["cgroup"];
    fn into_values(self) -> Vec<String> {
        vec![self.cgroup]
    }
}

struct SockOpLabels {
    /// `lb_common::SockOp::name`.
    op: String,
}

impl LabelSet for SockOpLabels {
    const NAMES: &'static [&'static str] = &["op"];
    fn into_values(self) -> Vec<String> {
        vec![self.op]
    }
}

const SCALING_PHASES: [&str; 4] = ["starting", "ready", "draining", "stopping"];

struct ScalingLabels {
    service: String,
}

impl LabelSet for ScalingLabels {
    const NAMES: &'static [&'static str] = &["service"];
    fn into_values(self) -> Vec<String> {
        vec![self.service]
    }
}

struct ScalingLimitLabels {
    service: String,
    bound: &'static str,
}

impl LabelSet for ScalingLimitLabels {
    const NAMES: &'static [&'static str] = &["service", "bound"];
    fn into_values(self) -> Vec<String> {
        vec![self.service, self.bound.to_owned()]
    }
}

struct ScalingPhaseLabels {
    service: String,
    phase: &'static str,
}

impl LabelSet for ScalingPhaseLabels {
    const NAMES: &'static [&'static str] = &["service", "phase"];
    fn into_values(self) -> Vec<String> {
        vec![self.service, self.phase.to_owned()]
    }
}

const SCALING_MODES: [&str; 3] = ["policy", "pinned", "paused"];

struct ScalingMetricLabels {
    service: String,
    metric: String,
}

impl LabelSet for ScalingMetricLabels {
    const NAMES: &'static [&'static str] = &["service", "metric"];
    fn into_values(self) -> Vec<String> {
        vec![self.service, self.metric]
    }
}

struct ScalingTargetLabels {
    service: String,
    metric: String,
    rule: String,
}

impl LabelSet for ScalingTargetLabels {
    const NAMES: &'static [&'static str] = &["service", "metric", "rule"];
    fn into_values(self) -> Vec<String> {
        vec![self.service, self.metric, self.rule]
    }
}

struct ScalingModeLabels {
    service: String,
    mode: &'static str,
}

impl LabelSet for ScalingModeLabels {
    const NAMES: &'static [&'static str] = &["service", "mode"];
    fn into_values(self) -> Vec<String> {
        vec![self.service, self.mode.to_owned()]
    }
}

struct ScalingInstanceLabels {
    service: String,
    instance: String,
}

impl LabelSet for ScalingInstanceLabels {
    const NAMES: &'static [&'static str] = &["service", "instance"];
    fn into_values(self) -> Vec<String> {
        vec![self.service, self.instance]
    }
}

struct ServiceModeLabels {
    service: ServiceLabels,
    mode: String,
}

impl LabelSet for ServiceModeLabels {
    const NAMES: &'static [&'static str] = &["service", "vip", "port", "protocol", "mode"];
    fn into_values(self) -> Vec<String> {
        let mut values = self.service.into_values();
        values.push(self.mode);
        values
    }
}

struct MapLabels {
    map: String,
}

impl LabelSet for MapLabels {
    const NAMES: &'static [&'static str] = &["map"];
    fn into_values(self) -> Vec<String> {
        vec![self.map]
    }
}

struct VersionLabels {
    version: String,
}

impl LabelSet for VersionLabels {
    const NAMES: &'static [&'static str] = &["version"];
    fn into_values(self) -> Vec<String> {
        vec![self.version]
    }
}

// ---- HTTP -------------------------------------------------------------------

/// Request heads longer than this get a 431 (it is also hyper's smallest
/// read buffer).
const MAX_HEAD: usize = 8 * 1024;
/// The whole request head must arrive within this, so a slow client cannot
/// hold a connection (and one of `MAX_CONNECTIONS`) for long. hyper closes
/// the connection when it passes.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Writing the response, for a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the response, read (and discard) what the client still sends, for
/// at most this long, so closing with unread data does not send a RST that
/// could destroy the response before the client has read it.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_MAX_BYTES: usize = 64 * 1024;
/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// Pause after a failed accept (EMFILE and the like) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `GET /metrics` (the latest snapshot published on `snapshot`) and a
/// pointer at `GET /`, one task per connection, one request per connection.
/// Errors on a connection are logged and never stop the server. Returns when
/// the snapshot's sender is dropped, i.e. when the agent shuts down.
pub async fn serve(listener: TcpListener, snapshot: watch::Receiver<Arc<Snapshot>>) -> anyhow::Result<()> {
    serve_with(listener, snapshot, READ_TIMEOUT).await
}

/// `serve` with another read timeout, so tests need not wait 5 s.
async fn serve_with(
    listener: TcpListener,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    read_timeout: Duration,
) -> anyhow::Result<()> {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut publisher = snapshot.clone();
    loop {
        let permit = Arc::clone(&limit).acquire_owned().await?;
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accept a metrics connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = sender_dropped(&mut publisher) => {
                debug!("snapshot sender dropped; metrics server stops");
                return Ok(());
            }
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = serve_connection(stream, peer, snapshot, read_timeout).await {
                debug!(%peer, error = &e as &(dyn std::error::Error + 'static), "metrics connection");
            }
        });
    }
}

async fn sender_dropped(rx: &mut watch::Receiver<Arc<Snapshot>>) {
    while rx.changed().await.is_ok() {}
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("serve the request")]
    Http(#[source] hyper::Error),
    #[error("timed out writing the response")]
    WriteTimeout,
}

/// Serves one request with hyper's HTTP/1.1 server and closes. A client
/// that closes without a request is no error.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    read_timeout: Duration,
) -> Result<(), ConnError> {
    let service = service_fn(move |request: Request<Incoming>| {
        let response = route(&request, &snapshot);
        debug!(%peer, status = response.status().as_u16(), "metrics request");
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let mut conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    // hyper bounds the head; this bounds the rest. Without shutdown, so that
    // the socket comes back for the linger below.
    let served = timeout(read_timeout + WRITE_TIMEOUT, poll_fn(|cx| conn.poll_without_shutdown(cx))).await;
    let mut stream = conn.into_parts().io.into_inner();
    // Best effort: the response is out; this only keeps it from being reset.
    if stream.shutdown().await.is_ok() {
        let _ = timeout(LINGER, drain(&mut stream)).await;
    }
    match served {
        Err(_elapsed) => Err(ConnError::WriteTimeout),
        Ok(result) => result.map_err(ConnError::Http),
    }
}

/// A plain-text response, closing the connection.
fn text(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The answer to `request`; hyper leaves the body out for HEAD.
fn route(request: &Request<Incoming>, snapshot: &watch::Receiver<Arc<Snapshot>>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    let read = matches!(*request.method(), Method::GET | Method::HEAD);
    match request.uri().path() {
        "/metrics" if read => {
            let snapshot = Arc::clone(&snapshot.borrow());
            match render(&snapshot) {
                Ok(body) => text(StatusCode::OK, CONTENT_TYPE, body),
                Err(e) => {
                    warn!(error = &e as &(dyn std::error::Error + 'static), "render metrics");
                    text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, "rendering the metrics failed\n")
                }
            }
        }
        "/" if read => text(StatusCode::OK, PLAIN, "lb-agent: Prometheus metrics are at /metrics\n"),
        "/metrics" | "/" => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET and HEAD\n");
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            response
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found; metrics are at /metrics\n"),
    }
}

async fn drain(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while total < LINGER_MAX_BYTES {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use prometheus::Encoder as _;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::status::{AgentInfo, HealthCheckCounts, InterfaceStatus, MapFill, ReasonCount};

    fn traffic(packets: u64) -> Traffic {
        Traffic {
            packets,
            bytes: packets * 64,
            new_flows: packets / 100,
            reply_packets: packets * 9 / 10,
            reply_bytes: packets * 1200,
            closed_flows: packets / 200,
            packets_per_second: 5.0,
            bytes_per_second: 320.0,
            new_flows_per_second: 0.5,
        }
    }

    fn backend(address: &str, state: &str, weight: u32, table_share: f64, open: u64, packets: u64) -> BackendStatus {
        BackendStatus {
            address: address.to_owned(),
            state: state.to_owned(),
            reason: None,
            weight,
            ramp_percent: None,
            in_table: table_share > 0.0,
            table_share,
            open_connections: open,
            drain_seconds_left: None,
            counters: traffic(packets),
            run_time: None,
            health_checks: Some(HealthCheckCounts { ok: 10, fail: 2, timeout: 1, seconds_total: 0.25 }),
        }
    }

    fn sample() -> Snapshot {
        Snapshot {
            agent: AgentInfo {
                version: "0.1.0".to_owned(),
                pid: 42,
                uptime_seconds: 12.5,
                config_path: "/etc/lb/lb.toml".to_owned(),
                errors_total: 3,
                interfaces: vec![InterfaceStatus {
                    name: "eth0".to_owned(),
                    hook: "xdp".to_owned(),
                    xdp_mode: "native".to_owned(),
                    checksums: "complete".to_owned(),
                    fast_path: true,
                    fast_path_reason: "NIC driver ixgbe".to_owned(),
                    paths: vec![crate::status::PathCount { path: "redirected".to_owned(), fast: true, packets: 7 }],
                }],
                socket_lb: crate::status::SocketLbStatus {
                    attached: true,
                    cgroup: Some("/sys/fs/cgroup".to_owned()),
                    note: String::new(),
                    operations: vec![crate::status::SockOpCount { op: "translated".to_owned(), count: 9 }],
                },
                config_refused: None,
                start_time_seconds: 1_700_000_000.5,
            },
            services: vec![ServiceStatus {
                name: "web".to_owned(),
                vip: "10.0.0.100".to_owned(),
                port: 80,
                protocol: "tcp".to_owned(),
                mode: "dnat".to_owned(),
                snat_sources: vec![],
                interfaces: vec!["eth0".to_owned()],
                counters: traffic(1000),
                backends: vec![
                    backend("10.1.0.1:8080", "active", 3, 0.75, 7, 600),
                    backend("10.1.0.2:8080", "active", 1, 0.25, 2, 400),
                    backend("10.1.0.3:8080", "down", 1, 0.0, 0, 0),
                ],
                usable_backends: 2,
            }],
            reasons: vec![
                ReasonCount { reason: "forwarded".to_owned(), verdict: "forward".to_owned(), packets: 1000 },
                ReasonCount { reason: "pass_not_ipv4".to_owned(), verdict: "pass".to_owned(), packets: 12 },
                ReasonCount { reason: "drop_no_backend".to_owned(), verdict: "drop".to_owned(), packets: 2 },
            ],
            maps: vec![MapFill { name: "CONNTRACK".to_owned(), entries: 9, max_entries: 65536 }],
            events: vec![],
            scaling: vec![],
        }
    }

    /// The `# HELP` line of `name`, its `# TYPE` line and its samples.
    #[test]
    fn scaling_state_is_exported() {
        use crate::status::{ReplicaStatus, ScalingStatus};
        let mut snap = Snapshot::default();
        snap.scaling.push(ScalingStatus {
            service: "web".into(),
            min_replicas: 1,
            max_replicas: 4,
            desired: 3,
            pending_starts: 0,
            replicas: vec![
                ReplicaStatus {
                    id: "a".into(),
                    name: "web-2".into(),
                    address: "10.212.0.2:8080".into(),
                    phase: "ready".into(),
                    cpu_percent: Some(45.0),
                    requests_per_second: Some(40.0),
                    age_seconds: 9.0,
                },
                ReplicaStatus {
                    id: "b".into(),
                    name: "web-3".into(),
                    address: "10.212.0.3:8080".into(),
                    phase: "starting".into(),
                    cpu_percent: None,
                    requests_per_second: None,
                    age_seconds: 1.0,
                },
            ],
            decisions: vec![],
            ..ScalingStatus::default()
        });
        let text = render(&snap).unwrap();
        for line in [
            r#"lb_scaling_desired_replicas{service="web"} 3"#,
            r#"lb_scaling_replicas_limit{service="web",bound="max"} 4"#,
            r#"lb_scaling_instances{service="web",phase="ready"} 1"#,
            r#"lb_scaling_instances{service="web",phase="starting"} 1"#,
            r#"lb_scaling_instances{service="web",phase="draining"} 0"#,
            r#"lb_scaling_instance_cpu_ratio{service="web",instance="web-2"} 0.45"#,
            r#"lb_scaling_instance_requests_per_second{service="web",instance="web-2"} 40"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(!text.contains(r#"instance="web-3""#), "no CPU sample yet, no series");
    }

    #[test]
    fn scaling_metrics_targets_and_mode_are_exported() {
        use crate::status::{ScalingHold, ScalingMetric, ScalingStatus};
        let metric = |metric: &str, rule: &str, value: Option<f64>, target: f64| ScalingMetric {
            metric: metric.into(),
            label: metric.into(),
            rule: rule.into(),
            value,
            target,
            unit: String::new(),
        };
        let mut snap = Snapshot::default();
        snap.scaling.push(ScalingStatus {
            service: "web".into(),
            metrics: vec![
                metric("cpu", "up", Some(41.5), 70.0),
                metric("cpu", "down", Some(41.5), 30.0),
                metric("requests_per_second", "up", None, 100.0),
            ],
            hold: Some(ScalingHold { mode: "pinned".into(), replicas: 3, since_unix_time: 1.0 }),
            ..ScalingStatus::default()
        });
        snap.scaling.push(ScalingStatus { service: "api".into(), ..ScalingStatus::default() });
        let text = render(&snap).unwrap();
        assert_eq!(
            family(&text, "lb_scaling_metric_value")[2..],
            [r#"lb_scaling_metric_value{service="web",metric="cpu"} 41.5"#],
            "one series per metric, none without a value"
        );
        for line in [
            r#"lb_scaling_metric_target{service="web",metric="cpu",rule="up"} 70"#,
            r#"lb_scaling_metric_target{service="web",metric="cpu",rule="down"} 30"#,
            r#"lb_scaling_metric_target{service="web",metric="requests_per_second",rule="up"} 100"#,
            r#"lb_scaling_mode{service="web",mode="pinned"} 1"#,
            r#"lb_scaling_mode{service="web",mode="policy"} 0"#,
            r#"lb_scaling_mode{service="api",mode="policy"} 1"#,
            r#"lb_scaling_mode{service="api",mode="paused"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn health_checks_by_result_their_duration_and_the_start_time_are_exported() {
        let mut snap = sample();
        snap.services[0].backends[2].health_checks = None;
        let text = render(&snap).unwrap();
        for line in [
            r#"lb_backend_health_checks_total{service="web",backend="10.1.0.1:8080",result="ok"} 10"#,
            r#"lb_backend_health_checks_total{service="web",backend="10.1.0.1:8080",result="fail"} 2"#,
            r#"lb_backend_health_checks_total{service="web",backend="10.1.0.1:8080",result="timeout"} 1"#,
            r#"lb_backend_health_check_duration_seconds_sum{service="web",backend="10.1.0.1:8080"} 0.25"#,
            r#"lb_backend_health_check_duration_seconds_count{service="web",backend="10.1.0.1:8080"} 13"#,
            "process_start_time_seconds 1700000000.5",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(!text.contains(r#"backend="10.1.0.3:8080",result"#), "a backend without checks has no series");
    }

    #[test]
    fn health_check_counts_sort_probes_by_result() {
        let mut c = HealthCheckCounts::default();
        c.record(true, false, Duration::from_millis(10));
        c.record(false, true, Duration::from_millis(300));
        c.record(false, false, Duration::from_millis(5));
        c.record(true, true, Duration::from_millis(5));
        assert_eq!((c.ok, c.fail, c.timeout, c.count()), (2, 1, 1, 4));
        assert!((c.seconds_total - 0.32).abs() < 1e-9, "{}", c.seconds_total);
    }

    fn family<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        let help = format!("# HELP {name} ");
        let mut lines = text.lines().skip_while(|l| !l.starts_with(&help));
        let Some(first) = lines.next() else { panic!("no family {name} in:\n{text}") };
        std::iter::once(first).chain(lines.take_while(|l| !l.starts_with("# HELP "))).collect()
    }

    #[test]
    fn render_has_every_family_with_help_and_type() {
        let text = render(&sample()).expect("render");
        let types: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split_once(' ').expect("name and type"))
            .collect();
        let expected = [
            ("lb_service_packets_total", "counter"),
            ("lb_service_bytes_total", "counter"),
            ("lb_service_new_flows_total", "counter"),
            ("lb_service_reply_packets_total", "counter"),
            ("lb_service_reply_bytes_total", "counter"),
            ("lb_service_mode", "gauge"),
            ("lb_service_usable_backends", "gauge"),
            ("lb_backend_packets_total", "counter"),
            ("lb_backend_bytes_total", "counter"),
            ("lb_backend_new_flows_total", "counter"),
            ("lb_backend_reply_packets_total", "counter"),
            ("lb_backend_reply_bytes_total", "counter"),
            ("lb_backend_closed_flows_total", "counter"),
            ("lb_backend_open_connections", "gauge"),
            ("lb_backend_weight", "gauge"),
            ("lb_backend_effective_weight", "gauge"),
            ("lb_backend_up", "gauge"),
            ("lb_backend_state", "gauge"),
            ("lb_backend_in_table", "gauge"),
            ("lb_backend_table_share", "gauge"),
            ("lb_packets_total", "counter"),
            ("lb_xdp_attached", "gauge"),
            ("lb_xdp_fast_path", "gauge"),
            ("lb_xdp_path_packets_total", "counter"),
            ("lb_socket_lb_attached", "gauge"),
            ("lb_socket_lb_operations_total", "counter"),
            ("lb_map_entries", "gauge"),
            ("lb_map_max_entries", "gauge"),
            ("lb_agent_errors_total", "counter"),
            ("lb_agent_uptime_seconds", "gauge"),
            ("lb_agent_info", "gauge"),
            ("lb_backend_health_checks_total", "counter"),
            ("lb_backend_health_check_duration_seconds", "summary"),
            ("process_start_time_seconds", "gauge"),
        ];
        assert_eq!(types, expected);
        for (name, kind) in expected {
            assert_eq!(name.ends_with("_total"), kind == "counter", "{name}: counters and only counters end in _total");
            let help = family(&text, name)[0];
            assert!(help.len() > format!("# HELP {name} ").len() + 10, "{name} needs a real HELP text: {help}");
        }
    }

    #[test]
    fn render_service_counters() {
        let text = render(&sample()).expect("render");
        assert_eq!(
            family(&text, "lb_service_packets_total"),
            [
                "# HELP lb_service_packets_total Client packets to the service's VIP and port that the XDP program forwarded to a backend.",
                "# TYPE lb_service_packets_total counter",
                r#"lb_service_packets_total{service="web",vip="10.0.0.100",port="80",protocol="tcp"} 1000"#,
            ]
        );
        assert_eq!(
            family(&text, "lb_service_reply_bytes_total")[2],
            r#"lb_service_reply_bytes_total{service="web",vip="10.0.0.100",port="80",protocol="tcp"} 1200000"#
        );
    }

    #[test]
    fn render_backend_gauges_and_counters() {
        let text = render(&sample()).expect("render");
        assert_eq!(
            family(&text, "lb_backend_open_connections")[1..],
            [
                "# TYPE lb_backend_open_connections gauge",
                r#"lb_backend_open_connections{service="web",backend="10.1.0.1:8080"} 7"#,
                r#"lb_backend_open_connections{service="web",backend="10.1.0.2:8080"} 2"#,
                r#"lb_backend_open_connections{service="web",backend="10.1.0.3:8080"} 0"#,
            ]
        );
        assert_eq!(
            family(&text, "lb_backend_table_share")[2..],
            [
                r#"lb_backend_table_share{service="web",backend="10.1.0.1:8080"} 0.75"#,
                r#"lb_backend_table_share{service="web",backend="10.1.0.2:8080"} 0.25"#,
                r#"lb_backend_table_share{service="web",backend="10.1.0.3:8080"} 0"#,
            ]
        );
        assert_eq!(
            family(&text, "lb_backend_up")[2..],
            [
                r#"lb_backend_up{service="web",backend="10.1.0.1:8080"} 1"#,
                r#"lb_backend_up{service="web",backend="10.1.0.2:8080"} 1"#,
                r#"lb_backend_up{service="web",backend="10.1.0.3:8080"} 0"#,
            ]
        );
        assert!(text.lines().any(|l| l == r#"lb_backend_closed_flows_total{service="web",backend="10.1.0.1:8080"} 3"#));
        assert!(text.lines().any(|l| l == r#"lb_backend_in_table{service="web",backend="10.1.0.3:8080"} 0"#));
        assert!(text.lines().any(|l| l == r#"lb_backend_weight{service="web",backend="10.1.0.1:8080"} 3"#));
    }

    #[test]
    fn a_ramping_backend_exports_its_effective_weight() {
        let mut snapshot = sample();
        snapshot.services[0].backends[0].ramp_percent = Some(40);
        let text = render(&snapshot).expect("render");
        let b = &snapshot.services[0].backends[0];
        let line = format!(r#"lb_backend_effective_weight{{service="web",backend="{}"}} 1.2"#, b.address);
        assert_eq!(b.weight, 3);
        assert!(text.lines().any(|l| l == line), "{text}");
        let other = format!(
            r#"lb_backend_effective_weight{{service="web",backend="{}"}} "#,
            snapshot.services[0].backends[1].address
        );
        assert!(text.lines().any(|l| l.starts_with(&other) && !l.ends_with(" 1.2")), "{text}");
    }

    #[test]
    fn render_one_state_series_per_state() {
        let mut snapshot = sample();
        snapshot.services[0].backends = vec![
            backend("10.1.0.2:8080", "draining", 1, 0.0, 2, 400),
            backend("10.1.0.9:8080", "probing", 1, 0.0, 0, 0),
        ];
        let text = render(&snapshot).expect("render");
        assert_eq!(
            family(&text, "lb_backend_state"),
            [
                "# HELP lb_backend_state Backend state (active, draining or down): 1 for the backend's current state, 0 for the others.",
                "# TYPE lb_backend_state gauge",
                r#"lb_backend_state{service="web",backend="10.1.0.2:8080",state="active"} 0"#,
                r#"lb_backend_state{service="web",backend="10.1.0.2:8080",state="draining"} 1"#,
                r#"lb_backend_state{service="web",backend="10.1.0.2:8080",state="down"} 0"#,
                // An unexpected state still shows up, next to the known ones.
                r#"lb_backend_state{service="web",backend="10.1.0.9:8080",state="active"} 0"#,
                r#"lb_backend_state{service="web",backend="10.1.0.9:8080",state="draining"} 0"#,
                r#"lb_backend_state{service="web",backend="10.1.0.9:8080",state="down"} 0"#,
                r#"lb_backend_state{service="web",backend="10.1.0.9:8080",state="probing"} 1"#,
            ]
        );
        // Draining is up: it still carries its flows.
        assert!(text.lines().any(|l| l == r#"lb_backend_up{service="web",backend="10.1.0.2:8080"} 1"#));
    }

    #[test]
    fn render_reasons_maps_and_agent() {
        let text = render(&sample()).expect("render");
        assert_eq!(
            family(&text, "lb_packets_total")[1..],
            [
                "# TYPE lb_packets_total counter",
                r#"lb_packets_total{reason="forwarded",verdict="forward"} 1000"#,
                r#"lb_packets_total{reason="pass_not_ipv4",verdict="pass"} 12"#,
                r#"lb_packets_total{reason="drop_no_backend",verdict="drop"} 2"#,
            ]
        );
        for line in [
            r#"lb_xdp_attached{interface="eth0",hook="xdp",mode="native",checksums="complete"} 1"#,
            r#"lb_map_entries{map="CONNTRACK"} 9"#,
            r#"lb_service_mode{service="web",vip="10.0.0.100",port="80",protocol="tcp",mode="dnat"} 1"#,
            r#"lb_map_max_entries{map="CONNTRACK"} 65536"#,
            "lb_agent_errors_total 3",
            "lb_agent_uptime_seconds 12.5",
            r#"lb_agent_info{version="0.1.0"} 1"#,
            r#"lb_service_usable_backends{service="web",vip="10.0.0.100",port="80",protocol="tcp"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in:\n{text}");
        }
        assert_eq!(family(&text, "lb_agent_errors_total")[1], "# TYPE lb_agent_errors_total counter");
    }

    #[test]
    fn render_escapes_label_values() {
        let mut snapshot = sample();
        snapshot.services[0].name = "we\"b\\1\nx".to_owned();
        let text = render(&snapshot).expect("render");
        assert_eq!(
            family(&text, "lb_service_packets_total")[2],
            r#"lb_service_packets_total{service="we\"b\\1\nx",vip="10.0.0.100",port="80",protocol="tcp"} 1000"#
        );
        assert!(text.lines().any(|l| l == r#"lb_backend_weight{service="we\"b\\1\nx",backend="10.1.0.1:8080"} 3"#));
        // Nothing but the escapes: every line is a comment or a whole sample.
        assert!(
            text.lines().all(|l| l.starts_with("# ") || l.starts_with("lb_") || l.starts_with("process_")),
            "{text}"
        );
    }

    #[test]
    fn render_empty_snapshot_leaves_out_empty_families() {
        let text = render(&Snapshot::default()).expect("render");
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                r#"lb_socket_lb_attached{cgroup="none"} 0"#,
                "lb_agent_errors_total 0",
                "lb_agent_uptime_seconds 0",
                r#"lb_agent_info{version=""} 1"#,
                "process_start_time_seconds 0"
            ]
        );
    }

    #[test]
    fn collector_in_a_registry_gives_the_same_samples() {
        let (_tx, rx) = watch::channel(Arc::new(sample()));
        let registry = Registry::new();
        register(&registry, rx).expect("every descriptor is valid");
        let mut gathered = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut gathered).expect("encode");
        let gathered = String::from_utf8(gathered).expect("utf-8");
        let rendered = render(&sample()).expect("render");
        // The registry sorts families and series; the content is the same.
        let mut a: Vec<&str> = gathered.lines().collect();
        let mut b: Vec<&str> = rendered.lines().collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
    }

    // ---- HTTP round trips against `serve` on 127.0.0.1:0 ----

    struct Server {
        addr: SocketAddr,
        publisher: watch::Sender<Arc<Snapshot>>,
        task: JoinHandle<anyhow::Result<()>>,
    }

    async fn start(read_timeout: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (publisher, rx) = watch::channel(Arc::new(sample()));
        let task = tokio::spawn(serve_with(listener, rx, read_timeout));
        Server { addr, publisher, task }
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
        }
    }

    /// Sends `request` as is and reads until the server closes.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> Reply {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("send");
        let mut raw = Vec::new();
        timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
            .await
            .expect("server answers and closes in time")
            .expect("read");
        let raw = String::from_utf8(raw).expect("utf-8 reply");
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head in {raw:?}"));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        // hyper answers an HTTP/1.0 request in HTTP/1.0.
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
            .and_then(|r| r.get(..3))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers = lines
            .map(|l| l.split_once(": ").unwrap_or_else(|| panic!("bad header {l:?}")))
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect();
        Reply { status, headers, body: body.to_owned() }
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        exchange(addr, format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await
    }

    #[tokio::test]
    async fn http_get_metrics() {
        let server = start(READ_TIMEOUT).await;
        let reply = get(server.addr, "/metrics").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("Content-Type"), Some("text/plain; version=0.0.4; charset=utf-8"));
        assert_eq!(reply.header("Content-Length"), Some(reply.body.len().to_string().as_str()));
        assert_eq!(reply.header("Connection"), Some("close"));
        assert_eq!(reply.body, render(&sample()).expect("render"));

        let head = exchange(server.addr, b"HEAD /metrics HTTP/1.0\r\n\r\n").await;
        assert_eq!(head.status, 200);
        assert_eq!(head.header("Content-Length"), reply.header("Content-Length"));
        assert_eq!(head.body, "");
    }

    #[tokio::test]
    async fn http_serves_the_latest_snapshot() {
        let server = start(READ_TIMEOUT).await;
        let mut next = sample();
        next.agent.errors_total = 99;
        server.publisher.send(Arc::new(next)).expect("server holds a receiver");
        let reply = get(server.addr, "/metrics").await;
        assert!(reply.body.lines().any(|l| l == "lb_agent_errors_total 99"), "{}", reply.body);
    }

    #[tokio::test]
    async fn http_root_points_at_metrics() {
        let server = start(READ_TIMEOUT).await;
        let reply = get(server.addr, "/").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, "lb-agent: Prometheus metrics are at /metrics\n");
    }

    #[tokio::test]
    async fn http_errors() {
        let server = start(READ_TIMEOUT).await;
        assert_eq!(get(server.addr, "/nope").await.status, 404);
        assert_eq!(get(server.addr, "/metrics/").await.status, 404);

        let post = exchange(server.addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nx=1").await;
        assert_eq!(post.status, 405);
        assert_eq!(post.header("Allow"), Some("GET, HEAD"));
        assert_eq!(exchange(server.addr, b"DELETE / HTTP/1.1\r\n\r\n").await.status, 405);

        assert_eq!(exchange(server.addr, b"hello\r\n\r\n").await.status, 400);
        assert_eq!(exchange(server.addr, b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n").await.status, 400);
        assert_eq!(exchange(server.addr, b"\x00\x01\x02\xff\xfe\n\n").await.status, 400);

        let mut huge = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 2 * MAX_HEAD));
        huge.extend_from_slice(b"\r\n\r\n");
        assert_eq!(exchange(server.addr, &huge).await.status, 431);

        // None of that stopped the server.
        assert_eq!(get(server.addr, "/metrics").await.status, 200);
        assert!(!server.task.is_finished());
    }

    #[tokio::test]
    async fn http_slow_client_times_out() {
        let server = start(Duration::from_millis(200)).await;
        // Half a request line, then nothing: the server gives up and closes
        // (hyper sends no 408).
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream.write_all(b"GET /met").await.expect("send");
        let mut raw = Vec::new();
        timeout(Duration::from_secs(2), stream.read_to_end(&mut raw))
            .await
            .expect("server closes in time")
            .expect("read");
        assert_eq!(raw, b"");
        // A client that connects and closes without a word gets nothing.
        drop(TcpStream::connect(server.addr).await.expect("connect"));
        assert_eq!(get(server.addr, "/").await.status, 200);
    }

    #[tokio::test]
    async fn serve_returns_when_the_sender_is_dropped() {
        let Server { addr, publisher, task } = start(READ_TIMEOUT).await;
        assert_eq!(get(addr, "/").await.status, 200);
        drop(publisher);
        let result = timeout(Duration::from_secs(5), task).await.expect("serve returns").expect("no panic");
        result.expect("serve returns Ok");
    }
}
