//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! All values are raw: exactly the bits as they sit in the packet, loaded with
//! native byte order. One's-complement sums commute with byte swapping, so no
//! conversion is needed as long as checksum and fields are loaded the same way.

#[inline(always)]
pub(crate) const fn fold(mut sum: u32) -> u16 {
    // Two folds are enough for any u32: the first leaves at most 0x1fffe.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after a 32-bit field changes from `from` to `to`.
#[inline(always)]
pub const fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let nfrom = !from;
    let sum = (!check) as u32 + (nfrom & 0xffff) + (nfrom >> 16) + (to & 0xffff) + (to >> 16);
    !fold(sum)
}

/// The checksum after a 16-bit field changes from `from` to `to`.
#[inline(always)]
pub const fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = (!check) as u32 + (!from) as u32 + to as u32;
    !fold(sum)
}

/// The folded one's-complement sum of the IPv4 pseudo-header, not inverted.
///
/// A packet the local stack sent with checksum offload (CHECKSUM_PARTIAL, as
/// every packet from a namespace or container over veth is) carries exactly
/// this in its L4 checksum field; the device, or the kernel in software,
/// adds the L4 header and payload later. XDP cannot see the skb's flag, so
/// `l4_field == pseudo_header_sum(..)` is how the program tells the two
/// apart. A complete checksum equals it by chance once in 65536 packets.
#[inline(always)]
pub const fn pseudo_header_sum(src_be: u32, dst_be: u32, proto: u8, l4_len: u16) -> u16 {
    let sum = (src_be & 0xffff)
        + (src_be >> 16)
        + (dst_be & 0xffff)
        + (dst_be >> 16)
        + (proto as u16).to_be() as u32
        + l4_len.to_be() as u32;
    fold(sum)
}

/// A partial checksum (pseudo-header sum) after an address in the pseudo
/// header changes from `from` to `to`: P' = P + ~m + m', not inverted, as
/// the kernel's `inet_proto_csum_replace4` does for CHECKSUM_PARTIAL. Port
/// changes need nothing: the device sums the L4 header itself.
#[inline(always)]
pub const fn replace4_partial(partial: u16, from: u32, to: u32) -> u16 {
    let nfrom = !from;
    fold(partial as u32 + (nfrom & 0xffff) + (nfrom >> 16) + (to & 0xffff) + (to >> 16))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Plain one's-complement checksum over 16-bit native-order words.
    fn full(words: &[u16]) -> u16 {
        let mut sum: u32 = 0;
        for w in words {
            sum += *w as u32;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn pseudo_header_sum_matches_a_hand_computed_one() {
        // 10.0.0.1 -> 10.0.0.2, TCP, 20 bytes: 0x0a00+0x0001+0x0a00+0x0002+0x0006+0x0014 = 0x141d.
        let src = u32::from_ne_bytes([10, 0, 0, 1]);
        let dst = u32::from_ne_bytes([10, 0, 0, 2]);
        assert_eq!(u16::from_be(pseudo_header_sum(src, dst, 6, 20)), 0x141d);
    }

    #[test]
    fn rfc1624_example() {
        // RFC 1624 section 4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285, HC' = 0x0000.
        assert_eq!(replace2(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    proptest! {
        /// Rewriting an address of a partial checksum gives the pseudo-header
        /// sum of the new addresses, as if the stack had sent it that way.
        #[test]
        fn replace4_partial_matches_new_pseudo_header(src in any::<u32>(), dst in any::<u32>(), new in any::<u32>(), proto in prop::sample::select(&[6u8, 17][..]), len in 8u16..1480) {
            let p = pseudo_header_sum(src, dst, proto, len);
            let want = pseudo_header_sum(src, new, proto, len);
            let got = replace4_partial(p, dst, new);
            prop_assert!(got == want || (got ^ want) == 0xffff && (got == 0 || want == 0), "got {got:#x} want {want:#x}");
        }

        #[test]
        fn replace2_matches_full_recompute(mut words in proptest::collection::vec(any::<u16>(), 1..32), idx in any::<prop::sample::Index>(), new in any::<u16>()) {
            let i = idx.index(words.len());
            let before = full(&words);
            let old = words[i];
            words[i] = new;
            let after = full(&words);
            let inc = replace2(before, old, new);
            // 0x0000 and 0xffff are the same number in one's complement.
            prop_assert!(inc == after || (inc ^ after) == 0xffff && (inc == 0 || after == 0),
                "inc {inc:#x} full {after:#x}");
        }

        #[test]
        fn replace4_matches_full_recompute(mut words in proptest::collection::vec(any::<u16>(), 2..32), idx in any::<prop::sample::Index>(), new in any::<u32>()) {
            let i = idx.index(words.len() - 1);
            let before = full(&words);
            let old = words[i] as u32 | (words[i + 1] as u32) << 16;
            words[i] = new as u16;
            words[i + 1] = (new >> 16) as u16;
            let after = full(&words);
            let inc = replace4(before, old, new);
            prop_assert!(inc == after || (inc ^ after) == 0xffff && (inc == 0 || after == 0),
                "inc {inc:#x} full {after:#x}");
        }
    }
}
