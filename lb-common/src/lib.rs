//! The kernel/user ABI of the load balancer and the pure helpers both sides use.
//!
//! Everything here is `#[repr(C)]` plain old data with explicit padding, so the
//! byte layout the eBPF program sees is the one the agent writes. The layout
//! tests at the bottom pin every offset: if their diff changes, the ABI changed.
//!
//! Fields ending in `_be` hold network byte order *in memory*: the raw bits
//! as they sit in the packet. Userspace builds them with `u32::from(ip).to_be()`
//! and `port.to_be()`; the kernel side compares them with packet fields as
//! loaded, with no byte swapping on the hot path.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod csum;
pub mod dsr;
pub mod dsr6;
pub mod hash;
pub mod icmp;
#[cfg(feature = "user")]
pub mod maglev;
pub mod refuse;
pub mod snat;
pub mod v6;

use core::mem::{align_of, size_of};

/// Version of this ABI. Pinned maps live under a directory named after it,
/// so an agent never adopts maps whose layout it does not know. Bump it with
/// any change to a map's key, value or size.
pub const ABI_VERSION: u32 = 9;

// Map names, declared once. The agent opens maps by these consts only.
pub const SERVICES: &str = "SERVICES";
pub const BACKENDS: &str = "BACKENDS";
pub const MAGLEV: &str = "MAGLEV";
pub const CONNTRACK: &str = "CONNTRACK";
pub const BACKEND_VIPS: &str = "BACKEND_VIPS";
pub const SETTINGS: &str = "SETTINGS";
pub const FLOW_BUDGET: &str = "FLOW_BUDGET";
pub const SERVICE_STATS: &str = "SERVICE_STATS";
pub const BACKEND_STATS: &str = "BACKEND_STATS";
pub const REASON_STATS: &str = "REASON_STATS";
pub const EGRESS: &str = "EGRESS";
pub const PATH_STATS: &str = "PATH_STATS";
pub const SOCK_REVNAT: &str = "SOCK_REVNAT";
pub const SOCK_STATS: &str = "SOCK_STATS";
pub const WAKE_EVENTS: &str = "WAKE_EVENTS";
pub const WAKE_LAST: &str = "WAKE_LAST";
pub const SNAT_FLOWS: &str = "SNAT_FLOWS";
/// The program's per-CPU scratch space: never pinned, never read by the agent.
pub const SCRATCH: &str = "SCRATCH";
// The benchmark's maps and programs (`BENCH_*`, `PROG_PASS`, `PROG_BENCH`)
// are only in the object built with lb-ebpf's `bench` feature, never in the
// one the agent loads.
pub const BENCH_FRAME: &str = "BENCH_FRAME";
pub const BENCH_TARGET: &str = "BENCH_TARGET";
/// Program names inside the object. `xdp_lb` is for interfaces where every
/// arriving L4 checksum is complete (NICs)...
pub const PROG_LB: &str = "xdp_lb";
/// ...`xdp_lb_local` for interfaces facing local stacks (veth, bridge, tap),
/// whose packets may carry partial checksums (CHECKSUM_PARTIAL). The bytes
/// cannot tell the two apart for one complete checksum in 65,536, so the
/// agent picks per interface.
pub const PROG_LB_LOCAL: &str = "xdp_lb_local";
/// The tc classifier (ingress), for the devices that face local stacks
/// (veth, bridges, tun/tap, ...): the same balancer, with the skb's
/// checksum helpers and bpf_redirect, which any device can take.
pub const PROG_TC: &str = "tc_lb";
/// The backend's side of `MODE_DSR_IPIP` on kernels without IP-in-IP
/// devices: a tc classifier that strips the outer header (`lb-agent
/// backend-setup --bpf-decap`); the agent itself never loads it.
pub const PROG_TC_DECAP: &str = "tc_decap";
/// The programs an interface can get; the agent loads (verifies) them all.
pub const LB_PROGRAMS: [&str; 3] = [PROG_LB, PROG_LB_LOCAL, PROG_TC];
/// Socket load balancing (cgroup socket-address programs, attached to a
/// cgroup v2 directory): `connect4` and `sendmsg4` rewrite a service
/// address to a backend, `recvmsg4` and `getpeername4` show the VIP again;
/// the `*6` programs do the same for IPv6 sockets (IPv6 services, and IPv4
/// ones through IPv4-mapped addresses).
pub const PROG_SOCK_CONNECT4: &str = "sock_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "sock_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "sock_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "sock_getpeername4";
pub const PROG_SOCK_CONNECT6: &str = "sock_connect6";
pub const PROG_SOCK_SENDMSG6: &str = "sock_sendmsg6";
pub const PROG_SOCK_RECVMSG6: &str = "sock_recvmsg6";
pub const PROG_SOCK_GETPEERNAME6: &str = "sock_getpeername6";
pub const SOCK_PROGRAMS: [&str; 8] = [
    PROG_SOCK_CONNECT4,
    PROG_SOCK_SENDMSG4,
    PROG_SOCK_RECVMSG4,
    PROG_SOCK_GETPEERNAME4,
    PROG_SOCK_CONNECT6,
    PROG_SOCK_SENDMSG6,
    PROG_SOCK_RECVMSG6,
    PROG_SOCK_GETPEERNAME6,
];
/// An empty XDP_PASS program: the baseline the benchmark measures against.
pub const PROG_PASS: &str = "xdp_pass";
/// Benchmark wrapper: restores the frame from `BENCH_FRAME`, then tail-calls
/// `BENCH_TARGET[0]`. BPF_PROG_TEST_RUN with `repeat` does not restore the
/// packet between runs, so without it every repeat after the first would time
/// the path of an already rewritten packet.
pub const PROG_BENCH: &str = "xdp_bench";

