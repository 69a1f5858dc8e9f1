//! Docker Swarm as the cluster engine (`[service.instances.swarm]`), end to
//! end with real containers: a client namespace sends a bounded HTTP load to
//! the VIP through lb-agent in the host's namespace, whose instances are
//! swarm tasks of the demo image on a swarm-scoped bridge network the agent
//! makes (one swarm service per instance).
//!
//! dockerd is started if none runs (and stopped again only then); the swarm
//! is initialised by the agent (`init = true`) when the engine is in none,
//! and then left again at the end (`docker swarm leave --force`), with the
//! `docker_gwbridge` network it made. The guards remove the test's swarm
//! services and networks also when a test fails. Each test ends by checking
//! that the host has the links, namespaces, engine and swarm state it had
//! before (a `docker_gwbridge` left in the engine's store came back as a
//! Linux bridge at every later engine start).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    sync::{
        atomic::{AtomicU8, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use lb_lab::{
    agent::Agent,
    docker::{build_demo_image, docker_try, Dockerd},
    netns::{LinkGuard, NetNs},
    require_root_and_docker,
    scratch::Scratch,
    swarm::{demo_swarm_toml, HostFootprint, SwarmGuard, SwarmServices},
    topology::host_client,
};
use lb_load::{self as load, LoadConfig, Mode, Ramp, Report};
use serde_json::Value;

/// Never two at once, whatever `--test-threads` says.
static SERIAL: Mutex<()> = Mutex::new(());
static NEXT_SETUP: AtomicU8 = AtomicU8::new(0);

/// One test's world. Fields drop in order: the agent (SIGTERM: it drains
/// nothing, stops its instances and removes its networks), the swarm
/// services and networks it left, the swarm if the test made it, the
/// client namespace and its host link, the host's namespace name, the scratch directory, and
/// dockerd last if this test started it.
struct SwarmWorld {
    agent: Agent,
    services: SwarmServices,
    _swarm: SwarmGuard,
    _client: NetNs,
    _client_link: LinkGuard,
    _host: NetNs,
    _scratch: Scratch,
    _dockerd: Dockerd,
    vip: SocketAddrV4,
    client_ns: String,
}

impl SwarmWorld {
    /// ```text
    ///  client ns                 host (dockerd, lb-agent)                 swarm tasks
    ///  10.227.k.2 [eth0] ==== [lbwc<id>] 10.227.k.1
    ///  route <vip>/32 via .1                        [lbws<id>] 10.226.k.1 (XDP generic)
    ///                                                  `-- veth -- 10.226.k.x:8080 lb-backend
    /// ```
    fn start(policy: &str) -> SwarmWorld {
        let n = NEXT_SETUP.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("{}x{n}", pid % 100_000);
        let k = ((pid % 50) * 5 + u32::from(n) % 5 + 1) as u8;
        let (bridge, client_iface) = (format!("lbws{id}"), format!("lbwc{id}"));
        let service = format!("sw{id}");
        let network = format!("lbt-sw-{id}");
        let subnet = Ipv4Addr::new(10, 226, k, 0);
        let (gw, client_addr) = (Ipv4Addr::new(10, 227, k, 1), Ipv4Addr::new(10, 227, k, 2));
        let vip = SocketAddrV4::new(Ipv4Addr::new(10, 228, k, 1), 80);
        for iface in [&bridge, &client_iface] {
            assert!(!Path::new("/sys/class/net").join(iface).exists(), "interface {iface} exists already");
        }

        let dockerd = Dockerd::ensure();
        build_demo_image();
        for net in [network.clone(), lb_agent::adapters::swarm::config_network(&network)] {
            assert!(!docker_try(&["network", "inspect", &net]).0, "docker network {net} exists already");
        }
        let swarm = SwarmGuard::observe();
        let services = SwarmServices { service: service.clone(), network: network.clone(), bridge: bridge.clone() };
        let client = host_client(&format!("lbt-{id}-swc"), &client_iface, gw, client_addr, *vip.ip());
        let client_link = LinkGuard(client_iface.clone());

        let scratch = Scratch::create(&format!("lbt-{id}-swarm"));
        let config = scratch.path().join("lb.toml");
        let swarm_keys = format!(
            "network = \"{network}\"\nbridge = \"{bridge}\"\nsubnet = \"{subnet}/24\"\ninit = {}",
            swarm.made_here()
        );
        let text = format!(
            "# Written by tests/tests/swarm.rs.\n{}",
            demo_swarm_toml(&service, vip, &[&client_iface, &bridge], "", policy, &swarm_keys)
        );
        fs::write(&config, text).expect("write the config");
        let host = NetNs::attach_process(&format!("lbt-{id}-swhost")).expect("name the host's namespace");
        let mut agent = Agent::spawn(&host, &scratch.agent_args(config));
        agent.wait_ready();
        eprintln!(
            "setup: swarm ({}), service {service}, network {network} (bridge {bridge}, {subnet}/24), VIP {vip}",
            if swarm.made_here() { "initialised by the agent" } else { "the engine's own" }
        );
        let client_ns = client.name().to_owned();
        SwarmWorld {
            agent,
            services,
            _swarm: swarm,
            _client: client,
            _client_link: client_link,
            _host: host,
            _scratch: scratch,
            _dockerd: dockerd,
            vip,
            client_ns,
        }
    }

    fn wait_until(&self, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        self.agent.wait_status(what, timeout, done)
    }

    /// Exactly `n` instances ready and in the table, nothing else, and as
    /// many swarm services of ours.
    fn wait_settled(&self, n: usize, timeout: Duration) -> Value {
        let s = self.wait_until(&format!("{n} instance(s) ready and nothing else"), timeout, |s| {
            let r = replicas(s);
            r.len() == n && r.iter().all(|r| r["phase"] == "ready") && backends(s).len() == n
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.services.ids().len() != n {
            assert!(Instant::now() < deadline, "swarm services {:?}, expected {n}", self.services.ids());
            thread::sleep(Duration::from_millis(100));
        }
        s
    }

    fn scale(&self, replicas: u32) {
        let out = self.agent.cli(&["scale", &self.services.service, "--replicas", &replicas.to_string()]);
        assert!(out.status.success(), "scale --replicas {replicas}: {out:?}");
    }

    /// A constant open-loop load of `rate` requests per second from the
    /// client namespace for `duration`.
    fn load(&self, rate: f64, duration: Duration) -> LoadConfig {
        let ramp = Ramp::constant(rate).expect("ramp");
        let mut cfg = LoadConfig::new(std::net::SocketAddr::from(self.vip), Mode::Open(ramp), duration);
        cfg.netns = Some(self.client_ns.clone());
        cfg.timeout = Duration::from_secs(2);
        cfg
    }
}

fn scaling(status: &Value) -> &Value {
    lb_lab::agent::one_scaling(status)
}

fn replicas(status: &Value) -> Vec<Value> {
    scaling(status)["replicas"].as_array().cloned().unwrap_or_default()
}

fn backends(status: &Value) -> Vec<String> {
    status["services"][0]["backends"]
        .as_array()
        .map(|b| b.iter().filter_map(|b| b["address"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Run the load on a thread while `script(t)` runs on this one (t: seconds
/// since the load started); returns the load's report.
fn under_load(cfg: &LoadConfig, script: impl FnOnce(Instant)) -> Report {
    load::run_during(cfg, script).unwrap_or_else(|e| panic!("the load generator failed: {e}"))
}

fn print_summary(report: &Report) {
    let s = &report.summary;
    eprintln!(
        "MEASURED: load {} requests, {} ok, {} failed {:?}, p99 {:.1} ms, by backend {:?}",
        s.offered,
        s.ok,
        s.failed,
        s.failures,
        s.latency.p99_ms.unwrap_or(f64::NAN),
        s.backends
    );
}

/// From one swarm task to three and back to one under a steady load: each
/// new task serves, the two that go are drained first, and no request
/// fails.
#[test]
fn root_swarm_ramp_up_and_down_loses_no_request() {
    require_root_and_docker!("root_swarm_ramp_up_and_down_loses_no_request");
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let footprint = HostFootprint::now();
    let w = SwarmWorld::start("min_replicas = 1\nmax_replicas = 3\ntarget = { cpu = 90.0 }\n");
    w.wait_settled(1, Duration::from_secs(30));
    eprintln!("MEASURED: first task ready {:.1} s after the start", started.elapsed().as_secs_f64());

    let cfg = w.load(40.0, Duration::from_secs(30));
    let report = under_load(&cfg, |t0| {
        thread::sleep(Duration::from_secs(2));
        w.scale(3);
        w.wait_settled(3, Duration::from_secs(30));
        eprintln!("MEASURED: three tasks ready at t={:.1}s", t0.elapsed().as_secs_f64());
        thread::sleep(Duration::from_secs(2));
        w.scale(1);
        w.wait_settled(1, Duration::from_secs(30));
        eprintln!("MEASURED: back to one task at t={:.1}s", t0.elapsed().as_secs_f64());
    });
    print_summary(&report);
    let sm = &report.summary;
    assert_eq!(sm.failed, 0, "requests failed: {:?}, first errors {:?}", sm.failures, sm.first_errors);
    assert!(sm.backends.len() >= 3, "not every task served: {:?}", sm.backends);
    drop(w);
    HostFootprint::assert_back_to(&footprint);
    eprintln!("MEASURED: test took {:.1} s", started.elapsed().as_secs_f64());
}

/// Two tasks under load; the container of one is killed: Swarm replaces the
/// task, the agent takes the dead address out and the new one in.
#[test]
fn root_swarm_killed_task_is_replaced_by_swarm() {
    require_root_and_docker!("root_swarm_killed_task_is_replaced_by_swarm");
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let footprint = HostFootprint::now();
    let w = SwarmWorld::start("min_replicas = 2\nmax_replicas = 2\ntarget = { cpu = 90.0 }\n");
    let before = w.wait_settled(2, Duration::from_secs(30));
    let victim = replicas(&before)[0].clone();
    let (task, dead_addr) = (victim["id"].as_str().expect("id"), victim["address"].as_str().expect("address"));
    let services_before = w.services.ids();

    let cfg = w.load(40.0, Duration::from_secs(12));
    let mut replaced_after = None;
    let report = under_load(&cfg, |t0| {
        thread::sleep(Duration::from_secs(2));
        let container = SwarmServices::container_of_task(task);
        let (ok, out) = docker_try(&["kill", &container]);
        assert!(ok, "docker kill {container}: {out}");
        let killed = Instant::now();
        eprintln!("killed task {task} (container {}) at t={:.1}s", &container[..12], t0.elapsed().as_secs_f64());
        let s = w.wait_until("a replacement task ready", Duration::from_secs(20), |s| {
            let r = replicas(s);
            backends(s).len() == 2
                && r.len() == 2
                && r.iter().all(|r| r["phase"] == "ready" && r["id"].as_str() != Some(task))
        });
        replaced_after = Some(killed.elapsed());
        let addrs: Vec<String> = replicas(&s).iter().filter_map(|r| r["address"].as_str().map(str::to_owned)).collect();
        eprintln!(
            "after the kill: tasks at {addrs:?} (the dead one was at {dead_addr}; Swarm may give its address again)"
        );
    });
    print_summary(&report);
    let took = replaced_after.expect("replaced");
    eprintln!(
        "MEASURED: killed task replaced (new address ready, in the table) {:.1} s after the kill",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(10), "replacement took {took:?}");
    assert_eq!(w.services.ids(), services_before, "Swarm replaced the task in its own service: no new service");
    let sm = &report.summary;
    // Only requests caught on the dead container may fail.
    assert!(sm.failed <= sm.offered / 20, "{} of {} requests failed: {:?}", sm.failed, sm.offered, sm.first_errors);
    w.wait_settled(2, Duration::from_secs(10));
    drop(w);
    HostFootprint::assert_back_to(&footprint);
    eprintln!("MEASURED: test took {:.1} s", started.elapsed().as_secs_f64());
}
