//! IPv6 through BPF_PROG_TEST_RUN: `xdp_lb` and `xdp_lb_local` hand an IPv6
//! frame to `xdp_lb6` / `xdp_lb6_local` (a tail call), which translate TCP
//! and UDP for an IPv6 service (destination NAT) and the backend's replies
//! back, and leave ICMPv6 (neighbour discovery), extension headers and
//! fragments untouched. Expected frames are built from scratch with the
//! lab's checksums (not lb-common's) and compared byte for byte; each case
//! runs on an object as fresh (reset, see `LbObject::shared`) in a
//! namespace of its own.
//!
//! Needs root: `cargo test -p lb-tests --release --test fixtures_ipv6`.

use std::net::{Ipv6Addr, SocketAddrV6};

use lb_common::{v6::ip6_raw, Reason, PROG_LB, PROG_LB_LOCAL, PROG_TC};
use lb_lab::{
    checksum::{ones_complement_sum, pseudo_header_v6},
    diff::frame_diff,
    netns::NetNsGuard,
    packet::*,
    require_root,
    testrun::{LbObject, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS},
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
const CLIENT: SocketAddrV6 = SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10), 40000, 0, 0);
const WEB_BACKENDS: [(u32, SocketAddrV6); 2] = [
    (1, SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1), 8080, 0, 0)),
    (2, SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2), 8080, 0, 0)),
];
const DNS_BACKEND: (u32, SocketAddrV6) =
    (3, SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 3), 5353, 0, 0));

const XDP: &[&str] = &[PROG_LB, PROG_LB_LOCAL];

fn web() -> ServiceSpec6 {
    // Live table 1: a program that ignored `Service::table` would find table 0 empty.
    ServiceSpec6::new(0, WEB, IPPROTO_TCP, 1, &WEB_BACKENDS)
}

fn dns() -> ServiceSpec6 {
    ServiceSpec6::new(1, DNS, IPPROTO_UDP, 0, &[DNS_BACKEND])
}

/// `case` on each of `programs`, each in a namespace of its own with an
/// object as fresh (`LbObject::shared`: verified once per test thread,
/// reset between cases) holding the web and DNS services.
fn on_each(programs: &[&str], case: impl Fn(&str, &mut LbObject)) {
    for prog in programs {
        let _ns = NetNsGuard::new().expect("a network namespace");
        let mut lb = LbObject::shared().expect("load lb-ebpf and verify its programs");
        lb.add_service6(&web()).expect("write the web service");
        lb.add_service6(&dns()).expect("write the DNS service");
        case(prog, &mut lb);
    }
}

fn tcp6(from: SocketAddrV6, to: SocketAddrV6, macs: (Mac, Mac), flags: u8, payload: &[u8]) -> Vec<u8> {
    let seg = Tcp::new(from.port(), to.port(), flags).with_payload(payload).build(Addrs::V6(*from.ip(), *to.ip()));
    ethernet(macs.0, macs.1, ETH_P_IPV6, &Ipv6::new(*from.ip(), *to.ip(), IPPROTO_TCP).build(&seg))
}

fn udp6(from: SocketAddrV6, to: SocketAddrV6, macs: (Mac, Mac), udp: Udp) -> Vec<u8> {
    let d = Udp { src_port: from.port(), dst_port: to.port(), ..udp }.build(Addrs::V6(*from.ip(), *to.ip()));
    ethernet(macs.0, macs.1, ETH_P_IPV6, &Ipv6::new(*from.ip(), *to.ip(), IPPROTO_UDP).build(&d))
}

/// The frame with its L4 checksum replaced by the pseudo-header sum, as a
/// local stack hands it over with checksum offload (CHECKSUM_PARTIAL).
fn partial(mut frame: Vec<u8>) -> Vec<u8> {
    let ip = &frame[14..54];
    let (src, dst) = (
        Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap()),
        Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap()),
    );
    let (next, len) = (ip[6], frame.len() - 54);
    let at = 54 + if next == IPPROTO_TCP { 16 } else { 6 };
    let sum = ones_complement_sum(&pseudo_header_v6(src, dst, next, len as u32));
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    frame
}

fn reason_delta(before: &[u64], after: &[u64], reason: Reason) -> u64 {
    after[reason as usize] - before[reason as usize]
}

