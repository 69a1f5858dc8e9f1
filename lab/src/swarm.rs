//! Docker Swarm for the swarm tests: a guard that leaves a swarm the test
//! made (and only then), and one that removes the swarm services of a
//! test's service and the networks the agent made for it.

use crate::docker::{docker, docker_try};

/// The engine's swarm state, `inactive` or `active`.
pub fn swarm_state() -> String {
    docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]).trim().to_owned()
}

/// Whether the engine is in a swarm before the test; if not, the test (or
/// the agent it runs, with `init = true`) makes one and this guard leaves it
/// on drop, with the `docker_gwbridge` network the swarm made (when it was
/// not there before).
pub struct SwarmGuard {
    /// The test made the swarm: leave it.
    leave: bool,
    /// `docker_gwbridge` was not there before.
    gwbridge_is_new: bool,
}

impl SwarmGuard {
    pub fn observe() -> SwarmGuard {
        let leave = swarm_state() != "active";
        let gwbridge_is_new =
            !docker_try(&["network", "inspect", "docker_gwbridge"]).0 && !link_exists("docker_gwbridge");
        SwarmGuard { leave, gwbridge_is_new }
    }

    /// The test makes the swarm (the engine was in none).
    pub fn made_here(&self) -> bool {
        self.leave
    }
}

impl Drop for SwarmGuard {
    fn drop(&mut self) {
        if !self.leave {
            return;
        }
        let (ok, out) = docker_try(&["swarm", "leave", "--force"]);
        if !ok && !out.contains("not part of a swarm") {
            eprintln!("warning: docker swarm leave --force: {out}");
        }
        if self.gwbridge_is_new {
            let (ok, out) = docker_try(&["network", "rm", "docker_gwbridge"]);
            if !ok && !out.contains("not found") {
                eprintln!("warning: docker network rm docker_gwbridge: {out}");
            }
            // The engine may leave the Linux bridge behind.
            del_link("docker_gwbridge");
        }
    }
}

/// Removes, on drop, the swarm services that carry the agent's labels for
/// `service` (a name unique to the test), then the swarm network `network`
/// and its config-only network, and the network's Linux bridge `bridge`
/// (named by the test, not there before it), if they are still there.
pub struct SwarmServices {
    pub service: String,
    pub network: String,
    pub bridge: String,
}

fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

fn del_link(name: &str) {
    if link_exists(name) {
        if let Err(e) = crate::command::try_run_cmd("ip", &["link", "del", name]) {
            eprintln!("warning: ip link del {name}: {e}");
        }
    }
}

impl SwarmServices {
    pub fn ids(&self) -> Vec<String> {
        let owner = format!("label={}={}", lb_agent::adapters::docker::LABEL_OWNER, lb_agent::adapters::docker::OWNER);
        let svc = format!("label={}={}", lb_agent::adapters::docker::LABEL_SERVICE, self.service);
        let (ok, out) = docker_try(&["service", "ls", "-q", "--filter", &owner, "--filter", &svc]);
        if !ok {
            eprintln!("warning: docker service ls for service {}: {out}", self.service);
            return Vec::new();
        }
        out.split_whitespace().map(str::to_owned).collect()
    }

    /// The container of a running task.
    pub fn container_of_task(task: &str) -> String {
        docker(&["inspect", "-f", "{{.Status.ContainerStatus.ContainerID}}", task]).trim().to_owned()
    }
}

impl Drop for SwarmServices {
    fn drop(&mut self) {
        for id in self.ids() {
            let (ok, out) = docker_try(&["service", "rm", &id]);
            if !ok {
                eprintln!("warning: docker service rm {id}: {out}");
            }
        }
        let config = lb_agent::adapters::swarm::config_network(&self.network);
        for net in [&self.network, &config] {
            // The tasks' endpoints go a moment after their service.
            for _ in 0..50 {
                let (ok, out) = docker_try(&["network", "rm", net]);
                if ok || out.contains("not found") {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
        del_link(&self.bridge);
    }
}
