//! Where backend instances come from: containers (Docker) or local
//! processes, behind one small trait. Each implementation starts, stops and
//! lists only instances it created itself, and reports their CPU.

use std::{collections::HashMap, future::Future, net::SocketAddrV4};

use serde::Serialize;

use super::{docker, process};

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
}

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
