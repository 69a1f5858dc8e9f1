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
//!
//! The claims are generic over the family ([`NatFlow`]): IPv6 full NAT
//! (`v6::fullnat`) keeps the same two entries in `CONNTRACK6` and
//! `SNAT_FLOWS6`, with the same rules.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    maps::{HashMap, LruHashMap},
};
use lb_common::{
    hash::flow_hash,
    snat,
    v6::{flow_hash6, Conn6, FlowKey6},
    Conn, Counters, FlowKey, Reason, Service, TcpState, DEFAULT_SNAT_PORT_MAX, DEFAULT_SNAT_PORT_MIN, PROTO_TCP,
    SNAT_PORT_TRIES,
};

use crate::{
    hook::Hook,
    nat::{self, is_syn, mark_tcp},
    stats::count_flow,
    v6::{CONNTRACK6, SNAT_FLOWS6},
    Packet, Verdict, CONNTRACK, SETTINGS, SNAT_FLOWS,
};

/// A flow key of one family, whose claims live in that family's map.
pub trait SnatKey: Copy + PartialEq + 'static {
    /// The claims: reply 5-tuple -> forward key.
    fn claims() -> &'static HashMap<Self, Self>;
    /// The flow hash a forward key's port candidates start from.
    fn hash(&self) -> u32;
    /// The load balancer's port of a reply key (its destination port).
    fn lb_port_be(&self) -> u16;
    fn set_lb_port_be(&mut self, port_be: u16);
}

/// `SnatKey` for a family's key type: its claims map and flow hash; the
/// load balancer's port is the reply key's destination port in both.
macro_rules! snat_key {
    ($key:ty, $claims:ident, |$k:ident| $hash:expr) => {
        impl SnatKey for $key {
            #[inline(always)]
            fn claims() -> &'static HashMap<Self, Self> {
                &$claims
            }
            #[inline(always)]
            fn hash(&self) -> u32 {
                let $k = self;
                $hash
            }
            #[inline(always)]
            fn lb_port_be(&self) -> u16 {
                self.dst_port_be
            }
            #[inline(always)]
            fn set_lb_port_be(&mut self, port_be: u16) {
                self.dst_port_be = port_be;
            }
        }
    };
}

snat_key!(FlowKey, SNAT_FLOWS, |k| flow_hash(k.src_ip_be, k.dst_ip_be, k.src_port_be, k.dst_port_be, k.proto));
snat_key!(FlowKey6, SNAT_FLOWS6, |k| flow_hash6(&k.src, &k.dst, k.src_port_be, k.dst_port_be, k.proto));

/// A connection-table entry of one family, with its claim's key.
pub trait NatFlow: Copy + 'static {
    type Key: SnatKey;
    /// The family's connection table.
    fn table() -> &'static LruHashMap<Self::Key, Self>;
    fn conn(&self) -> &Conn;
    fn conn_mut(&mut self) -> &mut Conn;
    /// The key of the flow's claim: its replies' 5-tuple (backend -> the
    /// load balancer's address and port).
    fn reply_key(&self, proto: u8) -> Self::Key;
    /// Whether the agent gave the flow's backend a source address.
    fn has_source(&self) -> bool;
}

impl NatFlow for Conn {
    type Key = FlowKey;
    #[inline(always)]
    fn table() -> &'static LruHashMap<FlowKey, Conn> {
        &CONNTRACK
    }
    #[inline(always)]
    fn conn(&self) -> &Conn {
        self
    }
    #[inline(always)]
    fn conn_mut(&mut self) -> &mut Conn {
        self
    }
    #[inline(always)]
    fn reply_key(&self, proto: u8) -> FlowKey {
        self.snat_reply_key(proto)
    }
    #[inline(always)]
    fn has_source(&self) -> bool {
        self.snat_ip_be != 0
    }
}

