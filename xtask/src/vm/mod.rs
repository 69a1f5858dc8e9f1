//! The VM stage of `cargo xtask test`: the packet fixtures and `e2e_netns`
//! on Debian's own kernels (6.1 from bookworm, 6.12 from trixie), booted
//! under qemu from an initramfs that holds busybox, the host's `ip`,
//! `ethtool`, `sysctl` and `ping` with their shared libraries, the test
//! binaries, lb-agent and veth.ko. Everything fetched is cached in
//! target/vm; each run writes target/vm/<kernel>.cpio and the serial
//! console to target/vm/<kernel>.log.

mod cpio;
mod debian;

pub use debian::mirror as debian_mirror;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufWriter, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::setup;
use crate::util::{self, capture, secs, show, Step, GREEN};

/// The kernels `cargo xtask test` boots when none is named: Debian 12's.
pub const DEFAULT_KERNELS: [&str; 1] = ["6.1"];

/// The root test binaries that run in the VM: they need only a kernel,
/// `ip`, `ethtool`, `sysctl`, `ping` and lb-agent (no Docker, no
/// Prometheus, no other tools).
pub const TESTS: [&str; 3] = ["fixtures", "fixtures_ipv6", "e2e_netns"];

/// Host programs the tests call, copied with their shared libraries.
const HOST_TOOLS: [&str; 4] = ["ip", "ethtool", "sysctl", "ping"];

/// A whole run took 3.5 to 6 minutes under software emulation on 2 shared
/// cores while each fixture loaded the program (the verifier is slow
/// there), about 2.5 since each test thread loads it once (fixtures_ipv6
/// adds about 15 s): room for a slower machine, not for a hung VM.
const TIMEOUT: Duration = Duration::from_secs(900);

/// Lines of the init script's own, in the serial log.
const MARK: &str = "LB-VM";

/// What goes into every initramfs, built once per run.
pub struct Payload {
    tests: Vec<(String, PathBuf)>,
    agent: PathBuf,
}

/// How one kernel did.
pub struct Report {
    pub passed: bool,
    pub summary: String,
}

/// Builds the test binaries and lb-agent (release, as the root stage).
pub fn build_payload() -> Result<Payload> {
    util::stream_ok(&mut util::release_bins())?;
    let mut tests = util::cargo();
    tests.args(["test", "--release", "-p", "lb-tests", "--no-run", "--message-format=json-render-diagnostics"]);
    for t in TESTS {
        tests.args(["--test", t]);
    }
    println!("  $ {}", show(&tests));
    let out = tests.stderr(Stdio::inherit()).output().with_context(|| format!("run `{}`", show(&tests)))?;
    ensure!(out.status.success(), "`{}` {}", show(&tests), util::describe(out.status));
    let tests = test_executables(&String::from_utf8_lossy(&out.stdout))?;
    Ok(Payload { tests, agent: util::built_binary("lb-agent", "lb-agent")? })
}

