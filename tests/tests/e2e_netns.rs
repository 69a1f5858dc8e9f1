//! End to end through real namespaces: client ns ⇄ LB ns (lb-agent + XDP) ⇄
//! backend namespaces, with real TCP and UDP sockets on both ends.
//!
//! Needs root and a built agent: `cargo build --release -p lb-agent && cargo
//! test -p lb-tests --release --test e2e_netns -- --test-threads=1`
//! (`cargo xtask test` does both). Each test builds its own topology and the
//! guards remove it again, also when the test fails.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{SocketAddrV4, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use lb_lab::{
    agent::{Agent, AgentArgs},
    require_root,
    spread::{assert_even, connect_many, print_shares},
    topology::{refused_tcp_and_udp, tcp_request, udp_request, Conn, Options, Topology, IO_TIMEOUT, LB_CLIENT_ADDR},
};

fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("web-{i}")).collect()
}

fn options(n: usize) -> Options {
    Options::with_backends(&names(n))
}

/// Stop the agent and check that it exited cleanly and left no XDP program.
fn stop_and_check_detached(topo: &Topology, mut agent: Agent) {
    let status = agent.stop().expect("agent exit status");
    assert!(status.success(), "lb-agent exited with {status} on SIGTERM; log:\n{}", agent.log());
    let left = topo.lb_xdp_attachments();
    assert!(left.is_empty(), "XDP still attached after the agent stopped: {left:?}\n{}", topo.lb_links());
}

fn spread_test(label: &str, opts: Options, n: usize) {
    let topo = Topology::build(opts);
    topo.write_config_all();
    let agent = topo.start_agent();
    let modes = agent.modes();
    println!("{label}: XDP modes reported by the agent: {modes:?}; iproute2 says {:?}", topo.lb_xdp_attachments());
    assert_eq!(modes.len(), topo.lb_interfaces().len(), "one attach per interface; log:\n{}", agent.log());
    assert_modes_agree(&modes, &topo.lb_xdp_attachments());

    let started = Instant::now();
    let counts = connect_many(&topo, n);
    print_shares(label, &counts);
    println!("{label}: {n} connections took {:?}", started.elapsed());
    assert_even(&counts, &topo.options.backends);
    // Every connection is exactly one new flow, whatever the hook.
    let new_flows = agent.new_flows("web");
    println!("MEASURED: {label}: new_flows {new_flows} for {n} connections (hooks {modes:?})");
    assert_eq!(new_flows, n as u64, "new flows counted for {n} connections");
    assert_no_csum_errors(&topo);
    stop_and_check_detached(&topo, agent);
}

/// The agent's `mode=native|generic` matches what iproute2 shows.
fn assert_modes_agree(agent: &[(String, String)], iproute: &[(String, String)]) {
    let mut from_agent: Vec<(String, String)> = agent
        .iter()
        .map(|(i, m)| (i.clone(), if m == "native" { "xdp".to_owned() } else { format!("xdp{m}") }))
        .collect();
    let mut from_ip = iproute.to_vec();
    from_agent.sort();
    from_ip.sort();
    assert_eq!(from_agent, from_ip, "agent's modes vs. ip -d link");
}

/// The agent attached the program for `want` checksums everywhere.
fn assert_checksum_modes(agent: &Agent, topo: &Topology, want: &str) {
    let got = agent.checksum_modes();
    assert_eq!(got.len(), topo.lb_interfaces().len(), "one attach per interface; log:\n{}", agent.log());
    assert!(got.iter().all(|(_, m)| m == want), "checksum handling per interface {got:?}, want {want}");
}

/// No client or backend stack dropped a packet for a bad checksum.
fn assert_no_csum_errors(topo: &Topology) {
    let errors = topo.csum_errors();
    assert!(errors.is_empty(), "checksum drops (namespace, tcp, udp): {errors:?}");
}

#[test]
fn root_tcp_connections_spread_evenly() {
    require_root!("root_tcp_connections_spread_evenly");
    spread_test("tcp spread (veth defaults)", options(3), 1000);
}