impl NatFlow for Conn6 {
    type Key = FlowKey6;
    #[inline(always)]
    fn table() -> &'static LruHashMap<FlowKey6, Conn6> {
        &CONNTRACK6
    }
    #[inline(always)]
    fn conn(&self) -> &Conn {
        &self.conn
    }
    #[inline(always)]
    fn conn_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
    #[inline(always)]
    fn reply_key(&self, proto: u8) -> FlowKey6 {
        self.snat_reply_key(proto)
    }
    #[inline(always)]
    fn has_source(&self) -> bool {
        self.snat_ip != [0; 4]
    }
}

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
    if is_syn(pkt) {
        release_replaced::<Conn>(&key, pkt.proto);
    }
    let (mut conn, delta) = nat::track(hook, pkt, svc, &key)?;
    if settle_claim(&key, &mut conn, pkt.proto)? {
        store_claimed(&key, &conn, pkt.proto)?;
    }
    count_flow(conn.service_id, conn.backend_id, &delta);
    let partial = nat::rewrite_both(hook, pkt, (conn.snat_ip_be, conn.snat_port_be), (conn.nat_ip_be, conn.nat_port_be));
    release_closed(&key, &conn, pkt.proto);
    Ok(partial)
}

/// A reply from a backend to a claimed (LB address, port): the flow both
/// entries agree on gets it, rewritten to VIP -> client. Returns the flow's
/// entry and whether the L4 checksum is a partial one; `PassNoService`
/// when it is no full-NAT reply (the DNAT path looks next).
#[inline(always)]
pub fn reply<H: Hook>(hook: &H, pkt: &mut Packet) -> Result<(Conn, bool), Verdict> {
    let rev = FlowKey::new(pkt.src_ip_be, pkt.src_port_be, pkt.dst_ip_be, pkt.dst_port_be, pkt.proto);
    let (fwd, c) = claimed_flow::<Conn>(&rev, pkt.proto)?;
    // SAFETY: LRU value, as in `nat::forward`.
    let c = unsafe { &mut *c };
    c.last_seen_ns = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let mut delta = Counters { reply_packets: 1, reply_bytes: hook.packet_len() as u64, ..Counters::default() };
    mark_tcp(c, pkt, true, &mut delta);
    let c = *c;
    count_flow(c.service_id, c.backend_id, &delta);
    let partial = nat::rewrite_both(hook, pkt, (fwd.dst_ip_be, fwd.dst_port_be), (fwd.src_ip_be, fwd.src_port_be));
    release_closed(fwd, &c, pkt.proto);
    Ok((c, partial))
}

/// A SYN takes a fresh pick (see `nat::track`), which replaces the flow's
/// entry: the old entry's claim goes first.
#[inline(always)]
pub fn release_replaced<F: NatFlow>(key: &F::Key, proto: u8) {
    // SAFETY: read in place, at once.
    if let Some(old) = unsafe { F::table().get(key) } {
        release(key, &old.reply_key(proto));
    }
}

/// After the flow's entry was found or opened (`flow`): a new flow claims
/// its port, written into `flow`: `Ok(true)`, and where `flow` is a copy
/// the caller stores it (`store_claimed`). An established flow must still
/// hold its own claim. A claim that fails takes the new flow's entry
/// with it: no half flow.
#[inline(always)]
pub fn settle_claim<F: NatFlow>(key: &F::Key, flow: &mut F, proto: u8) -> Result<bool, Verdict> {
    if flow.conn().snat_port_be != 0 {
        return keep_claim(key, &flow.reply_key(proto), closed(flow.conn(), proto)).map(|()| false);
    }
    flow.conn_mut().snat_port_be = match claim(key, flow.reply_key(proto), flow.has_source()) {
        Ok(port_be) => port_be,
        Err(verdict) => {
            let _ = F::table().remove(key);
            return Err(verdict);
        }
    };
    Ok(true)
}

/// A copy of a flow's entry with its new claim into the table; a table
/// that refuses it gives the claim back.
#[inline(always)]
pub fn store_claimed<F: NatFlow>(key: &F::Key, flow: &F, proto: u8) -> Result<(), Verdict> {
    if F::table().insert(key, flow, 0).is_err() {
        release(key, &flow.reply_key(proto));
        return Err(Verdict::drop(Reason::DropConntrackFull));
    }
    Ok(())
}

