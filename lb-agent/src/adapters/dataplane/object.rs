//! The lb-ebpf object in the kernel: the one place that loads it and opens
//! its maps, for the agent and for the lab's BPF_PROG_TEST_RUN loader alike.
//! An ABI change edits [`Maps`] and nothing else here.

use std::path::Path;

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{Array, DevMapHash, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
    programs::{CgroupSockAddr, Program, Xdp},
    Ebpf, EbpfLoader,
};
use lb_common::{
    v6::{
        Backend6, BackendAddr6, BackendVips6, Conn6, FlowKey6, Ip6, ServiceKey6, SockRevKey6, BACKENDS6, BACKEND_VIPS6,
        CONNTRACK6, SERVICES6, SNAT_FLOWS6, SOCK_REVNAT6, SOURCES6, V6_PROGRAMS, V6_PROGS,
    },
    Backend, BackendAddr, BackendVips, Conn, Counters, FlowKey, PathCounters, Reason, Service, ServiceKey, SockOp,
    SockRevKey, BACKENDS, BACKEND_STATS, BACKEND_VIPS, CONNTRACK, EGRESS, FLOW_BUDGET, LB_PROGRAMS, MAGLEV, PATH_STATS,
    REASON_STATS, SERVICES, SERVICE_STATS, SETTINGS, SNAT_FLOWS, SOCK_PROGRAMS, SOCK_REVNAT, SOCK_STATS, WAKE_EVENTS,
    WAKE_LAST,
};

use crate::{config::DataplaneConfig, ports::DataplaneError};

/// Every map of the object, each opened by its lb-common name as the typed
/// wrapper whose key and value sizes aya checks against the object (so a
/// mismatch fails at load, not once per packet).
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, Service>,
    pub backends: Array<MapData, Backend>,
    pub maglev: Array<MapData, u32>,
    pub conntrack: HashMap<MapData, FlowKey, Conn>,
    /// Backend address -> the services it serves, to match its replies.
    pub backend_vips: HashMap<MapData, BackendAddr, BackendVips>,
    /// What the program is told at load (`lb_common::Settings`).
    pub settings: Array<MapData, lb_common::Settings>,
    /// Per CPU: non-SYN flows started this second.
    pub flow_budget: PerCpuArray<MapData, lb_common::FlowBudget>,
    pub service_stats: PerCpuArray<MapData, Counters>,
    pub backend_stats: PerCpuArray<MapData, Counters>,
    pub reason_stats: PerCpuArray<MapData, u64>,
    /// The interfaces translated packets may leave by directly (the fast path).
    pub egress: DevMapHash<MapData>,
    /// How packets left, per ingress interface.
    pub path_stats: PerCpuHashMap<MapData, u32, PathCounters>,
    /// Socket load balancing: (socket, backend) -> the service asked for.
    pub sock_revnat: HashMap<MapData, SockRevKey, ServiceKey>,
    /// The same for IPv6 services.
    pub sock_revnat6: HashMap<MapData, SockRevKey6, ServiceKey6>,
    /// What the socket programs did, per `SockOp`.
    pub sock_stats: PerCpuArray<MapData, u64>,
    /// Services that scale from zero with a client waiting (`WakeEvent`s);
    /// `None` once taken by the reader (`take_wake_events`).
    pub wake_events: Option<RingBuf<MapData>>,
    /// Per CPU and service: the last wake report's time (the rate limit).
    pub wake_last: PerCpuArray<MapData, u64>,
    /// Full NAT's claimed ports: reply 5-tuple -> the flow's forward key.
    pub snat_flows: HashMap<MapData, FlowKey, FlowKey>,
    /// IPv6 (see `lb_common::v6`): services, backend addresses by id,
    /// flows, and the services each backend address serves.
    pub services6: HashMap<MapData, ServiceKey6, Service>,
    pub backends6: Array<MapData, Backend6>,
    pub conntrack6: HashMap<MapData, FlowKey6, Conn6>,
    pub backend_vips6: HashMap<MapData, BackendAddr6, BackendVips6>,
    /// An IPv6 service's source by service id (`dsr-ipip`).
    pub sources6: Array<MapData, Ip6>,
    /// Full NAT's claimed ports over IPv6: reply 5-tuple -> forward key.
    pub snat_flows6: HashMap<MapData, FlowKey6, FlowKey6>,
    /// The IPv6 programs the IPv4 entry points tail-call (and `xdp_lb6`
    /// its full-NAT programs). Pinned like the
    /// rest, so the programs a previous agent left keep their IPv6 path
    /// until the new ones take over; every load puts its own programs in.
    pub v6_progs: ProgramArray<MapData>,
}

