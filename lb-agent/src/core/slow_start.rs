//! Slow start: a backend that joins a service's Maglev table (added, up
//! again after failed checks, a new instance ready, a weight raised from 0)
//! takes a tenth of its weight at first and all of it after the service's
//! `slow_start`, in `STEPS` even steps, so a cold backend is not flooded.
//!
//! Pure: time comes in as arguments. Joins are found by comparing the
//! backends in each table with those of the previous `advance`; the first
//! `advance` (an agent's start or restart) sees none join, so backends
//! already serving keep their full weight.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use tokio::time::Instant;

/// The ramp's steps: step 1 is a tenth of the weight, `STEPS` all of it.
pub const STEPS: u32 = 10;

/// Where a ramp of `over` stands `elapsed` after its start: 1 at once,
/// rising evenly to `STEPS` when `over` has passed (at once when it is zero).
pub fn step(elapsed: Duration, over: Duration) -> u32 {
    if over.is_zero() || elapsed >= over {
        return STEPS;
    }
    1 + (u128::from(STEPS - 1) * elapsed.as_nanos() / over.as_nanos()) as u32
}

/// The Maglev weights of a service's backends, given each one's configured
/// weight and its step. While any backend ramps, every weight is scaled by
/// `STEPS` and a ramping one's by its step only, so it holds step/`STEPS`
/// of its weight's share; with none ramping the weights stand as they are
/// (the same shares, so the table does not move when a ramp ends).
pub fn weights(backends: &[(u32, u32)]) -> Vec<u32> {
    if backends.iter().all(|&(_, s)| s >= STEPS) {
        return backends.iter().map(|&(w, _)| w).collect();
    }
    backends.iter().map(|&(w, s)| w.saturating_mul(s.clamp(1, STEPS))).collect()
}

/// One service's table as `advance` sees it.
pub struct TableNow {
    pub slow_start: Duration,
    /// The backends in its Maglev table.
    pub in_table: BTreeSet<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ramp {
    since: Instant,
    over: Duration,
    step: u32,
}

/// The ramps under way.
#[derive(Clone, Debug, Default)]
pub struct SlowStart {
    /// Each service's table at the last `advance`; `None` before the first.
    seen: Option<BTreeMap<String, BTreeSet<SocketAddr>>>,
    ramps: BTreeMap<(String, SocketAddr), Ramp>,
}

impl SlowStart {
    /// Start a ramp for each backend new in the table of a service seen
    /// before (and with a `slow_start`), move every ramp to its step at
    /// `now`, and end the ramps that are over or whose backend left the
    /// table. Returns whether any backend's step changed.
    pub fn advance(&mut self, tables: &BTreeMap<String, TableNow>, now: Instant) -> bool {
        let before = self.ramps.clone();
        if let Some(seen) = &self.seen {
            for (name, t) in tables {
                let Some(was) = seen.get(name) else { continue };
                if t.slow_start.is_zero() {
                    continue;
                }
                for addr in t.in_table.difference(was) {
                    let ramp = Ramp { since: now, over: t.slow_start, step: 1 };
                    self.ramps.insert((name.clone(), *addr), ramp);
                }
            }
        }
        self.ramps.retain(|(name, addr), r| {
            let Some(t) = tables.get(name).filter(|t| t.in_table.contains(addr)) else { return false };
            // A shorter (or zero) slow_start applies at once.
            r.over = r.over.min(t.slow_start);
            r.step = step(now.saturating_duration_since(r.since), r.over);
            r.step < STEPS
        });
        self.seen = Some(tables.iter().map(|(n, t)| (n.clone(), t.in_table.clone())).collect());
        self.ramps != before
    }

    /// A backend's step: `STEPS` when it does not ramp.
    pub fn step_of(&self, service: &str, addr: SocketAddr) -> u32 {
        self.ramps.get(&(service.to_owned(), addr)).map_or(STEPS, |r| r.step)
    }

