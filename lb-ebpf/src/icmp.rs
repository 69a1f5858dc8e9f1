//! ICMP errors about a VIP flow, so that path MTU discovery works through
//! the load balancer (what Linux's NAT does in `nf_nat_icmp_reply_translation`).
//!
//! A router on a client's path that cannot pass one of our replies on
//! (fragmentation needed, TTL exceeded, ...) answers its source, the VIP,
//! quoting the reply's IPv4 header and the first 8 bytes of its TCP or UDP
//! header: src VIP:vport, dst client:cport. The flow's forward key is that
//! quote turned round. For a flow in the table the error goes to its
//! backend as the backend's own reply would have come back: the outer
//! destination VIP -> backend, the quoted source VIP:vport ->
//! backend:bport, and the checksums with them (`lb_common::icmp`); then it
//! leaves on the fast path like a forward packet. Anything else passes
//! untouched, counted.
//!
//! Every edit keeps each checksummed region's sum (outer IPv4 header, ICMP
//! message) as it was, so a CHECKSUM_COMPLETE skb's `csum` stays right in tc
//! and the bytes can be written directly in both hooks.

use lb_common::{
    csum,
    icmp::{is_flow_error, quoted_l4_check, translate_quoted_source, QuoteChecksums, ICMP_HLEN, QUOTED_L4_MIN},
    Reason, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
};

use crate::{
    hook::Hook,
    nat,
    parse::{ptr_at, EthHdr, Ipv4Hdr, Parsed, ETH_HLEN},
    route, Verdict,
};

/// `parse_packet` passes IPv4 with options, so the outer header is 20
/// bytes and every offset below is fixed.
const ICMP_OFF: usize = ETH_HLEN + 20;
const QUOTE_IP_OFF: usize = ICMP_OFF + ICMP_HLEN;
const QUOTE_L4_OFF: usize = QUOTE_IP_OFF + 20;
/// The most of the frame this module reads: a whole quoted TCP header.
const QUOTE_END_MAX: usize = QUOTE_L4_OFF + 20;
/// The fragment offset, in network order.
const IP_OFFSET_BE: u16 = 0x1fffu16.to_be();

/// An ICMP or ICMPv6 header: the same 8 bytes.
#[repr(C)]
pub struct IcmpHdr {
    pub icmp_type: u8,
    pub code: u8,
    pub check: u16,
    pub rest: [u16; 2],
}

/// The first 8 bytes of the quoted TCP or UDP header.
#[repr(C)]
pub struct QuotedPorts {
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub rest: [u16; 2],
}

/// An ICMP error about a TCP or UDP packet sent from the error's
/// destination (a reply from a VIP, if it is ours), bounds-checked.
#[derive(Clone, Copy)]
struct FlowError {
    eth: *mut EthHdr,
    outer: *mut Ipv4Hdr,
    icmp: *mut IcmpHdr,
    quoted: *mut Ipv4Hdr,
    ports: *mut QuotedPorts,
    /// The quoted L4 checksum, where the quote holds it (see
    /// `lb_common::icmp::quoted_l4_check`).
    l4_check: Option<*mut u16>,
    proto: u8,
    vip_be: u32,
    client_be: u32,
    vport_be: u16,
    client_port_be: u16,
}

pub const fn malformed() -> Verdict {
    Verdict::pass(Reason::PassIcmpMalformed)
}

/// IPv4 that `parse_packet` found valid, without options or fragmentation,
/// but neither TCP nor UDP: an ICMP error about one of our flows is
/// translated and sent on, `Ok((action, IcmpForwarded))`; anything else
/// passes untouched with its reason.
#[inline(always)]
pub fn forward_error<H: Hook>(hook: &H) -> Result<(u32, Reason), Verdict> {
    let err = parse_flow_error(hook)?;
    let conn = nat::lookup_flow(err.client_be, err.client_port_be, err.vip_be, err.vport_be, err.proto)
        // SAFETY: copied out at once; see `nat::forward`.
        .map(|c| unsafe { *c })
        .ok_or(Verdict::pass(Reason::PassIcmpNoFlow))?;
    rewrite_to_backend(&err, conn.nat_ip_be, conn.nat_port_be);
    let pkt = translated(hook, err.eth, err.outer);
    Ok((route::send_on(hook, &pkt, None, false), Reason::IcmpForwarded))
}

