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

use std::net::Ipv4Addr;

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
    /// IPv4 addresses on the device, with their prefix lengths.
    pub addresses: Vec<(Ipv4Addr, u8)>,
    /// Current values of the sysctls the set-up writes (`Sysctl::path`), as
    /// read; `None` where missing (a device not made yet).
    pub sysctls: Vec<(String, Option<String>)>,
}

/// One change, in the order to make it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    AddDevice,
    DeviceUp,
    AddAddress(Ipv4Addr),
    RemoveAddress(Ipv4Addr),
    DeleteDevice,
    AttachDecap,
    DetachDecap,
    Sysctl { path: String, value: &'static str },
}

/// The sysctls the set-up writes for `decap`, with their values.
pub fn sysctls(decap: Decap) -> Vec<(String, &'static str)> {
    vec![
        (format!("net/ipv4/conf/{}/rp_filter", decap.arrival()), "0"),
        ("net/ipv4/conf/all/rp_filter".into(), "0"),
        ("net/ipv4/conf/all/arp_ignore".into(), "1"),
        ("net/ipv4/conf/all/arp_announce".into(), "2"),
    ]
}

/// The steps that set `decap` up with `vips`, from `now`.
pub fn set_up(decap: Decap, vips: &[Ipv4Addr], now: &Observed) -> Vec<Step> {
    let mut steps = Vec::new();
    match decap {
        Decap::Device(_) => {
            if !now.device {
                steps.push(Step::AddDevice);
            }
            steps.push(Step::DeviceUp);
        }
        Decap::Bpf(_) if !now.decap_attached => steps.push(Step::AttachDecap),
        Decap::Bpf(_) => {}
    }
    for vip in vips {
        if !now.addresses.contains(&(*vip, 32)) && !steps.contains(&Step::AddAddress(*vip)) {
            steps.push(Step::AddAddress(*vip));
        }
    }
    for (path, value) in sysctls(decap) {
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
pub fn undo(decap: Decap, vips: &[Ipv4Addr], now: &Observed) -> Vec<Step> {
    let mut steps: Vec<Step> =
        vips.iter().filter(|v| now.addresses.contains(&(**v, 32))).map(|v| Step::RemoveAddress(*v)).collect();
    let others = now.addresses.iter().filter(|(a, len)| !(*len == 32 && vips.contains(a))).count();
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

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
    const VIP2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
    const DEV: Decap = Decap::Device("lbtun0");

    /// The host after `steps`.
    fn after(mut now: Observed, steps: &[Step]) -> Observed {
        for s in steps {
            match s {
                Step::AddDevice => now.device = true,
                Step::DeviceUp => {}
                Step::AttachDecap => now.decap_attached = true,
                Step::DetachDecap => now.decap_attached = false,
                Step::AddAddress(a) => now.addresses.push((*a, 32)),
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
        assert_eq!(first[..4], [Step::AddDevice, Step::DeviceUp, Step::AddAddress(VIP), Step::AddAddress(VIP2)]);
        assert_eq!(first.len(), 4 + 4, "{first:?}");
        let host = after(Observed::default(), &first);
        assert_eq!(set_up(DEV, &[VIP, VIP2], &host), [Step::DeviceUp]);
    }

    #[test]
    fn only_sysctls_that_differ_are_written() {
        let mut now = Observed { device: true, addresses: vec![(VIP, 32)], ..Observed::default() };
        now.sysctls = sysctls(DEV).into_iter().map(|(p, v)| (p, Some(format!("{v}\n")))).collect();
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
