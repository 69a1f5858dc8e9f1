//! The pin directory: maps and links kept in bpffs, so that a restarted
//! agent adopts the running data plane (`<dir>/v<ABI_VERSION>/{maps,links}`).

use std::{
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _};
use aya::maps::{MapInfo, MapType};
use aya_obj::generated::bpf_map_type;
use lb_common::ABI_VERSION;
use tracing::info;

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
        // A bpffs mounted in a mount namespace of our own dies with it, and
        // the pins with it: a restart would find nothing to adopt.
        if let Some(private) = private_mount_namespace() {
            bail!("{}", private.refusal(dir));
        }
        mount_bpffs(mount_point)?;
        info!(path = %mount_point.display(), "mounted a bpf filesystem");
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

/// A map's layout as the kernel holds it: what a pinned map must match
/// before it is adopted (the kernel would otherwise hand the program a map
/// of another size, and aya checks only key and value sizes it knows of).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapShape {
    /// The map type, as aya names it (`LruHash`, `Array`, ...).
    pub kind: String,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapShape {
    /// What the object defines.
    pub fn of_definition(def: &aya_obj::Map) -> MapShape {
        let kind = bpf_map_type::try_from(def.map_type()).ok().and_then(|t| MapType::try_from(t).ok());
        MapShape {
            kind: kind.map_or_else(|| format!("type {}", def.map_type()), |t| format!("{t:?}")),
            key_size: def.key_size(),
            value_size: def.value_size(),
            max_entries: def.max_entries(),
            flags: def.map_flags(),
        }
    }

    /// What the kernel holds at the pin `path`.
    pub fn of_pin(path: &Path) -> anyhow::Result<MapShape> {
        let info = MapInfo::from_pin(path).with_context(|| format!("open the pinned map {}", path.display()))?;
        let kind = info.map_type().ok();
        Ok(MapShape {
            kind: kind.map_or_else(|| "an unknown type".into(), |t| format!("{t:?}")),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags() & !flags_the_kernel_adds(kind),
        })
    }

    /// The fields in which `found` differs from `self`, each as
    /// "what: expected X, found Y"; empty when they match.
    pub fn differences(&self, found: &MapShape) -> Vec<String> {
        let mut out = Vec::new();
        let mut field = |what: &str, expected: String, got: String| {
            if expected != got {
                out.push(format!("{what}: expected {expected}, found {got}"));
            }
        };
        field("type", self.kind.clone(), found.kind.clone());
        field("key size", self.key_size.to_string(), found.key_size.to_string());
        field("value size", self.value_size.to_string(), found.value_size.to_string());
        field("max entries", self.max_entries.to_string(), found.max_entries.to_string());
        field("flags", format!("{:#x}", self.flags), format!("{:#x}", found.flags));
        out
    }
}

/// Flags the kernel sets on a map of `kind` by itself, which no definition
/// carries: device maps are read-only to programs (`BPF_F_RDONLY_PROG`).
fn flags_the_kernel_adds(kind: Option<MapType>) -> u32 {
    const BPF_F_RDONLY_PROG: u32 = 1 << 7;
    match kind {
        Some(MapType::DevMap | MapType::DevMapHash) => BPF_F_RDONLY_PROG,
        _ => 0,
    }
}

impl fmt::Display for MapShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self { kind, key_size, value_size, max_entries, flags } = self;
        write!(f, "{kind}, key {key_size} B, value {value_size} B, {max_entries} entries, flags {flags:#x}")
    }
}

