//! Bounds-checked header parsing. Each helper takes an offset and returns
//! what the next one needs, or the verdict for a packet that stops here.

use core::mem::size_of;

use lb_common::{Reason, PROTO_TCP, PROTO_UDP};

use crate::{hook::Hook, Verdict};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// More-fragments flag and fragment offset, in network order.
const IP_MF_OFFSET_BE: u16 = 0x3fffu16.to_be();
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

/// IPv4 header. `packed(2)`: after a 14-byte Ethernet header it sits at an
/// address that is 2 mod 4, so its u32 fields must not be assumed aligned.
#[repr(C, packed(2))]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len_be: u16,
    pub id_be: u16,
    pub frag_off_be: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src_be: u32,
    pub dst_be: u32,
}

/// The first 20 bytes of a TCP header; seq and ack stay opaque.
#[repr(C)]
pub struct TcpHdr {
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub seq_ack: [u16; 4],
    /// Data offset (high nibble of the first byte) and flags (second byte).
    pub doff_flags: [u8; 2],
    pub window_be: u16,
    pub check: u16,
    pub urg_be: u16,
}

pub use lb_common::{TCP_ACK, TCP_SYN};

#[repr(C)]
pub struct UdpHdr {
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub len_be: u16,
    pub check: u16,
}

/// What the rest of the program needs from a TCP or UDP over IPv4 packet.
pub struct Parsed {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv4Hdr,
    /// Pointer to the L4 checksum field.
    pub l4_check: *mut u16,
    /// Pointer to the L4 source port (destination port follows it).
    pub l4_ports: *mut [u16; 2],
    /// Offset of the L4 checksum field from the frame's start, for the
    /// helpers that take offsets (tc).
    pub l4_check_off: u32,
    /// From the IPv4 header, read at parse time.
    pub tot_len: u16,
    pub tos: u8,
    pub ttl: u8,
    pub src_ip_be: u32,
    pub dst_ip_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    /// TCP flags, 0 for UDP.
    pub tcp_flags: u8,
    /// The interface the packet arrived on.
    pub ingress_ifindex: u32,
    /// The Ethernet addresses it arrived with, read at parse time.
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

impl Parsed {
    /// TCP and UDP alike: both headers start with the two ports.
    ///
    /// # Safety
    /// `ip` and `l4_ports` point into the packet, bounds-checked.
    #[inline(always)]
    unsafe fn new(
        ip: *mut Ipv4Hdr,
        l4_ports: *mut [u16; 2],
        l4_check: *mut u16,
        check_at: usize,
        proto: u8,
        tcp_flags: u8,
    ) -> Self {
        // SAFETY: the caller's contract; read by value (packed header).
        let (src_ip_be, dst_ip_be, [src_port_be, dst_port_be], tot_len_be, tos, ttl) =
            unsafe { ((*ip).src_be, (*ip).dst_be, *l4_ports, (*ip).tot_len_be, (*ip).tos, (*ip).ttl) };
        Self {
            ip,
            l4_check,
            l4_ports,
            l4_check_off: check_at as u32,
            tot_len: u16::from_be(tot_len_be),
            tos,
            ttl,
            src_ip_be,
            dst_ip_be,
            src_port_be,
            dst_port_be,
            proto,
            tcp_flags,
            eth: core::ptr::null_mut(),
            ingress_ifindex: 0,
            src_mac: [0; 6],
            dst_mac: [0; 6],
        }
    }
}

/// The one place that compares against `data_end`.
#[inline(always)]
pub fn ptr_at<T, H: Hook>(ctx: &H, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
pub fn parse_packet<H: Hook>(ctx: &H) -> Result<Parsed, Verdict> {
    let eth = parse_eth(ctx)?;
    let (ip, l4, l4_end) = parse_ipv4(ctx, ETH_HLEN)?;
    // SAFETY: `ip` was bounds-checked by parse_ipv4.
    let proto = unsafe { (*ip).proto };
    let mut pkt = match proto {
        PROTO_TCP => parse_tcp(ctx, ip, l4, l4_end),
        PROTO_UDP => parse_udp(ctx, ip, l4, l4_end),
        // Valid IPv4 without options or fragmentation: `icmp` looks again.
        _ => Err(Verdict::pass(Reason::PassNotTcpUdp)),
    }?;
    pkt.eth = eth;
    // SAFETY: bounds-checked by parse_eth. Copied out here because the
    // pointer, once kept for later, is one the verifier may not follow in
    // tc (LLVM mixes the bits of an skb's 32-bit `data` into it).
    (pkt.src_mac, pkt.dst_mac) = unsafe { ((*eth).src, (*eth).dst) };
    pkt.ingress_ifindex = ctx.ingress_ifindex();
    Ok(pkt)
}

#[inline(always)]
fn parse_eth<H: Hook>(ctx: &H) -> Result<*mut EthHdr, Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::drop(Reason::DropTruncatedEth))?;
    // SAFETY: bounds-checked above.
    match unsafe { (*eth).ether_type } {
        ETH_P_IP_BE => Ok(eth),
        ETH_P_IPV6_BE => Err(Verdict::pass(Reason::PassIpv6)),
        _ => Err(Verdict::pass(Reason::PassNotIpv4)),
    }
}

