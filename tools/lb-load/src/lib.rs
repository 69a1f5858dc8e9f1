//! The load generator behind `lb-load`: HTTP/1.1 GETs (hyper's client), either
//! open loop (a rate, or a piecewise-linear ramp of rates) or closed loop (a
//! fixed number of clients), with a report per second.
//!
//! Open loop means the send times are fixed in advance, from the rate alone.
//! A slow server then shows up as latency and failures, never as a quietly
//! lower rate: latency is measured from each request's *scheduled* time, so
//! time it spent waiting for a free worker counts (no coordinated omission).
//! A request whose whole `timeout` passed before a worker could start it
//! fails as [`Failure::Late`]: the generator, not the server, fell behind.
//!
//! Counting is exact: every scheduled request ends as exactly one success or
//! one failure, and the report for a second is only emitted once every
//! request scheduled in it has ended (at most `timeout` later). Requests are
//! counted in the second they were *scheduled* in, so in every [`TimePoint`]
//! `ok + failed == offered`.
//!
//! The pure parts (durations, ramps and their timetable, the latency
//! histogram, aggregation, formatting) are tested without a network; [`run`]
//! (and with it the HTTP client) is tested against servers on 127.0.0.1.
//!
//! Threads, each with one connection: a worker drives its own current-thread
//! tokio runtime (for hyper) only while its request is under way, which keeps
//! the timing simple and honest, and the worker pool is bounded
//! (`max_workers`). The clock is `std::time::Instant`: this runs real traffic
//! in real time.

pub mod plot;
pub mod stop;

use std::{
    cell::Cell,
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    future::{poll_fn, Future},
    io::{self, ErrorKind},
    net::SocketAddr,
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Condvar, Mutex, MutexGuard,
    },
    thread,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Empty};
use hyper::{
    body::{Bytes, Incoming},
    client::conn::http1,
    header::{self, HeaderValue},
    Request, Uri,
};
use hyper_util::rt::TokioIo;
use lb_lab::netns::NetNs;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

/// Longest backend name kept from a response body.
const MAX_BACKEND_NAME: usize = 64;
/// Largest response head, and largest body, read.
const MAX_RESPONSE: usize = 64 * 1024;
/// Highest rate a ramp may ask for, requests per second.
const MAX_RATE: f64 = 1_000_000.0;
const WORKER_STACK: usize = 128 * 1024;
/// How often sleeping threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// A request that starts later than this after its scheduled time counts as
/// delayed: no worker was free, the generator fell behind.
pub const DELAYED_START: Duration = Duration::from_millis(10);
/// Safety net: the run gives up this long after `duration + timeout`.
const OVERRUN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("bad duration {input:?}: {reason}")]
    Duration { input: String, reason: &'static str },
    #[error("bad ramp {input:?}: {reason}")]
    Ramp { input: String, reason: String },
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("network namespace {name:?}")]
    Netns {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("spawn a load thread")]
    Spawn(#[source] io::Error),
    #[error("start a worker's I/O runtime")]
    Runtime(#[source] io::Error),
    #[error("the run did not finish in time: {pending} requests never ended")]
    Overrun { pending: u64 },
    #[error("counting broke: {0}")]
    Inexact(String),
}

// ---------------------------------------------------------------------------
// Durations and ramps

/// `"30s"`, `"500ms"`, `"2m"`, `"1h"`, `"1.5s"`; a bare number is seconds.
pub fn parse_duration(input: &str) -> Result<Duration, LoadError> {
    let err = |reason| LoadError::Duration { input: input.to_owned(), reason };
    let s = input.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| err("expected a number and a unit, like 30s or 500ms"))?;
    let scale = match unit {
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(err("unit must be ms, s, m or h")),
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 365.0 * 86400.0 {
        return Err(err("too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A request rate over time: straight lines between `(time, rate)` points,
/// the last rate held after the last point.
#[derive(Clone, Debug, PartialEq)]
pub struct Ramp {
    /// (seconds, requests per second); starts at 0 s, times increase.
    points: Vec<(f64, f64)>,
}

impl Ramp {
    pub fn constant(rate: f64) -> Result<Ramp, LoadError> {
        Ramp::new(vec![(0.0, rate)], &rate.to_string())
    }

    /// `"0s:10,20s:200,40s:200,60s:10"`: rate 10 at 0 s rising to 200 at
    /// 20 s, held until 40 s, falling to 10 at 60 s.
    pub fn parse(input: &str) -> Result<Ramp, LoadError> {
        let mut points = Vec::new();
        for part in input.split(',').map(str::trim) {
            let (t, rate) = part.split_once(':').ok_or_else(|| LoadError::Ramp {
                input: input.to_owned(),
                reason: format!("{part:?} is not TIME:RATE"),
            })?;
            let t = parse_duration(t)?.as_secs_f64();
            let rate: f64 = rate
                .trim()
                .parse()
                .map_err(|_| LoadError::Ramp { input: input.to_owned(), reason: format!("{rate:?} is not a rate") })?;
            points.push((t, rate));
        }
        Ramp::new(points, input)
    }

    fn new(points: Vec<(f64, f64)>, input: &str) -> Result<Ramp, LoadError> {
        let err = |reason: &str| LoadError::Ramp { input: input.to_owned(), reason: reason.to_owned() };
        match points.first() {
            None => return Err(err("no points")),
            Some(&(t, _)) if t != 0.0 => return Err(err("the first point must be at 0s")),
            Some(_) => {}
        }
        if points.windows(2).any(|w| w[1].0 <= w[0].0) {
            return Err(err("times must increase"));
        }
        if points.iter().any(|&(_, r)| !(0.0..=MAX_RATE).contains(&r)) {
            return Err(err("rates must be between 0 and 1000000"));
        }
        Ok(Ramp { points })
    }

    /// Time of the last point, in seconds.
    pub fn end(&self) -> f64 {
        self.points.last().map_or(0.0, |p| p.0)
    }

    pub fn rate_at(&self, t: f64) -> f64 {
        let i = self.points.partition_point(|p| p.0 <= t);
        match (self.points.get(i.wrapping_sub(1)), self.points.get(i)) {
            (Some(&(t0, r0)), Some(&(t1, r1))) => r0 + (r1 - r0) * (t - t0) / (t1 - t0),
            (Some(&(_, r)), None) => r,
            (None, _) => self.points[0].1,
        }
    }

    /// Requests the ramp asks for in `[0, t)`: the integral of the rate.
    pub fn expected(&self, t: f64) -> f64 {
        let mut total = 0.0;
        for (i, &(t0, r0)) in self.points.iter().enumerate() {
            if t <= t0 {
                break;
            }
            let t1 = self.points.get(i + 1).map_or(f64::INFINITY, |p| p.0);
            let until = t.min(t1);
            total += (r0 + self.rate_at(until)) / 2.0 * (until - t0);
        }
        total
    }

    /// When the expected count reaches `n`: the inverse of [`Ramp::expected`].
    /// `None` if it never does (the rate drops to 0 for good first).
    pub fn time_of(&self, n: f64) -> Option<f64> {
        let mut done = 0.0;
        for (i, &(t0, r0)) in self.points.iter().enumerate() {
            let Some(&(t1, r1)) = self.points.get(i + 1) else {
                // After the last point the rate stays r0.
                return if n <= done {
                    Some(t0)
                } else if r0 > 0.0 {
                    Some(t0 + (n - done) / r0)
                } else {
                    None
                };
            };
            let dt = t1 - t0;
            let area = (r0 + r1) / 2.0 * dt;
            if done + area >= n {
                // Solve r0*x + a*x^2 = m for x in [0, dt], with a = (r1-r0)/(2 dt).
                // This form of the quadratic formula holds for either sign
                // of a and does not cancel when r0 is large.
                let m = n - done;
                let a = (r1 - r0) / (2.0 * dt);
                let denom = r0 + (r0 * r0 + 4.0 * a * m).max(0.0).sqrt();
                let x = if m <= 0.0 || denom <= 0.0 { 0.0 } else { 2.0 * m / denom };
                return Some(t0 + x.clamp(0.0, dt));
            }
            done += area;
        }
        None
    }

    /// Send times in `[0, duration)`, in seconds: request `k` goes when the
    /// expected count reaches `k + 0.5`, so a constant rate R gives exactly
    /// R per whole second, each away from the second's edges.
    pub fn timetable(&self, duration: f64) -> impl Iterator<Item = f64> + '_ {
        (0u64..).map_while(move |k| self.time_of(k as f64 + 0.5).filter(|&t| t < duration))
    }
}

// ---------------------------------------------------------------------------
// Latency histogram

/// Log-linear buckets over microseconds: exact below 128 µs, then 64
/// buckets per power of two (under 1.6 % error), like HdrHistogram with two
/// significant digits. Cheap to record into and to merge.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    max_us: u64,
    sum_us: u128,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;

fn bucket_of(us: u64) -> usize {
    if us < 2 * SUB {
        return us as usize;
    }
    let msb = 63 - us.leading_zeros();
    let shift = msb - SUB_BITS;
    (2 * SUB + u64::from(shift - 1) * SUB + ((us >> shift) - SUB)) as usize
}

/// The highest value that lands in `bucket`.
fn bucket_high(bucket: usize) -> u64 {
    let b = bucket as u64;
    if b < 2 * SUB {
        return b;
    }
    let j = b - 2 * SUB;
    let shift = j / SUB + 1;
    let low = (j % SUB + SUB) << shift;
    low + (1 << shift) - 1
}

impl Histogram {
    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let b = bucket_of(us);
        if self.counts.len() <= b {
            self.counts.resize(b + 1, 0);
        }
        self.counts[b] += 1;
        self.count += 1;
        self.max_us = self.max_us.max(us);
        self.sum_us += u128::from(us);
    }

    pub fn merge(&mut self, other: &Histogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.max_us = self.max_us.max(other.max_us);
        self.sum_us += other.sum_us;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The smallest recorded bucket value at or above quantile `q` (0..=1),
    /// never above the maximum; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Duration::from_micros(bucket_high(b).min(self.max_us)));
            }
        }
        Some(Duration::from_micros(self.max_us))
    }

    pub fn max(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_micros(self.max_us))
    }

    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_micros((self.sum_us / u128::from(self.count)) as u64))
    }
}

