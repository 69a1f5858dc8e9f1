//! The real data plane: the lb-ebpf object loaded with aya, attached to
//! interfaces, and its maps held open for writes and counter reads.
//!
//! - this file: the maps: writes (`ports::MapWriter`), counters, and
//!   reading back what a previous agent pinned; the ports it implements;
//! - `conntrack`: the connection table, walked off the agent's loop;
//! - `object`: loading the object and opening its typed map set, shared
//!   with the lab's BPF_PROG_TEST_RUN loader;
//! - `egress`: the fast path's egress devmap and per-interface path counts;
//! - `loader`: attaching to and detaching from
//!   interfaces (bpf_links), and what happens to it all on exit;
//! - `pins`: the bpffs directory that lets a restarted agent adopt it all;
//! - `socket_lb`: the socket programs on a cgroup, for clients on this host;
//! - `netdev`: what the kernel says about an interface (index, driver);
//! - `tc`: which interfaces get the tc hook, and attaching it there;
//! - `wake`: reading the program's reports of clients waiting for a
//!   service that scales from zero.

mod conntrack;
pub mod egress;
mod loader;
pub mod netdev;
pub mod object;
pub mod pins;
mod socket_lb;
pub mod tc;
pub mod wake;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::Arc,
};

use aya::{maps::PerCpuValues, util::nr_cpus, Ebpf};
use lb_common::{
    maglev_index,
    v6::{Backend6, BackendAddr6, BackendVips6, Ip6, ServiceKey6, BACKENDS6, BACKEND_VIPS6, SERVICES6, SOURCES6},
    Backend, BackendAddr, BackendVips, Counters, Reason, Service, ServiceKey, BACKENDS, BACKEND_STATS, BACKEND_VIPS,
    MAGLEV, MAGLEV_TABLE_SIZE, MAX_BACKENDS, SERVICES,
};
use tracing::warn;

use self::{conntrack::AyaConnections, loader::Attached, object::map_err};
pub use self::{conntrack::UDP_IDLE, object::Maps};
use crate::{
    config::{Config, FastPathMode, InterfaceConfig},
    ports::{
        AttachMode, Attachment, ConnectionTable, Dataplane, DataplaneError, DataplaneReads, HostFacts, MapWriter,
        PinnedState, Route, Routes, SocketLbState,
    },
};

pub struct AyaDataplane {
    // Maps first: fields drop in order, and the program (with its links)
    // should go last so that nothing runs against half-closed maps.
    maps: Maps,
    /// The fast-path decision per attached interface, by name.
    fast_paths: BTreeMap<String, egress::FastPath>,
    links: BTreeMap<String, Attached>,
    /// Socket load balancing, when attached to a cgroup.
    socket_lb: Option<socket_lb::SocketLb>,
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
        let services6: Vec<(ServiceKey6, Service)> = self.maps.services6.iter().collect::<Result<_, _>>()?;
        let mut backends = Vec::new();
        let mut backends6 = BTreeMap::new();
        for id in 1..MAX_BACKENDS {
            let b = self.maps.backends.get(&id, 0)?;
            if b.flags != 0 {
                backends.push((id, b));
                // An IPv6 backend's address is in `BACKENDS6`.
                if b.ip_be == 0 {
                    backends6.insert(id, self.maps.backends6.get(&id, 0)?);
                }
            }
        }
        let mut sources6 = BTreeMap::new();
        for (_, svc) in &services6 {
            sources6.insert(svc.id, self.maps.sources6.get(&svc.id, 0)?);
        }
        let mut tables = BTreeMap::new();
        for svc in services.iter().map(|(_, s)| s).chain(services6.iter().map(|(_, s)| s)) {
            let mut halves = [Vec::new(), Vec::new()];
            for (half, out) in halves.iter_mut().enumerate() {
                *out = (0..MAGLEV_TABLE_SIZE)
                    .map(|slot| self.maps.maglev.get(&maglev_index(svc.id, half as u32, slot), 0))
                    .collect::<Result<_, _>>()?;
            }
            tables.insert(svc.id, halves);
        }
        let backend_vips = self.maps.backend_vips.iter().collect::<Result<_, _>>()?;
        let backend_vips6 = self.maps.backend_vips6.iter().collect::<Result<_, _>>()?;
        Ok(PinnedState { services, backends, tables, backend_vips, services6, backends6, sources6, backend_vips6 })
    }
}

impl MapWriter for AyaDataplane {
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

    fn set_backend_vips(&mut self, addr: &BackendAddr, vips: Option<&BackendVips>) -> Result<(), DataplaneError> {
        match vips {
            Some(v) => self.maps.backend_vips.insert(addr, v, 0).map_err(map_err(BACKEND_VIPS, "write")),
            None => self.maps.backend_vips.remove(addr).map_err(map_err(BACKEND_VIPS, "delete")),
        }
    }

    fn set_backend6(&mut self, id: u32, backend: &Backend6) -> Result<(), DataplaneError> {
        self.maps.backends6.set(id, backend, 0).map_err(map_err(BACKENDS6, "write"))
    }

