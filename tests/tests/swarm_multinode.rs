//! A multi-node Docker Swarm on one machine, with tasks on every node and
//! lb-agent forwarding to all of them.
//!
//! Two Docker engines, each in a network namespace of its own (own data
//! root, exec root, pid file, API socket and containerd; see
//! `lb_lab::swarm_nodes`), joined into one swarm over the namespaces'
//! addresses. A global service of the demo image runs one task per node
//! (on an overlay network: the engines have no default bridge), with
//! its port published in host mode (Swarm's routing mesh needs IPVS, which
//! this kernel lacks; a host-mode port is a plain port on the node's own
//! address). The manager alone tells where every task answers: the node's
//! address (`docker node inspect`) and the task's published port (its
//! `Status.PortStatus`). lb-agent, in a namespace of its own between a
//! client and the nodes, gets those addresses as its backends, and a
//! bounded load from the client must be answered by the task on every node.
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
    collections::BTreeSet,
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::atomic::AtomicBool,
    thread,
    time::{Duration, Instant},
};

use lb_lab::{
    agent::Agent,
    cgroup::socket_lb_toml,
    command::run_cmd,
    docker::{static_backend_bin, DEMO_IMAGE},
    netns::NetNs,
    require_root_and_docker,
    scratch::{Scratch, TempDir},
    swarm::HostFootprint,
    swarm_nodes::SwarmNode,
};
use lb_load::{self as load, LoadConfig, Mode, Ramp};

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

/// Where each running task of `service` answers, learned from the manager
/// alone: the node's address and the task's published (host-mode) port.
fn task_addresses(manager: &SwarmNode, service: &str) -> BTreeSet<SocketAddrV4> {
    let tasks = manager.docker(&["service", "ps", "-q", "--filter", "desired-state=running", service]);
    let mut addrs = BTreeSet::new();
    for task in tasks.split_whitespace() {
        let f = "{{.Status.State}} {{.NodeID}} {{range .Status.PortStatus.Ports}}{{.PublishedPort}} {{end}}";
        let line = manager.docker(&["inspect", "-f", f, task]);
        let mut words = line.split_whitespace();
        let (Some("running"), Some(node), Some(port)) = (words.next(), words.next(), words.next()) else { continue };
        let node_addr = manager.docker(&["node", "inspect", "-f", "{{.Status.Addr}}", node]);
        let addr =
            node_addr.trim().parse::<Ipv4Addr>().unwrap_or_else(|e| panic!("node {node} address {node_addr:?}: {e}"));
        addrs.insert(SocketAddrV4::new(addr, port.parse().unwrap_or_else(|e| panic!("port {port:?}: {e}"))));
    }
    addrs
}

#[test]
fn root_swarm_of_several_engines_serves_from_every_node() {
    require_root_and_docker!("root_swarm_of_several_engines_serves_from_every_node");
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

        // One task per node, on an overlay network (the engines have no
        // default bridge, and a task on no network publishes nothing); its
        // port on the node's own address.
        let overlay = format!("mn{id}-overlay");
        manager.docker(&["network", "create", "--driver", "overlay", &overlay]);
        manager.docker(&[
            "service",
            "create",
            "-d",
            // The image is local to every engine: no registry to ask.
            "--no-resolve-image",
            "--name",
            &service,
            "--mode",
            "global",
            "--network",
            &overlay,
            "--publish",
            "mode=host,target=8080,published=8080",
            "--env",
            "LB_BACKEND_LISTEN=0.0.0.0:8080",
            "--env",
            "LB_BACKEND_NAME=task-on-{{.Node.ID}}",
            DEMO_IMAGE,
        ]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let backends = loop {
            let addrs = task_addresses(manager, &service);
            if addrs.len() == usize::from(NODES) {
                break addrs;
            }
            assert!(
                Instant::now() < deadline,
                "tasks running at {addrs:?} 30 s after the service was made; the tasks:\n{}",
                manager.try_docker(&["service", "ps", "--no-trunc", &service]).1
            );
            thread::sleep(Duration::from_millis(200));
        };
        let node_addrs: BTreeSet<Ipv4Addr> = backends.iter().map(|a| *a.ip()).collect();
        assert_eq!(node_addrs, nodes.iter().map(|n| n.addr).collect(), "one task on every node");
        eprintln!(
            "MEASURED: {NODES}-node swarm, tasks at {backends:?}, {:.1} s after the start",
            started.elapsed().as_secs_f64()
        );

        let scratch = Scratch::create(&format!("lbt-{id}-mnagent"));
        let config = scratch.path().join("lb.toml");
        let mut text = format!(
            "# Written by tests/tests/swarm_multinode.rs.\n[[service]]\nname = \"{service}\"\nvip = \"{}\"\nport = \
             {}\ninterfaces = [\"lbc\", \"mnbr\"]\nhealth_check = {{ kind = \"http\", path = \"/healthz\", interval = \
             \"300ms\" }}\n",
            vip.ip(),
            vip.port()
        );
        for b in &backends {
            text += &format!("[[service.backend]]\naddress = \"{b}\"\n");
        }
        text += &socket_lb_toml(None);
        fs::write(&config, text).expect("write the config");
        let mut agent = Agent::spawn(&lb, &scratch.agent_args(config));
        agent.wait_ready();
        agent.wait_status("every node's task in the table", Duration::from_secs(15), |s| {
            let b = s["services"][0]["backends"].as_array().cloned().unwrap_or_default();
            b.len() == usize::from(NODES) && b.iter().all(|b| b["state"] == "active" && b["in_table"] == true)
        });

        let mut cfg = LoadConfig::new(
            SocketAddr::from(vip),
            Mode::Open(Ramp::constant(50.0).expect("ramp")),
            Duration::from_secs(4),
        );
        cfg.netns = Some(client.name().to_owned());
        cfg.timeout = Duration::from_secs(2);
        let report = load::run(&cfg, &AtomicBool::new(false), |_| {}).expect("the load generator");
        let s = &report.summary;
        eprintln!("MEASURED: load {} requests, {} ok, {} failed, by task {:?}", s.offered, s.ok, s.failed, s.backends);
        assert_eq!(s.failed, 0, "requests failed: {:?}, first errors {:?}", s.failures, s.first_errors);
        let names: BTreeSet<String> =
            manager.docker(&["node", "ls", "-q"]).split_whitespace().map(|n| format!("task-on-{n}")).collect();
        let served: BTreeSet<String> = s.backends.keys().cloned().collect();
        assert_eq!(served, names, "the task on every node serves");
        drop(agent);
    }
    HostFootprint::assert_back_to(&footprint);
    eprintln!("MEASURED: test took {:.1} s", started.elapsed().as_secs_f64());
}
