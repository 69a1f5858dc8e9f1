//! Packet builders: Ethernet, ARP, IPv4, IPv6, TCP, UDP and ICMP echo, built
//! field by field with checksums computed from scratch (see `checksum`).
//!
//! Fixtures describe packets with these instead of hex blobs, and build the
//! expected output the same way from the rewritten addresses, so a fixture
//! reads as "this packet in, that packet out".
//! Malformed packets start from a well-formed one (correct checksums) and
//! change one thing: a truncation or one of the `Ipv4`/`Tcp` overrides.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};

use crate::checksum::{internet_checksum, l4_checksum, pseudo_header_v4, pseudo_header_v6};

pub type Mac = [u8; 6];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// IPv4 "don't fragment" and "more fragments" flags, in the 16-bit
/// flags + fragment-offset field.
pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Ethernet II frame around `payload` (no FCS, as XDP sees it).
pub fn ethernet(dst: Mac, src: Mac, ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Pads a frame with zeros to `len` bytes, as a NIC pads short frames to the
/// 60-byte Ethernet minimum. The IPv4 total length still ends the packet.
pub fn pad_to(mut frame: Vec<u8>, len: usize) -> Vec<u8> {
    if frame.len() < len {
        frame.resize(len, 0);
    }
    frame
}

/// An ARP request (RFC 826) for IPv4 over Ethernet: the body of an
/// `ETH_P_ARP` frame.
pub fn arp_request(sender_mac: Mac, sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    let mut a = Vec::with_capacity(28);
    a.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    a.extend_from_slice(&ETH_P_IP.to_be_bytes());
    a.extend_from_slice(&[6, 4]);
    a.extend_from_slice(&1u16.to_be_bytes()); // request
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender_ip.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target_ip.octets());
    a
}

/// An IPv4 header. `build` writes it in front of a payload with a correct
/// checksum; the `Option` overrides write a wrong value on purpose, for
/// malformed fixtures (the checksum still matches the bytes written).
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub tos: u8,
    pub id: u16,
    /// Flags (`IP_DF`, `IP_MF`) and the fragment offset in 8-byte units.
    pub flags_frag: u16,
    pub ttl: u8,
    /// Options, a multiple of 4 bytes; they lengthen the header.
    pub options: Vec<u8>,
    /// Version nibble to write instead of 4.
    pub version: Option<u8>,
    /// IHL (header length in 32-bit words) to write instead of the true one.
    pub ihl: Option<u8>,
    /// Total length to write instead of the true one.
    pub total_len: Option<u16>,
}

impl Ipv4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self {
            src,
            dst,
            proto,
            tos: 0,
            id: 0x1c46,
            flags_frag: IP_DF,
            ttl: 64,
            options: Vec::new(),
            version: None,
            ihl: None,
            total_len: None,
        }
    }

    /// The header followed by `payload`.
    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        assert!(self.options.len().is_multiple_of(4), "IPv4 options must fill whole words");
        let hlen = 20 + self.options.len();
        let total = self.total_len.unwrap_or((hlen + payload.len()) as u16);
        let ver_ihl = (self.version.unwrap_or(4) << 4) | self.ihl.unwrap_or((hlen / 4) as u8);
        let mut p = Vec::with_capacity(hlen + payload.len());
        p.extend_from_slice(&[ver_ihl, self.tos]);
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&self.id.to_be_bytes());
        p.extend_from_slice(&self.flags_frag.to_be_bytes());
        p.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&self.options);
        let check = internet_checksum(&p);
        p[10..12].copy_from_slice(&check.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }
}

/// An IPv6 header (no extension headers).
#[derive(Clone, Debug)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub next_header: u8,
    pub hop_limit: u8,
}

impl Ipv6 {
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8) -> Self {
        Self { src, dst, next_header, hop_limit: 64 }
    }

    pub fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(40 + payload.len());
        p.extend_from_slice(&0x6000_0000u32.to_be_bytes());
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.extend_from_slice(&[self.next_header, self.hop_limit]);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(payload);
        p
    }
}

