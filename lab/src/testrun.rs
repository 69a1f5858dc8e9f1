//! The data plane under BPF_PROG_TEST_RUN: load the object, write its maps
//! the way the agent would, run programs on frames, read the counters back.
//!
//! Errors are `anyhow` with context: everything here is test and benchmark
//! plumbing whose callers only report failures, never match on them.

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    net::{Ipv4Addr, SocketAddrV4},
    ops::{Deref, DerefMut},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{IterableMap as _, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{Program, ProgramError, SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp, XdpMode},
    util::nr_cpus,
    Ebpf, Pod,
};
use lb_agent::{
    adapters::dataplane::object::{load_object, load_program, program, take_map, Maps},
    config::DataplaneConfig,
};
use lb_common::{
    hash::flow_hash, maglev_index, Backend, BackendAddr, BackendVips, Conn, Counters, FlowKey, Path, Reason, Service,
    ServiceKey, SockOp, BACKEND_F_ACTIVE, MAGLEV_TABLE_SIZE, MAX_SERVICES, MODE_DNAT, MODE_FULL_NAT,
};

// XDP actions (`enum xdp_action` in uapi/linux/bpf.h).
pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
// tc verdicts (uapi/linux/pkt_cls.h), as BPF_PROG_TEST_RUN returns them.
pub const TC_ACT_UNSPEC: u32 = -1i32 as u32;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

/// `struct __sk_buff` (uapi/linux/bpf.h) as BPF_PROG_TEST_RUN's `ctx_in`:
/// its size, and the offsets of the two fields set.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_INGRESS_IFINDEX: usize = 36;
const SK_BUFF_IFINDEX: usize = 40;

/// What one BPF_PROG_TEST_RUN returned.
#[derive(Debug)]
pub struct Run {
    /// The program's return value, an `XDP_*` action (`TC_ACT_*` for tc).
    pub verdict: u32,
    /// The frame as the program left it.
    pub data: Vec<u8>,
    /// The kernel's own measurement: mean time per repeat.
    pub duration: Duration,
}

/// Runs `prog` on `data` `repeat` times (the kernel reuses the same buffer
/// for every repeat, without restoring it). Returns the raw `ProgramError`
/// so callers can tell the kernel's refusals (EINVAL) apart. The frame
/// arrives on the caller's namespace's loopback.
pub fn test_run(prog: &Xdp, data: &[u8], repeat: u32) -> Result<Run, ProgramError> {
    run_program(prog, data, repeat, None)
}

/// Runs `prog` once on `data` as if it arrived on `ingress_ifindex`, an
/// interface of the calling thread's network namespace: the program, and
/// its `bpf_fib_lookup`, see that device (`ctx->rxq->dev`).
pub fn test_run_from(prog: &Xdp, data: &[u8], ingress_ifindex: u32) -> Result<Run, ProgramError> {
    test_run_repeat_from(prog, data, 1, ingress_ifindex)
}

/// [`test_run_from`], `repeat` times (see [`test_run`]).
pub fn test_run_repeat_from(prog: &Xdp, data: &[u8], repeat: u32, ingress_ifindex: u32) -> Result<Run, ProgramError> {
    run_program(prog, data, repeat, Some(&xdp_md(data.len(), ingress_ifindex)))
}

