//! Where backend instances come from: containers (Docker) or local
//! processes, behind one small trait (`ports::Orchestrator`). Each
//! implementation starts, stops and lists only instances it created itself,
//! and reports their CPU.

use std::collections::HashMap;

use super::{docker, host_net::DockerForwarding, process};
use crate::{
    config::{instances::InstancesConfig, ServiceConfig},
    ports::{Orchestrator, OrchestratorError, Replica},
};

/// The orchestrator a service's config names.
pub enum AnyOrchestrator {
    Process(process::ProcessOrchestrator),
    /// Boxed: the Docker client is large, and there is one per service.
    Docker(Box<docker::DockerOrchestrator>),
}

impl AnyOrchestrator {
    /// The orchestrator `instances` names for `svc`, and, for Docker, the
    /// host set-up forwarding to its containers needs (kept for as long as
    /// the service scales).
    pub async fn for_service(
        svc: &ServiceConfig,
        instances: &InstancesConfig,
    ) -> anyhow::Result<(AnyOrchestrator, Option<DockerForwarding>)> {
        Ok(match (&instances.process, &instances.docker) {
            (Some(spec), _) => {
                (AnyOrchestrator::Process(process::ProcessOrchestrator::new(&svc.name, spec.clone()).await?), None)
            }
            (None, Some(spec)) => {
                let o = docker::DockerOrchestrator::new(&svc.name, spec.clone()).await?;
                let clients: Vec<String> = svc.interfaces.iter().filter(|i| **i != spec.bridge).cloned().collect();
                (AnyOrchestrator::Docker(Box::new(o)), Some(DockerForwarding::set_up(&clients, &spec.bridge)?))
            }
            (None, None) => anyhow::bail!("service {}: no orchestrator", svc.name),
        })
    }
}

impl Orchestrator for AnyOrchestrator {
    async fn list(&self) -> Result<Vec<Replica>, OrchestratorError> {
        match self {
            AnyOrchestrator::Process(o) => o.list().await,
            AnyOrchestrator::Docker(o) => o.list().await,
        }
    }

    async fn start(&self) -> Result<Replica, OrchestratorError> {
        match self {
            AnyOrchestrator::Process(o) => o.start().await,
            AnyOrchestrator::Docker(o) => o.start().await,
        }
    }

    async fn stop(&self, id: &str) -> Result<(), OrchestratorError> {
        match self {
            AnyOrchestrator::Process(o) => o.stop(id).await,
            AnyOrchestrator::Docker(o) => o.stop(id).await,
        }
    }

    async fn cpu_percent(&self) -> Result<HashMap<String, f64>, OrchestratorError> {
        match self {
            AnyOrchestrator::Process(o) => o.cpu_percent().await,
            AnyOrchestrator::Docker(o) => o.cpu_percent().await,
        }
    }
}
