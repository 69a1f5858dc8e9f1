//! IPv6 full NAT through BPF_PROG_TEST_RUN: `xdp_lb` / `xdp_lb_local` hand
//! the frame to `xdp_lb6` / `xdp_lb6_local` (a tail call), which hand a
//! full-NAT service's packet, and a reply to a claimed port, on to
//! `xdp_fullnat6` / `xdp_fullnat6_local` (a second one). The bytes each way
//! (both addresses and ports rewritten, the L4 checksum right, complete or
//! partial), the claim (`SNAT_FLOWS6`), exhaustion (dropped and counted,
//! never a port two flows share), a reply to a port its flow no longer
//! holds (not translated), and a full-NAT program missing from `V6_PROGS`
//! (passed untouched, counted). Each case runs on a fresh object in a
//! namespace of its own.
//!
//! Needs root: `cargo test -p lb-tests --release --test fixtures_fullnat6`.

use std::net::{Ipv6Addr, SocketAddrV6};

use lb_common::{
    snat,
    v6::{flow_hash6, ip6_raw, Conn6, FlowKey6, V6_SLOT_FULLNAT, V6_SLOT_FULLNAT_LOCAL},
    Reason, DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN, PROG_LB, PROG_LB_LOCAL,
};
use lb_lab::{
    checksum::{complete_partial_l4_checksum, verify_ipv6_frame, with_partial_l4_checksum},
    diff::frame_diff,
    netns::NetNsGuard,
    packet::*,
    require_root,
    testrun::{LbObject, XDP_DROP, XDP_PASS},
    testrun6::ServiceSpec6,
};

const LB_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const CLIENT_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
const BACKEND_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x03];
const FROM_CLIENT: (Mac, Mac) = (LB_MAC, CLIENT_MAC);
const FROM_BACKEND: (Mac, Mac) = (LB_MAC, BACKEND_MAC);

const VIP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
const WEB: SocketAddrV6 = SocketAddrV6::new(VIP, 80, 0, 0);
const DNS: SocketAddrV6 = SocketAddrV6::new(VIP, 53, 0, 0);
/// The load balancer's address the backends see flows come from.
const SOURCE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0xfe);
const WEB_BACKEND: (u32, SocketAddrV6) =
    (1, SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1), 8080, 0, 0));
const DNS_BACKEND: (u32, SocketAddrV6) =
    (2, SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 3), 5353, 0, 0));
const CLIENT_IP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);

const XDP: &[&str] = &[PROG_LB, PROG_LB_LOCAL];

fn client(port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(CLIENT_IP, port, 0, 0)
}

fn web() -> ServiceSpec6 {
    ServiceSpec6::new(0, WEB, IPPROTO_TCP, 0, &[WEB_BACKEND]).full_nat(SOURCE)
}

fn dns() -> ServiceSpec6 {
    ServiceSpec6::new(1, DNS, IPPROTO_UDP, 1, &[DNS_BACKEND]).full_nat(SOURCE)
}

/// `case` on each of `programs`, each in a namespace of its own with an
/// object as fresh (`LbObject::shared`) holding the two full-NAT services.
fn on_each(programs: &[&str], case: impl Fn(&str, &mut LbObject)) {
    for prog in programs {
        let _ns = NetNsGuard::new().expect("a network namespace");
        let mut lb = LbObject::shared().expect("load lb-ebpf and verify its programs");
        lb.add_service6(&web()).expect("write the web service");
        lb.add_service6(&dns()).expect("write the DNS service");
        case(prog, &mut lb);
    }
}

/// The source port a new flow from `c` to `vip` tries first.
fn first_port(c: SocketAddrV6, vip: SocketAddrV6, proto: u8) -> u16 {
    let hash = flow_hash6(&ip6_raw(*c.ip()), &ip6_raw(*vip.ip()), c.port().to_be(), vip.port().to_be(), proto);
    snat::candidate(hash, 0, DEFAULT_SNAT_PORT_MIN, DEFAULT_SNAT_PORT_MAX)
}

fn key6(from: SocketAddrV6, to: SocketAddrV6, proto: u8) -> FlowKey6 {
    FlowKey6::new(ip6_raw(*from.ip()), from.port().to_be(), ip6_raw(*to.ip()), to.port().to_be(), proto)
}

fn reason_delta(before: &[u64], after: &[u64], reason: Reason) -> u64 {
    after[reason as usize] - before[reason as usize]
}

/// Run `input` on `prog` and expect it translated (passed up: the test
/// namespace has no route for the fast path) into `output`, one count of
/// `reason`, and valid checksums (after completing a partial one).
fn expect_translated(lb: &LbObject, prog: &str, input: &[u8], output: &[u8], reason: Reason, partial: bool) {
    let before = lb.reasons().unwrap();
    let run = lb.run(prog, input).expect("test run");
    let after = lb.reasons().unwrap();
    assert_eq!(run.verdict, XDP_PASS, "{prog}: {reason:?}: verdict");
    assert_eq!(reason_delta(&before, &after, reason), 1, "{prog}: {reason:?} not counted");
    let total: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    assert_eq!(total, 1, "{prog}: one reason per packet");
    if let Some(diff) = frame_diff(output, &run.data) {
        panic!("{prog}: {reason:?}: output frame is not the expected one\n{diff}");
    }
    let completed = if partial { complete_partial_l4_checksum(run.data) } else { run.data };
    verify_ipv6_frame(&completed).unwrap_or_else(|e| panic!("{prog}: {reason:?}: output checksum: {e}"));
}