// ---------------------------------------------------------------------------
// Outcomes

/// Why a request failed. Each failed request has exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The connect was refused (RST to the SYN: nothing listening).
    Refused,
    /// The connection was reset, or closed before a whole response.
    Reset,
    /// No whole response within the timeout (connect, send or receive).
    Timeout,
    /// A response, but not 2xx.
    Status,
    /// Anything else: unreachable, no local ports left, a malformed response.
    Other,
    /// The timeout had passed before a worker was free to start it: the
    /// generator fell behind (raise `--workers`), not the server.
    Late,
}

impl Failure {
    pub const ALL: [Failure; 6] =
        [Failure::Refused, Failure::Reset, Failure::Timeout, Failure::Status, Failure::Other, Failure::Late];

    pub fn label(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Reset => "reset",
            Failure::Timeout => "timeout",
            Failure::Status => "status",
            Failure::Other => "other",
            Failure::Late => "late",
        }
    }

    /// Sorts an I/O error into a kind.
    pub fn of_io(e: &io::Error) -> Failure {
        match e.kind() {
            ErrorKind::ConnectionRefused => Failure::Refused,
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof => Failure::Reset,
            ErrorKind::TimedOut | ErrorKind::WouldBlock => Failure::Timeout,
            _ => Failure::Other,
        }
    }
}

/// Failures counted by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureCounts {
    pub refused: u64,
    pub reset: u64,
    pub timeout: u64,
    pub status: u64,
    pub other: u64,
    pub late: u64,
}

impl FailureCounts {
    pub fn get(&self, kind: Failure) -> u64 {
        match kind {
            Failure::Refused => self.refused,
            Failure::Reset => self.reset,
            Failure::Timeout => self.timeout,
            Failure::Status => self.status,
            Failure::Other => self.other,
            Failure::Late => self.late,
        }
    }

    fn slot(&mut self, kind: Failure) -> &mut u64 {
        match kind {
            Failure::Refused => &mut self.refused,
            Failure::Reset => &mut self.reset,
            Failure::Timeout => &mut self.timeout,
            Failure::Status => &mut self.status,
            Failure::Other => &mut self.other,
            Failure::Late => &mut self.late,
        }
    }

    pub fn add(&mut self, kind: Failure) {
        *self.slot(kind) += 1;
    }

    pub fn total(&self) -> u64 {
        Failure::ALL.iter().map(|&k| self.get(k)).sum()
    }
}

/// How one request ended, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub outcome: Outcome,
    /// From the scheduled send time to the end.
    pub latency: Duration,
    /// From the scheduled send time to when a worker started it.
    pub start_delay: Duration,
    /// Sent a second time after a reused connection turned out closed.
    pub retried: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx response; `backend` is its body, trimmed (the demo backend
    /// answers with its name).
    Ok {
        backend: String,
    },
    Failed {
        kind: Failure,
        detail: String,
    },
}

// ---------------------------------------------------------------------------
// Aggregation

/// One window of the report (one second, or less for the last one).
/// Requests count in the window they were scheduled in, so
/// `ok + failed == offered` always holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimePoint {
    /// Start of the window, seconds since the run started.
    pub t: f64,
    /// Length of the window in seconds: 1, except maybe for the last.
    pub span: f64,
    /// Requests scheduled (open loop) or issued (closed loop) in the window.
    pub offered: u64,
    pub ok: u64,
    pub failed: u64,
    pub failures: FailureCounts,
    /// Latency quantiles of the successes, from the scheduled send time;
    /// `None` when nothing succeeded.
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Successes per backend name.
    pub backends: BTreeMap<String, u64>,
    /// Requests that started more than [`DELAYED_START`] after their
    /// scheduled time, whatever their outcome.
    pub delayed: u64,
}

impl TimePoint {
    fn per_second(&self, n: u64) -> f64 {
        if self.span > 0.0 {
            n as f64 / self.span
        } else {
            0.0
        }
    }

    pub fn offered_rate(&self) -> f64 {
        self.per_second(self.offered)
    }

    pub fn ok_rate(&self) -> f64 {
        self.per_second(self.ok)
    }

    pub fn failed_rate(&self) -> f64 {
        self.per_second(self.failed)
    }
}

/// Latency quantiles of all successes in a run, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

/// The whole run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Seconds over which requests were scheduled.
    pub duration_s: f64,
    pub offered: u64,
    pub ok: u64,
    pub failed: u64,
    pub failures: FailureCounts,
    /// `ok / offered`, what siege calls availability; 1 when nothing was offered.
    pub availability: f64,
    pub latency: Latency,
    pub backends: BTreeMap<String, u64>,
    /// The first error message seen for each failure kind.
    pub first_errors: BTreeMap<String, String>,
    /// Requests sent again on a new connection because a reused keep-alive
    /// connection turned out closed (each still counts once).
    pub keepalive_retries: u64,
    /// Requests that started more than [`DELAYED_START`] late: with a
    /// silent server a full worker pool turns into timeouts, and this says
    /// that the generator, too, was at its limit.
    pub delayed: u64,
    pub max_start_delay_ms: f64,
    /// Most worker threads alive at once.
    pub peak_workers: usize,
}

#[derive(Default)]
struct Window {
    scheduled: u64,
    ended: u64,
    ok: u64,
    failures: FailureCounts,
    latency: Histogram,
    backends: BTreeMap<String, u64>,
    delayed: u64,
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)
}

/// Collects outcomes into per-second [`TimePoint`]s and a [`Summary`].
/// Feed it [`Aggregator::scheduled`] before the matching
/// [`Aggregator::ended`], and [`Aggregator::close`] once no more requests
/// will be scheduled before a second.
pub struct Aggregator {
    windows: BTreeMap<u64, Window>,
    /// The next window to emit.
    next: u64,
    /// No request will be scheduled before this second any more.
    closed_before: u64,
    /// Where the run ends, for the length of the last window.
    end: f64,
    total: Window,
    first_errors: BTreeMap<String, String>,
    keepalive_retries: u64,
    max_start_delay: Duration,
    /// `ended` calls without a matching `scheduled`: must stay empty.
    mismatches: Vec<String>,
}

impl Aggregator {
    pub fn new(duration: Duration) -> Aggregator {
        Aggregator {
            windows: BTreeMap::new(),
            next: 0,
            closed_before: 0,
            end: duration.as_secs_f64(),
            total: Window::default(),
            first_errors: BTreeMap::new(),
            keepalive_retries: 0,
            max_start_delay: Duration::ZERO,
            mismatches: Vec::new(),
        }
    }

    pub fn scheduled(&mut self, second: u64) {
        if second < self.next {
            self.mismatches.push(format!("scheduled in second {second}, already reported"));
            return;
        }
        self.windows.entry(second).or_default().scheduled += 1;
        self.total.scheduled += 1;
    }

