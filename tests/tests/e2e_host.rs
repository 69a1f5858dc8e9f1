//! The VIP is the load balancer host's own address, the default way to
//! deploy on one host: clients on the host's subnet reach
//! `host-address:port` with no route of their own, and translated packets
//! leave on the fast path (bpf_fib_lookup + XDP_REDIRECT/XDP_TX, or
//! bpf_redirect at tc), because a reply translated back to a local address
//! would be dropped by the kernel as a martian if it passed up.
//!
//! ```text
//!  client ns 10.200.0.2 ==== [lb-c] 10.200.0.1 = the VIP (LB ns, "the host")
//!                                   [lb-b1] ==== web-1 10.200.1.2
//!                                   [lb-b2] ==== web-2 10.200.2.2
//!                                   [lb-br] 10.200.251.1 == web-a .2, web-b .3 (bridge tests)
//! ```
//!
//! XDP tests (`hook = "xdp"`): the client and backend ends have GRO on (so
//! a redirected frame can be received on a veth) and tx checksum offload
//! off (complete checksums: a partial one never takes XDP's fast path).
//! tc tests (`hook = "auto"`, which gives veths and bridges tc): every end
//! keeps its default offloads, so backends send CHECKSUM_PARTIAL replies.
//!
//! Needs root and a built agent: `cargo build --release -p lb-agent && cargo
//! test -p lb-tests --release --test e2e_host -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    ffi::OsStr,
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    thread,
    time::Duration,
};

use aya::programs::{tc::TcAttachType, SchedClassifier};
use lb_lab::{
    agent::Agent,
    cgroup::socket_lb_toml,
    netns::NetNs,
    require_root,
    topology::{
        refused_tcp_and_udp, tcp_request, udp_request, Conn, Options, Topology, BACKEND_TCP_PORT, BACKEND_UDP_PORT,
        CLIENT_ADDR, LB_CLIENT_ADDR, LB_CLIENT_IFACE, NODE_IFACE,
    },
};
use serde_json::Value;

const WEB_PORT: u16 = 80;
const DNS_PORT: u16 = 53;

/// Which hook the LB's interfaces get.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    /// `hook = "xdp"`, complete checksums, the fast path on.
    Xdp,
    /// `hook = "auto"` (tc on veth and bridges), every offload as it is.
    Auto,
}

/// The host-address deployment: two backends, the VIP = the LB's own
/// address on the client side, XDP with the fast path on everywhere.
fn start() -> (Topology, Agent) {
    let mut options = Options::with_backends(&["web-1", "web-2"]);
    options.node_tx_csum_offload = false;
    let topo = Topology::build(options);
    for ns in std::iter::once(&topo.client).chain(topo.backends.iter().map(|b| &b.ns)) {
        ns.exec("ethtool", &["-K", NODE_IFACE, "gro", "on"]);
    }
    topo.write_raw_config(&host_config(&topo.lb_interfaces(), &backend_addrs(&topo), Hook::Xdp));
    let agent = topo.start_agent();
    (topo, agent)
}

/// The same deployment with the default hook (tc on these veths) and
/// backends that keep their default offloads (tx checksum offload on).
fn start_tc() -> (Topology, Agent) {
    let topo = Topology::build(Options::with_backends(&["web-1", "web-2"]));
    topo.write_raw_config(&host_config(&topo.lb_interfaces(), &backend_addrs(&topo), Hook::Auto));
    let agent = topo.start_agent();
    (topo, agent)
}

fn backend_addrs(topo: &Topology) -> Vec<Ipv4Addr> {
    topo.backends.iter().map(|b| b.addr).collect()
}

