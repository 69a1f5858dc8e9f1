//! The IPv6 maps under BPF_PROG_TEST_RUN: an IPv6 service written the way
//! the agent writes it (`BACKENDS` for the id's flags, `BACKENDS6` for its
//! address, `BACKEND_VIPS6`, the shared Maglev table, `SERVICES6`), and
//! the IPv6 connection table read back.

use std::{
    collections::HashMap as StdHashMap,
    net::{Ipv6Addr, SocketAddrV6},
};

use anyhow::{Context as _, Result};
use aya::maps::MapError;
use lb_common::{
    hash::flow_hash,
    v6::{fold_ip6, ip6_raw, Backend6, BackendVips6, Conn6, FlowKey6, ServiceKey6},
    Backend, Service, BACKEND_F_ACTIVE, MAGLEV_TABLE_SIZE, MODE_DNAT, MODE_FULL_NAT,
};

use lb_agent::adapters::dataplane::object::{program_mut, set_v6_programs};

use crate::testrun::{empty_hash, LbObject};

/// An IPv6 service as the fixtures set it up: every backend active, in the
/// live table in turn (slot `i` gets `backends[i % len]`).
#[derive(Clone, Debug)]
pub struct ServiceSpec6 {
    pub id: u32,
    pub vip: SocketAddrV6,
    pub proto: u8,
    pub table: u32,
    pub backends: Vec<(u32, SocketAddrV6)>,
    /// `SERVICE_F_*` bits (0 from `new`).
    pub flags: u32,
    /// `Service::mode` (`MODE_DNAT` by default).
    pub mode: u32,
    /// Full NAT: every backend's source address (`Backend6::snat_ip`).
    pub snat_ip: Option<Ipv6Addr>,
}

impl ServiceSpec6 {
    pub fn new(id: u32, vip: SocketAddrV6, proto: u8, table: u32, backends: &[(u32, SocketAddrV6)]) -> Self {
        Self { id, vip, proto, table, backends: backends.to_vec(), flags: 0, mode: MODE_DNAT, snat_ip: None }
    }

    /// The same service in full NAT mode, sent from `source`.
    pub fn full_nat(self, source: Ipv6Addr) -> Self {
        Self { mode: MODE_FULL_NAT, snat_ip: Some(source), ..self }
    }

    pub fn key(&self) -> ServiceKey6 {
        ServiceKey6::new(self.vip, self.proto)
    }

    /// The backend a new flow from `client` must get, predicted without the
    /// kernel (the hash folded here from its parts, as lb-common defines it).
    pub fn pick(&self, client: SocketAddrV6) -> Option<(u32, SocketAddrV6)> {
        let (src, dst) = (fold_ip6(&ip6_raw(*client.ip())), fold_ip6(&ip6_raw(*self.vip.ip())));
        let hash = flow_hash(src, dst, client.port().to_be(), self.vip.port().to_be(), self.proto);
        let slot = (hash % MAGLEV_TABLE_SIZE) as usize;
        self.backends.get(slot % self.backends.len().max(1)).copied()
    }

    /// The connection-table key of a flow from `client`.
    pub fn flow_key(&self, client: SocketAddrV6) -> FlowKey6 {
        FlowKey6::new(
            ip6_raw(*client.ip()),
            client.port().to_be(),
            ip6_raw(*self.vip.ip()),
            self.vip.port().to_be(),
            self.proto,
        )
    }
}

impl LbObject {
    /// Writes an IPv6 service, its backends (and the service among those
    /// each backend address serves) and its live Maglev table.
    pub fn add_service6(&mut self, spec: &ServiceSpec6) -> Result<()> {
        for &(id, addr) in &spec.backends {
            let b = Backend { service_id: spec.id, flags: BACKEND_F_ACTIVE, ..Backend::default() };
            self.maps.backends.set(id, b, 0).with_context(|| format!("write backend {id}"))?;
            self.backend_ids.insert(id);
            let b6 = Backend6::with_source(addr, spec.snat_ip);
            self.maps.backends6.set(id, b6, 0).with_context(|| format!("write BACKENDS6[{id}]"))?;
            let key = b6.reply_key(spec.proto);
            let mut vips = match self.maps.backend_vips6.get(&key, 0) {
                Ok(v) => v,
                Err(MapError::KeyNotFound) => BackendVips6::default(),
                Err(e) => return Err(e).context("read BACKEND_VIPS6"),
            };
            let free = vips.vips.iter_mut().find(|k| k.port_be == 0).context("backend in too many services")?;
            *free = spec.key();
            self.maps.backend_vips6.insert(key, vips, 0).with_context(|| format!("write BACKEND_VIPS6 for {addr}"))?;
        }
        let ids: Vec<u32> = spec.backends.iter().map(|(id, _)| *id).collect();
        self.fill_maglev(spec.id, spec.table, &ids)?;
        let svc = Service {
            id: spec.id,
            table: spec.table,
            backend_count: ids.len() as u32,
            mode: spec.mode,
            flags: spec.flags,
            source_be: 0,
        };
        self.maps.services6.insert(spec.key(), svc, 0).with_context(|| format!("write service {}", spec.vip))
    }

