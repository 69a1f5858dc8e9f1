//! Autoscaling end to end: the agent scales a service's instances while
//! `lb_load` sends open-loop HTTP traffic from a client namespace to
//! the VIP. Two worlds:
//!
//! Processes (lb-agent's process orchestrator, `lb-backend` in a network
//! namespace each, behind a bridge in the LB namespace):
//!
//! ```text
//!  client ns                LB ns (lb-agent, XDP on lb-c and the bridge)   <bridge>-<n> ns
//!  10.200.0.2 [to-lb] ==== [lb-c] 10.200.0.1
//!                                 <prefix>.1 [<bridge>] ==== [eth0] <prefix>.n  lb-backend web-<n>
//! ```
//!
//! Docker (lb-agent's Docker orchestrator, containers of the demo image on a
//! network the agent makes; the agent in the host's namespace beside dockerd,
//! see `Scaled::start_docker`). dockerd is started if none runs, and stopped
//! again.
//!
//! Needs root and built binaries: `cargo build --release -p lb-agent -p
//! lb-backend --bins`, the static lb-backend for the image
//! (`cargo xtask test` builds both), then `cargo test -p lb-tests --release
//! --test e2e_scaling -- --test-threads=1 --nocapture` (about 4 minutes).
//! Figures are printed as `MEASURED:` lines; a ramp's chart goes to
//! `LB_SCALING_SVG` (with `.process.svg` / `.docker.svg`), by default
//! `$TMPDIR/lb-e2e-scaling-<orchestrator>-<pid>.svg` (outside the test's
//! scratch directory, which is removed).
//!
//! Each test gets its own names (bridge, instance prefix, Docker service,
//! network and subnet). The guards remove everything again, also when a test
//! fails: the agent (SIGTERM stops its instances), then whatever instances a
//! killed agent left (processes SIGKILLed by pid, containers by the
//! service's labels), the network, the namespaces, bpffs and directory.
//!
//! The machine may have 2 cores and other work: assertions are about
//! behaviour (no failed request, the count reached and returned, no change
//! in steady load), with generous bounds on time.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddrV4},
    ops::ControlFlow,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU8, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use lb_agent::adapters::dataplane::pins::is_bpffs;
use lb_lab::{
    agent::{Agent, AgentArgs},
    bins::built_bin,
    cgroup::socket_lb_toml,
    command::run_cmd,
    docker::{build_demo_image, docker_try, Dockerd, NetworkGuard, ServiceContainers, DEMO_IMAGE},
    netns::{netns_pids, InstanceNamespaces, NetNs},
    require_root, require_root_and_docker,
    scratch::Scratch,
    topology::{host_client, Options, Topology, LB_CLIENT_IFACE, TCP_PORT, VIP},
};
use lb_load::{self as load, plot, LoadConfig, Mode, Ramp, Report};
use serde_json::Value;

/// Load tests on a small machine: never two at once, whatever
/// `--test-threads` says.
static SERIAL: Mutex<()> = Mutex::new(());
static NEXT_SETUP: AtomicU8 = AtomicU8::new(0);

/// Port the instances listen on.
const INSTANCE_PORT: u16 = 8080;
/// CPU each request burns in an instance.
const WORK_MS: u32 = 10;

fn backend_bin() -> PathBuf {
    built_bin("lb-backend", "LB_BACKEND_BIN")
}

// ---------------------------------------------------------------------------
// Setup

/// Where a test's instances come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Orch {
    /// lb-agent's process orchestrator: a network namespace per instance
    /// behind a bridge in the LB namespace.
    Process,
    /// lb-agent's Docker orchestrator: containers of the demo image on a
    /// Docker bridge network; the agent runs in the host's namespace, where
    /// dockerd's bridge is.
    Docker,
}

impl Orch {
    fn label(self) -> &'static str {
        match self {
            Orch::Process => "process",
            Orch::Docker => "docker",
        }
    }
}

/// One test's world. Fields drop in declaration order: the agent first
/// (SIGTERM; it stops its instances), then whatever the world holds.
struct Scaled {
    agent: Agent,
    world: World,
    timeline: PathBuf,
    vip: SocketAddrV4,
    client_ns: String,
}

enum World {
    Process {
        /// Any instance namespace a killed agent left, then the topology.
        instances: InstanceNamespaces,
        _topo: Topology,
    },
    Docker(DockerWorld),
}

/// The Docker world: a client namespace with a veth into the host, and the
/// engine. Fields drop in order: leftover containers of the service, the
/// network the agent made, the client namespace (and veth), the name for
/// the host's namespace, the scratch directory (bpffs unmounted), and
/// dockerd last if this test started it.
struct DockerWorld {
    containers: ServiceContainers,
    _network: NetworkGuard,
    _client: NetNs,
    _host: NetNs,
    _scratch: Scratch,
    _dockerd: Dockerd,
}

impl Scaled {
    /// A client namespace, no static backends, and the agent with `web`
    /// scaled by `policy` (the body of `[service.scaling]`), its instances
    /// from `orch`.
    fn start(orch: Orch, policy: &str) -> Scaled {
        match orch {
            Orch::Process => Self::start_process(policy),
            Orch::Docker => Self::start_docker(policy),
        }
    }

    fn service_toml(name: &str, vip: SocketAddrV4, interfaces: [&str; 2], policy: &str, timeline: &Path) -> String {
        format!(
            r#"[[service]]
name = "{name}"
vip = "{ip}"
port = {port}
interfaces = ["{i0}", "{i1}"]
health_check = {{ kind = "http", path = "/healthz", interval = "500ms" }}
drain_timeout = "10s"

[service.scaling]
{policy}

[service.instances]
timeline = {timeline:?}
ready_timeout = "10s"
# Requests per second per instance, from lb-backend's own counter.
requests = {{ counter = 'demo_backend_requests_total{{route="/"}}' }}
{socket_lb}"#,
            ip = vip.ip(),
            port = vip.port(),
            i0 = interfaces[0],
            i1 = interfaces[1],
            policy = policy.trim(),
            timeline = timeline.display().to_string(),
            socket_lb = socket_lb_toml(None),
        )
    }

    fn start_process(policy: &str) -> Scaled {
        Self::start_process_with(policy, Topology::agent_args)
    }