    fn set_service6(&mut self, key: &ServiceKey6, service: &Service) -> Result<(), DataplaneError> {
        // One hash-map update, as for IPv4: the old table or the new one.
        self.maps.services6.insert(key, service, 0).map_err(map_err(SERVICES6, "write"))
    }

    fn remove_service6(&mut self, key: &ServiceKey6) -> Result<(), DataplaneError> {
        self.maps.services6.remove(key).map_err(map_err(SERVICES6, "delete"))
    }

    fn set_source6(&mut self, service_id: u32, source: &Ip6) -> Result<(), DataplaneError> {
        self.maps.sources6.set(service_id, source, 0).map_err(map_err(SOURCES6, "write"))
    }

    fn set_backend_vips6(&mut self, addr: &BackendAddr6, vips: Option<&BackendVips6>) -> Result<(), DataplaneError> {
        match vips {
            Some(v) => self.maps.backend_vips6.insert(addr, v, 0).map_err(map_err(BACKEND_VIPS6, "write")),
            None => self.maps.backend_vips6.remove(addr).map_err(map_err(BACKEND_VIPS6, "delete")),
        }
    }
}

impl DataplaneReads for AyaDataplane {
    fn service_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        self.maps.service_counters(id)
    }

    fn backend_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        self.maps.backend_counters(id)
    }

    fn reason_counters(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        self.maps.reason_counters()
    }

    fn attachments(&self) -> Vec<Attachment> {
        AyaDataplane::attachments(self)
            .map(|(iface, mode, checksums)| {
                let fast = self.fast_paths.get(iface);
                let paths = match fast.map(|f| self.maps.path_counters(f.ifindex)).transpose() {
                    Ok(p) => p.unwrap_or_default(),
                    Err(e) => {
                        warn!(interface = iface, error = %e, "reading the path counters failed");
                        Vec::new()
                    }
                };
                Attachment {
                    interface: iface.to_owned(),
                    mode,
                    checksums,
                    fast_path: fast.is_some_and(|f| f.on),
                    fast_path_reason: fast.map(|f| f.why.clone()).unwrap_or_default(),
                    paths,
                }
            })
            .collect()
    }

    fn socket_lb(&self) -> SocketLbState {
        let counters = self.maps.sock_counters().unwrap_or_else(|e| {
            warn!(error = %e, "reading the socket counters failed");
            Vec::new()
        });
        SocketLbState { cgroup: self.socket_lb_cgroup().map(ToOwned::to_owned), counters }
    }
}

impl Routes for AyaDataplane {
    fn routes(&self, addrs: &BTreeSet<Ipv4Addr>) -> anyhow::Result<BTreeMap<Ipv4Addr, Route>> {
        crate::adapters::routes::KernelRoutes.routes(addrs)
    }
    fn sources(&self, addrs: &BTreeSet<IpAddr>) -> anyhow::Result<BTreeMap<IpAddr, IpAddr>> {
        crate::adapters::routes::KernelRoutes.sources(addrs)
    }
}

impl Dataplane for AyaDataplane {
    fn has_interface(&self, name: &str) -> bool {
        netdev::if_index(name).is_some()
    }

    fn attach(&mut self, iface: &str, settings: InterfaceConfig) -> anyhow::Result<AttachMode> {
        AyaDataplane::attach(self, iface, settings)
    }

    fn detach(&mut self, iface: &str) -> anyhow::Result<()> {
        AyaDataplane::detach(self, iface)
    }

    fn set_fast_path(&mut self, iface: &str, mode: FastPathMode) -> anyhow::Result<()> {
        AyaDataplane::set_fast_path(self, iface, mode).map(|_| ())
    }

    fn set_socket_lb(&mut self, cgroup: Option<&std::path::Path>) -> anyhow::Result<()> {
        AyaDataplane::set_socket_lb(self, cgroup)
    }

    fn host_facts(&self, config: &Config) -> anyhow::Result<HostFacts> {
        crate::adapters::host_facts::gather(config)
    }

    fn connection_table(&self) -> Result<Arc<dyn ConnectionTable>, DataplaneError> {
        Ok(Arc::new(AyaConnections::open(&self.maps)?))
    }

    fn adopted_state(&self) -> anyhow::Result<Option<PinnedState>> {
        if !self.adopted() {
            return Ok(None);
        }
        self.read_pinned_state().map(Some)
    }

    fn stale_link_pins(&self) -> Vec<PathBuf> {
        AyaDataplane::stale_link_pins(self)
    }

    fn remove_all(&mut self) {
        AyaDataplane::remove_all(self)
    }

    fn keep_on_drop(&mut self) {
        AyaDataplane::keep_on_drop(self)
    }

    fn wake_events(&mut self) -> Option<tokio::sync::mpsc::Receiver<crate::ports::Wake>> {
        self.maps.wake_events.take().map(wake::start)
    }
}
