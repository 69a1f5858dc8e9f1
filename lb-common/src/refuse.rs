//! What the program answers a new flow to a service with no usable backend
//! (an empty live Maglev table): a TCP reset, or for UDP an ICMP port
//! unreachable, so that clients fail at once instead of waiting for their
//! own timeout. IPv6 alike: a reset, or an ICMPv6 port unreachable (RFC
//! 4443). Pure arithmetic here; `lb-ebpf/src/refuse.rs` and
//! `lb-ebpf/src/v6/refuse.rs` write it.

use crate::{
    csum,
    v6::{pseudo_header_sum6, Ip6},
    TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

/// ICMP destination unreachable, port unreachable (RFC 792).
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;
/// The quote of an unreachable: the request's IPv4 header (never with
/// options: those pass untouched) and the first 8 bytes after it (the whole
/// UDP header), the least RFC 792 asks. A fixed quote keeps every answer
/// at 14 + 20 + 8 + 28 = 70 bytes: never more than the request (at least
/// 42) plus the 28 bytes of the new IPv4 and ICMP headers.
pub const UNREACH_QUOTE_LEN: usize = 28;
/// TTL of an answer (Linux's default); an IPv6 answer's hop limit too.
pub const ANSWER_TTL: u8 = 64;
/// ICMPv6 destination unreachable, port unreachable (RFC 4443 3.1).
pub const ICMP6_DEST_UNREACH: u8 = 1;
pub const ICMP6_PORT_UNREACH: u8 = 4;
/// ICMPv6's next-header number.
pub const PROTO_ICMPV6: u8 = 58;
/// The quote of an IPv6 unreachable: the request's fixed header (one with
/// extension headers passes untouched) and its UDP header, as IPv4's
/// (`UNREACH_QUOTE_LEN`) rather than RFC 4443's "as much as fits in 1280
/// bytes": a fixed length keeps the checksum a loop of known bounds, and a
/// client's stack needs no more to find its socket. Every answer is
/// 14 + 40 + 8 + 48 = 110 bytes, the request (at least 62) plus 48.
pub const UNREACH6_QUOTE_LEN: usize = 48;

/// The flags, sequence and acknowledgment numbers of a reset, host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
}

/// The reset for a segment with `flags`, `seq` and `ack` (host order) and
/// `payload_len` bytes of data, by RFC 793's rules for a segment to a
/// closed port: with ACK, a RST whose seq is its ack; without, a RST|ACK
/// with seq 0 acknowledging everything it occupied (data, SYN, FIN). None
/// for a reset: a reset is never answered.
#[inline(always)]
pub const fn reset_for(flags: u8, seq: u32, ack: u32, payload_len: u32) -> Option<Reset> {
    if flags & TCP_RST != 0 {
        return None;
    }
    if flags & TCP_ACK != 0 {
        return Some(Reset { flags: TCP_RST, seq: ack, ack: 0 });
    }
    let mut len = payload_len;
    if flags & TCP_SYN != 0 {
        len += 1;
    }
    if flags & TCP_FIN != 0 {
        len += 1;
    }
    Some(Reset { flags: TCP_RST | TCP_ACK, seq: 0, ack: seq.wrapping_add(len) })
}

/// The Internet checksum of `words` (raw, as loaded from the packet) plus
/// `start` (another folded sum, such as a pseudo-header's), ready to store.
#[inline(always)]
pub fn checksum<const N: usize>(words: &[u16; N], start: u16) -> u16 {
    let mut sum = start as u32;
    let mut i = 0;
    while i < N {
        sum += words[i] as u32;
        i += 1;
    }
    !csum::fold(sum)
}

/// The TCP checksum of a 20-byte header without options or data, from
/// `src_be` to `dst_be`.
#[inline(always)]
pub fn tcp_checksum(src_be: u32, dst_be: u32, header: &[u16; 10]) -> u16 {
    checksum(header, csum::pseudo_header_sum(src_be, dst_be, crate::PROTO_TCP, 20))
}

/// The TCP checksum of a 20-byte header without options or data, from
/// `src` to `dst` over IPv6.
#[inline(always)]
pub fn tcp_checksum6(src: &Ip6, dst: &Ip6, header: &[u16; 10]) -> u16 {
    checksum(header, pseudo_header_sum6(src, dst, crate::PROTO_TCP, 20))
}