/// The error and its quote, or why it is not one we can look up.
#[inline(always)]
fn parse_flow_error<H: Hook>(hook: &H) -> Result<FlowError, Verdict> {
    let outer: *mut Ipv4Hdr = ptr_at(hook, ETH_HLEN).ok_or(malformed())?;
    // SAFETY: bounds-checked above; read by value (packed header).
    if unsafe { (*outer).proto } != PROTO_ICMP {
        return Err(Verdict::pass(Reason::PassNotTcpUdp));
    }
    // The ICMP header lies within the headers the hook already has in view
    // (`Tc::pull_headers`): only an error about a flow is worth the pull of
    // its quote, not every ping.
    let icmp: *mut IcmpHdr = ptr_at(hook, ICMP_OFF).ok_or(malformed())?;
    // SAFETY: bounds-checked above; read by value. parse_packet checked the
    // total length against the packet's.
    let (tot_len_be, icmp_type) = unsafe { ((*outer).tot_len_be, (*icmp).icmp_type) };
    let ip_end = ETH_HLEN + u16::from_be(tot_len_be) as usize;
    if ICMP_OFF + ICMP_HLEN > ip_end {
        return Err(malformed());
    }
    if !is_flow_error(icmp_type) {
        return Err(Verdict::pass(Reason::PassNotTcpUdp));
    }
    hook.pull(QUOTE_END_MAX);
    // Taken afresh: the pull invalidated every packet pointer (tc).
    let eth: *mut EthHdr = ptr_at(hook, 0).ok_or(malformed())?;
    let outer: *mut Ipv4Hdr = ptr_at(hook, ETH_HLEN).ok_or(malformed())?;
    let icmp: *mut IcmpHdr = ptr_at(hook, ICMP_OFF).ok_or(malformed())?;
    // SAFETY: bounds-checked above; read by value.
    let outer_dst_be = unsafe { (*outer).dst_be };
    let quoted: *mut Ipv4Hdr = ptr_at(hook, QUOTE_IP_OFF).ok_or(malformed())?;
    let ports: *mut QuotedPorts = ptr_at(hook, QUOTE_L4_OFF).ok_or(malformed())?;
    if QUOTE_L4_OFF + QUOTED_L4_MIN > ip_end {
        return Err(malformed());
    }
    // SAFETY: bounds-checked above; read by value (packed header).
    let (ver_ihl, frag, proto, vip_be, client_be, [vport_be, client_port_be]) = unsafe {
        let q = &*quoted;
        (q.ver_ihl, q.frag_off_be, q.proto, q.src_be, q.dst_be, [(*ports).src_port_be, (*ports).dst_port_be])
    };
    // A later fragment's first bytes are no ports; our replies carry no
    // options.
    if ver_ihl != 0x45 || frag & IP_OFFSET_BE != 0 {
        return Err(malformed());
    }
    // An error about a reply of ours is sent to the reply's source, the VIP.
    let l4_check = quoted_flow_l4_check(hook, proto, outer_dst_be == vip_be, QUOTE_L4_OFF, ip_end)?;
    Ok(FlowError { eth, outer, icmp, quoted, ports, l4_check, proto, vip_be, client_be, vport_be, client_port_be })
}

/// The outer destination and the quoted source become the backend's, and
/// every checksum follows (`lb_common::icmp`; RFC 1624 for the outer
/// header).
#[inline(always)]
fn rewrite_to_backend(err: &FlowError, backend_be: u32, bport_be: u16) {
    let FlowError { outer, icmp, quoted, ports, l4_check, proto, vip_be, vport_be, .. } = *err;
    // SAFETY: every pointer bounds-checked by parse_flow_error; the packed
    // headers' fields are read and written by value.
    unsafe {
        let sums = QuoteChecksums { icmp: (*icmp).check, quoted_ip: (*quoted).check, quoted_l4: read_l4(l4_check) };
        let new = translate_quoted_source(sums, proto, vip_be, backend_be, vport_be, bport_be);
        (*quoted).src_be = backend_be;
        (*ports).src_port_be = bport_be;
        (*quoted).check = new.quoted_ip;
        write_l4(l4_check, new.quoted_l4);
        (*icmp).check = new.icmp;
        (*outer).dst_be = backend_be;
        (*outer).check = csum::replace4((*outer).check, vip_be, backend_be);
    }
}

