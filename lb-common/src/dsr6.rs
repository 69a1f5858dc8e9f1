//! IP-in-IP direct server return for IPv6 (`MODE_DSR_IPIP` with an IPv6
//! VIP): the outer IPv6 header (next header 41, IPv6-in-IPv6, RFC 2473, as
//! Katran encapsulates to IPv6 backends) put in front of a client's packet,
//! to its backend. Pure arithmetic here; `lb-ebpf/src/v6/dsr.rs` writes it.
//!
//! The outer header takes the inner one's traffic class and flow label (a
//! flow's packets keep one ECMP path, and their DSCP), a hop limit of its
//! own (`DSR_OUTER_TTL`), and no extension headers. IPv6 routers never
//! fragment, so the 40 bytes more must fit the path's MTU (the program
//! drops what does not, `DropDsrTooBig`). The inner packet is not touched.

use crate::{v6::Ip6, DSR_OUTER_TTL};

/// The outer header's length: the fixed IPv6 header.
pub const OUTER6_LEN: usize = 40;
/// Next header of IPv6 encapsulated in IPv6.
pub const PROTO_IPV6: u8 = 41;

/// The outer header for an inner packet whose fixed header starts with
/// `inner_ver_tc_flow` (its first four bytes, version, traffic class and
/// flow label) and carries `inner_payload_len` bytes (host order) after
/// it, from `src` to `dst`: twenty 16-bit words as they sit in memory.
#[inline(always)]
pub fn outer_header6(inner_ver_tc_flow: [u8; 4], inner_payload_len: u16, src: &Ip6, dst: &Ip6) -> [u16; 20] {
    let v = inner_ver_tc_flow;
    let len = inner_payload_len.wrapping_add(OUTER6_LEN as u16).to_be_bytes();
    let mut w = [0u16; 20];
    w[0] = u16::from_ne_bytes([0x60 | (v[0] & 0x0f), v[1]]);
    w[1] = u16::from_ne_bytes([v[2], v[3]]);
    w[2] = u16::from_ne_bytes(len);
    w[3] = u16::from_ne_bytes([PROTO_IPV6, DSR_OUTER_TTL]);
    let mut i = 0;
    while i < 4 {
        let (s, d) = (src[i].to_ne_bytes(), dst[i].to_ne_bytes());
        w[4 + 2 * i] = u16::from_ne_bytes([s[0], s[1]]);
        w[5 + 2 * i] = u16::from_ne_bytes([s[2], s[3]]);
        w[12 + 2 * i] = u16::from_ne_bytes([d[0], d[1]]);
        w[13 + 2 * i] = u16::from_ne_bytes([d[2], d[3]]);
        i += 1;
    }
    w
}

#[cfg(test)]
mod tests {
    use core::net::Ipv6Addr;

    use super::*;
    use crate::v6::ip6_raw;

    fn bytes(w: &[u16; 20]) -> [u8; 40] {
        let mut out = [0u8; 40];
        for (i, x) in w.iter().enumerate() {
            out[2 * i..2 * i + 2].copy_from_slice(&x.to_ne_bytes());
        }
        out
    }

    #[test]
    fn the_outer_header_is_ipv6_in_ipv6_with_the_inner_class_and_flow_label() {
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8:2::11".parse().unwrap();
        // Traffic class 0xb8 (EF), flow label 0x12345.
        let b = bytes(&outer_header6([0x6b, 0x81, 0x23, 0x45], 40, &ip6_raw(src), &ip6_raw(dst)));
        assert_eq!(&b[0..4], &[0x6b, 0x81, 0x23, 0x45], "version 6, class and label copied");
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), 80, "40 bytes longer");
        assert_eq!((b[6], b[7]), (41, DSR_OUTER_TTL));
        assert_eq!(&b[8..24], &src.octets());
        assert_eq!(&b[24..40], &dst.octets());
    }

    #[test]
    fn the_version_is_always_six_and_the_length_wraps_never_panics() {
        let b = bytes(&outer_header6([0x4f, 0, 0, 0], 65535 - 40, &[0; 4], &[u32::MAX; 4]));
        assert_eq!(b[0], 0x6f);
        assert_eq!(u16::from_be_bytes([b[4], b[5]]), 65535);
        assert_eq!(&b[24..40], &[0xff; 16]);
    }
}
