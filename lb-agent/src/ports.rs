//! The agent's ports: the traits through which its decisions reach the
//! outside world, and the values that cross them. `adapters` holds the real
//! implementations (aya, Docker, processes, TCP/HTTP probes), `testing` the
//! fakes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
};

use lb_common::{
    v6::{Backend6, BackendAddr6, BackendVips6, Ip6, ServiceKey6},
    Backend, BackendAddr, BackendVips, Counters, Reason, Service, ServiceKey, PROG_LB, PROG_LB_LOCAL,
};
use serde::Serialize;

use crate::config::{HealthCheckConfig, InterfaceConfig, ServiceConfig};

// ---------------------------------------------------------------------------
// The data plane.

/// The writes the reconciler needs.
pub trait MapWriter {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError>;
    /// Write `(slot, backend id)` pairs into one of a service's two tables.
    fn set_table_entries(&mut self, service_id: u32, table: u32, entries: &[(u32, u32)]) -> Result<(), DataplaneError>;
    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> Result<(), DataplaneError>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError>;
    /// The services a backend address serves (`None`: forget the address).
    fn set_backend_vips(&mut self, addr: &BackendAddr, vips: Option<&BackendVips>) -> Result<(), DataplaneError>;
    /// IPv6: a backend's address (`BACKENDS6`) under the id whose `BACKENDS`
    /// entry (flags, service; `ip_be == 0`) `set_backend` writes.
    fn set_backend6(&mut self, id: u32, backend: &Backend6) -> Result<(), DataplaneError>;
    /// IPv6: a service (`SERVICES6`); its tables are the shared ones.
    fn set_service6(&mut self, key: &ServiceKey6, service: &Service) -> Result<(), DataplaneError>;
    fn remove_service6(&mut self, key: &ServiceKey6) -> Result<(), DataplaneError>;
    /// IPv6: a service's source (`SOURCES6`, by service id; `dsr-ipip`'s
    /// outer source, all zeros for none).
    fn set_source6(&mut self, service_id: u32, source: &Ip6) -> Result<(), DataplaneError>;
    /// IPv6: the services a backend address serves (`None`: forget it).
    fn set_backend_vips6(&mut self, addr: &BackendAddr6, vips: Option<&BackendVips6>) -> Result<(), DataplaneError>;
}

/// The cheap reads a snapshot and a scaling decision take on the agent's
/// loop: counters are one small per-CPU lookup each.
pub trait DataplaneReads {
    /// A service's counters, summed over CPUs.
    fn service_counters(&self, id: u32) -> Result<Counters, DataplaneError>;
    /// A backend's counters, summed over CPUs.
    fn backend_counters(&self, id: u32) -> Result<Counters, DataplaneError>;
    /// Packets per verdict reason, summed over CPUs.
    fn reason_counters(&self) -> Result<Vec<(Reason, u64)>, DataplaneError>;
    /// The interfaces the program is attached to.
    fn attachments(&self) -> Vec<Attachment>;
    /// Where socket load balancing is attached, and what it did.
    fn socket_lb(&self) -> SocketLbState;
}

/// The connection table. Walking it reads up to `CONNTRACK_MAX` entries, so
/// the agent hands this to a worker that walks it off the loop
/// (`agent::flows`); hence `Send + Sync` and `&self`.
pub trait ConnectionTable: Send + Sync {
    /// One walk: open flows per backend, and the entries in the table.
    fn scan(&self) -> Result<ConntrackScan, DataplaneError>;
    /// Forget every flow of a backend; its clients' next
    /// packets start new flows elsewhere. Returns how many of them were
    /// still open (as `scan` counts them).
    fn flush_backend(&self, backend_id: u32) -> Result<u64, DataplaneError>;
    /// One flow's entry (from its family's table), with how long ago it
    /// saw a packet (`explain`).
    fn lookup(
        &self,
        key: &crate::core::explain::TableKey,
    ) -> Result<Option<crate::core::explain::FlowSeen>, DataplaneError>;
}

