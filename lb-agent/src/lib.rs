//! lb-agent: loads the XDP load balancer and keeps its maps in step with the
//! configuration. `main.rs` only wires the pieces together.

pub mod adapters;
pub mod agent;
pub mod config;
pub mod core;
pub mod ebpf;
pub mod ports;
pub mod serve;
pub mod snapshot;
pub mod status;
#[cfg(test)]
pub mod testing;