/// A TCP and a UDP service on the host's address, on `interfaces`.
fn host_config(interfaces: &[String], backends: &[Ipv4Addr], hook: Hook) -> String {
    let list = interfaces.iter().map(|i| format!("{i:?}")).collect::<Vec<_>>().join(", ");
    let mut out = String::new();
    for (name, proto, port, backend_port) in
        [("web", "tcp", WEB_PORT, BACKEND_TCP_PORT), ("dns", "udp", DNS_PORT, BACKEND_UDP_PORT)]
    {
        out += &format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{LB_CLIENT_ADDR}\"\nport = {port}\nprotocol = \"{proto}\"\ninterfaces = [{list}]\n"
        );
        for b in backends {
            out += &format!("[[service.backend]]\naddress = \"{b}:{backend_port}\"\n");
        }
    }
    if hook == Hook::Xdp {
        for i in interfaces {
            out += &format!("[interface.{i:?}]\nhook = \"xdp\"\nchecksums = \"complete\"\nfast_path = \"on\"\n");
        }
    }
    out + &socket_lb_toml(None)
}

fn status(agent: &Agent) -> Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "lb-agent status --json failed: {out:?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json: {e}:\n{}", out.stdout))
}

/// Packets per path summed over every interface, from `status --json`.
/// Each XDP interface must have the fast path on.
fn paths(agent: &Agent) -> BTreeMap<String, u64> {
    paths_of(agent, |_| true)
}

/// Packets per path that arrived on the interfaces `pick` accepts.
fn paths_of(agent: &Agent, pick: impl Fn(&str) -> bool) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for i in status(agent)["agent"]["interfaces"].as_array().expect("interfaces") {
        if i["hook"] == "xdp" {
            assert_eq!(i["fast_path"], true, "{i}");
        }
        if !pick(i["name"].as_str().expect("name")) {
            continue;
        }
        for p in i["paths"].as_array().expect("paths") {
            *out.entry(p["path"].as_str().expect("path").to_owned()).or_insert(0) += p["packets"].as_u64().expect("n");
        }
    }
    out
}

