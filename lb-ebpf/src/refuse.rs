//! A new flow to a service with no usable backend (an empty live Maglev
//! table: no backends, every weight 0, every backend down or draining) is
//! answered at once instead of dropped, so that clients fail now rather
//! than at their own timeout: TCP with a reset (RFC 793, see
//! `lb_common::refuse::reset_for`; a reset is never answered), UDP with an
//! ICMP port unreachable quoting the request's IPv4 header and UDP header.
//! The answer is written over the request, from the VIP to the client, and
//! leaves by XDP_TX out of the interface the request came in on where that
//! interface can transmit XDP frames (it is in `EGRESS`; a veth whose peer
//! has neither GRO nor an XDP program drops them), else it passes up, still
//! addressed to this host, and the kernel forwards it. It is never larger than the request plus 28 bytes
//! (`UNREACH_QUOTE_LEN`). IPv6 answers the same way (`v6::refuse`), with
//! the helpers here marked "IPv4 and IPv6 alike".
//!
//! XDP only: at the tc hook a request from a local stack can carry a
//! partial checksum (CHECKSUM_PARTIAL) that the skb would finish over our
//! full one; there the kernel's stack answers instead where it would not
//! forward the request (see `Hook::refuse` for tc), else it is dropped.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
};
use lb_common::{
    icmp::ICMP_HLEN,
    refuse::{checksum, reset_for, tcp_checksum, ANSWER_TTL, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, UNREACH_QUOTE_LEN},
    Path, Reason, PROTO_ICMP, PROTO_TCP,
};

use crate::{
    hook::{Hook, Xdp},
    icmp::IcmpHdr,
    parse::{ptr_at, EthHdr, Ipv4Hdr, TcpHdr, ETH_HLEN},
    route,
    Packet, Verdict, EGRESS,
};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// `parse_packet` passes IPv4 with options: every offset is fixed.
const L4_OFF: usize = ETH_HLEN + 20;
pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
/// A reset: Ethernet, IPv4 and a TCP header without options.
const RESET_LEN: usize = L4_OFF + TCP_HLEN;
/// The part of a UDP request an unreachable keeps (as its quote).
const UDP_REQUEST_KEPT: usize = L4_OFF + UDP_HLEN;
const UNREACH_IP_LEN: u16 = (20 + ICMP_HLEN + UNREACH_QUOTE_LEN) as u16;

/// ICMP header and quote, as 16-bit words for the checksum.
type IcmpWords = [u16; (ICMP_HLEN + UNREACH_QUOTE_LEN) / 2];

/// Answer `pkt` (a new flow the Maglev table had no backend for) and send
/// the answer back, or drop it when there is none to give.
#[inline(always)]
pub fn answer(xdp: &Xdp, pkt: &Packet) -> Result<(u32, Reason), Verdict> {
    let (way, macs) = way_back(pkt.ingress_ifindex, pkt.src_mac, pkt.dst_mac);
    let answered = if pkt.proto == PROTO_TCP { reset(xdp, pkt, &macs) } else { unreachable(xdp, pkt, &macs) };
    sent_back(pkt.ingress_ifindex, way, answered)
}

/// IPv4 and IPv6 (`v6::refuse`) alike: how the answer to a request that
/// arrived on `ingress_ifindex` from `client_mac` to `local_mac` leaves,
/// and the MACs it needs for that.
#[inline(always)]
pub fn way_back(ingress_ifindex: u32, client_mac: [u8; 6], local_mac: [u8; 6]) -> ((u32, Path), Macs) {
    if EGRESS.get_ifindex(ingress_ifindex).is_some() {
        ((xdp_action::XDP_TX, Path::TxBack), Macs { dst: client_mac, src: local_mac })
    } else {
        // Still addressed to this host, or the stack would not take it.
        ((xdp_action::XDP_PASS, Path::PassEgressNotReady), Macs { dst: local_mac, src: client_mac })
    }
}

