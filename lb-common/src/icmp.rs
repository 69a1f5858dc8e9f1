//! ICMP errors about a flow (RFC 792): which ones the program forwards, and
//! the checksum arithmetic of translating the packet such an error quotes.
//!
//! A router that cannot deliver a reply the load balancer sent (too big for
//! its next link, TTL run out, ...) sends an error to the reply's source, the
//! VIP, quoting the reply's IPv4 header and at least the first 8 bytes of its
//! TCP or UDP header (src VIP:vport, dst client:cport). For the backend that
//! owns the flow to act on it (path MTU discovery), the quote must name the
//! backend as its source, as the backend sent it: the quoted source address
//! and port change, and with them the quoted IPv4 header checksum, the quoted
//! L4 checksum when the quote holds it, and the ICMP checksum, which covers
//! the whole quote. Linux's NAT does the same (`nf_nat_icmp_reply_translation`).
//!
//! ICMPv6 (RFC 4443) the same way, with no header checksum but a
//! pseudo-header under the ICMPv6 one, and in both directions: an error
//! about a client's translated packet (client -> backend) also comes back
//! through the load balancer, to the client, whose quote's destination
//! must be the VIP again (`translate_quoted6`, `lb-ebpf/src/v6/icmp.rs`).

use crate::{
    csum,
    v6::{replace16, Ip6},
    PROTO_TCP, PROTO_UDP,
};

/// Destination unreachable (fragmentation needed, port unreachable, ...).
pub const ICMP_DEST_UNREACH: u8 = 3;
/// Time exceeded (TTL, fragment reassembly).
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// Type, code, checksum and the 4-byte rest (the next-hop MTU for
/// "fragmentation needed"); the quote follows.
pub const ICMP_HLEN: usize = 8;
/// RFC 792 guarantees this much of the quoted L4 header: both ports, and
/// UDP's checksum.
pub const QUOTED_L4_MIN: usize = 8;

/// Whether an ICMP message of this type is an error about a packet of ours
/// that the flow's backend must get.
#[inline(always)]
pub const fn is_flow_error(icmp_type: u8) -> bool {
    matches!(icmp_type, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED)
}

/// Where the quoted L4 checksum sits in the quoted L4 header, and how much
/// of that header the quote must hold for it to be updated: UDP's is in the
/// guaranteed 8 bytes; TCP's is updated only when the quote holds the whole
/// 20-byte header, as Linux's NAT does (`tcp_manip_pkt`). `None` for other
/// protocols.
#[inline(always)]
pub const fn quoted_l4_check(proto: u8) -> Option<(usize, usize)> {
    match proto {
        PROTO_UDP => Some((6, 8)),
        PROTO_TCP => Some((16, 20)),
        _ => None,
    }
}

/// The checksums of an ICMP error and of the packet it quotes, raw (as
/// loaded from the packet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuoteChecksums {
    pub icmp: u16,
    pub quoted_ip: u16,
    /// The quoted L4 checksum, when the quote holds it (`quoted_l4_check`).
    pub quoted_l4: Option<u16>,
}

/// The checksums after the quoted packet's source address changes from
/// `old_ip` to `new_ip` and its source port from `old_port` to `new_port`
/// (RFC 1624 updates; all values raw). A zero quoted UDP checksum means
/// "none" and stays so; one that computes to zero is written 0xffff.
#[inline(always)]
pub fn translate_quoted_source(
    sums: QuoteChecksums,
    proto: u8,
    old_ip: u32,
    new_ip: u32,
    old_port: u16,
    new_port: u16,
) -> QuoteChecksums {
    let quoted_ip = csum::replace4(sums.quoted_ip, old_ip, new_ip);
    let (icmp, quoted_l4) = translate_quoted_l4(
        sums.icmp,
        sums.quoted_l4,
        proto,
        |c| csum::replace4(c, old_ip, new_ip),
        old_port,
        new_port,
    );
    // The quoted IPv4 header checksum sits at an even offset too.
    QuoteChecksums { icmp: csum::replace2(icmp, sums.quoted_ip, quoted_ip), quoted_ip, quoted_l4 }
}

