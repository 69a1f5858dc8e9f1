//! The health probe of a `dsr-ipip` service: proof that a backend is set
//! up for direct server return before it gets traffic.
//!
//! A plain connect to the backend's address would pass on a backend with
//! no tunnel and no VIP. This probe takes the clients' path instead: a
//! packet to the VIP, from this host, inside an outer IPv4 header to the
//! backend (a raw IPPROTO_IPIP socket: the kernel writes the outer header;
//! IPv6-in-IPv6 for an IPv6 VIP), just as the data plane encapsulates
//! clients' packets. Only a backend that decapsulates it and holds the VIP
//! answers, and it answers from the VIP straight back, seen here on a raw
//! socket of the inner protocol. No answer within the check's timeout
//! fails with "not set up for dsr-ipip: ...". What goes inside follows the
//! service's protocol:
//!
//! - TCP: a SYN to VIP:port, which the backend answers as it answers
//!   clients, with a SYN-ACK from VIP:port. The kernel here, which has no
//!   socket for it, answers that SYN-ACK with a reset, so the backend keeps
//!   no half-open connection. A reset from the VIP fails the probe too.
//!   The SYN's source port is held by a bound TCP socket for the probe's
//!   length, so no connection of this host can be mistaken for it.
//! - UDP: an ICMP echo request (ICMPv6 for an IPv6 VIP) to the VIP. A
//!   datagram has no handshake that proves anything without speaking the
//!   application's protocol; the backend's kernel answers the echo from the
//!   VIP whatever runs there. The reply is told apart by its identifier
//!   (this process) and sequence number (this probe). Whether the
//!   application serves is left to the check's own kind
//!   (`adapters::probe`).

use std::{
    fmt, io,
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use lb_common::{
    csum::pseudo_header_sum,
    dsr6::PROTO_IPV6,
    refuse::checksum,
    v6::{ip6_raw, pseudo_header_sum6},
    PROTO_ICMP, PROTO_IPIP, PROTO_TCP, TCP_ACK, TCP_RST, TCP_SYN,
};
use socket2::{Domain, Protocol as RawProtocol, SockAddr, Socket, Type};

use crate::config::{Protocol, Tunnel};

/// ICMPv6's next header number.
const PROTO_ICMPV6: u8 = 58;

/// Why a backend failed the tunnel probe.
#[derive(Debug, thiserror::Error)]
pub enum DsrProbeError {
    #[error("not set up for dsr-ipip: no answer from {asked} through the tunnel to {backend} within {limit:?} (run `lb-agent backend-setup --vip {}` there)", asked.vip())]
    NoAnswer { asked: Asked, backend: IpAddr, limit: Duration },
    #[error("not set up for dsr-ipip: {asked} on {backend} answered through the tunnel with a reset (nothing listens on the VIP's port)")]
    Reset { asked: Asked, backend: IpAddr },
    #[error("dsr-ipip probe to {backend}: {what}: {source}")]
    Io { backend: IpAddr, what: &'static str, source: io::Error },
}

impl DsrProbeError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, DsrProbeError::NoAnswer { .. })
    }
}

/// What a probe sends the VIP through the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asked {
    /// A TCP SYN to VIP:port (a TCP service).
    Syn(SocketAddr),
    /// An ICMP echo request to the VIP (a UDP service).
    Echo(IpAddr),
}

impl Asked {
    pub fn vip(self) -> IpAddr {
        match self {
            Asked::Syn(vip) => vip.ip(),
            Asked::Echo(vip) => vip,
        }
    }
}

impl From<Tunnel> for Asked {
    fn from(t: Tunnel) -> Asked {
        match t.protocol {
            Protocol::Tcp => Asked::Syn(t.vip),
            Protocol::Udp => Asked::Echo(t.vip.ip()),
        }
    }
}

impl fmt::Display for Asked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Asked::Syn(vip) => write!(f, "{vip}"),
            Asked::Echo(vip) => write!(f, "{vip} to an ICMP echo"),
        }
    }
}

/// Probe `backend` through the tunnel for `tunnel`'s VIP within `limit`.
/// An IPv6 VIP goes in IPv6-in-IPv6 (a raw socket of next header 41), as
/// the data plane sends it (`lb_common::dsr6`).
pub async fn probe(backend: IpAddr, tunnel: Tunnel, limit: Duration) -> Result<(), DsrProbeError> {
    let asked = Asked::from(tunnel);
    tokio::task::spawn_blocking(move || probe_blocking(backend, asked, limit))
        .await
        .unwrap_or_else(|e| Err(DsrProbeError::Io { backend, what: "probe task", source: io::Error::other(e) }))
}