    /// `start_process` with the agent's arguments from `args`.
    fn start_process_with(policy: &str, args: impl FnOnce(&Topology) -> AgentArgs) -> Scaled {
        let n = NEXT_SETUP.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // At most 11 characters ("lbs" + 5 + 3), letters and digits only.
        let bridge = format!("lbs{}x{n}", pid % 100_000);
        // A /24 of its own per test: 10.212.0.0 is the default, keep off it.
        let prefix = Ipv4Addr::new(10, 213, ((pid % 50) * 5 + u32::from(n) % 5 + 1) as u8, 0);
        let topo = Topology::build(Options::with_backends::<&str>(&[]));
        let instances = InstanceNamespaces::claim(&bridge);
        let timeline = topo.dir().join("timeline.jsonl");
        let vip = SocketAddrV4::new(VIP, TCP_PORT);
        let config = format!(
            "# Written by e2e_scaling for topology {}.\n{}\n[service.instances.process]\n\
             command = [{:?}, \"--listen\", \"{{addr}}\", \"--name\", \"{{name}}\", \"--work-ms\", \"{WORK_MS}\", \
             \"--cpu-workers\", \"1\"]\nport = {INSTANCE_PORT}\nbridge = \"{bridge}\"\nprefix = \"{prefix}\"\n\
             stop_grace = \"3s\"\n",
            topo.prefix,
            Self::service_toml("web", vip, [LB_CLIENT_IFACE, &bridge], policy, &timeline),
            backend_bin().display().to_string(),
        );
        topo.write_raw_config(&config);
        let agent = topo.start_agent_with(&args(&topo));
        eprintln!("setup: processes, topology {}, bridge {bridge}, instances {prefix}/24", topo.prefix);
        let client_ns = topo.client.name().to_owned();
        Scaled { agent, world: World::Process { instances, _topo: topo }, timeline, vip, client_ns }
    }

    /// ```text
    ///  client ns                 host (dockerd, lb-agent)                 containers
    ///  10.217.k.2 [eth0] ==== [lbsc<id>] 10.217.k.1   (XDP native)
    ///  route <vip>/32 via .1                          [lbsd<id>] 10.216.k.1 (XDP generic)
    ///                                                    `-- veth -- 10.216.k.x:8080 lb-backend
    /// ```
    /// The VIP is 10.218.k.1, on no interface. The client has no other route.
    fn start_docker(policy: &str) -> Scaled {
        let n = NEXT_SETUP.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("{}x{n}", pid % 100_000);
        let k = ((pid % 50) * 5 + u32::from(n) % 5 + 1) as u8;
        let (bridge, client_iface) = (format!("lbsd{id}"), format!("lbsc{id}"));
        let service = format!("web{id}");
        let network = format!("lbt-{id}");
        let subnet = Ipv4Addr::new(10, 216, k, 0);
        let (gw, client_addr) = (Ipv4Addr::new(10, 217, k, 1), Ipv4Addr::new(10, 217, k, 2));
        let vip = SocketAddrV4::new(Ipv4Addr::new(10, 218, k, 1), 80);
        for iface in [&bridge, &client_iface] {
            assert!(!Path::new("/sys/class/net").join(iface).exists(), "interface {iface} exists already");
        }

        let dockerd = Dockerd::ensure();
        build_demo_image();
        // Before the agent makes it: if it exists, it is not ours.
        let network_guard = NetworkGuard::expect_new(&network);
        let containers = ServiceContainers { service: service.clone() };
        let client = host_client(&format!("lbt-{id}-cli"), &client_iface, gw, client_addr, *vip.ip());

        let scratch = Scratch::create(&format!("lbt-{id}-agent"));
        let timeline = scratch.path().join("timeline.jsonl");
        let config = scratch.path().join("lb.toml");
        let text = format!(
            "# Written by e2e_scaling (Docker).\n{}\n[service.instances.docker]\nimage = \"{DEMO_IMAGE}\"\n\
             port = {INSTANCE_PORT}\nnetwork = \"{network}\"\nbridge = \"{bridge}\"\nsubnet = \"{subnet}/24\"\n\
             cpus = 1.0\nstop_grace = \"3s\"\n\
             env = {{ LB_BACKEND_NAME = \"{{name}}\", LB_BACKEND_LISTEN = \"0.0.0.0:{{port}}\", \
             LB_BACKEND_WORK_MS = \"{WORK_MS}\", LB_BACKEND_CPU_WORKERS = \"1\" }}\n",
            Self::service_toml(&service, vip, [&client_iface, &bridge], policy, &timeline),
        );
        fs::write(&config, text).expect("write the config");
        let host = NetNs::attach_process(&format!("lbt-{id}-host")).expect("name the host's namespace");
        let args = scratch.agent_args(config);
        let mut agent = Agent::spawn(&host, &args);
        agent.wait_ready();
        // Every address the test sends to is routed on this machine: the VIP
        // from the client goes to the host, and the host reaches the
        // containers over the bridge the agent's network made.
        let route = client.exec("ip", &["-4", "route", "get", &vip.ip().to_string()]);
        assert!(route.contains(&format!("via {gw} dev eth0")), "VIP route in the client: {route}");
        let route = run_cmd("ip", &["-4", "route", "get", &Ipv4Addr::new(10, 216, k, 2).to_string()]);
        assert!(route.contains(&format!(" dev {bridge} ")), "containers are not routed via {bridge}: {route}");
        eprintln!("setup: docker, service {service}, network {network} (bridge {bridge}, {subnet}/24), VIP {vip}");
        let client_ns = client.name().to_owned();
        let world = World::Docker(DockerWorld {
            containers,
            _network: network_guard,
            _client: client,
            _host: host,
            _scratch: scratch,
            _dockerd: dockerd,
        });
        Scaled { agent, world, timeline, vip, client_ns }
    }

    fn status(&self) -> Value {
        self.agent.status()
    }

    /// Poll the status until `done` holds; panics with the last status (and,
    /// through the agent guard, its log) after `timeout`.
    fn wait_until(&self, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        self.agent.wait_status(what, timeout, done)
    }

    /// Wait until exactly `n` instances are ready and in the table, and none
    /// is starting, draining or stopping.
    fn wait_settled(&self, n: usize, timeout: Duration) -> Value {
        self.wait_until(&format!("{n} instance(s) ready and nothing else"), timeout, |s| {
            let r = replicas(s);
            r.len() == n && r.iter().all(|r| r["phase"] == "ready") && backends(s).len() == n
        })
    }

