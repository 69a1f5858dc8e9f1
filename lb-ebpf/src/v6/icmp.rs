//! ICMPv6 errors about a flow (RFC 4443: destination unreachable, packet
//! too big, time exceeded), so that path MTU discovery works through the
//! load balancer over IPv6 as `crate::icmp` makes it work over IPv4. Both
//! directions of a translated flow:
//!
//! - A router on the path to a backend that cannot pass a client's
//!   translated packet on answers its source, the client, quoting
//!   client:cport -> backend:bport, which the client's stack would match
//!   to no socket. The quote's destination becomes VIP:vport again; the
//!   error goes on to the client (the flow's MACs stand in for a missing
//!   neighbour entry, as for its replies).
//! - A router on the path to a client that cannot pass a translated reply
//!   answers the reply's source, the VIP, quoting VIP:vport ->
//!   client:cport. As in IPv4, the error goes to the flow's backend: the
//!   outer destination and the quote's source become the backend's.
//!
//! The flow is looked up as a reply's (`nat::lookup_reply_flow`) or as a
//! client packet's (`CONNTRACK6`); the checksums follow incrementally
//! (`lb_common::icmp::translate_quoted6`; ICMPv6's covers the outer
//! addresses too). Then it leaves on the fast path like any translated
//! packet. Informational ICMPv6 (echo, neighbour discovery) never comes
//! here (`divert`); an error about no flow of ours passes untouched.
//!
//! A program of its own (`xdp_icmp6`, slot `V6_SLOT_ICMP` of `V6_PROGS`),
//! reached by a tail call from both IPv6 programs: `xdp_lb6_local` has no
//! stack to spare for it. ICMPv6 checksums are never partial (the kernel
//! computes them in full), so one program serves both.

use aya_ebpf::{macros::xdp, programs::XdpContext};
use lb_common::{
    icmp::{is_flow_error6, translate_quoted6, Quote6Checksums, ICMP_HLEN, QUOTED_L4_MIN},
    refuse::PROTO_ICMPV6,
    v6::{replace16, FlowKey6, Ip6, V6_SLOT_ICMP},
    Reason,
};

use super::{
    nat::lookup_reply_flow,
    parse::{flowinfo_be, Ipv6Hdr, Parsed6},
    route::{self, IPV6_HLEN},
    CONNTRACK6, V6_PROGS,
};
use crate::{
    hook::{Hook, Xdp},
    icmp::{malformed, quoted_flow_l4_check, read_l4, write_l4, IcmpHdr, QuotedPorts},
    nat::L4Checksums,
    parse::{ptr_at, EthHdr, ETH_HLEN},
    Verdict,
};

/// `parse_packet6` balances no extension headers, and our packets carry
/// none: every offset is fixed.
const ICMP_OFF: usize = ETH_HLEN + IPV6_HLEN as usize;
const QUOTE_IP_OFF: usize = ICMP_OFF + ICMP_HLEN;
const QUOTE_L4_OFF: usize = QUOTE_IP_OFF + IPV6_HLEN as usize;

/// For `xdp_lb6` and `xdp_lb6_local`'s ICMPv6 errors (see `divert`).
#[xdp]
pub fn xdp_icmp6(ctx: XdpContext) -> u32 {
    super::finish(forward_error(&Xdp { ctx: &ctx, l4: L4Checksums::Complete }))
}

/// IPv6 that `parse_packet6` found valid but neither TCP nor UDP: an
/// ICMPv6 error goes on to `xdp_icmp6` (a tail call; `PassIpv6NoProgram`
/// when that fails); anything else passes untouched.
#[inline(always)]
pub fn divert(hook: &Xdp) -> Result<(u32, Reason), Verdict> {
    const fn other() -> Verdict {
        Verdict::pass(Reason::PassNotTcpUdp)
    }
    let ip: *mut Ipv6Hdr = ptr_at(hook, ETH_HLEN).ok_or(other())?;
    let icmp: *mut IcmpHdr = ptr_at(hook, ICMP_OFF).ok_or(other())?;
    // SAFETY: both bounds-checked above; read by value.
    if unsafe { (*ip).next_header } != PROTO_ICMPV6 || !is_flow_error6(unsafe { (*icmp).icmp_type }) {
        return Err(other());
    }
    // SAFETY: on success the tail call does not return.
    unsafe { V6_PROGS.tail_call(hook.ctx, V6_SLOT_ICMP) };
    Err(Verdict::pass(Reason::PassIpv6NoProgram))
}