    pub fn ended(&mut self, second: u64, end: Ended) {
        let Some(w) = self.windows.get_mut(&second).filter(|w| w.ended < w.scheduled) else {
            self.mismatches.push(format!("a request of second {second} ended that was not scheduled"));
            return;
        };
        let Ended { outcome, latency, start_delay, retried } = end;
        w.ended += 1;
        self.total.ended += 1;
        self.keepalive_retries += u64::from(retried);
        let delayed = u64::from(start_delay > DELAYED_START);
        w.delayed += delayed;
        self.total.delayed += delayed;
        self.max_start_delay = self.max_start_delay.max(start_delay);
        match outcome {
            Outcome::Ok { backend } => {
                w.ok += 1;
                w.latency.record(latency);
                self.total.ok += 1;
                self.total.latency.record(latency);
                *self.total.backends.entry(backend.clone()).or_insert(0) += 1;
                *w.backends.entry(backend).or_insert(0) += 1;
            }
            Outcome::Failed { kind, detail } => {
                w.failures.add(kind);
                self.total.failures.add(kind);
                self.first_errors.entry(kind.label().to_owned()).or_insert(detail);
            }
        }
    }

    /// No request will be scheduled before second `before` any more.
    pub fn close(&mut self, before: u64) {
        self.closed_before = self.closed_before.max(before);
    }

    /// The run ends at `at` seconds (earlier than planned after a stop):
    /// closes every window and shortens the last one.
    pub fn finish(&mut self, at: f64) {
        self.end = at.max(0.0);
        self.close(self.end.ceil() as u64);
    }

    /// Requests scheduled that have not ended yet.
    pub fn pending(&self) -> u64 {
        self.total.scheduled - self.total.ended
    }

    /// Windows that can no longer change, in order: closed for scheduling,
    /// and every request scheduled in them ended.
    pub fn take_ready(&mut self) -> Vec<TimePoint> {
        let mut out = Vec::new();
        while self.next < self.closed_before {
            let second = self.next;
            if self.windows.get(&second).is_some_and(|w| w.ended < w.scheduled) {
                break;
            }
            let w = self.windows.remove(&second).unwrap_or_default();
            let t = second as f64;
            let failed = w.failures.total();
            debug_assert_eq!(w.ok + failed, w.scheduled);
            out.push(TimePoint {
                t,
                span: (t + 1.0).min(self.end.max(t)) - t,
                offered: w.scheduled,
                ok: w.ok,
                failed,
                failures: w.failures,
                p50_ms: ms(w.latency.quantile(0.5)),
                p90_ms: ms(w.latency.quantile(0.9)),
                p99_ms: ms(w.latency.quantile(0.99)),
                max_ms: ms(w.latency.max()),
                backends: w.backends,
                delayed: w.delayed,
            });
            self.next += 1;
        }
        out
    }

    /// Checks that every scheduled request ended exactly once and every
    /// window was reported.
    pub fn check_exact(&self) -> Result<(), LoadError> {
        if let Some(m) = self.mismatches.first() {
            return Err(LoadError::Inexact(format!("{m} ({} such)", self.mismatches.len())));
        }
        let t = &self.total;
        if t.ended != t.scheduled || t.ok + t.failures.total() != t.scheduled {
            return Err(LoadError::Inexact(format!(
                "{} scheduled, {} ended: {} ok + {} failed",
                t.scheduled,
                t.ended,
                t.ok,
                t.failures.total()
            )));
        }
        if !self.windows.is_empty() {
            return Err(LoadError::Inexact(format!("{} windows never reported", self.windows.len())));
        }
        Ok(())
    }

    pub fn summary(&self, peak_workers: usize) -> Summary {
        let t = &self.total;
        let h = &t.latency;
        Summary {
            duration_s: self.end,
            offered: t.scheduled,
            ok: t.ok,
            failed: t.failures.total(),
            failures: t.failures,
            availability: if t.scheduled == 0 { 1.0 } else { t.ok as f64 / t.scheduled as f64 },
            latency: Latency {
                p50_ms: ms(h.quantile(0.5)),
                p90_ms: ms(h.quantile(0.9)),
                p99_ms: ms(h.quantile(0.99)),
                p999_ms: ms(h.quantile(0.999)),
                max_ms: ms(h.max()),
                mean_ms: ms(h.mean()),
            },
            backends: t.backends.clone(),
            first_errors: self.first_errors.clone(),
            keepalive_retries: self.keepalive_retries,
            delayed: t.delayed,
            max_start_delay_ms: ms(Some(self.max_start_delay)).unwrap_or_default(),
            peak_workers,
        }
    }
}

// ---------------------------------------------------------------------------
// Text, CSV

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) if v < 1000.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

/// The column heads for [`format_point`].
pub fn format_header() -> String {
    let mut s = format!("{:>6} {:>8} {:>7} {:>6}", "t", "offered", "ok", "fail");
    for kind in Failure::ALL {
        let _ = write!(s, " {:>7}", kind.label());
    }
    let _ = write!(s, " {:>8} {:>8} {:>8} {:>8}  backends", "p50 ms", "p90 ms", "p99 ms", "max ms");
    s
}

/// One report line: window start, offered rate (requests per second),
/// successes, failures (in total and by kind), latency, backends.
pub fn format_point(p: &TimePoint) -> String {
    let mut s = format!("{:>5}s {:>8.0} {:>7} {:>6}", p.t, p.offered_rate(), p.ok, p.failed);
    for kind in Failure::ALL {
        let _ = write!(s, " {:>7}", p.failures.get(kind));
    }
    let _ =
        write!(s, " {:>8} {:>8} {:>8} {:>8} ", fmt_ms(p.p50_ms), fmt_ms(p.p90_ms), fmt_ms(p.p99_ms), fmt_ms(p.max_ms));
    for (name, n) in &p.backends {
        let _ = write!(s, " {name}={n}");
    }
    s
}

/// The end-of-run table.
pub fn format_summary(s: &Summary) -> String {
    let pct = |n: u64| if s.offered == 0 { 0.0 } else { 100.0 * n as f64 / s.offered as f64 };
    let mut out = String::new();
    let _ = writeln!(out, "summary over {:.1} s", s.duration_s);
    let _ = writeln!(
        out,
        "  requests      {:>9}   {:.1}/s offered",
        s.offered,
        if s.duration_s > 0.0 { s.offered as f64 / s.duration_s } else { 0.0 }
    );
    let _ = writeln!(out, "  ok            {:>9}   {:7.3}%  (availability)", s.ok, 100.0 * s.availability);
    let _ = writeln!(out, "  failed        {:>9}   {:7.3}%", s.failed, pct(s.failed));
    for kind in Failure::ALL {
        let n = s.failures.get(kind);
        if n > 0 {
            let example = s.first_errors.get(kind.label()).map(|e| format!("  first: {e}")).unwrap_or_default();
            let _ = writeln!(out, "    {:<11} {:>9}   {:7.3}%{example}", kind.label(), n, pct(n));
        }
    }
    let l = &s.latency;
    let _ = writeln!(
        out,
        "  latency ms    p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {}",
        fmt_ms(l.p50_ms),
        fmt_ms(l.p90_ms),
        fmt_ms(l.p99_ms),
        fmt_ms(l.p999_ms),
        fmt_ms(l.max_ms),
        fmt_ms(l.mean_ms)
    );
    if !s.backends.is_empty() {
        let _ = writeln!(out, "  backends");
        for (name, &n) in &s.backends {
            let share = if s.ok == 0 { 0.0 } else { 100.0 * n as f64 / s.ok as f64 };
            let _ = writeln!(out, "    {name:<20} {n:>9}   {share:5.1}%");
        }
    }
    if s.delayed > 0 {
        let _ = writeln!(
            out,
            "  generator behind: {} requests started over {} ms late (max {:.0} ms): lb-load was short of CPU or workers",
            s.delayed,
            DELAYED_START.as_millis(),
            s.max_start_delay_ms
        );
    }
    if s.keepalive_retries > 0 {
        let _ = writeln!(out, "  keep-alive retries {}", s.keepalive_retries);
    }
    let _ = writeln!(out, "  workers       {:>9}   (peak threads)", s.peak_workers);
    out
}