/// Services (VIP, port, protocol) the program balances.
pub const MAX_SERVICES: u32 = 32;
/// Backend ids are indices into `BACKENDS`; 0 means "no backend".
pub const MAX_BACKENDS: u32 = 4096;
/// Maglev lookup table size per service. 65537 is prime, so every skip value
/// visits every slot, and it leaves room for a few hundred backends with
/// shares within a percent or so of their weights.
pub const MAGLEV_TABLE_SIZE: u32 = 65537;
/// Each service owns two tables: the agent fills the inactive one and then
/// flips `Service::table` in a single hash-map update, so a packet never sees
/// a half-written table.
pub const MAGLEV_TABLES_PER_SERVICE: u32 = 2;
pub const MAGLEV_ENTRIES: u32 = MAX_SERVICES * MAGLEV_TABLES_PER_SERVICE * MAGLEV_TABLE_SIZE;
/// Interfaces the program can send out of (`EGRESS`) and count paths on
/// (`PATH_STATS`).
pub const MAX_INTERFACES: u32 = 64;
/// Connection-table entries (LRU), one per flow: the object's default,
/// which the agent replaces with `[dataplane] max_flows` at load.
pub const CONNTRACK_MAX: u32 = 1 << 20;
/// TCP flows a CPU may start per second from a packet that is not a SYN
/// (`Settings::non_syn_flows_per_sec`), unless the agent says otherwise.
pub const DEFAULT_NON_SYN_FLOWS_PER_SEC: u32 = 50_000;
/// The services one backend address (ip, port, protocol) can serve at once:
/// a reply from it is matched against a flow of each (`BACKEND_VIPS`).
pub const MAX_VIPS_PER_BACKEND: usize = 4;
/// Entries of `BACKEND_VIPS`: one per backend address.
pub const BACKEND_VIPS_MAX: u32 = MAX_BACKENDS;
/// Socket load balancing's reverse entries (LRU): one per socket and backend.
pub const SOCK_REVNAT_MAX: u32 = 1 << 16;

pub const PROTO_ICMP: u8 = 1;
/// IP-in-IP (RFC 2003): the outer header's protocol in `MODE_DSR_IPIP`.
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Index of a service's Maglev slot in the flat `MAGLEV` array.
#[inline(always)]
pub const fn maglev_index(service_id: u32, table: u32, hash: u32) -> u32 {
    (service_id * MAGLEV_TABLES_PER_SERVICE + table) * MAGLEV_TABLE_SIZE + hash % MAGLEV_TABLE_SIZE
}

/// Key of `SERVICES`: what a packet's destination must match to be balanced.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Index into `SERVICE_STATS` and into the `MAGLEV` array; `< MAX_SERVICES`.
    pub id: u32,
    /// Which of the service's two Maglev tables is live (0 or 1).
    pub table: u32,
    /// Number of backends in the live table; 0 refuses new flows (`ResetNoBackend`, `UnreachableNoBackend`).
    pub backend_count: u32,
    /// Forwarding mode, one of `MODE_*`.
    pub mode: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u32,
    /// `MODE_DSR_IPIP`: the outer header's source, an address of the load
    /// balancer (0 in the other modes).
    pub source_be: u32,
}

/// The service scales from zero: a new flow (a SYN, a UDP datagram) that
/// finds no backend is dropped, not refused, and reported to the agent
/// through `WAKE_EVENTS` (`Reason::HeldWaking`), so that the client's own
/// retransmission connects once an instance is in the table.
pub const SERVICE_F_WAKE: u32 = 1;

/// `WAKE_EVENTS` is a ring buffer of this many bytes (a power of two, a
/// multiple of the page size): room for hundreds of events, which the rate
/// limit below keeps to one per service per CPU every interval.
pub const WAKE_EVENTS_BYTES: u32 = 1 << 16;
/// Per CPU, a service is reported at most once per this many nanoseconds
/// (`WAKE_LAST` keeps the last report's time), so a SYN flood to a sleeping
/// service cannot flood the agent.
pub const WAKE_EVENT_INTERVAL_NS: u64 = 100_000_000;

/// One record of `WAKE_EVENTS`: a client is waiting for `service_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WakeEvent {
    pub service_id: u32,
    /// The packet's protocol (`PROTO_TCP`, `PROTO_UDP`).
    pub proto: u8,
    pub _pad: [u8; 3],
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when the packet arrived.
    pub at_ns: u64,
}

/// Destination NAT with reverse translation of replies (client address kept).
pub const MODE_DNAT: u32 = 0;
/// Full NAT: the source is translated too, to an address of the load
/// balancer (`Backend::snat_ip_be`) and a port the program claims per flow
/// (`SNAT_FLOWS`), so a backend replies to the load balancer whatever its
/// routes (see lb-ebpf's `fullnat`).
pub const MODE_FULL_NAT: u32 = 1;
/// Direct server return: each client packet goes to its backend untouched
/// inside an outer IPv4 header (IP-in-IP, `PROTO_IPIP`); the backend answers
/// the client directly, so no reply comes back through the load balancer.
pub const MODE_DSR_IPIP: u32 = 2;