/// The flow a reply to a claimed (LB address, port) belongs to: its
/// forward key (the claim's own value, read in place) and entry, when both
/// entries name each other; `PassNoService` otherwise (a stale claim, the
/// flow replaced: the walker reaps it).
#[inline(always)]
pub fn claimed_flow<F: NatFlow>(rev: &F::Key, proto: u8) -> Result<(&'static F::Key, *mut F), Verdict> {
    let not_ours = Verdict::pass(Reason::PassNoService);
    // SAFETY: a value of a (non-LRU) hash map, read while this packet runs;
    // the claim is removed by this packet at the earliest (`release_closed`).
    let Some(fwd) = (unsafe { <F::Key as SnatKey>::claims().get(rev) }) else { return Err(not_ours) };
    let Some(c) = F::table().get_ptr_mut(fwd) else { return Err(not_ours) };
    // SAFETY: read at once; an LRU value, as in `nat::forward`.
    if unsafe { (*c).reply_key(proto) } != *rev {
        return Err(not_ours);
    }
    Ok((fwd, c))
}

/// A flow that this packet closed gives its port back.
#[inline(always)]
pub fn release_closed<F: NatFlow>(key: &F::Key, flow: &F, proto: u8) {
    if closed(flow.conn(), proto) {
        release(key, &flow.reply_key(proto));
    }
}

/// Claim a port for the new flow `key`: the first candidate whose reverse
/// entry (`rev`, the reply key with the port to fill in) is free. A
/// backend without a source address has nothing to send from.
#[inline(always)]
fn claim<K: SnatKey>(key: &K, mut rev: K, has_source: bool) -> Result<u16, Verdict> {
    let exhausted = Verdict::drop(Reason::DropSnatExhausted);
    if !has_source {
        return Err(exhausted);
    }
    let (min, max) = SETTINGS.get(0).map_or((DEFAULT_SNAT_PORT_MIN, DEFAULT_SNAT_PORT_MAX), |s| (s.snat_port_min, s.snat_port_max));
    let hash = key.hash();
    for attempt in 0..SNAT_PORT_TRIES {
        rev.set_lb_port_be(snat::candidate(hash, attempt, min, max).to_be());
        if K::claims().insert(&rev, key, BPF_NOEXIST as u64).is_ok() {
            return Ok(rev.lb_port_be());
        }
    }
    Err(exhausted)
}

/// An established flow's claim (`rev`) must still be its own. Lost
/// (reaped) and free again: claimed anew, same port. Held by another flow:
/// dropped, never sent from a port that flow's replies come back to. A
/// closed flow's last packets (the final ACK) go on without a claim.
#[inline(always)]
fn keep_claim<K: SnatKey>(key: &K, rev: &K, closed: bool) -> Result<(), Verdict> {
    // SAFETY: read in place, at once. (No Option<FlowKey> on the stack:
    // kernels before 6.3 refuse LLVM's read of a None's payload.)
    match unsafe { K::claims().get(rev) } {
        Some(holder) if *holder == *key => Ok(()),
        Some(_) => Err(Verdict::drop(Reason::DropSnatExhausted)),
        None if closed => Ok(()),
        None => match K::claims().insert(rev, key, BPF_NOEXIST as u64) {
            Ok(()) => Ok(()),
            Err(_) => Err(Verdict::drop(Reason::DropSnatExhausted)),
        },
    }
}

/// Give the port of claim `rev` back, if `key`'s flow still holds it.
#[inline(always)]
fn release<K: SnatKey>(key: &K, rev: &K) {
    if rev.lb_port_be() == 0 {
        return;
    }
    // SAFETY: read in place, at once.
    if unsafe { K::claims().get(rev) }.is_some_and(|holder| *holder == *key) {
        let _ = K::claims().remove(rev);
    }
}
