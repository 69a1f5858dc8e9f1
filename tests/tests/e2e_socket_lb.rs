//! Clients on the load balancer host itself: their packets never cross an
//! XDP ingress hook, so the agent's socket programs (cgroup `connect4`,
//! `sendmsg4`, `recvmsg4`, `getpeername4`, and their IPv6 twins) give their
//! sockets a backend at connect/sendmsg time, from the same services and
//! Maglev tables.
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
//! A Docker container on the host is balanced the same way once its process
//! is in the cgroup: `root_socket_lb_serves_a_docker_container_on_the_host`.
//!
//! Needs root and a built agent: `cargo build --release -p lb-agent && cargo
//! test -p lb-tests --release --test e2e_socket_lb -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lb_lab::{
    agent::Agent,
    cgroup::{socket_lb_toml, TestCgroup},
    docker::{build_demo_image, docker, wait_http_ok, Dockerd, NamedContainer, NetworkGuard, DEMO_IMAGE},
    http::get_ok as http_get_ok,
    net6::{Net6, BACKENDS as NET6_BACKENDS, VIP as NET6_VIP},
    netns::NetNs,
    require_root, require_root_and_docker,
    scratch::Scratch,
    topology::{Options, Topology, IO_TIMEOUT, LB_CLIENT_ADDR, TCP_PORT, UDP_PORT, VIP},
};
use serde_json::Value;

