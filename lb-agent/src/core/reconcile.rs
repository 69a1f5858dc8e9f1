//! Keeps the data plane's maps equal to a config, writing only what changed.
//!
//! Ids are stable: a service keeps its id while its (VIP, port, protocol)
//! stays, a backend keeps its id while its (service, address) stays. The order
//! of writes is what makes a change hitless:
//! 1. new backends' `BACKENDS` entries, and the services each backend
//!    address serves (`BACKEND_VIPS`, which matches its replies), before any
//!    table can name them;
//! 2. the new Maglev table into the service's *inactive* half;
//! 3. one `SERVICES` update that flips the service to that half;
//! 4. only then removed backends' entries are cleared and removed services
//!    deleted. A removed backend's id is not reused before the next change, so
//!    a packet that read the old half an instant before the flip still finds
//!    an entry; addresses no service has any more leave `BACKEND_VIPS`.
//!
//! Flows already in the connection table keep their backend throughout: the
//! entry holds the backend's address, so removing a backend drains it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, SocketAddrV4},
};

use lb_common::{
    maglev::{build_table, MaglevBackend},
    v6::{ip6_addr, ip6_raw, Backend6, BackendAddr6, BackendVips6, Ip6, ServiceKey6},
    Backend, BackendAddr, BackendVips, Service, ServiceKey, BACKEND_F_ACTIVE, MAGLEV_TABLE_SIZE, MAX_BACKENDS,
    MAX_SERVICES, MAX_VIPS_PER_BACKEND, MODE_DNAT,
};

use crate::{
    config::{ForwardMode, ServiceConfig},
    core::{
        registry::{DesiredBackend, DesiredService},
        vip::{ipv4, VipKey},
    },
    ports::{DataplaneError, MapWriter, PinnedState},
};

/// Backend addresses whose full-NAT source comes from the route: those of
/// full-NAT services without a `source`.
pub fn route_sourced_backends(desired: &[DesiredService]) -> BTreeSet<IpAddr> {
    desired
        .iter()
        .filter(|s| s.config.mode == ForwardMode::FullNat && s.config.source.is_none())
        .flat_map(|s| s.backends.iter().map(|b| b.addr.ip()))
        .collect()
}

/// What one `apply` changed, for logs and status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub services_added: usize,
    pub services_removed: usize,
    pub tables_rebuilt: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    /// Maglev slots written across all tables (into each inactive half,
    /// which held the table before the last change, not the live one).
    pub slots_written: usize,
    /// Per service (by name): slots of the live table that now name another
    /// backend, the share of new flows that moved.
    pub slots_moved: BTreeMap<String, usize>,
}

impl ApplySummary {
    pub fn is_noop(&self) -> bool {
        *self == ApplySummary::default()
    }
}

/// One live service as the data plane holds it.
#[derive(Clone, Debug)]
pub struct ServiceState {
    pub id: u32,
    pub name: String,
    /// The live half (0 or 1).
    pub table: u32,
    /// Mirrors of both halves, so a rebuild writes only the slots that differ.
    halves: [Vec<u32>; 2],
    pub backends: Vec<MaglevBackend>,
    /// The `Service::flags` written (`SERVICE_F_*`).
    pub flags: u32,
    /// `Service::mode` as written.
    pub mode: u32,
    /// `Service::source_be` as written (`MODE_DSR_IPIP`'s outer source).
    pub source_be: u32,
    /// An IPv6 service's `SOURCES6` entry as written (all zeros: none).
    pub source6: Ip6,
}

impl ServiceState {
    pub fn live_table(&self) -> &[u32] {
        &self.halves[self.table as usize]
    }
}

#[derive(Debug, Default)]
pub struct Reconciler {
    services: BTreeMap<VipKey, ServiceState>,
    backend_ids: BTreeMap<(VipKey, SocketAddr), u32>,
    /// Ids freed by the last apply; free again from the one after.
    resting: BTreeSet<u32>,
    /// Ids not to give out, freed or not, until released: their flows are
    /// being flushed, and a new backend under the id would lose its own.
    /// Counted: two flushes of one id may be under way at once.
    held: BTreeMap<u32, usize>,
    /// Mirrors of `BACKEND_VIPS` and `BACKEND_VIPS6`.
    backend_vips: BTreeMap<BackendAddr, BackendVips>,
    backend_vips6: BTreeMap<BackendAddr6, BackendVips6>,
    /// Mirror of `BACKENDS` and, for IPv6 backends, `BACKENDS6` (written
    /// entries only), so that a changed full-NAT source rewrites the entry.
    entries: BTreeMap<u32, (Backend, Option<Backend6>)>,
    /// Full NAT's default source per backend address: the address of the
    /// interface the route to it leaves by (`set_route_sources`).
    route_sources: BTreeMap<IpAddr, IpAddr>,
}

impl Reconciler {
    /// Pick up where a previous agent left off: same service and backend
    /// ids, same tables. The next `apply` then moves only what the config
    /// changes, starting from the live tables.
    pub fn adopt(state: PinnedState) -> Reconciler {
        let mut r = Reconciler::default();
        let services: Vec<(VipKey, Service)> = (state.services.iter().map(|(k, s)| (VipKey::V4(*k), *s)))
            .chain(state.services6.iter().map(|(k, s)| (VipKey::V6(*k), *s)))
            .collect();
        let key_of: BTreeMap<u32, VipKey> = services.iter().map(|(k, s)| (s.id, *k)).collect();
        let addr_of: BTreeMap<u32, SocketAddr> =
            state.backends.iter().map(|(id, b)| (*id, state.backend_addr(*id, b))).collect();
        for (id, b) in &state.backends {
            if let (Some(key), Some(addr)) = (key_of.get(&b.service_id), addr_of.get(id)) {
                r.backend_ids.insert((*key, *addr), *id);
                // An IPv6 backend's address and full NAT's source are in
                // `BACKENDS6`: adopted too, so the first apply finds the
                // entry as it would write it and leaves it be.
                let b6 = if addr.is_ipv6() { state.backends6.get(id).copied() } else { None };
                r.entries.insert(*id, (*b, b6));
                // Full NAT's sources as the previous agent wrote them: kept
                // until a route lookup says otherwise, so a first lookup
                // that fails does not zero them (every new flow dropped).
                let source = match (addr, b6) {
                    (SocketAddr::V6(_), Some(b6)) if b6.snat_ip != [0; 4] => Some(IpAddr::V6(ip6_addr(b6.snat_ip))),
                    (SocketAddr::V4(_), _) if b.snat_ip_be != 0 => Some(IpAddr::V4(u32::from_be(b.snat_ip_be).into())),
                    _ => None,
                };
                if let Some(source) = source {
                    r.route_sources.insert(addr.ip(), source);
                }
            }
        }
        for (key, svc) in services {
            let empty = || vec![0; MAGLEV_TABLE_SIZE as usize];
            let halves = state.tables.get(&svc.id).cloned().unwrap_or_else(|| [empty(), empty()]);
            let table = svc.table & 1;
            // Weights are not in the maps; the first apply rebuilds from the
            // live table, which keeps every slot whose owner stays.
            let live: BTreeSet<u32> = halves[table as usize].iter().copied().filter(|id| *id != 0).collect();
            let backends = live
                .iter()
                .filter_map(|id| Some(MaglevBackend { id: *id, addr: *addr_of.get(id)?, weight: 0 }))
                .collect();
            let service = ServiceState {
                id: svc.id,
                name: String::new(),
                table,
                halves,
                backends,
                flags: svc.flags,
                mode: svc.mode,
                source_be: svc.source_be,
                source6: state.sources6.get(&svc.id).copied().unwrap_or_default(),
            };
            r.services.insert(key, service);
        }
        r.backend_vips = state.backend_vips.into_iter().collect();
        r.backend_vips6 = state.backend_vips6.into_iter().collect();
        r
    }