/// A `struct xdp_md` (uapi/linux/bpf.h) for BPF_PROG_TEST_RUN's `ctx_in`,
/// which aya 0.14 takes as raw bytes (`TestRunOptions::ctx_in`; it has no
/// typed XDP context). The kernel accepts it since v5.15 ("bpf: Support
/// input xdp_md context in BPF_PROG_TEST_RUN") only as: data at
/// 0 and no metadata, data_end the frame's length, egress_ifindex 0, and an
/// ingress device of the caller's namespace (`xdp_convert_md_to_buff` in
/// net/bpf/test_run.c; ENODEV otherwise) with rx queue 0.
fn xdp_md(frame_len: usize, ingress_ifindex: u32) -> [u8; 24] {
    // data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let fields = [0, frame_len as u32, 0, ingress_ifindex, 0, 0];
    let mut md = [0u8; 24];
    for (chunk, v) in md.chunks_exact_mut(4).zip(fields) {
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    md
}

/// [`test_run`] for the tc program: the skb arrives on the namespace's
/// loopback (ifindex 1), as an XDP test run's frame does, so that flow
/// entries come out the same.
pub fn test_run_tc(prog: &SchedClassifier, data: &[u8], repeat: u32) -> Result<Run, ProgramError> {
    let mut ctx = [0u8; SK_BUFF_SIZE];
    ctx[SK_BUFF_INGRESS_IFINDEX..][..4].copy_from_slice(&1u32.to_ne_bytes());
    ctx[SK_BUFF_IFINDEX..][..4].copy_from_slice(&1u32.to_ne_bytes());
    run_program(prog, data, repeat, Some(&ctx))
}

fn run_program<P>(prog: &P, data: &[u8], repeat: u32, ctx_in: Option<&[u8]>) -> Result<Run, ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    // Room to spare: XDP may grow a frame, and with a short buffer the kernel
    // copies what fits and fails with ENOSPC.
    let mut out = vec![0u8; data.len() + 256];
    let result = prog.test_run(TestRunOptions {
        data_in: Some(data),
        data_out: Some(&mut out),
        ctx_in,
        repeat,
        ..TestRunOptions::new()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok(Run { verdict: result.return_value, data: out, duration: result.duration })
}

/// A service as the fixtures and the benchmark set it up.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub id: u32,
    pub vip: SocketAddrV4,
    pub proto: u8,
    /// The live Maglev table (0 or 1).
    pub table: u32,
    /// Backends written to `BACKENDS`, by id.
    pub backends: Vec<(u32, SocketAddrV4)>,
    /// What `Service::backend_count` says.
    pub backend_count: u32,
    /// Backend ids to fill the live table with, slot `i` getting
    /// `table_ids[i % len]`; empty leaves the table all zero ("no backend").
    pub table_ids: Vec<u32>,
    /// `Service::flags` (`SERVICE_F_*`).
    pub flags: u32,
    /// `Service::mode` (`MODE_DNAT` by default).
    pub mode: u32,
    /// Full NAT: every backend's source address (`Backend::snat_ip_be`).
    pub snat_ip: Option<Ipv4Addr>,
}

impl ServiceSpec {
    /// A consistent service: every backend active, in the table in turn.
    pub fn new(id: u32, vip: SocketAddrV4, proto: u8, table: u32, backends: &[(u32, SocketAddrV4)]) -> Self {
        Self {
            id,
            vip,
            proto,
            table,
            backends: backends.to_vec(),
            backend_count: backends.len() as u32,
            table_ids: backends.iter().map(|(id, _)| *id).collect(),
            flags: 0,
            mode: MODE_DNAT,
            snat_ip: None,
        }
    }

    /// The same service in full NAT mode, sent from `source`.
    pub fn full_nat(self, source: Ipv4Addr) -> Self {
        Self { mode: MODE_FULL_NAT, snat_ip: Some(source), ..self }
    }

    pub fn key(&self) -> ServiceKey {
        ServiceKey { vip_be: be_ip(self.vip), port_be: self.vip.port().to_be(), proto: self.proto, _pad: 0 }
    }

    /// The backend a new flow from `client` must get, predicted without the
    /// kernel: the flow hash picks slot `hash % MAGLEV_TABLE_SIZE`, which
    /// `LbObject::add_service` filled with `table_ids[slot % len]`. `None`
    /// when the table is empty or names an id that is not a backend.
    pub fn pick(&self, client: SocketAddrV4) -> Option<(u32, SocketAddrV4)> {
        let hash =
            flow_hash(be_ip(client), be_ip(self.vip), client.port().to_be(), self.vip.port().to_be(), self.proto);
        let slot = (hash % MAGLEV_TABLE_SIZE) as usize;
        let id = *self.table_ids.get(slot % self.table_ids.len().max(1))?;
        self.backends.iter().find(|(b, _)| *b == id).copied()
    }
}

/// An address in the `_be` convention of lb-common: packet byte order in memory.
pub fn be_ip(addr: SocketAddrV4) -> u32 {
    u32::from(*addr.ip()).to_be()
}

/// The connection table's size in [`LbObject::load`].
pub const FIXTURE_FLOWS: u32 = 1 << 16;

/// The loaded object and its map set, opened by the agent's own loader
/// (aya checks key and value sizes against lb-common there).
pub struct LbObject {
    /// Crate-visible for `testrun6`'s attach.
    pub(crate) ebpf: Ebpf,
    /// Crate-visible for `testrun6`'s IPv6 writers.
    pub(crate) maps: Maps,
    /// What `SETTINGS` was last told: each setter changes its own part.
    config: DataplaneConfig,
    /// Backend ids written to `BACKENDS`, for [`Self::reset`].
    pub(crate) backend_ids: BTreeSet<u32>,
    /// What each (service, table) Maglev table holds, for tables written
    /// with ids: [`Self::fill_maglev`] skips a table that holds them already.
    maglev_tables: StdHashMap<(u32, u32), Vec<u32>>,
}

/// Objects [`LbObject::shared`] handed out and got back: loading verifies
/// every program, which dominates a fixture's time (minutes in a VM under
/// emulation), so a test binary loads one per test thread, not per test.
static POOL: Mutex<Vec<LbObject>> = Mutex::new(Vec::new());

/// An [`LbObject`] from the pool; it goes back when dropped.
pub struct SharedLbObject(Option<LbObject>);

impl Deref for SharedLbObject {
    type Target = LbObject;
    fn deref(&self) -> &LbObject {
        self.0.as_ref().expect("held until dropped")
    }
}

impl DerefMut for SharedLbObject {
    fn deref_mut(&mut self) -> &mut LbObject {
        self.0.as_mut().expect("held until dropped")
    }
}

impl Drop for SharedLbObject {
    fn drop(&mut self) {
        // One whose ring buffer was taken cannot be made fresh again.
        if let Some(lb) = self.0.take().filter(|lb| lb.maps.wake_events.is_some()) {
            POOL.lock().unwrap_or_else(PoisonError::into_inner).push(lb);
        }
    }
}

impl LbObject {
    /// Loads the object lb-agent embeds and its `xdp_lb` and `xdp_lb_local`
    /// programs (verified, not attached), with a connection table of
    /// [`FIXTURE_FLOWS`]: the kernel preallocates an LRU table whole, and the
    /// default million entries (120 MiB) per load would dominate a fixture's
    /// time (most of all in a VM under emulation). [`Self::load_with`] takes
    /// the agent's default or any other size.
    pub fn load() -> Result<Self> {
        Self::load_with(&fixture_config())
    }

    /// What [`Self::load`] gives, taken from the pool and [`Self::reset`]
    /// when a test before returned one (else loaded): the same programs,
    /// verified once per thread instead of once per test.
    pub fn shared() -> Result<SharedLbObject> {
        let pooled = POOL.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let lb = match pooled {
            Some(mut lb) => {
                lb.reset().context("reset a pooled object")?;
                lb
            }
            None => Self::load()?,
        };
        Ok(SharedLbObject(Some(lb)))
    }

    /// Makes the object behave as freshly loaded by [`Self::load`]: every
    /// table, flow and claim removed, counters zero, settings back. Maglev
    /// tables stay (16 MiB; rewriting them is what a fixture costs after
    /// the verifier): the program reads a table only through a service in
    /// `SERVICES`, which is emptied, and [`Self::add_service`] writes its
    /// live table anew (or zero) unless it already holds the same ids.
    pub fn reset(&mut self) -> Result<()> {
        self.reset6()?;
        let m = &mut self.maps;
        empty_hash(&mut m.services, "SERVICES")?;
        empty_hash(&mut m.backend_vips, "BACKEND_VIPS")?;
        let keys: Vec<u32> = m.egress.keys().collect::<Result<_, _>>().context("walk EGRESS")?;
        remove_each(&keys, |k| m.egress.remove(*k), "EGRESS")?;
        let keys: Vec<u32> = m.path_stats.keys().collect::<Result<_, _>>().context("walk PATH_STATS")?;
        remove_each(&keys, |k| m.path_stats.remove(k), "PATH_STATS")?;
        empty_hash(&mut m.sock_revnat, "SOCK_REVNAT")?;
        empty_hash(&mut m.sock_revnat6, "SOCK_REVNAT6")?;
        self.clear_flows()?;
        self.clear_snat_claims()?;
        let m = &mut self.maps;
        // The program counts only backends it found in BACKENDS.
        for &id in &self.backend_ids {
            m.backends.set(id, Backend::default(), 0).with_context(|| format!("clear backend {id}"))?;
        }
        zero_per_cpu(&mut m.backend_stats, self.backend_ids.iter().copied(), "BACKEND_STATS")?;
        self.backend_ids.clear();
        zero_per_cpu(&mut m.service_stats, 0..MAX_SERVICES, "SERVICE_STATS")?;
        zero_per_cpu(&mut m.reason_stats, 0..Reason::COUNT, "REASON_STATS")?;
        zero_per_cpu(&mut m.sock_stats, 0..SockOp::ALL.len() as u32, "SOCK_STATS")?;
        zero_per_cpu(&mut m.wake_last, 0..MAX_SERVICES, "WAKE_LAST")?;
        zero_per_cpu(&mut m.flow_budget, 0..1, "FLOW_BUDGET")?;
        if let Some(ring) = m.wake_events.as_mut() {
            while ring.next().is_some() {}
        }
        self.config = fixture_config();
        self.maps.set_settings(&self.config).context("write SETTINGS")
    }

    /// Loads the benchmark's object: the same, plus `xdp_pass`, `xdp_bench`
    /// and the `BENCH_*` maps (for [`Self::take_map`]).
    /// Only the programs in `LB_PROGRAMS` are loaded.
    #[cfg(feature = "bench")]
    pub fn load_bench() -> Result<Self> {
        Self::load_object(lb_agent::ebpf::bench_object())
    }

    #[cfg_attr(not(feature = "bench"), allow(dead_code))]
    fn load_object(object: &[u8]) -> Result<Self> {
        Self::load_object_with(object, &DataplaneConfig::default())
    }

    /// [`Self::load`] with the agent's `[dataplane]` settings, e.g. a
    /// connection table of another size.
    pub fn load_with(config: &DataplaneConfig) -> Result<Self> {
        Self::load_object_with(lb_agent::ebpf::object(), config)
    }

    fn load_object_with(object: &[u8], config: &DataplaneConfig) -> Result<Self> {
        let (ebpf, maps) = load_object(object, None, config)?;
        Ok(Self { ebpf, maps, config: *config, backend_ids: BTreeSet::new(), maglev_tables: StdHashMap::new() })
    }

    /// Sets the non-SYN flow budget (`Settings::non_syn_flows_per_sec`).
    pub fn set_non_syn_flows_per_sec(&mut self, per_sec: u32) -> Result<()> {
        self.config.non_syn_flows_per_sec = per_sec;
        self.maps.set_settings(&self.config).context("write SETTINGS")
    }

    /// The `WAKE_EVENTS` ring buffer, to read what the program reported
    /// (once: the reader owns it).
    pub fn take_wake_events(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        self.maps.wake_events.take().context("WAKE_EVENTS was taken already")
    }

    /// Loads (verifies) another XDP program of the object, e.g. `xdp_pass`.
    pub fn load_program(&mut self, name: &str) -> Result<()> {
        load_program(&mut self.ebpf, name)
    }

    pub fn program(&self, name: &str) -> Result<&Xdp> {
        program(&self.ebpf, name)
    }

    /// Attaches the loaded XDP program `name` to `ifname` (in the calling
    /// thread's network namespace) in driver mode, for as long as this
    /// object lives. A veth takes frames its peer sends back by XDP_TX only
    /// while it runs an XDP program of its own (GRO is not enough there):
    /// `xdp_lb` with no service passes everything, so it serves as that.
    pub fn attach(&mut self, name: &str, ifname: &str) -> Result<()> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name} in the object"))?
            .try_into()
            .with_context(|| format!("{name} is not an XDP program"))?;
        prog.attach(ifname, XdpMode::Driver).with_context(|| format!("attach {name} to {ifname}"))?;
        Ok(())
    }

    /// Takes out a map [`Maps`] does not hold (the benchmark's) as the
    /// typed wrapper `M`.
    pub fn take_map<M>(&mut self, name: &str) -> Result<M>
    where
        M: TryFrom<Map, Error = MapError>,
    {
        take_map(&mut self.ebpf, name)
    }

    /// Runs a loaded program (XDP or tc) once on `frame`.
    pub fn run(&self, prog: &str, frame: &[u8]) -> Result<Run> {
        let run = match self.ebpf.program(prog) {
            Some(Program::SchedClassifier(tc)) => test_run_tc(tc, frame, 1),
            _ => test_run(self.program(prog)?, frame, 1),
        };
        run.with_context(|| format!("BPF_PROG_TEST_RUN {prog}"))
    }

    /// Runs a loaded program once on `frame`, arriving on `ingress_ifindex`
    /// (see [`test_run_from`]).
    pub fn run_from(&self, prog: &str, frame: &[u8], ingress_ifindex: u32) -> Result<Run> {
        test_run_from(self.program(prog)?, frame, ingress_ifindex)
            .with_context(|| format!("BPF_PROG_TEST_RUN {prog} from ifindex {ingress_ifindex}"))
    }

    /// Lets translated packets leave by `ifindex` on the fast path (`EGRESS`,
    /// as the agent's `set_fast_path` does); the device must be in the
    /// calling thread's namespace.
    pub fn allow_egress(&mut self, ifindex: u32) -> Result<()> {
        self.maps.egress.insert(ifindex, ifindex, None, 0).with_context(|| format!("put ifindex {ifindex} in EGRESS"))
    }

    /// `PATH_STATS[ingress_ifindex]`, summed over CPUs, by `Path`.
    pub fn paths(&self, ingress_ifindex: u32) -> Result<Vec<(Path, u64)>> {
        self.maps.path_counters(ingress_ifindex).with_context(|| format!("read the paths of ifindex {ingress_ifindex}"))
    }

    /// Writes a service, its backends (and the service among those each
    /// backend address serves) and its live Maglev table.
    pub fn add_service(&mut self, spec: &ServiceSpec) -> Result<()> {
        for &(id, addr) in &spec.backends {
            let b = Backend {
                ip_be: be_ip(addr),
                port_be: addr.port().to_be(),
                _pad: 0,
                service_id: spec.id,
                flags: BACKEND_F_ACTIVE,
                snat_ip_be: spec.snat_ip.map_or(0, |ip| u32::from(ip).to_be()),
                _pad2: 0,
            };
            self.maps.backends.set(id, b, 0).with_context(|| format!("write backend {id}"))?;
            self.backend_ids.insert(id);
            self.add_backend_vip(addr, spec.proto, spec.key())?;
        }
        self.fill_maglev(spec.id, spec.table, &spec.table_ids)?;
        self.write_service(spec, spec.mode, Ipv4Addr::UNSPECIFIED)
    }

    /// Writes `spec`'s `SERVICES` entry in forwarding `mode` (a `MODE_*`),
    /// with `source` as the outer source of `MODE_DSR_IPIP`.
    pub fn write_service(&mut self, spec: &ServiceSpec, mode: u32, source: Ipv4Addr) -> Result<()> {
        let svc = Service {
            id: spec.id,
            table: spec.table,
            backend_count: spec.backend_count,
            mode,
            flags: spec.flags,
            source_be: u32::from(source).to_be(),
        };
        self.maps.services.insert(spec.key(), svc, 0).with_context(|| format!("write service {}", spec.vip))
    }

    /// Adds `service` to the services the backend address serves
    /// (`BACKEND_VIPS`), as the agent's reconciler does.
    pub fn add_backend_vip(&mut self, addr: SocketAddrV4, proto: u8, service: ServiceKey) -> Result<()> {
        let key = BackendAddr { ip_be: be_ip(addr), port_be: addr.port().to_be(), proto, _pad: 0 };
        let mut vips = match self.maps.backend_vips.get(&key, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => BackendVips::default(),
            Err(e) => return Err(e).context("read BACKEND_VIPS"),
        };
        if !vips.vips.contains(&service) {
            let free = vips.vips.iter_mut().find(|k| k.vip_be == 0).context("backend address in too many services")?;
            *free = service;
        }
        self.maps.backend_vips.insert(key, vips, 0).with_context(|| format!("write BACKEND_VIPS for {addr}"))
    }

    /// Fills all `MAGLEV_TABLE_SIZE` slots of one table, slot `i` with
    /// `ids[i % len]`, or with 0 ("no backend") for an empty `ids`; writes
    /// nothing when the table holds that already.
    pub fn fill_maglev(&mut self, service_id: u32, table: u32, ids: &[u32]) -> Result<()> {
        let held = self.maglev_tables.get(&(service_id, table)).map_or(&[][..], Vec::as_slice);
        if held == ids {
            return Ok(());
        }
        for slot in 0..MAGLEV_TABLE_SIZE {
            let id = if ids.is_empty() { 0 } else { ids[(slot as usize) % ids.len()] };
            self.maps
                .maglev
                .set(maglev_index(service_id, table, slot), id, 0)
                .with_context(|| format!("write Maglev slot {slot} of service {service_id}"))?;
        }
        if ids.is_empty() {
            self.maglev_tables.remove(&(service_id, table));
        } else {
            self.maglev_tables.insert((service_id, table), ids.to_vec());
        }
        Ok(())
    }

    /// The backend id a flow with this hash finds in the table.
    pub fn maglev_pick(&self, service_id: u32, table: u32, hash: u32) -> Result<u32> {
        let index = maglev_index(service_id, table, hash);
        self.maps.maglev.get(&index, 0).with_context(|| format!("read Maglev slot {index}"))
    }

    /// `REASON_STATS`, summed over CPUs, indexed by `Reason as usize`.
    pub fn reasons(&self) -> Result<Vec<u64>> {
        Ok(self.maps.reason_counters()?.into_iter().map(|(_, n)| n).collect())
    }

    /// `BACKEND_STATS[id]`, summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        self.maps.backend_counters(id).with_context(|| format!("read counters of backend {id}"))
    }

    /// `SERVICE_STATS[id]`, summed over CPUs.
    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        self.maps.service_counters(id).with_context(|| format!("read counters of service {id}"))
    }

    /// The reasons, the counters of backends `0..backend_ids` and services
    /// `0..service_ids`, and the connection table.
    pub fn snapshot(&self, backend_ids: u32, service_ids: u32) -> Result<Snapshot> {
        Ok(Snapshot {
            reasons: self.reasons()?,
            backends: (0..backend_ids).map(|id| self.backend_counters(id)).collect::<Result<_>>()?,
            services: (0..service_ids).map(|id| self.service_counters(id)).collect::<Result<_>>()?,
            conntrack: self.conntrack()?.into_iter().map(|(k, c)| (k, Conn { last_seen_ns: 0, ..c })).collect(),
        })
    }

    /// The connection table's map id: an object reset and handed out again
    /// keeps it, a new one gets another.
    pub fn conntrack_map_id(&self) -> Result<u32> {
        Ok(self.maps.conntrack.map().info().context("read the connection table's info")?.id())
    }

    /// The connection table's size (its max_entries as loaded).
    pub fn conntrack_max_entries(&self) -> Result<u32> {
        Ok(self.maps.conntrack.map().info().context("read the connection table's info")?.max_entries())
    }

    /// How many entries the connection table holds (a walk of its keys).
    pub fn conntrack_len(&self) -> Result<u64> {
        let mut n = 0;
        for key in self.maps.conntrack.keys() {
            key.context("walk the connection table")?;
            n += 1;
        }
        Ok(n)
    }

    /// Writes a connection-table entry directly (the map API), as if the
    /// program had opened the flow.
    pub fn insert_flow(&mut self, key: &FlowKey, conn: &Conn) -> Result<()> {
        self.maps.conntrack.insert(key, conn, 0).context("insert into the connection table")
    }

    /// The kernel memory charged to the connection table (`memlock` in its
    /// fdinfo), in bytes.
    pub fn conntrack_memlock(&self) -> Result<u64> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = self.maps.conntrack.map().fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).context("read the map's fdinfo")?;
        let line = info.lines().find_map(|l| l.strip_prefix("memlock:")).context("no memlock in the map's fdinfo")?;
        line.trim().parse().context("parse memlock")
    }

    /// Every connection-table entry.
    pub fn conntrack(&self) -> Result<StdHashMap<FlowKey, Conn>> {
        self.maps.conntrack.iter().map(|e| e.context("read the connection table")).collect()
    }

    /// Full NAT's claims (`SNAT_FLOWS`): reply 5-tuple -> forward key.
    pub fn snat_claims(&self) -> Result<StdHashMap<FlowKey, FlowKey>> {
        self.maps.snat_flows.iter().map(|e| e.context("read SNAT_FLOWS")).collect()
    }

    /// Full NAT's source ports (`Settings::snat_port_min..=snat_port_max`).
    pub fn set_snat_ports(&mut self, min: u16, max: u16) -> Result<()> {
        (self.config.snat_port_min, self.config.snat_port_max) = (min, max);
        self.maps.set_settings(&self.config).context("write SETTINGS")
    }

    /// Deletes every full-NAT claim; returns how many there were.
    pub fn clear_snat_claims(&mut self) -> Result<u64> {
        Ok(empty_hash(&mut self.maps.snat_flows, "SNAT_FLOWS")?
            + empty_hash(&mut self.maps.snat_flows6, "SNAT_FLOWS6")?)
    }

    /// Deletes every connection-table entry.
    fn clear_flows(&mut self) -> Result<()> {
        empty_hash(&mut self.maps.conntrack, "CONNTRACK").map(drop)
    }
}

