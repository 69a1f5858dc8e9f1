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
use lb_common::{Conn, Path};

use super::parse::Parsed6;
use crate::{hook::Xdp, route::count_path, EGRESS};

const AF_INET6: u8 = 10;
const IPV6_HLEN: u16 = 40;

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
        let (rc, fib) = fib_lookup(hook, pkt);
        match rc {
            BPF_FIB_LKUP_RET_SUCCESS => send(pkt, fib.ifindex, fib.dmac, fib.smac, false),
            BPF_FIB_LKUP_RET_NO_NEIGH => match flow {
                Some(c) if c.client_ifindex != 0 && c.client_ifindex == fib.ifindex => {
                    send(pkt, fib.ifindex, c.client_mac, c.local_mac, true)
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
fn send(pkt: &Parsed6, ifindex: u32, dst_mac: [u8; 6], src_mac: [u8; 6], from_flow: bool) -> (u32, Path) {
    let (action, path) = if EGRESS.get_ifindex(ifindex).is_none() {
        return (xdp_action::XDP_PASS, Path::PassEgressNotReady);
    } else if ifindex == pkt.ingress_ifindex {
        (xdp_action::XDP_TX, Path::TxBack)
    } else {
        match EGRESS.redirect(ifindex, xdp_action::XDP_PASS as u64) {
            Ok(action) => (action, Path::Redirected),
            Err(_) => return (xdp_action::XDP_PASS, Path::PassEgressNotReady),
        }
    };
    // SAFETY: bounds-checked by parse_packet6; XDP moves no packet data.
    unsafe {
        (*pkt.eth).dst = dst_mac;
        (*pkt.eth).src = src_mac;
        (*pkt.ip).hop_limit = pkt.hop_limit - 1;
    }
    (action, if from_flow { Path::RepliedFlowMacs } else { path })
}

/// bpf_fib_lookup of `pkt`'s addresses and ports, as rewritten.
#[inline(always)]
fn fib_lookup(hook: &Xdp, pkt: &Parsed6) -> (u32, FibParams) {
    // SAFETY: all-zero is a valid bpf_fib_lookup (integers and unions of integers).
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET6;
    fib.l4_protocol = pkt.proto;
    fib.ifindex = pkt.ingress_ifindex;
    // The whole packet, for the kernel's MTU check.
    fib.__bindgen_anon_1.tot_len = pkt.payload_len.saturating_add(IPV6_HLEN);
    fib.__bindgen_anon_2.flowinfo = pkt.flowinfo_be;
    fib.sport = pkt.src_port_be;
    fib.dport = pkt.dst_port_be;
    fib.__bindgen_anon_3.ipv6_src = pkt.src;
    fib.__bindgen_anon_4.ipv6_dst = pkt.dst;
    // SAFETY: `fib` is a valid bpf_fib_lookup of the size passed; flags 0:
    // a full lookup as if received on the ingress interface.
    let rc = unsafe { bpf_fib_lookup(hook.as_ptr(), &mut fib, core::mem::size_of::<FibParams>() as i32, 0) } as u32;
    (rc, fib)
}
