//! Where backend instances come from: containers (Docker) or local
//! processes, behind one small trait. Each implementation starts, stops and
//! lists only instances it created itself, and reports their CPU.

pub mod process;

use std::{collections::HashMap, future::Future, net::SocketAddrV4};

use serde::Serialize;

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
