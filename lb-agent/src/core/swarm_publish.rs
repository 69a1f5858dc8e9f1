//! Swarm instances on every node (`publish = "host"` under
//! `[service.instances.swarm]`): which host port a new instance publishes
//! on, and where each task answers, decided from what the manager's engine
//! lists. No I/O here: `adapters::swarm` lists the services, nodes and
//! tasks and hands them over.
//!
//! A task's port is published in host mode: a plain port on its node's own
//! address (Swarm's routing mesh, which would answer on every node, needs
//! IPVS). So each instance needs a port of its own wherever two instances
//! may share a node, and the agent picks it from the configured range,
//! skipping every port any service of the swarm publishes.
//!
//! Two agents of one swarm can pick the same port at the same moment (the
//! engine accepts a second service publishing a host port another one
//! does). So a new service looks again once it exists: the later of two
//! services on one port gives it up (`yields_port`), and its agent picks
//! again. Each of two racing agents sees the other's service by then, or
//! the other sees its own, so exactly one of them yields.

use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
};

use bollard::models::{EndpointPortConfig, EndpointPortConfigPublishModeEnum, Node, Service, Task};

/// The lowest port of `min..=max` not in `used`.
pub fn pick_host_port(min: u16, max: u16, used: &BTreeSet<u16>) -> Option<u16> {
    (min..=max).find(|p| !used.contains(p))
}

/// Every port the services publish, as their specs ask and as the swarm
/// assigned them.
pub fn published_ports(services: &[Service]) -> BTreeSet<u16> {
    let specified = services.iter().filter_map(|s| s.spec.as_ref()?.endpoint_spec.as_ref()?.ports.as_ref());
    let assigned = services.iter().filter_map(|s| s.endpoint.as_ref()?.ports.as_ref());
    specified.chain(assigned).flatten().filter_map(|p| port_number(p.published_port)).collect()
}

/// Whether the service `ours` (just created, publishing `port`) must give
/// the port up: another service of `services` publishes it too and was
/// created first (by the manager's clock; the larger id yields on a tie).
/// The one created first keeps it, whatever its agent has seen.
pub fn yields_port(ours: &str, port: u16, services: &[Service]) -> bool {
    let created = |s: &Service| (s.created_at.as_deref().map(created_key), s.id.clone().unwrap_or_default());
    let Some(me) = services.iter().find(|s| s.id.as_deref() == Some(ours)) else { return false };
    let mine = created(me);
    services
        .iter()
        .filter(|s| s.id.as_deref() != Some(ours))
        .filter(|s| published_ports(std::slice::from_ref(*s)).contains(&port))
        .any(|s| created(s) < mine)
}

/// An engine timestamp (RFC 3339, its fraction of a second cut at the last
/// non-zero digit) as a key that sorts in time order: the whole seconds and
/// the fraction padded to nanoseconds.
fn created_key(t: &str) -> (String, String) {
    let t = t.trim_end_matches('Z');
    let (secs, frac) = t.split_once('.').unwrap_or((t, ""));
    let frac: String = frac.chars().take_while(char::is_ascii_digit).collect();
    (secs.to_owned(), format!("{frac:0<9}"))
}

/// The host port that `ports` publish `target` on (host mode only).
fn host_port(ports: &[EndpointPortConfig], target: u16) -> Option<u16> {
    ports
        .iter()
        .filter(|p| p.publish_mode == Some(EndpointPortConfigPublishModeEnum::HOST))
        .find(|p| port_number(p.target_port) == Some(target))
        .and_then(|p| port_number(p.published_port))
}

fn port_number(n: Option<i64>) -> Option<u16> {
    n.and_then(|n| u16::try_from(n).ok()).filter(|p| *p != 0)
}

/// Each node's address, by node id: its `Status.Addr`, or for a manager
/// that reports 0.0.0.0 there (some engines do), its advertised address.
pub fn node_addresses(nodes: &[Node]) -> HashMap<String, Ipv4Addr> {
    nodes
        .iter()
        .filter_map(|n| {
            let status = n.status.as_ref().and_then(|s| s.addr.as_deref()).and_then(|a| a.parse::<Ipv4Addr>().ok());
            let advertised = || {
                let addr = n.manager_status.as_ref()?.addr.as_deref()?;
                addr.rsplit_once(':').map_or(addr, |(host, _)| host).parse().ok()
            };
            let addr = status.filter(|a| !a.is_unspecified()).or_else(advertised)?;
            Some((n.id.clone()?, addr))
        })
        .collect()
}

/// Where `task` answers on its container port `target`: its node's address
/// and the host port the task published it on (its `Status.PortStatus`).
/// `None` until the task is placed and its port bound.
pub fn task_backend(task: &Task, target: u16, nodes: &HashMap<String, Ipv4Addr>) -> Option<SocketAddrV4> {
    let node = nodes.get(task.node_id.as_deref()?)?;
    let ports = task.status.as_ref()?.port_status.as_ref()?.ports.as_deref()?;
    Some(SocketAddrV4::new(*node, host_port(ports, target)?))
}

