//! What the program answers a new flow to a service with no usable backend
//! (an empty live Maglev table): a TCP reset, or for UDP an ICMP port
//! unreachable, so that clients fail at once instead of waiting for their
//! own timeout. Pure arithmetic here; `lb-ebpf/src/refuse.rs` writes it.

use crate::{csum, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// ICMP destination unreachable, port unreachable (RFC 792).
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;
/// The quote of an unreachable: the request's IPv4 header (never with
/// options: those pass untouched) and the first 8 bytes after it (the whole
/// UDP header), the least RFC 792 asks. A fixed quote keeps every answer
/// at 14 + 20 + 8 + 28 = 70 bytes: never more than the request (at least
/// 42) plus the 28 bytes of the new IPv4 and ICMP headers.
pub const UNREACH_QUOTE_LEN: usize = 28;
/// TTL of an answer (Linux's default).
pub const ANSWER_TTL: u8 = 64;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

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
