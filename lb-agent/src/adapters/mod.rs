//! The outside world behind the agent's decisions: the aya data plane,
//! orchestrators, health probes and request scraping.

pub mod dataplane;
pub mod docker;
pub mod orchestrator;
pub mod probe;
pub mod process;
pub mod requests;
