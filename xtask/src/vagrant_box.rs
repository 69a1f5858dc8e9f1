//! `cargo xtask vagrant-box`: builds the Debian 12 libvirt box that
//! vagrant/Vagrantfile boots, here, since no box can be downloaded.
//!
//! debootstrap (from the Debian mirror the VM stage uses) into
//! target/vagrant-box/rootfs; the vagrant user with Vagrant's insecure key
//! (vagrant swaps it for a key of its own at the first `vagrant up`),
//! passwordless sudo, sshd, DHCP on eth0; the host's pinned Rust toolchain
//! and bpf-linker copied in for root (the toolchain's own server is out of
//! reach from here, crates.io and Debian are not). The tree goes onto one
//! MBR partition with extlinux, into a qcow2, and with metadata.json and a
//! Vagrantfile into a tar: the .box, added with `vagrant box add`.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, ensure, Context, Result};
use clap::Args;

use crate::setup;
use crate::util::{self, capture, stream_ok, Step, GREEN};
use crate::vm;

/// The name vagrant/Vagrantfile boots unless LB_VAGRANT_BOX says otherwise.
pub const BOX_NAME: &str = "lb/debian12";
const SUITE: &str = "bookworm";
/// The guest's disk: sparse, so only what is written takes room.
const DISK_GIB: u64 = 40;
/// The partition starts at 1 MiB, as partitioning tools do.
const PART_START_SECTOR: u64 = 2048;
const SECTOR: u64 = 512;

/// Host packages: vagrant and its libvirt provider, libvirt itself, and
/// what builds the box (qemu comes from setup's backports logic).
const HOST_PACKAGES: &[&str] = &[
    "vagrant",               // `vagrant up` in vagrant/
    "vagrant-libvirt",       // its libvirt provider
    "libvirt-daemon-system", // libvirtd and virtlogd, which run the VM
    "dnsmasq-base",          // DHCP and DNS on vagrant-libvirt's NAT network
    "qemu-system-x86",       // the VM itself (KVM or software emulation)
    "qemu-utils",            // qemu-img: raw disk to qcow2
    "debootstrap",           // the guest's Debian 12 tree
    "extlinux",              // the guest's boot loader
    "syslinux-common",       // its MBR boot code
    "rsync",                 // vagrant's synced folder
];

/// The guest's packages beyond debootstrap's minimal base: a kernel and
/// init, sshd and sudo for vagrant, rsync for the synced folder, DHCP, and
/// a C toolchain for cargo's build scripts and linking.
const GUEST_PACKAGES: &[&str] = &[
    "linux-image-amd64",
    "systemd-sysv",
    "udev",
    "openssh-server",
    "sudo",
    "rsync",
    "ca-certificates",
    "curl",
    "gcc",
    "libc6-dev",
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "netbase",
    "kmod",
    "procps",
];

#[derive(Args)]
pub struct Options {
    /// Debootstrap again even if target/vagrant-box/rootfs is complete
    #[arg(long)]
    rebuild: bool,
    /// The name to add the box under (vagrant/Vagrantfile reads LB_VAGRANT_BOX)
    #[arg(long, default_value = BOX_NAME)]
    name: String,
}