impl Maps {
    /// The names of the maps above: every map of the agent's object (the
    /// benchmark's live in an object of their own), all that pinning keeps.
    pub const NAMES: [&str; 25] = [
        SERVICES,
        BACKENDS,
        MAGLEV,
        CONNTRACK,
        BACKEND_VIPS,
        SETTINGS,
        FLOW_BUDGET,
        SERVICE_STATS,
        BACKEND_STATS,
        REASON_STATS,
        EGRESS,
        PATH_STATS,
        SOCK_REVNAT,
        SOCK_REVNAT6,
        SOCK_STATS,
        WAKE_EVENTS,
        WAKE_LAST,
        SNAT_FLOWS,
        SERVICES6,
        BACKENDS6,
        CONNTRACK6,
        BACKEND_VIPS6,
        V6_PROGS,
        SOURCES6,
        SNAT_FLOWS6,
    ];

    /// The maps sized by `[dataplane] max_flows` at load.
    pub const SIZED_BY_MAX_FLOWS: [&str; 4] = [CONNTRACK, SNAT_FLOWS, CONNTRACK6, SNAT_FLOWS6];

    /// Takes every map out of `ebpf`.
    pub fn open(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            services: take_map(ebpf, SERVICES)?,
            backends: take_map(ebpf, BACKENDS)?,
            maglev: take_map(ebpf, MAGLEV)?,
            conntrack: take_map(ebpf, CONNTRACK)?,
            backend_vips: take_map(ebpf, BACKEND_VIPS)?,
            settings: take_map(ebpf, SETTINGS)?,
            flow_budget: take_map(ebpf, FLOW_BUDGET)?,
            service_stats: take_map(ebpf, SERVICE_STATS)?,
            backend_stats: take_map(ebpf, BACKEND_STATS)?,
            reason_stats: take_map(ebpf, REASON_STATS)?,
            egress: take_map(ebpf, EGRESS)?,
            path_stats: take_map(ebpf, PATH_STATS)?,
            sock_revnat: take_map(ebpf, SOCK_REVNAT)?,
            sock_revnat6: take_map(ebpf, SOCK_REVNAT6)?,
            sock_stats: take_map(ebpf, SOCK_STATS)?,
            wake_events: Some(take_map(ebpf, WAKE_EVENTS)?),
            wake_last: take_map(ebpf, WAKE_LAST)?,
            snat_flows: take_map(ebpf, SNAT_FLOWS)?,
            services6: take_map(ebpf, SERVICES6)?,
            backends6: take_map(ebpf, BACKENDS6)?,
            conntrack6: take_map(ebpf, CONNTRACK6)?,
            backend_vips6: take_map(ebpf, BACKEND_VIPS6)?,
            v6_progs: take_map(ebpf, V6_PROGS)?,
            sources6: take_map(ebpf, SOURCES6)?,
            snat_flows6: take_map(ebpf, SNAT_FLOWS6)?,
        })
    }

    /// Tells the program `config`'s settings.
    pub fn set_settings(&mut self, config: &DataplaneConfig) -> Result<(), DataplaneError> {
        let settings = lb_common::Settings {
            non_syn_flows_per_sec: config.non_syn_flows_per_sec,
            snat_port_min: config.snat_port_min,
            snat_port_max: config.snat_port_max,
        };
        self.settings.set(0, settings, 0).map_err(map_err(SETTINGS, "write"))
    }

    /// `SERVICE_STATS[id]`, summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        sum_counters(&self.service_stats, id, SERVICE_STATS)
    }

    /// `BACKEND_STATS[id]`, summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        sum_counters(&self.backend_stats, id, BACKEND_STATS)
    }

    /// Packets per `Path` that arrived on `ifindex`, summed over CPUs, in
    /// `lb_common::Path::ALL` order (all zero before the first one).
    pub fn path_counters(&self, ifindex: u32) -> Result<Vec<(lb_common::Path, u64)>, DataplaneError> {
        let mut total = PathCounters::default();
        match self.path_stats.get(&ifindex, 0) {
            Ok(per_cpu) => per_cpu.iter().for_each(|c| total.add(c)),
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(PATH_STATS, "read")(e)),
        }
        Ok(lb_common::Path::ALL.iter().map(|p| (*p, total.packets[*p as usize])).collect())
    }

    /// Packets per reason, summed over CPUs, in `Reason::ALL` order.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        sum_each(&self.reason_stats, REASON_STATS, Reason::ALL.map(|r| (r, r as u32)))
    }

    /// What the socket programs did, summed over CPUs, in `SockOp::ALL` order.
    pub fn sock_counters(&self) -> Result<Vec<(SockOp, u64)>, DataplaneError> {
        sum_each(&self.sock_stats, SOCK_STATS, SockOp::ALL.map(|op| (op, op as u32)))
    }
}

