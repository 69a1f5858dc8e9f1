//! What the agent serves: the control socket and Prometheus `/metrics`.

pub mod api;
pub mod metrics;
