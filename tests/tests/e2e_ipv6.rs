//! IPv6 end to end through the data plane: real TCP connections and UDP
//! datagrams from a client namespace to an IPv6 VIP, translated by
//! `xdp_lb_local` -> `xdp_lb6_local` (the tail call) on the load balancer's
//! veths, answered by three backend namespaces, their replies translated
//! back. The object is loaded and its maps written the way the agent does
//! (the lab's `LbObject`); the agent's own IPv6 configuration is not there
//! yet (see the README's cluster tier section).
//!
//! ```text
//!  client ns  fd00:c::2 [to-lb] ==== [lb-c] fd00:c::1   LB ns (forwarding)
//!                           fd00:i::1 [lb-bi] ==== [to-lb] fd00:i::2  backend i (1..3)
//! ```
//! The VIP (2001:db8:ff::1) is on no interface: the client routes it via
//! the LB, the backends route the client's /64 via the LB. No default
//! routes; addresses `nodad`.
//!
//! Needs root: `cargo test -p lb-tests --release --test e2e_ipv6`.

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddrV6},
};

use lb_common::{Reason, PROG_LB_LOCAL};
use lb_lab::{
    netns::NetNs,
    packet::{IPPROTO_TCP, IPPROTO_UDP},
    require_root,
    testrun::LbObject,
    testrun6::ServiceSpec6,
    topology::{tcp_request, udp_request, BackendServers},
};

const VIP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc, 0, 0, 0, 0, 0, 2);
const LB_CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc, 0, 0, 0, 0, 0, 1);
const BACKENDS: u16 = 3;
const CONNECTIONS: usize = 300;
const DATAGRAMS: usize = 30;

fn backend_addr(i: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, i, 0, 0, 0, 0, 0, host)
}

/// Namespaces, veths and addresses; dropped, the namespaces go and their
/// veths with them.
struct Net {
    client: NetNs,
    lb: NetNs,
    /// Kept for their lifetime: each backend's namespace and servers.
    _backends: Vec<(NetNs, BackendServers)>,
}

fn wire(lb: &NetNs, lb_iface: &str, lb_addr: Ipv6Addr, node: &NetNs, node_addr: Ipv6Addr) {
    lb.exec("ip", &["link", "add", lb_iface, "type", "veth", "peer", "name", "to-lb", "netns", node.name()]);
    lb.exec("ip", &["-6", "addr", "add", &format!("{lb_addr}/64"), "dev", lb_iface, "nodad"]);
    node.exec("ip", &["-6", "addr", "add", &format!("{node_addr}/64"), "dev", "to-lb", "nodad"]);
    lb.exec("ip", &["link", "set", lb_iface, "up"]);
    node.exec("ip", &["link", "set", "to-lb", "up"]);
}

fn build() -> Net {
    let prefix = format!("lbt6-{}", std::process::id());
    let lb = NetNs::create(&format!("{prefix}-lb")).expect("LB namespace");
    lb.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
    let client = NetNs::create(&format!("{prefix}-c")).expect("client namespace");
    wire(&lb, "lb-c", LB_CLIENT, &client, CLIENT);
    client.exec("ip", &["-6", "route", "add", &format!("{VIP}/128"), "via", &LB_CLIENT.to_string()]);
    let mut backends = Vec::new();
    for i in 1..=BACKENDS {
        let ns = NetNs::create(&format!("{prefix}-b{i}")).expect("backend namespace");
        wire(&lb, &format!("lb-b{i}"), backend_addr(i, 1), &ns, backend_addr(i, 2));
        ns.exec("ip", &["-6", "route", "add", "fd00:c::/64", "via", &backend_addr(i, 1).to_string()]);
        let (tcp, udp) =
            (SocketAddrV6::new(backend_addr(i, 2), 8080, 0, 0), SocketAddrV6::new(backend_addr(i, 2), 5353, 0, 0));
        let servers = BackendServers::start(&ns, &format!("web-{i}"), tcp, udp);
        backends.push((ns, servers));
    }
    Net { client, lb, _backends: backends }
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
fn load(net: &Net) -> LbObject {
    net.lb.run(|| {
        let mut lb = LbObject::load().expect("load lb-ebpf");
        for i in std::iter::once("lb-c".to_owned()).chain((1..=BACKENDS).map(|i| format!("lb-b{i}"))) {
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
    let (shares, failures) = net.client.run(|| {
        let mut shares = BTreeMap::<String, usize>::new();
        let mut failures = Vec::new();
        for n in 0..CONNECTIONS {
            match tcp_request(web) {
                Ok((name, local)) => {
                    assert_eq!(local.ip(), CLIENT, "the client's own address");
                    *shares.entry(name).or_default() += 1;
                }
                Err(e) => failures.push(format!("connection {n}: {e}")),
            }
        }
        (shares, failures)
    });
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
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
