//! Per-CPU scratch space for the program's large temporaries, as Katran and
//! Cilium keep theirs: BPF allows 512 bytes of stack for a program and the
//! functions it calls together, and DNAT, full NAT and DSR inlined into one
//! entry point need more than that when each temporary sits on the stack
//! (the verifier counted 656 bytes with DSR's and full NAT's paths as
//! subprograms). Each field belongs to one helper, which overwrites it
//! before reading it: nothing in it is trusted across packets or between
//! helpers. A program runs to its end on its CPU (XDP and tc run with
//! migration off, and never nest into each other), so no other packet
//! writes this CPU's slot meanwhile.

use aya_ebpf::bindings::bpf_fib_lookup as FibParams;
use lb_common::PathCounters;

#[repr(C)]
pub struct Scratch {
    /// `route::fib_lookup_of`'s parameters and answer.
    pub fib: FibParams,
    /// `route::count_path`'s first counters for a new interface.
    pub first_path: PathCounters,
}

/// This CPU's `field` of the scratch slot, e.g. `scratch_field!(fib)`.
/// `None` never happens for index 0 of a per-CPU array; the verifier still
/// wants the check.
macro_rules! scratch_field {
    ($field:ident) => {
        // SAFETY: see `scratch`: one packet at a time per CPU, and only this
        // field is borrowed, by its one user, for as long as it runs.
        $crate::SCRATCH.get_ptr_mut(0).map(|s| unsafe { &mut (*s).$field })
    };
}
pub(crate) use scratch_field;