/// Run `input` on `prog`: expect `verdict`, the frame `output` and one
/// count of `reason`, and no other reason counted.
fn expect(lb: &LbObject, prog: &str, input: &[u8], verdict: u32, output: &[u8], reason: Reason) {
    let before = lb.reasons().unwrap();
    let run = lb.run(prog, input).expect("test run");
    let after = lb.reasons().unwrap();
    assert_eq!(run.verdict, verdict, "{prog}: {reason:?}: verdict");
    if let Some(diff) = frame_diff(output, &run.data) {
        panic!("{prog}: {reason:?}: output frame is not the expected one\n{diff}");
    }
    assert_eq!(reason_delta(&before, &after, reason), 1, "{prog}: {reason:?} not counted");
    let total: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    assert_eq!(total, 1, "{prog}: one reason per packet");
}

/// A SYN to the VIP goes to the backend Maglev names (destination and
/// checksum rewritten; passed up, the test namespace has no route for the
/// fast path), its retransmission and the next segment to the same one;
/// the backend's SYN-ACK comes back from the VIP.
fn syn_established_reply(prog: &str, lb: &mut LbObject, mark: fn(Vec<u8>) -> Vec<u8>) {
    let (id, backend) = web().pick(CLIENT).expect("a backend");
    let syn = |to| tcp6(CLIENT, to, FROM_CLIENT, TCP_SYN, b"");
    expect(lb, prog, &mark(syn(WEB)), XDP_PASS, &mark(syn(backend)), Reason::Forwarded);
    let flows = lb.conntrack6().unwrap();
    let c6 = flows.get(&web().flow_key(CLIENT)).expect("the flow's entry");
    assert_eq!((c6.conn.backend_id, c6.nat_ip, u16::from_be(c6.conn.nat_port_be)), (id, ip6_raw(*backend.ip()), 8080));
    expect(lb, prog, &mark(syn(WEB)), XDP_PASS, &mark(syn(backend)), Reason::Forwarded);

    let ack = |to| tcp6(CLIENT, to, FROM_CLIENT, TCP_ACK, b"GET / HTTP/1.0\r\n\r\n");
    expect(lb, prog, &mark(ack(WEB)), XDP_PASS, &mark(ack(backend)), Reason::Forwarded);
    let synack = |from| tcp6(from, CLIENT, FROM_BACKEND, TCP_SYN | TCP_ACK, b"");
    expect(lb, prog, &mark(synack(backend)), XDP_PASS, &mark(synack(WEB)), Reason::ReplyTranslated);

    let c = lb.backend_counters(id).unwrap();
    assert_eq!((c.new_flows, c.packets, c.reply_packets), (1, 3, 1), "{prog}: a retransmitted SYN is no new flow");
    assert_eq!(lb.service_counters(0).unwrap().packets, 3, "{prog}");
}

#[test]
fn root_ipv6_tcp_syn_established_and_reply_are_translated() {
    require_root!("root_ipv6_tcp_syn_established_and_reply_are_translated");
    on_each(XDP, |prog, lb| syn_established_reply(prog, lb, |f| f));
}

/// From a local stack (veth): partial checksums stay partial, updated to
/// the new pseudo-header, for the device that finishes them.
#[test]
fn root_ipv6_partial_checksums_stay_partial() {
    require_root!("root_ipv6_partial_checksums_stay_partial");
    on_each(&[PROG_LB_LOCAL], |prog, lb| syn_established_reply(prog, lb, partial));
}

#[test]
fn root_ipv6_udp_is_translated_both_ways_and_a_zero_checksum_dropped() {
    require_root!("root_ipv6_udp_is_translated_both_ways_and_a_zero_checksum_dropped");
    on_each(XDP, |prog, lb| {
        let q = || Udp::new(0, 0, b"query");
        let backend = DNS_BACKEND.1;
        expect(
            lb,
            prog,
            &udp6(CLIENT, DNS, FROM_CLIENT, q()),
            XDP_PASS,
            &udp6(CLIENT, backend, FROM_CLIENT, q()),
            Reason::Forwarded,
        );
        let a = || Udp::new(0, 0, b"answer");
        let reply = udp6(backend, CLIENT, FROM_BACKEND, a());
        expect(lb, prog, &reply, XDP_PASS, &udp6(DNS, CLIENT, FROM_BACKEND, a()), Reason::ReplyTranslated);
        // Invalid over IPv6 (RFC 8200 8.1): never forwarded.
        let bare = udp6(SocketAddrV6::new(*CLIENT.ip(), 40001, 0, 0), DNS, FROM_CLIENT, q().without_checksum());
        expect(lb, prog, &bare, XDP_DROP, &bare, Reason::DropUdp6NoChecksum);
        assert_eq!(lb.conntrack6().unwrap().len(), 1, "{prog}: the dropped datagram opened no flow");
    });
}

