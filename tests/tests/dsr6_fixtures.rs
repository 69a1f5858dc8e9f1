//! Packet fixtures for IP-in-IP direct server return of IPv6 services
//! (`mode = "dsr-ipip"`, IPv6-in-IPv6), run through BPF_PROG_TEST_RUN in a
//! namespace wired as a load balancer host (a client side and a backend
//! side), so that the program's FIB lookup (AF_INET6) to the backend
//! answers. The expected frame is built here from scratch (Ethernet to the
//! backend's MAC, an outer IPv6 header, the client's packet byte for byte).
//!
//! Needs root: `cargo test -p lb-tests --release --test dsr6_fixtures`.

use std::net::{Ipv6Addr, SocketAddrV6};

use lb_agent::adapters::dataplane::netdev::if_index;
use lb_common::{Reason, MODE_DSR_IPIP, PROG_LB, PROG_LB_LOCAL};
use lb_lab::{
    command::run_cmd,
    diff::frame_diff,
    netns::NetNsGuard,
    packet::*,
    root::skip_without_root,
    testrun::{check_reason_delta, LbObject, XDP_DROP, XDP_REDIRECT},
    testrun6::ServiceSpec6,
};

const LB_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];
const BACKEND_MAC: Mac = [0x02, 0, 0, 0, 0, 0x03];
const LB_BACKEND_SIDE_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x01];
/// The load balancer's address on the backend side: the outer source.
const SOURCE: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0xfe);
const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);
const WEB: SocketAddrV6 = SocketAddrV6::new(VIP, 80, 0, 0);
const DNS: SocketAddrV6 = SocketAddrV6::new(VIP, 53, 0, 0);
const CLIENT: SocketAddrV6 = SocketAddrV6::new(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x10), 40000, 0, 0);
const BACKENDS: [(u32, SocketAddrV6); 2] = [
    (1, SocketAddrV6::new(Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1), 80, 0, 0)),
    (2, SocketAddrV6::new(Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2), 80, 0, 0)),
];
const DNS_BACKENDS: [(u32, SocketAddrV6); 1] =
    [(3, SocketAddrV6::new(Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1), 53, 0, 0))];

fn web() -> ServiceSpec6 {
    ServiceSpec6::new(0, WEB, IPPROTO_TCP, 1, &BACKENDS)
}

fn dns() -> ServiceSpec6 {
    ServiceSpec6::new(1, DNS, IPPROTO_UDP, 0, &DNS_BACKENDS)
}

/// A client's TCP SYN to the VIP, hop limit 61, traffic class 0xb8 and flow
/// label 0x12345 (so that one dropped, or a hop limit decremented, shows).
fn client_syn(payload: &[u8]) -> Vec<u8> {
    let seg = Tcp::new(CLIENT.port(), WEB.port(), TCP_SYN).with_payload(payload).build(Addrs::V6(*CLIENT.ip(), VIP));
    marked(ethernet(LB_MAC, CLIENT_MAC, ETH_P_IPV6, &Ipv6 { hop_limit: 61, ..Ipv6::new(*CLIENT.ip(), VIP, IPPROTO_TCP) }.build(&seg)))
}

fn client_udp() -> Vec<u8> {
    let d = Udp::new(CLIENT.port(), DNS.port(), b"query").build(Addrs::V6(*CLIENT.ip(), VIP));
    marked(ethernet(LB_MAC, CLIENT_MAC, ETH_P_IPV6, &Ipv6::new(*CLIENT.ip(), VIP, IPPROTO_UDP).build(&d)))
}

fn marked(mut frame: Vec<u8>) -> Vec<u8> {
    frame[14..18].copy_from_slice(&[0x6b, 0x81, 0x23, 0x45]);
    frame
}

/// The host: a client side (fd00:1::1/64) and a backend side (fd00:2::fe/64,
/// MTU `mtu`) whose backends have neighbour entries when `neighbours`; both
/// in `EGRESS`, IPv6 forwarding on. Returns the client side's ifindex.
fn wire_host(lb: &mut LbObject, mtu: u32, neighbours: bool) -> u32 {
    let mac = |m: Mac| m.map(|b| format!("{b:02x}")).join(":");
    for (iface, m, addr) in [("lb-c", LB_MAC, "fd00:1::1/64"), ("lb-b", LB_BACKEND_SIDE_MAC, "fd00:2::fe/64")] {
        let peer = format!("{iface}-peer");
        run_cmd("ip", &["link", "add", iface, "address", &mac(m), "type", "veth", "peer", "name", &peer]);
        run_cmd("ip", &["link", "set", &peer, "up"]);
        run_cmd("ip", &["link", "set", iface, "up"]);
        run_cmd("ip", &["addr", "add", addr, "dev", iface, "nodad"]);
        lb.allow_egress(if_index(iface).expect("the side's ifindex")).expect("EGRESS");
    }
    run_cmd("ip", &["link", "set", "lb-b", "mtu", &mtu.to_string()]);
    run_cmd("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    if neighbours {
        for (_, b) in BACKENDS {
            run_cmd("ip", &["-6", "neigh", "replace", &b.ip().to_string(), "lladdr", &mac(BACKEND_MAC), "dev", "lb-b"]);
        }
    }
    if_index("lb-c").expect("the client side's ifindex")
}