    /// Full NAT's default sources: backend address -> the load balancer's
    /// address on the way to it. Read by the next `apply`.
    pub fn set_route_sources(&mut self, sources: BTreeMap<IpAddr, IpAddr>) {
        self.route_sources = sources;
    }

    /// The address full NAT sends flows to backend `addr` of `svc` from:
    /// the service's `source`, else the route's; `None` for other modes,
    /// or when no route names one (such flows are dropped, counted). Of
    /// `addr`'s family always (`check` refuses a `source` of the other).
    pub fn snat_source(&self, svc: &ServiceConfig, addr: IpAddr) -> Option<IpAddr> {
        if svc.mode != ForwardMode::FullNat {
            return None;
        }
        svc.source.or_else(|| self.route_sources.get(&addr).copied()).filter(|s| s.is_ipv4() == addr.is_ipv4())
    }

    pub fn services(&self) -> impl Iterator<Item = (&VipKey, &ServiceState)> {
        self.services.iter()
    }

    /// Backends with an id but no slot in their service's live table: after
    /// `adopt`, those the previous agent had taken out (down, draining,
    /// weight 0).
    pub fn out_of_table(&self) -> BTreeSet<(VipKey, SocketAddr)> {
        let live: BTreeMap<&VipKey, BTreeSet<u32>> =
            self.services.iter().map(|(k, s)| (k, s.live_table().iter().copied().collect())).collect();
        self.backend_ids
            .iter()
            .filter(|((key, _), id)| live.get(key).is_none_or(|ids| !ids.contains(id)))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Bring the data plane to `config`. On error the maps may hold part of
    /// the change, but each service is always on a complete table.
    pub fn apply(
        &mut self,
        desired: &[DesiredService],
        dp: &mut dyn MapWriter,
    ) -> Result<ApplySummary, DataplaneError> {
        let mut summary = ApplySummary::default();
        let wanted: BTreeMap<VipKey, &DesiredService> = desired.iter().map(|s| (s.config.key(), s)).collect();
        self.check_capacity(&wanted)?;
        let (vips, vips6) = wanted_vips(&wanted);
        check_vips_per_backend(&vips)?;
        check_vips_per_backend(&vips6)?;
        let freed_now = self.remove_stale_ids(&wanted);
        add_backend_vips(&mut self.backend_vips, &vips, dp)?;
        add_backend_vips(&mut self.backend_vips6, &vips6, dp)?;

        for (key, svc) in &wanted {
            let backends = self.assign_backend_ids(key, svc, &freed_now, dp, &mut summary)?;
            self.sync_service(key, svc, backends, dp, &mut summary)?;
        }

        // Only after every flip: retire what no table names any more.
        let removed: Vec<VipKey> = self.services.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for key in removed {
            match &key {
                VipKey::V4(k) => dp.remove_service(k)?,
                VipKey::V6(k) => dp.remove_service6(k)?,
            }
            self.services.remove(&key);
            summary.services_removed += 1;
        }
        for id in &freed_now {
            dp.set_backend(*id, &Backend::default())?;
            self.entries.remove(id);
            summary.backends_removed += 1;
        }
        self.resting = freed_now;
        remove_backend_vips(&mut self.backend_vips, &vips, dp)?;
        remove_backend_vips(&mut self.backend_vips6, &vips6, dp)?;
        Ok(summary)
    }

    /// Refuse, before anything is written, a change that needs more new ids
    /// than are free. Ids taken: every backend's before this apply (those it
    /// frees rest until the next), the resting and the held ones; a removed
    /// service keeps its id until after every flip.
    fn check_capacity(&self, wanted: &BTreeMap<VipKey, &DesiredService>) -> Result<(), DataplaneError> {
        let new_services = wanted.keys().filter(|k| !self.services.contains_key(k)).count();
        if self.services.len() + new_services > MAX_SERVICES as usize {
            return Err(DataplaneError::NoFreeId { what: "service", max: MAX_SERVICES });
        }
        let new_backends = wanted
            .iter()
            .flat_map(|(key, svc)| svc.backends.iter().map(move |b| (*key, b.addr)))
            .filter(|k| !self.backend_ids.contains_key(k))
            .count();
        let taken: BTreeSet<u32> =
            self.backend_ids.values().chain(&self.resting).chain(self.held.keys()).copied().collect();
        let free = (1..MAX_BACKENDS).filter(|id| !taken.contains(id)).count();
        if new_backends > free {
            return Err(DataplaneError::NoFreeId { what: "backend", max: MAX_BACKENDS - 1 });
        }
        Ok(())
    }

    /// Drop ids of backends (and services' backends) the config no longer has;
    /// returns the freed backend ids.
    fn remove_stale_ids(&mut self, wanted: &BTreeMap<VipKey, &DesiredService>) -> BTreeSet<u32> {
        let mut freed = BTreeSet::new();
        self.backend_ids.retain(|(key, addr), id| {
            let keep = wanted.get(key).is_some_and(|s| s.backends.iter().any(|b| b.addr == *addr));
            if !keep {
                freed.insert(*id);
            }
            keep
        });
        freed
    }

    fn assign_backend_ids(
        &mut self,
        key: &VipKey,
        svc: &DesiredService,
        freed_now: &BTreeSet<u32>,
        dp: &mut dyn MapWriter,
        summary: &mut ApplySummary,
    ) -> Result<Vec<MaglevBackend>, DataplaneError> {
        let service_id = self.service_id(key)?;
        let mut out = Vec::with_capacity(svc.backends.len());
        for DesiredBackend { addr, weight, in_table } in &svc.backends {
            // IPv6: the address is in `BACKENDS6`, `BACKENDS` has `ip_be == 0`.
            let (ip_be, port_be) = match addr {
                SocketAddr::V4(a) => (u32::from(*a.ip()).to_be(), a.port().to_be()),
                SocketAddr::V6(_) => (0, 0),
            };
            let snat = self.snat_source(&svc.config, addr.ip());
            let entry = Backend {
                ip_be,
                port_be,
                _pad: 0,
                service_id,
                flags: BACKEND_F_ACTIVE,
                snat_ip_be: snat.and_then(ipv4).map_or(0, |ip| u32::from(ip).to_be()),
                _pad2: 0,
            };
            let entry6 = match (addr, snat) {
                (SocketAddr::V6(a), Some(IpAddr::V6(s))) => Some(Backend6::with_source(*a, Some(s))),
                (SocketAddr::V6(a), _) => Some(Backend6::new(*a)),
                (SocketAddr::V4(_), _) => None,
            };
            let id = match self.backend_ids.get(&(*key, *addr)) {
                Some(id) => *id,
                None => {
                    let id = self.free_backend_id(freed_now)?;
                    self.backend_ids.insert((*key, *addr), id);
                    summary.backends_added += 1;
                    id
                }
            };
            if self.entries.get(&id) != Some(&(entry, entry6)) {
                // The address before the flags that make the id live.
                if let Some(b6) = &entry6 {
                    dp.set_backend6(id, b6)?;
                }
                dp.set_backend(id, &entry)?;
                self.entries.insert(id, (entry, entry6));
            }
            // Out of the table (draining, down): keeps its id, gets no slots.
            out.push(MaglevBackend { id, addr: *addr, weight: if *in_table { *weight } else { 0 } });
        }
        Ok(out)
    }

    fn sync_service(
        &mut self,
        key: &VipKey,
        svc: &DesiredService,
        backends: Vec<MaglevBackend>,
        dp: &mut dyn MapWriter,
        summary: &mut ApplySummary,
    ) -> Result<(), DataplaneError> {
        let id = self.service_id(key)?;
        let created = !self.services.contains_key(key);
        let state = self.services.entry(*key).or_insert_with(|| ServiceState {
            id,
            name: svc.config.name.clone(),
            table: 0,
            halves: [vec![0; MAGLEV_TABLE_SIZE as usize], vec![0; MAGLEV_TABLE_SIZE as usize]],
            backends: Vec::new(),
            flags: 0,
            mode: MODE_DNAT,
            source_be: 0,
            source6: [0; 4],
        });
        state.name.clone_from(&svc.config.name);
        let flags = crate::core::zero::service_flags(&svc.config);
        let mode = svc.config.mode.number();
        let (source_be, source6) = match (svc.config.mode, svc.config.source) {
            (ForwardMode::DsrIpip, Some(IpAddr::V4(ip))) => (u32::from(ip).to_be(), [0; 4]),
            (ForwardMode::DsrIpip, Some(IpAddr::V6(ip))) => (0, ip6_raw(ip)),
            _ => (0, [0; 4]),
        };
        if created {
            summary.services_added += 1;
        } else if same_set(&state.backends, &backends)
            && state.flags == flags
            && state.mode == mode
            && state.source_be == source_be
            && state.source6 == source6
        {
            return Ok(());
        }
        // From scratch, not from the live table: the table is then a function
        // of the backend set alone (addresses and weights), so every node
        // with the same config holds the same table whatever its history
        // (restarts, backends added and removed, health flaps in any order),
        // and a flow that moves between nodes keeps its backend. Flows in
        // the connection table keep theirs through any change anyway.
        let table = build_table(&backends, MAGLEV_TABLE_SIZE);
        let moved = table.iter().zip(state.live_table()).filter(|(new, live)| new != live).count();
        let next = 1 - state.table;
        let changes: Vec<(u32, u32)> = table
            .iter()
            .zip(&state.halves[next as usize])
            .enumerate()
            .filter(|(_, (new, old))| new != old)
            .map(|(slot, (new, _))| (slot as u32, *new))
            .collect();
        dp.set_table_entries(id, next, &changes)?;
        state.halves[next as usize] = table;
        let live_backends = backends.iter().filter(|b| b.weight > 0).count() as u32;
        let service = Service { id, table: next, backend_count: live_backends, mode, flags, source_be };
        match key {
            VipKey::V4(k) => dp.set_service(k, &service)?,
            VipKey::V6(k) => {
                // The source before the service that reads it.
                dp.set_source6(id, &source6)?;
                dp.set_service6(k, &service)?
            }
        }
        state.flags = flags;
        state.table = next;
        state.mode = mode;
        state.source_be = source_be;
        state.source6 = source6;
        state.backends = backends;
        summary.tables_rebuilt += 1;
        summary.slots_written += changes.len();
        *summary.slots_moved.entry(svc.config.name.clone()).or_default() += moved;
        Ok(())
    }

    /// Keep `id` from being given to a new backend until as many
    /// [`Self::release`]s.
    pub fn hold(&mut self, id: u32) {
        *self.held.entry(id).or_insert(0) += 1;
    }

    pub fn release(&mut self, id: u32) {
        if let Some(n) = self.held.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.held.remove(&id);
            }
        }
    }

    /// The id a backend has in `BACKENDS` and `BACKEND_STATS`.
    pub fn backend_id(&self, key: &VipKey, addr: SocketAddr) -> Option<u32> {
        self.backend_ids.get(&(*key, addr)).copied()
    }

    fn service_id(&self, key: &VipKey) -> Result<u32, DataplaneError> {
        if let Some(s) = self.services.get(key) {
            return Ok(s.id);
        }
        let used: BTreeSet<u32> = self.services.values().map(|s| s.id).collect();
        (0..MAX_SERVICES)
            .find(|id| !used.contains(id))
            .ok_or(DataplaneError::NoFreeId { what: "service", max: MAX_SERVICES })
    }

    fn free_backend_id(&self, freed_now: &BTreeSet<u32>) -> Result<u32, DataplaneError> {
        let used: BTreeSet<u32> = self.backend_ids.values().copied().collect();
        (1..MAX_BACKENDS)
            .find(|id| {
                !used.contains(id)
                    && !freed_now.contains(id)
                    && !self.resting.contains(id)
                    && !self.held.contains_key(id)
            })
            .ok_or(DataplaneError::NoFreeId { what: "backend", max: MAX_BACKENDS - 1 })
    }
}

