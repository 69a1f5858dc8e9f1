//! The TOML configuration: services and their backends.
//!
//! Parsing is strict (unknown keys are errors) and validation is whole: a
//! config is accepted completely or refused with every problem listed, each
//! naming its place (`service[1] "web": backend[0].weight: ...`).
//!
//! The structs do not `deny_unknown_fields`, which would stop at the first
//! one: parsing collects every ignored key instead and refuses them all
//! together, each with its line and the nearest valid key (`keys`).

pub mod duration;
mod family;
pub mod instances;
pub mod keys;
pub mod scaling;

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{MAX_BACKENDS, MAX_SERVICES, PROTO_TCP, PROTO_UDP};
use serde::Deserialize;

use self::{
    instances::{InstanceNet, InstancesConfig},
    scaling::{Metric, ScalingPolicy},
};

/// Highest weight a backend may have; keeps Maglev's turn counting in u64.
pub const MAX_WEIGHT: u32 = 10_000;
/// The longest `slow_start` ramp.
pub const MAX_SLOW_START: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Config {
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// `[interface.<name>]`: settings of an interface some service names.
    #[serde(default, rename = "interface")]
    pub interface_settings: BTreeMap<String, InterfaceConfig>,
    /// `[socket_lb]`: balancing for clients on this host itself.
    #[serde(default)]
    pub socket_lb: SocketLbConfig,
    /// `[dataplane]`: the connection table; read when the agent starts.
    #[serde(default)]
    pub dataplane: DataplaneConfig,
}

/// `[dataplane]`: sizes and limits of the data plane, set when the program
/// is loaded (a change takes effect at the agent's next start).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct DataplaneConfig {
    /// Flows the connection table holds (one entry each); beyond, the least
    /// recently used one makes room.
    #[serde(default = "default_max_flows")]
    pub max_flows: u32,
    /// TCP flows a CPU may start per second from a packet that is not a SYN
    /// (a flow the table lost); beyond, such packets are dropped.
    #[serde(default = "default_non_syn_flows_per_sec")]
    pub non_syn_flows_per_sec: u32,
    /// Full NAT's source ports (`snat_port_min..=snat_port_max`), claimed
    /// per flow and backend; by default above Linux's default ephemeral
    /// range, so the host's own connections never take one.
    #[serde(default = "default_snat_port_min")]
    pub snat_port_min: u16,
    #[serde(default = "default_snat_port_max")]
    pub snat_port_max: u16,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            max_flows: default_max_flows(),
            non_syn_flows_per_sec: default_non_syn_flows_per_sec(),
            snat_port_min: default_snat_port_min(),
            snat_port_max: default_snat_port_max(),
        }
    }
}

fn default_snat_port_min() -> u16 {
    lb_common::DEFAULT_SNAT_PORT_MIN
}

fn default_snat_port_max() -> u16 {
    lb_common::DEFAULT_SNAT_PORT_MAX
}

/// The lowest full-NAT source port accepted: below are the well-known
/// ports services on the load balancer itself may listen on.
pub const MIN_SNAT_PORT: u16 = 1024;

fn default_max_flows() -> u32 {
    lb_common::CONNTRACK_MAX
}

fn default_non_syn_flows_per_sec() -> u32 {
    lb_common::DEFAULT_NON_SYN_FLOWS_PER_SEC
}

/// The largest `max_flows` accepted: 64 Mi flows, about 6 GiB of kernel memory.
pub const MAX_FLOWS_LIMIT: u32 = 1 << 26;

/// `[socket_lb]`: processes on this host (and containers on it) calling a
/// service never cross XDP; socket-address programs on a cgroup v2
/// directory give their connect()/sendto() a backend instead, for every
/// process in its subtree.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct SocketLbConfig {
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// The cgroup v2 directory to attach to; by default the cgroup v2 mount
    /// itself (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid
    /// hosts), which holds every process.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
}

impl Default for SocketLbConfig {
    fn default() -> Self {
        SocketLbConfig { enabled: true, cgroup: None }
    }
}

fn enabled_by_default() -> bool {
    true
}

/// `[interface.<name>]`
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct InterfaceConfig {
    #[serde(default)]
    pub hook: HookMode,
    #[serde(default)]
    pub checksums: ChecksumMode,
    #[serde(default)]
    pub fast_path: FastPathMode,
    #[serde(default)]
    pub xdp_mode: XdpAttach,
}

/// How XDP attaches to an interface. Generic (skb) mode always runs the
/// partial-checksum-aware program, whatever `checksums` says: GRO and
/// virtio offloads leave partial checksums there on any device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XdpAttach {
    /// Native where the driver has it, generic otherwise.
    #[default]
    Auto,
    /// Native only: attaching fails where the driver has no XDP.
    Native,
    /// Generic (skb) only, even where the driver has native XDP.
    Generic,
}

/// Where on an interface the program runs (see the README's table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookMode {
    /// XDP on NIC drivers; tc on the devices that face local stacks (veth,
    /// bridge, tun/tap, macvlan, ipvlan, netkit, vxlan, ...), whose packets
    /// may carry partial checksums and which cannot transmit XDP frames.
    #[default]
    Auto,
    /// XDP (native where the driver has it, generic otherwise).
    Xdp,
    /// A tc classifier on ingress (TCX, or a clsact qdisc before 6.6).
    Tc,
}

/// Whether translated packets may leave by the fast path (XDP_REDIRECT or
/// XDP_TX) out of an interface, skipping the kernel's stack. A device can
/// transmit redirected frames only if its driver can: NICs do; a veth only
/// when its peer has an XDP program or GRO on (`ethtool -K <peer> gro on`);
/// a bridge never. Packets for an interface without it pass up to the
/// kernel's forwarding path instead.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FastPathMode {
    /// On for NIC drivers, off for veth (the agent cannot see the peer's
    /// GRO), bridges, tun/tap, macvlan and the like.
    #[default]
    Auto,
    /// On: you made sure the device can transmit XDP frames.
    On,
    Off,
}

