//! Full NAT end to end: client ns ⇄ LB ns (lb-agent) ⇄ backend namespaces
//! whose only route is their own subnet. A DNAT reply (to the client's
//! address) would find no route there; full NAT's replies go to the LB's
//! address on the backend's link, so every connection is answered.
//!
//! The LB's interfaces get the default hook (`auto`: tc on veths), the one
//! that sends full NAT's packets on whatever the checksums and neighbours.
//! IPv6 (balanced at XDP only) runs on the lab's `net6` instead.
//!
//! Needs root and a built agent: `cargo build --release -p lb-agent && cargo
//! test -p lb-tests --release --test e2e_fullnat -- --test-threads=1`.

use std::{
    net::SocketAddrV6,
    time::{Duration, Instant},
};

use lb_lab::{
    agent::Agent,
    net6::{self, Net6},
    require_root,
    scratch::Scratch,
    spread::{assert_even, connect_many, print_shares},
    topology::{Conn, Options, Topology, CLIENT_NET},
};

/// `n` backends `web-1..` with no route to the client's subnet, the LB's
/// interfaces on `auto`, and an agent whose TCP service is in full NAT,
/// with `dataplane` (TOML lines) as its `[dataplane]`.
fn start(n: usize, dataplane: &str) -> (Topology, Agent) {
    start_in("full-nat", n, dataplane)
}

/// [`start`] with the TCP service in `mode`.
fn start_in(mode: &str, n: usize, dataplane: &str) -> (Topology, Agent) {
    let names: Vec<String> = (1..=n).map(|i| format!("web-{i}")).collect();
    let topo = Topology::build(Options { hook: None, ..Options::with_backends(&names) });
    for b in &topo.backends {
        b.ns.exec("ip", &["route", "del", CLIENT_NET]);
    }
    let members: Vec<(&str, u32)> = topo.backends.iter().map(|b| (b.name.as_str(), 1)).collect();
    let text = topo.config_toml_with(&members, &format!("mode = {mode:?}\n"));
    topo.write_raw_config(&format!("{text}\n[dataplane]\n{dataplane}\n"));
    let agent = topo.start_agent();
    (topo, agent)
}

/// Packets the data plane counted for `reason` (from the status).
fn reason_count(status: &serde_json::Value, reason: &str) -> u64 {
    let reasons = status["reasons"].as_array().expect("reasons in the status");
    reasons.iter().find(|r| r["reason"] == reason).and_then(|r| r["packets"].as_u64()).unwrap_or(0)
}

#[test]
fn root_full_nat_serves_backends_with_no_route_back() {
    require_root!("root_full_nat_serves_backends_with_no_route_back");
    let (topo, agent) = start(3, "");
    let n = 1000;
    let started = Instant::now();
    let counts = connect_many(&topo, n);
    print_shares(&format!("full nat in {:?}", started.elapsed()), &counts);
    assert_even(&counts, &topo.options.backends);

    let status = agent.status();
    let web = status["services"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "web")).expect("web");
    assert_eq!(web["mode"], "full-nat", "{web}");
    let sources: Vec<String> = topo.backends.iter().map(|b| format!("{} (route)", b.lb_addr)).collect();
    assert_eq!(
        web["snat_sources"],
        serde_json::json!(sources),
        "each backend's flows come from the LB's address on its link"
    );
    assert_eq!(reason_count(&status, "drop_snat_exhausted"), 0);
    assert!(reason_count(&status, "forwarded") >= n as u64);
    let table = agent.cli(&["status"]);
    assert!(table.stdout.contains("mode full-nat from 10.200.1.1 (route)"), "{}", table.stdout);
    assert!(table.stdout.contains("full nat: "), "{}", table.stdout);
    assert_eq!(agent.new_flows("web"), n as u64);
    // A plain DNAT reply would have no way back: the test's premise.
    assert!(topo.backends[0].ns.exec("ip", &["route"]).lines().all(|l| !l.starts_with("10.200.0.")));
}

/// The premise: in this topology plain DNAT gets no answer (the SYN-ACK
/// to the client's address has no route), so the tests above fail on a
/// load balancer without full NAT.
#[test]
fn root_dnat_gets_no_answer_from_backends_with_no_route_back() {
    require_root!("root_dnat_gets_no_answer_from_backends_with_no_route_back");
    let (topo, _agent) = start_in("nat", 1, "");
    let vip = topo.vip_tcp();
    let err = topo.client.run(move || Conn::open(vip).map(|c| c.backend)).expect_err("no answer without full NAT");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
}

