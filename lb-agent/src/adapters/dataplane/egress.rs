//! The fast path's egress side: which interfaces translated packets may be
//! sent out of directly (the `EGRESS` devmap). What the program counted per
//! ingress interface (`PATH_STATS`) is read with the other counters, in
//! `object::Maps`.

use lb_common::EGRESS;
use tracing::{info, warn};

use super::{map_err, netdev, AyaDataplane};
use crate::config::FastPathMode;

/// Whether packets may leave by an interface on the fast path, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FastPath {
    pub ifindex: u32,
    pub on: bool,
    pub why: String,
}

/// The decision for `mode` on an interface whose driver is `driver`. Only
/// devices known to transmit XDP frames get it: `auto` cannot see a veth
/// peer's GRO (it lives in another namespace), and a bridge, tun/tap or
/// macvlan has no XDP transmit at all (a redirect there would be dropped).
pub fn decide_fast_path(mode: FastPathMode, driver: Option<&str>) -> (bool, String) {
    match (mode, driver) {
        (FastPathMode::On, _) => (true, "fast_path = \"on\" in the config".into()),
        (FastPathMode::Off, _) => (false, "fast_path = \"off\" in the config".into()),
        (FastPathMode::Auto, None) => (false, "no driver (loopback?)".into()),
        (FastPathMode::Auto, Some("veth")) => (
            false,
            "veth: its peer needs GRO (ethtool -K <peer> gro on) or an XDP program to receive redirected frames \
             (an XDP program for frames sent back out of this veth by XDP_TX); set fast_path = \"on\" once it has"
                .into(),
        ),
        (
            FastPathMode::Auto,
            Some(d @ ("bridge" | "tun" | "netkit" | "macvlan" | "ipvlan" | "vxlan" | "wireguard")),
        ) => (false, format!("{d}: cannot transmit XDP frames")),
        (FastPathMode::Auto, Some(d)) => (true, format!("NIC driver {d}")),
    }
}

impl AyaDataplane {
    /// Put `iface` in `EGRESS` or take it out, as `mode` and its driver
    /// decide; logs what it did when that changes.
    pub fn set_fast_path(&mut self, iface: &str, mode: FastPathMode) -> anyhow::Result<FastPath> {
        let ifindex = netdev::if_index(iface).ok_or_else(|| anyhow::anyhow!("no interface named {iface:?} here"))?;
        let driver = netdev::interface_driver(iface)?;
        let (on, why) = decide_fast_path(mode, driver.as_deref());
        if on {
            self.maps.egress.insert(ifindex, ifindex, None, 0).map_err(map_err(EGRESS, "write"))?;
        } else if self.maps.egress.get(ifindex, 0).is_ok() {
            self.maps.egress.remove(ifindex).map_err(map_err(EGRESS, "delete"))?;
        }
        let decided = FastPath { ifindex, on, why };
        if self.fast_paths.get(iface) != Some(&decided) {
            info!(interface = iface, fast_path = if on { "on" } else { "off" }, why = decided.why, "fast path");
            self.fast_paths.insert(iface.to_owned(), decided.clone());
        }
        Ok(decided)
    }

    /// Take a detached interface out of `EGRESS`.
    pub(super) fn clear_fast_path(&mut self, iface: &str) {
        if let Some(fp) = self.fast_paths.remove(iface) {
            if fp.on {
                if let Err(e) = self.maps.egress.remove(fp.ifindex) {
                    warn!(error = %e, interface = iface, "removing the interface from EGRESS failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_devices_known_to_transmit_get_the_fast_path() {
        assert!(decide_fast_path(FastPathMode::Auto, Some("ixgbe")).0);
        assert!(decide_fast_path(FastPathMode::Auto, Some("virtio_net")).0);
        for d in ["veth", "bridge", "tun", "macvlan"] {
            let (on, why) = decide_fast_path(FastPathMode::Auto, Some(d));
            assert!(!on, "{d}");
            assert!(why.starts_with(d), "{why}");
        }
        assert!(!decide_fast_path(FastPathMode::Auto, None).0);
        assert!(decide_fast_path(FastPathMode::On, Some("veth")).0);
        assert!(!decide_fast_path(FastPathMode::Off, Some("ixgbe")).0);
    }
}