/// The services each backend address (with the service's protocol) is
/// registered in, in or out of the table: replies from any of them may be
/// of a flow still open. IPv4 and IPv6 apart (`BACKEND_VIPS`, `BACKEND_VIPS6`).
fn wanted_vips(
    wanted: &BTreeMap<VipKey, &DesiredService>,
) -> (BTreeMap<BackendAddr, BTreeSet<ServiceKey>>, BTreeMap<BackendAddr6, BTreeSet<ServiceKey6>>) {
    let (mut v4, mut v6): (BTreeMap<BackendAddr, BTreeSet<ServiceKey>>, BTreeMap<_, BTreeSet<_>>) = Default::default();
    for (key, svc) in wanted {
        for b in &svc.backends {
            // A service's backends are of its VIP's family (config and
            // registry refuse others), so a mismatch has nothing to serve.
            match (key, b.addr) {
                (VipKey::V4(k), SocketAddr::V4(a)) => {
                    let addr = BackendAddr {
                        ip_be: u32::from(*a.ip()).to_be(),
                        port_be: a.port().to_be(),
                        proto: k.proto,
                        _pad: 0,
                    };
                    v4.entry(addr).or_default().insert(*k);
                }
                (VipKey::V6(k), SocketAddr::V6(a)) => {
                    v6.entry(Backend6::new(a).reply_key(k.proto)).or_default().insert(*k);
                }
                _ => {}
            }
        }
    }
    (v4, v6)
}

