//! The eBPF objects, built by `build.rs` and embedded in the binary.

/// `include_bytes!` with 8-byte alignment, which the ELF parser wants.
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

macro_rules! include_object {
    ($name:literal) => {
        &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/", $name)))
    };
}

static OBJECT: &Aligned<[u8]> = include_object!("lb-ebpf.o");
#[cfg(feature = "bench")]
static BENCH_OBJECT: &Aligned<[u8]> = include_object!("lb-ebpf-bench.o");

/// The bytes of the lb-ebpf ELF object the agent loads: the programs in
/// `lb_common::LB_PROGRAMS` and their maps, nothing else.
pub fn object() -> &'static [u8] {
    &OBJECT.0
}

/// The same programs built with lb-ebpf's `bench` feature: also the
/// benchmark's baseline (`PROG_PASS`), wrapper (`PROG_BENCH`) and its maps.
#[cfg(feature = "bench")]
pub fn bench_object() -> &'static [u8] {
    &BENCH_OBJECT.0
}
