//! Full NAT's source ports: which port a new flow tries first, and next.
//!
//! The data plane claims a port by inserting the flow's reverse entry into
//! `SNAT_FLOWS` with BPF_NOEXIST, so two flows never hold one (address,
//! port) towards the same backend; on a collision it tries the next
//! candidate, at most `SNAT_PORT_TRIES` times. The first candidate comes
//! from the flow's hash, so a retransmitted SYN gets the port it had.

use crate::hash::mix32;

/// The `attempt`-th port (host order) a flow with `hash` tries, in
/// `min..=max`: linear probing from a hashed start, so a nearly full range
/// still finds the free ports next to a taken one. `min > max` is read as
/// the single port `min`.
#[inline(always)]
pub const fn candidate(hash: u32, attempt: u32, min: u16, max: u16) -> u16 {
    let span = if max >= min { (max - min) as u32 + 1 } else { 1 };
    // Another mix than the Maglev pick's: the two choices stay independent.
    let start = mix32(hash ^ 0x5bd1_e995) % span;
    min + ((start + attempt % span) % span) as u16
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    #[test]
    fn candidates_stay_in_the_range() {
        for hash in [0, 1, 0xdead_beef, u32::MAX] {
            for attempt in 0..40 {
                let p = candidate(hash, attempt, 61000, 61003);
                assert!((61000..=61003).contains(&p), "{p}");
            }
            assert!((0..40).all(|a| candidate(hash, a, 1024, 65535) >= 1024));
        }
    }

    #[test]
    fn a_tiny_range_is_tried_whole() {
        let mut seen: Vec<u16> = (0..4).map(|a| candidate(7, a, 100, 103)).collect();
        seen.sort();
        assert_eq!(seen, vec![100, 101, 102, 103]);
    }

    #[test]
    fn the_first_candidate_is_deterministic_and_spread() {
        assert_eq!(candidate(42, 0, 61000, 65535), candidate(42, 0, 61000, 65535));
        let firsts: std::collections::BTreeSet<u16> = (0..1000).map(|h| candidate(h, 0, 61000, 65535)).collect();
        assert!(firsts.len() > 850, "{} distinct first ports of 1000", firsts.len());
        assert_eq!(candidate(9, 0, 5, 4), 5, "an empty range is its minimum");
        assert_eq!(candidate(9, 3, 65535, 65535), 65535);
    }
}