/// (name, executable) of each of [`TESTS`] from cargo's JSON messages.
fn test_executables(messages: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    for line in messages.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let name = msg["target"]["name"].as_str().unwrap_or_default();
        if let Some(exe) = msg["executable"].as_str() {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    // In the order of TESTS, not the order cargo finished them in.
    TESTS
        .iter()
        .map(|t| {
            let (_, exe) = found.iter().find(|(n, _)| n == t).with_context(|| format!("cargo built no test `{t}`"))?;
            Ok(((*t).to_owned(), exe.clone()))
        })
        .collect()
}

/// Fetches qemu, the kernel `version` and busybox if missing, builds the
/// initramfs and boots it; the report says per test binary how it went.
pub fn run(version: &str, payload: &Payload, filter: Option<&str>) -> Result<Report> {
    check_version(version)?;
    setup::ensure_apt_packages_for("the VM stage", &["qemu-system-x86"])?;
    let dir = vm_dir();
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let mut apt = debian::Apt::new(&dir)?;
    let kernel = apt.kernel(version)?;
    let busybox = apt.busybox()?;

    let step = Step::new("vm", format!("initramfs for {}", kernel.package));
    let initramfs = dir.join(format!("{version}.cpio"));
    let modules: Vec<String> = kernel.modules.iter().map(|m| file_name(m)).collect::<Result<_>>()?;
    let names: Vec<&str> = payload.tests.iter().map(|(n, _)| n.as_str()).collect();
    let init = init_script(&modules, &names, filter);
    write_initramfs(&initramfs, &busybox, &kernel, payload, &init)?;
    let size = fs::metadata(&initramfs).map(|m| m.len()).unwrap_or(0);
    step.finish(GREEN, &format!("{} ({} MB)", initramfs.display(), size >> 20));

    let log = dir.join(format!("{version}.log"));
    let kvm = kvm_usable();
    let step = Step::new("vm", format!("boot {} under qemu ({})", kernel.package, if kvm { "KVM" } else { "TCG" }));
    step.say("running");
    let text = boot(&kernel.vmlinuz, &initramfs, &log, kvm)?;
    let took = step.elapsed();
    let results = parse_results(&text, &names);
    let failed: Vec<String> = results.iter().filter(|r| r.status != Some(0)).map(TestResult::describe).collect();
    let guest = text.lines().find_map(|l| l.strip_prefix(&format!("{MARK} kernel "))).unwrap_or("?").trim();
    let passed = failed.is_empty() && !results.is_empty();
    let summary = if passed {
        format!("passed: {} on {guest} (VM {})", names.join(", "), secs(took))
    } else {
        format!("FAILED: {} on {guest} (VM {}); log {}", failed.join(", "), secs(took), log.display())
    };
    step.finish(if passed { GREEN } else { util::RED }, &summary);
    Ok(Report { passed, summary })
}

/// A kernel version is MAJOR.MINOR, as Debian's package names start:
/// "6" would match 6.1 and 6.12 alike.
pub fn check_version(version: &str) -> Result<()> {
    let parts: Vec<&str> = version.split('.').collect();
    ensure!(
        parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit())),
        "--kernel takes MAJOR.MINOR versions such as 6.1 or 6.12, not {version:?}"
    );
    Ok(())
}

fn vm_dir() -> PathBuf {
    util::target_dir().join("vm")
}

fn file_name(path: &Path) -> Result<String> {
    Ok(path.file_name().with_context(|| format!("no file name in {}", path.display()))?.to_string_lossy().into_owned())
}

/// The VM's /init: mounts what the tests use, loads the modules, runs each
/// test binary and prints `LB-VM-RESULT <name> <status>` after it, then
/// `LB-VM-DONE`, and powers off.
fn init_script(modules: &[String], tests: &[&str], filter: Option<&str>) -> String {
    let filter = filter.map(|f| format!(" '{}'", f.replace('\'', "'\\''"))).unwrap_or_default();
    let mut s = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LB_AGENT_BIN=/lb/lb-agent RUST_BACKTRACE=1\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mount -t tmpfs tmpfs /tmp\n\
         mount -t tmpfs tmpfs /run\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         ip link set lo up\n",
    );
    s.push_str(&format!("echo \"{MARK} kernel $(uname -r)\"\n"));
    for m in modules {
        s.push_str(&format!("insmod /lib/modules/{m} || echo \"{MARK} insmod {m} failed\"\n"));
    }
    s.push_str("cd /tmp\n");
    for t in tests {
        // The packet fixtures each run in a namespace of their own and share
        // nothing (one loaded object per thread, reset between them): two
        // at a time halve their part. The others build topologies with
        // fixed names.
        let threads = if t.starts_with("fixtures") { 2 } else { 1 };
        s.push_str(&format!("/lb/{t} --test-threads={threads}{filter}\necho \"{MARK}-RESULT {t} $?\"\n"));
    }
    s.push_str(&format!("echo {MARK}-DONE\npoweroff -f\n"));
    s
}

