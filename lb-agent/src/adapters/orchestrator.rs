//! Where backend instances come from: containers (Docker) or local
//! processes, behind one small trait (`ports::Orchestrator`). Each
//! implementation starts, stops and lists only instances it created itself,
//! and reports their CPU.

use std::collections::HashMap;

use super::{docker, process};
use crate::ports::{Orchestrator, OrchestratorError, Replica};

/// The orchestrator a service's config names.
pub enum AnyOrchestrator {
    Process(process::ProcessOrchestrator),
    /// Boxed: the Docker client is large, and there is one per service.
    Docker(Box<docker::DockerOrchestrator>),
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