/// ICMPv6 errors about a packet (RFC 4443): destination unreachable
/// (`refuse::ICMP6_DEST_UNREACH`), packet too big, time exceeded.
pub const ICMP6_PACKET_TOO_BIG: u8 = 2;
pub const ICMP6_TIME_EXCEEDED: u8 = 3;

/// Whether an ICMPv6 message of this type is an error about a flow's
/// packet that the program translates (`lb-ebpf/src/v6/icmp.rs`). The
/// informational ones (128 and up: echo, neighbour discovery) never are.
#[inline(always)]
pub const fn is_flow_error6(icmp_type: u8) -> bool {
    matches!(icmp_type, crate::refuse::ICMP6_DEST_UNREACH | ICMP6_PACKET_TOO_BIG | ICMP6_TIME_EXCEEDED)
}

/// The checksums of an ICMPv6 error and of the packet it quotes (its L4
/// checksum, when the quote holds it: `quoted_l4_check`), raw. IPv6 has
/// no header checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quote6Checksums {
    pub icmp: u16,
    pub quoted_l4: Option<u16>,
}

/// The checksums after one end of the quoted IPv6 packet changes, its
/// address from `old_ip` to `new_ip` and its port from `old_port` to
/// `new_port`: either end, as every quoted field sits at an even offset
/// from the ICMPv6 header (8, then the 40-byte IPv6 header). The ICMPv6
/// pseudo-header (the outer addresses) is the caller's: `v6::replace16`.
/// UDP's zero checksum rules as in `translate_quoted_source`.
#[inline(always)]
pub fn translate_quoted6(
    sums: Quote6Checksums,
    proto: u8,
    old_ip: &Ip6,
    new_ip: &Ip6,
    old_port: u16,
    new_port: u16,
) -> Quote6Checksums {
    let (icmp, quoted_l4) =
        translate_quoted_l4(sums.icmp, sums.quoted_l4, proto, |c| replace16(c, old_ip, new_ip), old_port, new_port);
    Quote6Checksums { icmp, quoted_l4 }
}

