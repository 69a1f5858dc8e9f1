//! Backends as Docker Swarm tasks, through the Engine API (bollard).
//!
//! One swarm service per instance, with one replica: Swarm places the task
//! and keeps it alive (a task that dies is replaced by a new one, with a new
//! address), and the agent chooses which instance a scale-down removes.
//! With one service of `replicas = n`, `replicas -= 1` lets Swarm pick the
//! task that goes, which may be one with open connections that was never
//! drained; with a service per instance the agent drains the one it chose
//! (no new flows; open ones finish or hit the drain deadline) and only then
//! removes that service.
//!
//! Addresses: Swarm's routing mesh (ingress, published ports) needs IPVS,
//! which these kernels lack, and the data plane replaces it anyway: nothing
//! is published. The tasks join a swarm-scoped *bridge* network, created
//! from a local config-only network (`<network>-config`) that holds the
//! subnet and the Linux bridge's name (a swarm-scoped bridge network made
//! without `config_from` ignores both: measured, it got 172.18.0.0/16 on
//! `br-<id>`). The host routes to that bridge, as with the Docker
//! orchestrator, so the load balancer reaches each task directly. A task's
//! address is its container's address on that network (the engine does not
//! put local-scope addresses in the task's network attachments), learned
//! when the task runs and remembered after it dies, so that the agent can
//! take the dead address out of its table.
//!
//! Instances are named `<prefix>-<k>` as with Docker (the label
//! `io.lb-agent.instance` on the service and its containers); replica ids
//! are task ids, so a replacement task is a new replica the agent adopts
//! (after a good health check) while the dead one leaves the table. The
//! services carry the Docker orchestrator's three labels, so a restarted
//! agent adopts its running tasks.
//!
//! Multi-node with the bridge: the config-only network must exist on every
//! node with the same subnet (each node's engine hands out addresses from
//! it on its own bridge), and the load balancer must route to every node's
//! bridge; this module makes it on the node the agent talks to only.
//!
//! Every node (`publish = "host"`): the tasks join an overlay network
//! (made attachable if missing) and each instance's service publishes the
//! container port in host mode on a port the agent picks from
//! `host_port_min..=host_port_max` (`core::swarm_publish`), with no
//! placement constraint, so Swarm spreads them. The agent learns where a
//! task answers from the manager alone: its node's address and its
//! published port. A restarted agent adopts its instances with their
//! ports (in the services' specs and the tasks' status) and picks new
//! ports around them.
//! The agent may run on a node that is no swarm member: `DOCKER_HOST`
//! names the manager's engine.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Mutex,
    time::Duration,
};

use bollard::{
    models::{
        ConfigReference, EndpointSpec, Limit, LocalNodeState, NetworkAttachmentConfig, NetworkCreateRequest,
        ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, SwarmInitRequest, Task, TaskSpec,
        TaskSpecContainerSpec, TaskSpecResources, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum, TaskState,
    },
    query_parameters::{
        InspectContainerOptions, InspectNetworkOptions, ListNodesOptions, ListServicesOptions, ListTasksOptions,
    },
    Docker,
};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::docker::{
    bridge_network, connect, container_name, cpu_percent_of, docker_err, is_ours, is_status, labels_for,
    lowest_free_ordinal, poisoned, CpuSample, LABEL_INSTANCE, LABEL_OWNER, OWNER,
};
use super::process::{ip, BRIDGE_ALIAS};
use crate::{
    config::instances::{DockerSpec, SwarmPublish, SwarmSpec},
    core::swarm_publish::{
        host_port_config, node_addresses, pick_host_port, published_ports, task_backend, yields_port,
    },
    ports::{Orchestrator, OrchestratorError, Replica},
};

