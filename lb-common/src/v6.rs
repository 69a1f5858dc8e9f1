//! IPv6: the maps' keys and values, the flow hash and the checksum helpers
//! of the IPv6 programs (`xdp_lb6`, `xdp_lb6_local`, and full NAT's
//! `xdp_fullnat6`, `xdp_fullnat6_local`).
//!
//! The IPv6 path has maps of its own beside the IPv4 ones (whose layouts
//! stay as they are) and shares the rest: the service ids, the Maglev
//! tables, `BACKENDS` (its flags and service), the counters. A backend's
//! IPv6 address sits in `BACKENDS6` under the same id.
//!
//! Addresses are [`Ip6`]: the 16 bytes as they sit in the packet, loaded as
//! four native `u32`s, as the `_be` fields of the IPv4 ABI are.

use core::{
    mem::{align_of, size_of},
    net::{Ipv6Addr, SocketAddrV6},
};

use crate::{csum::fold, hash::mix32, Conn, MAX_VIPS_PER_BACKEND};

/// An IPv6 address in packet byte order in memory (see the module doc).
pub type Ip6 = [u32; 4];

pub const SERVICES6: &str = "SERVICES6";
pub const BACKENDS6: &str = "BACKENDS6";
pub const CONNTRACK6: &str = "CONNTRACK6";
pub const BACKEND_VIPS6: &str = "BACKEND_VIPS6";
/// The IPv6 programs, for the IPv4 entry points' tail call
/// (`V6_SLOT_COMPLETE`, `V6_SLOT_LOCAL`) and the IPv6 programs' own
/// (`V6_SLOT_ICMP`, and to full NAT: `V6_SLOT_FULLNAT`,
/// `V6_SLOT_FULLNAT_LOCAL`).
pub const V6_PROGS: &str = "V6_PROGS";
/// Socket load balancing's IPv6 twin of `SOCK_REVNAT`: (socket, backend)
/// -> the service asked for ([`SockRevKey6`] -> [`ServiceKey6`]).
pub const SOCK_REVNAT6: &str = "SOCK_REVNAT6";
/// Full NAT's claimed ports over IPv6: a flow's reply 5-tuple (backend ->
/// LB address, port) -> its forward key, as `crate::SNAT_FLOWS` for IPv4.
pub const SNAT_FLOWS6: &str = "SNAT_FLOWS6";
/// An IPv6 service's source address, by service id (an [`Ip6`]; all
/// zeros for none): `dsr-ipip`'s outer source (`crate::dsr6`).
pub const SOURCES6: &str = "SOURCES6";

/// The IPv6 twin of `PROG_LB` (checksums complete), reached by a tail call.
pub const PROG_LB6: &str = "xdp_lb6";
/// The IPv6 twin of `PROG_LB_LOCAL` (partial checksums possible).
pub const PROG_LB6_LOCAL: &str = "xdp_lb6_local";
/// ICMPv6 errors about a flow, reached by a tail call from both IPv6
/// programs: a program of its own, as `xdp_lb6_local` has no stack to
/// spare for it.
pub const PROG_ICMP6: &str = "xdp_icmp6";
/// IPv6 full NAT (checksums complete): a program of its own, which
/// `xdp_lb6` tail-calls for a full-NAT service's packet and a reply to a
/// claimed port, so that its stack is not `xdp_lb6`'s.
pub const PROG_FULLNAT6: &str = "xdp_fullnat6";
/// IPv6 full NAT for `xdp_lb6_local` (partial checksums possible).
pub const PROG_FULLNAT6_LOCAL: &str = "xdp_fullnat6_local";
/// `V6_PROGS` slot of each IPv6 program, in this order.
pub const V6_PROGRAMS: [&str; 5] = [PROG_LB6, PROG_LB6_LOCAL, PROG_ICMP6, PROG_FULLNAT6, PROG_FULLNAT6_LOCAL];
pub const V6_SLOT_COMPLETE: u32 = 0;
pub const V6_SLOT_LOCAL: u32 = 1;
pub const V6_SLOT_ICMP: u32 = 2;
pub const V6_SLOT_FULLNAT: u32 = 3;
pub const V6_SLOT_FULLNAT_LOCAL: u32 = 4;

