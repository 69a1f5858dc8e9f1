//! Full NAT's packets through BPF_PROG_TEST_RUN: the bytes each way (both
//! addresses and ports rewritten, every checksum right), the claimed source
//! port, its release, exhaustion (dropped and counted, never a port two
//! flows share) and a reply the flow's entry no longer owns (not
//! translated). Each case runs on every program (`xdp_lb`, `xdp_lb_local`,
//! `tc_lb`) on a fresh object in a namespace of its own.
//!
//! IPv6 (`ipv6` below): `xdp_lb` / `xdp_lb_local` hand the frame to
//! `xdp_lb6` / `xdp_lb6_local` (a tail call), which hand a full-NAT
//! service's packet, and a reply to a claimed port, on to `xdp_fullnat6` /
//! `xdp_fullnat6_local` (a second one); the same cases, UDP too, and a
//! full-NAT program missing from `V6_PROGS` (passed untouched, counted).
//!
//! Needs root: `cargo test -p lb-tests --release --test fixtures_fullnat`.

use std::net::{Ipv4Addr, SocketAddrV4};

use lb_common::{
    hash::flow_hash, snat, FlowKey, Reason, DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN, PROG_LB, PROG_LB_LOCAL,
    PROG_TC,
};
use lb_lab::{
    checksum::{complete_partial_l4_checksum, verify_frame, with_partial_l4_checksum},
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
    verify_frame(&completed).unwrap_or_else(|e| panic!("{prog}: output checksums: {e}"));
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

/// IPv6 full NAT: `xdp_fullnat6` / `xdp_fullnat6_local` behind `xdp_lb6`.
mod ipv6 {
    use std::net::{Ipv6Addr, SocketAddrV6};

    use lb_common::v6::{flow_hash6, ip6_raw, Conn6, FlowKey6, V6_SLOT_FULLNAT, V6_SLOT_FULLNAT_LOCAL};
    use lb_lab::{testrun::XDP_DROP, testrun6::ServiceSpec6};

    use super::*;

    const XDP: &[&str] = &[PROG_LB, PROG_LB_LOCAL];

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

    fn client6(port: u16) -> SocketAddrV6 {
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
    fn on_each6(programs: &[&str], case: impl Fn(&str, &mut LbObject)) {
        for prog in programs {
            let _ns = NetNsGuard::new().expect("a network namespace");
            let mut lb = LbObject::shared().expect("load lb-ebpf and verify its programs");
            lb.add_service6(&web()).expect("write the web service");
            lb.add_service6(&dns()).expect("write the DNS service");
            case(prog, &mut lb);
        }
    }

    /// The source port a new flow from `c` to `vip` tries first.
    fn first_port6(c: SocketAddrV6, vip: SocketAddrV6, proto: u8) -> u16 {
        let hash = flow_hash6(&ip6_raw(*c.ip()), &ip6_raw(*vip.ip()), c.port().to_be(), vip.port().to_be(), proto);
        snat::candidate(hash, 0, DEFAULT_SNAT_PORT_MIN, DEFAULT_SNAT_PORT_MAX)
    }

    fn key6(from: SocketAddrV6, to: SocketAddrV6, proto: u8) -> FlowKey6 {
        FlowKey6::new(ip6_raw(*from.ip()), from.port().to_be(), ip6_raw(*to.ip()), to.port().to_be(), proto)
    }

    /// A SYN leaves from (SOURCE, the flow's first candidate port) to the
    /// backend; the backend's SYN-ACK to that port comes back from the VIP to
    /// the client. Both ends rewritten each way.
    fn tcp_both_ways6(prog: &str, lb: &mut LbObject, partial: bool) {
        let c = client6(40000);
        let port = first_port6(c, WEB, IPPROTO_TCP);
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
        on_each6(XDP, |prog, lb| tcp_both_ways6(prog, lb, false));
    }

    /// Partial checksums (a local stack's, over veth): the new pseudo-header
    /// sum, which the device that sends the frame on completes.
    #[test]
    fn root_ipv6_full_nat_keeps_partial_checksums_partial() {
        require_root!("root_ipv6_full_nat_keeps_partial_checksums_partial");
        on_each6(&[PROG_LB_LOCAL], |prog, lb| tcp_both_ways6(prog, lb, true));
    }

    #[test]
    fn root_ipv6_full_nat_translates_udp_both_ways() {
        require_root!("root_ipv6_full_nat_translates_udp_both_ways");
        on_each6(XDP, |prog, lb| {
            let c = client6(5000);
            let lb_side = SocketAddrV6::new(SOURCE, first_port6(c, DNS, IPPROTO_UDP), 0, 0);
            let query = Udp::new(0, 0, b"query");
            let (input, output) =
                (udp6_frame(FROM_CLIENT, c, DNS, &query), udp6_frame(FROM_CLIENT, lb_side, DNS_BACKEND.1, &query));
            expect_translated(lb, prog, &input, &output, Reason::Forwarded, false);
            let answer = Udp::new(0, 0, b"an answer");
            let reply = udp6_frame(FROM_BACKEND, DNS_BACKEND.1, lb_side, &answer);
            expect_translated(
                lb,
                prog,
                &reply,
                &udp6_frame(FROM_BACKEND, DNS, c, &answer),
                Reason::ReplyTranslated,
                false,
            );
            let claims = lb.snat_claims6().unwrap();
            assert_eq!(
                claims.get(&key6(DNS_BACKEND.1, lb_side, IPPROTO_UDP)),
                Some(&key6(c, DNS, IPPROTO_UDP)),
                "{prog}"
            );
        });
    }

    /// A full-NAT service with no backend refuses a new flow as every mode
    /// does (in `xdp_fullnat6`): a SYN gets a reset from the VIP, counted,
    /// with no flow opened and no port claimed.
    #[test]
    fn root_ipv6_full_nat_without_backends_answers_a_syn_with_a_reset() {
        require_root!("root_ipv6_full_nat_without_backends_answers_a_syn_with_a_reset");
        const EMPTY: SocketAddrV6 = SocketAddrV6::new(VIP, 8000, 0, 0);
        on_each6(XDP, |prog, lb| {
            lb.add_service6(&ServiceSpec6::new(2, EMPTY, IPPROTO_TCP, 0, &[]).full_nat(SOURCE)).unwrap();
            let c = client6(40000);
            let before = lb.reasons().unwrap();
            let run = lb.run(prog, &tcp6_frame(FROM_CLIENT, c, EMPTY, &Tcp::new(0, 0, TCP_SYN))).unwrap();
            assert_eq!(reason_delta(&before, &lb.reasons().unwrap(), Reason::ResetNoBackend), 1, "{prog}");
            assert_ne!(run.verdict, XDP_DROP, "{prog}: the reset is sent, not dropped");
            // The answer goes back: VIP:port -> client, RST|ACK.
            let ip = &run.data[14..54];
            assert_eq!(
                (ip[6], &ip[8..24], &ip[24..40]),
                (IPPROTO_TCP, &VIP.octets()[..], &c.ip().octets()[..]),
                "{prog}"
            );
            let tcp = &run.data[54..];
            assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), EMPTY.port(), "{prog}");
            assert_eq!(tcp[13] & (TCP_RST | TCP_ACK), TCP_RST | TCP_ACK, "{prog}: flags {:#x}", tcp[13]);
            assert!(lb.conntrack6().unwrap().is_empty() && lb.snat_claims6().unwrap().is_empty(), "{prog}");
        });
    }

    /// With two ports, a third concurrent flow to the backend is dropped and
    /// counted, and gets no entry; when a flow closes (RST) its port is free
    /// for the next.
    #[test]
    fn root_ipv6_full_nat_exhaustion_is_counted_and_released_ports_are_reused() {
        require_root!("root_ipv6_full_nat_exhaustion_is_counted_and_released_ports_are_reused");
        on_each6(XDP, |prog, lb| {
            lb.set_snat_ports(61000, 61001).unwrap();
            let syn = Tcp::new(0, 0, TCP_SYN);
            for p in [40001, 40002] {
                let run = lb.run(prog, &tcp6_frame(FROM_CLIENT, client6(p), WEB, &syn)).unwrap();
                assert_eq!(run.verdict, XDP_PASS, "{prog}: flow from {p}");
            }
            let mut ports: Vec<u16> = lb.snat_claims6().unwrap().keys().map(|k| u16::from_be(k.dst_port_be)).collect();
            ports.sort();
            assert_eq!(ports, [61000, 61001], "{prog}: two flows, two ports");

            let before = lb.reasons().unwrap();
            let third = tcp6_frame(FROM_CLIENT, client6(40003), WEB, &syn);
            let run = lb.run(prog, &third).unwrap();
            assert_eq!(run.verdict, XDP_DROP, "{prog}: the third flow");
            assert_eq!(reason_delta(&before, &lb.reasons().unwrap(), Reason::DropSnatExhausted), 1, "{prog}");
            assert_eq!(lb.conntrack6().unwrap().len(), 2, "{prog}: the refused flow left no entry");
            assert_eq!(lb.snat_claims6().unwrap().len(), 2, "{prog}");

            // The first flow's client resets it: its port goes back.
            let rst = tcp6_frame(FROM_CLIENT, client6(40001), WEB, &Tcp::new(0, 0, TCP_RST | TCP_ACK));
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
        on_each6(XDP, |prog, lb| {
            lb.run(prog, &tcp6_frame(FROM_CLIENT, client6(40000), WEB, &Tcp::new(0, 0, TCP_SYN))).unwrap();
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
        on_each6(XDP, |prog, lb| {
            let syn = tcp6_frame(FROM_CLIENT, client6(40000), WEB, &Tcp::new(0, 0, TCP_SYN));
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
}
