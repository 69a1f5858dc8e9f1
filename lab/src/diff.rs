//! Readable differences between two frames: which header fields differ,
//! then both frames as hex with the differing bytes marked.

/// `None` when the frames are equal, else a report for a failure message.
pub fn frame_diff(expected: &[u8], got: &[u8]) -> Option<String> {
    if expected == got {
        return None;
    }
    let mut out = format!("frames differ: expected {} bytes, got {} bytes\n", expected.len(), got.len());
    for (name, range) in differing_fields(expected, got) {
        let show = |f: &[u8]| f.get(range.clone()).map_or_else(|| "(missing)".into(), hex);
        out.push_str(&format!(
            "  {name:<14} [{:>3}..{:<3}] expected {}  got {}\n",
            range.start,
            range.end,
            show(expected),
            show(got)
        ));
    }
    out.push_str("expected:\n");
    out.push_str(&hexdump(expected, got));
    out.push_str("got (* marks bytes that differ):\n");
    out.push_str(&hexdump(got, expected));
    Some(out)
}

/// Named fields (as laid out in `expected`) that differ, merged per field.
fn differing_fields(expected: &[u8], got: &[u8]) -> Vec<(&'static str, std::ops::Range<usize>)> {
    let layout = field_layout(expected);
    let len = expected.len().max(got.len());
    let mut fields: Vec<(&'static str, std::ops::Range<usize>)> = Vec::new();
    for off in (0..len).filter(|&i| expected.get(i) != got.get(i)) {
        let (name, range) =
            layout.iter().find(|(_, r)| r.contains(&off)).cloned().unwrap_or(("beyond frame", off..off + 1));
        match fields.last_mut() {
            Some((n, r)) if *n == name && r.end >= range.start => r.end = r.end.max(range.end),
            _ => fields.push((name, range)),
        }
    }
    fields
}

/// Field names by byte range for Ethernet + IPv4 + TCP/UDP (what parsing
/// `frame` as such yields; bytes after the IPv4 packet are "padding").
fn field_layout(frame: &[u8]) -> Vec<(&'static str, std::ops::Range<usize>)> {
    let mut f = vec![("eth.dst", 0..6), ("eth.src", 6..12), ("eth.type", 12..14)];
    if frame.get(12..14) != Some(&[0x08, 0x00]) || frame.len() < 34 {
        f.push(("payload", 14..frame.len()));
        return f;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let l4 = 14 + ihl.max(20);
    let end = (14 + usize::from(u16::from_be_bytes([frame[16], frame[17]]))).min(frame.len());
    f.extend([
        ("ip.ver_ihl", 14..15),
        ("ip.tos", 15..16),
        ("ip.total_len", 16..18),
        ("ip.id", 18..20),
        ("ip.frag", 20..22),
        ("ip.ttl", 22..23),
        ("ip.proto", 23..24),
        ("ip.check", 24..26),
        ("ip.src", 26..30),
        ("ip.dst", 30..34),
        ("ip.options", 34..l4),
    ]);
    let l4_fields: &[(&'static str, usize, usize)] = match frame[23] {
        6 => &[
            ("tcp.src_port", 0, 2),
            ("tcp.dst_port", 2, 4),
            ("tcp.seq", 4, 8),
            ("tcp.ack", 8, 12),
            ("tcp.doff_flags", 12, 14),
            ("tcp.window", 14, 16),
            ("tcp.check", 16, 18),
            ("tcp.urg", 18, 20),
        ],
        17 => &[("udp.src_port", 0, 2), ("udp.dst_port", 2, 4), ("udp.len", 4, 6), ("udp.check", 6, 8)],
        _ => &[],
    };
    let l4_hlen = l4_fields.last().map_or(0, |x| x.2);
    f.extend(l4_fields.iter().map(|&(n, a, b)| (n, l4 + a..l4 + b)));
    f.push(("l4.payload", l4 + l4_hlen..end.max(l4 + l4_hlen)));
    f.push(("padding", end.max(l4 + l4_hlen)..frame.len()));
    f
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// 16 bytes a line; a `*` after each byte that differs from `other`.
fn hexdump(frame: &[u8], other: &[u8]) -> String {
    let mut out = String::new();
    for (line, chunk) in frame.chunks(16).enumerate() {
        out.push_str(&format!("  {:04x} ", line * 16));
        for (i, b) in chunk.iter().enumerate() {
            let mark = if other.get(line * 16 + i) == Some(b) { ' ' } else { '*' };
            out.push_str(&format!(" {b:02x}{mark}"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{tcp_frame, Ipv4, Tcp, TCP_SYN};
    use std::net::Ipv4Addr;

    #[test]
    fn equal_frames_have_no_diff() {
        assert_eq!(frame_diff(&[1, 2, 3], &[1, 2, 3]), None);
    }

    #[test]
    fn names_the_fields_that_differ() {
        let macs = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let a = tcp_frame(
            macs,
            &Ipv4::new(Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(2, 2, 2, 2), 6),
            &Tcp::new(1, 80, TCP_SYN),
        );
        let b = tcp_frame(
            macs,
            &Ipv4::new(Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(3, 3, 3, 3), 6),
            &Tcp::new(1, 80, TCP_SYN),
        );
        let d = frame_diff(&a, &b).unwrap();
        assert!(d.contains("ip.dst"), "{d}");
        assert!(d.contains("ip.check"), "{d}");
        assert!(d.contains("tcp.check"), "{d}");
        assert!(!d.contains("tcp.dst_port"), "{d}");
    }

    #[test]
    fn reports_a_length_difference() {
        let d = frame_diff(&[0; 20], &[0; 16]).unwrap();
        assert!(d.contains("expected 20 bytes, got 16 bytes"), "{d}");
    }
}
