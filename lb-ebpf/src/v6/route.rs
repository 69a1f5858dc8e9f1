//! The IPv6 fast path, as `crate::route` for IPv4: bpf_fib_lookup
//! (AF_INET6), then XDP_TX or XDP_REDIRECT through `EGRESS` with the MACs
//! set and the hop limit decremented; where that cannot finish, the packet
//! passes up to the kernel's stack, counted by `Path`.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS,
    },
    helpers::generated::bpf_fib_lookup,
    EbpfContext,
};
use lb_common::{v6::Ip6, Conn, Path, Reason};

use super::parse::Parsed6;
use crate::{
    hook::{Hook, Xdp},
    route::{count_path, NextHop, NO_SCRATCH},
    scratch::scratch_field,
};

const AF_INET6: u8 = 10;
/// An IPv6 header's length (no extension headers).
pub const IPV6_HLEN: u16 = 40;

/// Send the translated `pkt` on; `flow` is the flow's entry when `pkt` is
/// a reply (its client's MACs stand in for a missing neighbour entry, as
/// `Hook::send_no_neigh` does in IPv4).
#[inline(always)]
pub fn send_on(hook: &Xdp, pkt: &Parsed6, flow: Option<&Conn>, partial_l4: bool) -> u32 {
    let (action, path) = if partial_l4 {
        (xdp_action::XDP_PASS, Path::PassPartialChecksum)
    } else if pkt.hop_limit <= 1 {
        (xdp_action::XDP_PASS, Path::PassTtlExpired)
    } else {
        let (rc, hop) = fib_lookup(hook, pkt);
        match rc {
            BPF_FIB_LKUP_RET_SUCCESS => send(hook, pkt, hop.ifindex, hop.dst_mac, hop.src_mac, false),
            BPF_FIB_LKUP_RET_NO_NEIGH => match flow {
                Some(c) if c.client_ifindex != 0 && c.client_ifindex == hop.ifindex => {
                    send(hook, pkt, hop.ifindex, c.client_mac, c.local_mac, true)
                }
                _ => (xdp_action::XDP_PASS, Path::PassFibNoNeigh),
            },
            BPF_FIB_LKUP_RET_FRAG_NEEDED => (xdp_action::XDP_PASS, Path::PassFragNeeded),
            _ => (xdp_action::XDP_PASS, Path::PassFibUnsupported),
        }
    };
    count_path(pkt.ingress_ifindex, path);
    action
}

/// XDP_TX back out of the ingress interface or XDP_REDIRECT to another one
/// the agent put in `EGRESS`; any other passes up before a byte changes.
#[inline(always)]
fn send(hook: &Xdp, pkt: &Parsed6, ifindex: u32, dst_mac: [u8; 6], src_mac: [u8; 6], from_flow: bool) -> (u32, Path) {
    let (action, path) = hook.transmit(pkt.ingress_ifindex, ifindex);
    if !path.is_fast() {
        return (action, path);
    }
    // SAFETY: bounds-checked by parse_packet6; XDP moves no packet data.
    unsafe {
        (*pkt.eth).dst = dst_mac;
        (*pkt.eth).src = src_mac;
        (*pkt.ip).hop_limit = pkt.hop_limit - 1;
    }
    (action, if from_flow { Path::RepliedFlowMacs } else { path })
}

/// The next hop (egress interface, destination and source MAC) of `pkt`
/// once wrapped in an outer IPv6 header (`proto`, `tot_len` bytes in all)
/// from `src` to `dst` (see `v6::dsr`), with the egress MTU checked
/// against the grown length; `Err` with the reason it cannot be sent.
#[inline(always)]
pub fn tunnel_hop(
    hook: &Xdp,
    pkt: &Parsed6,
    proto: u8,
    tot_len: u16,
    src: &Ip6,
    dst: &Ip6,
) -> Result<(u32, [u8; 6], [u8; 6]), Reason> {
    let (rc, hop) = fib_lookup_of(hook, pkt, proto, tot_len, (0, 0), (src, dst));
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => Ok((hop.ifindex, hop.dst_mac, hop.src_mac)),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Err(Reason::DropDsrTooBig),
        _ => Err(Reason::DropDsrNoRoute),
    }
}

/// bpf_fib_lookup of `pkt`'s addresses and ports, as rewritten.
#[inline(always)]
fn fib_lookup(hook: &Xdp, pkt: &Parsed6) -> (u32, NextHop) {
    // The whole packet, for the kernel's MTU check.
    let tot_len = pkt.payload_len.saturating_add(IPV6_HLEN);
    let ports = (pkt.src_port_be, pkt.dst_port_be);
    fib_lookup_of(hook, pkt, pkt.proto, tot_len, ports, (&pkt.src, &pkt.dst))
}

/// bpf_fib_lookup as if `pkt` (its ingress and flow info) were a `proto`
/// packet of `tot_len` bytes between `addrs` (source, destination) and
/// `ports`: the kernel's return code and the next hop it named. The
/// parameters sit in the scratch space, as IPv4's do (`crate::route`).
#[inline(always)]
fn fib_lookup_of(
    hook: &Xdp,
    pkt: &Parsed6,
    proto: u8,
    tot_len: u16,
    ports: (u16, u16),
    addrs: (&Ip6, &Ip6),
) -> (u32, NextHop) {
    let mut hop = NextHop { ifindex: 0, dst_mac: [0; 6], src_mac: [0; 6], from_flow: false };
    let Some(fib) = scratch_field!(fib) else { return (NO_SCRATCH, hop) };
    // SAFETY: all-zero is a valid bpf_fib_lookup (integers and unions of
    // integers); written whole, so nothing of an earlier packet is left.
    *fib = unsafe { core::mem::zeroed() };
    fib.family = AF_INET6;
    fib.l4_protocol = proto;
    fib.ifindex = pkt.ingress_ifindex;
    fib.__bindgen_anon_1.tot_len = tot_len;
    fib.__bindgen_anon_2.flowinfo = pkt.flowinfo_be;
    (fib.sport, fib.dport) = ports;
    fib.__bindgen_anon_3.ipv6_src = *addrs.0;
    fib.__bindgen_anon_4.ipv6_dst = *addrs.1;
    // SAFETY: `fib` is a valid bpf_fib_lookup of the size passed; flags 0:
    // a full lookup as if received on the ingress interface.
    let rc = unsafe { bpf_fib_lookup(hook.as_ptr(), fib, core::mem::size_of::<FibParams>() as i32, 0) } as u32;
    (hop.ifindex, hop.dst_mac, hop.src_mac) = (fib.ifindex, fib.dmac, fib.smac);
    (rc, hop)
}
