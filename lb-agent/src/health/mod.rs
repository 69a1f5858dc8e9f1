//! Backend health: the pure state machine (`state`) and the probes that feed it.

pub mod probe;
pub mod state;
