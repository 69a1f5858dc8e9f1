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

/// Add one packet's `delta` to its service's and backend's counters.
#[inline(always)]
pub fn count_flow(service_id: u32, backend_id: u32, delta: &Counters) {
    if let Some(c) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, nothing else writes it while we run.
        unsafe { (*c).add(delta) };
    }
    if let Some(c) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe { (*c).add(delta) };
    }
}