/// [`LbObject::load`]'s settings: the agent's but for a small connection table.
fn fixture_config() -> DataplaneConfig {
    DataplaneConfig { max_flows: FIXTURE_FLOWS, ..DataplaneConfig::default() }
}

/// Deletes `keys` (walked beforehand: deleting while walking a hash map
/// can skip entries) from map `name` with `remove`.
/// Deletes `keys`; one already gone is fine: between the walk and the
/// delete, the kernel drops an `EGRESS` (devmap) entry whose interface a
/// previous test's namespace took away, and an LRU map evicts.
fn remove_each<K>(keys: &[K], mut remove: impl FnMut(&K) -> Result<(), MapError>, name: &str) -> Result<()> {
    for k in keys {
        match remove(k) {
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
            done => done.with_context(|| format!("delete from {name}"))?,
        }
    }
    Ok(())
}

/// Deletes every entry of hash map `name`; returns how many there were.
pub(crate) fn empty_hash<K: Pod, V: Pod>(map: &mut aya::maps::HashMap<MapData, K, V>, name: &str) -> Result<u64> {
    let keys: Vec<K> = map.keys().collect::<Result<_, _>>().with_context(|| format!("walk {name}"))?;
    remove_each(&keys, |k| map.remove(k), name)?;
    Ok(keys.len() as u64)
}

