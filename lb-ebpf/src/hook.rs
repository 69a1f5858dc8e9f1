//! The two hooks the program runs at, behind one trait: XDP on NICs
//! (`xdp_lb`, `xdp_lb_local`) and tc on the devices that face local stacks
//! (`tc_lb`). Parsing, the service lookup, the Maglev pick, the flow
//! entries, the FIB lookup and the counters are shared (`parse`, `nat`,
//! `route`, `stats`); what differs is here: how far the packet reaches,
//! the L4 checksum update, and how a packet is sent on.
//!
//! In XDP a frame is bytes only: a partial checksum (CHECKSUM_PARTIAL) must
//! be guessed from them and cannot leave on the fast path (a redirected
//! frame loses the mark), and a redirect needs a device that can transmit
//! XDP frames. In tc the skb keeps its checksum state: the kernel's own
//! helpers update the checksum as that state asks, and a redirect keeps it,
//! into any device (a bridge does its FDB lookup), past the martian check.

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::generated::{bpf_redirect, bpf_redirect_neigh, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::{Conn, Path, Reason, PROTO_UDP, TCP_RST};

use crate::{
    nat::{self, L4Checksums},
    parse::{ptr_at, EthHdr, Ipv4Hdr, ETH_HLEN},
    refuse,
    route::{self, NextHop},
    Packet, Verdict, EGRESS,
};

/// What a program does with a packet it does not send on itself.
#[derive(Clone, Copy)]
pub enum Action {
    /// Not ours (left untouched): on to whatever comes next, as if the
    /// program were not there.
    Pass,
    /// Translated, but it cannot leave on the fast path: up to the stack.
    PassTranslated,
    Drop,
}

/// One hook's view of a packet and its ways to send it on.
pub trait Hook: EbpfContext {
    /// The directly accessible bytes: `[data, data_end)`.
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The whole packet's length (beyond `data_end` for a paged skb).
    fn packet_len(&self) -> usize;
    fn ingress_ifindex(&self) -> u32;
    /// Make the first `len` bytes (or the whole packet, if shorter) directly
    /// accessible, as far as the hook can. Invalidates every pointer into
    /// the packet (tc).
    fn pull(&self, len: usize);
    /// The program's return value for `action`.
    fn action(action: Action) -> u32;
    /// After the addresses and ports of `pkt` changed (`old_*` to `new_*`,
    /// already written) and the IP header checksum with them: update the L4
    /// checksum. Returns whether it is a partial one that cannot leave on the
    /// fast path. May invalidate `pkt`'s pointers (tc): nothing reads them
    /// after this but `send`, which takes fresh ones.
    fn update_l4_checksum(&self, pkt: &Packet, old_ip: u32, new_ip: u32, old_port: u16, new_port: u16) -> bool;
    /// The IPv4 total length to give bpf_fib_lookup (0: let the kernel check
    /// the packet itself against the egress MTU).
    fn fib_tot_len(&self, pkt: &Packet) -> u16;
    /// Send the translated packet to `hop` (MACs set, TTL decremented).
    fn send(&self, pkt: &Packet, hop: &NextHop) -> (u32, Path);
    /// Send the frame as it is (its MACs already written) out of `ifindex`;
    /// XDP_PASS / TC_ACT_OK with the reason where it cannot leave there.
    fn transmit(&self, ingress_ifindex: u32, ifindex: u32) -> (u32, Path);
    /// Room for `len` more bytes before the frame (an outer header, see
    /// `dsr`); false where the hook cannot make it. Invalidates every
    /// pointer into the packet.
    fn grow_head(&self, len: usize) -> bool;
    /// Whether `pkt` (untouched) can get an outer header and leave on the
    /// fast path (see `dsr`): not with a partial L4 checksum, which a
    /// redirected frame would lose, and not at tc yet.
    fn can_encapsulate(&self, pkt: &Packet) -> bool;
    /// The FIB found the egress interface `ifindex` but no neighbour entry.
    fn send_no_neigh(&self, pkt: &Packet, ifindex: u32, flow: Option<&Conn>) -> (u32, Path);
    /// A new flow to a service with no usable backend: answer the client,
    /// or drop the packet where the hook cannot (see `refuse`).
    fn refuse(&self, pkt: &Packet) -> Result<(u32, Reason), Verdict>;
}

/// `data` and `data_end` from the wrapped context, which has both as
/// inherent methods (aya has no trait for them).
macro_rules! packet_bounds {
    () => {
        #[inline(always)]
        fn data(&self) -> usize {
            self.ctx.data()
        }
        #[inline(always)]
        fn data_end(&self) -> usize {
            self.ctx.data_end()
        }
    };
}

/// The XDP hook, with what the interface's L4 checksums can be.
pub struct Xdp<'a> {
    pub ctx: &'a XdpContext,
    pub l4: L4Checksums,
}

