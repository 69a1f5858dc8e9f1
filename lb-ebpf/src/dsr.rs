//! IP-in-IP direct server return (`MODE_DSR_IPIP`): a client packet for a
//! service in this mode picks its backend as in every mode (the connection
//! table, or a new Maglev pick), then goes to it untouched inside an outer
//! IPv4 header (`lb_common::dsr`) from the service's source address, out of
//! the interface the FIB names for the backend. The backend decapsulates
//! it and answers the client itself, from the VIP: no reply comes back, so
//! nothing here is reversed.
//!
//! What cannot be sent is dropped, counted, never passed up: the kernel
//! would route the bare packet to the VIP, not to the backend. A packet too
//! big once 20 bytes longer (`Reason::DropDsrTooBig`: no ICMP goes back, so
//! the MTU toward backends must allow for it, see the README), no route or
//! neighbour entry to the backend, or an egress interface the agent did not
//! enable (`DropDsrNoRoute`), and the tc hook or a
//! partial L4 checksum (`DropDsrUnsupported`).

use lb_common::{
    dsr::{outer_header, OUTER_LEN},
    Reason, Service,
};

use crate::{
    hook::Hook,
    nat,
    parse::{ptr_at, EthHdr, ETH_HLEN},
    route::{self, count_path},
    Packet, Verdict,
};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

/// Encapsulate `pkt` (a client packet for `svc`) to its flow's backend and
/// send it; `Ok` with the action, `Err` for the drops above and a service
/// without backends (which `try_lb` refuses as in every mode).
#[inline(always)]
pub fn forward<H: Hook>(hook: &H, pkt: &Packet, svc: &Service) -> Result<(u32, Reason), Verdict> {
    if !hook.can_encapsulate(pkt) {
        return Err(Verdict::drop(Reason::DropDsrUnsupported));
    }
    let conn = nat::flow_of(hook, pkt, svc)?;
    let grown = pkt.tot_len.wrapping_add(OUTER_LEN as u16);
    let hop = route::tunnel_hop(hook, pkt, svc.source_be, conn.nat_ip_be, grown).map_err(Verdict::drop)?;
    // SAFETY: bounds-checked by parse_packet, read before the head moves.
    let frag_be = unsafe { (*pkt.ip).frag_off_be };
    let outer = outer_header(pkt.tot_len, pkt.tos, frag_be, svc.source_be, conn.nat_ip_be);
    send_encapsulated(hook, pkt.ingress_ifindex, (hop.ifindex, hop.dst_mac, hop.src_mac), ETH_P_IP_BE, outer)
}

/// IPv4 and IPv6 (`v6::dsr`) alike: send the frame that arrived on
/// `ingress_ifindex` out of `hop` (egress ifindex, destination and source
/// MAC) inside `outer`, the outer header (`OUTER_LEN` or `OUTER6_LEN`
/// bytes as 16-bit words) of `ether_type_be`; the drops above where it
/// cannot leave so.
#[inline(always)]
pub fn send_encapsulated<H: Hook, T>(
    hook: &H,
    ingress_ifindex: u32,
    hop: (u32, [u8; 6], [u8; 6]),
    ether_type_be: u16,
    outer: T,
) -> Result<(u32, Reason), Verdict> {
    let (ifindex, dst_mac, src_mac) = hop;
    // Before any byte changes: the XDP redirect itself happens after the
    // program returns.
    let (action, path) = hook.transmit(ingress_ifindex, ifindex);
    count_path(ingress_ifindex, path);
    if !path.is_fast() {
        return Err(Verdict::drop(Reason::DropDsrNoRoute));
    }
    if !hook.grow_head(core::mem::size_of::<T>()) {
        return Err(Verdict::drop(Reason::DropDsrUnsupported));
    }
    let (Some(eth), Some(ip)) = (ptr_at::<EthHdr, _>(hook, 0), ptr_at::<T, _>(hook, ETH_HLEN)) else {
        return Err(Verdict::drop(Reason::DropDsrUnsupported));
    };
    // SAFETY: both bounds-checked just now; the outer header sits at an
    // address that is 2 mod 4, written as 16-bit words, unaligned.
    unsafe {
        (*eth).dst = dst_mac;
        (*eth).src = src_mac;
        (*eth).ether_type = ether_type_be;
        core::ptr::write_unaligned(ip, outer);
    }
    Ok((action, Reason::Forwarded))
}