/// Full NAT's source ports, by default: above Linux's default ephemeral
/// range (`ip_local_port_range` 32768-60999), so the load balancer's own
/// connections never pick a port a translated flow holds.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 61000;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 65535;
/// Ports one new full-NAT flow tries (from a hash of its 5-tuple on) before
/// it is refused (`Reason::DropSnatExhausted`).
pub const SNAT_PORT_TRIES: u32 = 16;
/// Entries of `SNAT_FLOWS`: the object's default, which the agent replaces
/// with `[dataplane] max_flows` at load, as for `CONNTRACK`.
pub const SNAT_FLOWS_MAX: u32 = CONNTRACK_MAX;
/// TTL of the outer header of `MODE_DSR_IPIP` (Linux's default).
pub const DSR_OUTER_TTL: u8 = 64;

/// Value of the `BACKENDS` array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub ip_be: u32,
    pub port_be: u16,
    pub _pad: u16,
    /// The service this backend serves.
    pub service_id: u32,
    /// `BACKEND_F_*` bits.
    pub flags: u32,
    /// Full NAT: the load balancer's address a flow to this backend is
    /// sent from (the service's `source`, or the address of the interface
    /// the route to the backend leaves by); 0 for other modes.
    pub snat_ip_be: u32,
    pub _pad2: u32,
}

/// The slot is in use (an all-zero entry is an unused id).
pub const BACKEND_F_ACTIVE: u32 = 1;

/// Key of `CONNTRACK`: a flow's 5-tuple as its client sends it (client ->
/// VIP). One entry per flow: replies find it through `BACKEND_VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_ip_be: u32,
    pub dst_ip_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The forward key of a flow from a client to a VIP.
    #[inline(always)]
    pub const fn new(client_ip_be: u32, client_port_be: u16, vip_be: u32, vip_port_be: u16, proto: u8) -> Self {
        FlowKey {
            src_ip_be: client_ip_be,
            dst_ip_be: vip_be,
            src_port_be: client_port_be,
            dst_port_be: vip_port_be,
            proto,
            _pad: [0; 3],
        }
    }
}

/// Key of `BACKEND_VIPS`: a backend's address as its replies carry it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub ip_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `BACKEND_VIPS`: the services (VIP, port) a backend address
/// serves, the used ones first; an unused slot has `vip_be == 0`. A reply
/// from the backend is ours only if the flow (client -> one of these) is in
/// `CONNTRACK` with this backend, so a stale slot is harmless.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendVips {
    pub vips: [ServiceKey; MAX_VIPS_PER_BACKEND],
}

/// Value of `CONNTRACK`.
///
/// The backend the flow was sent to: its client's packets get their
/// destination rewritten to it, and a reply from it (to the client) is
/// matched by it. The backend address is kept in the entry itself, so a flow
/// keeps working after its backend leaves `BACKENDS` (draining).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    pub nat_ip_be: u32,
    pub nat_port_be: u16,
    /// TCP flags seen on the flow (`TCP_SEEN_*`).
    pub tcp_seen: u8,
    pub _pad: u8,
    pub backend_id: u32,
    pub service_id: u32,
    /// `bpf_ktime_get_ns()` of the last packet either way.
    pub last_seen_ns: u64,
    /// The interface the flow's first client packet arrived on, and the
    /// MACs it arrived with: `client_mac` its source (the client or the
    /// router in front of it), `local_mac` its destination (ours). A reply
    /// whose FIB lookup finds no neighbour for the client on that interface
    /// is sent with them (see `Path::RepliedFlowMacs`).
    pub client_ifindex: u32,
    pub client_mac: [u8; 6],
    pub local_mac: [u8; 6],
    /// Full NAT: the (address, port) the flow is sent to its backend from,
    /// claimed in `SNAT_FLOWS`; zero for other modes (and before the claim).
    pub snat_ip_be: u32,
    pub snat_port_be: u16,
    pub _pad2: u16,
}

impl Conn {
    /// A new flow's entry before its backend's address goes in: its pick,
    /// when, and how its first client packet arrived (IPv4 and IPv6 alike).
    #[inline(always)]
    pub const fn opened(
        backend_id: u32,
        service_id: u32,
        now_ns: u64,
        client_ifindex: u32,
        client_mac: [u8; 6],
        local_mac: [u8; 6],
    ) -> Conn {
        Conn {
            nat_ip_be: 0,
            nat_port_be: 0,
            tcp_seen: 0,
            _pad: 0,
            backend_id,
            service_id,
            last_seen_ns: now_ns,
            client_ifindex,
            client_mac,
            local_mac,
            snat_ip_be: 0,
            snat_port_be: 0,
            _pad2: 0,
        }
    }

    /// Full NAT: the key of this flow's claim in `SNAT_FLOWS`, its replies'
    /// 5-tuple (backend -> the load balancer's address and port).
    #[inline(always)]
    pub const fn snat_reply_key(&self, proto: u8) -> FlowKey {
        FlowKey::new(self.nat_ip_be, self.nat_port_be, self.snat_ip_be, self.snat_port_be, proto)
    }
}

/// `Conn::tcp_seen` bits: a FIN from the client...
pub const TCP_SEEN_FIN: u8 = 1;
/// ...an RST either way...
pub const TCP_SEEN_RST: u8 = 2;
/// ...any packet from the backend (the SYN was answered)...
pub const TCP_SEEN_REPLY: u8 = 4;
/// ...a FIN from the backend.
pub const TCP_SEEN_BACKEND_FIN: u8 = 8;

// TCP header flags, as on the wire.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Where a TCP flow is, by its `tcp_seen` bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpState {
    /// The backend has not answered yet (a SYN never answered, or a flood).
    HalfOpen,
    /// Answered, not closed: counts as an open connection.
    Open,
    /// Both sides sent a FIN, or one an RST.
    Closed,
}