/// A neighbour solicitation for the VIP (ICMPv6 135), a hop-by-hop header
/// and a fragment before TCP, and TCP to a port that is no service: all
/// untouched, each counted by its reason.
#[test]
fn root_ipv6_neighbour_discovery_extension_headers_and_fragments_pass_untouched() {
    require_root!("root_ipv6_neighbour_discovery_extension_headers_and_fragments_pass_untouched");
    let ns = {
        let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&VIP.octets());
        ethernet(
            LB_MAC,
            CLIENT_MAC,
            ETH_P_IPV6,
            &Ipv6 { hop_limit: 255, ..Ipv6::new(*CLIENT.ip(), VIP, 58) }.build(&icmp),
        )
    };
    let seg = Tcp::new(CLIENT.port(), 80, TCP_SYN).build(Addrs::V6(*CLIENT.ip(), VIP));
    let behind = |next: u8, ext: [u8; 8]| {
        let mut p = ext.to_vec();
        p.extend_from_slice(&seg);
        ethernet(LB_MAC, CLIENT_MAC, ETH_P_IPV6, &Ipv6::new(*CLIENT.ip(), VIP, next).build(&p))
    };
    // Hop-by-hop (0): next TCP, length 0, PadN. Fragment (44): next TCP, offset 0, more fragments.
    let hop_by_hop = behind(0, [IPPROTO_TCP, 0, 1, 4, 0, 0, 0, 0]);
    let fragment = behind(44, [IPPROTO_TCP, 0, 0, 1, 0, 0, 0, 7]);
    let other_port = tcp6(CLIENT, SocketAddrV6::new(VIP, 443, 0, 0), FROM_CLIENT, TCP_SYN, b"");
    on_each(XDP, |prog, lb| {
        expect(lb, prog, &ns, XDP_PASS, &ns, Reason::PassNotTcpUdp);
        expect(lb, prog, &hop_by_hop, XDP_PASS, &hop_by_hop, Reason::PassIpv6ExtHeader);
        expect(lb, prog, &fragment, XDP_PASS, &fragment, Reason::PassFragment);
        expect(lb, prog, &other_port, XDP_PASS, &other_port, Reason::PassNoService);
        assert!(lb.conntrack6().unwrap().is_empty(), "{prog}");
    });
    // tc balances IPv4 only: IPv6 goes on to the next filter, untouched.
    on_each(&[PROG_TC], |prog, lb| {
        let syn = tcp6(CLIENT, WEB, FROM_CLIENT, TCP_SYN, b"");
        expect(lb, prog, &syn, TC_ACT_UNSPEC, &syn, Reason::PassIpv6);
    });
}

/// An IPv6 header cut short, a payload length beyond the frame, a TCP
/// header cut short: dropped and counted, never forwarded.
#[test]
fn root_ipv6_truncated_or_malformed_headers_are_dropped() {
    require_root!("root_ipv6_truncated_or_malformed_headers_are_dropped");
    let syn = tcp6(CLIENT, WEB, FROM_CLIENT, TCP_SYN, b"");
    let short_ip = syn[..14 + 20].to_vec();
    let mut long_payload = syn.clone();
    long_payload[18..20].copy_from_slice(&100u16.to_be_bytes());
    let mut short_tcp = syn[..54 + 12].to_vec();
    short_tcp[18..20].copy_from_slice(&12u16.to_be_bytes());
    let mut not_v6 = syn.clone();
    not_v6[14] = 0x40;
    on_each(XDP, |prog, lb| {
        expect(lb, prog, &short_ip, XDP_DROP, &short_ip, Reason::DropTruncatedIp);
        expect(lb, prog, &long_payload, XDP_DROP, &long_payload, Reason::DropBadTotalLength);
        expect(lb, prog, &short_tcp, XDP_DROP, &short_tcp, Reason::DropTruncatedL4);
        expect(lb, prog, &not_v6, XDP_DROP, &not_v6, Reason::DropBadIpHeader);
        assert!(lb.conntrack6().unwrap().is_empty(), "{prog}");
    });
}

/// Without the IPv6 programs in `V6_PROGS` the tail call fails: the frame
/// passes untouched and is counted, IPv4 is served as before.
#[test]
fn root_ipv6_without_its_program_passes_untouched() {
    require_root!("root_ipv6_without_its_program_passes_untouched");
    on_each(XDP, |prog, lb| {
        lb.clear_v6_programs().unwrap();
        let syn = tcp6(CLIENT, WEB, FROM_CLIENT, TCP_SYN, b"");
        expect(lb, prog, &syn, XDP_PASS, &syn, Reason::PassIpv6NoProgram);
    });
}
