//! The scaling policy: how many replicas a service should run, decided from a
//! snapshot of its replicas' metrics. No I/O and no clock: `now` is an
//! argument and the caller keeps the [`History`], so every rule is unit-tested
//! and recorded traces replay exactly.
//!
//! [`decide`] collects first, then decides, in the order of the Kubernetes
//! HPA's `horizontal.go`, each step a small helper:
//! 1. `collect`: averages over ready replicas, counts of starting and
//!    missing ones;
//! 2. `propose_target` / `propose_threshold`: one proposal per rule, the
//!    largest wins (`combine`);
//! 3. `stabilize`: stabilization windows over past recommendations;
//! 4. `limit_rate`: rate limits over past scale events;
//! 5. `clamp`: `min_replicas..=max_replicas`.
//!
//! The `[service.scaling]` table itself is `config::scaling`.
//!
//! Replicas that are not ready are left out of every average. The base every
//! rule works from is the count the last decision asked for
//! ([`History::desired`], the HPA's `spec.replicas`), not the count that
//! exists: when a replica crashes the decision keeps asking for the same
//! count, with rule "replace", and the caller starts the difference. Going up,
//! replicas still starting and replicas missing count as capacity at zero
//! load, so the load that started them does not start more.

use std::{collections::VecDeque, fmt::Write as _, time::Duration};

use serde::Serialize;
use tokio::time::Instant;

use crate::config::scaling::{Behavior, Metric, ScalingPolicy, SelectPolicy, ThresholdRule, Thresholds};

/// Ratios and replica counts within this of a whole number count as equal,
/// so that float rounding (`150.00000000000003 / 50`) never adds a replica.
const EPSILON: f64 = 1e-9;

// ---------------------------------------------------------------------------
// Inputs and outputs.

/// What the collectors saw of one service's replicas at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// Every replica that exists, ready or still starting.
    pub replicas: Vec<ReplicaMetrics>,
    pub host_cpu_percent: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaMetrics {
    pub id: String,
    /// Passing health checks and in the Maglev table. Replicas that are not
    /// are left out of every average.
    pub ready: bool,
    pub started_at: Instant,
    /// Percent of one core; `None` when the collector has no sample yet.
    pub cpu_percent: Option<f64>,
    pub open_connections: u64,
    pub new_flows_per_second: f64,
    /// `None` where requests cannot be counted.
    pub requests_per_second: Option<f64>,
}

/// What the caller keeps between decisions: the count last asked for, past
/// recommendations (for stabilization windows) and scale events (for rate
/// limits and cooldowns).
#[derive(Clone, Debug, PartialEq)]
pub struct History {
    keep: Duration,
    desired: Option<u32>,
    recommendations: VecDeque<(Instant, u32)>,
    events: VecDeque<ScaleEvent>,
}

/// A change of the desired count (replacing crashed replicas is not one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleEvent {
    pub at: Instant,
    pub from: u32,
    pub to: u32,
}

impl History {
    /// Keeps entries for `keep` (see [`ScalingPolicy::history_window`]).
    pub fn new(keep: Duration) -> History {
        History { keep, desired: None, recommendations: VecDeque::new(), events: VecDeque::new() }
    }

    pub fn for_policy(policy: &ScalingPolicy) -> History {
        History::new(policy.history_window())
    }

    /// After a config reload; entries already pruned stay gone.
    pub fn set_keep(&mut self, keep: Duration) {
        self.keep = keep;
    }

    /// The count the last decision asked for: the base every rule works
    /// from, like the HPA's `spec.replicas`.
    pub fn desired(&self) -> Option<u32> {
        self.desired
    }

    /// Scale events still kept, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &ScaleEvent> {
        self.events.iter()
    }

    /// Remember a decision made at `now`, then prune. Call it after every
    /// [`decide`], whether or not the orchestrator managed to act on it.
    pub fn record(&mut self, decision: &Decision, now: Instant) {
        self.recommendations.push_back((now, decision.recommended));
        if decision.replicas != decision.previous {
            self.events.push_back(ScaleEvent { at: now, from: decision.previous, to: decision.replicas });
        }
        self.desired = Some(decision.replicas);
        self.prune(now);
    }

    /// Drop entries `keep` or more old: no window can still see them.
    pub fn prune(&mut self, now: Instant) {
        let old = |at: Instant| now.saturating_duration_since(at) >= self.keep;
        while self.recommendations.front().is_some_and(|(at, _)| old(*at)) {
            self.recommendations.pop_front();
        }
        while self.events.front().is_some_and(|e| old(e.at)) {
            self.events.pop_front();
        }
    }

    fn recommendation_ages(&self, now: Instant) -> impl Iterator<Item = (Duration, u32)> + '_ {
        self.recommendations.iter().map(move |(at, r)| (now.saturating_duration_since(*at), *r))
    }

    /// (age, replicas added; negative when removed) of each event.
    fn event_ages(&self, now: Instant) -> Vec<(Duration, i64)> {
        self.events.iter().map(|e| (now.saturating_duration_since(e.at), i64::from(e.to) - i64::from(e.from))).collect()
    }

    fn since_last(&self, now: Instant, up_only: bool) -> Option<Duration> {
        self.events.iter().rev().find(|e| !up_only || e.to > e.from).map(|e| now.saturating_duration_since(e.at))
    }
}

/// One decision, ready for status, metrics and the JSONL timeline as-is.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    /// How many replicas should run.
    pub replicas: u32,
    /// How many exist in the snapshot, ready or starting.
    pub current: u32,
    /// What the previous decision asked for (`current` when there was none).
    /// `replicas > current` with `replicas == previous` replaces crashed ones.
    pub previous: u32,
    /// What the rules want before cooldowns, stabilization, rate limits and
    /// min/max; [`History`] keeps it for stabilization windows.
    pub recommended: u32,
    /// The step that settled the count: "target cpu", "threshold cpu>60%",
    /// "tolerance", "starting", "cooldown", "stabilized", "rate limited",
    /// "min replicas", "max replicas", "replace", "no metrics", "fixed", ...
    pub rule: String,
    pub reason: String,
    pub inputs: Inputs,
    /// Every rule's proposal; the largest became `recommended`.
    pub proposals: Vec<Proposal>,
}

impl Decision {
    /// Whether this changes the desired count (replacing replicas does not).
    pub fn is_scaling(&self) -> bool {
        self.replicas != self.previous
    }
}

/// The operator's hold on a service's count (`lb-agent scale`): while it
/// lasts the policy still runs, for the record, but does not decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// `--replicas N`: the count stays at N.
    Pinned(u32),
    /// `--pause`: the count stays where it was when paused.
    Paused(u32),
}

impl Hold {
    pub fn replicas(self) -> u32 {
        match self {
            Hold::Pinned(n) | Hold::Paused(n) => n,
        }
    }

    /// "pinned" or "paused": the rule of the decisions it makes.
    pub fn mode(self) -> &'static str {
        match self {
            Hold::Pinned(_) => "pinned",
            Hold::Paused(_) => "paused",
        }
    }

    /// `policy`'s decision overridden by the hold: the count is the held one
    /// (within `min ..= max`, which a reload may have narrowed), the reason
    /// says what the policy would have done. `recommended` stays the
    /// policy's, so its stabilization windows carry on across a resume.
    pub fn apply(self, policy: Decision, min: u32, max: u32) -> Decision {
        let held = self.replicas();
        let replicas = clamp(held, min, max.max(min));
        let mode = self.mode();
        let mut reason = format!("{mode} at {held} by the operator");
        if replicas != held {
            let _ = write!(reason, ", held at {replicas} by min_replicas {min} ..= max_replicas {max}");
        }
        let _ = write!(reason, "; the policy would ask for {} ({}: {})", policy.replicas, policy.rule, policy.reason);
        let current = policy.current;
        if current < replicas {
            let _ = write!(reason, "; {current} exist: start {}", replicas - current);
        } else if current > replicas {
            let _ = write!(reason, "; {current} exist: stop {}", current - replicas);
        }
        Decision { replicas, rule: mode.into(), reason, ..policy }
    }
}

/// The averages the rules used: over ready replicas with a sample.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Inputs {
    pub ready: u32,
    /// Exist but are not ready yet.
    pub starting: u32,
    /// Asked for but not in the snapshot (crashed, or not started yet).
    pub missing: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_flows_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_cpu_percent: Option<f64>,
}

impl Inputs {
    /// The value rules on `m` looked at, if there was one.
    pub fn value(&self, m: Metric) -> Option<f64> {
        match m {
            Metric::Cpu => self.cpu_percent,
            Metric::HostCpu => self.host_cpu_percent,
            Metric::Connections => self.connections,
            Metric::NewFlowsPerSecond => self.new_flows_per_second,
            Metric::RequestsPerSecond => self.requests_per_second,
        }
    }
}

/// What one rule asks for.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Proposal {
    pub rule: String,
    pub replicas: u32,
    pub reason: String,
    /// What the rule would ask for without its cooldown or its wait for
    /// starting replicas; this, not `replicas`, goes into the stabilization
    /// history, so a cooldown and a window run side by side instead of
    /// adding up.
    #[serde(skip)]
    wanted: u32,
}

