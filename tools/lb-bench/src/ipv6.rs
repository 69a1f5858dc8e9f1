//! The IPv6 service and frames of the IPv6 cases.

use std::net::{Ipv6Addr, SocketAddrV6};

use lb_common::{
    snat,
    v6::{flow_hash6, ip6_raw},
    BENCH_FRAME_LEN,
};
use lb_lab::{
    packet::{
        ethernet, ip6ip6_encapsulated, pad_to, Addrs, Ipv6, Tcp, ETH_P_IPV6, IPPROTO_TCP, TCP_ACK, TCP_PSH, TCP_SYN,
    },
    testrun6::ServiceSpec6,
};

use crate::{DSR_BACKEND_MAC, DSR_IFACE_MAC, FULL_NAT_PORTS, LB_MAC, PEER_MAC};

pub const VIP: SocketAddrV6 = SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100), 80, 0, 0);
pub const CLIENT: SocketAddrV6 = SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10), 40000, 0, 0);
/// Where new flows come from: the wrapper overwrites two words of the
/// address per run, and 2001:db8:2::/48 keeps them clear of CLIENT.
const NEW_FLOW_CLIENTS: SocketAddrV6 = SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0), 1, 0, 0);

/// Four backends (ids 13-16, after the IPv4 services' 1-12), service id 3.
pub fn service() -> ServiceSpec6 {
    let backends: Vec<(u32, SocketAddrV6)> = (13..=16)
        .map(|i| (i, SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, i as u16), 8080, 0, 0)))
        .collect();
    ServiceSpec6::new(3, VIP, IPPROTO_TCP, 0, &backends)
}

/// A TCP frame over IPv6, padded to `BENCH_FRAME_LEN`.
pub fn frame(src: SocketAddrV6, dst: SocketAddrV6, flags: u8, payload: &[u8]) -> Vec<u8> {
    let seg = Tcp::new(src.port(), dst.port(), flags).with_payload(payload).build(Addrs::V6(*src.ip(), *dst.ip()));
    let f = ethernet(LB_MAC, PEER_MAC, ETH_P_IPV6, &Ipv6::new(*src.ip(), *dst.ip(), IPPROTO_TCP).build(&seg));
    pad_to(f, BENCH_FRAME_LEN)
}

pub fn established() -> Vec<u8> {
    frame(CLIENT, VIP, TCP_ACK | TCP_PSH, b"bench")
}

/// `established()` as it leaves: to the backend the table names.
pub fn established_out() -> Vec<u8> {
    let (_, backend) = service().pick(CLIENT).expect("the table names a backend");
    frame(CLIENT, backend, TCP_ACK | TCP_PSH, b"bench")
}

pub fn new_flow_syn() -> Vec<u8> {
    frame(NEW_FLOW_CLIENTS, VIP, TCP_SYN, &[])
}

/// The `dsr-ipip` service: its packets leave inside an outer IPv6 header
/// from `DSR_SOURCE` to the backend, out of the IPv4 DSR cases' interface
/// (`crate::DSR_IFACE`), which also holds `DSR_SOURCE`/64 and neighbour
/// entries for the backends. Backend ids 17-20, service id 4.
pub const DSR_VIP: SocketAddrV6 = SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x102), 80, 0, 0);
pub const DSR_SOURCE: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xb, 0, 0, 0, 0, 0, 0xfe);

pub fn dsr_service() -> ServiceSpec6 {
    let backends: Vec<(u32, SocketAddrV6)> = (17..=20)
        .map(|i| (i, SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0xb, 0, 0, 0, 0, 0, i as u16), 80, 0, 0)))
        .collect();
    ServiceSpec6::new(4, DSR_VIP, IPPROTO_TCP, 0, &backends)
}

pub fn dsr_established() -> Vec<u8> {
    frame(CLIENT, DSR_VIP, TCP_ACK | TCP_PSH, b"bench")
}

/// `dsr_established()` as it leaves: encapsulated to the backend the
/// table names, its padding carried along.
pub fn dsr_established_out() -> Vec<u8> {
    let (_, backend) = dsr_service().pick(CLIENT).expect("the table names a backend");
    ip6ip6_encapsulated(&dsr_established(), (DSR_BACKEND_MAC, DSR_IFACE_MAC), DSR_SOURCE, *backend.ip())
}

pub fn dsr_new_flow_syn() -> Vec<u8> {
    frame(NEW_FLOW_CLIENTS, DSR_VIP, TCP_SYN, &[])
}

pub const FULL_NAT_VIP: SocketAddrV6 = SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x101), 80, 0, 0);
const FULL_NAT_SOURCE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 0xfe);

/// The IPv6 full-NAT service: four backends (ids 21-24), service id 5, sent
/// from `FULL_NAT_SOURCE` with ports from `FULL_NAT_PORTS`.
pub fn full_nat_service() -> ServiceSpec6 {
    let backends: Vec<(u32, SocketAddrV6)> = (21..=24)
        .map(|i| (i, SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, i as u16), 8080, 0, 0)))
        .collect();
    ServiceSpec6::new(5, FULL_NAT_VIP, IPPROTO_TCP, 0, &backends).full_nat(FULL_NAT_SOURCE)
}

pub fn full_nat_syn() -> Vec<u8> {
    frame(CLIENT, FULL_NAT_VIP, TCP_SYN, &[])
}

pub fn full_nat_established() -> Vec<u8> {
    frame(CLIENT, FULL_NAT_VIP, TCP_ACK | TCP_PSH, b"bench")
}

/// `full_nat_established()` as it leaves: from the first port CLIENT's
/// hash names (no claim holds it when that case runs) to its backend.
pub fn full_nat_established_out() -> Vec<u8> {
    let (_, backend) = full_nat_service().pick(CLIENT).expect("the table names a backend");
    let (c, v) = (CLIENT, FULL_NAT_VIP);
    let hash = flow_hash6(&ip6_raw(*c.ip()), &ip6_raw(*v.ip()), c.port().to_be(), v.port().to_be(), IPPROTO_TCP);
    let port = snat::candidate(hash, 0, FULL_NAT_PORTS.0, FULL_NAT_PORTS.1);
    frame(SocketAddrV6::new(FULL_NAT_SOURCE, port, 0, 0), backend, TCP_ACK | TCP_PSH, b"bench")
}

pub fn full_nat_new_flow_syn() -> Vec<u8> {
    frame(NEW_FLOW_CLIENTS, FULL_NAT_VIP, TCP_SYN, &[])
}
