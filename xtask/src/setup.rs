//! `cargo xtask setup`: install what is missing, skip what is present.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;

use crate::util::{self, capture, stream_ok, Step, GREEN, RED, YELLOW};

/// Debian packages the demo and the root tests call.
const APT_PACKAGES: &[&str] = &[
    "iproute2",                // ip: network namespaces, veth pairs, addresses, routes
    "ethtool",                 // GRO and offload settings on veth devices
    "iputils-ping",            // reachability checks in the demo and tests
    "procps",                  // sysctl (net.ipv4.ip_forward)
    "prometheus",              // a real server scrapes lb-agent's /metrics in the tests
    "prometheus-alertmanager", // receives the shipped alert rules' alerts in e2e_alerts
    "docker.io",               // the Docker orchestrator's tests and demo (dockerd is started on demand)
    "iptables",                // DOCKER-USER rules for forwarding to containers
    "siege",                   // the availability table: `cargo xtask run -- --scenario availability`
    "tmux",                    // a real pseudo-terminal for `lb-agent top`'s test (e2e_top)
    // `cargo xtask bench e2e` (and its smoke test among the root tests):
    "wrk",                 // the load generator
    "haproxy",             // a peer: TCP proxy in the LB namespace
    "nginx",               // the HTTP backends, and a peer with the stream module
    "libnginx-mod-stream", // nginx's `stream` (TCP proxy) module
];

/// Packages whose install would start a system service that we never want
/// running (the bench and the tests start their own, inside namespaces):
/// (package, systemd unit).
const SERVICES: &[(&str, &str)] = &[
    ("prometheus", "prometheus.service"), // the packaged server listens on :9090, all interfaces
    ("prometheus-alertmanager", "prometheus-alertmanager.service"), // :9093 and its cluster port :9094
    ("haproxy", "haproxy.service"),       // :80 would clash with anything on the host
    ("nginx", "nginx.service"),
];

/// Debian's hook asked before any maintainer script starts a service
/// (invoke-rc.d, deb-systemd-invoke); exit status 101 means "not now".
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian's mirror, for what the host's sources lack (backports, the VM
/// stage's kernels).
pub const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

#[derive(Args)]
pub struct Options {}

pub fn run(_opts: &Options) -> Result<ExitCode> {
    ensure_all(true)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Default)]
struct Tally {
    present: usize,
    installed: usize,
    /// Packages we could not install (not root, or no dpkg).
    missing: Vec<&'static str>,
}

/// Installs whatever is missing. With `strict`, packages that cannot be
/// installed (not root) are an error; otherwise a warning, so that
/// `build` and `test --unit-only` work for a user without root.
pub fn ensure_all(strict: bool) -> Result<()> {
    let total = Step::new("setup", "done");
    let mut tally = Tally::default();
    ensure_apt_packages(&mut tally)?;
    let channel = util::toolchain_channel()?;
    let sysroot = rustc_sysroot()?;
    ensure_rust_src(&channel, &sysroot, &mut tally)?;
    ensure_bpf_linker(&sysroot, &mut tally)?;

    let mut summary = format!("{} present, {} installed", tally.present, tally.installed);
    if tally.missing.is_empty() {
        total.finish(GREEN, &summary);
        return Ok(());
    }
    let missing = tally.missing.join(" ");
    summary.push_str(&format!(", missing: {missing}"));
    total.finish(if strict { RED } else { YELLOW }, &summary);
    let fix = format!("run `cargo xtask setup` as root, or `apt-get install -y --no-install-recommends {missing}`");
    if strict {
        bail!("packages missing: {missing}; {fix}");
    }
    println!("[setup] warning: the demo and the root tests need them; {fix}");
    Ok(())
}

fn ensure_apt_packages(tally: &mut Tally) -> Result<()> {
    let step = Step::new("setup", format!("apt packages ({})", APT_PACKAGES.join(" ")));
    match apt_packages(&step, APT_PACKAGES)? {
        AptState::NotChecked => {}
        AptState::Present => tally.present += 1,
        AptState::Installed => tally.installed += 1,
        AptState::NeedRoot(missing) => {
            step.finish(YELLOW, &format!("missing {}; root is needed to install them", missing.join(" ")));
            tally.missing = missing;
        }
    }
    Ok(())
}

