//! IPv6 header parsing: a fixed header straight before TCP or UDP is
//! balanced; anything else passes untouched or, when malformed, drops.

use lb_common::{v6::Ip6, Reason, PROTO_TCP, PROTO_UDP};

use crate::{
    hook::Hook,
    parse::{ptr_at, tcp_header, udp_header, EthHdr, ETH_HLEN},
    Verdict,
};

const IPV6_HLEN: usize = 40;

const NEXT_FRAGMENT: u8 = 44;

/// IPv6 fixed header. `packed(2)`: after Ethernet it sits at 2 mod 4.
#[repr(C, packed(2))]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8), flow label (20).
    pub ver_tc_flow: [u8; 4],
    pub payload_len_be: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: Ip6,
    pub dst: Ip6,
}

/// What the IPv6 path needs from a TCP or UDP over IPv6 packet.
pub struct Parsed6 {
    pub eth: *mut EthHdr,
    pub ip: *mut Ipv6Hdr,
    pub l4_check: *mut u16,
    pub l4_ports: *mut [u16; 2],
    /// The L4 length (no extension headers come before it).
    pub payload_len: u16,
    pub hop_limit: u8,
    /// Traffic class and flow label as `bpf_fib_lookup` takes them.
    pub flowinfo_be: u32,
    pub src: Ip6,
    pub dst: Ip6,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    /// TCP flags, 0 for UDP.
    pub tcp_flags: u8,
    pub ingress_ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// Traffic class and flow label, as `bpf_fib_lookup` takes them, from an
/// IPv6 header's first four bytes.
#[inline(always)]
pub fn flowinfo_be(ver_tc_flow: [u8; 4]) -> u32 {
    let v = ver_tc_flow;
    u32::from_ne_bytes([v[0] & 0x0f, v[1], v[2], v[3]])
}

#[inline(always)]
pub fn parse_packet6<H: Hook>(ctx: &H) -> Result<Parsed6, Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::drop(Reason::DropTruncatedEth))?;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, ETH_HLEN).ok_or(Verdict::drop(Reason::DropTruncatedIp))?;
    // SAFETY: bounds-checked above; read by value (packed header).
    let (vtf, payload_len, next, hop_limit, src, dst) = unsafe {
        (
            (*ip).ver_tc_flow,
            u16::from_be((*ip).payload_len_be),
            (*ip).next_header,
            (*ip).hop_limit,
            (*ip).src,
            (*ip).dst,
        )
    };
    if vtf[0] >> 4 != 6 {
        return Err(Verdict::drop(Reason::DropBadIpHeader));
    }
    let l4 = ETH_HLEN + IPV6_HLEN;
    let ip_end = l4 + payload_len as usize;
    if ip_end > ctx.packet_len() {
        return Err(Verdict::drop(Reason::DropBadTotalLength));
    }
    let (l4_ports, l4_check, tcp_flags): (*mut [u16; 2], *mut u16, u8) = match next {
        PROTO_TCP => {
            let (tcp, flags) = tcp_header(ctx, l4, ip_end)?;
            // SAFETY: bounds-checked by tcp_header.
            (tcp.cast(), unsafe { core::ptr::addr_of_mut!((*tcp).check) }, flags)
        }
        PROTO_UDP => {
            let udp = udp_header(ctx, l4, ip_end)?;
            // SAFETY: bounds-checked by udp_header.
            (udp.cast(), unsafe { core::ptr::addr_of_mut!((*udp).check) }, 0)
        }
        NEXT_FRAGMENT => return Err(Verdict::pass(Reason::PassFragment)),
        // The extension headers (IANA): hop-by-hop, routing, destination
        // options, ESP, AH, mobility, HIP, shim6.
        0 | 43 | 60 | 50 | 51 | 135 | 139 | 140 => return Err(Verdict::pass(Reason::PassIpv6ExtHeader)),
        // ICMPv6 (neighbour discovery included) and the rest.
        _ => return Err(Verdict::pass(Reason::PassNotTcpUdp)),
    };
    // SAFETY: bounds-checked above (both ports lie in the L4 header).
    let [src_port_be, dst_port_be] = unsafe { *l4_ports };
    // SAFETY: bounds-checked above; copied out for the same reason as in IPv4.
    let (src_mac, dst_mac) = unsafe { ((*eth).src, (*eth).dst) };
    Ok(Parsed6 {
        eth,
        ip,
        l4_check,
        l4_ports,
        payload_len,
        hop_limit,
        flowinfo_be: flowinfo_be(vtf),
        src,
        dst,
        src_port_be,
        dst_port_be,
        proto: next,
        tcp_flags,
        ingress_ifindex: ctx.ingress_ifindex(),
        src_mac,
        dst_mac,
    })
}