/// The Docker network option that names the Linux bridge.
const BRIDGE_NAME_OPTION: &str = "com.docker.network.bridge.name";
/// How long a new task may take to be running with an address.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);
/// Held from picking a host-mode port to creating the service that
/// publishes it (`create_instance_service`).
static HOST_PORT_PICK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
/// Picks of a host port before giving up, when other agents keep taking
/// the one picked (`swarm_publish::yields_port`).
const PORT_RACE_TRIES: usize = 5;
/// How long a list waits for Swarm to replace a task that died.
const REPLACE_WAIT: Duration = Duration::from_secs(3);

/// The config-only network behind the swarm network `network`.
pub fn config_network(network: &str) -> String {
    format!("{network}-config")
}

/// Whether Swarm has given up on a task: it will not run (again).
pub fn is_terminal(state: Option<&TaskState>) -> bool {
    matches!(
        state,
        Some(
            TaskState::COMPLETE
                | TaskState::SHUTDOWN
                | TaskState::FAILED
                | TaskState::REJECTED
                | TaskState::REMOVE
                | TaskState::ORPHANED
        )
    )
}

/// A task Swarm means to run: its desired state is running (or ready,
/// during a restart delay) and it has not ended.
pub fn is_current(task: &Task) -> bool {
    matches!(task.desired_state, Some(TaskState::RUNNING | TaskState::READY))
        && !is_terminal(task.status.as_ref().and_then(|s| s.state.as_ref()))
}

fn state_of(task: &Task) -> Option<&TaskState> {
    task.status.as_ref().and_then(|s| s.state.as_ref())
}

fn container_of(task: &Task) -> Option<&str> {
    task.status.as_ref()?.container_status.as_ref()?.container_id.as_deref().filter(|s| !s.is_empty())
}

pub struct SwarmOrchestrator {
    docker: Docker,
    spec: DockerSpec,
    agent: String,
    service: String,
    publish: SwarmPublish,
    /// The service's protocol is UDP (what a host-mode port publishes).
    udp: bool,
    /// The address each task was seen at, kept after it dies.
    addrs: Mutex<HashMap<String, SocketAddrV4>>,
    /// Dead tasks the agent stopped: no longer listed.
    cleared: Mutex<HashSet<String>>,
    samples: Mutex<HashMap<String, CpuSample>>,
    starting: tokio::sync::Mutex<()>,
}

impl SwarmOrchestrator {
    /// Connect to the local engine, make sure it is a swarm manager
    /// (initialising a single-node swarm when `init` asks for it) and that
    /// the network exists. Starts nothing; services of this agent and
    /// service that are there already are ours.
    pub async fn new(agent: &str, service: &str, spec: SwarmSpec, udp: bool) -> Result<Self, OrchestratorError> {
        let docker = connect(spec.container.stop_grace).await?;
        let o = SwarmOrchestrator {
            docker,
            spec: spec.container,
            agent: agent.to_owned(),
            service: service.to_owned(),
            publish: spec.publish,
            udp,
            addrs: Mutex::new(HashMap::new()),
            cleared: Mutex::new(HashSet::new()),
            samples: Mutex::new(HashMap::new()),
            starting: tokio::sync::Mutex::new(()),
        };
        o.ensure_swarm(spec.init).await?;
        match o.publish {
            SwarmPublish::Bridge => o.ensure_network().await?,
            SwarmPublish::Host { .. } => o.ensure_overlay().await?,
        }
        Ok(o)
    }

    async fn ensure_swarm(&self, init: bool) -> Result<(), OrchestratorError> {
        let info = self.docker.info().await.map_err(docker_err("read the engine's info"))?;
        let swarm = info.swarm.unwrap_or_default();
        match swarm.local_node_state {
            Some(LocalNodeState::ACTIVE) if swarm.control_available == Some(true) => Ok(()),
            Some(LocalNodeState::ACTIVE) => Err(OrchestratorError::Docker(
                "this engine is a swarm worker; the agent needs a manager's engine (its API creates services)".into(),
            )),
            Some(LocalNodeState::INACTIVE) | None if init => {
                let req = SwarmInitRequest {
                    listen_addr: Some("127.0.0.1:2377".into()),
                    advertise_addr: Some("127.0.0.1".into()),
                    ..Default::default()
                };
                let node = self.docker.init_swarm(req).await.map_err(docker_err("initialise a swarm (init = true)"))?;
                info!(node, "initialised a single-node swarm");
                Ok(())
            }
            state => Err(OrchestratorError::Docker(format!(
                "the engine is not in a swarm (state {:?}); run `docker swarm init` or set init = true under \
                 [service.instances.swarm]",
                state.map(|s| s.to_string()).unwrap_or_default()
            ))),
        }
    }

