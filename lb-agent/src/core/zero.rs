//! Scale from zero (`min_replicas = 0`), laid over `policy::decide`:
//!
//! - at zero, the count stays there until a client waits: the data plane
//!   holds the client's first packet (`lb_common::SERVICE_F_WAKE`) and
//!   reports it, and the next decision ("wake") asks for one instance at
//!   once, whatever the rate limits say;
//! - above zero, the service's rules run with a floor of one: an idle
//!   instance is not measured away by a target rule, only by
//! - the idle window: no new flow and no open connection for
//!   `scale_to_zero_after` ("idle") takes the count to zero.
//!
//! No I/O and no clock: the caller says how long ago the first packet came
//! and how long the service has been idle (`agent::scaler` keeps both).

use std::time::Duration;

use tokio::time::Instant;

use super::policy::{decide, span, Decision, History, MetricsSnapshot};
use crate::config::{scaling::ScalingPolicy, ServiceConfig};

/// The `lb_common::Service::flags` the data plane gets for `svc`.
pub fn service_flags(svc: &ServiceConfig) -> u32 {
    if svc.scaling.as_ref().is_some_and(ScalingPolicy::scales_from_zero) {
        lb_common::SERVICE_F_WAKE
    } else {
        0
    }
}

/// What the scaler knows of the service's clients besides its metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// A client is waiting: its first packet came this long ago.
    pub waiting: Option<Duration>,
    /// How long the service has seen no new flow and no open connection.
    pub idle: Duration,
}

/// Whether the snapshot shows any client: an open connection, a new flow,
/// or an instance still starting (someone asked for it).
pub fn busy(snapshot: &MetricsSnapshot) -> bool {
    snapshot.replicas.iter().any(|r| !r.ready || r.open_connections > 0 || r.new_flows_per_second > 0.0)
}

/// `policy::decide`, with scale from zero where the policy asks for it.
pub fn decide_from_zero(
    snapshot: &MetricsSnapshot,
    policy: &ScalingPolicy,
    history: &History,
    demand: Demand,
    now: Instant,
) -> Decision {
    let Some(zero_after) = policy.zero_after() else { return decide(snapshot, policy, history, now) };
    let floor = ScalingPolicy { min_replicas: 1, ..policy.clone() };
    let d = decide(snapshot, &floor, history, now);
    let (replicas, rule, reason) = match demand.waiting {
        _ if d.previous > 0 && d.replicas <= 1 && demand.idle >= zero_after => {
            (0, "idle", format!("no new flows and no open connections for {}", span(demand.idle)))
        }
        _ if d.previous > 0 => return d,
        Some(waited) => (1, "wake", format!("a client is waiting (first packet {} ago)", span(waited))),
        None => (0, "at zero", "no client is waiting".to_owned()),
    };
    let mut reason = reason;
    if d.current > replicas {
        reason.push_str(&format!("; {} exist: stop {}", d.current, d.current - replicas));
    }
    Decision { replicas, recommended: replicas, rule: rule.into(), reason, ..d }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::scaling::tests::policy, core::policy::ReplicaMetrics};

    fn from_zero() -> ScalingPolicy {
        policy("min_replicas = 0\nmax_replicas = 2\nscale_to_zero_after = \"5s\"\ntarget = { cpu = 50 }")
    }

    fn ready(cpu: f64, open: u64) -> MetricsSnapshot {
        MetricsSnapshot {
            replicas: vec![ReplicaMetrics {
                id: "r0".into(),
                ready: true,
                started_at: Instant::now(),
                cpu_percent: Some(cpu),
                open_connections: open,
                new_flows_per_second: 0.0,
                requests_per_second: None,
            }],
            host_cpu_percent: None,
        }
    }

    fn at(replicas: u32) -> History {
        let mut h = History::new(Duration::from_secs(60));
        let d = decide_from_zero(&MetricsSnapshot::default(), &from_zero(), &h, Demand::default(), Instant::now());
        h.record(&Decision { replicas, ..d }, Instant::now());
        h
    }

    #[test]
    fn a_new_service_stays_at_zero_until_a_client_waits() {
        let (p, h, now) = (from_zero(), History::new(Duration::from_secs(60)), Instant::now());
        let d = decide_from_zero(&MetricsSnapshot::default(), &p, &h, Demand::default(), now);
        assert_eq!((d.replicas, d.rule.as_str()), (0, "at zero"), "{d:?}");
        let waiting = Demand { waiting: Some(Duration::from_millis(12)), idle: Duration::ZERO };
        let d = decide_from_zero(&MetricsSnapshot::default(), &p, &at(0), waiting, now);
        assert_eq!((d.previous, d.replicas, d.rule.as_str()), (0, 1, "wake"));
        assert_eq!(d.reason, "a client is waiting (first packet 12ms ago)");
        assert!(d.is_scaling());
    }

    #[test]
    fn an_idle_instance_is_kept_by_the_floor_until_the_window_ends() {
        let (p, now) = (from_zero(), Instant::now());
        // A target rule alone would take an instance at 0 % CPU to zero.
        let idle = |secs| Demand { waiting: None, idle: Duration::from_secs(secs) };
        let d = decide_from_zero(&ready(0.0, 0), &p, &at(1), idle(4), now);
        assert_eq!(d.replicas, 1, "{d:?}");
        let d = decide_from_zero(&ready(0.0, 0), &p, &at(1), idle(5), now);
        assert_eq!((d.replicas, d.rule.as_str()), (0, "idle"), "{d:?}");
        assert_eq!(d.reason, "no new flows and no open connections for 5s; 1 exist: stop 1");
        // Busy enough for two: the window does not apply.
        let d = decide_from_zero(&ready(100.0, 3), &p, &at(1), idle(5), now);
        assert_eq!(d.replicas, 2, "{d:?}");
    }

    #[test]
    fn busy_is_any_flow_or_a_starting_instance() {
        assert!(!busy(&ready(90.0, 0)), "CPU alone is no client");
        assert!(busy(&ready(0.0, 1)));
        let mut s = ready(0.0, 0);
        s.replicas[0].ready = false;
        assert!(busy(&s));
        s.replicas[0].ready = true;
        s.replicas[0].new_flows_per_second = 0.5;
        assert!(busy(&s));
    }

    #[test]
    fn a_policy_without_zero_is_decided_as_before() {
        let p = policy("min_replicas = 1\nmax_replicas = 2\ntarget = { cpu = 50 }");
        let h = History::new(Duration::from_secs(60));
        let demand = Demand { waiting: None, idle: Duration::from_secs(3600) };
        let now = Instant::now();
        assert_eq!(decide_from_zero(&ready(0.0, 0), &p, &h, demand, now), decide(&ready(0.0, 0), &p, &h, now));
    }
}
