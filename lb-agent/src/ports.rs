//! The agent's ports: the traits through which its decisions reach the
//! outside world, and the values that cross them. `adapters` holds the real
//! implementations (aya, Docker, processes), `testing` the fakes.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    net::SocketAddrV4,
};

use lb_common::{Backend, Service, ServiceKey, PROG_LB, PROG_LB_LOCAL};
use serde::Serialize;

// ---------------------------------------------------------------------------
// The data plane.

/// The writes the reconciler needs; `adapters::dataplane::AyaDataplane` is
/// the real one.
pub trait Dataplane {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError>;
    /// Write `(slot, backend id)` pairs into one of a service's two tables.
    fn set_table_entries(&mut self, service_id: u32, table: u32, entries: &[(u32, u32)]) -> Result<(), DataplaneError>;
    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> Result<(), DataplaneError>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError>;
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("map {map}: {op} failed")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("no free {what} id (at most {max})")]
    NoFreeId { what: &'static str, max: u32 },
}

/// What a previous agent left in the (pinned) maps.
#[derive(Clone, Debug, Default)]
pub struct PinnedState {
    pub services: Vec<(ServiceKey, Service)>,
    pub backends: Vec<(u32, Backend)>,
    /// Both tables of every service, by service id.
    pub tables: BTreeMap<u32, [Vec<u32>; 2]>,
}

/// One walk of the connection table.
pub struct ConntrackScan {
    /// Open flows per backend id.
    pub open: BTreeMap<u32, u64>,
    /// Entries in the table (two per flow).
    pub entries: u64,
}

/// How the program runs on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) XDP.
    Driver,
    /// Generic (skb) XDP: the driver has no native support.
    Generic,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Driver => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// Which of the object's two programs an interface gets: the one that takes
/// every L4 checksum for complete, or the one that also recognises partial
/// ones (`lb_common::PROG_LB_LOCAL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4Checksums {
    Complete,
    MayBePartial,
}

impl L4Checksums {
    /// The name of the program in the lb-ebpf object.
    pub fn program(self) -> &'static str {
        match self {
            L4Checksums::Complete => PROG_LB,
            L4Checksums::MayBePartial => PROG_LB_LOCAL,
        }
    }

    /// `auto` resolved by the interface's driver: these kinds carry packets
    /// from local stacks, which may be CHECKSUM_PARTIAL.
    pub fn for_driver(driver: &str) -> Self {
        match driver {
            "veth" | "bridge" | "tun" | "netkit" | "macvlan" | "ipvlan" => L4Checksums::MayBePartial,
            _ => L4Checksums::Complete,
        }
    }
}

impl std::fmt::Display for L4Checksums {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            L4Checksums::Complete => "complete",
            L4Checksums::MayBePartial => "may-be-partial",
        })
    }
}

// ---------------------------------------------------------------------------
// Orchestrators: where a scaled service's instances come from.

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
