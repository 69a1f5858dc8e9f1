//! Which address family a service may use where: the data plane balances
//! IPv6 in every mode (destination NAT, full NAT, IP-in-IP direct server
//! return) at the XDP hook only (`xdp_lb6`), so an IPv6 service must say
//! so of every interface, and its backends and source must be IPv6 too (a
//! packet's family never changes on the way through).

use std::net::IpAddr;

use super::{Config, HookMode, ServiceConfig};

/// The problems of `svc`'s addresses' family, each with its place (`at`).
pub(super) fn problems(config: &Config, svc: &ServiceConfig, at: &str) -> Vec<String> {
    let mut out = Vec::new();
    let v6 = svc.vip.is_ipv6();
    for (j, b) in svc.backends.iter().enumerate() {
        if b.address.is_ipv6() != v6 {
            out.push(format!(
                "{at}: backend[{j}].address: {} is {} but the vip {} is {}: a service's backends must be of its \
                 vip's family",
                b.address,
                family(b.address.ip()),
                svc.vip,
                family(svc.vip)
            ));
        }
    }
    if let Some(source) = svc.source.filter(|s| s.is_ipv6() != v6) {
        out.push(format!(
            "{at}: source: {source} is {} but the vip {} is {}: packets to the backends come from an address of the \
             vip's family",
            family(source),
            svc.vip,
            family(svc.vip)
        ));
    }
    if !v6 {
        return out;
    }
    if svc.instances.is_some() {
        out.push(format!(
            "{at}: instances: scaled instances get IPv4 addresses; an IPv6 vip ({}) lists its backends",
            svc.vip
        ));
    }
    for iface in &svc.interfaces {
        if config.hook(iface) != HookMode::Xdp {
            out.push(format!(
                "{at}: interfaces: {iface:?} has hook = \"{}\", but IPv6 is balanced at XDP only (the tc hook passes it \
                 untouched, and \"auto\" picks tc on veth and bridges); set [interface.{iface}] hook = \"xdp\"",
                hook_key(config.hook(iface))
            ));
        }
    }
    out
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv6() {
        "IPv6"
    } else {
        "IPv4"
    }
}

fn hook_key(hook: HookMode) -> &'static str {
    match hook {
        HookMode::Auto => "auto",
        HookMode::Xdp => "xdp",
        HookMode::Tc => "tc",
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const V6: &str = r#"
[[service]]
name = "web6"
vip = "2001:db8::10"
port = 80
interfaces = ["eth0"]
[[service.backend]]
address = "[2001:db8:1::2]:8080"
[[service.backend]]
address = "[2001:db8:1::3]:8080"

[interface.eth0]
hook = "xdp"
"#;

    fn parse(text: &str) -> Result<Config, crate::config::ConfigError> {
        Config::parse(text, std::path::Path::new("test.toml"))
    }

    /// The one error's text (the problems, or the parse error).
    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(_) => Vec::new(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn an_ipv6_nat_service_at_xdp_is_accepted() {
        let config = parse(V6).unwrap();
        let svc = &config.services[0];
        assert_eq!(svc.vip, "2001:db8::10".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(svc.backends[1].address.to_string(), "[2001:db8:1::3]:8080");
    }

    #[test]
    fn an_ipv6_full_nat_service_is_accepted_with_or_without_an_ipv6_source() {
        let full_nat = V6.replace("interfaces = [\"eth0\"]", "interfaces = [\"eth0\"]\nmode = \"full-nat\"");
        let config = parse(&full_nat).unwrap();
        assert_eq!(config.services[0].mode, crate::config::ForwardMode::FullNat);
        let sourced = full_nat.replace("mode = \"full-nat\"", "mode = \"full-nat\"\nsource = \"2001:db8::1\"");
        assert_eq!(parse(&sourced).unwrap().services[0].source, Some("2001:db8::1".parse().unwrap()));
        let v4_source = sourced.replace("2001:db8::1\"", "10.0.0.1\"");
        let p = problems(&v4_source);
        assert!(p[0].contains(r#"source: 10.0.0.1 is IPv4 but the vip 2001:db8::10 is IPv6"#), "{p:?}");
        let tc = full_nat.replace("hook = \"xdp\"", "hook = \"tc\"");
        assert!(problems(&tc)[0].contains("IPv6 is balanced at XDP only"), "{:?}", problems(&tc));
    }

    #[test]
    fn ipv6_is_refused_where_the_data_plane_does_not_serve_it() {
        let tc = V6.replace("hook = \"xdp\"", "hook = \"tc\"");
        assert!(problems(&tc)[0].contains(r#"interfaces: "eth0" has hook = "tc", but IPv6 is balanced at XDP only"#));
        let auto = V6.replace("hook = \"xdp\"", "");
        assert!(problems(&auto)[0].contains(r#"has hook = "auto""#), "{:?}", problems(&auto));
    }

    const DSR6: &str =
        "interfaces = [\"eth0\"]\nmode = \"dsr-ipip\"\nsource = \"2001:db8::1\"\nhealth_check = { interval = \"1s\" }";

    #[test]
    fn an_ipv6_dsr_service_with_an_ipv6_source_is_accepted() {
        let text = V6.replace("interfaces = [\"eth0\"]", DSR6).replace(":8080", ":80");
        let config = parse(&text).unwrap();
        assert_eq!(config.services[0].source, Some("2001:db8::1".parse().unwrap()));
        let udp = parse(&text.replace("port = 80", "port = 80\nprotocol = \"udp\"")).unwrap();
        assert_eq!(udp.services[0].protocol, crate::config::Protocol::Udp);
        let v4_source = text.replace("2001:db8::1\"", "10.0.0.1\"");
        let p = problems(&v4_source);
        assert!(
            p[0].contains(r#"source: 10.0.0.1 is IPv4 but the vip 2001:db8::10 is IPv6: packets to the backends"#),
            "{p:?}"
        );
        let tc = text.replace("hook = \"xdp\"", "hook = \"tc\"");
        assert!(problems(&tc)[0].contains("IPv6 is balanced at XDP only"), "{:?}", problems(&tc));
    }

    #[test]
    fn a_service_never_mixes_families() {
        let mixed = V6.replace("[2001:db8:1::3]:8080", "10.1.0.3:8080");
        let p = problems(&mixed);
        assert!(
            p[0].contains(
                r#"backend[1].address: 10.1.0.3:8080 is IPv4 but the vip 2001:db8::10 is IPv6: a service's backends"#
            ),
            "{p:?}"
        );
        let v4 = V6.replace("2001:db8::10", "10.0.0.10").replace("[2001:db8:1::2]:8080", "10.1.0.2:8080");
        assert!(problems(&v4)[0].contains("[2001:db8:1::3]:8080 is IPv6 but the vip 10.0.0.10 is IPv4"));
    }

    #[test]
    fn an_ipv6_address_without_brackets_says_how_to_write_it() {
        let p = problems(&V6.replace("[2001:db8:1::2]:8080", "2001:db8:1::2"));
        assert!(
            p[0].contains(r#""2001:db8:1::2": an IPv6 address with a port is written "[2001:db8:1::2]:PORT""#),
            "{p:?}"
        );
    }
}
