//! The real data plane: the lb-ebpf object loaded with aya, attached to
//! interfaces, and its maps held open for writes and counter reads.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        Xdp, XdpMode,
    },
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use lb_common::{
    maglev_index, Backend, Conn, Counters, FlowKey, Reason, Service, ServiceKey, ABI_VERSION, BACKENDS, BACKEND_STATS,
    CONNTRACK, DIR_FORWARD, LB_PROGRAMS, MAGLEV, MAGLEV_TABLE_SIZE, MAX_BACKENDS, PROTO_UDP, REASON_STATS, SERVICES,
    SERVICE_STATS,
};
use tracing::{info, warn};

use crate::{
    config::ChecksumMode,
    ports::{AttachMode, ConntrackScan, Dataplane, DataplaneError, L4Checksums, PinnedState},
};

/// The program for an interface's `checksums` setting: `auto` asks the
/// interface's driver.
pub fn checksums_for(mode: ChecksumMode, iface: &str) -> anyhow::Result<L4Checksums> {
    Ok(match mode {
        ChecksumMode::Complete => L4Checksums::Complete,
        ChecksumMode::MayBePartial => L4Checksums::MayBePartial,
        // No driver to ask (loopback, say): nothing local sends there.
        ChecksumMode::Auto => interface_driver(iface)?.map_or(L4Checksums::Complete, |d| L4Checksums::for_driver(&d)),
    })
}

/// The driver name of a network interface (`ethtool -i`): "veth", "bridge",
/// "ixgbe", ...; `None` for a device that does not say (loopback).
pub fn interface_driver(iface: &str) -> anyhow::Result<Option<String>> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    if iface.is_empty() || iface.len() >= libc::IFNAMSIZ {
        bail!("{iface:?} is not an interface name");
    }
    // SAFETY: plain syscalls on a socket we own; `info` outlives the ioctl
    // and is the struct SIOCETHTOOL/ETHTOOL_GDRVINFO fills.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket for SIOCETHTOOL");
        }
        let mut info: DrvInfo = std::mem::zeroed();
        info.cmd = ETHTOOL_GDRVINFO;
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, b) in req.ifr_name.iter_mut().zip(iface.bytes()) {
            *d = b as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
        let rc = libc::ioctl(fd, libc::SIOCETHTOOL as _, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
                return Ok(None);
            }
            return Err(err).with_context(|| format!("read the driver of {iface} (SIOCETHTOOL)"));
        }
        let end = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
        Ok(Some(String::from_utf8_lossy(&info.driver[..end]).into_owned()))
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
    links: BTreeMap<String, Attached>,
    /// `<pin dir>/v<ABI_VERSION>` when maps and links are pinned.
    pins: Option<PathBuf>,
    /// The maps came from a previous agent's pins.
    adopted: bool,
    /// Set by `keep_on_drop`.
    keep: bool,
    ebpf: Ebpf,
}

/// Our XDP attachment to one interface: a bpf_link, pinned when pinning is on.
struct Attached {
    link: FdLink,
    mode: AttachMode,
    l4: L4Checksums,
    pin: Option<PathBuf>,
}

/// Maps kept in bpffs across agent restarts (all of them but the benchmark's).
const PINNED_MAPS: [&str; 7] = [SERVICES, BACKENDS, MAGLEV, CONNTRACK, SERVICE_STATS, BACKEND_STATS, REASON_STATS];
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn map_err<E: std::error::Error + Send + Sync + 'static>(
    map: &'static str,
    op: &'static str,
) -> impl FnOnce(E) -> DataplaneError {
    move |e| DataplaneError::Map { map, op, source: Box::new(e) }
}

