//! A new IPv6 flow to a service with no usable backend, answered as
//! `crate::refuse` answers IPv4 (and with its helpers): TCP with a reset,
//! UDP with an ICMPv6 destination unreachable, port unreachable (type 1,
//! code 4, RFC 4443) quoting the request's IPv6 and UDP headers
//! (`lb_common::refuse::UNREACH6_QUOTE_LEN`). From the VIP to the client,
//! hop limit 64, by XDP_TX where the ingress interface is in `EGRESS`, else
//! passed up for the kernel to forward. A service that wakes from zero
//! holds the packet instead (`crate::wake`), as in IPv4.

use lb_common::{
    icmp::ICMP_HLEN,
    refuse::{icmp6_checksum, tcp_checksum6, ICMP6_DEST_UNREACH, ICMP6_PORT_UNREACH, PROTO_ICMPV6, UNREACH6_QUOTE_LEN},
    v6::Ip6,
    Reason, Service, PROTO_TCP, SERVICE_F_WAKE,
};

use super::{
    parse::{Ipv6Hdr, Parsed6},
    route::IPV6_HLEN,
    ETH_P_IPV6_BE,
};
use crate::{
    hook::Xdp,
    parse::{ptr_at, TcpHdr, ETH_HLEN},
    refuse::{sent_back, trim, unreachable_frame, way_back, write_eth, write_reset, Macs, TCP_HLEN, UDP_HLEN},
    wake, Verdict,
};

/// `parse_packet6` balances no extension headers: every offset is fixed.
const L4_OFF: usize = ETH_HLEN + IPV6_HLEN as usize;
/// A reset: Ethernet, IPv6 and a TCP header without options.
const RESET_LEN: usize = L4_OFF + TCP_HLEN;
/// The part of a UDP request an unreachable keeps (as its quote).
const UDP_REQUEST_KEPT: usize = L4_OFF + UDP_HLEN;
const UNREACH_PAYLOAD_LEN: u16 = (ICMP_HLEN + UNREACH6_QUOTE_LEN) as u16;

/// ICMPv6 header and quote, as 16-bit words for the checksum.
type Icmp6Words = [u16; (ICMP_HLEN + UNREACH6_QUOTE_LEN) / 2];

/// `pkt` found no backend in `svc`'s table: held when `svc` wakes from
/// zero, else answered (or dropped where there is no answer to give).
#[inline(always)]
pub fn refuse(xdp: &Xdp, pkt: &Parsed6, svc: &Service) -> Result<(u32, Reason), Verdict> {
    if svc.flags & SERVICE_F_WAKE != 0 {
        return Err(wake::hold(pkt.proto, pkt.tcp_flags, svc));
    }
    let (way, macs) = way_back(pkt.ingress_ifindex, pkt.src_mac, pkt.dst_mac);
    let answered = if pkt.proto == PROTO_TCP { reset(xdp, pkt, &macs) } else { unreachable(xdp, pkt, &macs) };
    sent_back(pkt.ingress_ifindex, way, answered)
}

/// The reset, over the request's own headers; the frame is cut after the
/// TCP header.
#[inline(always)]
fn reset(xdp: &Xdp, pkt: &Parsed6, macs: &Macs) -> Option<Reason> {
    let tcp: *mut TcpHdr = ptr_at(xdp, L4_OFF)?;
    // SAFETY: parse_packet6 bounds-checked `eth` and `ip`, `tcp` above; no
    // helper has moved the packet since.
    unsafe {
        write_reset(tcp, u32::from(pkt.payload_len))?;
        write_eth(pkt.eth, macs);
        write_ipv6(pkt.ip, TCP_HLEN as u16, PROTO_TCP, &pkt.dst, &pkt.src);
        (*tcp).check = tcp_checksum6(&pkt.dst, &pkt.src, &*tcp.cast::<[u16; TCP_HLEN / 2]>());
    }
    trim(xdp, RESET_LEN).then_some(Reason::ResetNoBackend)
}

/// The unreachable: the request is cut after its UDP header, which with the
/// IPv6 header before it becomes the quote, and the new Ethernet, IPv6 and
/// ICMPv6 headers go in front.
#[inline(always)]
fn unreachable(xdp: &Xdp, pkt: &Parsed6, macs: &Macs) -> Option<Reason> {
    let unreach = [ICMP6_DEST_UNREACH, ICMP6_PORT_UNREACH];
    let (ip, icmp) =
        unreachable_frame::<Ipv6Hdr, Icmp6Words>(xdp, UDP_REQUEST_KEPT, L4_OFF, ETH_P_IPV6_BE, unreach, macs)?;
    // SAFETY: both bounds-checked by unreachable_frame; the ICMPv6 words
    // reach the quote's end, the frame's.
    unsafe {
        write_ipv6(ip, UNREACH_PAYLOAD_LEN, PROTO_ICMPV6, &pkt.dst, &pkt.src);
        (*icmp)[1] = icmp6_checksum(&pkt.dst, &pkt.src, &*icmp);
    }
    Some(Reason::UnreachableNoBackend)
}

/// A fresh IPv6 header: version 6, traffic class and flow label 0, hop
/// limit `ANSWER_TTL`, no extension headers.
///
/// # Safety
/// `ip` points into the packet, bounds-checked.
#[inline(always)]
unsafe fn write_ipv6(ip: *mut Ipv6Hdr, payload_len: u16, next_header: u8, src: &Ip6, dst: &Ip6) {
    unsafe {
        *ip = Ipv6Hdr {
            ver_tc_flow: [0x60, 0, 0, 0],
            payload_len_be: payload_len.to_be(),
            next_header,
            hop_limit: lb_common::refuse::ANSWER_TTL,
            src: *src,
            dst: *dst,
        };
    }
}