    /// Make the config-only network (subnet, bridge name) and the
    /// swarm-scoped bridge network from it, unless they exist; refuse ones
    /// of those names that do not match the spec.
    async fn ensure_network(&self) -> Result<(), OrchestratorError> {
        let (name, config) = (&self.spec.network, config_network(&self.spec.network));
        let subnet = self.spec.subnet;
        match self.docker.inspect_network(&config, None::<InspectNetworkOptions>).await {
            Ok(net) => {
                let subnets: Vec<String> =
                    net.ipam.and_then(|i| i.config).unwrap_or_default().into_iter().filter_map(|c| c.subnet).collect();
                let bridge = net.options.as_ref().and_then(|o| o.get(BRIDGE_NAME_OPTION)).cloned();
                if net.config_only != Some(true)
                    || !subnets.contains(&subnet.to_string())
                    || bridge.as_deref() != Some(self.spec.bridge.as_str())
                {
                    return Err(OrchestratorError::Docker(format!(
                        "network {config} exists but is not a config-only network with subnet {subnet} and bridge {} \
                         (subnets {subnets:?}, bridge {bridge:?}); remove it or name another network",
                        self.spec.bridge
                    )));
                }
            }
            Err(e) if is_status(&e, 404) => {
                let req = NetworkCreateRequest { config_only: Some(true), ..bridge_network(&config, &self.spec) };
                self.docker.create_network(req).await.map_err(docker_err(format!("create network {config}")))?;
                info!(network = config, %subnet, bridge = self.spec.bridge, "config-only network created");
            }
            Err(e) => return Err(docker_err(format!("inspect network {config}"))(e)),
        }
        match self.docker.inspect_network(name, None::<InspectNetworkOptions>).await {
            Ok(net) => {
                let from = net.config_from.and_then(|c| c.network);
                if net.scope.as_deref() != Some("swarm")
                    || net.driver.as_deref() != Some("bridge")
                    || from.as_deref() != Some(config.as_str())
                {
                    return Err(OrchestratorError::Docker(format!(
                        "network {name} exists but is not a swarm-scoped bridge network made from {config} (scope \
                         {:?}, driver {:?}, config from {from:?}); remove it or name another network",
                        net.scope, net.driver
                    )));
                }
                debug!(network = name, "swarm network present");
                Ok(())
            }
            Err(e) if is_status(&e, 404) => {
                let req = NetworkCreateRequest {
                    name: name.clone(),
                    driver: Some("bridge".into()),
                    scope: Some("swarm".into()),
                    // No labels, options or IPAM: the engine refuses any
                    // with `config_from` (403).
                    config_from: Some(ConfigReference { network: Some(config.clone()) }),
                    ..Default::default()
                };
                self.docker.create_network(req).await.map_err(docker_err(format!("create network {name}")))?;
                info!(network = name, from = config, "swarm network created");
                Ok(())
            }
            Err(e) => Err(docker_err(format!("inspect network {name}"))(e)),
        }?;
        self.ensure_bridge().await
    }