/// IPv4 and IPv6 alike: the verdict once the frame is the answer
/// (`answered`, its reason) or is none (dropped), the way counted.
#[inline(always)]
pub fn sent_back(
    ingress_ifindex: u32,
    (action, path): (u32, Path),
    answered: Option<Reason>,
) -> Result<(u32, Reason), Verdict> {
    let reason = answered.ok_or(Verdict::drop(Reason::DropNoBackend))?;
    route::count_path(ingress_ifindex, path);
    Ok((action, reason))
}

/// The answer's Ethernet addresses: back to the client's MAC when it is
/// sent back (XDP_TX), as it arrived when it passes up (the kernel then
/// forwards it and sets them).
pub struct Macs {
    dst: [u8; 6],
    src: [u8; 6],
}

/// The reset, over the request's own headers; the frame is cut after the
/// TCP header.
#[inline(always)]
fn reset(xdp: &Xdp, pkt: &Packet, macs: &Macs) -> Option<Reason> {
    let tcp: *mut TcpHdr = ptr_at(xdp, L4_OFF)?;
    let (vip_be, client_be) = (pkt.dst_ip_be, pkt.src_ip_be);
    // SAFETY: parse_packet bounds-checked `eth` and `ip`, `tcp` above; no
    // helper has moved the packet since.
    unsafe {
        write_reset(tcp, u32::from(pkt.tot_len).saturating_sub(20))?;
        write_eth(pkt.eth, macs);
        write_ipv4(pkt.ip, (20 + TCP_HLEN) as u16, PROTO_TCP, vip_be, client_be);
        (*tcp).check = tcp_checksum(vip_be, client_be, &*tcp.cast::<[u16; TCP_HLEN / 2]>());
    }
    trim(xdp, RESET_LEN).then_some(Reason::ResetNoBackend)
}

/// IPv4 and IPv6 alike: the reset (RFC 793, `reset_for`) for the segment
/// at `tcp` (`l4_len` bytes of TCP header and data) written over its
/// header: ports swapped, no options, window 0, the checksum left 0 for
/// the caller (its pseudo-header is the family's). `None`, and nothing
/// written, for a reset: a reset is never answered.
///
/// # Safety
/// `tcp` points into the packet, bounds-checked.
#[inline(always)]
pub unsafe fn write_reset(tcp: *mut TcpHdr, l4_len: u32) -> Option<()> {
    // SAFETY: the caller's contract; seq and ack are read unaligned (the
    // header sits at 2 mod 4).
    unsafe {
        let words = core::ptr::addr_of_mut!((*tcp).seq_ack).cast::<u32>();
        let (seq, ack) = (u32::from_be(words.read_unaligned()), u32::from_be(words.add(1).read_unaligned()));
        let [doff, flags] = (*tcp).doff_flags;
        let r = reset_for(flags, seq, ack, l4_len.saturating_sub(4 * u32::from(doff >> 4)))?;
        let (src_port_be, dst_port_be) = ((*tcp).src_port_be, (*tcp).dst_port_be);
        (*tcp).src_port_be = dst_port_be;
        (*tcp).dst_port_be = src_port_be;
        words.write_unaligned(r.seq.to_be());
        words.add(1).write_unaligned(r.ack.to_be());
        (*tcp).doff_flags = [((TCP_HLEN / 4) as u8) << 4, r.flags];
        (*tcp).window_be = 0;
        (*tcp).check = 0;
        (*tcp).urg_be = 0;
    }
    Some(())
}