/// How this host routes addresses now (`ip route get`): the data plane
/// forwards along these routes (bpf_fib_lookup), so a backend routed out of
/// an interface its service does not list cannot be served
/// (`core::deploy::unroutable`). One netlink round trip per address.
pub trait Routes {
    /// The route to each of `addrs` that this host knows of; an address
    /// left out is not judged.
    fn routes(&self, addrs: &BTreeSet<Ipv4Addr>) -> anyhow::Result<BTreeMap<Ipv4Addr, Route>>;
    /// The address this host sends from towards each of `addrs` (full
    /// NAT's default source); one with no usable route is left out.
    fn sources(&self, _addrs: &BTreeSet<IpAddr>) -> anyhow::Result<BTreeMap<IpAddr, IpAddr>> {
        Ok(BTreeMap::new())
    }
}

/// The whole data plane as the agent drives it: `adapters::dataplane::AyaDataplane`
/// is the real one.
pub trait Dataplane: MapWriter + DataplaneReads + Routes {
    /// Whether an interface of that name exists here.
    fn has_interface(&self, name: &str) -> bool;
    /// Attach to `iface` at the hook `hook` picks (or switch its program to
    /// the one `hook` and `checksums` ask for); attaching twice is a no-op.
    fn attach(&mut self, iface: &str, settings: InterfaceConfig) -> anyhow::Result<AttachMode>;
    fn detach(&mut self, iface: &str) -> anyhow::Result<()>;
    /// Let translated packets leave by `iface` directly, or not, as `mode`
    /// and the interface decide.
    fn set_fast_path(&mut self, iface: &str, mode: crate::config::FastPathMode) -> anyhow::Result<()>;
    /// Attach socket load balancing (for clients on this host) to the
    /// cgroup v2 directory `cgroup`, moving it from another one; `None`
    /// detaches it. Touches only what this agent attached.
    fn set_socket_lb(&mut self, cgroup: Option<&std::path::Path>) -> anyhow::Result<()>;
    /// What this host says about itself for `config` (its addresses, each
    /// listed interface's fast path and forwarding), for `core::deploy`.
    fn host_facts(&self, config: &crate::config::Config) -> anyhow::Result<HostFacts>;
    /// A handle on the connection table for the worker that walks it.
    fn connection_table(&self) -> Result<Arc<dyn ConnectionTable>, DataplaneError>;
    /// What a previous agent left pinned, when the maps were adopted.
    fn adopted_state(&self) -> anyhow::Result<Option<PinnedState>>;
    /// Pinned links of interfaces nothing is attached to (yet).
    fn stale_link_pins(&self) -> Vec<PathBuf>;
    /// Detach everywhere and remove every pin: the data plane is gone.
    fn remove_all(&mut self);
    /// Leave everything pinned and serving for the next agent.
    fn keep_on_drop(&mut self);
    /// The data plane's reports of clients waiting for a service that
    /// scales from zero (`lb_common::WAKE_EVENTS`), as they come; taken once.
    /// `None`: this data plane has none.
    fn wake_events(&mut self) -> Option<tokio::sync::mpsc::Receiver<Wake>> {
        None
    }
}

/// A client's first packet to a service that scales from zero and has no
/// instance in the table: held by the data plane, reported to the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wake {
    pub service_id: u32,
    /// How long ago the data plane held the packet.
    pub waited: std::time::Duration,
}

/// One interface the program is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub interface: String,
    pub mode: AttachMode,
    /// The XDP program's checksum choice; `None` at tc, which reads the
    /// skb's checksum state instead.
    pub checksums: Option<L4Checksums>,
    /// Whether translated packets may leave by it directly, and why.
    pub fast_path: bool,
    pub fast_path_reason: String,
    /// How the packets that arrived on it left, by path.
    pub paths: Vec<(lb_common::Path, u64)>,
}

