//! IPv6: destination NAT (mode "nat"), full NAT (mode "full-nat",
//! `fullnat`) and IP-in-IP direct server return (mode "dsr-ipip", `dsr`)
//! of TCP and UDP at the XDP hook.
//!
//! Programs of their own, `xdp_lb6` and `xdp_lb6_local`, which the IPv4
//! entry points reach by a tail call (`V6_PROGS`) when the ethertype is
//! IPv6: each has its own 512-byte stack and its own verification, so the
//! IPv6 path cannot push the IPv4 one over the verifier's limits. A failed
//! tail call (no program in the slot) passes the packet untouched
//! (`Reason::PassIpv6NoProgram`).
//!
//! The same shape as IPv4 (`parse`, `nat`, `route`), with maps of its own
//! for what holds an address (`SERVICES6`, `BACKENDS6`, `CONNTRACK6`,
//! `BACKEND_VIPS6`, `SNAT_FLOWS6`), and the rest shared: service ids,
//! Maglev tables, `BACKENDS` (active flag), counters, `EGRESS`,
//! `PATH_STATS`. A new flow to a service with no usable backend is
//! answered as in IPv4 (`refuse`: a reset, an ICMPv6 port unreachable;
//! held when the service wakes from zero). Full NAT runs in programs of its
//! own (`xdp_fullnat6`, `xdp_fullnat6_local`): a full-NAT service's packet,
//! or a reply to a claimed port (one lookup in `SNAT_FLOWS6`), is
//! tail-called there; a failed tail call passes it, counted as
//! `PassIpv6NoProgram`. ICMPv6 errors about a flow are translated by a
//! program of their own, `xdp_icmp6`, reached by a further tail call
//! (`icmp`); other ICMPv6 (neighbour discovery included), extension headers
//! and fragments pass untouched. Not here yet: the tc hook (`tc_lb` passes
//! IPv6 untouched, `PassIpv6`).

mod dsr;
mod fullnat;
mod icmp;
mod nat;
mod parse;
mod refuse;
mod route;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, ProgramArray},
    programs::XdpContext,
};
use lb_common::{
    v6::{
        Backend6, BackendAddr6, BackendVips6, Conn6, FlowKey6, Ip6, ServiceKey6, V6_PROGRAMS, V6_SLOT_FULLNAT,
        V6_SLOT_FULLNAT_LOCAL,
    },
    Reason, Service, BACKEND_VIPS_MAX, CONNTRACK_MAX, MAX_BACKENDS, MAX_SERVICES, MODE_DSR_IPIP, MODE_FULL_NAT,
    SNAT_FLOWS_MAX,
};

use crate::{
    hook::{Hook, Xdp},
    nat::L4Checksums,
    parse::{ptr_at, EthHdr},
    stats, Verdict,
};

#[map]
pub(crate) static SERVICES6: HashMap<ServiceKey6, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);
/// A backend's IPv6 address, by the id its `BACKENDS` entry has.
#[map]
pub(crate) static BACKENDS6: Array<Backend6> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
pub(crate) static CONNTRACK6: LruHashMap<FlowKey6, Conn6> = LruHashMap::with_max_entries(CONNTRACK_MAX, 0);
/// The services each backend address serves, for matching its replies.
#[map]
static BACKEND_VIPS6: HashMap<BackendAddr6, BackendVips6> = HashMap::with_max_entries(BACKEND_VIPS_MAX, 0);
/// An IPv6 service's source by service id (`dsr-ipip`'s outer source).
#[map]
static SOURCES6: Array<Ip6> = Array::with_max_entries(MAX_SERVICES, 0);
/// Full NAT's claimed ports over IPv6 (see `crate::fullnat`). Not LRU: a
/// claim is never evicted behind its flow's back.
#[map]
pub(crate) static SNAT_FLOWS6: HashMap<FlowKey6, FlowKey6> = HashMap::with_max_entries(SNAT_FLOWS_MAX, 0);
/// The IPv6 programs by `V6_SLOT_*`; the agent fills it at load.
#[map]
static V6_PROGS: ProgramArray = ProgramArray::with_max_entries(V6_PROGRAMS.len() as u32, 0);

const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();

/// For `xdp_lb`'s IPv6 packets.
#[xdp]
pub fn xdp_lb6(ctx: XdpContext) -> u32 {
    finish(try_lb6(&Xdp { ctx: &ctx, l4: L4Checksums::Complete }))
}

/// For `xdp_lb_local`'s IPv6 packets.
#[xdp]
pub fn xdp_lb6_local(ctx: XdpContext) -> u32 {
    finish(try_lb6(&Xdp { ctx: &ctx, l4: L4Checksums::MaybePartial }))
}

/// `xdp_lb6`'s full-NAT packets.
#[xdp]
pub fn xdp_fullnat6(ctx: XdpContext) -> u32 {
    finish(try_fullnat6(&Xdp { ctx: &ctx, l4: L4Checksums::Complete }))
}

