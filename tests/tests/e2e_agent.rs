//! The agent end to end: run-time changes through the config file and the
//! control API, health checks, drains, a SIGKILL and restart on pinned
//! state, the control API's refusals and the status command line, each
//! against real traffic through client ns ⇄ LB ns (lb-agent + XDP) ⇄
//! backend namespaces.
//!
//! Needs root and a built agent: `cargo build --release -p lb-agent && cargo
//! test -p lb-tests --release --test e2e_agent -- --test-threads=1
//! --nocapture`. Measured figures are printed as `MEASURED:` lines. Each
//! test builds its own topology; the guards remove it again (namespaces,
//! the agent, its bpffs mount and the scratch directory), also when the
//! test fails.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use lb_lab::{
    agent::{run_agent_cli, Agent},
    require_root,
    topology::{echo_all, tcp_request, xdp_attachments, Conn, Options, Topology},
};
use serde_json::Value;

fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("web-{i}")).collect()
}

/// A topology with `n` backends and the agent on all of them (weight 1).
fn start(n: usize, web_extra: &str) -> (Topology, Agent) {
    let topo = Topology::build(Options::with_backends(&names(n)));
    let members: Vec<(&str, u32)> = topo.backends.iter().map(|b| (b.name.as_str(), 1)).collect();
    topo.write_raw_config(&topo.config_toml_with(&members, web_extra));
    let agent = topo.start_agent();
    (topo, agent)
}

/// Open `n` held connections from the client namespace.
fn hold(topo: &Topology, n: usize) -> Vec<Conn> {
    let vip = topo.vip_tcp();
    topo.client
        .run(move || (0..n).map(|i| Conn::open(vip).unwrap_or_else(|e| panic!("held connection {i}: {e}"))).collect())
}

fn per_backend(conns: &[Conn]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for c in conns {
        *m.entry(c.backend.clone()).or_insert(0) += 1;
    }
    m
}

/// `n` new connections: answers per backend, and a description of each failure.
fn new_connections(topo: &Topology, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
    let vip = topo.vip_tcp();
    topo.client.run(move || {
        let (mut counts, mut failures) = (BTreeMap::new(), Vec::new());
        for i in 0..n {
            match tcp_request(vip) {
                Ok((backend, _)) => *counts.entry(backend).or_insert(0) += 1,
                Err(e) => failures.push(format!("new connection {i}: {e}")),
            }
        }
        (counts, failures)
    })
}

/// The `web` service's backends in a status snapshot, by address.
fn web_backends(status: &Value) -> BTreeMap<String, Value> {
    let web = status["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .unwrap_or_else(|| panic!("no service web in status: {status}"));
    web["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("web has no backends array: {web}"))
        .iter()
        .map(|b| (b["address"].as_str().expect("address").to_owned(), b.clone()))
        .collect()
}

/// The configuration part of a status snapshot: services and backends with
/// their state, weight and table place, without counters or open flows.
fn config_view(status: &Value) -> Value {
    let services: Vec<Value> = status["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| {
            let backends: Vec<Value> = s["backends"]
                .as_array()
                .expect("backends")
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "address": b["address"], "state": b["state"], "weight": b["weight"],
                        "in_table": b["in_table"], "table_share": b["table_share"],
                    })
                })
                .collect();
            serde_json::json!({
                "name": s["name"], "vip": s["vip"], "port": s["port"], "protocol": s["protocol"],
                "interfaces": s["interfaces"], "backends": backends,
            })
        })
        .collect();
    Value::Array(services)
}

fn events(status: &Value) -> Vec<String> {
    status["events"]
        .as_array()
        .map_or_else(Vec::new, |e| e.iter().filter_map(|e| e["message"].as_str().map(str::to_owned)).collect())
}

