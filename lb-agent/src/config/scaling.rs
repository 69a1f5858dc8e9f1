//! The `[service.scaling]` table: how many replicas a service may run and
//! the rules that move the count (`core::policy::decide` applies them).
//!
//! ```toml
//! [service.scaling]
//! min_replicas = 1
//! max_replicas = 8
//! tolerance = 0.1                                 # default
//! target = { cpu = 50, new_flows_per_second = 200 }
//!
//! [service.scaling.threshold]                     # the seeds' style
//! up = { cpu = 60, step = 1, cooldown = "30s" }   # any condition above: add `step`
//! down = { cpu = 10, cooldown = "30s" }           # every condition below: remove `step`
//!
//! [service.scaling.scale_up]                      # HPA `behavior`; these are the defaults
//! stabilization_window = "0s"
//! max_step = 4
//! max_percent = 100
//! period = "15s"
//! select_policy = "max"
//!
//! [service.scaling.scale_down]
//! stabilization_window = "30s"
//! max_percent = 50
//! period = "15s"
//! ```
//!
//! The seeds' scripts (`/work/shared/seeds`), as policies (tested in
//! `seed_policies_parse`):
//! - 000, CPU > 60 % up, < 10 % down, 1-4 VMs: `threshold.up = { cpu = 60 }`,
//!   `threshold.down = { cpu = 10 }`; its crash recovery is "replace".
//! - 001, over 10 RPS per server adds one, up to 10, fewer as RPS drops:
//!   `target = { requests_per_second = 10 }` (or `new_flows_per_second` where
//!   each request is a new connection and requests cannot be counted).
//! - 002, system CPU (no numbers given): `up = { host_cpu = 80 }`, ...
//! - 003, every 30 s, CPU > 70 % or > 100 req/s up, CPU < 30 % and < 50 req/s
//!   down, 2-10: `up = { cpu = 70, requests_per_second = 100 }`,
//!   `down = { cpu = 30, requests_per_second = 50 }`, cooldowns 30 s.
//! - 004, system CPU > 35 % up, < 15 % down, 1-5, a 3 s loop: `up = {
//!   host_cpu = 35, cooldown = "3s" }`, `down = { host_cpu = 15, ... }`. Host
//!   CPU is offered for thresholds only: it does not fall in proportion as
//!   replicas are added on the same host, so target tracking on it would run
//!   to the maximum.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::duration;

/// Most replicas one service may have: the agent's backend budget
/// (the config allows `(MAX_BACKENDS - 1) / 2` backends in all).
pub const MAX_REPLICAS: u32 = (lb_common::MAX_BACKENDS - 1) / 2;

/// Longest stabilization window, rate-limit period or cooldown: bounds what
/// the decision history (`core::policy::History`) keeps.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);

/// `scale_to_zero_after` when not given.
pub const DEFAULT_SCALE_TO_ZERO_AFTER: Duration = Duration::from_secs(60);

/// The `[service.scaling]` table of one service.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ScalingPolicy {
    /// Never fewer. 0 scales from zero (`core::zero`): the service has no
    /// instance until a client's first packet wakes it, and goes back to
    /// none after `scale_to_zero_after` without flows.
    #[serde(default = "default_min_replicas")]
    pub min_replicas: u32,
    /// With `min_replicas = 0`: how long the service must see no new flow
    /// and no open connection before its last instance stops.
    #[serde(default, with = "duration::option")]
    pub scale_to_zero_after: Option<Duration>,
    /// Never more. Required, as in the HPA.
    pub max_replicas: u32,
    /// Target tracking leaves the count alone while `|average / target - 1|`
    /// is at most this (the HPA's default, 0.1).
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// Target tracking: per-replica averages to hold.
    #[serde(default)]
    pub target: Option<Targets>,
    /// Step scaling on thresholds, as the seeds' scripts do.
    #[serde(default)]
    pub threshold: Option<Thresholds>,
    /// How fast to grow. Default: no stabilization, at most 4 replicas or
    /// 100 % (whichever is more) per 15 s, the HPA's own default.
    #[serde(default = "Behavior::scale_up_default", deserialize_with = "Behavior::deserialize_up")]
    pub scale_up: Behavior,
    /// How fast to shrink. Default: a 30 s stabilization window, at most
    /// 50 % per 15 s. See [`Behavior::scale_down_default`] for why.
    #[serde(default = "Behavior::scale_down_default", deserialize_with = "Behavior::deserialize_down")]
    pub scale_down: Behavior,
}