/// IPv4 and IPv6 alike: the ICMP checksum and the quoted L4 one after a
/// quoted address changes (`addr` applies that change to a checksum, RFC
/// 1624 over the address's words) and its port with it. The quoted L4
/// checksum covers its pseudo-header's addresses too; the ICMP checksum
/// covers every quoted byte that changed, the L4 checksum included.
#[inline(always)]
fn translate_quoted_l4(
    icmp: u16,
    quoted_l4: Option<u16>,
    proto: u8,
    addr: impl Fn(u16) -> u16,
    old_port: u16,
    new_port: u16,
) -> (u16, Option<u16>) {
    let new_l4 = match quoted_l4 {
        Some(0) if proto == PROTO_UDP => Some(0),
        Some(l4) => {
            let l4_new = csum::replace2(addr(l4), old_port, new_port);
            Some(if proto == PROTO_UDP && l4_new == 0 { 0xffff } else { l4_new })
        }
        None => None,
    };
    let mut icmp = csum::replace2(addr(icmp), old_port, new_port);
    if let (Some(old), Some(new)) = (quoted_l4, new_l4) {
        icmp = csum::replace2(icmp, old, new);
    }
    (icmp, new_l4)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use proptest::prelude::*;

    use super::*;

    /// Checksum over bytes, as a receiver computes it; a correct region
    /// including its checksum field sums to 0xffff.
    fn sum(bytes: &[u8]) -> u16 {
        let mut s: u32 = 0;
        for pair in bytes.chunks(2) {
            s += u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]) as u32;
        }
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    /// Fills the checksum field at `at` for all of `bytes`, `extra` (a
    /// pseudo-header) included in the sum.
    fn put_check(bytes: &mut [u8], at: usize, extra: &[u8]) {
        bytes[at..at + 2].fill(0);
        let mut all = extra.to_vec();
        all.extend_from_slice(bytes);
        let c = !sum(&all);
        bytes[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    fn raw16(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    fn raw32(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn pseudo(ip: &[u8], proto: u8, len: usize) -> Vec<u8> {
        let mut p = ip[12..20].to_vec();
        p.extend_from_slice(&[0, proto]);
        p.extend_from_slice(&(len as u16).to_be_bytes());
        p
    }

    /// An ICMP error quoting a reply from `src`:`sport`, `l4_len` bytes of
    /// its L4 header (a valid checksum computed over what the quote holds).
    fn icmp_error(proto: u8, src: [u8; 4], sport: u16, l4_len: usize, payload: &[u8]) -> Vec<u8> {
        let mut m = std::vec![ICMP_DEST_UNREACH, 4, 0, 0, 0, 0, 0x05, 0x00];
        let mut ip = std::vec![0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 63, proto, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&[192, 168, 1, 10]);
        put_check(&mut ip, 10, &[]);
        let mut l4 = std::vec![0u8; if proto == PROTO_UDP { 8 } else { 20 }];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&40000u16.to_be_bytes());
        l4.extend_from_slice(payload);
        if proto == PROTO_UDP {
            l4[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            let ph = pseudo(&ip, proto, l4.len());
            put_check(&mut l4, 6, &ph);
        } else {
            l4[12] = 0x50;
            let ph = pseudo(&ip, proto, l4.len());
            put_check(&mut l4, 16, &ph);
        }
        m.extend_from_slice(&ip);
        m.extend_from_slice(&l4[..l4_len]);
        put_check(&mut m, 2, &[]);
        m
    }

    /// The message with the quoted source rewritten by `translate_quoted_source`.
    fn translate(mut m: Vec<u8>, proto: u8, new_ip: [u8; 4], new_port: u16) -> Vec<u8> {
        let l4 = ICMP_HLEN + 20;
        let check_at = quoted_l4_check(proto).filter(|(_, need)| m.len() >= l4 + need).map(|(at, _)| l4 + at);
        let sums = QuoteChecksums {
            icmp: raw16(&m, 2),
            quoted_ip: raw16(&m, ICMP_HLEN + 10),
            quoted_l4: check_at.map(|at| raw16(&m, at)),
        };
        let (old_ip, old_port) = (raw32(&m, ICMP_HLEN + 12), raw16(&m, l4));
        let new_ip_raw = u32::from_ne_bytes(new_ip);
        let new_port_raw = new_port.to_be();
        let out = translate_quoted_source(sums, proto, old_ip, new_ip_raw, old_port, new_port_raw);
        m[ICMP_HLEN + 12..ICMP_HLEN + 16].copy_from_slice(&new_ip);
        m[l4..l4 + 2].copy_from_slice(&new_port.to_be_bytes());
        m[2..4].copy_from_slice(&out.icmp.to_ne_bytes());
        m[ICMP_HLEN + 10..ICMP_HLEN + 12].copy_from_slice(&out.quoted_ip.to_ne_bytes());
        if let (Some(at), Some(c)) = (check_at, out.quoted_l4) {
            m[at..at + 2].copy_from_slice(&c.to_ne_bytes());
        }
        m
    }

    #[test]
    fn only_unreachable_and_time_exceeded_are_flow_errors() {
        assert!(is_flow_error(ICMP_DEST_UNREACH));
        assert!(is_flow_error(ICMP_TIME_EXCEEDED));
        for t in [0u8, 4, 5, 8, 12, 13, 14] {
            assert!(!is_flow_error(t), "type {t}");
        }
    }

    #[test]
    fn translated_quote_matches_one_built_from_the_backend() {
        for (proto, l4_len) in [(PROTO_TCP, 8), (PROTO_TCP, 20), (PROTO_UDP, 8)] {
            let got = translate(icmp_error(proto, [10, 0, 0, 100], 80, l4_len, b"data"), proto, [10, 1, 0, 1], 8080);
            let want = icmp_error(proto, [10, 1, 0, 1], 8080, l4_len, b"data");
            if proto == PROTO_TCP && l4_len == 8 {
                // The TCP checksum is not in the quote: only the rest can match.
                assert_eq!(sum(&got), 0xffff, "ICMP checksum");
                assert_eq!(&got[4..], &want[4..], "{proto}/{l4_len}");
            } else {
                assert_eq!(got, want, "{proto}/{l4_len}");
            }
        }
    }

    #[test]
    fn zero_quoted_udp_checksum_stays_zero() {
        let mut m = icmp_error(PROTO_UDP, [10, 0, 0, 100], 53, 8, b"");
        let l4_check = ICMP_HLEN + 20 + 6;
        m[l4_check..l4_check + 2].fill(0);
        put_check(&mut m, 2, &[]);
        let got = translate(m, PROTO_UDP, [10, 1, 0, 3], 5353);
        assert_eq!(&got[l4_check..l4_check + 2], &[0, 0]);
        assert_eq!(sum(&got), 0xffff);
    }

    /// An IPv6 pseudo-header (RFC 8200 8.1) for `len` bytes of `next`.
    fn pseudo6(src: &[u8], dst: &[u8], next: u8, len: usize) -> Vec<u8> {
        let mut p = src.to_vec();
        p.extend_from_slice(dst);
        p.extend_from_slice(&(len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, next]);
        p
    }

    const ROUTER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];

    /// An ICMPv6 packet too big from a router to the client, quoting the
    /// client's packet to `dst`:`dport` (`l4_len` bytes of its L4 part, all
    /// checksums valid), as a router on the path to a backend sends it.
    fn icmp6_error(proto: u8, dst: [u8; 16], dport: u16, l4_len: usize, payload: &[u8]) -> Vec<u8> {
        let mut l4 = std::vec![0u8; if proto == PROTO_UDP { 8 } else { 20 }];
        l4[0..2].copy_from_slice(&40000u16.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4.extend_from_slice(payload);
        let ph = pseudo6(&CLIENT6, &dst, proto, l4.len());
        if proto == PROTO_UDP {
            let len = l4.len() as u16;
            l4[4..6].copy_from_slice(&len.to_be_bytes());
            put_check(&mut l4, 6, &ph);
        } else {
            l4[12] = 0x50;
            put_check(&mut l4, 16, &ph);
        }
        let mut m = std::vec![ICMP6_PACKET_TOO_BIG, 0, 0, 0, 0, 0, 0x05, 0x00];
        m.extend_from_slice(&[0x60, 0, 0, 0]);
        m.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        m.extend_from_slice(&[proto, 63]);
        m.extend_from_slice(&CLIENT6);
        m.extend_from_slice(&dst);
        m.extend_from_slice(&l4[..l4_len]);
        let outer = pseudo6(&ROUTER6, &CLIENT6, 58, m.len());
        put_check(&mut m, 2, &outer);
        m
    }

    fn raw_ip6(b: &[u8]) -> Ip6 {
        core::array::from_fn(|i| raw32(b, 4 * i))
    }

    /// The message with the quoted destination rewritten by `translate_quoted6`.
    fn translate6(mut m: Vec<u8>, proto: u8, new_ip: [u8; 16], new_port: u16) -> Vec<u8> {
        let (dst_at, l4) = (ICMP_HLEN + 24, ICMP_HLEN + 40);
        let check_at = quoted_l4_check(proto).filter(|(_, need)| m.len() >= l4 + need).map(|(at, _)| l4 + at);
        let sums = Quote6Checksums { icmp: raw16(&m, 2), quoted_l4: check_at.map(|at| raw16(&m, at)) };
        let old_ip = raw_ip6(&m[dst_at..dst_at + 16]);
        let out = translate_quoted6(sums, proto, &old_ip, &raw_ip6(&new_ip), raw16(&m, l4 + 2), new_port.to_be());
        m[dst_at..dst_at + 16].copy_from_slice(&new_ip);
        m[l4 + 2..l4 + 4].copy_from_slice(&new_port.to_be_bytes());
        m[2..4].copy_from_slice(&out.icmp.to_ne_bytes());
        if let (Some(at), Some(c)) = (check_at, out.quoted_l4) {
            m[at..at + 2].copy_from_slice(&c.to_ne_bytes());
        }
        m
    }

    #[test]
    fn only_unreachable_too_big_and_time_exceeded_are_flow_errors6() {
        for t in [1u8, 2, 3] {
            assert!(is_flow_error6(t), "type {t}");
        }
        // Parameter problem, echo, and neighbour discovery (133-137).
        for t in [0u8, 4, 128, 129, 133, 134, 135, 136, 137] {
            assert!(!is_flow_error6(t), "type {t}");
        }
    }

    #[test]
    fn translated_quote6_matches_one_built_to_the_vip() {
        let backend = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let vip = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
        for (proto, l4_len) in [(PROTO_TCP, 8), (PROTO_TCP, 24), (PROTO_UDP, 8), (PROTO_UDP, 12)] {
            let got = translate6(icmp6_error(proto, backend, 8080, l4_len, b"data"), proto, vip, 80);
            let want = icmp6_error(proto, vip, 80, l4_len, b"data");
            if proto == PROTO_TCP && l4_len == 8 {
                // The TCP checksum is not in the quote: only the rest can match.
                let mut all = pseudo6(&ROUTER6, &CLIENT6, 58, got.len());
                all.extend_from_slice(&got);
                assert_eq!(sum(&all), 0xffff, "ICMPv6 checksum");
                assert_eq!(&got[4..], &want[4..], "{proto}/{l4_len}");
            } else {
                assert_eq!(got, want, "{proto}/{l4_len}");
            }
        }
    }

    /// A proptest case's protocol and quoted L4 length: the whole segment
    /// (`payload` bytes after the header), or the 8 bytes RFC 792 promises.
    fn quoted_case(udp: bool, whole: bool, payload: usize) -> (u8, usize) {
        let proto = if udp { PROTO_UDP } else { PROTO_TCP };
        (proto, if whole { (if udp { 8 } else { 20 }) + payload } else { 8 })
    }

    proptest! {
        /// Every checksum still verifies after any translation, for any
        /// quote length the rules accept.
        #[test]
        fn checksums_verify_after_translation(
            udp in any::<bool>(),
            old in any::<[u8; 4]>(), new in any::<[u8; 4]>(),
            sport in any::<u16>(), new_port in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..32),
            whole in any::<bool>(),
        ) {
            let (proto, l4_len) = quoted_case(udp, whole, payload.len());
            let got = translate(icmp_error(proto, old, sport, l4_len, &payload), proto, new, new_port);
            prop_assert_eq!(sum(&got), 0xffff, "ICMP checksum");
            prop_assert_eq!(sum(&got[ICMP_HLEN..ICMP_HLEN + 20]), 0xffff, "quoted IPv4 checksum");
            let l4 = &got[ICMP_HLEN + 20..];
            if whole && !(udp && l4[6..8] == [0, 0]) {
                let mut all = pseudo(&got[ICMP_HLEN..ICMP_HLEN + 20], proto, l4.len());
                all.extend_from_slice(l4);
                prop_assert_eq!(sum(&all), 0xffff, "quoted L4 checksum");
            }
        }

        /// The same for IPv6: the ICMPv6 checksum (outer pseudo-header
        /// included) and the quoted L4 one verify after any translation.
        #[test]
        fn checksums_verify_after_translation6(
            udp in any::<bool>(),
            old in any::<[u8; 16]>(), new in any::<[u8; 16]>(),
            dport in any::<u16>(), new_port in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..32),
            whole in any::<bool>(),
        ) {
            let (proto, l4_len) = quoted_case(udp, whole, payload.len());
            let got = translate6(icmp6_error(proto, old, dport, l4_len, &payload), proto, new, new_port);
            let mut all = pseudo6(&ROUTER6, &CLIENT6, 58, got.len());
            all.extend_from_slice(&got);
            prop_assert_eq!(sum(&all), 0xffff, "ICMPv6 checksum");
            let l4 = &got[ICMP_HLEN + 40..];
            if whole && !(udp && l4[6..8] == [0, 0]) {
                let mut all = pseudo6(&CLIENT6, &new, proto, l4.len());
                all.extend_from_slice(l4);
                prop_assert_eq!(sum(&all), 0xffff, "quoted L4 checksum");
            }
        }
    }
}
