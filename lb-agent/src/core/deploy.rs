//! Can the data plane serve this config on this host? Pure: the facts about
//! the host are gathered first (`adapters::host_facts`), then judged here,
//! so `check` and `run` say the same thing for the same host.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::PathBuf};

use crate::{
    config::{BackendConfig, ChecksumMode, Config, FastPathMode, ServiceConfig},
    core::vip::ipv4,
    ports::{Hook, HostFacts, InterfaceFacts, Route},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The config would run, but some traffic cannot be served.
    Warn,
    /// Nothing of the service would work: `run` refuses.
    Refuse,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub text: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = match self.severity {
            Severity::Warn => "warning",
            Severity::Refuse => "refused",
        };
        write!(f, "{word}: {}", self.text)
    }
}

/// The cgroup v2 directory socket load balancing attaches to: the one
/// configured, else the cgroup v2 mount; `None` when it is off or there is
/// no cgroup v2 here.
pub fn socket_lb_cgroup(config: &Config, facts: &HostFacts) -> Option<PathBuf> {
    let s = &config.socket_lb;
    s.enabled.then(|| s.cgroup.clone().or_else(|| facts.cgroup2_mount.clone())).flatten()
}

/// What the file alone says is wrong but allowed (`check --file-only`
/// runs only this; `judge` runs it too): a service whose every listed
/// backend has weight 0 has no usable backend.
pub fn judge_file(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    for (i, s) in config.services.iter().enumerate() {
        if s.backends.is_empty() || s.backends.iter().any(|b| b.weight > 0) {
            continue;
        }
        let which = if s.backends.len() == 1 {
            "backend[0].weight: its only backend has weight 0".to_owned()
        } else {
            format!("backend[*].weight: all {} backends have weight 0", s.backends.len())
        };
        out.push(Finding {
            severity: Severity::Warn,
            text: format!(
                "service[{i}] {:?}: {which}, so the service has no usable backend and new flows are dropped; give \
                 one a weight above 0 (weight 0 keeps a backend out of the table)",
                s.name
            ),
        });
    }
    out
}

