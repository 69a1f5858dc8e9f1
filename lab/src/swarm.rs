//! Docker Swarm for the swarm tests: a guard that leaves a swarm the test
//! made (and only then), and one that removes the swarm services of a
//! test's service and the networks the agent made for it.

use std::{
    collections::BTreeSet,
    thread,
    time::{Duration, Instant},
};

use crate::{
    docker::{docker, docker_try},
    netns::{del_link, link_exists},
};

/// The config of a swarm test: service `service` at `vip` on
/// `interfaces` (plus `service_keys`), scaled by `policy` (the lines of
/// `[service.scaling]`), its instances the demo image's tasks on port 8080,
/// each answering with its instance's name, plus `swarm_keys` (lines of
/// `[service.instances.swarm]`), and the socket load balancing off.
pub fn demo_swarm_toml(
    service: &str,
    vip: std::net::SocketAddrV4,
    interfaces: &[&str],
    service_keys: &str,
    policy: &str,
    swarm_keys: &str,
) -> String {
    format!(
        r#"[[service]]
name = "{service}"
vip = "{vip_ip}"
port = {vip_port}
interfaces = {interfaces:?}
health_check = {{ kind = "http", path = "/healthz", interval = "300ms" }}
drain_timeout = "5s"
{service_keys}

[service.scaling]
{policy}

[service.instances]
ready_timeout = "20s"

[service.instances.swarm]
image = "{image}"
port = 8080
stop_grace = "2s"
env = {{ LB_BACKEND_NAME = "{{name}}", LB_BACKEND_LISTEN = "0.0.0.0:{{port}}" }}
{swarm_keys}
{socket_lb}"#,
        vip_ip = vip.ip(),
        vip_port = vip.port(),
        service_keys = service_keys.trim(),
        policy = policy.trim(),
        image = crate::docker::DEMO_IMAGE,
        swarm_keys = swarm_keys.trim(),
        socket_lb = crate::cgroup::socket_lb_toml(None),
    )
}

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
            // Out of the engine's store too, or its next start makes the
            // bridge again (and the next test takes it for someone else's).
            rm_network("docker_gwbridge");
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
            rm_network(net);
        }
        del_link(&self.bridge);
    }
}

/// `docker network rm <net>` until it is gone: its endpoints (a task's, the
/// ingress sandbox's after a swarm leave) go a moment after their owner.
/// Gives up after 10 s with a warning.
fn rm_network(net: &str) {
    let mut last = String::new();
    for _ in 0..50 {
        let (ok, out) = docker_try(&["network", "rm", net]);
        if ok || out.contains("not found") {
            return;
        }
        last = out;
        thread::sleep(Duration::from_millis(200));
    }
    eprintln!("warning: docker network rm {net}: {last}");
}

/// What a swarm test may leave on the host: its links, its network
/// namespaces' names, and whether an engine answers and in which swarm
/// state. Taken before a test and compared after its world is gone.
#[derive(Debug)]
pub struct HostFootprint {
    pub links: BTreeSet<String>,
    pub namespaces: BTreeSet<String>,
    pub engine_answers: bool,
    /// The engine's swarm state, when it answers.
    pub swarm: Option<String>,
}

impl HostFootprint {
    pub fn now() -> HostFootprint {
        let names = |dir: &str| -> BTreeSet<String> {
            std::fs::read_dir(dir)
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned())).collect())
                .unwrap_or_default()
        };
        let engine_answers = crate::docker::engine_answers();
        HostFootprint {
            links: names("/sys/class/net"),
            namespaces: names(crate::netns::NETNS_DIR),
            engine_answers,
            swarm: engine_answers.then(swarm_state),
        }
    }

    /// What is here now and was not `before` (links and namespaces only:
    /// others may remove theirs meanwhile), or whose engine or swarm state
    /// changed; empty when nothing did.
    fn added_since(&self, before: &HostFootprint) -> Vec<String> {
        let mut added: Vec<String> = self.links.difference(&before.links).map(|l| format!("link {l}")).collect();
        added.extend(self.namespaces.difference(&before.namespaces).map(|n| format!("namespace {n}")));
        if self.engine_answers != before.engine_answers || self.swarm != before.swarm {
            added.push(format!(
                "engine answers {} swarm {:?} (before: {} {:?})",
                self.engine_answers, self.swarm, before.engine_answers, before.swarm
            ));
        }
        added
    }

    /// Panics, naming what was added, unless the host is back to `before`
    /// within 5 s (a namespace's devices go a moment after the namespace).
    pub fn assert_back_to(before: &HostFootprint) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let added = HostFootprint::now().added_since(before);
            if added.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "the test left the host changed: {added:?}");
            thread::sleep(Duration::from_millis(100));
        }
    }
}