impl AyaDataplane {
    /// Load the object and open its maps. Nothing is attached yet. With a
    /// pin directory, maps a previous agent pinned there are adopted (flows,
    /// tables and counters carry on) and new ones are pinned.
    pub fn load(pin_dir: Option<&Path>) -> anyhow::Result<Self> {
        let pins = pin_dir.map(prepare_pin_dir).transpose()?;
        let adopted = pins.as_ref().is_some_and(|p| p.join("maps").join(SERVICES).exists());
        let mut loader = EbpfLoader::new();
        if let Some(p) = &pins {
            for name in PINNED_MAPS {
                loader.map_pin_path(name, p.join("maps").join(name));
            }
        }
        let mut ebpf = loader.load(crate::ebpf::object()).context("load the lb-ebpf object")?;
        for name in LB_PROGRAMS {
            let program: &mut Xdp =
                ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?.try_into()?;
            program.load().with_context(|| format!("load {name} into the kernel (verifier)"))?;
        }
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
            pins,
            adopted,
            keep: false,
            ebpf,
        })
    }

    /// Whether the maps were adopted from a previous agent's pins.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Read back what the adopted maps hold, to pick up where the previous
    /// agent left off (same ids, same tables).
    pub fn read_pinned_state(&self) -> anyhow::Result<PinnedState> {
        let services: Vec<(ServiceKey, Service)> = self.services.iter().collect::<Result<_, _>>()?;
        let mut backends = Vec::new();
        for id in 1..MAX_BACKENDS {
            let b = self.backends.get(&id, 0)?;
            if b.flags != 0 {
                backends.push((id, b));
            }
        }
        let mut tables = BTreeMap::new();
        for (_, svc) in &services {
            let mut halves = [Vec::new(), Vec::new()];
            for (half, out) in halves.iter_mut().enumerate() {
                *out = (0..MAGLEV_TABLE_SIZE)
                    .map(|slot| self.maglev.get(&maglev_index(svc.id, half as u32, slot), 0))
                    .collect::<Result<_, _>>()?;
            }
            tables.insert(svc.id, halves);
        }
        Ok(PinnedState { services, backends, tables })
    }

    fn program(&mut self, l4: L4Checksums) -> anyhow::Result<&mut Xdp> {
        let name = l4.program();
        Ok(self.ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing"))?.try_into()?)
    }

    /// Swap the program on an existing link (bpf_link_update): no moment
    /// without a program on the interface.
    fn switch_link(&mut self, link: FdLink, l4: L4Checksums, iface: &str) -> anyhow::Result<FdLink> {
        let xdp_link = XdpLink::try_from(link).context("the link is not an XDP link")?;
        let program = self.program(l4)?;
        let id = program.attach_to_link(xdp_link).with_context(|| format!("switch the XDP program on {iface}"))?;
        Ok(FdLink::try_from(program.take_link(id)?)?)
    }

    fn link_pin(&self, iface: &str, mode: AttachMode) -> Option<PathBuf> {
        self.pins.as_ref().map(|p| p.join("links").join(link_pin_name(iface, mode)))
    }

    /// Attach to `iface`: native XDP where the driver has it, generic
    /// otherwise. A link a previous agent pinned for it is taken over and
    /// switched to this program atomically (bpf_link_update), so traffic
    /// never sees an interface without the program. Never replaces a program
    /// someone else attached: the kernel refuses a second one (EBUSY).
    ///
    /// `checksums` picks the program (see [`L4Checksums`]); an interface
    /// already attached with the other one is switched over in place.
    pub fn attach(&mut self, iface: &str, checksums: ChecksumMode) -> anyhow::Result<AttachMode> {
        let l4 = checksums_for(checksums, iface)?;
        if let Some(a) = self.links.get(iface).filter(|a| a.l4 == l4) {
            return Ok(a.mode);
        }
        if let Some(Attached { link, mode, l4: old, pin }) = self.links.remove(iface) {
            // Between two loaded programs of one object, bpf_link_update
            // fails only when the link itself is gone (interface removed).
            let link = self.switch_link(link, l4, iface)?;
            info!(interface = iface, from = %old, checksums = %l4, "switched program");
            self.links.insert(iface.to_owned(), Attached { link, mode, l4, pin });
            return Ok(mode);
        }
        for mode in [AttachMode::Driver, AttachMode::Generic] {
            let Some(pin) = self.link_pin(iface, mode).filter(|p| p.exists()) else { continue };
            let pinned = PinnedLink::from_pin(&pin).with_context(|| format!("open pinned link {}", pin.display()))?;
            let link = self
                .switch_link(FdLink::from(pinned), l4, iface)
                .with_context(|| format!("take over the pinned link {}", pin.display()))?;
            info!(interface = iface, mode = %mode, checksums = %l4, "adopted pinned XDP link");
            self.links.insert(iface.to_owned(), Attached { link, mode, l4, pin: Some(pin) });
            return Ok(mode);
        }
        let program = self.program(l4)?;
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
        let link = FdLink::try_from(program.take_link(id)?)
            .context("the kernel attached XDP without a bpf_link (kernel older than 5.9?)")?;
        let (link, pin) = match self.link_pin(iface, mode) {
            Some(path) => {
                let pinned = link.pin(&path).with_context(|| format!("pin the XDP link at {}", path.display()))?;
                (FdLink::from(pinned), Some(path))
            }
            None => (link, None),
        };
        info!(interface = iface, mode = %mode, checksums = %l4, "attached");
        self.links.insert(iface.to_owned(), Attached { link, mode, l4, pin });
        Ok(mode)
    }

    /// Detach from `iface`: close our link and remove its pin.
    pub fn detach(&mut self, iface: &str) -> anyhow::Result<()> {
        let Some(a) = self.links.remove(iface) else { return Ok(()) };
        if let Some(pin) = &a.pin {
            std::fs::remove_file(pin).with_context(|| format!("unpin {}", pin.display()))?;
        }
        drop(a.link);
        info!(interface = iface, "detached");
        Ok(())
    }

    /// Pinned links of interfaces this agent has not (yet) attached to.
    pub fn stale_link_pins(&self) -> Vec<PathBuf> {
        let Some(dir) = self.pins.as_ref().map(|p| p.join("links")) else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| !self.links.values().any(|a| a.pin.as_deref() == Some(p.as_path())))
            .collect()
    }

    /// Interfaces we are attached to, with their mode and program.
    pub fn attachments(&self) -> impl Iterator<Item = (&str, AttachMode, L4Checksums)> {
        self.links.iter().map(|(k, a)| (k.as_str(), a.mode, a.l4))
    }

    /// Detach from every interface and remove every pin: the data plane is
    /// gone. (Dropping without this leaves pinned state serving traffic.)
    pub fn remove_all(&mut self) {
        let ifaces: Vec<String> = self.links.keys().cloned().collect();
        for iface in ifaces {
            if let Err(e) = self.detach(&iface) {
                warn!(error = %e, interface = iface, "detach failed");
            }
        }
        if let Some(p) = self.pins.take() {
            for stale in std::fs::read_dir(p.join("links")).into_iter().flatten().filter_map(Result::ok) {
                let _ = std::fs::remove_file(stale.path());
            }
            if let Err(e) = remove_pins(&p) {
                warn!(error = format!("{e:#}"), "removing pinned maps failed");
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
            self.conntrack.iter().filter_map(Result::ok).filter(|(_, c)| c.backend_id == backend_id).collect();
        let mut open = 0;
        for (k, c) in &entries {
            // Already gone (LRU eviction) is fine.
            if self.conntrack.remove(k).is_ok() && k.dir == DIR_FORWARD && is_open(k, c, now) {
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
    /// A fresh data plane that is dropped (start-up failed) leaves nothing
    /// behind. Adopted state is left serving: a failed restart must not take
    /// down what the previous agent set up. Normal shutdown calls
    /// `remove_all` or, to hand over to the next agent, nothing.
    fn drop(&mut self) {
        if !self.adopted && self.pins.is_some() && !self.keep {
            self.remove_all();
        }
    }
}

impl AyaDataplane {
    /// Leave pins in place on drop, for the next agent to adopt.
    pub fn keep_on_drop(&mut self) {
        self.keep = true;
    }
}

/// The pin file name of an interface's link: `<mode>-<interface>`, with
/// every byte outside [A-Za-z0-9-] written as `_XX`, because bpffs refuses
/// names with a dot (and interface names such as `eth0.100` have them).
fn link_pin_name(iface: &str, mode: AttachMode) -> String {
    let mut name = format!("{mode}-");
    for b in iface.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            name.push(b as char);
        } else {
            name.push_str(&format!("_{b:02x}"));
        }
    }
    name
}

/// Create `<dir>/v<ABI>` (mounting bpffs on `dir`'s parent if it is not on
/// one) and refuse state of another ABI version.
fn prepare_pin_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.file_name().is_some_and(|n| n.as_encoded_bytes().contains(&b'.')) {
        bail!("pin directory {}: bpffs does not allow a dot in a name", dir.display());
    }
    let mount_point = dir.parent().ok_or_else(|| anyhow!("pin directory {} has no parent", dir.display()))?;
    std::fs::create_dir_all(mount_point).with_context(|| format!("create {}", mount_point.display()))?;
    if fs_magic(mount_point)? != BPF_FS_MAGIC {
        mount_bpffs(mount_point)?;
        info!(path = %mount_point.display(), "mounted a bpf filesystem");
    }
    if !same_mount_namespace_as_init() {
        warn!("running in a private mount namespace: pins will not outlive it (use nsenter --net, not ip netns exec, for restarts to be hitless)");
    }
    let versioned = dir.join(format!("v{ABI_VERSION}"));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if e.path() != versioned {
                bail!(
                    "{} holds pinned state of another lb-agent version ({}); remove it with `lb-agent stop --pin-dir {}`",
                    dir.display(),
                    e.file_name().to_string_lossy(),
                    dir.display()
                );
            }
        }
    }
    for sub in ["maps", "links"] {
        std::fs::create_dir_all(versioned.join(sub)).with_context(|| format!("create {}", versioned.display()))?;
    }
    Ok(versioned)
}

