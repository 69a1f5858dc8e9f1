//! IP-in-IP direct server return end to end (`mode = "dsr-ipip"`): real
//! namespaces, real packets, the agent in the LB namespace and
//! `lb-agent backend-setup` on the backends.
//!
//! ```text
//!            client 10.201.0.2 --+
//!   (VIP 10.201.100.10 via LB)   |
//!           lb 10.201.0.1 -------+-- br0 (sw namespace): one L2 segment
//!   dsr-1/2/3 10.201.0.11-13 ----+   backends reach the client directly,
//!   dsr-4 10.201.0.14 (no set-up)+   never through the LB
//! ```
//!
//! The client's packets reach the LB (its only route to the VIP), which
//! encapsulates each to its backend and sends it back out of the same
//! interface (XDP_TX; the bridge port, the LB's veth peer, runs an XDP
//! program, without which a veth never takes XDP_TX frames). The backends decapsulate on the device
//! `backend-setup` made and answer from the VIP straight to the client, on
//! the shared segment: no route of theirs goes via the LB. Each backend's
//! server answers with its name and the peer address it saw, so the test
//! sees that backends get the real client address. dsr-4 is listed but
//! never set up: its probe through the tunnel fails, so it never enters
//! the table.
//!
//! The IPv6 variant (`root_dsr_ipip_over_ipv6_...`) runs the same on the
//! same segment in IPv6 (fd00:201::/64, VIP fd00:201:100::10): IPv6-in-IPv6
//! from the LB, `backend-setup --vip <IPv6>` on the backends.
//!
//! The UDP variants (`..._udp_...`) run the same with a UDP service: each
//! backend's server also answers datagrams on VIP:80 (bound to the VIP,
//! as a UDP server must be to answer from it), every request comes from a
//! port of its own on a socket connected to the VIP, and the agent's probe
//! through the tunnel is an ICMP echo to the VIP, then the TCP check at
//! the backend's address.
//!
//! Needs root and a built agent: `cargo build --release -p lb-agent && cargo
//! test -p lb-tests --release --test e2e_dsr -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    io,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use lb_lab::{
    agent::{agent_bin, Agent},
    command::run_cmd,
    netns::NetNs,
    require_root,
    scratch::Scratch,
    testrun::LbObject,
};
use serde_json::Value;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 201, 100, 10);
const PORT: u16 = 80;
const LB: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const SET_UP: [&str; 3] = ["dsr-1", "dsr-2", "dsr-3"];
const NOT_SET_UP: &str = "dsr-4";
const CONNECTIONS: usize = 1000;
/// The UDP variants' clients send from ports CLIENT_PORT.. (one each).
const CLIENT_PORT: u16 = 20_000;

const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0x100, 0, 0, 0, 0, 0x10);

/// `v4`'s IPv6 twin on the segment: fd00:201::<last byte>.
fn six(v4: Ipv4Addr) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, u16::from(v4.octets()[3]))
}

/// The address of the family the test runs in (`v6`).
fn pick(v4: Ipv4Addr, v6: bool) -> IpAddr {
    if v6 {
        six(v4).into()
    } else {
        v4.into()
    }
}

fn vip(v6: bool) -> IpAddr {
    if v6 {
        VIP6.into()
    } else {
        VIP.into()
    }
}

fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, 0, 11 + i as u8)
}

/// The service's protocol.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
}

/// The namespaces, in the order they go (the servers first, see `Drop`).
struct Net {
    servers: Vec<Server>,
    /// The XDP program on the LB's bridge port (see `Net::build`).
    lb_peer_xdp: LbObject,
    sw: NetNs,
    client: NetNs,
    lb: NetNs,
    backends: Vec<(String, NetNs)>,
    dir: Scratch,
    /// The service and the servers are IPv6 (the segment has both).
    v6: bool,
    proto: Proto,
}

fn netns(prefix: &str, name: &str) -> NetNs {
    NetNs::create(&format!("{prefix}-{name}")).unwrap_or_else(|e| panic!("{e}"))
}

