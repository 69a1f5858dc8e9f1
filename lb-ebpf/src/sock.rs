//! Socket load balancing, as Cilium's: cgroup socket-address programs for
//! clients on the load balancer host itself, whose packets never cross an
//! XDP ingress hook. `connect4` (TCP, connected UDP) and `sendmsg4`
//! (unconnected UDP) rewrite a service address to a backend picked from the
//! service's Maglev table with a hash of the socket cookie, so one socket
//! keeps one backend while the table is unchanged; `recvmsg4` and
//! `getpeername4` show the VIP again where the backend's address would
//! appear. Anything that is not a service passes untouched.
//!
//! The `*6` programs do the same for IPv6 sockets: an IPv6 service
//! (`SERVICES6`, its backends' addresses in `BACKENDS6`, the picks
//! remembered in `SOCK_REVNAT6`), and an IPv4 service reached through its
//! IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack socket's way to an
//! IPv4 peer), which gets the backend's mapped address and goes through
//! the IPv4 maps.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_socket_cookie, generated::bpf_set_retval},
    macros::{cgroup_sock_addr, map},
    maps::{LruHashMap, PerCpuArray},
    programs::SockAddrContext,
    EbpfContext as _,
};
use lb_common::{
    hash::cookie_hash,
    v6::{ipv4_mapped, mapped_ipv4, Ip6, ServiceKey6, SockRevKey6},
    Counters, Reason, Service, ServiceKey, SockOp, SockRevKey, SERVICE_F_WAKE, SOCK_REVNAT_MAX,
};

use crate::{
    select::pick_backend,
    stats::count_flow,
    v6::{BACKENDS6, SERVICES6},
    wake, SERVICES,
};

/// (socket, backend) -> the service (VIP, port) it was asked for.
#[map]
static SOCK_REVNAT: LruHashMap<SockRevKey, ServiceKey> = LruHashMap::with_max_entries(SOCK_REVNAT_MAX, 0);
/// The same for IPv6 services.
#[map]
static SOCK_REVNAT6: LruHashMap<SockRevKey6, ServiceKey6> = LruHashMap::with_max_entries(SOCK_REVNAT_MAX, 0);
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
    translate(&ctx, Family::V4, true)
}

/// Unconnected UDP: every `sendto` to a service. Not a new flow each time.
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V4, false)
}

/// UDP: a reply's source address, as `recvfrom` reports it.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, Family::V4)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, Family::V4)
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V6, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate(&ctx, Family::V6, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, Family::V6)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, Family::V6)
}

/// Which of the context's address fields a program may use.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// A socket call's peer address as the program found it.
#[derive(Clone, Copy)]
enum Peer {
    /// IPv4, or IPv4-mapped on an IPv6 socket: the address in packet order.
    V4(u32),
    V6(Ip6),
}

/// The peer address and port (network order) of the call.
///
/// SAFETY (here and in `write_peer`): the kernel passes a valid context.
/// Its fields may only be accessed whole (4 bytes), so each is read and
/// written volatile, which keeps LLVM from narrowing an access the
/// verifier would refuse.
#[inline(always)]
fn read_peer(sa: *mut bpf_sock_addr, family: Family) -> (Peer, u16) {
    unsafe {
        let port = core::ptr::addr_of!((*sa).user_port).read_volatile() as u16;
        if family == Family::V4 {
            return (Peer::V4(core::ptr::addr_of!((*sa).user_ip4).read_volatile()), port);
        }
        let words = core::ptr::addr_of!((*sa).user_ip6) as *const u32;
        let ip: Ip6 = [
            words.read_volatile(),
            words.add(1).read_volatile(),
            words.add(2).read_volatile(),
            words.add(3).read_volatile(),
        ];
        match ipv4_mapped(&ip) {
            Some(ip4) => (Peer::V4(ip4), port),
            None => (Peer::V6(ip), port),
        }
    }
}

/// Put `peer` and `port_be` in the call's address; an IPv4 peer of an IPv6
/// socket goes in mapped. Every program here may write both fields.
#[inline(always)]
fn write_peer(sa: *mut bpf_sock_addr, family: Family, peer: Peer, port_be: u16) {
    // SAFETY: see `read_peer`.
    unsafe {
        let ip = match (family, peer) {
            (Family::V4, Peer::V4(ip4)) => {
                core::ptr::addr_of_mut!((*sa).user_ip4).write_volatile(ip4);
                None
            }
            (Family::V4, Peer::V6(_)) => None,
            (Family::V6, Peer::V4(ip4)) => Some(mapped_ipv4(ip4)),
            (Family::V6, Peer::V6(ip)) => Some(ip),
        };
        if let Some(ip) = ip {
            let words = core::ptr::addr_of_mut!((*sa).user_ip6) as *mut u32;
            for (i, w) in ip.iter().enumerate() {
                words.add(i).write_volatile(*w);
            }
        }
        core::ptr::addr_of_mut!((*sa).user_port).write_volatile(port_be as u32);
    }
}

