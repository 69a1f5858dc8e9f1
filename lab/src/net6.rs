//! An IPv6 topology: a client namespace and three backend namespaces, each
//! wired by a veth to a load balancer namespace that forwards.
//!
//! ```text
//!  client ns  fd00:c::2 [to-lb] ==== [lb-c] fd00:c::1   LB ns (forwarding)
//!                           fd00:i::1 [lb-bi] ==== [to-lb] fd00:i::2  backend i (1..3)
//! ```
//! The VIP (2001:db8:ff::1) is on no interface: the client routes it via
//! the LB, the backends route the client's /64 via the LB. No default
//! routes; addresses `nodad`. Each backend serves TCP on 8080 and UDP on
//! 5353 and answers with its name (`web-i`).

use std::{
    collections::BTreeMap,
    net::{Ipv6Addr, SocketAddrV6},
};

use crate::{
    netns::NetNs,
    topology::{tcp_request, BackendServers},
};

pub const VIP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);
pub const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc, 0, 0, 0, 0, 0, 2);
pub const LB_CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc, 0, 0, 0, 0, 0, 1);
pub const BACKENDS: u16 = 3;
pub const BACKEND_TCP_PORT: u16 = 8080;
pub const BACKEND_UDP_PORT: u16 = 5353;

/// Backend `i`'s side (`host` 2) or the LB's side (`host` 1) of its link.
pub fn backend_addr(i: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, i, 0, 0, 0, 0, 0, host)
}

/// Namespaces, veths and addresses; dropped, the namespaces go and their
/// veths with them.
pub struct Net6 {
    pub client: NetNs,
    pub lb: NetNs,
    /// Each backend's namespace and servers (`None`: stopped).
    pub backends: Vec<(NetNs, Option<BackendServers>)>,
}

fn wire(lb: &NetNs, lb_iface: &str, lb_addr: Ipv6Addr, node: &NetNs, node_addr: Ipv6Addr) {
    lb.exec("ip", &["link", "add", lb_iface, "type", "veth", "peer", "name", "to-lb", "netns", node.name()]);
    lb.exec("ip", &["-6", "addr", "add", &format!("{lb_addr}/64"), "dev", lb_iface, "nodad"]);
    node.exec("ip", &["-6", "addr", "add", &format!("{node_addr}/64"), "dev", "to-lb", "nodad"]);
    lb.exec("ip", &["link", "set", lb_iface, "up"]);
    node.exec("ip", &["link", "set", "to-lb", "up"]);
}

impl Net6 {
    /// Namespaces named `<prefix>-lb`, `<prefix>-c`, `<prefix>-b<i>`.
    pub fn build(prefix: &str) -> Net6 {
        let lb = NetNs::create(&format!("{prefix}-lb")).expect("LB namespace");
        lb.exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        let client = NetNs::create(&format!("{prefix}-c")).expect("client namespace");
        wire(&lb, "lb-c", LB_CLIENT, &client, CLIENT);
        client.exec("ip", &["-6", "route", "add", &format!("{VIP}/128"), "via", &LB_CLIENT.to_string()]);
        let mut backends = Vec::new();
        for i in 1..=BACKENDS {
            let ns = NetNs::create(&format!("{prefix}-b{i}")).expect("backend namespace");
            wire(&lb, &format!("lb-b{i}"), backend_addr(i, 1), &ns, backend_addr(i, 2));
            ns.exec("ip", &["-6", "route", "add", "fd00:c::/64", "via", &backend_addr(i, 1).to_string()]);
            let servers = BackendServers::start(&ns, &format!("web-{i}"), Self::tcp(i), Self::udp(i));
            backends.push((ns, Some(servers)));
        }
        Net6 { client, lb, backends }
    }

    /// An agent config for this topology: service `web6` at the VIP, port
    /// 80, every backend's TCP address, `service_extra` (TOML lines) in
    /// the service; IPv6 at XDP (the only hook that balances it), the
    /// kernel forwarding the translated packets (no fast path on veth).
    pub fn agent_config(service_extra: &str) -> String {
        let mut out = format!(
            "[[service]]\nname = \"web6\"\nvip = \"{VIP}\"\nport = 80\ninterfaces = [{}]\n\
             health_check = {{ kind = \"tcp\", interval = \"200ms\", timeout = \"200ms\", rise = 1, fall = 2 }}\n\
             {service_extra}\n",
            Self::interfaces_value()
        );
        for i in 1..=BACKENDS {
            out += &format!("\n[[service.backend]]\naddress = \"{}\"\n", Self::tcp(i));
        }
        out + &Self::interface_tables() + "\n[socket_lb]\nenabled = false\n"
    }

    /// A service's `interfaces` value for this topology: every LB interface.
    pub fn interfaces_value() -> String {
        Self::lb_interfaces().iter().map(|i| format!("{i:?}")).collect::<Vec<_>>().join(", ")
    }

    /// The `[interface.*]` tables: IPv6 at XDP (the only hook that balances
    /// it), the kernel forwarding the translated packets (no fast path on
    /// veth).
    pub fn interface_tables() -> String {
        Self::lb_interfaces()
            .iter()
            .map(|i| format!("\n[interface.{i:?}]\nhook = \"xdp\"\nfast_path = \"off\"\n"))
            .collect()
    }

    /// The LB's interfaces: towards the client, then each backend.
    pub fn lb_interfaces() -> Vec<String> {
        std::iter::once("lb-c".to_owned()).chain((1..=BACKENDS).map(|i| format!("lb-b{i}"))).collect()
    }

    /// `n` TCP connections from the client to `to`, all of which must be
    /// answered (from the client's own address): connections per backend.
    pub fn connect(&self, to: SocketAddrV6, n: usize) -> BTreeMap<String, usize> {
        let (shares, failures) = self.client.run(|| {
            let mut shares = BTreeMap::<String, usize>::new();
            let mut failures = Vec::new();
            for k in 0..n {
                match tcp_request(to) {
                    Ok((name, local)) => {
                        assert_eq!(local.ip(), CLIENT, "the client's own address");
                        *shares.entry(name).or_default() += 1;
                    }
                    Err(e) => failures.push(format!("connection {k}: {e}")),
                }
            }
            (shares, failures)
        });
        assert!(
            failures.is_empty(),
            "{} of {n} to {to} failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        shares
    }

    /// Backend `i`'s TCP and UDP addresses.
    pub fn tcp(i: u16) -> SocketAddrV6 {
        SocketAddrV6::new(backend_addr(i, 2), BACKEND_TCP_PORT, 0, 0)
    }

    pub fn udp(i: u16) -> SocketAddrV6 {
        SocketAddrV6::new(backend_addr(i, 2), BACKEND_UDP_PORT, 0, 0)
    }
}
