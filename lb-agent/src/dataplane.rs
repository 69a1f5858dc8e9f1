//! The real data plane: the lb-ebpf object loaded with aya, attached to
//! interfaces, and its maps held open for writes and counter reads.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{xdp::XdpLinkId, Xdp, XdpMode},
    util::nr_cpus,
    Ebpf,
};
use lb_common::{
    maglev_index, Backend, Conn, Counters, FlowKey, Reason, Service, ServiceKey, BACKENDS, BACKEND_STATS, CONNTRACK,
    DIR_FORWARD, MAGLEV, PROG_LB, PROTO_UDP, REASON_STATS, SERVICES, SERVICE_STATS,
};
use tracing::{info, warn};

use crate::reconcile::{Dataplane, DataplaneError};

/// How the program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) XDP.
    Driver,
    /// Generic (skb) XDP: the driver has no native support.
    Generic,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Driver => "native",
            AttachMode::Generic => "generic",
        })
    }
}

pub struct AyaDataplane {
    // Maps first: fields drop in order, and the program (with its links)
    // should go last so that nothing runs against half-closed maps.
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    maglev: Array<MapData, u32>,
    conntrack: HashMap<MapData, FlowKey, Conn>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reason_stats: PerCpuArray<MapData, u64>,
    links: BTreeMap<String, (XdpLinkId, AttachMode)>,
    ebpf: Ebpf,
}

fn map_err<E: std::error::Error + Send + Sync + 'static>(
    map: &'static str,
    op: &'static str,
) -> impl FnOnce(E) -> DataplaneError {
    move |e| DataplaneError::Map { map, op, source: Box::new(e) }
}

impl AyaDataplane {
    /// Load the object and open its maps. Nothing is attached yet.
    pub fn load() -> anyhow::Result<Self> {
        let mut ebpf = Ebpf::load(crate::ebpf::object()).context("load the lb-ebpf object")?;
        let program: &mut Xdp = ebpf
            .program_mut(PROG_LB)
            .ok_or_else(|| anyhow!("program {PROG_LB} missing from the object"))?
            .try_into()?;
        program.load().with_context(|| format!("load {PROG_LB} into the kernel (verifier)"))?;
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the object"));
        Ok(Self {
            services: HashMap::try_from(take(SERVICES)?)?,
            backends: Array::try_from(take(BACKENDS)?)?,
            maglev: Array::try_from(take(MAGLEV)?)?,
            conntrack: HashMap::try_from(take(CONNTRACK)?)?,
            service_stats: PerCpuArray::try_from(take(SERVICE_STATS)?)?,
            backend_stats: PerCpuArray::try_from(take(BACKEND_STATS)?)?,
            reason_stats: PerCpuArray::try_from(take(REASON_STATS)?)?,
            links: BTreeMap::new(),
            ebpf,
        })
    }

    fn program(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self.ebpf.program_mut(PROG_LB).ok_or_else(|| anyhow!("program {PROG_LB} missing"))?.try_into()?)
    }

    /// Attach to `iface`: native XDP where the driver has it, generic
    /// otherwise. Never replaces a program someone else attached: the kernel
    /// refuses a second XDP program (EBUSY), and we report that.
    pub fn attach(&mut self, iface: &str) -> anyhow::Result<AttachMode> {
        if let Some((_, mode)) = self.links.get(iface) {
            return Ok(*mode);
        }
        let program = self.program()?;
        let (id, mode) = match program.attach(iface, XdpMode::Driver) {
            Ok(id) => (id, AttachMode::Driver),
            Err(native) => {
                let id = program.attach(iface, XdpMode::Skb).map_err(|generic| {
                    anyhow!(
                        "attach XDP to {iface}: native mode failed ({native}), generic mode failed ({generic}); \
                         does the interface exist, and is another XDP program already attached?"
                    )
                })?;
                (id, AttachMode::Generic)
            }
        };
        info!(interface = iface, mode = %mode, "attached");
        self.links.insert(iface.to_owned(), (id, mode));
        Ok(mode)
    }

    pub fn detach(&mut self, iface: &str) -> anyhow::Result<()> {
        let Some((id, _)) = self.links.remove(iface) else { return Ok(()) };
        self.program()?.detach(id).with_context(|| format!("detach XDP from {iface}"))?;
        info!(interface = iface, "detached");
        Ok(())
    }

    /// Interfaces we are attached to, with their mode.
    pub fn attachments(&self) -> impl Iterator<Item = (&str, AttachMode)> {
        self.links.iter().map(|(k, (_, m))| (k.as_str(), *m))
    }

    /// Detach from every interface (also done on drop).
    pub fn detach_all(&mut self) {
        let ifaces: Vec<String> = self.links.keys().cloned().collect();
        for iface in ifaces {
            if let Err(e) = self.detach(&iface) {
                warn!(error = %e, interface = iface, "detach failed");
            }
        }
    }

    pub fn service_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        sum_counters(&self.service_stats, id, SERVICE_STATS)
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        sum_counters(&self.backend_stats, id, BACKEND_STATS)
    }

    /// Packets per reason, summed over CPUs.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Reason::ALL
            .iter()
            .map(|r| {
                let v = self.reason_stats.get(&(*r as u32), 0).map_err(map_err(REASON_STATS, "read"))?;
                Ok((*r, v.iter().sum()))
            })
            .collect()
    }
}