/// What the TCP/UDP checksums of packets arriving on an interface can be,
/// which decides the program attached there (see `lb_common::PROG_LB_LOCAL`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChecksumMode {
    /// By the interface's kind: veth, bridge, tun/tap, macvlan, ipvlan and
    /// netkit face local stacks (`may-be-partial`); anything else is a wire
    /// (`complete`).
    #[default]
    Auto,
    /// Every arriving checksum is complete: NICs, or veths whose far end
    /// computes checksums in software (`ethtool -K <peer> tx off`).
    Complete,
    /// Local stacks may hand over partial checksums (CHECKSUM_PARTIAL).
    MayBePartial,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ServiceConfig {
    pub name: String,
    #[serde(deserialize_with = "deserialize_vip")]
    pub vip: IpAddr,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// Interfaces where clients' packets and backends' replies arrive.
    pub interfaces: Vec<String>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// Probe backends; a failing one leaves the table, a recovered one returns.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// How long a removed or failed backend's open connections may go on.
    #[serde(default = "default_drain_timeout", with = "duration")]
    pub drain_timeout: Duration,
    /// A backend that joins the table (added, up again, a new instance)
    /// ramps from a tenth of its weight to all of it over this time; zero
    /// (the default) turns it off. See `core::slow_start`.
    #[serde(default, with = "duration")]
    pub slow_start: Duration,
    /// Scale the service's instances with the load (needs `instances`).
    #[serde(default)]
    pub scaling: Option<ScalingPolicy>,
    /// Where scaled instances come from (instead of a `backend` list).
    #[serde(default)]
    pub instances: Option<InstancesConfig>,
    /// How clients' packets reach the backends (`nat` by default).
    #[serde(default)]
    pub mode: ForwardMode,
    /// An address of the load balancer that packets to the backends come
    /// from: in `full-nat` the source backends see (by default the address
    /// of the interface the route to each backend leaves by); in `dsr-ipip`
    /// the outer source (required there).
    #[serde(default)]
    pub source: Option<IpAddr>,
}

/// A service's forwarding mode (`mode = "nat" | "full-nat" | "dsr-ipip"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardMode {
    /// Destination NAT: backends see the client's address and must route
    /// their replies back through the load balancer.
    #[default]
    Nat,
    /// Source and destination NAT: backends see an address of the load
    /// balancer and reply to it, whatever their routes.
    FullNat,
    /// IP-in-IP direct server return: replies go straight to the client.
    DsrIpip,
}

impl ForwardMode {
    /// The data plane's `Service::mode`.
    pub fn number(self) -> u32 {
        match self {
            ForwardMode::Nat => lb_common::MODE_DNAT,
            ForwardMode::FullNat => lb_common::MODE_FULL_NAT,
            ForwardMode::DsrIpip => lb_common::MODE_DSR_IPIP,
        }
    }
}

impl fmt::Display for ForwardMode {
    /// As status shows it ("dnat" for plain NAT, as before modes existed).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ForwardMode::Nat => "dnat",
            ForwardMode::FullNat => "full-nat",
            ForwardMode::DsrIpip => "dsr-ipip",
        })
    }
}

/// An IPv4 or IPv6 address; `"10.0.0.1:80"` is refused with where the port
/// goes. Which modes and hooks take IPv6 is `family::problems`'s to say.
fn deserialize_vip<'de, D: serde::Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
    use serde::de::Error;
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| match text.parse::<SocketAddr>() {
        Ok(a) => D::Error::custom(format!(
            "{text:?}: the vip is an address only; write vip = \"{}\" and port = {}",
            a.ip(),
            a.port()
        )),
        Err(_) => D::Error::custom(format!("{text:?} is not an IPv4 or IPv6 address")),
    })
}

/// An address with a port: `"10.1.0.2:80"` or `"[2001:db8::2]:80"`.
fn deserialize_backend_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    use serde::de::Error;
    let text = String::deserialize(d)?;
    text.parse().map_err(|e| match text.parse::<std::net::Ipv6Addr>() {
        Ok(_) => D::Error::custom(format!("{text:?}: an IPv6 address with a port is written \"[{text}]:PORT\"")),
        Err(_) => D::Error::custom(format!("{text:?}: {e}")),
    })
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct HealthCheckConfig {
    #[serde(default)]
    pub kind: CheckKind,
    /// HTTP only: the path to GET.
    #[serde(default = "default_path")]
    pub path: String,
    /// HTTP only: the status that means healthy.
    #[serde(default = "default_status")]
    pub expect_status: u16,
    #[serde(default = "default_interval", with = "duration")]
    pub interval: Duration,
    /// Defaults to the interval or 500ms, whichever is shorter.
    #[serde(default, with = "duration::option")]
    pub timeout: Option<Duration>,
    /// Successes in a row that bring a down backend back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failures in a row that take an up backend out.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Not a key: a `dsr-ipip` service's VIP, port and protocol, which its
    /// probes reach through the tunnel to each backend (`adapters::dsr_probe`).
    #[serde(skip)]
    pub through_tunnel: Option<Tunnel>,
}

/// What a `dsr-ipip` service's probe reaches through the tunnel: for TCP
/// a SYN to VIP:port, for UDP an echo request to the VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunnel {
    pub vip: SocketAddr,
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect to the backend's address.
    #[default]
    Tcp,
    /// An HTTP/1.1 GET of `path`, expecting `expect_status`.
    Http,
}

fn default_path() -> String {
    "/".into()
}
fn default_status() -> u16 {
    200
}
fn default_interval() -> Duration {
    Duration::from_secs(1)
}
impl HealthCheckConfig {
    pub fn timeout(&self) -> Duration {
        self.timeout.unwrap_or(self.interval.min(Duration::from_millis(500)))
    }
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct BackendConfig {
    #[serde(deserialize_with = "deserialize_backend_address")]
    pub address: SocketAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path} is not valid TOML for lb-agent: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path} has {} problem(s):\n  - {}", problems.len(), problems.join("\n  - "))]
    Invalid { path: PathBuf, problems: Vec<String> },
}

