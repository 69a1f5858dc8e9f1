//! `[service.instances]`: where a scaled service's instances come from (local
//! processes or Docker containers), and the request counter read off each.
//! The orchestrators themselves are `adapters::process` and
//! `adapters::docker`; the scraper is `adapters::requests`.

use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use serde::Deserialize;

use super::duration;

/// `[service.instances]`: one orchestrator, and how the agent runs it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct InstancesConfig {
    /// Instances as local processes, each in a network namespace.
    #[serde(default)]
    pub process: Option<ProcessSpec>,
    /// Instances as Docker containers on a bridge network.
    #[serde(default)]
    pub docker: Option<DockerSpec>,
    /// Instances as Docker Swarm services, one per instance.
    #[serde(default)]
    pub swarm: Option<SwarmSpec>,
    /// How long a new instance may take to pass its first health check
    /// before it is stopped and counted as failed.
    #[serde(default = "default_ready_timeout", with = "duration")]
    pub ready_timeout: Duration,
    /// Every scaling decision is appended here as a JSON line.
    #[serde(default)]
    pub timeline: Option<PathBuf>,
    /// The timeline is rotated before a write would take it past this
    /// many bytes: the file becomes `<timeline>.1`, `.1` becomes `.2`, ...
    #[serde(default = "default_timeline_max_bytes")]
    pub timeline_max_bytes: u64,
    /// Rotated timeline files kept (`.1`, the newest, to `.<n>`); 0 keeps
    /// none.
    #[serde(default = "default_timeline_keep")]
    pub timeline_keep: u32,
    /// Count each instance's requests from its metrics page, for
    /// `requests_per_second` rules.
    #[serde(default)]
    pub requests: Option<RequestsMetric>,
}

fn default_ready_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_timeline_max_bytes() -> u64 {
    64 << 20
}

fn default_timeline_keep() -> u32 {
    2
}

/// Below this, a timeline would rotate every few decisions.
const MIN_TIMELINE_BYTES: u64 = 64 << 10;
const MAX_TIMELINE_KEEP: u32 = 100;

/// When the timeline file is rotated, and how many old ones are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimelineRotation {
    pub max_bytes: u64,
    pub keep: u32,
}

impl InstancesConfig {
    pub fn timeline_rotation(&self) -> TimelineRotation {
        TimelineRotation { max_bytes: self.timeline_max_bytes, keep: self.timeline_keep }
    }

    /// The bridge and subnet of the one orchestrator named (`None` when
    /// none or both are: a problem reported on its own).
    pub fn net(&self) -> Option<InstanceNet<'_>> {
        match (&self.process, &self.docker, &self.swarm) {
            (Some(p), None, None) => Some(InstanceNet {
                kind: "process",
                bridge: &p.bridge,
                subnet_key: "prefix",
                subnet: p.subnet(),
                network: None,
            }),
            (None, Some(d), None) => Some(d.net("docker")),
            (None, None, Some(s)) if s.publish == SwarmPublish::Bridge => Some(s.container.net("swarm")),
            _ => None,
        }
    }

    /// Problems of the timeline settings, each prefixed with `at`.
    pub fn timeline_problems(&self, at: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.timeline_max_bytes < MIN_TIMELINE_BYTES {
            out.push(format!(
                "{at}.timeline_max_bytes: {} is below the minimum {MIN_TIMELINE_BYTES}",
                self.timeline_max_bytes
            ));
        }
        if self.timeline_keep > MAX_TIMELINE_KEEP {
            out.push(format!("{at}.timeline_keep: {} is above the maximum {MAX_TIMELINE_KEEP}", self.timeline_keep));
        }
        out
    }
}

/// How long a stopping instance gets between SIGTERM and SIGKILL, unless
/// its spec says otherwise.
fn default_grace() -> Duration {
    Duration::from_secs(10)
}

