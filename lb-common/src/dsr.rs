//! IP-in-IP direct server return (`MODE_DSR_IPIP`, RFC 2003): the outer
//! IPv4 header put in front of a client's packet, to its backend. Pure
//! arithmetic here; `lb-ebpf/src/dsr.rs` writes it.
//!
//! The outer header takes the inner one's TOS and DF bit (so path MTU
//! discovery keeps working for the client's own packets), a TTL of its own
//! (`DSR_OUTER_TTL`), ID 0 (RFC 6864: an atomic datagram, DF set, needs no
//! ID; without DF the load balancer never fragments, it drops), and no
//! options. The inner packet is not touched at all.

use crate::{refuse::checksum, DSR_OUTER_TTL, PROTO_IPIP};

/// The outer header's length: IPv4 without options.
pub const OUTER_LEN: usize = 20;
/// The don't-fragment bit of the fragment field, in network order.
pub const IP_DF_BE: u16 = 0x4000u16.to_be();

/// The outer header for an inner packet of `inner_tot_len` bytes (host
/// order) with `tos` and fragment field `inner_frag_be` (as loaded), from
/// `src_be` to `dst_be`: ten 16-bit words as they sit in memory, checksum
/// included.
#[inline(always)]
pub fn outer_header(inner_tot_len: u16, tos: u8, inner_frag_be: u16, src_be: u32, dst_be: u32) -> [u16; 10] {
    let src = src_be.to_ne_bytes();
    let dst = dst_be.to_ne_bytes();
    let mut w = [
        u16::from_ne_bytes([0x45, tos]),
        (inner_tot_len.wrapping_add(OUTER_LEN as u16)).to_be(),
        0,
        inner_frag_be & IP_DF_BE,
        u16::from_ne_bytes([DSR_OUTER_TTL, PROTO_IPIP]),
        0,
        u16::from_ne_bytes([src[0], src[1]]),
        u16::from_ne_bytes([src[2], src[3]]),
        u16::from_ne_bytes([dst[0], dst[1]]),
        u16::from_ne_bytes([dst[2], dst[3]]),
    ];
    w[5] = checksum(&w, 0);
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(w: &[u16; 10]) -> [u8; 20] {
        let mut out = [0u8; 20];
        for (i, x) in w.iter().enumerate() {
            out[2 * i..2 * i + 2].copy_from_slice(&x.to_ne_bytes());
        }
        out
    }

    /// The sum of the whole header, checksum included, folds to 0xffff.
    fn verifies(b: &[u8; 20]) -> bool {
        let mut sum: u32 = b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    #[test]
    fn the_outer_header_is_ipip_with_the_inner_tos_and_df_and_a_valid_checksum() {
        let src = u32::from(core::net::Ipv4Addr::new(10, 1, 0, 2)).to_be();
        let dst = u32::from(core::net::Ipv4Addr::new(10, 2, 0, 11)).to_be();
        let b = bytes(&outer_header(60, 0x10, 0x4000u16.to_be(), src, dst));
        assert_eq!(b[0], 0x45);
        assert_eq!(b[1], 0x10, "TOS copied");
        assert_eq!(u16::from_be_bytes([b[2], b[3]]), 80, "20 bytes longer");
        assert_eq!(&b[4..6], &[0, 0]);
        assert_eq!(&b[6..8], &[0x40, 0], "DF copied");
        assert_eq!((b[8], b[9]), (DSR_OUTER_TTL, 4));
        assert_eq!(&b[12..16], &[10, 1, 0, 2]);
        assert_eq!(&b[16..20], &[10, 2, 0, 11]);
        assert!(verifies(&b), "{b:02x?}");
        // The same header's checksum as computed apart from this code.
        assert_eq!(&b[10..12], &[0x26, 0x8b]);
    }

    #[test]
    fn without_df_the_outer_header_has_none_and_the_offset_never_leaks() {
        // MF and an offset cannot reach here (fragments pass), but only DF is taken.
        let b = bytes(&outer_header(1500, 0, 0x3fffu16.to_be(), 1, 2));
        assert_eq!(&b[6..8], &[0, 0]);
        assert!(verifies(&b));
        for len in [20u16, 40, 1480, 65515] {
            assert!(verifies(&bytes(&outer_header(len, 0xff, IP_DF_BE, u32::MAX, 0x0a00_0001))));
        }
    }
}
