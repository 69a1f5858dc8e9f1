//! `lb-agent backend-setup`: reads the host (`ip`, /proc/sys), then makes
//! the changes `core::backend_setup` plans, each printed as it is made.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{bail, Context as _};

use crate::core::backend_setup::{self, Observed, Step};

/// Set `dev` up with `vips` (or undo that), printing each change; returns
/// the lines printed.
pub fn run(dev: &str, vips: &[Ipv4Addr], undo: bool) -> anyhow::Result<Vec<String>> {
    if dev.is_empty() || dev.len() > 15 || dev.contains(['/', ' ']) {
        bail!("--dev {dev:?} is not a valid interface name");
    }
    if dev == "tunl0" {
        bail!("--dev tunl0 is the kernel's fallback tunnel, not one backend-setup makes; name another device");
    }
    let now = observe(dev)?;
    let steps = if undo { backend_setup::undo(vips, &now) } else { backend_setup::set_up(dev, vips, &now) };
    let mut said = Vec::new();
    for step in &steps {
        said.push(apply(dev, step)?);
    }
    if said.iter().all(|s| s.is_empty()) {
        said = vec![format!("{dev}: nothing to change")];
    }
    said.retain(|s| !s.is_empty());
    for line in &said {
        println!("{line}");
    }
    Ok(said)
}

fn observe(dev: &str) -> anyhow::Result<Observed> {
    let device = Command::new("ip").args(["link", "show", "dev", dev]).output().context("run ip")?.status.success();
    let mut addresses = Vec::new();
    if device {
        for line in ip(&["-o", "-4", "addr", "show", "dev", dev])?.lines() {
            let Some(cidr) = line.split_whitespace().skip_while(|w| *w != "inet").nth(1) else { continue };
            if let Some((a, len)) = cidr.split_once('/') {
                if let (Ok(a), Ok(len)) = (a.parse(), len.parse()) {
                    addresses.push((a, len));
                }
            }
        }
    }
    let sysctls = backend_setup::sysctls(dev)
        .into_iter()
        .map(|(path, _)| {
            let value = std::fs::read_to_string(format!("/proc/sys/{path}")).ok();
            (path, value)
        })
        .collect();
    Ok(Observed { device, addresses, sysctls })
}

/// Make one change; what to print (nothing for bringing an up device up).
fn apply(dev: &str, step: &Step) -> anyhow::Result<String> {
    Ok(match step {
        Step::AddDevice => {
            ip(&["link", "add", dev, "type", "ipip", "external"])?;
            format!("created {dev}: ipip, external (takes IP-in-IP packets from any load balancer)")
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
            ip(&["addr", "add", &format!("{vip}/32"), "dev", dev])?;
            format!("{dev}: added VIP {vip}/32")
        }
        Step::RemoveAddress(vip) => {
            ip(&["addr", "del", &format!("{vip}/32"), "dev", dev])?;
            format!("{dev}: removed VIP {vip}/32")
        }
        Step::DeleteDevice => {
            ip(&["link", "del", dev])?;
            format!("deleted {dev}")
        }
        Step::Sysctl { path, value } => {
            let file = format!("/proc/sys/{path}");
            std::fs::write(&file, value).with_context(|| format!("write {value} to {file}"))?;
            format!("{}={value}", path.replace('/', "."))
        }
    })
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip").args(args).output().with_context(|| format!("run ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