/// The ICMPv6 checksum of a message of `N` 16-bit words (its checksum
/// field zero) from `src` to `dst`: ICMPv6, unlike ICMP, covers a
/// pseudo-header (RFC 4443 2.3).
#[inline(always)]
pub fn icmp6_checksum<const N: usize>(src: &Ip6, dst: &Ip6, message: &[u16; N]) -> u16 {
    checksum(message, pseudo_header_sum6(src, dst, PROTO_ICMPV6, (2 * N) as u16))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::{v6::ip6_raw, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

    /// The Internet checksum over `bytes` as a receiver computes it, from
    /// scratch (big-endian words): a region with its checksum sums to 0xffff.
    fn sum_be(bytes: &[u8]) -> u16 {
        let mut s: u32 = bytes.chunks(2).map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))).sum();
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    /// The IPv6 pseudo-header (RFC 8200 8.1) followed by `upper`.
    fn with_pseudo6(src: core::net::Ipv6Addr, dst: core::net::Ipv6Addr, next: u8, upper: &[u8]) -> Vec<u8> {
        let mut b = src.octets().to_vec();
        b.extend_from_slice(&dst.octets());
        b.extend_from_slice(&(upper.len() as u32).to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, next]);
        b.extend_from_slice(upper);
        b
    }

    fn words<const N: usize>(bytes: &[u8]) -> [u16; N] {
        core::array::from_fn(|i| u16::from_ne_bytes([bytes[2 * i], bytes[2 * i + 1]]))
    }

    #[test]
    fn an_ipv6_reset_verifies_against_a_from_scratch_sum() {
        let (vip, client) = ("2001:db8::10".parse().unwrap(), "2001:db8:1::10".parse().unwrap());
        // RST|ACK from port 80 to 40000, seq 0, ack 0x10000001, offset 5.
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&80u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
        tcp[8..12].copy_from_slice(&0x1000_0001u32.to_be_bytes());
        tcp[12] = 0x50;
        tcp[13] = TCP_RST | TCP_ACK;
        let c = tcp_checksum6(&ip6_raw(vip), &ip6_raw(client), &words(&tcp));
        tcp[16..18].copy_from_slice(&c.to_ne_bytes());
        assert_eq!(sum_be(&with_pseudo6(vip, client, crate::PROTO_TCP, &tcp)), 0xffff);
    }

    #[test]
    fn an_icmpv6_unreachable_verifies_against_a_from_scratch_sum() {
        let (vip, client) = ("2001:db8::10".parse().unwrap(), "2001:db8:1::10".parse().unwrap());
        let mut m = [0u8; 8 + UNREACH6_QUOTE_LEN];
        m[0] = ICMP6_DEST_UNREACH;
        m[1] = ICMP6_PORT_UNREACH;
        for (i, b) in m[8..].iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37) ^ 0x5a;
        }
        let c = icmp6_checksum::<28>(&ip6_raw(vip), &ip6_raw(client), &words(&m));
        m[2..4].copy_from_slice(&c.to_ne_bytes());
        assert_eq!(sum_be(&with_pseudo6(vip, client, PROTO_ICMPV6, &m)), 0xffff);
        // Against another destination it must not verify: the pseudo-header counts.
        let other = "2001:db8:1::11".parse().unwrap();
        assert_ne!(sum_be(&with_pseudo6(vip, other, PROTO_ICMPV6, &m)), 0xffff);
    }

    #[test]
    fn a_syn_gets_rst_ack_acknowledging_the_syn() {
        assert_eq!(reset_for(TCP_SYN, 1000, 0, 0), Some(Reset { flags: TCP_RST | TCP_ACK, seq: 0, ack: 1001 }));
    }

    #[test]
    fn a_segment_with_ack_gets_a_rst_at_its_ack() {
        assert_eq!(reset_for(TCP_ACK, 5, 777, 100), Some(Reset { flags: TCP_RST, seq: 777, ack: 0 }));
        assert_eq!(reset_for(TCP_ACK | TCP_FIN, 5, 9, 0), Some(Reset { flags: TCP_RST, seq: 9, ack: 0 }));
    }

    #[test]
    fn data_syn_and_fin_without_ack_all_count() {
        let r = reset_for(TCP_SYN | TCP_FIN, u32::MAX, 0, 10).expect("a reset");
        assert_eq!(r.ack, 11, "wraps: MAX + 10 data + SYN + FIN");
    }

    #[test]
    fn a_reset_is_never_answered() {
        assert_eq!(reset_for(TCP_RST, 1, 2, 0), None);
        assert_eq!(reset_for(TCP_RST | TCP_ACK, 1, 2, 0), None);
    }

    #[test]
    fn a_header_with_its_checksum_sums_to_zero() {
        // RFC 1071's example words.
        let mut words = [0x0001u16, 0xf203, 0xf4f5, 0xf6f7, 0];
        words[4] = checksum(&words, 0);
        assert_eq!(checksum(&words, 0), 0);
    }
}
