//! lb-agent: loads the XDP load balancer and keeps its maps in step with the
//! configuration. `main.rs` only wires the pieces together.
//!
//! The modules, each depending only on those above it:
//! - [`config`]: the TOML schema and its validation; a leaf.
//! - [`ports`]: the traits through which decisions reach the outside world
//!   (`Dataplane` and its parts, `Orchestrator` and the factory that makes
//!   one per scaled service, `Prober`) and the values that cross them.
//! - [`core`]: pure decisions and state: the backend registry, the
//!   reconciler, health, the scaling policy and the replica lifecycle.
//! - [`adapters`]: the real implementations: the aya data plane, Docker and
//!   process orchestrators, host networking, probes, sampling, the timeline.
//! - [`status`] and [`snapshot`]: what the agent reports, and how it is read
//!   from the registry, the reconciler and the data plane.
//! - [`serve`]: the control socket and Prometheus `/metrics`.
//! - [`agent`]: the event loop that owns the state, generic over the ports;
//!   the per-service scaler it drives, and the worker that walks the
//!   connection table off the loop.
//! - [`check`]: `lb-agent check`: the findings `run` makes before it
//!   attaches, and what the config describes, in words.
//! - [`top`]: `lb-agent top`, the full-screen view of a status snapshot.
//! - `testing` (tests only): fakes of every port.

pub mod adapters;
pub mod agent;
pub mod check;
pub mod cli_help;
pub mod config;
pub mod core;
pub mod ebpf;
pub mod ports;
pub mod serve;
pub mod snapshot;
pub mod status;
#[cfg(test)]
pub mod testing;
pub mod top;