/// Socket load balancing as the data plane has it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketLbState {
    /// The cgroup the programs are attached to; `None`: not attached.
    pub cgroup: Option<PathBuf>,
    /// What the programs did, summed over CPUs.
    pub counters: Vec<(lb_common::SockOp, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("map {map}: {op} failed")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("no free {what} id (at most {max})")]
    NoFreeId { what: &'static str, max: u32 },
    #[error(
        "backend {backend} is in {services} services; one backend address can serve at most {max} \
         (the data plane matches its replies against each)"
    )]
    BackendInTooManyServices { backend: std::net::SocketAddr, services: usize, max: usize },
}

/// What a previous agent left in the (pinned) maps.
#[derive(Clone, Debug, Default)]
pub struct PinnedState {
    pub services: Vec<(ServiceKey, Service)>,
    pub backends: Vec<(u32, Backend)>,
    /// Both tables of every service, by service id.
    pub tables: BTreeMap<u32, [Vec<u32>; 2]>,
    /// `BACKEND_VIPS`: the services each backend address serves.
    pub backend_vips: Vec<(BackendAddr, BackendVips)>,
    /// IPv6 (`lb_common::v6`): `SERVICES6` (their tables are in `tables`,
    /// their backends' entries in `backends`), the addresses of backends
    /// whose `BACKENDS` entry has `ip_be == 0` (`BACKENDS6`, by id), each
    /// IPv6 service's `SOURCES6` entry (by service id) and `BACKEND_VIPS6`.
    pub services6: Vec<(ServiceKey6, Service)>,
    pub backends6: BTreeMap<u32, Backend6>,
    pub sources6: BTreeMap<u32, Ip6>,
    pub backend_vips6: Vec<(BackendAddr6, BackendVips6)>,
}

impl PinnedState {
    /// The address of backend `id`, whose `BACKENDS` entry is `b`: an IPv6
    /// backend's (`ip_be == 0`) is in `BACKENDS6`.
    pub fn backend_addr(&self, id: u32, b: &Backend) -> std::net::SocketAddr {
        match self.backends6.get(&id) {
            Some(b6) if b.ip_be == 0 => b6.addr().into(),
            _ => SocketAddrV4::new(u32::from_be(b.ip_be).into(), u16::from_be(b.port_be)).into(),
        }
    }
}

/// One walk of the connection table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackScan {
    /// Open flows per backend id, IPv4 and IPv6 alike.
    pub open: BTreeMap<u32, u64>,
    /// Entries in the table (one per flow).
    pub entries: u64,
    /// The entries it can hold (`[dataplane] max_flows`).
    pub max_entries: u32,
    /// Full NAT's source ports held (claims whose flow is in the table).
    pub snat_claims: u64,
    /// IPv6 flows' entries (`CONNTRACK6`), and the entries it can hold.
    pub entries6: u64,
    pub max_entries6: u32,
    /// The same over IPv6 (`SNAT_FLOWS6`, as large as `SNAT_FLOWS`).
    pub snat_claims6: u64,
}

/// How the program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) XDP.
    Driver,
    /// Generic (skb) XDP: the driver has no native support.
    Generic,
    /// The tc classifier on ingress (`lb_common::PROG_TC`).
    Tc,
}

impl AttachMode {
    pub fn hook(self) -> Hook {
        match self {
            AttachMode::Driver | AttachMode::Generic => Hook::Xdp,
            AttachMode::Tc => Hook::Tc,
        }
    }
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Driver => "native",
            AttachMode::Generic => "generic",
            AttachMode::Tc => "tc",
        })
    }
}

/// The hook an interface gets, `HookMode::Auto` resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        })
    }
}

/// Which of the object's two programs an interface gets: the one that takes
/// every L4 checksum for complete, or the one that also recognises partial
/// ones (`lb_common::PROG_LB_LOCAL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Checksums {
    Complete,
    MayBePartial,
}