/// Loads `object` and opens its [`Maps`]; verifies the programs in
/// `LB_PROGRAMS`, `SOCK_PROGRAMS` and `V6_PROGRAMS` (the object's other
/// programs, if any, stay unloaded) and puts the IPv6 ones in `V6_PROGS`.
/// With `map_pins`, each map is pinned at `<map_pins>/<name>`, or adopted
/// from there when a previous load left it. The connection table gets
/// `config.max_flows` entries (and full NAT's claims as many), and the
/// program `config`'s settings.
pub fn load_object(object: &[u8], map_pins: Option<&Path>, config: &DataplaneConfig) -> anyhow::Result<(Ebpf, Maps)> {
    let mut loader = EbpfLoader::new();
    // One claim per flow at most (SNAT_FLOWS, SNAT_FLOWS6).
    for name in Maps::SIZED_BY_MAX_FLOWS {
        loader.map_max_entries(name, config.max_flows);
    }
    if let Some(dir) = map_pins {
        for name in Maps::NAMES {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    let mut ebpf = loader.load(object).context("load the lb-ebpf object")?;
    for name in LB_PROGRAMS {
        load_program(&mut ebpf, name)?;
    }
    for name in SOCK_PROGRAMS {
        sock_program_mut(&mut ebpf, name)?.load().with_context(|| format!("load {name} into the kernel (verifier)"))?;
    }
    for name in V6_PROGRAMS {
        load_program(&mut ebpf, name)?;
    }
    let mut maps = Maps::open(&mut ebpf)?;
    maps.set_settings(config)?;
    set_v6_programs(&ebpf, &mut maps.v6_progs)?;
    Ok((ebpf, maps))
}

/// Puts this object's IPv6 programs in `V6_PROGS` (slot `i` for
/// `V6_PROGRAMS[i]`), replacing those of a previous agent whose array was
/// adopted: from here on its IPv4 entry points, attached or not yet, reach
/// these.
pub fn set_v6_programs(ebpf: &Ebpf, slots: &mut ProgramArray<MapData>) -> anyhow::Result<()> {
    for (slot, name) in V6_PROGRAMS.iter().enumerate() {
        let fd = program::<Xdp>(ebpf, name)?.fd().with_context(|| format!("{name} is not loaded"))?;
        slots.set(slot as u32, fd, 0).with_context(|| format!("put {name} in {V6_PROGS}[{slot}]"))?;
    }
    Ok(())
}

/// Loads (verifies) the object's program `name` (XDP or tc).
pub fn load_program(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let program = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?;
    let loaded = match program {
        Program::Xdp(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        _ => return Err(anyhow!("{name} is neither an XDP nor a tc program")),
    };
    loaded.with_context(|| format!("load {name} into the kernel (verifier)"))
}

/// The object's program `name`, as its kind `P` (`Xdp`, `SchedClassifier`).
pub fn program<'a, P>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<&'a P>
where
    &'a P: TryFrom<&'a Program>,
{
    let program = ebpf.program(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?;
    program.try_into().map_err(|_| anyhow!("{name} is not a {} program", std::any::type_name::<P>()))
}

/// The object's program `name`, as its kind `P`, to load or attach.
pub fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut Program>,
{
    let program = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?;
    program.try_into().map_err(|_| anyhow!("{name} is not a {} program", std::any::type_name::<P>()))
}

/// The object's socket-address program `name` (one of `SOCK_PROGRAMS`).
pub fn sock_program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut CgroupSockAddr> {
    let program = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?;
    program.try_into().with_context(|| format!("{name} is not a cgroup socket-address program"))
}

/// Takes the map `name` out of `ebpf` as the typed wrapper `M`.
pub fn take_map<M>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<M>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing from the object"))?;
    M::try_from(map).with_context(|| format!("open map {name} (type or key/value size differs from lb-common)"))
}

pub(super) fn map_err<E: std::error::Error + Send + Sync + 'static>(
    map: &'static str,
    op: &'static str,
) -> impl FnOnce(E) -> DataplaneError {
    move |e| DataplaneError::Map { map, op, source: Box::new(e) }
}

/// Each `(label, index)` of a per-CPU `u64` array, summed over CPUs.
fn sum_each<L, const N: usize>(
    map: &PerCpuArray<MapData, u64>,
    name: &'static str,
    slots: [(L, u32); N],
) -> Result<Vec<(L, u64)>, DataplaneError> {
    slots
        .into_iter()
        .map(|(label, index)| {
            let v = map.get(&index, 0).map_err(map_err(name, "read"))?;
            Ok((label, v.iter().sum()))
        })
        .collect()
}

fn sum_counters(map: &PerCpuArray<MapData, Counters>, id: u32, name: &'static str) -> Result<Counters, DataplaneError> {
    let values = map.get(&id, 0).map_err(map_err(name, "read"))?;
    let mut total = Counters::default();
    for v in values.iter() {
        total.add(v);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The programs and maps aya finds in an object, without loading it
    /// (no kernel, no root). Section maps (`.rodata`, `.bss`) are left out.
    fn contents(object: &[u8]) -> (BTreeSet<String>, BTreeSet<String>) {
        let obj = aya_obj::Object::parse(object).expect("parse the lb-ebpf object");
        let maps = obj.maps.keys().filter(|n| !n.starts_with('.')).cloned().collect();
        (obj.programs.keys().cloned().collect(), maps)
    }

    fn names(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// The maps of the load balancer's programs: the agent's, and the
    /// program's scratch space, which is its own (neither opened nor pinned).
    fn lb_maps() -> BTreeSet<String> {
        let mut maps = names(&Maps::NAMES);
        maps.extend(names(&[lb_common::SCRATCH]));
        maps
    }

    #[test]
    fn the_agents_object_has_the_lb_programs_and_maps_only() {
        let (programs, maps) = contents(crate::ebpf::object());
        let mut want = names(&LB_PROGRAMS);
        want.extend(names(&SOCK_PROGRAMS));
        want.extend(names(&V6_PROGRAMS));
        // The backend's decapsulation, for `backend-setup --bpf-decap`.
        want.extend(names(&[lb_common::PROG_TC_DECAP]));
        assert_eq!(programs, want, "no benchmark program may ship in the agent's object");
        assert_eq!(maps, lb_maps(), "no benchmark map may ship in the agent's object");
    }

    #[cfg(feature = "bench")]
    #[test]
    fn the_bench_object_adds_the_bench_programs_and_maps() {
        let (programs, maps) = contents(crate::ebpf::bench_object());
        let mut want = names(&LB_PROGRAMS);
        want.extend(names(&SOCK_PROGRAMS));
        want.extend(names(&V6_PROGRAMS));
        want.extend(names(&[lb_common::PROG_PASS, lb_common::PROG_BENCH, lb_common::PROG_TC_DECAP]));
        assert_eq!(programs, want);
        let extra: BTreeSet<String> = maps.difference(&lb_maps()).cloned().collect();
        assert!(extra.contains(lb_common::BENCH_FRAME) && extra.contains(lb_common::BENCH_TARGET), "{extra:?}");
        assert!(extra.iter().all(|m| m.starts_with("BENCH_")), "{extra:?}");
    }
}