    /// Whether any ramp is under way (the agent then advances on its tick).
    pub fn ramping(&self) -> bool {
        !self.ramps.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_ramp_rises_from_a_tenth_to_all_in_even_steps() {
        let over = secs(9.0);
        let steps: Vec<u32> = (0..=10).map(|i| step(secs(f64::from(i)), over)).collect();
        assert_eq!(steps, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10]);
        assert_eq!(step(secs(0.99), over), 1);
        assert_eq!(step(secs(0.0), Duration::ZERO), STEPS, "no slow start: full weight at once");
    }

    #[test]
    fn a_ramping_backend_gets_its_step_of_its_share() {
        // Two serving at weight 1, one at weight 2 joining at step 1: 10 : 10 : 2.
        assert_eq!(weights(&[(1, STEPS), (1, STEPS), (2, 1)]), [10, 10, 2]);
        // Halfway.
        assert_eq!(weights(&[(1, STEPS), (1, 5)]), [10, 5]);
        // None ramping: the configured weights, unscaled.
        assert_eq!(weights(&[(3, STEPS), (1, STEPS)]), [3, 1]);
        assert_eq!(weights(&[(10_000, 1), (10_000, STEPS)]), [10_000, 100_000]);
    }

    fn tables(slow_start: f64, in_table: &[&str]) -> BTreeMap<String, TableNow> {
        let in_table = in_table.iter().map(|a| format!("10.1.0.{a}:80").parse().unwrap()).collect();
        BTreeMap::from([("web".to_owned(), TableNow { slow_start: secs(slow_start), in_table })])
    }

    fn addr(a: &str) -> SocketAddr {
        format!("10.1.0.{a}:80").parse().unwrap()
    }

    #[test]
    fn only_backends_that_join_a_known_table_ramp() {
        let t0 = Instant::now();
        let mut s = SlowStart::default();
        // Start (or restart): what serves keeps its weight.
        assert!(!s.advance(&tables(10.0, &["1", "2"]), t0));
        assert!(!s.ramping());
        // One joins: it starts at a tenth.
        assert!(s.advance(&tables(10.0, &["1", "2", "3"]), t0 + secs(1.0)));
        assert_eq!((s.step_of("web", addr("3")), s.step_of("web", addr("1"))), (1, STEPS));
        // Nothing moved within the step; then it climbs.
        assert!(!s.advance(&tables(10.0, &["1", "2", "3"]), t0 + secs(1.5)));
        assert!(s.advance(&tables(10.0, &["1", "2", "3"]), t0 + secs(6.0)));
        assert_eq!(s.step_of("web", addr("3")), 5);
        // It goes down mid-ramp: the ramp ends; back up, it starts again.
        assert!(s.advance(&tables(10.0, &["1", "2"]), t0 + secs(7.0)));
        assert!(!s.ramping());
        s.advance(&tables(10.0, &["1", "2", "3"]), t0 + secs(8.0));
        assert_eq!(s.step_of("web", addr("3")), 1);
        // Over: full weight, no ramp left.
        assert!(s.advance(&tables(10.0, &["1", "2", "3"]), t0 + secs(18.0)));
        assert_eq!(s.step_of("web", addr("3")), STEPS);
        assert!(!s.ramping());
    }

    #[test]
    fn no_slow_start_or_a_new_service_means_no_ramp() {
        let t0 = Instant::now();
        let mut s = SlowStart::default();
        s.advance(&BTreeMap::new(), t0);
        // A service new to the agent: all its backends are new alike.
        assert!(!s.advance(&tables(10.0, &["1"]), t0));
        assert!(!s.advance(&tables(0.0, &["1", "2"]), t0));
        assert!(!s.ramping());
        // slow_start turned off mid-ramp ends the ramp.
        s.advance(&tables(10.0, &["1", "2", "3"]), t0);
        assert!(s.ramping());
        assert!(s.advance(&tables(0.0, &["1", "2", "3"]), t0 + secs(1.0)));
        assert!(!s.ramping());
    }
}
