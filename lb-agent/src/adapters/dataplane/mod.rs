//! The real data plane: the lb-ebpf object loaded with aya, attached to
//! interfaces, and its maps held open for writes and counter reads.
//!
//! - this file: the maps: writes (`ports::Dataplane`), counters, the
//!   connection table, and reading back what a previous agent pinned;
//! - `object`: loading the object and opening its typed map set, shared
//!   with the lab's BPF_PROG_TEST_RUN loader;
//! - `loader`: loading the object for the agent, attaching to and
//!   detaching from interfaces (bpf_links), and what happens to it all on
//!   exit;
//! - `pins`: the bpffs directory that lets a restarted agent adopt it all;
//! - `netdev`: what the kernel says about an interface (index, driver);
//! - `egress`: the fast path's egress interfaces and per-interface paths.

pub mod egress;
mod loader;
pub mod netdev;
pub mod object;
pub mod pins;

use std::{collections::BTreeMap, path::PathBuf};

use aya::{maps::PerCpuValues, util::nr_cpus, Ebpf};
use lb_common::{
    maglev_index, Backend, Conn, Counters, FlowKey, Reason, Service, ServiceKey, BACKENDS, BACKEND_STATS, DIR_FORWARD,
    MAGLEV, MAGLEV_TABLE_SIZE, MAX_BACKENDS, PROTO_UDP, SERVICES,
};

pub use self::object::Maps;
use self::{loader::Attached, object::map_err};
use crate::ports::{ConntrackScan, Dataplane, DataplaneError, PinnedState};

pub struct AyaDataplane {
    // Maps first: fields drop in order, and the program (with its links)
    // should go last so that nothing runs against half-closed maps.
    maps: Maps,
    /// The fast-path decision per attached interface, by name.
    fast_paths: BTreeMap<String, egress::FastPath>,
    links: BTreeMap<String, Attached>,
    /// `<pin dir>/v<ABI_VERSION>` when maps and links are pinned.
    pins: Option<PathBuf>,
    /// The maps came from a previous agent's pins.
    adopted: bool,
    /// Set by `keep_on_drop`.
    keep: bool,
    ebpf: Ebpf,
}

impl AyaDataplane {
    /// Read back what the adopted maps hold, to pick up where the previous
    /// agent left off (same ids, same tables).
    pub fn read_pinned_state(&self) -> anyhow::Result<PinnedState> {
        let services: Vec<(ServiceKey, Service)> = self.maps.services.iter().collect::<Result<_, _>>()?;
        let mut backends = Vec::new();
        for id in 1..MAX_BACKENDS {
            let b = self.maps.backends.get(&id, 0)?;
            if b.flags != 0 {
                backends.push((id, b));
            }
        }
        let mut tables = BTreeMap::new();
        for (_, svc) in &services {
            let mut halves = [Vec::new(), Vec::new()];
            for (half, out) in halves.iter_mut().enumerate() {
                *out = (0..MAGLEV_TABLE_SIZE)
                    .map(|slot| self.maps.maglev.get(&maglev_index(svc.id, half as u32, slot), 0))
                    .collect::<Result<_, _>>()?;
            }
            tables.insert(svc.id, halves);
        }
        Ok(PinnedState { services, backends, tables })
    }

    pub fn service_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        self.maps.service_counters(id)
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        self.maps.backend_counters(id)
    }

    /// Packets per reason, summed over CPUs.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        self.maps.reason_counters()
    }
}

/// A UDP flow counts as open while it saw a packet this recently.
pub const UDP_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

impl AyaDataplane {
    /// Open flows per backend id, from the connection table: TCP flows with
    /// no FIN or RST seen yet, UDP flows active within `UDP_IDLE`.
    pub fn open_flows(&self) -> Result<BTreeMap<u32, u64>, DataplaneError> {
        Ok(self.scan_conntrack()?.open)
    }

    /// One walk of the connection table: open flows per backend, and the
    /// number of entries (two per flow).
    pub fn scan_conntrack(&self) -> Result<ConntrackScan, DataplaneError> {
        let now = monotonic_ns();
        let mut out = BTreeMap::new();
        let mut entries = 0;
        for item in self.maps.conntrack.iter() {
            // An entry evicted mid-walk ends the walk early on some kernels;
            // a count that is briefly low is harmless (drains have deadlines).
            let Ok((key, conn)) = item else { break };
            entries += 1;
            if key.dir != DIR_FORWARD {
                continue;
            }
            if is_open(&key, &conn, now) {
                *out.entry(conn.backend_id).or_insert(0) += 1;
            }
        }
        Ok(ConntrackScan { open: out, entries })
    }

    /// Forget every flow of a backend (both directions); its clients' next
    /// packets start new flows elsewhere. Returns how many of them were still
    /// open (as `scan_conntrack` counts them).
    pub fn flush_backend_flows(&mut self, backend_id: u32) -> Result<u64, DataplaneError> {
        let now = monotonic_ns();
        let entries: Vec<(FlowKey, Conn)> =
            self.maps.conntrack.iter().filter_map(Result::ok).filter(|(_, c)| c.backend_id == backend_id).collect();
        let mut open = 0;
        for (k, c) in &entries {
            // Already gone (LRU eviction) is fine.
            if self.maps.conntrack.remove(k).is_ok() && k.dir == DIR_FORWARD && is_open(k, c, now) {
                open += 1;
            }
        }
        Ok(open)
    }
}

/// Open as `scan_conntrack` and drains count it.
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

impl Dataplane for AyaDataplane {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        // A new backend starts from zero counters, whoever had the id before.
        if backend.flags != 0 {
            let cpus = nr_cpus().map_err(|(_, e)| map_err(BACKEND_STATS, "count CPUs")(e))?;
            let zeros =
                PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(map_err(BACKEND_STATS, "reset"))?;
            self.maps.backend_stats.set(id, zeros, 0).map_err(map_err(BACKEND_STATS, "reset"))?;
        }
        self.maps.backends.set(id, backend, 0).map_err(map_err(BACKENDS, "write"))
    }

    fn set_table_entries(&mut self, service_id: u32, table: u32, entries: &[(u32, u32)]) -> Result<(), DataplaneError> {
        for (slot, backend_id) in entries {
            self.maps
                .maglev
                .set(maglev_index(service_id, table, *slot), backend_id, 0)
                .map_err(map_err(MAGLEV, "write"))?;
        }
        Ok(())
    }

    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> Result<(), DataplaneError> {
        // A hash-map update swaps the whole value, so readers see the old
        // table or the new one, never a mix.
        self.maps.services.insert(key, service, 0).map_err(map_err(SERVICES, "write"))
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        self.maps.services.remove(key).map_err(map_err(SERVICES, "delete"))
    }
}
