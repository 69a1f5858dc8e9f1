//! A SYN flood must not cost an established flow (issue 9 item 1), end to
//! end: held TCP connections through the load balancer, a bounded flood of
//! spoofed-source SYNs from the client namespace that fills a deliberately
//! small connection table many times over, then every held connection must
//! still echo.
//!
//! Needs root and a built agent: `cargo build --release -p lb-agent -p
//! lb-backend --bins && cargo test -p lb-tests --release --test e2e_flood --
//! --test-threads=1` (`cargo xtask test` does both).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{Conn, FlowKey, ABI_VERSION, CONNTRACK};
use lb_lab::{
    packet::{tcp_frame, Ipv4, Tcp, IPPROTO_TCP, TCP_SYN},
    require_root,
    topology::{Conn as Held, Options, Topology, TCP_PORT, VIP},
};

/// Connections held through the flood.
const HELD: usize = 300;
/// The connection table's size for this test: the flood fills it many
/// times over.
const MAX_FLOWS: u32 = 4096;
const FLOOD: Duration = Duration::from_secs(4);

/// The number of entries in the agent's pinned connection table.
fn table_fill(topo: &Topology) -> u64 {
    let path = topo.pin_dir().join(format!("v{ABI_VERSION}")).join("maps").join(CONNTRACK);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let map: HashMap<MapData, FlowKey, Conn> =
        Map::LruHashMap(data).try_into().expect("the connection table is an LRU hash of FlowKey -> Conn");
    map.keys().filter(Result::is_ok).count() as u64
}

/// SYNs from spoofed sources (10.201.0.0/16, ports from 1024) to the VIP,
/// through a raw socket in the client namespace, for `duration`. Returns
/// the SYNs the kernel took.
fn flood(topo: &Topology, duration: Duration) -> u64 {
    topo.client.run(move || {
        // SAFETY: plain socket call; IPPROTO_RAW implies IP_HDRINCL.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from(VIP).to_be() },
            sin_zero: [0; 8],
        };
        let (mut sent, mut i) = (0u64, 0u32);
        let started = Instant::now();
        while started.elapsed() < duration {
            for _ in 0..256 {
                i = i.wrapping_add(1);
                let src = Ipv4Addr::from(0x0ac9_0000 | (i & 0xffff));
                let sport = 1024 + (i >> 16) as u16;
                let frame =
                    tcp_frame(([0; 6], [0; 6]), &Ipv4::new(src, VIP, IPPROTO_TCP), &Tcp::new(sport, TCP_PORT, TCP_SYN));
                let packet = &frame[14..];
                // SAFETY: valid buffer and address of the sizes passed.
                let n = unsafe {
                    libc::sendto(
                        fd,
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        std::ptr::addr_of!(dst).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    )
                };
                if n > 0 {
                    sent += 1;
                }
            }
        }
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        sent
    })
}

#[test]
fn root_a_syn_flood_costs_no_established_connection() {
    require_root!("root_a_syn_flood_costs_no_established_connection");
    let topo = Topology::build(Options::with_backends(&["web-1", "web-2"]));
    let members = [("web-1", 1), ("web-2", 1)];
    topo.write_raw_config(&format!("{}\n[dataplane]\nmax_flows = {MAX_FLOWS}\n", topo.config_toml(&members)));
    let mut agent = topo.start_agent();

    let vip = topo.vip_tcp();
    let mut held: Vec<Held> = topo
        .client
        .run(move || (0..HELD).map(|i| Held::open(vip).unwrap_or_else(|e| panic!("connection {i}: {e}"))).collect());
    for (i, c) in held.iter_mut().enumerate() {
        c.echo(&format!("before {i}")).unwrap_or_else(|e| panic!("connection {i} before the flood: {e}"));
    }
    // Idle for a moment, then the flood.
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let sent = flood(&topo, FLOOD);
    let took = started.elapsed();
    let fill = table_fill(&topo);

    let mut kept = 0;
    let mut failures = Vec::new();
    for (i, c) in held.iter_mut().enumerate() {
        match c.echo(&format!("after {i}")) {
            Ok(_) => kept += 1,
            Err(e) => failures.push(format!("connection {i} ({}): {e}", c.local)),
        }
    }
    println!(
        "MEASURED: flood: {sent} spoofed SYNs in {took:.1?} ({:.0}/s); table fill after it: {fill} of {MAX_FLOWS}; \
         connections kept: {kept} of {HELD}",
        sent as f64 / took.as_secs_f64()
    );
    assert!(sent > u64::from(MAX_FLOWS) * 4, "the flood ({sent} SYNs) did not churn the table of {MAX_FLOWS}");
    assert!(fill * 10 >= u64::from(MAX_FLOWS) * 9, "the flood did not fill the table: {fill} of {MAX_FLOWS}");
    assert!(
        failures.is_empty(),
        "held connections broke:\n{}\nagent log:\n{}",
        failures.join("\n"),
        agent.log_tail(40)
    );
    let status = agent.stop().expect("agent exit status");
    assert!(status.success(), "lb-agent exited with {status}");
}