/// Every way `config` cannot be served on a host with `facts`: what `run`
/// refuses before it attaches anything, and what it warns about. `check`
/// runs the same.
pub fn judge(config: &Config, facts: &HostFacts) -> Vec<Finding> {
    let mut out = judge_file(config);
    out.extend(crate::core::full_nat::judge(config, facts));
    if config.socket_lb.enabled && !config.services.is_empty() && socket_lb_cgroup(config, facts).is_none() {
        out.push(Finding {
            severity: Severity::Warn,
            text: "socket_lb: no cgroup v2 file system is mounted here (none in /proc/self/mountinfo), so \
                   processes and containers on this host cannot reach the services (their packets never cross \
                   XDP); mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`) or set socket_lb.cgroup, \
                   or set socket_lb.enabled = false"
                .into(),
        });
    }
    for (i, s) in config.services.iter().enumerate() {
        let at = format!("service[{i}] {:?}", s.name);
        for (j, ifname) in s.interfaces.iter().enumerate() {
            if !facts.interfaces.contains_key(ifname) && !facts.bridges_to_make.contains(ifname) {
                out.push(Finding {
                    severity: Severity::Refuse,
                    text: format!("{at}: interfaces[{j}]: no interface named {ifname:?} here"),
                });
            }
        }
        // The host's addresses, routes and reply paths are looked up for
        // IPv4: an IPv6 service is judged by its interfaces only.
        let Some(vip) = ipv4(s.vip) else { continue };
        let known: Vec<(&String, &InterfaceFacts)> =
            s.interfaces.iter().filter_map(|n| facts.interfaces.get(n).map(|f| (n, f))).collect();
        if let Some((first, last)) = facts.ephemeral_ports.filter(|_| facts.local_addrs.contains(&vip)) {
            if (first..=last).contains(&s.port) {
                out.push(Finding {
                    severity: Severity::Warn,
                    text: format!(
                        "{at}: port {} of the host's own address is in its ephemeral range \
                         (net.ipv4.ip_local_port_range {first}-{last}): answers to the host's own outgoing \
                         connections from that port would be taken for the service's clients; use a port outside \
                         the range, or narrow it",
                        s.port
                    ),
                });
            }
        }
        if facts.local_addrs.contains(&vip) {
            // At tc a reply leaves by bpf_redirect into any device, past the
            // martian check; at XDP only by a fast path to the egress device.
            let off: Vec<String> = known
                .iter()
                .filter(|(_, f)| f.hook == Hook::Xdp && !f.fast_path)
                .map(|(n, f)| format!("{n} ({})", f.fast_path_why))
                .collect();
            let why = format!(
                "the VIP {} is an address of this host, so a reply translated back to it cannot pass up to the \
                 kernel (dropped as a martian) and must leave on the fast path (or by the tc hook)",
                s.vip
            );
            if !known.is_empty() && off.len() == known.len() {
                out.push(Finding {
                    severity: Severity::Refuse,
                    text: format!("{at}: {why}, which is off on every listed interface: {}", off.join(", ")),
                });
            } else if !off.is_empty() {
                out.push(Finding {
                    severity: Severity::Warn,
                    text: format!("{at}: {why}; clients behind these interfaces get no answer: {}", off.join(", ")),
                });
            }
        }
        for (n, f) in &known {
            if !f.forwarding {
                out.push(Finding {
                    severity: Severity::Warn,
                    text: format!(
                        "{at}: interface {n}: forwarding is off (net.ipv4.conf.{n}.forwarding=0), so no backend is \
                         reachable from packets arriving there"
                    ),
                });
            }
        }
        out.extend(judge_routes(&at, s, facts));
        out.extend(judge_reply_paths(&at, s, vip, facts));
        out.extend(judge_vip_interface(&at, s, vip, facts));
    }
    for (n, settings) in &config.interface_settings {
        let Some(f) = facts.interfaces.get(n).filter(|f| f.hook == Hook::Tc) else { continue };
        if settings.checksums != ChecksumMode::Auto || settings.fast_path != FastPathMode::Auto {
            out.push(Finding {
                severity: Severity::Warn,
                text: format!(
                    "interface {n}: it gets the tc hook ({}), where `checksums` does not apply (the kernel's \
                     helpers follow the skb's checksum state) and `fast_path` only says whether XDP on other \
                     interfaces may redirect into it; packets arriving on it leave by bpf_redirect either way",
                    f.hook_why
                ),
            });
        }
    }
    out
}

/// A VIP that is an address of this host is what its interface's subnet
/// reaches there: if the service does not list that interface, the program
/// never sees those clients and the host's own port answers them (a VIP on
/// loopback is reached through the other interfaces, and is not judged).
fn judge_vip_interface(at: &str, s: &ServiceConfig, vip: Ipv4Addr, facts: &HostFacts) -> Option<Finding> {
    let on = facts.address_interfaces.get(&vip)?;
    if on.contains("lo") || on.iter().any(|i| s.interfaces.contains(i)) {
        return None;
    }
    let on: Vec<&str> = on.iter().map(String::as_str).collect();
    Some(Finding {
        severity: Severity::Warn,
        text: format!(
            "{at}: the VIP {} is an address of {}, which the service does not list: clients reaching it there get \
             the host's own port {}, not the service; add {} to the service's interfaces",
            s.vip,
            on.join(", "),
            s.port,
            on.join(" or ")
        ),
    })
}

/// The listed interfaces the kernel routes the service's backends out of
/// (where their replies are expected back), each with those backends.
fn backend_sides<'a>(s: &ServiceConfig, facts: &'a HostFacts) -> BTreeMap<&'a str, Vec<String>> {
    let mut sides: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for b in &s.backends {
        if let Some(Route::Via(i)) = ipv4(b.address.ip()).and_then(|ip| facts.routes.get(&ip)) {
            if s.interfaces.contains(i) {
                sides.entry(i.as_str()).or_default().push(b.address.to_string());
            }
        }
    }
    sides
}

