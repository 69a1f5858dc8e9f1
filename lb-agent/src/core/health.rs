//! The health of one backend as a small state machine: `fall` failures in a
//! row take an up backend down, `rise` successes in a row bring a down one
//! back. No I/O and no clock: the prober feeds it results.

/// A change the caller must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    up: bool,
    /// Results in a row that disagree with `up`.
    streak: u32,
    rise: u32,
    fall: u32,
}

impl Health {
    /// `rise` and `fall` below 1 are taken as 1.
    pub fn new(up: bool, rise: u32, fall: u32) -> Health {
        Health { up, streak: 0, rise: rise.max(1), fall: fall.max(1) }
    }

    /// The same state (up or down, and the streak so far) under new
    /// `rise` and `fall`: a reload that edits the check keeps what the
    /// probes found.
    pub fn with_limits(self, rise: u32, fall: u32) -> Health {
        Health { rise: rise.max(1), fall: fall.max(1), ..self }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Feed one probe result; returns the transition it completes, if any.
    pub fn observe(&mut self, ok: bool) -> Option<Transition> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.up = ok;
        self.streak = 0;
        Some(if ok { Transition::Up } else { Transition::Down })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn goes_down_after_fall_failures_in_a_row() {
        let mut h = Health::new(true, 2, 3);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(Transition::Down));
        assert!(!h.is_up());
        assert_eq!(h.observe(false), None);
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let mut h = Health::new(true, 2, 3);
        h.observe(false);
        h.observe(false);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), Some(Transition::Down));
    }

    #[test]
    fn comes_back_after_rise_successes_in_a_row() {
        let mut h = Health::new(false, 2, 3);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(Transition::Up));
        assert!(h.is_up());
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut h = Health::new(true, 0, 0);
        assert_eq!(h.observe(false), Some(Transition::Down));
        assert_eq!(h.observe(true), Some(Transition::Up));
    }

    proptest! {
        /// Transitions alternate, and each one is preceded by exactly its
        /// threshold of agreeing results.
        #[test]
        fn transitions_follow_thresholds(results in proptest::collection::vec(any::<bool>(), 0..200), rise in 1u32..5, fall in 1u32..5) {
            let mut h = Health::new(true, rise, fall);
            let mut up = true;
            let mut run = 0u32;
            let mut last: Option<bool> = None;
            for ok in results {
                run = if last == Some(ok) { run + 1 } else { 1 };
                last = Some(ok);
                match h.observe(ok) {
                    Some(Transition::Down) => { prop_assert!(up && !ok && run >= fall); up = false; run = 0; last = None; }
                    Some(Transition::Up) => { prop_assert!(!up && ok && run >= rise); up = true; run = 0; last = None; }
                    None => {
                        let needed = if up { fall } else { rise };
                        prop_assert!(ok == up || run < needed);
                    }
                }
                prop_assert_eq!(h.is_up(), up);
            }
        }
    }
}
