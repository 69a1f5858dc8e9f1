//! Scale from zero (`min_replicas = 0`): a service with no instance holds a
//! client's first packet (no reset), reports it through the `WAKE_EVENTS`
//! ring buffer, the agent starts an instance at once, and the client's own
//! SYN retransmission connects. After the idle window the service goes back
//! to zero.
//!
//! - `root_a_syn_to_a_service_at_zero_is_held_and_reported`: fixtures
//!   (BPF_PROG_TEST_RUN) at every hook;
//! - `root_a_client_wakes_a_service_at_zero`: the agent with its process
//!   orchestrator (`lb-backend` instances), a client in a namespace. It
//!   prints the measured times (MEASURED: ...).
//!
//! Every test needs root; see `fixtures.rs` for how they skip without it.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use lb_common::{Reason, WakeEvent, PROG_LB, PROG_LB_LOCAL, PROG_TC, SERVICE_F_WAKE};
use lb_lab::{
    agent::Agent,
    bins::built_bin,
    http,
    netns::{InstanceNamespaces, NetNsGuard},
    packet::*,
    require_root,
    testrun::{check_reason_delta, LbObject, ServiceSpec, TC_ACT_SHOT, XDP_DROP},
    topology::{Options, Topology, LB_CLIENT_IFACE, TCP_PORT, VIP},
};
use serde_json::Value;

// ---------------------------------------------------------------------------
// Fixtures

const MACS: (Mac, Mac) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 80);
const DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 100), 53);

fn tcp_to(to: SocketAddrV4, flags: u8) -> Vec<u8> {
    tcp_frame(MACS, &Ipv4::new(CLIENT, *to.ip(), IPPROTO_TCP), &Tcp::new(40000, to.port(), flags))
}

fn udp_to(to: SocketAddrV4) -> Vec<u8> {
    udp_frame(MACS, &Ipv4::new(CLIENT, *to.ip(), IPPROTO_UDP), &Udp::new(40000, to.port(), b"query"))
}

/// Every record the ring holds now.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<WakeEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.push(lb_agent::adapters::dataplane::wake::parse(&item).expect("a WakeEvent record"));
    }
    out
}

#[test]
fn root_a_syn_to_a_service_at_zero_is_held_and_reported() {
    require_root!("root_a_syn_to_a_service_at_zero_is_held_and_reported");
    for program in [PROG_LB, PROG_LB_LOCAL, PROG_TC] {
        let _netns = NetNsGuard::new().expect("create a network namespace");
        let mut lb = LbObject::load().expect("load lb-ebpf and verify its programs");
        let waking = |id, vip, proto| ServiceSpec { flags: SERVICE_F_WAKE, ..ServiceSpec::new(id, vip, proto, 0, &[]) };
        lb.add_service(&waking(0, WEB, IPPROTO_TCP)).expect("write web");
        lb.add_service(&waking(1, DNS, IPPROTO_UDP)).expect("write dns");
        let mut ring = lb.take_wake_events().expect("the ring buffer");
        let dropped = if program == PROG_TC { TC_ACT_SHOT } else { XDP_DROP };
        let run = |frame: &[u8], reason: Reason| {
            let before = lb.reasons().unwrap();
            let run = lb.run(program, frame).expect("run the program");
            assert_eq!(run.verdict, dropped, "{program}: {reason:?}: not dropped");
            assert_eq!(run.data, frame, "{program}: the frame was rewritten (answered with a reset?)");
            check_reason_delta(&before, &lb.reasons().unwrap(), reason, 1).unwrap();
        };

        // A SYN: held, reported at once with its service.
        run(&tcp_to(WEB, TCP_SYN), Reason::HeldWaking);
        let events = drain(&mut ring);
        assert_eq!(events.len(), 1, "{program}: {events:?}");
        assert_eq!((events[0].service_id, events[0].proto), (0, IPPROTO_TCP));
        assert!(events[0].at_ns > 0);
        // A flood of SYNs: each held, reported at most once per CPU within
        // the rate limit's 100 ms.
        let flood_start = Instant::now();
        for _ in 0..50 {
            run(&tcp_to(WEB, TCP_SYN), Reason::HeldWaking);
        }
        let events = drain(&mut ring);
        if flood_start.elapsed() < Duration::from_millis(100) {
            let cpus = thread::available_parallelism().map_or(1, |n| n.get());
            assert!(events.len() <= cpus, "{program}: {} events for 50 SYNs", events.len());
        }
        // Not a new flow (an ACK of a flow the service lost): dropped, not
        // reported.
        run(&tcp_to(WEB, TCP_ACK), Reason::DropNoBackend);
        assert!(drain(&mut ring).is_empty(), "{program}: an ACK woke the service");
        // A UDP datagram: held and reported for its own service.
        run(&udp_to(DNS), Reason::HeldWaking);
        let events = drain(&mut ring);
        assert_eq!(events.iter().map(|e| (e.service_id, e.proto)).collect::<Vec<_>>(), [(1, IPPROTO_UDP)]);

        // Without the flag (as every service was before), the same SYN is
        // refused as it always was, and nothing is reported.
        lb.add_service(&ServiceSpec::new(0, WEB, IPPROTO_TCP, 0, &[])).expect("rewrite web");
        let before = lb.reasons().unwrap();
        let run = lb.run(program, &tcp_to(WEB, TCP_SYN)).expect("run the program");
        // (At tc in this namespace, refused means passed up for the stack's reset.)
        check_reason_delta(&before, &lb.reasons().unwrap(), Reason::ResetNoBackend, 1).unwrap();
        assert_ne!(run.verdict, dropped, "{program}: a service without the flag held the SYN");
        assert!(drain(&mut ring).is_empty(), "{program}: a service without the flag was reported");
    }
}