/// A command argument or an environment value with `{ip}`, `{port}`,
/// `{addr}` (ip:port) and `{name}` filled in for one instance.
pub fn fill_placeholders(template: &str, addr: SocketAddrV4, name: &str) -> String {
    let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
    template.replace("{ip}", &ip).replace("{port}", &port).replace("{addr}", &addr.to_string()).replace("{name}", name)
}

/// `[service.instances.process]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ProcessSpec {
    /// Program and arguments. `{ip}`, `{port}`, `{addr}` (ip:port) and
    /// `{name}` are replaced per instance.
    pub command: Vec<String>,
    /// Port the instances listen on.
    pub port: u16,
    /// Bridge in the agent's namespace that instances join (created if
    /// missing; list it in the service's `interfaces`).
    #[serde(default = "default_process_bridge")]
    pub bridge: String,
    /// First three octets of the instances' /24: the bridge is `.1`,
    /// instances `.2` to `.254`.
    #[serde(default = "default_prefix")]
    pub prefix: Ipv4Addr,
    /// How long a stopping instance gets between SIGTERM and SIGKILL.
    #[serde(default = "default_grace", with = "duration")]
    pub stop_grace: Duration,
}

fn default_process_bridge() -> String {
    "lbp0".into()
}
fn default_prefix() -> Ipv4Addr {
    Ipv4Addr::new(10, 212, 0, 0)
}

impl ProcessSpec {
    pub fn problems(&self, at: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.command.is_empty() || self.command[0].is_empty() {
            out.push(format!("{at}.command: name the program to run"));
        }
        if self.port == 0 {
            out.push(format!("{at}.port: must be 1-65535"));
        }
        // Instance links are "<bridge>-<n>" with n up to 3 digits: 15 bytes at most.
        if self.bridge.is_empty() || self.bridge.len() > 11 || !self.bridge.bytes().all(|b| b.is_ascii_alphanumeric()) {
            out.push(format!("{at}.bridge: {:?} must be 1-11 letters or digits", self.bridge));
        }
        if self.prefix.octets()[3] != 0 {
            out.push(format!("{at}.prefix: {} must end in .0 (a /24)", self.prefix));
        }
        out
    }

    /// The address of slot `n` in the instances' /24 (the bridge is 1).
    pub fn ip(&self, n: u8) -> Ipv4Addr {
        let [a, b, c, _] = self.prefix.octets();
        Ipv4Addr::new(a, b, c, n)
    }

    /// The instances' /24.
    pub fn subnet(&self) -> Ipv4Subnet {
        Ipv4Subnet { base: self.ip(0), prefix_len: 24 }
    }
}

/// Where a service's instances live: the bridge they join and the subnet
/// their addresses come from, as `[service.instances]` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceNet<'a> {
    /// `process` or `docker`: the table under `[service.instances]`.
    pub kind: &'static str,
    pub bridge: &'a str,
    /// The key that sets the subnet: `prefix` or `subnet`.
    pub subnet_key: &'static str,
    pub subnet: Ipv4Subnet,
    /// Docker only: the network, which services may share.
    pub network: Option<&'a str>,
}

impl InstanceNet<'_> {
    /// Both on one Docker network. Services may share one (the engine
    /// hands out its addresses) if they agree on its bridge and subnet.
    pub fn same_docker_network(&self, other: &InstanceNet<'_>) -> bool {
        self.network.is_some() && self.network == other.network
    }

    /// Why `self` (of service `at`) and `other` (of `other_at`) cannot
    /// both be used, one line per clash, each naming the keys and values.
    pub fn clashes(&self, at: &str, other: &InstanceNet<'_>, other_at: &str) -> Vec<String> {
        let mut out = Vec::new();
        let key = |n: &InstanceNet<'_>, k: &str| format!("instances.{}.{k}", n.kind);
        if self.same_docker_network(other) {
            if self.bridge != other.bridge || self.subnet != other.subnet {
                out.push(format!(
                    "{at}: {}: network {:?} (bridge {:?}, subnet {}) is also the network of {other_at} with bridge \
                     {:?} and subnet {}; a shared network needs the same bridge and subnet",
                    key(self, "network"),
                    self.network.unwrap_or_default(),
                    self.bridge,
                    self.subnet,
                    other.bridge,
                    other.subnet
                ));
            }
            return out;
        }
        if self.bridge == other.bridge {
            out.push(format!(
                "{at}: {}: {:?} is also the bridge of {other_at} ({}); each service's instances need a bridge of \
                 their own",
                key(self, "bridge"),
                self.bridge,
                key(other, "bridge")
            ));
        }
        if self.subnet.overlaps(&other.subnet) {
            out.push(format!(
                "{at}: {}: {} overlaps {} of {other_at} ({}); each service's instances need addresses of their own",
                key(self, self.subnet_key),
                self.subnet,
                other.subnet,
                key(other, other.subnet_key)
            ));
        }
        out
    }
}