impl Proposal {
    fn new(rule: impl Into<String>, replicas: u32, reason: String) -> Proposal {
        Proposal { rule: rule.into(), replicas, reason, wanted: replicas }
    }

    fn held(rule: &str, previous: u32, wanted: u32, reason: String) -> Proposal {
        Proposal { rule: rule.into(), replicas: previous, reason, wanted }
    }
}

// ---------------------------------------------------------------------------
// Deciding.

/// The replica count for one service now, with the rule and the reason.
///
/// Replicas that are not ready are left out of every average. When scaling
/// up, replicas still starting and replicas asked for but missing count as
/// capacity with zero load (the HPA's conservative rule), so the same demand
/// never starts a second batch; threshold rules wait for them outright. When
/// scaling down, starting replicas are ignored and ready ones without a sample
/// count as being at the target.
pub fn decide(snapshot: &MetricsSnapshot, policy: &ScalingPolicy, history: &History, now: Instant) -> Decision {
    let current = count(snapshot.replicas.len());
    let previous = history.desired().unwrap_or(current);
    let collected = collect(snapshot, previous, now);
    let inputs = collected.inputs();
    let (min, max) = (policy.min_replicas, policy.max_replicas.max(policy.min_replicas));

    // As the HPA does, a count outside the bounds (a new service, an edited
    // config) goes straight to the bound, before any metric or rate limit.
    if previous < min || previous > max {
        let replicas = previous.clamp(min, max);
        let rule = if previous < min { "min replicas" } else { "max replicas" };
        return Decision {
            replicas,
            current,
            previous,
            recommended: replicas,
            rule: rule.into(),
            reason: format!("{previous} is outside min_replicas {min} ..= max_replicas {max}"),
            inputs,
            proposals: Vec::new(),
        };
    }

    let proposals = propose_all(policy, &collected, previous, history, now);
    let pick = combine(&proposals, previous, policy.target.is_some() || policy.threshold.is_some());
    let recommended = proposals.iter().map(|p| p.wanted).max().unwrap_or(previous);
    let (mut rule, mut reason) = (pick.rule, pick.reason);

    let stabilized = stabilize(
        previous,
        pick.replicas,
        history.recommendation_ages(now),
        policy.scale_up.stabilization_window,
        policy.scale_down.stabilization_window,
    );
    if stabilized != pick.replicas {
        rule = "stabilized".into();
        let (dir, window) = if pick.replicas > previous {
            ("up", policy.scale_up.stabilization_window)
        } else {
            ("down", policy.scale_down.stabilization_window)
        };
        let _ = write!(reason, "; held at {stabilized} by the scale-{dir} stabilization window ({})", span(window));
    }

    let limited = limit_rate(previous, stabilized, &policy.scale_up, &policy.scale_down, &history.event_ages(now));
    if limited != stabilized {
        rule = "rate limited".into();
        let b = if stabilized > previous { &policy.scale_up } else { &policy.scale_down };
        let _ = write!(reason, "; rate limit {} allows {limited}", describe_rate(b));
    }

    let replicas = clamp(limited, min, max);
    if replicas != limited {
        rule = if replicas == min { "min replicas" } else { "max replicas" }.into();
        let _ = write!(reason, "; {limited} is outside min_replicas {min} ..= max_replicas {max}");
    }

    if current < replicas && replicas <= previous {
        if replicas == previous {
            rule = "replace".into();
        }
        let _ = write!(reason, "; {current} exist: start {}", replicas - current);
    } else if current > replicas && replicas == previous {
        let _ = write!(reason, "; {current} exist: stop {}", current - replicas);
    }

    Decision { replicas, current, previous, recommended, rule, reason, inputs, proposals }
}

/// Sum and counts of one per-replica metric over ready replicas.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Stats {
    sum: f64,
    /// Ready replicas with a usable sample.
    sampled: u32,
    /// Ready replicas without one (`None`, negative or not finite).
    unsampled: u32,
}

impl Stats {
    fn add(&mut self, value: Option<f64>) {
        match value.filter(|v| v.is_finite() && *v >= 0.0) {
            Some(v) => {
                self.sum += v;
                self.sampled += 1;
            }
            None => self.unsampled += 1,
        }
    }

    fn average(&self) -> Option<f64> {
        (self.sampled > 0).then(|| self.sum / f64::from(self.sampled))
    }
}

/// Everything `decide` needs from a snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
struct Collected {
    ready: u32,
    starting: u32,
    /// Asked for (`previous`) but not in the snapshot.
    missing: u32,
    /// How long the longest-starting replica has been at it.
    starting_for: Option<Duration>,
    cpu: Stats,
    connections: Stats,
    new_flows: Stats,
    requests: Stats,
    host_cpu: Option<f64>,
}

impl Collected {
    /// Replicas that will add capacity but carry no load yet.
    fn pending(&self) -> u32 {
        self.starting + self.missing
    }

    fn stats(&self, m: Metric) -> Option<Stats> {
        match m {
            Metric::Cpu => Some(self.cpu),
            Metric::Connections => Some(self.connections),
            Metric::NewFlowsPerSecond => Some(self.new_flows),
            Metric::RequestsPerSecond => Some(self.requests),
            Metric::HostCpu => None,
        }
    }

    fn value(&self, m: Metric) -> Option<f64> {
        match m {
            Metric::HostCpu => self.host_cpu,
            _ => self.stats(m).and_then(|s| s.average()),
        }
    }

    fn inputs(&self) -> Inputs {
        Inputs {
            ready: self.ready,
            starting: self.starting,
            missing: self.missing,
            cpu_percent: self.cpu.average(),
            connections: self.connections.average(),
            new_flows_per_second: self.new_flows.average(),
            requests_per_second: self.requests.average(),
            host_cpu_percent: self.host_cpu,
        }
    }

    fn describe_pending(&self) -> String {
        let mut parts = Vec::new();
        if self.starting > 0 {
            let secs = self.starting_for.unwrap_or_default().as_secs();
            parts.push(format!("{} starting (for {secs}s)", self.starting));
        }
        if self.missing > 0 {
            parts.push(format!("{} missing, to be replaced", self.missing));
        }
        parts.join(" and ")
    }
}

fn collect(snapshot: &MetricsSnapshot, previous: u32, now: Instant) -> Collected {
    let mut c = Collected {
        missing: previous.saturating_sub(count(snapshot.replicas.len())),
        host_cpu: snapshot.host_cpu_percent.filter(|v| v.is_finite() && *v >= 0.0),
        ..Collected::default()
    };
    for r in &snapshot.replicas {
        if !r.ready {
            c.starting += 1;
            let age = now.saturating_duration_since(r.started_at);
            c.starting_for = Some(c.starting_for.map_or(age, |a| a.max(age)));
            continue;
        }
        c.ready += 1;
        c.cpu.add(r.cpu_percent);
        // Exact up to 2^53 connections.
        c.connections.add(Some(r.open_connections as f64));
        c.new_flows.add(Some(r.new_flows_per_second));
        c.requests.add(r.requests_per_second);
    }
    c
}

fn propose_all(policy: &ScalingPolicy, c: &Collected, previous: u32, history: &History, now: Instant) -> Vec<Proposal> {
    let mut out: Vec<Proposal> = policy
        .target
        .iter()
        .flat_map(|t| t.metrics())
        .filter_map(|(m, target)| propose_target(m, target, c, previous, policy.tolerance))
        .collect();
    if let Some(t) = &policy.threshold {
        out.push(propose_threshold(t, c, previous, history.since_last(now, true), history.since_last(now, false)));
    }
    out
}

/// Target tracking on one metric, as the HPA's replica calculator does it:
/// `ceil(sum / target)`, which is `ceil(ready × average / target)`. `None`
/// without a single sample.
fn propose_target(m: Metric, target: f64, c: &Collected, previous: u32, tolerance: f64) -> Option<Proposal> {
    let stats = c.stats(m)?;
    let average = stats.average()?;
    let rule = format!("target {}", m.label());
    let ratio = average / target;
    let seen =
        format!("{} {} over {} ready vs target {}", m.label(), show(m, average), stats.sampled, show_limit(m, target));
    let within = |r: f64| (r - 1.0).abs() <= tolerance + EPSILON;
    if within(ratio) {
        let reason = format!("{seen}: within tolerance {tolerance}, keep {previous}");
        return Some(Proposal::new("tolerance", previous, reason));
    }
    if ratio > 1.0 {
        // Starting, missing and unsampled replicas count as capacity at zero
        // load; if that brings the ratio within tolerance or below 1, the
        // replicas on their way are enough.
        let padding = stats.unsampled + c.pending();
        let n = f64::from(stats.sampled + padding);
        let padded = stats.sum / (n * target);
        if padding > 0 && (within(padded) || padded < 1.0) {
            let label = if c.pending() > 0 { "starting" } else { "missing samples" };
            let wait = if c.pending() > 0 { c.describe_pending() } else { format!("{} unsampled", stats.unsampled) };
            let reason = format!(
                "{seen}, but with {wait} counted at 0 it is {} per replica: keep {previous}",
                show(m, padded * target)
            );
            return Some(Proposal::new(label, previous, reason));
        }
        let desired = ceil_replicas(stats.sum / target).max(previous);
        let reason = format!("{seen}: ceil({:.1} / {target}) = {desired}", stats.sum);
        return Some(Proposal::new(rule, desired, reason));
    }
    // Scaling down: ready replicas without a sample count as at the target,
    // starting ones are left out.
    let n = f64::from(stats.sampled + stats.unsampled);
    let sum = stats.sum + f64::from(stats.unsampled) * target;
    let padded = sum / (n * target);
    if stats.unsampled > 0 && (within(padded) || padded > 1.0) {
        let reason = format!("{seen}, but {} unsampled count as at target: keep {previous}", stats.unsampled);
        return Some(Proposal::new("missing samples", previous, reason));
    }
    let desired = ceil_replicas(sum / target).min(previous);
    let reason = format!("{seen}: ceil({sum:.1} / {target}) = {desired}");
    Some(Proposal::new(rule, desired, reason))
}