/// Same path with complete checksums: the client and backends compute their
/// checksums in software (`ethtool -K to-lb tx off`), and so does the LB, so
/// every receiver verifies every checksum: an incremental update that is off
/// by one bit fails here (the default veth setup would not notice, see
/// `root_partial_checksums_survive_software_finalisation`). The config says
/// `checksums = "complete"` for the LB's interfaces: with the partial-aware
/// program, one complete checksum in 65,536 equals its pseudo-header sum and
/// would be taken for a partial one (this test caught that in CI: one drop
/// in some ten thousand packets).
#[test]
fn root_tcp_and_udp_with_complete_checksums() {
    require_root!("root_tcp_and_udp_with_complete_checksums");
    let opts = Options { node_tx_csum_offload: false, lb_tx_csum_offload: false, ..options(3) };
    let topo = Topology::build(opts);
    topo.write_config_all();
    let agent = topo.start_agent();
    assert_checksum_modes(&agent, &topo, "complete");
    let counts = connect_many(&topo, 600);
    print_shares("tcp spread (checksums complete, verified by every receiver)", &counts);
    assert_even(&counts, &topo.options.backends);
    let vip = topo.vip_udp();
    topo.client.run(move || {
        for i in 0..20 {
            udp_request(vip).unwrap_or_else(|e| panic!("udp request {i} to {vip}: {e}"));
        }
    });
    assert_no_csum_errors(&topo);
    stop_and_check_detached(&topo, agent);
}

/// Veth's default: the client's and backends' stacks leave TCP and UDP
/// checksums to "hardware" (CHECKSUM_PARTIAL: the field holds only the
/// pseudo-header sum), and the receiving namespace trusts the skb flag
/// instead of checking. XDP cannot see that flag; the program recognises a
/// partial field by its value and updates it as the kernel would. Here a hop
/// finishes the checksum (the LB's veth with tx offload off, as a real NIC
/// would in hardware) and the receivers verify it: before the program knew
/// partial checksums, every connection in this test timed out.
#[test]
fn root_partial_checksums_survive_software_finalisation() {
    require_root!("root_partial_checksums_survive_software_finalisation");
    let topo = Topology::build(Options { lb_tx_csum_offload: false, ..options(3) });
    topo.write_config_all();
    let agent = topo.start_agent();
    // `checksums = "auto"` on veths: the program that knows partial ones.
    assert_checksum_modes(&agent, &topo, "may-be-partial");
    let (tcp, udp) = (topo.vip_tcp(), topo.vip_udp());
    let failures: Vec<String> = topo.client.run(move || {
        let mut f = Vec::new();
        for i in 0..5 {
            if let Err(e) = tcp_request(tcp) {
                f.push(format!("tcp {i}: {e}"));
            }
            if let Err(e) = udp_request(udp) {
                f.push(format!("udp {i}: {e}"));
            }
        }
        f
    });
    let errors = topo.csum_errors();
    assert!(
        failures.is_empty() && errors.is_empty(),
        "requests failed: {failures:?}; checksum drops (namespace, tcp, udp): {errors:?}"
    );
    stop_and_check_detached(&topo, agent);
}

/// MTU 9000 makes native XDP on veth refuse a single-buffer program, so the
/// agent falls back to generic (skb) mode; forwarding must work the same.
#[test]
fn root_tcp_in_generic_mode() {
    require_root!("root_tcp_in_generic_mode");
    let topo = Topology::build(Options { mtu: Some(9000), ..options(3) });
    topo.write_config_all();
    let agent = topo.start_agent();
    let modes = agent.modes();
    println!("generic: XDP modes reported by the agent: {modes:?}; iproute2 says {:?}", topo.lb_xdp_attachments());
    assert!(modes.iter().all(|(_, m)| m == "generic"), "expected generic mode at MTU 9000: {modes:?}");
    assert_modes_agree(&modes, &topo.lb_xdp_attachments());
    let counts = connect_many(&topo, 600);
    print_shares("tcp spread (generic XDP)", &counts);
    assert_even(&counts, &topo.options.backends);
    assert_no_csum_errors(&topo);
    stop_and_check_detached(&topo, agent);
}

#[test]
fn root_udp_request_response() {
    require_root!("root_udp_request_response");
    let topo = Topology::build(options(3));
    topo.write_config_all();
    let agent = topo.start_agent();
    let vip = topo.vip_udp();
    let answers: Vec<String> = topo.client.run(move || {
        (0..20).map(|i| udp_request(vip).unwrap_or_else(|e| panic!("udp request {i} to {vip}: {e}"))).collect()
    });
    let mut counts = BTreeMap::new();
    for a in &answers {
        assert!(topo.options.backends.contains(a), "unexpected answer {a:?}");
        *counts.entry(a.clone()).or_insert(0) += 1;
    }
    print_shares("udp", &counts);
    assert_no_csum_errors(&topo);
    stop_and_check_detached(&topo, agent);
}

