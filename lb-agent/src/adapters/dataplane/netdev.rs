//! What the kernel says about a network interface: its index in this
//! namespace, and its driver (which picks the program for `checksums =
//! "auto"`).

use anyhow::{bail, Context as _};

use crate::{config::ChecksumMode, ports::L4Checksums};

/// The interface's index in this process's network namespace. (Not
/// /sys/class/net: sysfs shows the namespace it was mounted in, which under
/// `nsenter --net` is not ours.)
pub fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The program for an interface's `checksums` setting: `auto` goes by the
/// interface's driver (`interface_driver`, read once by the caller).
pub fn checksums_for(mode: ChecksumMode, driver: Option<&str>) -> L4Checksums {
    match mode {
        ChecksumMode::Complete => L4Checksums::Complete,
        ChecksumMode::MayBePartial => L4Checksums::MayBePartial,
        // No driver (loopback, say): nothing local sends there.
        ChecksumMode::Auto => driver.map_or(L4Checksums::Complete, L4Checksums::for_driver),
    }
}

/// The driver name of a network interface (`ethtool -i`): "veth", "bridge",
/// "ixgbe", ...; `None` for a device that does not say (loopback).
pub fn interface_driver(iface: &str) -> anyhow::Result<Option<String>> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    if iface.is_empty() || iface.len() >= libc::IFNAMSIZ {
        bail!("{iface:?} is not an interface name");
    }
    // SAFETY: plain syscalls on a socket we own; `info` outlives the ioctl
    // and is the struct SIOCETHTOOL/ETHTOOL_GDRVINFO fills.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket for SIOCETHTOOL");
        }
        let mut info: DrvInfo = std::mem::zeroed();
        info.cmd = ETHTOOL_GDRVINFO;
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, b) in req.ifr_name.iter_mut().zip(iface.bytes()) {
            *d = b as libc::c_char;
        }
        req.ifr_ifru.ifru_data = (&mut info as *mut DrvInfo).cast();
        let rc = libc::ioctl(fd, libc::SIOCETHTOOL as _, &mut req);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
                return Ok(None);
            }
            return Err(err).with_context(|| format!("read the driver of {iface} (SIOCETHTOOL)"));
        }
        let end = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
        Ok(Some(String::from_utf8_lossy(&info.driver[..end]).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{PROG_LB, PROG_LB_LOCAL};

    use super::*;

    #[test]
    fn local_stack_drivers_get_the_partial_checksum_program() {
        for d in ["veth", "bridge", "tun", "macvlan"] {
            assert_eq!(L4Checksums::for_driver(d), L4Checksums::MayBePartial, "{d}");
        }
        for d in ["ixgbe", "mlx5_core", "virtio_net", "ena", "bonding", "802.1Q VLAN Support"] {
            assert_eq!(L4Checksums::for_driver(d), L4Checksums::Complete, "{d}");
        }
        assert_eq!(checksums_for(ChecksumMode::Complete, Some("veth")).program(), PROG_LB);
        assert_eq!(checksums_for(ChecksumMode::MayBePartial, Some("ixgbe")).program(), PROG_LB_LOCAL);
        assert_eq!(checksums_for(ChecksumMode::Auto, Some("veth")), L4Checksums::MayBePartial);
    }

    #[test]
    fn interface_drivers_are_read_with_ethtool() {
        // Every network namespace has `lo`, which names no driver; no root
        // needed to ask.
        assert_eq!(interface_driver("lo").unwrap(), None);
        let err = interface_driver("no-such-if0").unwrap_err();
        assert!(format!("{err:#}").contains("no-such-if0"), "{err:#}");
        assert_eq!(
            checksums_for(ChecksumMode::Auto, interface_driver("lo").unwrap().as_deref()),
            L4Checksums::Complete
        );
    }
}