impl EbpfContext for Xdp<'_> {
    fn as_ptr(&self) -> *mut core::ffi::c_void {
        self.ctx.as_ptr()
    }
}

impl Hook for Xdp<'_> {
    packet_bounds!();
    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.ctx.data_end() - self.ctx.data()
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        self.ctx.ingress_ifindex() as u32
    }
    /// A frame is all there.
    #[inline(always)]
    fn pull(&self, _len: usize) {}
    #[inline(always)]
    fn action(action: Action) -> u32 {
        match action {
            Action::Pass | Action::PassTranslated => xdp_action::XDP_PASS,
            Action::Drop => xdp_action::XDP_DROP,
        }
    }
    #[inline(always)]
    fn update_l4_checksum(&self, pkt: &Packet, old_ip: u32, new_ip: u32, old_port: u16, new_port: u16) -> bool {
        // SAFETY: XDP helpers move no packet data, so parse_packet's
        // bounds-checked pointers are still good.
        unsafe { nat::update_l4_in_place(pkt, old_ip, new_ip, old_port, new_port, self.l4) }
    }
    #[inline(always)]
    fn fib_tot_len(&self, pkt: &Packet) -> u16 {
        pkt.tot_len
    }
    /// XDP_TX back out of the ingress interface, or XDP_REDIRECT through
    /// `EGRESS`; an interface the agent did not put there passes up
    /// untouched (the devmap lookup's fallback action), before any byte
    /// changes.
    #[inline(always)]
    fn send(&self, pkt: &Packet, hop: &NextHop) -> (u32, Path) {
        let (action, path) = self.transmit(pkt.ingress_ifindex, hop.ifindex);
        if action == xdp_action::XDP_PASS {
            return (action, path);
        }
        // SAFETY: bounds-checked by parse_packet; the redirect itself
        // happens after the program returns, so the frame may still change.
        unsafe { route::set_macs_and_ttl(pkt.eth, pkt.ip, hop) };
        (action, if hop.from_flow { Path::RepliedFlowMacs } else { path })
    }
    #[inline(always)]
    fn transmit(&self, ingress_ifindex: u32, ifindex: u32) -> (u32, Path) {
        if EGRESS.get_ifindex(ifindex).is_none() {
            (xdp_action::XDP_PASS, Path::PassEgressNotReady)
        } else if ifindex == ingress_ifindex {
            (xdp_action::XDP_TX, Path::TxBack)
        } else {
            match EGRESS.redirect(ifindex, xdp_action::XDP_PASS as u64) {
                Ok(action) => (action, Path::Redirected),
                Err(_) => (xdp_action::XDP_PASS, Path::PassEgressNotReady),
            }
        }
    }
    #[inline(always)]
    fn grow_head(&self, len: usize) -> bool {
        // SAFETY: a plain helper call on the program's own context.
        unsafe { bpf_xdp_adjust_head(self.ctx.ctx, -(len as i32)) == 0 }
    }
    #[inline(always)]
    fn can_encapsulate(&self, pkt: &Packet) -> bool {
        // SAFETY: bounds-checked by parse_packet.
        !nat::is_partial(pkt, unsafe { *pkt.l4_check }, self.l4)
    }
    /// A reply from a VIP that is a local address cannot pass up (the
    /// kernel drops it as a martian): the MACs its flow's client packet
    /// arrived with stand in for the missing neighbour entry.
    #[inline(always)]
    fn send_no_neigh(&self, pkt: &Packet, ifindex: u32, flow: Option<&Conn>) -> (u32, Path) {
        match flow {
            Some(c) if c.client_ifindex != 0 && c.client_ifindex == ifindex => {
                self.send(pkt, &NextHop { ifindex, dst_mac: c.client_mac, src_mac: c.local_mac, from_flow: true })
            }
            _ => (xdp_action::XDP_PASS, Path::PassFibNoNeigh),
        }
    }
    #[inline(always)]
    fn refuse(&self, pkt: &Packet) -> Result<(u32, Reason), Verdict> {
        refuse::answer(self, pkt)
    }
}

