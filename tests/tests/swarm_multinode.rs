//! A multi-node Docker Swarm on one machine, with lb-agent scaling its
//! instances over every node.
//!
//! Two Docker engines, each in a network namespace of its own (own data
//! root, exec root, pid file, API socket and containerd; see
//! `lb_lab::swarm_nodes`), joined into one swarm over the namespaces'
//! addresses. lb-agent, in a namespace of its own between a client and the
//! nodes, talks to the manager's engine only (`DOCKER_HOST`) and runs
//! `[service.instances.swarm]` with `publish = "host"`: a swarm service per
//! instance on an overlay network (the engines have no default bridge),
//! its port published in host mode on a port the agent picks (Swarm's
//! routing mesh needs IPVS, which this kernel lacks; a host-mode port is a
//! plain port on the node's own address), and full NAT, so the nodes'
//! replies come back whatever their routes. The test checks with the
//! manager where the tasks run and answer, then that a bounded load is
//! answered by tasks on both nodes and a scale-down under it loses nothing,
//! and that an agent restarted after a crash adopts the tasks left.
//!
//! ```text
//!  client ns            LB ns (lb-agent)                       node ns (dockerd)
//!  10.232.k.2 [eth0] == [lbc] 10.232.k.1
//!                       [mnbr] 10.231.k.1 --+-- [eth0] 10.231.k.11  swarm manager
//!                                           +-- [eth0] 10.231.k.12  swarm worker
//! ```
//!
//! Everything is an RAII guard: the engines (and with them their
//! containerd, tasks and mounts) stop, their directories and the
//! namespaces go, also when the test fails; the test ends by checking that
//! the host has no link, namespace or process of it left.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use lb_lab::{
    agent::{Agent, AgentArgs},
    command::run_cmd,
    docker::{static_backend_bin, DEMO_IMAGE},
    netns::NetNs,
    require_root_and_docker,
    scratch::{Scratch, TempDir},
    swarm::{demo_swarm_toml, HostFootprint},
    swarm_nodes::SwarmNode,
};
use lb_load::{self as load, LoadConfig, Mode, Ramp};
use serde_json::Value;

const NODES: u8 = 2;

/// The image, built in every engine from the static lb-backend (the
/// engines share no image store, and there is no registry here).
fn build_image_everywhere(nodes: &[SwarmNode], id: &str) {
    let ctx = TempDir::create(&format!("lbt-{id}-mnimage"));
    let bin = static_backend_bin();
    fs::copy(&bin, ctx.path().join("lb-backend")).unwrap_or_else(|e| panic!("copy {}: {e}", bin.display()));
    fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\nCOPY lb-backend /lb-backend\nENTRYPOINT [\"/lb-backend\"]\n",
    )
    .expect("write Dockerfile");
    for node in nodes {
        node.build(DEMO_IMAGE, ctx.path());
    }
}

/// The swarm services lb-agent made (its instance label), by name.
fn agent_services(manager: &SwarmNode) -> BTreeSet<String> {
    let out = manager.docker(&["service", "ls", "--filter", "label=io.lb-agent.instance", "--format", "{{.Name}}"]);
    out.split_whitespace().map(str::to_owned).collect()
}