/// Sets entries `indices` of a per-CPU array to the default on every CPU.
fn zero_per_cpu<T: Pod + Default>(
    array: &mut PerCpuArray<MapData, T>,
    indices: impl IntoIterator<Item = u32>,
    name: &str,
) -> Result<()> {
    let cpus = nr_cpus().map_err(|(_, e)| e).context("count the possible CPUs")?;
    for i in indices {
        let zero = PerCpuValues::try_from((0..cpus).map(|_| T::default()).collect::<Vec<_>>())
            .with_context(|| format!("per-CPU values for {name}"))?;
        array.set(i, zero, 0).with_context(|| format!("zero {name}[{i}]"))?;
    }
    Ok(())
}

/// Counters and connection table as tests compare them, read by
/// [`LbObject::snapshot`].
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub reasons: Vec<u64>,
    pub backends: Vec<Counters>,
    pub services: Vec<Counters>,
    /// Every entry, its `last_seen_ns` zeroed (a clock, not a result).
    pub conntrack: StdHashMap<FlowKey, Conn>,
}

/// Fails unless `reasons_after - reasons_before` is exactly `count` for
/// `reason` and zero for every other reason.
pub fn check_reason_delta(before: &[u64], after: &[u64], reason: Reason, count: u64) -> Result<()> {
    let moved: Vec<String> = Reason::ALL
        .iter()
        .filter_map(|r| {
            let delta = after[*r as usize] - before[*r as usize];
            let want = if *r == reason { count } else { 0 };
            (delta != want).then(|| format!("{}: +{delta} (want +{want})", r.name()))
        })
        .collect();
    if !moved.is_empty() {
        bail!("REASON_STATS moved unexpectedly: {}", moved.join(", "));
    }
    Ok(())
}

/// `after - before`, field by field.
pub fn counters_delta(before: &Counters, after: &Counters) -> Counters {
    Counters {
        packets: after.packets - before.packets,
        bytes: after.bytes - before.bytes,
        new_flows: after.new_flows - before.new_flows,
        reply_packets: after.reply_packets - before.reply_packets,
        reply_bytes: after.reply_bytes - before.reply_bytes,
        closed_flows: after.closed_flows - before.closed_flows,
    }
}
