//! The VIP is the load balancer host's own address, the default way to
//! deploy on one host: clients on the host's subnet reach
//! `host-address:port` with no route of their own, and translated packets
//! leave on the fast path (bpf_fib_lookup + XDP_REDIRECT/XDP_TX), because a
//! reply translated back to a local address would be dropped by the kernel
//! as a martian if it passed up.
//!
//! ```text
//!  client ns 10.200.0.2 ==== [lb-c] 10.200.0.1 = the VIP (LB ns, "the host")
//!                                   [lb-b1] ==== web-1 10.200.1.2
//!                                   [lb-b2] ==== web-2 10.200.2.2
//! ```
//!
//! The client and backend ends have GRO on (so a redirected frame can be
//! received on a veth) and tx checksum offload off (complete checksums: a
//! partial one never takes the fast path).
//!
//! Needs root and a built agent: `cargo build --release -p lb-agent && cargo
//! test -p lb-tests --release --test e2e_host -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    net::{SocketAddrV4, TcpListener},
    thread,
    time::Duration,
};

use lb_lab::{
    agent::Agent,
    cgroup::socket_lb_toml,
    require_root,
    topology::{
        tcp_request, udp_request, Options, Topology, BACKEND_TCP_PORT, BACKEND_UDP_PORT, CLIENT_ADDR, LB_CLIENT_ADDR,
        LB_CLIENT_IFACE, NODE_IFACE,
    },
};
use serde_json::Value;

const WEB_PORT: u16 = 80;
const DNS_PORT: u16 = 53;

/// The host-address deployment: two backends, the VIP = the LB's own
/// address on the client side, the fast path on for every interface.
fn start() -> (Topology, Agent) {
    let mut options = Options::with_backends(&["web-1", "web-2"]);
    options.node_tx_csum_offload = false;
    let topo = Topology::build(options);
    for ns in std::iter::once(&topo.client).chain(topo.backends.iter().map(|b| &b.ns)) {
        ns.exec("ethtool", &["-K", NODE_IFACE, "gro", "on"]);
    }
    topo.write_raw_config(&host_config(&topo));
    let agent = topo.start_agent();
    (topo, agent)
}

fn host_config(topo: &Topology) -> String {
    let interfaces = topo.lb_interfaces();
    let list = interfaces.iter().map(|i| format!("{i:?}")).collect::<Vec<_>>().join(", ");
    let mut out = String::new();
    for (name, proto, port, backend_port) in
        [("web", "tcp", WEB_PORT, BACKEND_TCP_PORT), ("dns", "udp", DNS_PORT, BACKEND_UDP_PORT)]
    {
        out += &format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{LB_CLIENT_ADDR}\"\nport = {port}\nprotocol = \"{proto}\"\ninterfaces = [{list}]\n"
        );
        for b in &topo.backends {
            out += &format!("[[service.backend]]\naddress = \"{}:{backend_port}\"\n", b.addr);
        }
    }
    for i in &interfaces {
        out += &format!("[interface.{i:?}]\nchecksums = \"complete\"\nfast_path = \"on\"\n");
    }
    out + &socket_lb_toml(None)
}

fn status(agent: &Agent) -> Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "lb-agent status --json failed: {out:?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json: {e}:\n{}", out.stdout))
}

/// Packets per path summed over every interface, from `status --json`.
fn paths(agent: &Agent) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for i in status(agent)["agent"]["interfaces"].as_array().expect("interfaces") {
        assert_eq!(i["fast_path"], true, "{i}");
        for p in i["paths"].as_array().expect("paths") {
            *out.entry(p["path"].as_str().expect("path").to_owned()).or_insert(0) += p["packets"].as_u64().expect("n");
        }
    }
    out
}

fn fast(paths: &BTreeMap<String, u64>) -> u64 {
    ["redirected", "tx_back", "replied_flow_macs"].iter().map(|p| paths.get(*p).copied().unwrap_or(0)).sum()
}

