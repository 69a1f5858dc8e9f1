//! IPv6 through BPF_PROG_TEST_RUN: `xdp_lb` and `xdp_lb_local` hand an IPv6
//! frame to `xdp_lb6` / `xdp_lb6_local` (a tail call), which translate TCP
//! and UDP for an IPv6 service (destination NAT) and the backend's replies
//! back, answer a new flow to a service with no backend (a reset, an
//! ICMPv6 port unreachable), translate ICMPv6 errors about a flow
//! (`xdp_icmp6`, a tail call further), and leave other ICMPv6 (neighbour
//! discovery), extension headers and fragments untouched. Expected frames are built from scratch with the
//! lab's checksums (not lb-common's) and compared byte for byte; each case
//! runs on an object as fresh (reset, see `LbObject::shared`) in a
//! namespace of its own.
//!
//! Needs root: `cargo test -p lb-tests --release --test fixtures_ipv6`.

use std::net::{Ipv6Addr, SocketAddrV6};

use lb_common::{v6::ip6_raw, Reason, PROG_LB, PROG_LB_LOCAL, PROG_TC, SERVICE_F_WAKE};
use lb_lab::{
    checksum::{ones_complement_sum, pseudo_header_v6, verify_ipv6_frame},
    diff::frame_diff,
    netns::NetNsGuard,
    packet::*,
    require_root,
    testrun::{LbObject, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS, XDP_TX},
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

// ---- No usable backend: answered at once ------------------------------------

const EMPTY_TCP: SocketAddrV6 = SocketAddrV6::new(VIP, 443, 0, 0);
const EMPTY_UDP: SocketAddrV6 = SocketAddrV6::new(VIP, 5300, 0, 0);
const WAKING_TCP: SocketAddrV6 = SocketAddrV6::new(VIP, 7000, 0, 0);

/// The web and DNS services, and three without backends: TCP, UDP, and a
/// TCP one that wakes from zero.
fn on_each_with_empty(programs: &[&str], case: impl Fn(&str, &mut LbObject)) {
    on_each(programs, |prog, lb| {
        lb.add_service6(&ServiceSpec6::new(2, EMPTY_TCP, IPPROTO_TCP, 0, &[])).expect("empty TCP service");
        lb.add_service6(&ServiceSpec6::new(3, EMPTY_UDP, IPPROTO_UDP, 0, &[])).expect("empty UDP service");
        let waking = ServiceSpec6 { flags: SERVICE_F_WAKE, ..ServiceSpec6::new(4, WAKING_TCP, IPPROTO_TCP, 0, &[]) };
        lb.add_service6(&waking).expect("waking service");
        case(prog, lb);
    });
}

/// The reset from `from` to the client (`seq`, `ack`, `flags`, window 0,
/// no options), passed up with the MACs it arrived with.
fn reset6_from(from: SocketAddrV6, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
    let tcp = Tcp { seq, ack, window: 0, ..Tcp::new(from.port(), CLIENT.port(), flags) };
    let seg = tcp.build(Addrs::V6(*from.ip(), *CLIENT.ip()));
    ethernet(LB_MAC, CLIENT_MAC, ETH_P_IPV6, &Ipv6::new(*from.ip(), *CLIENT.ip(), IPPROTO_TCP).build(&seg))
}

/// `frame` sent back out of its interface (XDP_TX): to the client's MAC.
fn sent_back(mut frame: Vec<u8>) -> Vec<u8> {
    frame[0..6].copy_from_slice(&CLIENT_MAC);
    frame[6..12].copy_from_slice(&LB_MAC);
    frame
}

/// `expect`, and the output's checksums verified from scratch.
fn expect_answer(lb: &LbObject, prog: &str, input: &[u8], output: &[u8], reason: Reason) {
    verify_ipv6_frame(output).unwrap_or_else(|e| panic!("{prog}: {reason:?}: the expected frame: {e}"));
    expect(lb, prog, input, XDP_PASS, output, reason);
}

/// A SYN gets RST|ACK acknowledging it, a segment of a flow from before
/// (ACK, data, options) a bare RST at its ack, the frame cut to the 74
/// bytes of a reset; a reset is never answered; a SYN to a service that
/// wakes from zero is held. No flow is opened.
#[test]
fn root_ipv6_no_backend_tcp_gets_a_reset() {
    require_root!("root_ipv6_no_backend_tcp_gets_a_reset");
    on_each_with_empty(XDP, |prog, lb| {
        let syn = tcp6(CLIENT, EMPTY_TCP, FROM_CLIENT, TCP_SYN, b"");
        let rst_ack = reset6_from(EMPTY_TCP, 0, 0x1000_0001, TCP_RST | TCP_ACK);
        assert_eq!(rst_ack.len(), 74);
        expect_answer(lb, prog, &syn, &rst_ack, Reason::ResetNoBackend);

        let mid_flow = Tcp {
            options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
            ..Tcp::new(CLIENT.port(), EMPTY_TCP.port(), TCP_ACK | TCP_PSH).with_payload(b"GET / HTTP/1.1\r\n\r\n")
        };
        let seg = mid_flow.build(Addrs::V6(*CLIENT.ip(), VIP));
        let input = ethernet(LB_MAC, CLIENT_MAC, ETH_P_IPV6, &Ipv6::new(*CLIENT.ip(), VIP, IPPROTO_TCP).build(&seg));
        expect_answer(lb, prog, &input, &reset6_from(EMPTY_TCP, 0x2000_0000, 0, TCP_RST), Reason::ResetNoBackend);

        let rst = tcp6(CLIENT, EMPTY_TCP, FROM_CLIENT, TCP_RST | TCP_ACK, b"");
        expect(lb, prog, &rst, XDP_DROP, &rst, Reason::DropNoBackend);
        let waking = tcp6(CLIENT, WAKING_TCP, FROM_CLIENT, TCP_SYN, b"");
        expect(lb, prog, &waking, XDP_DROP, &waking, Reason::HeldWaking);
        assert!(lb.conntrack6().unwrap().is_empty(), "{prog}");
    });
}

/// UDP gets an ICMPv6 port unreachable (type 1, code 4) from the VIP
/// quoting the request's IPv6 and UDP headers, whatever its payload: 110
/// bytes. With the ingress interface in `EGRESS` the answer leaves by
/// XDP_TX, to the client's MAC.
#[test]
fn root_ipv6_no_backend_udp_gets_a_port_unreachable() {
    require_root!("root_ipv6_no_backend_udp_gets_a_port_unreachable");
    let unreachable = |input: &[u8]| {
        let message = icmp6_error(ICMP6_DEST_UNREACH, ICMP6_PORT_UNREACH, 0, &input[14..14 + 48], VIP, *CLIENT.ip());
        ethernet(LB_MAC, CLIENT_MAC, ETH_P_IPV6, &Ipv6::new(VIP, *CLIENT.ip(), IPPROTO_ICMPV6).build(&message))
    };
    on_each_with_empty(XDP, |prog, lb| {
        for payload in [&b""[..], &[0x5a; 1200][..]] {
            let input = udp6(CLIENT, EMPTY_UDP, FROM_CLIENT, Udp::new(0, 0, payload));
            let output = unreachable(&input);
            assert_eq!(output.len(), 110);
            expect_answer(lb, prog, &input, &output, Reason::UnreachableNoBackend);
        }
        // Sent back: `lo` stands in for the client's interface.
        lb.allow_egress(1).expect("lo in EGRESS");
        let syn = tcp6(CLIENT, EMPTY_TCP, FROM_CLIENT, TCP_SYN, b"");
        let run = lb.run_from(prog, &syn, 1).expect("test run from lo");
        assert_eq!(run.verdict, XDP_TX, "{prog}: sent back");
        let want = sent_back(reset6_from(EMPTY_TCP, 0, 0x1000_0001, TCP_RST | TCP_ACK));
        if let Some(diff) = frame_diff(&want, &run.data) {
            panic!("{prog}: the reset sent back is not the expected one\n{diff}");
        }
        assert!(lb.conntrack6().unwrap().is_empty(), "{prog}");
    });
}

// ---- ICMPv6 errors about a flow ---------------------------------------------

const ROUTER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1);
const ROUTER_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x09];
const MTU: u32 = 1280;

