//! The fast path: after the rewrite, ask the kernel's FIB for the next hop
//! and send the frame straight out of the egress interface, as a router
//! does (MACs set, TTL decremented), instead of passing it up through the
//! kernel's routing and netfilter path. Where the lookup cannot finish the
//! packet passes up (counted by `Path`), so the kernel resolves the
//! neighbour and a later packet takes the fast path.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::generated::bpf_fib_lookup,
};
use lb_common::{csum, Conn, Path, PathCounters, Reason, PROTO_IPIP};

use crate::{
    hook::{Action, Hook},
    parse::{EthHdr, Ipv4Hdr},
    scratch::scratch_field,
    Packet, PATH_STATS,
};

const AF_INET: u8 = 2;
/// `fib_lookup_of`'s code when it had no scratch space (never, in practice):
/// none of the kernel's, so every caller takes it for "cannot be sent".
pub const NO_SCRATCH: u32 = u32::MAX;

/// Where the next hop is, once known.
pub struct NextHop {
    pub ifindex: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// The MACs come from the flow's entry, not from the neighbour table.
    pub from_flow: bool,
}

/// What the FIB says about a translated packet.
enum Fib {
    Found(NextHop),
    /// The egress interface is known, its neighbour entry is not.
    NoNeigh(u32),
    Pass(Path),
}

/// Send the translated `pkt` on. `flow` is the reply entry of the flow when
/// `pkt` is a reply (see `Hook::send_no_neigh`). `partial_l4`: the L4
/// checksum is a partial one (see `Path::PassPartialChecksum`).
#[inline(always)]
pub fn send_on<H: Hook>(hook: &H, pkt: &Packet, flow: Option<&Conn>, partial_l4: bool) -> u32 {
    let (action, path) = if partial_l4 {
        (H::action(Action::PassTranslated), Path::PassPartialChecksum)
    } else {
        match look_up(hook, pkt) {
            Fib::Found(hop) => hook.send(pkt, &hop),
            Fib::NoNeigh(ifindex) => hook.send_no_neigh(pkt, ifindex, flow),
            Fib::Pass(path) => (H::action(Action::PassTranslated), path),
        }
    };
    count_path(pkt.ingress_ifindex, path);
    action
}

/// bpf_fib_lookup for `pkt` as rewritten (its values, not its bytes, which
/// tc's checksum helpers may have moved).
#[inline(always)]
fn look_up<H: Hook>(hook: &H, pkt: &Packet) -> Fib {
    if pkt.ttl <= 1 {
        return Fib::Pass(Path::PassTtlExpired);
    }
    let (rc, hop) = fib_lookup(hook, pkt);
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Fib::Found(hop),
        // The kernel sets `ifindex` before it looks for the neighbour
        // (bpf_ipv4_fib_lookup, net/core/filter.c).
        BPF_FIB_LKUP_RET_NO_NEIGH => Fib::NoNeigh(hop.ifindex),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Fib::Pass(Path::PassFragNeeded),
        _ => Fib::Pass(Path::PassFibUnsupported),
    }
}

/// Whether the kernel would not forward `pkt` but answer it itself:
/// bpf_ipv4_fib_lookup says NOT_FWDED for a local destination (RTN_LOCAL)
/// and for one it has no route to, and FWD_DISABLED (before any lookup)
/// where the ingress interface does not forward at all; the stack then
/// answers as a closed port, or with an ICMP unreachable. (Blackhole,
/// unreachable and prohibit routes have codes of their own, and a routed
/// destination is forwarded.)
#[inline(always)]
pub fn not_forwarded<H: Hook>(hook: &H, pkt: &Packet) -> bool {
    matches!(fib_lookup(hook, pkt).0, BPF_FIB_LKUP_RET_NOT_FWDED | BPF_FIB_LKUP_RET_FWD_DISABLED)
}

/// bpf_fib_lookup of `pkt`'s addresses and ports: the kernel's return code
/// and the next hop it filled in.
#[inline(always)]
fn fib_lookup<H: Hook>(hook: &H, pkt: &Packet) -> (u32, NextHop) {
    let ports = (pkt.src_port_be, pkt.dst_port_be);
    let addrs = (pkt.src_ip_be, pkt.dst_ip_be);
    fib_lookup_of(hook, pkt, pkt.proto, hook.fib_tot_len(pkt), ports, addrs)
}