/// How a service spec publishes `target` on `host_port` of each task's node.
pub fn host_port_config(target: u16, host_port: u16, udp: bool) -> EndpointPortConfig {
    use bollard::models::EndpointPortConfigProtocolEnum as Proto;
    EndpointPortConfig {
        protocol: Some(if udp { Proto::UDP } else { Proto::TCP }),
        target_port: Some(i64::from(target)),
        published_port: Some(i64::from(host_port)),
        publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{
        EndpointSpec, ManagerStatus, NodeStatus, PortStatus, ServiceEndpoint, ServiceSpec, TaskStatus,
    };

    fn service(spec_ports: &[(u16, u16)], assigned: &[(u16, u16)]) -> Service {
        let conf = |v: &[(u16, u16)]| v.iter().map(|(t, p)| host_port_config(*t, *p, false)).collect::<Vec<_>>();
        Service {
            spec: Some(ServiceSpec {
                endpoint_spec: Some(EndpointSpec { ports: Some(conf(spec_ports)), ..Default::default() }),
                ..Default::default()
            }),
            endpoint: Some(ServiceEndpoint { ports: Some(conf(assigned)), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn a_new_instance_gets_the_lowest_port_no_service_publishes() {
        let used = published_ports(&[service(&[(8080, 29000)], &[]), service(&[], &[(80, 29001)]), Service::default()]);
        assert_eq!(used, BTreeSet::from([29000, 29001]));
        assert_eq!(pick_host_port(29000, 29999, &used), Some(29002));
        assert_eq!(pick_host_port(29000, 29001, &used), None, "the range is full");
        assert_eq!(pick_host_port(29000, 29001, &BTreeSet::from([29000])), Some(29001));
        assert_eq!(pick_host_port(5, 5, &BTreeSet::new()), Some(5));
    }

    #[test]
    fn a_restarted_agent_picks_around_the_ports_its_services_publish() {
        // The specs hold the ports before the swarm has assigned them.
        let ours = [service(&[(8080, 29000)], &[]), service(&[(8080, 29002)], &[(8080, 29002)])];
        assert_eq!(pick_host_port(29000, 29999, &published_ports(&ours)), Some(29001));
    }

    fn created(id: &str, at: &str, port: u16) -> Service {
        Service { id: Some(id.into()), created_at: Some(at.into()), ..service(&[(8080, port)], &[]) }
    }

    #[test]
    fn of_two_services_on_one_port_the_later_yields() {
        let first = created("b", "2026-12-07T04:50:01.5Z", 29000);
        let second = created("a", "2026-12-07T04:50:01.123456789Z", 29000);
        // .5 s is later than .123456789 s: fractions compare as nanoseconds.
        let all = [first.clone(), second.clone(), created("c", "2026-12-07T04:40:00Z", 29001)];
        assert!(yields_port("b", 29000, &all), "b came after a");
        assert!(!yields_port("a", 29000, &all), "a came first and keeps the port");
        assert!(!yields_port("c", 29001, &all), "no one else publishes 29001");
        assert!(!yields_port("a", 29000, &[second.clone()]), "alone on the port");
        assert!(!yields_port("gone", 29000, &all), "a service not listed yields nothing");
        let tie = [created("x", "2026-12-07T04:50:01Z", 29000), created("y", "2026-12-07T04:50:01.000Z", 29000)];
        assert!(yields_port("y", 29000, &tie) && !yields_port("x", 29000, &tie), "on a tie the larger id yields");
    }

    fn node(id: &str, addr: &str, manager: Option<&str>) -> Node {
        Node {
            id: Some(id.into()),
            status: Some(NodeStatus { addr: Some(addr.into()), ..Default::default() }),
            manager_status: manager.map(|a| ManagerStatus { addr: Some(a.into()), ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn node_addresses_fall_back_to_the_managers_advertised_one() {
        let nodes = node_addresses(&[
            node("m", "0.0.0.0", Some("10.231.1.11:2377")),
            node("w", "10.231.1.12", None),
            node("lost", "0.0.0.0", None),
            Node::default(),
        ]);
        assert_eq!(
            nodes,
            HashMap::from([("m".into(), Ipv4Addr::new(10, 231, 1, 11)), ("w".into(), Ipv4Addr::new(10, 231, 1, 12))])
        );
    }

    fn task(node: &str, ports: &[(u16, u16)]) -> Task {
        Task {
            node_id: Some(node.into()),
            status: Some(TaskStatus {
                port_status: Some(PortStatus {
                    ports: Some(ports.iter().map(|(t, p)| host_port_config(*t, *p, false)).collect()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_task_answers_at_its_nodes_address_and_published_port() {
        let nodes = HashMap::from([("a".into(), Ipv4Addr::new(10, 0, 0, 1)), ("b".into(), Ipv4Addr::new(10, 0, 0, 2))]);
        assert_eq!(
            task_backend(&task("b", &[(9090, 29009), (8080, 29003)]), 8080, &nodes),
            Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 29003))
        );
        assert_eq!(task_backend(&task("a", &[]), 8080, &nodes), None, "port not bound yet");
        assert_eq!(task_backend(&task("c", &[(8080, 29003)]), 8080, &nodes), None, "node not known");
        assert_eq!(task_backend(&Task::default(), 8080, &nodes), None, "not placed yet");
        let mut mesh = task("a", &[(8080, 30000)]);
        if let Some(p) = mesh.status.as_mut().and_then(|s| s.port_status.as_mut()).and_then(|p| p.ports.as_mut()) {
            p[0].publish_mode = Some(EndpointPortConfigPublishModeEnum::INGRESS);
        }
        assert_eq!(task_backend(&mesh, 8080, &nodes), None, "a routing-mesh port is no host port");
    }
}