/// Key of `SERVICES6` (value: the shared [`crate::Service`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey6 {
    pub vip: Ip6,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey6 {
    /// The key of the service at `vip` (address and port) for `proto`.
    pub const fn new(vip: SocketAddrV6, proto: u8) -> Self {
        ServiceKey6 { vip: ip6_raw(*vip.ip()), port_be: vip.port().to_be(), proto, _pad: 0 }
    }

    /// The VIP and port this key holds.
    pub const fn addr(&self) -> SocketAddrV6 {
        SocketAddrV6::new(ip6_addr(self.vip), u16::from_be(self.port_be), 0, 0)
    }
}

/// Key of `SOCK_REVNAT6`: a socket (its cookie) and the IPv6 backend its
/// `connect`/`sendmsg` was sent to, as `crate::SockRevKey` for IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey6 {
    pub cookie: u64,
    pub backend: Ip6,
    pub backend_port_be: u16,
    pub _pad: [u16; 3],
}

/// The last word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), as
/// [`Ip6`] holds it: the IPv4 address in packet order, or `None` for any
/// other address. A dual-stack socket reaches an IPv4 service so.
#[inline(always)]
pub const fn ipv4_mapped(ip: &Ip6) -> Option<u32> {
    if ip[0] == 0 && ip[1] == 0 && ip[2] == 0xffffu32.to_be() {
        Some(ip[3])
    } else {
        None
    }
}

/// The IPv4-mapped IPv6 address of `ip_be` (see [`ipv4_mapped`]).
#[inline(always)]
pub const fn mapped_ipv4(ip_be: u32) -> Ip6 {
    [0, 0, 0xffffu32.to_be(), ip_be]
}

/// Value of the `BACKENDS6` array, by backend id: the address of a backend
/// whose `BACKENDS` entry (same id) has `ip_be == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend6 {
    pub ip: Ip6,
    pub port_be: u16,
    pub _pad: u16,
    /// Full NAT: the load balancer's IPv6 address a flow to this backend is
    /// sent from (as `crate::Backend::snat_ip_be`); zeros for other modes.
    pub snat_ip: Ip6,
}

impl Backend6 {
    /// The entry of the backend at `addr`.
    pub const fn new(addr: SocketAddrV6) -> Self {
        Backend6 { ip: ip6_raw(*addr.ip()), port_be: addr.port().to_be(), _pad: 0, snat_ip: [0; 4] }
    }

    /// The entry of the backend at `addr` that full NAT reaches from
    /// `source` (`None`: no source, its flows are refused).
    pub const fn with_source(addr: SocketAddrV6, source: Option<Ipv6Addr>) -> Self {
        let snat_ip = match source {
            Some(s) => ip6_raw(s),
            None => [0; 4],
        };
        Backend6 { snat_ip, ..Backend6::new(addr) }
    }

    /// The address this entry holds.
    pub const fn addr(&self) -> SocketAddrV6 {
        SocketAddrV6::new(ip6_addr(self.ip), u16::from_be(self.port_be), 0, 0)
    }

    /// The `BACKEND_VIPS6` key its replies of protocol `proto` carry.
    pub const fn reply_key(&self, proto: u8) -> BackendAddr6 {
        BackendAddr6 { ip: self.ip, port_be: self.port_be, proto, _pad: 0 }
    }
}

/// Key of `CONNTRACK6`: a flow's 5-tuple as its client sends it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub src: Ip6,
    pub dst: Ip6,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey6 {
    /// The forward key of a flow from a client to a VIP.
    #[inline(always)]
    pub const fn new(client: Ip6, client_port_be: u16, vip: Ip6, vip_port_be: u16, proto: u8) -> Self {
        FlowKey6 { src: client, dst: vip, src_port_be: client_port_be, dst_port_be: vip_port_be, proto, _pad: [0; 3] }
    }
}

