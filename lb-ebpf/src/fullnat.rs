//! Full NAT (`MODE_FULL_NAT`): the client's packet leaves with the source
//! translated too, to an address of the load balancer (the backend entry's
//! `snat_ip_be`) and a port claimed for the flow, so the backend answers
//! the load balancer whatever its own routes say.
//!
//! A flow has two entries that go together: its `CONNTRACK` entry (client
//! -> VIP, as for DNAT) holds the backend and the claimed (address, port);
//! its `SNAT_FLOWS` entry, keyed by the reply's 5-tuple (backend -> LB
//! address and port), names the forward key. Inserting that entry with
//! BPF_NOEXIST is the claim, so no two flows ever share a port towards one
//! backend. A reply is translated only when both entries name each other:
//! an LRU eviction of the forward entry, or a port re-claimed by another
//! flow, leaves the reply unmatched (passed) rather than sent to the wrong
//! client. A claim is released when the flow closes (FIN both ways, RST)
//! and by the agent's flow walker when it reaps the forward entry.

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{
    hash::flow_hash, snat, Conn, Counters, FlowKey, Reason, Service, TcpState, DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN,
    PROTO_TCP, SNAT_PORT_TRIES,
};

use crate::{
    hook::Hook,
    nat::{self, is_syn, mark_tcp},
    stats::count_flow,
    Packet, Verdict, CONNTRACK, SETTINGS, SNAT_FLOWS,
};

/// A TCP flow both sides closed (or one reset): its claim can go.
#[inline(always)]
fn closed(conn: &Conn, proto: u8) -> bool {
    proto == PROTO_TCP && TcpState::of(conn.tcp_seen) == TcpState::Closed
}

/// A client packet for a full-NAT service: pick or find the backend as
/// DNAT does, claim a source port for a new flow, rewrite both ends.
/// `Ok(true)` when the L4 checksum is a partial one.
#[inline(always)]
pub fn forward<H: Hook>(hook: &H, pkt: &mut Packet, svc: &Service) -> Result<bool, Verdict> {
    let key = FlowKey::new(pkt.src_ip_be, pkt.src_port_be, pkt.dst_ip_be, pkt.dst_port_be, pkt.proto);
    // A SYN takes a fresh pick (see `nat::track`), which replaces the entry:
    // its old claim goes first.
    if is_syn(pkt) {
        // SAFETY: copied out at once.
        if let Some(old) = unsafe { CONNTRACK.get(&key) } {
            let old = *old;
            release(&key, &old);
        }
    }
    let (mut conn, delta) = nat::track(hook, pkt, svc, &key)?;
    if conn.snat_port_be == 0 {
        conn.snat_port_be = match claim(&key, &conn) {
            Ok(port_be) => port_be,
            Err(verdict) => {
                // No half flow: the entry track opened goes again.
                let _ = CONNTRACK.remove(&key);
                return Err(verdict);
            }
        };
        if CONNTRACK.insert(&key, &conn, 0).is_err() {
            release(&key, &conn);
            return Err(Verdict::drop(Reason::DropConntrackFull));
        }
    } else {
        keep_claim(&key, &conn)?;
    }
    count_flow(conn.service_id, conn.backend_id, &delta);
    let partial = nat::rewrite_both(hook, pkt, (conn.snat_ip_be, conn.snat_port_be), (conn.nat_ip_be, conn.nat_port_be));
    if closed(&conn, pkt.proto) {
        release(&key, &conn);
    }
    Ok(partial)
}