impl Config {
    /// Read, parse and validate; nothing partial comes out.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut ignored = Vec::new();
        let parsed: Result<Config, _> =
            serde_ignored::deserialize(toml::Deserializer::new(text), |at| ignored.push(keys::steps(&at)));
        let mut problems = Config::unknown_keys(text, &ignored);
        let config = parsed.map_err(|e| {
            // Keys ignored before the error are likely its cause (`prot` for `port`).
            let message = problems.iter().fold(e.to_string(), |m, p| format!("{m}\n  - {p}"));
            ConfigError::Parse { path: path.into(), message }
        })?;
        problems.extend(config.problems());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { path: path.into(), problems })
        }
    }

    /// One line per key the structs do not take, each with its place.
    fn unknown_keys(text: &str, ignored: &[Vec<keys::Step>]) -> Vec<String> {
        if ignored.is_empty() {
            return Vec::new();
        }
        let tables = keys::tables::<Config>();
        let doc = toml_edit::ImDocument::parse(text).ok();
        ignored.iter().map(|at| keys::unknown_key(at, &tables, doc.as_ref())).collect()
    }

    /// Every setting of `iface` (each `auto` unless configured).
    pub fn interface(&self, iface: &str) -> InterfaceConfig {
        self.interface_settings.get(iface).copied().unwrap_or_default()
    }

    /// The hook setting of `iface` (`auto` unless configured).
    pub fn hook(&self, iface: &str) -> HookMode {
        self.interface_settings.get(iface).map(|i| i.hook).unwrap_or_default()
    }

    /// The checksum setting of `iface` (`auto` unless configured).
    pub fn checksums(&self, iface: &str) -> ChecksumMode {
        self.interface_settings.get(iface).map(|i| i.checksums).unwrap_or_default()
    }

    pub fn fast_path(&self, iface: &str) -> FastPathMode {
        self.interface_settings.get(iface).map(|i| i.fast_path).unwrap_or_default()
    }

    /// Every problem that makes the config unusable, each with its place.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.services.len() > MAX_SERVICES as usize {
            out.push(format!("service: {} services, at most {MAX_SERVICES} are supported", self.services.len()));
        }
        let total: usize = self.services.iter().map(|s| s.backends.len()).sum();
        // Backend id 0 means "none", and ids of removed backends rest one sync.
        let max_backends = (MAX_BACKENDS as usize - 1) / 2;
        if total > max_backends {
            out.push(format!("backend: {total} backends in all, at most {max_backends} are supported"));
        }
        let mut names = HashSet::new();
        let mut keys = HashSet::new();
        for (i, s) in self.services.iter().enumerate() {
            let at = format!("service[{i}] {:?}", s.name);
            if s.name.trim().is_empty() {
                out.push(format!("{at}: name: must not be empty"));
            } else if !names.insert(s.name.as_str()) {
                out.push(format!("{at}: name: used by an earlier service"));
            }
            if !keys.insert((s.vip, s.port, s.protocol)) {
                out.push(format!("{at}: {}:{}/{} is configured twice", s.vip, s.port, s.protocol));
            }
            s.problems(&at, &mut out);
            out.extend(family::problems(self, s, &at));
        }
        self.instance_net_problems(&mut out);
        for name in self.interface_settings.keys() {
            if !self.services.iter().any(|s| s.interfaces.contains(name)) {
                out.push(format!("interface.{name}: no service names this interface in its `interfaces`"));
            }
        }
        if let Some(c) = self.socket_lb.cgroup.as_ref().filter(|c| !c.is_absolute()) {
            out.push(format!("socket_lb.cgroup: {} must be an absolute path", c.display()));
        }
        if !(1..=MAX_FLOWS_LIMIT).contains(&self.dataplane.max_flows) {
            out.push(format!("dataplane.max_flows: {} is not within 1..={MAX_FLOWS_LIMIT}", self.dataplane.max_flows));
        }
        let (min, max) = (self.dataplane.snat_port_min, self.dataplane.snat_port_max);
        if min < MIN_SNAT_PORT {
            out.push(format!(
                "dataplane.snat_port_min: {min} is a well-known port; full NAT's source ports start at {MIN_SNAT_PORT} or above"
            ));
        }
        if min > max {
            out.push(format!(
                "dataplane.snat_port_max: {max} is below snat_port_min ({min}): the range would be empty"
            ));
        }
        out
    }
}

impl Config {
    /// Each scaled service's instances need a bridge and a subnet of their
    /// own (two services' process orchestrators on one bridge would take
    /// each other's links and addresses), and no VIP or listed backend may
    /// sit in an instance subnet, where the orchestrator hands out addresses.
    fn instance_net_problems(&self, out: &mut Vec<String>) {
        let at = |i: usize| format!("service[{i}] {:?}", self.services[i].name);
        let nets: Vec<(usize, InstanceNet<'_>)> =
            self.services.iter().enumerate().filter_map(|(i, s)| Some((i, s.instances.as_ref()?.net()?))).collect();
        for (k, (i, a)) in nets.iter().enumerate() {
            for (j, b) in &nets[k + 1..] {
                out.extend(b.clashes(&at(*j), a, &at(*i)));
            }
        }
        for (i, s) in self.services.iter().enumerate() {
            for (j, n) in &nets {
                let inside = |what: String, ip: Ipv4Addr| {
                    format!(
                        "{}: {what}: {ip} is inside {} (instances.{}.{}) of {}, whose addresses its orchestrator \
                         hands out",
                        at(i),
                        n.subnet,
                        n.kind,
                        n.subnet_key,
                        at(*j)
                    )
                };
                // Instance subnets are IPv4: an IPv6 address is never inside.
                let v4 = |ip: IpAddr| match ip {
                    IpAddr::V4(ip) => n.subnet.contains(ip).then_some(ip),
                    IpAddr::V6(_) => None,
                };
                if let Some(vip) = v4(s.vip) {
                    out.push(inside("vip".into(), vip));
                }
                for (k, ip) in s.backends.iter().enumerate().filter_map(|(k, b)| Some((k, v4(b.address.ip())?))) {
                    out.push(inside(format!("backend[{k}].address"), ip));
                }
            }
        }
    }
}

/// Why `ip` can never be a backend's address, whatever the host: the data
/// plane forwards to a backend out of an interface (bpf_fib_lookup and a
/// redirect), and loopback (127.0.0.0/8) never leaves the host; on the
/// load balancer it is the agent's own host, so probes from the agent pass
/// while clients' packets go nowhere.
pub fn unusable_backend_ip(ip: IpAddr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("a loopback address (127.0.0.0/8, ::1) never leaves this host; give the backend's address on a network")
    } else if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("not a unicast address")
    } else {
        None
    }
}