pub fn run(opts: &Options) -> Result<ExitCode> {
    util::require_root("vagrant-box", "it runs debootstrap, mounts a loop device and starts libvirtd")?;
    setup::ensure_apt_packages_for("vagrant-box", HOST_PACKAGES)?;
    let dir = util::target_dir().join("vagrant-box");
    let rootfs = dir.join("rootfs");
    debootstrap(&rootfs, opts.rebuild)?;
    configure(&rootfs)?;
    let bx = dir.join("box");
    fs::create_dir_all(&bx).with_context(|| format!("create {}", bx.display()))?;
    disk_image(&rootfs, &dir.join("disk.raw"), &bx.join("box.img"))?;
    fs::write(bx.join("metadata.json"), metadata_json(DISK_GIB)).context("write metadata.json")?;
    fs::write(bx.join("Vagrantfile"), BOX_VAGRANTFILE).context("write the box's Vagrantfile")?;
    let file = dir.join("lb-debian12.box");
    let step = Step::new("vagrant-box", format!("pack {}", file.display()));
    stream_ok(Command::new("tar").arg("-C").arg(&bx).arg("-cSf").arg(&file).args([
        "metadata.json",
        "Vagrantfile",
        "box.img",
    ]))?;
    step.finish(GREEN, "packed");
    let step = Step::new("vagrant-box", format!("vagrant box add {}", opts.name));
    stream_ok(Command::new("vagrant").args(["box", "add", "--force", "--name", &opts.name]).arg(&file))?;
    step.finish(GREEN, "added");
    ensure_libvirtd()?;
    let driver = if vm::kvm_usable() { "kvm" } else { "qemu (software emulation: KVM is not usable here)" };
    println!("[vagrant-box] ready: `cd vagrant && vagrant up` boots {} under {driver}", opts.name);
    Ok(ExitCode::SUCCESS)
}

/// debootstrap into `rootfs`, unless a previous run completed it.
fn debootstrap(rootfs: &Path, rebuild: bool) -> Result<()> {
    let done = rootfs.with_extension("done");
    if done.is_file() && !rebuild {
        println!("[vagrant-box] {} is complete (--rebuild starts over)", rootfs.display());
        return Ok(());
    }
    let step = Step::new("vagrant-box", format!("debootstrap {SUITE} into {}", rootfs.display()));
    step.say("running (a few minutes)");
    remove_if_present(&done)?;
    if rootfs.exists() {
        fs::remove_dir_all(rootfs).with_context(|| format!("remove {}", rootfs.display()))?;
    }
    stream_ok(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={}", GUEST_PACKAGES.join(","))])
            .arg(SUITE)
            .arg(rootfs)
            .arg(vm::debian_mirror()),
    )?;
    fs::write(&done, "").with_context(|| format!("write {}", done.display()))?;
    step.finish(GREEN, "done");
    Ok(())
}

/// The guest's configuration, written again on every run.
fn configure(rootfs: &Path) -> Result<()> {
    let step = Step::new("vagrant-box", "configure the guest");
    let write = |path: &str, text: &str| -> Result<()> {
        let file = rootfs.join(path.trim_start_matches('/'));
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        }
        fs::write(&file, text).with_context(|| format!("write {}", file.display()))
    };
    write("/etc/hostname", "lb-test\n")?;
    write("/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\tlb-test\n::1\tlocalhost ip6-localhost ip6-loopback\n")?;
    write("/etc/network/interfaces", NETWORK_INTERFACES)?;
    write("/etc/sudoers.d/vagrant", "vagrant ALL=(ALL) NOPASSWD: ALL\n")?;
    fs::set_permissions(rootfs.join("etc/sudoers.d/vagrant"), fs::Permissions::from_mode(0o440))
        .context("chmod the sudoers file")?;
    // A reverse DNS lookup per login is seconds under emulation.
    write("/etc/ssh/sshd_config.d/vagrant.conf", "UseDNS no\n")?;
    if !chroot_ok(rootfs, &["id", "vagrant"])? {
        chroot(rootfs, &["useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo", "vagrant"])?;
    }
    write("/home/vagrant/.ssh/authorized_keys", &fs::read_to_string(insecure_key()?).context("read vagrant.pub")?)?;
    chroot(rootfs, &["chown", "-R", "vagrant:vagrant", "/home/vagrant/.ssh"])?;
    chroot(rootfs, &["chmod", "700", "/home/vagrant/.ssh"])?;
    copy_local_cas(rootfs)?;
    copy_toolchain(rootfs)?;
    step.finish(GREEN, "done");
    Ok(())
}

const NETWORK_INTERFACES: &str = "\
# Written by `cargo xtask vagrant-box`: DHCP on the first NIC (net.ifnames=0
# on the kernel line keeps it eth0), which is vagrant-libvirt's NAT network.
auto lo
iface lo inet loopback