/// The client's job: `<mode> <address> <count>`.
const CLIENT_ENV: &str = "LB_SOCKET_LB_CLIENT";
/// Set: the client first waits (up to 10 s) until its cgroup has this name;
/// for a container, whose process is moved in after it started.
const WAIT_CGROUP_ENV: &str = "LB_SOCKET_LB_WAIT_CGROUP";
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
    let addr: SocketAddr = addr.parse().expect("address");
    let own_cgroup = || {
        let text = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
        text.lines().find_map(|l| l.strip_prefix("0::").map(str::to_owned)).unwrap_or_default()
    };
    if let Ok(name) = std::env::var(WAIT_CGROUP_ENV) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !own_cgroup().ends_with(&name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // On a line of its own: libtest has printed "test <name> ... " before.
    println!("\nCGROUP {}", own_cgroup());
    for _ in 0..count.parse::<usize>().expect("count") {
        let answer = match mode {
            "tcp" => tcp_ask(addr),
            "http" => http_ask(addr),
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
fn tcp_ask(addr: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let peer = stream.peer_addr()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok((line.trim_end().to_owned(), peer))
}

/// The socket's peer on one connection, and the body of a `GET /` (the
/// backend's name) on another.
fn http_ask(addr: SocketAddr) -> std::io::Result<(String, SocketAddr)> {
    let SocketAddr::V4(v4) = addr else { panic!("http mode takes an IPv4 address: {addr}") };
    let peer = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?.peer_addr()?;
    let body = http_get_ok(v4, "/?work_ms=0", IO_TIMEOUT)?;
    Ok((body.trim().to_owned(), peer))
}

/// Send a datagram, return the answer (the backend's name) and its source.
fn udp_ask(addr: SocketAddr, connected: bool) -> std::io::Result<(String, SocketAddr)> {
    let any: IpAddr = if addr.is_ipv6() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
    let socket = UdpSocket::bind((any, 0))?;
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
fn run_client(cgroup: &TestCgroup, ns: &NetNs, mode: &str, addr: impl Into<SocketAddr>, count: usize) -> Seen {
    let addr = addr.into();
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([CLIENT_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CLIENT_ENV, format!("{mode} {addr} {count}"));
    cgroup.confine(Some(ns), &mut cmd).expect("confine the client");
    let out = cmd.output().expect("run the client process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "client failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    client_output(&stdout, cgroup)
}

/// What the client printed: it ran in `cgroup`, and its answers.
fn client_output(stdout: &str, cgroup: &TestCgroup) -> Seen {
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
fn assert_balanced(seen: &Seen, count: usize, vip: impl Into<SocketAddr>, agent: &Agent) {
    assert_balanced_over(seen, count, 2, vip, agent);
}

/// As `assert_balanced`, over `backends` backends.
fn assert_balanced_over(seen: &Seen, count: usize, backends: usize, vip: impl Into<SocketAddr>, agent: &Agent) {
    let vip = vip.into();
    assert!(seen.failures.is_empty(), "{} of {count} failed: {:?}\n{}", seen.failures.len(), seen, agent.log_tail(30));
    assert_eq!(seen.backends.values().sum::<usize>(), count, "{seen:?}");
    assert_eq!(seen.backends.len(), backends, "{seen:?}");
    let even = count / backends;
    for (b, n) in &seen.backends {
        assert!(n.abs_diff(even) * 4 <= even, "{b} got {n} of {count}, not within 25% of {even}: {seen:?}");
    }
    assert_eq!(seen.from.keys().collect::<Vec<_>>(), [&vip.to_string()], "peers other than the VIP: {seen:?}");
}

/// 200 connections to `vip` from a process in the LB namespace and `cgroup`.
fn tcp_from_the_host_is_balanced(cgroup: &TestCgroup, topo: &Topology, agent: &Agent, vip: SocketAddrV4) {
    let seen = run_client(cgroup, &topo.lb, "tcp", vip, 200);
    println!("MEASURED: 200 connections from the LB host to {vip}: {seen:?}");
    assert_balanced(&seen, 200, vip, agent);
}

#[test]
fn root_socket_lb_balances_tcp_from_the_lb_host() {
    require_root!("root_socket_lb_balances_tcp_from_the_lb_host");
    let cgroup = TestCgroup::create().expect("a test cgroup");
    let (topo, agent) = start(Some(cgroup.path()));
    let vip = SocketAddrV4::new(VIP, TCP_PORT);
    tcp_from_the_host_is_balanced(&cgroup, &topo, &agent, vip);
    let status = socket_lb_status(&agent);
    assert_eq!(status["attached"], true, "{status}");
    assert_eq!(status["cgroup"], cgroup.path().display().to_string(), "{status}");
    assert!(operations(&status, "translated") >= 200, "{status}");
    // getpeername: at least one per connection.
    assert!(operations(&status, "restored") >= 200, "{status}");
    // A dual-stack socket reaches the IPv4 service at its IPv4-mapped
    // address (`connect6`), and sees the mapped VIP as its peer.
    let mapped = SocketAddr::new(IpAddr::V6(VIP.to_ipv6_mapped()), TCP_PORT);
    let seen = run_client(&cgroup, &topo.lb, "tcp", mapped, 100);
    println!("MEASURED: 100 connections to {mapped} from the LB host: {seen:?}");
    assert_balanced(&seen, 100, mapped, &agent);
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
    // The VIP is the LB namespace's own address, which remote clients reach
    // only where replies skip the stack: `auto`'s hook (tc on these veths).
    options.hook = None;
    let topo = Topology::build(options);
    let config = topo.config_toml(&[("web-1", 1), ("web-2", 1)]).replace(&VIP.to_string(), &LB_CLIENT_ADDR.to_string());
    topo.write_raw_config(&config);
    let agent = topo.start_agent();
    tcp_from_the_host_is_balanced(&cgroup, &topo, &agent, SocketAddrV4::new(LB_CLIENT_ADDR, TCP_PORT));
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

/// An IPv6 VIP from the LB host: `connect6`, `sendmsg6`, `recvmsg6` and
/// `getpeername6` do for IPv6 sockets what the IPv4 programs do, from the
/// same Maglev tables (the lab's `net6`: three IPv6 backends).
#[test]
fn root_socket_lb_balances_ipv6_from_the_lb_host() {
    require_root!("root_socket_lb_balances_ipv6_from_the_lb_host");
    let cgroup = TestCgroup::create().expect("a test cgroup");
    let name = format!("lbsk6-{}", std::process::id());
    let net = Net6::build(&name);
    let dir = Scratch::create(&name);
    let interfaces = Net6::interfaces_value();
    let mut config = String::new();
    for (svc, port, proto, backend) in [("web6", 80, "tcp", Net6::tcp as fn(u16) -> _), ("dns6", 53, "udp", Net6::udp)]
    {
        config += &format!(
            "[[service]]\nname = \"{svc}\"\nvip = \"{NET6_VIP}\"\nport = {port}\nprotocol = \"{proto}\"\n\
             interfaces = [{interfaces}]\n"
        );
        for i in 1..=NET6_BACKENDS {
            config += &format!("\n[[service.backend]]\naddress = \"{}\"\n", backend(i));
        }
    }
    config += &Net6::interface_tables();
    config += &socket_lb_toml(Some(cgroup.path()));
    std::fs::write(dir.config_path(), config).expect("write the config");
    let mut agent = Agent::spawn(&net.lb, &dir.agent_args(dir.config_path()));
    agent.wait_ready();
    let backends = NET6_BACKENDS as usize;
    let web = SocketAddr::new(NET6_VIP.into(), 80);
    // Enough for 25 % of an even share to be 3 standard deviations.
    let count = 300;
    let seen = run_client(&cgroup, &net.lb, "tcp", web, count);
    println!("MEASURED: {count} connections to {web} from the LB host: {seen:?}");
    assert_balanced_over(&seen, count, backends, web, &agent);
    let dns = SocketAddr::new(NET6_VIP.into(), 53);
    for mode in ["udp-connected", "udp-sendto"] {
        let seen = run_client(&cgroup, &net.lb, mode, dns, count);
        println!("MEASURED: {count} {mode} requests to {dns} from the LB host: {seen:?}");
        assert_balanced_over(&seen, count, backends, dns, &agent);
    }
    let status = socket_lb_status(&agent);
    assert!(operations(&status, "translated") >= 3 * count as u64, "{status}");
    assert!(operations(&status, "restored") >= 3 * count as u64, "{status}");
    agent.stop();
}

/// A service with no backend: a local client's connect fails at once with
/// ECONNREFUSED (the connect hook's error), TCP and connected UDP alike.
#[test]
fn root_socket_lb_refuses_a_service_without_backends() {
    require_root!("root_socket_lb_refuses_a_service_without_backends");
    let cgroup = TestCgroup::create().expect("a test cgroup");
    let (topo, mut agent) = start(Some(cgroup.path()));
    agent.reload_with(|| {
        topo.write_config(&[]);
    });
    for (mode, port) in [("tcp", TCP_PORT), ("udp-connected", UDP_PORT)] {
        let started = Instant::now();
        let seen = run_client(&cgroup, &topo.lb, mode, SocketAddrV4::new(VIP, port), 3);
        let took = started.elapsed();
        println!("MEASURED: {mode} to a service without backends, 3 tries in {took:?}: {seen:?}");
        assert!(seen.backends.is_empty(), "{mode}: answered without a backend: {seen:?}");
        assert_eq!(seen.failures.len(), 3, "{mode}: {seen:?}");
        assert!(seen.failures.iter().all(|e| e.contains("os error 111")), "{mode}: not ECONNREFUSED: {seen:?}");
        assert!(took < Duration::from_secs(3), "{mode}: refused only after {took:?}");
    }
    assert!(operations(&socket_lb_status(&agent), "no_backend") >= 6);
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
    let programs = lb_common::SOCK_PROGRAMS.len();
    assert_eq!(first.len(), programs, "one pinned link per program: {first:?}");
    agent.kill();
    let seen = run_client(&cgroup, &topo.lb, "tcp", vip, 20);
    assert!(seen.failures.is_empty() && seen.backends.len() == 2, "with no agent running: {seen:?}");
    agent.respawn();
    agent.wait_ready();
    assert_eq!(socket_link_pins(&topo), first, "the links were not kept");
    assert_eq!(agent.count("adopted pinned socket link"), programs, "not taken over:\n{}", agent.log());
    let seen = run_client(&cgroup, &topo.lb, "tcp", vip, 20);
    assert!(seen.failures.is_empty() && seen.backends.len() == 2, "after the restart: {seen:?}");
    // A stop detaches it all.
    agent.stop();
    assert_eq!(socket_link_pins(&topo), Vec::<String>::new());
    let seen = run_client(&cgroup, &topo.lb, "tcp", vip, 3);
    assert_eq!(seen.failures.len(), 3, "translated after the agent stopped: {seen:?}");
}

/// The Docker test's own bridge and subnet (none of the other tests use them).
const DOCKER_BRIDGE: &str = "lbtsk0";
const DOCKER_SUBNET: &str = "10.216.0.0/24";
/// An unused address of that subnet: a call that is not translated stays
/// on the bridge (and fails) instead of following the host's default route.
const DOCKER_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 216, 0, 250), 80);

fn container_ip(name: &str) -> Ipv4Addr {
    let ip = docker(&["container", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name]);
    ip.trim().parse().unwrap_or_else(|e| panic!("{name}'s address {ip:?}: {e}"))
}

/// A container on a Docker network of this host calls the VIP. Its process
/// is moved into the test's cgroup after it starts (with the hybrid layout
/// `--cgroup-parent` places it only in the v1 hierarchies), and the client
/// waits for that before its first call. The client is this test binary,
/// run with the host's C library mounted read-only (the demo image has
/// nothing but lb-backend). The backends are two demo containers on the
/// same network; the agent runs in the host's namespace.
#[test]
fn root_socket_lb_serves_a_docker_container_on_the_host() {
    require_root_and_docker!("root_socket_lb_serves_a_docker_container_on_the_host");
    let cgroup = TestCgroup::create().expect("a test cgroup");
    let _dockerd = Dockerd::ensure();
    build_demo_image();
    let taken = Command::new("ip").args(["link", "show", "dev", DOCKER_BRIDGE]).output().expect("ip link");
    assert!(!taken.status.success(), "{DOCKER_BRIDGE} exists already; refusing to share it");
    let unique = |tag: &str| format!("lbt-sk{}-{tag}", std::process::id());
    let network = unique("net");
    let _network = NetworkGuard::expect_new(&network);
    let bridge_opt = format!("com.docker.network.bridge.name={DOCKER_BRIDGE}");
    docker(&["network", "create", "--subnet", DOCKER_SUBNET, "-o", &bridge_opt, &network]);
    let backends: Vec<(NamedContainer, SocketAddrV4)> = ["web-a", "web-b"]
        .into_iter()
        .map(|name| {
            let env = format!("LB_BACKEND_NAME={name}");
            let c = NamedContainer::run(&unique(name), &["--network", &network, "-e", &env, DEMO_IMAGE]);
            let addr = SocketAddrV4::new(container_ip(&c.name), 8080);
            wait_http_ok(addr, "/healthz", Duration::from_secs(10)).unwrap_or_else(|e| panic!("{name}: {e}"));
            (c, addr)
        })
        .collect();

    let scratch = Scratch::create(&unique("agent"));
    let config = scratch.path().join("lb.toml");
    let mut text = format!(
        "[[service]]\nname = \"web\"\nvip = \"{}\"\nport = {}\ninterfaces = [\"{DOCKER_BRIDGE}\"]\n",
        DOCKER_VIP.ip(),
        DOCKER_VIP.port()
    );
    for (_, addr) in &backends {
        text += &format!("[[service.backend]]\naddress = \"{addr}\"\n");
    }
    text += &socket_lb_toml(Some(cgroup.path()));
    std::fs::write(&config, text).expect("write config");
    let host = NetNs::attach_process(&unique("host")).expect("name the host's namespace");
    let mut agent = Agent::spawn(&host, &scratch.agent_args(config));
    agent.wait_ready();

    let exe = std::env::current_exe().expect("current_exe");
    let mounts = [
        "/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu:ro".to_owned(),
        "/usr/lib64:/lib64:ro".to_owned(),
        format!("{}:/client:ro", exe.display()),
    ];
    let job = format!("{CLIENT_ENV}=http {DOCKER_VIP} 100");
    let wait = format!("{WAIT_CGROUP_ENV}={}", cgroup.path().file_name().expect("name").to_string_lossy());
    let mut args = vec!["--network", &network, "-e", &job, "-e", &wait, "--entrypoint", "/client"];
    for m in &mounts {
        args.extend(["-v", m]);
    }
    args.extend([DEMO_IMAGE, CLIENT_TEST, "--exact", "--nocapture", "--test-threads=1"]);
    let client = NamedContainer::run(&unique("client"), &args);
    let pid: u32 = docker(&["container", "inspect", "-f", "{{.State.Pid}}", &client.name]).trim().parse().expect("pid");
    cgroup.add(pid).expect("move the container's process into the test cgroup");
    let exit = docker(&["wait", &client.name]);
    let logs = docker(&["logs", &client.name]);
    assert_eq!(exit.trim(), "0", "the client container failed: {logs}");
    let seen = client_output(&logs, &cgroup);
    println!("MEASURED: 100 requests from a container on the host: {seen:?}");
    assert_balanced(&seen, 100, DOCKER_VIP, &agent);
    let status = socket_lb_status(&agent);
    assert!(operations(&status, "translated") >= 200, "{status}");
    drop(client);
    agent.stop();
}
