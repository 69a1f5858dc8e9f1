//! Full NAT's host checks and descriptions (`check`, `run`): pure, from the
//! config and the host's facts.
//!
//! A `source` must be an address of this host (IPv4 or IPv6, as the
//! service's), or the backends' replies never reach it. Without one, each
//! backend's flows are sent from the address the route to it leaves by
//! (`HostFacts::snat_sources`, either family). The port
//! range should stay out of the host's ephemeral range: a connection of the
//! host's own could take a port a flow holds, and its answers would be
//! taken for the flow's replies.

use std::{fmt::Write as _, net::IpAddr};

use crate::{
    config::{Config, ForwardMode, ServiceConfig},
    core::deploy::{Finding, Severity},
    ports::{Hook, HostFacts},
};

/// What the host says against the config's full-NAT services.
pub fn judge(config: &Config, facts: &HostFacts) -> Vec<Finding> {
    let mut out = Vec::new();
    let full_nat = || config.services.iter().enumerate().filter(|(_, s)| s.mode == ForwardMode::FullNat);
    for (i, s) in full_nat() {
        let at = format!("service[{i}] {:?}", s.name);
        out.extend(judge_martians(&at, s, facts));
        let own: Vec<IpAddr> = match s.source {
            Some(IpAddr::V4(_)) => facts.local_addrs.iter().map(|&a| a.into()).collect(),
            Some(IpAddr::V6(_)) => facts.local_addrs6.iter().map(|&a| a.into()).collect(),
            None => Vec::new(),
        };
        match s.source {
            Some(ip) if !own.contains(&ip) => out.push(Finding {
                severity: Severity::Refuse,
                text: format!(
                    "{at}: source: {ip} is not an address of this host: backends would reply to an address the \
                     load balancer never sees; use one of its own ({})",
                    list(own.iter())
                ),
            }),
            Some(_) => {}
            None => {
                for (j, b) in s.backends.iter().enumerate() {
                    if !facts.snat_sources.contains_key(&b.address.ip()) {
                        out.push(Finding {
                            severity: Severity::Warn,
                            text: format!(
                                "{at}: backend[{j}].address: {}: the route to it names no source address, so its \
                                 flows are dropped (drop_snat_exhausted); set the service's `source`",
                                b.address
                            ),
                        });
                    }
                }
            }
        }
    }
    let (min, max) = (config.dataplane.snat_port_min, config.dataplane.snat_port_max);
    if let Some((first, last)) =
        facts.ephemeral_ports.filter(|(f, l)| full_nat().next().is_some() && min <= *l && *f <= max)
    {
        out.push(Finding {
            severity: Severity::Warn,
            text: format!(
                "dataplane.snat_port_min..=snat_port_max: {min}-{max} overlaps the host's ephemeral ports \
                 (net.ipv4.ip_local_port_range {first}-{last}): a connection of the host's own may take a port a \
                 flow holds, and its answers would go to that flow's client; move the range, or reserve it with \
                 net.ipv4.ip_local_reserved_ports={min}-{max}"
            ),
        });
    }
    out
}

/// A full-NAT packet leaves with a source of this host's. At XDP one that
/// cannot take the fast path (no fast path out, the backend's neighbour not
/// known yet, a partial checksum) passes up to the kernel, which drops a
/// packet from its own address arriving on an interface as a martian unless
/// accept_local is on there. At tc every packet leaves by bpf_redirect.
/// IPv6 has no such check: the kernel forwards an IPv6 packet from its own
/// address (tests/tests/e2e_fullnat.rs passes every one up).
fn judge_martians(at: &str, s: &ServiceConfig, facts: &HostFacts) -> Option<Finding> {
    if s.vip.is_ipv6() {
        return None;
    }
    let dropping: Vec<&str> = s
        .interfaces
        .iter()
        .filter(|n| facts.interfaces.get(*n).is_some_and(|f| f.hook == Hook::Xdp && !f.accept_local))
        .map(String::as_str)
        .collect();
    if dropping.is_empty() {
        return None;
    }
    Some(Finding {
        severity: Severity::Warn,
        text: format!(
            "{at}: full NAT at the XDP hook on {}: a translated packet that cannot take the fast path (no fast \
             path out, the backend's neighbour not known yet, a partial checksum) passes up to the kernel from \
             this host's own address and is dropped as a martian; set net.ipv4.conf.<iface>.accept_local=1 there, \
             or give the interface the tc hook (hook = \"tc\")",
            dropping.join(", ")
        ),
    })
}

