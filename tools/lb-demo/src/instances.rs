//! Instances: what the orchestrator needs from the demo.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use lb_agent::adapters::docker::{LABEL_OWNER, LABEL_SERVICE, OWNER};
use lb_lab::{command::try_run_cmd, docker::DEMO_IMAGE};

use crate::{
    autoscale::{INSTANCE_NET, INSTANCE_PORT, SERVICE},
    cli::OrchestratorKind,
};

pub(crate) struct InstancePlan {
    kind: OrchestratorKind,
    /// The instances' bridge: in the LB namespace for processes (also the
    /// name prefix of their namespaces, `<bridge>-<n>`), in the host's for
    /// Docker. Unique to this run.
    pub(crate) bridge: String,
    backend_bin: PathBuf,
    /// Docker only: the network the agent makes for the containers.
    pub(crate) network: String,
    /// lb-backend's `--max-connections` (its default when `None`).
    pub(crate) max_connections: Option<u64>,
}

impl InstancePlan {
    pub(crate) fn new(kind: OrchestratorKind, backend_bin: &Path) -> InstancePlan {
        let pid = std::process::id();
        let (bridge, network) = match kind {
            OrchestratorKind::Docker => (format!("lbdd{pid}"), format!("lb-demo-{pid}")),
            _ => (format!("lbd{pid}"), String::new()),
        };
        InstancePlan { kind, bridge, backend_bin: backend_bin.to_owned(), network, max_connections: None }
    }

    pub(crate) fn docker(&self) -> bool {
        self.kind == OrchestratorKind::Docker
    }

    pub(crate) fn describe(&self) -> String {
        if self.docker() {
            format!(
                "instances as Docker containers of {DEMO_IMAGE} (lb-agent's Docker orchestrator, network {}, bridge {})",
                self.network, self.bridge
            )
        } else {
            format!("instances as local lb-backend processes (lb-agent's process orchestrator, bridge {})", self.bridge)
        }
    }

    /// The interface where the instances' replies arrive.
    pub(crate) fn reply_interface(&self) -> &str {
        &self.bridge
    }

    /// `[service.instances.*]` and below.
    pub(crate) fn toml(&self) -> String {
        if self.docker() {
            return format!(
                "[service.instances.docker]\nimage = {}\nport = {INSTANCE_PORT}\nnetwork = {}\nbridge = {}\n\
                 subnet = \"{INSTANCE_NET}\"\ncpus = 1.0\nstop_grace = \"3s\"\n\
                 env = {{ LB_BACKEND_NAME = \"{{name}}\", LB_BACKEND_LISTEN = \"0.0.0.0:{{port}}\", \
                 LB_BACKEND_WORK_MS = \"10\", LB_BACKEND_CPU_WORKERS = \"1\"{} }}\n",
                toml_string(DEMO_IMAGE),
                toml_string(&self.network),
                toml_string(&self.bridge),
                self.max_connections.map_or(String::new(), |n| format!(", LB_BACKEND_MAX_CONNECTIONS = \"{n}\"")),
            );
        }
        let max_connections = self.max_connections.map(|n| n.to_string());
        let cap = max_connections.as_deref().map(|n| ["--max-connections", n]);
        let command = [
            self.backend_bin.to_string_lossy().as_ref(),
            "--listen",
            "{addr}",
            "--name",
            "{name}",
            "--work-ms",
            "10",
            "--cpu-workers",
            "1",
        ]
        .iter()
        .chain(cap.iter().flatten())
        .map(|a| toml_string(a))
        .collect::<Vec<_>>()
        .join(", ");
        format!(
            "[service.instances.process]\ncommand = [{command}]\nport = {INSTANCE_PORT}\nbridge = {}\n",
            toml_string(&self.bridge)
        )
    }

    /// Containers the agent made for this run (its labels, on this run's
    /// network) that are still there.
    pub(crate) fn leftover_containers(&self) -> Vec<String> {
        if !self.docker() {
            return Vec::new();
        }
        let owner = format!("label={LABEL_OWNER}={OWNER}");
        let service = format!("label={LABEL_SERVICE}={SERVICE}");
        let network = format!("network={}", self.network);
        let args = ["ps", "-aq", "--no-trunc", "--filter", &owner, "--filter", &service, "--filter", &network];
        try_run_cmd("docker", &args).map(|out| out.split_whitespace().map(str::to_owned).collect()).unwrap_or_default()
    }
}

/// A TOML basic string.
pub(crate) fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
