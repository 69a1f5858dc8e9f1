//! The Docker orchestrator against a real engine, and the load balancer in
//! front of containers, end to end:
//!
//! ```text
//!  client ns                    host (root netns: dockerd, lb-agent)           containers
//!  10.214.0.2 [eth0] ==== [lbt-cli0] 10.214.0.1   (XDP, native)
//!  route 10.214.255.1/32                           [lbtd0] 10.213.0.1 (XDP, generic)
//!        via 10.214.0.1                              |-- veth -- 10.213.0.x:8080  lb-backend
//!                                                    `-- veth -- 10.213.0.y:8080  lb-backend
//! ```
//!
//! What the data path needs (checked here): the agent attaches to the
//! client-facing veth and to the Docker network's bridge (replies to the
//! gateway MAC are passed up the bridge device and cross its generic XDP
//! hook); dockerd's FORWARD policy DROP lets new connections from the
//! client interface to the bridge through only with `iptables -I
//! DOCKER-USER -i lbt-cli0 -o lbtd0 -j ACCEPT` (replies pass dockerd's own
//! `-i lbtd0 ! -o lbtd0 -j ACCEPT`); the host forwards (dockerd sets
//! ip_forward=1) and reverse-path filtering on the bridge is not strict
//! (the rewritten replies come from the VIP, which is not routed there).
//!
//! Needs root, dockerd and the docker CLI (`apt-get install docker.io`; an
//! engine is started for the test if none runs, and stopped again), the
//! agent and the static demo backend:
//! `cargo build --release -p lb-agent && RUSTFLAGS="-C
//! target-feature=+crt-static" cargo build --release -p lb-backend
//! --target x86_64-unknown-linux-gnu && cargo test -p lb-tests
//! --release --test docker_orchestrator -- --nocapture`.
//!
//! Everything the tests make is theirs alone and goes again, also when they
//! fail: containers carry a service label unique to the run, the network,
//! namespace, veth and iptables rule have fixed names the tests refuse to
//! reuse if they exist. The image `lb-demo-backend:dev` stays (it is cheap
//! and reused). The tests share the subnet and bridge, so they run one
//! after the other.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use lb_agent::{
    adapters::docker::DockerOrchestrator,
    config::instances::{Cpus, DockerSpec},
    ports::{Orchestrator, OrchestratorError},
};
use lb_lab::{
    agent::Agent,
    cgroup::socket_lb_toml,
    command::run_cmd,
    docker::{
        build_demo_image, docker_try, http_get, wait_http_ok, Dockerd, IptablesRule, NamedContainer, NetworkGuard,
        ServiceContainers, DEMO_IMAGE,
    },
    netns::NetNs,
    require_root_and_docker,
    scratch::Scratch,
    topology::host_client,
};

/// The two tests share the bridge name and subnet.
static SERIAL: Mutex<()> = Mutex::new(());

const BRIDGE: &str = "lbtd0";
const SUBNET: &str = "10.213.0.0/24";
const BACKEND_PORT: u16 = 8080;
const CLIENT_IFACE: &str = "lbt-cli0";
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 2);
const CLIENT_GW: Ipv4Addr = Ipv4Addr::new(10, 214, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 214, 255, 1);
const VIP_PORT: u16 = 80;

/// The identity of the agent the orchestrators serve (an agent's pin
/// directory, or its control socket).
const AGENT: &str = "/sys/fs/bpf/lbt-docker-orchestrator";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// A name unique to this run and test (labels, network and name prefix).
fn unique(tag: &str) -> String {
    format!("lbt-dk{}-{tag}", std::process::id())
}