/// The initramfs: busybox, the host tools and every shared library of
/// them and of the test binaries and lb-agent, the modules, and /init.
fn write_initramfs(path: &Path, busybox: &Path, kernel: &debian::Kernel, payload: &Payload, init: &str) -> Result<()> {
    let file = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut archive = Archive { cpio: cpio::Writer::new(BufWriter::new(file)), dirs: BTreeSet::new() };
    for d in ["/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/etc"] {
        archive.dir(d)?;
    }
    archive.symlink("/var/run", "/run")?;
    archive.cpio.char_device("/dev/console", 5, 1)?;
    archive.cpio.char_device("/dev/null", 1, 3)?;
    archive.copy("/bin/busybox", busybox)?;
    let mut dynamic = Vec::new();
    for tool in HOST_TOOLS {
        let host = setup::find_in_path(tool)
            .with_context(|| format!("{tool} not found on PATH: `cargo xtask setup` installs it"))?;
        archive.copy(&format!("/usr/bin/{tool}"), &host)?;
        dynamic.push(host);
    }
    for (name, exe) in &payload.tests {
        archive.copy(&format!("/lb/{name}"), exe)?;
        dynamic.push(exe.clone());
    }
    archive.copy("/lb/lb-agent", &payload.agent)?;
    dynamic.push(payload.agent.clone());
    let mut libs = BTreeSet::new();
    for bin in &dynamic {
        libs.extend(shared_libraries(bin)?);
    }
    for lib in &libs {
        archive.copy(lib, Path::new(lib))?;
    }
    for m in &kernel.modules {
        archive.copy(&format!("/lib/modules/{}", file_name(m)?), m)?;
    }
    archive.cpio.file("/init", init.as_bytes(), true)?;
    archive
        .cpio
        .finish()?
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// A cpio writer that adds each file's parent directories first.
struct Archive {
    cpio: cpio::Writer<BufWriter<fs::File>>,
    dirs: BTreeSet<String>,
}

impl Archive {
    fn dir(&mut self, path: &str) -> Result<()> {
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            at.push('/');
            at.push_str(part);
            if self.dirs.insert(at.clone()) {
                self.cpio.dir(&at).with_context(|| format!("archive {at}"))?;
            }
        }
        Ok(())
    }

    fn parent(&mut self, path: &str) -> Result<()> {
        self.dir(path.rsplit_once('/').map_or("", |(parent, _)| parent))
    }

    fn copy(&mut self, path: &str, from: &Path) -> Result<()> {
        self.parent(path)?;
        let data = fs::read(from).with_context(|| format!("read {}", from.display()))?;
        self.cpio.file(path, &data, true).with_context(|| format!("archive {path}"))
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.parent(path)?;
        self.cpio.symlink(path, target).with_context(|| format!("archive {path}"))
    }
}

/// The shared libraries `bin` loads, the dynamic loader included, as ldd
/// resolves them on this host.
fn shared_libraries(bin: &Path) -> Result<Vec<String>> {
    let out = capture(Command::new("ldd").arg(bin))?.context("ldd not found")?;
    // ldd fails for static binaries, which need nothing.
    Ok(if out.status.success() { ldd_paths(&String::from_utf8_lossy(&out.stdout)) } else { Vec::new() })
}

/// "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and
/// "/lib64/ld-linux-x86-64.so.2 (0x...)" give their paths; the vDSO
/// ("linux-vdso.so.1 (0x...)") has none.
fn ldd_paths(ldd: &str) -> Vec<String> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = line.split_once("=>").map_or(line, |(_, to)| to.trim());
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect()
}

