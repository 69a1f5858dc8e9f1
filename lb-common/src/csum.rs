//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! All values are raw: exactly the bits as they sit in the packet, loaded with
//! native byte order. One's-complement sums commute with byte swapping, so no
//! conversion is needed as long as checksum and fields are loaded the same way.

#[inline(always)]
const fn fold(mut sum: u32) -> u16 {
    // Two folds are enough: the sums below stay under 2^19.
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
    fn rfc1624_example() {
        // RFC 1624 section 4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285, HC' = 0x0000.
        assert_eq!(replace2(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    proptest! {
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
