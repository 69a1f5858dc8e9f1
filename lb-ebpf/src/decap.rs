//! The backend's side of `MODE_DSR_IPIP` where the kernel has no IP-in-IP
//! device (CONFIG_NET_IPIP unset): `tc_decap`, which `lb-agent
//! backend-setup --bpf-decap IFACE` attaches at the interface's ingress,
//! strips the outer IPv4 header of every IP-in-IP packet (an outer header
//! without options or fragmentation, an IPv4 packet inside), so the
//! kernel takes the client's packet as if it had come in bare; and the
//! outer IPv6 header of IPv6-in-IPv6 (next header 41, an IPv6 packet
//! inside) for IPv6 services. Anything else goes on untouched.

use aya_ebpf::{bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, macros::classifier, programs::TcContext};
use lb_common::{
    dsr::OUTER_LEN,
    dsr6::{OUTER6_LEN, PROTO_IPV6},
    PROTO_IPIP,
};

use crate::{
    hook::{Hook, Tc},
    parse::{ptr_at, EthHdr, Ipv4Hdr, ETH_HLEN},
};

const TC_ACT_OK: i32 = 0;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// More-fragments flag and fragment offset, in network order.
const IP_MF_OFFSET_BE: u16 = 0x3fffu16.to_be();

#[classifier]
pub fn tc_decap(ctx: TcContext) -> i32 {
    let tc = Tc { ctx: &ctx };
    tc.pull(ETH_HLEN + 2 * OUTER6_LEN);
    // The outer header's length: the 20 or 40 bytes after the Ethernet
    // header go. A failure leaves the packet as it came, for the kernel
    // to drop.
    if is_ipip(&tc) {
        let _ = ctx.adjust_room(-(OUTER_LEN as i32), BPF_ADJ_ROOM_MAC, 0);
    } else if is_ip6ip6(&tc) {
        let _ = ctx.adjust_room(-(OUTER6_LEN as i32), BPF_ADJ_ROOM_MAC, 0);
    }
    TC_ACT_OK
}

/// IPv6 in IPv6 (`lb_common::dsr6`): an outer fixed header with next
/// header 41 (no extension headers), an IPv6 packet inside.
#[inline(always)]
fn is_ip6ip6(tc: &Tc) -> bool {
    let (Some(eth), Some(outer), Some(inner)) = (
        ptr_at::<EthHdr, _>(tc, 0),
        ptr_at::<[u8; 8], _>(tc, ETH_HLEN),
        ptr_at::<u8, _>(tc, ETH_HLEN + OUTER6_LEN),
    ) else {
        return false;
    };
    // SAFETY: all three bounds-checked just now.
    unsafe {
        (*eth).ether_type == ETH_P_IPV6_BE && (*outer)[0] >> 4 == 6 && (*outer)[6] == PROTO_IPV6 && *inner >> 4 == 6
    }
}

#[inline(always)]
fn is_ipip(tc: &Tc) -> bool {
    let (Some(eth), Some(outer), Some(inner)) = (
        ptr_at::<EthHdr, _>(tc, 0),
        ptr_at::<Ipv4Hdr, _>(tc, ETH_HLEN),
        ptr_at::<Ipv4Hdr, _>(tc, ETH_HLEN + OUTER_LEN),
    ) else {
        return false;
    };
    // SAFETY: all three bounds-checked just now; read by value (packed).
    unsafe {
        (*eth).ether_type == ETH_P_IP_BE
            && (*outer).ver_ihl == 0x45
            && (*outer).proto == PROTO_IPIP
            && (*outer).frag_off_be & IP_MF_OFFSET_BE == 0
            && (*inner).ver_ihl >> 4 == 4
    }
}