/// Packages for one task only (qemu for `test --kernel`), installed when
/// that task first needs them rather than by every `setup`.
pub fn ensure_apt_packages_for(task: &str, packages: &[&'static str]) -> Result<()> {
    let step = Step::new("setup", format!("apt packages for {task} ({})", packages.join(" ")));
    if let AptState::NeedRoot(missing) = apt_packages(&step, packages)? {
        step.finish(RED, "missing");
        let list = missing.join(" ");
        bail!("{task} needs {list}: run as root, or `apt-get install -y --no-install-recommends {list}`");
    }
    Ok(())
}

enum AptState {
    /// No dpkg-query: not Debian.
    NotChecked,
    Present,
    Installed,
    /// These are missing, and only root can install them.
    NeedRoot(Vec<&'static str>),
}

/// Checks `packages` and, as root, installs the missing ones. `step` tells
/// how it went, except for NeedRoot, which the caller words.
fn apt_packages(step: &Step, packages: &[&'static str]) -> Result<AptState> {
    let Some(missing) = missing_apt_packages(packages)? else {
        step.finish(YELLOW, "not checked: no dpkg-query (not Debian); install them yourself");
        return Ok(AptState::NotChecked);
    };
    if missing.is_empty() {
        step.finish(GREEN, "present");
        return Ok(AptState::Present);
    }
    if !util::is_root()? {
        return Ok(AptState::NeedRoot(missing));
    }
    let list = missing.join(" ");
    step.say(&format!("installing {list}"));
    install_apt_packages(&missing)?;
    step.finish(GREEN, &format!("installed {list}"));
    Ok(AptState::Installed)
}

/// The packages dpkg does not list as installed; `None` without dpkg-query.
fn missing_apt_packages(packages: &[&'static str]) -> Result<Option<Vec<&'static str>>> {
    let mut missing = Vec::new();
    for &pkg in packages {
        let Some(out) = capture(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))? else {
            return Ok(None);
        };
        // dpkg-query exits non-zero for packages it has never heard of.
        if String::from_utf8_lossy(&out.stdout).trim() != "install ok installed" {
            missing.push(pkg);
        }
    }
    Ok(Some(missing))
}

fn install_apt_packages(missing: &[&str]) -> Result<()> {
    stream_ok(apt_get().arg("update"))?;
    {
        let _no_services = NoServiceStarts::install()?;
        // --no-remove: installing what we need never takes away what the
        // host has (apt aborts instead).
        let stable =
            stream_ok(apt_get().args(["install", "-y", "--no-install-recommends", "--no-remove"]).args(missing));
        if let Err(e) = stable {
            // A backport on the host (this project's machines have qemu-utils
            // from bookworm-backports, which breaks bookworm's qemu) makes the
            // stable version need a removal: take the backports' version.
            println!("[setup] {e:#}; trying {}-backports", host_codename()?);
            install_from_backports(missing)?;
        }
    }
    disable_services(missing);
    Ok(())
}

/// `apt-get install -t <codename>-backports`, with the host's sources plus
/// the backports suite and the index in target/apt-backports, so that the
/// host's own apt lists and sources stay as they are.
fn install_from_backports(packages: &[&str]) -> Result<()> {
    let suite = format!("{}-backports", host_codename()?);
    let dir = util::target_dir().join("apt-backports");
    for sub in ["lists/partial", "archives/partial"] {
        fs::create_dir_all(dir.join(sub)).with_context(|| format!("create {}", dir.join(sub).display()))?;
    }
    let sources = dir.join("sources.list");
    let line = format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {DEBIAN_MIRROR} {suite} main\n");
    fs::write(&sources, line).with_context(|| format!("write {}", sources.display()))?;
    let apt = |args: &[&str]| {
        let mut cmd = apt_get();
        cmd.arg("-o")
            .arg(format!("Dir::Etc::SourceList={}", sources.display()))
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", dir.join("lists").display()))
            .arg("-o")
            .arg(format!("Dir::Cache::Archives={}", dir.join("archives").display()))
            .args(["-o", "APT::Sandbox::User=root"])
            .args(args);
        cmd
    };
    stream_ok(&mut apt(&["update", "-q"]))?;
    stream_ok(apt(&["install", "-y", "--no-install-recommends", "--no-remove", "-t", &suite]).args(packages))
}

/// VERSION_CODENAME of /etc/os-release, e.g. "bookworm".
fn host_codename() -> Result<String> {
    let text = fs::read_to_string("/etc/os-release").context("read /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
        .context("no VERSION_CODENAME in /etc/os-release")
}

/// While alive, a `policy-rc.d` that denies every service start, so that
/// installing nginx or haproxy starts nothing. An existing policy-rc.d (a
/// container image's, say) is the admin's: it is left as it is.
struct NoServiceStarts {
    /// We wrote it, so drop removes it.
    ours: bool,
}

impl NoServiceStarts {
    fn install() -> Result<Self> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            return Ok(Self { ours: false });
        }
        fs::write(path, "#!/bin/sh\n# Written by cargo xtask setup for one apt-get install.\nexit 101\n")
            .with_context(|| format!("write {POLICY_RC_D}"))?;
        let guard = Self { ours: true };
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).with_context(|| format!("chmod {POLICY_RC_D}"))?;
        Ok(guard)
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if self.ours {
            if let Err(e) = fs::remove_file(POLICY_RC_D) {
                println!("[setup] warning: remove {POLICY_RC_D}: {e}");
            }
        }
    }
}

/// Under systemd, policy-rc.d stops the start but not the enable: disable
/// (and stop, should one run anyway) the services just installed, so none
/// starts at the next boot either.
fn disable_services(installed: &[&str]) {
    if !Path::new("/run/systemd/system").exists() {
        return;
    }
    for (_, unit) in SERVICES.iter().filter(|(pkg, _)| installed.contains(pkg)) {
        match Command::new("systemctl").args(["disable", "--now", unit]).status() {
            Ok(s) if s.success() => {}
            Ok(s) => println!("[setup] warning: `systemctl disable --now {unit}` {}", util::describe(s)),
            Err(e) => println!("[setup] warning: run systemctl: {e}"),
        }
    }
}

pub fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// Sysroot of the toolchain pinned in rust-toolchain.toml (rustup picks it
/// because rustc runs in the workspace root).
fn rustc_sysroot() -> Result<PathBuf> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.args(["--print", "sysroot"]).current_dir(util::workspace_root());
    let out = capture(&mut cmd)?.context("rustc not found; install rustup first")?;
    ensure!(out.status.success(), "`rustc --print sysroot` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn ensure_rust_src(channel: &str, sysroot: &Path, tally: &mut Tally) -> Result<()> {
    let step = Step::new("setup", format!("rust-src for {channel}"));
    // `-Z build-std=core` reads exactly this directory; checking it is
    // cheaper than asking rustup and also works without rustup.
    let core = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    if core.is_file() {
        step.finish(GREEN, "present");
        tally.present += 1;
        return Ok(());
    }
    step.say("installing");
    // `component add` has no --no-self-update flag; it never self-updates.
    stream_ok(
        Command::new("rustup")
            .args(["component", "add", "rust-src", "--toolchain", channel])
            .current_dir(util::workspace_root()),
    )
    .context("install rust-src (is rustup on PATH?)")?;
    ensure!(core.is_file(), "rust-src installed, but {} is missing", core.display());
    step.finish(GREEN, "installed");
    tally.installed += 1;
    Ok(())
}

fn ensure_bpf_linker(sysroot: &Path, tally: &mut Tally) -> Result<()> {
    let step = Step::new("setup", format!("bpf-linker {BPF_LINKER_VERSION}"));
    let (libllvm, llvm_major) = toolchain_libllvm(sysroot)?;
    let reason = match find_in_path("bpf-linker") {
        None => "not found".to_owned(),
        Some(bin) => match installed_version(&bin)? {
            Err(why) => why,
            Ok(v) if v != BPF_LINKER_VERSION => format!("found {v}"),
            Ok(_) => match linked_llvm_major(&bin) {
                // bpf-linker must use the same LLVM major as rustc.
                Some(m) if m != llvm_major => {
                    format!("it links LLVM {m}, rustc uses LLVM {llvm_major}")
                }
                _ => {
                    step.finish(GREEN, "present");
                    tally.present += 1;
                    return Ok(());
                }
            },
        },
    };
    step.say(&format!("installing ({reason}), against {} (about a minute)", libllvm.display()));
    let lib_dir = sysroot.join("lib");
    // Link the toolchain's own libLLVM and find it at run time via rpath,
    // so bpf-linker and rustc always share one LLVM.
    let rustflags = format!("-C link-arg={} -C link-arg=-Wl,-rpath,{}", libllvm.display(), lib_dir.display());
    stream_ok(
        util::cargo()
            .env("RUSTFLAGS", rustflags)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
            .args(["--locked", "--force", "--no-default-features", "--features"])
            .arg(format!("llvm-{llvm_major},no-llvm-linking")),
    )?;
    let bin = find_in_path("bpf-linker").context("bpf-linker installed but not on PATH")?;
    match installed_version(&bin)? {
        Ok(v) if v == BPF_LINKER_VERSION => {}
        Ok(v) => bail!("installed bpf-linker reports {v}, expected {BPF_LINKER_VERSION}"),
        Err(why) => bail!("installed bpf-linker does not run: {why}"),
    }
    step.finish(GREEN, "installed");
    tally.installed += 1;
    Ok(())
}

/// The toolchain's `lib/libLLVM.so.*` and its LLVM major version.
fn toolchain_libllvm(sysroot: &Path) -> Result<(PathBuf, u32)> {
    let lib_dir = sysroot.join("lib");
    let mut found = Vec::new();
    for entry in fs::read_dir(&lib_dir).with_context(|| format!("list {}", lib_dir.display()))? {
        let entry = entry.with_context(|| format!("list {}", lib_dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with("libLLVM.so.") {
            found.push(entry.path());
        }
    }
    let [libllvm] = found.as_slice() else {
        bail!("expected exactly one libLLVM.so.* in {}, found {found:?}", lib_dir.display());
    };
    let name = libllvm.file_name().unwrap_or_default().to_string_lossy();
    let major = llvm_major(&name).with_context(|| format!("no LLVM version in {name}"))?;
    Ok((libllvm.clone(), major))
}

/// "libLLVM.so.22.1-rust-1.95.0-stable" -> 22, "libLLVM-14.so.1" -> 14.
fn llvm_major(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix("libLLVM")?;
    let rest = rest.trim_start_matches(|c: char| !c.is_ascii_digit());
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Ok(version) from "bpf-linker 0.13.0", or Err(reason) if it does not run.
fn installed_version(bin: &Path) -> Result<Result<String, String>> {
    let out = capture(Command::new(bin).arg("--version"))?.with_context(|| format!("run {}", bin.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or("").trim().to_owned();
        return Ok(Err(format!("`bpf-linker --version` failed: {first}")));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let version = stdout.split_whitespace().last().unwrap_or("").to_owned();
    Ok(Ok(version))
}

/// LLVM major of the libLLVM that `bin` loads, if ldd can tell.
fn linked_llvm_major(bin: &Path) -> Option<u32> {
    let out = capture(Command::new("ldd").arg(bin)).ok()??;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .find(|name| name.starts_with("libLLVM"))
        .and_then(llvm_major)
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn llvm_major_from_library_names() {
        assert_eq!(llvm_major("libLLVM.so.22.1-rust-1.95.0-stable"), Some(22));
        assert_eq!(llvm_major("libLLVM-22-rust-1.95.0-stable.so"), Some(22));
        assert_eq!(llvm_major("libLLVM-14.so.1"), Some(14));
        assert_eq!(llvm_major("libLLVM.so.19.1"), Some(19));
        assert_eq!(llvm_major("libLLVM.so"), None);
        assert_eq!(llvm_major("libclang.so.14"), None);
    }
}
