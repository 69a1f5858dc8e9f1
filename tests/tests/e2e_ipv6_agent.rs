//! IPv6 through a real `lb-agent`: the agent reads an IPv6 service (VIP
//! and three backends, mode "nat", hook "xdp") from its config, writes
//! `SERVICES6`/`BACKENDS6`/`BACKEND_VIPS6` through its reconciler, probes
//! the backends over IPv6, and shows the addresses in `status --json`.
//! Connections from the client namespace are all answered; a stopped
//! backend leaves the table by its health check and new connections go
//! to the other two.
//!
//! Topology: the lab's `net6` (client, LB and three backend namespaces).
//!
//! Needs root and a built agent: `cargo build --release -p lb-agent && cargo
//! test -p lb-tests --release --test e2e_ipv6_agent -- --test-threads=1`.

use std::{collections::BTreeMap, net::SocketAddrV6, time::Duration};

use lb_lab::{
    agent::Agent,
    net6::{Net6, BACKENDS, VIP},
    require_root,
    scratch::Scratch,
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