/// An ICMPv6 error of `icmp_type` from the router to `to`, quoting the
/// first `quoted` bytes of `packet` (a frame's IPv6 packet).
fn error6(icmp_type: u8, to: Ipv6Addr, packet: &[u8], quoted: usize) -> Vec<u8> {
    let rest = if icmp_type == ICMP6_PACKET_TOO_BIG { MTU } else { 0 };
    let message = icmp6_error(icmp_type, 0, rest, &packet[14..quoted.min(packet.len())], ROUTER, to);
    ethernet(LB_MAC, ROUTER_MAC, ETH_P_IPV6, &Ipv6::new(ROUTER, to, IPPROTO_ICMPV6).build(&message))
}

/// A flow opened (a SYN translated to its backend), then a packet too big
/// from a router on the path to the backend, about a translated segment
/// of 1400 bytes: the client gets it about the packet it sent, to the VIP
/// (quoted destination and port, quoted TCP checksum and ICMPv6 checksum
/// rewritten, each verified). A quote cut inside the TCP header, and a
/// destination unreachable, the same. One about a reply the backend sent
/// (to the VIP) goes to the backend, about the reply as it sent it. An
/// error about no flow, and an echo request, pass untouched.
#[test]
fn root_ipv6_icmp_errors_about_a_flow_are_translated() {
    require_root!("root_ipv6_icmp_errors_about_a_flow_are_translated");
    on_each(XDP, |prog, lb| {
        let (_, backend) = web().pick(CLIENT).expect("a backend");
        let syn = tcp6(CLIENT, WEB, FROM_CLIENT, TCP_SYN, b"");
        expect(lb, prog, &syn, XDP_PASS, &tcp6(CLIENT, backend, FROM_CLIENT, TCP_SYN, b""), Reason::Forwarded);

        let data = [0x42; 1400 - 40 - 20];
        let sent = tcp6(CLIENT, WEB, FROM_CLIENT, TCP_ACK, &data);
        let translated = tcp6(CLIENT, backend, FROM_CLIENT, TCP_ACK, &data);
        for (icmp_type, quoted) in
            [(ICMP6_PACKET_TOO_BIG, 1280 - 48), (ICMP6_PACKET_TOO_BIG, 14 + 48), (ICMP6_DEST_UNREACH, 200)]
        {
            let input = error6(icmp_type, *CLIENT.ip(), &translated, 14 + quoted);
            let output = error6(icmp_type, *CLIENT.ip(), &sent, 14 + quoted);
            expect_answer(lb, prog, &input, &output, Reason::IcmpForwarded);
        }

        // About a reply (VIP -> client), sent to the VIP: to the backend.
        let reply = tcp6(WEB, CLIENT, FROM_BACKEND, TCP_ACK, &data);
        let as_sent = tcp6(backend, CLIENT, FROM_BACKEND, TCP_ACK, &data);
        let input = error6(ICMP6_PACKET_TOO_BIG, VIP, &reply, 1280 - 48);
        let mut output = error6(ICMP6_PACKET_TOO_BIG, *backend.ip(), &as_sent, 1280 - 48);
        // Only the outer destination changed; the ICMPv6 checksum covers it.
        verify_ipv6_frame(&output).unwrap();
        output[..14].copy_from_slice(&input[..14]);
        expect_answer(lb, prog, &input, &output, Reason::IcmpForwarded);

        let other_client = SocketAddrV6::new(*CLIENT.ip(), 40001, 0, 0);
        let unknown =
            error6(ICMP6_PACKET_TOO_BIG, *CLIENT.ip(), &tcp6(other_client, backend, FROM_CLIENT, TCP_ACK, &data), 600);
        expect(lb, prog, &unknown, XDP_PASS, &unknown, Reason::PassIcmpNoFlow);
        let echo = {
            let message = icmp6_error(128, 0, 0x0001_0001, b"ping", ROUTER, *CLIENT.ip());
            ethernet(LB_MAC, ROUTER_MAC, ETH_P_IPV6, &Ipv6::new(ROUTER, *CLIENT.ip(), IPPROTO_ICMPV6).build(&message))
        };
        expect(lb, prog, &echo, XDP_PASS, &echo, Reason::PassNotTcpUdp);
    });
}
