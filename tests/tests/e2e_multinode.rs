//! Two load balancer nodes with one config agree on every flow: a TCP
//! connection whose route moves from one node to the other mid-transfer
//! keeps its backend, and `lb-agent explain` on either node names the
//! backend a real connection reaches.
//!
//! ```text
//!  client ns            router ns                 lb1 ns / lb2 ns          switch ns        backend ns
//!  10.201.0.2 [to-r] == [r-c] 10.201.0.1
//!                       10.201.1.1 [r-lb1] ====== [lb-r] 10.201.1.2 (lb1)
//!                       10.201.2.1 [r-lb2] ====== [lb-r] 10.201.2.2 (lb2)
//!                             lb1 10.201.10.1 [lb-b] == [p-lb1]  br0  [p-be<i>] == [to-sw] 10.201.10.1<i>
//!                             lb2 10.201.10.2 [lb-b] == [p-lb2]
//! ```
//!
//! The router sends the VIP to one node, as an ECMP next hop would; the
//! backends route the client subnet back via one node (destination NAT: the
//! reply is translated by a node that holds the flow). Moving the flow moves
//! the router's route first, then the backends' return route: between the
//! two, lb2 forwards (its first packet of the flow re-picks the backend
//! from its own table) while lb1 still translates the replies.
//!
//! lb1 reaches its backend set through another history than lb2 (a fourth
//! backend, then a reload without it), so the test also shows that the
//! tables do not depend on history.
//!
//! Needs root and a built agent (see e2e_netns.rs).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use lb_lab::{
    agent::Agent,
    cgroup::socket_lb_toml,
    command::run_cmd,
    netns::NetNs,
    require_root,
    scratch::Scratch,
    topology::{BackendServers, Conn},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 201, 255, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const CLIENT_NET: &str = "10.201.0.0/24";
const BACKEND_PORT: u16 = 8080;
const BACKENDS: [&str; 3] = ["be1", "be2", "be3"];
/// On no namespace: a backend lb1 has for a while, then loses.
const GONE: &str = "10.201.10.99:8080";

/// A load balancer node: its namespace, its agent's files, its addresses.
struct Node {
    ns: NetNs,
    dir: Scratch,
    /// Its address towards the router.
    addr: Ipv4Addr,
    /// Its address on the backends' segment (their return route).
    backend_side: Ipv4Addr,
}

struct Lab {
    client: NetNs,
    router: NetNs,
    nodes: [Node; 2],
    backends: Vec<(NetNs, BackendServers, SocketAddrV4)>,
    _switch: NetNs,
}

fn ns(name: &str) -> NetNs {
    NetNs::create(name).unwrap_or_else(|e| panic!("{e}"))
}

/// A veth pair `a` (in `na`) ⇄ `b` (in `nb`), up, with checksums computed in
/// software (every node then sends complete ones; see topology.rs).
fn veth(na: &NetNs, a: &str, nb: &NetNs, b: &str) {
    run_cmd(
        "ip",
        &["link", "add", "name", a, "netns", na.name(), "type", "veth", "peer", "name", b, "netns", nb.name()],
    );
    for (ns, iface) in [(na, a), (nb, b)] {
        ns.exec("ethtool", &["-K", iface, "tx", "off"]);
        ns.exec("ip", &["link", "set", iface, "up"]);
    }
}

fn addr(ns: &NetNs, iface: &str, cidr: &str) {
    ns.exec("ip", &["addr", "add", cidr, "dev", iface]);
}

fn forwarding(ns: &NetNs) {
    for key in ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"] {
        ns.exec("sysctl", &["-qw", key]);
    }
}

