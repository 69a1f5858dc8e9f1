//! Packet fixtures for IP-in-IP direct server return (`mode = "dsr-ipip"`),
//! run through BPF_PROG_TEST_RUN in a namespace wired as a load balancer
//! host (a client side and a backend side, as in `fixtures.rs`'s fast-path
//! fixtures), so that the program's FIB lookup to the backend answers.
//!
//! IPv6 services (IPv6-in-IPv6, next header 41) at the bottom, on the same
//! host wired in IPv6.
//!
//! The expected frame is built here from scratch: Ethernet to the backend's
//! MAC, an outer IPv4 header whose checksum the harness computes (not
//! `lb_common`), and the client's packet after it, byte for byte as sent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use lb_agent::adapters::dataplane::netdev::if_index;
use lb_common::{Reason, MODE_DSR_IPIP, PROG_LB, PROG_LB_LOCAL, PROG_TC};
use lb_lab::{
    checksum::with_partial_l4_checksum,
    command::run_cmd,
    diff::frame_diff,
    netns::NetNsGuard,
    packet::*,
    root::skip_without_root,
    testrun::{check_reason_delta, LbObject, ServiceSpec, TC_ACT_SHOT, XDP_DROP, XDP_REDIRECT},
    testrun6::ServiceSpec6,
};

const LB_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0x02];
const BACKEND_MAC: Mac = [0x02, 0, 0, 0, 0, 0x03];
const LB_BACKEND_SIDE_MAC: Mac = [0x02, 0, 0, 0, 0x01, 0x01];
/// The load balancer's address on the backend side: the outer source.
const SOURCE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 254);
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 10), 80);
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 168, 1, 10), 40000);
const BACKENDS: [(u32, SocketAddrV4); 2] =
    [(1, SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 80)), (2, SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 2), 80))];

fn service() -> ServiceSpec {
    ServiceSpec::new(0, VIP, IPPROTO_TCP, 1, &BACKENDS)
}

/// A client packet to the VIP: DF set, TOS 0x10, TTL 61 (so that one
/// copied or decremented by mistake shows).
fn client_syn(payload: &[u8]) -> Vec<u8> {
    let ip = Ipv4 { tos: 0x10, ttl: 61, flags_frag: IP_DF, ..Ipv4::new(*CLIENT.ip(), *VIP.ip(), IPPROTO_TCP) };
    tcp_frame((LB_MAC, CLIENT_MAC), &ip, &Tcp::new(CLIENT.port(), VIP.port(), TCP_SYN).with_payload(payload))
}

/// `frame` inside an outer header to `backend` (built by the harness).
fn encapsulated(frame: &[u8], backend: Ipv4Addr) -> Vec<u8> {
    ipip_encapsulated(frame, (BACKEND_MAC, LB_BACKEND_SIDE_MAC), SOURCE, backend)
}

/// The host: a client side (192.168.1.1/24) and a backend side
/// (10.1.0.254/24, MTU `mtu`) whose backends have neighbour entries when
/// `neighbours`; both in `EGRESS`. Returns the client side's ifindex.
fn wire_host(lb: &mut LbObject, mtu: u32, neighbours: bool) -> u32 {
    let backends: Vec<IpAddr> = BACKENDS.iter().map(|(_, b)| IpAddr::V4(*b.ip())).collect();
    let sides = ["192.168.1.1/24", "10.1.0.254/24"];
    wire(lb, sides, mtu, "net.ipv4.ip_forward=1", if neighbours { &backends } else { &[] })
}