// `problems()` refuses every number that is not finite (TOML has `nan` and
// `inf`), so on any policy the agent runs with, `==` is an equivalence; being
// `Eq` lets `ServiceConfig` keep deriving it.
impl Eq for ScalingPolicy {}

fn default_min_replicas() -> u32 {
    1
}
fn default_tolerance() -> f64 {
    0.1
}
fn default_step() -> u32 {
    1
}
/// The seeds poll every 30 s or so; it is also the scale-down window, so a
/// threshold policy's steps come at the pace its users already know.
fn default_cooldown() -> Duration {
    Duration::from_secs(30)
}

/// Per-replica averages to hold; each proposes
/// `ceil(ready × average / target)` replicas.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Targets {
    /// Percent of one core.
    pub cpu: Option<f64>,
    /// Open connections.
    pub connections: Option<f64>,
    pub new_flows_per_second: Option<f64>,
    /// Only where the collector can count requests.
    pub requests_per_second: Option<f64>,
}

impl ScalingPolicy {
    /// Whether any target or threshold looks at `metric`.
    pub fn uses(&self, metric: Metric) -> bool {
        let targets = self.target.iter().flat_map(Targets::metrics);
        let thresholds = self.threshold.iter().flat_map(|t| t.up.iter().chain(&t.down)).flat_map(|r| r.conditions());
        targets.chain(thresholds).any(|(m, _)| m == metric)
    }
}

impl Targets {
    /// The configured targets, in a fixed order.
    pub fn metrics(&self) -> Vec<(Metric, f64)> {
        configured([
            (Metric::Cpu, self.cpu),
            (Metric::Connections, self.connections),
            (Metric::NewFlowsPerSecond, self.new_flows_per_second),
            (Metric::RequestsPerSecond, self.requests_per_second),
        ])
    }
}

/// `up` fires when any of its conditions is above its limit, `down` when all
/// of its conditions are below theirs. Up wins when both fire.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Thresholds {
    #[serde(default)]
    pub up: Option<ThresholdRule>,
    #[serde(default)]
    pub down: Option<ThresholdRule>,
}

/// Limits on per-replica averages (host CPU is the host's), a step and a
/// cooldown. The up cooldown counts from the last scale-up; the down
/// cooldown from the last scale event either way, so capacity just added is
/// not taken away before it has had a chance to take load.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ThresholdRule {
    pub cpu: Option<f64>,
    pub host_cpu: Option<f64>,
    pub connections: Option<f64>,
    pub new_flows_per_second: Option<f64>,
    pub requests_per_second: Option<f64>,
    #[serde(default = "default_step")]
    pub step: u32,
    #[serde(default = "default_cooldown", with = "duration")]
    pub cooldown: Duration,
}

impl ThresholdRule {
    /// The configured conditions, in a fixed order.
    pub fn conditions(&self) -> Vec<(Metric, f64)> {
        configured([
            (Metric::Cpu, self.cpu),
            (Metric::HostCpu, self.host_cpu),
            (Metric::Connections, self.connections),
            (Metric::NewFlowsPerSecond, self.new_flows_per_second),
            (Metric::RequestsPerSecond, self.requests_per_second),
        ])
    }
}

/// The metrics that have a value, with it, in the order given.
fn configured<const N: usize>(values: [(Metric, Option<f64>); N]) -> Vec<(Metric, f64)> {
    values.into_iter().filter_map(|(m, v)| v.map(|v| (m, v))).collect()
}

