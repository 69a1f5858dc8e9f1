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
//! (`UNREACH_QUOTE_LEN`).
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
    parse::{ptr_at, EthHdr, Ipv4Hdr, TcpHdr, ETH_HLEN},
    route,
    Packet, Verdict, EGRESS,
};

/// `parse_packet` passes IPv4 with options: every offset is fixed.
const L4_OFF: usize = ETH_HLEN + 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// A reset: Ethernet, IPv4 and a TCP header without options.
const RESET_LEN: usize = L4_OFF + TCP_HLEN;
/// The part of a UDP request an unreachable keeps (as its quote).
const UDP_REQUEST_KEPT: usize = L4_OFF + UDP_HLEN;
/// Inserted before the quote: the new IPv4 and ICMP headers.
const UNREACH_GROWTH: usize = 20 + ICMP_HLEN;
const UNREACH_IP_LEN: u16 = (20 + ICMP_HLEN + UNREACH_QUOTE_LEN) as u16;

/// ICMP header and quote, as 16-bit words for the checksum.
type IcmpWords = [u16; (ICMP_HLEN + UNREACH_QUOTE_LEN) / 2];

/// Answer `pkt` (a new flow the Maglev table had no backend for) and send
/// the answer back, or drop it when there is none to give.
#[inline(always)]
pub fn answer(xdp: &Xdp, pkt: &Packet) -> Result<(u32, Reason), Verdict> {
    let (action, path, macs) = if EGRESS.get_ifindex(pkt.ingress_ifindex).is_some() {
        (xdp_action::XDP_TX, Path::TxBack, Macs { dst: pkt.src_mac, src: pkt.dst_mac })
    } else {
        // Still addressed to this host, or the stack would not take it.
        (xdp_action::XDP_PASS, Path::PassEgressNotReady, Macs { dst: pkt.dst_mac, src: pkt.src_mac })
    };
    let sent = if pkt.proto == PROTO_TCP { reset(xdp, pkt, &macs) } else { unreachable(xdp, pkt, &macs) };
    let reason = sent.ok_or(Verdict::drop(Reason::DropNoBackend))?;
    route::count_path(pkt.ingress_ifindex, path);
    Ok((action, reason))
}

/// The answer's Ethernet addresses: back to the client's MAC when it is
/// sent back (XDP_TX), as it arrived when it passes up (the kernel then
/// forwards it and sets them).
struct Macs {
    dst: [u8; 6],
    src: [u8; 6],
}

/// The reset, over the request's own headers; the frame is cut after the
/// TCP header.
#[inline(always)]
fn reset(xdp: &Xdp, pkt: &Packet, macs: &Macs) -> Option<Reason> {
    let tcp: *mut TcpHdr = ptr_at(xdp, L4_OFF)?;
    // SAFETY: bounds-checked above; seq and ack are read unaligned (the
    // header sits at 2 mod 4).
    let (seq, ack, doff) = unsafe {
        let words = core::ptr::addr_of!((*tcp).seq_ack).cast::<u32>();
        (u32::from_be(words.read_unaligned()), u32::from_be(words.add(1).read_unaligned()), (*tcp).doff_flags[0] >> 4)
    };
    let payload = u32::from(pkt.tot_len).saturating_sub(20 + 4 * u32::from(doff));
    let r = reset_for(pkt.tcp_flags, seq, ack, payload)?;
    let (vip_be, client_be) = (pkt.dst_ip_be, pkt.src_ip_be);
    // SAFETY: parse_packet bounds-checked `eth` and `ip`, `tcp` above; no
    // helper has moved the packet since.
    unsafe {
        write_eth(pkt.eth, macs);
        write_ipv4(pkt.ip, (20 + TCP_HLEN) as u16, PROTO_TCP, vip_be, client_be);
        (*tcp).src_port_be = pkt.dst_port_be;
        (*tcp).dst_port_be = pkt.src_port_be;
        let words = core::ptr::addr_of_mut!((*tcp).seq_ack).cast::<u32>();
        words.write_unaligned(r.seq.to_be());
        words.add(1).write_unaligned(r.ack.to_be());
        (*tcp).doff_flags = [((TCP_HLEN / 4) as u8) << 4, r.flags];
        (*tcp).window_be = 0;
        (*tcp).check = 0;
        (*tcp).urg_be = 0;
        (*tcp).check = tcp_checksum(vip_be, client_be, &*tcp.cast::<[u16; TCP_HLEN / 2]>());
    }
    trim(xdp, RESET_LEN).then_some(Reason::ResetNoBackend)
}

/// The unreachable: the request is cut after its UDP header, which with the
/// IPv4 header before it becomes the quote, and the new Ethernet, IPv4 and
/// ICMP headers go in front.
#[inline(always)]
fn unreachable(xdp: &Xdp, pkt: &Packet, macs: &Macs) -> Option<Reason> {
    if !trim(xdp, UDP_REQUEST_KEPT) {
        return None;
    }
    // SAFETY: a plain helper call; every packet pointer is taken afresh
    // below.
    if unsafe { bpf_xdp_adjust_head(xdp.ctx.ctx, -(UNREACH_GROWTH as i32)) } != 0 {
        return None;
    }
    let eth: *mut EthHdr = ptr_at(xdp, 0)?;
    let ip: *mut Ipv4Hdr = ptr_at(xdp, ETH_HLEN)?;
    let icmp: *mut IcmpWords = ptr_at(xdp, L4_OFF)?;
    // SAFETY: all three bounds-checked just now; the ICMP words reach the
    // quote's end, the frame's.
    unsafe {
        write_eth(eth, macs);
        (*eth).ether_type = 0x0800u16.to_be();
        write_ipv4(ip, UNREACH_IP_LEN, PROTO_ICMP, pkt.dst_ip_be, pkt.src_ip_be);
        let head = icmp.cast::<u8>();
        head.write(ICMP_DEST_UNREACH);
        head.add(1).write(ICMP_PORT_UNREACH);
        // Checksum and the 4 unused bytes.
        (*icmp)[1] = 0;
        (*icmp)[2] = 0;
        (*icmp)[3] = 0;
        (*icmp)[1] = checksum(&*icmp, 0);
    }
    Some(Reason::UnreachableNoBackend)
}

/// Cut the frame to `len` bytes (it is at least that long: parse_packet
/// checked the headers `len` covers).
#[inline(always)]
fn trim(xdp: &Xdp, len: usize) -> bool {
    let cut = xdp.packet_len() as i32 - len as i32;
    // SAFETY: a plain helper call; the caller takes no pointer from before.
    cut <= 0 || unsafe { bpf_xdp_adjust_tail(xdp.ctx.ctx, -cut) } == 0
}

/// # Safety
/// `eth` points into the packet, bounds-checked.
#[inline(always)]
unsafe fn write_eth(eth: *mut EthHdr, macs: &Macs) {
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