/// An ICMPv6 error about a TCP or UDP packet sent from the error's
/// destination, bounds-checked, with the quote's addresses and ports.
struct FlowError6 {
    eth: *mut EthHdr,
    outer: *mut Ipv6Hdr,
    icmp: *mut IcmpHdr,
    quoted: *mut Ipv6Hdr,
    ports: *mut QuotedPorts,
    /// The quoted L4 checksum, where the quote holds it.
    l4_check: Option<*mut u16>,
    proto: u8,
    src: Ip6,
    dst: Ip6,
    src_port_be: u16,
    dst_port_be: u16,
}

/// Which end of the quoted packet a translation changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Src,
    Dst,
}

/// An ICMPv6 error about one of our flows translated and sent on,
/// `Ok((action, IcmpForwarded))`; anything else passes untouched.
#[inline(always)]
fn forward_error(hook: &Xdp) -> Result<(u32, Reason), Verdict> {
    let err = parse_flow_error(hook)?;
    // About a reply (VIP -> client), sent to the VIP: to the backend.
    let reply_key = FlowKey6::new(err.dst, err.dst_port_be, err.src, err.src_port_be, err.proto);
    if let Some(c) = CONNTRACK6.get_ptr_mut(&reply_key) {
        // SAFETY: LRU value, copied out at once.
        let (backend, bport_be) = unsafe { ((*c).nat_ip, (*c).conn.nat_port_be) };
        // SAFETY: every pointer bounds-checked by parse_flow_error; XDP
        // moves no packet data.
        unsafe {
            let icmp = rewrite_quote(&err, End::Src, &backend, bport_be);
            // The outer destination is in ICMPv6's pseudo-header.
            (*err.icmp).check = replace16(icmp, &err.src, &backend);
            core::ptr::addr_of_mut!((*err.outer).dst).write_unaligned(backend);
        }
        let pkt = outer_packet(hook, &err);
        return Ok((route::send_on(hook, &pkt, None, false), Reason::IcmpForwarded));
    }
    // About a client's packet (client -> backend), sent to the client.
    let found = lookup_reply_flow(&err.src, err.src_port_be, &err.dst, err.dst_port_be, err.proto);
    let Some((c, vip, vport_be)) = found else { return Err(Verdict::pass(Reason::PassIcmpNoFlow)) };
    // SAFETY: LRU value, copied out at once.
    let conn = unsafe { (*c).conn };
    // SAFETY: as above.
    unsafe { (*err.icmp).check = rewrite_quote(&err, End::Dst, &vip, vport_be) };
    let pkt = outer_packet(hook, &err);
    Ok((route::send_on(hook, &pkt, Some(&conn), false), Reason::IcmpForwarded))
}

