//! IPv6 end to end through the data plane: real TCP connections and UDP
//! datagrams from a client namespace to an IPv6 VIP, translated by
//! `xdp_lb_local` -> `xdp_lb6_local` (the tail call) on the load balancer's
//! veths, answered by three backend namespaces, their replies translated
//! back; a service with no backend refuses its clients at once (a reset,
//! an ICMPv6 port unreachable). The object is loaded and its maps written the way the agent does
//! (the lab's `LbObject`); `e2e_ipv6_agent` does the same through a real
//! agent.
//!
//! The topology is the lab's `net6`.
//!
//! Needs root: `cargo test -p lb-tests --release --test e2e_ipv6`.

use std::{io::ErrorKind, net::SocketAddrV6};

use lb_common::{Reason, PROG_LB_LOCAL};
use lb_lab::{
    net6::{backend_addr, Net6, BACKENDS, LB_CLIENT, VIP},
    packet::{IPPROTO_TCP, IPPROTO_UDP},
    require_root,
    testrun::LbObject,
    testrun6::ServiceSpec6,
    topology::{refused_tcp_and_udp, tcp_request, udp_request},
};

const CONNECTIONS: usize = 300;
const DATAGRAMS: usize = 30;

fn build() -> Net6 {
    Net6::build(&format!("lbt6-{}", std::process::id()))
}

fn service(proto: u8, id: u32, port: u16, backend_port: u16) -> ServiceSpec6 {
    let backends: Vec<(u32, SocketAddrV6)> = (1..=BACKENDS)
        .map(|i| (id * 10 + u32::from(i), SocketAddrV6::new(backend_addr(i, 2), backend_port, 0, 0)))
        .collect();
    ServiceSpec6::new(id, SocketAddrV6::new(VIP, port, 0, 0), proto, 0, &backends)
}

/// Loads the object in the LB namespace, attaches `xdp_lb_local` to every
/// veth there, and writes a TCP and a UDP service over the three backends
/// (each table slot in turn: thirds, as Maglev gives equal weights).
fn load(net: &Net6) -> LbObject {
    net.lb.run(|| {
        let mut lb = LbObject::load().expect("load lb-ebpf");
        for i in Net6::lb_interfaces() {
            lb.attach_generic(PROG_LB_LOCAL, &i).expect("attach");
        }
        lb.add_service6(&service(IPPROTO_TCP, 0, 80, 8080)).expect("TCP service");
        lb.add_service6(&service(IPPROTO_UDP, 1, 53, 5353)).expect("UDP service");
        lb
    })
}

#[test]
fn root_ipv6_tcp_and_udp_through_the_vip_reach_every_backend() {
    require_root!("root_ipv6_tcp_and_udp_through_the_vip_reach_every_backend");
    let net = build();
    let lb = load(&net);
    let web = SocketAddrV6::new(VIP, 80, 0, 0);
    // One first, so that a broken path fails in seconds with what moved.
    if let Err(e) = net.client.run(|| tcp_request(web)) {
        let moved: Vec<String> = lb
            .reasons()
            .unwrap()
            .iter()
            .zip(Reason::ALL)
            .filter(|(n, _)| **n > 0)
            .map(|(n, r)| format!("{}={n}", r.name()))
            .collect();
        panic!(
            "the first connection to {web} failed: {e}; reasons: {moved:?}; paths from the client: {:?}",
            lb.paths(2)
        );
    }
    let shares = net.connect(web, CONNECTIONS);
    assert_eq!(shares.len(), BACKENDS as usize, "every backend answered: {shares:?}");
    let fair = CONNECTIONS as f64 / f64::from(BACKENDS);
    for (name, n) in &shares {
        assert!((*n as f64 - fair).abs() <= fair * 0.25, "{name} got {n} of {CONNECTIONS}: {shares:?}");
    }

    let dns = SocketAddrV6::new(VIP, 53, 0, 0);
    let answers: Vec<String> = net
        .client
        .run(|| (0..DATAGRAMS).map(|n| udp_request(dns).unwrap_or_else(|e| panic!("datagram {n}: {e}"))).collect());
    assert!(answers.iter().all(|a| a.starts_with("web-")), "{answers:?}");

    let reasons = lb.reasons().unwrap();
    assert!(reasons[Reason::Forwarded as usize] >= (CONNECTIONS * 3 + DATAGRAMS) as u64, "{reasons:?}");
    assert!(reasons[Reason::ReplyTranslated as usize] >= (CONNECTIONS * 2 + DATAGRAMS) as u64, "{reasons:?}");
    assert_eq!(reasons[Reason::PassIpv6NoProgram as usize], 0);
    let new_flows: u64 = (1..=3).map(|i| lb.backend_counters(i).unwrap().new_flows).sum();
    assert_eq!(new_flows, CONNECTIONS as u64 + 1, "one new flow per connection (the first one's too)");
    // Neighbour discovery went through untouched: the LB's own address answers.
    let ping = net.client.exec_status("ping", &["-6", "-c", "1", "-W", "2", &LB_CLIENT.to_string()]);
    assert!(ping.0.success(), "ping the LB's own address: {}", ping.1);
    // The programs go first, then the namespaces.
    drop(lb);
    drop(net);
}

/// A service with no backend refuses new clients at once, from the XDP
/// program: a TCP connect to it fails with ECONNREFUSED (a reset, not the
/// 5 s timeout), a connected UDP socket gets ECONNREFUSED (an ICMPv6 port
/// unreachable, not the 2 s read timeout), both counted.
#[test]
fn root_ipv6_no_backend_refuses_clients_at_once() {
    require_root!("root_ipv6_no_backend_refuses_clients_at_once");
    let net = build();
    let mut lb = load(&net);
    let (tcp, udp) = (SocketAddrV6::new(VIP, 443, 0, 0), SocketAddrV6::new(VIP, 5300, 0, 0));
    net.lb.run(|| {
        lb.add_service6(&ServiceSpec6::new(2, tcp, IPPROTO_TCP, 0, &[])).expect("empty TCP service");
        lb.add_service6(&ServiceSpec6::new(3, udp, IPPROTO_UDP, 0, &[])).expect("empty UDP service");
    });
    let (tcp_err, took, udp_err) = net.client.run(move || refused_tcp_and_udp(tcp, udp));
    println!("MEASURED: IPv6 TCP connect refused after {took:?} ({tcp_err}); UDP: {udp_err}");
    let reasons = lb.reasons().unwrap();
    assert_eq!(tcp_err.kind(), ErrorKind::ConnectionRefused, "TCP: {tcp_err}; {reasons:?}");
    assert_eq!(udp_err.kind(), ErrorKind::ConnectionRefused, "UDP: {udp_err}; {reasons:?}");
    assert!(reasons[Reason::ResetNoBackend as usize] >= 1, "{reasons:?}");
    assert!(reasons[Reason::UnreachableNoBackend as usize] >= 1, "{reasons:?}");
    assert!(lb.conntrack6().unwrap().is_empty(), "a refused client opened a flow");
    drop(lb);
    drop(net);
}