/// Remove pinned maps and the directories under the pin dir.
pub fn remove_pins(versioned: &Path) -> anyhow::Result<()> {
    for name in PINNED_MAPS {
        let p = versioned.join("maps").join(name);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("unpin {}", p.display()))?;
        }
    }
    for sub in ["maps", "links", ""] {
        let d = versioned.join(sub);
        if d.exists() {
            std::fs::remove_dir(&d).with_context(|| format!("remove {}", d.display()))?;
        }
    }
    if let Some(parent) = versioned.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

/// Everything a stopped agent left pinned under `dir` (all versions): links
/// first, which detaches the program, then maps.
pub fn remove_pinned_dir(dir: &Path) -> anyhow::Result<usize> {
    let mut removed = 0;
    let Ok(versions) = std::fs::read_dir(dir) else { return Ok(0) };
    for v in versions.filter_map(Result::ok) {
        for sub in ["links", "maps"] {
            for e in std::fs::read_dir(v.path().join(sub)).into_iter().flatten().filter_map(Result::ok) {
                std::fs::remove_file(e.path()).with_context(|| format!("unpin {}", e.path().display()))?;
                removed += 1;
            }
            let _ = std::fs::remove_dir(v.path().join(sub));
        }
        let _ = std::fs::remove_dir(v.path());
    }
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

fn fs_magic(path: &Path) -> anyhow::Result<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: zeroed statfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64)
}