allow-hotplug eth0
iface eth0 inet dhcp
";

/// The box's own Vagrantfile: vagrant-libvirt's defaults for this disk.
const BOX_VAGRANTFILE: &str = "\
Vagrant.configure(\"2\") do |config|
  config.vm.provider :libvirt do |lv|
    lv.disk_bus = \"virtio\"
  end
end
";

/// The host's own CA certificates (Debian keeps them in
/// /usr/local/share/ca-certificates): behind a TLS-inspecting proxy the
/// guest reaches crates.io only when it trusts what the host trusts.
fn copy_local_cas(rootfs: &Path) -> Result<()> {
    let local = Path::new("/usr/local/share/ca-certificates");
    let into = rootfs.join("usr/local/share/ca-certificates");
    let Ok(entries) = fs::read_dir(local) else { return Ok(()) };
    fs::create_dir_all(&into).with_context(|| format!("create {}", into.display()))?;
    for entry in entries {
        let path = entry.with_context(|| format!("list {}", local.display()))?.path();
        if path.extension().is_some_and(|e| e == "crt") && path.is_file() {
            let name = path.file_name().context("a file without a name")?;
            fs::copy(&path, into.join(name)).with_context(|| format!("copy {}", path.display()))?;
        }
    }
    chroot(rootfs, &["update-ca-certificates"])
}

/// Vagrant's public insecure key, as Debian's vagrant package ships it.
fn insecure_key() -> Result<PathBuf> {
    let gems = Path::new("/usr/share/rubygems-integration/all/gems");
    let entries = fs::read_dir(gems).with_context(|| format!("list {} (is vagrant installed?)", gems.display()))?;
    for entry in entries {
        let key = entry.with_context(|| format!("list {}", gems.display()))?.path().join("keys/vagrant.pub");
        if key.is_file() && key.to_string_lossy().contains("/vagrant-") {
            return Ok(key);
        }
    }
    bail!("no vagrant-*/keys/vagrant.pub under {}", gems.display())
}

/// The host's rustup, the toolchain pinned in rust-toolchain.toml (without
/// its documentation) and bpf-linker, for root in the guest.
fn copy_toolchain(rootfs: &Path) -> Result<()> {
    let channel = util::toolchain_channel()?;
    let home = PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?);
    let rustup = std::env::var_os("RUSTUP_HOME").map_or_else(|| home.join(".rustup"), PathBuf::from);
    let cargo = std::env::var_os("CARGO_HOME").map_or_else(|| home.join(".cargo"), PathBuf::from);
    let name = format!("{channel}-x86_64-unknown-linux-gnu");
    // 1.95.0 may be a link to stable's directory: copy what it points at.
    let toolchain = rustup.join("toolchains").join(&name);
    ensure!(toolchain.is_dir(), "{} is missing: install the pinned toolchain first", toolchain.display());
    let guest = rootfs.join("root");
    let into = guest.join(".rustup/toolchains").join(&name);
    fs::create_dir_all(&into).with_context(|| format!("create {}", into.display()))?;
    stream_ok(
        Command::new("rsync")
            .args(["-aL", "--delete", "--exclude=share/doc/", "--exclude=share/man/"])
            .arg(format!("{}/", toolchain.display()))
            .arg(&into),
    )?;
    fs::write(
        guest.join(".rustup/settings.toml"),
        format!(
            "version = \"12\"\ndefault_toolchain = \"{name}\"\nprofile = \"minimal\"\nauto_self_update = \"disable\"\n"
        ),
    )
    .context("write the guest's rustup settings")?;
    let bin = guest.join(".cargo/bin");
    fs::create_dir_all(&bin).with_context(|| format!("create {}", bin.display()))?;
    // rustup's proxies (cargo, rustc, ...) are rustup itself under other
    // names; bpf-linker finds the toolchain's libLLVM by rpath (/root/...).
    for tool in ["rustup", "cargo", "rustc", "rustdoc", "rustfmt", "cargo-clippy", "clippy-driver", "bpf-linker"] {
        let from = cargo.join("bin").join(tool);
        if from.is_file() {
            fs::copy(&from, bin.join(tool)).with_context(|| format!("copy {}", from.display()))?;
        }
    }
    write_profile(&guest)
}