fn passed(paths: &BTreeMap<String, u64>) -> u64 {
    paths.iter().filter(|(p, _)| p.starts_with("pass_")).map(|(_, n)| n).sum()
}

#[test]
fn root_host_address_vip_answers_tcp_evenly_on_the_fast_path() {
    require_root!("root_host_address_vip_answers_tcp_evenly_on_the_fast_path");
    let (topo, agent) = start();
    let vip = SocketAddrV4::new(LB_CLIENT_ADDR, WEB_PORT);
    let (counts, failures) = topo.client.run(move || {
        let (mut counts, mut failures) = (BTreeMap::<String, usize>::new(), Vec::new());
        for i in 0..1000 {
            match tcp_request(vip) {
                Ok((backend, _)) => *counts.entry(backend).or_insert(0) += 1,
                Err(e) => failures.push(format!("connection {i}: {e}")),
            }
        }
        (counts, failures)
    });
    let p = paths(&agent);
    println!("MEASURED: 1000 connections to the host address: {counts:?}; paths {p:?}");
    assert!(
        failures.is_empty(),
        "{} of 1000 failed, first: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        agent.log_tail(30)
    );
    assert_eq!(counts.len(), 2, "{counts:?}");
    for (b, n) in &counts {
        assert!((375..=625).contains(n), "{b} got {n} of 1000, not within 25% of 500: {counts:?}");
    }
    // Every translated packet of these connections took the fast path
    // (the first ones may have waited for a neighbour).
    assert!(fast(&p) >= 6 * 1000, "too few fast-path packets: {p:?}");
    assert!(passed(&p) <= 10, "packets passed up: {p:?}");
    assert!(topo.csum_errors().is_empty(), "checksum errors: {:?}", topo.csum_errors());
}

#[test]
fn root_host_address_vip_answers_udp() {
    require_root!("root_host_address_vip_answers_udp");
    let (topo, agent) = start();
    let vip = SocketAddrV4::new(LB_CLIENT_ADDR, DNS_PORT);
    let answers = topo.client.run(move || (0..50).map(|_| udp_request(vip)).collect::<Vec<_>>());
    let failed: Vec<String> = answers.iter().filter_map(|a| a.as_ref().err().map(|e| e.to_string())).collect();
    assert!(failed.is_empty(), "{} of 50 UDP requests failed: {failed:?}\n{}", failed.len(), agent.log_tail(30));
    let names: std::collections::BTreeSet<&str> = answers.iter().filter_map(|a| a.as_deref().ok()).collect();
    assert!(names.iter().all(|n| n.starts_with("web-")), "{names:?}");
    // Both directions of (nearly) every request: only a flow's first
    // packets may wait for a neighbour.
    assert!(fast(&paths(&agent)) >= 90, "{:?}", paths(&agent));
}

#[test]
fn root_host_address_other_ports_are_the_hosts() {
    require_root!("root_host_address_other_ports_are_the_hosts");
    let (topo, agent) = start();
    // "SSH": another TCP port of the host, answered by the host itself.
    let ssh = SocketAddrV4::new(LB_CLIENT_ADDR, 2222);
    let listener = topo.lb.run(move || TcpListener::bind(ssh)).expect("bind the host's own port");
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        std::io::Write::write_all(&mut s, b"host\n").expect("greet");
    });
    let greeting = topo.client.run(move || tcp_request(ssh)).expect("the host's own port answers");
    server.join().expect("server thread");
    assert_eq!(greeting.0, "host");
    // The host's own outgoing connection, from an ephemeral port of the
    // VIP's address, to a backend's port: its answers are the host's, not
    // a flow's.
    let backend = topo.backend("web-1").tcp_addr();
    let own = topo.lb.run(move || tcp_request(backend)).expect("the host reaches the backend itself");
    assert_eq!(own.0, "web-1");
    let web = SocketAddrV4::new(LB_CLIENT_ADDR, WEB_PORT);
    assert!(topo.client.run(move || tcp_request(web)).is_ok(), "{}", agent.log_tail(30));
    let p = paths(&agent);
    let reasons = status(&agent)["reasons"].clone();
    println!("paths {p:?}\nreasons {reasons}");
}