impl Net {
    fn build(v6: bool, proto: Proto) -> Net {
        let prefix = format!("dsr-{}", std::process::id());
        let sw = netns(&prefix, "sw");
        sw.exec("ip", &["link", "add", "br0", "type", "bridge"]);
        sw.exec("ip", &["link", "set", "br0", "up"]);
        let client = netns(&prefix, "client");
        let lb = netns(&prefix, "lb");
        for (key, value) in [("ip_forward", "1"), ("conf.all.rp_filter", "0"), ("conf.default.rp_filter", "0")] {
            lb.exec("sysctl", &["-qw", &format!("net.ipv4.{key}={value}")]);
        }
        lb.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        let names = SET_UP.iter().chain([&NOT_SET_UP]);
        let backends: Vec<(String, NetNs)> = names.map(|n| (n.to_string(), netns(&prefix, n))).collect();
        let lb_peer_xdp = LbObject::load().expect("load the LB's object");
        let dir = Scratch::create(&prefix);
        let mut net = Net { servers: Vec::new(), lb_peer_xdp, sw, client, lb, backends, dir, v6, proto };
        net.plug(&net.client, "client", CLIENT);
        net.plug(&net.lb, "lb", LB);
        // The LB sends the encapsulated packets back out of its eth0 by
        // XDP_TX. A veth hands such frames to its peer only when the peer
        // runs an XDP program (the kernel kicks the peer's NAPI after
        // XDP_TX only then; GRO alone leaves them queued for good), so the
        // bridge port gets one that passes everything.
        net.sw.run(|| net.lb_peer_xdp.attach("xdp_lb", "p-lb")).expect("XDP on the LB's bridge port");
        for (i, (name, ns)) in net.backends.iter().enumerate() {
            net.plug(ns, name, backend_addr(i));
        }
        // Complete checksums from the client: a partial one cannot be
        // encapsulated (the redirected frame would lose the skb's note).
        net.client.exec("ethtool", &["-K", "eth0", "tx", "off"]);
        net.client.exec("ip", &["route", "add", &format!("{VIP}/32"), "via", &LB.to_string()]);
        net.client.exec("ip", &["-6", "route", "add", &format!("{VIP6}/128"), "via", &six(LB).to_string()]);
        let any = if v6 { "::" } else { "0.0.0.0" };
        net.servers = net.backends.iter().map(|(name, ns)| Server::start(ns, name, any)).collect();
        if proto == Proto::Udp {
            for (name, ns) in &net.backends {
                // Bound to the VIP before backend-setup puts it there (and
                // on dsr-4, where it never is).
                ns.exec("sysctl", &["-qw", "net.ipv4.ip_nonlocal_bind=1", "net.ipv6.ip_nonlocal_bind=1"]);
                net.servers.push(Server::start_udp(ns, name, vip(v6)));
            }
        }
        net
    }