    /// Make the attachable overlay network the tasks join, unless it
    /// exists; refuse one of that name that is no overlay network.
    async fn ensure_overlay(&self) -> Result<(), OrchestratorError> {
        let name = &self.spec.network;
        match self.docker.inspect_network(name, None::<InspectNetworkOptions>).await {
            Ok(net) if net.driver.as_deref() == Some("overlay") => {
                debug!(network = name, "overlay network present");
                Ok(())
            }
            Ok(net) => Err(OrchestratorError::Docker(format!(
                "network {name} exists but is not an overlay network (driver {:?}, scope {:?}); publish = \"host\" \
                 needs one that spans the nodes: remove it or name another network",
                net.driver, net.scope
            ))),
            Err(e) if is_status(&e, 404) => {
                let req = NetworkCreateRequest {
                    name: name.clone(),
                    driver: Some("overlay".into()),
                    attachable: Some(true),
                    labels: Some(HashMap::from([(LABEL_OWNER.to_owned(), OWNER.to_owned())])),
                    ..Default::default()
                };
                self.docker.create_network(req).await.map_err(docker_err(format!("create network {name}")))?;
                info!(network = name, "overlay network created");
                Ok(())
            }
            Err(e) => Err(docker_err(format!("inspect network {name}"))(e)),
        }
    }

    /// The engine makes a swarm-scoped network's bridge only when a first
    /// task joins it on this node, but the service's `interfaces` need it
    /// now: make it, with the gateway's address, as the engine would (the
    /// engine takes over a bridge of that name that exists).
    async fn ensure_bridge(&self) -> Result<(), OrchestratorError> {
        let br = self.spec.bridge.as_str();
        if std::path::Path::new("/sys/class/net").join(br).exists() {
            return Ok(());
        }
        let cidr = format!("{}/{}", self.spec.subnet.gateway(), self.spec.subnet.prefix_len);
        ip(&["link", "add", br, "type", "bridge"]).await?;
        ip(&["link", "set", "dev", br, "alias", BRIDGE_ALIAS]).await?;
        ip(&["addr", "add", &cidr, "dev", br]).await?;
        ip(&["link", "set", br, "up"]).await?;
        info!(bridge = br, %cidr, "bridge made for the swarm network");
        Ok(())
    }

    fn prefix(&self) -> &str {
        self.spec.name_prefix.as_deref().unwrap_or(&self.service)
    }

    /// Our swarm services: id and instance name.
    async fn our_services(&self) -> Result<Vec<(String, String)>, OrchestratorError> {
        let labels = labels_for(&self.agent, &self.service).into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        let opts = ListServicesOptions { filters: Some(HashMap::from([("label".to_owned(), labels)])), status: None };
        let list = self.docker.list_services(Some(opts)).await.map_err(docker_err("list swarm services"))?;
        Ok(list
            .into_iter()
            .filter_map(|s| {
                let labels = s.spec.as_ref()?.labels.as_ref();
                if !is_ours(labels, &self.agent, &self.service) {
                    return None;
                }
                let name = labels?.get(LABEL_INSTANCE)?.clone();
                Some((s.id?, name))
            })
            .collect())
    }

    async fn tasks_of(&self, services: &[String]) -> Result<Vec<Task>, OrchestratorError> {
        if services.is_empty() {
            return Ok(Vec::new());
        }
        let opts = ListTasksOptions { filters: Some(HashMap::from([("service".to_owned(), services.to_vec())])) };
        match self.docker.list_tasks(Some(opts)).await {
            Ok(tasks) => Ok(tasks),
            // A service removed meanwhile: its tasks went with it.
            Err(e) if is_status(&e, 404) => Ok(Vec::new()),
            Err(e) => Err(docker_err("list swarm tasks")(e)),
        }
    }

    /// Every node's address, when tasks answer there (`publish = "host"`).
    async fn nodes(&self) -> Result<HashMap<String, Ipv4Addr>, OrchestratorError> {
        if self.publish == SwarmPublish::Bridge {
            return Ok(HashMap::new());
        }
        let nodes = self.docker.list_nodes(None::<ListNodesOptions>).await.map_err(docker_err("list swarm nodes"))?;
        Ok(node_addresses(&nodes))
    }