/// Four source ports to one backend: four connections held open, each
/// answered by its own (the echo checks it), a fifth gets nothing (dropped,
/// counted); once one closes, a new one gets the port it freed.
#[test]
fn root_full_nat_port_exhaustion_is_refused_and_counted() {
    require_root!("root_full_nat_port_exhaustion_is_refused_and_counted");
    let (topo, agent) = start(1, "snat_port_min = 61000\nsnat_port_max = 61003");
    let vip = topo.vip_tcp();
    let (held_ok, fifth, after_close) = topo.client.run(move || {
        let mut held: Vec<Conn> =
            (0..4).map(|i| Conn::open(vip).unwrap_or_else(|e| panic!("connection {i}: {e}"))).collect();
        let echoes: Vec<bool> =
            held.iter_mut().enumerate().map(|(i, c)| c.echo(&format!("from connection {i}")).is_ok()).collect();
        let started = Instant::now();
        let fifth = Conn::open(vip).map(|_| ()).map_err(|e| (e.kind(), started.elapsed()));
        drop(held.remove(0));
        // The close (FIN both ways) releases the port at once; a new SYN
        // may still race the backend's FIN, so allow a few tries.
        let deadline = Instant::now() + Duration::from_secs(5);
        let after_close = loop {
            match Conn::open(vip) {
                Ok(mut c) => break c.echo("after the close").map_err(|e| e.to_string()),
                Err(e) if Instant::now() > deadline => break Err(e.to_string()),
                Err(_) => {}
            }
        };
        for (i, c) in held.iter_mut().enumerate() {
            c.echo(&format!("still connection {}", i + 1)).unwrap_or_else(|e| panic!("held connection: {e}"));
        }
        (echoes, fifth, after_close)
    });
    assert_eq!(held_ok, [true; 4], "every held connection echoes its own line");
    let (kind, took) = fifth.expect_err("a fifth connection with four ports held");
    println!("fifth connection: {kind:?} after {took:?}");
    let status = agent.status();
    assert!(reason_count(&status, "drop_snat_exhausted") >= 1, "exhaustion counted: {}", status["reasons"]);
    after_close.expect("a connection after one closed");
    let snat = status["maps"].as_array().and_then(|m| m.iter().find(|m| m["name"] == "SNAT_FLOWS")).cloned();
    println!("SNAT_FLOWS at the end: {snat:?}");
}

/// IPv6, through a real agent on the lab's `net6` (hook "xdp": `xdp_lb6`
/// hands the packets to `xdp_fullnat6_local`): the backends lose their
/// route to the client's /64, so only full NAT's replies (to the LB's
/// address on each backend's link) find their way. Every connection is
/// answered, evenly, and a held connection's backend sees the LB's address
/// as its peer, never the client's.
#[test]
fn root_ipv6_full_nat_serves_backends_with_no_route_back() {
    require_root!("root_ipv6_full_nat_serves_backends_with_no_route_back");
    let net = Net6::build(&format!("lbt6f-{}", std::process::id()));
    for (ns, _) in &net.backends {
        ns.exec("ip", &["-6", "route", "del", &format!("{}/64", net6::CLIENT)]);
        assert!(!ns.exec("ip", &["-6", "route"]).contains("fd00:c::"), "the premise: no route back");
    }
    let dir = Scratch::create(&format!("lbt6f-{}", std::process::id()));
    std::fs::write(dir.config_path(), Net6::agent_config("mode = \"full-nat\"")).expect("write the config");
    let mut agent = Agent::spawn(&net.lb, &dir.agent_args(dir.config_path()));
    agent.wait_ready();
    let names: Vec<String> = (1..=net6::BACKENDS).map(|i| format!("web-{i}")).collect();
    let up = |s: &serde_json::Value| {
        let web = s["services"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "web6")).cloned();
        web.and_then(|w| w["backends"].as_array().cloned()).is_some_and(|b| {
            b.len() == names.len() && b.iter().all(|b| b["state"] == "active" && b["in_table"] == true)
        })
    };
    agent.wait_status("every IPv6 backend up and in the table", Duration::from_secs(10), up);

    let web = SocketAddrV6::new(net6::VIP, 80, 0, 0);
    let n = 1000;
    let started = Instant::now();
    let counts = net.connect(web, n);
    print_shares(&format!("ipv6 full nat in {:?}", started.elapsed()), &counts);
    assert_even(&counts, &names);

    let status = agent.status();
    let svc = status["services"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "web6")).expect("web6");
    assert_eq!(svc["mode"], "full-nat", "{svc}");
    let sources: Vec<String> = (1..=net6::BACKENDS).map(|i| format!("{} (route)", net6::backend_addr(i, 1))).collect();
    assert_eq!(svc["snat_sources"], serde_json::json!(sources), "each backend's flows come from the LB's link address");
    assert_eq!(reason_count(&status, "drop_snat_exhausted"), 0);
    assert!(reason_count(&status, "reply_translated") >= n as u64, "{}", status["reasons"]);
    let table = agent.cli(&["status"]);
    assert!(table.stdout.contains("mode full-nat from fd00:1::1 (route)"), "{}", table.stdout);

    // A connection held open: its backend's socket has the LB's address
    // on that link as its peer.
    let held = net.client.run(move || Conn::open(web).expect("a held connection"));
    let i: u16 = held.backend.trim_start_matches("web-").parse().expect("a backend's name");
    let peers = net.backends[usize::from(i) - 1].0.exec("ss", &["-Htn", "state", "established", "( sport = :8080 )"]);
    assert!(peers.contains(&format!("[{}]", net6::backend_addr(i, 1))), "the backend's peers: {peers}");
    assert!(!peers.contains("fd00:c::"), "the client's address reached the backend: {peers}");
    drop(held);

    // The agent first, then the namespaces.
    drop(agent);
    drop(dir);
    drop(net);
}
