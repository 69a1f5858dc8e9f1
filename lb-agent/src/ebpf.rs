//! The eBPF object, built by `build.rs` and embedded in the binary.

/// `include_bytes!` with 8-byte alignment, which the ELF parser wants.
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);

static OBJECT_ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/lb-ebpf.o")));

/// The bytes of the lb-ebpf ELF object.
pub fn object() -> &'static [u8] {
    &OBJECT_ALIGNED.0
}
