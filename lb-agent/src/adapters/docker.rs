//! Backends as Docker containers, through the Engine API (bollard).
//!
//! Instances join a user-defined bridge network that the orchestrator creates
//! if it is missing, with a fixed subnet and a fixed Linux bridge name (the
//! `com.docker.network.bridge.name` option), so that the service's
//! `interfaces` can name the bridge: replies from the containers to their
//! gateway's MAC are passed up the bridge device, where the XDP program
//! (generic mode: bridges have no native XDP) turns them back into the VIP.
//!
//! Every container gets the labels `io.lb-agent.owner=lb-agent`,
//! `io.lb-agent.agent=<the agent's identity>` (its pin directory, or its
//! control socket when it pins nothing: each is one agent's, see
//! `adapters::lock`) and `io.lb-agent.service=<service>`, and the
//! orchestrator lists, stops and measures only containers that carry all
//! three: two agents on one host, even with services of the same name,
//! never adopt or remove each other's containers. Containers outlive the
//! agent: a new orchestrator of the same agent for the same service (after
//! a restart or a crash) lists the ones already running and carries on
//! with them. Each instance
//! gets a static address, `<subnet>.<n>` (the address stays in the
//! container's config while it is stopped, so an exited instance still
//! reports where it served), and a name, `<prefix>-<k>` (`web-1`, `web-2`,
//! ...: the lowest ordinal none of our containers has), kept in the label
//! `io.lb-agent.instance`: status, events and the instance's `{name}` use
//! it. The container itself is named `lb-<tag>-<name>`, where `<tag>` is
//! a hash of the agent's identity, so that two agents' `web-1` never clash
//! in the engine's one namespace of container names.
//!
//! Forwarding to containers needs more, outside this module, which the
//! agent (or whoever runs it) must arrange (all checked by the root test
//! `tests/tests/docker_orchestrator.rs`):
//! - `interfaces` lists both the clients' interface and the bridge.
//! - dockerd sets the iptables FORWARD policy to DROP, so new connections
//!   from the clients' interface to the bridge need an ACCEPT rule in the
//!   DOCKER-USER chain (`-i <client interface> -o <bridge> -j ACCEPT`);
//!   replies pass dockerd's own `-i <bridge> ! -o <bridge> -j ACCEPT`.
//! - Reverse-path filtering on the bridge must not be strict
//!   (`rp_filter` 0 or 2): the translated replies come from the VIP, which
//!   is not routed via the bridge. Strict mode drops them.
//! - With br_netfilter (bridge-nf-call-iptables=1, built into these
//!   kernels), conntrack sees a reply as it enters the bridge port, before
//!   the XDP hook of the bridge device rewrites it, so a connection is one
//!   ordinary conntrack entry (client -> container). Without br_netfilter
//!   conntrack sees client -> container and VIP -> client as two one-way
//!   flows; the ACCEPT rules above still pass both.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Mutex,
    time::Duration,
};

use bollard::{
    errors::Error as BollardError,
    models::{
        ContainerCreateBody, ContainerStatsResponse, EndpointIpamConfig, EndpointSettings, HostConfig, Ipam,
        IpamConfig, NetworkCreateRequest, NetworkingConfig, RestartPolicy, RestartPolicyNameEnum,
    },
    query_parameters::{
        CreateContainerOptions, InspectContainerOptions, InspectNetworkOptions, ListContainersOptions,
        RemoveContainerOptions, StatsOptions, StopContainerOptions,
    },
    Docker,
};
use futures_util::StreamExt as _;
use tracing::{debug, info, warn};

use crate::{
    config::instances::DockerSpec,
    ports::{Orchestrator, OrchestratorError, Replica},
};

/// Label on everything the agent creates in Docker.
pub const LABEL_OWNER: &str = "io.lb-agent.owner";
pub const OWNER: &str = "lb-agent";
/// Label naming the agent that made a container: its identity.
pub const LABEL_AGENT: &str = "io.lb-agent.agent";
/// Label naming the service a container serves.
pub const LABEL_SERVICE: &str = "io.lb-agent.service";
/// Label holding the instance's name (`web-1`), which is not the
/// container's (see the module's doc).
pub const LABEL_INSTANCE: &str = "io.lb-agent.instance";
/// The Docker network option that names the Linux bridge.
const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";