/// RFC 4180 quoting, when `s` holds one of `special`.
fn csv_quote(s: &str, special: &[char]) -> String {
    if s.contains(special) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// The series as CSV; backends go into one column as `name=n;name=n`.
pub fn series_to_csv(series: &[TimePoint]) -> String {
    let mut out = String::from("t,span,offered,ok,failed");
    for kind in Failure::ALL {
        let _ = write!(out, ",{}", kind.label());
    }
    out.push_str(",delayed,p50_ms,p90_ms,p99_ms,max_ms,backends\n");
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    for p in series {
        let _ = write!(out, "{},{},{},{},{}", p.t, p.span, p.offered, p.ok, p.failed);
        for kind in Failure::ALL {
            let _ = write!(out, ",{}", p.failures.get(kind));
        }
        let backends: Vec<String> =
            p.backends.iter().map(|(n, c)| format!("{}={c}", csv_quote(n, &[',', '"', '\n', ';', '=']))).collect();
        let _ = writeln!(
            out,
            ",{},{},{},{},{},{}",
            p.delayed,
            opt(p.p50_ms),
            opt(p.p90_ms),
            opt(p.p99_ms),
            opt(p.max_ms),
            csv_quote(&backends.join(";"), &[',', '"', '\n'])
        );
    }
    out
}

// ---------------------------------------------------------------------------
// The client side of one request

/// The backend name in a response body: trimmed, at most 64 characters.
fn backend_name(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let name: String = text.trim().chars().take(MAX_BACKEND_NAME).collect();
    if name.is_empty() {
        "(empty)".into()
    } else {
        name
    }
}

/// The request every worker sends, and where.
struct Client {
    target: SocketAddr,
    /// Request target, e.g. `/` or `/?work_ms=5`.
    path: Uri,
    host: HeaderValue,
    keep_alive: bool,
}

/// One worker's side of the network: a current-thread tokio runtime that the
/// worker's thread drives while a request is under way, and at most one open
/// connection. All of it stays on that thread, and so in its namespace.
struct Session {
    /// Declared first, so dropped before the runtime it is registered with.
    conn: Option<Conn>,
    runtime: tokio::runtime::Runtime,
}

/// A hyper HTTP/1.1 client connection.
struct Conn {
    sender: http1::SendRequest<Empty<Bytes>>,
    /// The connection's I/O. It is polled beside each request (see
    /// [`drive`]) rather than on a task of its own, so that dropping the
    /// `Conn` closes the socket at once; `None` once it has ended.
    io: Option<ConnIo>,
}

type ConnIo = http1::Connection<TokioIo<TcpStream>, Empty<Bytes>>;

struct Failed {
    kind: Failure,
    detail: String,
    /// Nothing of a response arrived (a reused connection may just have
    /// been closed by the server while idle).
    nothing_received: bool,
}

fn fail(kind: Failure, detail: impl Into<String>) -> Failed {
    Failed { kind, detail: detail.into(), nothing_received: false }
}

fn io_fail(what: &str, e: &io::Error) -> Failed {
    fail(Failure::of_io(e), format!("{what}: {e}"))
}

/// Sorts a hyper error: by its I/O error if it has one; `closed` says what
/// a connection that closed too early cut short.
fn hyper_fail(e: &hyper::Error, closed: &str) -> Failed {
    if let Some(io) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<io::Error>()) {
        return io_fail("receive", io);
    }
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        fail(Failure::Reset, closed)
    } else {
        fail(Failure::Other, format!("receive: {e}"))
    }
}

/// Runs `exchange` while polling the connection's I/O beside it. Once the
/// connection has ended it is dropped, which also ends a request still
/// waiting on it.
async fn drive<T>(io: &mut Option<ConnIo>, exchange: impl Future<Output = T>) -> T {
    let mut exchange = pin!(exchange);
    poll_fn(|cx| {
        if let Some(conn) = io {
            if Pin::new(conn).poll(cx).is_ready() {
                *io = None;
            }
        }
        exchange.as_mut().poll(cx)
    })
    .await
}

impl Conn {
    async fn open(target: SocketAddr) -> Result<Conn, Failed> {
        let stream = TcpStream::connect(target).await.map_err(|e| io_fail("connect", &e))?;
        stream.set_nodelay(true).map_err(|e| io_fail("set TCP_NODELAY", &e))?;
        let (sender, io) = http1::Builder::new()
            .max_buf_size(MAX_RESPONSE)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| hyper_fail(&e, "connection closed before a request"))?;
        Ok(Conn { sender, io: Some(io) })
    }

    /// Whether a kept-alive connection can take another request: not once
    /// the server has closed it (as far as we can see yet).
    async fn usable(&mut self) -> bool {
        let Conn { sender, io } = self;
        io.is_some() && drive(io, sender.ready()).await.is_ok()
    }
}

impl Session {
    fn new() -> Result<Session, LoadError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(LoadError::Runtime)?;
        Ok(Session { conn: None, runtime })
    }
}

/// Reads a whole response body (at most `MAX_RESPONSE` bytes).
async fn read_body(mut body: Incoming) -> Result<Vec<u8>, Failed> {
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| hyper_fail(&e, "connection closed inside the body"))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > MAX_RESPONSE {
                return Err(fail(Failure::Other, "response too large"));
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}

impl Client {
    fn new(cfg: &LoadConfig) -> Result<Client, LoadError> {
        let bad = |what: &str| LoadError::Config(format!("{what} is not a valid request target"));
        Ok(Client {
            target: cfg.target,
            path: cfg.path.parse().map_err(|_| bad(&cfg.path))?,
            host: HeaderValue::from_str(&cfg.target.to_string()).map_err(|_| bad("the target"))?,
            keep_alive: cfg.keep_alive,
        })
    }

    fn request(&self) -> Request<Empty<Bytes>> {
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = self.path.clone();
        let headers = request.headers_mut();
        headers.insert(header::HOST, self.host.clone());
        headers.insert(header::USER_AGENT, HeaderValue::from_static("lb-load"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let connection = if self.keep_alive { "keep-alive" } else { "close" };
        headers.insert(header::CONNECTION, HeaderValue::from_static(connection));
        request
    }

    /// One request, within `deadline`; on a reused keep-alive connection
    /// that turns out to be closed before any answer, once more on a fresh
    /// connection (as HTTP clients do for idempotent requests). Returns the
    /// outcome and whether it was retried.
    fn exchange(&self, session: &mut Session, deadline: Instant) -> (Outcome, bool) {
        let Session { conn, runtime } = session;
        if deadline.saturating_duration_since(Instant::now()) < Duration::from_micros(100) {
            return (Outcome::Failed { kind: Failure::Timeout, detail: "timed out".into() }, false);
        }
        // What the request was doing, for a timeout's detail.
        let phase = Cell::new("connect");
        let bounded = async { tokio::time::timeout_at(deadline.into(), self.exchange_unbounded(conn, &phase)).await };
        let (result, retried) = runtime.block_on(bounded).unwrap_or_else(|_elapsed| {
            // The connection may be in the middle of anything: drop it.
            *conn = None;
            (Err(fail(Failure::Timeout, format!("{}: timed out", phase.get()))), false)
        });
        let outcome = match result {
            Ok(backend) => Outcome::Ok { backend },
            Err(f) => Outcome::Failed { kind: f.kind, detail: f.detail },
        };
        (outcome, retried)
    }

    async fn exchange_unbounded(
        &self,
        conn: &mut Option<Conn>,
        phase: &Cell<&'static str>,
    ) -> (Result<String, Failed>, bool) {
        // A kept-alive connection the server has closed meanwhile is
        // replaced here, without counting as a retry.
        if let Some(c) = conn {
            if !c.usable().await {
                *conn = None;
            }
        }
        let reused = conn.is_some();
        match self.attempt(conn, phase).await {
            Err(f) if reused && f.nothing_received && f.kind == Failure::Reset => {
                (self.attempt(conn, phase).await, true)
            }
            r => (r, false),
        }
    }

    async fn attempt(&self, conn: &mut Option<Conn>, phase: &Cell<&'static str>) -> Result<String, Failed> {
        let result = self.attempt_on(conn, phase).await;
        if result.is_err() || !self.keep_alive {
            *conn = None;
        }
        result
    }

    async fn attempt_on(&self, conn: &mut Option<Conn>, phase: &Cell<&'static str>) -> Result<String, Failed> {
        let Conn { sender, io } = match conn {
            Some(c) => c,
            None => {
                phase.set("connect");
                conn.insert(Conn::open(self.target).await?)
            }
        };
        phase.set("receive");
        drive(io, async {
            let response = sender.send_request(self.request()).await.map_err(|e| Failed {
                nothing_received: true,
                ..hyper_fail(&e, "connection closed before a whole response")
            })?;
            let status = response.status();
            let body = read_body(response.into_body()).await?;
            if status.is_success() {
                Ok(backend_name(&body))
            } else {
                Err(fail(Failure::Status, format!("HTTP {}", status.as_u16())))
            }
        })
        .await
    }
}

// ---------------------------------------------------------------------------
// Running

/// How requests are paced.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Open loop: requests on a fixed timetable from this ramp.
    Open(Ramp),
    /// Closed loop: this many clients, each sending its next request when
    /// the previous one ended.
    Closed { concurrency: usize },
}

#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub target: SocketAddr,
    pub mode: Mode,
    /// Requests are scheduled in `[0, duration)`.
    pub duration: Duration,
    /// Per request, from its scheduled time: connect, send and receive.
    pub timeout: Duration,
    /// Reuse connections (one per worker) instead of one per request.
    pub keep_alive: bool,
    /// Run the workers inside this named network namespace (as `ip netns
    /// list` shows it); the calling thread stays where it is.
    pub netns: Option<String>,
    /// Most worker threads (open loop); started as needed.
    pub max_workers: usize,
    /// Request target, e.g. `/` or `/?work_ms=5`.
    pub path: String,
}