    /// Kill an instance the way a crash would: SIGKILL to its process, or
    /// `docker kill` of its container. Returns what was killed.
    fn kill(&self, victim: &Value) -> String {
        let id = victim["id"].as_str().expect("id");
        match &self.world {
            World::Process { .. } => {
                let pids = netns_pids(id);
                assert_eq!(pids.len(), 1, "expected one process (lb-backend) in {id}, found {pids:?}");
                // SAFETY: kill(2) on the one process in an instance namespace of ours.
                let rc = unsafe { libc::kill(pids[0] as libc::pid_t, libc::SIGKILL) };
                assert_eq!(rc, 0, "SIGKILL {}: {}", pids[0], std::io::Error::last_os_error());
                format!("pid {}", pids[0])
            }
            World::Docker(w) => {
                assert!(w.containers.ids().iter().any(|c| c == id), "{id} is not one of the service's containers");
                let (ok, out) = docker_try(&["kill", id]);
                assert!(ok, "docker kill {id}: {out}");
                format!("container {}", &id[..12.min(id.len())])
            }
        }
    }

    /// Every instance that exists (namespace or container) is one the agent
    /// tracks: nothing stopped was left behind while the agent runs.
    fn assert_no_leftovers(&self) {
        let status = self.status();
        let mut tracked: Vec<String> =
            replicas(&status).iter().map(|r| r["id"].as_str().expect("id").to_owned()).collect();
        tracked.sort();
        let (existing, what) = match &self.world {
            World::Process { instances, .. } => {
                (instances.list(), format!("namespaces of bridge {}", instances.bridge()))
            }
            World::Docker(w) => (w.containers.ids(), format!("containers of service {}", w.containers.service)),
        };
        assert!(existing.iter().all(|n| tracked.contains(n)), "{what}: {existing:?}, but instances {tracked:?}");
    }

    /// Scaling decisions from the JSONL timeline, with `t` in seconds since
    /// `since` (a Unix time).
    fn timeline(&self, since: f64) -> Vec<TimelineEntry> {
        let text = fs::read_to_string(&self.timeline)
            .unwrap_or_else(|e| panic!("read the timeline {}: {e}", self.timeline.display()));
        text.lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("timeline line {l:?}: {e}"));
                let num = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("timeline line without {k}: {l}")) as u32;
                TimelineEntry {
                    t: v["unix_time"].as_f64().expect("unix_time") - since,
                    replicas: num("replicas"),
                    previous: num("previous"),
                    current: num("current"),
                    rule: v["rule"].as_str().unwrap_or_default().to_owned(),
                    reason: v["reason"].as_str().unwrap_or_default().to_owned(),
                    cpu: v["inputs"]["cpu_percent"].as_f64(),
                    rps: v["inputs"]["requests_per_second"].as_f64(),
                    ready: v["inputs"]["ready"].as_u64().unwrap_or(0) as u32,
                }
            })
            .collect()
    }
}

struct TimelineEntry {
    t: f64,
    replicas: u32,
    previous: u32,
    current: u32,
    rule: String,
    reason: String,
    cpu: Option<f64>,
    /// Average requests per second per ready instance, from their counters.
    rps: Option<f64>,
    ready: u32,
}