/// True when `labels` mark a container of `service` made by the agent
/// `agent`.
pub fn is_ours(labels: Option<&HashMap<String, String>>, agent: &str, service: &str) -> bool {
    labels.is_some_and(|l| labels_for(agent, service).iter().all(|(k, v)| l.get(k) == Some(v)))
}

/// The labels the orchestrator of agent `agent` puts on a container of
/// `service`.
pub fn labels_for(agent: &str, service: &str) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_OWNER.to_owned(), OWNER.to_owned()),
        (LABEL_AGENT.to_owned(), agent.to_owned()),
        (LABEL_SERVICE.to_owned(), service.to_owned()),
    ])
}

/// The container name of instance `instance` of the agent `agent`:
/// `lb-<8 hex digits of the identity's FNV-1a hash>-<instance>`.
pub fn container_name(agent: &str, instance: &str) -> String {
    let hash = agent.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    format!("lb-{hash:08x}-{instance}")
}

/// The lowest ordinal from 1 that no name in `taken` (`<prefix>-<k>`) has.
pub fn lowest_free_ordinal<'a>(prefix: &str, taken: impl IntoIterator<Item = &'a str>) -> u32 {
    let used: HashSet<u32> =
        taken.into_iter().filter_map(|n| n.strip_prefix(prefix)?.strip_prefix('-')?.parse().ok()).collect();
    (1..).find(|k| !used.contains(k)).unwrap_or(1)
}

/// What one stats reading says about CPU: cumulative nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuSample {
    /// CPU time the container used.
    pub container_ns: u64,
    /// CPU time of the whole host (all CPUs, busy and idle).
    pub system_ns: u64,
    /// CPUs the host has online.
    pub online_cpus: u32,
}

impl CpuSample {
    pub fn from_stats(s: &ContainerStatsResponse) -> Option<CpuSample> {
        let cpu = s.cpu_stats.as_ref()?;
        let usage = cpu.cpu_usage.as_ref()?;
        let online = match cpu.online_cpus {
            Some(n) if n > 0 => n,
            // Old engines: as `docker stats` does, count the per-CPU entries.
            _ => usage.percpu_usage.as_ref().map_or(0, |v| v.len() as u32),
        };
        Some(CpuSample { container_ns: usage.total_usage?, system_ns: cpu.system_cpu_usage?, online_cpus: online })
    }
}

/// CPU use between two samples in percent of one core, as `docker stats`
/// computes it: container delta / host delta × online CPUs × 100. `None`
/// when the host counter did not move (or went back: a restarted engine).
pub fn cpu_percent_between(before: CpuSample, now: CpuSample) -> Option<f64> {
    let system = now.system_ns.checked_sub(before.system_ns).filter(|d| *d > 0)?;
    let used = now.container_ns.checked_sub(before.container_ns)?;
    let cpus = if now.online_cpus > 0 { now.online_cpus } else { before.online_cpus };
    Some(used as f64 / system as f64 * f64::from(cpus) * 100.0)
}

pub struct DockerOrchestrator {
    docker: Docker,
    spec: DockerSpec,
    /// The agent's identity (`LABEL_AGENT`).
    agent: String,
    service: String,
    /// Last CPU sample per container id.
    samples: Mutex<HashMap<String, CpuSample>>,
    /// Held from choosing a slot to creating the container, so two starts
    /// never pick the same name and address.
    starting: tokio::sync::Mutex<()>,
}

/// Connect to the local engine (`DOCKER_HOST` if it is a `unix://` path,
/// else /var/run/docker.sock) and agree on an API version. Every request is
/// bounded by the client's timeout, a stop included: it must outlast the
/// grace period `stop_grace`.
pub(crate) async fn connect(stop_grace: Duration) -> Result<Docker, OrchestratorError> {
    Docker::connect_with_local_defaults()
        .map_err(docker_err("connect to the Docker engine"))?
        .with_timeout(Duration::from_secs(120) + stop_grace)
        .negotiate_version()
        .await
        .map_err(docker_err("negotiate the Docker API version"))
}