fn spec(network: &str) -> DockerSpec {
    DockerSpec {
        image: DEMO_IMAGE.into(),
        port: BACKEND_PORT,
        network: network.into(),
        bridge: BRIDGE.into(),
        subnet: SUBNET.parse().expect("subnet"),
        env: BTreeMap::from([
            ("LB_BACKEND_NAME".to_owned(), "{name}".to_owned()),
            ("LB_BACKEND_LISTEN".to_owned(), "0.0.0.0:{port}".to_owned()),
        ]),
        cpus: Some(Cpus { nano: 1_000_000_000 }),
        // Long enough that a container ignoring SIGTERM would show.
        stop_grace: Duration::from_secs(10),
        name_prefix: None,
    }
}

/// The addresses, interfaces and names the tests use must be free: they
/// refuse to share them with anything they did not create.
fn assert_free() {
    for link in [BRIDGE, CLIENT_IFACE] {
        let taken = std::process::Command::new("ip")
            .args(["link", "show", "dev", link])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            !taken,
            "interface {link} exists already (a leftover of a killed run, or someone else's); refusing to use it"
        );
    }
    for net in [SUBNET, "10.214.0.0/24"] {
        let routes = run_cmd("ip", &["-4", "route", "show", "root", net]);
        assert!(routes.trim().is_empty(), "addresses in {net} are routed already:\n{routes}refusing to use them");
    }
}

/// A running engine, the demo image, and a network and service name of
/// this test's own. Fields drop in order: the service's containers, the
/// network they sit on, the engine if started here.
struct OwnNetwork {
    network: String,
    service: String,
    ours: ServiceContainers,
    _network: NetworkGuard,
    dockerd: Dockerd,
    /// The demo image's id.
    image: String,
}

impl OwnNetwork {
    fn create(tag: &str) -> Self {
        assert_free();
        let dockerd = Dockerd::ensure();
        let image = build_demo_image();
        let (network, service) = (unique("net"), unique(tag));
        // Before the orchestrator makes it: if it exists, it is not ours.
        let network_guard = NetworkGuard::expect_new(&network);
        let ours = ServiceContainers { service: service.clone() };
        OwnNetwork { network, service, ours, _network: network_guard, dockerd, image }
    }
}

fn ip_of(r: &lb_agent::ports::Replica) -> Ipv4Addr {
    *r.addr.ip()
}

