//! Clients on the load balancer host itself: their packets never cross an
//! XDP ingress hook, so the agent's socket programs (cgroup `connect4`,
//! `sendmsg4`, `recvmsg4`, `getpeername4`) give their sockets a backend at
//! connect/sendmsg time, from the same services and Maglev tables.
//!
//! ```text
//!  client ns ==== [lb-c] LB ns, "the host": lb-agent + a client process
//!                 [lb-b1] ==== web-1
//!                 [lb-b2] ==== web-2
//! ```
//!
//! Each test makes a cgroup of its own (`TestCgroup`, under the cgroup v2
//! mount) and points the agent's `socket_lb.cgroup` at it; the client runs
//! as a separate process that moves itself into that cgroup (and the LB
//! namespace) before exec, so nothing else on the machine is balanced. The
//! client process is this test binary again, running only
//! `socket_lb_client_process` with its job in `LB_SOCKET_LB_CLIENT`.
//!
//! Needs root and a built agent: `cargo build --release -p lb-agent && cargo
//! test -p lb-tests --release --test e2e_socket_lb -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::Path,
    process::Command,
};

use lb_lab::{
    agent::Agent,
    cgroup::TestCgroup,
    netns::NetNs,
    require_root,
    topology::{Options, Topology, IO_TIMEOUT, LB_CLIENT_ADDR, TCP_PORT, UDP_PORT, VIP},
};
use serde_json::Value;

/// The client's job: `<mode> <address> <count>`.
const CLIENT_ENV: &str = "LB_SOCKET_LB_CLIENT";
const CLIENT_TEST: &str = "socket_lb_client_process";

/// Not a test of its own: the client process the tests start inside their
/// cgroup. Without `LB_SOCKET_LB_CLIENT` it does nothing. Prints its cgroup,
/// then per request `ANSWER <backend> <address>`, the address being the
/// TCP socket's peer (getpeername) or the UDP answer's source (recvfrom),
/// or `FAILED <error>`.
#[test]
fn socket_lb_client_process() {
    let Ok(job) = std::env::var(CLIENT_ENV) else { return };
    let words: Vec<&str> = job.split_whitespace().collect();
    let [mode, addr, count] = words[..] else { panic!("{CLIENT_ENV}={job:?}: want <mode> <address> <count>") };
    let addr: SocketAddrV4 = addr.parse().expect("address");
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    // On a line of its own: libtest has printed "test <name> ... " before.
    println!("\nCGROUP {}", cgroup.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("?"));
    for _ in 0..count.parse::<usize>().expect("count") {
        let answer = match mode {
            "tcp" => tcp_ask(addr),
            "udp-connected" => udp_ask(addr, true),
            "udp-sendto" => udp_ask(addr, false),
            other => panic!("unknown mode {other}"),
        };
        match answer {
            Ok((backend, from)) => println!("ANSWER {backend} {from}"),
            Err(e) => println!("FAILED {e}"),
        }
    }
}

/// Connect, read the greeting (the backend's name); the socket's peer.
fn tcp_ask(addr: SocketAddrV4) -> std::io::Result<(String, SocketAddr)> {
    let stream = TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let peer = stream.peer_addr()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok((line.trim_end().to_owned(), peer))
}

/// Send a datagram, return the answer (the backend's name) and its source.
fn udp_ask(addr: SocketAddrV4, connected: bool) -> std::io::Result<(String, SocketAddr)> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    if connected {
        socket.connect(addr)?;
        socket.send(b"hello\n")?;
    } else {
        socket.send_to(b"hello\n", addr)?;
    }
    let mut buf = [0u8; 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf[..n]).trim_end().to_owned(), from))
}

/// What one client process saw.
#[derive(Debug, Default)]
struct Seen {
    /// Answers per backend name.
    backends: BTreeMap<String, usize>,
    /// Answers per peer/source address.
    from: BTreeMap<String, usize>,
    failures: Vec<String>,
}