/// Whether backends' replies, arriving on the interfaces they are routed
/// out of, can reach clients. A reply that does not take the fast path
/// passes up to the kernel with the VIP as its source: for a VIP that is
/// an address of this host it is then dropped as a martian, which is what
/// happens to every reply with a partial checksum (a local stack's, over
/// veth); for another VIP, reverse-path filtering drops it unless the VIP
/// is routed back out of that interface (strict) or at all (loose).
fn judge_reply_paths(at: &str, s: &ServiceConfig, vip: Ipv4Addr, facts: &HostFacts) -> Vec<Finding> {
    let local = facts.local_addrs.contains(&vip);
    let vip_route = facts.routes.get(&vip);
    let mut out = Vec::new();
    for (iface, backends) in backend_sides(s, facts) {
        let Some(f) = facts.interfaces.get(iface) else { continue };
        let backends = backends.join(", ");
        // At tc the kernel's helpers follow the skb's checksum state.
        if local && f.may_be_partial && f.hook == Hook::Xdp {
            out.push(Finding {
                severity: Severity::Warn,
                text: format!(
                    "{at}: backends {backends} answer through {iface}, whose program takes a checksum that looks \
                     partial for one (checksums = \"may-be-partial\", or \"auto\" on a veth or bridge): such a \
                     reply cannot take the fast path and, translated back to the host's own address {}, is \
                     dropped as a martian; give {iface} the tc hook (hook = \"tc\", what \"auto\" picks for a \
                     veth or bridge), or have the backends compute their checksums (ethtool -K <their \
                     interface> tx off) and set checksums = \"complete\" for {iface}",
                    s.vip
                ),
            });
        }
        let dropped = match (f.rp_filter, vip_route) {
            (_, None) => false,
            (1, Some(r)) => *r != Route::Via(iface.to_owned()),
            (2, Some(r)) => matches!(r, Route::Unusable(_)),
            _ => false,
        };
        if !local && dropped {
            let mode = if f.rp_filter == 1 { "strict" } else { "loose" };
            out.push(Finding {
                severity: Severity::Warn,
                text: format!(
                    "{at}: backends {backends} answer through {iface}, where {mode} reverse-path filtering \
                     (net.ipv4.conf.{{all,{iface}}}.rp_filter = {}) drops a reply that passes up to the kernel \
                     (all of them while the clients' interface has no fast path, else the ones that fall back): \
                     its source, the VIP {}, is not routed {}; set rp_filter to 0 on {iface} and all",
                    f.rp_filter,
                    s.vip,
                    if f.rp_filter == 1 { format!("out of {iface}") } else { "at all".to_owned() }
                ),
            });
        }
    }
    out
}

/// Why the data plane cannot serve a backend of `s` that the host routes
/// so (`None`: it can). It forwards a new flow with bpf_fib_lookup and a
/// redirect, and sees replies only on the interfaces it is attached to:
/// a backend routed out of an interface the service does not list answers
/// there, where nothing translates the reply back to the VIP; one with no
/// route gets nothing; one that is a local address answers from the
/// host's own stack, never through the program.
pub fn unroutable(s: &ServiceConfig, route: &Route) -> Option<String> {
    match route {
        Route::Via(i) if s.interfaces.contains(i) => None,
        Route::Via(i) => Some(format!(
            "its route leaves by {i}, which is not among the service's interfaces ({}): its replies come back \
             there, where the program is not attached, and reach clients untranslated; add {i} to the service's \
             interfaces, or route the backend through one of them",
            s.interfaces.join(", ")
        )),
        Route::Local => Some(
            "an address of this host: its replies leave from the host's own stack, never through the program".into(),
        ),
        Route::Unusable(why) => Some(format!("no route: {why}")),
    }
}

