//! IP-in-IP direct server return for IPv6 services (`MODE_DSR_IPIP`), as
//! `crate::dsr` does for IPv4: the client's packet picks its backend as in
//! every mode, then goes to it untouched inside an outer IPv6 header (next
//! header 41, `lb_common::dsr6`) from the service's IPv6 source
//! (`SOURCES6`), out of the interface the FIB names for the backend. The
//! backend decapsulates it and answers the client itself, from the VIP.
//!
//! The same drops as IPv4: a packet too big once 40 bytes longer
//! (`DropDsrTooBig`), no route or neighbour entry to the backend, an egress
//! interface the agent did not enable, or no source (`DropDsrNoRoute`), a
//! partial L4 checksum (`DropDsrUnsupported`).

use lb_common::{
    dsr6::{outer_header6, OUTER6_LEN, PROTO_IPV6},
    Reason, Service,
};

use super::{
    nat,
    parse::Parsed6,
    route::{self, IPV6_HLEN},
    ETH_P_IPV6_BE, SOURCES6,
};
use crate::{
    hook::{Hook, Xdp},
    parse::{ptr_at, EthHdr, ETH_HLEN},
    route::count_path,
    Verdict,
};

/// Encapsulate `pkt` (a client packet for `svc`) to its flow's backend and
/// send it; `Ok` with the action, `Err` for the drops above.
#[inline(always)]
pub fn forward(hook: &Xdp, pkt: &Parsed6, svc: &Service) -> Result<(u32, Reason), Verdict> {
    if nat::is_partial6(hook, pkt) {
        return Err(Verdict::drop(Reason::DropDsrUnsupported));
    }
    // Too big to grow by 80 bytes within a 16-bit length: too big for any MTU.
    if pkt.payload_len > u16::MAX - IPV6_HLEN - OUTER6_LEN as u16 {
        return Err(Verdict::drop(Reason::DropDsrTooBig));
    }
    let Some(src) = SOURCES6.get(svc.id) else { return Err(Verdict::drop(Reason::DropDsrNoRoute)) };
    let src = *src;
    if src == [0; 4] {
        return Err(Verdict::drop(Reason::DropDsrNoRoute));
    }
    let (backend, _) = nat::flow_of(hook, pkt, svc)?;
    let grown = pkt.payload_len + IPV6_HLEN + OUTER6_LEN as u16;
    let (ifindex, dst_mac, src_mac) =
        route::tunnel_hop(hook, pkt, PROTO_IPV6, grown, &src, &backend).map_err(Verdict::drop)?;
    // SAFETY: bounds-checked by parse_packet6, read before the head moves.
    let ver_tc_flow = unsafe { (*pkt.ip).ver_tc_flow };
    let outer = outer_header6(ver_tc_flow, pkt.payload_len, &src, &backend);
    // Before any byte changes: the XDP redirect itself happens after the
    // program returns.
    let (action, path) = hook.transmit(pkt.ingress_ifindex, ifindex);
    count_path(pkt.ingress_ifindex, path);
    if !path.is_fast() {
        return Err(Verdict::drop(Reason::DropDsrNoRoute));
    }
    if !hook.grow_head(OUTER6_LEN) {
        return Err(Verdict::drop(Reason::DropDsrUnsupported));
    }
    let (Some(eth), Some(ip)) = (ptr_at::<EthHdr, _>(hook, 0), ptr_at::<[u16; 20], _>(hook, ETH_HLEN)) else {
        return Err(Verdict::drop(Reason::DropDsrUnsupported));
    };
    // SAFETY: both bounds-checked just now; the outer header sits at an
    // address that is 2 mod 4, written as 16-bit words.
    unsafe {
        (*eth).dst = dst_mac;
        (*eth).src = src_mac;
        (*eth).ether_type = ETH_P_IPV6_BE;
        core::ptr::write_unaligned(ip, outer);
    }
    Ok((action, Reason::Forwarded))
}