/// A `BACKEND_VIPS` map of either family: its key (a backend's address as
/// its replies carry it) and its value (the services it serves, used slots
/// first; an unused slot is the all-zero key).
trait ReplyVips: Ord + Copy {
    type Key: Ord + Copy + Default;
    type Vips: Copy + Default + PartialEq;
    fn slots(vips: &mut Self::Vips) -> &mut [Self::Key];
    fn addr(&self) -> SocketAddr;
    fn write(&self, vips: Option<&Self::Vips>, dp: &mut dyn MapWriter) -> Result<(), DataplaneError>;
}

impl ReplyVips for BackendAddr {
    type Key = ServiceKey;
    type Vips = BackendVips;
    fn slots(vips: &mut BackendVips) -> &mut [ServiceKey] {
        &mut vips.vips
    }
    fn addr(&self) -> SocketAddr {
        SocketAddrV4::new(u32::from_be(self.ip_be).into(), u16::from_be(self.port_be)).into()
    }
    fn write(&self, vips: Option<&BackendVips>, dp: &mut dyn MapWriter) -> Result<(), DataplaneError> {
        dp.set_backend_vips(self, vips)
    }
}

impl ReplyVips for BackendAddr6 {
    type Key = ServiceKey6;
    type Vips = BackendVips6;
    fn slots(vips: &mut BackendVips6) -> &mut [ServiceKey6] {
        &mut vips.vips
    }
    fn addr(&self) -> SocketAddr {
        Backend6 { ip: self.ip, port_be: self.port_be, ..Backend6::default() }.addr().into()
    }
    fn write(&self, vips: Option<&BackendVips6>, dp: &mut dyn MapWriter) -> Result<(), DataplaneError> {
        dp.set_backend_vips6(self, vips)
    }
}

/// Before any flip: each wanted backend address serves its services,
/// then (while there is room) the ones it served before, so that a flow
/// of a service it just left still has its replies translated.
fn add_backend_vips<A: ReplyVips>(
    mirror: &mut BTreeMap<A, A::Vips>,
    wanted: &BTreeMap<A, BTreeSet<A::Key>>,
    dp: &mut dyn MapWriter,
) -> Result<(), DataplaneError> {
    for (addr, services) in wanted {
        let mut before = mirror.get(addr).copied().unwrap_or_default();
        let kept = A::slots(&mut before).iter().copied().filter(|k| *k != A::Key::default() && !services.contains(k));
        let mut next = A::Vips::default();
        for (slot, key) in A::slots(&mut next).iter_mut().zip(services.iter().copied().chain(kept)) {
            *slot = key;
        }
        if mirror.get(addr) != Some(&next) {
            addr.write(Some(&next), dp)?;
            mirror.insert(*addr, next);
        }
    }
    Ok(())
}

/// After every flip: addresses no service has any more are forgotten.
fn remove_backend_vips<A: ReplyVips>(
    mirror: &mut BTreeMap<A, A::Vips>,
    wanted: &BTreeMap<A, BTreeSet<A::Key>>,
    dp: &mut dyn MapWriter,
) -> Result<(), DataplaneError> {
    let gone: Vec<A> = mirror.keys().filter(|a| !wanted.contains_key(a)).copied().collect();
    for addr in gone {
        addr.write(None, dp)?;
        mirror.remove(&addr);
    }
    Ok(())
}

/// Refuse, before anything is written, a backend address in more services
/// than a reply can be matched against.
fn check_vips_per_backend<A: ReplyVips>(vips: &BTreeMap<A, BTreeSet<A::Key>>) -> Result<(), DataplaneError> {
    match vips.iter().find(|(_, services)| services.len() > MAX_VIPS_PER_BACKEND) {
        Some((addr, services)) => Err(DataplaneError::BackendInTooManyServices {
            backend: addr.addr(),
            services: services.len(),
            max: MAX_VIPS_PER_BACKEND,
        }),
        None => Ok(()),
    }
}