impl TcpState {
    #[inline(always)]
    pub const fn of(seen: u8) -> TcpState {
        let both_fins = TCP_SEEN_FIN | TCP_SEEN_BACKEND_FIN;
        if seen & TCP_SEEN_RST != 0 || seen & both_fins == both_fins {
            TcpState::Closed
        } else if seen & TCP_SEEN_REPLY != 0 {
            TcpState::Open
        } else {
            TcpState::HalfOpen
        }
    }
}

/// A flow's `tcp_seen` after a packet with `tcp_flags`, from the backend
/// (`from_backend`) or from the client.
#[inline(always)]
pub const fn tcp_seen_after(seen: u8, tcp_flags: u8, from_backend: bool) -> u8 {
    let mut s = seen;
    if tcp_flags & TCP_RST != 0 {
        s |= TCP_SEEN_RST;
    }
    if tcp_flags & TCP_FIN != 0 {
        s |= if from_backend { TCP_SEEN_BACKEND_FIN } else { TCP_SEEN_FIN };
    }
    if from_backend {
        s |= TCP_SEEN_REPLY;
    }
    s
}

/// Value of `SETTINGS[0]`: what the agent sets at load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// A TCP packet that is not a SYN, of a flow the table does not hold
    /// (evicted, or from before a restart), gets a fresh Maglev pick and an
    /// entry, up to this many a second per CPU; beyond, it is dropped
    /// (`Reason::DropNonSynOverBudget`) and the client retransmits. SYNs
    /// always get an entry. `u32::MAX`: no limit.
    pub non_syn_flows_per_sec: u32,
    /// Full NAT's source ports, `snat_port_min..=snat_port_max` (host order).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            non_syn_flows_per_sec: DEFAULT_NON_SYN_FLOWS_PER_SEC,
            snat_port_min: DEFAULT_SNAT_PORT_MIN,
            snat_port_max: DEFAULT_SNAT_PORT_MAX,
        }
    }
}

/// Value of `FLOW_BUDGET[0]` (per CPU): the non-SYN flows started in the
/// current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowBudget {
    pub window_start_ns: u64,
    pub used: u64,
}

impl FlowBudget {
    /// Takes one flow from the budget of `per_sec` a second at `now_ns`;
    /// false when this second's are used up.
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64, per_sec: u32) -> bool {
        if per_sec == u32::MAX {
            return true;
        }
        if now_ns.wrapping_sub(self.window_start_ns) >= 1_000_000_000 {
            self.window_start_ns = now_ns;
            self.used = 0;
        }
        if self.used >= u64::from(per_sec) {
            return false;
        }
        self.used += 1;
        true
    }
}

/// Per-CPU counters, one slot per service in `SERVICE_STATS` and one per
/// backend id in `BACKEND_STATS`. The agent sums over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    /// Client-to-backend packets and bytes (frame length).
    pub packets: u64,
    pub bytes: u64,
    /// Flows that got a backend from the Maglev table.
    pub new_flows: u64,
    /// Backend-to-client packets and bytes, after reverse translation.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// TCP flows closed: a FIN from both sides, or an RST (`TcpState`).
    pub closed_flows: u64,
}

impl Counters {
    #[inline(always)]
    pub fn add(&mut self, other: &Counters) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
        self.reply_packets += other.reply_packets;
        self.reply_bytes += other.reply_bytes;
        self.closed_flows += other.closed_flows;
    }
}