/// `[service.instances.docker]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct DockerSpec {
    /// Image to run (it must be present locally or pullable).
    pub image: String,
    /// Port the containers listen on.
    pub port: u16,
    /// User-defined bridge network the containers join (created if missing).
    #[serde(default = "default_network")]
    pub network: String,
    /// Linux name of the network's bridge (list it in the service's
    /// `interfaces`: the containers' replies arrive there).
    #[serde(default = "default_docker_bridge")]
    pub bridge: String,
    /// The network's subnet: the gateway (the host) is the first address,
    /// instances get the following ones.
    #[serde(default = "default_subnet")]
    pub subnet: Ipv4Subnet,
    /// Environment of each container. `{ip}`, `{port}`, `{addr}` (ip:port)
    /// and `{name}` are replaced per instance.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// CPU limit per container, in CPUs (`docker run --cpus`).
    #[serde(default)]
    pub cpus: Option<Cpus>,
    /// How long a stopping container gets between SIGTERM and SIGKILL
    /// (whole seconds; a fraction rounds up).
    #[serde(default = "default_grace", with = "duration")]
    pub stop_grace: Duration,
    /// Instance names are `<name_prefix>-<k>`, k = 1, 2, ... [default: the
    /// service's name]; containers are named `lb-<agent tag>-<instance name>`.
    #[serde(default)]
    pub name_prefix: Option<String>,
}

fn default_network() -> String {
    "lb-agent".into()
}
fn default_docker_bridge() -> String {
    "lbd0".into()
}
fn default_subnet() -> Ipv4Subnet {
    Ipv4Subnet { base: Ipv4Addr::new(10, 213, 0, 0), prefix_len: 24 }
}

/// An IPv4 network, `a.b.c.d/len`, with no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Subnet {
    pub base: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Subnet {
    /// Instance slots: offsets from the base address. Offset 0 is the
    /// network, 1 the gateway and the last one broadcast.
    pub fn slots(&self) -> std::ops::RangeInclusive<u32> {
        let size = 1u64 << (32 - u32::from(self.prefix_len));
        2..=(size.saturating_sub(2).min(u64::from(u32::MAX)) as u32)
    }

    pub fn addr(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base).wrapping_add(offset))
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.addr(1)
    }

    fn mask(&self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.base) & self.mask()
    }

    /// Some address is in both: one holds the other's base.
    pub fn overlaps(&self, other: &Ipv4Subnet) -> bool {
        self.contains(other.base) || other.contains(self.base)
    }

    /// The slot of `ip` in this subnet, if it is one.
    pub fn slot_of(&self, ip: Ipv4Addr) -> Option<u32> {
        let off = u32::from(ip).wrapping_sub(u32::from(self.base));
        self.slots().contains(&off).then_some(off)
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix_len)
    }
}