/// The addresses a TCP or UDP checksum's pseudo-header covers.
#[derive(Clone, Copy, Debug)]
pub enum Addrs {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

impl Addrs {
    fn pseudo_header(self, proto: u8, l4_len: usize) -> Vec<u8> {
        match self {
            Addrs::V4(s, d) => pseudo_header_v4(s, d, proto, l4_len as u16),
            Addrs::V6(s, d) => pseudo_header_v6(s, d, proto, l4_len as u32),
        }
    }
}

/// A TCP segment.
#[derive(Clone, Debug)]
pub struct Tcp {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    /// Options, a multiple of 4 bytes; they lengthen the header.
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
    /// Data offset (header length in 32-bit words) to write instead of the
    /// true one.
    pub data_offset: Option<u8>,
}

impl Tcp {
    pub fn new(src_port: u16, dst_port: u16, flags: u8) -> Self {
        Self {
            src_port,
            dst_port,
            seq: 0x1000_0000,
            ack: if flags & TCP_ACK != 0 { 0x2000_0000 } else { 0 },
            flags,
            window: 64240,
            options: Vec::new(),
            payload: Vec::new(),
            data_offset: None,
        }
    }

    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// Header and payload, checksummed under `addrs`' pseudo-header.
    pub fn build(&self, addrs: Addrs) -> Vec<u8> {
        assert!(self.options.len().is_multiple_of(4), "TCP options must fill whole words");
        let hlen = 20 + self.options.len();
        let doff = self.data_offset.unwrap_or((hlen / 4) as u8);
        let mut s = Vec::with_capacity(hlen + self.payload.len());
        s.extend_from_slice(&self.src_port.to_be_bytes());
        s.extend_from_slice(&self.dst_port.to_be_bytes());
        s.extend_from_slice(&self.seq.to_be_bytes());
        s.extend_from_slice(&self.ack.to_be_bytes());
        s.extend_from_slice(&[doff << 4, self.flags]);
        s.extend_from_slice(&self.window.to_be_bytes());
        s.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        s.extend_from_slice(&self.options);
        s.extend_from_slice(&self.payload);
        let check = l4_checksum(&addrs.pseudo_header(IPPROTO_TCP, s.len()), &s);
        s[16..18].copy_from_slice(&check.to_be_bytes());
        s
    }
}

/// A UDP datagram.
#[derive(Clone, Debug)]
pub struct Udp {
    pub src_port: u16,
    pub dst_port: u16,
    pub payload: Vec<u8>,
    /// Send without a checksum (zero, allowed over IPv4).
    pub no_checksum: bool,
}

impl Udp {
    pub fn new(src_port: u16, dst_port: u16, payload: &[u8]) -> Self {
        Self { src_port, dst_port, payload: payload.to_vec(), no_checksum: false }
    }

    pub fn without_checksum(mut self) -> Self {
        self.no_checksum = true;
        self
    }

    pub fn build(&self, addrs: Addrs) -> Vec<u8> {
        let len = 8 + self.payload.len();
        let mut d = Vec::with_capacity(len);
        d.extend_from_slice(&self.src_port.to_be_bytes());
        d.extend_from_slice(&self.dst_port.to_be_bytes());
        d.extend_from_slice(&(len as u16).to_be_bytes());
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(&self.payload);
        if !self.no_checksum {
            // RFC 768: a computed zero is sent as all ones.
            let check = match l4_checksum(&addrs.pseudo_header(IPPROTO_UDP, len), &d) {
                0 => 0xffff,
                c => c,
            };
            d[6..8].copy_from_slice(&check.to_be_bytes());
        }
        d
    }
}

/// An ICMP echo request (RFC 792).
pub fn icmp_echo_request(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let check = internet_checksum(&m);
    m[2..4].copy_from_slice(&check.to_be_bytes());
    m
}

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;

/// An ICMP error (RFC 792) quoting `quote` (an IPv4 header and the first
/// bytes after it); `mtu` is the next-hop MTU of "fragmentation needed"
/// (RFC 1191), 0 for the others.
pub fn icmp_error(icmp_type: u8, code: u8, mtu: u16, quote: &[u8]) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0, 0, 0];
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(quote);
    let check = internet_checksum(&m);
    m[2..4].copy_from_slice(&check.to_be_bytes());
    m
}

pub const IPPROTO_ICMPV6: u8 = 58;
pub const ICMP6_DEST_UNREACH: u8 = 1;
pub const ICMP6_PORT_UNREACH: u8 = 4;
pub const ICMP6_PACKET_TOO_BIG: u8 = 2;

/// An ICMPv6 error (RFC 4443) from `src` to `dst` quoting `quote` (an IPv6
/// packet, or its first bytes); `rest` is the 4 bytes after the checksum
/// (the MTU of "packet too big", 0 for the others). Its checksum covers
/// the IPv6 pseudo-header.
pub fn icmp6_error(icmp_type: u8, code: u8, rest: u32, quote: &[u8], src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut m = vec![icmp_type, code, 0, 0];
    m.extend_from_slice(&rest.to_be_bytes());
    m.extend_from_slice(quote);
    let mut all = pseudo_header_v6(src, dst, IPPROTO_ICMPV6, m.len() as u32);
    all.extend_from_slice(&m);
    let check = internet_checksum(&all);
    m[2..4].copy_from_slice(&check.to_be_bytes());
    m
}

