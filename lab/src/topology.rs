//! A throw-away network for end-to-end tests and the demo:
//!
//! ```text
//!  client ns                 LB ns                      backend ns (one per backend)
//!  10.200.0.2 [to-lb] ==== [lb-c] 10.200.0.1
//!                                 10.200.1.1 [lb-b1] ==== [to-lb] 10.200.1.2  web-1
//!                                 10.200.2.1 [lb-b2] ==== [to-lb] 10.200.2.2  web-2 ...
//! ```
//!
//! The VIP (10.200.255.1) sits on no interface: the client routes it via the
//! LB, the backends route the client subnet via the LB, and the LB namespace
//! forwards (ip_forward=1, rp_filter=0). Nothing has a default route, so test
//! traffic cannot leave these namespaces.
//!
//! Everything is owned by RAII guards: dropping a [`Topology`] stops the
//! backend servers and deletes the namespaces (which deletes their veths);
//! dropping an [`Agent`] sends SIGTERM to the process it spawned, then
//! SIGKILL if it does not exit in time. All of it also runs during a panic.
//!
//! Checksums: by default the client's and backends' stacks hand veth
//! CHECKSUM_PARTIAL packets (the L4 checksum field holds only the
//! pseudo-header sum) and receivers on veth trust that flag without checking.
//! XDP cannot see the flag, so its incremental update leaves a wrong
//! pseudo-header sum that nobody notices on pure veth but that breaks as soon
//! as a hop completes the checksum. [`Options::node_tx_csum_offload`] and
//! [`Options::lb_tx_csum_offload`] switch offload off per side to test both.
//!
//! Helpers panic instead of returning errors: they are for tests, and a panic
//! keeps the backtrace.
//!
//! The namespaces are *named* ([`NetNs::create`]): `ip`, `ethtool` and
//! `sysctl` need a name to reach them. The cost: a process killed with
//! SIGKILL leaves `lbt-<pid>-*` entries behind for `ip netns del`.
//!
//! The agent enters only the LB's network namespace and shares the test's
//! mount namespace, so the bpffs it mounts under the topology's directory
//! for its pins outlives it, and a restarted agent adopts them. Each agent
//! gets its own control socket and pin directory there
//! ([`Topology::agent_args`]); dropping the topology unmounts that bpffs.

