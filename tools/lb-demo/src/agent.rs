//! What the demo reads from the agent (lb-lab's `Agent` runs it).

use std::time::Duration;

use anyhow::{bail, Context as _};
use lb_agent::status::Snapshot;
use lb_lab::agent::{api_call_within, Agent};

/// The status snapshot over the control socket (3 s limits: the panel
/// reads it twice a second).
pub(crate) fn read_status(agent: &Agent) -> anyhow::Result<Snapshot> {
    let socket = &agent.args().api_socket;
    let answer = api_call_within(socket, r#"{"op":"status"}"#, Duration::from_secs(3))
        .with_context(|| format!("control socket {}", socket.display()))?;
    let mut v: serde_json::Value = serde_json::from_str(&answer).context("unreadable status answer")?;
    if v["ok"] != true {
        bail!("the agent refused status: {answer}");
    }
    serde_json::from_value(v["status"].take()).context("unexpected status layout")
}
