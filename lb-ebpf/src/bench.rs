//! What only the benchmark loads (built with the `bench` feature): the
//! empty baseline program, and the wrapper (see `lb_common::PROG_BENCH`)
//! that restores the frame (its length too), optionally makes it a new flow, and tail-calls
//! the program under test.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};
use lb_common::{BenchFrame, BENCH_FRAME_LEN, BENCH_F_NEW_FLOW};

use crate::{
    hook::Xdp,
    nat::L4Checksums,
    parse::{ptr_at, ETH_HLEN},
};

#[map]
static BENCH_FRAME: Array<BenchFrame> = Array::with_max_entries(1, 0);
#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
static BENCH_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// The baseline: the cheapest possible XDP program.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn xdp_bench(ctx: XdpContext) -> u32 {
    let Some(frame) = BENCH_FRAME.get(0) else { return xdp_action::XDP_ABORTED };
    // The kernel keeps the buffer's bounds from one repeat to the next: a
    // run that grew the frame at its head (an outer header, `dsr`) must
    // give those bytes back, or every repeat would eat into the headroom.
    let grown = ctx.data_end() - ctx.data();
    // SAFETY: a plain helper call on the program's own context.
    if grown > BENCH_FRAME_LEN && unsafe { bpf_xdp_adjust_head(ctx.ctx, (grown - BENCH_FRAME_LEN) as i32) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    let frame_ctx = Xdp { ctx: &ctx, l4: L4Checksums::Complete };
    let Some(dst) = ptr_at::<[u64; BENCH_FRAME_LEN / 8], _>(&frame_ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: `dst` is bounds-checked for the whole frame; `frame` is a map value.
    unsafe {
        let src = frame.bytes.as_ptr().cast::<[u64; BENCH_FRAME_LEN / 8]>();
        core::ptr::write_unaligned(dst, core::ptr::read_unaligned(src));
    }
    if frame.flags & BENCH_F_NEW_FLOW != 0 {
        make_new_flow(&frame_ctx);
    }
    // SAFETY: on success the tail call does not return.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// Give the frame a source port and address no earlier run used (2^32 runs
/// per CPU before they repeat). Checksums go stale, which the program under
/// test neither checks nor minds: it updates them incrementally.
#[inline(always)]
fn make_new_flow(ctx: &Xdp) {
    let Some(seq) = BENCH_SEQ.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU slot.
    let n = unsafe {
        *seq = (*seq).wrapping_add(1);
        *seq
    };
    // IPv4 source address low half at 14 + 14, L4 source port at 14 + 20;
    // in an IPv6 frame both lie in the source address (its bytes 6-7, 12-13).
    if let Some(p) = ptr_at::<[u8; 2], _>(ctx, ETH_HLEN + 14) {
        // SAFETY: bounds-checked.
        unsafe { *p = ((n >> 16) as u16).to_be_bytes() };
    }
    if let Some(p) = ptr_at::<[u8; 2], _>(ctx, ETH_HLEN + 20) {
        // SAFETY: bounds-checked.
        unsafe { *p = (n as u16).to_be_bytes() };
    }
}