/// Run the client process in `cgroup` and `ns`: `count` requests of `mode`
/// to `addr`.
fn run_client(cgroup: &TestCgroup, ns: &NetNs, mode: &str, addr: SocketAddrV4, count: usize) -> Seen {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([CLIENT_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CLIENT_ENV, format!("{mode} {addr} {count}"));
    cgroup.confine(Some(ns), &mut cmd).expect("confine the client");
    let out = cmd.output().expect("run the client process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "client failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let name = cgroup.path().file_name().expect("name").to_string_lossy().into_owned();
    assert!(
        stdout.lines().any(|l| l.starts_with("CGROUP ") && l.ends_with(&name)),
        "the client was not in {}: {stdout}",
        cgroup.path().display()
    );
    let mut seen = Seen::default();
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("ANSWER ") {
            let (backend, from) = rest.split_once(' ').expect("ANSWER <backend> <from>");
            *seen.backends.entry(backend.to_owned()).or_default() += 1;
            *seen.from.entry(from.to_owned()).or_default() += 1;
        } else if let Some(e) = line.strip_prefix("FAILED ") {
            seen.failures.push(e.to_owned());
        }
    }
    seen
}

fn start(cgroup: Option<&Path>) -> (Topology, Agent) {
    let mut options = Options::with_backends(&["web-1", "web-2"]);
    options.socket_lb_cgroup = cgroup.map(Path::to_path_buf);
    let topo = Topology::build(options);
    topo.write_config_all();
    let agent = topo.start_agent();
    (topo, agent)
}

fn socket_lb_status(agent: &Agent) -> Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "lb-agent status --json failed: {out:?}");
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("status --json: {e}:\n{}", out.stdout));
    v["agent"]["socket_lb"].clone()
}

fn operations(status: &Value, op: &str) -> u64 {
    status["operations"].as_array().expect("operations").iter().find(|o| o["op"] == op).expect(op)["count"]
        .as_u64()
        .expect("count")
}

/// Every request answered, from both backends within 25% of even, and
/// every answer coming from `vip` as the client sees it.
fn assert_balanced(seen: &Seen, count: usize, vip: SocketAddrV4, agent: &Agent) {
    assert!(seen.failures.is_empty(), "{} of {count} failed: {:?}\n{}", seen.failures.len(), seen, agent.log_tail(30));
    assert_eq!(seen.backends.values().sum::<usize>(), count, "{seen:?}");
    assert_eq!(seen.backends.len(), 2, "{seen:?}");
    let even = count / 2;
    for (b, n) in &seen.backends {
        assert!(n.abs_diff(even) * 4 <= even, "{b} got {n} of {count}, not within 25% of {even}: {seen:?}");
    }
    assert_eq!(seen.from.keys().collect::<Vec<_>>(), [&vip.to_string()], "peers other than the VIP: {seen:?}");
}

#[test]
fn root_socket_lb_balances_tcp_from_the_lb_host() {
    require_root!("root_socket_lb_balances_tcp_from_the_lb_host");
    let cgroup = TestCgroup::create().expect("a test cgroup");
    let (topo, agent) = start(Some(cgroup.path()));
    let vip = SocketAddrV4::new(VIP, TCP_PORT);
    let seen = run_client(&cgroup, &topo.lb, "tcp", vip, 200);
    println!("MEASURED: 200 connections from the LB host: {seen:?}");
    assert_balanced(&seen, 200, vip, &agent);
    let status = socket_lb_status(&agent);
    assert_eq!(status["attached"], true, "{status}");
    assert_eq!(status["cgroup"], cgroup.path().display().to_string(), "{status}");
    assert!(operations(&status, "translated") >= 200, "{status}");
    // getpeername: at least one per connection.
    assert!(operations(&status, "restored") >= 200, "{status}");
    // A process outside the cgroup (this one, in the LB namespace) is not
    // balanced: nothing routes the VIP there.
    let outside = topo.lb.run(move || TcpStream::connect_timeout(&vip.into(), IO_TIMEOUT).map(|_| ()));
    assert!(outside.is_err(), "a connect outside the test cgroup reached the VIP");
}