impl LoadConfig {
    /// Defaults: one request per second to `target` for 10 s.
    pub fn new(target: SocketAddr, mode: Mode, duration: Duration) -> LoadConfig {
        LoadConfig {
            target,
            mode,
            duration,
            timeout: Duration::from_secs(2),
            keep_alive: false,
            netns: None,
            max_workers: 1024,
            path: "/".into(),
        }
    }

    fn validate(&self) -> Result<(), LoadError> {
        let err = |s: &str| Err(LoadError::Config(s.to_owned()));
        if self.duration.is_zero() {
            return err("duration must be positive");
        }
        if self.timeout.is_zero() {
            return err("timeout must be positive");
        }
        if !self.path.starts_with('/') || self.path.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return err("path must start with '/' and hold no spaces");
        }
        match self.mode {
            Mode::Closed { concurrency: 0 } => err("concurrency must be at least 1"),
            Mode::Closed { concurrency } if concurrency > 10_000 => err("concurrency must be at most 10000"),
            _ if self.max_workers == 0 => err("workers must be at least 1"),
            _ => Ok(()),
        }
    }
}

/// A run's result: the per-second series and the summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub series: Vec<TimePoint>,
    pub summary: Summary,
}

impl Report {
    /// Panics unless every request is counted exactly once: per second,
    /// ok + failed = offered, failures by kind add up, answers by backend
    /// add up to ok; and the seconds add up to the summary.
    pub fn assert_consistent(&self) {
        for p in &self.series {
            assert_eq!(p.ok + p.failed, p.offered, "{p:?}");
            assert_eq!(p.failures.total(), p.failed, "{p:?}");
            assert_eq!(p.backends.values().sum::<u64>(), p.ok, "{p:?}");
        }
        let s = &self.summary;
        assert_eq!(self.series.iter().map(|p| p.offered).sum::<u64>(), s.offered);
        assert_eq!(self.series.iter().map(|p| p.ok).sum::<u64>(), s.ok);
        assert_eq!(s.ok + s.failed, s.offered);
    }
}

enum Event {
    Scheduled { second: u64 },
    Ended { second: u64, end: Ended },
    Closed { before: u64 },
    Finished { at: f64 },
}

/// Hands events to the aggregator. Scheduling goes through a lock shared
/// with closing, so no request is ever scheduled into a window already
/// closed (closed-loop clients pick their second themselves).
struct Ledger {
    clock: Mutex<LedgerClock>,
    events: mpsc::Sender<Event>,
}

#[derive(Default)]
struct LedgerClock {
    closed_before: u64,
    finished: bool,
}

impl Ledger {
    fn new(events: mpsc::Sender<Event>) -> Ledger {
        Ledger { clock: Mutex::default(), events }
    }

    fn lock(&self) -> MutexGuard<'_, LedgerClock> {
        self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a request for `second` (or the first open second after it)
    /// and returns the second it counts in; `None` once the run has ended.
    fn schedule(&self, second: u64) -> Option<u64> {
        let clock = self.lock();
        if clock.finished {
            return None;
        }
        let second = second.max(clock.closed_before);
        // The receiver lives until every sender is gone, so sends cannot
        // fail.
        let _ = self.events.send(Event::Scheduled { second });
        Some(second)
    }

    fn close(&self, before: u64) {
        let mut clock = self.lock();
        clock.closed_before = clock.closed_before.max(before);
        let _ = self.events.send(Event::Closed { before });
    }

    fn finish(&self, at: f64) {
        let mut clock = self.lock();
        clock.finished = true;
        let _ = self.events.send(Event::Finished { at });
    }

    fn ended(&self, second: u64, end: Ended) {
        let _ = self.events.send(Event::Ended { second, end });
    }
}

struct Job {
    second: u64,
    due: Instant,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
    idle: usize,
    workers: usize,
    peak: usize,
}

/// The open loop's job queue; workers block on it.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a job; true if a new worker should be started for it.
    fn push(&self, job: Job, max_workers: usize) -> bool {
        let mut st = self.lock();
        st.jobs.push_back(job);
        let spawn = st.jobs.len() > st.idle && st.workers < max_workers;
        if spawn {
            st.workers += 1;
            st.peak = st.peak.max(st.workers);
        }
        drop(st);
        self.ready.notify_one();
        spawn
    }

    fn pop(&self) -> Option<Job> {
        let mut st = self.lock();
        loop {
            if let Some(job) = st.jobs.pop_front() {
                return Some(job);
            }
            if st.closed {
                return None;
            }
            st.idle += 1;
            st = self.ready.wait(st).unwrap_or_else(|p| p.into_inner());
            st.idle -= 1;
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// A worker could not start after all.
    fn forget_worker(&self) {
        self.lock().workers -= 1;
    }
}

/// Sleeps until `at`, in short steps so a stop is noticed; false if stopped.
fn sleep_until(at: Instant, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let left = at.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        thread::sleep(left.min(POLL));
    }
}

/// What every worker thread needs.
struct Shared<'a> {
    cfg: &'a LoadConfig,
    client: Client,
    netns: Option<NetNs>,
    stop: &'a AtomicBool,
    /// Set when a worker could not enter the namespace: stop everything.
    failed: Mutex<Option<LoadError>>,
    start: Instant,
}

impl Shared<'_> {
    /// Sets up the calling worker thread: into the namespace, and its own
    /// runtime. `None` (and the run fails) if that did not work.
    fn start_worker(&self) -> Option<Session> {
        let started = match &self.netns {
            Some(ns) => ns
                .enter_for_good()
                .map_err(|source| LoadError::Netns { name: ns.name().to_owned(), source })
                .and_then(|()| Session::new()),
            None => Session::new(),
        };
        match started {
            Ok(session) => Some(session),
            Err(e) => {
                self.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                None
            }
        }
    }

    fn aborted(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.failed.lock().map_or(true, |f| f.is_some())
    }
}

fn open_worker(shared: &Shared<'_>, queue: &Queue, ledger: Arc<Ledger>) {
    let Some(mut session) = shared.start_worker() else {
        queue.forget_worker();
        return;
    };
    while let Some(job) = queue.pop() {
        let deadline = job.due + shared.cfg.timeout;
        let started = Instant::now();
        let (outcome, retried) = if started >= deadline {
            (Outcome::Failed { kind: Failure::Late, detail: "no worker free before the timeout".into() }, false)
        } else {
            shared.client.exchange(&mut session, deadline)
        };
        let start_delay = started.saturating_duration_since(job.due);
        ledger.ended(job.second, Ended { outcome, latency: job.due.elapsed(), start_delay, retried });
    }
}

/// The open loop's clock: schedules each request on time, and closes each
/// second once it has passed.
fn dispatch<'scope>(
    scope: &'scope thread::Scope<'scope, '_>,
    shared: &'scope Shared<'scope>,
    queue: &'scope Queue,
    ramp: &Ramp,
    ledger: Arc<Ledger>,
) {
    let duration = shared.cfg.duration.as_secs_f64();
    let start = shared.start;
    let mut boundary = 1u64;
    // Closes every second that ends at or before `t`, on time; false if
    // stopped on the way.
    let mut close_until = |t: f64| {
        while boundary as f64 <= t {
            if !sleep_until(start + Duration::from_secs(boundary), shared.stop) {
                return false;
            }
            ledger.close(boundary);
            boundary += 1;
        }
        true
    };
    let mut stopped = false;
    for t in ramp.timetable(duration) {
        if !close_until(t) || shared.aborted() || !sleep_until(start + Duration::from_secs_f64(t), shared.stop) {
            stopped = true;
            break;
        }
        let Some(second) = ledger.schedule(t as u64) else { break };
        let job = Job { second, due: start + Duration::from_secs_f64(t) };
        if queue.push(job, shared.cfg.max_workers) {
            let ledger = Arc::clone(&ledger);
            let spawned = thread::Builder::new()
                .name("load-worker".into())
                .stack_size(WORKER_STACK)
                .spawn_scoped(scope, move || open_worker(shared, queue, ledger));
            if let Err(e) = spawned {
                queue.forget_worker();
                shared.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(LoadError::Spawn(e));
            }
        }
    }
    // Keep time to the end (a ramp may end with seconds at rate 0).
    if !stopped && close_until(duration.ceil() - 1.0) {
        sleep_until(start + shared.cfg.duration, shared.stop);
    }
    ledger.finish(start.elapsed().as_secs_f64().min(duration));
    queue.close();
}