/// The tc hook (a `#[classifier]` on ingress).
pub struct Tc<'a> {
    pub ctx: &'a TcContext,
}

impl EbpfContext for Tc<'_> {
    fn as_ptr(&self) -> *mut core::ffi::c_void {
        self.ctx.as_ptr()
    }
}

// tc verdicts (include/uapi/linux/pkt_cls.h), as the program returns them.
const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// Where the IPv4 header starts (parse_packet passes anything else).
const IP_OFF: usize = ETH_HLEN;

impl Tc<'_> {
    /// The headers the program reads, in the skb's linear part: a packet
    /// from a local stack or GRO may keep only part of them there.
    #[inline(always)]
    pub fn pull_headers(&self) {
        // Ethernet, IPv4 without options, a TCP header without options.
        self.pull(ETH_HLEN + 20 + 20);
    }

    /// TTL - 1 and the MACs (when `hop` has them), through pointers taken
    /// afresh: the checksum helpers invalidated parse_packet's.
    #[inline(always)]
    fn rewrite_l2_and_ttl(&self, hop: Option<&NextHop>) -> bool {
        let (Some(eth), Some(ip)) = (ptr_at::<EthHdr, _>(self, 0), ptr_at::<Ipv4Hdr, _>(self, IP_OFF)) else {
            return false;
        };
        // SAFETY: both bounds-checked just now.
        unsafe {
            match hop {
                Some(hop) => route::set_macs_and_ttl(eth, ip, hop),
                None => route::decrement_ttl(ip),
            }
        }
        true
    }
}