fn probe_blocking(backend: IpAddr, asked: Asked, limit: Duration) -> Result<(), DsrProbeError> {
    let io = |what| move |source| DsrProbeError::Io { backend, what, source };
    let vip = asked.vip();
    if backend.is_ipv6() != vip.is_ipv6() {
        return Err(io("families")(io::Error::other(format!("backend {backend} and vip {vip} differ"))));
    }
    let deadline = Instant::now() + limit;
    let local = route_source(backend).map_err(io("route"))?;
    let answer = match asked {
        Asked::Syn(vip) => {
            let hold = TcpListener::bind((local, 0)).map_err(io("hold a source port"))?;
            let from = hold.local_addr().map_err(io("hold a source port"))?;
            let isn = probe_isn(from.port());
            let exchange = Exchange::open(backend, vip.ip(), local, PROTO_TCP).map_err(io("raw sockets"))?;
            exchange.send(&syn_packet(from, vip, isn).map_err(io("families"))?).map_err(io("send the SYN"))?;
            exchange.wait(deadline, |tcp| answer_tcp(tcp, vip.port(), from.port(), isn)).map_err(io("receive"))?
        }
        Asked::Echo(vip) => {
            let (id, seq) = echo_ids();
            let exchange = Exchange::open(backend, vip, local, echo_kind(vip).proto).map_err(io("raw sockets"))?;
            exchange.send(&echo_packet(local, vip, id, seq).map_err(io("families"))?).map_err(io("send the echo"))?;
            let reply = |icmp: &[u8]| is_echo_reply(icmp, vip, id, seq).then_some(Answer::EchoReply);
            exchange.wait(deadline, reply).map_err(io("receive"))?
        }
    };
    match answer {
        Some(Answer::SynAck | Answer::EchoReply) => Ok(()),
        Some(Answer::Reset) => Err(DsrProbeError::Reset { asked, backend }),
        None => Err(DsrProbeError::NoAnswer { asked, backend, limit }),
    }
}

/// The address this host sends to `backend` from: where the answer comes.
fn route_source(backend: IpAddr) -> io::Result<IpAddr> {
    let any: IpAddr = if backend.is_ipv6() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
    let route = UdpSocket::bind((any, 0))?;
    route.connect((backend, 9))?;
    Ok(route.local_addr()?.ip())
}

/// A probe's two raw sockets: one of the tunnel's protocol, whose packets
/// the kernel puts inside an outer header to the backend, and one of the
/// inner protocol, where the VIP's answer comes.
struct Exchange {
    backend: IpAddr,
    vip: IpAddr,
    /// This host's source towards the backend, where the answer goes.
    local: IpAddr,
    /// The inner protocol.
    proto: u8,
    send: Socket,
    listen: Socket,
}

impl Exchange {
    fn open(backend: IpAddr, vip: IpAddr, local: IpAddr, proto: u8) -> io::Result<Exchange> {
        let domain = Domain::for_address(SocketAddr::new(vip, 0));
        let listen = Socket::new(domain, Type::RAW, Some(RawProtocol::from(i32::from(proto))))?;
        let tunnel = if vip.is_ipv6() { PROTO_IPV6 } else { PROTO_IPIP };
        let send = Socket::new(domain, Type::RAW, Some(RawProtocol::from(i32::from(tunnel))))?;
        Ok(Exchange { backend, vip, local, proto, send, listen })
    }

    /// Send `inner` (an IP packet to the VIP) inside the outer header.
    fn send(&self, inner: &[u8]) -> io::Result<()> {
        self.send.send_to(inner, &SockAddr::from(SocketAddr::new(self.backend, 0))).map(drop)
    }

    /// The first answer `is_answer` finds in what comes from the VIP (the
    /// inner protocol's bytes), or none by `deadline`.
    fn wait(
        &self,
        deadline: Instant,
        mut is_answer: impl FnMut(&[u8]) -> Option<Answer>,
    ) -> io::Result<Option<Answer>> {
        let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            // Under a microsecond would become a timeval of 0: no timeout.
            self.listen.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let (n, peer) = match self.listen.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            // SAFETY: recv_from initialised the first n bytes.
            let got: Vec<u8> = buf[..n].iter().map(|b| unsafe { b.assume_init() }).collect();
            let peer = peer.as_socket().map(|p| p.ip());
            if let Some(answer) = from_vip(&got, peer, self.proto, self.vip, self.local).and_then(&mut is_answer) {
                return Ok(Some(answer));
            }
        }
    }
}