fn closed_worker(shared: &Shared<'_>, ledger: Arc<Ledger>) {
    let Some(mut session) = shared.start_worker() else { return };
    loop {
        let now = shared.start.elapsed();
        if now >= shared.cfg.duration || shared.aborted() {
            return;
        }
        let due = Instant::now();
        let Some(second) = ledger.schedule(now.as_secs()) else { return };
        let (outcome, retried) = shared.client.exchange(&mut session, due + shared.cfg.timeout);
        ledger.ended(second, Ended { outcome, latency: due.elapsed(), start_delay: Duration::ZERO, retried });
    }
}

/// The closed loop's clock: closes each second once it has passed.
fn tick(shared: &Shared<'_>, ledger: Arc<Ledger>) {
    let duration = shared.cfg.duration;
    let mut boundary = 1u64;
    while Duration::from_secs(boundary) < duration {
        if !sleep_until(shared.start + Duration::from_secs(boundary), shared.stop) {
            break;
        }
        ledger.close(boundary);
        boundary += 1;
    }
    sleep_until(shared.start + duration, shared.stop);
    ledger.finish(shared.start.elapsed().as_secs_f64().min(duration.as_secs_f64()));
}

/// Runs the load on a thread of its own while `script(t0)` runs on the
/// caller's (t0: when the load started), for a test that changes things
/// under load. A script that panics stops the load's scheduling, and the
/// panic goes on once the load has ended.
pub fn run_during(cfg: &LoadConfig, script: impl FnOnce(Instant)) -> Result<Report, LoadError> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let t0 = Instant::now();
        let load = scope.spawn(|| run(cfg, &stop, |_| {}));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| script(t0)));
        if outcome.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let report = load.join();
        if let Err(p) = outcome {
            std::panic::resume_unwind(p);
        }
        report.unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Runs the load and calls `on_point` for each second as soon as all its
