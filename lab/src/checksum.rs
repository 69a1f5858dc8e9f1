//! Internet checksums (RFC 1071), computed from scratch over whole headers.
//!
//! Deliberately independent of `lb_common::csum`: the data plane updates
//! checksums incrementally (RFC 1624), and the fixtures are only a check of
//! that code if the expected values come from a different computation.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The one's-complement sum of `bytes` as big-endian 16-bit words, folded to
/// 16 bits (an odd trailing byte is padded with a zero byte).
pub fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u64 = bytes.chunks(2).map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum to store in a header: the complement of the sum of `bytes`
/// (with the checksum field itself zeroed by the caller).
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    !ones_complement_sum(bytes)
}

/// The IPv4 pseudo-header that TCP and UDP checksums cover (RFC 793, 768).
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&l4_len.to_be_bytes());
    p
}

/// The IPv6 pseudo-header (RFC 8200, section 8.1).
pub fn pseudo_header_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4_len: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&l4_len.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, next_header]);
    p
}

/// The checksum of a TCP or UDP segment under `pseudo` (the segment's own
/// checksum field must be zero).
pub fn l4_checksum(pseudo: &[u8], segment: &[u8]) -> u16 {
    let mut all = pseudo.to_vec();
    all.extend_from_slice(segment);
    internet_checksum(&all)
}

/// Checks the IPv4 header checksum and the TCP, UDP or ICMP checksum of an
/// Ethernet + IPv4 frame, as a receiver would: a correct header or segment
/// sums to 0xffff including its checksum field. A zero UDP checksum means
/// "none" and passes.
pub fn verify_ipv4_frame(frame: &[u8]) -> Result<(), String> {
    let ip = frame.get(14..).ok_or("frame shorter than Ethernet")?;
    let ihl = usize::from(ip.first().ok_or("no IPv4 header")? & 0x0f) * 4;
    let header = ip.get(..ihl).ok_or("truncated IPv4 header")?;
    if ones_complement_sum(header) != 0xffff {
        return Err(format!("IPv4 header checksum {:#06x} is wrong", u16::from_be_bytes([ip[10], ip[11]])));
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let segment = ip.get(ihl..total).ok_or("IPv4 total length beyond the frame")?;
    let (src, dst) = (Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
    let check_at = match ip[9] {
        1 if ones_complement_sum(segment) != 0xffff => {
            return Err(format!("ICMP checksum {:#06x} is wrong", u16::from_be_bytes([segment[2], segment[3]])));
        }
        6 => 16,
        17 => 6,
        _ => return Ok(()),
    };
    let stored = segment.get(check_at..check_at + 2).ok_or("truncated L4 header")?;
    if ip[9] == 17 && stored == [0, 0] {
        return Ok(());
    }
    let mut all = pseudo_header_v4(src, dst, ip[9], segment.len() as u16);
    all.extend_from_slice(segment);
    if ones_complement_sum(&all) != 0xffff {
        return Err(format!("L4 checksum {:#06x} is wrong", u16::from_be_bytes([stored[0], stored[1]])));
    }
    Ok(())
}

/// `verify_ipv4_frame` or `verify_ipv6_frame`, by the frame's ethertype.
pub fn verify_frame(frame: &[u8]) -> Result<(), String> {
    if is_ipv6(frame) {
        verify_ipv6_frame(frame)
    } else {
        verify_ipv4_frame(frame)
    }
}

/// Checks the TCP, UDP or ICMPv6 checksum of an Ethernet + IPv6 frame (no
/// extension headers) as a receiver would: each covers the IPv6
/// pseudo-header, and a correct one sums to 0xffff with it. IPv6 has no
/// header checksum, and UDP's may not be zero.
pub fn verify_ipv6_frame(frame: &[u8]) -> Result<(), String> {
    let ip = frame.get(14..54).ok_or("frame shorter than Ethernet and IPv6")?;
    let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let upper = frame.get(54..54 + len).ok_or("IPv6 payload length beyond the frame")?;
    let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).expect("16 bytes"));
    if !matches!(ip[6], 6 | 17 | 58) {
        return Ok(());
    }
    let mut all = pseudo_header_v6(addr(8), addr(24), ip[6], len as u32);
    all.extend_from_slice(upper);
    if ones_complement_sum(&all) != 0xffff {
        return Err(format!("next header {}: checksum wrong over {len} bytes", ip[6]));
    }
    Ok(())
}

/// Where the L4 checksum sits in an Ethernet + IPv4 (no options) or IPv6
/// (no extension headers) frame.
fn l4_check_offset(frame: &[u8]) -> Option<usize> {
    let (proto, l4) = if is_ipv6(frame) { (frame.get(14 + 6)?, 14 + 40) } else { (frame.get(14 + 9)?, 14 + 20) };
    match proto {
        6 => Some(l4 + 16),
        17 => Some(l4 + 6),
        _ => None,
    }
}

/// Whether the Ethernet frame carries IPv6 (no extension headers follow in
/// the frames the fixtures build).
fn is_ipv6(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&[0x86, 0xdd][..])
}

/// The L4 part of an IP frame (IPv4 without options or IPv6), and its
/// pseudo-header.
fn l4_and_pseudo_header(frame: &[u8]) -> (std::ops::Range<usize>, Vec<u8>) {
    let ip = &frame[14..];
    if is_ipv6(frame) {
        let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        let addr = |at: usize| std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&ip[at..at + 16]).unwrap());
        (14 + 40..14 + 40 + len, pseudo_header_v6(addr(8), addr(24), ip[6], len as u32))
    } else {
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let (src, dst) = (Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
        (14 + 20..14 + total, pseudo_header_v4(src, dst, ip[9], (total - 20) as u16))
    }
}

/// The frame as a local stack hands it to a veth with checksum offload on
/// (CHECKSUM_PARTIAL): the L4 checksum field holds only the folded sum of
/// the pseudo-header, not inverted; the device adds the segment later.
/// IPv4 or IPv6.
pub fn with_partial_l4_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let at = l4_check_offset(&frame).expect("a TCP or UDP over IP frame");
    let sum = ones_complement_sum(&l4_and_pseudo_header(&frame).1);
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// What the device does with a CHECKSUM_PARTIAL frame: complete the L4
/// checksum from the partial sum in the field and the segment itself.
pub fn complete_partial_l4_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let at = l4_check_offset(&frame).expect("a TCP or UDP over IP frame");
    let udp = at == l4_and_pseudo_header(&frame).0.start + 6;
    let sum = !ones_complement_sum(&frame[l4_and_pseudo_header(&frame).0]);
    let sum = if sum == 0 && udp { 0xffff } else { sum };
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example_sum() {
        // RFC 1071, section 3: these eight bytes sum to 0xddf2.
        assert_eq!(ones_complement_sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), 0xddf2);
        assert_eq!(internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), 0x220d);
    }

    #[test]
    fn known_ipv4_header_checksum() {
        // A widely quoted sample header (192.168.0.1 -> 192.168.0.199, UDP)
        // whose checksum is 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(ones_complement_sum(&h), 0xffff);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(ones_complement_sum(&[0x12, 0x34, 0x56]), 0x1234 + 0x5600);
    }

    #[test]
    fn carries_fold_back_in() {
        assert_eq!(ones_complement_sum(&[0xff, 0xff, 0x00, 0x02]), 0x0002);
    }
}
