//! Where backend instances come from: containers (Docker) or local
//! processes, behind one small trait (`ports::Orchestrator`). Each
//! implementation starts, stops and lists only instances it created itself,
//! and reports their CPU. [`HostOrchestrators`] is the factory the agent
//! gets: it makes the orchestrator a service's config names.

use std::{collections::HashMap, sync::Mutex};

use super::{docker, host_net::DockerForwarding, process, swarm};
use crate::{
    config::{instances::SwarmPublish, Protocol, ServiceConfig},
    ports::{Orchestrator, OrchestratorError, OrchestratorFactory, Replica},
};

/// The real factory: Docker or processes, as `[service.instances]` says,
/// with the host set-up each needs.
pub struct HostOrchestrators {
    /// The agent's identity (`agent::Options::identity`), on what it makes.
    pub agent: String,
}

impl OrchestratorFactory for HostOrchestrators {
    type Orchestrator = AnyOrchestrator;

    async fn make(&self, service: &ServiceConfig) -> anyhow::Result<AnyOrchestrator> {
        AnyOrchestrator::for_service(&self.agent, service).await
    }
}

/// The orchestrator a service's config names.
pub enum AnyOrchestrator {
    Process(process::ProcessOrchestrator),
    Docker {
        /// Boxed: the Docker client is large, and there is one per service.
        orchestrator: Box<docker::DockerOrchestrator>,
        /// The host set-up forwarding to its containers needs, kept until
        /// `release`.
        forwarding: Mutex<Option<DockerForwarding>>,
    },
    /// Swarm tasks on this engine's bridge: the same host set-up as Docker.
    Swarm {
        orchestrator: Box<swarm::SwarmOrchestrator>,
        forwarding: Mutex<Option<DockerForwarding>>,
    },
}

impl AnyOrchestrator {
    /// The orchestrator `svc`'s instances config names, for the agent
    /// `agent`, and, for Docker, the host set-up forwarding to its
    /// containers needs.
    pub async fn for_service(agent: &str, svc: &ServiceConfig) -> anyhow::Result<AnyOrchestrator> {
        let Some(instances) = &svc.instances else { anyhow::bail!("service {} is not scaled", svc.name) };
        Ok(match (&instances.process, &instances.docker, &instances.swarm) {
            (Some(spec), _, _) => {
                AnyOrchestrator::Process(process::ProcessOrchestrator::new(&svc.name, spec.clone()).await?)
            }
            (None, Some(spec), _) => {
                let o = docker::DockerOrchestrator::new(agent, &svc.name, spec.clone()).await?;
                let forwarding = Mutex::new(Some(forwarding(agent, svc, &spec.bridge).await?));
                AnyOrchestrator::Docker { orchestrator: Box::new(o), forwarding }
            }
            (None, None, Some(spec)) => {
                let udp = svc.protocol == Protocol::Udp;
                let o = swarm::SwarmOrchestrator::new(agent, &svc.name, spec.clone(), udp).await?;
                // Tasks on other nodes are reached by the host's routes.
                let forwarding = match spec.publish {
                    SwarmPublish::Bridge => Some(forwarding(agent, svc, &spec.container.bridge).await?),
                    SwarmPublish::Host { .. } => None,
                };
                let forwarding = Mutex::new(forwarding);
                AnyOrchestrator::Swarm { orchestrator: Box::new(o), forwarding }
            }
            (None, None, None) => anyhow::bail!("service {}: no orchestrator", svc.name),
        })
    }

    /// The host set-up forwarding to the containers on `bridge` needs.
    fn forwarding_slot(&self) -> Option<&Mutex<Option<DockerForwarding>>> {
        match self {
            AnyOrchestrator::Process(_) => None,
            AnyOrchestrator::Docker { forwarding, .. } | AnyOrchestrator::Swarm { forwarding, .. } => Some(forwarding),
        }
    }

    fn take_forwarding(&self) -> Option<DockerForwarding> {
        let slot = self.forwarding_slot()?;
        slot.lock().map(|mut f| f.take()).unwrap_or_else(|poisoned| poisoned.into_inner().take())
    }
}

/// Accept new connections from `svc`'s client interfaces to the
/// containers' `bridge` (dockerd's FORWARD policy drops them).
async fn forwarding(agent: &str, svc: &ServiceConfig, bridge: &str) -> anyhow::Result<DockerForwarding> {
    let clients: Vec<String> = svc.interfaces.iter().filter(|i| **i != bridge).cloned().collect();
    DockerForwarding::set_up(&clients, bridge, &format!("{agent} {}", svc.name)).await
}

impl Orchestrator for AnyOrchestrator {
    async fn list(&self) -> Result<Vec<Replica>, OrchestratorError> {
        match self {
            AnyOrchestrator::Process(o) => o.list().await,
            AnyOrchestrator::Docker { orchestrator: o, .. } => o.list().await,
            AnyOrchestrator::Swarm { orchestrator: o, .. } => o.list().await,
        }
    }

    async fn start(&self) -> Result<Replica, OrchestratorError> {
        match self {
            AnyOrchestrator::Process(o) => o.start().await,
            AnyOrchestrator::Docker { orchestrator: o, .. } => o.start().await,
            AnyOrchestrator::Swarm { orchestrator: o, .. } => o.start().await,
        }
    }

    async fn stop(&self, id: &str) -> Result<(), OrchestratorError> {
        match self {
            AnyOrchestrator::Process(o) => o.stop(id).await,
            AnyOrchestrator::Docker { orchestrator: o, .. } => o.stop(id).await,
            AnyOrchestrator::Swarm { orchestrator: o, .. } => o.stop(id).await,
        }
    }

    async fn cpu_percent(&self) -> Result<HashMap<String, f64>, OrchestratorError> {
        match self {
            AnyOrchestrator::Process(o) => o.cpu_percent().await,
            AnyOrchestrator::Docker { orchestrator: o, .. } => o.cpu_percent().await,
            AnyOrchestrator::Swarm { orchestrator: o, .. } => o.cpu_percent().await,
        }
    }

    fn keep_host_setup(&self) {
        if let Some(f) = self.take_forwarding() {
            f.keep();
        }
    }

    async fn release(&self) {
        match self {
            AnyOrchestrator::Process(o) => return o.release().await,
            AnyOrchestrator::Swarm { orchestrator, .. } => orchestrator.release().await,
            AnyOrchestrator::Docker { .. } => {}
        }
        // Taken out first: the lock is not held across the removal.
        if let Some(f) = self.take_forwarding() {
            f.remove().await;
        }
    }
}