impl FromStr for Ipv4Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a subnet like \"10.213.0.0/24\"");
        let (ip, len) = s.split_once('/').ok_or_else(bad)?;
        let base: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix_len: u8 = len.parse().map_err(|_| bad())?;
        // At least one instance slot besides network, gateway and broadcast.
        if !(8..=29).contains(&prefix_len) {
            return Err(format!("{s:?}: prefix length must be 8-29"));
        }
        let mask = u32::MAX << (32 - u32::from(prefix_len));
        if u32::from(base) & !mask != 0 {
            return Err(format!(
                "{s:?} has host bits set; did you mean {}/{prefix_len}?",
                Ipv4Addr::from(u32::from(base) & mask)
            ));
        }
        Ok(Ipv4Subnet { base, prefix_len })
    }
}

impl<'de> Deserialize<'de> for Ipv4Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A CPU limit, kept as nano-CPUs (the API's unit) so the spec stays `Eq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpus {
    pub nano: i64,
}

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let cpus = f64::deserialize(d)?;
        if !cpus.is_finite() || cpus <= 0.0 || cpus > 1024.0 {
            return Err(serde::de::Error::custom(format!("cpus = {cpus} must be above 0 and at most 1024")));
        }
        Ok(Cpus { nano: (cpus * 1e9).round() as i64 })
    }
}

impl DockerSpec {
    pub fn problems(&self, at: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.image.trim().is_empty() {
            out.push(format!("{at}.image: name the image to run"));
        }
        if self.port == 0 {
            out.push(format!("{at}.port: must be 1-65535"));
        }
        if !is_docker_name(&self.network) {
            out.push(format!("{at}.network: {:?} is not a valid Docker network name", self.network));
        }
        if self.bridge.is_empty()
            || self.bridge.len() > 15
            || !self.bridge.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            out.push(format!("{at}.bridge: {:?} must be 1-15 letters, digits, '-' or '_'", self.bridge));
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') {
                out.push(format!("{at}.env: {key:?} is not a variable name"));
            }
        }
        if let Some(p) = &self.name_prefix {
            if !is_docker_name(p) {
                out.push(format!(
                    "{at}.name_prefix: {p:?} must start with a letter or digit and hold only those and _ . -"
                ));
            }
        }
        if self.stop_grace > Duration::from_secs(3600) {
            out.push(format!("{at}.stop_grace: {:?} is above the maximum 1h", self.stop_grace));
        }
        out
    }

    /// The grace period in whole seconds, rounded up, as the API takes it.
    pub fn grace_secs(&self) -> i32 {
        let s = self.stop_grace.as_secs() + u64::from(self.stop_grace.subsec_nanos() > 0);
        i32::try_from(s).unwrap_or(i32::MAX)
    }

    /// The containers' environment for the instance at `ip` named `name`.
    pub fn env_for(&self, ip: Ipv4Addr, name: &str) -> Vec<String> {
        let addr = SocketAddrV4::new(ip, self.port);
        self.env.iter().map(|(k, v)| format!("{k}={}", fill_placeholders(v, addr, name))).collect()
    }
}

impl DockerSpec {
    /// Where its containers live, under `[service.instances.<kind>]`.
    fn net(&self, kind: &'static str) -> InstanceNet<'_> {
        InstanceNet {
            kind,
            bridge: &self.bridge,
            subnet_key: "subnet",
            subnet: self.subnet,
            network: Some(&self.network),
        }
    }
}

/// `[service.instances.swarm]`: the keys of `[service.instances.docker]`
/// (other defaults: network `lb-swarm`, bridge `lbs0`, subnet
/// 10.214.0.0/24), `init` and `publish`. `{ip}` and `{addr}` in `env` are
/// 0.0.0.0 (Swarm gives the address when it places the task).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwarmSpec {
    pub container: DockerSpec,
    /// Make this engine a single-node swarm if it is in none.
    pub init: bool,
    /// How the load balancer reaches the tasks.
    pub publish: SwarmPublish,
    /// Keys set that `publish` does not use (refused by `problems`).
    pub unused_keys: Vec<&'static str>,
}