/// The next hop of `pkt` once wrapped in an outer IPv4 header from
/// `src_be` to `dst_be` (see `dsr`), with the egress MTU checked against
/// the grown length; `Err` with the reason it cannot be sent.
#[inline(always)]
pub fn tunnel_hop<H: Hook>(hook: &H, pkt: &Packet, src_be: u32, dst_be: u32, tot_len: u16) -> Result<NextHop, Reason> {
    let (rc, hop) = fib_lookup_of(hook, pkt, PROTO_IPIP, tot_len, (0, 0), (src_be, dst_be));
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok(hop),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Reason::DropDsrTooBig),
        _ => Err(Reason::DropDsrNoRoute),
    }
}

/// bpf_fib_lookup as if `pkt` (its ingress and TOS) were a `proto` packet
/// of `tot_len` bytes between `addrs` (source, destination) and `ports`:
/// the kernel's return code and the next hop it filled in (its MACs are
/// valid on success only). The 64-byte parameters live in `scratch`.
#[inline(always)]
fn fib_lookup_of<H: Hook>(
    hook: &H,
    pkt: &Packet,
    proto: u8,
    tot_len: u16,
    ports: (u16, u16),
    addrs: (u32, u32),
) -> (u32, NextHop) {
    let mut hop = NextHop { ifindex: 0, dst_mac: [0; 6], src_mac: [0; 6], from_flow: false };
    let Some(fib) = scratch_field!(fib) else { return (NO_SCRATCH, hop) };
    // SAFETY: all-zero is a valid bpf_fib_lookup (integers and unions of
    // integers); written whole, so nothing of an earlier packet is left.
    *fib = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = proto;
    fib.ifindex = pkt.ingress_ifindex;
    fib.__bindgen_anon_1.tot_len = tot_len;
    fib.__bindgen_anon_2.tos = pkt.tos;
    (fib.sport, fib.dport) = ports;
    fib.__bindgen_anon_3.ipv4_src = addrs.0;
    fib.__bindgen_anon_4.ipv4_dst = addrs.1;
    // SAFETY: `fib` is a valid bpf_fib_lookup of the size passed, in a map
    // value. Flags 0: a full lookup (policy rules included) as if received
    // on the ingress interface, which must have forwarding on.
    let rc = unsafe { bpf_fib_lookup(hook.as_ptr(), fib, core::mem::size_of::<FibParams>() as i32, 0) } as u32;
    (hop.ifindex, hop.dst_mac, hop.src_mac) = (fib.ifindex, fib.dmac, fib.smac);
    (rc, hop)
}

/// The MACs of `hop`, and TTL - 1.
///
/// # Safety
/// `eth` and `ip` must be bounds-checked.
#[inline(always)]
pub unsafe fn set_macs_and_ttl(eth: *mut EthHdr, ip: *mut Ipv4Hdr, hop: &NextHop) {
    unsafe {
        (*eth).dst = hop.dst_mac;
        (*eth).src = hop.src_mac;
        decrement_ttl(ip);
    }
}

/// TTL - 1, and the header checksum with it (RFC 1624: TTL is the high
/// byte of the 16-bit word it shares with the protocol). The header's sum
/// stays what it was, so a CHECKSUM_COMPLETE skb's `csum` stays right.
///
/// # Safety
/// `ip` must be bounds-checked.
#[inline(always)]
pub unsafe fn decrement_ttl(ip: *mut Ipv4Hdr) {
    unsafe {
        let ttl = (*ip).ttl;
        let proto = (*ip).proto;
        // As the word sits in memory, like the checksum field.
        let old = u16::from_ne_bytes([ttl, proto]);
        let new = u16::from_ne_bytes([ttl.wrapping_sub(1), proto]);
        (*ip).ttl = ttl.wrapping_sub(1);
        (*ip).check = csum::replace2((*ip).check, old, new);
    }
}
#[inline(always)]
pub fn count_path(ifindex: u32, path: Path) {
    if let Some(c) = PATH_STATS.get_ptr_mut(ifindex) {
        // SAFETY: per-CPU value, nothing else writes it while we run.
        unsafe { (*c).packets[path as usize] += 1 };
        return;
    }
    let Some(first) = scratch_field!(first_path) else { return };
    *first = PathCounters::default();
    first.packets[path as usize] = 1;
    // A full map (more interfaces than MAX_INTERFACES) loses the count only.
    let _ = PATH_STATS.insert(ifindex, &*first, 0);
}
