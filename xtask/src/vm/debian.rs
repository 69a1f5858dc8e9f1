//! Debian packages for the VM stage, fetched with apt-get under a private
//! configuration in target/vm/apt (its own sources and lists, the host's
//! keyring), so the host's sources need not name bookworm or trixie and
//! its apt state is never touched. Downloads are cached in target/vm/debs
//! and unpacked (only the files used) into target/vm/unpacked.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use crate::setup::DEBIAN_MIRROR;
use crate::util::{capture, stream_ok, Step, GREEN};

/// Kernel versions live in these suites: 6.1 in bookworm, 6.12 in trixie.
const SUITES: [&str; 2] = ["bookworm", "trixie"];
/// Overrides [`DEBIAN_MIRROR`], e.g. for a local mirror.
const MIRROR_ENV: &str = "LB_DEBIAN_MIRROR";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The Debian mirror: [`MIRROR_ENV`] or Debian's own.
pub fn mirror() -> String {
    std::env::var(MIRROR_ENV).unwrap_or_else(|_| DEBIAN_MIRROR.to_owned())
}

/// Kernel modules the tests need that Debian builds as modules.
const MODULES: [&str; 1] = ["veth"];

pub struct Apt {
    dir: PathBuf,
    updated: bool,
}

/// What the VM boots: a kernel image and the modules to insmod, in order,
/// already decompressed.
pub struct Kernel {
    /// The package, e.g. "linux-image-6.1.0-41-amd64".
    pub package: String,
    pub vmlinuz: PathBuf,
    pub modules: Vec<PathBuf>,
}

impl Apt {
    /// Writes the private configuration under `dir` (target/vm).
    pub fn new(dir: &Path) -> Result<Self> {
        let apt = dir.join("apt");
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            fs::create_dir_all(apt.join(sub)).with_context(|| format!("create {}", apt.join(sub).display()))?;
        }
        let mirror = mirror();
        let sources: String =
            SUITES.iter().map(|suite| format!("deb [signed-by={KEYRING}] {mirror} {suite} main\n")).collect();
        write_if_changed(&apt.join("sources.list"), &sources)?;
        write_if_changed(&apt.join("status"), "")?;
        let a = apt.display();
        let conf = format!(
            "Dir::Etc::SourceList \"{a}/sources.list\";\n\
             Dir::Etc::SourceParts \"{a}/sources.list.d\";\n\
             Dir::State::Lists \"{a}/lists\";\n\
             Dir::State::status \"{a}/status\";\n\
             Dir::Cache \"{a}/cache\";\n\
             Acquire::Languages \"none\";\n\
             APT::Architecture \"amd64\";\n\
             APT::Architectures \"amd64\";\n\
             APT::Sandbox::User \"root\";\n"
        );
        write_if_changed(&apt.join("apt.conf"), &conf)?;
        Ok(Apt { dir: dir.to_owned(), updated: false })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", self.dir.join("apt/apt.conf")).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    /// `apt-get update` of the private lists, once per run and only when a
    /// package is not cached yet.
    fn update(&mut self) -> Result<()> {
        if !self.updated {
            stream_ok(self.command("apt-get").args(["update", "-q"]))?;
            self.updated = true;
        }
        Ok(())
    }

    /// The cached .deb of the package `pick` chooses among the names
    /// starting with `prefix`, else downloads the one it chooses from the
    /// index.
    fn fetch(&mut self, prefix: &str, pick: impl Fn(&[String]) -> Option<String>) -> Result<PathBuf> {
        let debs = self.dir.join("debs");
        fs::create_dir_all(&debs).with_context(|| format!("create {}", debs.display()))?;
        let cached: Vec<(String, PathBuf)> = list_dir(&debs)?
            .into_iter()
            .filter_map(|p| {
                let name = p.file_name()?.to_str()?.to_owned();
                let package = name.strip_suffix(".deb")?.split('_').next()?.to_owned();
                package.starts_with(prefix).then_some((package, p))
            })
            .collect();
        let names: Vec<String> = cached.iter().map(|(n, _)| n.clone()).collect();
        if let Some(best) = pick(&names) {
            if let Some((_, path)) = cached.into_iter().find(|(n, _)| *n == best) {
                return Ok(path);
            }
        }
        let step = Step::new("vm", format!("download {prefix}*"));
        self.update()?;
        let out = capture(self.command("apt-cache").args(["pkgnames", prefix]))?.context("apt-cache not found")?;
        ensure!(out.status.success(), "apt-cache pkgnames {prefix} failed: {}", String::from_utf8_lossy(&out.stderr));
        let names: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
        let Some(best) = pick(&names) else {
            bail!("no package for {prefix}* in {} (the mirror's index)", SUITES.join(", "));
        };
        stream_ok(self.command("apt-get").args(["download", "-q", &best]).current_dir(&debs))?;
        let path = list_dir(&debs)?
            .into_iter()
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{best}_"))))
            .with_context(|| format!("apt-get download {best} left no .deb in {}", debs.display()))?;
        step.finish(GREEN, &format!("{}", path.display()));
        Ok(path)
    }

