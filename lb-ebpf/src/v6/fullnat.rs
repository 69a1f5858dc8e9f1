//! IPv6 full NAT (`MODE_FULL_NAT`), as `crate::fullnat` does for IPv4 and
//! with its claims (`SNAT_FLOWS6`, the same rules): the client's packet
//! leaves from the backend entry's IPv6 source (`Backend6::snat_ip`) and a
//! port claimed for the flow; a reply to that port goes back from the VIP
//! to the client.
//!
//! Programs of their own (`xdp_fullnat6`, `xdp_fullnat6_local`), reached
//! from `xdp_lb6`/`xdp_lb6_local` by a tail call: inlined into those, the
//! two-ended rewrite and the claims took them over the 512-byte stack.

use lb_common::{
    v6::{Conn6, FlowKey6},
    Conn, Counters, Service,
};

use super::{
    nat::{self, check_udp, is_syn6},
    parse::Parsed6,
};
use crate::{
    fullnat::{claimed_flow, release_closed, release_replaced, settle_claim},
    hook::Xdp,
    nat::mark_tcp_flags,
    stats::count_flow,
    Verdict,
};

/// A client packet for a full-NAT service: its flow found or opened, a
/// port claimed for a new one, both ends rewritten. `Ok(true)` when the L4
/// checksum is a partial one.
#[inline(always)]
pub fn forward(hook: &Xdp, pkt: &mut Parsed6, svc: &Service) -> Result<bool, Verdict> {
    let key = FlowKey6::new(pkt.src, pkt.src_port_be, pkt.dst, pkt.dst_port_be, pkt.proto);
    if is_syn6(pkt) {
        release_replaced::<Conn6>(&key, pkt.proto);
    }
    let (c, delta) = nat::track6(hook, pkt, svc, &key)?;
    // SAFETY: the map's entry (see `track6`): the claim is written in place.
    let c = unsafe { &mut *c };
    // The claim went into the map's entry itself: nothing to store.
    settle_claim(&key, c, pkt.proto)?;
    count_flow(c.conn.service_id, c.conn.backend_id, &delta);
    // SAFETY: parse_packet6's pointers, bounds-checked, nothing moved them.
    let partial = unsafe { nat::rewrite_both(hook, pkt, (&c.snat_ip, c.conn.snat_port_be), (&c.nat_ip, c.conn.nat_port_be)) };
    release_closed(&key, c, pkt.proto);
    Ok(partial)
}

/// A reply from a backend to a claimed (LB address, port), rewritten to
/// VIP -> client. Returns the flow's entry and whether the L4 checksum is
/// a partial one; `PassNoService` when it is none of ours.
#[inline(always)]
pub fn reply(hook: &Xdp, pkt: &mut Parsed6) -> Result<(Conn, bool), Verdict> {
    let rev = FlowKey6::new(pkt.src, pkt.src_port_be, pkt.dst, pkt.dst_port_be, pkt.proto);
    let (fwd, c) = claimed_flow::<Conn6>(&rev, pkt.proto)?;
    check_udp(pkt)?;
    // SAFETY: an LRU value, as in `nat::track6`.
    let c = unsafe { &mut *c };
    c.conn.last_seen_ns = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let frame_len = hook.ctx.data_end() as u64 - hook.ctx.data() as u64;
    let mut delta = Counters { reply_packets: 1, reply_bytes: frame_len, ..Counters::default() };
    mark_tcp_flags(&mut c.conn, pkt.proto, pkt.tcp_flags, true, &mut delta);
    count_flow(c.conn.service_id, c.conn.backend_id, &delta);
    // SAFETY: as in `forward`.
    let partial = unsafe { nat::rewrite_both(hook, pkt, (&fwd.dst, fwd.dst_port_be), (&fwd.src, fwd.src_port_be)) };
    release_closed(fwd, c, pkt.proto);
    Ok((c.conn, partial))
}

/// Whether `pkt` is a reply to a claimed IPv6 (LB address, port): one map
/// lookup, all `xdp_lb6` spends before it hands the packet over.
#[inline(always)]
pub fn is_claimed_reply(pkt: &Parsed6) -> bool {
    let rev = FlowKey6::new(pkt.src, pkt.src_port_be, pkt.dst, pkt.dst_port_be, pkt.proto);
    // SAFETY: only whether there is an entry is read.
    unsafe { super::SNAT_FLOWS6.get(&rev) }.is_some()
}