use std::{
    fs,
    io::{self, BufRead, BufReader, ErrorKind, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::{
    agent::{Agent, AgentArgs},
    cgroup::socket_lb_toml,
    command::run_cmd,
    netns::NetNs,
    scratch::Scratch,
};

/// The service address. It is on no interface; the client routes it via the LB.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 255, 1);
/// The TCP service: `VIP:TCP_PORT` -> `backend:BACKEND_TCP_PORT`.
pub const TCP_PORT: u16 = 80;
/// The UDP service: `VIP:UDP_PORT` -> `backend:BACKEND_UDP_PORT`.
pub const UDP_PORT: u16 = 53;
pub const BACKEND_TCP_PORT: u16 = 8080;
pub const BACKEND_UDP_PORT: u16 = 5353;
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// The client's subnet, which the backends route via the LB.
pub const CLIENT_NET: &str = "10.200.0.0/24";
/// The LB's own address on the client side (not a service: must keep answering).
pub const LB_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The LB's client-facing interface (in the LB namespace).
pub const LB_CLIENT_IFACE: &str = "lb-c";
/// The interface name inside the client and backend namespaces.
pub const NODE_IFACE: &str = "to-lb";
/// Upper bound for every single socket operation.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Highest backend index: backend `i` gets 10.200.i.0/24, and 255 holds the VIP.
const MAX_BACKEND_INDEX: u8 = 250;
const SERVER_POLL: Duration = Duration::from_millis(50);

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// `lbt-<pid>-<n>`: unique per topology, so parallel runs and leftovers of a
/// crashed run never collide with this one.
fn unique_prefix() -> String {
    format!("lbt-{}-{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

/// A client namespace `name` wired to the host's namespace by a veth:
/// `host_iface` on the host with `gw`/24, `eth0` in the client with
/// `client`/24, and the client's one route beyond its subnet a /32 to `vip`
/// via `gw` (no default route: nothing it sends leaves the machine).
pub fn host_client(name: &str, host_iface: &str, gw: Ipv4Addr, client: Ipv4Addr, vip: Ipv4Addr) -> NetNs {
    let ns = create_netns(name);
    run_cmd("ip", &["link", "add", host_iface, "type", "veth", "peer", "name", "eth0", "netns", ns.name()]);
    run_cmd("ip", &["addr", "add", &format!("{gw}/24"), "dev", host_iface]);
    run_cmd("ip", &["link", "set", host_iface, "up"]);
    ns.exec("ip", &["addr", "add", &format!("{client}/24"), "dev", "eth0"]);
    ns.exec("ip", &["link", "set", "eth0", "up"]);
    ns.exec("ip", &["route", "add", &format!("{vip}/32"), "via", &gw.to_string()]);
    ns
}

/// [`NetNs::create`], panicking as the helpers here do.
fn create_netns(name: &str) -> NetNs {
    NetNs::create(name).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------
// Backend servers

/// A backend's TCP and UDP servers, running as threads in its namespace.
/// TCP: on accept, writes `<name>\n`, then answers each line with
/// `<name>: <line>\n`. UDP: answers each datagram with `<name>\n`.
/// Stopped (and joined) on drop.
pub struct BackendServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl BackendServers {
    pub fn start(ns: &NetNs, name: &str, tcp: impl Into<SocketAddr>, udp: impl Into<SocketAddr>) -> BackendServers {
        let (tcp, udp) = (tcp.into(), udp.into());
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let mut threads = Vec::new();
        {
            let (stop, name, ready) = (stop.clone(), name.to_owned(), ready_tx.clone());
            threads.push(ns.spawn(move || serve_tcp(tcp, &name, stop, ready)));
        }
        {
            let (stop, name, ready) = (stop.clone(), name.to_owned(), ready_tx);
            threads.push(ns.spawn(move || serve_udp(udp, &name, &stop, ready)));
        }
        let servers = BackendServers { stop, threads };
        for _ in 0..2 {
            match ready_rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("backend {name}: {e}"),
                Err(e) => panic!("backend {name}: server did not start: {e}"),
            }
        }
        servers
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                eprintln!("warning: a backend server thread panicked");
            }
        }
    }
}

impl Drop for BackendServers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_tcp(addr: SocketAddr, name: &str, stop: Arc<AtomicBool>, ready: mpsc::Sender<Result<(), String>>) {
    let listener = match TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("bind tcp {addr}: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if !wait_readable(&listener, SERVER_POLL) {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let (name, stop) = (name.to_owned(), stop.clone());
                conns.push(thread::spawn(move || {
                    if let Err(e) = serve_tcp_conn(stream, &name, &stop) {
                        if !matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) {
                            eprintln!("backend {name}: connection error: {e}");
                        }
                    }
                }));
                conns.retain(|c| !c.is_finished());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => {
                eprintln!("backend {name}: accept: {e}");
                thread::sleep(SERVER_POLL);
            }
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

/// poll(2) for readability (a pending connection), at most `timeout`.
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    n > 0
}

fn serve_tcp_conn(stream: TcpStream, name: &str, stop: &AtomicBool) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(SERVER_POLL))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    writer.write_all(format!("{name}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // read_until keeps what it read when it times out, so a line split
        // across timeouts is still whole.
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(()),
            Ok(_) if line.ends_with(b"\n") => {
                let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                writer.write_all(format!("{name}: {text}\n").as_bytes())?;
                line.clear();
            }
            Ok(_) => return Ok(()), // EOF after a partial line
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
}

fn serve_udp(addr: SocketAddr, name: &str, stop: &AtomicBool, ready: mpsc::Sender<Result<(), String>>) {
    let socket = match UdpSocket::bind(addr).and_then(|s| s.set_read_timeout(Some(SERVER_POLL)).map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(format!("bind udp {addr}: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut buf = [0u8; 2048];
    let answer = format!("{name}\n");
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                if let Err(e) = socket.send_to(answer.as_bytes(), peer) {
                    eprintln!("backend {name}: udp send to {peer}: {e}");
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                eprintln!("backend {name}: udp recv: {e}");
                thread::sleep(SERVER_POLL);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Client helpers (call them on a thread inside the client namespace)

/// A TCP connection through the VIP, with the backend that greeted it.
pub struct Conn {
    pub backend: String,
    pub local: SocketAddr,
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    /// Connect to `addr` and read the greeting line (the backend's name).
    pub fn open(addr: impl Into<SocketAddr>) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let local = stream.local_addr()?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let backend = read_line(&mut reader)?;
        Ok(Conn { backend, local, stream, reader })
    }

    /// Send `line`, return the answer's backend name (the part before `": "`),
    /// checking that the rest echoes `line`.
    pub fn echo(&mut self, line: &str) -> io::Result<String> {
        self.stream.write_all(format!("{line}\n").as_bytes())?;
        let answer = read_line(&mut self.reader)?;
        match answer.split_once(": ") {
            Some((name, rest)) if rest == line => Ok(name.to_owned()),
            _ => Err(io::Error::new(ErrorKind::InvalidData, format!("unexpected echo {answer:?} for {line:?}"))),
        }
    }
}

/// Echo on every held connection; a failure, or an answer from another
/// backend than the one that greeted it, is described.
pub fn echo_all(held: &mut [Conn], round: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, c) in held.iter_mut().enumerate() {
        match c.echo(&format!("{round} conn {i}")) {
            Ok(name) if name == c.backend => {}
            Ok(name) => failures.push(format!("{round}: held conn {i} to {} answered by {name}", c.backend)),
            Err(e) => failures.push(format!("{round}: held conn {i} to {}: {e}", c.backend)),
        }
    }
    failures
}

fn read_line(reader: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = String::new();
    let n = reader.read_line(&mut line)?;
    if n == 0 || !line.ends_with('\n') {
        return Err(io::Error::new(ErrorKind::UnexpectedEof, format!("connection closed after {line:?}")));
    }
    line.pop();
    Ok(line)
}

/// What a client of a service that refuses it sees, from the namespace it
/// runs in: the error of a TCP connect to `tcp` and how long it took, and
/// the error of a receive on a UDP socket connected to `udp` after a send.
/// Panics if either is answered.
pub fn refused_tcp_and_udp(tcp: impl Into<SocketAddr>, udp: impl Into<SocketAddr>) -> (io::Error, Duration, io::Error) {
    let (tcp, udp) = (tcp.into(), udp.into());
    let started = std::time::Instant::now();
    let tcp_err = TcpStream::connect_timeout(&tcp, Duration::from_secs(5)).expect_err("a connect refused");
    let took = started.elapsed();
    let socket = UdpSocket::bind((unspecified_like(&udp), 0)).expect("bind");
    socket.connect(udp).expect("connect UDP");
    socket.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    socket.send(b"hello\n").expect("send");
    let udp_err = socket.recv(&mut [0u8; 64]).expect_err("a datagram refused");
    (tcp_err, took, udp_err)
}

/// One TCP request: connect, read the backend's name, close.
pub fn tcp_request(addr: impl Into<SocketAddr>) -> io::Result<(String, SocketAddr)> {
    let conn = Conn::open(addr)?;
    Ok((conn.backend, conn.local))
}

/// The unspecified address of `addr`'s family, to bind a client socket to.
fn unspecified_like(addr: &SocketAddr) -> std::net::IpAddr {
    if addr.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    }
}

/// One UDP request: send a datagram to `addr`, return the answer (trimmed).
/// The socket is connected, so only an answer *from `addr`* counts.
pub fn udp_request(addr: impl Into<SocketAddr>) -> io::Result<String> {
    let addr = addr.into();
    let socket = UdpSocket::bind((unspecified_like(&addr), 0))?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.send(b"hello\n")?;
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).trim_end().to_owned())
}

// ---------------------------------------------------------------------------
// The topology

/// Knobs for [`Topology::build`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Backend names, e.g. `["web-1", "web-2"]`.
    pub backends: Vec<String>,
    /// MTU of every veth. Above about 3.5 KB native XDP on veth refuses a
    /// program without multi-buffer support, so the agent falls back to
    /// generic (skb) mode: a way to test that mode.
    pub mtu: Option<u32>,
    /// Leave tx checksum offload on for the client's and backends' veth ends
    /// (veth's default): their TCP/UDP packets then cross the LB as
    /// CHECKSUM_PARTIAL, the checksum field holding only the pseudo-header
    /// sum. When false, `ethtool -K to-lb tx off` runs in those namespaces,
    /// so their packets carry complete checksums that receivers verify, and
    /// the config says `checksums = "complete"` for the LB's interfaces.
    pub node_tx_csum_offload: bool,
    /// Leave tx checksum offload on for the LB's own veth ends. When false,
    /// the LB finishes CHECKSUM_PARTIAL packets in software as it forwards
    /// them, as a real NIC would in hardware, so a wrong pseudo-header sum
    /// becomes a wrong checksum that the receiver drops.
    pub lb_tx_csum_offload: bool,
    /// The `hook` setting the written configs give every LB interface:
    /// `Some("xdp")` by default, because these tests are about XDP on veth
    /// (which `auto` would give tc); `None` leaves it to `auto`.
    pub hook: Option<&'static str>,
    /// The cgroup the agent's socket load balancing attaches to (a test's
    /// own [`crate::cgroup::TestCgroup`]); `None` turns it off, so that the
    /// agent never balances the machine's other processes.
    pub socket_lb_cgroup: Option<PathBuf>,
}

impl Options {
    pub fn with_backends<S: AsRef<str>>(names: &[S]) -> Options {
        Options {
            backends: names.iter().map(|s| s.as_ref().to_owned()).collect(),
            mtu: None,
            node_tx_csum_offload: true,
            lb_tx_csum_offload: true,
            hook: Some("xdp"),
            socket_lb_cgroup: None,
        }
    }
}

/// One backend: its namespace, addresses and running servers.
pub struct Backend {
    pub name: String,
    /// 1-based; the subnet is 10.200.<index>.0/24.
    pub index: u8,
    /// The backend's address (10.200.<index>.2).
    pub addr: Ipv4Addr,
    /// The LB's address on this link (10.200.<index>.1).
    pub lb_addr: Ipv4Addr,
    /// The LB-side interface of this link (in the LB namespace).
    pub lb_iface: String,
    servers: Option<BackendServers>,
    pub ns: NetNs,
}

impl Backend {
    pub fn tcp_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.addr, BACKEND_TCP_PORT)
    }
    pub fn udp_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.addr, BACKEND_UDP_PORT)
    }
}

