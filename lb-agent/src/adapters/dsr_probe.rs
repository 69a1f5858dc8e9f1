//! The health probe of a `dsr-ipip` service: proof that a backend is set
//! up for direct server return before it gets traffic.
//!
//! A plain connect to the backend's address would pass on a backend with
//! no tunnel and no VIP. This probe takes the clients' path instead: a TCP
//! SYN to VIP:port, from this host, inside an outer IPv4 header to the
//! backend (a raw IPPROTO_IPIP socket: the kernel writes the outer header),
//! just as the data plane encapsulates clients' packets. Only a backend
//! that decapsulates it and holds the VIP answers, and it answers as it
//! answers clients: a SYN-ACK from VIP:port straight back, seen here on a
//! raw TCP socket. The kernel, which has no socket for it, answers that
//! SYN-ACK with a reset, so the backend keeps no half-open connection. A
//! reset from the VIP, or no answer within the check's timeout, fails with
//! "not set up for dsr-ipip: ...".
//!
//! The probe's source port is held by a bound TCP socket for the probe's
//! length, so no connection of this host can be mistaken for it.

use std::{
    io,
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, UdpSocket},
    time::{Duration, Instant},
};

use lb_common::{
    dsr6::PROTO_IPV6,
    refuse::{checksum, tcp_checksum},
    v6::{ip6_raw, pseudo_header_sum6},
    PROTO_IPIP, PROTO_TCP, TCP_ACK, TCP_RST, TCP_SYN,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Why a backend failed the tunnel probe.
#[derive(Debug, thiserror::Error)]
pub enum DsrProbeError {
    #[error("not set up for dsr-ipip: no answer from {vip} through the tunnel to {backend} within {limit:?} (run `lb-agent backend-setup --vip {}` there)", vip.ip())]
    NoAnswer { vip: SocketAddr, backend: IpAddr, limit: Duration },
    #[error("not set up for dsr-ipip: {vip} on {backend} answered through the tunnel with a reset (nothing listens on the VIP's port)")]
    Reset { vip: SocketAddr, backend: IpAddr },
    #[error("dsr-ipip probe to {backend}: {what}: {source}")]
    Io { backend: IpAddr, what: &'static str, source: io::Error },
}

impl DsrProbeError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, DsrProbeError::NoAnswer { .. })
    }
}

/// Probe `backend` through the tunnel for `vip` within `limit`. An IPv6
/// VIP goes in IPv6-in-IPv6 (a raw socket of next header 41), as the data
/// plane sends it (`lb_common::dsr6`).
pub async fn probe(backend: IpAddr, vip: SocketAddr, limit: Duration) -> Result<(), DsrProbeError> {
    tokio::task::spawn_blocking(move || probe_blocking(backend, vip, limit))
        .await
        .unwrap_or_else(|e| Err(DsrProbeError::Io { backend, what: "probe task", source: io::Error::other(e) }))
}

fn probe_blocking(backend: IpAddr, vip: SocketAddr, limit: Duration) -> Result<(), DsrProbeError> {
    let io = |what| move |source| DsrProbeError::Io { backend, what, source };
    if backend.is_ipv6() != vip.is_ipv6() {
        return Err(io("families")(io::Error::other(format!("backend {backend} and vip {vip} differ"))));
    }
    let deadline = Instant::now() + limit;
    // The address this host sends to the backend from: where the answer comes.
    let any: IpAddr = if backend.is_ipv6() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
    let route = UdpSocket::bind((any, 0)).and_then(|s| s.connect((backend, 9)).map(|_| s)).map_err(io("route"))?;
    let local = route.local_addr().map_err(io("route"))?.ip();
    let hold = TcpListener::bind((local, 0)).map_err(io("hold a source port"))?;
    let from = hold.local_addr().map_err(io("hold a source port"))?;
    drop(route);
    let domain = Domain::for_address(vip);
    let listen = Socket::new(domain, Type::RAW, Some(Protocol::TCP)).map_err(io("raw TCP socket"))?;
    let tunnel = if vip.is_ipv6() { PROTO_IPV6 } else { PROTO_IPIP };
    let send =
        Socket::new(domain, Type::RAW, Some(Protocol::from(i32::from(tunnel)))).map_err(io("raw tunnel socket"))?;
    let isn = probe_isn(from.port());
    let syn = match (from, vip) {
        (SocketAddr::V4(from), SocketAddr::V4(vip)) => syn_packet(from, vip, isn),
        (SocketAddr::V6(from), SocketAddr::V6(vip)) => syn_packet6(from, vip, isn),
        _ => return Err(io("families")(io::Error::other("the route's source is of another family"))),
    };
    send.send_to(&syn, &SockAddr::from(SocketAddr::new(backend, 0))).map_err(io("send the SYN"))?;
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(DsrProbeError::NoAnswer { vip, backend, limit });
        }
        listen.set_read_timeout(Some(left)).map_err(io("raw TCP socket"))?;
        let (n, peer) = match listen.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io("receive")(e)),
        };
        // SAFETY: recv_from initialised the first n bytes.
        let got: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
        let said = match (vip, peer.as_socket()) {
            (SocketAddr::V4(vip), _) => answer(&got, vip, from, isn),
            // A raw IPv6 socket reads no IP header: the source is the peer's.
            (SocketAddr::V6(_), Some(peer)) if peer.ip() == vip.ip() => answer_tcp(&got, vip.port(), from.port(), isn),
            _ => None,
        };
        match said {
            Some(Answer::SynAck) => return Ok(()),
            Some(Answer::Reset) => return Err(DsrProbeError::Reset { vip, backend }),
            None => {}
        }
    }
}

