//! What `lb-agent backend-setup` must change on a backend host of a
//! `dsr-ipip` service, from what is there already: pure, so that running
//! it twice changes nothing the second time, and `--undo` removes only
//! what the set-up makes.
//!
//! The set-up: an IP-in-IP device in external (collect-metadata) mode,
//! which takes every IPIP packet whatever its outer addresses (before the
//! fallback `tunl0`), up; the VIPs on it as /32s, so the decapsulated
//! packet is local and the answer leaves from the VIP; reverse-path
//! filtering off on it and on `all` (the kernel uses the larger of the two),
//! since the inner source, a client, routes by another interface; and
//! `arp_ignore = 1`, `arp_announce = 2` on `all`, so that the host never
//! answers ARP for a VIP nor announces one: the VIP's network must keep
//! reaching the load balancer.
//!
//! On a kernel without IP-in-IP devices (CONFIG_NET_IPIP unset) the
//! decapsulation is lb-agent's tc program `tc_decap` at one interface's
//! ingress instead (`Decap::Bpf`), and the VIPs go on `lo`.
//!
//! IPv6 VIPs (IPv6-in-IPv6, `lb_common::dsr6`): an ip6tnl device in mode
//! ip6ip6, external, or `tc_decap` as above; the VIPs as /128s, added
//! without duplicate address detection so they answer at once. No sysctl:
//! IPv6 has no reverse-path filter, and neighbour discovery answers only
//! for addresses on the interface asked, never for a VIP on the tunnel or
//! `lo`. One run takes VIPs of one family (one device type).

use std::net::IpAddr;

/// Where packets are decapsulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decap<'a> {
    /// An ipip device of this name, which holds the VIPs.
    Device(&'a str),
    /// `tc_decap` at this interface's ingress; the VIPs on `lo`.
    Bpf(&'a str),
}

impl Decap<'_> {
    /// The device the VIPs go on.
    pub fn vip_device(&self) -> &str {
        match self {
            Decap::Device(dev) => dev,
            Decap::Bpf(_) => "lo",
        }
    }

    /// The device decapsulated packets arrive on: rp_filter goes off there.
    fn arrival(&self) -> &str {
        match self {
            Decap::Device(dev) | Decap::Bpf(dev) => dev,
        }
    }
}

/// What is on the host now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The device the VIPs go on exists.
    pub device: bool,
    /// `tc_decap` is attached (`Decap::Bpf`).
    pub decap_attached: bool,
    /// Addresses on the device, with their prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// Current values of the sysctls the set-up writes (`Sysctl::path`), as
    /// read; `None` where missing (a device not made yet).
    pub sysctls: Vec<(String, Option<String>)>,
}

/// One change, in the order to make it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    AddDevice(Tunnel),
    DeviceUp,
    AddAddress(IpAddr),
    RemoveAddress(IpAddr),
    DeleteDevice,
    AttachDecap,
    DetachDecap,
    Sysctl { path: String, value: &'static str },
}

/// The kind of tunnel device the set-up makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tunnel {
    /// `ipip external`: IPv4 in IPv4.
    Ipip,
    /// `ip6tnl mode ip6ip6 external`: IPv6 in IPv6.
    Ip6ip6,
}

impl Tunnel {
    /// The link kind `ip -d link show` names for this tunnel's device.
    fn kind(self) -> &'static str {
        match self {
            Tunnel::Ipip => "ipip",
            Tunnel::Ip6ip6 => "ip6tnl",
        }
    }

    /// `Err` when `dev`, an existing device whose `ip -d -o link show`
    /// line is `detail`, is a tunnel of another kind: its VIPs would never
    /// see a packet of this family decapsulated.
    pub fn check_device(self, dev: &str, detail: &str) -> Result<(), String> {
        let words: Vec<&str> = detail.split_whitespace().collect();
        let other = [Tunnel::Ipip, Tunnel::Ip6ip6].into_iter().find(|t| *t != self && words.contains(&t.kind()));
        match other {
            Some(t) => Err(format!(
                "--dev {dev}: {dev} is an {} device, which does not decapsulate the {} these VIPs need; name another \
                 --dev for them (one device per family)",
                t.kind(),
                match self {
                    Tunnel::Ipip => "IPv4-in-IPv4",
                    Tunnel::Ip6ip6 => "IPv6-in-IPv6",
                }
            )),
            None => Ok(()),
        }
    }
}

