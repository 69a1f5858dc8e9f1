//! Can the data plane serve this config on this host? Pure: the facts about
//! the host are gathered first (`adapters::host_facts`), then judged here,
//! so `check` and `run` say the same thing for the same host.

use std::{collections::BTreeMap, fmt, path::PathBuf};

use crate::{
    config::{ChecksumMode, Config, FastPathMode, ServiceConfig},
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

/// Every way `config` cannot be served on a host with `facts`.
pub fn judge(config: &Config, facts: &HostFacts) -> Vec<Finding> {
    let mut out = Vec::new();
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
        let known: Vec<(&String, &InterfaceFacts)> =
            s.interfaces.iter().filter_map(|n| facts.interfaces.get(n).map(|f| (n, f))).collect();
        if let Some((first, last)) = facts.ephemeral_ports.filter(|_| facts.local_addrs.contains(&s.vip)) {
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
        if facts.local_addrs.contains(&s.vip) {
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
        out.extend(judge_reply_paths(&at, s, facts));
        out.extend(judge_vip_interface(&at, s, facts));
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
fn judge_vip_interface(at: &str, s: &ServiceConfig, facts: &HostFacts) -> Option<Finding> {
    let on = facts.address_interfaces.get(&s.vip)?;
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
        if let Some(Route::Via(i)) = facts.routes.get(b.address.ip()) {
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
fn judge_reply_paths(at: &str, s: &ServiceConfig, facts: &HostFacts) -> Vec<Finding> {
    let local = facts.local_addrs.contains(&s.vip);
    let vip_route = facts.routes.get(&s.vip);
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

/// Whether the kernel routes the service's backends somewhere the program
/// sees their replies: a backend with no route (or one that is a local
/// address, whose replies leave from the host's own stack) cannot be
/// served at all; one routed out of an interface the service does not list
/// answers there, where nothing translates the reply back to the VIP.
/// Backends whose route is not among the facts are not judged.
fn judge_routes(at: &str, s: &ServiceConfig, facts: &HostFacts) -> Vec<Finding> {
    let mut out = Vec::new();
    let routed: Vec<(String, &Route)> = s
        .backends
        .iter()
        .filter_map(|b| facts.routes.get(b.address.ip()).map(|r| (b.address.to_string(), r)))
        .collect();
    let unusable: Vec<String> = routed
        .iter()
        .filter_map(|(b, r)| match r {
            Route::Via(_) => None,
            Route::Local => Some(format!(
                "{b} (an address of this host: its replies leave from the host's own stack, never through the \
                 program)"
            )),
            Route::Unusable(why) => Some(format!("{b} (no route: {why})")),
        })
        .collect();
    let via: Vec<(&String, &String)> =
        routed.iter().filter_map(|(b, r)| if let Route::Via(i) = r { Some((b, i)) } else { None }).collect();
    if !routed.is_empty() && via.is_empty() {
        out.push(Finding {
            severity: Severity::Refuse,
            text: format!(
                "{at}: no backend can be reached through this host: {}; route them (ip route add ...) to an \
                 interface the service lists, or fix their addresses",
                unusable.join(", ")
            ),
        });
        return out;
    }
    if !unusable.is_empty() {
        out.push(Finding {
            severity: Severity::Warn,
            text: format!(
                "{at}: new flows picked for these backends fail: {}; route them, or take them out of the \
                 config",
                unusable.join(", ")
            ),
        });
    }
    let outside: Vec<String> =
        via.iter().filter(|(_, i)| !s.interfaces.contains(i)).map(|(b, i)| format!("{b} via {i}")).collect();
    if outside.is_empty() {
        return out;
    }
    let mut missing: Vec<&str> =
        via.iter().map(|(_, i)| i.as_str()).filter(|i| !s.interfaces.iter().any(|l| l == i)).collect();
    missing.sort_unstable();
    missing.dedup();
    let which = if outside.len() == via.len() {
        format!("no listed interface ({}) reaches any backend", s.interfaces.join(", "))
    } else {
        "some backends are routed out of interfaces the service does not list".to_owned()
    };
    out.push(Finding {
        severity: Severity::Warn,
        text: format!(
            "{at}: {which}: {}; their replies come back there, where the program is not attached, and reach \
             clients untranslated (from the backend, not the VIP); add {} to the service's interfaces, or route \
             the backends through a listed one",
            outside.join(", "),
            missing.join(", ")
        ),
    });
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
        };
        HostFacts {
            local_addrs: if local { [Ipv4Addr::new(192, 0, 2, 10)].into() } else { BTreeSet::new() },
            address_interfaces: if local {
                [(Ipv4Addr::new(192, 0, 2, 10), ["eth0".to_owned()].into())].into()
            } else {
                BTreeMap::new()
            },
            interfaces: [("eth0".to_owned(), f(eth0_fast)), ("br0".to_owned(), f(br0_fast))].into(),
            ephemeral_ports: Some((32768, 60999)),
            routes: BTreeMap::new(),
            cgroup2_mount: Some("/sys/fs/cgroup".into()),
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
    fn no_listed_interface_reaching_any_backend_is_a_warning() {
        let (config, f) = routed(via("eth9"), via("eth9"));
        let t = only(&config, &f, Severity::Warn);
        assert!(t.starts_with("service[0] \"web\": no listed interface (eth0, br0) reaches any backend"), "{t}");
        assert!(t.contains("10.0.1.2:8080 via eth9, 10.0.1.3:8080 via eth9") && t.contains("add eth9 to"), "{t}");
    }

    #[test]
    fn some_backends_routed_elsewhere_is_a_warning_about_those() {
        let (config, f) = routed(via("br0"), via("eth9"));
        let t = only(&config, &f, Severity::Warn);
        assert!(t.contains("10.0.1.3:8080 via eth9") && !t.contains("10.0.1.2"), "{t}");
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