/// Requests that burn CPU in `addr`'s container until `stop` is set.
fn load(
    addr: SocketAddrV4,
    threads: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> Vec<thread::JoinHandle<()>> {
    (0..threads)
        .map(|_| {
            let (stop, done) = (stop.clone(), done.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((200, _)) = http_get(addr, "/?work_ms=50", Duration::from_secs(5)) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

#[test]
fn root_docker_orchestrator_lifecycle() {
    require_root_and_docker!("root_docker_orchestrator_lifecycle");
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t0 = Instant::now();
    let own = OwnNetwork::create("life");
    eprintln!(
        "MEASURED: engine ready and image {} built in {:?} (dockerd started here: {})",
        own.image,
        t0.elapsed(),
        own.dockerd.started_here()
    );
    let (network, service) = (&own.network, &own.service);
    let rt = runtime();

    let orch = rt.block_on(DockerOrchestrator::new(AGENT, service, spec(network))).expect("orchestrator");
    let bridge_shown = run_cmd("ip", &["-br", "link", "show", "dev", BRIDGE]);
    assert!(bridge_shown.starts_with(BRIDGE), "the network's bridge is not named {BRIDGE}: {bridge_shown}");

    // A container on our network that we did not make: no labels.
    let foreign =
        NamedContainer::run(&unique("foreign"), &["--network", network, "-e", "LB_BACKEND_NAME=foreign", DEMO_IMAGE]);
    let foreign_id = foreign.id();

    // Two instances.
    let t = Instant::now();
    let a = rt.block_on(orch.start()).expect("start a");
    let b = rt.block_on(orch.start()).expect("start b");
    eprintln!("MEASURED: two containers created and started in {:?}", t.elapsed());
    let list = rt.block_on(orch.list()).expect("list");
    assert_eq!(list.len(), 2, "{list:#?}");
    assert!(list.iter().all(|r| r.running && r.addr.port() == BACKEND_PORT), "{list:#?}");
    let subnet_prefix = [10, 213, 0];
    for r in &list {
        assert_eq!(ip_of(r).octets()[..3], subnet_prefix, "{r:?} is not on the network's subnet");
        assert!(r.name.starts_with(service.as_str()), "{r:?}");
    }
    let mut ids: Vec<&str> = list.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    let mut want = vec![a.id.as_str(), b.id.as_str()];
    want.sort_unstable();
    assert_eq!(ids, want);
    assert_ne!(a.addr, b.addr);
    assert!(!list.iter().any(|r| r.id == foreign_id), "the foreign container is listed: {list:#?}");

    // They serve, from the host, at the addresses the orchestrator gave.
    let t = Instant::now();
    for r in [&a, &b] {
        let body = wait_http_ok(r.addr, "/healthz", Duration::from_secs(10)).unwrap_or_else(|e| panic!("{r:?}: {e}"));
        assert_eq!(body.trim(), "ok");
        let (code, name) = http_get(r.addr, "/?work_ms=0", Duration::from_secs(2)).expect("GET /");
        assert_eq!((code, name.trim()), (200, r.name.as_str()));
    }
    eprintln!("MEASURED: both answered /healthz {:?} after their start returned", t.elapsed());

    // CPU: nothing after one sample; after the second, the loaded one shows.
    // The load runs before the first sample and until after the second, so
    // it covers the window between the two readings, wherever the engine's
    // collection ticks put them.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let loaders = load(a.addr, 2, stop.clone(), done.clone());
    thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let first = rt.block_on(orch.cpu_percent()).expect("cpu 1");
    eprintln!("MEASURED: first cpu_percent call took {:?}", t.elapsed());
    assert!(first.is_empty(), "one sample cannot give a rate: {first:?}");
    thread::sleep(Duration::from_millis(1200));
    let t = Instant::now();
    let cpu = rt.block_on(orch.cpu_percent()).expect("cpu 2");
    let stats_time = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().expect("load thread");
    }
    eprintln!(
        "MEASURED: cpu_percent {:?} (loaded {} with {} requests; the call took {stats_time:?})",
        cpu.iter().map(|(id, p)| (&id[..12], format!("{p:.1}"))).collect::<BTreeMap<_, _>>(),
        &a.id[..12],
        done.load(Ordering::Relaxed)
    );
    let (cpu_a, cpu_b) = (cpu.get(&a.id).copied(), cpu.get(&b.id).copied());
    assert!(cpu_a.is_some_and(|p| p > 60.0 && p < 130.0), "loaded container (limit 1 CPU): {cpu_a:?}");
    assert!(cpu_b.is_some_and(|p| p < 15.0), "idle container: {cpu_b:?}");
    assert!(!cpu.contains_key(&foreign_id), "{cpu:?}");

    // Stop b: SIGTERM reaches lb-backend (PID 1) and it exits at once, well
    // inside the 10 s grace.
    let t = Instant::now();
    rt.block_on(orch.stop(&b.id)).expect("stop b");
    let stop_time = t.elapsed();
    eprintln!("MEASURED: stop (docker stop + remove) took {stop_time:?}");
    assert!(stop_time < Duration::from_secs(5), "stop took {stop_time:?}: SIGTERM was not handled");
    assert!(!docker_try(&["container", "inspect", &b.id]).0, "b was not removed");
    assert!(matches!(rt.block_on(orch.stop(&b.id)), Err(OrchestratorError::Unknown(_))));

    // A new orchestrator (an agent restart) adopts a by its labels.
    let adopter = rt.block_on(DockerOrchestrator::new(AGENT, service, spec(network))).expect("second orchestrator");
    let adopted = rt.block_on(adopter.list()).expect("list after restart");
    assert_eq!(adopted, vec![a.clone()], "the new orchestrator must find exactly the running instance");

    // The foreign container: never listed, never stopped.
    let refused = rt.block_on(adopter.stop(&foreign_id));
    assert!(matches!(refused, Err(OrchestratorError::Unknown(_))), "{refused:?}");
    assert!(foreign.is_running(), "the foreign container was touched");
    // A third instance skips the foreign container's address too.
    let c = rt.block_on(adopter.start()).expect("start c");
    let foreign_ip = docker_try(&[
        "container",
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &foreign_id,
    ])
    .1;
    assert_ne!(ip_of(&c).to_string(), foreign_ip.trim());
    assert_ne!(c.addr, a.addr);

    // An instance that exits (killed here) stays listed, not running, at
    // its address, until `stop` clears it.
    docker_try(&["kill", &c.id]);
    let listed = rt.block_on(adopter.list()).expect("list with an exited instance");
    let exited = listed.iter().find(|r| r.id == c.id).unwrap_or_else(|| panic!("exited c not listed: {listed:#?}"));
    assert_eq!((exited.running, exited.addr, exited.name.as_str()), (false, c.addr, c.name.as_str()));
    assert!(!rt.block_on(adopter.cpu_percent()).expect("cpu").contains_key(&c.id));

    for r in [&a, &c] {
        rt.block_on(adopter.stop(&r.id)).unwrap_or_else(|e| panic!("stop {}: {e}", r.name));
    }
    assert!(rt.block_on(adopter.list()).expect("list").is_empty());
    assert!(own.ours.ids().is_empty());
    assert!(foreign.is_running(), "the foreign container was touched");
    drop(foreign);
    eprintln!("MEASURED: root_docker_orchestrator_lifecycle took {:?}", t0.elapsed());
}

/// Two agents on one host (their identities differ: two pin directories)
/// each run a service of the same name on the same network. Neither lists,
/// measures or stops the other's containers, not even after a restart,
/// when its new orchestrator adopts what it finds.
#[test]
fn root_docker_two_agents_keep_to_their_own_containers() {
    require_root_and_docker!("root_docker_two_agents_keep_to_their_own_containers");
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t0 = Instant::now();
    let own = OwnNetwork::create("two");
    let rt = runtime();
    let (agent_a, agent_b) = ("/sys/fs/bpf/lbt-agent-a", "/sys/fs/bpf/lbt-agent-b");
    let orchestrator = |agent: &str| {
        rt.block_on(DockerOrchestrator::new(agent, &own.service, spec(&own.network)))
            .unwrap_or_else(|e| panic!("orchestrator of {agent}: {e}"))
    };
    let list = |o: &DockerOrchestrator| rt.block_on(o.list()).expect("list");
    let is_running =
        |id: &str| docker_try(&["container", "inspect", "-f", "{{.State.Running}}", id]).1.trim() == "true";

    let a = orchestrator(agent_a);
    let b = orchestrator(agent_b);
    let a1 = rt.block_on(a.start()).expect("a starts one");
    let b1 = rt.block_on(b.start()).expect("b starts one");
    assert!(a1.addr != b1.addr && a1.id != b1.id, "{a1:?} {b1:?}");
    // Each agent's first instance is its `<prefix>-1`; their containers'
    // names hold the agent's identity, so they do not clash.
    assert_eq!((a1.name.as_str(), b1.name.as_str()), (format!("{}-1", own.service).as_str(), a1.name.as_str()));
    let container_name = |id: &str| docker_try(&["container", "inspect", "-f", "{{.Name}}", id]).1.trim().to_owned();
    let (na, nb) = (container_name(&a1.id), container_name(&b1.id));
    assert!(na != nb && na.ends_with(&a1.name) && nb.ends_with(&b1.name), "containers {na} and {nb}");
    assert_eq!(list(&a), vec![a1.clone()], "agent a lists only its own");
    assert_eq!(list(&b), vec![b1.clone()], "agent b lists only its own");

    // Agent a restarts: its new orchestrator adopts a1, and only a1.
    drop(a);
    let a = orchestrator(agent_a);
    assert_eq!(list(&a), vec![a1.clone()], "after a restart, agent a must adopt exactly its own");
    let refused = rt.block_on(a.stop(&b1.id));
    assert!(matches!(refused, Err(OrchestratorError::Unknown(_))), "{refused:?}");
    rt.block_on(a.cpu_percent()).expect("cpu 1");
    thread::sleep(Duration::from_millis(1100));
    let cpu = rt.block_on(a.cpu_percent()).expect("cpu 2");
    assert!(!cpu.contains_key(&b1.id), "agent a measured b's container: {cpu:?}");

    // Agent a retires the service (as its scaler does: stop what it lists);
    // b's instance serves on.
    for r in list(&a) {
        rt.block_on(a.stop(&r.id)).unwrap_or_else(|e| panic!("stop {}: {e}", r.name));
    }
    assert!(list(&a).is_empty());
    assert!(!docker_try(&["container", "inspect", &a1.id]).0, "a1 was not removed");
    assert!(is_running(&b1.id), "agent a touched b's container");
    assert_eq!(list(&b), vec![b1.clone()]);
    rt.block_on(b.stop(&b1.id)).expect("b stops its own");
    assert!(list(&b).is_empty());
    eprintln!("MEASURED: root_docker_two_agents_keep_to_their_own_containers took {:?}", t0.elapsed());
}

/// Connection-tracking entries that mention `needle`.
fn conntrack_lines(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/net/nf_conntrack")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

fn sysctl(path: &str) -> String {
    std::fs::read_to_string(Path::new("/proc/sys").join(path))
        .map_or_else(|e| format!("({e})"), |s| s.trim().to_owned())
}

/// `n` requests from the client namespace to `vip`, one connection each:
/// answers per backend name, and the failures.
fn requests_from_client(
    ns: &NetNs,
    vip: SocketAddrV4,
    n: usize,
    timeout: Duration,
) -> (BTreeMap<String, usize>, Vec<String>) {
    ns.run(move || {
        let (mut by_backend, mut failures) = (BTreeMap::new(), Vec::new());
        for i in 0..n {
            match http_get(vip, "/?work_ms=0", timeout) {
                Ok((200, body)) => *by_backend.entry(body.trim().to_owned()).or_insert(0) += 1,
                Ok((code, body)) => failures.push(format!("request {i}: status {code}: {body}")),
                Err(e) => failures.push(format!("request {i}: {e}")),
            }
        }
        (by_backend, failures)
    })
}

/// Two serving containers on our Docker network (bridge `BRIDGE`), and a
/// client namespace linked to the host by `CLIENT_IFACE`, where only the
/// VIP is routed, via the host. Fields drop in order: the client
/// namespace, the containers, the network, the engine if started here.
struct ContainersBehindBridge {
    client: NetNs,
    replicas: Vec<lb_agent::ports::Replica>,
    orch: DockerOrchestrator,
    rt: tokio::runtime::Runtime,
    _own: OwnNetwork,
}

impl ContainersBehindBridge {
    fn start(tag: &str) -> Self {
        let own = OwnNetwork::create(tag);
        let rt = runtime();
        let orch = rt.block_on(DockerOrchestrator::new(AGENT, &own.service, spec(&own.network))).expect("orchestrator");
        let replicas: Vec<_> =
            (0..2).map(|i| rt.block_on(orch.start()).unwrap_or_else(|e| panic!("start {i}: {e}"))).collect();
        for r in &replicas {
            wait_http_ok(r.addr, "/healthz", Duration::from_secs(10)).unwrap_or_else(|e| panic!("{r:?}: {e}"));
            // Traffic to the containers stays on the bridge, never leaves the host.
            let route = run_cmd("ip", &["-4", "route", "get", &ip_of(r).to_string()]);
            assert!(route.contains(&format!(" dev {BRIDGE} ")), "{} is not routed via {BRIDGE}: {route}", r.addr);
        }
        let client = host_client(&unique("cli"), CLIENT_IFACE, CLIENT_GW, CLIENT_ADDR, VIP);
        Self { client, replicas, orch, rt, _own: own }
    }

    /// Start the agent in the host's namespace, serving `vip` on the client
    /// veth and the bridge with the containers as backends; `extra` is
    /// added to the config.
    fn start_agent(&self, scratch: &Scratch, vip: Ipv4Addr, extra: &str) -> (NetNs, Agent) {
        let config = scratch.path().join("lb.toml");
        let backends: String =
            self.replicas.iter().map(|r| format!("[[service.backend]]\naddress = \"{}\"\n", r.addr)).collect();
        std::fs::write(
            &config,
            format!(
                "[[service]]\nname = \"web\"\nvip = \"{vip}\"\nport = {VIP_PORT}\ninterfaces = [\"{CLIENT_IFACE}\", \"{BRIDGE}\"]\n{backends}{extra}{}",
                socket_lb_toml(None)
            ),
        )
        .expect("write config");
        let host = NetNs::attach_process(&unique("host")).expect("name the host's namespace");
        let mut agent = Agent::spawn(&host, &scratch.agent_args(config));
        agent.wait_ready();
        (host, agent)
    }

    fn stop_containers(&self) {
        for r in &self.replicas {
            self.rt.block_on(self.orch.stop(&r.id)).unwrap_or_else(|e| panic!("stop {}: {e}", r.name));
        }
    }
}

#[test]
fn root_docker_lb_end_to_end() {
    require_root_and_docker!("root_docker_lb_end_to_end");
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t0 = Instant::now();
    let lab = ContainersBehindBridge::start("e2e");
    let (client, replicas) = (&lab.client, &lab.replicas);
    let vip = SocketAddrV4::new(VIP, VIP_PORT);

    // The agent in the host's namespace, attached to the client veth and the
    // bridge, at XDP (which this test is about; `auto` would give them tc).
    let scratch = Scratch::create(&unique("agent"));
    let hooks = format!("[interface.{CLIENT_IFACE:?}]\nhook = \"xdp\"\n[interface.{BRIDGE:?}]\nhook = \"xdp\"\n");
    let (_host, mut agent) = lab.start_agent(&scratch, VIP, &hooks);
    let modes = agent.modes();
    eprintln!("MEASURED: XDP modes {modes:?}");
    assert!(
        modes.iter().any(|(i, _)| i == CLIENT_IFACE) && modes.iter().any(|(i, m)| i == BRIDGE && m == "generic"),
        "{modes:?}"
    );

    // Without an ACCEPT in DOCKER-USER, dockerd's FORWARD policy drops the
    // new connections (the client's SYN, rewritten to a container).
    let (ok, failed) = requests_from_client(client, vip, 1, Duration::from_secs(1));
    assert!(ok.is_empty() && failed.len() == 1, "expected the FORWARD policy to drop this: {ok:?} {failed:?}");

    let rule_spec = ["-i", CLIENT_IFACE, "-o", BRIDGE, "-j", "ACCEPT"];
    let _rule = IptablesRule::insert("DOCKER-USER", &rule_spec);
    let t = Instant::now();
    let (by_backend, failures) = requests_from_client(client, vip, 200, Duration::from_secs(2));
    let took = t.elapsed();
    eprintln!("MEASURED: 200 requests through the VIP in {took:?}: {by_backend:?}, {} failed", failures.len());
    assert!(failures.is_empty(), "{} of 200 failed: {:#?}", failures.len(), &failures[..failures.len().min(10)]);
    assert_eq!(by_backend.values().sum::<usize>(), 200);
    for r in replicas {
        assert!(by_backend.get(&r.name).is_some_and(|n| *n > 0), "{} never answered: {by_backend:?}", r.name);
    }

    // What netfilter made of it (reported, not asserted: it depends on
    // br_netfilter, which these kernels have built in).
    let client_flows = conntrack_lines(&format!("src={CLIENT_ADDR} dst=10.213.0."));
    let vip_flows = conntrack_lines(&format!("src={VIP} "));
    eprintln!(
        "OBSERVED: bridge-nf-call-iptables={} rp_filter all={} {BRIDGE}={} ip_forward={}; conntrack: {} entries client->container \
         ({} ASSURED), {} entries with the VIP as source; e.g. {:?}",
        sysctl("net/bridge/bridge-nf-call-iptables"),
        sysctl("net/ipv4/conf/all/rp_filter"),
        sysctl(&format!("net/ipv4/conf/{BRIDGE}/rp_filter")),
        sysctl("net/ipv4/ip_forward"),
        client_flows.len(),
        client_flows.iter().filter(|l| l.contains("[ASSURED]")).count(),
        vip_flows.len(),
        client_flows.first().or(vip_flows.first()),
    );
    eprintln!("OBSERVED: DOCKER-USER:\n{}", run_cmd("iptables", &["-w", "-L", "DOCKER-USER", "-v", "-n", "-x"]));
    let bridge_link = run_cmd("ip", &["link", "show", "dev", BRIDGE]);
    assert!(bridge_link.contains("xdpgeneric"), "{bridge_link}");

    // The agent detaches on SIGTERM; then the guards remove the rest.
    let status = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "agent exit: {status:?}");
    drop(agent);
    lab.stop_containers();
    eprintln!("MEASURED: root_docker_lb_end_to_end took {:?}", t0.elapsed());
}

/// The same containers behind the same bridge, the VIP now the host's own
/// address on the client link, every hook left to `auto`: tc on the client
/// veth and on the bridge. The containers keep Docker's default offloads
/// (their replies are CHECKSUM_PARTIAL), and no DOCKER-USER rule is needed:
/// tc's redirects skip the FORWARD chain that drops the new connections in
/// the test above, and the martian check the replies would fail.
#[test]
fn root_docker_host_address_vip_at_tc() {
    require_root_and_docker!("root_docker_host_address_vip_at_tc");
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let t0 = Instant::now();
    let lab = ContainersBehindBridge::start("tc");
    let scratch = Scratch::create(&unique("agent"));
    let (_host, mut agent) = lab.start_agent(&scratch, CLIENT_GW, "");
    let modes = agent.modes();
    eprintln!("MEASURED: hooks {modes:?}");
    assert!(modes.iter().filter(|(_, m)| m == "tc").count() == 2, "{modes:?}");

    let vip = SocketAddrV4::new(CLIENT_GW, VIP_PORT);
    let t = Instant::now();
    let (by_backend, failures) = requests_from_client(&lab.client, vip, 200, Duration::from_secs(2));
    eprintln!(
        "MEASURED: tc: 200 requests to the host's address in {:?}: {by_backend:?}, {} failed",
        t.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of 200 failed: {:#?}\n{}",
        failures.len(),
        &failures[..failures.len().min(10)],
        agent.log_tail(30)
    );
    for r in &lab.replicas {
        assert!(by_backend.get(&r.name).is_some_and(|n| *n > 0), "{} never answered: {by_backend:?}", r.name);
    }
    let status = agent.status();
    let interfaces = status["agent"]["interfaces"].as_array().cloned().unwrap_or_default();
    eprintln!("MEASURED: tc: paths {}", serde_json::Value::Array(interfaces.clone()));
    for i in &interfaces {
        let passed: u64 = i["paths"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["fast"] == false)
            .map(|p| p["packets"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(passed, 0, "packets passed up on {}: {i}", i["name"]);
    }
    let status = agent.stop();
    assert!(status.is_some_and(|s| s.success()), "agent exit: {status:?}");
    drop(agent);
    lab.stop_containers();
    eprintln!("MEASURED: root_docker_host_address_vip_at_tc took {:?}", t0.elapsed());
}