/// The inner protocol's bytes of `packet`, as a raw socket of `proto` read
/// it from `peer`, if it came from `vip` to `local`. A raw IPv4 socket
/// reads the IP header too; a raw IPv6 socket reads none: the source is
/// the peer's.
pub fn from_vip(packet: &[u8], peer: Option<IpAddr>, proto: u8, vip: IpAddr, local: IpAddr) -> Option<&[u8]> {
    if vip.is_ipv6() {
        return (peer == Some(vip)).then_some(packet);
    }
    let addr = |at: usize| packet.get(at..at + 4).and_then(|a| <[u8; 4]>::try_from(a).ok()).map(IpAddr::from);
    if packet.get(9) != Some(&proto) || addr(12)? != vip || addr(16)? != local {
        return None;
    }
    packet.get(usize::from(packet[0] & 0x0f) * 4..)
}

/// An initial sequence number that differs per probe.
fn probe_isn(port: u16) -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    nanos ^ u32::from(port).rotate_left(16)
}

/// The 16-bit words of up to 20 bytes, as they sit in memory, then zeros
/// (which add nothing to a checksum).
fn words(b: &[u8]) -> [u16; 10] {
    debug_assert!(b.len() <= 20, "{} bytes", b.len());
    let byte = |i: usize| b.get(i).copied().unwrap_or(0);
    core::array::from_fn(|i| u16::from_ne_bytes([byte(2 * i), byte(2 * i + 1)]))
}

/// An inner packet from `from` to `vip`: an IPv4 or IPv6 header, then
/// `l4` (at most 20 bytes of protocol `proto`) with its checksum, at
/// `check_at`, filled in.
fn inner_packet(from: IpAddr, vip: IpAddr, proto: u8, mut l4: Vec<u8>, check_at: usize) -> io::Result<Vec<u8>> {
    let len = l4.len() as u16;
    let (ip, pseudo) = match (from, vip) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut ip = [0u8; 20];
            ip[..10].copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto]);
            ip[2..4].copy_from_slice(&(20 + len).to_be_bytes());
            ip[12..16].copy_from_slice(&src.octets());
            ip[16..20].copy_from_slice(&dst.octets());
            let ip_check = checksum(&words(&ip), 0);
            ip[10..12].copy_from_slice(&ip_check.to_ne_bytes());
            let (src_be, dst_be) = (u32::from_ne_bytes(src.octets()), u32::from_ne_bytes(dst.octets()));
            // ICMP sums its message alone; TCP and UDP add a pseudo-header.
            let pseudo = if proto == PROTO_ICMP { 0 } else { pseudo_header_sum(src_be, dst_be, proto, len) };
            (ip.to_vec(), pseudo)
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut ip = [0u8; 40];
            ip[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 0, proto, 64]);
            ip[4..6].copy_from_slice(&len.to_be_bytes());
            ip[8..24].copy_from_slice(&src.octets());
            ip[24..40].copy_from_slice(&dst.octets());
            (ip.to_vec(), pseudo_header_sum6(&ip6_raw(src), &ip6_raw(dst), proto, len))
        }
        _ => return Err(io::Error::other(format!("source {from} and vip {vip} differ in family"))),
    };
    let l4_check = checksum(&words(&l4), pseudo);
    l4[check_at..check_at + 2].copy_from_slice(&l4_check.to_ne_bytes());
    Ok([ip, l4].concat())
}

/// A 20-byte TCP SYN from port `from` to `to` (checksum left 0).
fn syn_segment(from: u16, to: u16, isn: u32) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&from.to_be_bytes());
    tcp[2..4].copy_from_slice(&to.to_be_bytes());
    tcp[4..8].copy_from_slice(&isn.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_SYN;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp
}

/// The inner packet of a TCP service's probe: a SYN from `from` to `vip`
/// with sequence number `isn`.
pub fn syn_packet(from: SocketAddr, vip: SocketAddr, isn: u32) -> io::Result<Vec<u8>> {
    inner_packet(from.ip(), vip.ip(), PROTO_TCP, syn_segment(from.port(), vip.port(), isn), 16)
}