/// A SYN leaves from (SOURCE, the flow's first candidate port) to the
/// backend; the backend's SYN-ACK to that port comes back from the VIP to
/// the client. Both ends rewritten each way.
fn tcp_both_ways(prog: &str, lb: &mut LbObject, partial: bool) {
    let c = client(40000);
    let port = first_port(c, WEB, IPPROTO_TCP);
    let lb_side = SocketAddrV6::new(SOURCE, port, 0, 0);
    let mark = |f: Vec<u8>| if partial { with_partial_l4_checksum(f) } else { f };
    let syn = Tcp::new(0, 0, TCP_SYN).with_payload(b"hello");
    let (input, output) =
        (tcp6_frame(FROM_CLIENT, c, WEB, &syn), tcp6_frame(FROM_CLIENT, lb_side, WEB_BACKEND.1, &syn));
    expect_translated(lb, prog, &mark(input), &mark(output), Reason::Forwarded, partial);

    let (rev, fwd) = (key6(WEB_BACKEND.1, lb_side, IPPROTO_TCP), key6(c, WEB, IPPROTO_TCP));
    let claims: Vec<_> = lb.snat_claims6().unwrap().into_iter().collect();
    assert_eq!(claims, vec![(rev, fwd)], "{prog}: the one claim");
    let c6 = lb.conntrack6().unwrap()[&fwd];
    assert_eq!((c6.snat_ip, u16::from_be(c6.conn.snat_port_be)), (ip6_raw(SOURCE), port), "{prog}");
    assert!(lb.snat_claims().unwrap().is_empty(), "{prog}: nothing in IPv4's claims");

    let synack = Tcp::new(0, 0, TCP_SYN | TCP_ACK).with_payload(b"hi back");
    let reply = tcp6_frame(FROM_BACKEND, WEB_BACKEND.1, lb_side, &synack);
    let back = tcp6_frame(FROM_BACKEND, WEB, c, &synack);
    expect_translated(lb, prog, &mark(reply), &mark(back), Reason::ReplyTranslated, partial);
    let counters = lb.backend_counters(WEB_BACKEND.0).unwrap();
    assert_eq!((counters.new_flows, counters.packets, counters.reply_packets), (1, 1, 1), "{prog}");
}

#[test]
fn root_ipv6_full_nat_rewrites_both_ends_both_ways() {
    require_root!("root_ipv6_full_nat_rewrites_both_ends_both_ways");
    on_each(XDP, |prog, lb| tcp_both_ways(prog, lb, false));
}

/// Partial checksums (a local stack's, over veth): the new pseudo-header
/// sum, which the device that sends the frame on completes.
#[test]
fn root_ipv6_full_nat_keeps_partial_checksums_partial() {
    require_root!("root_ipv6_full_nat_keeps_partial_checksums_partial");
    on_each(&[PROG_LB_LOCAL], |prog, lb| tcp_both_ways(prog, lb, true));
}

#[test]
fn root_ipv6_full_nat_translates_udp_both_ways() {
    require_root!("root_ipv6_full_nat_translates_udp_both_ways");
    on_each(XDP, |prog, lb| {
        let c = client(5000);
        let lb_side = SocketAddrV6::new(SOURCE, first_port(c, DNS, IPPROTO_UDP), 0, 0);
        let query = Udp::new(0, 0, b"query");
        let (input, output) =
            (udp6_frame(FROM_CLIENT, c, DNS, &query), udp6_frame(FROM_CLIENT, lb_side, DNS_BACKEND.1, &query));
        expect_translated(lb, prog, &input, &output, Reason::Forwarded, false);
        let answer = Udp::new(0, 0, b"an answer");
        let reply = udp6_frame(FROM_BACKEND, DNS_BACKEND.1, lb_side, &answer);
        expect_translated(lb, prog, &reply, &udp6_frame(FROM_BACKEND, DNS, c, &answer), Reason::ReplyTranslated, false);
        let claims = lb.snat_claims6().unwrap();
        assert_eq!(claims.get(&key6(DNS_BACKEND.1, lb_side, IPPROTO_UDP)), Some(&key6(c, DNS, IPPROTO_UDP)), "{prog}");
    });
}