    /// Debian's newest generic amd64 kernel `version` (e.g. "6.1"), with
    /// vmlinuz and [`MODULES`] unpacked.
    pub fn kernel(&mut self, version: &str) -> Result<Kernel> {
        let deb = self.fetch(&format!("linux-image-{version}"), |names| newest_image(names, version))?;
        let package = package_of(&deb)?;
        let dir = self.dir.join("unpacked").join(&package);
        let done = dir.join(".done");
        if !done.is_file() {
            let step = Step::new("vm", format!("unpack {package}"));
            let _ = fs::remove_dir_all(&dir);
            let modules_dir = dir.join("modules");
            fs::create_dir_all(&modules_dir).with_context(|| format!("create {}", modules_dir.display()))?;
            unpack(&deb, &dir, &["*/vmlinuz-*"])?;
            let mut order = Vec::new();
            for m in MODULES {
                add_module(&deb, &dir, m, &mut order)?;
            }
            let list: String = order.iter().map(|p| format!("{}\n", p.display())).collect();
            fs::write(&done, list).with_context(|| format!("write {}", done.display()))?;
            step.finish(GREEN, "done");
        }
        let order = fs::read_to_string(&done).with_context(|| format!("read {}", done.display()))?;
        let vmlinuz = find_file(&dir, |p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))?;
        Ok(Kernel { package, vmlinuz, modules: order.lines().map(PathBuf::from).collect() })
    }

    /// Debian's static busybox, unpacked.
    pub fn busybox(&mut self) -> Result<PathBuf> {
        let deb = self.fetch("busybox-static", |names| names.iter().find(|n| *n == "busybox-static").cloned())?;
        let dir = self.dir.join("unpacked").join(package_of(&deb)?);
        let is_busybox = |p: &Path| p.ends_with("bin/busybox");
        if let Ok(bin) = find_file(&dir, is_busybox) {
            return Ok(bin);
        }
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        unpack(&deb, &dir, &["*bin/busybox"])?;
        find_file(&dir, is_busybox)
    }
}

/// Among package names, the generic amd64 image of `version` with the
/// highest ABI number.
pub fn newest_image(names: &[String], version: &str) -> Option<String> {
    names.iter().filter_map(|n| Some((image_rank(n, version)?, n))).max().map(|(_, n)| n.clone())
}

/// The numbers after `version` in a generic amd64 image package's name:
/// bookworm's "linux-image-6.1.0-41-amd64" gives [0, 41] for "6.1",
/// trixie's "linux-image-6.12.48+deb13-amd64" gives [48] for "6.12".
/// Flavours (cloud, rt), -dbg and -unsigned packages give None.
fn image_rank(name: &str, version: &str) -> Option<Vec<u32>> {
    let rest = name.strip_prefix("linux-image-")?.strip_prefix(version)?.strip_suffix("-amd64")?;
    // "6.1" must not match "6.12.48": the version ends at '.' or '-'.
    if !rest.starts_with(['.', '-']) {
        return None;
    }
    let (abi, suffix) = rest.split_once('+').unwrap_or((rest, ""));
    let suffix_ok =
        suffix.is_empty() || suffix.strip_prefix("deb").is_some_and(|d| d.chars().all(|c| c.is_ascii_digit()));
    if !suffix_ok || !abi.chars().all(|c| c.is_ascii_digit() || c == '.' || c == '-') {
        return None;
    }
    abi.split(['.', '-']).filter(|s| !s.is_empty()).map(|s| s.parse().ok()).collect()
}

/// Unpacks module `name` and, first, the modules it depends on, into
/// dir/modules, decompressed; appends them to `order` in load order. The
/// package has no modules.dep (depmod makes it on install), so the
/// dependencies come from each module's own `depends=` modinfo.
fn add_module(deb: &Path, dir: &Path, name: &str, order: &mut Vec<PathBuf>) -> Result<()> {
    let ko = dir.join("modules").join(format!("{name}.ko"));
    if order.contains(&ko) {
        return Ok(());
    }
    // Module files use '_' or '-' where the module name has '_'.
    let pattern = format!("*/{}.ko*", name.replace('_', "[_-]"));
    unpack(deb, dir, &[&pattern])?;
    let wanted = format!("{name}.ko");
    let file = find_file(dir, |p| {
        let file = p.file_name().map(|n| n.to_string_lossy().replace('-', "_")).unwrap_or_default();
        !p.starts_with(dir.join("modules")) && module_name(&file) == wanted
    })
    .with_context(|| format!("module {name} is not in {}", deb.display()))?;
    decompress(&file, &ko)?;
    let bytes = fs::read(&ko).with_context(|| format!("read {}", ko.display()))?;
    for dep in modinfo_depends(&bytes) {
        add_module(deb, dir, &dep, order)?;
    }
    order.push(ko);
    Ok(())
}