fn write_profile(guest: &Path) -> Result<()> {
    let profile = guest.join(".profile");
    let text = fs::read_to_string(&profile).unwrap_or_default();
    let line = "export PATH=\"$HOME/.cargo/bin:$PATH\"\n";
    if !text.contains(line) {
        fs::write(&profile, format!("{text}{line}")).with_context(|| format!("write {}", profile.display()))?;
    }
    Ok(())
}

fn chroot(rootfs: &Path, args: &[&str]) -> Result<()> {
    stream_ok(Command::new("chroot").arg(rootfs).args(args))
}

fn chroot_ok(rootfs: &Path, args: &[&str]) -> Result<bool> {
    let out = capture(Command::new("chroot").arg(rootfs).args(args))?.context("chroot not found")?;
    Ok(out.status.success())
}

/// `rootfs` onto a partitioned raw disk with extlinux, converted to qcow2.
fn disk_image(rootfs: &Path, raw: &Path, qcow2: &Path) -> Result<()> {
    let step = Step::new("vagrant-box", format!("disk image {}", qcow2.display()));
    step.say("writing");
    let total = DISK_GIB << 30;
    remove_if_present(raw)?;
    let mut file = fs::File::create(raw).with_context(|| format!("create {}", raw.display()))?;
    file.set_len(total).with_context(|| format!("size {}", raw.display()))?;
    let boot_code = fs::read("/usr/lib/syslinux/mbr/mbr.bin").context("read syslinux's mbr.bin")?;
    let table = mbr(&boot_code, total / SECTOR)?;
    file.seek(SeekFrom::Start(0)).and_then(|_| file.write_all(&table)).context("write the MBR")?;
    drop(file);

    let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid").context("read a random UUID")?.trim().to_owned();
    let offset = PART_START_SECTOR * SECTOR;
    // syslinux 6.04 cannot read ext4's 64bit layout.
    stream_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^64bit", "-L", "root", "-U", &uuid, "-E", &format!("offset={offset}")])
            .arg(raw)
            .arg(format!("{}k", (total - offset) / 1024)),
    )?;
    let mnt = raw.with_extension("mnt");
    fs::create_dir_all(&mnt).with_context(|| format!("create {}", mnt.display()))?;
    {
        let mount = Mount::new(raw, offset, &mnt)?;
        stream_ok(Command::new("cp").arg("-a").arg(format!("{}/.", rootfs.display())).arg(&mount.at))?;
        let (kernel, initrd) = kernel_files(&mount.at.join("boot"))?;
        fs::write(mount.at.join("etc/fstab"), format!("UUID={uuid} / ext4 errors=remount-ro 0 1\n"))
            .context("write the guest's fstab")?;
        let syslinux = mount.at.join("boot/syslinux");
        fs::create_dir_all(&syslinux).with_context(|| format!("create {}", syslinux.display()))?;
        fs::write(syslinux.join("syslinux.cfg"), syslinux_cfg(&kernel, &initrd, &uuid))
            .context("write syslinux.cfg")?;
        stream_ok(Command::new("extlinux").arg("--install").arg(&syslinux))?;
    }
    remove_if_present(qcow2)?;
    stream_ok(Command::new("qemu-img").args(["convert", "-O", "qcow2"]).arg(raw).arg(qcow2))?;
    fs::remove_file(raw).with_context(|| format!("remove {}", raw.display()))?;
    let size = fs::metadata(qcow2).map(|m| m.len()).unwrap_or(0);
    step.finish(GREEN, &format!("{} MB", size >> 20));
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// A loop mount, unmounted when dropped.
struct Mount {
    at: PathBuf,
}