/// A reply from a backend to a claimed (LB address, port): the flow both
/// entries agree on gets it, rewritten to VIP -> client. Returns the flow's
/// entry and whether the L4 checksum is a partial one; `PassNoService`
/// when it is no full-NAT reply (the DNAT path looks next).
#[inline(always)]
pub fn reply<H: Hook>(hook: &H, pkt: &mut Packet) -> Result<(Conn, bool), Verdict> {
    let not_ours = Verdict::pass(Reason::PassNoService);
    let rev = FlowKey::new(pkt.src_ip_be, pkt.src_port_be, pkt.dst_ip_be, pkt.dst_port_be, pkt.proto);
    // SAFETY: copied out at once.
    let fwd = match unsafe { SNAT_FLOWS.get(&rev) } {
        Some(f) => *f,
        None => return Err(not_ours),
    };
    let Some(c) = CONNTRACK.get_ptr_mut(&fwd) else { return Err(not_ours) };
    // SAFETY: LRU value, as in `nat::forward`.
    let c = unsafe { &mut *c };
    if c.snat_reply_key(pkt.proto) != rev {
        // A stale claim (the flow was replaced): the walker reaps it.
        return Err(not_ours);
    }
    c.last_seen_ns = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let mut delta = Counters { reply_packets: 1, reply_bytes: hook.packet_len() as u64, ..Counters::default() };
    mark_tcp(c, pkt, true, &mut delta);
    let c = *c;
    count_flow(c.service_id, c.backend_id, &delta);
    let partial = nat::rewrite_both(hook, pkt, (fwd.dst_ip_be, fwd.dst_port_be), (fwd.src_ip_be, fwd.src_port_be));
    if closed(&c, pkt.proto) {
        release(&fwd, &c);
    }
    Ok((c, partial))
}

/// Claim a port for the new flow `key` (to `conn`'s backend, from
/// `conn.snat_ip_be`): the first candidate whose reverse entry is free.
#[inline(always)]
fn claim(key: &FlowKey, conn: &Conn) -> Result<u16, Verdict> {
    let exhausted = Verdict::drop(Reason::DropSnatExhausted);
    if conn.snat_ip_be == 0 {
        // The agent gave the backend no source address: nothing to send from.
        return Err(exhausted);
    }
    let (min, max) = SETTINGS.get(0).map_or((DEFAULT_SNAT_PORT_MIN, DEFAULT_SNAT_PORT_MAX), |s| (s.snat_port_min, s.snat_port_max));
    let hash = flow_hash(key.src_ip_be, key.dst_ip_be, key.src_port_be, key.dst_port_be, key.proto);
    let mut rev = conn.snat_reply_key(key.proto);
    for attempt in 0..SNAT_PORT_TRIES {
        rev.dst_port_be = snat::candidate(hash, attempt, min, max).to_be();
        if SNAT_FLOWS.insert(&rev, key, BPF_NOEXIST as u64).is_ok() {
            return Ok(rev.dst_port_be);
        }
    }
    Err(exhausted)
}

/// An established flow's claim must still be its own. Lost (reaped) and
/// free again: claimed anew, same port. Held by another flow: dropped,
/// never sent from a port that flow's replies come back to. A closed flow's
/// last packets (the final ACK) go on without a claim.
#[inline(always)]
fn keep_claim(key: &FlowKey, conn: &Conn) -> Result<(), Verdict> {
    let rev = conn.snat_reply_key(key.proto);
    // SAFETY: read in place, at once. (No Option<FlowKey> on the stack:
    // kernels before 6.3 refuse LLVM's read of a None's payload.)
    match unsafe { SNAT_FLOWS.get(&rev) } {
        Some(holder) if *holder == *key => Ok(()),
        Some(_) => Err(Verdict::drop(Reason::DropSnatExhausted)),
        None if closed(conn, key.proto) => Ok(()),
        None => match SNAT_FLOWS.insert(&rev, key, BPF_NOEXIST as u64) {
            Ok(()) => Ok(()),
            Err(_) => Err(Verdict::drop(Reason::DropSnatExhausted)),
        },
    }
}

/// Give `conn`'s port back, if `key`'s flow still holds it.
#[inline(always)]
fn release(key: &FlowKey, conn: &Conn) {
    if conn.snat_port_be == 0 {
        return;
    }
    let rev = conn.snat_reply_key(key.proto);
    // SAFETY: read in place, at once.
    if unsafe { SNAT_FLOWS.get(&rev) }.is_some_and(|holder| *holder == *key) {
        let _ = SNAT_FLOWS.remove(&rev);
    }
}