/// Why the program returned what it did; `REASON_STATS` counts each per CPU.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Client packet to a service, destination rewritten to a backend.
    Forwarded = 0,
    /// Backend reply, source rewritten back to the VIP.
    ReplyTranslated,
    /// An ICMP error about a flow's reply (fragmentation needed, port
    /// unreachable, time exceeded), sent to the VIP: translated to the
    /// flow's backend, quote included (see `icmp`). IPv6 too, and an
    /// ICMPv6 error about a client's packet to its backend, translated to
    /// the client (see `v6::icmp`).
    IcmpForwarded,
    /// A new TCP flow (not a reset) to a service with no usable backend:
    /// answered with a reset, sent back out of the interface it came in on
    /// (`refuse`).
    ResetNoBackend,
    /// A new UDP flow to a service with no usable backend: answered with an
    /// ICMP (ICMPv6) port unreachable (`refuse`).
    UnreachableNoBackend,
    /// Not IPv4 (ARP, VLAN, ...): passed untouched.
    PassNotIpv4,
    /// IPv6 at the tc hook (`tc_lb`), which balances IPv4 only: passed
    /// untouched. (At XDP, IPv6 goes to `xdp_lb6`; see `v6`.)
    PassIpv6,
    /// IPv4 but neither TCP nor UDP, nor an ICMP error (echo, ...): passed
    /// untouched.
    PassNotTcpUdp,
    /// An ICMP error that is about no flow in the connection table: passed
    /// untouched.
    PassIcmpNoFlow,
    /// An ICMP message too short for its header, or an error whose quote is
    /// cut short or unreadable (not IPv4, IP options, a later fragment):
    /// passed untouched, for the kernel to judge.
    PassIcmpMalformed,
    /// TCP/UDP that is neither for a service nor a known reply: passed.
    PassNoService,
    /// IPv4 with options: passed untouched, never balanced.
    PassIpOptions,
    /// IPv4 fragment: passed untouched, never balanced (no ports to hash).
    PassFragment,
    /// Frame shorter than an Ethernet header.
    DropTruncatedEth,
    /// Frame shorter than the IPv4 header it announces.
    DropTruncatedIp,
    /// IPv4 header length below 5 words, or version not 4.
    DropBadIpHeader,
    /// IPv4 total length below its header or beyond the frame.
    DropBadTotalLength,
    /// Frame shorter than the TCP/UDP header.
    DropTruncatedL4,
    /// TCP data offset below 5 words or beyond the packet.
    DropBadTcpHeader,
    /// A new flow for a service that has no backend, where no answer is
    /// sent: a TCP reset (never answered), or at the tc hook.
    DropNoBackend,
    /// The Maglev table named a backend id that is not in `BACKENDS`.
    DropStaleBackend,
    /// The connection table refused an insert.
    DropConntrackFull,
    /// A TCP packet other than a SYN with no flow in the table, beyond this
    /// CPU's budget of such flows (`Settings::non_syn_flows_per_sec`).
    DropNonSynOverBudget,
    /// A new flow (a SYN, a UDP datagram) to a service that scales from
    /// zero and has no instance yet: dropped, its client retransmits, and
    /// the agent was told (`WAKE_EVENTS`, rate-limited).
    HeldWaking,
    /// Full NAT: no source port free for a new flow (every one tried is
    /// held), or a flow whose claim was lost and whose port another flow
    /// holds now. Dropped, never sent from a port another flow uses.
    DropSnatExhausted,
    /// IPv6 with an extension header before TCP/UDP (hop-by-hop, routing,
    /// destination options, ...): passed untouched, never balanced.
    PassIpv6ExtHeader,
    /// IPv6 at an XDP entry point whose tail call to the IPv6 program failed
    /// (no program in `V6_PROGS`), an ICMPv6 error whose tail call to
    /// `xdp_icmp6` failed, or an IPv6 full-NAT packet whose tail call from
    /// `xdp_lb6` to `xdp_fullnat6` failed: passed untouched.
    PassIpv6NoProgram,
    /// UDP over IPv6 with a zero checksum (invalid, RFC 8200 8.1) to a
    /// service or from a backend: dropped, as the kernel would.
    DropUdp6NoChecksum,
    /// `MODE_DSR_IPIP`: the packet, 20 bytes longer once encapsulated,
    /// would exceed the egress MTU (no ICMP is sent back; see the README).
    DropDsrTooBig,
    /// `MODE_DSR_IPIP`: no usable route or neighbour entry to the backend
    /// (the agent's tunnel probes keep the neighbour entry fresh).
    DropDsrNoRoute,
    /// `MODE_DSR_IPIP`: this hook cannot encapsulate (tc), or the L4
    /// checksum is a partial one a redirected frame would lose.
    DropDsrUnsupported,
}

impl Reason {
    pub const COUNT: u32 = Reason::DropDsrUnsupported as u32 + 1;
    pub const ALL: [Reason; Reason::COUNT as usize] = [
        Reason::Forwarded,
        Reason::ReplyTranslated,
        Reason::IcmpForwarded,
        Reason::ResetNoBackend,
        Reason::UnreachableNoBackend,
        Reason::PassNotIpv4,
        Reason::PassIpv6,
        Reason::PassNotTcpUdp,
        Reason::PassIcmpNoFlow,
        Reason::PassIcmpMalformed,
        Reason::PassNoService,
        Reason::PassIpOptions,
        Reason::PassFragment,
        Reason::DropTruncatedEth,
        Reason::DropTruncatedIp,
        Reason::DropBadIpHeader,
        Reason::DropBadTotalLength,
        Reason::DropTruncatedL4,
        Reason::DropBadTcpHeader,
        Reason::DropNoBackend,
        Reason::DropStaleBackend,
        Reason::DropConntrackFull,
        Reason::DropNonSynOverBudget,
        Reason::HeldWaking,
        Reason::DropSnatExhausted,
        Reason::PassIpv6ExtHeader,
        Reason::PassIpv6NoProgram,
        Reason::DropUdp6NoChecksum,
        Reason::DropDsrTooBig,
        Reason::DropDsrNoRoute,
        Reason::DropDsrUnsupported,
    ];

    /// A stable snake_case name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Forwarded => "forwarded",
            Reason::ReplyTranslated => "reply_translated",
            Reason::IcmpForwarded => "icmp_forwarded",
            Reason::ResetNoBackend => "reset_no_backend",
            Reason::UnreachableNoBackend => "unreachable_no_backend",
            Reason::PassNotIpv4 => "pass_not_ipv4",
            Reason::PassIpv6 => "pass_ipv6",
            Reason::PassNotTcpUdp => "pass_not_tcp_udp",
            Reason::PassIcmpNoFlow => "pass_icmp_no_flow",
            Reason::PassIcmpMalformed => "pass_icmp_malformed",
            Reason::PassNoService => "pass_no_service",
            Reason::PassIpOptions => "pass_ip_options",
            Reason::PassFragment => "pass_fragment",
            Reason::DropTruncatedEth => "drop_truncated_eth",
            Reason::DropTruncatedIp => "drop_truncated_ip",
            Reason::DropBadIpHeader => "drop_bad_ip_header",
            Reason::DropBadTotalLength => "drop_bad_total_length",
            Reason::DropTruncatedL4 => "drop_truncated_l4",
            Reason::DropBadTcpHeader => "drop_bad_tcp_header",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropStaleBackend => "drop_stale_backend",
            Reason::DropConntrackFull => "drop_conntrack_full",
            Reason::DropNonSynOverBudget => "drop_non_syn_over_budget",
            Reason::HeldWaking => "held_waking",
            Reason::DropSnatExhausted => "drop_snat_exhausted",
            Reason::PassIpv6ExtHeader => "pass_ipv6_ext_header",
            Reason::PassIpv6NoProgram => "pass_ipv6_no_program",
            Reason::DropUdp6NoChecksum => "drop_udp6_no_checksum",
            Reason::DropDsrTooBig => "drop_dsr_too_big",
            Reason::DropDsrNoRoute => "drop_dsr_no_route",
            Reason::DropDsrUnsupported => "drop_dsr_unsupported",
        }
    }

    /// Whether the program answered the client itself (`refuse`).
    pub const fn is_refused(self) -> bool {
        matches!(self, Reason::ResetNoBackend | Reason::UnreachableNoBackend)
    }

    pub const fn is_drop(self) -> bool {
        // Passes added after the drops (the enum only grows at its end).
        let later_pass = matches!(self, Reason::PassIpv6ExtHeader | Reason::PassIpv6NoProgram);
        (self as u32) >= Reason::DropTruncatedEth as u32 && !later_pass
    }

    /// Whether the packet was rewritten and sent on (to a backend or back
    /// to a client).
    pub const fn is_translated(self) -> bool {
        matches!(self, Reason::Forwarded | Reason::ReplyTranslated | Reason::IcmpForwarded)
    }
}