impl Lab {
    fn build() -> Lab {
        let prefix = format!("lbt-{}-mn", std::process::id());
        let (client, router, switch) =
            (ns(&format!("{prefix}-client")), ns(&format!("{prefix}-router")), ns(&format!("{prefix}-sw")));
        forwarding(&router);
        veth(&client, "to-r", &router, "r-c");
        addr(&client, "to-r", "10.201.0.2/24");
        addr(&router, "r-c", "10.201.0.1/24");
        // Only the VIP goes via the router: no default route anywhere.
        client.exec("ip", &["route", "add", &format!("{VIP}/32"), "via", "10.201.0.1"]);
        switch.exec("ip", &["link", "add", "br0", "type", "bridge"]);
        switch.exec("ip", &["link", "set", "br0", "up"]);
        let nodes = [1u8, 2].map(|i| {
            let node = ns(&format!("{prefix}-lb{i}"));
            forwarding(&node);
            veth(&router, &format!("r-lb{i}"), &node, "lb-r");
            addr(&router, &format!("r-lb{i}"), &format!("10.201.{i}.1/24"));
            addr(&node, "lb-r", &format!("10.201.{i}.2/24"));
            veth(&node, "lb-b", &switch, &format!("p-lb{i}"));
            switch.exec("ip", &["link", "set", &format!("p-lb{i}"), "master", "br0"]);
            addr(&node, "lb-b", &format!("10.201.10.{i}/24"));
            node.exec("ip", &["route", "add", CLIENT_NET, "via", &format!("10.201.{i}.1")]);
            Node {
                ns: node,
                dir: Scratch::create(&format!("{prefix}-lb{i}")),
                addr: Ipv4Addr::new(10, 201, i, 2),
                backend_side: Ipv4Addr::new(10, 201, 10, i),
            }
        });
        let backends = (1u8..)
            .zip(BACKENDS)
            .map(|(i, name)| {
                let be = ns(&format!("{prefix}-{name}"));
                veth(&be, "to-sw", &switch, &format!("p-{name}"));
                switch.exec("ip", &["link", "set", &format!("p-{name}"), "master", "br0"]);
                let ip = Ipv4Addr::new(10, 201, 10, 10 + i);
                addr(&be, "to-sw", &format!("{ip}/24"));
                be.exec("ip", &["route", "add", CLIENT_NET, "via", &nodes[0].backend_side.to_string()]);
                let tcp = SocketAddrV4::new(ip, BACKEND_PORT);
                let servers = BackendServers::start(&be, name, tcp, SocketAddrV4::new(ip, 5353));
                (be, servers, tcp)
            })
            .collect();
        let lab = Lab { client, router, nodes, backends, _switch: switch };
        lab.route_vip_via(0);
        lab
    }

    /// The router's next hop for the VIP: node `i`.
    fn route_vip_via(&self, i: usize) {
        let via = self.nodes[i].addr.to_string();
        self.router.exec("ip", &["route", "replace", &format!("{VIP}/32"), "via", &via]);
    }

    /// Every backend's route back to the clients: via node `i`.
    fn return_via(&self, i: usize) {
        let via = self.nodes[i].backend_side.to_string();
        for (be, _, _) in &self.backends {
            be.exec("ip", &["route", "replace", CLIENT_NET, "via", &via]);
        }
    }

    fn config(&self, extra: &[&str]) -> String {
        let mut out = format!(
            "[[service]]\nname = \"web\"\nvip = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\ninterfaces = [\"lb-r\", \"lb-b\"]\n"
        );
        let weights = [1, 2, 1];
        for ((_, _, a), w) in self.backends.iter().zip(weights) {
            out += &format!("[[service.backend]]\naddress = \"{a}\"\nweight = {w}\n");
        }
        for a in extra {
            out += &format!("[[service.backend]]\naddress = \"{a}\"\n");
        }
        // Clients are in their own namespace: no socket load balancing on this host.
        out + &socket_lb_toml(None)
    }

    fn start_agent(&self, i: usize, config: &str) -> Agent {
        let node = &self.nodes[i];
        let path = node.dir.config_path();
        std::fs::write(&path, config).expect("write config");
        let mut agent = Agent::spawn(&node.ns, &node.dir.agent_args(path));
        agent.wait_ready();
        agent
    }

    fn backend_addr(&self, name: &str) -> SocketAddrV4 {
        let i = BACKENDS.iter().position(|b| *b == name).unwrap_or_else(|| panic!("no backend {name}"));
        self.backends[i].2
    }
}

/// `lb-agent explain` for a client port, as JSON.
fn explain(agent: &Agent, port: u16) -> serde_json::Value {
    let client = SocketAddrV4::new(CLIENT, port).to_string();
    let out = agent.cli(&["explain", &client, "--service", "web", "--json"]);
    assert!(out.status.success(), "explain {client} failed: {}{}", out.stdout, out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("explain printed {:?}: {e}", out.stdout))
}

