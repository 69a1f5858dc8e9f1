//! Full NAT's packets through BPF_PROG_TEST_RUN: the bytes each way (both
//! addresses and ports rewritten, every checksum right), the claimed source
//! port, its release, exhaustion (dropped and counted, never a port two
//! flows share) and a reply the flow's entry no longer owns (not
//! translated). Each case runs on every program (`xdp_lb`, `xdp_lb_local`,
//! `tc_lb`) on a fresh object in a namespace of its own.
//!
//! Needs root: `cargo test -p lb-tests --release --test fixtures_fullnat`.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    hash::flow_hash, snat, FlowKey, Reason, DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN, PROG_LB, PROG_LB_LOCAL,
    PROG_TC,
};
use lb_lab::{
    checksum::{complete_partial_l4_checksum, verify_ipv4_frame, with_partial_l4_checksum},
    diff::frame_diff,
    netns::NetNsGuard,
    packet::*,
    require_root,
    testrun::{be_ip, LbObject, ServiceSpec, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS},
};

const LB_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const CLIENT_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
const BACKEND_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x03];
const FROM_CLIENT: (Mac, Mac) = (LB_MAC, CLIENT_MAC);
const FROM_BACKEND: (Mac, Mac) = (LB_MAC, BACKEND_MAC);

const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);
/// The load balancer's address the backend sees flows come from.
const SOURCE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 254);
const BACKEND: (u32, SocketAddrV4) = (1, SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 8080));
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);

const EVERY: &[&str] = &[PROG_LB, PROG_LB_LOCAL, PROG_TC];

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(CLIENT_IP, port)
}

/// `case` on each of `programs`, each in a namespace of its own with a
/// fresh (or reset) object holding a full-NAT service with one backend.
fn on_each(programs: &[&str], case: impl Fn(&str, &mut LbObject)) {
    for prog in programs {
        let _ns = NetNsGuard::new().expect("a network namespace");
        let mut lb = LbObject::shared().expect("load lb-ebpf and verify its programs");
        let svc = ServiceSpec::new(0, VIP, IPPROTO_TCP, 0, &[BACKEND]).full_nat(SOURCE);
        lb.add_service(&svc).expect("write the service");
        case(prog, &mut lb);
    }
}

fn tcp(from: SocketAddrV4, to: SocketAddrV4, macs: (Mac, Mac), tcp: &Tcp) -> Vec<u8> {
    let t = Tcp { src_port: from.port(), dst_port: to.port(), ..tcp.clone() };
    tcp_frame(macs, &Ipv4::new(*from.ip(), *to.ip(), IPPROTO_TCP), &t)
}

/// The source port a new flow from `c` tries first.
fn first_port(c: SocketAddrV4, min: u16, max: u16) -> u16 {
    let hash = flow_hash(be_ip(c), be_ip(VIP), c.port().to_be(), VIP.port().to_be(), IPPROTO_TCP);
    snat::candidate(hash, 0, min, max)
}

/// What a verdict means, for either hook.
fn verdict_name(prog: &str, v: u32) -> &'static str {
    match (prog == PROG_TC, v) {
        (false, XDP_PASS) | (true, TC_ACT_OK) => "translated or passed up",
        (true, TC_ACT_UNSPEC) => "untouched (next)",
        (false, XDP_DROP) | (true, TC_ACT_SHOT) => "drop",
        _ => "other",
    }
}

fn reason_delta(before: &[u64], after: &[u64], reason: Reason) -> u64 {
    after[reason as usize] - before[reason as usize]
}

/// Run `input` on `prog` and expect `output` (checksums verified, after
/// completing a partial one) for `reason`.
fn expect_translated(lb: &LbObject, prog: &str, input: &[u8], output: &[u8], reason: Reason, partial: bool) {
    let before = lb.reasons().unwrap();
    let run = lb.run(prog, input).expect("test run");
    assert_eq!(verdict_name(prog, run.verdict), "translated or passed up", "{prog}: verdict {}", run.verdict);
    assert_eq!(reason_delta(&before, &lb.reasons().unwrap(), reason), 1, "{prog}: {reason:?} not counted");
    if let Some(diff) = frame_diff(output, &run.data) {
        panic!("{prog}: {reason:?}: output frame is not the expected one\n{diff}");
    }
    let completed = if partial { complete_partial_l4_checksum(run.data.clone()) } else { run.data };
    verify_ipv4_frame(&completed).unwrap_or_else(|e| panic!("{prog}: output checksums: {e}"));
}

/// A SYN leaves from (SOURCE, the flow's first candidate port) to the
/// backend; the backend's SYN-ACK to that port comes back from the VIP to
/// the client. Both rewrites, all checksums.
fn both_ways(prog: &str, lb: &mut LbObject, partial: bool) {
    let c = client(40000);
    let port = first_port(c, DEFAULT_SNAT_PORT_MIN, DEFAULT_SNAT_PORT_MAX);
    let lb_side = SocketAddrV4::new(SOURCE, port);
    let mark = |f: Vec<u8>| if partial { with_partial_l4_checksum(f) } else { f };
    let syn = Tcp::new(0, 0, TCP_SYN).with_payload(b"hello");
    let (input, output) = (tcp(c, VIP, FROM_CLIENT, &syn), tcp(lb_side, BACKEND.1, FROM_CLIENT, &syn));
    expect_translated(lb, prog, &mark(input), &mark(output), Reason::Forwarded, partial);

    let claims = lb.snat_claims().unwrap();
    let rev = FlowKey::new(be_ip(BACKEND.1), BACKEND.1.port().to_be(), be_ip(lb_side), port.to_be(), IPPROTO_TCP);
    let fwd = FlowKey::new(be_ip(c), c.port().to_be(), be_ip(VIP), VIP.port().to_be(), IPPROTO_TCP);
    assert_eq!(claims.into_iter().collect::<Vec<_>>(), vec![(rev, fwd)], "{prog}: the one claim");
    let conn = lb.conntrack().unwrap()[&fwd];
    assert_eq!((conn.snat_ip_be, u16::from_be(conn.snat_port_be)), (be_ip(lb_side), port), "{prog}");

    let synack = Tcp::new(0, 0, TCP_SYN | TCP_ACK).with_payload(b"hi back");
    let (reply, back) = (tcp(BACKEND.1, lb_side, FROM_BACKEND, &synack), tcp(VIP, c, FROM_BACKEND, &synack));
    expect_translated(lb, prog, &mark(reply), &mark(back), Reason::ReplyTranslated, partial);
    let counters = lb.backend_counters(BACKEND.0).unwrap();
    assert_eq!((counters.new_flows, counters.packets, counters.reply_packets), (1, 1, 1), "{prog}");
}