/// With two ports, a third concurrent flow to the backend is dropped and
/// counted, and gets no entry; when a flow closes (RST) its port is free
/// for the next.
#[test]
fn root_ipv6_full_nat_exhaustion_is_counted_and_released_ports_are_reused() {
    require_root!("root_ipv6_full_nat_exhaustion_is_counted_and_released_ports_are_reused");
    on_each(XDP, |prog, lb| {
        lb.set_snat_ports(61000, 61001).unwrap();
        let syn = Tcp::new(0, 0, TCP_SYN);
        for p in [40001, 40002] {
            let run = lb.run(prog, &tcp6_frame(FROM_CLIENT, client(p), WEB, &syn)).unwrap();
            assert_eq!(run.verdict, XDP_PASS, "{prog}: flow from {p}");
        }
        let mut ports: Vec<u16> = lb.snat_claims6().unwrap().keys().map(|k| u16::from_be(k.dst_port_be)).collect();
        ports.sort();
        assert_eq!(ports, [61000, 61001], "{prog}: two flows, two ports");

        let before = lb.reasons().unwrap();
        let third = tcp6_frame(FROM_CLIENT, client(40003), WEB, &syn);
        let run = lb.run(prog, &third).unwrap();
        assert_eq!(run.verdict, XDP_DROP, "{prog}: the third flow");
        assert_eq!(reason_delta(&before, &lb.reasons().unwrap(), Reason::DropSnatExhausted), 1, "{prog}");
        assert_eq!(lb.conntrack6().unwrap().len(), 2, "{prog}: the refused flow left no entry");
        assert_eq!(lb.snat_claims6().unwrap().len(), 2, "{prog}");

        // The first flow's client resets it: its port goes back.
        let rst = tcp6_frame(FROM_CLIENT, client(40001), WEB, &Tcp::new(0, 0, TCP_RST | TCP_ACK));
        assert_eq!(lb.run(prog, &rst).unwrap().verdict, XDP_PASS, "{prog}: the reset");
        assert_eq!(lb.snat_claims6().unwrap().len(), 1, "{prog}: the reset released its port");
        assert_eq!(lb.run(prog, &third).unwrap().verdict, XDP_PASS, "{prog}: the third flow, retried");
        assert_eq!(lb.snat_claims6().unwrap().len(), 2, "{prog}");
    });
}

/// A reply to a claimed port whose flow's entry names another port (the
/// entry was replaced: evicted and re-opened) is not translated to that
/// flow's client: it passes untouched.
#[test]
fn root_ipv6_full_nat_reply_to_a_port_its_flow_no_longer_holds_is_not_translated() {
    require_root!("root_ipv6_full_nat_reply_to_a_port_its_flow_no_longer_holds_is_not_translated");
    on_each(XDP, |prog, lb| {
        lb.run(prog, &tcp6_frame(FROM_CLIENT, client(40000), WEB, &Tcp::new(0, 0, TCP_SYN))).unwrap();
        let (rev, fwd) = lb.snat_claims6().unwrap().into_iter().next().expect("a claim");
        let c6 = lb.conntrack6().unwrap()[&fwd];
        let moved = u16::from_be(c6.conn.snat_port_be).wrapping_add(1).to_be();
        lb.insert_flow6(&fwd, &Conn6 { conn: lb_common::Conn { snat_port_be: moved, ..c6.conn }, ..c6 }).unwrap();

        let lb_side = SocketAddrV6::new(SOURCE, u16::from_be(rev.dst_port_be), 0, 0);
        let reply = tcp6_frame(FROM_BACKEND, WEB_BACKEND.1, lb_side, &Tcp::new(0, 0, TCP_SYN | TCP_ACK));
        let before = lb.reasons().unwrap();
        let run = lb.run(prog, &reply).unwrap();
        assert_eq!((run.verdict, &run.data), (XDP_PASS, &reply), "{prog}: untouched");
        assert_eq!(reason_delta(&before, &lb.reasons().unwrap(), Reason::PassNoService), 1, "{prog}");
    });
}

/// Without the full-NAT programs in `V6_PROGS`, a full-NAT service's packet
/// and a claimed reply pass untouched, counted; nothing is half done.
#[test]
fn root_ipv6_full_nat_without_its_program_passes_untouched() {
    require_root!("root_ipv6_full_nat_without_its_program_passes_untouched");
    on_each(XDP, |prog, lb| {
        let syn = tcp6_frame(FROM_CLIENT, client(40000), WEB, &Tcp::new(0, 0, TCP_SYN));
        lb.run(prog, &syn).unwrap();
        let (rev, _) = lb.snat_claims6().unwrap().into_iter().next().expect("a claim");
        let lb_side = SocketAddrV6::new(SOURCE, u16::from_be(rev.dst_port_be), 0, 0);
        let reply = tcp6_frame(FROM_BACKEND, WEB_BACKEND.1, lb_side, &Tcp::new(0, 0, TCP_SYN | TCP_ACK));
        lb.clear_v6_program(V6_SLOT_FULLNAT).unwrap();
        lb.clear_v6_program(V6_SLOT_FULLNAT_LOCAL).unwrap();
        for frame in [&syn, &reply] {
            let before = lb.reasons().unwrap();
            let run = lb.run(prog, frame).unwrap();
            assert_eq!((run.verdict, &run.data), (XDP_PASS, frame), "{prog}: untouched");
            assert_eq!(reason_delta(&before, &lb.reasons().unwrap(), Reason::PassIpv6NoProgram), 1, "{prog}");
        }
        assert_eq!(lb.backend_counters(WEB_BACKEND.0).unwrap().packets, 1, "{prog}: only the first SYN counted");
    });
}