// ---------------------------------------------------------------------------
// The agent

/// The instances' port (lb-backend listens there in its namespace).
const INSTANCE_PORT: u16 = 8080;
/// The idle window of the test's service.
const IDLE: Duration = Duration::from_secs(3);

/// Polls the agent's status until `done` holds; panics with it after
/// `timeout`.
fn wait_until(agent: &Agent, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = agent.status();
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}; last status:\n{:#}", s["scaling"]);
        thread::sleep(Duration::from_millis(100));
    }
}

fn instances(status: &Value) -> usize {
    status["scaling"][0]["replicas"].as_array().map_or(0, Vec::len)
}

fn events(status: &Value) -> Vec<String> {
    let events = status["events"].as_array().cloned().unwrap_or_default();
    events.iter().rev().filter_map(|e| e["message"].as_str().map(str::to_owned)).collect()
}

#[test]
fn root_a_client_wakes_a_service_at_zero() {
    require_root!("root_a_client_wakes_a_service_at_zero");
    let pid = std::process::id();
    let bridge = format!("lbz{}", pid % 100_000);
    let prefix = Ipv4Addr::new(10, 219, (pid % 250) as u8, 0);
    let topo = Topology::build(Options::with_backends::<&str>(&[]));
    let _instances = InstanceNamespaces::claim(&bridge);
    let backend: PathBuf = built_bin("lb-backend", "LB_BACKEND_BIN");
    let config = format!(
        r#"# Written by e2e_zero for topology {topo_prefix}.
[[service]]
name = "web"
vip = "{VIP}"
port = {TCP_PORT}
interfaces = ["{LB_CLIENT_IFACE}", "{bridge}"]
health_check = {{ kind = "http", path = "/healthz", interval = "500ms" }}

[service.scaling]
min_replicas = 0
max_replicas = 1
scale_to_zero_after = "{idle}s"

[service.instances]
ready_timeout = "10s"

[service.instances.process]
command = [{backend:?}, "--listen", "{{addr}}", "--name", "{{name}}"]
port = {INSTANCE_PORT}
bridge = "{bridge}"
prefix = "{prefix}"
stop_grace = "1s"
"#,
        topo_prefix = topo.prefix,
        idle = IDLE.as_secs(),
        backend = backend.display().to_string(),
    );
    topo.write_raw_config(&config);
    let agent = topo.start_agent_with(&topo.agent_args());
    let vip = SocketAddrV4::new(VIP, TCP_PORT);

    // At zero: nothing runs, nothing is in the table.
    thread::sleep(Duration::from_millis(1500));
    let s = agent.status();
    assert_eq!(instances(&s), 0, "the service did not start at zero: {:#}", s["scaling"]);

    // The client's first SYN is held; a retransmission connects.
    let (took, answer) = topo.client.run(|| {
        let t = Instant::now();
        let answer = http::get_ok(vip, "/", Duration::from_secs(8));
        (t.elapsed(), answer)
    });
    let body = answer
        .unwrap_or_else(|e| panic!("the request failed after {took:?}: {e}; events {:#?}", events(&agent.status())));
    assert!(!body.is_empty());
    assert!(took < Duration::from_secs(4), "connected after {took:?}: not on the first retransmissions");
    let s = agent.status();
    let woke: Vec<String> = events(&s).into_iter().filter(|e| e.contains("wake") || e.contains("woke")).collect();
    eprintln!("MEASURED: first SYN -> first answered request {took:?} (the kernel retransmits the SYN after 1 s)");
    for e in &woke {
        eprintln!("MEASURED: {e}");
    }
    assert!(woke.iter().any(|e| e.contains("scale 0 -> 1 (wake: a client is waiting")), "{woke:#?}");
    assert!(woke.iter().any(|e| e.contains("woke from zero: first packet, reported +")), "{woke:#?}");
    assert_eq!(instances(&s), 1, "{:#}", s["scaling"]);

    // Idle: back to zero after the window.
    let s = wait_until(&agent, "back to zero", IDLE + Duration::from_secs(8), |s| instances(s) == 0);
    let idle: Vec<String> = events(&s).into_iter().filter(|e| e.contains("idle")).collect();
    eprintln!("MEASURED: {idle:?}");
    assert!(idle.iter().any(|e| e.contains("scale 1 -> 0 (idle: no new flows and no open connections")), "{idle:#?}");
}