/// A client side `lb-c` and a backend side `lb-b` (MTU `mtu`) with the
/// addresses `sides`, both in `EGRESS`, forwarding on (`forwarding`), and
/// neighbour entries for `neighbours` on the backend side. Returns the
/// client side's ifindex.
fn wire(lb: &mut LbObject, sides: [&str; 2], mtu: u32, forwarding: &str, neighbours: &[IpAddr]) -> u32 {
    let mac = |m: Mac| m.map(|b| format!("{b:02x}")).join(":");
    for ((iface, m), addr) in [("lb-c", LB_MAC), ("lb-b", LB_BACKEND_SIDE_MAC)].into_iter().zip(sides) {
        let peer = format!("{iface}-peer");
        run_cmd("ip", &["link", "add", iface, "address", &mac(m), "type", "veth", "peer", "name", &peer]);
        run_cmd("ip", &["link", "set", &peer, "up"]);
        run_cmd("ip", &["link", "set", iface, "up"]);
        // IPv6: no duplicate address detection, usable at once.
        let nodad: &[&str] = if addr.contains(':') { &["nodad"] } else { &[] };
        run_cmd("ip", &[&["addr", "add", addr, "dev", iface][..], nodad].concat());
        lb.allow_egress(if_index(iface).expect("the side's ifindex")).expect("EGRESS");
    }
    run_cmd("ip", &["link", "set", "lb-b", "mtu", &mtu.to_string()]);
    run_cmd("sysctl", &["-qw", forwarding]);
    for b in neighbours {
        run_cmd("ip", &["neigh", "replace", &b.to_string(), "lladdr", &mac(BACKEND_MAC), "dev", "lb-b"]);
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

impl Case {
    /// `input` encapsulated (`output`) and redirected, MTU 1500, neighbours known.
    fn sent(program: &'static str, output: Vec<u8>, input: Vec<u8>) -> Case {
        let (verdict, reason) = (XDP_REDIRECT, Reason::Forwarded);
        Case { program, input, mtu: 1500, neighbours: true, verdict, output: Some(output), reason }
    }

    /// `input` dropped untouched at XDP for `reason`.
    fn dropped(program: &'static str, input: Vec<u8>, mtu: u32, neighbours: bool, reason: Reason) -> Case {
        Case { program, input, mtu, neighbours, verdict: XDP_DROP, output: None, reason }
    }
}

fn run(name: &str, c: Case) {
    run_with(name, c, |lb, mtu, neighbours| {
        lb.add_service(&service()).expect("write the service");
        lb.write_service(&service(), MODE_DSR_IPIP, SOURCE).expect("make it dsr-ipip");
        wire_host(lb, mtu, neighbours)
    })
}

/// `c` on an object that `setup` (with the case's MTU and neighbours)
/// gives its services and host; `setup` returns the ingress ifindex.
fn run_with(name: &str, c: Case, setup: impl FnOnce(&mut LbObject, u32, bool) -> u32) {
    if skip_without_root(name) {
        return;
    }
    let _ns = NetNsGuard::new().expect("create a network namespace");
    let mut lb = LbObject::load().expect("load lb-ebpf and verify its programs");
    let ingress = setup(&mut lb, c.mtu, c.neighbours);
    let before = lb.reasons().unwrap();
    let out = if c.program == PROG_TC { lb.run(PROG_TC, &c.input) } else { lb.run_from(c.program, &c.input, ingress) }
        .expect("run the packet");
    assert_eq!(out.verdict, c.verdict, "{name}: verdict");
    let want = c.output.unwrap_or(c.input);
    if let Some(diff) = frame_diff(&want, &out.data) {
        panic!("{name}: output frame is not the expected one\n{diff}");
    }
    check_reason_delta(&before, &lb.reasons().unwrap(), c.reason, 1).unwrap_or_else(|e| panic!("{name}: {e:#}"));
}

fn picked() -> Ipv4Addr {
    *service().pick(CLIENT).expect("a backend").1.ip()
}

#[test]
fn root_dsr_syn_is_encapsulated_to_its_backend_inner_untouched() {
    for program in [PROG_LB, PROG_LB_LOCAL] {
        let input = client_syn(b"");
        run(
            "root_dsr_syn_is_encapsulated_to_its_backend_inner_untouched",
            Case::sent(program, encapsulated(&input, picked()), input),
        );
    }
}

#[test]
fn root_dsr_payload_that_would_exceed_the_mtu_is_dropped() {
    // 1480 bytes of IPv4 fit a 1500 MTU; 20 more do not.
    let input = client_syn(&[7u8; 1480 - 40]);
    let case = Case {
        program: PROG_LB,
        input,
        mtu: 1480 + 19,
        neighbours: true,
        verdict: XDP_DROP,
        output: None,
        reason: Reason::DropDsrTooBig,
    };
    run("root_dsr_payload_that_would_exceed_the_mtu_is_dropped", case);
}

#[test]
fn root_dsr_without_a_neighbour_entry_is_dropped_not_passed_bare() {
    let case = Case {
        program: PROG_LB,
        input: client_syn(b""),
        mtu: 1500,
        neighbours: false,
        verdict: XDP_DROP,
        output: None,
        reason: Reason::DropDsrNoRoute,
    };
    run("root_dsr_without_a_neighbour_entry_is_dropped_not_passed_bare", case);
}

#[test]
fn root_dsr_is_not_done_at_tc_nor_on_a_partial_checksum() {
    let case = Case {
        program: PROG_TC,
        input: client_syn(b""),
        mtu: 1500,
        neighbours: true,
        verdict: TC_ACT_SHOT,
        output: None,
        reason: Reason::DropDsrUnsupported,
    };
    run("root_dsr_is_not_done_at_tc_nor_on_a_partial_checksum", case);
    let input = with_partial_l4_checksum(client_syn(b""));
    let case = Case {
        program: PROG_LB_LOCAL,
        input,
        mtu: 1500,
        neighbours: true,
        verdict: XDP_DROP,
        output: None,
        reason: Reason::DropDsrUnsupported,
    };
    run("root_dsr_is_not_done_at_tc_nor_on_a_partial_checksum", case);
}

// IPv6 services: IPv6-in-IPv6.

/// The load balancer's address on the backend side: the outer source.
const SOURCE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0xfe);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);
const WEB6: SocketAddrV6 = SocketAddrV6::new(VIP6, 80, 0, 0);
const DNS6: SocketAddrV6 = SocketAddrV6::new(VIP6, 53, 0, 0);
const CLIENT6: SocketAddrV6 = SocketAddrV6::new(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x10), 40000, 0, 0);
const BACKENDS6: [(u32, SocketAddrV6); 2] = [
    (1, SocketAddrV6::new(Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1), 80, 0, 0)),
    (2, SocketAddrV6::new(Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2), 80, 0, 0)),
];
const DNS_BACKENDS: [(u32, SocketAddrV6); 1] =
    [(3, SocketAddrV6::new(Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1), 53, 0, 0))];