/// Open connections survive adding a backend and removing another; the
/// removed one drains (its open connections work, it gets no new ones).
#[test]
fn root_held_connections_survive_backend_changes() {
    require_root!("root_held_connections_survive_backend_changes");
    let mut topo = Topology::build(options(3));
    topo.write_config_all();
    let mut agent = topo.start_agent();
    let vip = topo.vip_tcp();

    let held: Vec<Conn> = topo
        .client
        .run(move || (0..30).map(|i| Conn::open(vip).unwrap_or_else(|e| panic!("held connection {i}: {e}"))).collect());
    let mut per_backend = BTreeMap::new();
    for c in &held {
        *per_backend.entry(c.backend.clone()).or_insert(0) += 1;
    }
    println!("held connections per backend: {per_backend:?}");
    for b in &topo.options.backends {
        assert!(per_backend.contains_key(b), "no held connection reached {b}: {per_backend:?}");
    }

    // Keep talking on every held connection while the config changes.
    let held = Arc::new(Mutex::new(held));
    let stop = Arc::new(AtomicBool::new(false));
    let talker = {
        let (held, stop) = (held.clone(), stop.clone());
        thread::spawn(move || -> Result<usize, String> {
            let mut rounds = 0;
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let mut held = held.lock().unwrap();
                for (i, c) in held.iter_mut().enumerate() {
                    let line = format!("round {rounds} conn {i}");
                    match c.echo(&line) {
                        Ok(name) if name == c.backend => {}
                        Ok(name) => return Err(format!("conn {i} to {} answered by {name}", c.backend)),
                        Err(e) => return Err(format!("conn {i} to {} in round {rounds}: {e}", c.backend)),
                    }
                }
                drop(held);
                rounds += 1;
                thread::sleep(Duration::from_millis(20));
            }
            Ok(rounds)
        })
    };

    topo.add_backend("web-4");
    agent.reload_with(|| {
        topo.write_config(&[("web-2", 1), ("web-3", 1), ("web-4", 1)]);
    });
    // Let the talker run a few more rounds on the new config.
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let rounds = talker.join().expect("talker thread").unwrap_or_else(|e| panic!("held connection broke: {e}"));
    println!("held connections: {rounds} echo rounds across the change, none failed");
    assert!(rounds >= 3, "too few echo rounds ({rounds}) to say anything");

    // New connections: never the removed backend, sometimes the new one.
    let counts = connect_many(&topo, 600);
    print_shares("after adding web-4 and removing web-1", &counts);
    assert!(!counts.contains_key("web-1"), "a new connection reached the removed backend: {counts:?}");
    assert!(counts.get("web-4").copied().unwrap_or(0) > 0, "no new connection reached the added backend: {counts:?}");
    assert_even(&counts, &["web-2".to_owned(), "web-3".to_owned(), "web-4".to_owned()]);

    // Draining: the removed backend's open connections still work.
    let mut held = held.lock().unwrap();
    let mut drained = 0;
    for (i, c) in held.iter_mut().enumerate() {
        let name =
            c.echo(&format!("after {i}")).unwrap_or_else(|e| panic!("conn {i} to {} after the change: {e}", c.backend));
        assert_eq!(name, c.backend, "conn {i} changed backend");
        drained += usize::from(c.backend == "web-1");
    }
    println!("{drained} held connections to the removed web-1 still answer");
    assert!(drained > 0);
    drop(held);
    assert_no_csum_errors(&topo);
    stop_and_check_detached(&topo, agent);
}

