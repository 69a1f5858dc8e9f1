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
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsFd as _, AsRawFd},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{
    command::run_cmd,
    netns::{set_thread_netns, NetNs},
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

/// [`NetNs::create`], panicking as the helpers here do.
fn create_netns(name: &str) -> NetNs {
    NetNs::create(name).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------
// Scratch directories

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn create(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(name);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("warning: remove {}: {e}", self.path.display());
        }
    }
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
    pub fn start(ns: &NetNs, name: &str, tcp: SocketAddrV4, udp: SocketAddrV4) -> BackendServers {
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

fn serve_tcp(addr: SocketAddrV4, name: &str, stop: Arc<AtomicBool>, ready: mpsc::Sender<Result<(), String>>) {
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

fn serve_udp(addr: SocketAddrV4, name: &str, stop: &AtomicBool, ready: mpsc::Sender<Result<(), String>>) {
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
    pub fn open(addr: SocketAddrV4) -> io::Result<Conn> {
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

fn read_line(reader: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = String::new();
    let n = reader.read_line(&mut line)?;
    if n == 0 || !line.ends_with('\n') {
        return Err(io::Error::new(ErrorKind::UnexpectedEof, format!("connection closed after {line:?}")));
    }
    line.pop();
    Ok(line)
}

/// One TCP request: connect, read the backend's name, close.
pub fn tcp_request(addr: SocketAddrV4) -> io::Result<(String, SocketAddr)> {
    let conn = Conn::open(addr)?;
    Ok((conn.backend, conn.local))
}

/// One UDP request: send a datagram to `addr`, return the answer (trimmed).
/// The socket is connected, so only an answer *from `addr`* counts.
pub fn udp_request(addr: SocketAddrV4) -> io::Result<String> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
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
}

impl Options {
    pub fn with_backends<S: AsRef<str>>(names: &[S]) -> Options {
        Options {
            backends: names.iter().map(|s| s.as_ref().to_owned()).collect(),
            mtu: None,
            node_tx_csum_offload: true,
            lb_tx_csum_offload: true,
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

/// Client ns ⇄ LB ns ⇄ backend namespaces, plus a directory for the config
/// and the agent's log. Dropping it stops the servers, deletes the
/// namespaces (and with them every veth) and the directory.
pub struct Topology {
    pub prefix: String,
    pub options: Options,
    pub backends: Vec<Backend>,
    pub client: NetNs,
    pub lb: NetNs,
    dir: TempDir,
}

impl Topology {
    /// Build the whole network and start every backend's servers. A failure
    /// half-way panics; the guards made so far clean up while unwinding.
    pub fn build(options: Options) -> Topology {
        assert!(options.backends.len() <= MAX_BACKEND_INDEX as usize, "too many backends");
        let prefix = unique_prefix();
        let dir = TempDir::create(&prefix);
        let bpf = dir.path().join(BPF_DIR);
        fs::create_dir(&bpf).unwrap_or_else(|e| panic!("create {}: {e}", bpf.display()));
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
        run_cmd(
            "ip",
            &[
                "link",
                "add",
                "name",
                lb_iface,
                "netns",
                self.lb.name(),
                "type",
                "veth",
                "peer",
                "name",
                NODE_IFACE,
                "netns",
                node.name(),
            ],
        );
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
        self.dir.path().join("lb.toml")
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
        if !self.options.node_tx_csum_offload {
            // Every sender computes its checksums in software, so the LB is
            // told it gets complete ones only (auto would take the veths for
            // local stacks that may send partial ones).
            for i in self.lb_interfaces() {
                out += &format!("\n[interface.{i:?}]\nchecksums = \"complete\"\n");
            }
        }
        out
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
        self.dir.path().join("api.sock")
    }

    /// Where the agent pins its maps and links: `<dir>/bpf/lb`. The agent
    /// mounts bpffs on `<dir>/bpf`; dropping the topology unmounts it.
    pub fn pin_dir(&self) -> PathBuf {
        self.dir.path().join(BPF_DIR).join("lb")
    }

    /// Arguments for an agent of this topology: the current config file,
    /// its own control socket and pin directory, no metrics server, the log
    /// in `agent.log`.
    pub fn agent_args(&self) -> AgentArgs {
        AgentArgs {
            config: self.config_path(),
            api_socket: self.api_socket(),
            metrics_address: None,
            pin_dir: Some(self.pin_dir()),
            keep_on_exit: false,
            log: self.dir.path().join("agent.log"),
        }
    }

    /// Start the agent (see [`Topology::agent_args`]) in the LB namespace and
    /// wait for "ready".
    pub fn start_agent(&self) -> Agent {
        self.start_agent_with(&self.agent_args())
    }

    /// Start an agent with `args` in the LB namespace and wait for "ready".
    pub fn start_agent_with(&self, args: &AgentArgs) -> Agent {
        let mut agent = Agent::spawn(self.lb.name(), args);
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
        // The bpffs an agent mounted for its pins, before the directory goes.
        // (Agents are gone by now: an `Agent` is declared after its topology,
        // so it drops first.) Unmounting releases whatever a killed agent
        // left pinned, XDP links included.
        unmount_bpffs(&self.dir.path().join(BPF_DIR));
    }
}

/// `<dir>/<BPF_DIR>` is where agents mount bpffs for their pins.
const BPF_DIR: &str = "bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: a zeroed statfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Unmount every bpffs mounted on `path` (a directory this topology made,
/// so whatever is mounted there an agent of ours mounted). Bounded: a few
/// stacked mounts at most.
fn unmount_bpffs(path: &Path) {
    for _ in 0..4 {
        if !is_bpffs(path) {
            return;
        }
        let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return };
        // SAFETY: a NUL-terminated path. MNT_DETACH: nothing holds files
        // open there, but a lazy unmount cannot fail on a straggler.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!("warning: umount {}: {}", path.display(), io::Error::last_os_error());
            return;
        }
    }
    eprintln!("warning: {} is still a bpffs after 4 unmounts", path.display());
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

// ---------------------------------------------------------------------------
// The agent

/// Where `lb-agent` is: `$LB_AGENT_BIN`, else next to (or one level above)
/// the running executable, i.e. `target/<profile>/lb-agent`.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LB_AGENT_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "LB_AGENT_BIN={} does not exist", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe has a parent");
    // Test binaries live in target/<profile>/deps, binaries in target/<profile>.
    for candidate in [dir.join("lb-agent"), dir.join("../lb-agent")] {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "lb-agent binary not found next to {} or in its parent directory. Build it first with \
         `cargo build --release -p lb-agent` (or run `cargo xtask test`, which does), or point \
         LB_AGENT_BIN at it.",
        exe.display()
    );
}

/// How to run one `lb-agent run`: the flags it gets and where its log goes.
/// [`Topology::agent_args`] gives every agent its own control socket and
/// pin directory inside the topology's scratch directory, so tests never
/// meet the system's defaults (`/run/lb-agent`, `/sys/fs/bpf/lb-agent`) or
/// each other.
#[derive(Clone, Debug)]
pub struct AgentArgs {
    pub config: PathBuf,
    pub api_socket: PathBuf,
    /// `None` passes `--metrics-address off`.
    pub metrics_address: Option<SocketAddr>,
    /// `None` passes `--no-pin`. The agent mounts bpffs on the directory's
    /// parent if it is not on one already.
    pub pin_dir: Option<PathBuf>,
    pub keep_on_exit: bool,
    /// stderr and stdout, appended to (a restarted agent adds to the log).
    pub log: PathBuf,
}

/// A running `lb-agent run` inside a namespace, with its output going to a
/// log file. Drop sends SIGTERM, waits up to 5 s, then SIGKILL. Only the
/// processes this guard spawned are ever signalled, by pid.
///
/// The agent enters only the namespace's *network* namespace (setns in the
/// child before exec, as `nsenter --net` does); it stays in the test's mount
/// namespace. `ip netns exec` would give it a private mount namespace, and
/// the bpffs it mounts for its pins would vanish with it, so a restarted
/// agent could never adopt them.
pub struct Agent {
    child: Child,
    ns: String,
    args: AgentArgs,
    /// Where this process's part of the log starts.
    log_start: usize,
    exited: Option<ExitStatus>,
}

impl Agent {
    /// Spawn the agent in `ns`'s network namespace. The child's pid is the
    /// agent's. Does not wait for anything.
    pub fn spawn(ns: &str, args: &AgentArgs) -> Agent {
        let (child, log_start) = spawn_agent_process(ns, args);
        Agent { child, ns: ns.to_owned(), args: args.clone(), log_start, exited: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn args(&self) -> &AgentArgs {
        &self.args
    }

    pub fn log_path(&self) -> &Path {
        &self.args.log
    }

    /// This process's log so far (not its predecessors'), without ANSI
    /// colour codes.
    pub fn log(&self) -> String {
        let all = fs::read(&self.args.log).unwrap_or_default();
        strip_ansi(&String::from_utf8_lossy(&all[self.log_start.min(all.len())..]))
    }

    /// The whole log file, every agent this guard started.
    pub fn full_log(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(&fs::read(&self.args.log).unwrap_or_default()))
    }

    /// Lines of the log whose message is `message` (matched as `": message"`
    /// or `" message "`-style at a word boundary).
    pub fn count(&self, message: &str) -> usize {
        self.log().lines().filter(|l| has_message(l, message)).count()
    }

    /// Has the process exited? Remembers the status.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Wait until `message` has appeared `n` times; panic (with the log) if
    /// the agent exits or `timeout` passes first.
    pub fn wait_for(&mut self, message: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count(message) >= n {
                return;
            }
            if let Some(status) = self.try_exit_status() {
                panic!("lb-agent exited ({status}) before logging {message:?}; its log:\n{}", self.log());
            }
            if Instant::now() >= deadline {
                panic!("lb-agent did not log {message:?} (x{n}) within {timeout:?}; its log:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_ready(&mut self) {
        self.wait_for("ready", 1, Duration::from_secs(20));
    }

    /// Run `change` (which rewrites the config file) and wait for the next
    /// "config applied"; panics if the agent logs "config refused" instead.
    pub fn reload_with(&mut self, change: impl FnOnce()) {
        let applied = self.count("config applied");
        let refused = self.count("config refused; keeping the running one");
        change();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.count("config applied") > applied {
                return;
            }
            if self.count("config refused; keeping the running one") > refused {
                panic!("lb-agent refused the new config; its log:\n{}", self.log());
            }
            if let Some(status) = self.try_exit_status() {
                panic!("lb-agent exited ({status}) during a reload; its log:\n{}", self.log());
            }
            if Instant::now() >= deadline {
                panic!("lb-agent did not log \"config applied\" within 10 s; its log:\n{}", self.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// XDP modes the agent reported, as (interface, "native" | "generic").
    pub fn modes(&self) -> Vec<(String, String)> {
        self.log()
            .lines()
            .filter(|l| has_message(l, "attached"))
            .filter_map(|l| Some((field(l, "interface")?, field(l, "mode")?)))
            .collect()
    }

    /// (interface, checksums) for each attach the agent logged: which of the
    /// two programs it chose ("complete" or "may-be-partial").
    pub fn checksum_modes(&self) -> Vec<(String, String)> {
        self.log()
            .lines()
            .filter(|l| has_message(l, "attached"))
            .filter_map(|l| Some((field(l, "interface")?, field(l, "checksums")?)))
            .collect()
    }

    /// Wait (bounded) for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_exit_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, wait up to 5 s, SIGKILL if needed; returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.try_exit_status() {
            return Some(s);
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped
        // (try_wait said it is still running), so the pid cannot be reused yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        if let Some(s) = self.wait_exit(Duration::from_secs(5)) {
            return Some(s);
        }
        eprintln!("warning: lb-agent (pid {pid}) ignored SIGTERM for 5 s; sending SIGKILL");
        self.kill()
    }

    /// SIGKILL now (a crash: nothing is cleaned up, pinned state stays) and
    /// reap; returns the exit status.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if let Some(s) = self.try_exit_status() {
            return Some(s);
        }
        // Child::kill is SIGKILL to this child's pid, which is not reaped yet.
        if let Err(e) = self.child.kill() {
            eprintln!("warning: SIGKILL lb-agent (pid {}): {e}", self.child.id());
        }
        self.exited = self.child.wait().ok();
        self.exited
    }

    /// Start a new agent with the same arguments (config, socket, pins) in
    /// place of this one, which must have exited (see [`Agent::kill`]).
    /// Does not wait for it to be ready; `log` and `count` now see only the
    /// new process's lines.
    pub fn respawn(&mut self) {
        assert!(self.try_exit_status().is_some(), "respawn: lb-agent (pid {}) is still running", self.child.id());
        let (child, log_start) = spawn_agent_process(&self.ns, &self.args);
        self.child = child;
        self.log_start = log_start;
        self.exited = None;
    }

    /// One request line on the control socket (a fresh connection); the
    /// answer parsed as JSON. `line` goes as it is, plus a newline. Panics if
    /// the agent does not answer within 5 s.
    pub fn api(&self, line: &str) -> serde_json::Value {
        let sock = &self.args.api_socket;
        let answer = api_call(sock, line).unwrap_or_else(|e| panic!("control socket {}: {e}", sock.display()));
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("unreadable answer {answer:?} to {line:.200}: {e}"))
    }

    /// [`Agent::api`] for a change that must be accepted.
    pub fn api_ok(&self, line: &str) -> serde_json::Value {
        let v = self.api(line);
        assert_eq!(v["ok"], true, "the agent refused {line}: {v}");
        v
    }

    /// The agent's status snapshot (what `lb-agent status --json` prints),
    /// straight from the control socket.
    pub fn status(&self) -> serde_json::Value {
        let mut v = self.api_ok(r#"{"op":"status"}"#);
        v["status"].take()
    }

    /// Run the `lb-agent` command line with `args` plus `--api-socket` of
    /// this agent (in the test's namespaces: the control socket is a path,
    /// reachable from any network namespace).
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        all.push("--api-socket".as_ref());
        all.push(self.args.api_socket.as_os_str());
        run_agent_cli(&all)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!(
                "---- lb-agent log ({}) ----\n{}---- end of lb-agent log ----",
                self.args.log.display(),
                self.full_log()
            );
        }
    }
}

fn spawn_agent_process(ns: &str, args: &AgentArgs) -> (Child, usize) {
    use std::os::unix::process::CommandExt as _;
    let bin = agent_bin();
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log)
        .unwrap_or_else(|e| panic!("open {}: {e}", args.log.display()));
    let log_start = log.metadata().map(|m| m.len() as usize).unwrap_or(0);
    let netns = NetNs::open(ns).unwrap_or_else(|e| panic!("{e}"));
    let netns_fd = netns.as_fd().try_clone_to_owned().expect("dup the namespace descriptor");
    let mut cmd = Command::new(&bin);
    cmd.arg("run").arg("--config").arg(&args.config).arg("--api-socket").arg(&args.api_socket);
    cmd.arg("--metrics-address").arg(args.metrics_address.map_or("off".to_owned(), |a| a.to_string()));
    match &args.pin_dir {
        Some(dir) => cmd.arg("--pin-dir").arg(dir),
        None => cmd.arg("--no-pin"),
    };
    if args.keep_on_exit {
        cmd.arg("--keep-on-exit");
    }
    cmd.env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log fd"))
        .stderr(log);
    // SAFETY: between fork and exec the child only calls setns(2), which is
    // async-signal-safe, on a descriptor the closure owns (O_CLOEXEC closes
    // it in the agent).
    unsafe {
        cmd.pre_exec(move || set_thread_netns(netns_fd.as_fd()));
    }
    let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {} in {ns}: {e}", bin.display()));
    (child, log_start)
}

/// What a run of the `lb-agent` command line printed.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Run `lb-agent <args>` (not `run`: it waits for the process to end, at
/// most 30 s, then SIGKILLs it and panics).
pub fn run_agent_cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> CliOutput {
    let bin = agent_bin();
    let mut child = Command::new(&bin)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let (mut out, mut err) = (child.stdout.take().expect("stdout"), child.stderr.take().expect("stderr"));
    let out_reader = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = io::Read::read_to_end(&mut out, &mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = Vec::new();
        let _ = io::Read::read_to_end(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for lb-agent") {
            break s;
        }
        if Instant::now() >= deadline {
            // Still unreaped, so the pid is still this child's.
            let _ = child.kill();
            let _ = child.wait();
            panic!("`lb-agent` CLI did not finish within 30 s");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().expect("stdout reader")).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().expect("stderr reader")).into_owned();
    CliOutput { status, stdout, stderr }
}

/// Send `line` (plus a newline) on a fresh connection to the control socket
/// and read one answer line; 5 s limits on each step.
pub fn api_call(socket: &Path, line: &str) -> io::Result<String> {
    api_call_within(socket, line, Duration::from_secs(5))
}

/// [`api_call`] with `limit` on each step (connect aside).
pub fn api_call_within(socket: &Path, line: &str, limit: Duration) -> io::Result<String> {
    use std::os::unix::net::UnixStream;
    let limit = Some(limit);
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(limit)?;
    stream.set_write_timeout(limit)?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    if !answer.ends_with('\n') {
        return Err(io::Error::new(ErrorKind::UnexpectedEof, format!("no whole answer line, got {answer:?}")));
    }
    answer.pop();
    Ok(answer)
}

fn has_message(line: &str, message: &str) -> bool {
    // tracing's fmt layout: "<time>  INFO <target>: <message> <k>=<v> ..."
    line.split_once(": ").is_some_and(|(_, rest)| {
        rest == message || rest.starts_with(&format!("{message} ")) || rest.contains(&format!(" {message} "))
    }) || line.ends_with(&format!(" {message}"))
}

/// The value of `key=value` in a tracing line (unquoted).
fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(|v| v.trim_matches('"').to_owned())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
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

    #[test]
    fn log_lines_are_matched_by_message() {
        let l = "2025-01-01T00:00:00.000000Z  INFO lb_agent::agent: ready config=/tmp/x/lb.toml";
        assert!(has_message(l, "ready"));
        assert!(!has_message(l, "config applied"));
        let a = "2025-01-01T00:00:00Z  INFO lb_agent::dataplane: attached interface=\"lb-c\" mode=native";
        assert!(has_message(a, "attached"));
        assert_eq!(field(a, "interface").as_deref(), Some("lb-c"));
        assert_eq!(field(a, "mode").as_deref(), Some("native"));
        assert_eq!(strip_ansi("\u{1b}[3mmode\u{1b}[0m\u{1b}[2m=\u{1b}[0mnative"), "mode=native");
    }
}