/// Which way a translated packet left, counted per ingress interface in
/// `PATH_STATS`. The fast path sends it straight out (XDP_REDIRECT through
/// `EGRESS`, or XDP_TX; bpf_redirect in tc) after a `bpf_fib_lookup`; where
/// that cannot finish the packet passes up to the kernel's stack (XDP_PASS,
/// TC_ACT_OK), which resolves the neighbour or answers with ICMP, so that
/// the next packet can take the fast path.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Sent out of another interface (XDP_REDIRECT through `EGRESS`, or
    /// bpf_redirect in tc).
    Redirected = 0,
    /// Sent back out of the interface it arrived on (XDP_TX, or bpf_redirect
    /// to it in tc).
    TxBack,
    /// A reply whose client had no neighbour entry: sent with the MACs its
    /// flow's client packet arrived with (`Conn::client_mac`).
    RepliedFlowMacs,
    /// tc only: the FIB knows the egress interface but not the next hop's
    /// MAC; sent there with bpf_redirect_neigh, which resolves it.
    RedirectedNeigh,
    /// Passed up: the FIB knows the next hop but not its MAC yet.
    PassFibNoNeigh,
    /// Passed up: the egress interface is not in `EGRESS` (the agent did not
    /// enable the fast path there, e.g. a bridge that cannot transmit XDP
    /// frames).
    PassEgressNotReady,
    /// Passed up: TTL 1 or less; the kernel sends the ICMP time exceeded.
    PassTtlExpired,
    /// Passed up: larger than the egress MTU; the kernel fragments or
    /// answers with ICMP.
    PassFragNeeded,
    /// Passed up: the L4 checksum is a partial one (CHECKSUM_PARTIAL from a
    /// local stack over veth). A redirected frame loses the skb's note that
    /// the checksum is still to be finished, so the receiver would drop it.
    PassPartialChecksum,
    /// Passed up: a route the program cannot use (local, blackhole,
    /// unreachable, forwarding disabled on the ingress interface, ...).
    PassFibUnsupported,
}

impl Path {
    pub const COUNT: u32 = Path::PassFibUnsupported as u32 + 1;
    pub const ALL: [Path; Path::COUNT as usize] = [
        Path::Redirected,
        Path::TxBack,
        Path::RepliedFlowMacs,
        Path::RedirectedNeigh,
        Path::PassFibNoNeigh,
        Path::PassEgressNotReady,
        Path::PassTtlExpired,
        Path::PassFragNeeded,
        Path::PassPartialChecksum,
        Path::PassFibUnsupported,
    ];

    /// A stable snake_case name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Path::Redirected => "redirected",
            Path::TxBack => "tx_back",
            Path::RepliedFlowMacs => "replied_flow_macs",
            Path::RedirectedNeigh => "redirected_neigh",
            Path::PassFibNoNeigh => "pass_fib_no_neigh",
            Path::PassEgressNotReady => "pass_egress_not_ready",
            Path::PassTtlExpired => "pass_ttl_expired",
            Path::PassFragNeeded => "pass_frag_needed",
            Path::PassPartialChecksum => "pass_partial_checksum",
            Path::PassFibUnsupported => "pass_fib_unsupported",
        }
    }

    /// Whether the packet skipped the kernel's stack.
    pub const fn is_fast(self) -> bool {
        (self as u32) < Path::PassFibNoNeigh as u32
    }
}

/// Value of `PATH_STATS` (per CPU, keyed by ingress ifindex): packets per
/// `Path`, indexed by `Path as usize`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PathCounters {
    pub packets: [u64; Path::COUNT as usize],
}

impl PathCounters {
    pub fn add(&mut self, other: &PathCounters) {
        for (mine, theirs) in self.packets.iter_mut().zip(other.packets) {
            *mine += theirs;
        }
    }
}

/// Key of `SOCK_REVNAT`: a socket (its cookie) and the backend its
/// `connect`/`sendmsg` was sent to. The value is the service's
/// [`ServiceKey`] (VIP, port), which `recvmsg4`/`getpeername4` put back.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub backend_ip_be: u32,
    pub backend_port_be: u16,
    pub _pad: u16,
}

/// What the socket programs did, counted per CPU in `SOCK_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockOp {
    /// A `connect`/`sendmsg` to a service, rewritten to a backend.
    Translated = 0,
    /// A `connect`/`sendmsg` to a service with no serving backend: refused
    /// (ECONNREFUSED for an empty table, EPERM for a stale backend).
    NoBackend,
    /// A `recvmsg`/`getpeername` address put back from a backend to the VIP.
    Restored,
}

