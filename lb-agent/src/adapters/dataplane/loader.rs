//! Loading the lb-ebpf object, attaching its programs to interfaces through
//! bpf_links (pinned when pinning is on), and taking it all down again.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context as _};
use aya::programs::{
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
    SchedClassifier, Xdp, XdpMode,
};
use lb_common::{PROG_TC, SERVICES};
use tracing::{info, warn};

use super::{
    netdev::{checksums_for, interface_driver},
    object::{load_object, program_mut},
    pins::{check_pinned_maps, link_pin_name, prepare_pin_dir, remove_pins},
    tc::{self, decide_hook, TcLink},
    AyaDataplane,
};
use crate::{
    config::{DataplaneConfig, InterfaceConfig, XdpAttach},
    ports::{AttachMode, Hook, L4Checksums},
};

/// The XDP modes `setting` allows, in the order they are tried.
fn xdp_modes(setting: XdpAttach) -> &'static [AttachMode] {
    match setting {
        XdpAttach::Auto => &[AttachMode::Driver, AttachMode::Generic],
        XdpAttach::Native => &[AttachMode::Driver],
        XdpAttach::Generic => &[AttachMode::Generic],
    }
}

/// Our attachment to one interface: a bpf_link, pinned when pinning is on
/// (or, at tc on kernels without TCX, a netlink filter).
pub(super) struct Attached {
    link: Link,
    mode: AttachMode,
    /// The XDP program's checksum choice; `None` at tc.
    l4: Option<L4Checksums>,
    pin: Option<PathBuf>,
}

pub(super) enum Link {
    Xdp(FdLink),
    Tc(TcLink),
}

impl AyaDataplane {
    /// Load the object and open its maps. Nothing is attached yet. With a
    /// pin directory, maps a previous agent pinned there are adopted (flows,
    /// tables and counters carry on) and new ones are pinned.
    pub fn load(pin_dir: Option<&Path>, config: &DataplaneConfig) -> anyhow::Result<Self> {
        let pins = pin_dir.map(prepare_pin_dir).transpose()?;
        let map_pins = pins.as_ref().map(|p| p.join("maps"));
        let adopted = map_pins.as_ref().is_some_and(|m| m.join(SERVICES).exists());
        if let (Some(map_pins), Some(pin_dir)) = (&map_pins, pin_dir) {
            check_pinned_maps(crate::ebpf::object(), map_pins, pin_dir, config.max_flows)?;
        }
        let (ebpf, maps) = load_object(crate::ebpf::object(), map_pins.as_deref(), config)?;
        Ok(Self {
            maps,
            fast_paths: BTreeMap::new(),
            links: BTreeMap::new(),
            socket_lb: None,
            pins,
            adopted,
            keep: false,
            ebpf,
        })
    }

