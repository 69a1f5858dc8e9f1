//! The load balancer, at two hooks.
//!
//! `xdp_lb` parses Ethernet, IPv4 and TCP/UDP; a packet for a service
//! (VIP, port, protocol) gets its destination rewritten to a backend picked by
//! the connection table or, for a new flow, the service's Maglev table; a reply
//! from a backend gets its source rewritten back to the VIP. Both then leave
//! on the fast path (`route`: FIB lookup, XDP_REDIRECT or XDP_TX), or with
//! XDP_PASS into the kernel's forwarding path where that cannot finish.
//! An ICMP error about a flow's reply goes to the flow's backend (`icmp`).
//! A new flow to a service with no usable backend is answered with a TCP
//! reset or an ICMP port unreachable (`refuse`, XDP only), unless the
//! service wakes from zero: then it is held for the agent (`wake`).
//! A service in full NAT mode has its clients' packets sent from an address
//! and port of the load balancer instead (`fullnat`), and replies to that port
//! translated back.
//! Everything else passes untouched; malformed IPv4 is dropped. Every verdict is counted by reason.
//! IPv6 frames at the XDP entry points go on to `xdp_lb6`/`xdp_lb6_local`
//! by a tail call (`v6`).
//! `xdp_lb_local` is the same program for interfaces whose packets may carry
//! partial L4 checksums (veth, bridges), and `tc_lb` the same again as a tc
//! classifier, for the devices that face local stacks (see `hook`).
//! A service in `MODE_DSR_IPIP` has its packets encapsulated to the
//! backend instead (`dsr`), whose replies go straight to the client.
//! `sock` holds socket load balancing for clients on the host itself
//! (cgroup socket-address programs).
//!
//! With the `bench` feature the object also carries the benchmark's
//! programs and maps (`bench.rs`); the agent's object never does.
#![no_std]
#![no_main]

#[cfg(feature = "bench")]
mod bench;
mod fullnat;
mod decap;
mod dsr;
mod hook;
mod icmp;
mod nat;
mod parse;
mod refuse;
mod route;
mod scratch;
mod select;
mod sock;
mod stats;
mod v6;
mod wake;

use aya_ebpf::{
    macros::{classifier, map, xdp},
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    Backend, BackendAddr, BackendVips, Conn, Counters, FlowBudget, FlowKey, PathCounters, Reason, Service, ServiceKey, Settings, BACKEND_VIPS_MAX, CONNTRACK_MAX, MAGLEV_ENTRIES,
    MAX_BACKENDS, MAX_INTERFACES, MAX_SERVICES, MODE_DSR_IPIP, MODE_FULL_NAT, SERVICE_F_WAKE, SNAT_FLOWS_MAX, WAKE_EVENTS_BYTES,
};

use crate::{
    hook::{Action, Hook, Tc, Xdp},
    nat::L4Checksums,
    parse::{parse_packet, Parsed},
};

#[map]
static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);
#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
static MAGLEV: Array<u32> = Array::with_max_entries(MAGLEV_ENTRIES, 0);
#[map]
static CONNTRACK: LruHashMap<FlowKey, Conn> = LruHashMap::with_max_entries(CONNTRACK_MAX, 0);
/// The services each backend address serves, for matching its replies.
#[map]
static BACKEND_VIPS: HashMap<BackendAddr, BackendVips> = HashMap::with_max_entries(BACKEND_VIPS_MAX, 0);
/// What the agent sets at load (`Settings`), in slot 0.
#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);
/// Per CPU: the flows started this second by packets other than a SYN.
#[map]
static FLOW_BUDGET: PerCpuArray<FlowBudget> = PerCpuArray::with_max_entries(1, 0);
#[map]
static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
#[map]
static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map]
static REASON_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);
/// Interfaces the agent knows can transmit redirected frames, keyed by ifindex.
#[map]
static EGRESS: DevMapHash = DevMapHash::with_max_entries(MAX_INTERFACES, 0);
/// Full NAT's claimed ports: a flow's reply 5-tuple (backend -> LB
/// address, port) -> its forward key (see `fullnat`). Not LRU: a claim is
/// never evicted behind its flow's back.
#[map]
static SNAT_FLOWS: HashMap<FlowKey, FlowKey> = HashMap::with_max_entries(SNAT_FLOWS_MAX, 0);
/// Which way translated packets left, per ingress ifindex.
#[map]
static PATH_STATS: PerCpuHashMap<u32, PathCounters> = PerCpuHashMap::with_max_entries(MAX_INTERFACES, 0);
/// Services that wake from zero with a client waiting (`lb_common::WakeEvent`).
#[map]
static WAKE_EVENTS: RingBuf = RingBuf::with_byte_size(WAKE_EVENTS_BYTES, 0);
/// Per CPU and service: when `WAKE_EVENTS` last had a report (ns).
#[map]
static WAKE_LAST: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
/// Per CPU: room for the large temporaries, off the stack (`scratch`).
#[map]
static SCRATCH: PerCpuArray<scratch::Scratch> = PerCpuArray::with_max_entries(1, 0);