impl Hook for Tc<'_> {
    packet_bounds!();
    #[inline(always)]
    fn packet_len(&self) -> usize {
        self.ctx.len() as usize
    }
    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the context pointer the kernel handed the program.
        unsafe { (*self.ctx.skb.skb).ingress_ifindex }
    }
    #[inline(always)]
    fn pull(&self, len: usize) {
        let want = len.min(self.packet_len());
        if self.data_end() - self.data() < want {
            // A failure leaves the packet as it was: the parsers then find
            // it short and say so.
            let _ = self.ctx.pull_data(want as u32);
        }
    }
    #[inline(always)]
    fn action(action: Action) -> u32 {
        match action {
            // TCX_NEXT / the next filter: a tc program of someone else's
            // after ours still sees what is not ours.
            Action::Pass => TC_ACT_UNSPEC,
            Action::PassTranslated => TC_ACT_OK,
            Action::Drop => TC_ACT_SHOT,
        }
    }
    /// The kernel's helpers update the checksum as the skb's state asks:
    /// a CHECKSUM_PARTIAL field gets only the pseudo-header's part (the
    /// device finishes it), a CHECKSUM_COMPLETE skb gets its `csum` fixed
    /// too. Never a partial checksum the fast path cannot send.
    #[inline(always)]
    fn update_l4_checksum(&self, pkt: &Packet, old_ip: u32, new_ip: u32, old_port: u16, new_port: u16) -> bool {
        let off = pkt.l4_check_off as usize;
        // A zero UDP checksum means "none" and stays so.
        let udp = if pkt.proto == PROTO_UDP { BPF_F_MARK_MANGLED_0 as u64 } else { 0 };
        // Errors here mean an offset beyond the packet, which parse_packet
        // rules out.
        let _ = self.ctx.l4_csum_replace(off, old_ip as u64, new_ip as u64, BPF_F_PSEUDO_HDR as u64 | udp | 4);
        let _ = self.ctx.l4_csum_replace(off, old_port as u64, new_port as u64, udp | 2);
        false
    }
    #[inline(always)]
    fn fib_tot_len(&self, _pkt: &Packet) -> u16 {
        // A GSO skb is larger than the MTU and still fits once segmented:
        // with 0 the kernel checks the skb as it would forward it
        // (is_skb_forwardable in bpf_skb_fib_lookup).
        0
    }
    /// bpf_redirect to the egress of any device: no devmap, no XDP
    /// transmit needed; the skb keeps its GSO and checksum state.
    #[inline(always)]
    fn send(&self, pkt: &Packet, hop: &NextHop) -> (u32, Path) {
        if !self.rewrite_l2_and_ttl(Some(hop)) {
            return (TC_ACT_OK, Path::PassFibUnsupported);
        }
        self.transmit(pkt.ingress_ifindex, hop.ifindex)
    }
    #[inline(always)]
    fn transmit(&self, ingress_ifindex: u32, ifindex: u32) -> (u32, Path) {
        // SAFETY: a plain helper call; flags 0 is the egress of `ifindex`.
        let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
        (action, if ifindex == ingress_ifindex { Path::TxBack } else { Path::Redirected })
    }
    /// Not done at tc yet (it would take bpf_skb_adjust_room with the
    /// encapsulation flags): `dsr` drops, counted.
    #[inline(always)]
    fn grow_head(&self, _len: usize) -> bool {
        false
    }
    #[inline(always)]
    fn can_encapsulate(&self, _pkt: &Packet) -> bool {
        false
    }
    /// bpf_redirect_neigh: the kernel resolves the neighbour itself (and
    /// writes the L2 header), so this packet needs no pass up either
    /// (kernel >= 5.10).
    #[inline(always)]
    fn send_no_neigh(&self, _pkt: &Packet, ifindex: u32, _flow: Option<&Conn>) -> (u32, Path) {
        if !self.rewrite_l2_and_ttl(None) {
            return (TC_ACT_OK, Path::PassFibNoNeigh);
        }
        // SAFETY: no parameters: the kernel looks the next hop up by the
        // packet's destination.
        let action = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as u32;
        if action != TC_ACT_REDIRECT {
            return (TC_ACT_OK, Path::PassFibNoNeigh);
        }
        (action, Path::RedirectedNeigh)
    }
    /// tc writes no answer of its own: a partial checksum the skb carries
    /// would be finished over the answer's full one (see `refuse`). Where
    /// the kernel would not forward the request (`route::not_forwarded`:
    /// above all a VIP that is an address of this host), the request passes
    /// up untouched and the kernel's stack answers it as any closed port
    /// does (a reset; an ICMP port unreachable, at the kernel's ICMP rate).
    /// A reset is not answered, and a request the kernel would forward is
    /// dropped.
    #[inline(always)]
    fn refuse(&self, pkt: &Packet) -> Result<(u32, Reason), Verdict> {
        if pkt.tcp_flags & TCP_RST != 0 || !route::not_forwarded(self, pkt) {
            return Err(Verdict::drop(Reason::DropNoBackend));
        }
        let reason = if pkt.proto == PROTO_UDP { Reason::UnreachableNoBackend } else { Reason::ResetNoBackend };
        Ok((Self::action(Action::Pass), reason))
    }
}
