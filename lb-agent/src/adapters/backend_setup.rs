//! `lb-agent backend-setup`: reads the host (`ip`, `tc`, /proc/sys), then makes
//! the changes `core::backend_setup` plans, each printed as it is made.

use std::{net::IpAddr, process::Command};

use anyhow::{bail, Context as _};
use aya::programs::{
    tc::{self, NlOptions, TcAttachOptions, TcAttachType},
    SchedClassifier,
};
use lb_common::PROG_TC_DECAP;

use crate::core::backend_setup::{self, host_prefix, Decap, Observed, Step, Tunnel};

/// Set `decap` up with `vips` (or undo that), printing each change;
/// returns the lines printed.
pub fn run(decap: Decap, vips: &[IpAddr], undo: bool) -> anyhow::Result<Vec<String>> {
    let tunnel = backend_setup::tunnel_for(vips).map_err(anyhow::Error::msg)?;
    let (Decap::Device(dev) | Decap::Bpf(dev)) = decap;
    if dev.is_empty() || dev.len() > 15 || dev.contains(['/', ' ']) {
        bail!("{dev:?} is not a valid interface name");
    }
    if decap == Decap::Device("tunl0") {
        bail!("--dev tunl0 is the kernel's fallback tunnel, not one backend-setup makes; name another device");
    }
    let now = observe(decap, tunnel)?;
    let steps = if undo { backend_setup::undo(decap, vips, &now) } else { backend_setup::set_up(decap, vips, &now) };
    let mut said = Vec::new();
    for step in &steps {
        said.push(apply(decap, step)?);
    }
    said.retain(|s| !s.is_empty());
    if said.is_empty() {
        said.push(format!("{}: nothing to change", decap.vip_device()));
    }
    for line in &said {
        println!("{line}");
    }
    Ok(said)
}

fn observe(decap: Decap, tunnel: Tunnel) -> anyhow::Result<Observed> {
    let dev = decap.vip_device();
    let device = Command::new("ip").args(["link", "show", "dev", dev]).output().context("run ip")?.status.success();
    let mut addresses = Vec::new();
    if device {
        if let Decap::Device(_) = decap {
            tunnel.check_device(dev, &ip(&["-d", "-o", "link", "show", "dev", dev])?).map_err(anyhow::Error::msg)?;
        }
        // Global scope only: the link-local address the kernel gives an
        // ip6tnl device is not one of ours, and must not keep `--undo`
        // from deleting the device.
        for line in ip(&["-o", "addr", "show", "scope", "global", "dev", dev])?.lines() {
            let Some(cidr) = line.split_whitespace().skip_while(|w| !matches!(*w, "inet" | "inet6")).nth(1) else {
                continue;
            };
            if let Some((a, len)) = cidr.split_once('/') {
                if let (Ok(a), Ok(len)) = (a.parse(), len.parse()) {
                    addresses.push((a, len));
                }
            }
        }
    }
    let decap_attached = match decap {
        Decap::Bpf(iface) => run_tool("tc", &["filter", "show", "dev", iface, "ingress"])?.contains(PROG_TC_DECAP),
        Decap::Device(_) => false,
    };
    let sysctls = backend_setup::sysctls(decap, tunnel)
        .into_iter()
        .map(|(path, _)| {
            let value = std::fs::read_to_string(format!("/proc/sys/{path}")).ok();
            (path, value)
        })
        .collect();
    Ok(Observed { device, decap_attached, addresses, sysctls })
}