    /// Whether the maps were adopted from a previous agent's pins.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    fn program(&mut self, l4: L4Checksums) -> anyhow::Result<&mut Xdp> {
        program_mut(&mut self.ebpf, l4.program())
    }

    fn tc_program(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        program_mut(&mut self.ebpf, PROG_TC)
    }

    /// Swap the program on an existing link (bpf_link_update): no moment
    /// without a program on the interface.
    fn switch_link(&mut self, link: FdLink, l4: L4Checksums, iface: &str) -> anyhow::Result<FdLink> {
        let xdp_link = XdpLink::try_from(link).context("the link is not an XDP link")?;
        let program = self.program(l4)?;
        let id = program.attach_to_link(xdp_link).with_context(|| format!("switch the XDP program on {iface}"))?;
        Ok(FdLink::try_from(program.take_link(id)?)?)
    }

    fn link_pin(&self, iface: &str, mode: AttachMode) -> Option<PathBuf> {
        self.pins.as_ref().map(|p| p.join("links").join(link_pin_name(iface, mode)))
    }

    /// Attach to `iface` at the hook `hook` decides for it (see
    /// `tc::decide_hook`); an interface attached at the other hook is
    /// detached from it first.
    pub fn attach(&mut self, iface: &str, settings: InterfaceConfig) -> anyhow::Result<AttachMode> {
        let driver = interface_driver(iface)?;
        let (hook, why) = decide_hook(settings.hook, driver.as_deref());
        if self.links.get(iface).is_some_and(|a| a.mode.hook() != hook) {
            info!(interface = iface, to = %hook, why, "switching hooks");
            self.detach(iface)?;
        }
        match hook {
            Hook::Xdp => {
                self.attach_xdp(iface, checksums_for(settings.checksums, driver.as_deref()), settings.xdp_mode)
            }
            Hook::Tc => self.attach_tc(iface, &why),
        }
    }

    /// The pinned link a previous agent left for `iface` in `mode`, opened.
    fn pinned_link(&self, iface: &str, mode: AttachMode) -> anyhow::Result<Option<(FdLink, PathBuf)>> {
        let Some(pin) = self.link_pin(iface, mode).filter(|p| p.exists()) else { return Ok(None) };
        let pinned = PinnedLink::from_pin(&pin).with_context(|| format!("open pinned link {}", pin.display()))?;
        Ok(Some((FdLink::from(pinned), pin)))
    }

    /// Pin `link` for `iface` in `mode`, when pinning is on.
    fn pin_link(&self, link: FdLink, iface: &str, mode: AttachMode) -> anyhow::Result<(FdLink, Option<PathBuf>)> {
        match self.link_pin(iface, mode) {
            Some(path) => {
                let pinned = link.pin(&path).with_context(|| format!("pin the link at {}", path.display()))?;
                Ok((FdLink::from(pinned), Some(path)))
            }
            None => Ok((link, None)),
        }
    }

    /// XDP: native where the driver has it, generic otherwise (or as
    /// `xdp_mode` says). A link a previous agent pinned for it is taken over
    /// and switched to this program atomically (bpf_link_update), so traffic
    /// never sees an interface without the program. Never replaces a program
    /// someone else attached: the kernel refuses a second one (EBUSY).
    ///
    /// `wanted` is the program (see [`L4Checksums`]) for native mode;
    /// generic mode always gets the partial-checksum-aware one
    /// ([`L4Checksums::in_mode`]). An interface already attached with the
    /// other program is switched over in place; one attached in a mode
    /// `xdp_mode` no longer allows is detached and attached again.
    fn attach_xdp(&mut self, iface: &str, wanted: L4Checksums, xdp_mode: XdpAttach) -> anyhow::Result<AttachMode> {
        let modes = xdp_modes(xdp_mode);
        if self.links.get(iface).is_some_and(|a| !modes.contains(&a.mode)) {
            info!(interface = iface, xdp_mode = ?xdp_mode, "attaching again in another XDP mode");
            self.detach(iface)?;
        }
        if let Some(a) = self.links.get(iface).filter(|a| a.l4 == Some(wanted.in_mode(a.mode))) {
            return Ok(a.mode);
        }
        if let Some(Attached { link: Link::Xdp(link), mode, l4: old, pin }) = self.links.remove(iface) {
            // Between two loaded programs of one object, bpf_link_update
            // fails only when the link itself is gone (interface removed).
            let l4 = wanted.in_mode(mode);
            let link = self.switch_link(link, l4, iface)?;
            info!(interface = iface, from = ?old, checksums = %l4, "switched program");
            self.links.insert(iface.to_owned(), Attached { link: Link::Xdp(link), mode, l4: Some(l4), pin });
            return Ok(mode);
        }
        for &mode in modes {
            let Some((pinned, pin)) = self.pinned_link(iface, mode)? else { continue };
            let l4 = wanted.in_mode(mode);
            let link = self
                .switch_link(pinned, l4, iface)
                .with_context(|| format!("take over the pinned link {}", pin.display()))?;
            info!(interface = iface, mode = %mode, checksums = %l4, "adopted pinned XDP link");
            self.links.insert(iface.to_owned(), Attached { link: Link::Xdp(link), mode, l4: Some(l4), pin: Some(pin) });
            return Ok(mode);
        }
        let mut failures = Vec::new();
        for &mode in modes {
            let l4 = wanted.in_mode(mode);
            let kernel_mode = if mode == AttachMode::Generic { XdpMode::Skb } else { XdpMode::Driver };
            let program = self.program(l4)?;
            let id = match program.attach(iface, kernel_mode) {
                Ok(id) => id,
                Err(e) => {
                    failures.push(format!("{mode} mode failed ({e})"));
                    continue;
                }
            };
            let link = FdLink::try_from(program.take_link(id)?)
                .context("the kernel attached XDP without a bpf_link (kernel older than 5.9?)")?;
            let (link, pin) = self.pin_link(link, iface, mode)?;
            if l4 != wanted {
                info!(
                    interface = iface,
                    configured = %wanted,
                    "generic XDP: the partial-checksum-aware program, whatever `checksums` says (GRO and virtio offloads leave partial checksums)"
                );
            }
            info!(interface = iface, mode = %mode, checksums = %l4, "attached");
            self.links.insert(iface.to_owned(), Attached { link: Link::Xdp(link), mode, l4: Some(l4), pin });
            return Ok(mode);
        }
        Err(anyhow!(
            "attach XDP to {iface}: {}; does the interface exist, and is another XDP program already attached?",
            failures.join(", ")
        ))
    }

    /// tc: a TCX link a previous agent pinned is taken over in place;
    /// otherwise a new one (see `tc::attach`).
    fn attach_tc(&mut self, iface: &str, why: &str) -> anyhow::Result<AttachMode> {
        let mode = AttachMode::Tc;
        if self.links.contains_key(iface) {
            return Ok(mode);
        }
        let (link, pin) = match self.pinned_link(iface, mode)? {
            Some((pinned, pin)) => {
                let link = tc::adopt(self.tc_program()?, pinned)
                    .with_context(|| format!("take over the pinned link {}", pin.display()))?;
                info!(interface = iface, "adopted pinned TCX link");
                (TcLink::Tcx(link), Some(pin))
            }
            None => match tc::attach(self.tc_program()?, iface)? {
                TcLink::Tcx(link) => {
                    let (link, pin) = self.pin_link(link, iface, mode)?;
                    (TcLink::Tcx(link), pin)
                }
                netlink => (netlink, None),
            },
        };
        info!(interface = iface, mode = %mode, why, "attached");
        self.links.insert(iface.to_owned(), Attached { link: Link::Tc(link), mode, l4: None, pin });
        Ok(mode)
    }

    /// Detach from `iface`: close our link and remove its pin.
    pub fn detach(&mut self, iface: &str) -> anyhow::Result<()> {
        let Some(a) = self.links.remove(iface) else { return Ok(()) };
        self.clear_fast_path(iface);
        if let Some(pin) = &a.pin {
            std::fs::remove_file(pin).with_context(|| format!("unpin {}", pin.display()))?;
        }
        drop(a.link);
        info!(interface = iface, "detached");
        Ok(())
    }

    /// Pinned links of interfaces this agent has not (yet) attached to, and
    /// socket links it does not hold (pinned for another cgroup).
    pub fn stale_link_pins(&self) -> Vec<PathBuf> {
        let Some(dir) = self.pins.as_ref().map(|p| p.join("links")) else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| !self.links.values().any(|a| a.pin.as_deref() == Some(p.as_path())))
            .filter(|p| !self.socket_lb.as_ref().is_some_and(|s| s.holds_pin(p)))
            .collect()
    }

    /// Interfaces we are attached to, with their mode and program.
    pub fn attachments(&self) -> impl Iterator<Item = (&str, AttachMode, Option<L4Checksums>)> {
        self.links.iter().map(|(k, a)| (k.as_str(), a.mode, a.l4))
    }

    /// Detach from every interface and remove every pin: the data plane is
    /// gone. (Dropping without this leaves pinned state serving traffic.)
    pub fn remove_all(&mut self) {
        let ifaces: Vec<String> = self.links.keys().cloned().collect();
        for iface in ifaces {
            if let Err(e) = self.detach(&iface) {
                warn!(error = %e, interface = iface, "detach failed");
            }
        }
        if let Err(e) = self.set_socket_lb(None) {
            warn!(error = format!("{e:#}"), "detaching socket load balancing failed");
        }
        if let Some(p) = self.pins.take() {
            for stale in std::fs::read_dir(p.join("links")).into_iter().flatten().filter_map(Result::ok) {
                let _ = std::fs::remove_file(stale.path());
            }
            if let Err(e) = remove_pins(&p) {
                warn!(error = format!("{e:#}"), "removing pinned maps failed");
            }
        }
    }

    /// Leave pins (and netlink filters) in place on drop, for the next
    /// agent to adopt.
    pub fn keep_on_drop(&mut self) {
        self.keep = true;
        for a in self.links.values_mut() {
            if let Link::Tc(link) = &mut a.link {
                link.keep();
            }
        }
    }
}

impl Drop for AyaDataplane {
    /// A fresh data plane that is dropped (start-up failed) leaves nothing
    /// behind. Adopted state is left serving: a failed restart must not take
    /// down what the previous agent set up. Normal shutdown calls
    /// `remove_all` or, to hand over to the next agent, nothing.
    fn drop(&mut self) {
        if !self.adopted && self.pins.is_some() && !self.keep {
            self.remove_all();
        }
    }
}