#[test]
fn root_socket_lb_serves_a_host_address_vip() {
    require_root!("root_socket_lb_serves_a_host_address_vip");
    let cgroup = TestCgroup::create().expect("a test cgroup");
    let mut options = Options::with_backends(&["web-1", "web-2"]);
    options.socket_lb_cgroup = Some(cgroup.path().to_path_buf());
    let topo = Topology::build(options);
    // The VIP is the LB namespace's own address; such a VIP needs the fast
    // path for remote clients (or the agent refuses it).
    let mut config =
        topo.config_toml(&[("web-1", 1), ("web-2", 1)]).replace(&VIP.to_string(), &LB_CLIENT_ADDR.to_string());
    for i in topo.lb_interfaces() {
        config += &format!("\n[interface.{i:?}]\nfast_path = \"on\"\n");
    }
    topo.write_raw_config(&config);
    let agent = topo.start_agent();
    let vip = SocketAddrV4::new(LB_CLIENT_ADDR, TCP_PORT);
    let seen = run_client(&cgroup, &topo.lb, "tcp", vip, 200);
    println!("MEASURED: 200 connections from the LB host to its own address: {seen:?}");
    assert_balanced(&seen, 200, vip, &agent);
}

#[test]
fn root_socket_lb_udp_answers_come_from_the_vip() {
    require_root!("root_socket_lb_udp_answers_come_from_the_vip");
    let cgroup = TestCgroup::create().expect("a test cgroup");
    let (topo, agent) = start(Some(cgroup.path()));
    let vip = SocketAddrV4::new(VIP, UDP_PORT);
    for mode in ["udp-connected", "udp-sendto"] {
        let seen = run_client(&cgroup, &topo.lb, mode, vip, 100);
        println!("MEASURED: 100 {mode} requests from the LB host: {seen:?}");
        assert_balanced(&seen, 100, vip, &agent);
    }
    let status = socket_lb_status(&agent);
    assert!(operations(&status, "translated") >= 200, "{status}");
    assert!(operations(&status, "restored") >= 200, "{status}");
}

#[test]
fn root_socket_lb_disabled_leaves_host_clients_untranslated() {
    require_root!("root_socket_lb_disabled_leaves_host_clients_untranslated");
    let cgroup = TestCgroup::create().expect("a test cgroup");
    let (topo, agent) = start(None);
    let seen = run_client(&cgroup, &topo.lb, "tcp", SocketAddrV4::new(VIP, TCP_PORT), 10);
    assert!(seen.backends.is_empty(), "answered without socket load balancing: {seen:?}");
    assert_eq!(seen.failures.len(), 10, "{seen:?}");
    let status = socket_lb_status(&agent);
    assert_eq!(status["attached"], false, "{status}");
    assert!(status["note"].as_str().expect("note").contains("disabled"), "{status}");
}

/// The socket links the agent pinned, by file name.
fn socket_link_pins(topo: &Topology) -> Vec<String> {
    let dir = topo.pin_dir().join(format!("v{}", lb_common::ABI_VERSION)).join("links");
    let mut pins: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    pins.retain(|p| p.starts_with("cgroup-"));
    pins.sort();
    pins
}

#[test]
fn root_socket_lb_outlives_a_killed_agent_and_is_taken_over() {
    require_root!("root_socket_lb_outlives_a_killed_agent_and_is_taken_over");
    let cgroup = TestCgroup::create().expect("a test cgroup");
    let (topo, mut agent) = start(Some(cgroup.path()));
    let vip = SocketAddrV4::new(VIP, TCP_PORT);
    let first = socket_link_pins(&topo);
    assert_eq!(first.len(), 4, "one pinned link per program: {first:?}");
    agent.kill();
    let seen = run_client(&cgroup, &topo.lb, "tcp", vip, 20);
    assert!(seen.failures.is_empty() && seen.backends.len() == 2, "with no agent running: {seen:?}");
    agent.respawn();
    agent.wait_ready();
    let second = socket_link_pins(&topo);
    assert_eq!(second.len(), 4, "{second:?}");
    assert!(second.iter().all(|p| !first.contains(p)), "the predecessor's links stayed: {first:?} -> {second:?}");
    let seen = run_client(&cgroup, &topo.lb, "tcp", vip, 20);
    assert!(seen.failures.is_empty() && seen.backends.len() == 2, "after the restart: {seen:?}");
    // A stop detaches it all.
    agent.stop();
    assert_eq!(socket_link_pins(&topo), Vec::<String>::new());
    let seen = run_client(&cgroup, &topo.lb, "tcp", vip, 3);
    assert_eq!(seen.failures.len(), 3, "translated after the agent stopped: {seen:?}");
}
