//! Spreading TCP connections over a topology's backends, and judging the
//! spread: what the end-to-end tests of every forwarding mode share.

use std::collections::BTreeMap;

use crate::topology::{tcp_request, Topology};

/// `n` sequential TCP connections to the VIP from the client namespace;
/// every one must be greeted by a backend. Returns connections per backend.
pub fn connect_many(topo: &Topology, n: usize) -> BTreeMap<String, usize> {
    let vip = topo.vip_tcp();
    topo.client.run(move || {
        let mut counts = BTreeMap::new();
        for i in 0..n {
            match tcp_request(vip) {
                Ok((backend, _)) => *counts.entry(backend).or_insert(0) += 1,
                Err(e) => panic!("connection {i} of {n} to {vip} failed: {e} (so far {counts:?})"),
            }
        }
        counts
    })
}

pub fn print_shares(what: &str, counts: &BTreeMap<String, usize>) {
    let total: usize = counts.values().sum();
    let shares: Vec<String> =
        counts.iter().map(|(b, c)| format!("{b} {c} ({:.1}%)", 100.0 * *c as f64 / total as f64)).collect();
    println!("{what}: {total} connections: {}", shares.join(", "));
}

/// Every backend's share is within 25% of an even split.
pub fn assert_even(counts: &BTreeMap<String, usize>, backends: &[String]) {
    let total: usize = counts.values().sum();
    let even = total as f64 / backends.len() as f64;
    for b in backends {
        let got = counts.get(b).copied().unwrap_or(0) as f64;
        assert!(
            (got - even).abs() <= 0.25 * even,
            "backend {b} got {got} of {total}, even would be {even:.0}: {counts:?}"
        );
    }
    assert!(counts.keys().all(|k| backends.contains(k)), "unexpected backend in {counts:?}");
}
