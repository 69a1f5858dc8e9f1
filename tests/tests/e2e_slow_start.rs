//! Slow start end to end: a backend added to a loaded service takes a small
//! share of new flows at first and its fair share once its ramp is over,
//! as the data plane's per-backend new-flow counters count them.
//!
//! Needs root and a built agent: `cargo build --release -p lb-agent && cargo
//! test -p lb-tests --release --test e2e_slow_start -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use lb_lab::{
    agent::Agent,
    require_root,
    topology::{tcp_request, Options, Topology},
};
use serde_json::Value;

/// Short TCP connections per phase: bounded load.
const FLOWS: usize = 150;

/// New flows per backend address of `web`, as the agent counts them.
fn new_flows(agent: &Agent) -> BTreeMap<String, u64> {
    let status = agent.status();
    let web = status["services"].as_array().unwrap().iter().find(|s| s["name"] == "web").unwrap().clone();
    web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["address"].as_str().unwrap().to_owned(), b["counters"]["new_flows"].as_u64().unwrap_or(0)))
        .collect()
}

fn backend_json(agent: &Agent, addr: &str) -> Value {
    let status = agent.status();
    let web = status["services"].as_array().unwrap().iter().find(|s| s["name"] == "web").unwrap().clone();
    web["backends"].as_array().unwrap().iter().find(|b| b["address"] == addr).cloned().unwrap_or(Value::Null)
}

/// `FLOWS` new connections, then the share of them `addr` got (by the
/// counters' deltas; the counters catch up on the agent's next walk).
fn share_of(topo: &Topology, agent: &Agent, addr: &str) -> f64 {
    let before = new_flows(agent);
    let vip = topo.vip_tcp();
    topo.client.run(move || {
        for i in 0..FLOWS {
            tcp_request(vip).unwrap_or_else(|e| panic!("request {i}: {e}"));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let after = new_flows(agent);
        let delta = |a: &str| after.get(a).copied().unwrap_or(0) - before.get(a).copied().unwrap_or(0);
        let total: u64 = after.keys().map(|a| delta(a)).sum();
        if total >= FLOWS as u64 || Instant::now() > deadline {
            assert_eq!(total, FLOWS as u64, "every new flow counted: {before:?} -> {after:?}");
            return delta(addr) as f64 / total as f64;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn root_an_added_backend_ramps_up_to_its_fair_share() {
    require_root!("root_an_added_backend_ramps_up_to_its_fair_share");
    let names = ["web-1", "web-2", "web-3"];
    let topo = Topology::build(Options::with_backends(&names));
    topo.write_raw_config(&topo.config_toml_with(&[("web-1", 1), ("web-2", 1)], "slow_start = \"6s\""));
    let agent = topo.start_agent();
    let new = topo.backend("web-3").tcp_addr().to_string();
    let out = agent.cli(&["backend", "add", "web", &new]);
    assert!(out.status.success(), "{out:?}");
    let added = Instant::now();
    let b = backend_json(&agent, &new);
    let ramp = b["ramp_percent"].as_u64().unwrap_or_else(|| panic!("a ramp right after the add: {b}"));
    assert!(ramp <= 20, "{b}");
    let table = agent.cli(&["status"]).stdout;
    assert!(table.lines().any(|l| l.contains(&new) && l.contains("(ramp ")), "{table}");
    // Ten steps over 6 s: within the first second it holds at most a fifth
    // of its weight's share, 2 / 22 of the flows (a fair share is a third).
    let early = share_of(&topo, &agent, &new);
    let early_took = added.elapsed();
    println!("MEASURED: new backend's share in its first {early_took:?}: {:.1}%", early * 100.0);
    assert!(early_took < Duration::from_millis(1500), "the first phase took {early_took:?}");
    assert!(early < 0.15, "a ramping backend got {:.1}% of new flows", early * 100.0);
    // The ramp ends, and status says so.
    let deadline = added + Duration::from_secs(10);
    while backend_json(&agent, &new).get("ramp_percent").is_some() {
        assert!(Instant::now() < deadline, "still ramping 10 s after the add: {}", backend_json(&agent, &new));
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("MEASURED: ramp over after {:?}", added.elapsed());
    assert!(added.elapsed() >= Duration::from_secs(5), "the ramp ended early, after {:?}", added.elapsed());
    let fair = share_of(&topo, &agent, &new);
    println!("MEASURED: new backend's share after the ramp: {:.1}%", fair * 100.0);
    assert!((0.2..0.47).contains(&fair), "after its ramp it got {:.1}% of new flows", fair * 100.0);
}
