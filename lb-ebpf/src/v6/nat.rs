//! IPv6 destination NAT with reverse translation, as `crate::nat` does for
//! IPv4: the flow's one entry in `CONNTRACK6` holds its backend.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    csum,
    v6::{flow_hash6, pseudo_header_sum6, replace16, replace16_partial, BackendAddr6, Conn6, FlowKey6, Ip6},
    Conn, Counters, Reason, Service, MAX_VIPS_PER_BACKEND, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_SYN,
};

use super::{parse::Parsed6, BACKENDS6, BACKEND_VIPS6, CONNTRACK6};
use crate::{
    hook::Xdp,
    nat::{mark_tcp_flags, non_syn_budget_left, L4Checksums},
    select::pick_backend,
    stats::count_flow,
    Verdict,
};

/// A client packet for `svc`: find or open its flow, rewrite the
/// destination to the flow's backend. `Ok(true)` when the L4 checksum is a
/// partial one.
#[inline(always)]
pub fn forward(hook: &Xdp, pkt: &mut Parsed6, svc: &Service) -> Result<bool, Verdict> {
    let (nat_ip, nat_port_be) = flow_of(hook, pkt, svc)?;
    // SAFETY: parse_packet6's pointers, bounds-checked, nothing moved them.
    Ok(unsafe { rewrite(hook, pkt, End::Dst, &nat_ip, nat_port_be) })
}

/// The backend (address, port) of a client packet's flow for `svc`: the
/// one the table holds, or a new Maglev pick; the packet is counted. Every
/// IPv6 forwarding mode but full NAT (`track6`) starts here.
#[inline(always)]
pub fn flow_of(hook: &Xdp, pkt: &Parsed6, svc: &Service) -> Result<(Ip6, u16), Verdict> {
    let key = FlowKey6::new(pkt.src, pkt.src_port_be, pkt.dst, pkt.dst_port_be, pkt.proto);
    let (c, delta) = track6(hook, pkt, svc, &key)?;
    // SAFETY: an LRU value, read at once (see `track6`).
    let c = unsafe { &*c };
    count_flow(c.conn.service_id, c.conn.backend_id, &delta);
    Ok((c.nat_ip, c.conn.nat_port_be))
}