impl L4Checksums {
    /// The name of the program in the lb-ebpf object.
    pub fn program(self) -> &'static str {
        match self {
            L4Checksums::Complete => PROG_LB,
            L4Checksums::MayBePartial => PROG_LB_LOCAL,
        }
    }

    /// The program an XDP attachment in `mode` runs: generic (skb) mode
    /// always takes the partial-checksum-aware one, because GRO and virtio
    /// offloads leave partial checksums in the skbs it sees on any device.
    pub fn in_mode(self, mode: AttachMode) -> Self {
        match mode {
            AttachMode::Generic => L4Checksums::MayBePartial,
            AttachMode::Driver | AttachMode::Tc => self,
        }
    }

    /// `auto` resolved by the interface's driver: these kinds carry packets
    /// from local stacks, which may be CHECKSUM_PARTIAL.
    pub fn for_driver(driver: &str) -> Self {
        match driver {
            "veth" | "bridge" | "tun" | "netkit" | "macvlan" | "ipvlan" => L4Checksums::MayBePartial,
            _ => L4Checksums::Complete,
        }
    }
}

impl std::fmt::Display for L4Checksums {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            L4Checksums::Complete => "complete",
            L4Checksums::MayBePartial => "may-be-partial",
        })
    }
}

// ---------------------------------------------------------------------------
// Orchestrators: where a scaled service's instances come from.

/// One instance of a scaled service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Replica {
    /// Stable id within the orchestrator (container id, or netns name).
    pub id: String,
    /// Human name (container name, or the `{name}` given to the process).
    pub name: String,
    /// Where it serves: the backend address for the load balancer.
    pub addr: SocketAddrV4,
    /// False once it exited or crashed.
    pub running: bool,
}

impl Replica {
    /// Its address as the registry keys backends (instances are IPv4).
    pub fn socket(&self) -> std::net::SocketAddr {
        self.addr.into()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Command { what: String, detail: String },
    #[error("no free instance slot (at most {0})")]
    Full(usize),
    #[error("no instance {0} of ours")]
    Unknown(String),
    #[error("docker: {0}")]
    Docker(String),
}

/// Instances of one service.
pub trait Orchestrator: Send + Sync {
    /// Our instances, running or exited (exited ones until `stop` clears them).
    fn list(&self) -> impl Future<Output = Result<Vec<Replica>, OrchestratorError>> + Send;
    /// Start one more instance; it is not yet known to be ready.
    fn start(&self) -> impl Future<Output = Result<Replica, OrchestratorError>> + Send;
    /// Stop an instance (SIGTERM, then SIGKILL after a grace period) and
    /// remove what was made for it.
    fn stop(&self, id: &str) -> impl Future<Output = Result<(), OrchestratorError>> + Send;
    /// CPU use of each running instance in percent of one core, averaged
    /// since the previous call (absent until there are two samples).
    fn cpu_percent(&self) -> impl Future<Output = Result<HashMap<String, f64>, OrchestratorError>> + Send;
    /// Undo what was set up on the host for the service (firewall rules);
    /// called once, when the service stops scaling, after the last `stop`.
    fn release(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// Leave what was set up on the host in place past this orchestrator:
    /// the instances it adopted keep running and need it, until the next
    /// agent adopts them.
    fn keep_host_setup(&self) {}
}

/// Makes the orchestrator of each scaled service, with whatever the host
/// needs for it (a bridge, a Docker network, firewall rules). The agent
/// calls it off its loop, when a config newly scales a service.
pub trait OrchestratorFactory: Send + Sync + 'static {
    type Orchestrator: Orchestrator + 'static;
    fn make(&self, service: &ServiceConfig) -> impl Future<Output = anyhow::Result<Self::Orchestrator>> + Send;
}

// ---------------------------------------------------------------------------
// Health probes.

/// Why a probe failed, as `status` and the events show it.
pub type ProbeError = Box<dyn std::error::Error + Send + Sync>;

/// Probes a backend or a starting instance once; `adapters::probe::NetProber`
/// connects (TCP) or GETs (HTTP).
pub trait Prober: Send + Sync + 'static {
    fn probe(
        &self,
        addr: std::net::SocketAddr,
        check: &HealthCheckConfig,
    ) -> impl Future<Output = Result<(), ProbeError>> + Send;