#[test]
fn root_full_nat_rewrites_both_ends_both_ways() {
    require_root!("root_full_nat_rewrites_both_ends_both_ways");
    on_each(EVERY, |prog, lb| both_ways(prog, lb, false));
}

/// Partial checksums (a local stack's, over veth): both updates leave the
/// new pseudo-header sum, which the device that sends it on completes.
#[test]
fn root_full_nat_keeps_partial_checksums_partial() {
    require_root!("root_full_nat_keeps_partial_checksums_partial");
    on_each(&[PROG_LB_LOCAL], |prog, lb| both_ways(prog, lb, true));
}

/// With two ports, a third concurrent flow to the backend is dropped and
/// counted, and gets no entry; when a flow closes (RST) its port is free
/// for the next.
#[test]
fn root_full_nat_exhaustion_is_counted_and_released_ports_are_reused() {
    require_root!("root_full_nat_exhaustion_is_counted_and_released_ports_are_reused");
    on_each(EVERY, |prog, lb| {
        lb.set_snat_ports(61000, 61001).unwrap();
        let syn = Tcp::new(0, 0, TCP_SYN);
        for p in [40001, 40002] {
            let run = lb.run(prog, &tcp(client(p), VIP, FROM_CLIENT, &syn)).unwrap();
            assert_eq!(verdict_name(prog, run.verdict), "translated or passed up", "{prog}: flow from {p}");
        }
        let mut ports: Vec<u16> = lb.snat_claims().unwrap().keys().map(|k| u16::from_be(k.dst_port_be)).collect();
        ports.sort();
        assert_eq!(ports, [61000, 61001], "{prog}: two flows, two ports");

        let before = lb.reasons().unwrap();
        let third = tcp(client(40003), VIP, FROM_CLIENT, &syn);
        let run = lb.run(prog, &third).unwrap();
        assert_eq!(verdict_name(prog, run.verdict), "drop", "{prog}: the third flow");
        assert_eq!(reason_delta(&before, &lb.reasons().unwrap(), Reason::DropSnatExhausted), 1, "{prog}");
        assert_eq!(lb.conntrack().unwrap().len(), 2, "{prog}: the refused flow left no entry");
        assert_eq!(lb.snat_claims().unwrap().len(), 2, "{prog}");

        // The first flow's client resets it: its port goes back.
        let rst = tcp(client(40001), VIP, FROM_CLIENT, &Tcp::new(0, 0, TCP_RST | TCP_ACK));
        assert_eq!(verdict_name(prog, lb.run(prog, &rst).unwrap().verdict), "translated or passed up");
        assert_eq!(lb.snat_claims().unwrap().len(), 1, "{prog}: the reset released its port");
        let run = lb.run(prog, &third).unwrap();
        assert_eq!(verdict_name(prog, run.verdict), "translated or passed up", "{prog}: the third flow, retried");
        assert_eq!(lb.snat_claims().unwrap().len(), 2, "{prog}");
    });
}

/// A reply to a claimed port whose flow's entry names another port (the
/// entry was replaced: evicted and re-opened) is not translated to that
/// flow's client: it passes untouched.
#[test]
fn root_full_nat_reply_to_a_port_its_flow_no_longer_holds_is_not_translated() {
    require_root!("root_full_nat_reply_to_a_port_its_flow_no_longer_holds_is_not_translated");
    on_each(EVERY, |prog, lb| {
        let c = client(40000);
        lb.run(prog, &tcp(c, VIP, FROM_CLIENT, &Tcp::new(0, 0, TCP_SYN))).unwrap();
        let (rev, fwd) = lb.snat_claims().unwrap().into_iter().next().expect("a claim");
        let conn = lb.conntrack().unwrap()[&fwd];
        let moved = u16::from_be(conn.snat_port_be).wrapping_add(1).to_be();
        lb.insert_flow(&fwd, &lb_common::Conn { snat_port_be: moved, ..conn }).unwrap();

        let lb_side = SocketAddrV4::new(SOURCE, u16::from_be(rev.dst_port_be));
        let reply = tcp(BACKEND.1, lb_side, FROM_BACKEND, &Tcp::new(0, 0, TCP_SYN | TCP_ACK));
        let before = lb.reasons().unwrap();
        let run = lb.run(prog, &reply).unwrap();
        assert_eq!(run.data, reply, "{prog}: untouched");
        assert_ne!(verdict_name(prog, run.verdict), "drop", "{prog}");
        assert_eq!(reason_delta(&before, &lb.reasons().unwrap(), Reason::PassNoService), 1, "{prog}");
    });
}