/// Whether `pkt` is a TCP SYN without ACK: the start of a connection.
#[inline(always)]
pub fn is_syn6(pkt: &Parsed6) -> bool {
    pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The flow entry (`key`) of a client packet for `svc`, found or opened,
/// with the counters the packet adds (not counted yet), as `nat::track`.
/// The entry is the map's own, not a copy: an 80-byte copy is stack full
/// NAT cannot spare. A racing update from another CPU can blur a timestamp
/// or a flag only; an eviction meanwhile leaves the values as they were.
#[inline(always)]
pub fn track6(hook: &Xdp, pkt: &Parsed6, svc: &Service, key: &FlowKey6) -> Result<(*mut Conn6, Counters), Verdict> {
    check_udp(pkt)?;
    let now = unsafe { bpf_ktime_get_ns() };
    let mut delta =
        Counters { packets: 1, bytes: hook.ctx.data_end() as u64 - hook.ctx.data() as u64, ..Counters::default() };
    // A SYN takes a fresh pick even for a 5-tuple the table remembers (see
    // `nat::track`).
    let syn = is_syn6(pkt);
    let known = CONNTRACK6.get_ptr_mut(key);
    let c6 = match known {
        Some(c) if !syn => {
            // SAFETY: as above.
            let c6 = unsafe { &mut *c };
            c6.conn.last_seen_ns = now;
            mark_tcp_flags(&mut c6.conn, pkt.proto, pkt.tcp_flags, false, &mut delta);
            c
        }
        _ => {
            if known.is_none() && pkt.proto == PROTO_TCP && !syn && !non_syn_budget_left(now) {
                return Err(Verdict::drop(Reason::DropNonSynOverBudget));
            }
            // The backend of a flow still opening (a retransmitted SYN is
            // no new flow), else u64::MAX (see `nat::track` for why no Option).
            // SAFETY: as above; read at once.
            let opening = known.map_or(u64::MAX, |c| unsafe {
                if (*c).conn.tcp_seen == 0 {
                    u64::from((*c).conn.backend_id)
                } else {
                    u64::MAX
                }
            });
            let backend_id = open_flow(pkt, svc, key, now)?;
            delta.new_flows = if opening == u64::from(backend_id) { 0 } else { 1 };
            // Evicted already (a table full of new flows): as full as it gets.
            CONNTRACK6.get_ptr_mut(key).ok_or(Verdict::drop(Reason::DropConntrackFull))?
        }
    };
    Ok((c6, delta))
}

/// A new flow: the Maglev pick (shared with IPv4: the table holds backend
/// ids) and its addresses from `BACKENDS6`, remembered in its entry;
/// returns the backend's id.
#[inline(always)]
fn open_flow(pkt: &Parsed6, svc: &Service, key: &FlowKey6, now: u64) -> Result<u32, Verdict> {
    let hash = flow_hash6(&pkt.src, &pkt.dst, pkt.src_port_be, pkt.dst_port_be, pkt.proto);
    let (backend_id, _) = pick_backend(svc, hash).map_err(Verdict::drop)?;
    let Some(b6) = BACKENDS6.get(backend_id) else { return Err(Verdict::drop(Reason::DropStaleBackend)) };
    let b6 = *b6;
    if b6.port_be == 0 {
        // An IPv4 backend in an IPv6 service's table: never written so.
        return Err(Verdict::drop(Reason::DropStaleBackend));
    }
    let c6 = Conn6 {
        conn: Conn {
            nat_port_be: b6.port_be,
            ..Conn::opened(backend_id, svc.id, now, pkt.ingress_ifindex, pkt.src_mac, pkt.dst_mac)
        },
        nat_ip: b6.ip,
        // Full NAT claims its port after the pick (`v6::fullnat`).
        snat_ip: b6.snat_ip,
    };
    if CONNTRACK6.insert(key, &c6, 0).is_err() {
        return Err(Verdict::drop(Reason::DropConntrackFull));
    }
    Ok(backend_id)
}

/// A packet from a backend to a client of a flow we translated: rewrite
/// the source back to the VIP. Returns the flow's entry and whether the L4
/// checksum is a partial one; anything else is not ours.
#[inline(always)]
pub fn reply(hook: &Xdp, pkt: &mut Parsed6) -> Result<(Conn, bool), Verdict> {
    let not_ours = Verdict::pass(Reason::PassNoService);
    let found = lookup_reply_flow(&pkt.dst, pkt.dst_port_be, &pkt.src, pkt.src_port_be, pkt.proto);
    let Some((c, vip, vip_port_be)) = found else { return Err(not_ours) };
    // SAFETY: as in `forward`.
    let c = unsafe { &mut *c };
    check_udp(pkt)?;
    c.conn.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    let frame_len = hook.ctx.data_end() as u64 - hook.ctx.data() as u64;
    let mut delta = Counters { reply_packets: 1, reply_bytes: frame_len, ..Counters::default() };
    mark_tcp_flags(&mut c.conn, pkt.proto, pkt.tcp_flags, true, &mut delta);
    count_flow(c.conn.service_id, c.conn.backend_id, &delta);
    let conn = c.conn;
    // SAFETY: as in `forward`.
    Ok((conn, unsafe { rewrite(hook, pkt, End::Src, &vip, vip_port_be) }))
}

/// The flow between `client` and a VIP whose backend is `backend`
/// (addresses and ports as a reply carries them), with that VIP and port:
/// the backend's address names the services it serves (`BACKEND_VIPS6`),
/// the flow is the one from this client to one of them whose entry holds
/// this backend. Replies and ICMPv6 errors about a client's packet to the
/// backend (`icmp`) alike.
#[inline(always)]
pub fn lookup_reply_flow(
    client: &Ip6,
    client_port_be: u16,
    backend: &Ip6,
    backend_port_be: u16,
    proto: u8,
) -> Option<(*mut Conn6, Ip6, u16)> {
    let addr = BackendAddr6 { ip: *backend, port_be: backend_port_be, proto, _pad: 0 };
    // SAFETY: copied out at once; the agent replaces entries whole.
    let vips = unsafe { BACKEND_VIPS6.get(&addr) }?;
    for vip in vips.vips.iter().take(MAX_VIPS_PER_BACKEND) {
        if vip.port_be == 0 {
            break;
        }
        let key = FlowKey6::new(*client, client_port_be, vip.vip, vip.port_be, proto);
        if let Some(c) = CONNTRACK6.get_ptr_mut(&key) {
            // SAFETY: LRU value, read at once.
            let (nat_ip, nat_port_be) = unsafe { ((*c).nat_ip, (*c).conn.nat_port_be) };
            if nat_ip == *backend && nat_port_be == backend_port_be {
                return Some((c, vip.vip, vip.port_be));
            }
        }
    }
    None
}

/// UDP over IPv6 must carry a checksum (RFC 8200 8.1): one without is
/// dropped, never forwarded.
#[inline(always)]
pub fn check_udp(pkt: &Parsed6) -> Result<(), Verdict> {
    // SAFETY: bounds-checked by parse_packet6.
    if pkt.proto == PROTO_UDP && unsafe { *pkt.l4_check } == 0 {
        return Err(Verdict::drop(Reason::DropUdp6NoChecksum));
    }
    Ok(())
}

/// Which end of a flow a rewrite changes; also its port's index.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Src = 0,
    Dst = 1,
}

