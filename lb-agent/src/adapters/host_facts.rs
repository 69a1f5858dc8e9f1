//! Gathers `core::deploy::HostFacts` from this network namespace: its IPv4
//! addresses (getifaddrs), each listed interface's hook and fast-path
//! decisions and whether it forwards, and the route to each configured
//! backend; and from this mount namespace, where cgroup v2 is.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use crate::{
    adapters::{
        dataplane::{egress::decide_fast_path, netdev, tc::decide_hook},
        routes::{self, routes_to},
    },
    config::Config,
    ports::{HostFacts, InterfaceFacts},
};

pub fn gather(config: &Config) -> anyhow::Result<HostFacts> {
    let (address_interfaces, local_addrs6) = local_addrs()?;
    let mut facts = HostFacts {
        local_addrs: address_interfaces.keys().copied().collect(),
        local_addrs6,
        address_interfaces,
        // /proc/sys/net shows the reader's network namespace.
        ephemeral_ports: std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|text| parse_port_range(&text)),
        cgroup2_mount: find_cgroup2_mount(),
        ..HostFacts::default()
    };
    for s in &config.services {
        for iface in &s.interfaces {
            if facts.interfaces.contains_key(iface) || netdev::if_index(iface).is_none() {
                continue;
            }
            let driver = netdev::interface_driver(iface)?;
            let (fast_path, fast_path_why) = decide_fast_path(config.fast_path(iface), driver.as_deref());
            let forwarding = conf_value(iface, "forwarding").is_none_or(|v| v == 1);
            let may_be_partial = netdev::checksums_for(config.checksums(iface), driver.as_deref())
                == crate::ports::L4Checksums::MayBePartial;
            let rp_filter = conf_value("all", "rp_filter").max(conf_value(iface, "rp_filter")).unwrap_or(0);
            let (hook, hook_why) = decide_hook(config.hook(iface), driver.as_deref());
            let accept_local = conf_value("all", "accept_local").max(conf_value(iface, "accept_local")) == Some(1);
            let f = InterfaceFacts {
                hook,
                hook_why,
                fast_path,
                fast_path_why,
                forwarding,
                may_be_partial,
                rp_filter,
                accept_local,
            };
            facts.interfaces.insert(iface.clone(), f);
        }
    }
    // The route checks are IPv4's: IPv6 addresses are not judged.
    let addrs = config
        .services
        .iter()
        .flat_map(|s| s.backends.iter().map(|b| b.address.ip()).chain([s.vip]))
        .filter_map(crate::core::vip::ipv4);
    facts.routes = routes_to(addrs)?;
    let route_sourced = config
        .services
        .iter()
        .filter(|s| s.mode == crate::config::ForwardMode::FullNat && s.source.is_none())
        .flat_map(|s| s.backends.iter().map(|b| b.address.ip()));
    facts.snat_sources = routes::sources_to(route_sourced)?;
    Ok(facts)
}

/// `net.ipv4.conf.<iface>.<key>` as a number; `None` when unreadable.
fn conf_value(iface: &str, key: &str) -> Option<u8> {
    // /proc/sys/net shows the reader's network namespace.
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{iface}/{key}")).ok()?.trim().parse().ok()
}

/// `ip_local_port_range`'s text: two numbers, first and last.
fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    match (ports.next(), ports.next(), ports.next()) {
        (Some(Ok(first)), Some(Ok(last)), None) if first <= last => Some((first, last)),
        _ => None,
    }
}

/// Where cgroup v2 is mounted in this mount namespace, if it is.
pub fn find_cgroup2_mount() -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo").ok().and_then(|text| cgroup2_mount(&text))
}

/// The mount point of the first cgroup v2 file system in `mountinfo`
/// (proc(5): the fifth field, with spaces and the like written as octal
/// escapes; the file system type follows the ` - ` separator).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        mount.split_whitespace().nth(4).map(|p| PathBuf::from(unescape_octal(p)))
    })
}

/// `\040` and the like back to the bytes they stand for.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digits = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], digits) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |n, b| n.wrapping_mul(8) + (b - b'0')));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every IPv4 address of this namespace, with the interfaces it is on.
/// IPv4 addresses with the interfaces each is on.
type AddressInterfaces = BTreeMap<Ipv4Addr, BTreeSet<String>>;

/// This namespace's IPv4 addresses with their interfaces, and its IPv6
/// addresses (full NAT's IPv6 `source` must be one).
fn local_addrs() -> anyhow::Result<(AddressInterfaces, BTreeSet<Ipv6Addr>)> {
    let mut out = AddressInterfaces::new();
    let mut out6 = BTreeSet::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; each entry
    // is read only while the list lives, ifa_addr is checked for null and
    // for AF_INET (AF_INET6) before it is read as a sockaddr_in
    // (sockaddr_in6), and ifa_name is a
    // NUL-terminated string in every entry.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut cur = head;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() && (*addr).sa_family as i32 == libc::AF_INET {
                let sin = addr.cast::<libc::sockaddr_in>();
                let name = std::ffi::CStr::from_ptr((*cur).ifa_name).to_string_lossy().into_owned();
                out.entry(Ipv4Addr::from(u32::from_be((*sin).sin_addr.s_addr))).or_default().insert(name);
            } else if !addr.is_null() && (*addr).sa_family as i32 == libc::AF_INET6 {
                out6.insert(Ipv6Addr::from((*addr.cast::<libc::sockaddr_in6>()).sin6_addr.s6_addr));
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    Ok((out, out6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_hybrid_and_pure_v2_hosts() {
        let hybrid = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
28 26 0:26 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,name=systemd
";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let pure = "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let v1_only = "28 26 0:26 / /sys/fs/cgroup/cpu rw shared:10 - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount(v1_only), None);
        assert_eq!(cgroup2_mount(""), None);
        // Optional fields before the separator, and an escaped space.
        let odd = "40 1 0:40 / /mnt/my\\040cg rw master:3 shared:4 - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(odd), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 1024"), Some((1024, 1024)));
        for bad in ["", "32768", "60999 32768", "1 2 3", "a b", "1 70000"] {
            assert_eq!(parse_port_range(bad), None, "{bad:?}");
        }
        // This host's own range reads.
        assert!(std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| parse_port_range(&t))
            .is_some());
    }
}