/// Value of `CONNTRACK6`: the IPv4 entry (its `nat_ip_be` and `snat_ip_be`
/// unused, 0) and the backend's IPv6 address, kept in the entry so a flow
/// outlives its backend's removal (draining), as in IPv4. Full NAT: the
/// address the flow is sent from (its claimed port is `conn.snat_port_be`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn6 {
    pub conn: Conn,
    pub nat_ip: Ip6,
    pub snat_ip: Ip6,
}

impl Conn6 {
    /// Full NAT: the key of this flow's claim in `SNAT_FLOWS6`, its
    /// replies' 5-tuple (backend -> the load balancer's address and port).
    #[inline(always)]
    pub const fn snat_reply_key(&self, proto: u8) -> FlowKey6 {
        FlowKey6::new(self.nat_ip, self.conn.nat_port_be, self.snat_ip, self.conn.snat_port_be, proto)
    }
}

/// Key of `BACKEND_VIPS6`: a backend's address as its replies carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr6 {
    pub ip: Ip6,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `BACKEND_VIPS6`: the services a backend address serves, the
/// used ones first; an unused slot has `port_be == 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendVips6 {
    pub vips: [ServiceKey6; MAX_VIPS_PER_BACKEND],
}

const _: () = {
    assert!(size_of::<ServiceKey6>() == 20 && align_of::<ServiceKey6>() == 4);
    assert!(size_of::<Backend6>() == 36 && align_of::<Backend6>() == 4);
    assert!(size_of::<FlowKey6>() == 40 && align_of::<FlowKey6>() == 4);
    assert!(size_of::<Conn6>() == 80 && align_of::<Conn6>() == 8);
    assert!(size_of::<BackendAddr6>() == 20);
    assert!(size_of::<BackendVips6>() == 20 * MAX_VIPS_PER_BACKEND);
};

/// `addr` as the program sees it in a packet.
pub const fn ip6_raw(addr: Ipv6Addr) -> Ip6 {
    let o = addr.octets();
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The address a raw [`Ip6`] holds.
pub const fn ip6_addr(raw: Ip6) -> Ipv6Addr {
    let [a, b, c, d] = [raw[0].to_ne_bytes(), raw[1].to_ne_bytes(), raw[2].to_ne_bytes(), raw[3].to_ne_bytes()];
    Ipv6Addr::from_octets([
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3],
    ])
}

/// An address mixed down to 32 bits for `hash::flow_hash`: every word
/// counts, in order (a plain XOR would let two words cancel out).
#[inline(always)]
pub const fn fold_ip6(ip: &Ip6) -> u32 {
    mix32(mix32(mix32(ip[0]) ^ ip[1]) ^ ip[2]) ^ ip[3]
}

/// The flow hash of an IPv6 5-tuple: `hash::flow_hash` over the folded
/// addresses, so every load balancer node picks the same slot.
#[inline(always)]
pub const fn flow_hash6(src: &Ip6, dst: &Ip6, src_port_be: u16, dst_port_be: u16, proto: u8) -> u32 {
    crate::hash::flow_hash(fold_ip6(src), fold_ip6(dst), src_port_be, dst_port_be, proto)
}

/// The one's-complement sum of an address's eight 16-bit words, unfolded.
#[inline(always)]
const fn sum_ip6(ip: &Ip6) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 4 {
        sum += (ip[i] & 0xffff) + (ip[i] >> 16);
        i += 1;
    }
    sum
}

/// The L4 checksum after an address in its pseudo-header changes from
/// `from` to `to` (RFC 1624 over the eight words: HC' = ~(~HC + ~m + m')).
/// IPv6 has no header checksum; only TCP's and UDP's carry the change.
#[inline(always)]
pub const fn replace16(check: u16, from: &Ip6, to: &Ip6) -> u16 {
    // ~m summed word by word is 8 * 0xffff - sum(m), kept positive.
    let not_from = 8 * 0xffff - sum_ip6(from);
    !fold((!check) as u32 + not_from + sum_ip6(to))
}