/// Whether `pkt`'s L4 checksum is a partial one (only `xdp_lb6_local` sees
/// those: the pseudo-header sum alone, the rest left to the device).
#[inline(always)]
pub fn is_partial6(hook: &Xdp, pkt: &Parsed6) -> bool {
    // SAFETY: bounds-checked by parse_packet6.
    hook.l4 == L4Checksums::MaybePartial
        && unsafe { *pkt.l4_check } == pseudo_header_sum6(&pkt.src, &pkt.dst, pkt.proto, pkt.payload_len)
}

/// Write the new address and port of `end` and update the L4 checksum (no
/// IP header checksum in IPv6). Where partial checksums can arrive, a field
/// holding only the pseudo-header sum gets the new one (ports left to the
/// device, see `nat::update_l4_in_place`): returns true then.
///
/// # Safety
/// `pkt`'s pointers must be bounds-checked and valid (XDP moves nothing).
#[inline(always)]
unsafe fn rewrite(hook: &Xdp, pkt: &mut Parsed6, end: End, ip: &Ip6, port_be: u16) -> bool {
    let partial = is_partial6(hook, pkt);
    // SAFETY: as the caller promises.
    unsafe { write_end(pkt, end, ip, port_be, partial) };
    partial
}

/// Both ends at once (full NAT): `src` and `dst` as (address, port). The
/// checksum's kind is judged once, on the packet as it arrived.
///
/// # Safety
/// As for `rewrite`.
#[inline(always)]
pub unsafe fn rewrite_both(hook: &Xdp, pkt: &mut Parsed6, src: (&Ip6, u16), dst: (&Ip6, u16)) -> bool {
    let partial = is_partial6(hook, pkt);
    // SAFETY: as the caller promises.
    unsafe {
        write_end(pkt, End::Src, src.0, src.1, partial);
        write_end(pkt, End::Dst, dst.0, dst.1, partial);
    }
    partial
}

/// The new address and port of `end` into the packet, the L4 checksum
/// updated for them (`partial`: it holds the pseudo-header sum only), and
/// `pkt`'s values after them.
///
/// # Safety
/// As for `rewrite`.
#[inline(always)]
unsafe fn write_end(pkt: &mut Parsed6, end: End, ip: &Ip6, port_be: u16, partial: bool) {
    unsafe {
        let (old_ip, old_port) = match end {
            End::Src => (pkt.src, pkt.src_port_be),
            End::Dst => (pkt.dst, pkt.dst_port_be),
        };
        let field = match end {
            End::Src => core::ptr::addr_of_mut!((*pkt.ip).src),
            End::Dst => core::ptr::addr_of_mut!((*pkt.ip).dst),
        };
        field.write_unaligned(*ip);
        (*pkt.l4_ports)[end as usize] = port_be;
        let l4 = *pkt.l4_check;
        *pkt.l4_check = if partial {
            replace16_partial(l4, &old_ip, ip)
        } else {
            let sum = csum::replace2(replace16(l4, &old_ip, ip), old_port, port_be);
            // A computed zero goes out as all ones (zero means "none").
            if pkt.proto == PROTO_UDP && sum == 0 {
                0xffff
            } else {
                sum
            }
        };
        match end {
            End::Src => (pkt.src, pkt.src_port_be) = (*ip, port_be),
            End::Dst => (pkt.dst, pkt.dst_port_be) = (*ip, port_be),
        }
    }
}