/// One direction's HPA `behavior`.
#[derive(Clone, Debug, PartialEq)]
pub struct Behavior {
    /// Scale-up goes no higher than the lowest recommendation within this
    /// window; scale-down no lower than the highest.
    pub stabilization_window: Duration,
    /// At most this many replicas added (removed) per `period`.
    pub max_step: Option<u32>,
    /// At most this percent of the replicas at the period's start, rounded
    /// up for scale-up (as the HPA does) and down for scale-down, but always
    /// at least one replica.
    pub max_percent: Option<u32>,
    pub period: Duration,
    /// Which limit applies when both are set; `disabled` stops scaling in
    /// this direction (min/max and replacing crashed replicas still apply).
    pub select_policy: SelectPolicy,
}

/// As in the HPA: `max` takes the limit that allows the larger change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SelectPolicy {
    #[default]
    Max,
    Min,
    Disabled,
}

/// The TOML form of [`Behavior`]: what is left out takes the direction's
/// default. Giving `max_step` or `max_percent` replaces both default limits,
/// so `{ max_step = 2 }` means two replicas per period and nothing else.
#[derive(Deserialize)]
struct BehaviorToml {
    #[serde(default, with = "duration::option")]
    stabilization_window: Option<Duration>,
    #[serde(default)]
    max_step: Option<u32>,
    #[serde(default)]
    max_percent: Option<u32>,
    #[serde(default, with = "duration::option")]
    period: Option<Duration>,
    #[serde(default)]
    select_policy: Option<SelectPolicy>,
}

impl BehaviorToml {
    fn resolve(self, default: Behavior) -> Behavior {
        let own_limits = self.max_step.is_some() || self.max_percent.is_some();
        Behavior {
            stabilization_window: self.stabilization_window.unwrap_or(default.stabilization_window),
            max_step: if own_limits { self.max_step } else { default.max_step },
            max_percent: if own_limits { self.max_percent } else { default.max_percent },
            period: self.period.unwrap_or(default.period),
            select_policy: self.select_policy.unwrap_or(default.select_policy),
        }
    }
}

impl Behavior {
    /// React at once (the HPA's default too): starting a replica is cheap, and
    /// replicas still starting hold back further scale-ups for the same load.
    /// At most 4 replicas or 100 % per 15 s, whichever is more: the HPA's.
    pub fn scale_up_default() -> Behavior {
        Behavior {
            stabilization_window: Duration::ZERO,
            max_step: Some(4),
            max_percent: Some(100),
            period: Duration::from_secs(15),
            select_policy: SelectPolicy::Max,
        }
    }

    /// The HPA waits 300 s because pod metrics are scraped every 15 s and pods
    /// take long to start. Ours come from the data plane's counters every
    /// second or so and a container answers in under a second, so 30 s rides
    /// out noise and short dips and a demo still shows the scale-down within a
    /// minute. Removing a replica drains its connections onto the others, so
    /// at most half go per 15 s: survivors at most double their load per step.
    pub fn scale_down_default() -> Behavior {
        Behavior {
            stabilization_window: Duration::from_secs(30),
            max_step: None,
            max_percent: Some(50),
            period: Duration::from_secs(15),
            select_policy: SelectPolicy::Max,
        }
    }

    fn deserialize_up<'de, D: Deserializer<'de>>(d: D) -> Result<Behavior, D::Error> {
        BehaviorToml::deserialize(d).map(|b| b.resolve(Behavior::scale_up_default()))
    }

    fn deserialize_down<'de, D: Deserializer<'de>>(d: D) -> Result<Behavior, D::Error> {
        BehaviorToml::deserialize(d).map(|b| b.resolve(Behavior::scale_down_default()))
    }