    /// `ns`'s eth0 on the bridge, with `addr`/24, GRO on the bridge port.
    fn plug(&self, ns: &NetNs, name: &str, addr: Ipv4Addr) {
        let port = format!("p-{name}");
        run_cmd(
            "ip",
            &[
                "link",
                "add",
                &port,
                "netns",
                self.sw.name(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ],
        );
        self.sw.exec("ip", &["link", "set", &port, "master", "br0", "up"]);
        self.sw.exec("ethtool", &["-K", &port, "gro", "on"]);
        ns.exec("ip", &["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        ns.exec("ip", &["addr", "add", &format!("{}/64", six(addr)), "dev", "eth0", "nodad"]);
        ns.exec("ip", &["link", "set", "eth0", "up"]);
        ns.exec("ip", &["link", "set", "lo", "up"]);
    }

    fn config(&self) -> std::path::PathBuf {
        let (vip, lb) = (vip(self.v6), pick(LB, self.v6));
        let mut text = format!(
            "[[service]]\nname = \"web\"\nvip = \"{vip}\"\nport = {PORT}\ninterfaces = [\"eth0\"]\n\
             protocol = \"{}\"\nmode = \"dsr-ipip\"\nsource = \"{lb}\"\n\
             health_check = {{ interval = \"200ms\", timeout = \"150ms\", rise = 1, fall = 1 }}\n",
            if self.proto == Proto::Udp { "udp" } else { "tcp" }
        );
        for i in 0..self.backends.len() {
            text += &format!("[[service.backend]]\naddress = \"{}\"\n", addr_of(i, self.v6));
        }
        text += "[interface.eth0]\nhook = \"xdp\"\nchecksums = \"complete\"\nfast_path = \"on\"\n";
        text += "[socket_lb]\nenabled = false\n";
        let path = self.dir.config_path();
        std::fs::write(&path, text).expect("write the config");
        path
    }
}

/// How the backends decapsulate: an ipip device (backend-setup's default)
/// where the kernel has them, else lb-agent's tc program on eth0 (this CI
/// kernel is built without CONFIG_NET_IPIP).
fn decap_args(ns: &NetNs, v6: bool) -> Vec<&'static str> {
    let kind: &[&str] = if v6 { &["ip6tnl", "mode", "ip6ip6", "external"] } else { &["ipip", "external"] };
    let (probe, _) = ns.exec_status("ip", &[&["link", "add", "ipiptest", "type"][..], kind].concat());
    if probe.success() {
        ns.exec("ip", &["link", "del", "ipiptest"]);
        vec![]
    } else {
        vec!["--bpf-decap", "eth0"]
    }
}

/// `lb-agent backend-setup` in `ns`; its output.
fn backend_setup(ns: &NetNs, args: &[&str]) -> String {
    let bin = agent_bin();
    let out = ns
        .try_run(|| Command::new(&bin).arg("backend-setup").args(args).output())
        .expect("enter the backend's namespace")
        .expect("run lb-agent backend-setup");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "backend-setup {args:?} failed: {text}");
    text
}

/// A backend's server: each connection to 0.0.0.0:80 (or datagram to
/// VIP:80) gets "<name> <peer>".
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &NetNs, name: &str, any: &str) -> Server {
        let listener = ns.run(|| TcpListener::bind((any, PORT))).expect("bind :80 in the backend");
        listener.set_nonblocking(true).expect("nonblocking");
        Server::serve(name, move |name| match listener.accept() {
            Ok((mut s, peer)) => {
                let _ = s.set_nonblocking(false);
                let _ = writeln!(s, "{name} {}", peer.ip());
            }
            Err(_) => thread::sleep(Duration::from_millis(2)),
        })
    }

    /// On VIP:80: a socket bound to the wildcard would answer from the
    /// address of the route to the client, not the VIP.
    fn start_udp(ns: &NetNs, name: &str, vip: IpAddr) -> Server {
        let socket = ns.run(|| UdpSocket::bind((vip, PORT))).expect("bind VIP:80 in the backend");
        socket.set_read_timeout(Some(Duration::from_millis(20))).expect("read timeout");
        Server::serve(name, move |name| {
            let mut buf = [0u8; 64];
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(format!("{name} {}\n", peer.ip()).as_bytes(), peer);
            }
        })
    }

    /// `serve_once(name)` again and again on a thread until dropped.
    fn serve(name: &str, mut serve_once: impl FnMut(&str) + Send + 'static) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, name) = (stop.clone(), name.to_owned());
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                serve_once(&name);
            }
        });
        Server { stop, thread: Some(thread) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn web_backends(status: &Value) -> BTreeMap<String, Value> {
    let svc = status["services"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "web")).cloned();
    let svc = svc.unwrap_or_else(|| panic!("no web service: {status}"));
    assert_eq!(svc["mode"], "dsr-ipip", "{svc}");
    svc["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| (b["address"].as_str().unwrap().to_owned(), b.clone()))
        .collect()
}

fn addr_of(i: usize, v6: bool) -> String {
    SocketAddr::new(pick(backend_addr(i), v6), PORT).to_string()
}

#[test]
fn root_dsr_ipip_backends_answer_clients_directly() {
    require_root!("root_dsr_ipip_backends_answer_clients_directly");
    backends_answer_clients_directly(false, Proto::Tcp);
}

#[test]
fn root_dsr_ipip_over_ipv6_backends_answer_clients_directly() {
    require_root!("root_dsr_ipip_over_ipv6_backends_answer_clients_directly");
    backends_answer_clients_directly(true, Proto::Tcp);
}

#[test]
fn root_dsr_ipip_udp_backends_answer_clients_from_the_vip() {
    require_root!("root_dsr_ipip_udp_backends_answer_clients_from_the_vip");
    backends_answer_clients_directly(false, Proto::Udp);
}

#[test]
fn root_dsr_ipip_over_ipv6_udp_backends_answer_clients_from_the_vip() {
    require_root!("root_dsr_ipip_over_ipv6_udp_backends_answer_clients_from_the_vip");
    backends_answer_clients_directly(true, Proto::Udp);
}

/// Request `n` from the client to the VIP: the answer's line. Over UDP
/// from a port of its own, on a socket connected to the VIP, so only an
/// answer from VIP:80 reaches it (and recv_from says so again).
fn ask(vip: SocketAddr, client: IpAddr, n: usize, proto: Proto) -> io::Result<String> {
    let line = match proto {
        Proto::Tcp => {
            let s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            line
        }
        Proto::Udp => {
            let s = UdpSocket::bind((client, CLIENT_PORT + n as u16))?;
            s.connect(vip)?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.send(b"?")?;
            let mut buf = [0u8; 256];
            let (len, from) = s.recv_from(&mut buf)?;
            if from != vip {
                return Err(io::Error::other(format!("answer from {from}, not the VIP")));
            }
            String::from_utf8_lossy(&buf[..len]).into_owned()
        }
    };
    Ok(line.trim().to_owned())
}

fn backends_answer_clients_directly(v6: bool, proto: Proto) {
    let net = Net::build(v6, proto);
    let decap = decap_args(&net.backends[0].1, v6);
    let (vip_ip, client) = (vip(v6), pick(CLIENT, v6));
    let vip = vip_ip.to_string();
    let host_vip = format!("{vip}/{}", if v6 { 128 } else { 32 });
    let addr_of = |i| addr_of(i, v6);
    let args: Vec<&str> = ["--vip", vip.as_str()].into_iter().chain(decap).collect();
    for (name, ns) in &net.backends[..SET_UP.len()] {
        let first = backend_setup(ns, &args);
        assert!(first.contains(&format!("added VIP {host_vip}")), "{name}: {first}");
        assert!(v6 || first.contains("net.ipv4.conf.all.arp_ignore=1"), "{name}: {first}");
        let again = backend_setup(ns, &args);
        assert!(again.trim().ends_with(": nothing to change"), "{name}: a second run changed something: {again}");
    }
    let mut agent = Agent::spawn(&net.lb, &net.dir.agent_args(net.config()));
    agent.wait_ready();

    // The set-up backends come up through the tunnel; dsr-4 never does.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let s = agent.status();
        let b = web_backends(&s);
        let probed = b[&addr_of(SET_UP.len())]["health_checks"]["timeout"].as_u64().unwrap_or(0) > 0;
        if probed && (0..SET_UP.len()).all(|i| b[&addr_of(i)]["in_table"] == true) {
            break s;
        }
        assert!(Instant::now() < deadline, "set-up backends not in the table, or dsr-4 never probed, in 10s: {s}");
        thread::sleep(Duration::from_millis(100));
    };
    let lost = &web_backends(&status)[&addr_of(SET_UP.len())];
    assert_eq!(lost["in_table"], false, "{lost}");
    let reason = lost["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("not set up for dsr-ipip: no answer"), "{lost}");

    // 1,000 connections (or exchanges), every one answered by a set-up
    // backend that saw the client's own address.
    let answers: Result<Vec<String>, String> = net.client.run(|| {
        (0..CONNECTIONS)
            .map(|n| ask(SocketAddr::new(vip_ip, PORT), client, n, proto).map_err(|e| format!("connection {n}: {e}")))
            .collect()
    });
    let answers = answers.unwrap_or_else(|e| {
        let s = agent.status();
        let lb = net.lb.exec("ethtool", &["-S", "eth0"]);
        let sw = net.sw.exec("ip", &["-s", "link", "show", "p-lb"]);
        let b1 = net.backends[0].1.exec("ip", &["-s", "link", "show", "eth0"]);
        let nstat = net.backends[0].1.exec("nstat", &["-az"]);
        panic!(
            "{e}; paths {}; lb eth0: {lb}; sw p-lb: {sw}; dsr-1 eth0: {b1}; dsr-1 nstat: {nstat}",
            s["agent"]["interfaces"]
        )
    });
    let mut shares: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &answers {
        let (name, peer) = a.split_once(' ').unwrap_or_else(|| panic!("answer {a:?}"));
        assert_eq!(peer, client.to_string(), "{name} saw {peer}, not the client");
        *shares
            .entry(SET_UP.iter().find(|n| **n == name).unwrap_or_else(|| panic!("answer from {name}")))
            .or_default() += 1;
    }
    let mean = CONNECTIONS as f64 / SET_UP.len() as f64;
    for name in SET_UP {
        let got = shares.get(name).copied().unwrap_or(0) as f64;
        assert!((got - mean).abs() <= 0.25 * mean, "{name} got {got} of {CONNECTIONS}: {shares:?}");
    }
    println!(
        "{} of {CONNECTIONS} connections answered, each from the client's address; shares {shares:?}",
        answers.len()
    );

    // Encapsulated on the fast path, never passed up bare; no reply came back.
    let s = agent.status();
    let reasons: BTreeMap<String, u64> = s["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .map(|r| (r["reason"].as_str().unwrap().to_owned(), r["packets"].as_u64().unwrap()))
        .collect();
    // A connection's SYN and ACK at least; a datagram each over UDP.
    let per = if proto == Proto::Tcp { 2 } else { 1 };
    assert!(reasons["forwarded"] >= CONNECTIONS as u64 * per, "{reasons:?}");
    assert_eq!(reasons.get("reply_translated").copied().unwrap_or(0), 0, "{reasons:?}");
    for r in ["drop_dsr_too_big", "drop_dsr_no_route", "drop_dsr_unsupported"] {
        assert_eq!(reasons.get(r).copied().unwrap_or(0), 0, "{r}: {reasons:?}");
    }

    // --undo takes away what the set-up made.
    let (_, ns) = &net.backends[0];
    let undone = backend_setup(ns, &[&args[..], &["--undo"]].concat());
    assert!(undone.contains(&format!("removed VIP {host_vip}")), "{undone}");
    assert!(undone.contains("deleted lbtun0") || undone.contains("detached tc_decap"), "{undone}");
    let again = backend_setup(ns, &[&args[..], &["--undo"]].concat());
    assert!(again.trim().ends_with(": nothing to change"), "a second --undo changed something: {again}");
    drop(agent);
}