/// The tunnel `vips` need; `Err` when they mix families.
pub fn tunnel_for(vips: &[IpAddr]) -> Result<Tunnel, String> {
    match (vips.iter().any(IpAddr::is_ipv4), vips.iter().any(IpAddr::is_ipv6)) {
        (true, true) => Err("--vip: IPv4 and IPv6 VIPs need tunnels of their own kind; set each family up in a \
                             run of its own (with its own --dev)"
            .into()),
        (false, true) => Ok(Tunnel::Ip6ip6),
        _ => Ok(Tunnel::Ipip),
    }
}

/// The prefix length a VIP goes on the device with: the one address.
pub fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv6() {
        128
    } else {
        32
    }
}

/// The sysctls the set-up writes for `decap` and `tunnel`, with their
/// values (none for IPv6, see the module doc).
pub fn sysctls(decap: Decap, tunnel: Tunnel) -> Vec<(String, &'static str)> {
    if tunnel == Tunnel::Ip6ip6 {
        return Vec::new();
    }
    vec![
        (format!("net/ipv4/conf/{}/rp_filter", decap.arrival()), "0"),
        ("net/ipv4/conf/all/rp_filter".into(), "0"),
        ("net/ipv4/conf/all/arp_ignore".into(), "1"),
        ("net/ipv4/conf/all/arp_announce".into(), "2"),
    ]
}

/// The steps that set `decap` up with `vips`, from `now`.
pub fn set_up(decap: Decap, vips: &[IpAddr], now: &Observed) -> Vec<Step> {
    let mut steps = Vec::new();
    let tunnel = tunnel_for(vips).unwrap_or(Tunnel::Ipip);
    match decap {
        Decap::Device(_) => {
            if !now.device {
                steps.push(Step::AddDevice(tunnel));
            }
            steps.push(Step::DeviceUp);
        }
        Decap::Bpf(_) if !now.decap_attached => steps.push(Step::AttachDecap),
        Decap::Bpf(_) => {}
    }
    for vip in vips {
        if !now.addresses.contains(&(*vip, host_prefix(*vip))) && !steps.contains(&Step::AddAddress(*vip)) {
            steps.push(Step::AddAddress(*vip));
        }
    }
    for (path, value) in sysctls(decap, tunnel) {
        let current = now.sysctls.iter().find(|(p, _)| *p == path).and_then(|(_, v)| v.as_deref());
        if current.map(str::trim) != Some(value) {
            steps.push(Step::Sysctl { path, value });
        }
    }
    steps
}