/// Every running task of the agent's services, learned from the manager
/// alone: instance name -> (node id, node address and published port).
fn running_instances(manager: &SwarmNode) -> BTreeMap<String, (String, SocketAddrV4)> {
    let services: Vec<String> = agent_services(manager).into_iter().collect();
    if services.is_empty() {
        return BTreeMap::new();
    }
    let mut args = vec!["service", "ps", "-q", "--filter", "desired-state=running"];
    args.extend(services.iter().map(String::as_str));
    let tasks = manager.docker(&args);
    let mut out = BTreeMap::new();
    for task in tasks.split_whitespace() {
        let f = "{{.Status.State}} {{.NodeID}} {{index .Spec.ContainerSpec.Labels \"io.lb-agent.instance\"}} \
                 {{range .Status.PortStatus.Ports}}{{.PublishedPort}} {{end}}";
        let line = manager.docker(&["inspect", "-f", f, task]);
        let mut words = line.split_whitespace();
        let (Some("running"), Some(node), Some(name), Some(port)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let node_addr = manager.docker(&["node", "inspect", "-f", "{{.Status.Addr}}", node]);
        let addr =
            node_addr.trim().parse::<Ipv4Addr>().unwrap_or_else(|e| panic!("node {node} address {node_addr:?}: {e}"));
        let port = port.parse().unwrap_or_else(|e| panic!("port {port:?}: {e}"));
        out.insert(name.to_owned(), (node.to_owned(), SocketAddrV4::new(addr, port)));
    }
    out
}

fn backends(status: &Value) -> Vec<Value> {
    status["services"][0]["backends"].as_array().cloned().unwrap_or_default()
}

/// The addresses of the agent's backends.
fn table_addresses(agent: &Agent) -> BTreeSet<String> {
    backends(&agent.status()).iter().filter_map(|b| b["address"].as_str().map(str::to_owned)).collect()
}

/// Exactly `n` instances ready and in the table, as many swarm services
/// and running tasks; returns the tasks as the manager tells them.
fn wait_settled(agent: &Agent, manager: &SwarmNode, n: usize) -> BTreeMap<String, (String, SocketAddrV4)> {
    agent.wait_status(&format!("{n} instance(s) ready and nothing else"), Duration::from_secs(40), |s| {
        let r = lb_lab::agent::one_scaling(s)["replicas"].as_array().cloned().unwrap_or_default();
        let b = backends(s);
        r.len() == n
            && r.iter().all(|r| r["phase"] == "ready")
            && b.len() == n
            && b.iter().all(|b| b["state"] == "active" && b["in_table"] == true)
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tasks = running_instances(manager);
        if agent_services(manager).len() == n && tasks.len() == n {
            return tasks;
        }
        assert!(
            Instant::now() < deadline,
            "swarm services {:?}, tasks {tasks:?}, expected {n}",
            agent_services(manager)
        );
        thread::sleep(Duration::from_millis(200));
    }
}

fn scale(agent: &Agent, service: &str, replicas: u32) {
    let out = agent.cli(&["scale", service, "--replicas", &replicas.to_string()]);
    assert!(out.status.success(), "scale --replicas {replicas}: {out:?}");
}

/// Run the load on a thread while `script(t0)` runs on this one.
fn under_load(cfg: &LoadConfig, script: impl FnOnce(Instant)) -> load::Report {
    load::run_during(cfg, script).unwrap_or_else(|e| panic!("the load generator failed: {e}"))
}

/// lb-agent scales `[service.instances.swarm]` with `publish = "host"` on
/// the two-node swarm: two instances land on both nodes, a third gets a
/// host port of its own beside one of them, a bounded load is answered by
/// tasks on both nodes, and a scale-down drains and removes one instance,
/// all with no failed request; a restarted agent adopts what is left.
#[test]
fn root_agent_scales_swarm_instances_over_every_node() {
    require_root_and_docker!("root_agent_scales_swarm_instances_over_every_node");
    let started = Instant::now();
    let footprint = HostFootprint::now();
    let pid = std::process::id();
    let id = format!("{}", pid % 100_000);
    let k = (pid % 250 + 1) as u8;
    let (lan_gw, client_gw, client_addr) =
        (Ipv4Addr::new(10, 231, k, 1), Ipv4Addr::new(10, 232, k, 1), Ipv4Addr::new(10, 232, k, 2));
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 233, k, 1), 80);
    let service = format!("mn{id}");
    {
        let lb = NetNs::create(&format!("lbt-{id}-mnlb")).unwrap_or_else(|e| panic!("{e}"));
        lb.exec("ip", &["link", "set", "lo", "up"]);
        lb.exec("ip", &["link", "add", "mnbr", "type", "bridge"]);
        lb.exec("ip", &["addr", "add", &format!("{lan_gw}/24"), "dev", "mnbr"]);
        lb.exec("ip", &["link", "set", "mnbr", "up"]);
        lb.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        let client = NetNs::create(&format!("lbt-{id}-mnc")).unwrap_or_else(|e| panic!("{e}"));
        lb.exec("ip", &["link", "add", "lbc", "type", "veth", "peer", "name", "eth0", "netns", client.name()]);
        lb.exec("ip", &["addr", "add", &format!("{client_gw}/24"), "dev", "lbc"]);
        lb.exec("ip", &["link", "set", "lbc", "up"]);
        client.exec("ip", &["addr", "add", &format!("{client_addr}/24"), "dev", "eth0"]);
        client.exec("ip", &["link", "set", "eth0", "up"]);
        client.exec("ip", &["route", "add", &format!("{}/32", vip.ip()), "via", &client_gw.to_string()]);

        // The nodes: their veth's other end goes from here into the LB
        // namespace's bridge.
        let nodes: Vec<SwarmNode> = (1..=NODES)
            .map(|i| {
                let peer = format!("lbt{id}n{i}");
                let node = SwarmNode::start(
                    &format!("lbt-{id}-mn{i}"),
                    &peer,
                    Ipv4Addr::new(10, 231, k, 10 + i),
                    lan_gw,
                    &format!("lbt-{id}-mnnode{i}"),
                );
                run_cmd("ip", &["link", "set", &peer, "netns", lb.name()]);
                lb.exec("ip", &["link", "set", &peer, "master", "mnbr", "up"]);
                node
            })
            .collect();
        eprintln!("MEASURED: {NODES} engines answer {:.1} s after the start", started.elapsed().as_secs_f64());
        build_image_everywhere(&nodes, &id);
        let manager = &nodes[0];
        manager.init_swarm();
        for node in &nodes[1..] {
            node.join(manager);
        }
        let ready = manager.docker(&["node", "ls", "--format", "{{.Status}}"]);
        assert_eq!(ready.lines().filter(|l| *l == "Ready").count(), usize::from(NODES), "nodes: {ready}");

        // The agent talks to the manager's engine only (DOCKER_HOST); full
        // NAT, as publish = "host" requires: the nodes' replies come back
        // to the load balancer whatever their routes.
        let scratch = Scratch::create(&format!("lbt-{id}-mnagent"));
        let config = scratch.path().join("lb.toml");
        // The agent's three host ports: one per instance at most.
        let swarm_keys =
            format!("publish = \"host\"\nhost_port_min = 29100\nhost_port_max = 29102\nnetwork = \"mn{id}-overlay\"");
        let policy = "min_replicas = 2\nmax_replicas = 3\ntarget = { cpu = 90.0 }";
        let text = format!(
            "# Written by tests/tests/swarm_multinode.rs.\n{}",
            demo_swarm_toml(&service, vip, &["lbc", "mnbr"], "mode = \"full-nat\"", policy, &swarm_keys)
        );
        fs::write(&config, text).expect("write the config");
        let docker_host = format!("unix://{}", manager.socket().display());
        let args = AgentArgs { env: vec![("DOCKER_HOST".into(), docker_host)], ..scratch.agent_args(config) };
        let mut agent = Agent::spawn(&lb, &args);
        agent.wait_ready();

        // Two instances: Swarm spreads them, one per node.
        let two = wait_settled(&agent, manager, 2);
        let nodes_used: BTreeSet<&str> = two.values().map(|(n, _)| n.as_str()).collect();
        assert_eq!(nodes_used.len(), usize::from(NODES), "a task on every node: {two:?}");
        let node_addrs: BTreeSet<Ipv4Addr> = two.values().map(|(_, a)| *a.ip()).collect();
        assert_eq!(node_addrs, nodes.iter().map(|n| n.addr).collect(), "tasks at their nodes' addresses");
        eprintln!(
            "MEASURED: two instances on {NODES} nodes {:.1} s after the start: {two:?}",
            started.elapsed().as_secs_f64()
        );

        // A third shares a node with one of them, on a port of its own.
        scale(&agent, &service, 3);
        let three = wait_settled(&agent, manager, 3);
        let ports: BTreeSet<u16> = three.values().map(|(_, a)| a.port()).collect();
        assert_eq!(ports, BTreeSet::from([29100, 29101, 29102]), "a host port each: {three:?}");
        assert_eq!(
            table_addresses(&agent),
            three.values().map(|(_, a)| a.to_string()).collect(),
            "the agent's backends are where the manager says the tasks answer"
        );

        let mut cfg = LoadConfig::new(
            SocketAddr::from(vip),
            Mode::Open(Ramp::constant(40.0).expect("ramp")),
            Duration::from_secs(8),
        );
        cfg.netns = Some(client.name().to_owned());
        cfg.timeout = Duration::from_secs(2);
        let mut left = BTreeMap::new();
        let report = under_load(&cfg, |t0| {
            thread::sleep(Duration::from_secs(3));
            scale(&agent, &service, 2);
            left = wait_settled(&agent, manager, 2);
            eprintln!("MEASURED: scaled down to two at t={:.1}s", t0.elapsed().as_secs_f64());
        });
        let s = &report.summary;
        eprintln!(
            "MEASURED: load {} requests, {} ok, {} failed, by instance {:?}",
            s.offered, s.ok, s.failed, s.backends
        );
        assert_eq!(s.failed, 0, "requests failed: {:?}, first errors {:?}", s.failures, s.first_errors);
        let served: BTreeSet<&str> = s.backends.keys().map(String::as_str).collect();
        let served_nodes: BTreeSet<&str> =
            three.iter().filter(|(name, _)| served.contains(name.as_str())).map(|(_, (n, _))| n.as_str()).collect();
        assert_eq!(served_nodes.len(), usize::from(NODES), "tasks on every node serve: {served:?} of {three:?}");
        assert!(left.keys().all(|n| three.contains_key(n)), "the scale-down started nothing: {left:?}");

        // A crashed agent's successor adopts the two instances where they
        // answer (it reads them back from the manager), starting nothing.
        agent.kill();
        agent.respawn();
        agent.wait_ready();
        let adopted = wait_settled(&agent, manager, 2);
        assert_eq!(adopted, left, "the restarted agent adopts the same tasks at the same addresses");
        assert_eq!(table_addresses(&agent), left.values().map(|(_, a)| a.to_string()).collect(), "in the table");
        eprintln!("MEASURED: restarted agent adopted {adopted:?} at {:.1} s", started.elapsed().as_secs_f64());
        drop(agent);
    }
    HostFootprint::assert_back_to(&footprint);
    eprintln!("MEASURED: test took {:.1} s", started.elapsed().as_secs_f64());
}