/// A service address becomes the address of the backend the socket's
/// cookie picks; the pick is remembered for `restore`.
#[inline(always)]
fn translate(ctx: &SockAddrContext, family: Family, new_flow: bool) -> i32 {
    let sa = ctx.sock_addr;
    let (peer, port_be) = read_peer(sa, family);
    // SAFETY: as in `read_peer`.
    let proto = unsafe { core::ptr::addr_of!((*sa).protocol).read_volatile() } as u8;
    // SAFETY: (lookups) copied out at once; the agent replaces entries whole.
    let svc = match peer {
        Peer::V4(vip_be) => unsafe { SERVICES.get(&ServiceKey { vip_be, port_be, proto, _pad: 0 }) }.copied(),
        Peer::V6(vip) => unsafe { SERVICES6.get(&ServiceKey6 { vip, port_be, proto, _pad: 0 }) }.copied(),
    };
    let Some(svc) = svc else { return ALLOW };
    // SAFETY: a helper every socket-address program may call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (backend_id, backend) = match pick_backend(&svc, cookie_hash(cookie)) {
        Ok(picked) => picked,
        Err(reason) => return no_backend(&svc, proto, reason),
    };
    // A full LRU evicts, so an insert fails only without memory; the
    // connection still works then, it just shows the backend as its peer.
    let (to, to_port_be) = match peer {
        Peer::V4(vip_be) => {
            let rev = SockRevKey { cookie, backend_ip_be: backend.ip_be, backend_port_be: backend.port_be, _pad: 0 };
            let _ = SOCK_REVNAT.insert(&rev, &ServiceKey { vip_be, port_be, proto, _pad: 0 }, 0);
            (Peer::V4(backend.ip_be), backend.port_be)
        }
        Peer::V6(vip) => {
            let Some(b6) = BACKENDS6.get(backend_id).copied().filter(|b| b.port_be != 0) else {
                // An IPv4 backend in an IPv6 table: never written so.
                return no_backend(&svc, proto, Reason::DropStaleBackend);
            };
            let rev = SockRevKey6 { cookie, backend: b6.ip, backend_port_be: b6.port_be, _pad: [0; 3] };
            let _ = SOCK_REVNAT6.insert(&rev, &ServiceKey6 { vip, port_be, proto, _pad: 0 }, 0);
            (Peer::V6(b6.ip), b6.port_be)
        }
    };
    write_peer(sa, family, to, to_port_be);
    count(SockOp::Translated);
    if new_flow {
        count_flow(svc.id, backend_id, &Counters { new_flows: 1, ..Counters::default() });
    }
    ALLOW
}

/// A call to `svc`, which has no backend to give (`reason`): refused, or
/// for a service at zero, reported and let through.
#[inline(always)]
fn no_backend(svc: &Service, proto: u8, reason: Reason) -> i32 {
    count(SockOp::NoBackend);
    if reason == Reason::DropNoBackend && svc.flags & SERVICE_F_WAKE != 0 {
        // A service at zero: wake it, and let the call go on to the VIP
        // untranslated. A client in another network namespace crosses the
        // ingress hook, which holds its SYN until an instance is in the
        // table (`wake`).
        wake::report(svc.id, proto);
        return ALLOW;
    }
    if reason == Reason::DropNoBackend {
        // SAFETY: a plain helper call, for cgroup programs from kernel 5.18
        // on (bpf_{get,set}_retval); connect(2) and sendmsg(2) return it
        // instead of EPERM.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    REJECT
}

/// A backend's address, on a socket `translate` sent there, becomes the
/// service's again. Always allows: recvmsg and getpeername must.
#[inline(always)]
fn restore(ctx: &SockAddrContext, family: Family) -> i32 {
    let sa = ctx.sock_addr;
    let (peer, port_be) = read_peer(sa, family);
    // SAFETY: as in `translate`.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: (lookups) copied out at once.
    let vip = match peer {
        Peer::V4(ip_be) => {
            let rev = SockRevKey { cookie, backend_ip_be: ip_be, backend_port_be: port_be, _pad: 0 };
            unsafe { SOCK_REVNAT.get(&rev) }.map(|v| (Peer::V4(v.vip_be), v.port_be))
        }
        Peer::V6(ip) => {
            let rev = SockRevKey6 { cookie, backend: ip, backend_port_be: port_be, _pad: [0; 3] };
            unsafe { SOCK_REVNAT6.get(&rev) }.map(|v| (Peer::V6(v.vip), v.port_be))
        }
    };
    if let Some((vip, vip_port_be)) = vip {
        write_peer(sa, family, vip, vip_port_be);
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
