//! `lb-agent check`: every finding `run` makes before it attaches anything
//! (`core::deploy::judge`: interfaces, routes to backends, the host-address
//! VIP, ...) on top of the config's own validation, and what the config
//! describes, scaling policies in words. With `--file-only`, the file alone
//! (`core::deploy::judge_file`), for another machine or CI.

use std::{collections::BTreeSet, fmt::Write as _, path::Path};

use crate::{
    adapters::host_facts,
    agent::SCALE_TICK,
    config::Config,
    core::{
        deploy::{self, Finding, Severity},
        policy::describe_policy,
    },
    ports::HostFacts,
};

/// What `check` prints, and whether `run` would refuse the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub text: String,
    pub refused: bool,
}

/// Load and judge `path` as `run` would, on this host unless `file_only`.
/// A config that does not parse or validate is an error (each problem with
/// its place).
pub fn check(path: &Path, file_only: bool) -> anyhow::Result<Report> {
    let config = Config::load(path)?;
    let facts = if file_only {
        None
    } else {
        let mut facts = host_facts::gather(&config)?;
        facts.bridges_to_make = instance_bridges(&config);
        Some(facts)
    };
    Ok(report(path, &config, facts.as_ref()))
}

/// The bridges scaled services' orchestrators make when the agent runs:
/// not there yet before a first `run`, and not missing.
pub fn instance_bridges(config: &Config) -> BTreeSet<String> {
    let nets = config.services.iter().filter_map(|s| s.instances.as_ref()?.net());
    nets.map(|n| n.bridge.to_owned()).collect()
}

