//! The outside world behind the agent's decisions: the aya data plane,
//! orchestrators (Docker, Swarm, processes) and the host networking they need,
//! health probes, metric sampling and the scaling timeline.

pub mod backend_setup;
pub mod dataplane;
pub mod docker;
pub mod dsr_probe;
pub mod host_dirs;
pub mod host_facts;
pub mod host_net;
pub mod http;
pub mod lock;
pub mod orchestrator;
pub mod probe;
pub mod process;
pub mod requests;
pub mod routes;
pub mod sampling;
pub mod swarm;
pub mod timeline;
