//! Scale from zero: a new flow to a service that wakes from zero
//! (`SERVICE_F_WAKE`) and has no backend yet is dropped, not refused, so the
//! client's own retransmission (a SYN after 1 s, then 3 s...) connects once
//! the agent has an instance in the table; no proxy holds the connection.
//! The agent hears of it at once through the `WAKE_EVENTS` ring buffer, at
//! most once per service per CPU every `WAKE_EVENT_INTERVAL_NS`.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{Reason, Service, WakeEvent, PROTO_UDP, TCP_ACK, TCP_RST, TCP_SYN, WAKE_EVENT_INTERVAL_NS};

use crate::{Verdict, WAKE_EVENTS, WAKE_LAST};

/// The verdict on a packet (`proto`, its TCP flags) to `svc` (which wakes
/// from zero) that found no backend, IPv4 or IPv6: a SYN or a UDP datagram
/// is held (dropped, reported); anything else of TCP belongs to no flow
/// that can still be served and is dropped.
#[inline(always)]
pub fn hold(proto: u8, tcp_flags: u8, svc: &Service) -> Verdict {
    let new_flow = proto == PROTO_UDP || tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN;
    if !new_flow {
        return Verdict::drop(Reason::DropNoBackend);
    }
    report(svc.id, proto);
    Verdict::drop(Reason::HeldWaking)
}

/// Tell the agent a client waits for service `service_id`, unless this CPU
/// did within the last `WAKE_EVENT_INTERVAL_NS`.
#[inline(always)]
pub fn report(service_id: u32, proto: u8) {
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(last) = WAKE_LAST.get_ptr_mut(service_id) {
        // SAFETY: per-CPU slot, nothing else writes it while we run.
        let last = unsafe { &mut *last };
        if now.wrapping_sub(*last) >= WAKE_EVENT_INTERVAL_NS {
            let event = WakeEvent { service_id, proto, _pad: [0; 3], at_ns: now };
            // A full ring loses this report only: the next packet retries.
            if WAKE_EVENTS.output::<WakeEvent>(&event, 0).is_ok() {
                *last = now;
            }
        }
    }
}