struct Case {
    program: &'static str,
    input: Vec<u8>,
    mtu: u32,
    neighbours: bool,
    verdict: u32,
    /// `None`: the frame must come out as it went in.
    output: Option<Vec<u8>>,
    reason: Reason,
}

fn run(name: &str, c: Case) {
    if skip_without_root(name) {
        return;
    }
    let _ns = NetNsGuard::new().expect("create a network namespace");
    let mut lb = LbObject::load().expect("load lb-ebpf and verify its programs");
    for spec in [web(), dns()] {
        lb.add_service6(&spec).expect("write the service");
        lb.write_service6(&spec, MODE_DSR_IPIP, SOURCE).expect("make it dsr-ipip");
    }
    let ingress = wire_host(&mut lb, c.mtu, c.neighbours);
    let before = lb.reasons().unwrap();
    let out = lb.run_from(c.program, &c.input, ingress).expect("run the packet");
    assert_eq!(out.verdict, c.verdict, "{name}: verdict");
    let want = c.output.unwrap_or(c.input);
    if let Some(diff) = frame_diff(&want, &out.data) {
        panic!("{name}: output frame is not the expected one\n{diff}");
    }
    check_reason_delta(&before, &lb.reasons().unwrap(), c.reason, 1).unwrap_or_else(|e| panic!("{name}: {e:#}"));
}

fn encapsulated(frame: &[u8], backend: Ipv6Addr) -> Vec<u8> {
    ip6ip6_encapsulated(frame, (BACKEND_MAC, LB_BACKEND_SIDE_MAC), SOURCE, backend)
}

#[test]
fn root_dsr6_tcp_and_udp_are_encapsulated_to_their_backend_inner_untouched() {
    let backend = *web().pick(CLIENT).expect("a backend").1.ip();
    for program in [PROG_LB, PROG_LB_LOCAL] {
        let input = client_syn(b"");
        let output = Some(encapsulated(&input, backend));
        let case =
            Case { program, input, mtu: 1500, neighbours: true, verdict: XDP_REDIRECT, output, reason: Reason::Forwarded };
        run("root_dsr6_tcp_and_udp_are_encapsulated_to_their_backend_inner_untouched", case);
    }
    let input = client_udp();
    let output = Some(encapsulated(&input, *DNS_BACKENDS[0].1.ip()));
    let case =
        Case { program: PROG_LB, input, mtu: 1500, neighbours: true, verdict: XDP_REDIRECT, output, reason: Reason::Forwarded };
    run("root_dsr6_tcp_and_udp_are_encapsulated_to_their_backend_inner_untouched", case);
}

#[test]
fn root_dsr6_packet_too_big_once_40_bytes_longer_is_dropped_and_counted() {
    // 1460 bytes of IPv6 fit an MTU of 1500 with the outer header; one less does not.
    let input = client_syn(&[7u8; 1460 - 60]);
    let case = Case {
        program: PROG_LB,
        input: input.clone(),
        mtu: 1499,
        neighbours: true,
        verdict: XDP_DROP,
        output: None,
        reason: Reason::DropDsrTooBig,
    };
    run("root_dsr6_packet_too_big_once_40_bytes_longer_is_dropped_and_counted", case);
    let backend = *web().pick(CLIENT).expect("a backend").1.ip();
    let output = Some(encapsulated(&input, backend));
    let case =
        Case { program: PROG_LB, input, mtu: 1500, neighbours: true, verdict: XDP_REDIRECT, output, reason: Reason::Forwarded };
    run("root_dsr6_packet_too_big_once_40_bytes_longer_is_dropped_and_counted", case);
}

#[test]
fn root_dsr6_without_a_neighbour_entry_or_with_a_partial_checksum_is_dropped() {
    let case = Case {
        program: PROG_LB,
        input: client_syn(b""),
        mtu: 1500,
        neighbours: false,
        verdict: XDP_DROP,
        output: None,
        reason: Reason::DropDsrNoRoute,
    };
    run("root_dsr6_without_a_neighbour_entry_or_with_a_partial_checksum_is_dropped", case);
    let case = Case {
        program: PROG_LB_LOCAL,
        input: partial(client_syn(b"")),
        mtu: 1500,
        neighbours: true,
        verdict: XDP_DROP,
        output: None,
        reason: Reason::DropDsrUnsupported,
    };
    run("root_dsr6_without_a_neighbour_entry_or_with_a_partial_checksum_is_dropped", case);
}

/// The frame with its TCP checksum replaced by the pseudo-header sum, as a
/// local stack hands it over with checksum offload (CHECKSUM_PARTIAL).
fn partial(mut frame: Vec<u8>) -> Vec<u8> {
    use lb_lab::checksum::{ones_complement_sum, pseudo_header_v6};
    let len = frame.len() - 54;
    let sum = ones_complement_sum(&pseudo_header_v6(*CLIENT.ip(), VIP, IPPROTO_TCP, len as u32));
    frame[54 + 16..54 + 18].copy_from_slice(&sum.to_be_bytes());
    frame
}
