//! lb-agent: loads the XDP load balancer and keeps its maps in step with the
//! configuration. `main.rs` only wires the pieces together.

pub mod agent;
pub mod api;
pub mod config;
pub mod dataplane;
pub mod ebpf;
pub mod health;
pub mod http;
pub mod metrics;
pub mod orchestrator;
pub mod policy;
pub mod reconcile;
pub mod registry;
pub mod requests;
pub mod scaler;
pub mod snapshot;
pub mod status;
#[cfg(test)]
pub mod testing;
