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
use crate::{dsr::send_encapsulated, hook::Xdp, Verdict};

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
    let hop = route::tunnel_hop(hook, pkt, PROTO_IPV6, grown, &src, &backend).map_err(Verdict::drop)?;
    // SAFETY: bounds-checked by parse_packet6, read before the head moves.
    let ver_tc_flow = unsafe { (*pkt.ip).ver_tc_flow };
    let outer = outer_header6(ver_tc_flow, pkt.payload_len, &src, &backend);
    send_encapsulated(hook, pkt.ingress_ifindex, hop, ETH_P_IPV6_BE, outer)
}