/// The steps that take `vips` off, and the device away once nothing else
/// is on it (`tc_decap` off, for `Decap::Bpf`). The sysctls stay: other
/// set-ups may rely on them.
pub fn undo(decap: Decap, vips: &[IpAddr], now: &Observed) -> Vec<Step> {
    let mut steps: Vec<Step> = vips
        .iter()
        .filter(|v| now.addresses.contains(&(**v, host_prefix(**v))))
        .map(|v| Step::RemoveAddress(*v))
        .collect();
    let others = now.addresses.iter().filter(|(a, len)| !(*len == host_prefix(*a) && vips.contains(a))).count();
    match decap {
        Decap::Device(_) if now.device && others == 0 => steps.push(Step::DeleteDevice),
        Decap::Bpf(_) if now.decap_attached => steps.push(Step::DetachDecap),
        _ => {}
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_device_of_the_other_family_is_refused() {
        let ipip = "7: lbtun0@NONE: <NOARP,UP,LOWER_UP> mtu 1480 qdisc noqueue state UNKNOWN mode DEFAULT \
                    link/ipip 0.0.0.0 brd 0.0.0.0 promiscuity 0 ipip external any remote any local any ttl inherit";
        let ip6 = "8: lbtun6@NONE: <NOARP,UP,LOWER_UP> mtu 1452 link/tunnel6 :: brd :: ip6tnl ip6ip6 external";
        let err = Tunnel::Ip6ip6.check_device("lbtun0", ipip).unwrap_err();
        assert!(err.starts_with("--dev lbtun0: lbtun0 is an ipip device"), "{err}");
        assert!(Tunnel::Ipip.check_device("lbtun6", ip6).unwrap_err().contains("is an ip6tnl device"));
        assert_eq!(Tunnel::Ipip.check_device("lbtun0", ipip), Ok(()));
        assert_eq!(Tunnel::Ip6ip6.check_device("lbtun6", ip6), Ok(()));
        // Not a tunnel of either kind: the set-up's own steps say what goes wrong.
        assert_eq!(Tunnel::Ip6ip6.check_device("lo", "1: lo: <LOOPBACK,UP> link/loopback 00:00:00:00:00:00"), Ok(()));
    }

    use std::net::Ipv4Addr;

    const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10));
    const VIP2: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 11));
    const DEV: Decap = Decap::Device("lbtun0");

    /// The host after `steps`.
    fn after(mut now: Observed, steps: &[Step]) -> Observed {
        for s in steps {
            match s {
                Step::AddDevice(_) => now.device = true,
                Step::DeviceUp => {}
                Step::AttachDecap => now.decap_attached = true,
                Step::DetachDecap => now.decap_attached = false,
                Step::AddAddress(a) => now.addresses.push((*a, host_prefix(*a))),
                Step::RemoveAddress(a) => now.addresses.retain(|(x, _)| x != a),
                Step::DeleteDevice => now = Observed { sysctls: now.sysctls, ..Observed::default() },
                Step::Sysctl { path, value } => {
                    now.sysctls.retain(|(p, _)| p != path);
                    now.sysctls.push((path.clone(), Some((*value).into())));
                }
            }
        }
        now
    }

    #[test]
    fn a_fresh_host_gets_everything_and_a_second_run_nothing_but_up() {
        let first = set_up(DEV, &[VIP, VIP2, VIP], &Observed::default());
        assert_eq!(
            first[..4],
            [Step::AddDevice(Tunnel::Ipip), Step::DeviceUp, Step::AddAddress(VIP), Step::AddAddress(VIP2)]
        );
        assert_eq!(first.len(), 4 + 4, "{first:?}");
        let host = after(Observed::default(), &first);
        assert_eq!(set_up(DEV, &[VIP, VIP2], &host), [Step::DeviceUp]);
    }

    #[test]
    fn only_sysctls_that_differ_are_written() {
        let mut now = Observed { device: true, addresses: vec![(VIP, 32)], ..Observed::default() };
        now.sysctls = sysctls(DEV, Tunnel::Ipip).into_iter().map(|(p, v)| (p, Some(format!("{v}\n")))).collect();
        now.sysctls[1].1 = Some("1\n".into());
        let steps = set_up(DEV, &[VIP], &now);
        assert_eq!(steps, [Step::DeviceUp, Step::Sysctl { path: "net/ipv4/conf/all/rp_filter".into(), value: "0" }]);
    }

    #[test]
    fn undo_removes_the_vips_and_the_device_it_made_only_when_empty() {
        let host = after(Observed::default(), &set_up(DEV, &[VIP, VIP2], &Observed::default()));
        let both = undo(DEV, &[VIP, VIP2], &host);
        assert_eq!(both, [Step::RemoveAddress(VIP), Step::RemoveAddress(VIP2), Step::DeleteDevice]);
        assert_eq!(undo(DEV, &[VIP], &host), [Step::RemoveAddress(VIP)], "VIP2 stays, and the device with it");
        assert_eq!(undo(DEV, &[VIP], &Observed::default()), [], "nothing there: nothing to do");
        let gone = after(host.clone(), &both);
        assert_eq!(undo(DEV, &[VIP, VIP2], &gone), []);
    }

    #[test]
    fn ipv6_vips_get_an_ip6ip6_device_as_128s_and_no_sysctl() {
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        let first = set_up(DEV, &[v6], &Observed::default());
        assert_eq!(first, [Step::AddDevice(Tunnel::Ip6ip6), Step::DeviceUp, Step::AddAddress(v6)]);
        let host = after(Observed::default(), &first);
        assert_eq!(host.addresses, [(v6, 128)]);
        assert_eq!(set_up(DEV, &[v6], &host), [Step::DeviceUp]);
        assert_eq!(undo(DEV, &[v6], &host), [Step::RemoveAddress(v6), Step::DeleteDevice]);
        let bpf = Decap::Bpf("eth0");
        let lo = Observed { device: true, ..Observed::default() };
        assert_eq!(set_up(bpf, &[v6], &lo), [Step::AttachDecap, Step::AddAddress(v6)]);
        assert!(tunnel_for(&[VIP, v6]).unwrap_err().contains("IPv4 and IPv6 VIPs need tunnels of their own kind"));
    }

    #[test]
    fn bpf_decap_attaches_once_puts_the_vips_on_lo_and_never_deletes_it() {
        let bpf = Decap::Bpf("eth0");
        let lo = Observed { device: true, ..Observed::default() };
        let first = set_up(bpf, &[VIP], &lo);
        assert_eq!(first[..2], [Step::AttachDecap, Step::AddAddress(VIP)]);
        assert!(first.contains(&Step::Sysctl { path: "net/ipv4/conf/eth0/rp_filter".into(), value: "0" }));
        assert_eq!(bpf.vip_device(), "lo");
        let host = after(lo.clone(), &first);
        assert_eq!(set_up(bpf, &[VIP], &host), []);
        assert_eq!(undo(bpf, &[VIP], &host), [Step::RemoveAddress(VIP), Step::DetachDecap]);
    }
}
