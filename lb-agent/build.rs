//! Builds the eBPF object (lb-ebpf) for bpfel-unknown-none and leaves it in
//! OUT_DIR for `include_bytes!`. This is the only place the object is built.
//!
//! It runs the pinned toolchain with RUSTC_BOOTSTRAP=1 for `-Z build-std=core`
//! (no nightly needed) and needs `bpf-linker`; `cargo xtask setup` installs it.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest_dir.join("../lb-ebpf");
    let common_dir = manifest_dir.join("../lb-common/src");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    for path in [ebpf_dir.join("src"), ebpf_dir.join("Cargo.toml"), ebpf_dir.join("Cargo.lock"), common_dir] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let target_dir = out_dir.join("ebpf-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf_dir)
        .args(["build", "--release", "--locked", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC_BOOTSTRAP", "1");
    // The outer build's settings are for the host, not for bpfel.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run cargo for lb-ebpf: {e}"));
    if !status.success() {
        panic!(
            "building lb-ebpf failed ({status}). It needs bpf-linker 0.13 and rust-src for the pinned \
             toolchain: run `cargo xtask setup`, which installs both."
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/lb-ebpf");
    std::fs::copy(&obj, out_dir.join("lb-ebpf.o")).unwrap_or_else(|e| panic!("copy {}: {e}", obj.display()));
}