impl SockOp {
    pub const COUNT: u32 = SockOp::Restored as u32 + 1;
    pub const ALL: [SockOp; SockOp::COUNT as usize] = [SockOp::Translated, SockOp::NoBackend, SockOp::Restored];

    /// A stable snake_case name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            SockOp::Translated => "translated",
            SockOp::NoBackend => "no_backend",
            SockOp::Restored => "restored",
        }
    }
}

const _: () = {
    assert!(size_of::<SockRevKey>() == 16 && align_of::<SockRevKey>() == 8);
    assert!(size_of::<ServiceKey>() == 8 && align_of::<ServiceKey>() == 4);
    assert!(size_of::<Service>() == 24 && align_of::<Service>() == 4);
    assert!(size_of::<WakeEvent>() == 16 && align_of::<WakeEvent>() == 8);
    assert!(size_of::<Backend>() == 24 && align_of::<Backend>() == 4);
    assert!(size_of::<FlowKey>() == 16 && align_of::<FlowKey>() == 4);
    assert!(size_of::<BackendAddr>() == 8 && align_of::<BackendAddr>() == 4);
    assert!(size_of::<BackendVips>() == 8 * MAX_VIPS_PER_BACKEND && align_of::<BackendVips>() == 4);
    assert!(size_of::<Conn>() == 48 && align_of::<Conn>() == 8);
    assert!(size_of::<Settings>() == 8 && align_of::<Settings>() == 4);
    assert!(size_of::<PathCounters>() == 8 * Path::COUNT as usize && align_of::<PathCounters>() == 8);
    assert!(size_of::<Counters>() == 48 && align_of::<Counters>() == 8);
    assert!(size_of::<BenchFrame>() == BENCH_FRAME_LEN + 8);
    assert!(MAX_SERVICES as u64 * MAGLEV_TABLES_PER_SERVICE as u64 * MAGLEV_TABLE_SIZE as u64 <= u32::MAX as u64);
};

/// Frames the benchmark wrapper restores are exactly this long: room for
/// an IPv6 TCP segment with a few bytes of payload (IPv4 frames are padded).
pub const BENCH_FRAME_LEN: usize = 80;
/// Bench flag: give every run a new source port and address (a new flow).
pub const BENCH_F_NEW_FLOW: u32 = 1;

