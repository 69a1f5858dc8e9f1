//! Destination NAT with reverse translation, driven by the connection table.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    csum, hash::flow_hash, BackendAddr, Conn, Counters, FlowKey, Reason, Service, MAX_VIPS_PER_BACKEND, PROTO_TCP, PROTO_UDP,
    tcp_seen_after, TcpState,
};

use crate::{
    hook::Hook,
    parse::{TCP_ACK, TCP_SYN},
    select::pick_backend,
    stats::count_flow,
    Packet, Verdict, BACKEND_VIPS, CONNTRACK, FLOW_BUDGET, SETTINGS,
};

/// The connection-table entry of the flow from a client to a VIP (its only
/// entry), or `None`. A hit marks the entry recently used.
#[inline(always)]
pub fn lookup_flow(client_ip_be: u32, client_port_be: u16, vip_be: u32, vip_port_be: u16, proto: u8) -> Option<*mut Conn> {
    CONNTRACK.get_ptr_mut(&FlowKey::new(client_ip_be, client_port_be, vip_be, vip_port_be, proto))
}

/// A client packet for `svc`: find or pick the backend, rewrite the
/// destination to it. `Ok(true)` when the L4 checksum is a partial one.
#[inline(always)]
pub fn forward<H: Hook>(hook: &H, pkt: &mut Packet, svc: &Service) -> Result<bool, Verdict> {
    let conn = flow_of(hook, pkt, svc)?;
    Ok(rewrite(hook, pkt, End::Dst, conn.nat_ip_be, conn.nat_port_be))
}

/// The flow entry of a client packet for `svc`: the one the table holds,
/// or a new Maglev pick; the packet is counted for its service and backend.
/// Every forwarding mode starts here.
#[inline(always)]
pub fn flow_of<H: Hook>(hook: &H, pkt: &Packet, svc: &Service) -> Result<Conn, Verdict> {
    let key = FlowKey::new(pkt.src_ip_be, pkt.src_port_be, pkt.dst_ip_be, pkt.dst_port_be, pkt.proto);
    let (conn, delta) = track(hook, pkt, svc, &key)?;
    count_flow(conn.service_id, conn.backend_id, &delta);
    Ok(conn)
}

/// Whether `pkt` is a TCP SYN without ACK: the start of a connection.
#[inline(always)]
pub fn is_syn(pkt: &Packet) -> bool {
    pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The flow entry (`key`) of a client packet for `svc`, found or opened,
/// with the counters the packet adds (not counted yet).
#[inline(always)]
pub fn track<H: Hook>(hook: &H, pkt: &Packet, svc: &Service, key: &FlowKey) -> Result<(Conn, Counters), Verdict> {
    let frame_len = hook.packet_len() as u64;
    let now = unsafe { bpf_ktime_get_ns() };
    let mut delta = Counters { packets: 1, bytes: frame_len, ..Counters::default() };
    // A SYN starts a new connection, so it takes a fresh pick even when the
    // table remembers the 5-tuple (as Katran does): a client reusing a port
    // must not be sent to the backend an old, closed flow had, which may be
    // drained and gone by now.
    let syn = is_syn(pkt);
    let conn = match CONNTRACK.get_ptr_mut(key) {
        Some(c) if !syn => {
            // SAFETY: LRU value; a racing update from another CPU can at worst
            // blur a timestamp or a flag, never the translation itself.
            let c = unsafe { &mut *c };
            c.last_seen_ns = now;
            mark_tcp(c, pkt, false, &mut delta);
            *c
        }
        known => {
            // A TCP packet other than a SYN without a flow (evicted, or from
            // before a restart) re-picks: the same backend while the backend
            // set stays, as Maglev is consistent. Within a budget only, so
            // that a flood of such packets cannot churn the table.
            if known.is_none() && pkt.proto == PROTO_TCP && !syn && !non_syn_budget_left(now) {
                return Err(Verdict::drop(Reason::DropNonSynOverBudget));
            }
            // The backend of a flow still opening, else NOT_OPENING: a plain
            // number, not an Option<Conn>. LLVM compares the payload of a
            // None too (the result is discarded), and kernels before 6.3
            // refuse that read of stack never written ("invalid read from
            // stack"; reads of uninitialised stack are allowed from 6.3 on).
            const NOT_OPENING: u64 = u64::MAX;
            // SAFETY: as above; read at once.
            let opening = known.map_or(NOT_OPENING, |c| {
                let c = unsafe { *c };
                if c.tcp_seen == 0 {
                    u64::from(c.backend_id)
                } else {
                    NOT_OPENING
                }
            });
            let c = open_flow(pkt, svc, key, now)?;
            // A retransmitted SYN of a flow still opening is not a new flow.
            let retransmit = opening == u64::from(c.backend_id);
            delta.new_flows = if retransmit { 0 } else { 1 };
            c
        }
    };
    Ok((conn, delta))
}

/// A packet from a backend to a client of a flow we translated: rewrite the
/// source back to the VIP. The backend's address names the services it
/// serves (`BACKEND_VIPS`); the flow is the one from this client to one of
/// them whose entry holds this backend. Returns the flow's entry, and whether
/// the L4 checksum is a partial one. Anything else is not ours (a health
/// probe's answer among them: it has no flow).
#[inline(always)]
pub fn reply<H: Hook>(hook: &H, pkt: &mut Packet) -> Result<(Conn, bool), Verdict> {
    let frame_len = hook.packet_len() as u64;
    let not_ours = Verdict::pass(Reason::PassNoService);
    let addr = BackendAddr { ip_be: pkt.src_ip_be, port_be: pkt.src_port_be, proto: pkt.proto, _pad: 0 };
    // SAFETY: copied out at once; the agent replaces entries whole.
    let vips = match unsafe { BACKEND_VIPS.get(&addr) } {
        Some(v) => *v,
        None => return Err(not_ours),
    };
    let mut found = None;
    for vip in vips.vips.iter().take(MAX_VIPS_PER_BACKEND) {
        if vip.vip_be == 0 {
            break;
        }
        if let Some(c) = lookup_flow(pkt.dst_ip_be, pkt.dst_port_be, vip.vip_be, vip.port_be, pkt.proto) {
            // SAFETY: as in `forward`.
            let c = unsafe { &mut *c };
            if c.nat_ip_be == pkt.src_ip_be && c.nat_port_be == pkt.src_port_be {
                found = Some((c, vip.vip_be, vip.port_be));
                break;
            }
        }
    }
    let Some((c, vip_be, vip_port_be)) = found else { return Err(not_ours) };
    c.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    let mut delta = Counters { reply_packets: 1, reply_bytes: frame_len, ..Counters::default() };
    mark_tcp(c, pkt, true, &mut delta);
    let c = *c;
    count_flow(c.service_id, c.backend_id, &delta);
    Ok((c, rewrite(hook, pkt, End::Src, vip_be, vip_port_be)))
}

/// Takes one from this CPU's budget of flows started by non-SYN packets.
#[inline(always)]
pub fn non_syn_budget_left(now: u64) -> bool {
    let per_sec = SETTINGS.get(0).map_or(0, |s| s.non_syn_flows_per_sec);
    match FLOW_BUDGET.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, nothing else writes it while we run.
        Some(b) => unsafe { (*b).take(now, per_sec) },
        None => false,
    }
}