/// requests have ended. `stop` ends the scheduling early (requests already
/// sent still end and count). Returns an error if the run could not start
/// or its counts do not add up.
pub fn run(cfg: &LoadConfig, stop: &AtomicBool, mut on_point: impl FnMut(&TimePoint)) -> Result<Report, LoadError> {
    cfg.validate()?;
    let netns = match &cfg.netns {
        None => None,
        Some(name) => {
            let netns_err = |source| LoadError::Netns { name: name.clone(), source };
            let ns = NetNs::open(name).map_err(netns_err)?;
            // Try it once on a throw-away thread, so a wrong name fails
            // here and not in every worker.
            ns.try_run(|| ()).map_err(netns_err)?;
            Some(ns)
        }
    };
    let (tx, rx) = mpsc::channel();
    let ledger = Arc::new(Ledger::new(tx));
    let shared =
        Shared { cfg, client: Client::new(cfg)?, netns, stop, failed: Mutex::new(None), start: Instant::now() };
    let queue = Queue::default();
    let mut agg = Aggregator::new(cfg.duration);
    let mut series = Vec::new();
    let give_up = shared.start + cfg.duration + cfg.timeout + OVERRUN;
    let mut overran = false;

    let peak = thread::scope(|s| -> Result<usize, LoadError> {
        let builder = |name: &str| thread::Builder::new().name(name.into()).stack_size(WORKER_STACK);
        let (shared_ref, queue_ref) = (&shared, &queue);
        match &cfg.mode {
            Mode::Open(ramp) => {
                let l = Arc::clone(&ledger);
                builder("load-dispatch")
                    .spawn_scoped(s, move || dispatch(s, shared_ref, queue_ref, ramp, l))
                    .map_err(LoadError::Spawn)?;
            }
            Mode::Closed { concurrency } => {
                let l = Arc::clone(&ledger);
                builder("load-tick").spawn_scoped(s, move || tick(shared_ref, l)).map_err(LoadError::Spawn)?;
                for _ in 0..*concurrency {
                    let l = Arc::clone(&ledger);
                    if let Err(e) = builder("load-client").spawn_scoped(s, move || closed_worker(shared_ref, l)) {
                        shared.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(LoadError::Spawn(e));
                        break;
                    }
                }
            }
        }
        // Only threads hold the ledger now: the channel disconnects when the
        // last of them is done.
        drop(ledger);
        loop {
            match rx.recv_timeout(POLL) {
                Ok(Event::Scheduled { second }) => agg.scheduled(second),
                Ok(Event::Ended { second, end }) => agg.ended(second, end),
                Ok(Event::Closed { before }) => agg.close(before),
                Ok(Event::Finished { at }) => agg.finish(at),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            for p in agg.take_ready() {
                on_point(&p);
                series.push(p);
            }
            if Instant::now() > give_up {
                // Threads only block with timeouts, so this is a bug; stop
                // scheduling and report rather than hang.
                overran = true;
                shared
                    .failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(LoadError::Overrun { pending: agg.pending() });
                queue.close();
                break;
            }
        }
        Ok(queue.lock().peak.max(match cfg.mode {
            Mode::Closed { concurrency } => concurrency,
            Mode::Open(_) => 0,
        }))
    })?;
    if let Some(e) = shared.failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if overran {
        return Err(LoadError::Overrun { pending: agg.pending() });
    }
    for p in agg.take_ready() {
        on_point(&p);
        series.push(p);
    }
    agg.check_exact()?;
    Ok(Report { series, summary: agg.summary(peak) })
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream},
        os::fd::AsRawFd,
    };

    use super::*;

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(secs(parse_duration("30s").unwrap()), 30.0);
        assert_eq!(secs(parse_duration("500ms").unwrap()), 0.5);
        assert_eq!(secs(parse_duration("1.5s").unwrap()), 1.5);
        assert_eq!(secs(parse_duration("2m").unwrap()), 120.0);
        assert_eq!(secs(parse_duration("1h").unwrap()), 3600.0);
        assert_eq!(secs(parse_duration("7").unwrap()), 7.0);
        for bad in ["", "s", "10 s", "10x", "-1s", "1e3s", "99999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ramp_parses_and_interpolates() {
        let ramp = Ramp::parse("0s:10,20s:200,40s:200,60s:10").unwrap();
        assert_eq!(ramp.end(), 60.0);
        assert_eq!(ramp.rate_at(0.0), 10.0);
        assert_eq!(ramp.rate_at(10.0), 105.0);
        assert_eq!(ramp.rate_at(30.0), 200.0);
        assert_eq!(ramp.rate_at(50.0), 105.0);
        assert_eq!(ramp.rate_at(90.0), 10.0);
        assert_eq!(ramp.expected(20.0), 2100.0);
        assert_eq!(ramp.expected(60.0), 2100.0 + 4000.0 + 2100.0);
        for bad in ["", "10", "1s:10", "0s:10,0s:20", "0s:10,5s:-1", "0s:x", "0s:2000000"] {
            assert!(Ramp::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn time_of_inverts_expected() {
        let ramp = Ramp::parse("0s:0,10s:100,20s:100,25s:0").unwrap();
        for n in [0.5, 1.0, 17.0, 499.5, 500.0, 777.7, 1500.0, 1600.0, 1749.0] {
            let t = ramp.time_of(n).unwrap();
            assert!((ramp.expected(t) - n).abs() < 1e-6, "n={n} t={t} expected={}", ramp.expected(t));
        }
        // The rate stays 0 after 25 s: 1750 requests, never more.
        assert_eq!(ramp.time_of(1750.5), None);
    }

    #[test]
    fn constant_rate_fills_every_second_exactly() {
        let ramp = Ramp::constant(10.0).unwrap();
        let times: Vec<f64> = ramp.timetable(3.0).collect();
        assert_eq!(times.len(), 30);
        for s in 0..3 {
            assert_eq!(times.iter().filter(|&&t| t as u64 == s).count(), 10);
        }
        assert!((times[0] - 0.05).abs() < 1e-9);
        assert!(times.windows(2).all(|w| (w[1] - w[0] - 0.1).abs() < 1e-9));
    }

    #[test]
    fn ramp_timetable_follows_the_rate() {
        let ramp = Ramp::parse("0s:10,10s:110").unwrap();
        let times: Vec<f64> = ramp.timetable(10.0).collect();
        assert_eq!(times.len(), 600);
        // Second s asks for the rate at its middle: 15, 25, ... 105.
        for s in 0..10u64 {
            let n = times.iter().filter(|&&t| t as u64 == s).count() as f64;
            assert!((n - (15.0 + 10.0 * s as f64)).abs() <= 1.0, "second {s}: {n}");
        }
        assert!(times.windows(2).all(|w| w[1] > w[0]));
    }

    #[test]
    fn zero_rate_sends_nothing() {
        assert_eq!(Ramp::constant(0.0).unwrap().timetable(5.0).count(), 0);
        let pause = Ramp::parse("0s:0,2s:0,3s:10").unwrap();
        assert!(pause.timetable(10.0).all(|t| t >= 2.0));
    }

    #[test]
    fn histogram_buckets_are_tight() {
        for us in [0, 1, 127, 128, 129, 255, 256, 1000, 12_345, 2_000_000, u64::MAX / 2] {
            let b = bucket_of(us);
            assert!(bucket_high(b) >= us, "{us}");
            if b > 0 {
                assert!(bucket_high(b - 1) < us, "{us} belongs in an earlier bucket");
            }
            assert!((bucket_high(b) - us) as f64 <= us as f64 / 64.0 + 1.0, "{us}");
        }
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let q = |q| h.quantile(q).unwrap().as_secs_f64() * 1000.0;
        assert!((q(0.5) - 50.0).abs() <= 50.0 / 64.0, "{}", q(0.5));
        assert!((q(0.99) - 99.0).abs() <= 99.0 / 64.0, "{}", q(0.99));
        assert_eq!(q(1.0), 100.0);
        assert!((q(0.0) - 1.0).abs() <= 1.0 / 64.0, "{}", q(0.0));
        assert_eq!(h.max(), Some(Duration::from_millis(100)));
        assert_eq!(h.mean(), Some(Duration::from_micros(50_500)));

        let mut other = Histogram::default();
        other.record(Duration::from_secs(3));
        h.merge(&other);
        assert_eq!((h.count(), h.max()), (101, Some(Duration::from_secs(3))));
    }

    fn ok(name: &str, latency_ms: u64) -> Ended {
        Ended {
            outcome: Outcome::Ok { backend: name.into() },
            latency: Duration::from_millis(latency_ms),
            start_delay: Duration::ZERO,
            retried: false,
        }
    }

    fn failed(kind: Failure, latency_ms: u64) -> Ended {
        Ended { outcome: Outcome::Failed { kind, detail: format!("{kind:?}") }, ..ok("", latency_ms) }
    }

    #[test]
    fn aggregator_emits_a_second_only_when_all_its_requests_ended() {
        let mut agg = Aggregator::new(Duration::from_secs(2));
        for _ in 0..3 {
            agg.scheduled(0);
        }
        agg.ended(0, ok("web-1", 10));
        agg.ended(0, Ended { start_delay: Duration::from_millis(15), ..failed(Failure::Refused, 1) });
        agg.close(1);
        assert!(agg.take_ready().is_empty(), "one request of second 0 is still open");
        agg.scheduled(1);
        agg.ended(0, Ended { retried: true, ..ok("web-2", 30) });
        let ready = agg.take_ready();
        assert_eq!(ready.len(), 1);
        let p = &ready[0];
        assert_eq!((p.t, p.span, p.offered, p.ok, p.failed), (0.0, 1.0, 3, 2, 1));
        assert_eq!(p.failures, FailureCounts { refused: 1, ..Default::default() });
        assert_eq!(p.backends, BTreeMap::from([("web-1".into(), 1), ("web-2".into(), 1)]));
        assert_eq!((p.max_ms, p.delayed), (Some(30.0), 1));
        assert_eq!(agg.pending(), 1);

        agg.ended(1, failed(Failure::Timeout, 2000));
        assert!(agg.take_ready().is_empty(), "second 1 is not closed yet");
        agg.finish(1.5);
        let last = agg.take_ready();
        assert_eq!(last.len(), 1);
        assert_eq!((last[0].t, last[0].span, last[0].failed, last[0].p50_ms), (1.0, 0.5, 1, None));
        assert_eq!(last[0].failed_rate(), 2.0);
        agg.check_exact().unwrap();
        let s = agg.summary(4);
        assert_eq!((s.offered, s.ok, s.failed, s.keepalive_retries, s.peak_workers), (4, 2, 2, 1, 4));
        assert_eq!(s.availability, 0.5);
        assert_eq!(s.first_errors.get("timeout").map(String::as_str), Some("Timeout"));
        assert_eq!((s.delayed, s.max_start_delay_ms), (1, 15.0));
    }

    #[test]
    fn aggregator_reports_empty_seconds_and_rejects_strays() {
        let mut agg = Aggregator::new(Duration::from_secs(3));
        agg.scheduled(2);
        agg.ended(2, ok("a", 1));
        agg.finish(3.0);
        let points = agg.take_ready();
        assert_eq!(points.iter().map(|p| p.offered).collect::<Vec<_>>(), [0, 0, 1]);
        agg.check_exact().unwrap();

        agg.ended(2, ok("a", 0));
        assert!(agg.check_exact().is_err(), "an end without a schedule breaks exactness");
        let mut agg = Aggregator::new(Duration::from_secs(1));
        agg.scheduled(0);
        agg.finish(1.0);
        assert!(agg.check_exact().is_err(), "a request that never ended breaks exactness");
    }

    #[test]
    fn report_lines_and_csv() {
        let p = TimePoint {
            t: 3.0,
            span: 1.0,
            offered: 100,
            ok: 97,
            failed: 3,
            failures: FailureCounts { refused: 2, late: 1, ..Default::default() },
            p50_ms: Some(1.234),
            p90_ms: Some(12.5),
            p99_ms: Some(250.0),
            max_ms: Some(1999.0),
            backends: BTreeMap::from([("web-1".into(), 50), ("web,2".into(), 47)]),
            delayed: 0,
        };
        let line = format_point(&p);
        assert_eq!(
            line.split_whitespace().take(10).collect::<Vec<_>>(),
            ["3s", "100", "97", "3", "2", "0", "0", "0", "0", "1"]
        );
        assert!(line.ends_with("1.23     12.5    250.0     1999  web,2=47 web-1=50"), "{line}");
        assert_eq!(format_header().split_whitespace().count(), 4 + 6 + 8 + 1);

        let csv = series_to_csv(&[p]);
        let mut lines = csv.lines();
        assert_eq!(
            lines.next(),
            Some("t,span,offered,ok,failed,refused,reset,timeout,status,other,late,delayed,p50_ms,p90_ms,p99_ms,max_ms,backends")
        );
        assert_eq!(lines.next(), Some("3,1,100,97,3,2,0,0,0,0,1,0,1.234,12.5,250,1999,\"\"\"web,2\"\"=47;web-1=50\""));
    }

    #[test]
    fn summary_table_lists_failures_and_backends() {
        let s = Summary {
            duration_s: 10.0,
            offered: 1000,
            ok: 990,
            failed: 10,
            failures: FailureCounts { timeout: 10, ..Default::default() },
            availability: 0.99,
            backends: BTreeMap::from([("web-1".into(), 990)]),
            first_errors: BTreeMap::from([("timeout".into(), "receive: timed out".into())]),
            ..Default::default()
        };
        let text = format_summary(&s);
        assert!(text.contains("ok                  990    99.000%  (availability)"), "{text}");
        assert!(text.contains("timeout            10     1.000%  first: receive: timed out"), "{text}");
        assert!(text.contains("web-1                      990   100.0%"), "{text}");
        assert!(!text.contains("refused"));
    }

    #[test]
    fn io_errors_sort_into_kinds() {
        let kind = |k: ErrorKind| Failure::of_io(&io::Error::from(k));
        assert_eq!(kind(ErrorKind::ConnectionRefused), Failure::Refused);
        assert_eq!(kind(ErrorKind::ConnectionReset), Failure::Reset);
        assert_eq!(kind(ErrorKind::UnexpectedEof), Failure::Reset);
        assert_eq!(kind(ErrorKind::WouldBlock), Failure::Timeout);
        assert_eq!(kind(ErrorKind::HostUnreachable), Failure::Other);
    }

    // --- Runs against servers on 127.0.0.1 -------------------------------

    /// A tiny HTTP server on 127.0.0.1: for each connection, `answer` maps
    /// the connection's index to what it does. Stops when dropped.
    struct TestServer {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<thread::JoinHandle<()>>,
    }

    #[derive(Clone, Copy)]
    enum Behaviour {
        /// 200 with `name\n`, keep-alive if asked.
        Answer(&'static str),
        /// The same in two chunks (`Transfer-Encoding: chunked`).
        Chunked(&'static str),
        /// 503.
        Unavailable,
        /// Reads the request, then closes with RST.
        Reset,
        /// Reads the request and never answers (until stopped).
        Silent,
    }

    impl TestServer {
        fn start(behaviour: fn(usize) -> Behaviour) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let stop2 = stop.clone();
            let thread = thread::spawn(move || {
                let mut n = 0;
                let mut conns = Vec::new();
                while !stop2.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let b = behaviour(n);
                            n += 1;
                            let stop = stop2.clone();
                            conns.push(thread::spawn(move || serve(stream, b, &stop)));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
                for c in conns {
                    c.join().unwrap();
                }
            });
            TestServer { addr, stop, thread: Some(thread) }
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn serve(mut stream: TcpStream, b: Behaviour, stop: &AtomicBool) {
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !stop.load(Ordering::Relaxed) {
            match stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(_) => continue,
            }
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                buf.drain(..end + 4);
                let close = head.contains("connection: close");
                let answer = match b {
                    Behaviour::Answer(name) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{}\r\n{name}\n",
                        name.len() + 1,
                        if close { "Connection: close\r\n" } else { "" }
                    ),
                    Behaviour::Chunked(name) => format!(
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n{}\r\n{:x}\r\n{name}\r\n1;ext=1\r\n\n\r\n0\r\n\r\n",
                        if close { "Connection: close\r\n" } else { "" },
                        name.len()
                    ),
                    Behaviour::Unavailable => {
                        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
                    }
                    Behaviour::Reset => {
                        let l = libc::linger { l_onoff: 1, l_linger: 0 };
                        // SAFETY: setsockopt reads one linger struct for the call.
                        unsafe {
                            libc::setsockopt(
                                stream.as_raw_fd(),
                                libc::SOL_SOCKET,
                                libc::SO_LINGER,
                                (&l as *const libc::linger).cast(),
                                std::mem::size_of::<libc::linger>() as libc::socklen_t,
                            )
                        };
                        return;
                    }
                    Behaviour::Silent => continue,
                };
                if stream.write_all(answer.as_bytes()).is_err() || close || matches!(b, Behaviour::Unavailable) {
                    return;
                }
            }
        }
    }

    fn open(target: SocketAddr, rate: f64, secs: f64) -> LoadConfig {
        let mut cfg = LoadConfig::new(target, Mode::Open(Ramp::constant(rate).unwrap()), Duration::from_secs_f64(secs));
        cfg.timeout = Duration::from_millis(300);
        cfg
    }

    fn run_ok(cfg: &LoadConfig) -> Report {
        let mut seen = Vec::new();
        let report = run(cfg, &AtomicBool::new(false), |p| seen.push(p.clone())).unwrap();
        assert_eq!(seen, report.series, "every point is handed out once, in order");
        report.assert_consistent();
        report
    }

    #[test]
    fn open_loop_counts_every_request_once() {
        let server =
            TestServer::start(|i| if i % 4 == 3 { Behaviour::Unavailable } else { Behaviour::Answer("web-1") });
        let report = run_ok(&open(server.addr, 40.0, 2.0));
        let s = &report.summary;
        assert_eq!(report.series.len(), 2);
        assert_eq!(s.offered, 80, "the timetable is fixed: 40/s for 2 s");
        assert_eq!(s.failures.status, 20, "every fourth connection answers 503");
        assert_eq!(s.backends, BTreeMap::from([("web-1".into(), 60)]));
        assert!(s.latency.p50_ms.is_some());
    }

    #[test]
    fn failures_are_sorted_by_kind() {
        // Refused: a port that was just free.
        let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let s = run_ok(&open(free, 20.0, 1.0)).summary;
        assert_eq!((s.offered, s.failures.refused), (20, 20));

        let server = TestServer::start(|_| Behaviour::Reset);
        let s = run_ok(&open(server.addr, 20.0, 1.0)).summary;
        assert_eq!((s.offered, s.failures.reset), (20, 20), "{:?}", s.first_errors);

        let server = TestServer::start(|_| Behaviour::Silent);
        let s = run_ok(&open(server.addr, 20.0, 1.0)).summary;
        assert_eq!((s.offered, s.failures.timeout), (20, 20), "{:?}", s.first_errors);
    }

    #[test]
    fn a_full_worker_pool_shows_up_as_late() {
        let server = TestServer::start(|_| Behaviour::Silent);
        let mut cfg = open(server.addr, 50.0, 1.0);
        cfg.max_workers = 2;
        cfg.timeout = Duration::from_millis(200);
        let s = run_ok(&cfg).summary;
        assert_eq!(s.offered, 50);
        assert_eq!(s.failures.timeout + s.failures.late, 50);
        assert!(s.delayed > 30, "two workers cannot start most requests on time: {}", s.delayed);
        assert!(format_summary(&s).contains("generator behind"));
        assert_eq!(s.peak_workers, 2);
    }

    #[test]
    fn keep_alive_reuses_connections() {
        // Whole bodies of either kind leave the connection ready for more.
        let first: [fn(usize) -> Behaviour; 2] = [
            |i| if i == 0 { Behaviour::Answer("first") } else { Behaviour::Answer("later") },
            |i| if i == 0 { Behaviour::Chunked("first") } else { Behaviour::Answer("later") },
        ];
        for behaviour in first {
            let server = TestServer::start(behaviour);
            let mut cfg = open(server.addr, 20.0, 1.0);
            cfg.keep_alive = true;
            cfg.max_workers = 1;
            let s = run_ok(&cfg).summary;
            assert_eq!(s.backends, BTreeMap::from([("first".into(), 20)]), "one worker, one connection");
        }
    }

    #[test]
    fn closed_loop_and_stop() {
        let server = TestServer::start(|_| Behaviour::Answer("web-1"));
        let cfg = LoadConfig::new(server.addr, Mode::Closed { concurrency: 3 }, Duration::from_millis(1500));
        let report = run_ok(&cfg);
        assert_eq!(report.series.len(), 2);
        assert_eq!(report.series[1].span, 0.5);
        assert!(report.summary.ok > 10);
        assert_eq!(report.summary.failed, 0);

        // A stop ends scheduling early; what was sent still counts.
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let cfg = open(server.addr, 100.0, 30.0);
        let report = run(&cfg, &stop, |p| {
            if p.t >= 1.0 {
                stop.store(true, Ordering::Relaxed);
            }
        })
        .unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        let s = &report.summary;
        assert!(s.offered >= 200 && s.offered < 400, "{}", s.offered);
        assert_eq!(s.ok + s.failed, s.offered);
    }

    #[test]
    fn root_workers_run_inside_the_named_netns() {
        if lb_lab::root::skip_without_root("root_workers_run_inside_the_named_netns") {
            return;
        }
        let ns = lb_lab::netns::NetNs::create(&format!("lbl-{}-load", std::process::id())).unwrap();
        // Bound inside the namespace: its loopback, not the host's.
        let server = ns.run(|| TestServer::start(|_| Behaviour::Answer("in-ns")));
        let mut cfg = open(server.addr, 20.0, 1.0);
        cfg.netns = Some(ns.name().to_owned());
        let s = run_ok(&cfg).summary;
        assert_eq!((s.offered, s.ok), (20, 20), "{:?}", s.first_errors);
        assert_eq!(s.backends, BTreeMap::from([("in-ns".into(), 20)]));
    }

    #[test]
    fn bad_configs_are_refused() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let stop = AtomicBool::new(false);
        let mut cfg = open(addr, 1.0, 1.0);
        cfg.path = "no-slash".into();
        assert!(matches!(run(&cfg, &stop, |_| {}), Err(LoadError::Config(_))));
        let mut cfg = open(addr, 1.0, 1.0);
        cfg.netns = Some("../x".into());
        assert!(matches!(run(&cfg, &stop, |_| {}), Err(LoadError::Netns { .. })));
        cfg.netns = Some("lb-load-test-no-such-namespace".into());
        assert!(matches!(run(&cfg, &stop, |_| {}), Err(LoadError::Netns { .. })));
    }
}