/// An initial sequence number that differs per probe.
fn probe_isn(port: u16) -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    nanos ^ u32::from(port).rotate_left(16)
}

/// The 16-bit words of a 20-byte header, as they sit in memory.
fn words(b: &[u8]) -> [u16; 10] {
    core::array::from_fn(|i| u16::from_ne_bytes([b[2 * i], b[2 * i + 1]]))
}

/// A 20-byte TCP SYN (checksum left 0) from port `from` to `to`.
fn syn_segment(from: u16, to: u16, isn: u32) -> [u8; 20] {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&from.to_be_bytes());
    tcp[2..4].copy_from_slice(&to.to_be_bytes());
    tcp[4..8].copy_from_slice(&isn.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_SYN;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp
}

/// The inner packet: an IPv4 header and a 20-byte TCP SYN from `from` to
/// `vip` with sequence number `isn`.
pub fn syn_packet(from: SocketAddrV4, vip: SocketAddrV4, isn: u32) -> Vec<u8> {
    let (src, dst) = (from.ip().octets(), vip.ip().octets());
    let mut ip = [0u8; 20];
    ip[..10].copy_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, PROTO_TCP]);
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let mut tcp = syn_segment(from.port(), vip.port(), isn);
    let ip_check = checksum(&words(&ip), 0);
    ip[10..12].copy_from_slice(&ip_check.to_ne_bytes());
    let tcp_check = tcp_checksum(u32::from_ne_bytes(src), u32::from_ne_bytes(dst), &words(&tcp));
    tcp[16..18].copy_from_slice(&tcp_check.to_ne_bytes());
    [ip, tcp].concat()
}

/// The inner packet for an IPv6 VIP: a fixed IPv6 header and the same SYN.
pub fn syn_packet6(from: SocketAddrV6, vip: SocketAddrV6, isn: u32) -> Vec<u8> {
    let mut ip = [0u8; 40];
    ip[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 20, PROTO_TCP, 64]);
    ip[8..24].copy_from_slice(&from.ip().octets());
    ip[24..40].copy_from_slice(&vip.ip().octets());
    let mut tcp = syn_segment(from.port(), vip.port(), isn);
    let pseudo = pseudo_header_sum6(&ip6_raw(*from.ip()), &ip6_raw(*vip.ip()), PROTO_TCP, 20);
    let tcp_check = checksum(&words(&tcp), pseudo);
    tcp[16..18].copy_from_slice(&tcp_check.to_ne_bytes());
    [&ip[..], &tcp].concat()
}

#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    SynAck,
    Reset,
}

/// What `packet` (IPv4, as a raw TCP socket reads it) says about the probe
/// from `from` to `vip` with sequence number `isn`, if it is its answer.
pub fn answer(packet: &[u8], vip: SocketAddrV4, from: SocketAddr, isn: u32) -> Option<Answer> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    let tcp = packet.get(ihl..)?;
    let addr = |at: usize| IpAddr::from([packet[at], packet[at + 1], packet[at + 2], packet[at + 3]]);
    if packet.len() < 20 || packet[9] != PROTO_TCP || addr(12) != IpAddr::V4(*vip.ip()) || addr(16) != from.ip() {
        return None;
    }
    answer_tcp(tcp, vip.port(), from.port(), isn)
}