/// A network named `name` with `spec`'s subnet (the host is its gateway)
/// and Linux bridge name, labelled as ours.
pub(crate) fn bridge_network(name: &str, spec: &DockerSpec) -> NetworkCreateRequest {
    NetworkCreateRequest {
        name: name.to_owned(),
        ipam: Some(Ipam {
            driver: Some("default".into()),
            config: Some(vec![IpamConfig {
                subnet: Some(spec.subnet.to_string()),
                gateway: Some(spec.subnet.gateway().to_string()),
                ..Default::default()
            }]),
            options: None,
        }),
        options: Some(HashMap::from([(BRIDGE_NAME_OPTION.to_owned(), spec.bridge.clone())])),
        labels: Some(HashMap::from([(LABEL_OWNER.to_owned(), OWNER.to_owned())])),
        ..Default::default()
    }
}

pub(crate) fn docker_err(what: impl fmt::Display) -> impl FnOnce(BollardError) -> OrchestratorError {
    move |e| OrchestratorError::Docker(format!("{what}: {e}"))
}

pub(crate) fn is_status(e: &BollardError, code: u16) -> bool {
    matches!(e, BollardError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

pub(crate) fn poisoned<T>(_: std::sync::PoisonError<T>) -> OrchestratorError {
    OrchestratorError::Docker("cpu sample table: lock poisoned".into())
}

impl DockerOrchestrator {
    /// Connect to the local engine (`DOCKER_HOST` if it is a `unix://` path,
    /// else /var/run/docker.sock), agree on an API version, and make sure
    /// the network exists. Starts nothing; containers of this agent and
    /// service that are already there are ours.
    pub async fn new(agent: &str, service: &str, spec: DockerSpec) -> Result<Self, OrchestratorError> {
        let docker = connect(spec.stop_grace).await?;
        let o = DockerOrchestrator {
            docker,
            spec,
            agent: agent.to_owned(),
            service: service.to_owned(),
            samples: Mutex::new(HashMap::new()),
            starting: tokio::sync::Mutex::new(()),
        };
        o.ensure_network().await?;
        Ok(o)
    }

    pub fn spec(&self) -> &DockerSpec {
        &self.spec
    }

    fn prefix(&self) -> &str {
        self.spec.name_prefix.as_deref().unwrap_or(&self.service)
    }

    /// Create the network if it is missing; refuse one of that name that
    /// does not match the spec (someone else's: it is never changed).
    async fn ensure_network(&self) -> Result<(), OrchestratorError> {
        let name = &self.spec.network;
        match self.docker.inspect_network(name, None::<InspectNetworkOptions>).await {
            Ok(net) => {
                let subnets: Vec<String> =
                    net.ipam.and_then(|i| i.config).unwrap_or_default().into_iter().filter_map(|c| c.subnet).collect();
                let bridge = net.options.as_ref().and_then(|o| o.get(BRIDGE_NAME_OPTION)).cloned();
                let want_subnet = self.spec.subnet.to_string();
                if net.driver.as_deref() != Some("bridge")
                    || !subnets.contains(&want_subnet)
                    || bridge.as_deref() != Some(self.spec.bridge.as_str())
                {
                    return Err(OrchestratorError::Docker(format!(
                        "network {name} exists but is not a bridge network with subnet {want_subnet} and bridge {} \
                         (driver {:?}, subnets {subnets:?}, bridge {bridge:?}); remove it or name another network",
                        self.spec.bridge, net.driver
                    )));
                }
                debug!(network = name, "docker network present");
                Ok(())
            }
            Err(e) if is_status(&e, 404) => {
                let subnet = self.spec.subnet;
                let req = NetworkCreateRequest { driver: Some("bridge".into()), ..bridge_network(name, &self.spec) };
                self.docker.create_network(req).await.map_err(docker_err(format!("create network {name}")))?;
                info!(network = name, %subnet, bridge = self.spec.bridge, "docker network created");
                Ok(())
            }
            Err(e) => Err(docker_err(format!("inspect network {name}"))(e)),
        }
    }

    /// Our containers as the engine lists them (running or not).
    async fn our_containers(&self) -> Result<Vec<bollard::models::ContainerSummary>, OrchestratorError> {
        let labels = labels_for(&self.agent, &self.service).into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        let filters = HashMap::from([("label".to_owned(), labels)]);
        let opts = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        let list = self.docker.list_containers(Some(opts)).await.map_err(docker_err("list containers"))?;
        // The engine filtered already; check again so that nothing without
        // all our labels is ever touched, whatever the engine's filter does.
        Ok(list.into_iter().filter(|c| self.is_ours(c.labels.as_ref())).collect())
    }

    fn is_ours(&self, labels: Option<&HashMap<String, String>>) -> bool {
        is_ours(labels, &self.agent, &self.service)
    }

    /// The container's address on our network: the live one, else the
    /// static one it was created with (kept while it is stopped).
    async fn address_of(&self, id: &str) -> Result<Option<Ipv4Addr>, OrchestratorError> {
        let c = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
            .map_err(docker_err(format!("inspect container {id}")))?;
        let ep = c.network_settings.and_then(|n| n.networks).and_then(|mut n| n.remove(&self.spec.network));
        Ok(ep.and_then(|ep| {
            ep.ip_address
                .filter(|s| !s.is_empty())
                .or_else(|| ep.ipam_config.and_then(|i| i.ipv4_address))
                .and_then(|s| s.parse().ok())
        }))
    }

    /// Addresses in use on our network: by containers attached now (ours
    /// or anyone's) and by our stopped ones (their static address).
    async fn taken_slots(&self, ours: &[Replica]) -> Result<HashSet<u32>, OrchestratorError> {
        let net = self
            .docker
            .inspect_network(&self.spec.network, None::<InspectNetworkOptions>)
            .await
            .map_err(docker_err(format!("inspect network {}", self.spec.network)))?;
        let attached = net.containers.unwrap_or_default().into_values().filter_map(|e| e.ipv4_address);
        let mut taken = HashSet::new();
        for cidr in attached {
            if let Some(ip) = cidr.split('/').next().and_then(|s| s.parse().ok()) {
                taken.extend(self.spec.subnet.slot_of(ip));
            }
        }
        taken.extend(ours.iter().filter_map(|r| self.spec.subnet.slot_of(*r.addr.ip())));
        Ok(taken)
    }

    async fn create_and_start(&self, name: &str, ip: Ipv4Addr) -> Result<String, OrchestratorError> {
        let spec = &self.spec;
        let endpoint = EndpointSettings {
            ipam_config: Some(EndpointIpamConfig { ipv4_address: Some(ip.to_string()), ..Default::default() }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(spec.env_for(ip, name)),
            labels: Some(
                labels_for(&self.agent, &self.service)
                    .into_iter()
                    .chain([(LABEL_INSTANCE.to_owned(), name.to_owned())])
                    .collect(),
            ),
            stop_timeout: Some(i64::from(spec.grace_secs())),
            host_config: Some(HostConfig {
                network_mode: Some(spec.network.clone()),
                nano_cpus: spec.cpus.map(|c| c.nano),
                // The scaler replaces instances that exit; the engine must not
                // bring them back behind its back.
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(spec.network.clone(), endpoint)])),
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptions { name: Some(container_name(&self.agent, name)), ..Default::default() };
        let created = self
            .docker
            .create_container(Some(opts), body)
            .await
            .map_err(docker_err(format!("create container {name}")))?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            self.remove(&created.id).await;
            return Err(docker_err(format!("start container {name}"))(e));
        }
        Ok(created.id)
    }

    /// Force-remove a container; errors are logged (cleanup path).
    async fn remove(&self, id: &str) {
        let opts = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        if let Err(e) = self.docker.remove_container(id, Some(opts)).await {
            if !is_status(&e, 404) {
                warn!(container = id, error = %e, "cannot remove container");
            }
        }
    }
}

/// One stats reading of a container.
async fn sample(docker: Docker, id: String) -> (String, Result<Option<CpuSample>, BollardError>) {
    // one_shot: no second reading to fill precpu_stats (we keep our own
    // previous sample). The engine may still hold the answer until its next
    // collection tick (every second; measured: 10 ms to 1 s), and answers
    // all waiting requests on that tick: hence the requests go out together.
    let opts = StatsOptions { stream: false, one_shot: true };
    let mut stream = docker.stats(&id, Some(opts));
    let result = match stream.next().await {
        Some(Ok(s)) => Ok(CpuSample::from_stats(&s)),
        Some(Err(e)) => Err(e),
        None => Ok(None),
    };
    (id, result)
}

impl Orchestrator for DockerOrchestrator {
    async fn list(&self) -> Result<Vec<Replica>, OrchestratorError> {
        let mut out = Vec::new();
        for c in self.our_containers().await? {
            let Some(id) = c.id.clone() else { continue };
            // The instance's name; a container of an agent before the
            // label goes by its container name.
            let name = c.labels.as_ref().and_then(|l| l.get(LABEL_INSTANCE)).cloned().unwrap_or_else(|| {
                c.names.as_ref().and_then(|n| n.first()).map_or(id.clone(), |n| n.trim_start_matches('/').to_owned())
            });
            let running = matches!(c.state, Some(bollard::models::ContainerSummaryStateEnum::RUNNING));
            let ip = c
                .network_settings
                .as_ref()
                .and_then(|n| n.networks.as_ref())
                .and_then(|n| n.get(&self.spec.network))
                .and_then(|ep| ep.ip_address.as_deref().filter(|s| !s.is_empty()).and_then(|s| s.parse().ok()));
            let ip = match ip {
                Some(ip) => Some(ip),
                None => self.address_of(&id).await?,
            };
            let Some(ip) = ip else {
                warn!(
                    container = name,
                    network = self.spec.network,
                    "container of ours has no address on the network; skipped"
                );
                continue;
            };
            out.push(Replica { id, name, addr: SocketAddrV4::new(ip, self.spec.port), running });
        }
        out.sort_by_key(|r| r.addr);
        Ok(out)
    }

    async fn start(&self) -> Result<Replica, OrchestratorError> {
        let _one_at_a_time = self.starting.lock().await;
        let ours = self.list().await?;
        let mut taken = self.taken_slots(&ours).await?;
        let mut names: Vec<String> = ours.iter().map(|r| r.name.clone()).collect();
        // Another container may join the network between our look and our
        // create; the engine then refuses the address and we take the next.
        for _attempt in 0..3 {
            let slots = self.spec.subnet.slots();
            let total = slots.clone().count();
            let n = slots.into_iter().find(|n| !taken.contains(n)).ok_or(OrchestratorError::Full(total))?;
            let ip = self.spec.subnet.addr(n);
            let name =
                format!("{}-{}", self.prefix(), lowest_free_ordinal(self.prefix(), names.iter().map(|n| n.as_str())));
            match self.create_and_start(&name, ip).await {
                Ok(id) => {
                    let addr = SocketAddrV4::new(ip, self.spec.port);
                    let running_ip = self.address_of(&id).await?;
                    if running_ip != Some(ip) {
                        warn!(container = name, expected = %ip, got = ?running_ip, "container address differs from the one asked for");
                    }
                    info!(service = self.service, instance = name, %addr, id = &id[..12.min(id.len())], "container started");
                    return Ok(Replica { id, name, addr, running: true });
                }
                Err(e)
                    if format!("{e}").contains("already in use") || format!("{e}").contains("is already allocated") =>
                {
                    warn!(instance = name, error = %e, "name or address taken meanwhile; trying the next slot");
                    taken.insert(n);
                    names.push(name);
                }
                Err(e) => return Err(e),
            }
        }
        Err(OrchestratorError::Docker(format!("{}: no free name and address after 3 attempts", self.service)))
    }

    async fn stop(&self, id: &str) -> Result<(), OrchestratorError> {
        let c = match self.docker.inspect_container(id, None::<InspectContainerOptions>).await {
            Ok(c) => c,
            Err(e) if is_status(&e, 404) => return Err(OrchestratorError::Unknown(id.into())),
            Err(e) => return Err(docker_err(format!("inspect container {id}"))(e)),
        };
        if !self.is_ours(c.config.as_ref().and_then(|c| c.labels.as_ref())) {
            return Err(OrchestratorError::Unknown(id.into()));
        }
        let name = c
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .and_then(|l| l.get(LABEL_INSTANCE))
            .cloned()
            .unwrap_or_else(|| c.name.as_deref().unwrap_or(id).trim_start_matches('/').to_owned());
        let opts = StopContainerOptions { t: Some(self.spec.grace_secs()), signal: None };
        // 304 (already stopped) counts as success in bollard.
        if let Err(e) = self.docker.stop_container(id, Some(opts)).await {
            if !is_status(&e, 404) {
                return Err(docker_err(format!("stop container {name}"))(e));
            }
        }
        let opts = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(docker_err(format!("remove container {name}"))(e)),
        }
        self.samples.lock().map_err(poisoned)?.remove(c.id.as_deref().unwrap_or(id));
        info!(service = self.service, instance = name, "container stopped and removed");
        Ok(())
    }

    async fn cpu_percent(&self) -> Result<HashMap<String, f64>, OrchestratorError> {
        let running: Vec<String> = self
            .our_containers()
            .await?
            .into_iter()
            .filter(|c| matches!(c.state, Some(bollard::models::ContainerSummaryStateEnum::RUNNING)))
            .filter_map(|c| c.id)
            .collect();
        cpu_percent_of(&self.docker, running.into_iter().map(|id| (id.clone(), id)), &self.samples).await
    }
}

/// CPU use of containers since their previous samples in `samples` (which
/// this replaces with the new ones), by key: `containers` are (key,
/// container id) pairs.
pub(crate) async fn cpu_percent_of(
    docker: &Docker,
    containers: impl IntoIterator<Item = (String, String)>,
    samples: &Mutex<HashMap<String, CpuSample>>,
) -> Result<HashMap<String, f64>, OrchestratorError> {
    let mut requests = tokio::task::JoinSet::new();
    let mut keys = HashMap::new();
    for (key, id) in containers {
        keys.insert(id.clone(), key);
        requests.spawn(sample(docker.clone(), id));
    }
    let mut now = HashMap::new();
    while let Some(joined) = requests.join_next().await {
        let (id, result) = joined.map_err(|e| OrchestratorError::Docker(format!("stats task: {e}")))?;
        match result {
            Ok(Some(s)) => {
                now.insert(keys.get(&id).cloned().unwrap_or(id), s);
            }
            Ok(None) => debug!(container = id, "stats without CPU figures"),
            // Gone between list and stats: it simply has no figure.
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(docker_err(format!("stats of container {id}"))(e)),
        }
    }
    let mut samples = samples.lock().map_err(poisoned)?;
    let out =
        now.iter().filter_map(|(id, s)| Some((id.clone(), cpu_percent_between(*samples.get(id)?, *s)?))).collect();
    *samples = now;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_take_the_lowest_free_ordinal_and_agents_never_share_a_container_name() {
        assert_eq!(lowest_free_ordinal("web", []), 1);
        assert_eq!(lowest_free_ordinal("web", ["web-1", "web-2"]), 3);
        assert_eq!(lowest_free_ordinal("web", ["web-2", "web-3"]), 1, "a freed ordinal is reused");
        assert_eq!(lowest_free_ordinal("web", ["webx-1", "web-1x", "api-1"]), 1, "not ours: not counted");
        let (a, b) = (container_name("/sys/fs/bpf/lb-agent", "web-1"), container_name("/run/b/pins", "web-1"));
        assert!(a.starts_with("lb-") && a.ends_with("-web-1") && a.len() == "lb-01234567-web-1".len(), "{a}");
        assert_ne!(a, b, "two agents' web-1");
        assert_eq!(a, container_name("/sys/fs/bpf/lb-agent", "web-1"), "stable across restarts");
    }

    #[test]
    fn only_containers_with_all_three_labels_are_ours() {
        let l = |pairs: &[(&str, &str)]| {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>()
        };
        const A: &str = "/sys/fs/bpf/lb-agent";
        assert!(is_ours(Some(&labels_for(A, "web")), A, "web"));
        assert!(!is_ours(Some(&labels_for(A, "web")), A, "api"), "another service's container");
        assert!(!is_ours(Some(&labels_for("/sys/fs/bpf/lb-b", "web")), A, "web"), "another agent's container");
        assert!(!is_ours(None, A, "web"));
        assert!(!is_ours(Some(&l(&[])), A, "web"));
        assert!(!is_ours(Some(&l(&[(LABEL_AGENT, A), (LABEL_SERVICE, "web")])), A, "web"), "no owner label");
        let other_owner = l(&[(LABEL_OWNER, "someone-else"), (LABEL_AGENT, A), (LABEL_SERVICE, "web")]);
        assert!(!is_ours(Some(&other_owner), A, "web"));
        assert!(!is_ours(Some(&l(&[(LABEL_OWNER, OWNER), (LABEL_AGENT, A)])), A, "web"), "no service label");
        let unmarked = l(&[(LABEL_OWNER, OWNER), (LABEL_SERVICE, "web")]);
        assert!(!is_ours(Some(&unmarked), A, "web"), "no agent label (made by an agent before they had one)");
        let mut extra = labels_for(A, "web");
        extra.insert("com.example.team".into(), "x".into());
        assert!(is_ours(Some(&extra), A, "web"), "other labels do not matter");
    }

    /// Two readings of a container as the stats API gives them (JSON of
    /// API 1.41 on cgroup v1, trimmed to the CPU part).
    fn stats(total: u64, system: u64, online: Option<u32>, percpu: usize) -> ContainerStatsResponse {
        let mut cpu = serde_json::json!({
            "cpu_usage": { "total_usage": total, "percpu_usage": vec![total / percpu.max(1) as u64; percpu],
                           "usage_in_kernelmode": 0, "usage_in_usermode": total },
            "system_cpu_usage": system,
        });
        if let Some(n) = online {
            cpu["online_cpus"] = n.into();
        }
        serde_json::from_value(serde_json::json!({ "id": "c1", "cpu_stats": cpu, "precpu_stats": {} })).unwrap()
    }

    #[test]
    fn cpu_percent_is_computed_like_docker_stats() {
        // 0.5 s of container CPU while the 2-CPU host counted 2 s (1 s of wall
        // time): half a core, 50 %.
        let a = CpuSample::from_stats(&stats(1_000_000_000, 10_000_000_000, Some(2), 2)).unwrap();
        let b = CpuSample::from_stats(&stats(1_500_000_000, 12_000_000_000, Some(2), 2)).unwrap();
        assert_eq!(cpu_percent_between(a, b), Some(50.0));
        // Two full cores on a 4-CPU host: 200 %.
        let a = CpuSample { container_ns: 0, system_ns: 0, online_cpus: 4 };
        let b = CpuSample { container_ns: 2_000_000_000, system_ns: 4_000_000_000, online_cpus: 4 };
        assert_eq!(cpu_percent_between(a, b), Some(200.0));
        // Idle container.
        assert_eq!(cpu_percent_between(b, CpuSample { system_ns: 8_000_000_000, ..b }), Some(0.0));
    }

    #[test]
    fn cpu_percent_needs_the_host_counter_to_move_forward() {
        let a = CpuSample { container_ns: 5, system_ns: 100, online_cpus: 2 };
        assert_eq!(cpu_percent_between(a, a), None, "same reading");
        assert_eq!(cpu_percent_between(a, CpuSample { system_ns: 50, ..a }), None, "host counter went back");
        assert_eq!(
            cpu_percent_between(a, CpuSample { container_ns: 1, system_ns: 200, ..a }),
            None,
            "container counter went back (a new container)"
        );
    }

    #[test]
    fn online_cpus_fall_back_to_the_per_cpu_list() {
        let s = CpuSample::from_stats(&stats(10, 20, None, 3)).unwrap();
        assert_eq!(s.online_cpus, 3);
        let empty: ContainerStatsResponse = serde_json::from_value(serde_json::json!({ "id": "c1" })).unwrap();
        assert_eq!(CpuSample::from_stats(&empty), None, "a stopped container's stats carry no CPU figures");
    }
}
