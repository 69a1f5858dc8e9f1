//! Builds the eBPF object (lb-ebpf) for bpfel-unknown-none and leaves it in
//! OUT_DIR for `include_bytes!`. This is the only place the object is built.
//!
//! With lb-agent's `bench` feature it also builds lb-ebpf with its own
//! `bench` feature, a second object that adds the benchmark's programs and
//! maps; the first one, which the agent loads, never has them.
//!
//! It runs the pinned toolchain with RUSTC_BOOTSTRAP=1 for `-Z build-std=core`
//! (no nightly needed) and needs `bpf-linker`; `cargo xtask setup` installs it.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest_dir.join("../lb-ebpf");
    let common_dir = manifest_dir.join("../lb-common/src");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    for path in [ebpf_dir.join("src"), ebpf_dir.join("Cargo.toml"), ebpf_dir.join("Cargo.lock"), common_dir] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    build_object(&ebpf_dir, &out_dir, None, "lb-ebpf.o");
    if env::var_os("CARGO_FEATURE_BENCH").is_some() {
        build_object(&ebpf_dir, &out_dir, Some("bench"), "lb-ebpf-bench.o");
    }
}

/// `cargo build` lb-ebpf with `feature` and copy the object to
/// `OUT_DIR/name`. Each feature set gets its own target directory, so
/// building one never invalidates the other.
fn build_object(ebpf_dir: &Path, out_dir: &Path, feature: Option<&str>, name: &str) {
    let target_dir = out_dir.join(feature.map_or("ebpf-target".to_owned(), |f| format!("ebpf-target-{f}")));
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(ebpf_dir)
        .args(["build", "--release", "--locked", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(feature.map(|f| ["--features", f]).into_iter().flatten())
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
            "building lb-ebpf{} failed ({status}). It needs bpf-linker 0.13 and rust-src for the pinned \
             toolchain: run `cargo xtask setup`, which installs both.",
            feature.map_or(String::new(), |f| format!(" --features {f}"))
        );
    }
    let obj = target_dir.join("bpfel-unknown-none/release/lb-ebpf");
    std::fs::copy(&obj, out_dir.join(name)).unwrap_or_else(|e| panic!("copy {}: {e}", obj.display()));
}