impl Mount {
    fn new(image: &Path, offset: u64, at: &Path) -> Result<Self> {
        stream_ok(Command::new("mount").arg("-o").arg(format!("loop,offset={offset}")).arg(image).arg(at))?;
        Ok(Mount { at: at.to_owned() })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        match Command::new("umount").arg(&self.at).status() {
            Ok(s) if s.success() => {}
            other => println!("[vagrant-box] warning: umount {}: {other:?}", self.at.display()),
        }
    }
}

/// The newest vmlinuz-* in `boot` and its initrd.img-*, as /boot paths.
fn kernel_files(boot: &Path) -> Result<(String, String)> {
    let mut kernels: Vec<String> = fs::read_dir(boot)
        .with_context(|| format!("list {}", boot.display()))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("vmlinuz-").map(str::to_owned))
        .collect();
    kernels.sort();
    let version = kernels.pop().with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let initrd = format!("initrd.img-{version}");
    ensure!(boot.join(&initrd).is_file(), "{} has vmlinuz-{version} but no {initrd}", boot.display());
    Ok((format!("/boot/vmlinuz-{version}"), format!("/boot/{initrd}")))
}

/// extlinux's configuration: the serial console (vagrant-libvirt gives the
/// domain one) and eth0 as the NIC's name.
fn syslinux_cfg(kernel: &str, initrd: &str, uuid: &str) -> String {
    format!(
        "DEFAULT debian\nTIMEOUT 0\nLABEL debian\n  LINUX {kernel}\n  INITRD {initrd}\n  \
         APPEND root=UUID={uuid} ro console=tty0 console=ttyS0,115200 net.ifnames=0 biosdevname=0\n"
    )
}

/// vagrant-libvirt's box metadata.
fn metadata_json(disk_gib: u64) -> String {
    format!("{{\"provider\": \"libvirt\", \"format\": \"qcow2\", \"virtual_size\": {disk_gib}}}\n")
}

/// A master boot record: `boot_code` (syslinux's mbr.bin, at most 440
/// bytes), then one active Linux partition from [`PART_START_SECTOR`] to
/// the end of a disk of `sectors` sectors, and the 0x55AA signature.
fn mbr(boot_code: &[u8], sectors: u64) -> Result<[u8; 512]> {
    ensure!(boot_code.len() <= 440, "MBR boot code of {} bytes does not fit in 440", boot_code.len());
    ensure!(sectors > PART_START_SECTOR, "a disk of {sectors} sectors has no room for a partition");
    let size = u32::try_from(sectors - PART_START_SECTOR).context("disk too large for an MBR")?;
    let mut m = [0u8; 512];
    m[..boot_code.len()].copy_from_slice(boot_code);
    let entry = &mut m[446..462];
    // Active: the MBR code boots it.
    entry[0] = 0x80;
    // CHS fields: "use LBA" (the maximum), as tools write for large disks.
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[4] = 0x83; // Linux
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&(PART_START_SECTOR as u32).to_le_bytes());
    entry[12..16].copy_from_slice(&size.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xaa;
    Ok(m)
}

