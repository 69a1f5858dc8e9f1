//! What forwarding to a service's Docker containers needs on the host, set
//! up with iptables and sysctl writes and undone when the service stops
//! scaling with Docker. Both run as child processes the agent's loop does
//! not wait on (`tokio::process`).

use std::process::Stdio;

use tokio::process::Command;
use tracing::{info, warn};

/// What forwarding to containers needs on the host, set up for as long as
/// the service scales with Docker: an ACCEPT rule in DOCKER-USER from each
/// client interface to the network's bridge (dockerd's FORWARD policy is
/// DROP), and loose reverse-path filtering on the bridge (translated replies
/// come from the VIP, which is not routed there; strict filtering would drop
/// them). [`DockerForwarding::remove`] undoes the rules; dropping it without
/// that removes them too, but blocking.
pub struct DockerForwarding {
    rules: Vec<Vec<String>>,
}

impl DockerForwarding {
    /// `owner` (the agent's identity and the service) goes into each rule
    /// as a comment: two services on one network each hold a rule of their
    /// own, and removing one's leaves the other's.
    pub async fn set_up(clients: &[String], bridge: &str, owner: &str) -> anyhow::Result<DockerForwarding> {
        let mut done = DockerForwarding { rules: Vec::new() };
        let comment = format!("lb-agent {owner}");
        for client in clients {
            let rule: Vec<String> =
                ["DOCKER-USER", "-i", client, "-o", bridge, "-m", "comment", "--comment", &comment, "-j", "ACCEPT"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            // -C: already there (left by an agent that was killed): take it
            // over rather than add a twin, so that our stop removes it.
            if iptables("-C", &rule).await.is_err() {
                iptables("-I", &rule).await?;
            }
            done.rules.push(rule);
        }
        let key = format!("/proc/sys/net/ipv4/conf/{bridge}/rp_filter");
        if is_strict(&key).await {
            tokio::fs::write(&key, "0").await.map_err(|e| anyhow::anyhow!("set {key} to 0: {e}"))?;
            info!(bridge, "reverse-path filtering on the instances' bridge set to off");
        }
        if is_strict("/proc/sys/net/ipv4/conf/all/rp_filter").await {
            warn!(
                "net.ipv4.conf.all.rp_filter is 1 (strict): replies from containers will be dropped; set it to 0 or 2"
            );
        }
        Ok(done)
    }

    /// Leave our rules in place (for containers that outlive the agent, to
    /// be taken over by the next one).
    pub fn keep(mut self) {
        self.rules.clear();
    }

    /// Remove our rules.
    pub async fn remove(mut self) {
        for rule in std::mem::take(&mut self.rules) {
            if let Err(e) = iptables("-D", &rule).await {
                warn!(error = %e, "removing our DOCKER-USER rule failed");
            }
        }
    }
}

impl Drop for DockerForwarding {
    /// The net under [`DockerForwarding::remove`] (a start-up that failed
    /// half-way): blocking, but the rules must not outlive the agent.
    fn drop(&mut self) {
        for rule in &self.rules {
            let out = std::process::Command::new("iptables").arg("-w").arg("-D").args(rule).output();
            if let Err(e) = check("-D", rule, out) {
                warn!(error = %e, "removing our DOCKER-USER rule failed");
            }
        }
    }
}

async fn is_strict(sysctl: &str) -> bool {
    tokio::fs::read_to_string(sysctl).await.is_ok_and(|v| v.trim() == "1")
}

async fn iptables(op: &str, rule: &[String]) -> anyhow::Result<()> {
    let out = Command::new("iptables").arg("-w").arg(op).args(rule).stdin(Stdio::null()).output().await;
    check(op, rule, out)
}

fn check(op: &str, rule: &[String], out: std::io::Result<std::process::Output>) -> anyhow::Result<()> {
    let out = out.map_err(|e| anyhow::anyhow!("run iptables: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "iptables {op} {}: {}",
        rule.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
