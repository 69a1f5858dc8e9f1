//! `LbObject::shared`, where the packet fixtures take their object from: one
//! handed out again after a test dirtied every map it could behaves as a
//! freshly loaded one, so reusing it (the verifier runs once per test
//! thread instead of once per fixture) hides nothing between fixtures.
//!
//! Needs root: `cargo test -p lb-tests --release --test suite_shared_object`.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::{FlowKey, Path, MAX_SERVICES, PROG_LB, PROG_LB_LOCAL, PROG_TC};
use lb_lab::{
    netns::NetNsGuard,
    packet::*,
    require_root,
    testrun::{counters_delta, LbObject, ServiceSpec, Snapshot},
};

const MACS: (Mac, Mac) = ([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2]);
const WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);
const FULL_NAT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 81);
const SOURCE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 254);
const BACKENDS: [(u32, SocketAddrV4); 2] = [
    (1, SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 8080)),
    (2, SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 2), 8080)),
];
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 10), 40000);
/// Backend ids whose counters are compared: the ones used and a few more.
const BACKEND_IDS: u32 = 8;

fn web() -> ServiceSpec {
    ServiceSpec::new(0, WEB, IPPROTO_TCP, 1, &BACKENDS)
}

fn full_nat() -> ServiceSpec {
    ServiceSpec::new(1, FULL_NAT, IPPROTO_TCP, 0, &BACKENDS[1..]).full_nat(SOURCE)
}

fn tcp(to: SocketAddrV4, from: SocketAddrV4, flags: u8) -> Vec<u8> {
    tcp_frame(MACS, &Ipv4::new(*from.ip(), *to.ip(), IPPROTO_TCP), &Tcp::new(from.port(), to.port(), flags))
}

/// Everything a test can read back off the object.
#[derive(Debug, PartialEq)]
struct State {
    snapshot: Snapshot,
    claims: HashMap<FlowKey, FlowKey>,
    paths: Vec<(Path, u64)>,
}

impl State {
    fn read(lb: &LbObject) -> Self {
        State {
            snapshot: lb.snapshot(BACKEND_IDS, MAX_SERVICES).unwrap(),
            claims: lb.snat_claims().unwrap(),
            paths: lb.paths(1).unwrap(),
        }
    }
}

/// Writes every kind of map entry and state a fixture can leave behind.
fn dirty(lb: &mut LbObject) {
    lb.add_service(&web()).unwrap();
    lb.add_service(&full_nat()).unwrap();
    lb.set_snat_ports(2000, 2001).unwrap();
    lb.set_non_syn_flows_per_sec(1).unwrap();
    lb.allow_egress(1).unwrap();
    for prog in [PROG_LB, PROG_LB_LOCAL, PROG_TC] {
        lb.run(prog, &tcp(WEB, CLIENT, TCP_SYN)).unwrap();
        lb.run(prog, &tcp(FULL_NAT, CLIENT, TCP_SYN)).unwrap();
        lb.run(prog, &tcp(WEB, SocketAddrV4::new(*CLIENT.ip(), 40001), TCP_ACK)).unwrap();
    }
    lb.run_from(PROG_LB, &tcp(WEB, SocketAddrV4::new(*CLIENT.ip(), 40002), TCP_SYN), 1).unwrap();
    assert_ne!(State::read(lb), State::read(&LbObject::load().unwrap()), "dirty() left the object as fresh");
}

/// The packets, in order, on `lb`: what each gave (verdict, frame) and what
/// it moved (the state's change).
fn outcomes(lb: &mut LbObject) -> Vec<(u32, Vec<u8>, State)> {
    let mut out = Vec::new();
    // A table left empty where the service's table was filled before...
    lb.add_service(&ServiceSpec { table_ids: vec![], ..web() }).unwrap();
    // ...and full NAT from the default port range.
    lb.add_service(&full_nat()).unwrap();
    let packets = [
        tcp(WEB, CLIENT, TCP_SYN),
        tcp(FULL_NAT, CLIENT, TCP_SYN),
        tcp(FULL_NAT, SocketAddrV4::new(*CLIENT.ip(), 40001), TCP_ACK),
        tcp(FULL_NAT, SocketAddrV4::new(*CLIENT.ip(), 40003), TCP_ACK),
    ];
    for p in packets {
        let before = State::read(lb);
        let run = lb.run(PROG_LB, &p).unwrap();
        let after = State::read(lb);
        let (b, a) = (&before.snapshot, &after.snapshot);
        let delta = State {
            snapshot: Snapshot {
                reasons: a.reasons.iter().zip(&b.reasons).map(|(a, b)| a - b).collect(),
                services: a.services.iter().zip(&b.services).map(|(a, b)| counters_delta(b, a)).collect(),
                backends: a.backends.iter().zip(&b.backends).map(|(a, b)| counters_delta(b, a)).collect(),
                conntrack: after.snapshot.conntrack,
            },
            ..after
        };
        out.push((run.verdict, run.data, delta));
    }
    out
}

#[test]
fn root_a_reused_object_behaves_as_a_fresh_one() {
    require_root!("root_a_reused_object_behaves_as_a_fresh_one");
    let _netns = NetNsGuard::new().expect("create a network namespace");
    let id = {
        let mut lb = LbObject::shared().expect("load lb-ebpf");
        dirty(&mut lb);
        lb.conntrack_map_id().unwrap()
    };
    let mut reused = LbObject::shared().expect("take the object again");
    assert_eq!(reused.conntrack_map_id().unwrap(), id, "the pool handed out another object, not the one returned");
    let mut fresh = LbObject::load().expect("load lb-ebpf");
    assert_eq!(State::read(&reused), State::read(&fresh), "a reused object reads back unlike a fresh one");
    assert_eq!(outcomes(&mut reused), outcomes(&mut fresh), "a reused object answers unlike a fresh one");
}