/// `publish` under `[service.instances.swarm]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SwarmPublish {
    /// Tasks on a swarm-scoped bridge network of the agent's node, reached
    /// at their own addresses: the agent's node only.
    #[default]
    Bridge,
    /// Tasks anywhere in the swarm, on an overlay network, each instance's
    /// port published in host mode on a port of `min..=max` that the agent
    /// picks: reached at the node's address and that port.
    Host { min: u16, max: u16 },
}

impl SwarmSpec {
    /// Config problems, each prefixed with `at`.
    pub fn problems(&self, at: &str) -> Vec<String> {
        let mut out = self.container.problems(at);
        let why = match self.publish {
            SwarmPublish::Bridge => "only used with publish = \"host\"",
            SwarmPublish::Host { .. } => "not used with publish = \"host\" (the tasks join an overlay network)",
        };
        out.extend(self.unused_keys.iter().map(|k| format!("{at}.{k}: {why}; remove it")));
        if let SwarmPublish::Host { min, max } = self.publish {
            if min == 0 {
                out.push(format!("{at}.host_port_min: must be 1-65535"));
            }
            if max < min {
                out.push(format!("{at}.host_port_max: {max} is below host_port_min ({min}): the range would be empty"));
            }
        }
        out
    }
}

/// The keys of `[service.instances.swarm]`, for serde.
#[derive(Deserialize)]
struct SwarmKeys {
    image: String,
    port: u16,
    #[serde(default = "default_swarm_network")]
    network: String,
    #[serde(default)]
    bridge: Option<String>,
    #[serde(default)]
    subnet: Option<Ipv4Subnet>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cpus: Option<Cpus>,
    #[serde(default = "default_grace", with = "duration")]
    stop_grace: Duration,
    #[serde(default)]
    name_prefix: Option<String>,
    #[serde(default)]
    init: bool,
    #[serde(default)]
    publish: PublishKind,
    #[serde(default)]
    host_port_min: Option<u16>,
    #[serde(default)]
    host_port_max: Option<u16>,
}

#[derive(Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum PublishKind {
    #[default]
    Bridge,
    Host,
}

fn default_swarm_network() -> String {
    "lb-swarm".into()
}
fn default_swarm_bridge() -> String {
    "lbs0".into()
}
fn default_swarm_subnet() -> Ipv4Subnet {
    Ipv4Subnet { base: Ipv4Addr::new(10, 214, 0, 0), prefix_len: 24 }
}
/// Host-mode published ports, below Swarm's own range for ports it picks
/// (30000-32767) and the kernel's ephemeral range (32768-60999).
const DEFAULT_HOST_PORTS: (u16, u16) = (29000, 29999);

impl<'de> Deserialize<'de> for SwarmSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let k = SwarmKeys::deserialize(d)?;
        let set = |key: &'static str, is_set: bool| is_set.then_some(key);
        let (publish, unused_keys) = match k.publish {
            PublishKind::Bridge => (
                SwarmPublish::Bridge,
                [set("host_port_min", k.host_port_min.is_some()), set("host_port_max", k.host_port_max.is_some())]
                    .into_iter()
                    .flatten()
                    .collect(),
            ),
            PublishKind::Host => (
                SwarmPublish::Host {
                    min: k.host_port_min.unwrap_or(DEFAULT_HOST_PORTS.0),
                    max: k.host_port_max.unwrap_or(DEFAULT_HOST_PORTS.1),
                },
                [set("bridge", k.bridge.is_some()), set("subnet", k.subnet.is_some())].into_iter().flatten().collect(),
            ),
        };
        let container = DockerSpec {
            image: k.image,
            port: k.port,
            network: k.network,
            bridge: k.bridge.unwrap_or_else(default_swarm_bridge),
            subnet: k.subnet.unwrap_or_else(default_swarm_subnet),
            env: k.env,
            cpus: k.cpus,
            stop_grace: k.stop_grace,
            name_prefix: k.name_prefix,
        };
        Ok(SwarmSpec { container, init: k.init, publish, unused_keys })
    }
}