/// A new flow: pick its backend from the Maglev table and remember the pick
/// in the flow's one entry.
#[inline(always)]
fn open_flow(pkt: &Packet, svc: &Service, key: &FlowKey, now: u64) -> Result<Conn, Verdict> {
    let hash = flow_hash(pkt.src_ip_be, pkt.dst_ip_be, pkt.src_port_be, pkt.dst_port_be, pkt.proto);
    let (backend_id, backend) = pick_backend(svc, hash).map_err(Verdict::drop)?;
    let conn = Conn {
        nat_ip_be: backend.ip_be,
        nat_port_be: backend.port_be,
        // Full NAT claims its port after the pick (`fullnat`).
        snat_ip_be: backend.snat_ip_be,
        ..Conn::opened(backend_id, svc.id, now, pkt.ingress_ifindex, pkt.src_mac, pkt.dst_mac)
    };
    if CONNTRACK.insert(key, &conn, 0).is_err() {
        return Err(Verdict::drop(Reason::DropConntrackFull));
    }
    Ok(conn)
}

/// A TCP packet's flags into its flow's `tcp_seen`; a flow it closes is
/// counted (see `TcpState`).
#[inline(always)]
pub fn mark_tcp(c: &mut Conn, pkt: &Packet, from_backend: bool, delta: &mut Counters) {
    mark_tcp_flags(c, pkt.proto, pkt.tcp_flags, from_backend, delta)
}

/// `mark_tcp` by the packet's protocol and TCP flags (IPv6 has its own
/// packet type).
#[inline(always)]
pub fn mark_tcp_flags(c: &mut Conn, proto: u8, tcp_flags: u8, from_backend: bool, delta: &mut Counters) {
    if proto != PROTO_TCP {
        return;
    }
    let next = tcp_seen_after(c.tcp_seen, tcp_flags, from_backend);
    if next != c.tcp_seen {
        if TcpState::of(next) == TcpState::Closed && TcpState::of(c.tcp_seen) != TcpState::Closed {
            delta.closed_flows = 1;
        }
        c.tcp_seen = next;
    }
}

/// Which end of a flow a rewrite changes; also the index of its port in
/// the L4 header.
#[derive(Clone, Copy)]
enum End {
    Src = 0,
    Dst = 1,
}

/// What the L4 checksums arriving on an interface can be. The bytes alone
/// cannot tell: a complete checksum equals the pseudo-header sum for one
/// packet in 65,536, so the choice is made per interface, by the agent, as
/// the program it attaches (`xdp_lb` or `xdp_lb_local`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4Checksums {
    /// Always complete: packets from a wire (a NIC validates, never
    /// finishes, a received checksum).
    Complete,
    /// Partial ones too (CHECKSUM_PARTIAL): packets a local stack sends over
    /// veth, a bridge or tap carry only the pseudo-header sum, finished by
    /// whichever device sends them on. A field holding exactly that sum is
    /// taken for a partial one.
    MaybePartial,
}