/// The seeds' step scaling: `up` when any condition is above its limit,
/// `down` when all are below theirs, each with its cooldown. Scale-up also
/// waits while replicas are starting or missing: they are the answer to the
/// load already seen.
fn propose_threshold(
    t: &Thresholds,
    c: &Collected,
    previous: u32,
    since_up: Option<Duration>,
    since_any: Option<Duration>,
) -> Proposal {
    let cooling = |since: Option<Duration>, cooldown: Duration| since.filter(|s| *s < cooldown);
    if let Some(up) = &t.up {
        let fired: Vec<String> = up
            .conditions()
            .into_iter()
            .filter_map(|(m, limit)| {
                let v = c.value(m)?;
                (v > limit).then(|| (format!("{}>{}", m.label(), show_limit(m, limit)), show(m, v)))
            })
            .map(|(cond, v)| format!("{cond} ({v})"))
            .collect();
        if !fired.is_empty() {
            let rule = format!("threshold {}", strip_values(&fired).join(" or "));
            let seen = fired.join(" or ");
            let wanted = previous.saturating_add(up.step);
            if c.pending() > 0 {
                let reason = format!("{seen}, but {}: wait for them", c.describe_pending());
                return Proposal::held("starting", previous, wanted, reason);
            }
            if let Some(since) = cooling(since_up, up.cooldown) {
                let reason =
                    format!("{seen}, but the last scale-up was {} ago (cooldown {})", span(since), span(up.cooldown));
                return Proposal::held("cooldown", previous, wanted, reason);
            }
            return Proposal::new(rule, wanted, format!("{seen}: add {}", up.step));
        }
    }
    if let Some(down) = &t.down {
        let conditions = down.conditions();
        let below: Vec<String> = conditions
            .iter()
            .filter_map(|&(m, limit)| {
                let v = c.value(m)?;
                (v < limit).then(|| format!("{}<{} ({})", m.label(), show_limit(m, limit), show(m, v)))
            })
            .collect();
        if !conditions.is_empty() && below.len() == conditions.len() {
            let rule = format!("threshold {}", strip_values(&below).join(" and "));
            let seen = below.join(" and ");
            let wanted = previous.saturating_sub(down.step);
            if let Some(since) = cooling(since_any, down.cooldown) {
                let reason = format!(
                    "{seen}, but the last scale event was {} ago (cooldown {})",
                    span(since),
                    span(down.cooldown)
                );
                return Proposal::held("cooldown", previous, wanted, reason);
            }
            return Proposal::new(rule, wanted, format!("{seen}: remove {}", down.step));
        }
    }
    let used = |m: &Metric| t.up.iter().chain(&t.down).any(|r| r.conditions().iter().any(|(c, _)| c == m));
    let values: Vec<String> = Metric::ALL
        .into_iter()
        .filter(used)
        .map(|m| format!("{} {}", m.label(), c.value(m).map_or("n/a".into(), |v| show(m, v))))
        .collect();
    Proposal::new(
        "within thresholds",
        previous,
        format!("no threshold crossed ({}): keep {previous}", values.join(", ")),
    )
}

/// `cpu>60% (75.0%)` → `cpu>60%`.
fn strip_values(conds: &[String]) -> Vec<&str> {
    conds.iter().map(|c| c.split(" (").next().unwrap_or(c)).collect()
}

/// The largest proposal; among equals the first that changes the count, so
/// the reason names a rule that acted. No proposal keeps `previous`.
fn combine(proposals: &[Proposal], previous: u32, has_rules: bool) -> Proposal {
    let top = proposals.iter().map(|p| p.replicas).max();
    let best = top.and_then(|top| {
        let mut at_top = proposals.iter().filter(|p| p.replicas == top);
        let first = at_top.clone().next();
        at_top.find(|p| p.replicas != previous || p.wanted != previous).or(first)
    });
    match best {
        Some(p) => p.clone(),
        None if has_rules => {
            Proposal::new("no metrics", previous, format!("no ready replica has a sample: keep {previous}"))
        }
        None => Proposal::new("fixed", previous, format!("no target or threshold: keep {previous}")),
    }
}

/// The HPA's stabilization (`stabilizeRecommendationWithBehaviors`): going
/// up, no higher than the lowest recommendation within the up window; going
/// down, no lower than the highest within the down window. `past` holds
/// (age, recommendation) pairs; `recommendation` is the current one.
fn stabilize(
    previous: u32,
    recommendation: u32,
    past: impl IntoIterator<Item = (Duration, u32)>,
    up_window: Duration,
    down_window: Duration,
) -> u32 {
    let (mut up, mut down) = (recommendation, recommendation);
    for (age, r) in past {
        if age < up_window {
            up = up.min(r);
        }
        if age < down_window {
            down = down.max(r);
        }
    }
    previous.max(up).min(down)
}

/// Rate limits (`convertDesiredReplicasWithBehaviorRate`): `events` holds
/// (age, replicas added) of past scale events; each direction's limit counts
/// from the count at the start of its period.
fn limit_rate(previous: u32, desired: u32, up: &Behavior, down: &Behavior, events: &[(Duration, i64)]) -> u32 {
    let changed_within = |period: Duration| events.iter().filter(|(age, _)| *age < period).map(|(_, d)| d).sum();
    if desired > previous {
        desired.min(scale_up_limit(previous, changed_within(up.period), up))
    } else if desired < previous {
        desired.max(scale_down_limit(previous, changed_within(down.period), down))
    } else {
        desired
    }
}

/// The most replicas `b` allows now, given the net change within its period.
/// Never below `previous`.
fn scale_up_limit(previous: u32, changed: i64, b: &Behavior) -> u32 {
    let start = period_start(previous, changed);
    let limits = [
        b.max_step.map(|s| start.saturating_add(s)),
        b.max_percent.map(|p| start.saturating_add(percent_of(start, p, true).max(1))),
    ];
    let limit = match b.select_policy {
        SelectPolicy::Disabled => previous,
        SelectPolicy::Max => limits.into_iter().flatten().max().unwrap_or(u32::MAX),
        SelectPolicy::Min => limits.into_iter().flatten().min().unwrap_or(u32::MAX),
    };
    limit.max(previous)
}

/// The fewest replicas `b` allows now, given the net change within its
/// period. Never above `previous`.
fn scale_down_limit(previous: u32, changed: i64, b: &Behavior) -> u32 {
    let start = period_start(previous, changed);
    let limits = [
        b.max_step.map(|s| start.saturating_sub(s)),
        b.max_percent.map(|p| start.saturating_sub(percent_of(start, p, false).max(1))),
    ];
    // The larger change is the lower count.
    let limit = match b.select_policy {
        SelectPolicy::Disabled => previous,
        SelectPolicy::Max => limits.into_iter().flatten().min().unwrap_or(0),
        SelectPolicy::Min => limits.into_iter().flatten().max().unwrap_or(0),
    };
    limit.min(previous)
}

fn period_start(previous: u32, changed: i64) -> u32 {
    let start = i64::from(previous) - changed;
    u32::try_from(start.max(0)).unwrap_or(u32::MAX)
}