    /// Rewrites `spec`'s service entry (after [`Self::add_service6`]) with
    /// `mode` and, in `SOURCES6`, `source` as its IPv6 source.
    pub fn write_service6(&mut self, spec: &ServiceSpec6, mode: u32, source: Ipv6Addr) -> Result<()> {
        self.maps.sources6.set(spec.id, ip6_raw(source), 0).with_context(|| format!("write SOURCES6[{}]", spec.id))?;
        let mut svc = self.maps.services6.get(&spec.key(), 0).context("read the service")?;
        svc.mode = mode;
        self.maps.services6.insert(spec.key(), svc, 0).with_context(|| format!("write service {}", spec.vip))
    }

    /// The IPv6 half of [`LbObject::reset`], before the backend ids are
    /// forgotten: services, backend addresses, flows, and the IPv6
    /// programs back in `V6_PROGS` (a test may have emptied it).
    pub(crate) fn reset6(&mut self) -> Result<()> {
        let m = &mut self.maps;
        empty_hash(&mut m.services6, "SERVICES6")?;
        empty_hash(&mut m.backend_vips6, "BACKEND_VIPS6")?;
        empty_hash(&mut m.conntrack6, "CONNTRACK6")?;
        for id in 0..lb_common::MAX_SERVICES {
            m.sources6.set(id, [0; 4], 0).with_context(|| format!("clear SOURCES6[{id}]"))?;
        }
        for &id in &self.backend_ids {
            m.backends6.set(id, Backend6::default(), 0).with_context(|| format!("clear BACKENDS6[{id}]"))?;
        }
        set_v6_programs(&self.ebpf, &mut m.v6_progs).context("refill V6_PROGS")
    }

    /// Empties `V6_PROGS`, as if loading the IPv6 programs had failed.
    pub fn clear_v6_programs(&mut self) -> Result<()> {
        (0..lb_common::v6::V6_PROGRAMS.len() as u32).try_for_each(|slot| self.clear_v6_program(slot))
    }

    /// Empties one slot of `V6_PROGS` (a `V6_SLOT_*`).
    pub fn clear_v6_program(&mut self, slot: u32) -> Result<()> {
        self.maps.v6_progs.clear_index(&slot).with_context(|| format!("clear V6_PROGS[{slot}]"))
    }

    /// Attaches the object's XDP program `prog` to `iface`, an interface of
    /// the calling thread's namespace, in generic (skb) mode, as the agent
    /// does on veth; it stays attached until the object drops.
    pub fn attach_generic(&mut self, prog: &str, iface: &str) -> Result<()> {
        let program: &mut aya::programs::Xdp = program_mut(&mut self.ebpf, prog)?;
        program.attach(iface, aya::programs::XdpMode::Skb).with_context(|| format!("attach {prog} to {iface}"))?;
        Ok(())
    }

    /// Every IPv6 connection-table entry.
    pub fn conntrack6(&self) -> Result<StdHashMap<FlowKey6, Conn6>> {
        self.maps.conntrack6.iter().map(|e| e.context("read CONNTRACK6")).collect()
    }

    /// Writes (or replaces) one IPv6 connection-table entry.
    pub fn insert_flow6(&mut self, key: &FlowKey6, conn: &Conn6) -> Result<()> {
        self.maps.conntrack6.insert(key, conn, 0).context("write CONNTRACK6")
    }

    /// IPv6 full NAT's claims: reply 5-tuple -> forward key.
    pub fn snat_claims6(&self) -> Result<StdHashMap<FlowKey6, FlowKey6>> {
        self.maps.snat_flows6.iter().map(|e| e.context("read SNAT_FLOWS6")).collect()
    }
}
