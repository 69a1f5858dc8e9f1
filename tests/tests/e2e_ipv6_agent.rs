//! IPv6 through a real `lb-agent`: the agent reads an IPv6 service (VIP
//! and three backends, mode "nat", hook "xdp") from its config, writes
//! `SERVICES6`/`BACKENDS6`/`BACKEND_VIPS6` through its reconciler, probes
//! the backends over IPv6, and shows the addresses in `status --json`.
//! Connections from the client namespace are all answered; a stopped
//! backend leaves the table by its health check and new connections go
//! to the other two. With connections held open: `lb-agent explain` names
//! the backend each flow reached (its `CONNTRACK6` entry and its Maglev
//! slot), a SIGKILLed and restarted agent adopts the IPv6 service (held
//! connections keep their backends, new ones are balanced, the open counts
//! stay), and a removed backend drains until its connections close.
//!
//! Topology: the lab's `net6` (client, LB and three backend namespaces).
//!
//! Needs root and a built agent: `cargo build --release -p lb-agent && cargo
//! test -p lb-tests --release --test e2e_ipv6_agent -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    net::SocketAddrV6,
    time::{Duration, Instant},
};

use lb_common::v6::{flow_hash6, ip6_raw};
use lb_lab::{
    agent::Agent,
    net6::{Net6, BACKENDS, CLIENT, VIP},
    require_root,
    scratch::Scratch,
    topology::{echo_all, Conn},
};
use serde_json::Value;

const CONNECTIONS: usize = 60;

/// `web6`'s backends in the status, by address.
fn backends(status: &Value) -> BTreeMap<String, Value> {
    let web = status["services"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "web6")).cloned();
    let web = web.unwrap_or_else(|| panic!("no service web6 in the status: {status}"));
    web["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| (b["address"].as_str().expect("address").to_owned(), b.clone()))
        .collect()
}

#[test]
fn root_agent_serves_an_ipv6_vip_and_health_removes_a_stopped_backend() {
    require_root!("root_agent_serves_an_ipv6_vip_and_health_removes_a_stopped_backend");
    let mut net = Net6::build(&format!("lbt6a-{}", std::process::id()));
    let dir = Scratch::create(&format!("lbt6a-{}", std::process::id()));
    std::fs::write(dir.config_path(), Net6::agent_config("")).expect("write the config");
    let mut agent = Agent::spawn(&net.lb, &dir.agent_args(dir.config_path()));
    agent.wait_ready();

    let all: Vec<String> = (1..=BACKENDS).map(|i| Net6::tcp(i).to_string()).collect();
    let status = agent.wait_status("every IPv6 backend up and in the table", Duration::from_secs(10), |s| {
        let b = backends(s);
        all.iter().all(|a| b.get(a).is_some_and(|b| b["state"] == "active" && b["in_table"] == true))
    });
    assert_eq!(backends(&status).keys().cloned().collect::<Vec<_>>(), all, "status shows the [v6]:port addresses");
    let cli = agent.cli(&["status", "--json"]);
    assert!(cli.stdout.contains("[fd00:1::2]:8080"), "lb-agent status --json: {}", cli.stdout);

    let web = SocketAddrV6::new(VIP, 80, 0, 0);
    let shares = net.connect(web, CONNECTIONS);
    assert_eq!(shares.len(), BACKENDS as usize, "every backend answered: {shares:?}");

    // Stop web-2: its health check fails, it leaves the table, new
    // connections go to web-1 and web-3.
    net.backends[1].1.take();
    let victim = Net6::tcp(2).to_string();
    agent.wait_status("the stopped backend down and out of the table", Duration::from_secs(10), |s| {
        backends(s).get(&victim).is_some_and(|b| b["state"] == "down" && b["in_table"] == false)
    });
    let shares = net.connect(web, CONNECTIONS);
    assert_eq!(shares.keys().cloned().collect::<Vec<_>>(), ["web-1", "web-3"], "{shares:?}");

    // The agent first, then the namespaces.
    drop(agent);
    drop(dir);
    drop(net);
}