#[test]
fn root_missing_neighbour_falls_back_then_takes_the_fast_path() {
    require_root!("root_missing_neighbour_falls_back_then_takes_the_fast_path");
    let (topo, agent) = start();
    let vip = SocketAddrV4::new(LB_CLIENT_ADDR, DNS_PORT);
    topo.lb.exec("ip", &["neigh", "flush", "all"]);
    let before = paths(&agent);
    let first = topo.client.run(move || udp_request(vip));
    assert!(first.is_ok(), "first request after the flush: {first:?}\n{}", agent.log_tail(30));
    let after_first = paths(&agent);
    let no_neigh = |p: &BTreeMap<String, u64>| p.get("pass_fib_no_neigh").copied().unwrap_or(0);
    assert!(no_neigh(&after_first) > no_neigh(&before), "no fallback counted: {before:?} -> {after_first:?}");
    thread::sleep(Duration::from_millis(200));
    let later = topo.client.run(move || (0..20).map(|_| udp_request(vip)).collect::<Vec<_>>());
    assert!(later.iter().all(|r| r.is_ok()), "{later:?}");
    let end = paths(&agent);
    println!("MEASURED: paths before {before:?}, after the first {after_first:?}, after 20 more {end:?}");
    assert!(fast(&end) >= fast(&after_first) + 30, "later requests not on the fast path: {after_first:?} -> {end:?}");

    // The host has no neighbour entry for the client (a reply translated
    // back to the host's address could not pass up: a martian): replies
    // go out with the MACs the flow's client packet arrived with.
    topo.lb.exec("ip", &["neigh", "replace", &CLIENT_ADDR.to_string(), "dev", LB_CLIENT_IFACE, "nud", "failed"]);
    let answers = topo.client.run(move || (0..10).map(|_| udp_request(vip)).collect::<Vec<_>>());
    let flow_macs = paths(&agent).get("replied_flow_macs").copied().unwrap_or(0);
    println!("MEASURED: without a client neighbour: {answers:?}, replied_flow_macs {flow_macs}");
    assert!(answers.iter().all(|r| r.is_ok()), "{answers:?}\n{}", agent.log_tail(30));
    assert!(flow_macs >= 10, "{:?}", paths(&agent));
}

#[test]
fn root_host_address_vip_without_fast_path_is_refused() {
    require_root!("root_host_address_vip_without_fast_path_is_refused");
    let topo = Topology::build(Options::with_backends(&["web-1", "web-2"]));
    // The lab's veths with `auto`: no fast path anywhere.
    let config = host_config(&topo).replace("fast_path = \"on\"", "fast_path = \"auto\"");
    let path = topo.write_raw_config(&config);
    let out = topo
        .lb
        .run(move || lb_lab::agent::run_agent_cli(&[OsStr::new("check"), OsStr::new("--config"), path.as_os_str()]));
    println!("lb-agent check:\n{}{}", out.stdout, out.stderr);
    assert!(!out.status.success(), "check accepted a host-address VIP without a fast path: {out:?}");
    assert!(out.stdout.contains("martian") && out.stdout.contains("veth: its peer needs GRO"), "{out:?}");
    // The same VIP elsewhere (not a host address) needs no fast path.
    let path = topo.write_raw_config(&config.replace(&LB_CLIENT_ADDR.to_string(), "10.200.255.1"));
    let out = topo
        .lb
        .run(move || lb_lab::agent::run_agent_cli(&[OsStr::new("check"), OsStr::new("--config"), path.as_os_str()]));
    assert!(out.status.success(), "{out:?}");
}