/// Value of `BENCH_FRAME[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchFrame {
    pub bytes: [u8; BENCH_FRAME_LEN],
    /// `BENCH_F_*` bits.
    pub flags: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY (all impls): repr(C), integer fields only, padding written out as fields.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for BackendAddr {}
    unsafe impl aya::Pod for BackendVips {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for FlowBudget {}
    unsafe impl aya::Pod for Conn {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for BenchFrame {}
    unsafe impl aya::Pod for PathCounters {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for WakeEvent {}
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn service_key_layout() {
        assert_eq!(offset_of!(ServiceKey, vip_be), 0);
        assert_eq!(offset_of!(ServiceKey, port_be), 4);
        assert_eq!(offset_of!(ServiceKey, proto), 6);
        assert_eq!(offset_of!(ServiceKey, _pad), 7);
    }

    #[test]
    fn service_layout() {
        assert_eq!(offset_of!(Service, id), 0);
        assert_eq!(offset_of!(Service, table), 4);
        assert_eq!(offset_of!(Service, backend_count), 8);
        assert_eq!(offset_of!(Service, mode), 12);
        assert_eq!(offset_of!(Service, flags), 16);
        assert_eq!(offset_of!(Service, source_be), 20);
    }

    #[test]
    fn wake_event_layout() {
        assert_eq!(offset_of!(WakeEvent, service_id), 0);
        assert_eq!(offset_of!(WakeEvent, proto), 4);
        assert_eq!(offset_of!(WakeEvent, at_ns), 8);
    }

    #[test]
    fn backend_layout() {
        assert_eq!(offset_of!(Backend, ip_be), 0);
        assert_eq!(offset_of!(Backend, port_be), 4);
        assert_eq!(offset_of!(Backend, _pad), 6);
        assert_eq!(offset_of!(Backend, service_id), 8);
        assert_eq!(offset_of!(Backend, flags), 12);
        assert_eq!(offset_of!(Backend, snat_ip_be), 16);
        assert_eq!(offset_of!(Backend, _pad2), 20);
    }

    #[test]
    fn flow_key_layout() {
        assert_eq!(offset_of!(FlowKey, src_ip_be), 0);
        assert_eq!(offset_of!(FlowKey, dst_ip_be), 4);
        assert_eq!(offset_of!(FlowKey, src_port_be), 8);
        assert_eq!(offset_of!(FlowKey, dst_port_be), 10);
        assert_eq!(offset_of!(FlowKey, proto), 12);
        assert_eq!(offset_of!(FlowKey, _pad), 13);
    }

    #[test]
    fn backend_addr_layout() {
        assert_eq!(offset_of!(BackendAddr, ip_be), 0);
        assert_eq!(offset_of!(BackendAddr, port_be), 4);
        assert_eq!(offset_of!(BackendAddr, proto), 6);
        assert_eq!(offset_of!(BackendAddr, _pad), 7);
    }

    #[test]
    fn conn_layout() {
        assert_eq!(offset_of!(Conn, nat_ip_be), 0);
        assert_eq!(offset_of!(Conn, nat_port_be), 4);
        assert_eq!(offset_of!(Conn, tcp_seen), 6);
        assert_eq!(offset_of!(Conn, _pad), 7);
        assert_eq!(offset_of!(Conn, backend_id), 8);
        assert_eq!(offset_of!(Conn, service_id), 12);
        assert_eq!(offset_of!(Conn, last_seen_ns), 16);
        assert_eq!(offset_of!(Conn, client_ifindex), 24);
        assert_eq!(offset_of!(Conn, client_mac), 28);
        assert_eq!(offset_of!(Conn, local_mac), 34);
        assert_eq!(offset_of!(Conn, snat_ip_be), 40);
        assert_eq!(offset_of!(Conn, snat_port_be), 44);
        assert_eq!(offset_of!(Conn, _pad2), 46);
    }

    #[test]
    fn settings_layout() {
        assert_eq!(offset_of!(Settings, non_syn_flows_per_sec), 0);
        assert_eq!(offset_of!(Settings, snat_port_min), 4);
        assert_eq!(offset_of!(Settings, snat_port_max), 6);
    }

    #[test]
    fn sock_rev_key_layout() {
        assert_eq!(offset_of!(SockRevKey, cookie), 0);
        assert_eq!(offset_of!(SockRevKey, backend_ip_be), 8);
        assert_eq!(offset_of!(SockRevKey, backend_port_be), 12);
        assert_eq!(offset_of!(SockRevKey, _pad), 14);
    }

    #[test]
    fn sock_ops_are_dense_and_named_uniquely() {
        for (i, op) in SockOp::ALL.iter().enumerate() {
            assert_eq!(*op as u32, i as u32);
            for other in &SockOp::ALL[..i] {
                assert_ne!(other.name(), op.name());
            }
        }
    }

    #[test]
    fn counters_layout() {
        assert_eq!(offset_of!(Counters, packets), 0);
        assert_eq!(offset_of!(Counters, bytes), 8);
        assert_eq!(offset_of!(Counters, new_flows), 16);
        assert_eq!(offset_of!(Counters, reply_packets), 24);
        assert_eq!(offset_of!(Counters, reply_bytes), 32);
        assert_eq!(offset_of!(Counters, closed_flows), 40);
    }

    #[test]
    fn reasons_are_dense_and_named_uniquely() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
            for other in &Reason::ALL[..i] {
                assert_ne!(other.name(), r.name());
            }
        }
        assert!(!Reason::PassFragment.is_drop());
        assert!(Reason::DropTruncatedEth.is_drop());
        assert!(Reason::IcmpForwarded.is_translated() && !Reason::IcmpForwarded.is_drop());
        assert!(!Reason::PassIcmpNoFlow.is_translated());
        assert!(!Reason::PassIpv6ExtHeader.is_drop() && !Reason::PassIpv6NoProgram.is_drop());
        assert!(Reason::DropUdp6NoChecksum.is_drop());
    }

    #[test]
    fn paths_are_dense_and_named_uniquely() {
        for (i, p) in Path::ALL.iter().enumerate() {
            assert_eq!(*p as u32, i as u32);
            for other in &Path::ALL[..i] {
                assert_ne!(other.name(), p.name());
            }
        }
        assert!(Path::RepliedFlowMacs.is_fast());
        assert!(!Path::PassFibNoNeigh.is_fast());
    }

    #[test]
    fn a_tcp_flow_closes_on_both_fins_or_one_rst() {
        use TcpState::*;
        const FIN: u8 = 0x01;
        const RST: u8 = 0x04;
        const ACK: u8 = 0x10;
        let run = |packets: &[(u8, bool)]| {
            packets.iter().fold(0, |seen, (flags, from_backend)| tcp_seen_after(seen, *flags, *from_backend))
        };
        assert_eq!(TcpState::of(0), HalfOpen, "a SYN alone");
        assert_eq!(TcpState::of(run(&[(ACK, false)])), HalfOpen, "the client alone never opens a flow");
        assert_eq!(TcpState::of(run(&[(ACK, true)])), Open);
        assert_eq!(TcpState::of(run(&[(ACK, true), (FIN | ACK, false)])), Open, "one FIN half-closes");
        assert_eq!(TcpState::of(run(&[(ACK, true), (FIN | ACK, true)])), Open);
        assert_eq!(TcpState::of(run(&[(ACK, true), (FIN | ACK, false), (FIN | ACK, true)])), Closed);
        assert_eq!(TcpState::of(run(&[(FIN | ACK, true), (ACK, true), (FIN, false)])), Closed);
        assert_eq!(TcpState::of(run(&[(RST, false)])), Closed, "an RST from the client");
        assert_eq!(TcpState::of(run(&[(ACK, true), (RST | ACK, true)])), Closed, "an RST from the backend");
    }

    #[test]
    fn the_flow_budget_refills_every_second() {
        let mut b = FlowBudget::default();
        let t0 = 5_000_000_000;
        assert!((0..3).all(|_| b.take(t0, 3)));
        assert!(!b.take(t0 + 999_999_999, 3));
        assert!(b.take(t0 + 1_000_000_000, 3));
        assert!(!FlowBudget::default().take(t0, 0));
        let mut unlimited = FlowBudget::default();
        assert!((0..1000).all(|_| unlimited.take(t0, u32::MAX)));
    }

    #[test]
    fn maglev_index_stays_in_bounds() {
        let last = maglev_index(MAX_SERVICES - 1, 1, u32::MAX);
        assert!(last < MAGLEV_ENTRIES);
        assert_eq!(maglev_index(0, 0, 0), 0);
        assert_eq!(maglev_index(0, 1, 0), MAGLEV_TABLE_SIZE);
        assert_eq!(maglev_index(1, 0, 5), 2 * MAGLEV_TABLE_SIZE + 5);
    }
}
