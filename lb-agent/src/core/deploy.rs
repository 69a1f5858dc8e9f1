//! Can the data plane serve this config on this host? Pure: the facts about
//! the host are gathered first (`adapters::host_facts`), then judged here,
//! so `check` and `run` say the same thing for the same host.

use std::{fmt, path::PathBuf};

use crate::{
    config::Config,
    ports::{HostFacts, InterfaceFacts},
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
            let off: Vec<String> =
                known.iter().filter(|(_, f)| !f.fast_path).map(|(n, f)| format!("{n} ({})", f.fast_path_why)).collect();
            let why = format!(
                "the VIP {} is an address of this host, so a reply translated back to it cannot pass up to the \
                 kernel (dropped as a martian) and must leave on the fast path",
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
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, net::Ipv4Addr};

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
        let f = |fast_path: bool| InterfaceFacts { fast_path, fast_path_why: "why".into(), forwarding };
        HostFacts {
            local_addrs: if local { [Ipv4Addr::new(192, 0, 2, 10)].into() } else { BTreeSet::new() },
            interfaces: [("eth0".to_owned(), f(eth0_fast)), ("br0".to_owned(), f(br0_fast))].into(),
            ephemeral_ports: Some((32768, 60999)),
            cgroup2_mount: Some("/sys/fs/cgroup".into()),
        }
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
    fn an_interface_that_does_not_forward_is_a_warning() {
        let f = judge(&parse(CONFIG).unwrap(), &facts(false, true, true, false));
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f.iter().all(|f| f.severity == Severity::Warn && f.text.contains("forwarding is off")), "{f:?}");
    }
}
