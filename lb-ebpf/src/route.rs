//! The fast path: after the rewrite, ask the kernel's FIB for the next hop
//! and send the frame straight out of the egress interface, as a router
//! does (MACs set, TTL decremented), instead of passing it up through the
//! kernel's routing and netfilter path. Where the lookup cannot finish the
//! packet passes up (counted by `Path`), so the kernel resolves the
//! neighbour and a later packet takes the fast path.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
    EbpfContext as _,
};
use lb_common::{csum, Conn, Path, PathCounters};

use crate::{Packet, EGRESS, PATH_STATS};

const AF_INET: u8 = 2;

/// Where the next hop is, once known.
struct NextHop {
    ifindex: u32,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    /// The MACs come from the flow's entry, not from the neighbour table.
    from_flow: bool,
}

/// Send the translated `pkt` on. `flow` is the reply entry of the flow when
/// `pkt` is a reply: its client MACs stand in for a missing neighbour entry,
/// because a reply from a VIP that is a local address cannot pass up (the
/// kernel drops it as a martian). `partial_l4`: the L4 checksum is a
/// partial one (see `Path::PassPartialChecksum`).
#[inline(always)]
pub fn send_on(ctx: &XdpContext, pkt: &Packet, flow: Option<&Conn>, partial_l4: bool) -> u32 {
    let hop = if partial_l4 { Err(Path::PassPartialChecksum) } else { next_hop(ctx, pkt, flow) };
    let (action, path) = match hop {
        Ok(hop) => transmit(pkt, &hop),
        Err(path) => (xdp_action::XDP_PASS, path),
    };
    count_path(pkt.ingress_ifindex, path);
    action
}

#[inline(always)]
fn next_hop(ctx: &XdpContext, pkt: &Packet, flow: Option<&Conn>) -> Result<NextHop, Path> {
    // SAFETY: bounds-checked by parse_packet; read by value (packed header).
    let (ttl, tos, tot_len) = unsafe { ((*pkt.ip).ttl, (*pkt.ip).tos, u16::from_be((*pkt.ip).tot_len_be)) };
    if ttl <= 1 {
        return Err(Path::PassTtlExpired);
    }
    // SAFETY: all-zero is a valid bpf_fib_lookup (integers and unions of integers).
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = pkt.proto;
    fib.ifindex = pkt.ingress_ifindex;
    fib.__bindgen_anon_1.tot_len = tot_len;
    fib.__bindgen_anon_2.tos = tos;
    // SAFETY: as above; read after the rewrite, so these are the new addresses.
    unsafe {
        fib.sport = (*pkt.l4_ports)[0];
        fib.dport = (*pkt.l4_ports)[1];
        fib.__bindgen_anon_3.ipv4_src = (*pkt.ip).src_be;
        fib.__bindgen_anon_4.ipv4_dst = (*pkt.ip).dst_be;
    }
    // SAFETY: `fib` is a valid bpf_fib_lookup of the size passed. Flags 0: a
    // full lookup (policy rules included) as if received on the ingress
    // interface, which must have forwarding on.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut fib, core::mem::size_of::<FibParams>() as i32, 0) } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            Ok(NextHop { ifindex: fib.ifindex, dst_mac: fib.dmac, src_mac: fib.smac, from_flow: false })
        }
        // The kernel sets `ifindex` before it looks for the neighbour
        // (bpf_ipv4_fib_lookup, net/core/filter.c).
        BPF_FIB_LKUP_RET_NO_NEIGH => match flow {
            Some(c) if c.client_ifindex != 0 && c.client_ifindex == fib.ifindex => Ok(NextHop {
                ifindex: c.client_ifindex,
                dst_mac: c.client_mac,
                src_mac: c.local_mac,
                from_flow: true,
            }),
            _ => Err(Path::PassFibNoNeigh),
        },
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Path::PassFragNeeded),
        _ => Err(Path::PassFibUnsupported),
    }
}

/// XDP_TX back out of the ingress interface, or XDP_REDIRECT through
/// `EGRESS`; an interface the agent did not put there passes up untouched
/// (the devmap lookup's fallback action), before any byte changes.
#[inline(always)]
fn transmit(pkt: &Packet, hop: &NextHop) -> (u32, Path) {
    let (action, path) = if EGRESS.get_ifindex(hop.ifindex).is_none() {
        return (xdp_action::XDP_PASS, Path::PassEgressNotReady);
    } else if hop.ifindex == pkt.ingress_ifindex {
        (xdp_action::XDP_TX, Path::TxBack)
    } else {
        match EGRESS.redirect(hop.ifindex, xdp_action::XDP_PASS as u64) {
            Ok(action) => (action, Path::Redirected),
            Err(_) => return (xdp_action::XDP_PASS, Path::PassEgressNotReady),
        }
    };
    // SAFETY: bounds-checked by parse_packet; the redirect itself happens
    // after the program returns, so the frame may still change.
    unsafe {
        (*pkt.eth).dst = hop.dst_mac;
        (*pkt.eth).src = hop.src_mac;
        decrement_ttl(pkt);
    }
    (action, if hop.from_flow { Path::RepliedFlowMacs } else { path })
}

/// TTL - 1, and the header checksum with it (RFC 1624: TTL is the high
/// byte of the 16-bit word it shares with the protocol).
///
/// # Safety
/// `pkt.ip` must be bounds-checked.
#[inline(always)]
unsafe fn decrement_ttl(pkt: &Packet) {
    unsafe {
        let ttl = (*pkt.ip).ttl;
        let proto = (*pkt.ip).proto;
        // As the word sits in memory, like the checksum field.
        let old = u16::from_ne_bytes([ttl, proto]);
        let new = u16::from_ne_bytes([ttl - 1, proto]);
        (*pkt.ip).ttl = ttl - 1;
        (*pkt.ip).check = csum::replace2((*pkt.ip).check, old, new);
    }
}

#[inline(always)]
fn count_path(ifindex: u32, path: Path) {
    if let Some(c) = PATH_STATS.get_ptr_mut(ifindex) {
        // SAFETY: per-CPU value, nothing else writes it while we run.
        unsafe { (*c).packets[path as usize] += 1 };
        return;
    }
    let mut first = PathCounters::default();
    first.packets[path as usize] = 1;
    // A full map (more interfaces than MAX_INTERFACES) loses the count only.
    let _ = PATH_STATS.insert(ifindex, first, 0);
}