impl ServiceConfig {
    fn problems(&self, at: &str, out: &mut Vec<String>) {
        if self.vip.is_unspecified() || self.vip == IpAddr::V4(Ipv4Addr::BROADCAST) || self.vip.is_multicast() {
            out.push(format!("{at}: vip: {} cannot be a service address", self.vip));
        }
        if self.port == 0 {
            out.push(format!("{at}: port: must be 1-65535"));
        }
        if self.interfaces.is_empty() {
            out.push(format!("{at}: interfaces: name at least one interface to attach to"));
        }
        self.mode_problems(at, out);
        for (j, ifname) in self.interfaces.iter().enumerate() {
            if ifname.is_empty() || ifname.len() > 15 || ifname.contains(['/', ' ']) {
                out.push(format!("{at}: interfaces[{j}]: {ifname:?} is not a valid interface name"));
            }
        }
        if let Some(h) = &self.health_check {
            let hat = format!("{at}: health_check");
            if h.interval < Duration::from_millis(50) {
                out.push(format!("{hat}.interval: {:?} is below the minimum 50ms", h.interval));
            }
            if h.timeout().is_zero() || h.timeout() > h.interval {
                out.push(format!("{hat}.timeout: must be above 0 and at most the interval ({:?})", h.interval));
            }
            if h.kind == CheckKind::Http && !h.path.starts_with('/') {
                out.push(format!("{hat}.path: {:?} must start with /", h.path));
            }
            if !(100..=599).contains(&h.expect_status) {
                out.push(format!("{hat}.expect_status: {} is not an HTTP status", h.expect_status));
            }
            if h.rise == 0 || h.fall == 0 {
                out.push(format!("{hat}: rise and fall must be at least 1"));
            }
        }
        if self.slow_start > MAX_SLOW_START {
            out.push(format!("{at}: slow_start: {:?} is above the maximum 1h", self.slow_start));
        }
        self.scaling_problems(at, out);
        let mut seen = HashSet::new();
        for (j, b) in self.backends.iter().enumerate() {
            let bat = format!("{at}: backend[{j}]");
            if b.address.port() == 0 {
                out.push(format!("{bat}.address: {} has port 0", b.address));
            }
            if let Some(why) = unusable_backend_ip(b.address.ip()) {
                out.push(format!("{bat}.address: {} cannot be a backend: {why}", b.address));
            }
            if b.address.ip() == self.vip {
                out.push(format!("{bat}.address: {} is the service's own VIP", b.address));
            }
            if b.weight > MAX_WEIGHT {
                out.push(format!("{bat}.weight: {} is above the maximum {MAX_WEIGHT}", b.weight));
            }
            if !seen.insert(b.address) {
                out.push(format!("{bat}.address: {} is listed twice", b.address));
            }
        }
    }

    fn mode_problems(&self, at: &str, out: &mut Vec<String>) {
        match self.mode {
            ForwardMode::Nat => {}
            ForwardMode::FullNat => match self.source {
                Some(ip) if unusable_backend_ip(ip).is_some() => {
                    out.push(format!("{at}: source: {ip} cannot be an address backends reply to"))
                }
                _ => {}
            },
            ForwardMode::DsrIpip => {
                match self.source {
                    None => out.push(format!(
                        "{at}: source: mode \"dsr-ipip\" needs the load balancer's address that encapsulated \
                         packets come from, e.g. source = \"10.0.0.1\""
                    )),
                    Some(ip) if unusable_backend_ip(ip).is_some() || ip == self.vip => {
                        out.push(format!("{at}: source: {ip} cannot be the load balancer's own unicast address"))
                    }
                    Some(_) => {}
                }
                if self.health_check.is_none() {
                    out.push(format!(
                        "{at}: health_check: mode \"dsr-ipip\" needs one: its probe, sent through the tunnel, is \
                         how the load balancer knows a backend is set up (see `lb-agent backend-setup`)"
                    ));
                }
                if self.instances.is_some() {
                    out.push(format!("{at}: instances: mode \"dsr-ipip\" takes listed backends only"));
                }
                for (j, b) in self.backends.iter().enumerate().filter(|(_, b)| b.address.port() != self.port) {
                    out.push(format!(
                        "{at}: backend[{j}].address: {}: in mode \"dsr-ipip\" a backend gets the packet as sent, \
                         to the VIP's port {}, so it must listen on that port",
                        b.address, self.port
                    ));
                }
            }
        }
        if let (ForwardMode::Nat, Some(ip)) = (self.mode, self.source) {
            out.push(format!(
                "{at}: source: {ip} is only used with mode = \"full-nat\" or \"dsr-ipip\"; add one or remove it"
            ));
        }
    }

    fn scaling_problems(&self, at: &str, out: &mut Vec<String>) {
        match (&self.scaling, &self.instances) {
            (None, None) => return,
            (Some(_), None) => {
                out.push(format!("{at}: scaling: needs [service.instances] to say where instances come from"))
            }
            (None, Some(_)) => out.push(format!(
                "{at}: instances: needs [service.scaling] (min_replicas = max_replicas for a fixed count)"
            )),
            (Some(p), Some(_)) => out.extend(p.problems(&format!("{at}: scaling"))),
        }
        if !self.backends.is_empty() {
            out.push(format!("{at}: backend: list backends or let instances provide them, not both"));
        }
        let Some(inst) = &self.instances else { return };
        out.extend(inst.timeline_problems(&format!("{at}: instances")));
        if let Some(r) = &inst.requests {
            out.extend(r.problems(&format!("{at}: instances.requests")));
        } else if self.scaling.as_ref().is_some_and(|p| p.uses(Metric::RequestsPerSecond)) {
            out.push(format!(
                "{at}: scaling: requests_per_second needs [service.instances.requests] (the counter to read from \
                 each instance's metrics page)"
            ));
        }
        let bridge = match (&inst.process, &inst.docker, &inst.swarm) {
            (Some(p), None, None) => {
                out.extend(p.problems(&format!("{at}: instances.process")));
                &p.bridge
            }
            (None, Some(d), None) => {
                out.extend(d.problems(&format!("{at}: instances.docker")));
                &d.bridge
            }
            (None, None, Some(s)) => {
                out.extend(s.problems(&format!("{at}: instances.swarm")));
                if s.publish != instances::SwarmPublish::Bridge {
                    out.extend(self.host_publish_problems(at));
                    return;
                }
                &s.container.bridge
            }
            _ => {
                out.push(format!(
                    "{at}: instances: name exactly one kind, [service.instances.process], [service.instances.docker] \
                     or [service.instances.swarm]"
                ));
                return;
            }
        };
        if !self.interfaces.contains(bridge) {
            out.push(format!(
                "{at}: interfaces: must include the instances' bridge {bridge:?}, where their replies arrive"
            ));
        }
        if self.protocol == Protocol::Udp && self.health_check.is_none() {
            out.push(format!("{at}: health_check: scaled UDP services need an explicit check (a TCP or HTTP port)"));
        }
    }

    /// Swarm tasks on every node, at the node's address: replies from
    /// another node go by its own routes, past the load balancer, unless
    /// full NAT makes the load balancer their destination.
    fn host_publish_problems(&self, at: &str) -> Vec<String> {
        match self.mode {
            ForwardMode::FullNat => Vec::new(),
            ForwardMode::Nat => vec![format!(
                "{at}: mode: \"nat\" (the default) cannot serve instances.swarm.publish = \"host\": tasks run on every node \
                 and a node's replies would not come back through the load balancer; set mode = \"full-nat\""
            )],
            // Refused for any instances already.
            ForwardMode::DsrIpip => Vec::new(),
        }
    }