/// `xdp_lb6_local`'s full-NAT packets.
#[xdp]
pub fn xdp_fullnat6_local(ctx: XdpContext) -> u32 {
    finish(try_fullnat6(&Xdp { ctx: &ctx, l4: L4Checksums::MaybePartial }))
}

/// At the top of an IPv4 XDP entry point: an IPv6 frame goes to the IPv6
/// program of `slot` (`Some(verdict)` only when that tail call failed);
/// anything else is left to the caller (`None`).
#[inline(always)]
pub fn divert(ctx: &XdpContext, slot: u32) -> Option<u32> {
    let hook = Xdp { ctx, l4: L4Checksums::Complete };
    let eth: *mut EthHdr = ptr_at(&hook, 0)?;
    // SAFETY: bounds-checked above.
    if unsafe { (*eth).ether_type } != ETH_P_IPV6_BE {
        return None;
    }
    // SAFETY: on success the tail call does not return.
    unsafe { V6_PROGS.tail_call(ctx, slot) };
    stats::count_reason(Reason::PassIpv6NoProgram);
    Some(xdp_action::XDP_PASS)
}

/// An IPv6 program's verdict, counted by its reason.
#[inline(always)]
fn finish(sent: Result<(u32, Reason), Verdict>) -> u32 {
    let (action, reason) = match sent {
        Ok(sent) => sent,
        Err(Verdict { action, reason }) => (Xdp::action(action), reason),
    };
    stats::count_reason(reason);
    action
}

#[inline(always)]
fn try_lb6(hook: &Xdp) -> Result<(u32, Reason), Verdict> {
    let mut pkt = match parse::parse_packet6(hook) {
        Ok(pkt) => pkt,
        // An ICMPv6 error about a flow is the only other IPv6 we translate.
        Err(Verdict { reason: Reason::PassNotTcpUdp, .. }) => return icmp::divert(hook),
        Err(verdict) => return Err(verdict),
    };
    let key = ServiceKey6 { vip: pkt.dst, port_be: pkt.dst_port_be, proto: pkt.proto, _pad: 0 };
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    if let Some(svc) = unsafe { SERVICES6.get(&key) } {
        let svc = *svc;
        let sent = match svc.mode {
            MODE_DSR_IPIP => dsr::forward(hook, &pkt, &svc),
            MODE_FULL_NAT => Err(to_fullnat(hook)),
            _ => nat::forward(hook, &mut pkt, &svc)
                .map(|partial_l4| (route::send_on(hook, &pkt, None, partial_l4), Reason::Forwarded)),
        };
        return match sent {
            Err(Verdict { reason: Reason::DropNoBackend, .. }) => refuse::refuse(hook, &pkt, &svc),
            sent => sent,
        };
    }
    if fullnat::is_claimed_reply(&pkt) {
        return Err(to_fullnat(hook));
    }
    let (flow, partial_l4) = nat::reply(hook, &mut pkt)?;
    Ok((route::send_on(hook, &pkt, Some(&flow), partial_l4), Reason::ReplyTranslated))
}

/// Hand the packet to the full-NAT program of the same checksum kind; the
/// verdict is only for a tail call that failed (no program in the slot).
#[inline(always)]
fn to_fullnat(hook: &Xdp) -> Verdict {
    let slot = match hook.l4 {
        L4Checksums::Complete => V6_SLOT_FULLNAT,
        L4Checksums::MaybePartial => V6_SLOT_FULLNAT_LOCAL,
    };
    // SAFETY: on success the tail call does not return.
    unsafe { V6_PROGS.tail_call(hook.ctx, slot) };
    Verdict::pass(Reason::PassIpv6NoProgram)
}

/// `xdp_fullnat6`: the packet parsed again (a tail call keeps nothing but
/// the frame); a full-NAT service's client packet, or a claimed reply.
#[inline(always)]
fn try_fullnat6(hook: &Xdp) -> Result<(u32, Reason), Verdict> {
    let mut pkt = parse::parse_packet6(hook)?;
    let key = ServiceKey6 { vip: pkt.dst, port_be: pkt.dst_port_be, proto: pkt.proto, _pad: 0 };
    // SAFETY: as in `try_lb6`.
    if let Some(svc) = unsafe { SERVICES6.get(&key) } {
        let svc = *svc;
        if svc.mode == MODE_FULL_NAT {
            return match fullnat::forward(hook, &mut pkt, &svc) {
                Ok(partial_l4) => Ok((route::send_on(hook, &pkt, None, partial_l4), Reason::Forwarded)),
                Err(Verdict { reason: Reason::DropNoBackend, .. }) => refuse::refuse(hook, &pkt, &svc),
                Err(verdict) => Err(verdict),
            };
        }
    }
    let (flow, partial_l4) = fullnat::reply(hook, &mut pkt)?;
    Ok((route::send_on(hook, &pkt, Some(&flow), partial_l4), Reason::ReplyTranslated))
}