/// The hook of every interface, from `status --json`.
fn hooks(agent: &Agent) -> BTreeMap<String, String> {
    status(agent)["agent"]["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .map(|i| (i["name"].as_str().expect("name").to_owned(), i["hook"].as_str().expect("hook").to_owned()))
        .collect()
}

fn fast(paths: &BTreeMap<String, u64>) -> u64 {
    ["redirected", "tx_back", "replied_flow_macs", "redirected_neigh"]
        .iter()
        .map(|p| paths.get(*p).copied().unwrap_or(0))
        .sum()
}

fn passed(paths: &BTreeMap<String, u64>) -> u64 {
    paths.iter().filter(|(p, _)| p.starts_with("pass_")).map(|(_, n)| n).sum()
}

/// 1,000 TCP connections from the client to the host's web port: every
/// one answered, the two backends' shares within 25% of even.
fn assert_thousand_connections_even(client: &NetNs, agent: &Agent) -> BTreeMap<String, usize> {
    let vip = SocketAddrV4::new(LB_CLIENT_ADDR, WEB_PORT);
    let (counts, failures) = client.run(move || {
        let (mut counts, mut failures) = (BTreeMap::<String, usize>::new(), Vec::new());
        for i in 0..1000 {
            match tcp_request(vip) {
                Ok((backend, _)) => *counts.entry(backend).or_insert(0) += 1,
                Err(e) => failures.push(format!("connection {i}: {e}")),
            }
        }
        (counts, failures)
    });
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
    // Exactly one new flow per connection, at either hook.
    let new_flows = agent.new_flows("web");
    println!("MEASURED: new_flows {new_flows} for 1000 connections");
    assert_eq!(new_flows, 1000, "new flows counted for 1000 connections");
    counts
}

/// 50 UDP requests from the client to the host's DNS port, all answered by
/// `backends`.
fn assert_udp_answered(client: &NetNs, agent: &Agent, backends: &str) {
    let vip = SocketAddrV4::new(LB_CLIENT_ADDR, DNS_PORT);
    let answers = client.run(move || (0..50).map(|_| udp_request(vip)).collect::<Vec<_>>());
    let failed: Vec<String> = answers.iter().filter_map(|a| a.as_ref().err().map(|e| e.to_string())).collect();
    assert!(failed.is_empty(), "{} of 50 UDP requests failed: {failed:?}\n{}", failed.len(), agent.log_tail(30));
    let names: std::collections::BTreeSet<&str> = answers.iter().filter_map(|a| a.as_deref().ok()).collect();
    assert!(names.iter().all(|n| n.starts_with(backends)), "{names:?}");
}

#[test]
fn root_host_address_vip_answers_tcp_evenly_on_the_fast_path() {
    require_root!("root_host_address_vip_answers_tcp_evenly_on_the_fast_path");
    let (topo, agent) = start();
    let counts = assert_thousand_connections_even(&topo.client, &agent);
    let p = paths(&agent);
    println!("MEASURED: 1000 connections to the host address: {counts:?}; paths {p:?}");
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
    assert_udp_answered(&topo.client, &agent, "web-");
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

/// `lb-agent check --config path`, in the LB namespace.
#[test]
fn root_host_address_vip_without_fast_path_is_refused() {
    require_root!("root_host_address_vip_without_fast_path_is_refused");
    let topo = Topology::build(Options::with_backends(&["web-1", "web-2"]));
    // The lab's veths at XDP with `auto`: no fast path anywhere.
    let config = host_config(&topo.lb_interfaces(), &backend_addrs(&topo), Hook::Xdp)
        .replace("fast_path = \"on\"", "fast_path = \"auto\"");
    let out = check(&topo, &config);
    println!("lb-agent check:\n{}{}", out.stdout, out.stderr);
    assert!(!out.status.success(), "check accepted a host-address VIP without a fast path: {out:?}");
    assert!(out.stdout.contains("martian") && out.stdout.contains("veth: its peer needs GRO"), "{out:?}");
    // The same VIP elsewhere (not a host address) needs no fast path.
    let out = check(&topo, &config.replace(&LB_CLIENT_ADDR.to_string(), "10.200.255.1"));
    assert!(out.status.success(), "{out:?}");
    // At tc (what `auto` gives these veths) replies leave past the stack.
    let out = check(&topo, &host_config(&topo.lb_interfaces(), &backend_addrs(&topo), Hook::Auto));
    assert!(out.status.success() && !out.stdout.contains("martian"), "{out:?}");
    assert!(out.stdout.contains("interface lb-b1: hook tc (veth: faces local stacks"), "{out:?}");
}

/// The host-address deployment at tc, with backends that keep their default
/// offloads: their replies are CHECKSUM_PARTIAL, which XDP could only pass
/// up (where the kernel drops them as martians). tc's skb helpers keep the
/// checksum state and bpf_redirect sends them out past the stack.
#[test]
fn root_host_address_vip_with_default_offloads_answers_tcp_and_udp_at_tc() {
    require_root!("root_host_address_vip_with_default_offloads_answers_tcp_and_udp_at_tc");
    let (topo, agent) = start_tc();
    let hooks = hooks(&agent);
    assert!(hooks.values().all(|h| h == "tc"), "auto should give these veths tc: {hooks:?}");
    let counts = assert_thousand_connections_even(&topo.client, &agent);
    let p = paths(&agent);
    println!("MEASURED: tc, default offloads: 1000 connections to the host address: {counts:?}; paths {p:?}");
    // SYN, ACK, request, FIN... both ways: at least 6 per connection, all of
    // them redirected (a missing neighbour is resolved by redirect_neigh,
    // not by passing up).
    assert!(fast(&p) >= 6 * 1000, "too few redirected packets: {p:?}");
    assert_eq!(passed(&p), 0, "packets passed up: {p:?}");
    // The first packet to each new neighbour went by bpf_redirect_neigh.
    assert!(p.get("redirected_neigh").is_some_and(|&n| n >= 1), "no redirect_neigh: {p:?}");
    assert_udp_answered(&topo.client, &agent, "web-");
    let after_udp = paths(&agent);
    assert!(fast(&after_udp) >= fast(&p) + 2 * 50, "{p:?} -> {after_udp:?}");
    assert_eq!(passed(&after_udp), 0, "packets passed up: {after_udp:?}");
    assert!(topo.csum_errors().is_empty(), "checksum errors: {:?}", topo.csum_errors());
}

/// The programs attached at tc ingress (TCX) of the LB namespace's
/// interfaces, by interface.
fn tcx_programs(topo: &Topology) -> BTreeMap<String, Vec<String>> {
    let ifaces = topo.lb_interfaces();
    topo.lb.run(move || {
        ifaces
            .into_iter()
            .map(|i| {
                let (_, progs) = SchedClassifier::query_tcx(&i, TcAttachType::Ingress)
                    .unwrap_or_else(|e| panic!("query TCX on {i}: {e}"));
                let names = progs.iter().map(|p| p.name_as_str().unwrap_or("?").to_owned()).collect();
                (i, names)
            })
            .collect()
    })
}

/// A restarted agent takes over the pinned TCX links in place, and a
/// stopped one leaves none behind.
#[test]
fn root_tc_links_survive_a_restart() {
    require_root!("root_tc_links_survive_a_restart");
    let (topo, mut agent) = start_tc();
    let attached = tcx_programs(&topo);
    assert!(attached.values().all(|p| p == &["tc_lb"]), "{attached:?}");
    assert_udp_answered(&topo.client, &agent, "web-");
    agent.kill().expect("exit status");
    // No agent: the pinned links keep serving.
    assert_udp_answered(&topo.client, &agent, "web-");
    agent.respawn();
    agent.wait_ready();
    let adopted = agent.count("adopted pinned TCX link");
    assert_eq!(adopted, topo.lb_interfaces().len(), "the new agent did not take over the links:\n{}", agent.log());
    assert_udp_answered(&topo.client, &agent, "web-");
    assert_eq!(passed(&paths(&agent)), 0, "{:?}", paths(&agent));
    assert_eq!(tcx_programs(&topo), attached, "one program per interface after the restart");
    let status = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "agent exit: {status:?}");
    let left = tcx_programs(&topo);
    assert!(left.values().all(Vec::is_empty), "tc programs left attached: {left:?}");
}

/// Backends behind a Linux bridge in the LB namespace (as containers on
/// docker0), the bridge listed: tc on the bridge and the client veth. A
/// bridge cannot transmit XDP frames, but tc's bpf_redirect goes into it
/// (it does its FDB lookup), so packets towards the backends are
/// redirected, not passed up, and the replies too.
#[test]
fn root_backends_behind_a_bridge_answer_at_tc() {
    require_root!("root_backends_behind_a_bridge_answer_at_tc");
    let topo = Topology::build(Options::with_backends::<&str>(&[]));
    let bridged = topo.add_bridged_backends("lb-br", 251, &["web-a", "web-b"]);
    let interfaces = vec![LB_CLIENT_IFACE.to_owned(), bridged.bridge.clone()];
    let addrs: Vec<Ipv4Addr> = bridged.backends.iter().map(|(_, a)| *a).collect();
    topo.write_raw_config(&host_config(&interfaces, &addrs, Hook::Auto));
    let agent = topo.start_agent();
    let hooks = hooks(&agent);
    assert_eq!(hooks.get("lb-br").map(String::as_str), Some("tc"), "{hooks:?}");
    let counts = assert_thousand_connections_even(&topo.client, &agent);
    assert_udp_answered(&topo.client, &agent, "web-");
    let towards_backends = paths_of(&agent, |i| i == LB_CLIENT_IFACE);
    let replies = paths_of(&agent, |i| i == "lb-br");
    println!("MEASURED: bridge: {counts:?}; towards the backends {towards_backends:?}; replies {replies:?}");
    assert!(fast(&towards_backends) >= 3 * 1000 + 50, "{towards_backends:?}");
    assert_eq!(passed(&towards_backends), 0, "packets towards the backends passed up: {towards_backends:?}");
    assert!(fast(&replies) >= 3 * 1000 + 50, "{replies:?}");
    assert_eq!(passed(&replies), 0, "replies passed up: {replies:?}");
    assert_eq!(bridged.csum_errors(), (0, 0));
    assert!(topo.csum_errors().is_empty(), "checksum errors: {:?}", topo.csum_errors());
}

/// A reload that changes the hook moves the interfaces from XDP to tc (and
/// the service keeps answering).
#[test]
fn root_reload_moves_interfaces_from_xdp_to_tc() {
    require_root!("root_reload_moves_interfaces_from_xdp_to_tc");
    let (topo, mut agent) = start();
    assert!(hooks(&agent).values().all(|h| h == "xdp"), "{:?}", hooks(&agent));
    assert_eq!(topo.lb_xdp_attachments().len(), topo.lb_interfaces().len(), "{}", topo.lb_links());
    let config = host_config(&topo.lb_interfaces(), &backend_addrs(&topo), Hook::Auto);
    agent.reload_with(|| {
        topo.write_raw_config(&config);
    });
    let after = hooks(&agent);
    assert!(after.values().all(|h| h == "tc"), "{after:?}");
    assert!(topo.lb_xdp_attachments().is_empty(), "XDP left attached: {}", topo.lb_links());
    assert!(tcx_programs(&topo).values().all(|p| p == &["tc_lb"]), "{:?}", tcx_programs(&topo));
    assert_udp_answered(&topo.client, &agent, "web-");
}

/// `check` asks the namespace's routing (rtnetlink) about each backend: one
/// routed out of an interface the service does not list is refused, by
/// name, and so is a service none of whose backends has a route. A
/// host-address VIP on an interface the service does not list is a warning.
#[test]
fn root_check_judges_the_routes_to_backends() {
    require_root!("root_check_judges_the_routes_to_backends");
    let topo = Topology::build(Options::with_backends(&["web-1", "web-2"]));
    let config = host_config(&topo.lb_interfaces(), &backend_addrs(&topo), Hook::Xdp);
    let out = check(&topo, &config);
    assert!(out.status.success() && !out.stdout.contains("warning"), "{out:?}");

    let b1 = &topo.backend("web-1").lb_iface;
    let out = check(&topo, &without_interface(&config, b1));
    println!("lb-agent check:\n{}{}", out.stdout, out.stderr);
    assert!(!out.status.success(), "{out:?}");
    let via = format!("{}:{BACKEND_TCP_PORT}: its route leaves by {b1}", topo.backend("web-1").addr);
    assert!(out.stdout.contains(&via) && out.stdout.contains(&format!("add {b1} to")), "{out:?}");

    // The host's address is on the client side; without it listed, its
    // clients would reach the host's own port.
    let out = check(&topo, &without_interface(&config, LB_CLIENT_IFACE));
    assert!(out.status.success(), "{out:?}");
    let on = format!("the VIP {LB_CLIENT_ADDR} is an address of {LB_CLIENT_IFACE}, which the service does not list");
    assert!(out.stdout.contains(&on), "{out:?}");

    let mut unrouted = config.clone();
    for (i, b) in topo.backends.iter().enumerate() {
        unrouted = unrouted.replace(&format!("\"{}:", b.addr), &format!("\"10.250.0.{}:", i + 1));
    }
    let out = check(&topo, &unrouted);
    println!("lb-agent check:\n{}{}", out.stdout, out.stderr);
    assert!(!out.status.success(), "check accepted backends without a route: {out:?}");
    assert!(out.stdout.contains("refused") && out.stdout.contains("10.250.0.1:"), "{out:?}");
    // The file alone (for CI, or another host) is fine; given by position too.
    let path = topo.write_raw_config(&unrouted);
    let out = topo
        .lb
        .run(move || lb_lab::agent::run_agent_cli(&[OsStr::new("check"), OsStr::new("--file-only"), path.as_os_str()]));
    assert!(out.status.success() && out.stdout.contains("not checked (--file-only)"), "{out:?}");
}

/// `host_config`'s text with `iface` out of every service's list and out
/// of the interface settings.
fn without_interface(config: &str, iface: &str) -> String {
    let settings = format!("[interface.{iface:?}]\nhook = \"xdp\"\nchecksums = \"complete\"\nfast_path = \"on\"\n");
    config.replace(&settings, "").replace(&format!("{iface:?}, "), "").replace(&format!(", {iface:?}"), "")
}

/// `lb-agent check` on `config`, in the LB namespace.
fn check(topo: &Topology, config: &str) -> lb_lab::agent::CliOutput {
    let path = topo.write_raw_config(config);
    topo.lb.run(move || lb_lab::agent::run_agent_cli(&[OsStr::new("check"), OsStr::new("--config"), path.as_os_str()]))
}

/// Large segments both ways at tc: the backends' and the client's stacks
/// hand their veths GSO packets of up to 64 KB (TSO, default offloads),
/// larger than the MTU, which tc must redirect whole (the kernel segments
/// them at the egress), not pass up as too big.
#[test]
fn root_bulk_transfer_at_tc() {
    require_root!("root_bulk_transfer_at_tc");
    let (topo, agent) = start_tc();
    let vip = SocketAddrV4::new(LB_CLIENT_ADDR, WEB_PORT);
    let line = "x".repeat(1 << 20);
    let echoed = topo.client.run(move || -> std::io::Result<Vec<String>> {
        let mut conn = Conn::open(vip)?;
        (0..3).map(|_| conn.echo(&line)).collect()
    });
    let p = paths(&agent);
    println!("MEASURED: 3 MB each way through tc: {echoed:?}; paths {p:?}");
    assert!(echoed.is_ok(), "{echoed:?}\n{}", agent.log_tail(30));
    assert_eq!(passed(&p), 0, "packets passed up: {p:?}");
    assert!(topo.csum_errors().is_empty(), "checksum errors: {:?}", topo.csum_errors());
}

/// With no usable backend, clients of the host's own address are refused
/// at once at tc too, where the program writes no answer itself: the
/// request passes up untouched and the kernel answers it as a closed port
/// (a TCP reset, an ICMP port unreachable), counted as refusals.
#[test]
fn root_host_address_vip_without_backends_is_refused_at_once_at_tc() {
    require_root!("root_host_address_vip_without_backends_is_refused_at_once_at_tc");
    let (topo, mut agent) = start_tc();
    assert!(hooks(&agent).values().all(|h| h == "tc"), "auto should give these veths tc");
    agent.reload_with(|| {
        topo.write_raw_config(&host_config(&topo.lb_interfaces(), &[], Hook::Auto));
    });
    let tcp = SocketAddrV4::new(LB_CLIENT_ADDR, WEB_PORT);
    let udp = SocketAddrV4::new(LB_CLIENT_ADDR, DNS_PORT);
    let (tcp_err, took, udp_err) = topo.client.run(move || refused_tcp_and_udp(tcp, udp));
    println!("MEASURED: tc, no backend: TCP connect refused after {took:?} ({tcp_err}); UDP: {udp_err}");
    assert_eq!(tcp_err.kind(), std::io::ErrorKind::ConnectionRefused, "TCP: {tcp_err}\n{}", agent.log_tail(20));
    assert!(took < Duration::from_secs(1), "refused only after {took:?}");
    assert_eq!(udp_err.kind(), std::io::ErrorKind::ConnectionRefused, "UDP: {udp_err}\n{}", agent.log_tail(20));
    let s = status(&agent);
    let reasons = s["reasons"].as_array().expect("reasons");
    let packets =
        |name: &str| reasons.iter().find(|r| r["reason"] == name).map_or(0, |r| r["packets"].as_u64().unwrap_or(0));
    assert!(packets("reset_no_backend") >= 1, "no reset counted: {reasons:?}");
    assert!(packets("unreachable_no_backend") >= 1, "no unreachable counted: {reasons:?}");
    assert_eq!(packets("drop_no_backend"), 0, "{reasons:?}");
}