fn percent_of(n: u32, percent: u32, round_up: bool) -> u32 {
    let scaled = u64::from(n) * u64::from(percent);
    let v = if round_up { scaled.div_ceil(100) } else { scaled / 100 };
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn describe_rate(b: &Behavior) -> String {
    rate_words(b, span(b.period))
}

/// `b`'s rate limit, its period written as `period`: "4 replicas or 100%
/// per 15s".
fn rate_words(b: &Behavior, period: String) -> String {
    let mut parts = Vec::new();
    if let Some(s) = b.max_step {
        parts.push(format!("{s} replica{}", if s == 1 { "" } else { "s" }));
    }
    if let Some(p) = b.max_percent {
        parts.push(format!("{p}%"));
    }
    match b.select_policy {
        SelectPolicy::Disabled => "disabled".into(),
        SelectPolicy::Max => format!("{} per {period}", parts.join(" or ")),
        SelectPolicy::Min => format!("{} (the lower) per {period}", parts.join(" or ")),
    }
}

/// A policy in words, as `lb-agent check` prints it: its targets, its
/// threshold rules with their cooldowns, each direction's rate limit and
/// stabilization window, the bounds, and how often `decide` runs (`every`).
/// For example: "up by 1 when cpu > 70% OR requests/s > 100, at most every
/// 30 s; down by 1 when cpu < 30% AND requests/s < 50 for 30 s, at most
/// every 30 s; up at most 4 replicas or 100% per 15 s; down at most 50% per
/// 15 s; 2-10 instances; evaluated every 1 s".
pub fn describe_policy(p: &ScalingPolicy, every: Duration) -> String {
    let mut out = Vec::new();
    if let Some(t) = &p.target {
        let each: Vec<String> =
            t.metrics().iter().map(|&(m, v)| format!("{} {}", m.label(), show_limit(m, v))).collect();
        out.push(format!(
            "hold {} per instance (more or fewer instances in proportion, none while within {}%)",
            each.join(", "),
            (p.tolerance * 1000.0).round() / 10.0
        ));
    }
    let rules = p.threshold.as_ref();
    let rule_words = |dir: &str, rule: &ThresholdRule, cmp: &str, join: &str, window: Duration| {
        let conds: Vec<String> =
            rule.conditions().iter().map(|&(m, v)| format!("{} {cmp} {}", m.label(), show_limit(m, v))).collect();
        let held = if window.is_zero() { String::new() } else { format!(" for {}", words_duration(window)) };
        format!(
            "{dir} by {} when {}{held}, at most every {}",
            rule.step,
            conds.join(join),
            words_duration(rule.cooldown)
        )
    };
    if let Some(up) = rules.and_then(|t| t.up.as_ref()) {
        out.push(rule_words("up", up, ">", " OR ", p.scale_up.stabilization_window));
    }
    if let Some(down) = rules.and_then(|t| t.down.as_ref()) {
        out.push(rule_words("down", down, "<", " AND ", p.scale_down.stabilization_window));
    }
    for (dir, b, has_rule, side) in [
        ("up", &p.scale_up, rules.is_some_and(|t| t.up.is_some()), "above"),
        ("down", &p.scale_down, rules.is_some_and(|t| t.down.is_some()), "below"),
    ] {
        if b.select_policy == SelectPolicy::Disabled {
            out.push(format!("scaling {dir} disabled"));
            continue;
        }
        let mut words = format!("{dir} at most {}", rate_words(b, words_duration(b.period)));
        if !has_rule && !b.stabilization_window.is_zero() {
            let _ = write!(words, ", once {side} target for {}", words_duration(b.stabilization_window));
        }
        out.push(words);
    }
    out.push(if p.min_replicas == p.max_replicas {
        format!("{} instances, fixed", p.min_replicas)
    } else {
        format!("{}-{} instances", p.min_replicas, p.max_replicas)
    });
    out.push(format!("evaluated every {}", words_duration(every)));
    out.join("; ")
}

/// A configured duration for people: "500 ms", "30 s", "5 min", "1 h",
/// "90 s".
fn words_duration(d: Duration) -> String {
    let (secs, ms) = (d.as_secs(), d.subsec_millis());
    match (secs, ms) {
        (0, ms) => format!("{ms} ms"),
        (s, 0) if s % 3600 == 0 => format!("{} h", s / 3600),
        (s, 0) if s % 60 == 0 => format!("{} min", s / 60),
        (s, 0) => format!("{s} s"),
        _ => format!("{} s", d.as_secs_f64()),
    }
}

/// A duration for reasons: `12s`, `3m12s`; under a second in ms (`500ms`).
pub(crate) fn span(d: Duration) -> String {
    if d < Duration::from_secs(1) && !d.is_zero() {
        format!("{}ms", d.as_millis())
    } else {
        crate::status::human_duration(d.as_secs_f64())
    }
}

/// `min ..= max`, without panicking on a policy that failed validation.
fn clamp(n: u32, min: u32, max: u32) -> u32 {
    n.min(max).max(min)
}

fn ceil_replicas(x: f64) -> u32 {
    let c = (x - EPSILON).ceil();
    if c.is_nan() || c <= 0.0 {
        0
    } else if c >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        c as u32
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A measured value: one decimal.
fn show(m: Metric, v: f64) -> String {
    format!("{v:.1}{}", m.unit())
}

/// A configured value: as written.
fn show_limit(m: Metric, v: f64) -> String {
    format!("{v}{}", m.unit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::scaling::{tests::policy, Targets, ThresholdRule};

    #[test]
    fn thresholds_in_words_say_or_going_up_and_and_going_down() {
        let p = policy(
            "min_replicas = 2\nmax_replicas = 10\n[threshold]\nup = { cpu = 70, requests_per_second = 100 }\n\
             down = { cpu = 30, requests_per_second = 50 }\n[scale_down]\nstabilization_window = \"5m\"\n",
        );
        assert_eq!(
            describe_policy(&p, Duration::from_secs(30)),
            "up by 1 when cpu > 70% OR requests/s > 100, at most every 30 s; \
             down by 1 when cpu < 30% AND requests/s < 50 for 5 min, at most every 30 s; \
             up at most 4 replicas or 100% per 15 s; down at most 50% per 15 s; 2-10 instances; evaluated every 30 s"
        );
        let p = policy(
            "max_replicas = 5\n[threshold]\nup = { host_cpu = 35, step = 2, cooldown = \"3s\" }\n\
             [scale_down]\nstabilization_window = \"0s\"\n",
        );
        assert_eq!(
            describe_policy(&p, Duration::from_secs(1)),
            "up by 2 when host cpu > 35%, at most every 3 s; up at most 4 replicas or 100% per 15 s; \
             down at most 50% per 15 s; 1-5 instances; evaluated every 1 s"
        );
    }

    #[test]
    fn targets_in_words_name_each_metric_and_the_windows() {
        let p = policy("min_replicas = 1\nmax_replicas = 8\ntarget = { cpu = 50, new_flows_per_second = 200 }\n");
        assert_eq!(
            describe_policy(&p, Duration::from_secs(1)),
            "hold cpu 50%, new flows/s 200 per instance (more or fewer instances in proportion, none while within \
             10%); up at most 4 replicas or 100% per 15 s; down at most 50% per 15 s, once below target for 30 s; \
             1-8 instances; evaluated every 1 s"
        );
        let p = policy(
            "max_replicas = 10\ntolerance = 0.125\ntarget = { requests_per_second = 10 }\n\
             [scale_up]\nstabilization_window = \"90s\"\nmax_step = 1\nmax_percent = 10\nselect_policy = \"min\"\n\
             period = \"1m\"\n[scale_down]\nselect_policy = \"disabled\"\n",
        );
        assert_eq!(
            describe_policy(&p, Duration::from_millis(500)),
            "hold requests/s 10 per instance (more or fewer instances in proportion, none while within 12.5%); \
             up at most 1 replica or 10% (the lower) per 1 min, once above target for 90 s; scaling down disabled; \
             1-10 instances; evaluated every 500 ms"
        );
    }

    #[test]
    fn a_fixed_count_in_words() {
        let p = policy("min_replicas = 3\nmax_replicas = 3\n");
        assert!(describe_policy(&p, Duration::from_secs(1)).ends_with("; 3 instances, fixed; evaluated every 1 s"));
    }

    use proptest::prelude::*;

    /// A base instant with room to go back an hour.
    fn t0() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    fn replica(id: &str, ready: bool, cpu: Option<f64>) -> ReplicaMetrics {
        ReplicaMetrics {
            id: id.into(),
            ready,
            started_at: Instant::now(),
            cpu_percent: cpu,
            open_connections: 0,
            new_flows_per_second: 0.0,
            requests_per_second: None,
        }
    }

    fn cpus(values: &[(bool, f64)]) -> MetricsSnapshot {
        MetricsSnapshot {
            replicas: values
                .iter()
                .enumerate()
                .map(|(i, &(ready, cpu))| replica(&format!("r{i}"), ready, Some(cpu)))
                .collect(),
            host_cpu_percent: None,
        }
    }

    fn collected(ready_cpus: &[f64], starting: u32, missing: u32) -> Collected {
        let mut c = Collected { starting, missing, ready: count(ready_cpus.len()), ..Collected::default() };
        for &v in ready_cpus {
            c.cpu.add(Some(v));
            c.connections.add(Some(0.0));
            c.new_flows.add(Some(0.0));
            c.requests.add(None);
        }
        c
    }

    // --- helpers ------------------------------------------------------------

    #[test]
    fn collect_leaves_unready_replicas_out_of_averages() {
        let now = Instant::now();
        let mut s = cpus(&[(true, 80.0), (true, 60.0), (false, 40.0)]);
        s.replicas[0].requests_per_second = Some(12.0);
        s.replicas[1].cpu_percent = Some(f64::NAN);
        s.replicas[2].started_at = now.checked_sub(Duration::from_secs(3)).unwrap_or(now);
        s.host_cpu_percent = Some(33.0);
        let c = collect(&s, 5, now);
        assert_eq!((c.ready, c.starting, c.missing, c.pending()), (2, 1, 2, 3));
        assert_eq!(c.cpu, Stats { sum: 80.0, sampled: 1, unsampled: 1 });
        assert_eq!(c.requests, Stats { sum: 12.0, sampled: 1, unsampled: 1 });
        let i = c.inputs();
        assert_eq!((i.cpu_percent, i.connections, i.host_cpu_percent), (Some(80.0), Some(0.0), Some(33.0)));
        assert_eq!(serde_json::to_value(&i).unwrap()["requests_per_second"], 12.0);
    }

    #[test]
    fn target_scales_to_ceil_of_demand_over_target() {
        let c = collected(&[90.0, 90.0], 0, 0);
        let p = propose_target(Metric::Cpu, 50.0, &c, 2, 0.1).unwrap();
        assert_eq!((p.rule.as_str(), p.replicas), ("target cpu", 4));
        assert_eq!(p.reason, "cpu 90.0% over 2 ready vs target 50%: ceil(180.0 / 50) = 4");
        let c = collected(&[10.0, 10.0, 10.0], 0, 0);
        let p = propose_target(Metric::Cpu, 50.0, &c, 3, 0.1).unwrap();
        assert_eq!((p.rule.as_str(), p.replicas), ("target cpu", 1));
        let c = collected(&[0.0, 0.0], 0, 0);
        assert_eq!(propose_target(Metric::Cpu, 50.0, &c, 2, 0.1).unwrap().replicas, 0);
    }

    #[test]
    fn target_within_tolerance_keeps_the_count() {
        for v in [45.0, 50.0, 55.0] {
            let c = collected(&[v, v, v], 0, 0);
            let p = propose_target(Metric::Cpu, 50.0, &c, 3, 0.1).unwrap();
            assert_eq!((p.rule.as_str(), p.replicas), ("tolerance", 3), "{v}");
        }
        let c = collected(&[56.0, 56.0, 56.0], 0, 0);
        assert_eq!(propose_target(Metric::Cpu, 50.0, &c, 3, 0.1).unwrap().replicas, 4);
    }

    #[test]
    fn target_counts_starting_replicas_as_idle_capacity_going_up() {
        // Two at 75 % wanted a third; while it starts, the same load asks for
        // no more.
        let c = collected(&[75.0, 75.0], 1, 0);
        let p = propose_target(Metric::Cpu, 50.0, &c, 3, 0.1).unwrap();
        assert_eq!((p.rule.as_str(), p.replicas), ("starting", 3));
        // More load than the starting one can take: go on.
        let c = collected(&[110.0, 110.0], 1, 0);
        assert_eq!(propose_target(Metric::Cpu, 50.0, &c, 3, 0.1).unwrap().replicas, 5);
        // A replica to be replaced counts the same way.
        let c = collected(&[75.0, 75.0], 0, 1);
        assert_eq!(propose_target(Metric::Cpu, 50.0, &c, 3, 0.1).unwrap().replicas, 3);
    }

    #[test]
    fn target_ignores_starting_replicas_going_down() {
        let c = collected(&[20.0, 20.0], 1, 0);
        let p = propose_target(Metric::Cpu, 50.0, &c, 3, 0.1).unwrap();
        assert_eq!((p.rule.as_str(), p.replicas), ("target cpu", 1));
    }

    #[test]
    fn target_without_samples_proposes_nothing() {
        let c = collected(&[], 2, 0);
        assert_eq!(propose_target(Metric::Cpu, 50.0, &c, 2, 0.1), None);
        assert_eq!(propose_target(Metric::RequestsPerSecond, 10.0, &collected(&[5.0], 0, 0), 1, 0.1), None);
    }

    #[test]
    fn target_treats_unsampled_ready_replicas_conservatively() {
        let mut c = collected(&[20.0], 0, 0);
        c.cpu.add(None);
        // Down: the unsampled one counts as at target, (20 + 50) / 2 = 35 %.
        let p = propose_target(Metric::Cpu, 50.0, &c, 2, 0.1).unwrap();
        assert_eq!((p.rule.as_str(), p.replicas), ("target cpu", 2));
        let mut c = collected(&[90.0], 0, 0);
        c.cpu.add(None);
        // Up: it counts as 0, 90 / 2 = 45 %, within tolerance.
        let p = propose_target(Metric::Cpu, 50.0, &c, 2, 0.1).unwrap();
        assert_eq!((p.rule.as_str(), p.replicas), ("missing samples", 2));
    }

    fn thresholds(text: &str) -> Thresholds {
        policy(&format!("max_replicas = 10\n[threshold]\n{text}")).threshold.unwrap()
    }

    #[test]
    fn threshold_up_on_any_condition_down_on_all() {
        let t = thresholds("up = { cpu = 60, new_flows_per_second = 100 }\ndown = { cpu = 10, connections = 5 }");
        let mut c = collected(&[65.0], 0, 0);
        let p = propose_threshold(&t, &c, 2, None, None);
        assert_eq!((p.rule.as_str(), p.replicas), ("threshold cpu>60%", 3));
        assert_eq!(p.reason, "cpu>60% (65.0%): add 1");
        c = collected(&[5.0], 0, 0);
        let p = propose_threshold(&t, &c, 2, None, None);
        assert_eq!((p.rule.as_str(), p.replicas), ("threshold cpu<10% and connections<5", 1));
        c.connections = Stats { sum: 7.0, sampled: 1, unsampled: 0 };
        let p = propose_threshold(&t, &c, 2, None, None);
        assert_eq!((p.rule.as_str(), p.replicas), ("within thresholds", 2));
        assert_eq!(p.reason, "no threshold crossed (cpu 5.0%, connections 7.0, new flows/s 0.0): keep 2");
    }

    #[test]
    fn threshold_without_a_value_never_fires() {
        let t = thresholds("up = { requests_per_second = 10 }\ndown = { cpu = 10, requests_per_second = 5 }");
        let p = propose_threshold(&t, &collected(&[1.0], 0, 0), 2, None, None);
        assert_eq!((p.rule.as_str(), p.replicas), ("within thresholds", 2));
    }

    #[test]
    fn threshold_cooldowns() {
        let t = thresholds("up = { cpu = 60, cooldown = \"30s\" }\ndown = { cpu = 10, cooldown = \"20s\" }");
        let hot = collected(&[90.0], 0, 0);
        let secs = |s| Some(Duration::from_secs(s));
        let p = propose_threshold(&t, &hot, 2, Some(Duration::from_millis(29_347)), secs(1));
        assert_eq!((p.rule.as_str(), p.replicas, p.wanted), ("cooldown", 2, 3));
        assert!(p.reason.ends_with("but the last scale-up was 29s ago (cooldown 30s)"), "{}", p.reason);
        assert_eq!(propose_threshold(&t, &hot, 2, secs(30), secs(1)).replicas, 3);
        // A recent scale-down does not hold back a scale-up.
        assert_eq!(propose_threshold(&t, &hot, 2, None, secs(1)).replicas, 3);
        let cold = collected(&[1.0], 0, 0);
        let p = propose_threshold(&t, &cold, 2, None, secs(19));
        assert_eq!((p.rule.as_str(), p.replicas, p.wanted), ("cooldown", 2, 1));
        assert_eq!(propose_threshold(&t, &cold, 2, None, secs(20)).replicas, 1);
    }

    #[test]
    fn threshold_waits_for_starting_and_missing_replicas() {
        let t = thresholds("up = { cpu = 60 }");
        let p = propose_threshold(&t, &collected(&[90.0], 1, 0), 2, None, None);
        assert_eq!((p.rule.as_str(), p.replicas), ("starting", 2));
        assert_eq!(p.reason, "cpu>60% (90.0%), but 1 starting (for 0s): wait for them");
        let p = propose_threshold(&t, &collected(&[90.0], 0, 1), 2, None, None);
        assert_eq!(p.reason, "cpu>60% (90.0%), but 1 missing, to be replaced: wait for them");
    }

    #[test]
    fn combine_takes_the_largest_and_prefers_one_that_acts() {
        let props = [
            Proposal::new("tolerance", 3, String::new()),
            Proposal::new("target connections", 2, String::new()),
            Proposal::new("target cpu", 3, String::new()),
        ];
        assert_eq!(combine(&props, 3, true).rule, "tolerance");
        assert_eq!(combine(&props, 2, true).rule, "tolerance");
        let props = [Proposal::new("tolerance", 3, String::new()), Proposal::new("target cpu", 4, String::new())];
        assert_eq!(combine(&props, 3, true).rule, "target cpu");
        assert_eq!(combine(&[], 3, true).rule, "no metrics");
        assert_eq!(combine(&[], 3, false).rule, "fixed");
    }

    #[test]
    fn stabilize_holds_scale_down_for_the_window() {
        let s = |secs: u64| Duration::from_secs(secs);
        let past = [(s(40), 9), (s(25), 5), (s(10), 4), (s(1), 2)];
        // Down: no lower than the highest within 30 s.
        assert_eq!(stabilize(5, 1, past, s(0), s(30)), 5);
        assert_eq!(stabilize(5, 1, past, s(0), s(20)), 4);
        assert_eq!(stabilize(5, 1, past, s(0), s(0)), 1);
        // Up, with no up window: at once.
        assert_eq!(stabilize(5, 8, past, s(0), s(30)), 8);
        // Up with a window: no higher than the lowest within it.
        assert_eq!(stabilize(1, 8, past, s(15), s(30)), 2);
        // Never moves against the recommendation.
        assert_eq!(stabilize(3, 3, past, s(60), s(60)), 3);
    }

    fn behavior(step: Option<u32>, percent: Option<u32>, select: SelectPolicy) -> Behavior {
        Behavior {
            stabilization_window: Duration::ZERO,
            max_step: step,
            max_percent: percent,
            period: Duration::from_secs(10),
            select_policy: select,
        }
    }

    #[test]
    fn scale_up_limits() {
        use SelectPolicy::*;
        assert_eq!(scale_up_limit(3, 0, &behavior(Some(2), None, Max)), 5);
        // Two already added in the period: start was 3.
        assert_eq!(scale_up_limit(5, 2, &behavior(Some(2), None, Max)), 5);
        assert_eq!(scale_up_limit(3, 0, &behavior(Some(4), Some(100), Max)), 7);
        assert_eq!(scale_up_limit(3, 0, &behavior(Some(4), Some(100), Min)), 6);
        // Percent rounds up, and allows at least one.
        assert_eq!(scale_up_limit(3, 0, &behavior(None, Some(10), Max)), 4);
        assert_eq!(scale_up_limit(10, 0, &behavior(None, Some(25), Max)), 13);
        assert_eq!(scale_up_limit(3, 0, &behavior(None, None, Max)), u32::MAX);
        assert_eq!(scale_up_limit(3, 0, &behavior(Some(2), None, Disabled)), 3);
        // A scale-down within the period does not make the limit negative.
        assert_eq!(scale_up_limit(3, -5, &behavior(Some(2), None, Max)), 10);
    }

    #[test]
    fn scale_down_limits() {
        use SelectPolicy::*;
        assert_eq!(scale_down_limit(5, 0, &behavior(Some(2), None, Max)), 3);
        assert_eq!(scale_down_limit(3, -2, &behavior(Some(2), None, Max)), 3);
        // Percent rounds down, but removes at least one.
        assert_eq!(scale_down_limit(5, 0, &behavior(None, Some(50), Max)), 3);
        assert_eq!(scale_down_limit(3, 0, &behavior(None, Some(10), Max)), 2);
        assert_eq!(scale_down_limit(10, 0, &behavior(Some(1), Some(50), Max)), 5);
        assert_eq!(scale_down_limit(10, 0, &behavior(Some(1), Some(50), Min)), 9);
        assert_eq!(scale_down_limit(10, 0, &behavior(None, None, Max)), 0);
        assert_eq!(scale_down_limit(10, 0, &behavior(Some(1), None, Disabled)), 10);
    }

    #[test]
    fn limit_rate_counts_events_within_the_period() {
        let s = |secs: u64| Duration::from_secs(secs);
        let up = behavior(Some(2), None, SelectPolicy::Max);
        let down = behavior(Some(1), None, SelectPolicy::Max);
        assert_eq!(limit_rate(3, 10, &up, &down, &[]), 5);
        assert_eq!(limit_rate(3, 10, &up, &down, &[(s(5), 2)]), 3);
        assert_eq!(limit_rate(3, 10, &up, &down, &[(s(10), 2)]), 5);
        assert_eq!(limit_rate(3, 0, &up, &down, &[]), 2);
        assert_eq!(limit_rate(3, 3, &up, &down, &[(s(1), 2)]), 3);
    }

    #[test]
    fn clamp_and_ceil() {
        assert_eq!((clamp(0, 1, 4), clamp(9, 1, 4), clamp(2, 1, 4), clamp(2, 3, 1)), (1, 4, 2, 3));
        assert_eq!(ceil_replicas(150.000_000_000_000_03 / 50.0), 3);
        assert_eq!(ceil_replicas(3.01), 4);
        assert_eq!((ceil_replicas(f64::NAN), ceil_replicas(-2.0), ceil_replicas(f64::INFINITY)), (0, 0, u32::MAX));
    }

    #[test]
    fn history_records_events_and_prunes() {
        let t0 = t0();
        let mut h = History::new(Duration::from_secs(30));
        let d = |previous, replicas| Decision {
            replicas,
            current: previous,
            previous,
            recommended: replicas,
            rule: String::new(),
            reason: String::new(),
            inputs: Inputs::default(),
            proposals: vec![],
        };
        h.record(&d(1, 3), at(t0, 0));
        h.record(&d(3, 3), at(t0, 10));
        h.record(&d(3, 2), at(t0, 20));
        assert_eq!(h.desired(), Some(2));
        assert_eq!(h.events().map(|e| (e.from, e.to)).collect::<Vec<_>>(), vec![(1, 3), (3, 2)]);
        assert_eq!(h.since_last(at(t0, 25), true), Some(Duration::from_secs(25)));
        assert_eq!(h.since_last(at(t0, 25), false), Some(Duration::from_secs(5)));
        h.prune(at(t0, 30));
        assert_eq!(h.events().count(), 1);
        assert_eq!(h.recommendations.len(), 2);
        h.prune(at(t0, 60));
        assert_eq!((h.events().count(), h.recommendations.len(), h.desired()), (0, 0, Some(2)));
    }

    #[test]
    fn decision_serializes_for_the_timeline() {
        let p = policy("max_replicas = 4\ntarget = { cpu = 50 }");
        let d = decide(&cpus(&[(true, 90.0)]), &p, &History::for_policy(&p), Instant::now());
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["replicas"], 2);
        assert_eq!(v["rule"], "target cpu");
        assert_eq!(v["inputs"]["cpu_percent"], 90.0);
        assert!(v["inputs"].get("requests_per_second").is_none());
        assert_eq!(v["proposals"][0]["rule"], "target cpu");
    }

    #[test]
    fn out_of_range_goes_straight_to_the_bound() {
        let p = policy("min_replicas = 2\nmax_replicas = 4\ntarget = { cpu = 50 }");
        let h = History::for_policy(&p);
        let d = decide(&MetricsSnapshot::default(), &p, &h, Instant::now());
        assert_eq!((d.replicas, d.rule.as_str()), (2, "min replicas"));
        let d = decide(&cpus(&[(true, 100.0); 6]), &p, &h, Instant::now());
        assert_eq!((d.replicas, d.rule.as_str()), (4, "max replicas"));
        // Metrics asking for 0 stop at min (with no rate limit in the way).
        let p = policy("min_replicas = 2\nmax_replicas = 4\ntarget = { cpu = 50 }\nscale_down.max_percent = 100");
        let d = decide(&cpus(&[(true, 0.0); 3]), &p, &h, Instant::now());
        assert_eq!((d.replicas, d.recommended, d.rule.as_str()), (2, 0, "min replicas"));
    }

    // --- recorded traces ----------------------------------------------------

    /// A stand-in for the agent and its replicas: each tick builds a
    /// snapshot from the total load, runs `decide` and `record`, and starts
    /// (ready `startup` later) or stops (newest first) replicas to match.
    /// The load splits evenly over ready replicas, times a fixed
    /// per-replica noise.
    struct Sim {
        t0: Instant,
        policy: ScalingPolicy,
        history: History,
        replicas: Vec<(Instant, Instant)>, // (started_at, ready_at)
        startup: Duration,
        noise: f64,
    }

    impl Sim {
        fn new(policy: &str, initial: usize, startup_secs: u64) -> Sim {
            let policy = self::policy(policy);
            let t0 = t0();
            let long_ago = t0 - Duration::from_secs(600);
            Sim {
                t0,
                history: History::for_policy(&policy),
                policy,
                replicas: vec![(long_ago, long_ago); initial],
                startup: Duration::from_secs(startup_secs),
                noise: 0.0,
            }
        }

        fn snapshot(&self, now: Instant, load: f64, t: u64) -> MetricsSnapshot {
            let ready = self.replicas.iter().filter(|(_, r)| *r <= now).count().max(1) as f64;
            let replicas = self
                .replicas
                .iter()
                .enumerate()
                .map(|(i, &(started_at, ready_at))| {
                    let ready_now = ready_at <= now;
                    // Deterministic noise in [-noise, +noise].
                    let wobble = 1.0 + self.noise * ((t * 7 + i as u64 * 13) as f64).sin();
                    let share = if ready_now { load / ready * wobble } else { 0.0 };
                    ReplicaMetrics {
                        id: format!("r{i}"),
                        ready: ready_now,
                        started_at,
                        cpu_percent: Some(share),
                        open_connections: (share * 2.0) as u64,
                        new_flows_per_second: share / 5.0,
                        requests_per_second: None,
                    }
                })
                .collect();
            MetricsSnapshot { replicas, host_cpu_percent: None }
        }

        fn step(&mut self, t: u64, load: f64) -> Decision {
            let now = at(self.t0, t);
            let snap = self.snapshot(now, load, t);
            let d = decide(&snap, &self.policy, &self.history, now);
            self.history.record(&d, now);
            let want = d.replicas as usize;
            while self.replicas.len() < want {
                self.replicas.push((now, now + self.startup));
            }
            self.replicas.truncate(want);
            d
        }

        /// Replicas wanted at each second `0..until`, and every decision.
        fn run(&mut self, until: u64, load: impl Fn(u64) -> f64) -> (Vec<u32>, Vec<Decision>) {
            let decisions: Vec<Decision> = (0..until).map(|t| self.step(t, load(t))).collect();
            (decisions.iter().map(|d| d.replicas).collect(), decisions)
        }
    }

    /// (second, replicas) wherever the count changes, and at 0.
    fn changes(series: &[u32]) -> Vec<(u64, u32)> {
        let mut out = vec![(0, series[0])];
        for (t, w) in series.windows(2).enumerate() {
            if w[1] != w[0] {
                out.push((t as u64 + 1, w[1]));
            }
        }
        out
    }

    /// Piecewise linear through `(second, value)` points, flat outside.
    fn ramp(points: &'static [(u64, f64)]) -> impl Fn(u64) -> f64 {
        move |t| {
            let i = points.iter().rposition(|(pt, _)| *pt <= t).unwrap_or(0);
            let (t1, v1) = points[i];
            let Some(&(t2, v2)) = points.get(i + 1) else { return v1 };
            v1 + (v2 - v1) * (t - t1) as f64 / (t2 - t1) as f64
        }
    }

    /// (1) Load ramps up, holds, falls: up promptly, down only after the
    /// 30 s window, within 1..=4 throughout.
    #[test]
    fn trace_ramp_up_then_down() {
        let mut sim = Sim::new("max_replicas = 4\ntarget = { cpu = 50 }", 1, 2);
        let load = ramp(&[(0, 30.0), (20, 30.0), (60, 250.0), (120, 250.0), (140, 40.0)]);
        let (series, decisions) = sim.run(300, &load);
        assert!(series.iter().all(|&n| (1..=4).contains(&n)), "{series:?}");
        let changes = changes(&series);
        assert_eq!(changes, vec![(0, 1), (25, 2), (35, 3), (45, 4), (159, 3), (164, 2), (179, 1)]);
        // Promptly: every step up comes the second the average leaves the
        // tolerance band (a third replica is wanted above 55 % on two).
        assert_eq!(decisions[34].inputs.cpu_percent.map(|c| c > 55.0), Some(false));
        assert_eq!(decisions[35].rule, "target cpu");
        // Capped: 250 % wants 5.
        assert_eq!(decisions[80].rule, "max replicas");
        // Down only once the recommendation has been lower for 30 s.
        let first_low = decisions[120..].iter().position(|d| d.recommended < 4).unwrap() + 120;
        assert_eq!(first_low, 130);
        assert!(decisions[130..159].iter().all(|d| d.replicas == 4 && d.rule == "stabilized"));
        // Then at most half per 15 s.
        assert_eq!(decisions[172].rule, "rate limited");
    }

    /// (2) Steady load with ±8 % noise, inside the 10 % tolerance: once
    /// settled, not a single scaling action.
    #[test]
    fn trace_steady_noise_never_flaps() {
        let mut sim = Sim::new("max_replicas = 10\ntarget = { cpu = 50, connections = 100 }", 1, 2);
        sim.noise = 0.08;
        let (series, decisions) = sim.run(600, |_| 150.0);
        assert_eq!(changes(&series), vec![(0, 3)]);
        assert!(decisions[5..].iter().all(|d| !d.is_scaling() && d.rule == "tolerance"), "{:?}", &decisions[5..8]);
    }

    /// (3) The first seed: CPU > 60 % adds one, < 10 % removes one, 1-4,
    /// cooldowns 30 s; siege for 300 s.
    #[test]
    fn trace_seed_thresholds() {
        let mut sim = Sim::new(
            r#"
            min_replicas = 1
            max_replicas = 4
            [threshold]
            up = { cpu = 60, cooldown = "30s" }
            down = { cpu = 10, cooldown = "30s" }
            "#,
            1,
            2,
        );
        let (series, decisions) = sim.run(500, |t| if (10..310).contains(&t) { 200.0 } else { 5.0 });
        assert_eq!(changes(&series), vec![(0, 1), (10, 2), (40, 3), (70, 4), (339, 3), (369, 2), (399, 1)]);
        assert_eq!(decisions[10].rule, "threshold cpu>60%");
        assert_eq!(decisions[11].rule, "starting");
        assert_eq!(decisions[20].rule, "cooldown");
        assert_eq!(decisions[100].rule, "within thresholds");
        assert_eq!(decisions[320].rule, "stabilized");
        assert_eq!(decisions[339].rule, "threshold cpu<10%");
        assert_eq!(decisions[350].rule, "cooldown");
        assert_eq!(decisions[450].rule, "min replicas");
    }

    /// (4) A starting replica is left out of the average, and the load that
    /// started it does not start another.
    #[test]
    fn trace_starting_replica_prevents_a_second_scale_up() {
        let p = policy("max_replicas = 10\ntarget = { cpu = 50 }");
        let mut h = History::for_policy(&p);
        let t0 = t0();
        let table: &[(u64, MetricsSnapshot, u32, &str)] = &[
            (0, cpus(&[(true, 75.0), (true, 75.0)]), 3, "target cpu"),
            // The new one is not ready; its start-up burn is not averaged.
            (1, cpus(&[(true, 75.0), (true, 75.0), (false, 40.0)]), 3, "starting"),
            (2, cpus(&[(true, 80.0), (true, 80.0), (false, 40.0)]), 3, "starting"),
            (3, cpus(&[(true, 50.0), (true, 50.0), (true, 50.0)]), 3, "tolerance"),
            // New demand while another starts is still served.
            (10, cpus(&[(true, 80.0), (true, 80.0), (true, 80.0)]), 5, "target cpu"),
            (11, cpus(&[(true, 80.0), (true, 80.0), (true, 80.0), (false, 0.0), (false, 0.0)]), 5, "starting"),
            (12, cpus(&[(true, 100.0), (true, 100.0), (true, 100.0), (false, 0.0), (false, 0.0)]), 6, "target cpu"),
        ];
        for (t, snap, want, rule) in table {
            let d = decide(snap, &p, &h, at(t0, *t));
            assert_eq!((d.replicas, d.rule.as_str()), (*want, *rule), "t={t}: {}", d.reason);
            if *t == 1 {
                assert_eq!((d.inputs.cpu_percent, d.inputs.ready, d.inputs.starting), (Some(75.0), 2, 1));
            }
            h.record(&d, at(t0, *t));
        }
    }

    /// (5) A replica crashes: the count drops below what was asked for and
    /// the decision replaces it, without counting as a scale event.
    #[test]
    fn trace_crashed_replica_is_replaced() {
        let p = policy("min_replicas = 2\nmax_replicas = 6\ntarget = { cpu = 50 }");
        let mut h = History::for_policy(&p);
        let t0 = t0();
        let table: &[(u64, MetricsSnapshot, u32, u32, &str)] = &[
            (0, cpus(&[(true, 50.0); 3]), 3, 3, "tolerance"),
            // r2 is gone; the others have not caught its load yet.
            (5, cpus(&[(true, 50.0); 2]), 2, 3, "replace"),
            // They have; the replacement is starting.
            (6, cpus(&[(true, 75.0), (true, 75.0), (false, 0.0)]), 3, 3, "starting"),
            (8, cpus(&[(true, 50.0); 3]), 3, 3, "tolerance"),
            // Everything crashed: no metrics, but the count still stands.
            (9, MetricsSnapshot::default(), 0, 3, "replace"),
        ];
        for (t, snap, current, want, rule) in table {
            let d = decide(snap, &p, &h, at(t0, *t));
            assert_eq!((d.current, d.replicas, d.rule.as_str()), (*current, *want, *rule), "t={t}: {}", d.reason);
            assert!(!d.is_scaling());
            h.record(&d, at(t0, *t));
        }
        assert_eq!(h.events().count(), 0);
    }

    #[test]
    fn a_hold_sets_the_count_and_says_what_the_policy_wanted() {
        let t0 = t0();
        let p = policy("min_replicas = 1\nmax_replicas = 10\ntarget = { cpu = 50.0 }\n");
        let mut h = History::new(Duration::from_secs(600));
        let wants_three = decide(&cpus(&[(true, 150.0)]), &p, &h, t0);
        assert_eq!(wants_three.replicas, 3);
        let d = Hold::Pinned(2).apply(wants_three.clone(), 1, 10);
        assert_eq!((d.replicas, d.previous, d.current, d.rule.as_str()), (2, 1, 1, "pinned"));
        assert!(
            d.reason.starts_with("pinned at 2 by the operator; the policy would ask for 3 (target cpu: "),
            "{}",
            d.reason
        );
        assert!(d.reason.ends_with("; 1 exist: start 1"), "{}", d.reason);
        assert_eq!(d.recommended, wants_three.recommended, "the policy's own view stays for its windows");
        // A reload that narrowed the bounds holds it within them.
        let d = Hold::Paused(5).apply(wants_three, 1, 4);
        assert_eq!((d.replicas, d.rule.as_str()), (4, "paused"));
        assert!(d.reason.starts_with("paused at 5 by the operator, held at 4 by min_replicas 1 ..= max_replicas 4"));
        // After a resume the policy works from the held count.
        h.record(&d, t0);
        assert_eq!(decide(&cpus(&[(true, 150.0)]), &p, &h, at(t0, 1)).previous, 4);
    }

    /// (6) A jump from 1 to 10 wanted, with at most 2 added per 10 s.
    #[test]
    fn trace_rate_limit_caps_a_big_jump() {
        let mut sim =
            Sim::new("max_replicas = 20\ntarget = { cpu = 50 }\nscale_up = { max_step = 2, period = \"10s\" }", 1, 2);
        let (series, decisions) = sim.run(60, |_| 500.0);
        assert_eq!(changes(&series), vec![(0, 3), (10, 5), (20, 7), (30, 9), (40, 10)]);
        assert_eq!(decisions[5].rule, "rate limited");
        for w in series.windows(11) {
            assert!(w[10] <= w[0] + 2, "{series:?}");
        }
    }

    // --- properties ---------------------------------------------------------

    fn arb_metric() -> impl Strategy<Value = Option<f64>> {
        prop_oneof![
            1 => Just(None),
            1 => Just(Some(f64::NAN)),
            1 => Just(Some(-1.0)),
            1 => Just(Some(1e300)),
            8 => (0.0..500.0f64).prop_map(Some),
        ]
    }

    fn arb_replica() -> impl Strategy<Value = ReplicaMetrics> {
        (any::<bool>(), 0u64..600, arb_metric(), 0u64..10_000, arb_metric(), arb_metric()).prop_map(
            |(ready, age, cpu, conns, flows, rps)| ReplicaMetrics {
                id: String::new(),
                ready,
                started_at: Instant::now() + Duration::from_secs(3600) - Duration::from_secs(age),
                cpu_percent: cpu,
                open_connections: conns,
                new_flows_per_second: flows.unwrap_or(f64::NAN),
                requests_per_second: rps,
            },
        )
    }

    fn arb_snapshot() -> impl Strategy<Value = MetricsSnapshot> {
        (proptest::collection::vec(arb_replica(), 0..16), arb_metric())
            .prop_map(|(replicas, host_cpu_percent)| MetricsSnapshot { replicas, host_cpu_percent })
    }

    fn arb_limit(lo: f64, hi: f64) -> impl Strategy<Value = Option<f64>> {
        proptest::option::of(lo..hi)
    }

    fn arb_behavior() -> impl Strategy<Value = Behavior> {
        (0u64..60, proptest::option::of(1u32..5), proptest::option::of(1u32..100), 1u64..30, 0..3).prop_map(
            |(window, step, percent, period, select)| Behavior {
                stabilization_window: Duration::from_secs(window),
                max_step: step,
                max_percent: percent,
                period: Duration::from_secs(period),
                select_policy: [SelectPolicy::Max, SelectPolicy::Min, SelectPolicy::Disabled][select as usize],
            },
        )
    }

    fn arb_rule(lo: f64, hi: f64) -> impl Strategy<Value = ThresholdRule> {
        (arb_limit(lo, hi), arb_limit(lo, hi), arb_limit(lo, hi), 1u32..4, 0u64..60).prop_map(
            move |(cpu, host_cpu, flows, step, cooldown)| ThresholdRule {
                cpu: cpu.or(Some((lo + hi) / 2.0)),
                host_cpu,
                connections: None,
                new_flows_per_second: flows,
                requests_per_second: None,
                step,
                cooldown: Duration::from_secs(cooldown),
            },
        )
    }

    fn arb_policy() -> impl Strategy<Value = ScalingPolicy> {
        let targets = (arb_limit(1.0, 200.0), arb_limit(1.0, 500.0), arb_limit(0.5, 100.0), arb_limit(0.5, 100.0))
            .prop_map(|(cpu, connections, flows, rps)| Targets {
                cpu: cpu.or(Some(50.0)),
                connections,
                new_flows_per_second: flows,
                requests_per_second: rps,
            });
        // Up limits in 50..100 and down limits in 0..50: never a flapping pair.
        let thresholds = (proptest::option::of(arb_rule(50.0, 100.0)), proptest::option::of(arb_rule(0.0, 50.0)))
            .prop_map(|(up, down)| Thresholds { up: up.or(down.is_none().then(arb_rule_default)), down });
        (
            1u32..5,
            0u32..10,
            0.0..0.5f64,
            proptest::option::of(targets),
            proptest::option::of(thresholds),
            arb_behavior(),
            arb_behavior(),
        )
            .prop_map(|(min, extra, tolerance, target, threshold, scale_up, scale_down)| {
                // No rule: a fixed count.
                let extra = if target.is_none() && threshold.is_none() { 0 } else { extra };
                ScalingPolicy {
                    min_replicas: min,
                    scale_to_zero_after: None,
                    max_replicas: min + extra,
                    tolerance,
                    target,
                    threshold,
                    scale_up,
                    scale_down,
                }
            })
    }

    fn arb_rule_default() -> ThresholdRule {
        ThresholdRule {
            cpu: Some(60.0),
            host_cpu: None,
            connections: None,
            new_flows_per_second: None,
            requests_per_second: None,
            step: 1,
            cooldown: Duration::ZERO,
        }
    }

    proptest! {
        /// Whatever the metrics and the history, the count stays within
        /// min..=max.
        #[test]
        fn decide_stays_within_min_max(
            policy in arb_policy(),
            steps in proptest::collection::vec((0u64..20, arb_snapshot()), 1..30),
        ) {
            prop_assert_eq!(policy.problems("p"), Vec::<String>::new());
            let mut h = History::for_policy(&policy);
            let mut now = Instant::now() + Duration::from_secs(3600);
            for (dt, snap) in steps {
                now += Duration::from_secs(dt);
                let d = decide(&snap, &policy, &h, now);
                prop_assert!((policy.min_replicas..=policy.max_replicas).contains(&d.replicas), "{:?}", d);
                prop_assert!(serde_json::to_string(&d).is_ok());
                h.record(&d, now);
            }
        }

        /// Every ready replica exactly at every target: the count stays as it
        /// is (within min..=max), whatever the tolerance; replicas still
        /// starting are kept too.
        #[test]
        fn at_target_keeps_the_current_count(
            ready in 1usize..20,
            starting in 0usize..3,
            min in 1u32..8,
            extra in 0u32..15,
            tolerance in 0.0..0.5f64,
            cpu in proptest::option::of(0.1..400.0f64),
            connections in proptest::option::of(1u64..5000),
            flows in proptest::option::of(0.1..1000.0f64),
            rps in proptest::option::of(0.1..1000.0f64),
        ) {
            let target = Targets {
                cpu: cpu.or(Some(50.0)),
                connections: connections.map(|c| c as f64),
                new_flows_per_second: flows,
                requests_per_second: rps,
            };
            let replica = |ready| ReplicaMetrics {
                id: String::new(),
                ready,
                started_at: Instant::now(),
                cpu_percent: if ready { target.cpu } else { Some(0.0) },
                open_connections: if ready { connections.unwrap_or(7) } else { 0 },
                new_flows_per_second: if ready { flows.unwrap_or(3.0) } else { 0.0 },
                requests_per_second: if ready { rps } else { None },
            };
            let mut replicas: Vec<_> = (0..ready).map(|_| replica(true)).collect();
            replicas.extend((0..starting).map(|_| replica(false)));
            let policy = ScalingPolicy {
                min_replicas: min,
                scale_to_zero_after: None,
                max_replicas: min + extra,
                tolerance,
                target: Some(target),
                threshold: None,
                scale_up: Behavior::scale_up_default(),
                scale_down: Behavior::scale_down_default(),
            };
            prop_assert_eq!(policy.problems("p"), Vec::<String>::new());
            let d = decide(&MetricsSnapshot { replicas, host_cpu_percent: None }, &policy, &History::for_policy(&policy), Instant::now());
            let current = (ready + starting) as u32;
            prop_assert_eq!(d.replicas, current.clamp(min, min + extra), "{:?}", d);
        }
    }
}
