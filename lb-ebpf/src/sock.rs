//! Socket load balancing, as Cilium's: cgroup socket-address programs for
//! clients on the load balancer host itself, whose packets never cross an
//! XDP ingress hook. `connect4` (TCP, connected UDP) and `sendmsg4`
//! (unconnected UDP) rewrite a service address to a backend picked from the
//! service's Maglev table with a hash of the socket cookie, so one socket
//! keeps one backend while the table is unchanged; `recvmsg4` and
//! `getpeername4` show the VIP again where the backend's address would
//! appear. Anything that is not a service passes untouched.

use aya_ebpf::{
    helpers::{bpf_get_socket_cookie, generated::bpf_set_retval},
    macros::{cgroup_sock_addr, map},
    maps::{LruHashMap, PerCpuArray},
    programs::SockAddrContext,
    EbpfContext as _,
};
use lb_common::{hash::cookie_hash, Counters, Reason, ServiceKey, SockOp, SockRevKey, SERVICE_F_WAKE, SOCK_REVNAT_MAX};

use crate::{select::pick_backend, stats::count_flow, wake, SERVICES};

/// (socket, backend) -> the service (VIP, port) it was asked for.
#[map]
static SOCK_REVNAT: LruHashMap<SockRevKey, ServiceKey> = LruHashMap::with_max_entries(SOCK_REVNAT_MAX, 0);
/// What the programs did, per `SockOp`.
#[map]
static SOCK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SockOp::COUNT, 0);

/// The call goes ahead (with the address as the program left it).
const ALLOW: i32 = 1;
/// The call fails: with EPERM, unless the program set another error first
/// (bpf_set_retval).
const REJECT: i32 = 0;
/// What a call to a service with no usable backend fails with, as a
/// connection to a closed port does (the XDP path answers with a reset).
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, true)
}

/// Unconnected UDP: every `sendto` to a service. Not a new flow each time.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, false)
}

/// UDP: a reply's source address, as `recvfrom` reports it.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx)
}

/// A service address becomes the address of the backend the socket's
/// cookie picks; the pick is remembered for `restore`.
#[inline(always)]
fn translate(ctx: &SockAddrContext, new_flow: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel passes a valid context. `protocol` may only be read
    // whole (4 bytes), so every field is read volatile, which keeps LLVM
    // from narrowing a load the verifier would refuse.
    let (ip_be, port, proto) = unsafe {
        (
            core::ptr::addr_of!((*sa).user_ip4).read_volatile(),
            core::ptr::addr_of!((*sa).user_port).read_volatile(),
            core::ptr::addr_of!((*sa).protocol).read_volatile(),
        )
    };
    // `user_port` holds the port in network byte order in its low 16 bits.
    let key = ServiceKey { vip_be: ip_be, port_be: port as u16, proto: proto as u8, _pad: 0 };
    // SAFETY: copied out at once; the agent replaces entries whole.
    let Some(svc) = (unsafe { SERVICES.get(&key) }).copied() else { return ALLOW };
    // SAFETY: a helper every socket-address program may call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (backend_id, backend) = match pick_backend(&svc, cookie_hash(cookie)) {
        Ok(picked) => picked,
        Err(reason) => {
            count(SockOp::NoBackend);
            if reason == Reason::DropNoBackend && svc.flags & SERVICE_F_WAKE != 0 {
                // A service at zero: wake it, and let the call go on to the
                // VIP untranslated. A client in another network namespace
                // crosses the ingress hook, which holds its SYN until an
                // instance is in the table (`wake`).
                wake::report(svc.id, key.proto);
                return ALLOW;
            }
            if reason == Reason::DropNoBackend {
                // SAFETY: a plain helper call, for cgroup programs from
                // kernel 5.18 on (bpf_{get,set}_retval); connect(2) and
                // sendmsg(2) return it instead of EPERM.
                unsafe { bpf_set_retval(-ECONNREFUSED) };
            }
            return REJECT;
        }
    };
    let rev = SockRevKey { cookie, backend_ip_be: backend.ip_be, backend_port_be: backend.port_be, _pad: 0 };
    // A full LRU evicts, so an insert fails only without memory; the
    // connection still works then, it just shows the backend as its peer.
    let _ = SOCK_REVNAT.insert(&rev, &key, 0);
    // SAFETY: both fields may be written (whole) by connect4 and sendmsg4.
    unsafe {
        core::ptr::addr_of_mut!((*sa).user_ip4).write_volatile(backend.ip_be);
        core::ptr::addr_of_mut!((*sa).user_port).write_volatile(backend.port_be as u32);
    }
    count(SockOp::Translated);
    if new_flow {
        count_flow(svc.id, backend_id, &Counters { new_flows: 1, ..Counters::default() });
    }
    ALLOW
}

/// A backend's address, on a socket `translate` sent there, becomes the
/// service's again. Always allows: recvmsg4 and getpeername4 must.
#[inline(always)]
fn restore(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in `translate`.
    let (ip_be, port) = unsafe {
        (core::ptr::addr_of!((*sa).user_ip4).read_volatile(), core::ptr::addr_of!((*sa).user_port).read_volatile())
    };
    // SAFETY: as in `translate`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let rev = SockRevKey { cookie, backend_ip_be: ip_be, backend_port_be: port as u16, _pad: 0 };
    // SAFETY: copied out at once.
    if let Some(vip) = unsafe { SOCK_REVNAT.get(&rev) }.copied() {
        // SAFETY: recvmsg4 and getpeername4 may write both fields (whole).
        unsafe {
            core::ptr::addr_of_mut!((*sa).user_ip4).write_volatile(vip.vip_be);
            core::ptr::addr_of_mut!((*sa).user_port).write_volatile(vip.port_be as u32);
        }
        count(SockOp::Restored);
    }
    ALLOW
}

#[inline(always)]
fn count(op: SockOp) {
    if let Some(c) = SOCK_STATS.get_ptr_mut(op as u32) {
        // SAFETY: per-CPU slot, nothing else writes it while we run.
        unsafe { *c += 1 };
    }
}