/// Docker's rule for container and network names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn is_docker_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
        && s.len() <= 200
}

/// `[service.instances.requests]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct RequestsMetric {
    /// Path of each instance's metrics page (Prometheus text format), on
    /// the instance's port.
    #[serde(default = "default_metrics_path")]
    pub path: String,
    /// The counter: `name` or `name{label="value",...}`; series with every
    /// one of those labels are summed, e.g.
    /// `demo_backend_requests_total{route="/"}` leaves health checks and
    /// scrapes out.
    pub counter: String,
}

fn default_metrics_path() -> String {
    "/metrics".into()
}

impl RequestsMetric {
    /// Config problems, each prefixed with `at`.
    pub fn problems(&self, at: &str) -> Vec<String> {
        let mut out = Vec::new();
        if !self.path.starts_with('/') || self.path.contains(char::is_whitespace) {
            out.push(format!("{at}.path: {:?} must start with / and hold no spaces", self.path));
        }
        if let Err(e) = self.counter.parse::<Selector>() {
            out.push(format!("{at}.counter: {e}"));
        }
        out
    }
}

/// A counter name and the labels a series must carry to count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    pub name: String,
    pub labels: Vec<(String, String)>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct SelectorError(String);

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Prometheus metric or label name.
pub fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| SelectorError(format!("{text:?}: {why}; write name or name{{label=\"value\"}}"));
        let (name, labels) = match text.trim().split_once('{') {
            None => (text.trim(), Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').ok_or_else(|| bad("no closing }"))?;
                (name.trim(), parse_labels(body).ok_or_else(|| bad("labels are not label=\"value\" pairs"))?)
            }
        };
        if !is_name(name) {
            return Err(bad("not a metric name"));
        }
        Ok(Selector { name: name.to_owned(), labels })
    }
}