fn web6() -> ServiceSpec6 {
    ServiceSpec6::new(0, WEB6, IPPROTO_TCP, 1, &BACKENDS6)
}

fn dns6() -> ServiceSpec6 {
    ServiceSpec6::new(1, DNS6, IPPROTO_UDP, 0, &DNS_BACKENDS)
}

/// A client's TCP SYN to the VIP, hop limit 61, traffic class 0xb8 and flow
/// label 0x12345 (so that one dropped, or a hop limit decremented, shows).
fn client_syn6(payload: &[u8]) -> Vec<u8> {
    let seg =
        Tcp::new(CLIENT6.port(), WEB6.port(), TCP_SYN).with_payload(payload).build(Addrs::V6(*CLIENT6.ip(), VIP6));
    marked(ethernet(
        LB_MAC,
        CLIENT_MAC,
        ETH_P_IPV6,
        &Ipv6 { hop_limit: 61, ..Ipv6::new(*CLIENT6.ip(), VIP6, IPPROTO_TCP) }.build(&seg),
    ))
}

fn client_udp() -> Vec<u8> {
    let d = Udp::new(CLIENT6.port(), DNS6.port(), b"query").build(Addrs::V6(*CLIENT6.ip(), VIP6));
    marked(ethernet(LB_MAC, CLIENT_MAC, ETH_P_IPV6, &Ipv6::new(*CLIENT6.ip(), VIP6, IPPROTO_UDP).build(&d)))
}