    fn problems(&self, at: &str, down: bool, out: &mut Vec<String>) {
        if self.stabilization_window > MAX_WINDOW {
            out.push(format!("{at}.stabilization_window: {:?} is above the maximum 1h", self.stabilization_window));
        }
        if self.period.is_zero() || self.period > MAX_WINDOW {
            out.push(format!("{at}.period: {:?} must be above 0 and at most 1h", self.period));
        }
        if self.max_step == Some(0) {
            out.push(format!("{at}.max_step: must be at least 1 (select_policy = \"disabled\" stops scaling)"));
        }
        match self.max_percent {
            Some(0) => out.push(format!("{at}.max_percent: must be at least 1")),
            Some(p) if down && p > 100 => out.push(format!("{at}.max_percent: {p} is above 100")),
            _ => {}
        }
    }
}

impl ScalingPolicy {
    /// Every problem that makes the policy unusable. `at` names the table,
    /// e.g. `service[0] "web": scaling`; each problem reads `{at}.field: ...`.
    pub fn problems(&self, at: &str) -> Vec<String> {
        let mut out = Vec::new();
        match (self.min_replicas, self.scale_to_zero_after) {
            (0, Some(d)) if d.is_zero() || d > MAX_WINDOW => {
                out.push(format!("{at}.scale_to_zero_after: {d:?} must be above 0 and at most 1h"))
            }
            (1.., Some(_)) => out.push(format!(
                "{at}.scale_to_zero_after: applies only with min_replicas = 0 (it is {})",
                self.min_replicas
            )),
            _ => {}
        }
        if self.max_replicas < self.min_replicas {
            out.push(format!("{at}.max_replicas: {} is below min_replicas {}", self.max_replicas, self.min_replicas));
        }
        if self.max_replicas > MAX_REPLICAS {
            out.push(format!("{at}.max_replicas: {} is above the maximum {MAX_REPLICAS}", self.max_replicas));
        }
        if !(self.tolerance.is_finite() && (0.0..1.0).contains(&self.tolerance)) {
            out.push(format!("{at}.tolerance: {} must be at least 0 and below 1", self.tolerance));
        }
        // From zero, waking and idling are rules of their own: 0 ..= 1 needs no other.
        if self.target.is_none() && self.threshold.is_none() && self.min_replicas.max(1) != self.max_replicas {
            out.push(format!(
                "{at}: set target and/or threshold, or min_replicas = max_replicas for a fixed number of replicas"
            ));
        }
        if let Some(t) = &self.target {
            if t.metrics().is_empty() {
                out.push(format!(
                    "{at}.target: name at least one of cpu, connections, new_flows_per_second, requests_per_second"
                ));
            }
            for (m, v) in t.metrics() {
                if !(v.is_finite() && v > 0.0) {
                    out.push(format!("{at}.target.{}: {v} must be a number above 0", m.key()));
                }
            }
        }
        if let Some(t) = &self.threshold {
            t.problems(at, &mut out);
        }
        self.scale_up.problems(&format!("{at}.scale_up"), false, &mut out);
        self.scale_down.problems(&format!("{at}.scale_down"), true, &mut out);
        out
    }

    /// Whether the service scales from zero (`min_replicas = 0`).
    pub fn scales_from_zero(&self) -> bool {
        self.min_replicas == 0
    }

    /// With `min_replicas = 0`: the idle time after which the last instance
    /// stops (`scale_to_zero_after`, by default a minute).
    pub fn zero_after(&self) -> Option<Duration> {
        self.scales_from_zero().then(|| self.scale_to_zero_after.unwrap_or(DEFAULT_SCALE_TO_ZERO_AFTER))
    }

    /// How long the decision history (`core::policy::History`) must keep
    /// entries for this policy: its longest stabilization window, rate-limit
    /// period or cooldown.
    pub fn history_window(&self) -> Duration {
        let cooldowns = self.threshold.iter().flat_map(|t| [&t.up, &t.down]).flatten().map(|r| r.cooldown);
        [
            self.scale_up.stabilization_window,
            self.scale_down.stabilization_window,
            self.scale_up.period,
            self.scale_down.period,
        ]
        .into_iter()
        .chain(cooldowns)
        .max()
        .unwrap_or_default()
        .min(MAX_WINDOW)
    }
}