/// Returns the header, the L4 offset and the end of the IP packet (frame
/// offset; Ethernet padding lies beyond it).
#[inline(always)]
fn parse_ipv4<H: Hook>(ctx: &H, off: usize) -> Result<(*mut Ipv4Hdr, usize, usize), Verdict> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, off).ok_or(Verdict::drop(Reason::DropTruncatedIp))?;
    // SAFETY: bounds-checked above; fields are read by value (packed struct).
    let (ver_ihl, tot_len, frag) = unsafe { ((*ip).ver_ihl, u16::from_be((*ip).tot_len_be), (*ip).frag_off_be) };
    let ihl = (ver_ihl & 0x0f) as usize * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return Err(Verdict::drop(Reason::DropBadIpHeader));
    }
    let frame_len = ctx.packet_len();
    if off + ihl > frame_len {
        return Err(Verdict::drop(Reason::DropTruncatedIp));
    }
    let ip_end = off + tot_len as usize;
    if (tot_len as usize) < ihl || ip_end > frame_len {
        return Err(Verdict::drop(Reason::DropBadTotalLength));
    }
    // Options and fragments are valid IPv4 we do not balance: the kernel gets
    // them untouched, as it would without us.
    if ihl != 20 {
        return Err(Verdict::pass(Reason::PassIpOptions));
    }
    if frag & IP_MF_OFFSET_BE != 0 {
        return Err(Verdict::pass(Reason::PassFragment));
    }
    Ok((ip, off + 20, ip_end))
}

#[inline(always)]
fn parse_tcp<H: Hook>(ctx: &H, ip: *mut Ipv4Hdr, off: usize, ip_end: usize) -> Result<Parsed, Verdict> {
    let (tcp, flags) = tcp_header(ctx, off, ip_end)?;
    // SAFETY: bounds-checked by tcp_header; `ip` by parse_ipv4.
    unsafe { Ok(Parsed::new(ip, tcp.cast(), core::ptr::addr_of_mut!((*tcp).check), off + 16, PROTO_TCP, flags)) }
}

#[inline(always)]
fn parse_udp<H: Hook>(ctx: &H, ip: *mut Ipv4Hdr, off: usize, ip_end: usize) -> Result<Parsed, Verdict> {
    let udp = udp_header(ctx, off, ip_end)?;
    // SAFETY: bounds-checked by udp_header; `ip` by parse_ipv4.
    unsafe { Ok(Parsed::new(ip, udp.cast(), core::ptr::addr_of_mut!((*udp).check), off + 6, PROTO_UDP, 0)) }
}

/// The TCP header at `off` (whole, options included, before `ip_end`) and
/// its flags; IPv4 and IPv6 alike.
#[inline(always)]
pub fn tcp_header<H: Hook>(ctx: &H, off: usize, ip_end: usize) -> Result<(*mut TcpHdr, u8), Verdict> {
    let tcp: *mut TcpHdr = ptr_at(ctx, off).ok_or(Verdict::drop(Reason::DropTruncatedL4))?;
    if off + TCP_HLEN > ip_end {
        return Err(Verdict::drop(Reason::DropTruncatedL4));
    }
    // SAFETY: bounds-checked above.
    let [doff, flags] = unsafe { (*tcp).doff_flags };
    let doff = (doff >> 4) as usize * 4;
    if doff < TCP_HLEN || off + doff > ip_end {
        return Err(Verdict::drop(Reason::DropBadTcpHeader));
    }
    Ok((tcp, flags))
}

/// The UDP header at `off`, before `ip_end`; IPv4 and IPv6 alike.
#[inline(always)]
pub fn udp_header<H: Hook>(ctx: &H, off: usize, ip_end: usize) -> Result<*mut UdpHdr, Verdict> {
    let udp: *mut UdpHdr = ptr_at(ctx, off).ok_or(Verdict::drop(Reason::DropTruncatedL4))?;
    if off + UDP_HLEN > ip_end {
        return Err(Verdict::drop(Reason::DropTruncatedL4));
    }
    Ok(udp)
}