/// What an echo to `vip` is made of: ICMP for IPv4, ICMPv6 for IPv6.
#[derive(Clone, Copy)]
struct EchoKind {
    proto: u8,
    request: u8,
    reply: u8,
}

fn echo_kind(vip: IpAddr) -> EchoKind {
    match vip {
        IpAddr::V4(_) => EchoKind { proto: PROTO_ICMP, request: 8, reply: 0 },
        IpAddr::V6(_) => EchoKind { proto: PROTO_ICMPV6, request: 128, reply: 129 },
    }
}

/// The echo's identifier (this process) and sequence number (one per
/// probe): concurrent probes of this agent, and pings of other processes,
/// all get replies from the same VIP.
fn echo_ids() -> (u16, u16) {
    static SEQUENCE: AtomicU16 = AtomicU16::new(0);
    (std::process::id() as u16, SEQUENCE.fetch_add(1, Ordering::Relaxed))
}

/// The inner packet of a UDP service's probe: an echo request (8 bytes, no
/// data) from `from` to `vip` with identifier `id` and sequence `seq`.
pub fn echo_packet(from: IpAddr, vip: IpAddr, id: u16, seq: u16) -> io::Result<Vec<u8>> {
    let kind = echo_kind(vip);
    let icmp = [&[kind.request, 0, 0, 0][..], &id.to_be_bytes(), &seq.to_be_bytes()].concat();
    inner_packet(from, vip, kind.proto, icmp, 2)
}

/// Whether `icmp` (an ICMP or ICMPv6 message from `vip`) is the reply to
/// the echo request with identifier `id` and sequence `seq`.
pub fn is_echo_reply(icmp: &[u8], vip: IpAddr, id: u16, seq: u16) -> bool {
    let Some(head) = icmp.get(..8) else { return false };
    head[..2] == [echo_kind(vip).reply, 0] && head[4..6] == id.to_be_bytes() && head[6..8] == seq.to_be_bytes()
}