impl Thresholds {
    fn problems(&self, at: &str, out: &mut Vec<String>) {
        if self.up.is_none() && self.down.is_none() {
            out.push(format!("{at}.threshold: set up and/or down"));
        }
        for (dir, rule) in [("up", &self.up), ("down", &self.down)] {
            let Some(rule) = rule else { continue };
            let rat = format!("{at}.threshold.{dir}");
            if rule.conditions().is_empty() {
                out.push(format!(
                    "{rat}: name at least one of cpu, host_cpu, connections, new_flows_per_second, requests_per_second"
                ));
            }
            for (m, v) in rule.conditions() {
                if !(v.is_finite() && v >= 0.0) {
                    out.push(format!("{rat}.{}: {v} must be a number at least 0", m.key()));
                }
            }
            if rule.step == 0 {
                out.push(format!("{rat}.step: must be at least 1"));
            }
            if rule.cooldown > MAX_WINDOW {
                out.push(format!("{rat}.cooldown: {:?} is above the maximum 1h", rule.cooldown));
            }
        }
        if let (Some(up), Some(down)) = (&self.up, &self.down) {
            for (m, low) in down.conditions() {
                if let Some((_, high)) = up.conditions().into_iter().find(|(u, _)| *u == m) {
                    if low >= high {
                        out.push(format!(
                            "{at}.threshold.down.{k}: {low} is not below threshold.up.{k} ({high}), \
                             so the replica count would flap",
                            k = m.key()
                        ));
                    }
                }
            }
        }
    }
}

/// What a rule can look at. All but `HostCpu` are per-replica averages over
/// ready replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Percent of one core.
    Cpu,
    /// The host's CPU, percent; from the snapshot, not averaged.
    HostCpu,
    Connections,
    NewFlowsPerSecond,
    RequestsPerSecond,
}

impl Metric {
    /// Every metric, in the order reasons list them.
    pub const ALL: [Metric; 5] =
        [Metric::Cpu, Metric::HostCpu, Metric::Connections, Metric::NewFlowsPerSecond, Metric::RequestsPerSecond];

