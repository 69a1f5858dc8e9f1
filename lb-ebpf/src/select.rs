//! Picking a service's backend from its live Maglev table: the one choice
//! the XDP path (a new flow) and socket load balancing (a new socket) share.

use lb_common::{maglev_index, Backend, Reason, Service, BACKEND_F_ACTIVE, MAX_SERVICES};

use crate::{BACKENDS, MAGLEV};

/// The backend (id and entry) the live table of `svc` names for `hash`, or
/// why there is none.
#[inline(always)]
pub fn pick_backend(svc: &Service, hash: u32) -> Result<(u32, Backend), Reason> {
    if svc.backend_count == 0 || svc.id >= MAX_SERVICES {
        return Err(Reason::DropNoBackend);
    }
    let backend_id = match MAGLEV.get(maglev_index(svc.id, svc.table & 1, hash)) {
        Some(id) if *id != 0 => *id,
        _ => return Err(Reason::DropNoBackend),
    };
    match BACKENDS.get(backend_id) {
        Some(b) if b.flags & BACKEND_F_ACTIVE != 0 => Ok((backend_id, *b)),
        _ => Err(Reason::DropStaleBackend),
    }
}
