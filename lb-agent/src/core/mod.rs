//! Pure decisions and state: no I/O, and time comes in as an argument.

pub mod backend_setup;
pub mod changes;
pub mod deploy;
pub mod explain;
pub mod full_nat;
pub mod health;
pub mod overlay;
pub mod policy;
pub mod reconcile;
pub mod registry;
pub mod replicas;
pub mod slow_start;
pub mod swarm_publish;
pub mod vip;
pub mod zero;