fn mount_bpffs(at: &Path) -> anyhow::Result<()> {
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())?;
    // SAFETY: NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("mount bpffs on {}", at.display()));
    }
    Ok(())
}

fn same_mount_namespace_as_init() -> bool {
    match (std::fs::read_link("/proc/self/ns/mnt"), std::fs::read_link("/proc/1/ns/mnt")) {
        (Ok(a), Ok(b)) => a == b,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{PROG_LB, PROG_LB_LOCAL};

    use super::*;

    #[test]
    fn local_stack_drivers_get_the_partial_checksum_program() {
        for d in ["veth", "bridge", "tun", "macvlan"] {
            assert_eq!(L4Checksums::for_driver(d), L4Checksums::MayBePartial, "{d}");
        }
        for d in ["ixgbe", "mlx5_core", "virtio_net", "ena", "bonding", "802.1Q VLAN Support"] {
            assert_eq!(L4Checksums::for_driver(d), L4Checksums::Complete, "{d}");
        }
        assert_eq!(checksums_for(ChecksumMode::Complete, "any").unwrap().program(), PROG_LB);
        assert_eq!(checksums_for(ChecksumMode::MayBePartial, "any").unwrap().program(), PROG_LB_LOCAL);
    }

    #[test]
    fn interface_drivers_are_read_with_ethtool() {
        // Every network namespace has `lo`, which names no driver; no root
        // needed to ask.
        assert_eq!(interface_driver("lo").unwrap(), None);
        let err = interface_driver("no-such-if0").unwrap_err();
        assert!(format!("{err:#}").contains("no-such-if0"), "{err:#}");
        assert_eq!(checksums_for(ChecksumMode::Auto, "lo").unwrap(), L4Checksums::Complete);
    }

    #[test]
    fn link_pin_names_have_no_dots_and_stay_distinct() {
        assert_eq!(link_pin_name("eth0", AttachMode::Driver), "native-eth0");
        assert_eq!(link_pin_name("eth0.100", AttachMode::Generic), "generic-eth0_2e100");
        assert_ne!(link_pin_name("a_2e", AttachMode::Driver), link_pin_name("a.", AttachMode::Driver));
        assert!(!link_pin_name("a.b.c", AttachMode::Driver).contains('.'));
    }
}