/// For interfaces where every arriving L4 checksum is complete (NICs).
#[xdp]
pub fn xdp_lb(ctx: XdpContext) -> u32 {
    if let Some(action) = v6::divert(&ctx, lb_common::v6::V6_SLOT_COMPLETE) {
        return action;
    }
    run(&Xdp { ctx: &ctx, l4: L4Checksums::Complete })
}

/// For interfaces facing local stacks (veth, bridge, tap), whose packets may
/// carry partial checksums; see `nat::L4Checksums`.
#[xdp]
pub fn xdp_lb_local(ctx: XdpContext) -> u32 {
    if let Some(action) = v6::divert(&ctx, lb_common::v6::V6_SLOT_LOCAL) {
        return action;
    }
    run(&Xdp { ctx: &ctx, l4: L4Checksums::MaybePartial })
}

/// The tc classifier (ingress) for devices facing local stacks: veth,
/// bridges, tun/tap and the like; see `hook`.
#[classifier]
pub fn tc_lb(ctx: TcContext) -> i32 {
    let tc = Tc { ctx: &ctx };
    tc.pull_headers();
    run(&tc) as i32
}

#[inline(always)]
fn run<H: Hook>(hook: &H) -> u32 {
    let (action, reason) = match try_lb(hook) {
        Ok(sent) => sent,
        Err(Verdict { action, reason }) => (H::action(action), reason),
    };
    stats::count_reason(reason);
    action
}

/// An early exit: what to do and why.
pub struct Verdict {
    pub action: Action,
    pub reason: Reason,
}

impl Verdict {
    #[inline(always)]
    pub const fn pass(reason: Reason) -> Self {
        Self { action: Action::Pass, reason }
    }
    #[inline(always)]
    pub const fn drop(reason: Reason) -> Self {
        Self { action: Action::Drop, reason }
    }
}

/// What a forwarding mode did with a client packet.
enum Forwarded {
    /// Sent on already (DSR): the action and reason.
    Sent((u32, Reason)),
    /// Translated, for the fast path to send on: whether the L4 checksum is
    /// a partial one.
    Translated(bool),
}

/// `Ok((action, reason))` when the packet was translated and sent on,
/// `Err(verdict)` for everything that leaves early.
#[inline(always)]
fn try_lb<H: Hook>(hook: &H) -> Result<(u32, Reason), Verdict> {
    let mut pkt = match parse_packet(hook) {
        Ok(pkt) => pkt,
        // An ICMP error about a flow is the only other IPv4 we translate.
        Err(Verdict { reason: Reason::PassNotTcpUdp, .. }) => return icmp::forward_error(hook),
        Err(verdict) => return Err(verdict),
    };
    let key = ServiceKey { vip_be: pkt.dst_ip_be, port_be: pkt.dst_port_be, proto: pkt.proto, _pad: 0 };
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    if let Some(svc) = unsafe { SERVICES.get(&key) } {
        let svc = *svc;
        let sent = match svc.mode {
            MODE_DSR_IPIP => dsr::forward(hook, &pkt, &svc).map(Forwarded::Sent),
            MODE_FULL_NAT => fullnat::forward(hook, &mut pkt, &svc).map(Forwarded::Translated),
            _ => nat::forward(hook, &mut pkt, &svc).map(Forwarded::Translated),
        };
        return match sent {
            Err(Verdict { reason: Reason::DropNoBackend, .. }) if svc.flags & SERVICE_F_WAKE != 0 => {
                Err(wake::hold(pkt.proto, pkt.tcp_flags, &svc))
            }
            Err(Verdict { reason: Reason::DropNoBackend, .. }) => hook.refuse(&pkt),
            Err(verdict) => Err(verdict),
            Ok(Forwarded::Sent(sent)) => Ok(sent),
            Ok(Forwarded::Translated(partial_l4)) => Ok((route::send_on(hook, &pkt, None, partial_l4), Reason::Forwarded)),
        };
    }
    let (flow, partial_l4) = match fullnat::reply(hook, &mut pkt) {
        Err(Verdict { reason: Reason::PassNoService, .. }) => nat::reply(hook, &mut pkt)?,
        translated => translated?,
    };
    Ok((route::send_on(hook, &pkt, Some(&flow), partial_l4), Reason::ReplyTranslated))
}

/// Re-exported for the helper modules.
pub(crate) type Packet = Parsed;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
