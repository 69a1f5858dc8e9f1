//! Per-CPU counters: no atomics (there is no 64-bit fetch_add on bpfel), the
//! agent sums the CPUs.

use lb_common::{Counters, Reason};

use crate::{BACKEND_STATS, REASON_STATS, SERVICE_STATS};

#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(c) = REASON_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, nothing else writes it while we run.
        unsafe { *c += 1 };
    }
}

/// What one packet adds to its service's and backend's counters.
#[derive(Clone, Copy, Default)]
pub struct Delta {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    pub reply_bytes: u64,
    pub closed_flows: u64,
}

#[inline(always)]
pub fn count_flow(service_id: u32, backend_id: u32, d: &Delta) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, nothing else writes it while we run.
        unsafe { apply(&mut *c, d) };
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe { apply(&mut *c, d) };
    }
}

#[inline(always)]
fn apply(c: &mut Counters, d: &Delta) {
    c.packets += d.packets;
    c.bytes += d.bytes;
    c.new_flows += d.new_flows;
    c.reply_packets += d.reply_packets;
    c.reply_bytes += d.reply_bytes;
    c.closed_flows += d.closed_flows;
}