    /// Whether a probe's error is a timeout (no answer in time) rather than
    /// a bad answer, for the health-check counts by result.
    fn is_timeout(&self, _error: &ProbeError) -> bool {
        false
    }
}

/// What the host says about itself, as far as the data plane cares.
#[derive(Clone, Debug, Default)]
pub struct HostFacts {
    /// Every IPv4 address on this host's interfaces (this namespace).
    pub local_addrs: BTreeSet<Ipv4Addr>,
    /// Every IPv6 address on them.
    pub local_addrs6: BTreeSet<Ipv6Addr>,
    /// The interfaces each of those addresses is on.
    pub address_interfaces: BTreeMap<Ipv4Addr, BTreeSet<String>>,
    /// Per listed interface.
    pub interfaces: BTreeMap<String, InterfaceFacts>,
    /// `net.ipv4.ip_local_port_range`: the ports the host's own outgoing
    /// connections are given, first and last.
    pub ephemeral_ports: Option<(u16, u16)>,
    /// The kernel's route to each configured backend address and VIP (none
    /// known: nothing to judge).
    pub routes: BTreeMap<Ipv4Addr, Route>,
    /// Full NAT: the source address of the route to each backend of a
    /// full-NAT service without a `source` (one with none is left out).
    pub snat_sources: BTreeMap<IpAddr, IpAddr>,
    /// Where cgroup v2 is mounted (from /proc/self/mountinfo): the default
    /// cgroup for socket load balancing.
    pub cgroup2_mount: Option<PathBuf>,
    /// Instances' bridges not here yet that their orchestrators make when
    /// the agent runs (`check` before a first `run`): not missing.
    pub bridges_to_make: BTreeSet<String>,
}

/// How this host routes an address (`ip route get`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Leaves by this interface (directly or through a gateway).
    Via(String),
    /// An address of this host.
    Local,
    /// No route the kernel would use, and why (no route, unreachable,
    /// prohibited, blackhole).
    Unusable(String),
}

#[derive(Clone, Debug)]
pub struct InterfaceFacts {
    /// The hook the program gets there, and why.
    pub hook: Hook,
    pub hook_why: String,
    /// Whether translated packets may leave by it on the fast path, and why.
    pub fast_path: bool,
    pub fast_path_why: String,
    /// net.ipv4.conf.<if>.forwarding: packets arriving here can be
    /// forwarded at all (by the kernel, and by bpf_fib_lookup, which
    /// refuses otherwise).
    pub forwarding: bool,
    /// The program here takes a checksum that looks partial for one
    /// (`L4Checksums::MayBePartial`): such packets never take the fast path.
    pub may_be_partial: bool,
    /// Reverse-path filtering as the kernel applies it to packets arriving
    /// here: the larger of net.ipv4.conf.{all,<if>}.rp_filter (0 off,
    /// 1 strict, 2 loose).
    pub rp_filter: u8,
    /// net.ipv4.conf.{all,<if>}.accept_local (either on): the kernel takes
    /// a packet arriving here from one of its own addresses instead of
    /// dropping it as a martian.
    pub accept_local: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generic_xdp_always_runs_the_partial_checksum_aware_program() {
        for l4 in [L4Checksums::Complete, L4Checksums::MayBePartial] {
            assert_eq!(l4.in_mode(AttachMode::Generic).program(), PROG_LB_LOCAL, "{l4}");
            assert_eq!(l4.in_mode(AttachMode::Driver), l4);
        }
    }
}