    pub fn key(&self) -> crate::core::vip::VipKey {
        crate::core::vip::VipKey::new(self.vip, self.port, self.protocol.number())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [[service]]
        name = "web"
        vip = "10.0.0.100"
        port = 80
        protocol = "tcp"
        interfaces = ["eth0", "eth1"]
        [[service.backend]]
        address = "192.168.1.10:8080"
        weight = 2
        [[service.backend]]
        address = "192.168.1.11:8080"

        [[service]]
        name = "dns"
        vip = "10.0.0.100"
        port = 53
        protocol = "udp"
        interfaces = ["eth0"]
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.services[0].backends[1].weight, 1);
        assert_eq!(c.services[1].protocol, Protocol::Udp);
        assert!(c.services[1].backends.is_empty());
    }

    #[test]
    fn dataplane_defaults_and_limits() {
        let d = parse(GOOD).unwrap().dataplane;
        assert_eq!((d.max_flows, d.non_syn_flows_per_sec), (1 << 20, 50_000));
        let c = parse(&format!("{GOOD}\n[dataplane]\nmax_flows = 4096\nnon_syn_flows_per_sec = 10\n")).unwrap();
        assert_eq!(
            c.dataplane,
            DataplaneConfig { max_flows: 4096, non_syn_flows_per_sec: 10, ..DataplaneConfig::default() }
        );
        let err = parse(&format!("{GOOD}\n[dataplane]\nmax_flows = 0\n")).unwrap_err().to_string();
        assert!(err.contains("dataplane.max_flows"), "{err}");
    }

    #[test]
    fn swarm_on_every_node_needs_full_nat_and_no_bridge() {
        let swarm = |mode: &str| {
            format!(
                "[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\ninterfaces = [\"eth0\"]\n{mode}\n\
                 [service.scaling]\nmin_replicas = 2\nmax_replicas = 2\n[service.instances.swarm]\nimage = \"w\"\n\
                 port = 8080\npublish = \"host\"\n"
            )
        };
        let c = parse(&swarm("mode = \"full-nat\"")).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.services[0].instances.as_ref().is_some_and(|i| i.net().is_none()), "no local bridge or subnet");
        assert_eq!(
            problems(&swarm("")),
            ["service[0] \"web\": mode: \"nat\" (the default) cannot serve instances.swarm.publish = \"host\": \
              tasks run on every node and a node's replies would not come back through the load balancer; set mode \
              = \"full-nat\""]
        );
        let bridge = swarm("mode = \"full-nat\"").replace("publish = \"host\"\n", "");
        assert!(
            problems(&bridge).iter().any(|p| p.contains("interfaces: must include the instances' bridge \"lbs0\"")),
            "the bridge still needs its interface"
        );
    }

    #[test]
    fn full_nat_takes_a_source_and_a_sane_port_range() {
        let web = |extra: &str| crate::testing::web(extra, &["10.1.0.1:8080"]);
        let c = parse(&web("mode = \"full-nat\"\nsource = \"10.0.0.1\"")).unwrap();
        assert_eq!(
            (c.services[0].mode, c.services[0].source),
            (ForwardMode::FullNat, Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))))
        );
        assert_eq!(c.services[0].mode.to_string(), "full-nat");
        assert_eq!(parse(&web("")).unwrap().services[0].mode, ForwardMode::Nat);
        assert_eq!(ForwardMode::Nat.to_string(), "dnat", "status keeps its word for plain NAT");
        let d = parse(&web("")).unwrap().dataplane;
        assert_eq!((d.snat_port_min, d.snat_port_max), (61000, 65535));
        let c = parse(&format!("{}\n[dataplane]\nsnat_port_min = 40000\nsnat_port_max = 40003\n", web(""))).unwrap();
        assert_eq!((c.dataplane.snat_port_min, c.dataplane.snat_port_max), (40000, 40003));

        let p = problems(&web("source = \"10.0.0.1\""));
        assert_eq!(
            p,
            ["service[0] \"web\": source: 10.0.0.1 is only used with mode = \"full-nat\" or \"dsr-ipip\"; add one or remove it"]
        );
        let p = problems(&web("mode = \"full-nat\"\nsource = \"0.0.0.0\""));
        assert_eq!(p, ["service[0] \"web\": source: 0.0.0.0 cannot be an address backends reply to"]);
        let p = problems(&format!("{}\n[dataplane]\nsnat_port_min = 80\nsnat_port_max = 79\n", web("")));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("dataplane.snat_port_min: 80 is a well-known port"), "{p:?}");
        assert!(p[1].starts_with("dataplane.snat_port_max: 79 is below snat_port_min (80)"), "{p:?}");
        let err = parse(&web("mode = \"fullnat\"")).unwrap_err().to_string();
        assert!(err.contains("unknown variant `fullnat`"), "{err}");
    }

    #[test]
    fn socket_lb_is_on_by_default_and_takes_an_absolute_cgroup() {
        assert_eq!(parse(GOOD).unwrap().socket_lb, SocketLbConfig { enabled: true, cgroup: None });
        let c = parse(&format!("{GOOD}\n[socket_lb]\nenabled = false\n")).unwrap();
        assert!(!c.socket_lb.enabled);
        let c = parse(&format!("{GOOD}\n[socket_lb]\ncgroup = \"/sys/fs/cgroup/lb\"\n")).unwrap();
        assert_eq!(c.socket_lb.cgroup.as_deref(), Some(Path::new("/sys/fs/cgroup/lb")));
        let p = problems(&format!("{GOOD}\n[socket_lb]\ncgroup = \"lb\"\n"));
        assert_eq!(p, vec!["socket_lb.cgroup: lb must be an absolute path".to_owned()]);
    }

    #[test]
    fn interface_checksums_default_to_auto_and_can_be_set() {
        let c = parse(&format!("{GOOD}\n[interface.eth1]\nchecksums = \"complete\"\n")).unwrap();
        assert_eq!(c.checksums("eth1"), ChecksumMode::Complete);
        assert_eq!(c.checksums("eth0"), ChecksumMode::Auto);
        let c = parse(&format!("{GOOD}\n[interface.eth0]\nchecksums = \"may-be-partial\"\n")).unwrap();
        assert_eq!(c.checksums("eth0"), ChecksumMode::MayBePartial);
        assert_eq!(c.fast_path("eth0"), FastPathMode::Auto);
        let c = parse(&format!("{GOOD}\n[interface.eth0]\nfast_path = \"on\"\n")).unwrap();
        assert_eq!(c.fast_path("eth0"), FastPathMode::On);
        assert_eq!(c.checksums("eth0"), ChecksumMode::Auto);
        assert_eq!(c.hook("eth0"), HookMode::Auto);
        let c = parse(&format!("{GOOD}\n[interface.eth0]\nhook = \"tc\"\n")).unwrap();
        assert_eq!(c.hook("eth0"), HookMode::Tc);
        assert!(parse(&format!("{GOOD}\n[interface.eth0]\nhook = \"tcx\"\n")).is_err());
        assert_eq!(c.interface("eth0").xdp_mode, XdpAttach::Auto);
        let c = parse(&format!("{GOOD}\n[interface.eth0]\nxdp_mode = \"generic\"\n")).unwrap();
        assert_eq!(c.interface("eth0").xdp_mode, XdpAttach::Generic);
        assert!(parse(&format!("{GOOD}\n[interface.eth0]\nxdp_mode = \"skb\"\n")).is_err());
    }

    #[test]
    fn interface_settings_must_name_a_used_interface_and_a_known_mode() {
        let p = problems(&format!("{GOOD}\n[interface.eth9]\nchecksums = \"complete\"\n"));
        assert_eq!(p, vec!["interface.eth9: no service names this interface in its `interfaces`".to_owned()]);
        let err = parse(&format!("{GOOD}\n[interface.eth0]\nchecksums = \"partial\"\n")).unwrap_err().to_string();
        assert!(err.contains("partial") && err.contains("may-be-partial"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let err = parse(&GOOD.replace("weight = 2", "wieght = 2")).unwrap_err().to_string();
        assert!(err.contains("wieght"), "{err}");
    }

    #[test]
    fn every_unknown_key_is_listed_with_its_line_and_the_nearest_key() {
        let bad = GOOD
            .replace("protocol = \"tcp\"", "protcol = \"tcp\"")
            .replace("weight = 2", "wieght = 2")
            .replace("port = 53", "port = 53\ncolour = \"red\"")
            .replace("interfaces = [\"eth0\"]", "interfaces = [\"eth0\"]\nhealth_check = { intervall = \"1s\" }")
            + "\n[interface.eth0]\nfastpath = \"on\"\n[dataplane]\nweight = 3\nflows = 9\n";
        let p = problems(&bad);
        assert_eq!(
            p,
            [
                "service[0].protcol (line 6): unknown key; did you mean `protocol`?",
                "service[0].backend[0].wieght (line 10): unknown key; did you mean `weight`?",
                "service[1].colour (line 18): unknown key; keys here: name, vip, port, protocol, interfaces, \
                 backend, health_check, drain_timeout, slow_start, scaling, instances, mode, source",
                "service[1].health_check.intervall (line 21): unknown key; did you mean `interval`?",
                "interface.eth0.fastpath (line 24): unknown key; did you mean `fast_path`?",
                "dataplane.weight (line 26): unknown key; `weight` is a key of [service.backend]",
                "dataplane.flows (line 27): unknown key; did you mean `max_flows`?",
            ],
            "{p:#?}"
        );
    }

    #[test]
    fn unknown_keys_come_with_the_error_they_caused() {
        let err = parse(&GOOD.replace("port = 80", "prot = 80")).unwrap_err().to_string();
        for want in ["missing field `port`", "service[0].prot (line 5): unknown key; did you mean `port`?"] {
            assert!(err.contains(want), "{want:?} not in {err}");
        }
    }

    #[test]
    fn a_vip_with_a_port_says_where_the_port_goes() {
        let err = parse(&GOOD.replacen("vip = \"10.0.0.100\"", "vip = \"10.0.0.100:80\"", 1)).unwrap_err().to_string();
        assert!(
            err.contains(r#""10.0.0.100:80": the vip is an address only; write vip = "10.0.0.100" and port = 80"#),
            "{err}"
        );
        let err = parse(&GOOD.replacen("vip = \"10.0.0.100\"", "vip = \"web\"", 1)).unwrap_err().to_string();
        assert!(err.contains(r#""web" is not an IPv4 or IPv6 address"#), "{err}");
    }

    #[test]
    fn the_key_tables_come_from_the_structs() {
        let tables = keys::tables::<Config>();
        let keys = |path: &str| tables.iter().find(|t| t.path == path).map(|t| t.keys.to_vec());
        assert_eq!(keys(""), Some(vec!["service", "interface", "socket_lb", "dataplane"]));
        assert_eq!(keys("service.backend"), Some(vec!["address", "weight"]));
        assert_eq!(keys("interface.<name>"), Some(vec!["hook", "checksums", "fast_path", "xdp_mode"]));
        for path in [
            "service.health_check",
            "service.scaling.target",
            "service.scaling.threshold.down",
            "service.scaling.scale_down",
            "service.instances.docker",
            "service.instances.requests",
        ] {
            assert!(keys(path).is_some(), "no table {path} in {tables:#?}");
        }
        assert!(keys("service.instances.docker.env").is_none(), "env is a map of strings");
    }

    #[test]
    fn bad_address_is_refused_with_its_place() {
        let err = parse(&GOOD.replace("192.168.1.10:8080", "192.168.1.10")).unwrap_err().to_string();
        assert!(err.contains("address"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn bad_protocol_is_refused() {
        let err = parse(&GOOD.replace("\"udp\"", "\"sctp\"")).unwrap_err().to_string();
        assert!(err.contains("sctp"), "{err}");
    }

    #[test]
    fn every_problem_is_listed_with_its_place() {
        let bad = GOOD
            .replace("port = 80", "port = 0")
            .replace("weight = 2", "weight = 20000")
            .replace("192.168.1.11:8080", "192.168.1.10:8080")
            .replace("name = \"dns\"", "name = \"web\"")
            .replace("interfaces = [\"eth0\"]", "interfaces = []");
        let p = problems(&bad);
        let want = [
            "service[0] \"web\": port: must be 1-65535",
            "service[0] \"web\": backend[0].weight: 20000 is above the maximum 10000",
            "service[0] \"web\": backend[1].address: 192.168.1.10:8080 is listed twice",
            "service[1] \"web\": name: used by an earlier service",
            "service[1] \"web\": interfaces: name at least one interface to attach to",
        ];
        for w in want {
            assert!(p.iter().any(|x| x == w), "missing {w:?} in {p:#?}");
        }
        assert_eq!(p.len(), want.len(), "{p:#?}");
    }

    #[test]
    fn duplicate_service_key_is_refused() {
        let bad = GOOD.replace("port = 53", "port = 80").replace("\"udp\"", "\"tcp\"");
        let p = problems(&bad);
        assert!(p.iter().any(|x| x.contains("10.0.0.100:80/tcp is configured twice")), "{p:#?}");
    }

    #[test]
    fn loopback_and_unspecified_backends_are_refused_with_their_place() {
        for ip in ["127.0.0.1", "127.9.9.9", "0.0.0.0"] {
            let p = problems(&GOOD.replace("192.168.1.11", ip));
            assert_eq!(p.len(), 1, "{p:#?}");
            assert!(
                p[0].starts_with(&format!("service[0] \"web\": backend[1].address: {ip}:8080 cannot be")),
                "{p:#?}"
            );
        }
        assert!(problems(&GOOD.replace("192.168.1.11", "127.0.0.1"))[0].contains("loopback"));
    }

    #[test]
    fn backend_on_the_vip_is_refused() {
        let p = problems(&GOOD.replace("192.168.1.10:8080", "10.0.0.100:8080"));
        assert!(p.iter().any(|x| x.contains("is the service's own VIP")), "{p:#?}");
    }

    #[test]
    fn health_check_defaults_and_durations() {
        let c = parse(&GOOD.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\ndrain_timeout = \"5s\"\nhealth_check = { kind = \"http\", path = \"/healthz\", interval = \"200ms\" }",
        ))
        .unwrap();
        let s = &c.services[0];
        assert_eq!(s.drain_timeout, Duration::from_secs(5));
        let h = s.health_check.as_ref().unwrap();
        assert_eq!((h.kind, h.path.as_str(), h.expect_status), (CheckKind::Http, "/healthz", 200));
        assert_eq!(
            (h.interval, h.timeout(), h.rise, h.fall),
            (Duration::from_millis(200), Duration::from_millis(200), 2, 3)
        );
        assert_eq!(c.services[1].drain_timeout, Duration::from_secs(30));
    }

    #[test]
    fn slow_start_is_off_by_default_and_at_most_an_hour() {
        let c = parse(&GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nslow_start = \"30s\"")).unwrap();
        assert_eq!((c.services[0].slow_start, c.services[1].slow_start), (Duration::from_secs(30), Duration::ZERO));
        let p = problems(&GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nslow_start = \"2h\""));
        assert_eq!(p, ["service[0] \"web\": slow_start: 7200s is above the maximum 1h"], "{p:#?}");
        let err = parse(&GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nslow_start = \"soon\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("slow_start") && err.contains("is not a duration"), "{err}");
    }

    #[test]
    fn bad_durations_and_checks_are_refused() {
        let err = parse(&GOOD.replace("protocol = \"tcp\"", "protocol = \"tcp\"\ndrain_timeout = \"5 parsecs\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unit must be ms, s, m or h"), "{err}");
        let p = problems(&GOOD.replace(
            "protocol = \"tcp\"",
            "protocol = \"tcp\"\nhealth_check = { kind = \"http\", path = \"healthz\", interval = \"1s\", timeout = \"2s\" }",
        ));
        assert!(p.iter().any(|x| x.contains("health_check.path")), "{p:#?}");
        assert!(p.iter().any(|x| x.contains("health_check.timeout")), "{p:#?}");
    }

    const SCALED: &str = r#"
        [[service]]
        name = "web"
        vip = "10.0.0.100"
        port = 80
        interfaces = ["eth0", "lbp0"]
        [service.scaling]
        min_replicas = 1
        max_replicas = 4
        target = { cpu = 50.0 }
        [service.instances]
        timeline = "/tmp/web.jsonl"
        [service.instances.process]
        command = ["/usr/local/bin/lb-backend", "--listen", "{addr}", "--name", "{name}"]
        port = 8080
    "#;

    #[test]
    fn scaled_service_parses() {
        let c = parse(SCALED).unwrap();
        let s = &c.services[0];
        assert_eq!(s.scaling.as_ref().unwrap().max_replicas, 4);
        let i = s.instances.as_ref().unwrap();
        assert_eq!(i.process.as_ref().unwrap().bridge, "lbp0");
        assert_eq!(i.ready_timeout, Duration::from_secs(30));
        assert_eq!((i.timeline_max_bytes, i.timeline_keep), (64 << 20, 2));
        let small = SCALED.replace(
            "timeline = \"/tmp/web.jsonl\"",
            "timeline = \"/tmp/web.jsonl\"\ntimeline_max_bytes = 1000000\ntimeline_keep = 0",
        );
        let i = parse(&small).unwrap().services[0].instances.clone().unwrap();
        assert_eq!(i.timeline_rotation(), instances::TimelineRotation { max_bytes: 1_000_000, keep: 0 });
        let p = problems(&small.replace("1000000", "1000").replace("keep = 0", "keep = 101"));
        assert_eq!(
            p,
            [
                "service[0] \"web\": instances.timeline_max_bytes: 1000 is below the minimum 65536",
                "service[0] \"web\": instances.timeline_keep: 101 is above the maximum 100",
            ]
        );
    }

    #[test]
    fn requests_per_second_needs_a_counter_to_read() {
        let rps = SCALED.replace("target = { cpu = 50.0 }", "target = { requests_per_second = 30.0 }");
        let p = problems(&rps);
        assert!(p.iter().any(|x| x.contains("requests_per_second needs [service.instances.requests]")), "{p:#?}");
        let with = rps.replace(
            "timeline = \"/tmp/web.jsonl\"",
            "timeline = \"/tmp/web.jsonl\"\nrequests = { counter = 'demo_backend_requests_total{route=\"/\"}' }",
        );
        let c = parse(&with).unwrap();
        let r = c.services[0].instances.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!((r.path.as_str(), r.counter.as_str()), ("/metrics", r#"demo_backend_requests_total{route="/"}"#));
        let p = problems(&with.replace("route=\"/\"", "route=/"));
        assert!(p.iter().any(|x| x.contains("instances.requests.counter")), "{p:#?}");
    }

    #[test]
    fn scaled_service_mistakes_are_named() {
        let p = problems(&SCALED.replace("interfaces = [\"eth0\", \"lbp0\"]", "interfaces = [\"eth0\"]"));
        assert!(p.iter().any(|x| x.contains("must include the instances' bridge \"lbp0\"")), "{p:#?}");
        let p = problems(&(SCALED.to_owned() + "[[service.backend]]\naddress = \"10.1.0.1:80\"\n"));
        assert!(p.iter().any(|x| x.contains("not both")), "{p:#?}");
        let no_scaling = SCALED.replace(
            "[service.scaling]\n        min_replicas = 1\n        max_replicas = 4\n        target = { cpu = 50.0 }\n",
            "",
        );
        let p = problems(&no_scaling);
        assert!(p.iter().any(|x| x.contains("instances: needs [service.scaling]")), "{p:#?}");
    }

    #[test]
    fn two_process_services_cannot_share_a_bridge_or_a_subnet() {
        use crate::testing::scaled_service;
        let two = |b: &str| format!("{}{b}", scaled_service("web", 100, 0, (1, 2), ""));
        assert!(parse(&two(&scaled_service("api", 101, 1, (1, 2), ""))).is_ok());

        let p = problems(&two(&scaled_service("api", 101, 0, (1, 2), "")));
        assert_eq!(
            p,
            [
                "service[1] \"api\": instances.process.bridge: \"lbp0\" is also the bridge of service[0] \"web\" \
                 (instances.process.bridge); each service's instances need a bridge of their own",
                "service[1] \"api\": instances.process.prefix: 10.212.0.0/24 overlaps 10.212.0.0/24 of service[0] \
                 \"web\" (instances.process.prefix); each service's instances need addresses of their own",
            ],
        );

        let api = scaled_service("api", 101, 1, (1, 2), "").replace("10.213.0.0", "10.212.0.0");
        let p = problems(&two(&api));
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].contains("instances.process.prefix: 10.212.0.0/24 overlaps"), "{p:#?}");
    }

    #[test]
    fn instance_subnets_are_checked_across_kinds_and_against_vips_and_backends() {
        use crate::testing::scaled_service;
        let docker = |name: &str, net: &str, bridge: &str, subnet: &str| {
            format!(
                "[[service]]\nname = \"{name}\"\nvip = \"10.0.1.1\"\nport = 80\ninterfaces = [\"eth0\", \"{bridge}\"]\n\
                 [service.scaling]\nmin_replicas = 1\nmax_replicas = 1\n[service.instances.docker]\nimage = \"w\"\n\
                 port = 8080\nnetwork = \"{net}\"\nbridge = \"{bridge}\"\nsubnet = \"{subnet}\"\n"
            )
        };
        let web = scaled_service("web", 100, 0, (1, 2), "");
        let p = problems(&format!("{web}{}", docker("box", "n1", "lbd0", "10.212.0.0/16")));
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].starts_with("service[1] \"box\": instances.docker.subnet: 10.212.0.0/16 overlaps 10.212.0.0/24 of service[0] \"web\""),
            "{p:#?}"
        );

        // Services may share a Docker network if they agree on it.
        let shared = docker("a", "n1", "lbd0", "10.220.0.0/24") + &docker("b", "n1", "lbd0", "10.220.0.0/24");
        let shared = shared.replacen("10.0.1.1", "10.0.1.2", 1);
        assert!(parse(&shared).is_ok(), "{:?}", parse(&shared));
        let p = problems(&shared.replacen("10.220.0.0/24", "10.221.0.0/24", 1));
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].contains("network \"n1\" (bridge \"lbd0\", subnet 10.220.0.0/24) is also the network of service[0]"),
            "{p:#?}"
        );
        let p = problems(
            &(docker("a", "n1", "lbd0", "10.220.0.0/24") + &docker("b", "n2", "lbd0", "10.221.0.0/24"))
                .replacen("10.0.1.1", "10.0.1.2", 1),
        );
        assert!(p.len() == 1 && p[0].contains("instances.docker.bridge: \"lbd0\" is also the bridge"), "{p:#?}");

        let p = problems(&format!(
            "{web}{GOOD}",
            GOOD = GOOD
                .replace("\"web\"", "\"www\"")
                .replace("10.0.0.100", "10.212.0.9")
                .replace("192.168.1.11", "10.212.0.7")
        ));
        assert_eq!(
            p,
            [
                "service[1] \"www\": vip: 10.212.0.9 is inside 10.212.0.0/24 (instances.process.prefix) of service[0] \
                 \"web\", whose addresses its orchestrator hands out",
                "service[1] \"www\": backend[1].address: 10.212.0.7 is inside 10.212.0.0/24 (instances.process.prefix) \
                 of service[0] \"web\", whose addresses its orchestrator hands out",
                "service[2] \"dns\": vip: 10.212.0.9 is inside 10.212.0.0/24 (instances.process.prefix) of service[0] \
                 \"web\", whose addresses its orchestrator hands out",
            ],
            "{p:#?}"
        );
    }

    #[test]
    fn service_key_is_network_order() {
        let c = parse(GOOD).unwrap();
        let crate::core::vip::VipKey::V4(k) = c.services[0].key() else { panic!("an IPv4 key") };
        assert_eq!(k.vip_be.to_ne_bytes(), [10, 0, 0, 100]);
        assert_eq!(k.port_be.to_ne_bytes(), [0, 80]);
        assert_eq!(k.proto, PROTO_TCP);
    }

    const DSR: &str = r#"
        [[service]]
        name = "web"
        mode = "dsr-ipip"
        source = "10.1.0.1"
        health_check = { interval = "200ms" }
        vip = "10.0.0.10"
        port = 80
        interfaces = ["eth0"]
        [[service.backend]]
        address = "10.2.0.11:80"
    "#;

    #[test]
    fn the_forwarding_mode_defaults_to_nat_and_takes_dsr_ipip_with_its_needs() {
        assert_eq!(parse(GOOD).unwrap().services[0].mode, ForwardMode::Nat);
        let c = parse(DSR).unwrap();
        assert_eq!(
            (c.services[0].mode, c.services[0].source),
            (ForwardMode::DsrIpip, Some(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1))))
        );
        assert_eq!(
            (c.services[0].mode.number(), c.services[0].mode.to_string()),
            (lb_common::MODE_DSR_IPIP, "dsr-ipip".to_owned())
        );
        assert_dsr_needs(DSR, 80);
        // Full NAT takes a source too.
        assert_eq!(parse(&DSR.replace("\"dsr-ipip\"", "\"full-nat\"")).unwrap().services[0].mode, ForwardMode::FullNat);
        assert!(matches!(parse(&DSR.replace("\"dsr-ipip\"", "\"dsr\"")), Err(ConfigError::Parse { .. })));
    }

    /// `text`, a dsr-ipip service on `port` whose backend is 10.2.0.11,
    /// each time with one of its needs taken away: refused, for that alone.
    fn assert_dsr_needs(text: &str, port: u16) {
        for (without, why) in [
            (text.replace("source = \"10.1.0.1\"", ""), "service[0] \"web\": source: mode \"dsr-ipip\" needs"),
            (
                text.replace(&format!("10.2.0.11:{port}"), "10.2.0.11:8080"),
                "service[0] \"web\": backend[0].address: 10.2.0.11:8080: in mode \"dsr-ipip\"",
            ),
            (
                text.replace("health_check = { interval = \"200ms\" }", ""),
                "service[0] \"web\": health_check: mode \"dsr-ipip\" needs one",
            ),
        ] {
            let p = problems(&without);
            assert!(p.len() == 1 && p[0].starts_with(why), "{why}: {p:?}");
        }
    }

    #[test]
    fn a_udp_service_takes_dsr_ipip_with_the_same_needs() {
        let udp = DSR.replace("port = 80", "port = 53\nprotocol = \"udp\"").replace("10.2.0.11:80", "10.2.0.11:53");
        let c = parse(&udp).unwrap();
        assert_eq!((c.services[0].mode, c.services[0].protocol), (ForwardMode::DsrIpip, Protocol::Udp));
        assert_dsr_needs(&udp, 53);
    }
}