/// `a="x",b="y"` (a trailing comma allowed; `\"`, `\\` and `\n` escapes):
/// Prometheus's label-set grammar, in selectors and in expositions alike.
pub fn parse_labels(body: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim();
        if !is_name(key) {
            return None;
        }
        let quoted = after.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((key.to_owned(), value));
        rest = quoted[end + 1..].trim_start();
        match rest.strip_prefix(',') {
            Some(r) => rest = r.trim_start(),
            None if rest.is_empty() => {}
            None => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A process orchestrator's spec with every placeholder in its command.
    pub(crate) fn process_spec() -> ProcessSpec {
        ProcessSpec {
            command: vec!["/bin/srv".into(), "--listen".into(), "{addr}".into(), "--name={name}".into()],
            port: 8080,
            bridge: "lbp0".into(),
            prefix: Ipv4Addr::new(10, 212, 0, 0),
            stop_grace: Duration::from_secs(1),
        }
    }

    fn docker_spec() -> DockerSpec {
        DockerSpec {
            image: "lb-demo-backend:dev".into(),
            port: 8080,
            network: "lb-agent".into(),
            bridge: "lbd0".into(),
            subnet: default_subnet(),
            env: BTreeMap::from([("LB_BACKEND_NAME".into(), "{name}".into()), ("LISTEN".into(), "{addr}".into())]),
            cpus: None,
            stop_grace: Duration::from_secs(5),
            name_prefix: None,
        }
    }

    fn parse(text: &str) -> Result<DockerSpec, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    #[test]
    fn spec_parses_with_defaults() {
        let s = parse("image = \"web:1\"\nport = 8080\ncpus = 0.5\nstop_grace = \"1500ms\"\nenv = { A = \"{ip}\" }")
            .unwrap();
        assert_eq!(s.network, "lb-agent");
        assert_eq!(s.bridge, "lbd0");
        assert_eq!(s.subnet.to_string(), "10.213.0.0/24");
        assert_eq!(s.cpus, Some(Cpus { nano: 500_000_000 }));
        assert_eq!(s.grace_secs(), 2, "fractions round up");
        assert_eq!(parse("image = \"w\"\nport = 1\ncpus = 2").unwrap().cpus, Some(Cpus { nano: 2_000_000_000 }));
        assert!(s.problems("x").is_empty());
    }

    #[test]
    fn spec_refuses_unknown_keys_and_bad_values_at_parse_time() {
        let err = crate::testing::config_errors_with("instances.docker", "image = \"w\"\nport = 1\nimgae = \"x\"");
        assert!(
            err.contains("service[0].instances.docker.imgae (line 9): unknown key; did you mean `image`?"),
            "{err}"
        );
        assert!(parse("image = \"w\"\nport = 1\nsubnet = \"10.213.0.1/24\"")
            .unwrap_err()
            .contains("did you mean 10.213.0.0/24"));
        assert!(parse("image = \"w\"\nport = 1\nsubnet = \"10.213.0.0/31\"").unwrap_err().contains("prefix length"));
        assert!(parse("image = \"w\"\nport = 1\nsubnet = \"10.213.0.0\"").unwrap_err().contains("not a subnet"));
        assert!(parse("image = \"w\"\nport = 1\ncpus = 0").unwrap_err().contains("must be above 0"));
        assert!(parse("image = \"w\"\nport = 1\ncpus = -1.5").unwrap_err().contains("must be above 0"));
    }

    #[test]
    fn docker_spec_problems_name_their_field() {
        let bad = DockerSpec {
            image: " ".into(),
            port: 0,
            network: "-net".into(),
            bridge: "a-bridge-name-too-long".into(),
            env: BTreeMap::from([("A=B".into(), "x".into())]),
            name_prefix: Some("web/1".into()),
            stop_grace: Duration::from_secs(7200),
            ..docker_spec()
        };
        let p = bad.problems("service[0] \"web\": instances.docker");
        let fields = ["image", "port", "network", "bridge", "env", "name_prefix", "stop_grace"];
        assert_eq!(p.len(), fields.len(), "{p:#?}");
        for (line, field) in p.iter().zip(fields) {
            assert!(line.starts_with(&format!("service[0] \"web\": instances.docker.{field}: ")), "{line}");
        }
        assert!(docker_spec().problems("x").is_empty());
    }

    #[test]
    fn swarm_spec_takes_the_docker_keys_with_its_own_defaults_and_init() {
        let s: SwarmSpec = toml::from_str("image = \"w\"\nport = 8080\ninit = true").unwrap();
        assert!(s.init);
        let c = &s.container;
        assert_eq!((c.network.as_str(), c.bridge.as_str()), ("lb-swarm", "lbs0"));
        assert_eq!(c.subnet.to_string(), "10.214.0.0/24");
        assert!(!toml::from_str::<SwarmSpec>("image = \"w\"\nport = 1").unwrap().init, "init is off by default");
        let err = crate::testing::config_errors_with("instances.swarm", "image = \"w\"\nport = 1\nint = true");
        assert!(err.contains("instances.swarm.int (line 9): unknown key; did you mean `init`?"), "{err}");
        let p = SwarmSpec {
            container: DockerSpec { port: 0, ..docker_spec() },
            init: false,
            publish: SwarmPublish::Bridge,
            unused_keys: Vec::new(),
        }
        .problems("service[0] \"web\": instances.swarm");
        assert_eq!(p, ["service[0] \"web\": instances.swarm.port: must be 1-65535"]);
        assert_eq!(s.publish, SwarmPublish::Bridge, "the bridge stays the default");
    }

    #[test]
    fn swarm_publish_host_takes_a_port_range_and_refuses_the_bridge_keys() {
        let s: SwarmSpec = toml::from_str("image = \"w\"\nport = 8080\npublish = \"host\"").unwrap();
        assert_eq!(s.publish, SwarmPublish::Host { min: 29000, max: 29999 });
        assert!(s.problems("x").is_empty(), "{:?}", s.problems("x"));
        let s: SwarmSpec = toml::from_str(
            "image = \"w\"\nport = 8080\npublish = \"host\"\nhost_port_min = 31000\nhost_port_max = 31009",
        )
        .unwrap();
        assert_eq!(s.publish, SwarmPublish::Host { min: 31000, max: 31009 });
        let at = "service[0] \"web\": instances.swarm";
        let bad: SwarmSpec = toml::from_str(
            "image = \"w\"\nport = 8080\npublish = \"host\"\nbridge = \"br9\"\nsubnet = \"10.9.0.0/24\"\n\
             host_port_min = 31000\nhost_port_max = 30000",
        )
        .unwrap();
        assert_eq!(
            bad.problems(at),
            [
                format!("{at}.bridge: not used with publish = \"host\" (the tasks join an overlay network); remove it"),
                format!("{at}.subnet: not used with publish = \"host\" (the tasks join an overlay network); remove it"),
                format!("{at}.host_port_max: 30000 is below host_port_min (31000): the range would be empty"),
            ]
        );
        let bridge: SwarmSpec = toml::from_str("image = \"w\"\nport = 8080\nhost_port_min = 31000").unwrap();
        assert_eq!(bridge.problems(at), [format!("{at}.host_port_min: only used with publish = \"host\"; remove it")]);
        let zero: SwarmSpec =
            toml::from_str("image = \"w\"\nport = 8080\npublish = \"host\"\nhost_port_min = 0").unwrap();
        assert_eq!(zero.problems(at), [format!("{at}.host_port_min: must be 1-65535")]);
        let err = toml::from_str::<SwarmSpec>("image = \"w\"\nport = 8080\npublish = \"ingress\"").unwrap_err();
        assert!(err.to_string().contains("unknown variant `ingress`, expected `bridge` or `host`"), "{err}");
    }

    #[test]
    fn subnet_slots_skip_network_gateway_and_broadcast() {
        let s: Ipv4Subnet = "10.213.0.0/24".parse().unwrap();
        assert_eq!(s.slots(), 2..=254);
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(s.addr(7), Ipv4Addr::new(10, 213, 0, 7));
        assert_eq!(s.slot_of(Ipv4Addr::new(10, 213, 0, 7)), Some(7));
        for outside in [[10, 213, 0, 1], [10, 213, 0, 255], [10, 213, 1, 7], [10, 212, 255, 7]] {
            assert_eq!(s.slot_of(Ipv4Addr::from(outside)), None, "{outside:?}");
        }
        let small: Ipv4Subnet = "192.168.5.8/29".parse().unwrap();
        assert_eq!(small.slots().map(|n| small.addr(n).octets()[3]).collect::<Vec<_>>(), [10, 11, 12, 13, 14]);
    }

    #[test]
    fn env_placeholders_are_filled_per_instance() {
        let env = docker_spec().env_for(Ipv4Addr::new(10, 213, 0, 3), "web-3");
        assert_eq!(env, ["LB_BACKEND_NAME=web-3", "LISTEN=10.213.0.3:8080"]);
    }

    #[test]
    fn process_spec_problems_name_their_field() {
        let bad = ProcessSpec {
            command: vec![],
            port: 0,
            bridge: "a-very-long-bridge".into(),
            prefix: Ipv4Addr::new(10, 0, 0, 1),
            ..process_spec()
        };
        let p = bad.problems("service[0] \"web\": instances.process");
        assert_eq!(p.len(), 4, "{p:#?}");
        assert!(p[0].ends_with("instances.process.command: name the program to run"));
        assert!(process_spec().problems("x").is_empty());
    }

    #[test]
    fn bad_selectors_are_refused_with_the_text() {
        for bad in ["", "9lives", "a{b}", r#"a{b="c""#, r#"a{b=c}"#, "a b"] {
            let e = bad.parse::<Selector>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        assert_eq!(sel(r#" a { b = "c" , } "#), Selector { name: "a".into(), labels: vec![("b".into(), "c".into())] });
    }

    fn sel(s: &str) -> Selector {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }
}