/// The report on `config`, judged against `facts` (`None`: the file only).
pub fn report(path: &Path, config: &Config, facts: Option<&HostFacts>) -> Report {
    let mut out = String::new();
    let _ = writeln!(out, "{}: {} service(s)", path.display(), config.services.len());
    for s in &config.services {
        let to = match (&s.scaling, s.instances.as_ref().and_then(|i| i.net())) {
            (Some(p), Some(net)) => {
                format!("{}..={} instance(s) ({}, bridge {})", p.min_replicas, p.max_replicas, net.kind, net.bridge)
            }
            (Some(p), None) if s.instances.as_ref().and_then(|i| i.swarm.as_ref()).is_some() => {
                format!("{}..={} instance(s) (swarm, every node, host-mode ports)", p.min_replicas, p.max_replicas)
            }
            _ => format!("{} backend(s)", s.backends.len()),
        };
        let _ = writeln!(
            out,
            "  {:<16} {}/{} on {} -> {to}",
            s.name,
            std::net::SocketAddr::new(s.vip, s.port),
            s.protocol,
            s.interfaces.join(",")
        );
        let _ = writeln!(out, "    {}", crate::core::full_nat::describe(s, facts));
        for b in &s.backends {
            let _ = writeln!(out, "    {:<24} weight {}", b.address, b.weight);
        }
        if let Some(p) = &s.scaling {
            let _ = writeln!(out, "    scaling: {}", describe_policy(p, SCALE_TICK));
        }
    }
    let findings: Vec<Finding> = match facts {
        Some(facts) => {
            for (name, f) in &facts.interfaces {
                let _ = writeln!(out, "  interface {name}: hook {} ({})", f.hook, f.hook_why);
            }
            for name in facts.bridges_to_make.iter().filter(|b| !facts.interfaces.contains_key(*b)) {
                let _ = writeln!(out, "  interface {name}: made by the service's orchestrator when the agent runs");
            }
            match deploy::socket_lb_cgroup(config, facts) {
                Some(cgroup) => {
                    let _ = writeln!(out, "  socket lb: clients on this host, in cgroup {}", cgroup.display());
                }
                None => {
                    let _ = writeln!(out, "  socket lb: off");
                }
            }
            deploy::judge(config, facts)
        }
        None => {
            let _ = writeln!(
                out,
                "  this host: not checked (--file-only): interfaces, routes to backends, addresses, hooks"
            );
            deploy::judge_file(config)
        }
    };
    for f in &findings {
        let _ = writeln!(out, "{f}");
    }
    let count = |sev: Severity| findings.iter().filter(|f| f.severity == sev).count();
    let (errors, warnings) = (count(Severity::Refuse), count(Severity::Warn));
    let verdict = match (errors, warnings) {
        (0, 0) => "ok".to_owned(),
        (0, w) => format!("ok, {w} warning(s)"),
        (e, w) => format!("refused: {e} error(s), {w} warning(s); `lb-agent run` would not start with it"),
    };
    let _ = writeln!(out, "{}: {verdict}", path.display());
    Report { text: out, refused: errors > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ports::Route,
        testing::{plain_interface, scaled, web},
    };

    /// "web" on eth0 with one backend, 10.1.0.1:8080.
    fn web_text() -> String {
        web("", &["10.1.0.1:8080"])
    }

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("lb.toml")).unwrap()
    }

    /// A host with `interfaces`, each plain XDP, and `routes`.
    fn host(interfaces: &[&str], routes: &[(&str, Route)]) -> HostFacts {
        HostFacts {
            interfaces: interfaces.iter().map(|i| (i.to_string(), plain_interface())).collect(),
            routes: routes.iter().map(|(a, r)| (a.parse().unwrap(), r.clone())).collect(),
            cgroup2_mount: Some("/sys/fs/cgroup".into()),
            ..HostFacts::default()
        }
    }

    #[test]
    fn a_good_config_on_a_good_host_is_ok() {
        let r = report(Path::new("lb.toml"), &parse(&web_text()), Some(&host(&["eth0"], &[])));
        assert!(!r.refused, "{}", r.text);
        assert!(r.text.contains("  interface eth0: hook xdp (a NIC)"), "{}", r.text);
        assert!(r.text.ends_with("lb.toml: ok\n"), "{}", r.text);
    }

    #[test]
    fn host_findings_refuse_and_say_where() {
        let r = report(Path::new("lb.toml"), &parse(&web_text()), Some(&host(&[], &[])));
        assert!(r.refused);
        assert!(r.text.contains("refused: service[0] \"web\": interfaces[0]: no interface named \"eth0\" here"));
        assert!(r
            .text
            .ends_with("lb.toml: refused: 1 error(s), 0 warning(s); `lb-agent run` would not start with it\n"));
        let r = report(
            Path::new("lb.toml"),
            &parse(&web_text()),
            Some(&host(&["eth0"], &[("10.1.0.1", Route::Via("eth1".into()))])),
        );
        assert!(r.refused);
        assert!(r
            .text
            .contains("refused: service[0] \"web\": backend[0].address: 10.1.0.1:8080: its route leaves by eth1"));
    }

    #[test]
    fn file_only_skips_the_host_and_keeps_the_file_warnings() {
        let zero = parse(&web_text().replace("address = \"10.1.0.1:8080\"", "address = \"10.1.0.1:8080\"\nweight = 0"));
        let r = report(Path::new("lb.toml"), &zero, None);
        assert!(!r.refused, "{}", r.text);
        assert!(r.text.contains("this host: not checked (--file-only)") && !r.text.contains("interface eth0"));
        assert!(r.text.contains("warning: service[0] \"web\": backend[0].weight: its only backend has weight 0"));
        assert!(r.text.ends_with("lb.toml: ok, 1 warning(s)\n"), "{}", r.text);
        // The host's findings are not made: eth0 need not exist.
        assert!(!report(Path::new("lb.toml"), &parse(&web_text()), None).refused);
    }

    #[test]
    fn a_scaled_service_prints_its_policy_and_its_bridge_is_not_missing() {
        let config = parse(&scaled(2, 10, ""));
        let mut facts = host(&["eth0"], &[]);
        facts.bridges_to_make = instance_bridges(&config);
        assert_eq!(facts.bridges_to_make, ["lbp0".to_owned()].into());
        let r = report(Path::new("lb.toml"), &config, Some(&facts));
        assert!(!r.refused, "{}", r.text);
        assert!(r.text.contains("-> 2..=10 instance(s) (process, bridge lbp0)"), "{}", r.text);
        assert!(r.text.contains("    scaling: hold cpu 50% per instance"), "{}", r.text);
        assert!(r.text.contains("2-10 instances; evaluated every 1 s"), "{}", r.text);
        assert!(r.text.contains("interface lbp0: made by the service's orchestrator"), "{}", r.text);
    }
}