/// ICMP and ICMPv6 alike: an error about a TCP or UDP packet (`proto`
/// quoted) that was sent to that packet's source (`to_source`) may be
/// about one of our flows: the quoted L4 checksum (`quoted_l4_check_ptr`
/// of the quoted header at `l4_off`). Anything else is about none.
#[inline(always)]
pub fn quoted_flow_l4_check<H: Hook>(
    hook: &H,
    proto: u8,
    to_source: bool,
    l4_off: usize,
    ip_end: usize,
) -> Result<Option<*mut u16>, Verdict> {
    if (proto != PROTO_TCP && proto != PROTO_UDP) || !to_source {
        return Err(Verdict::pass(Reason::PassIcmpNoFlow));
    }
    Ok(quoted_l4_check_ptr(hook, proto, l4_off, ip_end))
}

/// The quoted L4 checksum's value, where the quote holds it (ICMP and
/// ICMPv6).
///
/// # Safety
/// `l4_check` comes from `quoted_l4_check_ptr`, nothing moved the packet.
#[inline(always)]
pub unsafe fn read_l4(l4_check: Option<*mut u16>) -> Option<u16> {
    match l4_check {
        // SAFETY: the caller's contract.
        Some(p) => Some(unsafe { *p }),
        None => None,
    }
}

/// The translated quoted L4 checksum, where the quote holds it.
///
/// # Safety
/// As for `read_l4`.
#[inline(always)]
pub unsafe fn write_l4(l4_check: Option<*mut u16>, new: Option<u16>) {
    if let (Some(p), Some(c)) = (l4_check, new) {
        // SAFETY: the caller's contract.
        unsafe { *p = c };
    }
}

/// The quoted L4 checksum of the quoted header at `l4_off`, where the
/// quote (to `ip_end`) holds enough of that header for it to be updated
/// (`lb_common::icmp::quoted_l4_check` says how much); ICMP and ICMPv6.
#[inline(always)]
pub fn quoted_l4_check_ptr<H: Hook>(hook: &H, proto: u8, l4_off: usize, ip_end: usize) -> Option<*mut u16> {
    let (at, needs) = quoted_l4_check(proto)?;
    if l4_off + needs > ip_end {
        return None;
    }
    // One bounds check on the field itself: with one per header type, LLVM
    // merged the arms and the verifier saw TCP's offset under UDP's check.
    ptr_at::<u16, _>(hook, l4_off + at)
}

/// The translated error as the fast path sees a packet: its outer header
/// only (no ports; the FIB looks up by addresses).
#[inline(always)]
fn translated<H: Hook>(hook: &H, eth: *mut EthHdr, ip: *mut Ipv4Hdr) -> Parsed {
    // SAFETY: both bounds-checked by the caller; read by value.
    let (tot_len_be, tos, ttl, src_ip_be, dst_ip_be) =
        unsafe { ((*ip).tot_len_be, (*ip).tos, (*ip).ttl, (*ip).src_be, (*ip).dst_be) };
    // SAFETY: bounds-checked by the caller; copied out.
    let (src_mac, dst_mac) = unsafe { ((*eth).src, (*eth).dst) };
    Parsed {
        eth,
        ip,
        // Nothing on the way out updates an L4 checksum of ICMP.
        l4_check: core::ptr::null_mut(),
        l4_ports: core::ptr::null_mut(),
        l4_check_off: 0,
        tot_len: u16::from_be(tot_len_be),
        tos,
        ttl,
        src_ip_be,
        dst_ip_be,
        src_port_be: 0,
        dst_port_be: 0,
        proto: PROTO_ICMP,
        tcp_flags: 0,
        ingress_ifindex: hook.ingress_ifindex(),
        src_mac,
        dst_mac,
    }
}
