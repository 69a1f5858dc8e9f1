//! The flow hash both sides agree on.
//!
//! The kernel uses it to pick a Maglev slot for a new flow; userspace uses it
//! in tests and tools to predict that pick. It must be cheap in BPF (a few
//! multiplies and shifts, no loops) and spread 5-tuples evenly.

/// A 32-bit finaliser with low bias (Chris Wellons' "lowbias32").
#[inline(always)]
pub const fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

const SEED: u32 = 0x9e37_79b9;

/// Hash of a flow's 5-tuple. Inputs are raw (network byte order as loaded).
#[inline(always)]
pub const fn flow_hash(src_ip_be: u32, dst_ip_be: u32, src_port_be: u16, dst_port_be: u16, proto: u8) -> u32 {
    let mut h = mix32(SEED ^ src_ip_be);
    h = mix32(h ^ dst_ip_be);
    h = mix32(h ^ ((src_port_be as u32) << 16 | dst_port_be as u32));
    mix32(h ^ proto as u32)
}

/// Hash of a socket cookie: socket load balancing picks a Maglev slot with
/// it, so one socket keeps one backend while the table stays the same.
#[inline(always)]
pub const fn cookie_hash(cookie: u64) -> u32 {
    mix32(mix32(SEED ^ cookie as u32) ^ (cookie >> 32) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_cookies_spread_evenly_over_buckets() {
        // Cookies are handed out one after another: 30,000 of them into 3
        // buckets, each within 3% of a third.
        let mut buckets = [0u32; 3];
        for cookie in 4096u64..34096 {
            buckets[(cookie_hash(cookie) % 3) as usize] += 1;
        }
        for b in buckets {
            assert!((b as f64 - 10_000.0).abs() < 300.0, "{buckets:?}");
        }
        assert_ne!(cookie_hash(1), cookie_hash(1 << 32));
    }

    #[test]
    fn deterministic_and_sensitive_to_every_field() {
        let base = flow_hash(0x0a00_0001, 0x0a00_0002, 1234, 80, 6);
        assert_eq!(base, flow_hash(0x0a00_0001, 0x0a00_0002, 1234, 80, 6));
        assert_ne!(base, flow_hash(0x0a00_0003, 0x0a00_0002, 1234, 80, 6));
        assert_ne!(base, flow_hash(0x0a00_0001, 0x0a00_0003, 1234, 80, 6));
        assert_ne!(base, flow_hash(0x0a00_0001, 0x0a00_0002, 1235, 80, 6));
        assert_ne!(base, flow_hash(0x0a00_0001, 0x0a00_0002, 1234, 81, 6));
        assert_ne!(base, flow_hash(0x0a00_0001, 0x0a00_0002, 1234, 80, 17));
    }

    #[test]
    fn source_ports_spread_evenly_over_buckets() {
        // 60,000 client ports into 3 buckets: each within 3% of a third.
        let mut buckets = [0u32; 3];
        for port in 1024u16..61024 {
            buckets[(flow_hash(0x0a00_0001, 0x0a00_0002, port.to_be(), 80u16.to_be(), 6) % 3) as usize] += 1;
        }
        for b in buckets {
            assert!((b as f64 - 20_000.0).abs() < 600.0, "{buckets:?}");
        }
    }
}