/// What a TCP segment from the VIP says about the probe from port `from`
/// to port `vip_port` with sequence number `isn`, if it is its answer.
pub fn answer_tcp(tcp: &[u8], vip_port: u16, from: u16, isn: u32) -> Option<Answer> {
    let tcp = tcp.get(..20)?;
    let port = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    let ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
    if port(0) != vip_port || port(2) != from || ack != isn.wrapping_add(1) {
        return None;
    }
    match tcp[13] {
        f if f & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK => Some(Answer::SynAck),
        f if f & TCP_RST != 0 => Some(Answer::Reset),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FROM: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 254), 41000);
    const FROM_ANY: SocketAddr = SocketAddr::V4(FROM);
    const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 10), 80);

    fn sum(bytes: &[u8]) -> u32 {
        let mut s: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s
    }

    #[test]
    fn the_probe_syn_is_a_valid_tcp_syn_to_the_vip() {
        let p = syn_packet(FROM, VIP, 7);
        assert_eq!(p.len(), 40);
        assert_eq!(sum(&p[..20]), 0xffff, "IPv4 header checksum");
        let mut pseudo = [&FROM.ip().octets()[..], &VIP.ip().octets(), &[0, PROTO_TCP, 0, 20]].concat();
        pseudo.extend(&p[20..]);
        assert_eq!(sum(&pseudo), 0xffff, "TCP checksum");
        assert_eq!(&p[16..20], &[10, 0, 0, 10]);
        assert_eq!((u16::from_be_bytes([p[22], p[23]]), p[33]), (80, TCP_SYN));
    }

    #[test]
    fn the_ipv6_probe_syn_is_a_valid_tcp_syn_to_the_vip() {
        let from: SocketAddrV6 = "[2001:db8::fe]:41000".parse().unwrap();
        let vip: SocketAddrV6 = "[2001:db8::10]:80".parse().unwrap();
        let p = syn_packet6(from, vip, 7);
        assert_eq!(p.len(), 60);
        assert_eq!(&p[..8], &[0x60, 0, 0, 0, 0, 20, PROTO_TCP, 64]);
        assert_eq!(&p[24..40], &vip.ip().octets());
        let mut pseudo = [&from.ip().octets()[..], &vip.ip().octets(), &[0, 0, 0, 20, 0, 0, 0, PROTO_TCP]].concat();
        pseudo.extend(&p[40..]);
        assert_eq!(sum(&pseudo), 0xffff, "TCP checksum over the IPv6 pseudo-header");
        assert_eq!((u16::from_be_bytes([p[42], p[43]]), p[53]), (80, TCP_SYN));
        // Its answer as a raw IPv6 socket reads it: the TCP segment alone.
        let mut ack = syn_segment(80, 41000, 99);
        ack[8..12].copy_from_slice(&8u32.to_be_bytes());
        ack[13] = TCP_SYN | TCP_ACK;
        assert_eq!(answer_tcp(&ack, 80, 41000, 7), Some(Answer::SynAck));
        assert_eq!(answer_tcp(&ack, 80, 41001, 7), None, "another probe's port");
    }

    /// The backend's answer: from VIP:port to the probe, acknowledging isn + 1.
    fn reply(flags: u8, ack: u32, from: Ipv4Addr) -> Vec<u8> {
        let mut p = syn_packet(SocketAddrV4::new(from, VIP.port()), FROM, 99);
        p[20 + 8..20 + 12].copy_from_slice(&ack.to_be_bytes());
        p[33] = flags;
        p
    }

    #[test]
    fn only_the_answer_to_this_probe_counts() {
        assert_eq!(answer(&reply(TCP_SYN | TCP_ACK, 8, *VIP.ip()), VIP, FROM_ANY, 7), Some(Answer::SynAck));
        assert_eq!(answer(&reply(TCP_RST | TCP_ACK, 8, *VIP.ip()), VIP, FROM_ANY, 7), Some(Answer::Reset));
        assert_eq!(answer(&reply(TCP_SYN | TCP_ACK, 9, *VIP.ip()), VIP, FROM_ANY, 7), None, "another probe's");
        assert_eq!(
            answer(&reply(TCP_SYN | TCP_ACK, 8, Ipv4Addr::new(10, 1, 0, 1)), VIP, FROM_ANY, 7),
            None,
            "not from the VIP"
        );
        assert_eq!(answer(&reply(TCP_ACK, 8, *VIP.ip()), VIP, FROM_ANY, 7), None);
        assert_eq!(answer(&[0x45, 0, 0], VIP, FROM_ANY, 7), None, "short");
    }
}