/// Backends behind a bridge ([`Topology::add_bridged_backends`]). Dropping
/// it stops their servers, then deletes their namespaces; the bridge goes
/// with the LB namespace.
pub struct BridgedBackends {
    pub bridge: String,
    /// (name, address) of each backend.
    pub backends: Vec<(String, Ipv4Addr)>,
    // Servers before namespaces: fields drop in declaration order.
    servers: Vec<BackendServers>,
    namespaces: Vec<NetNs>,
}

impl BridgedBackends {
    /// Checksum drops in the backends' stacks: (TCP, UDP) InCsumErrors.
    pub fn csum_errors(&self) -> (u64, u64) {
        self.namespaces.iter().map(NetNs::csum_errors).fold((0, 0), |(t, u), (a, b)| (t + a, u + b))
    }
}

/// Client ns ⇄ LB ns ⇄ backend namespaces, plus a directory for the config
/// and the agent's log. Dropping it stops the servers, deletes the
/// namespaces (and with them every veth) and the directory.
pub struct Topology {
    pub prefix: String,
    pub options: Options,
    pub backends: Vec<Backend>,
    pub client: NetNs,
    pub lb: NetNs,
    dir: Scratch,
}

impl Topology {
    /// Build the whole network and start every backend's servers. A failure
    /// half-way panics; the guards made so far clean up while unwinding.
    pub fn build(options: Options) -> Topology {
        assert!(options.backends.len() <= MAX_BACKEND_INDEX as usize, "too many backends");
        let prefix = unique_prefix();
        let dir = Scratch::create(&prefix);
        let lb = create_netns(&format!("{prefix}-lb"));
        // Before any interface exists, so that they inherit the defaults.
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            lb.exec("sysctl", &["-qw", &format!("{key}={value}")]);
        }
        let client = create_netns(&format!("{prefix}-client"));
        let mut topo = Topology { prefix, options, backends: Vec::new(), client, lb, dir };
        topo.link(&topo.client, LB_CLIENT_IFACE, LB_CLIENT_ADDR, CLIENT_ADDR);
        // Only the VIP goes via the LB: no default route anywhere.
        topo.client.exec("ip", &["route", "add", &format!("{VIP}/32"), "via", &LB_CLIENT_ADDR.to_string()]);
        let names = topo.options.backends.clone();
        for name in names {
            topo.add_backend(&name);
        }
        topo
    }

    /// Create backend `name` (namespace, veth, addresses, routes, servers).
    /// Its LB-side interface joins [`Topology::lb_interfaces`], so the next
    /// config written lists it.
    pub fn add_backend(&mut self, name: &str) -> &Backend {
        assert!(self.backends.iter().all(|b| b.name != name), "backend {name} exists already");
        let index = self.backends.iter().map(|b| b.index).max().unwrap_or(0) + 1;
        assert!(index <= MAX_BACKEND_INDEX, "too many backends");
        let ns = create_netns(&format!("{}-{name}", self.prefix));
        let lb_iface = format!("lb-b{index}");
        let lb_addr = Ipv4Addr::new(10, 200, index, 1);
        let addr = Ipv4Addr::new(10, 200, index, 2);
        self.link(&ns, &lb_iface, lb_addr, addr);
        ns.exec("ip", &["route", "add", CLIENT_NET, "via", &lb_addr.to_string()]);
        let tcp = SocketAddrV4::new(addr, BACKEND_TCP_PORT);
        let udp = SocketAddrV4::new(addr, BACKEND_UDP_PORT);
        let servers = BackendServers::start(&ns, name, tcp, udp);
        self.backends.push(Backend {
            name: name.to_owned(),
            index,
            addr,
            lb_addr,
            lb_iface,
            servers: Some(servers),
            ns,
        });
        self.backends.last().expect("just pushed")
    }

    /// A veth pair between the LB (`lb_iface`, `lb_addr`/24) and `node`
    /// (`to-lb`, `node_addr`/24), created directly inside both namespaces.
    fn link(&self, node: &NetNs, lb_iface: &str, lb_addr: Ipv4Addr, node_addr: Ipv4Addr) {
        self.veth_pair(lb_iface, node);
        if let Some(mtu) = self.options.mtu {
            let mtu = mtu.to_string();
            self.lb.exec("ip", &["link", "set", lb_iface, "mtu", &mtu]);
            node.exec("ip", &["link", "set", NODE_IFACE, "mtu", &mtu]);
        }
        if !self.options.node_tx_csum_offload {
            node.exec("ethtool", &["-K", NODE_IFACE, "tx", "off"]);
        }
        if !self.options.lb_tx_csum_offload {
            self.lb.exec("ethtool", &["-K", lb_iface, "tx", "off"]);
        }
        self.lb.exec("sysctl", &["-qw", &format!("net.ipv4.conf.{lb_iface}.rp_filter=0")]);
        self.lb.exec("ip", &["addr", "add", &format!("{lb_addr}/24"), "dev", lb_iface]);
        node.exec("ip", &["addr", "add", &format!("{node_addr}/24"), "dev", NODE_IFACE]);
        self.lb.exec("ip", &["link", "set", lb_iface, "up"]);
        node.exec("ip", &["link", "set", NODE_IFACE, "up"]);
    }

    /// Backends behind a Linux bridge in the LB namespace, as containers
    /// sit on docker0: the bridge `bridge` gets 10.200.`subnet`.1/24, and
    /// each of `names` a namespace whose veth is enslaved to it (LB side
    /// `<bridge>p<i>`), the address 10.200.`subnet`.<i + 1>, a route to the
    /// client subnet via the bridge, and its servers. Not in
    /// [`Topology::lb_interfaces`]: the bridge is listed, its ports are not.
    pub fn add_bridged_backends(&self, bridge: &str, subnet: u8, names: &[&str]) -> BridgedBackends {
        assert!(subnet > MAX_BACKEND_INDEX, "subnet {subnet} may clash with a backend link's");
        let gateway = Ipv4Addr::new(10, 200, subnet, 1);
        self.lb.exec("ip", &["link", "add", "name", bridge, "type", "bridge"]);
        self.lb.exec("sysctl", &["-qw", &format!("net.ipv4.conf.{bridge}.rp_filter=0")]);
        self.lb.exec("ip", &["addr", "add", &format!("{gateway}/24"), "dev", bridge]);
        self.lb.exec("ip", &["link", "set", bridge, "up"]);
        let mut out = BridgedBackends {
            bridge: bridge.to_owned(),
            backends: Vec::new(),
            servers: Vec::new(),
            namespaces: Vec::new(),
        };
        for (i, name) in names.iter().enumerate() {
            let ns = create_netns(&format!("{}-{name}", self.prefix));
            let port = format!("{bridge}p{}", i + 1);
            let addr = Ipv4Addr::new(10, 200, subnet, i as u8 + 2);
            self.veth_pair(&port, &ns);
            self.lb.exec("ip", &["link", "set", &port, "master", bridge, "up"]);
            ns.exec("ip", &["addr", "add", &format!("{addr}/24"), "dev", NODE_IFACE]);
            ns.exec("ip", &["link", "set", NODE_IFACE, "up"]);
            ns.exec("ip", &["route", "add", CLIENT_NET, "via", &gateway.to_string()]);
            let tcp = SocketAddrV4::new(addr, BACKEND_TCP_PORT);
            let udp = SocketAddrV4::new(addr, BACKEND_UDP_PORT);
            out.servers.push(BackendServers::start(&ns, name, tcp, udp));
            out.backends.push((name.to_string(), addr));
            out.namespaces.push(ns);
        }
        out
    }

    /// A veth pair: `lb_iface` in the LB namespace, `NODE_IFACE` in `node`,
    /// created directly inside both.
    fn veth_pair(&self, lb_iface: &str, node: &NetNs) {
        let (lb, node) = (self.lb.name(), node.name());
        run_cmd(
            "ip",
            &["link", "add", "name", lb_iface, "netns", lb, "type", "veth", "peer", "name", NODE_IFACE, "netns", node],
        );
    }

    pub fn backend(&self, name: &str) -> &Backend {
        self.backends.iter().find(|b| b.name == name).unwrap_or_else(|| panic!("no backend {name}"))
    }

    /// Stop one backend's servers (its namespace and link stay): its
    /// listener closes, so connects to it are refused, and its open
    /// connections end.
    pub fn stop_backend(&mut self, name: &str) {
        let b = self.backends.iter_mut().find(|b| b.name == name).unwrap_or_else(|| panic!("no backend {name}"));
        b.servers.take();
    }

    /// Start a stopped backend's servers again (same addresses).
    pub fn start_backend(&mut self, name: &str) {
        let b = self.backends.iter_mut().find(|b| b.name == name).unwrap_or_else(|| panic!("no backend {name}"));
        assert!(b.servers.is_none(), "backend {name} is running already");
        b.servers = Some(BackendServers::start(&b.ns, name, b.tcp_addr(), b.udp_addr()));
    }

    /// The VIP's TCP service address.
    pub fn vip_tcp(&self) -> SocketAddrV4 {
        SocketAddrV4::new(VIP, TCP_PORT)
    }

    /// The VIP's UDP service address.
    pub fn vip_udp(&self) -> SocketAddrV4 {
        SocketAddrV4::new(VIP, UDP_PORT)
    }

    /// Every LB-side interface: the client link and each backend link. XDP
    /// must sit on all of them, since replies have to cross it too.
    pub fn lb_interfaces(&self) -> Vec<String> {
        std::iter::once(LB_CLIENT_IFACE.to_owned()).chain(self.backends.iter().map(|b| b.lb_iface.clone())).collect()
    }

    /// Scratch directory, removed with the topology.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.config_path()
    }

    /// The agent config: a TCP service `VIP:80` and a UDP service `VIP:53`,
    /// both on every LB-side interface, with `members` (backend name,
    /// weight) as backends.
    pub fn config_toml(&self, members: &[(&str, u32)]) -> String {
        self.config_toml_with(members, "")
    }

    /// [`Topology::config_toml`] with `web_extra` (TOML lines such as
    /// `drain_timeout = "2s"` or `health_check = {...}`) added to the TCP
    /// service only: a TCP health check would fail on the UDP ports.
    pub fn config_toml_with(&self, members: &[(&str, u32)], web_extra: &str) -> String {
        let interfaces = self.lb_interfaces().iter().map(|i| format!("{i:?}")).collect::<Vec<_>>().join(", ");
        let mut out = format!("# Written by lb-tests for topology {}.\n", self.prefix);
        for (name, proto, port) in [("web", "tcp", TCP_PORT), ("dns", "udp", UDP_PORT)] {
            out += &format!(
                "\n[[service]]\nname = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\nprotocol = \"{proto}\"\ninterfaces = [{interfaces}]\n"
            );
            if proto == "tcp" && !web_extra.is_empty() {
                out += web_extra.trim_end();
                out.push('\n');
            }
            for (member, weight) in members {
                let b = self.backend(member);
                let addr = if proto == "tcp" { b.tcp_addr() } else { b.udp_addr() };
                out += &format!("\n[[service.backend]]\naddress = \"{addr}\"\nweight = {weight}\n");
            }
        }
        for i in self.lb_interfaces() {
            let mut settings = String::new();
            if let Some(hook) = self.options.hook {
                settings += &format!("hook = {hook:?}\n");
            }
            if !self.options.node_tx_csum_offload {
                // Every sender computes its checksums in software, so the LB
                // is told it gets complete ones only (auto would take the
                // veths for local stacks that may send partial ones).
                settings += "checksums = \"complete\"\n";
            }
            if !settings.is_empty() {
                out += &format!("\n[interface.{i:?}]\n{settings}");
            }
        }
        out + &socket_lb_toml(self.options.socket_lb_cgroup.as_deref())
    }

    /// Write the config for `members` atomically (temp file + rename), so the
    /// agent never reads half a file.
    pub fn write_config(&self, members: &[(&str, u32)]) -> PathBuf {
        self.write_raw_config(&self.config_toml(members))
    }

    /// Every backend with weight 1.
    pub fn write_config_all(&self) -> PathBuf {
        let members: Vec<(&str, u32)> = self.backends.iter().map(|b| (b.name.as_str(), 1)).collect();
        self.write_config(&members)
    }

    /// Write arbitrary text as the config, atomically.
    pub fn write_raw_config(&self, text: &str) -> PathBuf {
        let path = self.config_path();
        let tmp = self.dir.path().join(".lb.toml.tmp");
        fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
        path
    }

    /// The agent's control socket.
    pub fn api_socket(&self) -> PathBuf {
        self.dir.api_socket()
    }

    /// Where the agent pins its maps and links (see [`Scratch::pin_dir`]);
    /// dropping the topology unmounts the bpffs.
    pub fn pin_dir(&self) -> PathBuf {
        self.dir.pin_dir()
    }

    /// Arguments for an agent of this topology: the current config file,
    /// its own control socket and pin directory, no metrics server, the log
    /// in `agent.log`.
    pub fn agent_args(&self) -> AgentArgs {
        self.dir.agent_args(self.config_path())
    }

    /// Start the agent (see [`Topology::agent_args`]) in the LB namespace and
    /// wait for "ready".
    pub fn start_agent(&self) -> Agent {
        self.start_agent_with(&self.agent_args())
    }

    /// Start an agent with `args` in the LB namespace and wait for "ready".
    pub fn start_agent_with(&self, args: &AgentArgs) -> Agent {
        let mut agent = Agent::spawn(&self.lb, args);
        agent.wait_ready();
        agent
    }

    /// Checksum drops in the client's and every backend's stack, by
    /// namespace: (name, TCP InCsumErrors, UDP InCsumErrors), non-zero only.
    pub fn csum_errors(&self) -> Vec<(String, u64, u64)> {
        std::iter::once(("client".to_owned(), &self.client))
            .chain(self.backends.iter().map(|b| (b.name.clone(), &b.ns)))
            .map(|(n, ns)| {
                let (tcp, udp) = ns.csum_errors();
                (n, tcp, udp)
            })
            .filter(|(_, tcp, udp)| tcp + udp > 0)
            .collect()
    }

    /// `ip -d link show` in the LB namespace.
    pub fn lb_links(&self) -> String {
        self.lb.exec("ip", &["-d", "link", "show"])
    }

    /// Interfaces in the LB namespace that have an XDP program attached,
    /// with the kind iproute2 reports (`xdp` native, `xdpgeneric`, ...).
    pub fn lb_xdp_attachments(&self) -> Vec<(String, String)> {
        xdp_attachments(&self.lb_links())
    }

    /// What was built, for humans.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "  client  ns {:<28} {CLIENT_ADDR}/24 on {NODE_IFACE}, route {VIP}/32 via {LB_CLIENT_ADDR}\n",
            self.client.name()
        );
        s += &format!(
            "  LB      ns {:<28} {LB_CLIENT_ADDR}/24 on {LB_CLIENT_IFACE} (ip_forward=1, rp_filter=0; the VIP is on no interface)\n",
            self.lb.name()
        );
        for b in &self.backends {
            s += &format!(
                "  backend ns {:<28} {}/24 on {NODE_IFACE} (LB side {} {}), tcp :{BACKEND_TCP_PORT} udp :{BACKEND_UDP_PORT}  [{}]\n",
                b.ns.name(),
                b.addr,
                b.lb_iface,
                b.lb_addr,
                b.name
            );
        }
        s += &format!(
            "  services: {VIP}:{TCP_PORT}/tcp and {VIP}:{UDP_PORT}/udp, XDP on {}\n",
            self.lb_interfaces().join(", ")
        );
        s
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Servers first (their threads hold sockets in the namespaces), then
        // the namespaces: fields drop in declaration order after this.
        for b in &mut self.backends {
            b.servers.take();
        }
        // The bpffs an agent mounted for its pins, before the namespaces go
        // (the scratch directory would, but only after them). Agents are
        // gone by now: an `Agent` is declared after its topology, so it
        // drops first. Unmounting releases whatever a killed agent left
        // pinned, XDP links included.
        if let Err(e) = self.dir.unmount_bpffs() {
            eprintln!("warning: {e}");
        }
    }
}

