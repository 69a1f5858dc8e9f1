//! The tc hook: which interfaces get it, and attaching the tc classifier
//! there: a TCX link (kernel >= 6.6, pinned like the XDP links so that a
//! restart adopts it), or before that a clsact qdisc and a netlink filter.

use anyhow::{anyhow, Context as _};
use aya::programs::{
    links::FdLink,
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType},
    LinkOrder, SchedClassifier,
};
use lb_common::PROG_TC;
use tracing::{info, warn};

use crate::{
    config::HookMode,
    ports::{Hook, L4Checksums},
};

/// The hook for `mode` on an interface whose driver is `driver`. `auto`
/// gives tc to the devices that face local stacks: their packets may carry
/// partial checksums, which only the skb knows about, and most cannot
/// transmit XDP frames, while tc's bpf_redirect goes into any device.
/// NICs keep XDP, which runs before the kernel allocates an skb.
pub fn decide_hook(mode: HookMode, driver: Option<&str>) -> (Hook, String) {
    match (mode, driver) {
        (HookMode::Xdp, _) => (Hook::Xdp, "hook = \"xdp\" in the config".into()),
        (HookMode::Tc, _) => (Hook::Tc, "hook = \"tc\" in the config".into()),
        (HookMode::Auto, None) => (Hook::Xdp, "no driver (loopback?)".into()),
        (HookMode::Auto, Some(d)) if faces_local_stacks(d) => {
            (Hook::Tc, format!("{d}: faces local stacks (partial checksums, no XDP transmit)"))
        }
        (HookMode::Auto, Some(d)) => (Hook::Xdp, format!("NIC driver {d}")),
    }
}

/// Virtual devices whose traffic comes from (or goes to) stacks on this host.
fn faces_local_stacks(driver: &str) -> bool {
    L4Checksums::for_driver(driver) == L4Checksums::MayBePartial
        || matches!(driver, "vxlan" | "geneve" | "wireguard" | "dummy" | "macvtap" | "ipvtap")
}

/// How the tc classifier is attached.
pub(super) enum TcLink {
    /// A TCX bpf_link: pinnable, replaceable in place.
    Tcx(FdLink),
    /// A netlink filter on the clsact qdisc (kernels before 6.6). Dropping
    /// it removes the filter; `None` once handed over (see `keep`).
    Netlink(Option<SchedClassifierLink>),
}

impl TcLink {
    /// Leave a netlink filter in place when this agent goes (a bpf_link
    /// stays through its pin instead).
    pub(super) fn keep(&mut self) {
        if let TcLink::Netlink(link) = self {
            std::mem::forget(link.take());
        }
    }
}

/// Attach `program` to `iface`'s ingress: TCX where the kernel has it, else
/// a clsact qdisc (added if missing, never removed: others' filters may sit
/// on it) and a direct-action filter. A filter of ours left by an earlier
/// agent (found by the program's name) is replaced: on such kernels a
/// restart has a moment without the program.
pub(super) fn attach(program: &mut SchedClassifier, iface: &str) -> anyhow::Result<TcLink> {
    let tcx = match program.attach_with_options(
        iface,
        TcAttachType::Ingress,
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    ) {
        Ok(id) => {
            let link = program.take_link(id)?;
            return Ok(TcLink::Tcx(FdLink::try_from(link).context("a TCX attachment without a bpf_link")?));
        }
        Err(e) => e,
    };
    warn!(interface = iface, error = %tcx, "no TCX link (kernel older than 6.6?); using a clsact qdisc and a filter");
    if let Err(e) = tc::qdisc_add_clsact(iface) {
        // EEXIST: someone (maybe us) added it before.
        info!(interface = iface, error = %e, "clsact qdisc not added (already there?)");
    }
    match tc::qdisc_detach_program(iface, TcAttachType::Ingress, PROG_TC) {
        Ok(()) => info!(interface = iface, "replaced the tc filter an earlier agent left"),
        Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(interface = iface, error = %e, "looking for an earlier agent's tc filter failed"),
    }
    let id = program
        .attach_with_options(iface, TcAttachType::Ingress, TcAttachOptions::Netlink(NlOptions::default()))
        .map_err(|netlink| anyhow!("attach tc to {iface}: TCX failed ({tcx}), netlink failed ({netlink})"))?;
    Ok(TcLink::Netlink(Some(program.take_link(id)?)))
}

/// Take over a pinned TCX link: swap `program` in (bpf_link_update), so the
/// interface never goes without it.
pub(super) fn adopt(program: &mut SchedClassifier, pinned: FdLink) -> anyhow::Result<FdLink> {
    let link = SchedClassifierLink::try_from(pinned).context("the pinned link is not a TCX link")?;
    let id = program.attach_to_link(link).context("switch the tc program on the pinned link")?;
    Ok(FdLink::try_from(program.take_link(id)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_gives_tc_to_devices_facing_local_stacks_and_xdp_to_nics() {
        for d in ["veth", "bridge", "tun", "macvlan", "ipvlan", "netkit", "vxlan"] {
            let (hook, why) = decide_hook(HookMode::Auto, Some(d));
            assert_eq!(hook, Hook::Tc, "{d}");
            assert!(why.starts_with(d), "{why}");
        }
        for d in ["ixgbe", "mlx5_core", "virtio_net", "ena"] {
            assert_eq!(decide_hook(HookMode::Auto, Some(d)).0, Hook::Xdp, "{d}");
        }
        assert_eq!(decide_hook(HookMode::Auto, None).0, Hook::Xdp);
        assert_eq!(decide_hook(HookMode::Xdp, Some("veth")).0, Hook::Xdp);
        assert_eq!(decide_hook(HookMode::Tc, Some("ixgbe")).0, Hook::Tc);
    }
}