/// KVM when /dev/kvm opens and the CPU offers virtualisation; else qemu's
/// software emulation (TCG), several times slower.
pub fn kvm_usable() -> bool {
    let flags = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virt = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    virt && fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// Boots the VM with its serial console in `log`, prints the test lines as
/// they come, and returns the whole log; kills qemu after [`TIMEOUT`].
fn boot(vmlinuz: &Path, initramfs: &Path, log: &Path, kvm: bool) -> Result<String> {
    let _ = fs::remove_file(log);
    let mut qemu = Command::new("qemu-system-x86_64");
    // Two vCPUs: TCG runs each in a host thread of its own (beside the
    // root tests in `cargo xtask test`), and the fixtures run two at a time.
    let (accel, smp) = if kvm { ("kvm", "2") } else { ("tcg", "2") };
    qemu.args(["-accel", accel, "-cpu", "max", "-smp", smp, "-m", "1024", "-no-reboot", "-nodefaults"])
        .args(["-display", "none", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
        .stdin(Stdio::null());
    println!("  $ {}", show(&qemu));
    let mut child = qemu.spawn().context("start qemu-system-x86_64")?;
    let start = Instant::now();
    let mut seen = 0;
    let mut text = String::new();
    let status = loop {
        let status = child.try_wait().context("wait for qemu")?;
        seen = print_new_lines(log, seen, &mut text);
        if let Some(status) = status {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            // Our own child, by its handle.
            child.kill().context("kill qemu")?;
            child.wait().context("wait for qemu")?;
            print_new_lines(log, seen, &mut text);
            bail!("the VM ran over {}; log {}", secs(TIMEOUT), log.display());
        }
        thread::sleep(Duration::from_millis(500));
    };
    if !status.success() {
        bail!("qemu {}; log {}", util::describe(status), log.display());
    }
    Ok(text)
}

/// Appends what `log` gained since byte `seen` to `text`, prints its test
/// lines, and returns the new end.
fn print_new_lines(log: &Path, seen: u64, text: &mut String) -> u64 {
    let Ok(mut file) = fs::File::open(log) else { return seen };
    let mut new = Vec::new();
    if file.seek(SeekFrom::Start(seen)).is_err() || file.read_to_end(&mut new).is_err() {
        return seen;
    }
    // Only whole lines: the rest waits for the next call.
    let whole = new.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let chunk = String::from_utf8_lossy(&new[..whole]).replace('\r', "");
    for line in chunk.lines() {
        if line.starts_with(MARK)
            || line.starts_with("test ")
            || line.starts_with("running ")
            || line.contains("panicked")
        {
            println!("  vm| {line}");
        }
    }
    text.push_str(&chunk);
    seen + whole as u64
}

struct TestResult {
    name: String,
    /// The exit status; None when the binary never finished.
    status: Option<i32>,
}

impl TestResult {
    fn describe(&self) -> String {
        match self.status {
            Some(code) => format!("{} (exit {code})", self.name),
            None => format!("{} (did not finish)", self.name),
        }
    }
}

fn parse_results(log: &str, tests: &[&str]) -> Vec<TestResult> {
    tests
        .iter()
        .map(|t| {
            let prefix = format!("{MARK}-RESULT {t} ");
            let status = log.lines().find_map(|l| l.trim().strip_prefix(&prefix)?.trim().parse().ok());
            TestResult { name: (*t).to_owned(), status }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{check_version, init_script, ldd_paths, parse_results, test_executables};

    #[test]
    fn kernel_versions_are_major_dot_minor() {
        assert!(check_version("6.1").is_ok());
        assert!(check_version("6.12").is_ok());
        for bad in ["6", "x", "6.1.0", "6.", ".1", "6.1-rt", ""] {
            assert!(check_version(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn test_executables_in_stage_order_from_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"e2e_netns"},"executable":"/t/e2e_netns-1"}
{"reason":"compiler-artifact","target":{"name":"lb_lab"},"executable":null}
{"reason":"compiler-artifact","target":{"name":"fixtures_ipv6"},"executable":"/t/fixtures_ipv6-3"}
{"reason":"compiler-artifact","target":{"name":"fixtures"},"executable":"/t/fixtures-2"}
{"reason":"build-finished","success":true}"#;
        let found = test_executables(messages).unwrap();
        assert_eq!(
            found,
            [
                ("fixtures".to_owned(), PathBuf::from("/t/fixtures-2")),
                ("fixtures_ipv6".to_owned(), PathBuf::from("/t/fixtures_ipv6-3")),
                ("e2e_netns".to_owned(), PathBuf::from("/t/e2e_netns-1"))
            ]
        );
        assert!(test_executables("").is_err());
    }

    #[test]
    fn ldd_output_gives_library_paths() {
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(ldd),
            ["/lib/x86_64-linux-gnu/libgcc_s.so.1", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
        );
    }

    #[test]
    fn results_per_test_binary_from_the_serial_log() {
        let log = "[    1.0] veth: loaded\r\nLB-VM-RESULT fixtures 0\r\ntest root_x ... FAILED\r\nLB-VM-RESULT e2e_netns 101\r\n";
        let r = parse_results(log, &["fixtures", "e2e_netns", "other"]);
        assert_eq!(r.iter().map(|r| r.status).collect::<Vec<_>>(), [Some(0), Some(101), None]);
        assert_eq!(r[1].describe(), "e2e_netns (exit 101)");
        assert_eq!(r[2].describe(), "other (did not finish)");
    }

    #[test]
    fn init_runs_each_test_with_its_marker_and_a_quoted_filter() {
        let s = init_script(&["veth.ko".to_owned()], &["fixtures", "e2e_netns"], Some("it's"));
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        assert!(s.contains("insmod /lib/modules/veth.ko"));
        assert!(s.contains("/lb/fixtures --test-threads=2 'it'\\''s'\necho \"LB-VM-RESULT fixtures $?\""));
        assert!(s.contains("/lb/e2e_netns --test-threads=1 'it'\\''s'\n"));
        assert!(s.contains("echo \"LB-VM-RESULT e2e_netns $?\""));
        assert!(s.ends_with("echo LB-VM-DONE\npoweroff -f\n"));
    }
}
