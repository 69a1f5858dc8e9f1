//! Path MTU discovery through the load balancer: a router on the client's
//! path with a smaller MTU than the client's own link, and a download large
//! enough to need full-sized segments.
//!
//! ```text
//!  far ns                   router ns (the topology's client ns)         LB ns        backend ns
//!  10.201.0.2 [to-r] ==== [r-far] 10.201.0.1   10.200.0.2 [to-lb] ==== [lb-c] ... [lb-b1] ==== web-1
//!  MTU 1500               MTU 1280
//! ```
//!
//! The far client's MSS is 1460 (its own link is 1500), so the backend sends
//! 1500-byte segments; the router cannot pass them on toward the client and
//! answers the reply's source, the VIP, with ICMP "fragmentation needed"
//! (MTU 1280). Only when the load balancer sends that error on to the
//! backend, translated, does the backend lower its segment size; else the
//! download stalls (a PMTU black hole). No namespace has a default route.
//!
//! Needs root and a built agent: `cargo build --release -p lb-agent && cargo
//! test -p lb-tests --release --test e2e_pmtu -- --test-threads=1`.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use lb_lab::{
    netns::NetNs,
    require_root,
    topology::{Options, Topology, CLIENT_ADDR, VIP},
};

const ROUTER_FAR_IFACE: &str = "r-far";
const FAR_IFACE: &str = "to-r";
const ROUTER_FAR_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const FAR_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const FAR_NET: &str = "10.201.0.0/24";
/// The router's link toward the client: less than the 1500 everywhere else.
const NARROW_MTU: &str = "1280";
/// What the backend sends: far more than fits in the socket buffers, so
/// full-sized segments must cross the narrow link.
const DOWNLOAD: usize = 1 << 20;
/// Over a veth a megabyte takes milliseconds; a black hole never finishes.
const DEADLINE: Duration = Duration::from_secs(5);

/// The topology's client namespace as a router toward a new namespace with
/// the far client, and the routes for the far client's subnet.
fn add_far_client(topo: &Topology) -> NetNs {
    let far = NetNs::create(&format!("{}-far", topo.prefix)).expect("create the far client's namespace");
    let router = &topo.client;
    router
        .exec("ip", &["link", "add", ROUTER_FAR_IFACE, "type", "veth", "peer", "name", FAR_IFACE, "netns", far.name()]);
    router.exec("ip", &["link", "set", ROUTER_FAR_IFACE, "mtu", NARROW_MTU]);
    router.exec("ip", &["addr", "add", &format!("{ROUTER_FAR_ADDR}/24"), "dev", ROUTER_FAR_IFACE]);
    router.exec("ip", &["link", "set", ROUTER_FAR_IFACE, "up"]);
    router.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    far.exec("ip", &["addr", "add", &format!("{FAR_ADDR}/24"), "dev", FAR_IFACE]);
    far.exec("ip", &["link", "set", FAR_IFACE, "up"]);
    // Only the VIP goes via the router.
    far.exec("ip", &["route", "add", &format!("{VIP}/32"), "via", &ROUTER_FAR_ADDR.to_string()]);
    topo.lb.exec("ip", &["route", "add", FAR_NET, "via", &CLIENT_ADDR.to_string()]);
    for b in &topo.backends {
        b.ns.exec("ip", &["route", "add", FAR_NET, "via", &b.lb_addr.to_string()]);
    }
    far
}

/// In `ns`: accept one connection on `addr`, send `DOWNLOAD` bytes, close.
fn serve_download(ns: &NetNs, addr: SocketAddrV4) -> thread::JoinHandle<Result<(), String>> {
    let listener = ns.run(move || TcpListener::bind(addr)).expect("bind the download server");
    ns.spawn(move || {
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let until = Instant::now() + 2 * DEADLINE;
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < until => {
                    thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
        stream.set_write_timeout(Some(2 * DEADLINE)).map_err(|e| e.to_string())?;
        stream.write_all(&vec![0x5a; DOWNLOAD]).map_err(|e| format!("send: {e}"))
    })
}

/// From `ns`: connect to `addr` and read until the server closes or the
/// deadline passes. Returns the bytes received and the time taken.
fn download(ns: &NetNs, addr: SocketAddrV4) -> (usize, Duration) {
    ns.run(move || {
        let start = Instant::now();
        let mut stream = TcpStream::connect_timeout(&addr.into(), DEADLINE).expect("connect to the VIP");
        let mut buf = vec![0; 64 << 10];
        let mut got = 0;
        while start.elapsed() < DEADLINE {
            stream
                .set_read_timeout(Some(DEADLINE.saturating_sub(start.elapsed()).max(Duration::from_millis(1))))
                .unwrap();
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => panic!("download from {addr}: {e} after {got} bytes"),
            }
        }
        (got, start.elapsed())
    })
}

fn pmtu_test(hook: Option<&'static str>) {
    let mut topo = Topology::build(Options { hook, ..Options::with_backends(&["web-1"]) });
    // The web service's backend port serves the download instead.
    topo.stop_backend("web-1");
    let server = serve_download(&topo.backend("web-1").ns, topo.backend("web-1").tcp_addr());
    topo.write_config_all();
    let agent = topo.start_agent();
    let far = add_far_client(&topo);

    let (got, took) = download(&far, topo.vip_tcp());
    assert_eq!(
        got,
        DOWNLOAD,
        "hook {hook:?}: the far client got {got} of {DOWNLOAD} bytes in {took:?} (a PMTU black hole?)\n\
         the router's route to the client: {}\nagent log:\n{}",
        topo.client.exec("ip", &["route", "get", &FAR_ADDR.to_string()]),
        agent.log_tail(30),
    );
    println!("hook {hook:?}: {DOWNLOAD} bytes through a 1280-byte hop in {took:?}");
    server.join().expect("download server thread").expect("download server");
    let reasons = agent.status()["reasons"].clone();
    let forwarded = reasons
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["reason"] == "icmp_forwarded")
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or(0);
    assert!(forwarded > 0, "hook {hook:?}: no ICMP error was forwarded; reasons: {reasons}");
}

/// XDP on the load balancer's veths (as the other namespace tests).
#[test]
fn root_pmtu_discovery_through_the_vip_at_xdp() {
    require_root!("root_pmtu_discovery_through_the_vip_at_xdp");
    pmtu_test(Some("xdp"));
}

/// tc, which `auto` gives veths.
#[test]
fn root_pmtu_discovery_through_the_vip_at_tc() {
    require_root!("root_pmtu_discovery_through_the_vip_at_tc");
    pmtu_test(Some("tc"));
}