/// The error and its quote, or why it is not one we can look up.
#[inline(always)]
fn parse_flow_error(hook: &Xdp) -> Result<FlowError6, Verdict> {
    let eth: *mut EthHdr = ptr_at(hook, 0).ok_or(malformed())?;
    let outer: *mut Ipv6Hdr = ptr_at(hook, ETH_HLEN).ok_or(malformed())?;
    let icmp: *mut IcmpHdr = ptr_at(hook, ICMP_OFF).ok_or(malformed())?;
    let quoted: *mut Ipv6Hdr = ptr_at(hook, QUOTE_IP_OFF).ok_or(malformed())?;
    let ports: *mut QuotedPorts = ptr_at(hook, QUOTE_L4_OFF).ok_or(malformed())?;
    // SAFETY: bounds-checked above; read by value (packed headers).
    let (payload_len, outer_dst, vtf, proto, src, dst, [src_port_be, dst_port_be]) = unsafe {
        let q = &*quoted;
        (
            u16::from_be((*outer).payload_len_be),
            (*outer).dst,
            q.ver_tc_flow,
            q.next_header,
            q.src,
            q.dst,
            [(*ports).src_port_be, (*ports).dst_port_be],
        )
    };
    // Within the frame: `parse_packet6` checked it before the tail call.
    // Not checked again here, on purpose: from `ip_end <= packet_len` LLVM
    // proves the quoted L4 checksum's own bounds check redundant and drops
    // it, which the verifier cannot follow.
    let ip_end = ICMP_OFF + payload_len as usize;
    if QUOTE_L4_OFF + QUOTED_L4_MIN > ip_end || vtf[0] >> 4 != 6 {
        return Err(malformed());
    }
    // Our packets carry no extension headers (`proto` is TCP or UDP); an
    // error about a packet is sent to its source.
    let l4_check = quoted_flow_l4_check(hook, proto, outer_dst == src, QUOTE_L4_OFF, ip_end)?;
    Ok(FlowError6 { eth, outer, icmp, quoted, ports, l4_check, proto, src, dst, src_port_be, dst_port_be })
}

/// The quote's `end` becomes `ip`:`port_be`, its L4 checksum with it;
/// returns the ICMPv6 checksum after that, for the caller to finish.
///
/// # Safety
/// `err`'s pointers are bounds-checked and valid.
#[inline(always)]
unsafe fn rewrite_quote(err: &FlowError6, end: End, ip: &Ip6, port_be: u16) -> u16 {
    unsafe {
        let (old_ip, old_port, field, port) = match end {
            End::Src => (
                err.src,
                err.src_port_be,
                core::ptr::addr_of_mut!((*err.quoted).src),
                core::ptr::addr_of_mut!((*err.ports).src_port_be),
            ),
            End::Dst => (
                err.dst,
                err.dst_port_be,
                core::ptr::addr_of_mut!((*err.quoted).dst),
                core::ptr::addr_of_mut!((*err.ports).dst_port_be),
            ),
        };
        let sums = Quote6Checksums { icmp: (*err.icmp).check, quoted_l4: read_l4(err.l4_check) };
        let new = translate_quoted6(sums, err.proto, &old_ip, ip, old_port, port_be);
        field.write_unaligned(*ip);
        *port = port_be;
        write_l4(err.l4_check, new.quoted_l4);
        new.icmp
    }
}

/// The translated error as the fast path sees a packet: its outer header
/// only (no ports; the FIB looks up by addresses).
#[inline(always)]
fn outer_packet(hook: &Xdp, err: &FlowError6) -> Parsed6 {
    // SAFETY: bounds-checked by parse_flow_error; read by value.
    let (vtf, payload_len_be, hop_limit, src, dst, src_mac, dst_mac) = unsafe {
        let ip = &*err.outer;
        (ip.ver_tc_flow, ip.payload_len_be, ip.hop_limit, ip.src, ip.dst, (*err.eth).src, (*err.eth).dst)
    };
    Parsed6 {
        eth: err.eth,
        ip: err.outer,
        // Nothing on the way out updates an L4 checksum of ICMPv6.
        l4_check: core::ptr::null_mut(),
        l4_ports: core::ptr::null_mut(),
        payload_len: u16::from_be(payload_len_be),
        hop_limit,
        flowinfo_be: flowinfo_be(vtf),
        src,
        dst,
        src_port_be: 0,
        dst_port_be: 0,
        proto: PROTO_ICMPV6,
        tcp_flags: 0,
        ingress_ifindex: hook.ingress_ifindex(),
        src_mac,
        dst_mac,
    }
}