/// Write the new address and port of `end`, update the IP header checksum
/// (RFC 1624), and let the hook update the L4 one; `pkt`'s values follow.
/// Returns whether the L4 checksum is a partial one the fast path cannot
/// send (XDP only).
#[inline(always)]
fn rewrite<H: Hook>(hook: &H, pkt: &mut Packet, end: End, ip_be: u32, port_be: u16) -> bool {
    // SAFETY: the pointers come from parse_packet and were bounds-checked.
    let old = unsafe { write_end(pkt, end, ip_be, port_be) };
    finish_end(hook, pkt, end, old, ip_be, port_be)
}

/// Both ends at once (full NAT): `src` and `dst` as (address, port).
/// Both are written before either L4 checksum update, which may invalidate
/// the packet's pointers (tc); each update then sees the pseudo-header as
/// it is at that step (XDP's partial-checksum test reads it).
#[inline(always)]
pub fn rewrite_both<H: Hook>(hook: &H, pkt: &mut Packet, src: (u32, u16), dst: (u32, u16)) -> bool {
    // SAFETY: as in `rewrite`; nothing has moved the packet yet.
    let (old_src, old_dst) = unsafe { (write_end(pkt, End::Src, src.0, src.1), write_end(pkt, End::Dst, dst.0, dst.1)) };
    let partial_src = finish_end(hook, pkt, End::Src, old_src, src.0, src.1);
    let partial_dst = finish_end(hook, pkt, End::Dst, old_dst, dst.0, dst.1);
    partial_src || partial_dst
}

/// The new address and port of `end` into the packet's bytes, and the IP
/// header checksum with them; returns the old ones.
///
/// # Safety
/// `pkt`'s pointers must be bounds-checked and still valid.
#[inline(always)]
unsafe fn write_end(pkt: &Packet, end: End, ip_be: u32, port_be: u16) -> (u32, u16) {
    // The address sits in a packed header: read and written unaligned.
    unsafe {
        let ip_field = match end {
            End::Src => core::ptr::addr_of_mut!((*pkt.ip).src_be),
            End::Dst => core::ptr::addr_of_mut!((*pkt.ip).dst_be),
        };
        let old_ip = ip_field.read_unaligned();
        let old_port = (*pkt.l4_ports)[end as usize];
        ip_field.write_unaligned(ip_be);
        (*pkt.l4_ports)[end as usize] = port_be;
        (*pkt.ip).check = csum::replace4((*pkt.ip).check, old_ip, ip_be);
        (old_ip, old_port)
    }
}

/// After `write_end`: the L4 checksum through the hook, then `pkt`'s values.
#[inline(always)]
fn finish_end<H: Hook>(hook: &H, pkt: &mut Packet, end: End, old: (u32, u16), ip_be: u32, port_be: u16) -> bool {
    // The pointers may be gone after this (tc); the values stay.
    let partial = hook.update_l4_checksum(pkt, old.0, ip_be, old.1, port_be);
    match end {
        End::Src => (pkt.src_ip_be, pkt.src_port_be) = (ip_be, port_be),
        End::Dst => (pkt.dst_ip_be, pkt.dst_port_be) = (ip_be, port_be),
    }
    partial
}

/// The L4 checksum's RFC 1624 update in the frame's bytes (XDP), whose
/// pseudo-header covers the addresses. Where partial checksums can arrive,
/// a field that holds only the pseudo-header sum is updated the way the
/// kernel would (the new pseudo-header sum, ports left to the device), so
/// that the device that completes it later gets it right; it returns true
/// then. `pkt`'s values are still the old ones.
///
/// # Safety
/// `pkt`'s pointers must be bounds-checked (parse_packet does it).
#[inline(always)]
pub unsafe fn update_l4_in_place(
    pkt: &Packet,
    old_ip: u32,
    new_ip: u32,
    old_port: u16,
    new_port: u16,
    l4s: L4Checksums,
) -> bool {
    unsafe {
        let l4 = *pkt.l4_check;
        // A zero UDP checksum means "none" and stays so.
        if pkt.proto == PROTO_UDP && l4 == 0 {
            return false;
        }
        if is_partial(pkt, l4, l4s) {
            *pkt.l4_check = csum::replace4_partial(l4, old_ip, new_ip);
            return true;
        }
        let mut sum = csum::replace2(csum::replace4(l4, old_ip, new_ip), old_port, new_port);
        if pkt.proto == PROTO_UDP && sum == 0 {
            sum = 0xffff;
        }
        *pkt.l4_check = sum;
        false
    }
}

/// Whether `l4`, the L4 checksum field of `pkt` as it arrived, is a partial
/// one: only the pseudo-header sum, on an interface where that can be.
#[inline(always)]
pub fn is_partial(pkt: &Packet, l4: u16, l4s: L4Checksums) -> bool {
    l4s == L4Checksums::MaybePartial
        && l4 == csum::pseudo_header_sum(pkt.src_ip_be, pkt.dst_ip_be, pkt.proto, pkt.tot_len.wrapping_sub(20))
}