/// Backend `web-i`'s address, as the status and `explain` show it.
fn addr_of(name: &str) -> String {
    let i = name.strip_prefix("web-").and_then(|i| i.parse().ok()).unwrap_or_else(|| panic!("backend name {name:?}"));
    Net6::tcp(i).to_string()
}

/// Held connections per backend address.
fn per_backend(held: &[Conn]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for c in held {
        *m.entry(addr_of(&c.backend)).or_insert(0) += 1;
    }
    m
}

/// `lb-agent explain` for the held connection `c`, as JSON.
fn explain(agent: &Agent, c: &Conn) -> Value {
    let client = c.local.to_string();
    let out = agent.cli(&["explain", &client, "--service", "web6", "--json"]);
    assert!(out.status.success(), "explain {client} failed: {}{}", out.stdout, out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("explain printed {:?}: {e}", out.stdout))
}

/// Each backend's open connections in the status, by address.
fn open_counts(status: &Value) -> BTreeMap<String, u64> {
    backends(status).into_iter().map(|(a, b)| (a, b["open_connections"].as_u64().unwrap_or(0))).collect()
}

/// With connections held: `explain` names the backend each reached; a
/// SIGKILL and restart keeps them on it and keeps new ones balanced; a
/// removed backend drains until its connections close, new ones avoiding it.
#[test]
fn root_ipv6_flows_are_explained_survive_a_restart_and_hold_a_drain_open() {
    require_root!("root_ipv6_flows_are_explained_survive_a_restart_and_hold_a_drain_open");
    let net = Net6::build(&format!("lbt6r-{}", std::process::id()));
    let dir = Scratch::create(&format!("lbt6r-{}", std::process::id()));
    // A drain deadline far beyond the test: only the connections end it.
    std::fs::write(dir.config_path(), Net6::agent_config("drain_timeout = \"60s\"")).expect("write the config");
    let mut agent = Agent::spawn(&net.lb, &dir.agent_args(dir.config_path()));
    agent.wait_ready();
    let all: Vec<String> = (1..=BACKENDS).map(|i| Net6::tcp(i).to_string()).collect();
    agent.wait_status("every IPv6 backend up and in the table", Duration::from_secs(10), |s| {
        let b = backends(s);
        all.iter().all(|a| b.get(a).is_some_and(|b| b["state"] == "active" && b["in_table"] == true))
    });
    let web = SocketAddrV6::new(VIP, 80, 0, 0);
    let mut held: Vec<Conn> = net
        .client
        .run(move || (0..24).map(|i| Conn::open(web).unwrap_or_else(|e| panic!("held connection {i}: {e}"))).collect());
    let spread = per_backend(&held);
    println!("held connections per backend: {spread:?}");

    // (a) explain: each flow's entry names the backend that answered it;
    // with the backend set unchanged, the Maglev pick of its hash agrees.
    for c in held.iter().take(6) {
        let e = explain(&agent, c);
        let reached = addr_of(&c.backend);
        assert_eq!(
            (e["backend"].as_str(), e["reason"].as_str()),
            (Some(reached.as_str()), Some("connection table")),
            "{e:#}"
        );
        assert_eq!(e["entry"]["state"], "open", "{e:#}");
        assert_eq!(e["maglev"]["backend"].as_str(), Some(reached.as_str()), "{e:#}");
        let std::net::SocketAddr::V6(local) = c.local else { panic!("an IPv4 client address {}", c.local) };
        assert_eq!(*local.ip(), CLIENT);
        let hash = flow_hash6(&ip6_raw(CLIENT), &ip6_raw(VIP), local.port().to_be(), 80u16.to_be(), 6);
        assert_eq!(e["maglev"]["hash"].as_u64(), Some(u64::from(hash)), "{e:#}");
        assert_eq!(e["maglev"]["slot"].as_u64(), Some(u64::from(hash % lb_common::MAGLEV_TABLE_SIZE)), "{e:#}");
        let left = e["if_backend_left"].as_str().unwrap_or_default();
        assert!(all.iter().any(|a| a == left) && left != reached, "if {reached} left: {e:#}");
    }
    let text = agent.cli(&["explain", &held[0].local.to_string(), "--service", "web6"]);
    println!("{}", text.stdout);
    assert!(text.stdout.contains("connection table: backend [fd00:"), "{}", text.stdout);

    // (c) SIGKILL: the data plane serves on; the restarted agent adopts the
    // IPv6 service with its ids, so the open counts stay, the held
    // connections keep their backends and new ones are balanced.
    let status =
        agent.wait_status("the held connections counted", Duration::from_secs(5), |s| open_counts(s) == spread);
    assert_eq!(open_counts(&status), spread);
    let flows_before = agent.new_flows("web6");
    agent.kill();
    let shares = net.connect(web, 12);
    println!("12 new connections with no agent: {shares:?}");
    let failures = echo_all(&mut held, "no agent");
    assert!(failures.is_empty(), "{failures:?}");
    agent.respawn();
    agent.wait_ready();
    assert_eq!(agent.count("adopting pinned state"), 1, "{}", agent.log());
    let status = agent.wait_status("the adopted backends active", Duration::from_secs(10), |s| {
        let b = backends(s);
        all.iter().all(|a| b.get(a).is_some_and(|b| b["state"] == "active" && b["in_table"] == true))
    });
    // Adopted entries are not rewritten, so their counters carry on (a
    // backend written anew starts from zero).
    let flows_after = agent.new_flows("web6");
    assert!(flows_after >= flows_before + 12, "new flows {flows_before} before the SIGKILL, {flows_after} after");
    assert_eq!(open_counts(&status), spread, "the restarted agent counts the held IPv6 flows under the same ids");
    let failures = echo_all(&mut held, "after the restart");
    assert!(failures.is_empty(), "{failures:?}");
    let shares = net.connect(web, 60);
    println!("60 new connections after the restart: {shares:?}");
    assert_eq!(shares.len(), BACKENDS as usize, "every backend gets new connections: {shares:?}");
    let e = explain(&agent, &held[0]);
    assert_eq!(e["backend"].as_str(), Some(addr_of(&held[0].backend).as_str()), "{e:#}");

    // (b) Drain the backend of the first held connection: it stays while
    // its connections are open (they keep working, new ones go elsewhere),
    // and leaves once they close.
    let victim_name = held[0].backend.clone();
    let victim = addr_of(&victim_name);
    agent.api_ok(&format!(r#"{{"op":"remove_backend","service":"web6","address":"{victim}"}}"#));
    let status = agent.status();
    let b = &backends(&status)[&victim];
    println!("{victim} after remove_backend: {b}");
    assert_eq!((b["state"].as_str(), b["in_table"].as_bool()), (Some("draining"), Some(false)), "{b}");
    assert_eq!(b["open_connections"].as_u64(), Some(spread[&victim]), "the drain counts the IPv6 flows: {b}");
    let shares = net.connect(web, 30);
    assert!(!shares.contains_key(&victim_name), "a new connection reached the draining {victim}: {shares:?}");
    // Walks go on while it drains (a tick a second): it is still there.
    std::thread::sleep(Duration::from_millis(1500));
    let failures = echo_all(&mut held, "draining");
    assert!(failures.is_empty(), "held connections broke during the drain: {failures:?}");
    let status = agent.status();
    assert_eq!(backends(&status)[&victim]["state"], "draining", "{victim} left with connections open");
    let closed = Instant::now();
    held.retain(|c| c.backend != victim_name);
    agent.wait_status("the drained backend gone", Duration::from_secs(5), |s| !backends(s).contains_key(&victim));
    eprintln!("MEASURED: ipv6 drain_end: {} ms from closing {victim}'s connections", closed.elapsed().as_millis());
    let status = agent.status();
    let drained = format!("web6: {victim} drained");
    let events: Vec<&str> =
        status["events"].as_array().into_iter().flatten().filter_map(|e| e["message"].as_str()).collect();
    assert!(events.contains(&drained.as_str()), "no {drained:?} event: {events:?}");
    let failures = echo_all(&mut held, "after the drain");
    assert!(failures.is_empty(), "{failures:?}");

    drop(held);
    drop(agent);
    drop(dir);
    drop(net);
}
