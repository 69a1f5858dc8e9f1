//! The connection table (`CONNTRACK`) as `ports::ConnectionTable`: walks that
//! count open flows per backend, and flushes of one backend's flows. A walk
//! reads up to `CONNTRACK_MAX` entries, so the agent runs these on a worker
//! off its loop, through a handle of their own on the map.

use std::{
    collections::BTreeMap,
    os::fd::AsFd as _,
    sync::{Mutex, MutexGuard},
};

use aya::maps::{HashMap, IterableMap as _, Map, MapData};
use lb_common::{Conn, FlowKey, CONNTRACK, PROTO_UDP};

use super::map_err;
use crate::ports::{ConnectionTable, ConntrackScan, DataplaneError};

/// A UDP flow counts as open while it saw a packet this recently.
pub const UDP_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// The connection table through a file descriptor of its own, so that the
/// worker that walks it shares nothing with the agent's `AyaDataplane`.
pub(super) struct AyaConnections {
    /// Removing entries takes `&mut`; walks and flushes take turns.
    map: Mutex<HashMap<MapData, FlowKey, Conn>>,
}

impl AyaConnections {
    /// A second handle on `map` (a duplicate of its descriptor).
    pub(super) fn open(map: &HashMap<MapData, FlowKey, Conn>) -> Result<Self, DataplaneError> {
        let fd = map.map().fd().as_fd().try_clone_to_owned().map_err(map_err(CONNTRACK, "duplicate the fd"))?;
        let data = MapData::from_fd(fd).map_err(map_err(CONNTRACK, "open"))?;
        let map = Map::from_map_data(data).map_err(map_err(CONNTRACK, "open"))?;
        Ok(AyaConnections { map: Mutex::new(HashMap::try_from(map).map_err(map_err(CONNTRACK, "open"))?) })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<MapData, FlowKey, Conn>> {
        // A panic mid-walk leaves the map as the kernel has it: still usable.
        self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ConnectionTable for AyaConnections {
    /// Open flows per backend id: TCP flows with no FIN or RST seen yet, UDP
    /// flows active within `UDP_IDLE`; and the number of entries (one per
    /// flow).
    fn scan(&self) -> Result<ConntrackScan, DataplaneError> {
        let map = self.lock();
        let now = monotonic_ns();
        let mut out = BTreeMap::new();
        let mut entries = 0;
        for item in map.iter() {
            // An entry evicted mid-walk ends the walk early on some kernels;
            // a count that is briefly low is harmless (drains have deadlines).
            let Ok((key, conn)) = item else { break };
            entries += 1;
            if is_open(&key, &conn, now) {
                *out.entry(conn.backend_id).or_insert(0) += 1;
            }
        }
        let max_entries = map.map().info().map_err(map_err(CONNTRACK, "read its info"))?.max_entries();
        Ok(ConntrackScan { open: out, entries, max_entries })
    }

    fn flush_backend(&self, backend_id: u32) -> Result<u64, DataplaneError> {
        let mut map = self.lock();
        let now = monotonic_ns();
        let entries: Vec<(FlowKey, Conn)> =
            map.iter().filter_map(Result::ok).filter(|(_, c)| c.backend_id == backend_id).collect();
        let mut open = 0;
        for (k, c) in &entries {
            // Already gone (LRU eviction) is fine.
            if map.remove(k).is_ok() && is_open(k, c, now) {
                open += 1;
            }
        }
        Ok(open)
    }
}

/// Open as `scan` and drains count it.
fn is_open(key: &FlowKey, conn: &Conn, now_ns: u64) -> bool {
    if key.proto == PROTO_UDP {
        now_ns.saturating_sub(conn.last_seen_ns) < UDP_IDLE.as_nanos() as u64
    } else {
        conn.tcp_seen == 0
    }
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
