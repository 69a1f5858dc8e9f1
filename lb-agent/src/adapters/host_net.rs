//! What forwarding to a service's Docker containers needs on the host, set
//! up with iptables and sysctl writes and undone when the service stops
//! scaling with Docker.

use tracing::{info, warn};

/// What forwarding to containers needs on the host, set up for as long as
/// the service scales with Docker and undone exactly on drop: an ACCEPT rule
/// in DOCKER-USER from each client interface to the network's bridge
/// (dockerd's FORWARD policy is DROP), and loose reverse-path filtering on
/// the bridge (translated replies come from the VIP, which is not routed
/// there; strict filtering would drop them).
pub struct DockerForwarding {
    rules: Vec<Vec<String>>,
}

impl DockerForwarding {
    pub fn set_up(clients: &[String], bridge: &str) -> anyhow::Result<DockerForwarding> {
        let mut done = DockerForwarding { rules: Vec::new() };
        for client in clients {
            let rule: Vec<String> =
                ["DOCKER-USER", "-i", client, "-o", bridge, "-j", "ACCEPT"].iter().map(|s| s.to_string()).collect();
            // -C: already there (left by an agent that was killed): take it
            // over rather than add a twin, so that our stop removes it.
            if iptables("-C", &rule).is_err() {
                iptables("-I", &rule)?;
            }
            done.rules.push(rule);
        }
        let key = format!("/proc/sys/net/ipv4/conf/{bridge}/rp_filter");
        if std::fs::read_to_string(&key).map(|v| v.trim() == "1").unwrap_or(false) {
            std::fs::write(&key, "0").map_err(|e| anyhow::anyhow!("set {key} to 0: {e}"))?;
            info!(bridge, "reverse-path filtering on the instances' bridge set to off");
        }
        if std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/rp_filter").map(|v| v.trim() == "1").unwrap_or(false) {
            warn!(
                "net.ipv4.conf.all.rp_filter is 1 (strict): replies from containers will be dropped; set it to 0 or 2"
            );
        }
        Ok(done)
    }
}

impl Drop for DockerForwarding {
    fn drop(&mut self) {
        for rule in &self.rules {
            if let Err(e) = iptables("-D", rule) {
                warn!(error = %e, "removing our DOCKER-USER rule failed");
            }
        }
    }
}

fn iptables(op: &str, rule: &[String]) -> anyhow::Result<()> {
    let out = std::process::Command::new("iptables")
        .arg("-w")
        .arg(op)
        .args(rule)
        .output()
        .map_err(|e| anyhow::anyhow!("run iptables: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "iptables {op} {}: {}",
        rule.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