/// Parse `ip -d link show` output into (interface, XDP kind) pairs. The
/// kind is the word iproute2 puts after the MTU on a link's first line:
/// `xdp` (native), `xdpgeneric`, `xdpoffload` or `xdpmulti`. (The detail
/// line says `prog/xdp` for native and generic alike.)
pub fn xdp_attachments(links: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in links.lines() {
        // "5: lb-c@if2: <BROADCAST,...,UP> mtu 1500 xdpgeneric qdisc noqueue ..."
        let Some((head, flags_and_rest)) = line.split_once(": <") else { continue };
        let Some((_, name)) = head.split_once(": ") else { continue };
        let Some((_, rest)) = flags_and_rest.split_once("> ") else { continue };
        let mut words = rest.split_whitespace();
        if words.next() != Some("mtu") {
            continue;
        }
        let _mtu = words.next();
        if let Some(kind) = words.next().filter(|w| w.starts_with("xdp")) {
            out.push((name.split('@').next().unwrap_or(name).to_owned(), kind.to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_attachments_are_parsed() {
        let links = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN\n\
            5: lb-c@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 xdp qdisc noqueue state UP\n    \
            link/ether 7a:43:3b:72:46:db brd ff:ff:ff:ff:ff:ff link-netns lbt-1-0-client\n    \
            veth addrgenmode eui64 numtxqueues 2\n    \
            prog/xdp id 111 name xdp_lb tag 705eb8db199d368c jited\n\
            6: lb-b1@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 9000 xdpgeneric qdisc noqueue\n    \
            prog/xdp id 111 name xdp_lb tag 705eb8db199d368c jited\n\
            7: lb-b2@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue\n";
        assert_eq!(
            xdp_attachments(links),
            vec![("lb-c".to_owned(), "xdp".to_owned()), ("lb-b1".to_owned(), "xdpgeneric".to_owned())]
        );
    }
}