fn explained_backend(e: &serde_json::Value) -> SocketAddrV4 {
    e["backend"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no backend in {e}"))
}

/// Poll `f` every 20 ms until it holds, for at most `limit`.
fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_flow_moved_between_nodes_keeps_its_backend_and_explain_agrees() {
    require_root!("a_flow_moved_between_nodes_keeps_its_backend_and_explain_agrees");
    let lab = Lab::build();
    // lb1: four backends first, then the three lb2 starts with.
    let mut lb1 = lab.start_agent(0, &lab.config(&[GONE]));
    lb1.reload_with(|| std::fs::write(lab.nodes[0].dir.config_path(), lab.config(&[])).expect("write config"));
    let lb2 = lab.start_agent(1, &lab.config(&[]));

    // A connection through lb1, echoing lines until told to stop.
    let vip = SocketAddrV4::new(VIP, 80);
    let conn = lab.client.run(move || Conn::open(vip)).expect("connect through lb1");
    let (backend, port) = (conn.backend.clone(), conn.local.port());
    let on_lb1 = explain(&lb1, port);
    assert_eq!(on_lb1["reason"], "connection table", "{on_lb1}");
    assert_eq!(explained_backend(&on_lb1), lab.backend_addr(&backend), "{on_lb1}");
    // lb2 has never seen the flow: its Maglev pick must be the same backend.
    let on_lb2 = explain(&lb2, port);
    assert_eq!(on_lb2["reason"], "maglev", "{on_lb2}");
    assert_eq!(explained_backend(&on_lb2), lab.backend_addr(&backend), "lb2 would pick another backend: {on_lb2}");

    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<String>::new()));
    let echo = {
        let (stop, answers) = (stop.clone(), answers.clone());
        let mut conn = conn;
        lab.client.spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let who = conn.echo(&format!("line {n} {}", "x".repeat(200))).map_err(|e| format!("echo {n}: {e}"))?;
                answers.lock().expect("answers").push(who);
                thread::sleep(Duration::from_millis(5));
            }
            Ok::<u64, String>(n)
        })
    };
    let answered = || answers.lock().expect("answers").len();
    wait_until("echoes through lb1", Duration::from_secs(5), || answered() >= 20);
    let before = answered();

    // Move the flow: the VIP's route first, then the return route once lb2
    // holds the flow, then cut lb1 off from the router, so that only lb2
    // can carry it. (lb1 keeps its backends' link: its table stays, for
    // the predictions below.)
    lab.route_vip_via(1);
    wait_until("lb2 holding the flow", Duration::from_secs(5), || explain(&lb2, port)["reason"] == "connection table");
    lab.return_via(1);
    lab.router.exec("ip", &["link", "set", "r-lb1", "down"]);
    let switched = answered();
    wait_until("echoes through lb2", Duration::from_secs(5), || answered() >= switched + 50);
    stop.store(true, Ordering::Relaxed);
    let sent = echo.join().expect("echo thread").unwrap_or_else(|e| panic!("the moved connection broke: {e}"));
    let answers = answers.lock().expect("answers").clone();
    println!(
        "MEASURED: multinode: {sent} lines, {before} before the move, {} after, all from {backend}",
        answers.len() - switched
    );
    assert!(answers.iter().all(|b| *b == backend), "answers came from other backends: {answers:?}");
    let on_lb2 = explain(&lb2, port);
    assert_eq!(explained_backend(&on_lb2), lab.backend_addr(&backend), "{on_lb2}");

    // New connections through lb2 reach the backend lb1 would pick for them.
    for i in 0..12 {
        let (greeted, local) = lab.client.run(move || {
            let c = Conn::open(vip).unwrap_or_else(|e| panic!("connection {i} through lb2: {e}"));
            (c.backend.clone(), c.local)
        });
        let predicted = explain(&lb1, local.port());
        assert_eq!(predicted["reason"], "maglev", "{predicted}");
        assert_eq!(explained_backend(&predicted), lab.backend_addr(&greeted), "lb1 predicts otherwise: {predicted}");
        let held = explain(&lb2, local.port());
        assert_eq!(explained_backend(&held), lab.backend_addr(&greeted), "{held}");
        if i == 0 {
            println!("explain on lb1 for {local}: {predicted}");
        }
    }
}