/// libvirtd (and virtlogd, which it logs the domain's console through)
/// running: systemd starts them where it runs; elsewhere (a container)
/// they are started here as daemons.
fn ensure_libvirtd() -> Result<()> {
    let step = Step::new("vagrant-box", "libvirtd");
    let alive = |cmd: &mut Command| capture(cmd).ok().flatten().is_some_and(|o| o.status.success());
    if alive(Command::new("virsh").args(["-c", "qemu:///system", "version"])) {
        step.finish(GREEN, "running");
        return Ok(());
    }
    if Path::new("/run/systemd/system").exists() {
        stream_ok(Command::new("systemctl").args(["start", "virtlogd.socket", "libvirtd.service"]))?;
    } else {
        for daemon in ["virtlogd", "libvirtd"] {
            let status = Command::new(daemon).arg("-d").stdin(Stdio::null()).status();
            ensure!(status.as_ref().is_ok_and(|s| s.success()), "start `{daemon} -d`: {status:?}");
        }
    }
    for _ in 0..50 {
        if alive(Command::new("virsh").args(["-c", "qemu:///system", "version"])) {
            step.finish(GREEN, "started");
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    bail!("libvirtd did not answer `virsh -c qemu:///system version` after it was started")
}

#[cfg(test)]
mod tests {
    use super::{mbr, metadata_json, syslinux_cfg, BOX_NAME, PART_START_SECTOR};
    use crate::util::workspace_root;

    fn read(path: &str) -> String {
        std::fs::read_to_string(workspace_root().join(path)).unwrap()
    }

    #[test]
    fn the_vagrantfile_boots_the_box_this_builds_and_provisions_every_step() {
        let vagrantfile = read("vagrant/Vagrantfile");
        assert!(
            vagrantfile.contains(&format!("ENV.fetch(\"LB_VAGRANT_BOX\", \"{BOX_NAME}\")")),
            "vagrant/Vagrantfile's default box is not {BOX_NAME}, the one `cargo xtask vagrant-box` adds"
        );
        // Where KVM does not work, software emulation, chosen by itself.
        assert!(vagrantfile.contains("virt && kvm ? \"kvm\" : \"qemu\""));
        assert!(vagrantfile.contains("lv.cpus = 2"));
        // The host's build output stays out of the guest.
        assert!(vagrantfile.contains("rsync__exclude: [\"target/\""));
        let provision = read("vagrant/provision.sh");
        for step in
            ["step build cargo xtask build", "step demo cargo xtask run -- --quick", "step test cargo xtask test"]
        {
            assert!(provision.contains(step), "provision.sh lacks `{step}`");
        }
    }

    #[test]
    fn mbr_has_one_active_linux_partition_to_the_end_of_the_disk() {
        let m = mbr(&[0xfa; 440], 40 << 21).unwrap();
        assert_eq!(&m[..440], &[0xfa; 440][..]);
        assert_eq!(m[446], 0x80);
        assert_eq!(m[450], 0x83);
        let start = u32::from_le_bytes(m[454..458].try_into().unwrap());
        let size = u32::from_le_bytes(m[458..462].try_into().unwrap());
        assert_eq!(u64::from(start), PART_START_SECTOR);
        assert_eq!(u64::from(start) + u64::from(size), 40 << 21);
        // The other three entries are empty; the signature closes it.
        assert!(m[462..510].iter().all(|&b| b == 0));
        assert_eq!(&m[510..], &[0x55, 0xaa]);
        assert!(mbr(&[0; 441], 1 << 20).is_err());
        assert!(mbr(&[0; 440], PART_START_SECTOR).is_err());
        assert!(mbr(&[0; 440], 1 << 33).is_err(), "over 2 TiB does not fit an MBR entry");
    }

    #[test]
    fn boot_entry_names_the_root_by_uuid_with_a_serial_console() {
        let cfg = syslinux_cfg("/boot/vmlinuz-6.1.0-41-amd64", "/boot/initrd.img-6.1.0-41-amd64", "abc");
        assert_eq!(
            cfg,
            "DEFAULT debian\nTIMEOUT 0\nLABEL debian\n  LINUX /boot/vmlinuz-6.1.0-41-amd64\n  \
             INITRD /boot/initrd.img-6.1.0-41-amd64\n  APPEND root=UUID=abc ro console=tty0 \
             console=ttyS0,115200 net.ifnames=0 biosdevname=0\n"
        );
    }

    #[test]
    fn metadata_is_vagrant_libvirts_json() {
        let v: serde_json::Value = serde_json::from_str(&metadata_json(40)).unwrap();
        assert_eq!(v["provider"], "libvirt");
        assert_eq!(v["format"], "qcow2");
        assert_eq!(v["virtual_size"], 40);
    }
}