/// A partial checksum (the pseudo-header sum, not inverted) after an
/// address changes from `from` to `to`: P' = P + ~m + m'.
#[inline(always)]
pub const fn replace16_partial(partial: u16, from: &Ip6, to: &Ip6) -> u16 {
    fold(partial as u32 + 8 * 0xffff - sum_ip6(from) + sum_ip6(to))
}

/// The folded sum of the IPv6 pseudo-header (RFC 8200 8.1), not inverted:
/// what a partial (CHECKSUM_PARTIAL) L4 checksum field holds.
#[inline(always)]
pub const fn pseudo_header_sum6(src: &Ip6, dst: &Ip6, proto: u8, l4_len: u16) -> u16 {
    fold(sum_ip6(src) + sum_ip6(dst) + (proto as u16).to_be() as u32 + l4_len.to_be() as u32)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY (all impls): repr(C), integer fields only, padding written out as fields.
    unsafe impl aya::Pod for ServiceKey6 {}
    unsafe impl aya::Pod for Backend6 {}
    unsafe impl aya::Pod for FlowKey6 {}
    unsafe impl aya::Pod for Conn6 {}
    unsafe impl aya::Pod for BackendAddr6 {}
    unsafe impl aya::Pod for BackendVips6 {}
    unsafe impl aya::Pod for SockRevKey6 {}
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;

    use proptest::prelude::*;

    use super::*;

    /// The RFC 1071 checksum of `bytes` (even length), as the packet has it.
    fn checksum(bytes: &[u8]) -> u16 {
        let mut sum: u32 = bytes.chunks_exact(2).map(|w| u16::from_ne_bytes([w[0], w[1]]) as u32).sum();
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Pseudo-header then segment, as the checksum covers them.
    fn segment(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, l4: &[u8]) -> [u8; 40 + 16] {
        let mut b = [0u8; 56];
        b[..16].copy_from_slice(&src.octets());
        b[16..32].copy_from_slice(&dst.octets());
        b[32..36].copy_from_slice(&(l4.len() as u32).to_be_bytes());
        b[39] = proto;
        b[40..40 + l4.len()].copy_from_slice(l4);
        b
    }

    fn same(a: u16, b: u16) -> bool {
        // 0x0000 and 0xffff are the same number in one's complement.
        a == b || (a ^ b) == 0xffff && (a == 0 || b == 0)
    }

    #[test]
    fn ipv4_mapped_addresses_round_trip() {
        let ip4 = u32::from(core::net::Ipv4Addr::new(10, 0, 0, 1)).to_be();
        let mapped = ip6_raw("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(mapped, mapped_ipv4(ip4));
        assert_eq!(ipv4_mapped(&mapped), Some(ip4));
        assert_eq!(ipv4_mapped(&ip6_raw("fd00::ffff:a00:1".parse().unwrap())), None);
        assert_eq!(ipv4_mapped(&ip6_raw("::10.0.0.1".parse().unwrap())), None, "IPv4-compatible is not mapped");
    }

    #[test]
    fn layouts() {
        assert_eq!((offset_of!(ServiceKey6, port_be), offset_of!(ServiceKey6, proto)), (16, 18));
        assert_eq!((offset_of!(Backend6, port_be), offset_of!(Backend6, _pad)), (16, 18));
        assert_eq!(offset_of!(Backend6, snat_ip), 20);
        assert_eq!(offset_of!(FlowKey6, dst), 16);
        assert_eq!(offset_of!(FlowKey6, src_port_be), 32);
        assert_eq!(offset_of!(FlowKey6, dst_port_be), 34);
        assert_eq!(offset_of!(FlowKey6, proto), 36);
        assert_eq!((offset_of!(Conn6, conn), offset_of!(Conn6, nat_ip), offset_of!(Conn6, snat_ip)), (0, 48, 64));
        assert_eq!((offset_of!(SockRevKey6, backend), offset_of!(SockRevKey6, backend_port_be)), (8, 24));
        assert_eq!((size_of::<SockRevKey6>(), align_of::<SockRevKey6>()), (32, 8));
        assert_eq!((offset_of!(BackendAddr6, port_be), offset_of!(BackendAddr6, proto)), (16, 18));
    }

    #[test]
    fn raw_addresses_round_trip_in_packet_order() {
        let a: Ipv6Addr = "2001:db8::10".parse().unwrap();
        assert_eq!(ip6_addr(ip6_raw(a)), a);
        assert_eq!(ip6_raw(a)[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
    }

    #[test]
    fn keys_and_entries_hold_their_socket_addresses() {
        let vip: SocketAddrV6 = "[2001:db8::10]:80".parse().unwrap();
        let key = ServiceKey6::new(vip, 6);
        assert_eq!((key.addr(), key.proto, key.port_be), (vip, 6, 80u16.to_be()));
        let backend: SocketAddrV6 = "[2001:db8:1::2]:8080".parse().unwrap();
        let entry = Backend6::new(backend);
        assert_eq!(entry.addr(), backend);
        let source: Ipv6Addr = "2001:db8:1::fe".parse().unwrap();
        assert_eq!(Backend6::with_source(backend, Some(source)).snat_ip, ip6_raw(source));
        assert_eq!(Backend6::with_source(backend, None), entry);
        let reply = entry.reply_key(17);
        assert_eq!((reply.ip, reply.port_be, reply.proto), (ip6_raw(*backend.ip()), 8080u16.to_be(), 17));
    }

    #[test]
    fn the_hash_sees_every_word_of_both_addresses() {
        let a = ip6_raw("2001:db8::1".parse().unwrap());
        let b = ip6_raw("2001:db8::10".parse().unwrap());
        let base = flow_hash6(&a, &b, 1234, 80, 6);
        for word in 0..4 {
            let mut a2 = a;
            a2[word] ^= 1;
            assert_ne!(base, flow_hash6(&a2, &b, 1234, 80, 6), "source word {word}");
            let mut b2 = b;
            b2[word] ^= 1 << 20;
            assert_ne!(base, flow_hash6(&a, &b2, 1234, 80, 6), "destination word {word}");
        }
        assert_ne!(base, flow_hash6(&b, &a, 1234, 80, 6), "direction counts");
    }

    #[test]
    fn pseudo_header_sum6_is_the_sum_a_partial_checksum_holds() {
        let (src, dst) = ("2001:db8::1".parse().unwrap(), "2001:db8::2".parse().unwrap());
        // The full checksum over the pseudo-header and an all-zero 8-byte
        // UDP header is the inverted pseudo-header sum plus the length word.
        let l4 = [0u8; 8];
        let full = checksum(&segment(src, dst, 17, &l4)[..48]);
        assert!(same(!full, pseudo_header_sum6(&ip6_raw(src), &ip6_raw(dst), 17, 8)));
    }

    proptest! {
        /// An incrementally updated checksum is the one computed afresh.
        #[test]
        fn replace16_matches_a_full_recompute(src in any::<u128>(), dst in any::<u128>(), new in any::<u128>(), l4 in any::<[u8; 16]>()) {
            let (src, dst, new) = (Ipv6Addr::from(src), Ipv6Addr::from(dst), Ipv6Addr::from(new));
            let before = checksum(&segment(src, dst, 6, &l4));
            let after = checksum(&segment(src, new, 6, &l4));
            let inc = replace16(before, &ip6_raw(dst), &ip6_raw(new));
            prop_assert!(same(inc, after), "inc {inc:#x} full {after:#x}");
        }

        /// Rewriting an address of a partial checksum gives the new
        /// addresses' pseudo-header sum.
        #[test]
        fn replace16_partial_matches_the_new_pseudo_header(src in any::<u128>(), dst in any::<u128>(), new in any::<u128>(), len in 8u16..1480) {
            let (src, dst, new) = (ip6_raw(src.into()), ip6_raw(dst.into()), ip6_raw(new.into()));
            let p = pseudo_header_sum6(&src, &dst, 17, len);
            let got = replace16_partial(p, &dst, &new);
            let want = pseudo_header_sum6(&src, &new, 17, len);
            prop_assert!(same(got, want), "got {got:#x} want {want:#x}");
        }
    }
}