/// What the VIP said.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    SynAck,
    Reset,
    EchoReply,
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
    use std::net::{SocketAddrV4, SocketAddrV6};

    use super::*;

    const FROM: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 254), 41000);
    const FROM_ANY: SocketAddr = SocketAddr::V4(FROM);
    const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 10), 80);
    const VIP_ANY: SocketAddr = SocketAddr::V4(VIP);

    fn sum(bytes: &[u8]) -> u32 {
        let mut s: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s
    }

    /// What the probe makes of `packet` as a raw TCP socket reads it.
    fn answer(packet: &[u8], vip: SocketAddrV4, from: SocketAddr, isn: u32) -> Option<Answer> {
        let tcp = from_vip(packet, None, PROTO_TCP, IpAddr::V4(*vip.ip()), from.ip())?;
        answer_tcp(tcp, vip.port(), from.port(), isn)
    }

    #[test]
    fn the_probe_syn_is_a_valid_tcp_syn_to_the_vip() {
        let p = syn_packet(FROM_ANY, VIP_ANY, 7).unwrap();
        assert_eq!(p.len(), 40);
        assert_eq!(&p[..4], &[0x45, 0, 0, 40]);
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
        let p = syn_packet(from.into(), vip.into(), 7).unwrap();
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
        let seen =
            |peer: Ipv6Addr| from_vip(&ack, Some(peer.into()), PROTO_TCP, (*vip.ip()).into(), (*from.ip()).into());
        assert_eq!(seen(*vip.ip()).and_then(|tcp| answer_tcp(tcp, 80, 41000, 7)), Some(Answer::SynAck));
        assert_eq!(seen(*from.ip()), None, "not from the VIP");
        assert_eq!(answer_tcp(&ack, 80, 41001, 7), None, "another probe's port");
    }

    /// The backend's answer: from VIP:port to the probe, acknowledging isn + 1.
    fn reply(flags: u8, ack: u32, from: Ipv4Addr) -> Vec<u8> {
        let mut p = syn_packet(SocketAddrV4::new(from, VIP.port()).into(), FROM_ANY, 99).unwrap();
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
        let other_host = SocketAddr::new(Ipv4Addr::new(10, 1, 0, 253).into(), FROM.port());
        assert_eq!(answer(&reply(TCP_SYN | TCP_ACK, 8, *VIP.ip()), VIP, other_host, 7), None, "not to this host");
    }

    #[test]
    fn the_probe_echo_is_a_valid_icmp_echo_request_to_the_vip() {
        let p = echo_packet(FROM.ip().to_owned().into(), VIP.ip().to_owned().into(), 0x1234, 5).unwrap();
        assert_eq!(p.len(), 28);
        assert_eq!(&p[..4], &[0x45, 0, 0, 28]);
        assert_eq!(p[9], PROTO_ICMP);
        assert_eq!(sum(&p[..20]), 0xffff, "IPv4 header checksum");
        assert_eq!((&p[12..16], &p[16..20]), (&FROM.ip().octets()[..], &VIP.ip().octets()[..]));
        assert_eq!(sum(&p[20..]), 0xffff, "ICMP checksum (no pseudo-header)");
        assert_eq!(&p[20..], &[8, 0, p[22], p[23], 0x12, 0x34, 0, 5], "echo request, id, sequence");
    }

    #[test]
    fn the_ipv6_probe_echo_is_a_valid_icmpv6_echo_request_to_the_vip() {
        let (from, vip): (Ipv6Addr, Ipv6Addr) = ("2001:db8::fe".parse().unwrap(), "2001:db8::10".parse().unwrap());
        let p = echo_packet(from.into(), vip.into(), 0x1234, 5).unwrap();
        assert_eq!(p.len(), 48);
        assert_eq!(&p[..8], &[0x60, 0, 0, 0, 0, 8, PROTO_ICMPV6, 64]);
        assert_eq!((&p[8..24], &p[24..40]), (&from.octets()[..], &vip.octets()[..]));
        let mut pseudo = [&from.octets()[..], &vip.octets(), &[0, 0, 0, 8, 0, 0, 0, PROTO_ICMPV6]].concat();
        pseudo.extend(&p[40..]);
        assert_eq!(sum(&pseudo), 0xffff, "ICMPv6 checksum over the IPv6 pseudo-header");
        assert_eq!(&p[40..], &[128, 0, p[42], p[43], 0x12, 0x34, 0, 5], "echo request, id, sequence");
        assert!(echo_packet(FROM.ip().to_owned().into(), vip.into(), 1, 1).is_err(), "mixed families");
    }

    #[test]
    fn only_the_echo_reply_to_this_probe_counts() {
        let (from, vip) = (IpAddr::V4(*FROM.ip()), IpAddr::V4(*VIP.ip()));
        // The backend's reply, as a raw ICMP socket reads it: type 0 from the VIP.
        let reply = |src: IpAddr, kind: u8, id: u16, seq: u16| {
            let mut p = echo_packet(src, from, id, seq).unwrap();
            p[20] = kind;
            p
        };
        let seen = |p: &[u8]| from_vip(p, None, PROTO_ICMP, vip, from).is_some_and(|m| is_echo_reply(m, vip, 7, 9));
        assert!(seen(&reply(vip, 0, 7, 9)));
        assert!(!seen(&reply(vip, 0, 7, 10)), "another probe's sequence");
        assert!(!seen(&reply(vip, 0, 8, 9)), "another process's identifier");
        assert!(!seen(&reply(vip, 8, 7, 9)), "a request, not a reply");
        assert!(!seen(&reply(vip, 3, 7, 9)), "an error");
        assert!(!seen(&reply(Ipv4Addr::new(10, 1, 0, 11).into(), 0, 7, 9)), "not from the VIP");
        assert!(!seen(&reply(vip, 0, 7, 9)[..26]), "short");
        // IPv6: the message alone, from the peer the socket names.
        let (from6, vip6): (IpAddr, IpAddr) = ("2001:db8::fe".parse().unwrap(), "2001:db8::10".parse().unwrap());
        let mut p = echo_packet(vip6, from6, 7, 9).unwrap().split_off(40);
        p[0] = 129;
        let seen6 = |peer: IpAddr, m: &[u8]| {
            from_vip(m, Some(peer), PROTO_ICMPV6, vip6, from6).is_some_and(|m| is_echo_reply(m, vip6, 7, 9))
        };
        assert!(seen6(vip6, &p));
        assert!(!seen6(from6, &p), "not from the VIP");
        assert!(!is_echo_reply(&p, vip, 7, 9), "an ICMPv6 reply is no ICMP reply");
        p[0] = 0;
        assert!(!seen6(vip6, &p), "an ICMP type in ICMPv6");
    }
}