/// Ethernet + IPv4 + TCP, with `ip.proto` forced to TCP.
pub fn tcp_frame(macs: (Mac, Mac), ip: &Ipv4, tcp: &Tcp) -> Vec<u8> {
    let ip = Ipv4 { proto: IPPROTO_TCP, ..ip.clone() };
    let segment = tcp.build(Addrs::V4(ip.src, ip.dst));
    ethernet(macs.0, macs.1, ETH_P_IP, &ip.build(&segment))
}

/// Ethernet + IPv4 + UDP, with `ip.proto` forced to UDP.
pub fn udp_frame(macs: (Mac, Mac), ip: &Ipv4, udp: &Udp) -> Vec<u8> {
    let ip = Ipv4 { proto: IPPROTO_UDP, ..ip.clone() };
    let datagram = udp.build(Addrs::V4(ip.src, ip.dst));
    ethernet(macs.0, macs.1, ETH_P_IP, &ip.build(&datagram))
}

/// Ethernet + IPv6 + TCP from `from` to `to` (`tcp`'s ports replaced by
/// theirs).
pub fn tcp6_frame(macs: (Mac, Mac), from: SocketAddrV6, to: SocketAddrV6, tcp: &Tcp) -> Vec<u8> {
    let tcp = Tcp { src_port: from.port(), dst_port: to.port(), ..tcp.clone() };
    let segment = tcp.build(Addrs::V6(*from.ip(), *to.ip()));
    ethernet(macs.0, macs.1, ETH_P_IPV6, &Ipv6::new(*from.ip(), *to.ip(), IPPROTO_TCP).build(&segment))
}

/// Ethernet + IPv6 + UDP from `from` to `to` (`udp`'s ports replaced by
/// theirs).
pub fn udp6_frame(macs: (Mac, Mac), from: SocketAddrV6, to: SocketAddrV6, udp: &Udp) -> Vec<u8> {
    let udp = Udp { src_port: from.port(), dst_port: to.port(), ..udp.clone() };
    let datagram = udp.build(Addrs::V6(*from.ip(), *to.ip()));
    ethernet(macs.0, macs.1, ETH_P_IPV6, &Ipv6::new(*from.ip(), *to.ip(), IPPROTO_UDP).build(&datagram))
}

/// `frame` (Ethernet + IPv4) as `mode = "dsr-ipip"` sends it on: inside
/// an outer IPv4 header from `src` to `dst` (IP-in-IP, RFC 2003) with the
/// inner header's TOS and DF, TTL 64, ID 0 and its checksum computed here,
/// behind Ethernet `macs` (destination, source). Everything after the
/// inner Ethernet header, padding included, follows untouched.
pub fn ipip_encapsulated(frame: &[u8], macs: (Mac, Mac), src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let inner = &frame[14..];
    let inner_len = u16::from_be_bytes([inner[2], inner[3]]);
    let mut outer = vec![0x45, inner[1]];
    outer.extend((inner_len + 20).to_be_bytes());
    outer.extend([0, 0, inner[6] & 0x40, 0, 64, 4, 0, 0]);
    outer.extend(src.octets());
    outer.extend(dst.octets());
    let check = internet_checksum(&outer);
    outer[10..12].copy_from_slice(&check.to_be_bytes());
    outer.extend(inner);
    ethernet(macs.0, macs.1, ETH_P_IP, &outer)
}