/// Whether the kernel routes the service's backends somewhere the program
/// sees their replies (see [`unroutable`]). One routed out of an interface
/// the service does not list is refused; so is a service none of whose
/// backends can be reached; some without a route (or local) are a
/// warning. Backends whose route is not among the facts are not judged.
fn judge_routes(at: &str, s: &ServiceConfig, facts: &HostFacts) -> Vec<Finding> {
    let mut out = Vec::new();
    let routed: Vec<(usize, &BackendConfig, &Route)> = s
        .backends
        .iter()
        .enumerate()
        .filter_map(|(j, b)| ipv4(b.address.ip()).and_then(|ip| facts.routes.get(&ip)).map(|r| (j, b, r)))
        .collect();
    for (j, b, r) in &routed {
        if let (Route::Via(_), Some(why)) = (r, unroutable(s, r)) {
            out.push(Finding {
                severity: Severity::Refuse,
                text: format!("{at}: backend[{j}].address: {}: {why}", b.address),
            });
        }
    }
    let unusable: Vec<String> = routed
        .iter()
        .filter(|(_, _, r)| !matches!(r, Route::Via(_)))
        .filter_map(|(j, b, r)| Some(format!("backend[{j}] {} ({})", b.address, unroutable(s, r)?)))
        .collect();
    if unusable.is_empty() {
        return out;
    }
    let (severity, text) = if unusable.len() == routed.len() {
        (
            Severity::Refuse,
            format!(
                "no backend can be reached through this host: {}; route them (ip route add ...) to an interface \
                 the service lists, or fix their addresses",
                unusable.join(", ")
            ),
        )
    } else {
        (
            Severity::Warn,
            format!(
                "new flows picked for these backends fail: {}; route them, or take them out of the config",
                unusable.join(", ")
            ),
        )
    };
    out.push(Finding { severity, text: format!("{at}: {text}") });
    out
}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        net::Ipv4Addr,
    };

    use super::*;

    fn parse(text: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(text, std::path::Path::new("test.toml"))
    }

    const CONFIG: &str = r#"
        [[service]]
        name = "web"
        vip = "192.0.2.10"
        port = 80
        interfaces = ["eth0", "br0"]
        [[service.backend]]
        address = "10.0.1.2:8080"
    "#;

    fn facts(local: bool, eth0_fast: bool, br0_fast: bool, forwarding: bool) -> HostFacts {
        let f = |fast_path: bool| InterfaceFacts {
            hook: Hook::Xdp,
            hook_why: "hook why".into(),
            fast_path,
            fast_path_why: "why".into(),
            forwarding,
            may_be_partial: false,
            rp_filter: 0,
            accept_local: false,
        };
        HostFacts {
            local_addrs6: BTreeSet::new(),
            local_addrs: if local { [Ipv4Addr::new(192, 0, 2, 10)].into() } else { BTreeSet::new() },
            address_interfaces: if local {
                [(Ipv4Addr::new(192, 0, 2, 10), ["eth0".to_owned()].into())].into()
            } else {
                BTreeMap::new()
            },
            interfaces: [("eth0".to_owned(), f(eth0_fast)), ("br0".to_owned(), f(br0_fast))].into(),
            ephemeral_ports: Some((32768, 60999)),
            routes: BTreeMap::new(),
            snat_sources: BTreeMap::new(),
            cgroup2_mount: Some("/sys/fs/cgroup".into()),
            bridges_to_make: BTreeSet::new(),
        }
    }

    /// Two backends of the web service, 10.0.1.2 and 10.0.1.3, routed so.
    fn routed(first: Route, second: Route) -> (Config, HostFacts) {
        let config = parse(&format!("{CONFIG}[[service.backend]]\naddress = \"10.0.1.3:8080\"\n")).unwrap();
        let mut f = facts(false, true, true, true);
        f.routes = [(Ipv4Addr::new(10, 0, 1, 2), first), (Ipv4Addr::new(10, 0, 1, 3), second)].into();
        (config, f)
    }

    fn via(iface: &str) -> Route {
        Route::Via(iface.to_owned())
    }

    /// The text of the one finding `config` draws, which must be `severity`.
    fn only(config: &Config, facts: &HostFacts, severity: Severity) -> String {
        let found = judge(config, facts);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].severity, severity, "{}", found[0]);
        found[0].text.clone()
    }

    #[test]
    fn backends_routed_out_of_listed_interfaces_are_fine() {
        let (config, f) = routed(via("br0"), via("eth0"));
        assert_eq!(judge(&config, &f), vec![]);
        // No routes among the facts (a fake data plane): nothing to judge.
        assert_eq!(judge(&config, &facts(false, true, true, true)), vec![]);
    }

    #[test]
    fn each_backend_routed_out_of_an_unlisted_interface_is_refused() {
        let (config, f) = routed(via("eth9"), via("eth9"));
        let found = judge(&config, &f);
        assert_eq!(found.len(), 2, "{found:?}");
        for (j, f) in found.iter().enumerate() {
            assert_eq!(f.severity, Severity::Refuse, "{f}");
            let at =
                format!("service[0] \"web\": backend[{j}].address: 10.0.1.{}:8080: its route leaves by eth9", j + 2);
            assert!(f.text.starts_with(&at), "{f}");
            assert!(f.text.contains("service's interfaces (eth0, br0)") && f.text.contains("add eth9 to"), "{f}");
        }
    }

    #[test]
    fn some_backends_routed_elsewhere_are_refused_by_name() {
        let (config, f) = routed(via("br0"), via("eth9"));
        let t = only(&config, &f, Severity::Refuse);
        assert!(t.contains("backend[1].address: 10.0.1.3:8080: its route leaves by eth9") && !t.contains("10.0.1.2"));
    }

    #[test]
    fn what_makes_a_backend_unroutable() {
        let s = &parse(CONFIG).unwrap().services[0];
        assert_eq!(unroutable(s, &via("br0")), None);
        assert_eq!(unroutable(s, &via("eth0")), None);
        let t = unroutable(s, &via("eth9")).unwrap();
        assert!(t.starts_with("its route leaves by eth9, which is not among the service's interfaces (eth0, br0)"));
        assert!(unroutable(s, &Route::Local).unwrap().contains("an address of this host"));
        let none = unroutable(s, &Route::Unusable("Network is unreachable".into()));
        assert_eq!(none.as_deref(), Some("no route: Network is unreachable"));
    }

    #[test]
    fn a_missing_interface_is_refused_unless_an_orchestrator_makes_it() {
        let config = parse(CONFIG).unwrap();
        let mut f = facts(false, true, true, true);
        f.interfaces.remove("br0");
        let t = only(&config, &f, Severity::Refuse);
        assert_eq!(t, "service[0] \"web\": interfaces[1]: no interface named \"br0\" here");
        f.bridges_to_make.insert("br0".into());
        assert_eq!(judge(&config, &f), vec![]);
    }

    #[test]
    fn a_service_whose_backends_all_have_weight_zero_is_a_warning() {
        let one = parse(&CONFIG.replace("address = \"10.0.1.2:8080\"", "address = \"10.0.1.2:8080\"\nweight = 0"));
        let one = one.unwrap();
        let found = judge_file(&one);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].severity, Severity::Warn);
        assert!(found[0].text.starts_with("service[0] \"web\": backend[0].weight: its only backend has weight 0"));
        // `judge` says the same, once.
        assert_eq!(judge(&one, &facts(false, true, true, true)), found);
        let two = format!("{}[[service.backend]]\naddress = \"10.0.1.3:8080\"\nweight = 0\n", one_text());
        let t = &judge_file(&parse(&two).unwrap())[0].text;
        assert!(t.contains("backend[*].weight: all 2 backends have weight 0"), "{t}");
        // One usable backend is enough; no backends at all is not this.
        let mixed = format!("{}[[service.backend]]\naddress = \"10.0.1.3:8080\"\n", one_text());
        assert_eq!(judge_file(&parse(&mixed).unwrap()), vec![]);
        assert_eq!(judge_file(&parse(CONFIG).unwrap()), vec![]);
    }

    fn one_text() -> String {
        CONFIG.replace("address = \"10.0.1.2:8080\"", "address = \"10.0.1.2:8080\"\nweight = 0")
    }

    #[test]
    fn no_backend_with_a_usable_route_is_refused() {
        let (config, f) = routed(Route::Unusable("Network is unreachable".into()), Route::Local);
        let t = only(&config, &f, Severity::Refuse);
        assert!(t.contains("10.0.1.2:8080 (no route: Network is unreachable)"), "{t}");
        assert!(t.contains("10.0.1.3:8080 (an address of this host"), "{t}");
    }

    /// A host-address VIP, backends routed out of br0 and eth0, as `routed`.
    fn host_address_backends() -> (Config, HostFacts) {
        let (config, mut f) = routed(via("br0"), via("eth0"));
        f.local_addrs.insert(Ipv4Addr::new(192, 0, 2, 10));
        f.address_interfaces.insert(Ipv4Addr::new(192, 0, 2, 10), ["eth0".to_owned()].into());
        f.routes.insert(Ipv4Addr::new(192, 0, 2, 10), Route::Local);
        (config, f)
    }

    #[test]
    fn host_address_replies_through_an_interface_for_partial_checksums_is_a_warning() {
        let (config, mut f) = host_address_backends();
        assert_eq!(judge(&config, &f), vec![]);
        f.interfaces.get_mut("br0").unwrap().may_be_partial = true;
        let t = only(&config, &f, Severity::Warn);
        assert!(t.contains("backends 10.0.1.2:8080 answer through br0") && t.contains("martian"), "{t}");
        assert!(t.contains("tx off") && t.contains("checksums = \"complete\" for br0"), "{t}");
        // A VIP elsewhere: such replies pass up and the kernel forwards them.
        f.local_addrs.clear();
        f.address_interfaces.clear();
        f.routes.insert(Ipv4Addr::new(192, 0, 2, 10), via("eth0"));
        assert_eq!(judge(&config, &f), vec![]);
    }

    #[test]
    fn a_host_address_vip_on_an_unlisted_interface_is_a_warning() {
        let (_, mut f) = host_address_backends();
        let config = parse(&CONFIG.replace(r#"["eth0", "br0"]"#, r#"["br0"]"#)).unwrap();
        let on = |f: &mut HostFacts, names: &[&str]| {
            f.address_interfaces.insert(Ipv4Addr::new(192, 0, 2, 10), names.iter().map(|n| n.to_string()).collect());
        };
        let t = only(&config, &f, Severity::Warn);
        assert!(t.contains("the VIP 192.0.2.10 is an address of eth0") && t.contains("add eth0 to"), "{t}");
        on(&mut f, &["eth0", "eth1"]);
        assert!(only(&config, &f, Severity::Warn).contains("add eth0 or eth1 to"));
        // Listed, or on loopback (reached through any interface): fine.
        on(&mut f, &["br0"]);
        assert_eq!(judge(&config, &f), vec![]);
        on(&mut f, &["lo"]);
        assert_eq!(judge(&config, &f), vec![]);
    }

    #[test]
    fn reverse_path_filtering_that_drops_passed_up_replies_is_a_warning() {
        let (config, mut f) = routed(via("br0"), via("br0"));
        let vip = Ipv4Addr::new(192, 0, 2, 10);
        f.routes.insert(vip, via("eth0"));
        let rp = |f: &mut HostFacts, v: u8| f.interfaces.get_mut("br0").unwrap().rp_filter = v;
        rp(&mut f, 1);
        let t = only(&config, &f, Severity::Warn);
        assert!(t.contains("backends 10.0.1.2:8080, 10.0.1.3:8080 answer through br0, where strict"), "{t}");
        assert!(t.contains("not routed out of br0"), "{t}");
        // Loose filtering passes a VIP routed anywhere; not one routed nowhere.
        rp(&mut f, 2);
        assert_eq!(judge(&config, &f), vec![]);
        f.routes.insert(vip, Route::Unusable("Network is unreachable".into()));
        assert!(only(&config, &f, Severity::Warn).contains("where loose"));
        // Strict filtering passes a VIP routed back out of br0; off passes all.
        rp(&mut f, 1);
        f.routes.insert(vip, via("br0"));
        assert_eq!(judge(&config, &f), vec![]);
        rp(&mut f, 0);
        f.routes.insert(vip, Route::Unusable("Network is unreachable".into()));
        assert_eq!(judge(&config, &f), vec![]);
    }

    #[test]
    fn some_backends_without_a_usable_route_is_a_warning() {
        let (config, f) = routed(via("br0"), Route::Unusable("Network is unreachable".into()));
        let t = only(&config, &f, Severity::Warn);
        assert!(t.contains("10.0.1.3:8080 (no route") && !t.contains("10.0.1.2"), "{t}");
    }

    #[test]
    fn socket_lb_takes_the_configured_cgroup_else_the_mount_and_warns_without_either() {
        let on = parse(CONFIG).unwrap();
        let mut no_mount = facts(false, true, true, true);
        no_mount.cgroup2_mount = None;
        assert_eq!(socket_lb_cgroup(&on, &facts(false, true, true, true)), Some("/sys/fs/cgroup".into()));
        let f = judge(&on, &no_mount);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].severity == Severity::Warn && f[0].text.contains("mount -t cgroup2"), "{}", f[0]);
        let set = parse(&format!("{CONFIG}\n[socket_lb]\ncgroup = \"/cg/lb\"\n")).unwrap();
        assert_eq!(socket_lb_cgroup(&set, &no_mount), Some("/cg/lb".into()));
        assert_eq!(judge(&set, &no_mount), vec![]);
        let off = parse(&format!("{CONFIG}\n[socket_lb]\nenabled = false\n")).unwrap();
        assert_eq!(socket_lb_cgroup(&off, &facts(false, true, true, true)), None);
        assert_eq!(judge(&off, &no_mount), vec![]);
    }

    #[test]
    fn a_host_address_vip_port_in_the_ephemeral_range_is_a_warning() {
        let config = parse(&CONFIG.replace("port = 80", "port = 40000")).unwrap();
        let f = judge(&config, &facts(true, true, true, true));
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].severity, Severity::Warn);
        assert!(f[0].text.contains("port 40000") && f[0].text.contains("32768-60999"), "{}", f[0]);
        // A VIP elsewhere gets no answers meant for the host.
        assert_eq!(judge(&config, &facts(false, true, true, true)), vec![]);
        // The ends of the range count.
        let last = parse(&CONFIG.replace("port = 80", "port = 60999")).unwrap();
        assert_eq!(judge(&last, &facts(true, true, true, true)).len(), 1);
    }

    #[test]
    fn a_vip_elsewhere_needs_no_fast_path() {
        assert_eq!(judge(&parse(CONFIG).unwrap(), &facts(false, false, false, true)), vec![]);
    }

    #[test]
    fn a_host_address_vip_without_any_fast_path_is_refused() {
        let f = judge(&parse(CONFIG).unwrap(), &facts(true, false, false, true));
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].severity, Severity::Refuse);
        assert!(f[0].text.contains("martian") && f[0].text.contains("eth0 (why), br0 (why)"), "{}", f[0]);
    }

    #[test]
    fn a_host_address_vip_with_some_fast_path_is_a_warning() {
        let f = judge(&parse(CONFIG).unwrap(), &facts(true, true, false, true));
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].severity, Severity::Warn);
        assert!(f[0].text.contains("br0 (why)") && !f[0].text.contains("eth0"), "{}", f[0]);
        assert_eq!(judge(&parse(CONFIG).unwrap(), &facts(true, true, true, true)), vec![]);
    }

    #[test]
    fn a_host_address_vip_behind_tc_interfaces_needs_no_xdp_fast_path() {
        let mut f = facts(true, true, false, true);
        f.interfaces.get_mut("br0").unwrap().hook = Hook::Tc;
        assert_eq!(judge(&parse(CONFIG).unwrap(), &f), vec![]);
        f.interfaces.get_mut("eth0").unwrap().hook = Hook::Tc;
        f.interfaces.get_mut("eth0").unwrap().fast_path = false;
        assert_eq!(judge(&parse(CONFIG).unwrap(), &f), vec![]);
    }

    #[test]
    fn xdp_settings_on_a_tc_interface_are_a_warning() {
        let config = parse(&format!("{CONFIG}\n[interface.br0]\nchecksums = \"complete\"\n")).unwrap();
        let mut f = facts(false, true, true, true);
        assert_eq!(judge(&config, &f), vec![]);
        f.interfaces.get_mut("br0").unwrap().hook = Hook::Tc;
        let found = judge(&config, &f);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].text.contains("br0") && found[0].text.contains("hook why"), "{}", found[0]);
    }

    #[test]
    fn an_interface_that_does_not_forward_is_a_warning() {
        let f = judge(&parse(CONFIG).unwrap(), &facts(false, true, true, false));
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f.iter().all(|f| f.severity == Severity::Warn && f.text.contains("forwarding is off")), "{f:?}");
    }
}