/// Refuse maps pinned under `map_pins` (by a previous agent of the same ABI
/// version, or anyone else) that differ from `object`'s definitions: one
/// built with other limits, or a map of another program under the same
/// name. `pin_dir` is the directory the user gave, for the advice.
pub(super) fn check_pinned_maps(object: &[u8], map_pins: &Path, pin_dir: &Path, max_flows: u32) -> anyhow::Result<()> {
    let obj = aya_obj::Object::parse(object).context("parse the lb-ebpf object")?;
    for name in Maps::NAMES {
        let path = map_pins.join(name);
        if !path.exists() {
            continue;
        }
        let def = obj.maps.get(name).ok_or_else(|| anyhow!("map {name} missing from the object"))?;
        let mut expected = MapShape::of_definition(def);
        // Sized by max_flows at load, as `load_object` does.
        let sized = Maps::SIZED_BY_MAX_FLOWS.contains(&name);
        if sized {
            expected.max_entries = max_flows;
        }
        let found = MapShape::of_pin(&path)?;
        let differences = expected.differences(&found);
        if sized && differences.len() == 1 && found.max_entries != max_flows {
            bail!(
                "the pinned connection table at {} holds {} flows, but [dataplane] max_flows is {max_flows}; \
                 set max_flows back to {} to keep the pinned flows, or drop them (and the rest of the pinned \
                 state) with `lb-agent stop --pin-dir {}` and start again",
                path.display(),
                found.max_entries,
                found.max_entries,
                pin_dir.display()
            );
        }
        if !differences.is_empty() {
            bail!(
                "the pinned map {name} at {} does not match this lb-agent's program ({}): expected {expected}, \
                 found {found}; remove the old pinned state with `lb-agent stop --pin-dir {}` (no agent running), \
                 or use another --pin-dir",
                path.display(),
                differences.join("; "),
                pin_dir.display()
            );
        }
    }
    Ok(())
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

/// Whether `path` is (the root of, or in) a bpf file system.
pub fn is_bpffs(path: &Path) -> bool {
    fs_magic(path).is_ok_and(|m| m == BPF_FS_MAGIC)
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

/// This process's mount namespace, where it is not the host's.
#[derive(Debug, PartialEq, Eq)]
pub struct PrivateMountNamespace {
    /// `mnt:[...]` of ours and of the host's.
    pub ours: String,
    pub host: String,
    /// The name of our network namespace under /run/netns, if it has one.
    pub netns: Option<String>,
}

impl PrivateMountNamespace {
    /// Why the agent will not pin under `dir` here, and what to run instead.
    pub fn refusal(&self, dir: &Path) -> String {
        let enter = match &self.netns {
            Some(name) => format!("nsenter --net=/run/netns/{name} lb-agent run ..."),
            None => "nsenter --net=<the network namespace> lb-agent run ...".to_owned(),
        };
        format!(
            "lb-agent runs in a mount namespace of its own ({}, the host's is {}; `ip netns exec` makes one): a bpf \
             filesystem mounted for the pins under {} would vanish with this process, and a restart would not be \
             hitless. Enter only the network namespace instead: `{enter}`; or run without pins: --no-pin",
            self.ours,
            self.host,
            dir.display()
        )
    }
}

/// Our mount namespace when it is not the host's: PID 1's, or, where
/// /proc/1 cannot be read (a PID 1 with privileges we lack), the oldest
/// ancestor's whose namespace we can read.
pub fn private_mount_namespace() -> Option<PrivateMountNamespace> {
    let read = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let ours = read("self")?;
    let host = read("1").or_else(|| ancestors().filter_map(|pid| read(&pid.to_string())).last())?;
    (ours != host).then(|| PrivateMountNamespace {
        ours: ours.display().to_string(),
        host: host.display().to_string(),
        netns: netns_name(),
    })
}

/// Our parent's pid, its parent's, ... up to (not including) PID 1.
fn ancestors() -> impl Iterator<Item = u32> {
    let parent = |pid: u32| -> Option<u32> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status.lines().find_map(|l| l.strip_prefix("PPid:"))?.trim().parse().ok()
    };
    std::iter::successors(parent(std::process::id()), move |p| parent(*p)).take_while(|p| *p > 1)
}

/// The name `ip netns` gave our network namespace, if any.
fn netns_name() -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let ours = std::fs::metadata("/proc/self/ns/net").ok()?;
    std::fs::read_dir("/run/netns").ok()?.filter_map(Result::ok).find_map(|e| {
        let m = std::fs::metadata(e.path()).ok()?;
        (m.dev() == ours.dev() && m.ino() == ours.ino()).then(|| e.file_name().to_string_lossy().into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(max_entries: u32) -> MapShape {
        MapShape { kind: "Array".into(), key_size: 4, value_size: 16, max_entries, flags: 0 }
    }

    #[test]
    fn the_refusal_names_the_command_to_use_instead() {
        let private =
            PrivateMountNamespace { ours: "mnt:[2]".into(), host: "mnt:[1]".into(), netns: Some("lb".into()) };
        let msg = private.refusal(Path::new("/sys/fs/bpf/lb-agent"));
        assert!(msg.contains("(mnt:[2], the host's is mnt:[1]; `ip netns exec` makes one)"), "{msg}");
        assert!(msg.contains("under /sys/fs/bpf/lb-agent would vanish"), "{msg}");
        assert!(msg.contains("`nsenter --net=/run/netns/lb lb-agent run ...`; or run without pins: --no-pin"), "{msg}");
    }

    #[test]
    fn a_matching_pinned_map_has_no_differences() {
        assert!(shape(4096).differences(&shape(4096)).is_empty());
    }

    #[test]
    fn every_differing_field_is_named_with_both_values() {
        let found = MapShape { kind: "Hash".into(), value_size: 12, flags: 1, ..shape(8) };
        assert_eq!(
            shape(4096).differences(&found),
            [
                "type: expected Array, found Hash",
                "value size: expected 16, found 12",
                "max entries: expected 4096, found 8",
                "flags: expected 0x0, found 0x1",
            ]
        );
        assert_eq!(shape(8).to_string(), "Array, key 4 B, value 16 B, 8 entries, flags 0x0");
    }

    #[test]
    fn only_device_maps_lose_the_read_only_flag_the_kernel_sets() {
        assert_eq!(flags_the_kernel_adds(Some(MapType::DevMapHash)), 0x80);
        assert_eq!(flags_the_kernel_adds(Some(MapType::DevMap)), 0x80);
        assert_eq!(flags_the_kernel_adds(Some(MapType::Hash)), 0);
        assert_eq!(flags_the_kernel_adds(None), 0);
    }

    #[test]
    fn the_objects_definitions_give_the_shapes_lb_common_declares() {
        let obj = aya_obj::Object::parse(crate::ebpf::object()).unwrap();
        let backends = MapShape::of_definition(&obj.maps[lb_common::BACKENDS]);
        let want = MapShape {
            kind: "Array".into(),
            key_size: 4,
            value_size: size_of::<lb_common::Backend>() as u32,
            max_entries: lb_common::MAX_BACKENDS,
            flags: 0,
        };
        assert_eq!(backends, want);
        let conntrack = MapShape::of_definition(&obj.maps[lb_common::CONNTRACK]);
        assert_eq!((conntrack.kind.as_str(), conntrack.max_entries), ("LruHash", lb_common::CONNTRACK_MAX));
    }

    #[test]
    fn link_pin_names_have_no_dots_and_stay_distinct() {
        assert_eq!(link_pin_name("eth0", AttachMode::Driver), "native-eth0");
        assert_eq!(link_pin_name("eth0.100", AttachMode::Generic), "generic-eth0_2e100");
        assert_ne!(link_pin_name("a_2e", AttachMode::Driver), link_pin_name("a.", AttachMode::Driver));
        assert!(!link_pin_name("a.b.c", AttachMode::Driver).contains('.'));
    }
}