fn marked(mut frame: Vec<u8>) -> Vec<u8> {
    frame[14..18].copy_from_slice(&[0x6b, 0x81, 0x23, 0x45]);
    frame
}

fn wire_host6(lb: &mut LbObject, mtu: u32, neighbours: bool) -> u32 {
    for spec in [web6(), dns6()] {
        lb.add_service6(&spec).expect("write the service");
        lb.write_service6(&spec, MODE_DSR_IPIP, SOURCE6).expect("make it dsr-ipip");
    }
    let backends: Vec<IpAddr> = BACKENDS6.iter().map(|(_, b)| IpAddr::V6(*b.ip())).collect();
    let sides = ["fd00:1::1/64", "fd00:2::fe/64"];
    wire(lb, sides, mtu, "net.ipv6.conf.all.forwarding=1", if neighbours { &backends } else { &[] })
}

fn encapsulated6(frame: &[u8], backend: Ipv6Addr) -> Vec<u8> {
    ip6ip6_encapsulated(frame, (BACKEND_MAC, LB_BACKEND_SIDE_MAC), SOURCE6, backend)
}

#[test]
fn root_dsr6_tcp_and_udp_are_encapsulated_to_their_backend_inner_untouched() {
    let name = "root_dsr6_tcp_and_udp_are_encapsulated_to_their_backend_inner_untouched";
    let backend = *web6().pick(CLIENT6).expect("a backend").1.ip();
    for program in [PROG_LB, PROG_LB_LOCAL] {
        let input = client_syn6(b"");
        run6(name, Case::sent(program, encapsulated6(&input, backend), input));
    }
    let input = client_udp();
    run6(name, Case::sent(PROG_LB, encapsulated6(&input, *DNS_BACKENDS[0].1.ip()), input));
}

#[test]
fn root_dsr6_packet_too_big_once_40_bytes_longer_is_dropped_and_counted() {
    let name = "root_dsr6_packet_too_big_once_40_bytes_longer_is_dropped_and_counted";
    // 1460 bytes of IPv6 fit an MTU of 1500 with the outer header; one less does not.
    let input = client_syn6(&[7u8; 1460 - 60]);
    run6(name, Case::dropped(PROG_LB, input.clone(), 1499, true, Reason::DropDsrTooBig));
    let backend = *web6().pick(CLIENT6).expect("a backend").1.ip();
    run6(name, Case::sent(PROG_LB, encapsulated6(&input, backend), input));
}

#[test]
fn root_dsr6_without_a_neighbour_entry_or_with_a_partial_checksum_is_dropped() {
    let name = "root_dsr6_without_a_neighbour_entry_or_with_a_partial_checksum_is_dropped";
    run6(name, Case::dropped(PROG_LB, client_syn6(b""), 1500, false, Reason::DropDsrNoRoute));
    let input = partial6(client_syn6(b""));
    run6(name, Case::dropped(PROG_LB_LOCAL, input, 1500, true, Reason::DropDsrUnsupported));
}

/// The frame with its TCP checksum replaced by the pseudo-header sum, as a
/// local stack hands it over with checksum offload (CHECKSUM_PARTIAL).
fn partial6(mut frame: Vec<u8>) -> Vec<u8> {
    use lb_lab::checksum::{ones_complement_sum, pseudo_header_v6};
    let len = frame.len() - 54;
    let sum = ones_complement_sum(&pseudo_header_v6(*CLIENT6.ip(), VIP6, IPPROTO_TCP, len as u32));
    frame[54 + 16..54 + 18].copy_from_slice(&sum.to_be_bytes());
    frame
}

fn run6(name: &str, c: Case) {
    run_with(name, c, wire_host6)
}
