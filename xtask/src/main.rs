//! `cargo xtask <task>`: one subcommand per task, one module per subcommand
//! (aya's `xtask/src/main.rs` layout).

mod bench;
mod build;
mod run;
mod setup;
mod test;
mod util;
mod vagrant_box;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Set up, build, run, test and benchmark the XDP load balancer",
    long_about = "Set up, build, run, test and benchmark the XDP load balancer.\n\n\
        Every task first runs `setup`, which installs only what is missing \
        (Debian packages, rust-src, bpf-linker) and takes well under a second \
        when everything is present.",
    after_help = "Examples:\n  \
        cargo xtask run                           # as root: build and run the autoscaling demo\n  \
        cargo xtask run -- --config lb.toml       # as root: run lb-agent on a real config\n  \
        cargo xtask test                          # as root: unit tests, then root tests\n  \
        cargo xtask test --unit-only              # unit tests only, no root needed\n  \
        cargo xtask test --kernel 6.1,6.12        # packet fixtures and e2e_netns in VMs on Debian's kernels\n  \
        cargo xtask bench -- --repeat 1000000 --json   # as root: the XDP program per packet\n  \
        cargo xtask bench e2e -- --json           # as root: this LB beside direct, HAProxy, NGINX"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing (apt packages, rust-src, bpf-linker 0.13.0); skip what is present
    #[command(long_about = "Install what is missing, skip what is present, print a summary.\n\n\
        - apt packages: iproute2 ethtool iputils-ping procps prometheus docker.io iptables\n\
        \x20 wrk haproxy nginx libnginx-mod-stream (for `bench e2e`; their services are never started)\n\
        \x20 (installing needs root)\n\
        - rust-src for the toolchain pinned in rust-toolchain.toml (for -Z build-std=core)\n\
        - bpf-linker 0.13.0, built against that toolchain's own libLLVM\n\n\
        Takes well under a second when everything is present.")]
    Setup(setup::Options),
    /// Setup, then `cargo build --release` of lb-agent and the tools (lb-demo, lb-load, lb-bench, lb-backend)
    Build(build::Options),
    /// Setup and build, then run the autoscaling demo (`-- --quick`, `-- --static`), or lb-agent with `-- --config FILE` (root)
    #[command(long_about = "Setup and build, then run (as root):\n\n\
        \x20 cargo xtask run                       target/release/lb-demo\n\
        \x20 cargo xtask run -- ARGS               target/release/lb-demo ARGS\n\
        \x20 cargo xtask run -- --config lb.toml   target/release/lb-agent run --config lb.toml\n\n\
        Ctrl-C reaches the program, which cleans up; xtask waits for it and exits with its status.")]
    Run(run::Options),
    /// Setup, then unit tests, (as root) the root tests and the VM stage; non-root fails unless --unit-only
    #[command(long_about = "Setup, then three stages, each summarised with its duration:\n\n\
        \x20 1. unit tests:  cargo test --workspace --exclude lb-tests [FILTER]\n\
        \x20 2. root tests:  cargo test -p lb-tests -p lb-lab -p lb-load --release [FILTER] -- --test-threads=1\n\
        \x20                 (the files that measure CPU, e2e_scaling among them, last and alone)\n\
        \x20 3. VM stage:    the fixtures, fixtures_ipv6 and e2e_netns test binaries in a qemu VM\n\
        \x20                 on Debian 12's kernel 6.1 (skip with --no-vm, except in CI); it runs\n\
        \x20                 beside the root tests but those last, its output shown at its end\n\n\
        The root tests load BPF programs and create network namespaces. Without root they\n\
        are skipped and the command fails, unless --unit-only is given.\n\n\
        `--kernel 6.1,6.12` runs only the VM stage, on each kernel named. It installs qemu\n\
        (qemu-system-x86) if missing, downloads Debian's kernel package and busybox-static\n\
        with apt-get into target/vm (cached), builds an initramfs with busybox, ip, ethtool,\n\
        sysctl, ping, their libraries, the test binaries, lb-agent and veth.ko, boots it\n\
        (KVM if usable, else software emulation) and reports per test binary; the serial\n\
        console is in target/vm/<version>.log.")]
    Test(test::Options),
    /// Setup, build a benchmark, run it as root: `bench [xdp] [-- ARGS]` or `bench e2e [-- ARGS]`
    #[command(long_about = "Setup, build, then run a benchmark as root with the arguments after `--`:\n\n\
        \x20 cargo xtask bench [xdp] -- --repeat 1000000 --json   lb-bench: xdp_lb per packet (BPF_PROG_TEST_RUN)\n\
        \x20 cargo xtask bench e2e -- --duration 10s --json      lb-bench-e2e: direct, this LB, HAProxy and\n\
        \x20                                                     NGINX stream in namespaces, with wrk")]
    Bench(bench::Options),
    /// Build the Debian 12 libvirt box for vagrant/ locally (root), add it, and start libvirtd
    #[command(long_about = "Build the Debian 12 libvirt box that vagrant/Vagrantfile boots (as root).\n\n\
        Installs vagrant, vagrant-libvirt, libvirt-daemon-system, debootstrap and extlinux if\n\
        missing; debootstraps bookworm into target/vagrant-box/rootfs (cached; --rebuild starts\n\
        over), adds the vagrant user (Vagrant's insecure key, passwordless sudo), sshd, DHCP and\n\
        the host's pinned Rust toolchain; writes a qcow2 and packs target/vagrant-box/lb-debian12.box,\n\
        runs `vagrant box add`, and starts libvirtd if it is not running. Then:\n\n\
        \x20 cd vagrant && vagrant up")]
    VagrantBox(vagrant_box::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    util::prepare_env();
    let result = match cli.command {
        Command::Setup(opts) => setup::run(&opts),
        Command::Build(opts) => build::run(&opts),
        Command::Run(opts) => run::run(&opts),
        Command::Test(opts) => test::run(&opts),
        Command::Bench(opts) => bench::run(&opts),
        Command::VagrantBox(opts) => vagrant_box::run(&opts),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{}: {e:#}", util::paint(util::RED, "error"));
            ExitCode::FAILURE
        }
    }
}
