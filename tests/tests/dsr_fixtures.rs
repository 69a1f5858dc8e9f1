//! Packet fixtures for IP-in-IP direct server return (`mode = "dsr-ipip"`),
//! run through BPF_PROG_TEST_RUN in a namespace wired as a load balancer
//! host (a client side and a backend side, as in `fixtures.rs`'s fast-path
//! fixtures), so that the program's FIB lookup to the backend answers.
//!
//! The expected frame is built here from scratch: Ethernet to the backend's
//! MAC, an outer IPv4 header whose checksum the harness computes (not
//! `lb_common`), and the client's packet after it, byte for byte as sent.

use std::net::{Ipv4Addr, SocketAddrV4};

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
    let mac = |m: Mac| m.map(|b| format!("{b:02x}")).join(":");
    for (iface, m, addr) in [("lb-c", LB_MAC, "192.168.1.1/24"), ("lb-b", LB_BACKEND_SIDE_MAC, "10.1.0.254/24")] {
        let peer = format!("{iface}-peer");
        run_cmd("ip", &["link", "add", iface, "address", &mac(m), "type", "veth", "peer", "name", &peer]);
        run_cmd("ip", &["link", "set", &peer, "up"]);
        run_cmd("ip", &["link", "set", iface, "up"]);
        run_cmd("ip", &["addr", "add", addr, "dev", iface]);
        lb.allow_egress(if_index(iface).expect("the side's ifindex")).expect("EGRESS");
    }
    run_cmd("ip", &["link", "set", "lb-b", "mtu", &mtu.to_string()]);
    run_cmd("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    if neighbours {
        for (_, b) in BACKENDS {
            run_cmd("ip", &["neigh", "replace", &b.ip().to_string(), "lladdr", &mac(BACKEND_MAC), "dev", "lb-b"]);
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
    lb.add_service(&service()).expect("write the service");
    lb.write_service(&service(), MODE_DSR_IPIP, SOURCE).expect("make it dsr-ipip");
    let ingress = wire_host(&mut lb, c.mtu, c.neighbours);
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
        let output = Some(encapsulated(&input, picked()));
        let case = Case {
            program,
            input,
            mtu: 1500,
            neighbours: true,
            verdict: XDP_REDIRECT,
            output,
            reason: Reason::Forwarded,
        };
        run("root_dsr_syn_is_encapsulated_to_its_backend_inner_untouched", case);
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