/// The names in a module's `depends=a,b` modinfo string.
fn modinfo_depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &module[at + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// "kernel/drivers/net/veth.ko.xz" -> "veth.ko".
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let end = file.find(".ko").map_or(file.len(), |i| i + 3);
    file[..end].to_owned()
}

fn package_of(deb: &Path) -> Result<String> {
    let name = deb.file_name().and_then(|n| n.to_str()).with_context(|| format!("bad name {}", deb.display()))?;
    Ok(name.split('_').next().unwrap_or(name).to_owned())
}

/// Extracts the files matching `patterns` (tar wildcards) from a .deb.
fn unpack(deb: &Path, dir: &Path, patterns: &[&str]) -> Result<()> {
    let mut data = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("run dpkg-deb (is this Debian?)")?;
    let stdout = data.stdout.take().context("dpkg-deb has no stdout")?;
    let tar = Command::new("tar").arg("-x").arg("-C").arg(dir).arg("--wildcards").args(patterns).stdin(stdout).status();
    let data = data.wait().context("wait for dpkg-deb")?;
    let tar = tar.context("run tar")?;
    ensure!(data.success() && tar.success(), "unpack {patterns:?} from {}: dpkg-deb {data}, tar {tar}", deb.display());
    Ok(())
}

/// Debian 6.1 ships plain .ko files, trixie's .ko.xz; busybox's insmod
/// wants them plain.
fn decompress(from: &Path, to: &Path) -> Result<()> {
    let name = from.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    let Some(tool) = tool else {
        fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
        return Ok(());
    };
    let out = fs::File::create(to).with_context(|| format!("create {}", to.display()))?;
    let status =
        Command::new(tool).args(["-dc"]).arg(from).stdout(out).status().with_context(|| format!("run {tool}"))?;
    ensure!(status.success(), "{tool} -dc {} {status}", from.display());
    Ok(())
}

fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        out.push(entry.with_context(|| format!("list {}", dir.display()))?.path());
    }
    Ok(out)
}

/// The first regular file under `dir` (recursively) that `matches`.
fn find_file(dir: &Path, matches: impl Fn(&Path) -> bool + Copy) -> Result<PathBuf> {
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for p in list_dir(&d)? {
            let meta = fs::symlink_metadata(&p).with_context(|| format!("stat {}", p.display()))?;
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() && matches(&p) {
                return Ok(p);
            }
        }
    }
    bail!("no such file under {}", dir.display())
}

#[cfg(test)]
mod tests {
    use super::{modinfo_depends, module_name, newest_image};
    use crate::util::owned as names;

    #[test]
    fn newest_generic_image_of_a_version() {
        let bookworm = names(&[
            "linux-image-6.1.0-40-amd64",
            "linux-image-6.1.0-41-amd64",
            "linux-image-6.1.0-41-amd64-dbg",
            "linux-image-6.1.0-41-amd64-unsigned",
            "linux-image-6.1.0-41-cloud-amd64",
            "linux-image-6.1.0-41-rt-amd64",
            "linux-image-6.1.0-9-amd64",
        ]);
        assert_eq!(newest_image(&bookworm, "6.1").as_deref(), Some("linux-image-6.1.0-41-amd64"));
        let trixie = names(&[
            "linux-image-6.12.48+deb13-amd64",
            "linux-image-6.12.57+deb13-amd64",
            "linux-image-6.12.57+deb13-cloud-amd64",
            "linux-image-6.12.57+deb13-amd64-dbg",
        ]);
        assert_eq!(newest_image(&trixie, "6.12").as_deref(), Some("linux-image-6.12.57+deb13-amd64"));
        // 6.1 is not a prefix of 6.12, and a missing version finds nothing.
        assert_eq!(newest_image(&trixie, "6.1"), None);
        assert_eq!(newest_image(&bookworm, "5.10"), None);
    }

    #[test]
    fn module_dependencies_from_modinfo() {
        let module = b"\x7fELF...\0license=GPL\0depends=stp,llc\0intree=Y\0";
        assert_eq!(modinfo_depends(module), ["stp", "llc"]);
        assert!(modinfo_depends(b"\0license=GPL\0depends=\0name=veth\0").is_empty());
        assert!(modinfo_depends(b"no modinfo").is_empty());
        assert_eq!(module_name("kernel/drivers/net/veth.ko.zst"), "veth.ko");
        assert_eq!(module_name("veth.ko"), "veth.ko");
    }
}