/// An IPv6 `frame` inside an outer IPv6 header (next header 41, hop limit
/// 64, the inner traffic class and flow label) from `src` to `dst`, as the
/// load balancer's IPv6 `dsr-ipip` sends it, with `macs` (dst, src). The
/// outer payload length is the inner packet's (its header's payload length
/// plus 40); everything after the inner Ethernet header, padding included,
/// follows untouched.
pub fn ip6ip6_encapsulated(frame: &[u8], macs: (Mac, Mac), src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let inner = &frame[14..];
    let inner_payload = u16::from_be_bytes([inner[4], inner[5]]);
    let mut outer = inner[..4].to_vec();
    outer.extend((inner_payload + 40).to_be_bytes());
    outer.extend([41, 64]);
    outer.extend(src.octets());
    outer.extend(dst.octets());
    outer.extend(inner);
    ethernet(macs.0, macs.1, ETH_P_IPV6, &outer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::{ones_complement_sum, verify_ipv4_frame};

    const MACS: (Mac, Mac) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    const A: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

    #[test]
    fn tcp_frame_layout_and_checksums() {
        let f = tcp_frame(MACS, &Ipv4::new(A, B, 0), &Tcp::new(40000, 80, TCP_SYN));
        assert_eq!(f.len(), 14 + 20 + 20);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(f[14], 0x45);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 40);
        assert_eq!(f[23], IPPROTO_TCP);
        assert_eq!(&f[26..30], &A.octets());
        assert_eq!(&f[30..34], &B.octets());
        assert_eq!(u16::from_be_bytes([f[36], f[37]]), 80);
        assert_eq!(f[46], 0x50);
        assert_eq!(f[47], TCP_SYN);
        verify_ipv4_frame(&f).unwrap();
    }

    #[test]
    fn tcp_with_payload_and_options_checksums() {
        let mut tcp = Tcp::new(40000, 80, TCP_ACK | TCP_PSH).with_payload(b"GET / HTTP/1.1\r\n\r\n!");
        tcp.options = vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]; // NOP NOP timestamps
        let f = tcp_frame(MACS, &Ipv4::new(A, B, 0), &tcp);
        assert_eq!(f[46] >> 4, 8);
        verify_ipv4_frame(&f).unwrap();
    }

    #[test]
    fn udp_checksums_and_zero_checksum() {
        let f = udp_frame(MACS, &Ipv4::new(A, B, 0), &Udp::new(5000, 53, b"query"));
        verify_ipv4_frame(&f).unwrap();
        assert_ne!(&f[40..42], &[0, 0]);
        let z = udp_frame(MACS, &Ipv4::new(A, B, 0), &Udp::new(5000, 53, b"query").without_checksum());
        assert_eq!(&z[40..42], &[0, 0]);
        assert_eq!(u16::from_be_bytes([z[38], z[39]]), 13);
    }

    #[test]
    fn ip_options_lengthen_the_header_and_stay_checksummed() {
        let mut ip = Ipv4::new(A, B, 0);
        ip.options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
        let f = tcp_frame(MACS, &ip, &Tcp::new(1, 2, TCP_SYN));
        assert_eq!(f[14], 0x46);
        verify_ipv4_frame(&f).unwrap();
    }

    #[test]
    fn overrides_write_the_wrong_value_with_a_matching_checksum() {
        let ip = Ipv4 { ihl: Some(4), total_len: Some(999), version: Some(6), ..Ipv4::new(A, B, IPPROTO_TCP) };
        let p = ip.build(&[]);
        assert_eq!(p[0], 0x64);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 999);
        assert_eq!(ones_complement_sum(&p[..20]), 0xffff);
        let tcp = Tcp { data_offset: Some(3), ..Tcp::new(1, 2, TCP_SYN) };
        assert_eq!(tcp.build(Addrs::V4(A, B))[12], 0x30);
    }

    #[test]
    fn icmp_echo_checksum() {
        let m = icmp_echo_request(1, 2, b"ping");
        assert_eq!(ones_complement_sum(&m), 0xffff);
        let f = ethernet(MACS.0, MACS.1, ETH_P_IP, &Ipv4::new(A, B, IPPROTO_ICMP).build(&m));
        verify_ipv4_frame(&f).unwrap();
    }

    #[test]
    fn ipv6_tcp_checksum() {
        let (s, d) = ("2001:db8::1".parse().unwrap(), "2001:db8::2".parse().unwrap());
        let seg = Tcp::new(40000, 80, TCP_SYN).build(Addrs::V6(s, d));
        let mut all = pseudo_header_v6(s, d, IPPROTO_TCP, seg.len() as u32);
        all.extend_from_slice(&seg);
        assert_eq!(ones_complement_sum(&all), 0xffff);
        let p = Ipv6::new(s, d, IPPROTO_TCP).build(&seg);
        assert_eq!(p[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([p[4], p[5]]) as usize, seg.len());
    }

    #[test]
    fn arp_request_layout() {
        let a = arp_request(MACS.1, A, B);
        assert_eq!(a.len(), 28);
        assert_eq!(&a[6..8], &[0, 1]);
        assert_eq!(&a[24..28], &B.octets());
    }

    #[test]
    fn padding_keeps_the_ip_packet_intact() {
        let f = pad_to(tcp_frame(MACS, &Ipv4::new(A, B, 0), &Tcp::new(1, 2, TCP_SYN)), 60);
        assert_eq!(f.len(), 60);
        verify_ipv4_frame(&f).unwrap();
    }
}