/// The unreachable: the request is cut after its UDP header, which with the
/// IPv4 header before it becomes the quote, and the new Ethernet, IPv4 and
/// ICMP headers go in front.
#[inline(always)]
fn unreachable(xdp: &Xdp, pkt: &Packet, macs: &Macs) -> Option<Reason> {
    let unreach = [ICMP_DEST_UNREACH, ICMP_PORT_UNREACH];
    let (ip, icmp) =
        unreachable_frame::<Ipv4Hdr, IcmpWords>(xdp, UDP_REQUEST_KEPT, L4_OFF, ETH_P_IP_BE, unreach, macs)?;
    // SAFETY: both bounds-checked by unreachable_frame; the ICMP words
    // reach the quote's end, the frame's.
    unsafe {
        write_ipv4(ip, UNREACH_IP_LEN, PROTO_ICMP, pkt.dst_ip_be, pkt.src_ip_be);
        (*icmp)[1] = checksum(&*icmp, 0);
    }
    Some(Reason::UnreachableNoBackend)
}

/// IPv4 and IPv6 alike: the frame of an unreachable. The request is cut
/// to its first `keep` bytes (Ethernet header and the quote to be), room
/// is made in front for the new `IP` header and the ICMP(v6) header, which
/// is to start at `icmp_off`; the Ethernet header is written (`macs`,
/// `ether_type_be`) and the ICMP header (`[type, code]`) with a zero
/// checksum, which the caller sums next (ICMPv6's covers a pseudo-header
/// too). Returns the IP header and the message's words `M`, both
/// bounds-checked; every older packet pointer is gone.
#[inline(always)]
pub fn unreachable_frame<IP, M>(
    xdp: &Xdp,
    keep: usize,
    icmp_off: usize,
    ether_type_be: u16,
    [icmp_type, code]: [u8; 2],
    macs: &Macs,
) -> Option<(*mut IP, *mut M)> {
    let grow = icmp_off + ICMP_HLEN - ETH_HLEN;
    // SAFETY: a plain helper call; no pointer from before is kept.
    if !trim(xdp, keep) || unsafe { bpf_xdp_adjust_head(xdp.ctx.ctx, -(grow as i32)) } != 0 {
        return None;
    }
    let eth: *mut EthHdr = ptr_at(xdp, 0)?;
    let ip: *mut IP = ptr_at(xdp, ETH_HLEN)?;
    let icmp: *mut IcmpHdr = ptr_at(xdp, icmp_off)?;
    let message: *mut M = ptr_at(xdp, icmp_off)?;
    // SAFETY: all bounds-checked just now.
    unsafe {
        write_eth(eth, macs);
        (*eth).ether_type = ether_type_be;
        *icmp = IcmpHdr { icmp_type, code, check: 0, rest: [0; 2] };
    }
    Some((ip, message))
}

/// Cut the frame to `len` bytes (it is at least that long: parse_packet
/// checked the headers `len` covers).
#[inline(always)]
pub fn trim(xdp: &Xdp, len: usize) -> bool {
    let cut = xdp.packet_len() as i32 - len as i32;
    // SAFETY: a plain helper call; the caller takes no pointer from before.
    cut <= 0 || unsafe { bpf_xdp_adjust_tail(xdp.ctx.ctx, -cut) } == 0
}

/// # Safety
/// `eth` points into the packet, bounds-checked.
#[inline(always)]
pub unsafe fn write_eth(eth: *mut EthHdr, macs: &Macs) {
    unsafe {
        (*eth).dst = macs.dst;
        (*eth).src = macs.src;
    }
}

/// A fresh IPv4 header without options, its checksum included.
///
/// # Safety
/// `ip` points into the packet, bounds-checked.
#[inline(always)]
unsafe fn write_ipv4(ip: *mut Ipv4Hdr, tot_len: u16, proto: u8, src_be: u32, dst_be: u32) {
    unsafe {
        *ip = Ipv4Hdr {
            ver_ihl: 0x45,
            tos: 0,
            tot_len_be: tot_len.to_be(),
            id_be: 0,
            frag_off_be: 0,
            ttl: ANSWER_TTL,
            proto,
            check: 0,
            src_be,
            dst_be,
        };
        (*ip).check = checksum(&*ip.cast::<[u16; 10]>(), 0);
    }
}