fn same_set(a: &[MaglevBackend], b: &[MaglevBackend]) -> bool {
    let norm = |v: &[MaglevBackend]| v.iter().map(|m| (m.id, m.addr, m.weight)).collect::<BTreeSet<_>>();
    a.len() == b.len() && norm(a) == norm(b)
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        path::Path,
    };

    use super::*;
    use crate::{
        config::Config,
        core::registry::DesiredService,
        testing::{FakeDataplane, Write},
    };

    fn config(backends: &[(&str, u32)]) -> Vec<DesiredService> {
        let mut text =
            String::from("[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\ninterfaces = [\"eth0\"]\n");
        for (addr, w) in backends {
            text += &format!("[[service.backend]]\naddress = \"{addr}\"\nweight = {w}\n");
        }
        DesiredService::all_in_table(&Config::parse(&text, Path::new("t.toml")).unwrap())
    }

    /// One IPv6 service (`2001:db8::10:80`, XDP) with `backends`, and
    /// beside it an IPv4 one.
    fn config6(backends: &[&str]) -> Vec<DesiredService> {
        let mut text =
            String::from("[[service]]\nname = \"web6\"\nvip = \"2001:db8::10\"\nport = 80\ninterfaces = [\"eth0\"]\n");
        for addr in backends {
            text += &format!("[[service.backend]]\naddress = \"{addr}\"\n");
        }
        text += "[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\ninterfaces = [\"eth0\"]\n\
                 [[service.backend]]\naddress = \"10.1.0.1:80\"\n[interface.eth0]\nhook = \"xdp\"\n";
        DesiredService::all_in_table(&Config::parse(&text, Path::new("t.toml")).unwrap())
    }

    #[test]
    fn an_ipv6_service_is_written_to_the_ipv6_maps_with_shared_ids_and_tables() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        r.apply(&config6(&["[2001:db8:1::2]:8080", "[2001:db8:1::3]:8080"]), &mut dp).unwrap();
        let key6 = ServiceKey6::new("[2001:db8::10]:80".parse().unwrap(), lb_common::PROTO_TCP);
        let svc = dp.services6[&key6];
        assert_eq!((dp.services.len(), dp.services6.len()), (1, 1));
        assert_ne!(svc.id, dp.services.values().next().unwrap().id, "one id space for both families");
        assert_eq!(svc.backend_count, 2);
        // Each IPv6 backend: its address in BACKENDS6 before its BACKENDS
        // entry (no address, flags and service) makes the id live.
        let b6: Vec<SocketAddr> = dp.backends6.values().map(|b| b.addr().into()).collect();
        assert_eq!(b6, ["[2001:db8:1::2]:8080".parse().unwrap(), "[2001:db8:1::3]:8080".parse().unwrap()]);
        for id in dp.backends6.keys() {
            let b = dp.backends[id];
            assert_eq!((b.ip_be, b.service_id, b.flags), (0, svc.id, BACKEND_F_ACTIVE));
            let at = |w: &Write| matches!(w, Write::Backend6 { id: i, .. } | Write::Backend { id: i, .. } if i == id);
            let kinds: Vec<&str> = dp.log.iter().filter(|w| at(w)).map(Write::kind).collect();
            assert_eq!(kinds, ["backend6", "backend"]);
        }
        // The shared table names only the IPv6 backends' ids.
        let live: BTreeSet<u32> = dp.table(svc.id, svc.table).into_iter().collect();
        assert_eq!(live, dp.backends6.keys().copied().collect());
        // Replies from each backend address are matched to the service.
        assert_eq!(dp.backend_vips6.len(), 2);
        assert!(dp.backend_vips6.values().all(|v| v.vips[0] == key6 && v.vips[1] == ServiceKey6::default()));

        // A backend leaves: its reply key goes; the service goes: SERVICES6 too.
        r.apply(&config6(&["[2001:db8:1::2]:8080"]), &mut dp).unwrap();
        assert_eq!((dp.backend_vips6.len(), dp.services6[&key6].backend_count), (1, 1));
        let only_v4: Vec<DesiredService> = config6(&[]).into_iter().filter(|s| s.config.name == "web").collect();
        r.apply(&only_v4, &mut dp).unwrap();
        assert!(dp.services6.is_empty() && dp.backend_vips6.is_empty());
        assert_eq!(dp.services.len(), 1);
    }

    /// `config6`'s IPv6 service in full NAT, with `extra` lines.
    fn full_nat6(extra: &str, backends: &[&str]) -> Vec<DesiredService> {
        let text = format!(
            "[[service]]\nname = \"web6\"\nvip = \"2001:db8::10\"\nport = 80\ninterfaces = [\"eth0\"]\n\
             mode = \"full-nat\"\n{extra}\n{}[interface.eth0]\nhook = \"xdp\"\n",
            backends.iter().map(|a| format!("[[service.backend]]\naddress = \"{a}\"\n")).collect::<String>()
        );
        DesiredService::all_in_table(&Config::parse(&text, Path::new("t.toml")).unwrap())
    }

    #[test]
    fn an_ipv6_full_nat_backend_is_sent_from_its_source_or_its_route() {
        let (a, b) = ("[2001:db8:1::2]:8080", "[2001:db8:2::2]:8080");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let source6 = |dp: &FakeDataplane| -> Vec<Ipv6Addr> {
            dp.backends6.values().map(|b| lb_common::v6::ip6_addr(b.snat_ip)).collect()
        };
        // The route's source per backend; one without a route gets none.
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        let routed = full_nat6("", &[a, b]);
        let wanted = route_sourced_backends(&routed);
        assert_eq!(wanted, [ip("2001:db8:1::2"), ip("2001:db8:2::2")].into());
        r.set_route_sources([(ip("2001:db8:1::2"), ip("2001:db8:1::fe")), (ip("10.1.0.1"), ip("10.1.0.254"))].into());
        r.apply(&routed, &mut dp).unwrap();
        assert_eq!(source6(&dp), [ip6("2001:db8:1::fe"), Ipv6Addr::UNSPECIFIED]);
        assert!(dp.backends.values().all(|b| b.snat_ip_be == 0), "no IPv4 source in an IPv6 flow's entry");
        // A route learnt later rewrites the entry.
        r.set_route_sources(
            [(ip("2001:db8:1::2"), ip("2001:db8:1::fe")), (ip("2001:db8:2::2"), ip("2001:db8:2::fe"))].into(),
        );
        r.apply(&routed, &mut dp).unwrap();
        assert_eq!(source6(&dp), [ip6("2001:db8:1::fe"), ip6("2001:db8:2::fe")]);
        // The service's own source wins over the routes, for every backend.
        let sourced = full_nat6("source = \"2001:db8::1\"", &[a, b]);
        assert!(route_sourced_backends(&sourced).is_empty());
        r.apply(&sourced, &mut dp).unwrap();
        assert_eq!(source6(&dp), [ip6("2001:db8::1"), ip6("2001:db8::1")]);
        // DNAT: no source at all.
        r.apply(&config6(&[a, b]), &mut dp).unwrap();
        assert_eq!(source6(&dp), [Ipv6Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED]);
    }

    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn an_ipv6_dsr_service_gets_its_source_before_the_service_that_reads_it() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        let dsr = "interfaces = [\"eth0\"]\nmode = \"dsr-ipip\"\nsource = \"2001:db8::1\"\n\
                   health_check = { interval = \"1s\" }\n";
        let mut desired = config6(&["[2001:db8:1::2]:80"]);
        let text = format!(
            "[[service]]\nname = \"web6\"\nvip = \"2001:db8::10\"\nport = 80\n{dsr}\
             [[service.backend]]\naddress = \"[2001:db8:1::2]:80\"\n[interface.eth0]\nhook = \"xdp\"\n"
        );
        desired[0] = DesiredService::all_in_table(&Config::parse(&text, Path::new("t.toml")).unwrap()).remove(0);
        r.apply(&desired, &mut dp).unwrap();
        let key6 = ServiceKey6::new("[2001:db8::10]:80".parse().unwrap(), lb_common::PROTO_TCP);
        let svc = dp.services6[&key6];
        assert_eq!(svc.mode, lb_common::MODE_DSR_IPIP);
        assert_eq!(dp.sources6[&svc.id], ip6_raw("2001:db8::1".parse().unwrap()));
        let kinds: Vec<&str> = dp.log.iter().map(Write::kind).filter(|k| k.ends_with('6')).collect();
        assert_eq!(kinds.iter().rev().take(2).collect::<Vec<_>>(), [&"service6", &"source6"]);
        // The same config again writes nothing; back to nat clears the source.
        dp.log.clear();
        r.apply(&desired, &mut dp).unwrap();
        assert!(dp.log.is_empty(), "{:?}", dp.log);
        r.apply(&config6(&["[2001:db8:1::2]:80"]), &mut dp).unwrap();
        assert_eq!(dp.sources6[&svc.id], [0; 4]);
    }

    #[test]
    fn first_apply_writes_backends_then_table_then_service() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        let s = r.apply(&config(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1)]), &mut dp).unwrap();
        assert_eq!(s.services_added, 1);
        assert_eq!(s.backends_added, 2);
        assert_eq!(s.slots_written, MAGLEV_TABLE_SIZE as usize);
        let kinds: Vec<&str> = dp.log.iter().map(Write::kind).collect();
        assert_eq!(kinds, ["backend_vips", "backend_vips", "backend", "backend", "table", "service"]);
        // The service points at the half that was just written.
        let Write::Table { table, .. } = dp.log[4] else { panic!() };
        let Write::Service { service, .. } = &dp.log[5] else { panic!() };
        assert_eq!(service.table, table);
        assert_eq!(service.backend_count, 2);
        assert!(dp.table(service.id, table).iter().all(|id| *id == 1 || *id == 2));
    }

    /// `n` services on ports 80.., every one with the backend `addr`.
    fn sharing(n: u16, addr: &str) -> Vec<DesiredService> {
        let mut text = String::new();
        for i in 0..n {
            text += &format!(
                "[[service]]\nname = \"s{i}\"\nvip = \"10.0.0.100\"\nport = {}\ninterfaces = [\"eth0\"]\n\
                 [[service.backend]]\naddress = \"{addr}\"\n",
                80 + i
            );
        }
        DesiredService::all_in_table(&Config::parse(&text, Path::new("t.toml")).unwrap())
    }

    #[test]
    fn backend_vips_name_every_service_of_an_address_and_keep_the_one_it_left() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        r.apply(&sharing(2, "10.1.0.1:80"), &mut dp).unwrap();
        let addr = BackendAddr {
            ip_be: u32::from(Ipv4Addr::new(10, 1, 0, 1)).to_be(),
            port_be: 80u16.to_be(),
            proto: lb_common::PROTO_TCP,
            _pad: 0,
        };
        let ports = |dp: &FakeDataplane| -> Vec<u16> {
            dp.backend_vips[&addr].vips.iter().filter(|k| k.vip_be != 0).map(|k| u16::from_be(k.port_be)).collect()
        };
        assert_eq!(ports(&dp), [80, 81]);
        // Out of service 81: its open flows still have their replies matched.
        r.apply(&sharing(1, "10.1.0.1:80"), &mut dp).unwrap();
        assert_eq!(ports(&dp), [80, 81]);
        // Out of every service: the address is forgotten.
        r.apply(&sharing(1, "10.1.0.2:80"), &mut dp).unwrap();
        assert!(!dp.backend_vips.contains_key(&addr));
    }

    #[test]
    fn a_backend_in_too_many_services_is_refused_before_any_write() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        r.apply(&sharing(MAX_VIPS_PER_BACKEND as u16, "10.1.0.1:80"), &mut dp).unwrap();
        dp.log.clear();
        let err = r.apply(&sharing(MAX_VIPS_PER_BACKEND as u16 + 1, "10.1.0.1:80"), &mut dp).unwrap_err();
        assert!(matches!(err, DataplaneError::BackendInTooManyServices { services: 5, max: 4, .. }), "{err}");
        assert!(err.to_string().contains("10.1.0.1:80"), "{err}");
        assert!(dp.log.is_empty(), "{:?}", dp.log);
    }

    #[test]
    fn unchanged_config_writes_nothing() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        let c = config(&[("10.1.0.1:80", 1)]);
        r.apply(&c, &mut dp).unwrap();
        dp.log.clear();
        assert!(r.apply(&c, &mut dp).unwrap().is_noop());
        assert!(dp.log.is_empty());
    }

    #[test]
    fn removal_flips_before_clearing_and_keeps_the_id_resting() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        r.apply(&config(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1), ("10.1.0.3:80", 1)]), &mut dp).unwrap();
        dp.log.clear();
        let s = r.apply(&config(&[("10.1.0.1:80", 1), ("10.1.0.3:80", 1)]), &mut dp).unwrap();
        assert_eq!(s.backends_removed, 1);
        let kinds: Vec<&str> = dp.log.iter().map(Write::kind).collect();
        assert_eq!(kinds, ["table", "service", "backend", "backend_vips"]);
        let Write::Backend { id, backend } = &dp.log[2] else { panic!() };
        assert_eq!((*id, backend.flags), (2, 0));
        // Only the removed backend's slots were rewritten.
        let Write::Service { service, .. } = &dp.log[1] else { panic!() };
        let live = dp.table(service.id, service.table);
        assert!(live.iter().all(|id| *id == 1 || *id == 3));
        // A new backend right after does not take the resting id 2.
        dp.log.clear();
        r.apply(&config(&[("10.1.0.1:80", 1), ("10.1.0.3:80", 1), ("10.1.0.4:80", 1)]), &mut dp).unwrap();
        let Write::Backend { id, .. } = &dp.log[1] else { panic!() };
        assert_eq!(*id, 4);
    }

    #[test]
    fn a_held_id_is_not_given_out_until_released() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        r.apply(&config(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1)]), &mut dp).unwrap();
        r.hold(2);
        r.apply(&config(&[("10.1.0.1:80", 1)]), &mut dp).unwrap();
        r.apply(&config(&[("10.1.0.1:80", 1)]), &mut dp).unwrap();
        // Past its rest, id 2 is still held: its flows are being flushed.
        r.apply(&config(&[("10.1.0.1:80", 1), ("10.1.0.3:80", 1)]), &mut dp).unwrap();
        let key = config(&[])[0].config.key();
        assert_eq!(r.backend_id(&key, "10.1.0.3:80".parse().unwrap()), Some(3));
        r.release(2);
        r.apply(&config(&[("10.1.0.1:80", 1), ("10.1.0.3:80", 1), ("10.1.0.4:80", 1)]), &mut dp).unwrap();
        assert_eq!(r.backend_id(&key, "10.1.0.4:80".parse().unwrap()), Some(2));
    }

    #[test]
    fn weight_change_rebuilds_and_removed_service_is_deleted() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        r.apply(&config(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1)]), &mut dp).unwrap();
        let s = r.apply(&config(&[("10.1.0.1:80", 3), ("10.1.0.2:80", 1)]), &mut dp).unwrap();
        assert_eq!((s.tables_rebuilt, s.backends_added), (1, 0));
        let s = r.apply(&[], &mut dp).unwrap();
        assert_eq!((s.services_removed, s.backends_removed), (1, 2));
        assert!(dp.services.is_empty());
    }

    #[test]
    fn slots_moved_count_against_the_live_table_not_the_half_written() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        let live = |dp: &FakeDataplane| {
            let svc = dp.services.values().next().unwrap();
            dp.table(svc.id, svc.table)
        };
        r.apply(&config(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1), ("10.1.0.3:80", 2)]), &mut dp).unwrap();
        let before = live(&dp);
        let s = r.apply(&config(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1), ("10.1.0.3:80", 0)]), &mut dp).unwrap();
        let after = live(&dp);
        // The half written was empty: every slot was written, but only the
        // slots of 10.1.0.3 (half the table) moved.
        assert_eq!(s.slots_written, MAGLEV_TABLE_SIZE as usize);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert_eq!(s.slots_moved["web"], moved);
        let half = MAGLEV_TABLE_SIZE as usize / 2;
        assert!(moved > half * 9 / 10 && moved < half * 11 / 10, "{moved} of {MAGLEV_TABLE_SIZE}");
    }

    /// The live table of the only service, as backend addresses.
    fn live_addrs(r: &Reconciler, dp: &FakeDataplane) -> Vec<Option<SocketAddr>> {
        let svc = dp.services.values().next().unwrap();
        let (_, state) = r.services().next().unwrap();
        let addr = |id: u32| state.backends.iter().find(|b| b.id == id).map(|b| b.addr);
        dp.table(svc.id, svc.table).into_iter().map(addr).collect()
    }

    #[test]
    fn same_backend_set_gives_the_same_table_whatever_the_history() {
        let set = [("10.1.0.1:80", 1), ("10.1.0.2:80", 2), ("10.1.0.3:80", 1)];
        let (mut fresh_dp, mut fresh) = (FakeDataplane::default(), Reconciler::default());
        fresh.apply(&config(&set), &mut fresh_dp).unwrap();
        // Another node: other insertion order (so other ids), a backend added
        // then removed, a weight changed and back, a health flap.
        let (mut dp, mut r) = (FakeDataplane::default(), Reconciler::default());
        r.apply(&config(&[("10.1.0.4:80", 1), ("10.1.0.3:80", 1)]), &mut dp).unwrap();
        r.apply(&config(&[("10.1.0.3:80", 1), ("10.1.0.4:80", 1), ("10.1.0.2:80", 5), ("10.1.0.1:80", 1)]), &mut dp)
            .unwrap();
        let mut flap = config(&[("10.1.0.3:80", 1), ("10.1.0.2:80", 2), ("10.1.0.1:80", 1)]);
        flap[0].backends[0].in_table = false;
        r.apply(&flap, &mut dp).unwrap();
        r.apply(&config(&[("10.1.0.3:80", 1), ("10.1.0.2:80", 2), ("10.1.0.1:80", 1)]), &mut dp).unwrap();
        let key = flap[0].config.key();
        let first: SocketAddr = "10.1.0.1:80".parse().unwrap();
        assert_ne!(fresh.backend_id(&key, first), r.backend_id(&key, first), "ids should differ between the nodes");
        let (a, b) = (live_addrs(&fresh, &fresh_dp), live_addrs(&r, &dp));
        let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert_eq!(differ, 0, "{differ} of {MAGLEV_TABLE_SIZE} slots differ");
    }

    /// A backend set from bits: address `10.1.0.i`, weight 1..=3, in or out of
    /// the table.
    fn set_from(members: &[(u8, u32, bool)]) -> Vec<DesiredService> {
        let set: Vec<(String, u32)> = members.iter().map(|(i, w, _)| (format!("10.1.0.{i}:80"), *w)).collect();
        let refs: Vec<(&str, u32)> = set.iter().map(|(a, w)| (a.as_str(), *w)).collect();
        let mut d = config(&refs);
        for (b, (_, _, up)) in d[0].backends.iter_mut().zip(members) {
            b.in_table = *up;
        }
        d
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]
        #[test]
        fn any_history_ends_at_the_table_a_fresh_node_builds(
            history in proptest::collection::vec(
                proptest::sample::subsequence((1u8..=6).collect::<Vec<_>>(), 1..=6), 0..4),
            last in proptest::sample::subsequence((1u8..=6).collect::<Vec<_>>(), 1..=6),
            weights in proptest::collection::vec(1u32..=3, 6),
            downs in proptest::collection::vec(proptest::bool::ANY, 6),
        ) {
            let (mut dp, mut r) = (FakeDataplane::default(), Reconciler::default());
            for step in &history {
                let members: Vec<_> = step.iter().rev().map(|&i| (i, weights[usize::from(i) - 1] % 3 + 1, !downs[usize::from(i) - 1])).collect();
                r.apply(&set_from(&members), &mut dp).unwrap();
            }
            let last: Vec<_> = last.iter().map(|&i| (i, weights[usize::from(i) - 1], true)).collect();
            r.apply(&set_from(&last), &mut dp).unwrap();
            let (mut fresh_dp, mut fresh) = (FakeDataplane::default(), Reconciler::default());
            fresh.apply(&set_from(&last), &mut fresh_dp).unwrap();
            proptest::prop_assert!(live_addrs(&r, &dp) == live_addrs(&fresh, &fresh_dp));
        }
    }

    #[test]
    fn out_of_table_backend_keeps_its_id_but_no_slots() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        let mut d = config(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1)]);
        r.apply(&d, &mut dp).unwrap();
        d[0].backends[1].in_table = false;
        dp.log.clear();
        let s = r.apply(&d, &mut dp).unwrap();
        assert_eq!((s.backends_removed, s.tables_rebuilt), (0, 1));
        let svc = dp.services.values().next().unwrap();
        assert_eq!(svc.backend_count, 1);
        assert!(dp.table(svc.id, svc.table).iter().all(|id| *id == 1));
        assert_eq!(r.backend_id(&d[0].config.key(), "10.1.0.2:80".parse().unwrap()), Some(2));
    }

    #[test]
    fn adopting_pinned_state_keeps_ids_and_moves_nothing_for_the_same_config() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        let d = config(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1), ("10.1.0.3:80", 1)]);
        r.apply(&d, &mut dp).unwrap();
        r.apply(&config(&[("10.1.0.1:80", 1), ("10.1.0.3:80", 1)]), &mut dp).unwrap();
        r.apply(&d, &mut dp).unwrap();
        // A new agent reads the maps back.
        let state = dp.pinned_state();
        let before = dp.services.values().next().copied().unwrap();
        let live_before = dp.table(before.id, before.table);
        let mut adopted = Reconciler::adopt(state);
        for (addr, id) in [("10.1.0.1:80", 1), ("10.1.0.3:80", 3), ("10.1.0.2:80", 4)] {
            assert_eq!(adopted.backend_id(&d[0].config.key(), addr.parse().unwrap()), Some(id), "{addr}");
        }
        dp.log.clear();
        adopted.apply(&d, &mut dp).unwrap();
        // No backend entry rewritten; the flip carries the same table.
        assert!(dp.log.iter().all(|w| !w.kind().starts_with("backend")), "{:?}", dp.log);
        let after = dp.services.values().next().copied().unwrap();
        assert_eq!(dp.table(after.id, after.table), live_before);
    }

    /// A restart with IPv6 services: their ids, tables, sources and reply
    /// keys are read back, so the same config rewrites no backend and flips
    /// to the same table, and a service the new config lacks is removed
    /// from `SERVICES6`.
    #[test]
    fn adopting_pinned_ipv6_services_keeps_their_ids_and_tables() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        let b6 = ["[2001:db8:1::2]:80", "[2001:db8:1::3]:80", "[2001:db8:1::4]:80"];
        let text = format!(
            "[[service]]\nname = \"web6\"\nvip = \"2001:db8::10\"\nport = 80\ninterfaces = [\"eth0\"]\n\
             mode = \"dsr-ipip\"\nsource = \"2001:db8::1\"\nhealth_check = {{ interval = \"1s\" }}\n{}\
             [[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\ninterfaces = [\"eth0\"]\n\
             [[service.backend]]\naddress = \"10.1.0.1:80\"\n[interface.eth0]\nhook = \"xdp\"\n",
            b6.iter().map(|a| format!("[[service.backend]]\naddress = \"{a}\"\n")).collect::<String>()
        );
        let mut d = DesiredService::all_in_table(&Config::parse(&text, Path::new("t.toml")).unwrap());
        // Another history than a fresh start: web6's second backend is out.
        d[0].backends[1].in_table = false;
        r.apply(&d, &mut dp).unwrap();
        let state = dp.pinned_state();
        let key6 = d[0].config.key();
        let adopted = Reconciler::adopt(state);
        for addr in b6 {
            let addr = addr.parse().unwrap();
            assert_eq!(adopted.backend_id(&key6, addr), r.backend_id(&key6, addr), "{addr}");
        }
        assert_eq!(adopted.out_of_table(), [(key6, b6[1].parse().unwrap())].into());
        let mut adopted = adopted;
        let live6 = |dp: &FakeDataplane| {
            let s = dp.services6[&lb_common::v6::ServiceKey6::new("[2001:db8::10]:80".parse().unwrap(), 6)];
            (s.id, dp.table(s.id, s.table), dp.sources6[&s.id])
        };
        let before = live6(&dp);
        dp.log.clear();
        adopted.apply(&d, &mut dp).unwrap();
        // Weights are not in the maps: the tables are rebuilt, to the same.
        let rewrites: Vec<&Write> =
            dp.log.iter().filter(|w| !matches!(w.kind(), "table" | "service" | "service6" | "source6")).collect();
        assert!(rewrites.is_empty(), "the same config rewrote: {rewrites:?}");
        assert_eq!(live6(&dp), before);

        // A new config without web6: it leaves SERVICES6 and its reply keys go.
        let only_v4: Vec<DesiredService> = d.iter().filter(|s| s.config.name == "web").cloned().collect();
        adopted.apply(&only_v4, &mut dp).unwrap();
        assert!(dp.services6.is_empty() && dp.backend_vips6.is_empty(), "{:?}", dp.log);
        assert!(dp.live_backends().iter().all(SocketAddr::is_ipv4));
    }

    /// A restarted agent whose first route lookup fails (no route sources
    /// set) keeps the full-NAT sources the previous one wrote, IPv6 and
    /// IPv4 alike, instead of zeroing them (every new flow dropped).
    #[test]
    fn adopting_keeps_full_nat_sources_until_a_lookup_says_otherwise() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        let d = full_nat6("", &["[2001:db8:1::2]:8080"]);
        r.set_route_sources([(ip("2001:db8:1::2"), ip("2001:db8:1::fe"))].into());
        r.apply(&d, &mut dp).unwrap();
        let mut adopted = Reconciler::adopt(dp.pinned_state());
        dp.log.clear();
        adopted.apply(&d, &mut dp).unwrap();
        assert!(dp.log.iter().all(|w| !w.kind().starts_with("backend")), "rewrote: {:?}", dp.log);
        let sources: Vec<IpAddr> = dp.backends6.values().map(|b| lb_common::v6::ip6_addr(b.snat_ip).into()).collect();
        assert_eq!(sources, [ip("2001:db8:1::fe")]);
    }

    #[test]
    fn adopting_tells_which_backends_were_out_of_the_table() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        let mut d = config(&[("10.1.0.1:80", 1), ("10.1.0.2:80", 1), ("10.1.0.3:80", 1)]);
        d[0].backends[1].in_table = false;
        r.apply(&d, &mut dp).unwrap();
        let key = d[0].config.key();
        assert_eq!(Reconciler::adopt(dp.pinned_state()).out_of_table(), [(key, "10.1.0.2:80".parse().unwrap())].into());
        d[0].backends[1].in_table = true;
        r.apply(&d, &mut dp).unwrap();
        assert!(Reconciler::adopt(dp.pinned_state()).out_of_table().is_empty());
    }

    /// `n` backends 10.1.x.y:80 in the one service "web".
    fn many(n: u32) -> Vec<DesiredService> {
        let mut d = config(&[]);
        d[0].backends = (0..n)
            .map(|i| DesiredBackend {
                addr: SocketAddrV4::new([10, 1, (i >> 8) as u8, i as u8].into(), 80).into(),
                weight: 1,
                in_table: true,
            })
            .collect();
        d
    }

    #[test]
    fn a_change_beyond_the_free_ids_is_refused_before_any_write() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        let max = MAX_BACKENDS - 1;
        r.apply(&many(max - 1), &mut dp).unwrap();
        dp.log.clear();
        // Two new backends, one free id: nothing is written.
        let err = r.apply(&many(max + 1), &mut dp).unwrap_err();
        assert!(matches!(err, DataplaneError::NoFreeId { what: "backend", .. }), "{err}");
        assert!(dp.log.is_empty(), "{} writes before the refusal", dp.log.len());
        // One new backend fits: the refusal took no id.
        let d = many(max);
        r.apply(&d, &mut dp).unwrap();
        assert_eq!(r.backend_id(&d[0].config.key(), d[0].backends[max as usize - 1].addr), Some(max));
    }

    #[test]
    fn a_service_with_no_backends_has_count_zero() {
        let mut dp = FakeDataplane::default();
        let mut r = Reconciler::default();
        r.apply(&config(&[]), &mut dp).unwrap();
        let svc = dp.services.values().next().unwrap();
        assert_eq!(svc.backend_count, 0);
    }
}