/// Poll the status every 50 ms until `pred` holds for it; returns the time
/// since `since` when it did, or panics with the last status once `limit`
/// has passed since then.
fn poll_status(agent: &Agent, since: Instant, limit: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Duration {
    loop {
        let status = agent.status();
        if pred(&status) {
            return since.elapsed();
        }
        if since.elapsed() > limit {
            panic!("{what}: not within {limit:?}; last status: {:#}", config_view(&status));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A stop flag for a client thread, raised on drop too, so a failing test
/// does not leave its client running into the next test.
struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    fn new() -> StopFlag {
        StopFlag(Arc::new(AtomicBool::new(false)))
    }
    fn raise(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Drop for StopFlag {
    fn drop(&mut self) {
        self.raise();
    }
}

// ---------------------------------------------------------------------------
// 1. Twenty changes under held connections

/// One step of the change script.
enum Change {
    /// Rewrite the config file with exactly these (backend, weight).
    Config(&'static [(&'static str, u32)]),
    Add(&'static str, u32),
    Remove(&'static str),
    Weight(&'static str, u32),
}

/// A run-time change to one backend of `web`, as the model keeps it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Run {
    /// A backend of the file, with another weight.
    Weight(u32),
    /// Added through the API.
    Added(u32),
    Removed,
}

/// What the agent should serve for the `web` service, written out from the
/// README's rule: the file's backends (name -> weight), with the API's
/// changes laid over them until the file agrees with one (or no longer
/// lists a reweighted backend). Removed (draining) backends are out of the
/// table, drained away or not.
#[derive(Default)]
struct Model {
    file: BTreeMap<&'static str, u32>,
    runs: BTreeMap<&'static str, Run>,
}

impl Model {
    fn apply(&mut self, change: &Change) {
        match change {
            Change::Config(members) => self.file = members.iter().copied().collect(),
            Change::Add(name, w) => {
                assert!(!self.effective().contains_key(name), "script error: {name} is active already");
                self.runs.insert(name, if self.file.contains_key(name) { Run::Weight(*w) } else { Run::Added(*w) });
            }
            Change::Remove(name) => {
                self.runs.insert(name, Run::Removed);
            }
            Change::Weight(name, w) => {
                assert!(self.effective().contains_key(name), "script error: {name} may have drained away");
                let added = matches!(self.runs.get(name), Some(Run::Added(_)));
                self.runs.insert(name, if added { Run::Added(*w) } else { Run::Weight(*w) });
            }
        }
        let file = &self.file;
        self.runs.retain(|name, run| match (*run, file.get(name).copied()) {
            (Run::Weight(w), f) => f.is_some_and(|f| f != w),
            (Run::Added(w), f) => f != Some(w),
            (Run::Removed, f) => f.is_some(),
        });
    }

    /// The backends in the effective config, with their weights.
    fn effective(&self) -> BTreeMap<&'static str, u32> {
        let mut e = self.file.clone();
        for (name, run) in &self.runs {
            match run {
                Run::Weight(w) | Run::Added(w) => e.insert(name, *w),
                Run::Removed => e.remove(name),
            };
        }
        e
    }

    fn in_table(&self) -> BTreeSet<String> {
        self.effective().iter().filter(|(_, w)| **w > 0).map(|(n, _)| n.to_string()).collect()
    }
}

#[test]
fn root_held_connections_survive_twenty_backend_changes() {
    require_root!("root_held_connections_survive_twenty_backend_changes");
    use Change::*;
    const INITIAL: &[(&str, u32)] = &[("web-1", 1), ("web-2", 1), ("web-3", 1), ("web-4", 1)];
    // Config rewrites and API calls, mixed: adds, removals (drains), weight
    // changes, re-adding draining backends, weight 0, a big cut, and back.
    // Each config rewrite differs from the previous file, so the agent
    // applies it rather than logging "config unchanged"; the API's changes
    // stay laid over each (step 13 keeps web-5 at weight 0).
    let script: [Change; 20] = [
        Add("web-5", 1),
        Config(&[("web-1", 1), ("web-2", 3), ("web-3", 1), ("web-4", 1), ("web-5", 1)]),
        Weight("web-3", 2),
        Remove("web-1"),
        Config(&[("web-2", 3), ("web-3", 2), ("web-4", 1), ("web-5", 1)]),
        Add("web-6", 2),
        Config(&[("web-1", 1), ("web-2", 3), ("web-3", 2), ("web-4", 1), ("web-5", 1), ("web-6", 2)]),
        Remove("web-4"),
        Weight("web-2", 1),
        Config(&[("web-1", 1), ("web-3", 5), ("web-5", 1), ("web-6", 2)]),
        Add("web-2", 2),
        Weight("web-5", 0),
        Config(&[("web-1", 1), ("web-2", 2), ("web-3", 5), ("web-5", 4), ("web-6", 2)]),
        Remove("web-6"),
        Config(&[("web-1", 1), ("web-2", 2), ("web-3", 1), ("web-4", 1), ("web-5", 4)]),
        Weight("web-1", 10),
        Add("web-6", 1),
        Config(&[("web-3", 1), ("web-6", 1)]),
        Add("web-1", 1),
        Config(&[("web-1", 1), ("web-2", 1), ("web-3", 1), ("web-4", 1), ("web-5", 1), ("web-6", 1)]),
    ];
    // A drain outlasts the test: held connections to removed backends stay
    // in the table's care (their servers keep running).
    let extra = "drain_timeout = \"60s\"";
    let topo = Topology::build(Options::with_backends(&names(6)));
    topo.write_raw_config(&topo.config_toml_with(INITIAL, extra));
    let mut agent = topo.start_agent();
    let started = Instant::now();
    let mut model = Model::default();
    model.apply(&Config(INITIAL));

    let mut held = hold(&topo, 30);
    let spread = per_backend(&held);
    println!("held connections per backend: {spread:?}");
    assert_eq!(spread.len(), 4, "30 held connections did not reach all 4 backends: {spread:?}");

    let mut failures: Vec<String> = Vec::new();
    let (mut new_ok, mut echoes) = (0, 0);
    for (step, change) in script.iter().enumerate() {
        let step = step + 1;
        let what = match change {
            Config(members) => {
                agent.reload_with(|| {
                    topo.write_raw_config(&topo.config_toml_with(members, extra));
                });
                format!("config {members:?}")
            }
            Add(name, w) => {
                let addr = topo.backend(name).tcp_addr();
                agent.api_ok(&format!(r#"{{"op":"add_backend","service":"web","address":"{addr}","weight":{w}}}"#));
                format!("api add {name} weight {w}")
            }
            Remove(name) => {
                let addr = topo.backend(name).tcp_addr();
                agent.api_ok(&format!(r#"{{"op":"remove_backend","service":"web","address":"{addr}"}}"#));
                format!("api remove {name}")
            }
            Weight(name, w) => {
                let addr = topo.backend(name).tcp_addr();
                agent.api_ok(&format!(r#"{{"op":"set_weight","service":"web","address":"{addr}","weight":{w}}}"#));
                format!("api weight {name} {w}")
            }
        };
        model.apply(change);
        let want = model.in_table();

        // The agent's view agrees with the model.
        let status = agent.status();
        let table: BTreeSet<String> = web_backends(&status)
            .values()
            .filter(|b| b["in_table"] == true)
            .map(|b| topo.backends.iter().find(|t| t.tcp_addr().to_string() == b["address"]).unwrap().name.clone())
            .collect();
        if table != want {
            failures.push(format!("step {step} ({what}): status has {table:?} in the table, expected {want:?}"));
        }

        let f = echo_all(&mut held, &format!("step {step}"));
        echoes += held.len() - f.len();
        failures.extend(f);
        let (counts, f) = new_connections(&topo, 20);
        new_ok += 20 - f.len();
        failures.extend(f.into_iter().map(|e| format!("step {step} ({what}): {e}")));
        for b in counts.keys() {
            if !want.contains(b) {
                failures.push(format!("step {step} ({what}): a new connection reached {b}, not in the table {want:?}"));
            }
        }
        println!("step {step:>2}: {what:<70} table {want:?}, new connections {counts:?}");
    }
    println!(
        "20 changes in {:.1?}: {echoes} held-connection echoes and {new_ok} new connections succeeded, {} failures",
        started.elapsed(),
        failures.len()
    );
    eprintln!(
        "MEASURED: twenty_changes: {} failures, {echoes} held echoes ok, {new_ok} new connections ok",
        failures.len()
    );
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

// ---------------------------------------------------------------------------
// 2. Health checks

#[test]
fn root_failed_backend_leaves_table() {
    require_root!("root_failed_backend_leaves_table");
    let (interval, timeout, rise, fall) = (Duration::from_millis(200), Duration::from_millis(200), 2, 2);
    let check = format!(
        "health_check = {{ kind = \"tcp\", interval = \"{}ms\", timeout = \"{}ms\", rise = {rise}, fall = {fall} }}",
        interval.as_millis(),
        timeout.as_millis()
    );
    let (mut topo, mut agent) = start(3, &check);
    let victim = topo.backend("web-2").tcp_addr().to_string();
    // All up to begin with.
    poll_status(&agent, Instant::now(), Duration::from_secs(3), "all backends active", |s| {
        web_backends(s).values().all(|b| b["state"] == "active" && b["in_table"] == true)
    });

    // The clock starts before the stop: the listener closes within the
    // server's 50 ms poll, so this errs towards a longer figure.
    let killed = Instant::now();
    topo.stop_backend("web-2");
    let down = poll_status(&agent, killed, Duration::from_secs(10), "web-2 down", |s| {
        web_backends(s).get(&victim).is_some_and(|b| b["state"] == "down" && b["in_table"] == false)
    });
    let bound = interval * (fall + 1) + timeout + Duration::from_secs(2);
    eprintln!(
        "MEASURED: health_down: {} ms from killing web-2's server to state down and out of the table \
         (interval {} ms, fall {fall}; bound {} ms)",
        down.as_millis(),
        interval.as_millis(),
        bound.as_millis()
    );
    assert!(down <= bound, "took {down:?} to mark web-2 down, bound {bound:?}");
    assert!(agent.count("backend down: out of the table") >= 1, "no down event logged:\n{}", agent.log());

    // A reload that edits only the check's interval keeps web-2 down: its
    // health is its own, not the check's.
    let slower = check.replace(&format!("interval = \"{}ms\"", interval.as_millis()), "interval = \"300ms\"");
    assert_ne!(slower, check);
    let members = [("web-1", 1), ("web-2", 1), ("web-3", 1)];
    agent.reload_with(|| {
        topo.write_raw_config(&topo.config_toml_with(&members, &slower));
    });
    let after = web_backends(&agent.status());
    assert!(after[&victim]["state"] == "down" && after[&victim]["in_table"] == false, "{}", after[&victim]);

    let (counts, failures) = new_connections(&topo, 200);
    println!("200 new connections with web-2 down: {counts:?}");
    assert!(failures.is_empty(), "{} of 200 failed: {failures:?}", failures.len());
    assert!(!counts.contains_key("web-2"), "a new connection reached the dead web-2: {counts:?}");

    let restarted = Instant::now();
    topo.start_backend("web-2");
    let up = poll_status(&agent, restarted, Duration::from_secs(10), "web-2 back", |s| {
        web_backends(s).get(&victim).is_some_and(|b| b["state"] == "active" && b["in_table"] == true)
    });
    let up_bound = interval * (rise + 1) + timeout + Duration::from_secs(2);
    eprintln!(
        "MEASURED: health_up: {} ms from restarting web-2's server to active and back in the table \
         (rise {rise}; bound {} ms)",
        up.as_millis(),
        up_bound.as_millis()
    );
    assert!(up <= up_bound, "took {up:?} to bring web-2 back, bound {up_bound:?}");
    let (counts, failures) = new_connections(&topo, 200);
    println!("200 new connections with web-2 back: {counts:?}");
    assert!(failures.is_empty(), "{} of 200 failed: {failures:?}", failures.len());
    assert!(counts.contains_key("web-2"), "web-2 is back but got no new connection: {counts:?}");
}

// ---------------------------------------------------------------------------
// 3. Drains

#[test]
fn root_drained_backend_finishes_its_connections() {
    require_root!("root_drained_backend_finishes_its_connections");
    let (topo, mut agent) = start(3, "");
    let mut held = hold(&topo, 24);
    let spread = per_backend(&held);
    println!("held connections per backend: {spread:?}");
    assert_eq!(spread.len(), 3, "24 held connections did not reach all 3 backends: {spread:?}");

    // Part 1: remove web-2; its connections finish on their own.
    let victim = topo.backend("web-2").tcp_addr().to_string();
    let to_victim = spread["web-2"];
    agent.api_ok(&format!(r#"{{"op":"remove_backend","service":"web","address":"{victim}"}}"#));
    let status = agent.status();
    let b = &web_backends(&status)[&victim];
    println!("web-2 after remove_backend: {b}");
    assert_eq!(b["state"], "draining", "{b}");
    assert_eq!(b["in_table"], false, "{b}");
    assert_eq!(
        b["open_connections"].as_u64(),
        Some(to_victim as u64),
        "the data plane's open count for web-2 is not the {to_victim} connections held to it: {b}"
    );
    eprintln!("MEASURED: drain_open_connections: status {} == held {to_victim}", b["open_connections"]);

    let (counts, failures) = new_connections(&topo, 100);
    println!("100 new connections while web-2 drains: {counts:?}");
    assert!(failures.is_empty(), "{failures:?}");
    assert!(!counts.contains_key("web-2"), "a new connection reached the draining web-2: {counts:?}");
    let failures = echo_all(&mut held, "draining");
    assert!(failures.is_empty(), "held connections broke during the drain: {failures:?}");

    let closed = Instant::now();
    held.retain(|c| c.backend != "web-2");
    let gone = poll_status(&agent, closed, Duration::from_secs(5), "web-2 drained", |s| {
        !web_backends(s).contains_key(&victim)
    });
    let status = agent.status();
    let drained_event = format!("web: {victim} drained");
    assert!(events(&status).iter().any(|e| e == &drained_event), "no {drained_event:?} event: {:?}", events(&status));
    agent.wait_for("drained", 1, Duration::from_secs(1));
    eprintln!(
        "MEASURED: drain_end: {} ms from closing web-2's connections to web-2 leaving the status",
        gone.as_millis()
    );
    let failures = echo_all(&mut held, "after the drain");
    assert!(failures.is_empty(), "{failures:?}");

    // Part 2: with drain_timeout 2s, a backend whose connections stay open
    // is cut when the deadline passes.
    agent.reload_with(|| {
        topo.write_raw_config(
            &topo.config_toml_with(&[("web-1", 1), ("web-2", 1), ("web-3", 1)], "drain_timeout = \"2s\""),
        );
    });
    let victim = topo.backend("web-3").tcp_addr().to_string();
    let to_victim = held.iter().filter(|c| c.backend == "web-3").count();
    assert!(to_victim > 0);
    let removed = Instant::now();
    agent.api_ok(&format!(r#"{{"op":"remove_backend","service":"web","address":"{victim}"}}"#));
    let status = agent.status();
    let b = &web_backends(&status)[&victim];
    assert_eq!(b["state"], "draining", "{b}");
    assert_eq!(b["open_connections"].as_u64(), Some(to_victim as u64), "{b}");
    let left = b["drain_seconds_left"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=2.0).contains(&left), "drain_seconds_left {left}: {b}");
    let gone = poll_status(&agent, removed, Duration::from_secs(6), "web-3 cut at its drain deadline", |s| {
        !web_backends(s).contains_key(&victim)
    });
    let status = agent.status();
    let deadline_event = events(&status)
        .into_iter()
        .find(|e| e.starts_with(&format!("web: {victim} drain deadline passed")))
        .unwrap_or_else(|| panic!("no deadline event for {victim}: {:?}", events(&status)));
    println!("event: {deadline_event}");
    assert!(agent.count("drain deadline passed; open flows cut") >= 1, "{}", agent.log());
    eprintln!(
        "MEASURED: drain_deadline: web-3 left the status {} ms after remove_backend (drain_timeout 2000 ms, \
         {to_victim} connections still open)",
        gone.as_millis()
    );
    assert!(gone >= Duration::from_millis(1900), "web-3 went after {gone:?}, before its 2 s deadline");
    assert!(gone <= Duration::from_secs(4), "web-3 went only after {gone:?}");
}

// ---------------------------------------------------------------------------
// 4. SIGKILL and restart

#[test]
fn root_agent_sigkill_and_restart_is_hitless() {
    require_root!("root_agent_sigkill_and_restart_is_hitless");
    let (topo, mut agent) = start(3, "");
    let vip = topo.vip_tcp();
    let stop = StopFlag::new();
    let opened = Arc::new(AtomicUsize::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // New connections every ~7 ms, and an echo on each of 10 held ones every
    // 10th round; returns (connections, echoes, failures, held connections).
    let client = {
        let (stop, opened) = (stop.0.clone(), opened.clone());
        topo.client.spawn(move || {
            let mut held: Vec<Conn> =
                (0..10).map(|i| Conn::open(vip).unwrap_or_else(|e| panic!("held {i}: {e}"))).collect();
            ready_tx.send(()).ok();
            let (mut failures, mut echoes) = (Vec::new(), 0usize);
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut round = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match tcp_request(vip) {
                    Ok(_) => {
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(format!("new connection {round}: {e}")),
                }
                if round.is_multiple_of(10) {
                    let f = echo_all(&mut held, &format!("round {round}"));
                    echoes += held.len() - f.len();
                    failures.extend(f);
                }
                round += 1;
                thread::sleep(Duration::from_millis(7));
            }
            (opened.load(Ordering::Relaxed), echoes, failures, held)
        })
    };
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("client did not open its held connections");
    thread::sleep(Duration::from_millis(500));

    let before_kill = opened.load(Ordering::Relaxed);
    let killed_pid = agent.pid();
    let status = agent.kill().expect("exit status");
    println!("SIGKILLed lb-agent pid {killed_pid}: {status}");
    let attached = topo.lb_xdp_attachments();
    assert_eq!(attached.len(), topo.lb_interfaces().len(), "XDP gone with the agent: {attached:?}");
    thread::sleep(Duration::from_secs(1));
    let without_agent = opened.load(Ordering::Relaxed) - before_kill;
    eprintln!("MEASURED: restart: {without_agent} new connections served in the 1 s with no agent running");
    assert!(without_agent >= 50, "only {without_agent} connections in 1 s without the agent");

    let respawned = Instant::now();
    agent.respawn();
    agent.wait_ready();
    let ready_after = respawned.elapsed();
    assert!(agent.count("adopting pinned state") == 1, "the new agent did not adopt the pins:\n{}", agent.log());
    assert!(agent.count("adopted pinned XDP link") >= 1, "the new agent did not take over the links:\n{}", agent.log());
    eprintln!("MEASURED: restart: new agent (pid {}) ready {} ms after spawn", agent.pid(), ready_after.as_millis());
    thread::sleep(Duration::from_secs(1));
    stop.raise();
    let (total, echoes, mut failures, mut held) = client.join().expect("client thread");
    failures.extend(echo_all(&mut held, "after the restart"));
    eprintln!(
        "MEASURED: restart: {total} new connections and {echoes} held echoes across SIGKILL + restart, {} failures",
        failures.len()
    );
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    drop(held);

    // `lb-agent stop` removes everything.
    let pin_dir = topo.pin_dir();
    let out = stop_cli(&topo);
    assert!(out.status.success(), "lb-agent stop failed: {out:?}");
    let exit = agent.wait_exit(Duration::from_secs(10)).expect("the agent did not exit after `lb-agent stop`");
    assert!(exit.success(), "agent exited with {exit}:\n{}", agent.log());
    let links = topo.lb_links();
    assert!(xdp_attachments(&links).is_empty(), "XDP left after `lb-agent stop`:\n{links}");
    let left: Vec<_> =
        std::fs::read_dir(&pin_dir).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "pinned state left under {}: {left:?}", pin_dir.display());
    println!("lb-agent stop: {} XDP gone, pin dir {} empty", out.stdout.trim(), pin_dir.display());
}

/// A backend that is down when the agent is SIGKILLed stays out of the
/// table after the restart (the pinned table had it out) until it passes
/// its checks again: no client is sent to it in between.
#[test]
fn root_a_backend_down_before_a_restart_stays_out_until_it_passes() {
    require_root!("root_a_backend_down_before_a_restart_stays_out_until_it_passes");
    let check = r#"health_check = { kind = "tcp", interval = "200ms", timeout = "200ms", rise = 2, fall = 2 }"#;
    let (mut topo, mut agent) = start(3, check);
    let victim = topo.backend("web-2").tcp_addr().to_string();
    let is = |state: &'static str, in_table: bool| {
        let victim = victim.clone();
        move |s: &Value| web_backends(s).get(&victim).is_some_and(|b| b["state"] == state && b["in_table"] == in_table)
    };
    poll_status(&agent, Instant::now(), Duration::from_secs(3), "web-2 active", is("active", true));
    topo.stop_backend("web-2");
    poll_status(&agent, Instant::now(), Duration::from_secs(5), "web-2 down", is("down", false));
    agent.kill();

    // New connections from before the restart until well after it: the
    // checks fail `fall` times in 400 ms, so a web-2 put back at start-up
    // would refuse some of them.
    let vip = topo.vip_tcp();
    let stop = StopFlag::new();
    let client = {
        let stop = stop.0.clone();
        topo.client.spawn(move || {
            let (mut counts, mut failures) = (BTreeMap::<String, usize>::new(), Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match tcp_request(vip) {
                    Ok((backend, _)) => *counts.entry(backend).or_insert(0) += 1,
                    Err(e) => failures.push(e.to_string()),
                }
                thread::sleep(Duration::from_millis(5));
            }
            (counts, failures)
        })
    };
    thread::sleep(Duration::from_millis(300));
    agent.respawn();
    agent.wait_ready();
    assert_eq!(agent.count("adopting pinned state"), 1, "the new agent did not adopt the pins:\n{}", agent.log());
    thread::sleep(Duration::from_secs(2));
    let status = agent.status();
    stop.raise();
    let (counts, failures) = client.join().expect("client thread");
    println!("new connections across the restart with web-2 down: {counts:?}, {} failures", failures.len());
    assert!(failures.is_empty(), "{} failed: {failures:?}\n{}", failures.len(), agent.log());
    assert!(!counts.contains_key("web-2"), "a connection reached the dead web-2: {counts:?}");
    assert!(is("down", false)(&status), "web-2 after the restart: {:#}", config_view(&status));

    let restarted = Instant::now();
    topo.start_backend("web-2");
    let up = poll_status(&agent, restarted, Duration::from_secs(5), "web-2 back", is("active", true));
    eprintln!("MEASURED: restart: web-2 back in the table {} ms after its server came back", up.as_millis());
    let (counts, failures) = new_connections(&topo, 100);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(counts.contains_key("web-2"), "web-2 is back but got no new connection: {counts:?}");
}

/// A UDP client that keeps sending from one port stays on its backend;
/// when that backend fails its checks the flow is flushed, and the flow's
/// next datagrams are answered by another backend.
#[test]
fn root_a_udp_flow_moves_off_a_backend_that_goes_down() {
    require_root!("root_a_udp_flow_moves_off_a_backend_that_goes_down");
    let mut topo = Topology::build(Options::with_backends(&names(3)));
    // The UDP service's check connects over TCP to the backend's UDP port;
    // a listener there (never accepting: the kernel completes the
    // handshakes) stands for the backend's health.
    let mut listeners: BTreeMap<String, std::net::TcpListener> = topo
        .backends
        .iter()
        .map(|b| {
            let addr = b.udp_addr();
            (b.name.clone(), b.ns.run(move || std::net::TcpListener::bind(addr).expect("check listener")))
        })
        .collect();
    let members: Vec<(&str, u32)> = topo.backends.iter().map(|b| (b.name.as_str(), 1)).collect();
    let check = r#"health_check = { kind = "tcp", interval = "200ms", timeout = "200ms", rise = 2, fall = 2 }"#;
    let config = topo.config_toml(&members).replace("protocol = \"udp\"\n", &format!("protocol = \"udp\"\n{check}\n"));
    assert!(config.contains(check), "no check in:\n{config}");
    topo.write_raw_config(&config);
    let agent = topo.start_agent();

    // One socket, one flow: a datagram every 20 ms, each answer's backend
    // with its time.
    let vip = topo.vip_udp();
    let stop = StopFlag::new();
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let client = {
        let stop = stop.0.clone();
        topo.client.spawn(move || {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
            socket.connect(vip).expect("connect");
            socket.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
            let mut answers: Vec<(Instant, String)> = Vec::new();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                let _ = socket.send(b"hello\n");
                if let Ok(n) = socket.recv(&mut buf) {
                    let name = String::from_utf8_lossy(&buf[..n]).trim_end().to_owned();
                    if answers.is_empty() {
                        first_tx.send(name.clone()).ok();
                    }
                    answers.push((Instant::now(), name));
                }
                thread::sleep(Duration::from_millis(20));
            }
            answers
        })
    };
    let first = first_rx.recv_timeout(Duration::from_secs(5)).expect("no answer to the UDP flow");
    thread::sleep(Duration::from_millis(500));

    let killed = Instant::now();
    listeners.remove(&first);
    topo.stop_backend(&first);
    let victim = topo.backend(&first).udp_addr().to_string();
    let dns_down = |s: &Value| {
        s["services"].as_array().into_iter().flatten().filter(|svc| svc["name"] == "dns").any(|svc| {
            svc["backends"].as_array().into_iter().flatten().any(|b| b["address"] == victim && b["state"] == "down")
        })
    };
    let down = poll_status(&agent, killed, Duration::from_secs(5), "the flow's backend down", dns_down);
    thread::sleep(Duration::from_secs(2));
    stop.raise();
    let answers = client.join().expect("client thread");
    let after: Vec<&String> = answers.iter().filter(|(t, _)| *t > killed + down).map(|(_, n)| n).collect();
    let moved_at = answers.iter().find(|(t, n)| *t > killed && *n != first).map(|(t, _)| t.duration_since(killed));
    eprintln!(
        "MEASURED: udp flow on {first}: marked down {} ms after its backend stopped, first answered by another backend \
         {} ms after it stopped; {} answers after the down",
        down.as_millis(),
        moved_at.map_or("never".into(), |d| d.as_millis().to_string()),
        after.len()
    );
    assert!(after.len() >= 20, "the flow got {} answers in the 2 s after its backend went down", after.len());
    assert!(after.iter().all(|n| **n != first), "answers from the stopped {first}: {after:?}");
    assert!(after.windows(2).all(|w| w[0] == w[1]), "the moved flow changed backend again: {after:?}");
}

/// `lb-agent stop` for `topo`'s agent and pin directory.
fn stop_cli(topo: &Topology) -> lb_lab::agent::CliOutput {
    run_agent_cli(&[
        "stop".as_ref(),
        "--api-socket".as_ref(),
        topo.api_socket().as_os_str(),
        "--pin-dir".as_ref(),
        topo.pin_dir().as_os_str(),
    ])
}

/// A map pinned under the agent's pin directory that differs from what the
/// program expects (here BACKENDS with 8 entries, not MAX_BACKENDS) is
/// refused before anything is adopted, with both shapes and the way out;
/// that way out (`lb-agent stop --pin-dir`) then lets an agent start.
#[test]
fn root_a_pinned_map_of_another_size_is_refused() {
    require_root!("root_a_pinned_map_of_another_size_is_refused");
    let (topo, mut agent) = start(1, "");
    agent.kill();
    let maps = topo.pin_dir().join(format!("v{}", lb_common::ABI_VERSION)).join("maps");
    let pin = maps.join(lb_common::BACKENDS);
    std::fs::remove_file(&pin).expect("unpin BACKENDS");
    let mut loader = aya::EbpfLoader::new();
    loader.map_max_entries(lb_common::BACKENDS, 8).map_pin_path(lb_common::BACKENDS, &pin);
    drop(loader.load(lb_agent::ebpf::object()).expect("pin a BACKENDS map of 8 entries"));
    assert!(pin.exists(), "no map pinned at {}", pin.display());

    agent.respawn();
    let exit = agent.wait_exit(Duration::from_secs(10)).expect("the agent did not exit on a mismatched pin");
    assert!(!exit.success(), "the agent adopted a mismatched pin:\n{}", agent.log());
    let log = agent.log();
    for needle in ["the pinned map BACKENDS", "max entries: expected 4096, found 8", "lb-agent stop --pin-dir"] {
        assert!(log.contains(needle), "no {needle:?} in the refusal:\n{log}");
    }
    assert_eq!(agent.count("adopting pinned state"), 0, "{log}");
    println!("refused: {}", log.lines().find(|l| l.contains("the pinned map")).unwrap_or_default());

    let out = stop_cli(&topo);
    assert!(out.status.success(), "lb-agent stop failed: {out:?}");
    agent.respawn();
    agent.wait_ready();
    let (_, failures) = new_connections(&topo, 3);
    assert!(failures.is_empty(), "after `lb-agent stop` and a fresh start: {failures:?}\n{}", agent.log());
}

/// `ip netns exec` gives the agent a mount namespace of its own, where the
/// bpffs it would mount for its pins dies with it (a `kill -9` would detach
/// everything): it refuses to start, attaches nothing, and names the command
/// to use instead.
#[test]
fn root_agent_under_ip_netns_exec_refuses_pins_that_would_not_outlive_it() {
    require_root!("root_agent_under_ip_netns_exec_refuses_pins_that_would_not_outlive_it");
    let topo = Topology::build(Options::with_backends(&names(1)));
    topo.write_config_all();
    let args = topo.agent_args();
    let run = || {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", topo.lb.name()]).arg(lb_lab::agent::agent_bin()).arg("run");
        cmd.arg("--config").arg(&args.config).arg("--api-socket").arg(&args.api_socket);
        cmd.args(["--metrics-address", "off", "--pin-dir"]).arg(args.pin_dir.as_ref().expect("a pin dir"));
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.spawn().expect("spawn ip netns exec lb-agent run")
    };
    let mut child = run();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("poll the agent").is_none() {
        if Instant::now() > deadline {
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let out = child.wait_with_output().expect("wait for the agent");
            panic!(
                "the agent started with pins in a private mount namespace:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    let refused = child.wait_with_output().expect("wait for the agent");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the agent started with pins in a private mount namespace:\n{stderr}");
    let want = format!("`nsenter --net=/run/netns/{} lb-agent run ...`; or run without pins: --no-pin", topo.lb.name());
    assert!(stderr.contains("`ip netns exec` makes one") && stderr.contains(&want), "{stderr}");
    assert!(topo.lb_xdp_attachments().is_empty(), "attached although refused: {}", topo.lb_links());
    println!("refused: {}", stderr.trim());
}

// ---------------------------------------------------------------------------
// 5. Control API refusals

#[test]
fn root_control_api_rejects_garbage_and_changes_nothing() {
    require_root!("root_control_api_rejects_garbage_and_changes_nothing");
    let (topo, agent) = start(2, "");
    let before = config_view(&agent.status());
    let b1 = topo.backend("web-1").tcp_addr();
    let long = format!(r#"{{"op":"status","pad":"{}"}}"#, "x".repeat(70_000));
    let cases: Vec<(String, &str)> = vec![
        ("this is not json".into(), "bad request"),
        ("[1, 2, 3]".into(), "bad request"),
        ("{}".into(), "missing field `op`"),
        (r#"{"op":"explode"}"#.into(), "unknown \"explode\""),
        (r#"{"op":"status","service":"web"}"#.into(), "status takes no \"service\""),
        (r#"{"op":"status","colour":"red"}"#.into(), "unknown field `colour`"),
        (r#"{"op":"add_backend","service":"web"}"#.into(), "add_backend needs \"address\""),
        (r#"{"op":"add_backend","address":"10.200.9.2:8080"}"#.into(), "add_backend needs \"service\""),
        (format!(r#"{{"op":"set_weight","service":"web","address":"{b1}"}}"#), "set_weight needs \"weight\""),
        (r#"{"op":"add_backend","service":"web","address":"10.200.9.2"}"#.into(), "is not an IPv4 address with a port"),
        (r#"{"op":"add_backend","service":"web","address":"300.1.1.1:80"}"#.into(), "is not an IPv4 address"),
        (r#"{"op":"add_backend","service":"web","address":"10.200.9.2:0"}"#.into(), "port 0"),
        (r#"{"op":"add_backend","service":"web","address":"10.200.255.1:8080"}"#.into(), "own VIP"),
        (format!(r#"{{"op":"set_weight","service":"web","address":"{b1}","weight":-1}}"#), "weight: -1 is not in"),
        (
            format!(r#"{{"op":"set_weight","service":"web","address":"{b1}","weight":10001}}"#),
            "weight: 10001 is not in",
        ),
        (format!(r#"{{"op":"set_weight","service":"web","address":"{b1}","weight":"3"}}"#), "bad request"),
        (format!(r#"{{"op":"add_backend","service":"nope","address":"{b1}"}}"#), "no service named \"nope\""),
        (
            r#"{"op":"remove_backend","service":"web","address":"10.200.9.2:8080"}"#.into(),
            "has no backend 10.200.9.2:8080",
        ),
        (r#"{"op":"set_weight","service":"web","address":"10.200.9.2:8080","weight":2}"#.into(), "has no backend"),
        (format!(r#"{{"op":"add_backend","service":"web","address":"{b1}"}}"#), "already has backend"),
        (format!(r#"{{"op":"remove_backend","service":"web","address":"{b1}","weight":1}}"#), "takes no \"weight\""),
        (long, "longer than 65536 bytes"),
    ];
    let mut problems = Vec::new();
    for (line, says) in &cases {
        let answer = agent.api(line);
        let error = answer["error"].as_str().unwrap_or_default();
        println!("{:<90} -> {answer}", format!("{line:.90}"));
        if answer["ok"] != false || !error.contains(says) {
            problems.push(format!("{line:.120}: expected an error saying {says:?}, got {answer}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let after = config_view(&agent.status());
    assert_eq!(before, after, "the refused requests changed the services or backends");
    eprintln!("MEASURED: control_api: {} garbage requests refused, nothing changed", cases.len());
    let (counts, failures) = new_connections(&topo, 50);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");
}

/// A backend the data plane cannot reach is never shown as active: `backend
/// add` refuses one routed out of an interface the service does not list,
/// and a loopback one; a backend whose route moves there while the agent
/// runs is flagged `unroutable` (with the reason) and gets no new flows
/// until its route comes back.
#[test]
fn root_backends_the_lb_cannot_reach_are_refused_or_flagged() {
    require_root!("root_backends_the_lb_cannot_reach_are_refused_or_flagged");
    let (topo, agent) = start(2, "");
    // An interface of the LB's the service does not list (a veth pair
    // within its namespace), and a net behind it.
    let stray = "lbt-stray";
    topo.lb.exec("ip", &["link", "add", stray, "type", "veth", "peer", "name", "lbt-stray-p"]);
    for link in [stray, "lbt-stray-p"] {
        topo.lb.exec("ip", &["link", "set", link, "up"]);
    }
    topo.lb.exec("ip", &["route", "add", "10.250.1.0/24", "dev", stray]);

    let out = agent.cli(&["backend", "add", "web", "10.250.1.2:8080", "--weight", "2"]);
    println!("backend add behind {stray}: {out:?}");
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains(&format!("its route leaves by {stray}, which is not among the service's interfaces")));
    let out = agent.cli(&["backend", "add", "web", "127.0.0.1:8080"]);
    assert!(!out.status.success() && out.stderr.contains("loopback"), "{out:?}");
    assert_eq!(web_backends(&agent.status()).len(), 2, "a refused backend was registered");

    // web-2's route moves to the stray interface: flagged, out of the table.
    let web2 = topo.backend("web-2");
    let host_route = format!("{}/32", web2.addr);
    topo.lb.exec("ip", &["route", "add", &host_route, "dev", stray]);
    let b2 = web2.tcp_addr().to_string();
    let took = poll_status(&agent, Instant::now(), Duration::from_secs(5), "web-2 flagged", |s| {
        web_backends(s).get(&b2).is_some_and(|b| b["state"] == "unroutable")
    });
    eprintln!("MEASURED: unroutable: flagged {} ms after the route change", took.as_millis());
    let status = agent.status();
    let b = &web_backends(&status)[&b2];
    assert_eq!(b["in_table"], false, "{b}");
    assert!(b["reason"].as_str().unwrap_or_default().contains(&format!("its route leaves by {stray}")), "{b}");
    let table = agent.cli(&["status"]).stdout;
    assert!(table.contains(&format!("{b2} unroutable: its route leaves by {stray}")), "{table}");
    let (counts, failures) = new_connections(&topo, 20);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["web-1"], "{counts:?}");

    // The route comes back: so does web-2.
    topo.lb.exec("ip", &["route", "del", &host_route, "dev", stray]);
    poll_status(&agent, Instant::now(), Duration::from_secs(5), "web-2 back", |s| {
        web_backends(s).get(&b2).is_some_and(|b| b["state"] == "active" && b["in_table"] == true)
    });
    let (counts, failures) = new_connections(&topo, 40);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");
}

// ---------------------------------------------------------------------------
// 6. The status command line

#[test]
fn root_status_cli() {
    require_root!("root_status_cli");
    let (topo, mut agent) = start(3, "");
    new_connections(&topo, 30);

    let out = agent.cli(&["status"]);
    assert!(out.status.success(), "lb-agent status failed: {out:?}");
    println!("lb-agent status:\n{}", out.stdout);
    let table = &out.stdout;
    assert!(table.contains("service web  10.200.255.1:80/tcp  mode dnat"), "no web service line:\n{table}");
    assert!(table.contains("service dns  10.200.255.1:53/udp"), "no dns service line:\n{table}");
    for b in &topo.backends {
        let addr = b.tcp_addr().to_string();
        assert!(
            table.lines().any(|l| l.trim_start().starts_with(&addr) && l.contains("active")),
            "no line for {addr} as active:\n{table}"
        );
    }

    // A change through the command line shows in the table and the JSON.
    let b2 = topo.backend("web-2").tcp_addr().to_string();
    let out = agent.cli(&["backend", "weight", "web", &b2, "3"]);
    assert!(out.status.success(), "lb-agent backend weight failed: {out:?}");
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "lb-agent status --json failed: {out:?}");
    let json: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json: {e}:\n{}", out.stdout));
    let web = web_backends(&json);
    assert_eq!(web.len(), 3, "{web:?}");
    assert_eq!(web[&b2]["weight"], 3, "{}", web[&b2]);
    assert!(web.values().all(|b| b["state"] == "active"), "{web:?}");
    assert!(json["services"].as_array().is_some_and(|s| s.len() == 2));

    agent.stop().expect("agent exit");
    let out = agent.cli(&["status"]);
    println!("with no agent: {out:?}");
    assert!(!out.status.success(), "lb-agent status succeeded with no agent: {out:?}");
    assert!(out.stderr.contains("no lb-agent is running"), "{out:?}");
    let out = run_agent_cli(&["status", "--json", "--api-socket", "/nonexistent/lb-tests/api.sock"]);
    assert!(!out.status.success() && out.stderr.contains("no lb-agent is running"), "{out:?}");
}

/// Each backend's share of `web`'s table, by backend name, in percent.
fn shares(topo: &Topology, status: &Value) -> BTreeMap<String, u32> {
    web_backends(status)
        .values()
        .map(|b| {
            let name = topo.backends.iter().find(|t| t.tcp_addr().to_string() == b["address"]).unwrap().name.clone();
            (name, (b["table_share"].as_f64().unwrap() * 100.0).round() as u32)
        })
        .collect()
}

/// The issue's scenario: a weight set through the API survives an edit of
/// an unrelated line and a reload, which says so; `backend reset` brings the
/// file's weight back; `config dump` is a config `check` accepts.
#[test]
fn root_run_time_changes_survive_a_reload_until_reset() {
    require_root!("root_run_time_changes_survive_a_reload_until_reset");
    let (topo, agent) = start(3, "");
    let b3 = topo.backend("web-3").tcp_addr().to_string();
    let out = agent.cli(&["backend", "weight", "web", &b3, "2"]);
    assert!(out.status.success(), "{out:?}");
    let want = BTreeMap::from([("web-1".into(), 25), ("web-2".into(), 25), ("web-3".into(), 50)]);
    assert_eq!(shares(&topo, &agent.status()), want);

    // An unrelated line of the file changes (the drain timeout).
    let members = [("web-1", 1), ("web-2", 1), ("web-3", 1)];
    topo.write_raw_config(&topo.config_toml_with(&members, "drain_timeout = \"7s\""));
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let said = "config applied (api): no backend changed; 1 run-time change(s) kept, see `lb-agent config dump`";
    // The file watcher may have taken the edit first.
    let unchanged = "config unchanged (api); 1 run-time change(s) kept, see `lb-agent config dump`";
    assert!([said, unchanged].contains(&out.stdout.trim()), "reload said {:?}", out.stdout);
    let status = agent.status();
    assert_eq!(shares(&topo, &status), want, "the reload moved the shares");
    assert!(
        events(&status)
            .iter()
            .any(|e| e.ends_with("no backend changed; 1 run-time change(s) kept, see `lb-agent config dump`")),
        "{:?}",
        events(&status)
    );
    assert!(agent.count("config applied") >= 1, "the reload was not logged:\n{}", agent.log());
    let table = agent.cli(&["status"]).stdout;
    assert!(table.contains("run-time: weight 2, file says 1"), "status does not mark web-3:\n{table}");
    let (counts, failures) = new_connections(&topo, 200);
    assert!(failures.is_empty(), "{failures:?}");
    println!("200 new connections after the reload: {counts:?}");
    assert!(counts["web-3"] > counts["web-1"] && counts["web-3"] > counts["web-2"], "{counts:?}");

    // The effective config, as a file `check` accepts.
    let out = agent.cli(&["config", "dump"]);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("weight = 2 # run-time: weight 2, file says 1"), "{}", out.stdout);
    assert!(out.stdout.contains("drain_timeout = \"7s\""), "{}", out.stdout);
    let dumped = topo.config_path().with_file_name("dumped.toml");
    std::fs::write(&dumped, &out.stdout).unwrap();
    let path = dumped.clone();
    let check =
        topo.lb.run(move || run_agent_cli(&[std::ffi::OsStr::new("check"), "--config".as_ref(), path.as_os_str()]));
    assert!(check.status.success(), "check refused the dump: {check:?}\n{}", out.stdout);

    // Reset: the file's weight again, and the reply says what moved.
    let out = agent.cli(&["backend", "reset", "web"]);
    assert!(out.status.success(), "{out:?}");
    let reply = out.stdout.trim();
    assert!(reply.starts_with("reset web: 1 run-time change(s) dropped"), "{reply}");
    assert!(
        reply.contains(&format!("web: reweighted {b3} 2 -> 1, ")) && !reply.contains(" 0 slot(s) moved"),
        "{reply}"
    );
    let status = agent.status();
    let even = shares(&topo, &status);
    assert!(even.values().all(|s| (32..=34).contains(s)), "{even:?}");
    assert!(web_backends(&status)[&b3].get("run_time").is_none(), "{}", web_backends(&status)[&b3]);
}

// ---------------------------------------------------------------------------
// 7. Config change to first packet

#[test]
fn root_config_change_to_first_packet_at_new_backend() {
    require_root!("root_config_change_to_first_packet_at_new_backend");
    let topo = Topology::build(Options::with_backends(&names(5)));
    let mut members: Vec<(&str, u32)> = vec![("web-1", 1), ("web-2", 1)];
    topo.write_config(&members);
    let agent = topo.start_agent();
    let vip = topo.vip_tcp();
    let mut figures = Vec::new();
    for new in ["web-3", "web-4", "web-5"] {
        let stop = StopFlag::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let client = {
            let stop = stop.0.clone();
            topo.client.spawn(move || -> Result<(Instant, usize), String> {
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut n = 0;
                ready_tx.send(()).ok();
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let (backend, _) = tcp_request(vip).map_err(|e| format!("connection {n}: {e}"))?;
                    n += 1;
                    if backend == new {
                        return Ok((Instant::now(), n));
                    }
                }
                Err(format!("no connection reached {new} in {n} tries"))
            })
        };
        ready_rx.recv_timeout(Duration::from_secs(5)).expect("client did not start");
        thread::sleep(Duration::from_millis(100));
        members.push((new, 1));
        topo.write_config(&members);
        let written = Instant::now();
        let result = client.join().expect("client thread");
        let (answered, tries) = result.unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
        let took = answered.saturating_duration_since(written);
        eprintln!(
            "MEASURED: config_to_first_packet: {} ms from renaming the config (adding {new}) to its first answer \
             ({tries} connections in the loop)",
            took.as_millis()
        );
        assert!(took < Duration::from_secs(5), "{new} answered only after {took:?}");
        figures.push(took.as_millis());
    }
    eprintln!("MEASURED: config_to_first_packet: all trials (ms): {figures:?}");
}

/// Changing an interface's `checksums` setting swaps its program in place
/// (bpf_link_update): the held connections keep their backends and new ones
/// connect, with no moment without a program on the interface.
#[test]
fn root_checksum_setting_switches_the_program_in_place() {
    require_root!("root_checksum_setting_switches_the_program_in_place");
    let (topo, agent) = start(3, "");
    let checksums_of = |status: &Value, iface: &str| -> String {
        let ifaces = status["agent"]["interfaces"].as_array().cloned().unwrap_or_default();
        let i = ifaces.iter().find(|i| i["name"] == iface).unwrap_or_else(|| panic!("{iface} not in {ifaces:?}"));
        i["checksums"].as_str().unwrap_or_default().to_owned()
    };
    let client_iface = lb_lab::topology::LB_CLIENT_IFACE;
    // Veths are local stacks' interfaces: `auto` picks the partial-aware program.
    assert_eq!(checksums_of(&agent.status(), client_iface), "may-be-partial");
    let mut held = hold(&topo, 20);

    let members: Vec<(&str, u32)> = topo.backends.iter().map(|b| (b.name.as_str(), 1)).collect();
    let section = format!("[interface.{client_iface:?}]\n");
    let text = topo.config_toml(&members).replace(&section, &format!("{section}checksums = \"complete\"\n"));
    assert!(text.contains("checksums"), "{text}");
    topo.write_raw_config(&text);
    let took = poll_status(&agent, Instant::now(), Duration::from_secs(5), "switch to complete", |s| {
        checksums_of(s, client_iface) == "complete"
    });
    eprintln!("MEASURED: checksum setting applied {} ms after the config write", took.as_millis());
    assert!(agent.log().contains("switched program"), "no switch logged:\n{}", agent.log());
    // The other interfaces kept theirs.
    let status = agent.status();
    for b in topo.lb_interfaces().iter().filter(|i| i.as_str() != client_iface) {
        assert_eq!(checksums_of(&status, b), "may-be-partial", "{b}");
    }
    let failures = echo_all(&mut held, "after the switch");
    assert!(failures.is_empty(), "{failures:#?}");
    let (counts, failures) = new_connections(&topo, 30);
    assert!(failures.is_empty(), "{failures:#?} ({counts:?})");
    assert_eq!(topo.lb_xdp_attachments().len(), topo.lb_interfaces().len(), "{}", topo.lb_links());
}

// ---------------------------------------------------------------------------
// 9. The agent's own safety: a cut-short config, a second agent, the socket

#[test]
fn root_truncated_config_is_refused_and_the_old_one_serves() {
    require_root!("root_truncated_config_is_refused_and_the_old_one_serves");
    let (topo, agent) = start(2, "");
    let before = config_view(&agent.status());
    // A writer caught mid-write, in place: the file holds half of itself.
    let full = std::fs::read_to_string(topo.config_path()).expect("read the config");
    let cut = &full[..full.find("[[service]]").expect("a service") + 12];
    std::fs::write(topo.config_path(), cut).expect("write the cut-short config");
    let refused = Instant::now();
    poll_status(&agent, refused, Duration::from_secs(5), "the cut-short file refused", |s| {
        s["agent"]["config_refused"]["message"].as_str().is_some_and(|m| m.starts_with("config refused"))
    });
    let status = agent.status();
    println!("refusal in status: {}", status["agent"]["config_refused"]);
    assert_eq!(config_view(&status), before, "the cut-short file changed the running config");
    let (counts, failures) = new_connections(&topo, 40);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.len(), 2, "the old config does not serve both backends: {counts:?}");
    // An empty file likewise.
    std::fs::write(topo.config_path(), "").expect("empty the config");
    poll_status(&agent, Instant::now(), Duration::from_secs(5), "the empty file refused", |s| {
        s["agent"]["config_refused"]["message"].as_str().is_some_and(|m| m.contains("it is empty"))
    });
    assert_eq!(config_view(&agent.status()), before, "the empty file changed the running config");
    let (counts, failures) = new_connections(&topo, 40);
    assert!(failures.is_empty() && counts.len() == 2, "{counts:?} {failures:?}");
    eprintln!("MEASURED: reload: cut-short and empty config files refused; the old config served 80 connections");
}

#[test]
fn root_second_agent_and_stop_leave_a_running_agent_alone() {
    use std::os::unix::fs::PermissionsExt as _;
    require_root!("root_second_agent_and_stop_leave_a_running_agent_alone");
    let (topo, agent) = start(2, "");
    let pin_dir = topo.pin_dir();
    let mode = |p: &std::path::Path| std::fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(mode(&topo.api_socket()), 0o600, "the control socket's mode");
    let config = topo.config_path();
    let second = |socket: &std::path::Path| {
        run_agent_cli(&[
            "run".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--metrics-address".as_ref(),
            "off".as_ref(),
            "--api-socket".as_ref(),
            socket.as_os_str(),
            "--pin-dir".as_ref(),
            pin_dir.as_os_str(),
        ])
    };
    let pid = format!("(pid {})", agent.pid());
    // The same pin directory on another socket, in a directory of its own
    // (made 0700), and the same socket: refused, naming the first agent.
    let own = topo.dir().join("ctl");
    for socket in [own.join("api.sock"), topo.api_socket()] {
        let out = second(&socket);
        println!("second agent on {}: {out:?}", socket.display());
        assert!(!out.status.success() && out.stderr.contains(&pid), "a second agent was not refused: {out:?}");
    }
    assert_eq!(mode(&own), 0o700, "the socket directory the agent made");
    // A directory others can write to is refused, and left as it was.
    let shared = topo.dir().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let out = second(&shared.join("api.sock"));
    assert!(!out.status.success() && out.stderr.contains("others can write"), "{out:?}");
    assert_eq!(mode(&shared), 0o1777, "an existing directory's mode was changed");
    // `stop` through a socket no agent answers on keeps the running agent's pins.
    let out = run_agent_cli(&[
        "stop".as_ref(),
        "--api-socket".as_ref(),
        own.join("api.sock").as_os_str(),
        "--pin-dir".as_ref(),
        pin_dir.as_os_str(),
    ]);
    println!("stop with the agent running: {out:?}");
    assert!(!out.status.success() && out.stderr.contains(&pid), "stop did not refuse: {out:?}");
    assert!(std::fs::read_dir(&pin_dir).is_ok_and(|mut d| d.next().is_some()), "the pins were removed");
    let attached = topo.lb_xdp_attachments();
    assert_eq!(attached.len(), topo.lb_interfaces().len(), "XDP gone: {attached:?}");
    let (counts, failures) = new_connections(&topo, 40);
    assert!(failures.is_empty() && counts.len() == 2, "{counts:?} {failures:?}");
    assert_eq!(config_view(&agent.status()).as_array().map(Vec::len), Some(2), "the first agent changed");
}

/// Generic (skb) XDP always runs the partial-checksum-aware program, even
/// where `checksums = "complete"` asks for the other one: GRO and virtio
/// offloads leave partial checksums in the skbs it sees. The client's veth
/// (whose far end hands over partial checksums) is forced to generic mode.
#[test]
fn root_generic_xdp_runs_the_partial_checksum_aware_program() {
    require_root!("root_generic_xdp_runs_the_partial_checksum_aware_program");
    let topo = Topology::build(Options::with_backends(&names(2)));
    let client_iface = lb_lab::topology::LB_CLIENT_IFACE;
    let members: Vec<(&str, u32)> = topo.backends.iter().map(|b| (b.name.as_str(), 1)).collect();
    let section = format!("[interface.{client_iface:?}]\n");
    let forced = format!("{section}checksums = \"complete\"\nxdp_mode = \"generic\"\n");
    let text = topo.config_toml(&members).replace(&section, &forced);
    assert!(text.contains("xdp_mode"), "{text}");
    topo.write_raw_config(&text);
    let agent = topo.start_agent();

    let status = agent.status();
    let ifaces = status["agent"]["interfaces"].as_array().cloned().unwrap_or_default();
    let client = ifaces.iter().find(|i| i["name"] == client_iface).unwrap_or_else(|| panic!("{ifaces:?}"));
    assert_eq!((client["xdp_mode"].as_str(), client["checksums"].as_str()), (Some("generic"), Some("may-be-partial")));
    assert!(agent.log().contains("generic XDP: the partial-checksum-aware program"), "{}", agent.log());
    assert!(topo.lb_links().contains("xdpgeneric"), "not in generic mode:\n{}", topo.lb_links());

    let mut held = hold(&topo, 10);
    let (counts, failures) = new_connections(&topo, 30);
    assert!(failures.is_empty(), "{failures:#?} ({counts:?})");
    let failures = echo_all(&mut held, "through generic XDP");
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(topo.csum_errors().is_empty(), "checksum drops: {:?}", topo.csum_errors());
}