/// `svc`'s mode in words, with where full NAT sends from (`None`: the
/// file only, routes not asked).
pub fn describe(svc: &ServiceConfig, facts: Option<&HostFacts>) -> String {
    if svc.mode != ForwardMode::FullNat {
        return format!("mode {}", svc.mode);
    }
    let mut out = format!("mode {}", svc.mode);
    match (svc.source, facts) {
        (Some(ip), _) => {
            let _ = write!(out, " from {ip} (its `source`)");
        }
        (None, None) => {
            out.push_str(" from the address the route to each backend leaves by (not looked up: --file-only)")
        }
        (None, Some(facts)) => {
            let each = svc.backends.iter().map(|b| match facts.snat_sources.get(&b.address.ip()) {
                Some(src) => format!("{src} to {}", b.address),
                None => format!("no source to {}", b.address),
            });
            let _ = write!(out, " from the route's source: {}", list(each));
        }
    }
    out
}

fn list<T: ToString>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        path::Path,
    };

    use super::*;
    use crate::{
        ports::InterfaceFacts,
        testing::{plain_interface, web},
    };

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("lb.toml")).unwrap()
    }

    fn host() -> HostFacts {
        HostFacts {
            local_addrs: [Ipv4Addr::new(10, 1, 0, 254)].into(),
            ephemeral_ports: Some((32768, 60999)),
            local_addrs6: ["2001:db8:1::fe".parse::<Ipv6Addr>().unwrap()].into(),
            snat_sources: [
                (Ipv4Addr::new(10, 1, 0, 1).into(), Ipv4Addr::new(10, 1, 0, 254).into()),
                ("2001:db8:1::1".parse().unwrap(), "2001:db8:1::fe".parse().unwrap()),
            ]
            .into(),
            ..HostFacts::default()
        }
    }

    #[test]
    fn a_source_must_be_local() {
        let ok = parse(&web("mode = \"full-nat\"\nsource = \"10.1.0.254\"", &["10.1.0.1:8080"]));
        assert!(judge(&ok, &host()).is_empty(), "{:?}", judge(&ok, &host()));
        assert_eq!(describe(&ok.services[0], None), "mode full-nat from 10.1.0.254 (its `source`)");
        let far = parse(&web("mode = \"full-nat\"\nsource = \"10.9.9.9\"", &["10.1.0.1:8080"]));
        let f = judge(&far, &host());
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].severity, Severity::Refuse);
        assert!(
            f[0].text.starts_with("service[0] \"web\": source: 10.9.9.9 is not an address of this host"),
            "{}",
            f[0]
        );
    }

    #[test]
    fn without_a_source_each_backend_uses_its_route() {
        let c = parse(&web("mode = \"full-nat\"", &["10.1.0.1:8080", "10.2.0.1:8080"]));
        assert_eq!(
            describe(&c.services[0], Some(&host())),
            "mode full-nat from the route's source: 10.1.0.254 to 10.1.0.1:8080, no source to 10.2.0.1:8080"
        );
        let f = judge(&c, &host());
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].text.contains("backend[1].address: 10.2.0.1:8080: the route to it names no source"), "{}", f[0]);
        assert_eq!(describe(&parse(&web("", &[])).services[0], Some(&host())), "mode dnat");
    }

    #[test]
    fn a_port_range_inside_the_ephemeral_one_is_warned_of() {
        let text = web("mode = \"full-nat\"", &["10.1.0.1:8080"]);
        assert!(judge(&parse(&text), &host()).is_empty(), "the default range is above Linux's default");
        let inside = parse(&format!("{text}\n[dataplane]\nsnat_port_min = 40000\nsnat_port_max = 40010\n"));
        let f = judge(&inside, &host());
        assert_eq!(f.len(), 1);
        assert!(f[0].text.contains("40000-40010 overlaps the host's ephemeral ports"), "{}", f[0]);
        let dnat = parse(&format!("{}\n[dataplane]\nsnat_port_min = 40000\n", web("", &["10.1.0.1:8080"])));
        assert!(judge(&dnat, &host()).is_empty(), "no full-NAT service, no claim");
    }

    #[test]
    fn full_nat_at_xdp_without_accept_local_is_warned_of() {
        let with_eth0 = |f: InterfaceFacts| HostFacts { interfaces: [("eth0".to_owned(), f)].into(), ..host() };
        let c = parse(&web("mode = \"full-nat\"\nsource = \"10.1.0.254\"", &["10.1.0.1:8080"]));
        let f = judge(&c, &with_eth0(plain_interface()));
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].severity, Severity::Warn);
        assert!(f[0].text.starts_with("service[0] \"web\": full NAT at the XDP hook on eth0:"), "{}", f[0]);
        assert!(f[0].text.contains("martian") && f[0].text.contains("accept_local=1"), "{}", f[0]);
        // accept_local on, the tc hook, or no full NAT: nothing to say.
        let accepting = InterfaceFacts { accept_local: true, ..plain_interface() };
        assert!(judge(&c, &with_eth0(accepting)).is_empty());
        let tc = InterfaceFacts { hook: Hook::Tc, ..plain_interface() };
        assert!(judge(&c, &with_eth0(tc)).is_empty());
        let dnat = parse(&web("", &["10.1.0.1:8080"]));
        assert!(judge(&dnat, &with_eth0(plain_interface())).is_empty());
    }

    /// An IPv6 full-NAT service (at XDP, as IPv6 must be).
    fn web6(extra: &str, backends: &[&str]) -> Config {
        let text = web(extra, backends).replace("10.0.0.100", "2001:db8::10");
        parse(&format!("{text}\n[interface.eth0]\nhook = \"xdp\"\n"))
    }

    #[test]
    fn an_ipv6_source_must_be_an_ipv6_address_of_this_host() {
        let ok = web6("mode = \"full-nat\"\nsource = \"2001:db8:1::fe\"", &["[2001:db8:1::1]:8080"]);
        let at_xdp = HostFacts { interfaces: [("eth0".to_owned(), plain_interface())].into(), ..host() };
        assert!(judge(&ok, &at_xdp).is_empty(), "no martian check in IPv6: {:?}", judge(&ok, &at_xdp));
        assert_eq!(describe(&ok.services[0], None), "mode full-nat from 2001:db8:1::fe (its `source`)");
        let far = web6("mode = \"full-nat\"\nsource = \"2001:db8:9::9\"", &["[2001:db8:1::1]:8080"]);
        let f = judge(&far, &host());
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].severity, Severity::Refuse);
        assert!(f[0].text.contains("source: 2001:db8:9::9 is not an address of this host"), "{}", f[0]);
        assert!(f[0].text.contains("use one of its own (2001:db8:1::fe)"), "only IPv6 ones are offered: {}", f[0]);
    }

    #[test]
    fn without_a_source_each_ipv6_backend_uses_its_route() {
        let c = web6("mode = \"full-nat\"", &["[2001:db8:1::1]:8080", "[2001:db8:2::1]:8080"]);
        assert_eq!(
            describe(&c.services[0], Some(&host())),
            "mode full-nat from the route's source: 2001:db8:1::fe to [2001:db8:1::1]:8080, no source to \
             [2001:db8:2::1]:8080"
        );
        let f = judge(&c, &host());
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].text.contains("backend[1].address: [2001:db8:2::1]:8080: the route to it names no source"));
    }
}
