//! The pin directory: maps and links kept in bpffs, so that a restarted
//! agent adopts the running data plane (`<dir>/v<ABI_VERSION>/{maps,links}`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use lb_common::ABI_VERSION;
use tracing::{info, warn};

use super::Maps;
use crate::ports::AttachMode;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The pin file name of an interface's link: `<mode>-<interface>`, with
/// every byte outside [A-Za-z0-9-] written as `_XX`, because bpffs refuses
/// names with a dot (and interface names such as `eth0.100` have them).
pub(super) fn link_pin_name(iface: &str, mode: AttachMode) -> String {
    let mut name = format!("{mode}-");
    for b in iface.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            name.push(b as char);
        } else {
            name.push_str(&format!("_{b:02x}"));
        }
    }
    name
}

/// Create `<dir>/v<ABI>` (mounting bpffs on `dir`'s parent if it is not on
/// one) and refuse state of another ABI version.
pub fn prepare_pin_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if dir.file_name().is_some_and(|n| n.as_encoded_bytes().contains(&b'.')) {
        bail!("pin directory {}: bpffs does not allow a dot in a name", dir.display());
    }
    let mount_point = dir.parent().ok_or_else(|| anyhow!("pin directory {} has no parent", dir.display()))?;
    std::fs::create_dir_all(mount_point).with_context(|| format!("create {}", mount_point.display()))?;
    if fs_magic(mount_point)? != BPF_FS_MAGIC {
        mount_bpffs(mount_point)?;
        info!(path = %mount_point.display(), "mounted a bpf filesystem");
    }
    if !same_mount_namespace_as_init() {
        warn!("running in a private mount namespace: pins will not outlive it (use nsenter --net, not ip netns exec, for restarts to be hitless)");
    }
    let versioned = dir.join(format!("v{ABI_VERSION}"));
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if e.path() != versioned {
                bail!(
                    "{} holds pinned state of another lb-agent version ({}); remove it with `lb-agent stop --pin-dir {}`",
                    dir.display(),
                    e.file_name().to_string_lossy(),
                    dir.display()
                );
            }
        }
    }
    for sub in ["maps", "links"] {
        std::fs::create_dir_all(versioned.join(sub)).with_context(|| format!("create {}", versioned.display()))?;
    }
    Ok(versioned)
}

/// Remove pinned maps and the directories under the pin dir.
pub fn remove_pins(versioned: &Path) -> anyhow::Result<()> {
    for name in Maps::NAMES {
        let p = versioned.join("maps").join(name);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("unpin {}", p.display()))?;
        }
    }
    for sub in ["maps", "links", ""] {
        let d = versioned.join(sub);
        if d.exists() {
            std::fs::remove_dir(&d).with_context(|| format!("remove {}", d.display()))?;
        }
    }
    if let Some(parent) = versioned.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

/// Everything a stopped agent left pinned under `dir` (all versions): links
/// first, which detaches the program, then maps.
pub fn remove_pinned_dir(dir: &Path) -> anyhow::Result<usize> {
    let mut removed = 0;
    let Ok(versions) = std::fs::read_dir(dir) else { return Ok(0) };
    for v in versions.filter_map(Result::ok) {
        for sub in ["links", "maps"] {
            for e in std::fs::read_dir(v.path().join(sub)).into_iter().flatten().filter_map(Result::ok) {
                std::fs::remove_file(e.path()).with_context(|| format!("unpin {}", e.path().display()))?;
                removed += 1;
            }
            let _ = std::fs::remove_dir(v.path().join(sub));
        }
        let _ = std::fs::remove_dir(v.path());
    }
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

pub(super) fn fs_magic(path: &Path) -> anyhow::Result<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: zeroed statfs is a valid out-parameter; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64)
}

fn mount_bpffs(at: &Path) -> anyhow::Result<()> {
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())?;
    // SAFETY: NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("mount bpffs on {}", at.display()));
    }
    Ok(())
}

fn same_mount_namespace_as_init() -> bool {
    match (std::fs::read_link("/proc/self/ns/mnt"), std::fs::read_link("/proc/1/ns/mnt")) {
        (Ok(a), Ok(b)) => a == b,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_have_no_dots_and_stay_distinct() {
        assert_eq!(link_pin_name("eth0", AttachMode::Driver), "native-eth0");
        assert_eq!(link_pin_name("eth0.100", AttachMode::Generic), "generic-eth0_2e100");
        assert_ne!(link_pin_name("a_2e", AttachMode::Driver), link_pin_name("a.", AttachMode::Driver));
        assert!(!link_pin_name("a.b.c", AttachMode::Driver).contains('.'));
    }
}