/// Make one change; what to print (nothing for bringing an up device up).
fn apply(decap: Decap, step: &Step) -> anyhow::Result<String> {
    let dev = decap.vip_device();
    Ok(match step {
        Step::AddDevice(tunnel) => {
            let (kind, config): (&[&str], _) = match tunnel {
                Tunnel::Ipip => (&["ipip", "external"], "CONFIG_NET_IPIP"),
                Tunnel::Ip6ip6 => (&["ip6tnl", "mode", "ip6ip6", "external"], "CONFIG_IPV6_TUNNEL"),
            };
            ip(&[&["link", "add", dev, "type"][..], kind].concat()).map_err(|e| {
                if e.to_string().contains("Unknown device type") {
                    anyhow::anyhow!(
                        "{e:#}: this kernel has no {} devices ({config}); decapsulate with lb-agent's tc program \
                         instead: --bpf-decap IFACE (the interface the load balancer's packets arrive on)",
                        kind[0]
                    )
                } else {
                    e
                }
            })?;
            format!("created {dev}: {}, external (takes tunnelled packets from any load balancer)", kind.join(" "))
        }
        Step::DeviceUp => {
            let was_up = ip(&["-o", "link", "show", "dev", dev])?.contains(",UP");
            ip(&["link", "set", dev, "up"])?;
            if was_up {
                String::new()
            } else {
                format!("{dev}: up")
            }
        }
        Step::AddAddress(vip) => {
            let cidr = format!("{vip}/{}", host_prefix(*vip));
            // IPv6: no duplicate address detection, so the VIP answers at once.
            let nodad: &[&str] = if vip.is_ipv6() { &["nodad"] } else { &[] };
            ip(&[&["addr", "add", &cidr, "dev", dev][..], nodad].concat())?;
            format!("{dev}: added VIP {cidr}")
        }
        Step::RemoveAddress(vip) => {
            let cidr = format!("{vip}/{}", host_prefix(*vip));
            ip(&["addr", "del", &cidr, "dev", dev])?;
            format!("{dev}: removed VIP {cidr}")
        }
        Step::DeleteDevice => {
            ip(&["link", "del", dev])?;
            format!("deleted {dev}")
        }
        Step::AttachDecap => {
            let Decap::Bpf(iface) = decap else { bail!("no interface to attach {PROG_TC_DECAP} to") };
            attach_decap(iface)?;
            format!("{iface}: attached {PROG_TC_DECAP} at ingress (strips the outer header of IP-in-IP packets)")
        }
        Step::DetachDecap => {
            let Decap::Bpf(iface) = decap else { bail!("no interface to detach {PROG_TC_DECAP} from") };
            let pref = DECAP_PRIORITY.to_string();
            run_tool("tc", &["filter", "del", "dev", iface, "ingress", "pref", &pref])?;
            format!("{iface}: detached {PROG_TC_DECAP}")
        }
        Step::Sysctl { path, value } => {
            let file = format!("/proc/sys/{path}");
            std::fs::write(&file, value).with_context(|| format!("write {value} to {file}"))?;
            format!("{}={value}", path.replace('/', "."))
        }
    })
}

/// The tc filter priority `tc_decap` gets, so that `--undo` finds it.
const DECAP_PRIORITY: u16 = 0x1dc;

/// Load `tc_decap` from the agent's object and attach it at `iface`'s
/// ingress as a netlink filter, left in place when this process exits.
fn attach_decap(iface: &str) -> anyhow::Result<()> {
    let mut ebpf = aya::Ebpf::load(crate::ebpf::object()).context("load lb-ebpf")?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(PROG_TC_DECAP)
        .with_context(|| format!("no {PROG_TC_DECAP} in lb-ebpf"))?
        .try_into()
        .with_context(|| format!("{PROG_TC_DECAP} is not a tc program"))?;
    prog.load().with_context(|| format!("load (verify) {PROG_TC_DECAP}"))?;
    // Already there is fine: the agent adds it too.
    let _ = tc::qdisc_add_clsact(iface);
    let options = TcAttachOptions::Netlink(NlOptions { priority: DECAP_PRIORITY, ..NlOptions::default() });
    let id = prog
        .attach_with_options(iface, TcAttachType::Ingress, options)
        .with_context(|| format!("attach {PROG_TC_DECAP} to {iface}"))?;
    // The filter holds the program; dropping the link would remove it.
    std::mem::forget(prog.take_link(id).context("take the link")?);
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    run_tool("ip", args)
}

fn run_tool(tool: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(tool).args(args).output().with_context(|| format!("run {tool} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("{tool} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