    /// The config key.
    pub fn key(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::HostCpu => "host_cpu",
            Metric::Connections => "connections",
            Metric::NewFlowsPerSecond => "new_flows_per_second",
            Metric::RequestsPerSecond => "requests_per_second",
        }
    }

    /// The name in rules and reasons.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::HostCpu => "host cpu",
            Metric::Connections => "connections",
            Metric::NewFlowsPerSecond => "new flows/s",
            Metric::RequestsPerSecond => "requests/s",
        }
    }

    /// What follows a value in reasons: `%` for CPU.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Cpu | Metric::HostCpu => "%",
            _ => "",
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A `[service.scaling]` table that must parse and validate.
    pub(crate) fn policy(text: &str) -> ScalingPolicy {
        let p: ScalingPolicy = toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let problems = p.problems("scaling");
        assert!(problems.is_empty(), "{problems:#?}");
        p
    }

    fn problems(text: &str) -> Vec<String> {
        toml::from_str::<ScalingPolicy>(text).unwrap().problems("scaling")
    }

    // --- configuration ------------------------------------------------------

    #[test]
    fn defaults() {
        let p = policy("max_replicas = 4\ntarget = { cpu = 50 }");
        assert_eq!((p.min_replicas, p.max_replicas, p.tolerance), (1, 4, 0.1));
        assert_eq!(p.scale_up, Behavior::scale_up_default());
        assert_eq!(p.scale_down, Behavior::scale_down_default());
        assert_eq!(p.scale_down.stabilization_window, Duration::from_secs(30));
        assert_eq!(p.history_window(), Duration::from_secs(30));
        assert_eq!(p.target.unwrap().metrics(), vec![(Metric::Cpu, 50.0)]);
    }

    #[test]
    fn own_rate_limits_replace_the_default_ones() {
        let p = policy("max_replicas = 4\ntarget = { cpu = 50 }\nscale_up = { max_step = 2, period = \"10s\" }");
        assert_eq!(p.scale_up.max_step, Some(2));
        assert_eq!(p.scale_up.max_percent, None);
        assert_eq!(p.scale_up.period, Duration::from_secs(10));
        assert_eq!(p.scale_up.stabilization_window, Duration::ZERO);
        let p = policy("max_replicas = 4\ntarget = { cpu = 50 }\n[scale_down]\nstabilization_window = \"2m\"");
        assert_eq!(p.scale_down.stabilization_window, Duration::from_secs(120));
        assert_eq!(p.scale_down.max_percent, Some(50));
    }

    #[test]
    fn threshold_defaults() {
        let p = policy("max_replicas = 4\n[threshold]\nup = { cpu = 60 }\ndown = { cpu = 10, step = 2 }");
        let t = p.threshold.unwrap();
        let (up, down) = (t.up.unwrap(), t.down.unwrap());
        assert_eq!((up.step, up.cooldown), (1, Duration::from_secs(30)));
        assert_eq!((down.step, down.conditions()), (2, vec![(Metric::Cpu, 10.0)]));
    }

    #[test]
    fn unknown_keys_are_refused() {
        for text in [
            "max_replicas = 4\ntarget = { cpu = 50, memory = 3 }",
            "max_replicas = 4\ntarget = { cpu = 50 }\nscale_up = { window = \"1s\" }",
            "max_replicas = 4\n[threshold]\nup = { cpu = 60, cooldwn = \"1s\" }",
            "max_replica = 4",
        ] {
            let err = crate::testing::config_errors_with("scaling", text);
            assert!(err.contains(": unknown key"), "{text}: {err}");
        }
        let err = toml::from_str::<ScalingPolicy>("max_replicas = 4\nscale_down = { period = \"5 parsecs\" }")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unit must be ms, s, m or h"), "{err}");
    }

    #[test]
    fn every_problem_is_listed_with_its_place() {
        let p = problems(
            r#"
            min_replicas = 2
            scale_to_zero_after = "1m"
            max_replicas = 5000
            tolerance = 1.5
            target = { cpu = -1, connections = nan }
            [threshold]
            up = { cpu = 60, step = 0 }
            down = { cpu = 70 }
            [scale_up]
            max_step = 0
            period = "0s"
            [scale_down]
            max_percent = 150
            stabilization_window = "2h"
            "#,
        );
        let want = [
            "scaling.scale_to_zero_after: applies only with min_replicas = 0 (it is 2)",
            "scaling.max_replicas: 5000 is above the maximum 2047",
            "scaling.tolerance: 1.5 must be at least 0 and below 1",
            "scaling.target.cpu: -1 must be a number above 0",
            "scaling.target.connections: NaN must be a number above 0",
            "scaling.threshold.up.step: must be at least 1",
            "scaling.threshold.down.cpu: 70 is not below threshold.up.cpu (60), so the replica count would flap",
            "scaling.scale_up.period: 0ns must be above 0 and at most 1h",
            "scaling.scale_up.max_step: must be at least 1 (select_policy = \"disabled\" stops scaling)",
            "scaling.scale_down.stabilization_window: 7200s is above the maximum 1h",
            "scaling.scale_down.max_percent: 150 is above 100",
        ];
        for w in want {
            assert!(p.iter().any(|x| x == w), "missing {w:?} in {p:#?}");
        }
        assert_eq!(p.len(), want.len(), "{p:#?}");
    }

    #[test]
    fn scale_from_zero_takes_min_zero_and_an_idle_window() {
        let p: ScalingPolicy = toml::from_str("min_replicas = 0\nmax_replicas = 1").unwrap();
        assert_eq!(p.problems("scaling"), Vec::<String>::new());
        assert_eq!(p.zero_after(), Some(DEFAULT_SCALE_TO_ZERO_AFTER));
        let p: ScalingPolicy =
            toml::from_str("min_replicas = 0\nmax_replicas = 1\nscale_to_zero_after = \"5s\"").unwrap();
        assert_eq!(p.zero_after(), Some(Duration::from_secs(5)));
        assert_eq!(problems("min_replicas = 0\nmax_replicas = 3").len(), 1, "0 ..= 3 still needs a rule");
        assert_eq!(
            problems("min_replicas = 0\nmax_replicas = 1\nscale_to_zero_after = \"0s\""),
            ["scaling.scale_to_zero_after: 0ns must be above 0 and at most 1h"]
        );
        assert_eq!(
            problems("max_replicas = 1\nscale_to_zero_after = \"5s\""),
            ["scaling.scale_to_zero_after: applies only with min_replicas = 0 (it is 1)"]
        );
        let p: ScalingPolicy = toml::from_str("min_replicas = 1\nmax_replicas = 1").unwrap();
        assert_eq!(p.zero_after(), None);
    }

    #[test]
    fn a_policy_needs_a_rule_or_a_fixed_count() {
        assert_eq!(problems("max_replicas = 3\nmin_replicas = 3"), Vec::<String>::new());
        let p = problems("max_replicas = 3");
        assert!(p[0].contains("set target and/or threshold"), "{p:?}");
        let p = problems("max_replicas = 3\ntarget = {}\n[threshold]\nup = { step = 1 }");
        assert!(p.iter().any(|x| x.starts_with("scaling.target: name at least one")), "{p:?}");
        assert!(p.iter().any(|x| x.starts_with("scaling.threshold.up: name at least one")), "{p:?}");
        let p = problems("max_replicas = 3\nthreshold = {}");
        assert_eq!(p, vec!["scaling.threshold: set up and/or down"]);
        let p = problems("min_replicas = 4\nmax_replicas = 3\ntarget = { cpu = 50 }");
        assert_eq!(p, vec!["scaling.max_replicas: 3 is below min_replicas 4"]);
    }

    /// The seeds' scripts, each as a policy.
    #[test]
    fn seed_policies_parse() {
        let seeds = [
            // 000: HAProxy + VMs, CPU > 60 % up, < 10 % down, 1-4 VMs.
            "min_replicas = 1\nmax_replicas = 4\n[threshold]\nup = { cpu = 60 }\ndown = { cpu = 10 }",
            // 001: NGINX + Docker, > 10 RPS per server adds one, up to 10.
            "max_replicas = 10\ntarget = { requests_per_second = 10 }",
            "max_replicas = 10\n[threshold]\nup = { requests_per_second = 10 }\ndown = { requests_per_second = 5 }",
            // 002: HAProxy + Docker on system CPU (no numbers given).
            "max_replicas = 5\n[threshold]\nup = { host_cpu = 80 }\ndown = { host_cpu = 20 }",
            // 003: every 30 s, CPU > 70 % or > 100 req/s up, CPU < 30 % and < 50 req/s down, 2-10.
            r#"
            min_replicas = 2
            max_replicas = 10
            [threshold]
            up = { cpu = 70, requests_per_second = 100, cooldown = "30s" }
            down = { cpu = 30, requests_per_second = 50, cooldown = "30s" }
            "#,
            // 004: system CPU > 35 % up, < 15 % down, 1-5, a 3 s loop.
            r#"
            max_replicas = 5
            scale_down = { stabilization_window = "0s" }
            [threshold]
            up = { host_cpu = 35, cooldown = "3s" }
            down = { host_cpu = 15, cooldown = "3s" }
            "#,
        ];
        for s in seeds {
            policy(s);
        }
    }
}