pub struct ConntrackScan {
    pub open: BTreeMap<u32, u64>,
    pub entries: u64,
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
        for item in self.conntrack.iter() {
            // An entry evicted mid-walk ends the walk early on some kernels;
            // a count that is briefly low is harmless (drains have deadlines).
            let Ok((key, conn)) = item else { break };
            entries += 1;
            if key.dir != DIR_FORWARD {
                continue;
            }
            let open = if key.proto == PROTO_UDP {
                now.saturating_sub(conn.last_seen_ns) < UDP_IDLE.as_nanos() as u64
            } else {
                conn.tcp_seen == 0
            };
            if open {
                *out.entry(conn.backend_id).or_insert(0) += 1;
            }
        }
        Ok(ConntrackScan { open: out, entries })
    }

    /// Forget every flow of a backend (both directions); its clients' next
    /// packets start new flows elsewhere. Returns how many entries went.
    pub fn flush_backend_flows(&mut self, backend_id: u32) -> Result<usize, DataplaneError> {
        let keys: Vec<FlowKey> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, c)| c.backend_id == backend_id)
            .map(|(k, _)| k)
            .collect();
        let mut n = 0;
        for k in &keys {
            // Already gone (LRU eviction, or the flow's other half) is fine.
            if self.conntrack.remove(k).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sum_counters(map: &PerCpuArray<MapData, Counters>, id: u32, name: &'static str) -> Result<Counters, DataplaneError> {
    let values = map.get(&id, 0).map_err(map_err(name, "read"))?;
    let mut total = Counters::default();
    for v in values.iter() {
        total.add(v);
    }
    Ok(total)
}

impl Dataplane for AyaDataplane {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        // A new backend starts from zero counters, whoever had the id before.
        if backend.flags != 0 {
            let cpus = nr_cpus().map_err(|(_, e)| map_err(BACKEND_STATS, "count CPUs")(e))?;
            let zeros =
                PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(map_err(BACKEND_STATS, "reset"))?;
            self.backend_stats.set(id, zeros, 0).map_err(map_err(BACKEND_STATS, "reset"))?;
        }
        self.backends.set(id, backend, 0).map_err(map_err(BACKENDS, "write"))
    }

    fn set_table_entries(&mut self, service_id: u32, table: u32, entries: &[(u32, u32)]) -> Result<(), DataplaneError> {
        for (slot, backend_id) in entries {
            self.maglev.set(maglev_index(service_id, table, *slot), backend_id, 0).map_err(map_err(MAGLEV, "write"))?;
        }
        Ok(())
    }

    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> Result<(), DataplaneError> {
        // A hash-map update swaps the whole value, so readers see the old
        // table or the new one, never a mix.
        self.services.insert(key, service, 0).map_err(map_err(SERVICES, "write"))
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        self.services.remove(key).map_err(map_err(SERVICES, "delete"))
    }
}

impl Drop for AyaDataplane {
    fn drop(&mut self) {
        self.detach_all();
    }
}
