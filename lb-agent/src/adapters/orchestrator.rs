//! Where backend instances come from: containers (Docker) or local
//! processes, behind one small trait (`ports::Orchestrator`). Each
//! implementation starts, stops and lists only instances it created itself,
//! and reports their CPU. [`HostOrchestrators`] is the factory the agent
//! gets: it makes the orchestrator a service's config names.

use std::{collections::HashMap, sync::Mutex};

use super::{docker, host_net::DockerForwarding, process};
use crate::{
    config::ServiceConfig,
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
}

impl AnyOrchestrator {
    /// The orchestrator `svc`'s instances config names, for the agent
    /// `agent`, and, for Docker, the host set-up forwarding to its
    /// containers needs.
    pub async fn for_service(agent: &str, svc: &ServiceConfig) -> anyhow::Result<AnyOrchestrator> {
        let Some(instances) = &svc.instances else { anyhow::bail!("service {} is not scaled", svc.name) };
        Ok(match (&instances.process, &instances.docker) {
            (Some(spec), _) => {
                AnyOrchestrator::Process(process::ProcessOrchestrator::new(&svc.name, spec.clone()).await?)
            }
            (None, Some(spec)) => {
                let o = docker::DockerOrchestrator::new(agent, &svc.name, spec.clone()).await?;
                let clients: Vec<String> = svc.interfaces.iter().filter(|i| **i != spec.bridge).cloned().collect();
                let forwarding =
                    DockerForwarding::set_up(&clients, &spec.bridge, &format!("{agent} {}", svc.name)).await?;
                AnyOrchestrator::Docker { orchestrator: Box::new(o), forwarding: Mutex::new(Some(forwarding)) }
            }
            (None, None) => anyhow::bail!("service {}: no orchestrator", svc.name),
        })
    }
}

impl Orchestrator for AnyOrchestrator {
    async fn list(&self) -> Result<Vec<Replica>, OrchestratorError> {
        match self {
            AnyOrchestrator::Process(o) => o.list().await,
            AnyOrchestrator::Docker { orchestrator: o, .. } => o.list().await,
        }
    }

    async fn start(&self) -> Result<Replica, OrchestratorError> {
        match self {
            AnyOrchestrator::Process(o) => o.start().await,
            AnyOrchestrator::Docker { orchestrator: o, .. } => o.start().await,
        }
    }

    async fn stop(&self, id: &str) -> Result<(), OrchestratorError> {
        match self {
            AnyOrchestrator::Process(o) => o.stop(id).await,
            AnyOrchestrator::Docker { orchestrator: o, .. } => o.stop(id).await,
        }
    }

    async fn cpu_percent(&self) -> Result<HashMap<String, f64>, OrchestratorError> {
        match self {
            AnyOrchestrator::Process(o) => o.cpu_percent().await,
            AnyOrchestrator::Docker { orchestrator: o, .. } => o.cpu_percent().await,
        }
    }

    fn keep_host_setup(&self) {
        let AnyOrchestrator::Docker { forwarding, .. } = self else { return };
        let taken = forwarding.lock().map(|mut f| f.take()).unwrap_or_else(|poisoned| poisoned.into_inner().take());
        if let Some(f) = taken {
            f.keep();
        }
    }

    async fn release(&self) {
        let forwarding = match self {
            AnyOrchestrator::Process(o) => return o.release().await,
            AnyOrchestrator::Docker { forwarding, .. } => forwarding,
        };
        // Taken out first: the lock is not held across the removal.
        let taken = forwarding.lock().map(|mut f| f.take()).unwrap_or_else(|poisoned| poisoned.into_inner().take());
        if let Some(f) = taken {
            f.remove().await;
        }
    }
}