impl TimelineEntry {
    fn is_scaling(&self) -> bool {
        self.replicas != self.previous
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("clock after 1970").as_secs_f64()
}

// ---------------------------------------------------------------------------
// Reading the status

/// The status's one `scaling` entry (each test's agent has one service).
fn scaling(status: &Value) -> &Value {
    lb_lab::agent::one_scaling(status)
}

fn replicas(status: &Value) -> Vec<Value> {
    scaling(status)["replicas"].as_array().cloned().unwrap_or_default()
}

fn ready(status: &Value) -> Vec<Value> {
    replicas(status).into_iter().filter(|r| r["phase"] == "ready").collect()
}

/// The one service's backends in the table, by address.
fn backends(status: &Value) -> BTreeMap<String, Value> {
    let web = match status["services"].as_array().map(Vec::as_slice) {
        Some([one]) => one,
        _ => panic!("expected one service in status: {status}"),
    };
    web["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|b| (b["address"].as_str().expect("address").to_owned(), b))
        .collect()
}

/// What the status said at one moment, `t` seconds after the load started.
#[derive(Clone, Debug)]
struct Sample {
    t: f64,
    ready: u32,
    replicas: u32,
    desired: u32,
    backends: u32,
    /// Ready instances' CPU, percent of one core.
    cpu: Vec<f64>,
}

impl Sample {
    fn of(status: &Value, t: f64) -> Sample {
        let r = ready(status);
        Sample {
            t,
            ready: r.len() as u32,
            replicas: replicas(status).len() as u32,
            desired: scaling(status)["desired"].as_u64().unwrap_or(0) as u32,
            backends: backends(status).len() as u32,
            cpu: r.iter().filter_map(|r| r["cpu_percent"].as_f64()).collect(),
        }
    }

    fn summary(&self) -> (u32, u32, u32, u32) {
        (self.ready, self.replicas, self.desired, self.backends)
    }
}

/// Samples where anything but the time and CPU changed, for printing.
fn changes(samples: &[Sample]) -> Vec<&Sample> {
    let mut out: Vec<&Sample> = Vec::new();
    for s in samples {
        if out.last().is_none_or(|l| l.summary() != s.summary()) {
            out.push(s);
        }
    }
    out
}

fn print_changes(samples: &[Sample]) {
    for s in changes(samples) {
        let cpu: Vec<String> = s.cpu.iter().map(|c| format!("{c:.0}")).collect();
        eprintln!(
            "MEASURED: t={:6.2}s ready={} instances={} desired={} in table={} cpu%=[{}]",
            s.t,
            s.ready,
            s.replicas,
            s.desired,
            s.backends,
            cpu.join(",")
        );
    }
}

fn print_scale_events(timeline: &[TimelineEntry]) {
    for e in timeline.iter().filter(|e| e.is_scaling()) {
        eprintln!(
            "MEASURED: scale t={:6.2}s {} -> {} (exist {}, ready {}, avg cpu {}) rule {:?}: {}",
            e.t,
            e.previous,
            e.replicas,
            e.current,
            e.ready,
            e.cpu.map_or("-".into(), |c| format!("{c:.1}%")),
            e.rule,
            e.reason
        );
    }
}

/// The agent's recent events (at most its last 50), oldest first, with `t`
/// in seconds since `since` (a Unix time).
fn print_events(status: &Value, since: f64) {
    let mut events = status["events"].as_array().cloned().unwrap_or_default();
    events.reverse();
    for e in events {
        let t = e["unix_time"].as_f64().unwrap_or(0.0) - since;
        eprintln!("  event t={t:7.2}s {}", e["message"].as_str().unwrap_or("?"));
    }
}

// ---------------------------------------------------------------------------
// Load

/// Sets the flag when dropped, so that a panic while the load runs ends it
/// early instead of leaving `thread::scope` waiting for the whole ramp.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn load_config(s: &Scaled, ramp: Ramp, duration: Duration) -> LoadConfig {
    let mut cfg = LoadConfig::new(std::net::SocketAddr::from(s.vip), Mode::Open(ramp), duration);
    cfg.netns = Some(s.client_ns.clone());
    cfg.timeout = Duration::from_secs(2);
    cfg
}

/// A `run_load` watcher that samples the status until the load's end.
fn sample_into<'a>(s: &'a Scaled, samples: &'a mut Vec<Sample>) -> impl FnMut(f64) -> ControlFlow<()> + 'a {
    move |t| {
        samples.push(Sample::of(&s.status(), t));
        ControlFlow::Continue(())
    }
}

/// Run the load on a thread while calling `watch(t)` on this one about every
/// `every` (t: seconds since the load started), until the load's duration
/// is over or `watch` breaks (then no further request is sent: a test
/// that has seen what it waits for ends early). Returns the load's report.
fn run_load(cfg: &LoadConfig, every: Duration, mut watch: impl FnMut(f64) -> ControlFlow<()>) -> Report {
    let stop = AtomicBool::new(false);
    thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        let t0 = Instant::now();
        let load = scope.spawn(|| load::run(cfg, &stop, |_| {}));
        while !load.is_finished() {
            if watch(t0.elapsed().as_secs_f64()).is_break() {
                stop.store(true, Ordering::SeqCst);
                break;
            }
            thread::sleep(every);
        }
        match load.join() {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => panic!("the load generator failed: {e}"),
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// One line per second of the load: rate, failures, latency, backends.
fn print_series(report: &Report) {
    for p in &report.series {
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        let by: Vec<String> = p.backends.iter().map(|(b, n)| format!("{b}:{n}")).collect();
        eprintln!(
            "  load t={:3.0}s offered {:3} ok {:3} failed {:2} p50 {:>5} ms p99 {:>5} ms  {}",
            p.t,
            p.offered,
            p.ok,
            p.failed,
            ms(p.p50_ms),
            ms(p.p99_ms),
            by.join(" ")
        );
    }
}

fn print_load_summary(report: &Report) {
    let s = &report.summary;
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} ms"));
    eprintln!(
        "MEASURED: load: {} offered, {} ok, {} failed (refused {}, reset {}, timeout {}, other {}, late {}); \
         latency p50 {} p90 {} p99 {} max {}; per backend {:?}",
        s.offered,
        s.ok,
        s.failed,
        s.failures.refused,
        s.failures.reset,
        s.failures.timeout,
        s.failures.other,
        s.failures.late,
        ms(s.latency.p50_ms),
        ms(s.latency.p90_ms),
        ms(s.latency.p99_ms),
        ms(s.latency.max_ms),
        s.backends
    );
    if !s.first_errors.is_empty() {
        eprintln!("MEASURED: first error of each kind: {:?}", s.first_errors);
    }
}

// ---------------------------------------------------------------------------
// Tests

/// Where the load starts to rise, the ramp, and how long requests are sent.
/// The slopes are what the scaler must keep up with (+12 req/s each second,
/// a new instance about every 4 s); the plateaus are as short as the
/// scale-down windows allow: 3 instances hold 140 req/s for 12 s, and the
/// first step down comes while the light load still runs.
const RAMP_STEP_AT: f64 = 3.0;
const RAMP: &str = "0s:20,3s:20,13s:140,25s:140,30s:10,38s:10";
/// How long the count may take to return to one after the load's end.
const BACK_WITHIN: Duration = Duration::from_secs(40);

#[test]
fn root_scaling_ramp_with_processes() {
    require_root!("root_scaling_ramp_with_processes");
    ramp_scenario(Orch::Process);
}

#[test]
fn root_docker_scaling_ramp() {
    require_root_and_docker!("root_docker_scaling_ramp");
    ramp_scenario(Orch::Docker);
}

/// Light load, a step to about 2.5 instances' worth, back to light: the
/// count goes from 1 up and back to 1, and no request fails.
fn ramp_scenario(orch: Orch) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    // The default policy but for a 5 s scale-down window and rate-limit
    // period (30 s and 15 s by default), to keep the test short; the rate
    // limit's 50 % stays, so 4 -> 1 still takes two periods.
    let s = Scaled::start(
        orch,
        r#"
min_replicas = 1
max_replicas = 4
target = { cpu = 50.0 }
scale_down = { stabilization_window = "5s", period = "5s" }
"#,
    );
    let first = s.wait_settled(1, Duration::from_secs(20));
    let initial = ready(&first)[0]["name"].as_str().expect("name").to_owned();
    eprintln!(
        "MEASURED: first instance {initial} ready {:.1} s after the agent started",
        started.elapsed().as_secs_f64()
    );

    let ramp = Ramp::parse(RAMP).expect("ramp");
    // When one instance is past its target and tolerance: CPU above 55 %,
    // about 55 req/s with 10 ms of work each.
    let one_full = (0..1000).map(|i| f64::from(i) / 10.0).find(|&t| ramp.rate_at(t) > 55.0).unwrap_or(RAMP_STEP_AT);
    let duration = Duration::from_secs_f64(ramp.end());
    let cfg = load_config(&s, ramp, duration);
    let t0_unix = unix_now();
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let report = run_load(&cfg, Duration::from_millis(250), sample_into(&s, &mut samples));
    let load_end = t0.elapsed().as_secs_f64();

    // After the load: back to min_replicas, bounded (5 s window + one more
    // 5 s rate-limit period + the drains, with room for a busy machine).
    let deadline = Instant::now() + BACK_WITHIN;
    let mut back_at = None;
    while Instant::now() < deadline {
        let status = s.status();
        let sample = Sample::of(&status, t0.elapsed().as_secs_f64());
        let done = sample.ready == 1 && sample.replicas == 1 && sample.backends == 1;
        samples.push(sample);
        if done {
            back_at = Some(t0.elapsed().as_secs_f64());
            break;
        }
        thread::sleep(Duration::from_millis(250));
    }

    let timeline = s.timeline(t0_unix);
    eprintln!("---- instances over time (status, t since the load started) ----");
    print_changes(&samples);
    eprintln!("---- scaling decisions (timeline) ----");
    print_scale_events(&timeline);
    eprintln!("---- load per second ----");
    print_series(&report);
    print_load_summary(&report);

    let peak_ready = samples.iter().map(|s| s.ready).max().unwrap_or(0);
    let peak_decided = timeline.iter().map(|e| e.replicas).max().unwrap_or(0);
    let first_new = report
        .series
        .iter()
        .find(|p| p.backends.keys().any(|b| *b != initial))
        .map(|p| (p.t, p.backends.keys().find(|b| **b != initial).cloned().unwrap_or_default()));
    let first_scale =
        timeline.iter().find(|e| e.is_scaling() && e.previous >= 1 && e.replicas > e.previous).map(|e| e.t);
    let second_ready = samples.iter().find(|s| s.ready >= 2).map(|s| s.t);
    eprintln!(
        "MEASURED: load step at t={RAMP_STEP_AT}s (ramp {RAMP}); offered rate past one instance's target \
         (55 req/s) at t={one_full:.1}s; load ended at t={load_end:.1}s"
    );
    let after = |t: Option<f64>| {
        t.map_or("-".into(), |t| {
            format!("{:.1} s after the step, {:.1} s after 55 req/s", t - RAMP_STEP_AT, t - one_full)
        })
    };
    eprintln!("MEASURED: first scale-up decision {}", after(first_scale));
    eprintln!("MEASURED: second instance ready (status) {}", after(second_ready));
    match &first_new {
        Some((t, name)) => eprintln!(
            "MEASURED: first response from a new instance ({name}): in the load's second [{t:.0}, {:.0}), \
             i.e. {:.0}-{:.0} s after the step",
            t + 1.0,
            t - RAMP_STEP_AT,
            t + 1.0 - RAMP_STEP_AT
        ),
        None => eprintln!("MEASURED: no response from a new instance"),
    }
    eprintln!(
        "MEASURED: peak instances ready {peak_ready}, peak decided {peak_decided}; back to 1 at {}",
        back_at.map_or(format!("never (within {BACK_WITHIN:?})"), |t| {
            format!("t={t:.1}s, {:.1} s after the load ended", t - load_end)
        })
    );

    // The chart: load, instances ready (in the table), latency.
    let steps: Vec<(f64, u32)> = changes(&samples).iter().map(|s| (s.t, s.ready)).collect();
    let mut steps = steps;
    if let Some(last) = samples.last() {
        steps.push((last.t, last.ready));
    }
    let sm = &report.summary;
    let title = format!(
        "lb-agent autoscaling: {} instances, target cpu 50%, {WORK_MS} ms CPU per request\n\
         ramp {RAMP}; {} requests, {} failed, p50 {:.1} ms, p99 {:.1} ms; peak {peak_ready} instances",
        orch.label(),
        sm.offered,
        sm.failed,
        sm.latency.p50_ms.unwrap_or(f64::NAN),
        sm.latency.p99_ms.unwrap_or(f64::NAN),
    );
    let svg = plot::render_svg_titled(&title, &report.series, &steps);
    let svg_path = std::env::var_os("LB_SCALING_SVG")
        .map(PathBuf::from)
        .map(|p| p.with_extension(format!("{}.svg", orch.label())))
        .unwrap_or_else(|| {
            std::env::temp_dir().join(format!("lb-e2e-scaling-{}-{}.svg", orch.label(), std::process::id()))
        });
    fs::write(&svg_path, svg).unwrap_or_else(|e| panic!("write {}: {e}", svg_path.display()));
    eprintln!("MEASURED: chart {}", svg_path.display());

    assert_eq!(sm.failed, 0, "requests failed during the ramp: {:?}, first errors {:?}", sm.failures, sm.first_errors);
    assert!(peak_ready >= 3, "only {peak_ready} instance(s) were ever ready at the peak (140 req/s x {WORK_MS} ms)");
    assert!(first_new.is_some(), "no request was ever answered by an instance other than {initial}");
    assert!(back_at.is_some(), "not back to min_replicas = 1 within {BACK_WITHIN:?} of the load's end");
    s.assert_no_leftovers();
    eprintln!("MEASURED: test took {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn root_crashed_instance_is_replaced() {
    require_root!("root_crashed_instance_is_replaced");
    crash_scenario(Orch::Process);
}

#[test]
fn root_docker_killed_container_is_replaced() {
    require_root_and_docker!("root_docker_killed_container_is_replaced");
    crash_scenario(Orch::Docker);
}

/// Two instances under load; one is killed: it leaves the table at once, a
/// replacement serves within seconds, and only requests sent to the dead one
/// fail.
fn crash_scenario(orch: Orch) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let s = Scaled::start(orch, "min_replicas = 2\nmax_replicas = 2\n");
    s.wait_settled(2, Duration::from_secs(20));

    const RATE: f64 = 40.0;
    const KILL_AT: f64 = 3.0;
    // The load ends this long after the replacement took its first flow
    // (failures after the kill window would show there), at the latest
    // after the whole duration.
    const SERVED_FOR: f64 = 4.0;
    let cfg = load_config(&s, Ramp::constant(RATE).expect("ramp"), Duration::from_secs(18));
    let t0_unix = unix_now();

    // (t, address, netns) of the kill.
    let mut killed: Option<(f64, String, String)> = None;
    let (mut gone_at, mut replaced) = (None::<f64>, None::<(f64, String, String)>);
    let mut serving_at = None::<f64>;
    let mut flows_when_ready = 0;
    let mut samples = Vec::new();
    let report = run_load(&cfg, Duration::from_millis(50), |t| {
        let status = s.status();
        samples.push(Sample::of(&status, t));
        let Some((t_kill, addr, _)) = &killed else {
            if t >= KILL_AT {
                let victim = ready(&status).into_iter().next().expect("a ready instance to kill");
                let ns = victim["id"].as_str().expect("id").to_owned();
                let addr = victim["address"].as_str().expect("address").to_owned();
                let what = s.kill(&victim);
                eprintln!("MEASURED: killed instance {} ({addr}, {what}) at t={t:.2}s", victim["name"]);
                killed = Some((t, addr, ns));
            }
            return ControlFlow::Continue(());
        };
        let since_kill = t - t_kill;
        let table = backends(&status);
        if gone_at.is_none() && !table.contains_key(addr) {
            gone_at = Some(since_kill);
        }
        let flows_of = |a: &str| table.get(a).and_then(|b| b["counters"]["new_flows"].as_u64()).unwrap_or(0);
        match &replaced {
            None => {
                // A new instance: younger than the kill. It may get the same
                // slot, hence the same address and name.
                let new =
                    ready(&status).into_iter().find(|r| r["age_seconds"].as_f64().is_some_and(|a| a < since_kill));
                if let Some(r) = new {
                    let a = r["address"].as_str().expect("address").to_owned();
                    flows_when_ready = flows_of(&a);
                    let same = if a == *addr { "same address" } else { "new address" };
                    replaced = Some((since_kill, a, format!("{} ({same})", r["name"].as_str().unwrap_or("?"))));
                }
            }
            Some((_, a, _)) if serving_at.is_none() && flows_of(a) > flows_when_ready => serving_at = Some(since_kill),
            Some(_) => {}
        }
        match serving_at {
            Some(at) if since_kill >= at + SERVED_FOR => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    });

    let (t_kill, killed_addr, _) = killed.expect("the kill happened");
    let timeline = s.timeline(t0_unix);
    eprintln!("---- instances over time (status, t since the load started) ----");
    print_changes(&samples);
    eprintln!("---- decisions around the kill (timeline) ----");
    for e in timeline.iter().filter(|e| e.t >= t_kill - 1.0 && (e.rule == "replace" || e.current != e.replicas)) {
        eprintln!("MEASURED: t={:6.2}s {} exist, want {} ({}): {}", e.t, e.current, e.replicas, e.rule, e.reason);
    }
    eprintln!("---- agent events ----");
    print_events(&s.status(), t0_unix);
    print_load_summary(&report);
    let failed_seconds: Vec<(f64, u64)> =
        report.series.iter().filter(|p| p.failed > 0).map(|p| (p.t, p.failed)).collect();
    eprintln!("MEASURED: failures by second (t, failed): {failed_seconds:?}");
    let fmt = |v: Option<f64>| v.map_or("never".into(), |v| format!("{v:.2} s"));
    eprintln!("MEASURED: killed {killed_addr} at t={t_kill:.2}s; out of the table after {}", fmt(gone_at));
    eprintln!(
        "MEASURED: replacement {} ready after {}; first new flow to it seen after {}",
        replaced.as_ref().map_or("-".into(), |r| format!("{} at {}", r.2, r.1)),
        fmt(replaced.as_ref().map(|r| r.0)),
        fmt(serving_at)
    );
    let sm = &report.summary;
    eprintln!("MEASURED: failed requests {} of {}", sm.failed, sm.offered);

    let gone_after = gone_at.expect("the killed instance never left the table");
    assert!(gone_after <= 2.5, "the killed instance stayed in the table for {gone_after:.2} s");
    let ready_after = replaced.as_ref().map(|r| r.0).expect("no replacement instance became ready");
    assert!(ready_after <= 10.0, "the replacement took {ready_after:.2} s to be ready");
    assert!(serving_at.is_some_and(|t| t <= 12.0), "the replacement served no new flow within 12 s of the kill");
    // Only requests sent to the dead instance before it left the table may
    // fail: in flight at the kill (10 ms of work each: well under one), and
    // those its table slots got until the agent noticed the exit (about
    // half the rate, for at most `gone_after`), plus slack for a busy host.
    let allowed = (RATE / 2.0 * (gone_after + 0.5)).ceil() as u64 + 3;
    assert!(
        sm.failed <= allowed,
        "{} requests failed, more than the {allowed} sent to the dead instance before it left the table: {:?}",
        sm.failed,
        sm.failures
    );
    // A request scheduled up to one timeout before the kill may still
    // have been waiting for its turn when the instance died.
    let timeout = cfg.timeout.as_secs_f64();
    let outside: Vec<&(f64, u64)> =
        failed_seconds.iter().filter(|(t, _)| *t + 1.0 + timeout < t_kill || *t > t_kill + gone_after + 1.0).collect();
    assert!(outside.is_empty(), "failures outside the kill window [{t_kill:.1}s, +{gone_after:.1}s]: {outside:?}");
    s.wait_settled(2, Duration::from_secs(10));
    s.assert_no_leftovers();
    eprintln!("MEASURED: test took {:.1} s", started.elapsed().as_secs_f64());
}

/// The agent is SIGKILLed under load and started again on the same config:
/// the new one adopts the instances the old one left running (same
/// processes, no "File exists" for their namespaces and veths), the service
/// serves throughout, and a clean stop at the end leaves nothing of ours.
#[test]
fn root_process_instances_are_adopted_after_an_agent_sigkill() {
    require_root!("root_process_instances_are_adopted_after_an_agent_sigkill");
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = Scaled::start(Orch::Process, "min_replicas = 2\nmax_replicas = 2\n");
    let before = s.wait_settled(2, Duration::from_secs(20));
    let pids_of = |status: &Value| -> BTreeMap<String, Vec<u32>> {
        replicas(status)
            .iter()
            .map(|r| {
                let ns = r["id"].as_str().expect("id").to_owned();
                let pids = netns_pids(&ns);
                (ns, pids)
            })
            .collect()
    };
    let pids_before = pids_of(&before);
    eprintln!("instances before the kill: {pids_before:?}");

    const KILL_AT: f64 = 3.0;
    // The load goes on this long through the restarted agent (a request
    // stuck on a retransmitted SYN would take a second), at the latest
    // until the whole duration is over.
    const AFTER_RESTART: f64 = 5.0;
    let cfg = load_config(&s, Ramp::constant(40.0).expect("ramp"), Duration::from_secs(14));
    let mut restarted_at = None::<f64>;
    let report = run_load(&cfg, Duration::from_millis(50), |t| {
        match restarted_at {
            Some(at) if t >= at + AFTER_RESTART => return ControlFlow::Break(()),
            Some(_) => {}
            None if t >= KILL_AT => {
                let killed = Instant::now();
                let status = s.agent.kill().expect("exit status");
                eprintln!("SIGKILLed lb-agent at t={t:.2}s: {status}");
                s.agent.respawn();
                s.agent.wait_ready();
                eprintln!("MEASURED: restarted agent ready {} ms after the kill", killed.elapsed().as_millis());
                restarted_at = Some(t + killed.elapsed().as_secs_f64());
            }
            None => {}
        }
        ControlFlow::Continue(())
    });
    print_load_summary(&report);
    let log = s.agent.log();
    assert_eq!(s.agent.count("File exists"), 0, "the new agent tripped over what the old one left:\n{log}");
    assert_eq!(s.agent.count("adopted a running instance"), 2, "the new agent did not adopt both instances:\n{log}");
    let after = s.wait_settled(2, Duration::from_secs(10));
    assert_eq!(pids_of(&after), pids_before, "the instances after the restart are not the ones before");
    let sm = &report.summary;
    eprintln!("MEASURED: agent SIGKILL + restart under load: {} of {} requests failed", sm.failed, sm.offered);
    assert_eq!(sm.failed, 0, "requests failed across the restart: {:?}", sm.first_errors);
    // A request that found the service without a backend waits for its
    // SYN's retransmission, a second later: none did.
    let max_ms = sm.latency.max_ms.unwrap_or_default();
    assert!(max_ms < 1000.0, "a request took {max_ms:.0} ms across the restart (a retransmitted SYN?)");

    // A clean stop removes every instance, the adopted ones included.
    let exit = s.agent.stop().expect("exit status");
    assert!(exit.success(), "agent exited with {exit}:\n{}", s.agent.log());
    let World::Process { instances, _topo: topo } = &s.world else { unreachable!() };
    assert!(instances.list().is_empty(), "namespaces left: {:?}", instances.list());
    let veths: Vec<String> = topo
        .lb_links()
        .lines()
        .filter(|l| l.contains(&format!(" {}-", instances.bridge())))
        .map(str::to_owned)
        .collect();
    assert!(veths.is_empty(), "instance veths left: {veths:?}");
    for pid in pids_before.values().flatten() {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let running = stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'));
        assert!(!running, "instance process {pid} outlived the agent's stop: {stat}");
    }
}

/// Instances are named `web-1`, `web-2` in status and events; a SIGTERM
/// (through `lb-agent stop`, which reports when the agent has gone) leaves
/// nothing the agent made: no instances' bridge, no bpffs it mounted for
/// its pins, no control socket directory it created.
#[test]
fn root_process_agent_names_instances_and_leaves_nothing_on_stop() {
    require_root!("root_process_agent_names_instances_and_leaves_nothing_on_stop");
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // A socket directory that does not exist yet: the agent makes it.
    let socket_dir = |topo: &Topology| topo.dir().join("run-lb-agent");
    let mut s = Scaled::start_process_with("min_replicas = 2\nmax_replicas = 2\n", |topo| AgentArgs {
        api_socket: socket_dir(topo).join("lb-agent.sock"),
        ..topo.agent_args()
    });
    let status = s.wait_settled(2, Duration::from_secs(20));
    let mut names: Vec<String> =
        replicas(&status).iter().map(|r| r["name"].as_str().expect("name").to_owned()).collect();
    names.sort();
    assert_eq!(names, ["web-1", "web-2"], "{status:#}");
    let World::Process { instances, _topo: topo } = &s.world else { unreachable!() };
    let bridge = instances.bridge().to_owned();
    let socket_dir = socket_dir(topo);
    let bpf_dir = topo.pin_dir().parent().expect("pin dir parent").to_owned();
    assert!(socket_dir.is_dir());
    assert!(is_bpffs(&bpf_dir), "the agent mounted no bpffs on {}", bpf_dir.display());
    let has_bridge = |topo: &Topology| topo.lb_links().lines().any(|l| l.contains(&format!(": {bridge}: ")));
    assert!(has_bridge(topo), "no bridge {bridge}:\n{}", topo.lb_links());

    let pid = s.agent.pid();
    let pin_dir = topo.pin_dir();
    let out = s.agent.cli(&["stop", "--pin-dir", &pin_dir.to_string_lossy(), "--timeout", "30s"]);
    assert!(out.status.success(), "stop failed: {out:?}");
    assert!(out.stdout.contains(&format!("stopped (pid {pid}) in ")), "stop did not report the exit: {out:?}");
    let exit = s.agent.wait_exit(Duration::from_secs(5)).expect("the agent exited");
    assert!(exit.success(), "agent exited with {exit}:\n{}", s.agent.log());
    let log = s.agent.log();
    for name in ["web-1", "web-2"] {
        assert!(log.contains(&format!("process stopped service=\"web\" instance=\"{name}\"")), "{name}:\n{log}");
    }
    assert!(!has_bridge(topo), "the instances' bridge {bridge} is left:\n{}", topo.lb_links());
    assert!(!is_bpffs(&bpf_dir), "the bpffs the agent mounted on {} is left", bpf_dir.display());
    assert!(!socket_dir.exists(), "the control socket directory {} is left", socket_dir.display());
}

/// Steady load, with containers: no scaling action after settling, for
/// several scale-down stabilization windows. (The same policy holds with
/// processes; this runs once, with Docker, to keep the suite short.)
#[test]
fn root_docker_steady_load_does_not_flap() {
    require_root_and_docker!("root_docker_steady_load_does_not_flap");
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    // The default policy but for a 10 s scale-down window (30 s by
    // default): the steady phase spans as many windows as 135 s did with
    // the default, in a third of the time. (Scaling up has no window.)
    let s = Scaled::start(
        Orch::Docker,
        "min_replicas = 1\nmax_replicas = 4\ntarget = { cpu = 50.0 }\n\
         scale_down = { stabilization_window = \"10s\" }\n",
    );
    s.wait_settled(1, Duration::from_secs(20));

    // About 75-80 % of one core in all (10 ms of work plus the HTTP around
    // it, measured ~0.9-1 % per req/s). Two instances hold for any total in
    // (50, 110] %: ceil(total / 50) = 2, and above 100 the 10 % tolerance
    // keeps them; so this sits mid-band, with room both ways.
    const RATE: f64 = 75.0;
    const SETTLE: f64 = 10.0;
    const STEADY: f64 = 45.0;
    let cfg = load_config(&s, Ramp::constant(RATE).expect("ramp"), Duration::from_secs_f64(SETTLE + STEADY));
    let t0_unix = unix_now();
    let mut samples = Vec::new();
    let report = run_load(&cfg, Duration::from_millis(500), sample_into(&s, &mut samples));

    let timeline = s.timeline(t0_unix);
    eprintln!("---- instances over time (status, t since the load started) ----");
    print_changes(&samples);
    eprintln!("---- scaling decisions (timeline) ----");
    print_scale_events(&timeline);
    print_load_summary(&report);
    let steady: Vec<&TimelineEntry> = timeline.iter().filter(|e| e.t >= SETTLE && e.t <= SETTLE + STEADY).collect();
    let mut rules: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &steady {
        *rules.entry(e.rule.as_str()).or_default() += 1;
    }
    let cpus: Vec<f64> = steady.iter().filter_map(|e| e.cpu).collect();
    let (lo, hi) = cpus.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &c| (lo.min(c), hi.max(c)));
    let mean = cpus.iter().sum::<f64>() / cpus.len().max(1) as f64;
    eprintln!(
        "MEASURED: steady phase t={SETTLE}-{}s at {RATE} req/s: {} decisions, rules {rules:?}; \
         average instance cpu mean {mean:.1}% (min {lo:.1}%, max {hi:.1}%)",
        SETTLE + STEADY,
        steady.len()
    );
    // Requests per second as the agent read them off the instances'
    // counters: the offered rate shared by two instances.
    let rps: Vec<f64> = steady.iter().filter_map(|e| e.rps).collect();
    let rps_mean = rps.iter().sum::<f64>() / rps.len().max(1) as f64;
    eprintln!(
        "MEASURED: requests/s per instance from their counters: mean {rps_mean:.1} over {} decisions (offered {RATE} \
         over 2 instances = {:.1})",
        rps.len(),
        RATE / 2.0
    );
    let settled: Vec<u32> = steady.iter().map(|e| e.replicas).collect();
    let flaps: Vec<String> = steady
        .iter()
        .filter(|e| e.is_scaling())
        .map(|e| format!("t={:.1}s {} -> {} ({}: {})", e.t, e.previous, e.replicas, e.rule, e.reason))
        .collect();
    eprintln!("MEASURED: scaling actions after settling: {}", flaps.len());

    assert!(steady.len() as f64 >= STEADY * 0.8, "only {} decisions in {STEADY} s", steady.len());
    assert!(flaps.is_empty(), "the count changed under steady load after {SETTLE} s:\n{}", flaps.join("\n"));
    assert!(settled.iter().all(|&n| n == 2), "steady load for ~2 instances held {settled:?}");
    assert!(rps.len() as f64 >= steady.len() as f64 * 0.9, "requests/s missing from most decisions: {rps:?}");
    assert!(
        (rps_mean - RATE / 2.0).abs() <= RATE / 2.0 * 0.15,
        "requests/s per instance {rps_mean:.1}, not ~{}",
        RATE / 2.0
    );
    let ready_steady: Vec<u32> = samples.iter().filter(|x| x.t >= SETTLE).map(|x| x.ready).collect();
    assert!(ready_steady.iter().all(|&n| n == 2), "ready instances varied under steady load: {ready_steady:?}");
    assert_eq!(report.summary.failed, 0, "failures under steady load: {:?}", report.summary.first_errors);
    s.assert_no_leftovers();
    eprintln!("MEASURED: test took {:.1} s", started.elapsed().as_secs_f64());
}

/// `lb-agent scale` holds the count: pinned at 2 with no load, two
/// instances serve and `status` says who holds them; resumed, the policy
/// takes the idle service back down to one.
#[test]
fn root_scale_pin_holds_the_count_until_resumed() {
    require_root!("root_scale_pin_holds_the_count_until_resumed");
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let s = Scaled::start(
        Orch::Process,
        "min_replicas = 1\nmax_replicas = 3\ntarget = { cpu = 50.0 }\nscale_down = { stabilization_window = \"0s\" }\n",
    );
    s.wait_settled(1, Duration::from_secs(20));
    let scale = |args: &[&str]| {
        let out = s.agent.cli(&[&["scale", "web"], args].concat());
        assert!(out.status.success(), "scale {args:?}: {out:?}");
        out.stdout
    };

    let refused = s.agent.cli(&["scale", "web", "--replicas", "4"]);
    assert!(!refused.status.success(), "a pin above max_replicas was taken: {refused:?}");
    assert!(refused.stderr.contains("outside min_replicas 1 ..= max_replicas 3"), "{refused:?}");

    let t0_unix = unix_now();
    eprintln!("MEASURED: {}", scale(&["--replicas", "2"]).trim());
    let status = s.wait_settled(2, Duration::from_secs(20));
    let hold = &scaling(&status)["hold"];
    assert_eq!((hold["mode"].as_str(), hold["replicas"].as_u64()), (Some("pinned"), Some(2)), "{hold}");
    let text = s.agent.cli(&["status"]);
    assert!(text.stdout.contains("pinned at 2 by operator"), "{}", text.stdout);
    eprintln!("---- status while pinned ----\n{}", text.stdout);
    // Held: idle instances stay, through three decisions that the policy
    // alone would have taken down (no stabilization window).
    let pinned_at = unix_now();
    let since_pinned = || -> Vec<TimelineEntry> { s.timeline(pinned_at).into_iter().filter(|e| e.t >= 0.0).collect() };
    let held = s.wait_until("three decisions while pinned", Duration::from_secs(10), |_| since_pinned().len() >= 3);
    let decisions = since_pinned();
    let counts: Vec<u32> = decisions.iter().map(|e| e.replicas).collect();
    assert!(decisions.iter().all(|e| e.rule == "pinned" && e.replicas == 2), "the pin did not hold: {counts:?}");
    assert_eq!(ready(&held).len(), 2, "the pin did not hold");

    eprintln!("MEASURED: {}", scale(&["--resume"]).trim());
    let status = s.wait_settled(1, Duration::from_secs(30));
    assert!(scaling(&status).get("hold").is_none(), "still held after --resume: {}", scaling(&status));
    let timeline = s.timeline(t0_unix);
    print_scale_events(&timeline);
    let up = timeline.iter().position(|e| e.rule == "pinned" && e.previous == 1 && e.replicas == 2);
    let down = timeline.iter().position(|e| e.rule != "pinned" && e.previous == 2 && e.replicas == 1);
    assert!(matches!((up, down), (Some(u), Some(d)) if u < d), "timeline: pinned 1 -> 2, then the policy 2 -> 1");
    print_events(&status, t0_unix);
    s.assert_no_leftovers();
    eprintln!("MEASURED: test took {:.1} s", started.elapsed().as_secs_f64());
}