/// The LB's own address is not a service: ICMP and TCP to it are untouched.
#[test]
fn root_lb_own_address_still_answers() {
    require_root!("root_lb_own_address_still_answers");
    let topo = Topology::build(options(2));
    topo.write_config_all();
    let agent = topo.start_agent();

    let (status, out) =
        topo.client.exec_status("ping", &["-c", "2", "-i", "0.2", "-W", "2", &LB_CLIENT_ADDR.to_string()]);
    assert!(status.success(), "ping {LB_CLIENT_ADDR} from the client failed:\n{out}");

    let addr = SocketAddrV4::new(LB_CLIENT_ADDR, 9000);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = topo.lb.spawn(move || -> Result<(), String> {
        let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        ready_tx.send(()).ok();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(|e| e.to_string())?;
                    s.set_write_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
                    return s.write_all(b"lb itself\n").map_err(|e| e.to_string());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(format!("accept on {addr}: {e}")),
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("listener in the LB namespace did not start");
    let greeting = topo.client.run(move || -> std::io::Result<String> {
        let s = TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(line)
    });
    server.join().expect("server thread").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(greeting.unwrap_or_else(|e| panic!("tcp to {addr}: {e}")), "lb itself\n");
    println!("ping and tcp to the LB's own {LB_CLIENT_ADDR} work with XDP attached");
    stop_and_check_detached(&topo, agent);
}

/// A bad config: the agent exits non-zero, names the field, attaches nothing.
#[test]
fn root_bad_config_is_refused_and_attaches_nothing() {
    require_root!("root_bad_config_is_refused_and_attaches_nothing");
    let topo = Topology::build(options(2));
    let good = topo.config_toml(&[("web-1", 1), ("web-2", 1)]);
    let missing_port = good.replacen(":8080\"", "\"", 1);
    // After the real ones: an agent that attached in order would have
    // attached those before noticing.
    let missing_iface = good.replacen("\"lb-b2\"]", "\"lb-b2\", \"lb-nope\"]", 1);
    assert_ne!(missing_port, good);
    assert!(missing_iface.contains("lb-nope"));
    let cases = [
        ("backend address without port", missing_port, "address"),
        ("interface that does not exist", missing_iface, "interfaces"),
    ];
    for (what, text, field) in cases {
        topo.write_raw_config(&text);
        let args = AgentArgs { log: topo.dir().join("bad.log"), ..topo.agent_args() };
        let mut agent = Agent::spawn(&topo.lb, &args);
        let status =
            agent.wait_exit(Duration::from_secs(15)).unwrap_or_else(|| panic!("{what}: lb-agent kept running"));
        let log = agent.log();
        println!("{what}: exit {status}, said:\n{}", log.trim_end());
        assert!(!status.success(), "{what}: lb-agent exited successfully");
        assert!(log.contains(field), "{what}: the error does not name {field:?}:\n{log}");
        if field == "interfaces" {
            assert!(log.contains("lb-nope"), "{what}: the error does not name the interface:\n{log}");
        }
        let left = topo.lb_xdp_attachments();
        assert!(left.is_empty(), "{what}: XDP left attached: {left:?}\n{}", topo.lb_links());
    }
}

/// A service whose backends are all removed refuses new clients at once:
/// a TCP connect fails with ECONNREFUSED well within 1 s (a reset from the
/// XDP program), a connected UDP socket gets ECONNREFUSED (an ICMP port
/// unreachable); the refusal counters, `status` and the usable-backends
/// gauge say so.
#[test]
fn root_no_usable_backend_refuses_clients_at_once() {
    require_root!("root_no_usable_backend_refuses_clients_at_once");
    let topo = Topology::build(options(2));
    topo.write_config_all();
    let metrics = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 19_471);
    let mut agent = topo.start_agent_with(&AgentArgs { metrics_address: Some(metrics.into()), ..topo.agent_args() });
    connect_many(&topo, 4);
    agent.reload_with(|| {
        topo.write_config(&[]);
    });
    let (tcp, udp) = (topo.vip_tcp(), topo.vip_udp());
    let (tcp_err, took, udp_err) = topo.client.run(move || refused_tcp_and_udp(tcp, udp));
    println!("MEASURED: TCP connect refused after {took:?} ({tcp_err}); UDP: {udp_err}");
    assert_eq!(tcp_err.kind(), ErrorKind::ConnectionRefused, "TCP: {tcp_err}\n{}", agent.log_tail(20));
    assert!(took < Duration::from_secs(1), "refused only after {took:?}");
    assert_eq!(udp_err.kind(), ErrorKind::ConnectionRefused, "UDP: {udp_err}\n{}", agent.log_tail(20));

    let status = agent.status();
    let reasons = status["reasons"].as_array().expect("reasons");
    let packets =
        |name: &str| reasons.iter().find(|r| r["reason"] == name).map_or(0, |r| r["packets"].as_u64().unwrap_or(0));
    assert!(packets("reset_no_backend") >= 1, "no reset counted: {reasons:?}");
    assert!(packets("unreachable_no_backend") >= 1, "no unreachable counted: {reasons:?}");
    for s in status["services"].as_array().expect("services") {
        assert_eq!(s["usable_backends"], 0, "{s}");
    }
    let text = agent.cli(&["status"]).stdout;
    assert!(text.contains("0 usable backends (no backends): new clients are refused"), "{text}");
    let scrape = topo.lb.run(move || lb_lab::http::get_ok(metrics, "/metrics", IO_TIMEOUT)).expect("scrape /metrics");
    let gauge =
        scrape.lines().find(|l| l.starts_with("lb_service_usable_backends{service=\"web\"")).expect("the gauge");
    assert!(gauge.ends_with(" 0"), "{gauge}");
    stop_and_check_detached(&topo, agent);
}