    /// The task's address: remembered, or its running container's (on the
    /// bridge), or its node's and published port (`publish = "host"`).
    async fn address_of(
        &self,
        task: &Task,
        nodes: &HashMap<String, Ipv4Addr>,
    ) -> Result<Option<SocketAddrV4>, OrchestratorError> {
        let Some(id) = task.id.as_deref() else { return Ok(None) };
        if let Some(addr) = self.addrs.lock().map_err(poisoned)?.get(id) {
            return Ok(Some(*addr));
        }
        if state_of(task) != Some(&TaskState::RUNNING) {
            return Ok(None);
        }
        let addr = match self.publish {
            SwarmPublish::Bridge => self.bridge_address_of(task).await?,
            SwarmPublish::Host { .. } => task_backend(task, self.spec.port, nodes),
        };
        if let Some(addr) = addr {
            self.addrs.lock().map_err(poisoned)?.insert(id.to_owned(), addr);
        }
        Ok(addr)
    }

    /// A running task's container's address on the swarm bridge network.
    async fn bridge_address_of(&self, task: &Task) -> Result<Option<SocketAddrV4>, OrchestratorError> {
        let Some(container) = container_of(task) else { return Ok(None) };
        let c = match self.docker.inspect_container(container, None::<InspectContainerOptions>).await {
            Ok(c) => c,
            // On another node, or gone meanwhile.
            Err(e) if is_status(&e, 404) => return Ok(None),
            Err(e) => return Err(docker_err(format!("inspect container {container}"))(e)),
        };
        let ip: Option<Ipv4Addr> = c
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut n| n.remove(&self.spec.network))
            .and_then(|ep| ep.ip_address)
            .and_then(|s| s.parse().ok());
        Ok(ip.map(|ip| SocketAddrV4::new(ip, self.spec.port)))
    }

    /// The replicas of `tasks` (of the services `names`): current tasks
    /// running with an address, and dead ones with a remembered address
    /// the agent has not stopped yet.
    async fn replicas(
        &self,
        tasks: &[Task],
        names: &HashMap<String, String>,
    ) -> Result<Vec<Replica>, OrchestratorError> {
        let mut out = Vec::new();
        // The nodes are listed only when a running task's address is not
        // known yet: its node's address is part of it.
        let unknown = |t: &Task| {
            state_of(t) == Some(&TaskState::RUNNING)
                && t.id.as_ref().is_some_and(|id| !self.addrs.lock().is_ok_and(|a| a.contains_key(id)))
        };
        let nodes = if tasks.iter().any(unknown) { self.nodes().await? } else { HashMap::new() };
        for t in tasks {
            let (Some(id), Some(name)) = (t.id.clone(), t.service_id.as_ref().and_then(|s| names.get(s))) else {
                continue;
            };
            let dead = is_terminal(state_of(t));
            if !dead && !is_current(t) && state_of(t) != Some(&TaskState::RUNNING) {
                continue;
            }
            if dead
                && (self.cleared.lock().map_err(poisoned)?.contains(&id)
                    || !self.addrs.lock().map_err(poisoned)?.contains_key(&id))
            {
                continue;
            }
            let Some(addr) = self.address_of(t, &nodes).await? else { continue };
            let running = state_of(t) == Some(&TaskState::RUNNING);
            out.push(Replica { id, name: name.clone(), addr, running });
        }
        out.sort_by_key(|r| r.addr);
        Ok(out)
    }

    /// The spec of instance `name`'s service; `host_port`: where it
    /// publishes its tasks' port (`publish = "host"`).
    fn service_spec(&self, name: &str, host_port: Option<u16>) -> ServiceSpec {
        let spec = &self.spec;
        let labels: HashMap<String, String> = labels_for(&self.agent, &self.service)
            .into_iter()
            .chain([(LABEL_INSTANCE.to_owned(), name.to_owned())])
            .collect();
        let grace_ns = i64::from(spec.grace_secs()) * 1_000_000_000;
        ServiceSpec {
            name: Some(container_name(&self.agent, name)),
            labels: Some(labels.clone()),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(spec.image.clone()),
                    env: Some(spec.env_for(Ipv4Addr::UNSPECIFIED, name)),
                    labels: Some(labels),
                    stop_grace_period: Some(grace_ns),
                    ..Default::default()
                }),
                resources: spec.cpus.map(|c| TaskSpecResources {
                    limits: Some(Limit { nano_cpus: Some(c.nano), ..Default::default() }),
                    ..Default::default()
                }),
                // Swarm replaces a task that ends, at once and for ever.
                restart_policy: Some(TaskSpecRestartPolicy {
                    condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
                    delay: Some(0),
                    max_attempts: Some(0),
                    window: None,
                }),
                networks: Some(vec![NetworkAttachmentConfig {
                    target: Some(spec.network.clone()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
                ..Default::default()
            }),
            endpoint_spec: host_port.map(|p| EndpointSpec {
                ports: Some(vec![host_port_config(spec.port, p, self.udp)]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A host port for a new instance: the lowest of the range that no
    /// service of the swarm publishes (`None` on the bridge).
    async fn free_host_port(&self) -> Result<Option<u16>, OrchestratorError> {
        let SwarmPublish::Host { min, max } = self.publish else { return Ok(None) };
        let all =
            self.docker.list_services(None::<ListServicesOptions>).await.map_err(docker_err("list swarm services"))?;
        let used = published_ports(&all);
        match pick_host_port(min, max, &used) {
            Some(p) => Ok(Some(p)),
            None => Err(OrchestratorError::Docker(format!(
                "no free host port for a new instance: the swarm's services publish every port of \
                 host_port_min..=host_port_max ({min}-{max}); widen the range"
            ))),
        }
    }

    /// Create instance `name`'s service (on a host port of its own with
    /// `publish = "host"`); its id.
    async fn create_instance_service(&self, name: &str) -> Result<String, OrchestratorError> {
        // Every service of this agent picks from the swarm's published
        // ports: one pick at a time, until the service that publishes it
        // exists, so two services never take the same port.
        let _picking = HOST_PORT_PICK.lock().await;
        for _ in 0..PORT_RACE_TRIES {
            let host_port = self.free_host_port().await?;
            let created = self
                .docker
                .create_service(self.service_spec(name, host_port), None)
                .await
                .map_err(docker_err(format!("create swarm service of {name}")))?;
            let Some(service) = created.id else {
                return Err(OrchestratorError::Docker(format!("create swarm service of {name}: no id in the answer")));
            };
            let Some(port) = host_port else { return Ok(service) };
            // Another agent of the swarm may have picked the same port.
            let all = match self.docker.list_services(None::<ListServicesOptions>).await {
                Ok(all) => all,
                Err(e) => {
                    // Not left behind unchecked: it would be adopted later
                    // as an instance no one asked for.
                    if let Err(undo) = self.remove_service(&service, name).await {
                        warn!(instance = name, error = %undo, "cannot remove the swarm service just created");
                    }
                    return Err(docker_err("list swarm services")(e));
                }
            };
            if !yields_port(&service, port, &all) {
                return Ok(service);
            }
            warn!(instance = name, port, "another service took this host port at the same time; picking another");
            self.remove_service(&service, name).await?;
        }
        Err(OrchestratorError::Docker(format!(
            "create swarm service of {name}: another service of the swarm took each host port picked \
             ({PORT_RACE_TRIES} tries); is another agent starting instances in the same range?"
        )))
    }

    /// Wait for the one task of `service` to run with an address.
    async fn wait_running(&self, service: &str, name: &str) -> Result<Replica, OrchestratorError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let names = HashMap::from([(service.to_owned(), name.to_owned())]);
        loop {
            let tasks = self.tasks_of(&[service.to_owned()]).await?;
            let current: Vec<Task> = tasks.into_iter().filter(is_current).collect();
            if let Some(r) = self.replicas(&current, &names).await?.into_iter().find(|r| r.running) {
                return Ok(r);
            }
            if Instant::now() >= deadline {
                let states: Vec<String> = current
                    .iter()
                    .map(|t| {
                        let s = t.status.as_ref();
                        format!("{:?} {:?}", s.and_then(|s| s.state.as_ref()), s.and_then(|s| s.err.as_deref()))
                    })
                    .collect();
                return Err(OrchestratorError::Docker(format!(
                    "swarm service of {name}: no task running within {START_TIMEOUT:?} (tasks: {states:?})"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Remove a swarm service and wait until its tasks have ended (their
    /// containers got SIGTERM, then SIGKILL after the grace period).
    async fn remove_service(&self, service: &str, name: &str) -> Result<(), OrchestratorError> {
        match self.docker.delete_service(service).await {
            Ok(()) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(docker_err(format!("remove swarm service of {name}"))(e)),
        }
        let deadline = Instant::now() + self.spec.stop_grace + Duration::from_secs(15);
        loop {
            let tasks = self.tasks_of(&[service.to_owned()]).await?;
            if tasks.iter().all(|t| is_terminal(state_of(t)) || container_of(t).is_none()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                warn!(instance = name, "swarm service removed, but its task has not ended yet");
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Orchestrator for SwarmOrchestrator {
    /// While Swarm replaces a task (a service of ours with none running),
    /// the list waits for the replacement, up to `REPLACE_WAIT`: the dead
    /// task and its replacement then come in one list, and the agent adopts
    /// the one as the other leaves, instead of starting one of its own too.
    async fn list(&self) -> Result<Vec<Replica>, OrchestratorError> {
        let deadline = Instant::now() + REPLACE_WAIT;
        loop {
            let services = self.our_services().await?;
            let ids: Vec<String> = services.iter().map(|(id, _)| id.clone()).collect();
            let names: HashMap<String, String> = services.into_iter().collect();
            let tasks = self.tasks_of(&ids).await?;
            let replacing = ids.iter().any(|s| {
                !tasks.iter().any(|t| {
                    t.service_id.as_ref() == Some(s) && is_current(t) && state_of(t) == Some(&TaskState::RUNNING)
                })
            });
            if !replacing || Instant::now() >= deadline {
                return self.replicas(&tasks, &names).await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn start(&self) -> Result<Replica, OrchestratorError> {
        let _one_at_a_time = self.starting.lock().await;
        let services = self.our_services().await?;
        let name = format!(
            "{}-{}",
            self.prefix(),
            lowest_free_ordinal(self.prefix(), services.iter().map(|(_, n)| n.as_str()))
        );
        // Every service of this agent picks from the swarm's published
        // ports: one pick at a time, until the service that publishes it
        // exists, so two services never take the same port.
        let service = self.create_instance_service(&name).await?;
        match self.wait_running(&service, &name).await {
            Ok(r) => {
                info!(service = self.service, instance = name, addr = %r.addr, task = r.id, "swarm task running");
                Ok(r)
            }
            Err(e) => {
                if let Err(e) = self.remove_service(&service, &name).await {
                    warn!(instance = name, error = %e, "cannot remove the swarm service that did not start");
                }
                Err(e)
            }
        }
    }

    /// A current task: its service goes (the agent drained it first). A
    /// dead one: Swarm has replaced it already; it is only forgotten.
    async fn stop(&self, id: &str) -> Result<(), OrchestratorError> {
        let task = match self.docker.inspect_task(id).await {
            Ok(t) => t,
            Err(e) if is_status(&e, 404) => return Err(OrchestratorError::Unknown(id.into())),
            Err(e) => return Err(docker_err(format!("inspect task {id}"))(e)),
        };
        let service = task.service_id.clone().unwrap_or_default();
        let ours = self.our_services().await?;
        let Some((_, name)) = ours.iter().find(|(s, _)| *s == service) else {
            // Its service is gone (removed before) or not ours.
            if self.addrs.lock().map_err(poisoned)?.contains_key(id) {
                self.cleared.lock().map_err(poisoned)?.insert(id.to_owned());
                return Ok(());
            }
            return Err(OrchestratorError::Unknown(id.into()));
        };
        self.samples.lock().map_err(poisoned)?.remove(id);
        if is_current(&task) || state_of(&task) == Some(&TaskState::RUNNING) {
            self.remove_service(&service, name).await?;
            info!(service = self.service, instance = name, "swarm service removed");
        } else {
            debug!(service = self.service, instance = name, task = id, "dead task forgotten; swarm replaced it");
        }
        self.cleared.lock().map_err(poisoned)?.insert(id.to_owned());
        Ok(())
    }

    async fn cpu_percent(&self) -> Result<HashMap<String, f64>, OrchestratorError> {
        let ids: Vec<String> = self.our_services().await?.into_iter().map(|(id, _)| id).collect();
        let running = self.tasks_of(&ids).await?.into_iter().filter(|t| state_of(t) == Some(&TaskState::RUNNING));
        let pairs: Vec<(String, String)> =
            running.filter_map(|t| Some((t.id.clone()?, container_of(&t)?.to_owned()))).collect();
        cpu_percent_of(&self.docker, pairs, &self.samples).await
    }

    /// The networks go too, once no task uses them (the engine refuses
    /// otherwise: another service's, or a task still stopping).
    async fn release(&self) {
        let nets = match self.publish {
            SwarmPublish::Bridge => vec![self.spec.network.clone(), config_network(&self.spec.network)],
            SwarmPublish::Host { .. } => vec![self.spec.network.clone()],
        };
        for net in nets {
            // The engine lets the config-only network go a moment after the
            // swarm network made from it.
            let mut tries = 20;
            loop {
                match self.docker.remove_network(&net).await {
                    Ok(()) => break info!(network = net, "network removed"),
                    Err(e) if is_status(&e, 404) => break,
                    Err(e) if tries == 0 || !is_status(&e, 403) && !is_status(&e, 409) => {
                        return debug!(network = net, error = %e, "network kept");
                    }
                    Err(_) => tries -= 1,
                }
                tokio::time::sleep(POLL).await;
            }
        }
        if self.publish != SwarmPublish::Bridge {
            return;
        }
        // The engine leaves a bridge it did not make.
        let br = self.spec.bridge.as_str();
        let alias = std::fs::read_to_string(std::path::Path::new("/sys/class/net").join(br).join("ifalias"));
        if alias.is_ok_and(|a| a.trim() == BRIDGE_ALIAS) {
            if let Err(e) = ip(&["link", "del", br]).await {
                warn!(bridge = br, error = %e, "cannot remove the bridge");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::TaskStatus;

    fn task(desired: TaskState, state: TaskState) -> Task {
        Task {
            desired_state: Some(desired),
            status: Some(TaskStatus { state: Some(state), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn a_task_is_current_while_swarm_means_to_run_it() {
        assert!(is_current(&task(TaskState::RUNNING, TaskState::RUNNING)));
        assert!(is_current(&task(TaskState::RUNNING, TaskState::PREPARING)));
        assert!(is_current(&task(TaskState::READY, TaskState::PENDING)), "a replacement waiting out its delay");
        assert!(!is_current(&task(TaskState::SHUTDOWN, TaskState::RUNNING)), "being stopped");
        assert!(!is_current(&task(TaskState::RUNNING, TaskState::FAILED)), "died, not yet marked shutdown");
        assert!(!is_current(&task(TaskState::SHUTDOWN, TaskState::FAILED)));
    }

    #[test]
    fn the_config_network_is_named_after_the_swarm_network() {
        assert_eq!(config_network("lb-swarm"), "lb-swarm-config");
    }
}
