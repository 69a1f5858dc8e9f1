//! Which way the kernel routes an address from this network namespace:
//! one rtnetlink `RTM_GETROUTE` per address (what `ip route get ADDR`
//! asks), on a NETLINK_ROUTE socket of the calling thread's namespace.
//! No subprocess, so `run` can ask on a reload without waiting on `ip`.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::ports::{Route, Routes};

// uapi/linux/netlink.h and rtnetlink.h.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const RTMSG_LEN: usize = 12;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_PREFSRC: u16 = 7;
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;

/// Asks the routing of the namespace the calling thread was in when it
/// was opened.
pub struct RouteLookup {
    socket: NetlinkSocket,
    seq: u32,
}

impl RouteLookup {
    pub fn open() -> io::Result<Self> {
        Ok(Self { socket: NetlinkSocket::open()?, seq: 0 })
    }

    /// The kernel's route to `addr`: the interface it leaves by, a local
    /// address, or why there is none (the error `ip route get` would print).
    pub fn route_to(&mut self, addr: Ipv4Addr) -> io::Result<Route> {
        parse_route_reply(&self.ask(addr.into())?, if_name)
    }

    /// The address the kernel would send from to `addr` (`ip route get`'s
    /// "src"): the address of the interface the route leaves by, or the
    /// route's own preferred source. `None` without a usable route. Either
    /// family: full NAT sends IPv6 flows from an IPv6 address.
    pub fn source_to(&mut self, addr: IpAddr) -> io::Result<Option<IpAddr>> {
        parse_route_source(&self.ask(addr)?)
    }

    /// The kernel's answer to one `RTM_GETROUTE` for `addr`.
    fn ask(&mut self, addr: IpAddr) -> io::Result<Vec<u8>> {
        self.seq = self.seq.wrapping_add(1);
        self.socket.send(&get_route_request(addr, self.seq))?;
        let mut buf = vec![0u8; 8192];
        let n = self.socket.recv(&mut buf)?;
        // An answer to an earlier request would name another address.
        if buf.get(8..12) != Some(&self.seq.to_ne_bytes()[..]) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "RTM_GETROUTE reply: not to our request"));
        }
        buf.truncate(n);
        Ok(buf)
    }
}

/// The source address the kernel would use towards each of `addrs`; an
/// address with no usable route is left out.
pub fn sources_to(addrs: impl IntoIterator<Item = IpAddr>) -> anyhow::Result<BTreeMap<IpAddr, IpAddr>> {
    let mut lookup = RouteLookup::open().map_err(|e| anyhow::anyhow!("open a netlink socket for routes: {e}"))?;
    let mut out = BTreeMap::new();
    for addr in addrs {
        let source = lookup.source_to(addr).map_err(|e| anyhow::anyhow!("look up the source towards {addr}: {e}"))?;
        out.extend(source.map(|s| (addr, s)));
    }
    Ok(out)
}

/// The kernel's route to each of `addrs`, on one netlink socket.
pub fn routes_to(addrs: impl IntoIterator<Item = Ipv4Addr>) -> anyhow::Result<BTreeMap<Ipv4Addr, Route>> {
    let mut lookup = RouteLookup::open().map_err(|e| anyhow::anyhow!("open a netlink socket for routes: {e}"))?;
    let mut out = BTreeMap::new();
    for addr in addrs {
        if let std::collections::btree_map::Entry::Vacant(e) = out.entry(addr) {
            e.insert(lookup.route_to(addr).map_err(|e| anyhow::anyhow!("look up the route to {addr}: {e}"))?);
        }
    }
    Ok(out)
}

/// What the data plane's routes are: the kernel's, in this namespace.
pub struct KernelRoutes;

impl Routes for KernelRoutes {
    fn routes(&self, addrs: &BTreeSet<Ipv4Addr>) -> anyhow::Result<BTreeMap<Ipv4Addr, Route>> {
        routes_to(addrs.iter().copied())
    }
    fn sources(&self, addrs: &BTreeSet<IpAddr>) -> anyhow::Result<BTreeMap<IpAddr, IpAddr>> {
        sources_to(addrs.iter().copied())
    }
}

/// `RTM_GETROUTE` for `addr`/32 (/128): a header, an `rtmsg` and one
/// `RTA_DST`.
fn get_route_request(addr: IpAddr, seq: u32) -> Vec<u8> {
    let (family, octets) = match addr {
        IpAddr::V4(a) => (libc::AF_INET, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6, a.octets().to_vec()),
    };
    let len = NLMSG_HDRLEN + RTMSG_LEN + 4 + octets.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_GETROUTE.to_ne_bytes());
    msg.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    // pid 0: the kernel.
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
    msg.extend_from_slice(&[family as u8, 8 * octets.len() as u8, 0, 0, 0, 0, 0, 0]);
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&(4 + octets.len() as u16).to_ne_bytes());
    msg.extend_from_slice(&RTA_DST.to_ne_bytes());
    msg.extend_from_slice(&octets);
    msg
}

/// The kernel's answer to [`get_route_request`]: an `RTM_NEWROUTE`, or an
/// error message (no route, unreachable, prohibited, blackhole).
/// `if_name` names an interface index.
fn parse_route_reply(reply: &[u8], if_name: impl Fn(u32) -> Option<String>) -> io::Result<Route> {
    let (route_type, attrs) = match route_attributes(reply)? {
        Ok(found) => found,
        Err(errno) => return Ok(Route::Unusable(route_error(errno))),
    };
    let oif = attrs.iter().find(|(t, v)| *t == RTA_OIF && v.len() >= 4).map(|(_, v)| u32_at(v, 0));
    Ok(match (route_type, oif) {
        (RTN_LOCAL, _) => Route::Local,
        (RTN_UNICAST, Some(i)) => Route::Via(if_name(i).unwrap_or_else(|| format!("ifindex {i}"))),
        (t, _) => Route::Unusable(format!("route of type {t}")),
    })
}

/// The preferred source (`RTA_PREFSRC`) of a unicast route in `reply`:
/// 4 bytes for IPv4, 16 for IPv6.
fn parse_route_source(reply: &[u8]) -> io::Result<Option<IpAddr>> {
    Ok(match route_attributes(reply)? {
        Ok((RTN_UNICAST, attrs)) => attrs.iter().find(|(t, _)| *t == RTA_PREFSRC).and_then(|(_, v)| {
            if let Ok(o) = <[u8; 16]>::try_from(*v) {
                Some(IpAddr::V6(Ipv6Addr::from(o)))
            } else {
                <[u8; 4]>::try_from(*v).ok().map(|o| IpAddr::V4(Ipv4Addr::from(o)))
            }
        }),
        _ => None,
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A route's type and its attributes (type, payload).
type RouteAttributes<'a> = (u8, Vec<(u16, &'a [u8])>);

/// An `RTM_NEWROUTE` reply's route type and attributes (type, payload), or
/// the errno of an error reply.
fn route_attributes(reply: &[u8]) -> io::Result<Result<RouteAttributes<'_>, i32>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("RTM_GETROUTE reply: {what}"));
    let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
    if reply.len() < NLMSG_HDRLEN {
        return Err(bad("shorter than a header"));
    }
    let len = (u32_at(reply, 0) as usize).min(reply.len());
    match u16_at(reply, 4) {
        NLMSG_ERROR if len >= NLMSG_HDRLEN + 4 => return Ok(Err(-(u32_at(reply, NLMSG_HDRLEN) as i32))),
        libc::RTM_NEWROUTE if len >= NLMSG_HDRLEN + RTMSG_LEN => {}
        other => return Err(bad(&format!("message type {other}, {len} bytes"))),
    }
    let route_type = reply[NLMSG_HDRLEN + 7];
    let mut attrs = Vec::new();
    let mut at = NLMSG_HDRLEN + RTMSG_LEN;
    while at + 4 <= len {
        let (attr_len, attr_type) = (u16_at(reply, at) as usize, u16_at(reply, at + 2));
        if attr_len < 4 || at + attr_len > len {
            return Err(bad("attribute beyond the message"));
        }
        attrs.push((attr_type, &reply[at + 4..at + attr_len]));
        at += attr_len.next_multiple_of(4);
    }
    Ok(Ok((route_type, attrs)))
}

/// What an error answer means: the route types that refuse
/// (`fib_props` in net/ipv4/fib_semantics.c) by name, else the errno's
/// text ("Network is unreachable" when there is no route at all).
fn route_error(errno: i32) -> String {
    match errno {
        libc::EINVAL => "a blackhole route".to_owned(),
        libc::EACCES => "a prohibit route".to_owned(),
        libc::EHOSTUNREACH => "an unreachable route".to_owned(),
        _ => {
            let text = io::Error::from_raw_os_error(errno).to_string();
            // Without io::Error's " (os error 101)".
            text.split(" (os error").next().unwrap_or_default().to_owned()
        }
    }
}

/// The name of interface `index` in this namespace.
fn if_name(index: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes if_indextoname writes at most.
    let p = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success `name` holds a NUL-terminated string.
    Some(unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned())
}

/// A NETLINK_ROUTE socket, closed on drop.
struct NetlinkSocket(std::os::fd::OwnedFd);

impl NetlinkSocket {
    fn open() -> io::Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain syscall; the descriptor is owned from here on.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just opened and nothing else owns.
        Ok(Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    /// To the kernel (port 0), which answers before `sendto` returns.
    fn send(&self, msg: &[u8]) -> io::Result<()> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: all-zero is a valid sockaddr_nl; family set below.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `msg` and `kernel` outlive the call, lengths are theirs.
        let n = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: `buf` is writable for its length. MSG_DONTWAIT: the
        // answer is queued already, so never block the agent's loop.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: usize, kind: u16) -> Vec<u8> {
        let mut m = (len as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m
    }

    /// An RTM_NEWROUTE of `route_type` with an RTA_TABLE and, if given, an RTA_OIF.
    fn new_route(route_type: u8, oif: Option<u32>) -> Vec<u8> {
        let len = NLMSG_HDRLEN + RTMSG_LEN + 8 + if oif.is_some() { 8 } else { 0 };
        let mut m = header(len, libc::RTM_NEWROUTE);
        m.extend_from_slice(&[libc::AF_INET as u8, 32, 0, 0, 254, 0, 0, route_type, 0, 0, 0, 0]);
        m.extend_from_slice(&[8, 0, 15, 0, 254, 0, 0, 0]); // RTA_TABLE
        if let Some(i) = oif {
            m.extend_from_slice(&8u16.to_ne_bytes());
            m.extend_from_slice(&RTA_OIF.to_ne_bytes());
            m.extend_from_slice(&i.to_ne_bytes());
        }
        m
    }

    fn names(i: u32) -> Option<String> {
        (i == 7).then(|| "eth7".to_owned())
    }

    #[test]
    fn the_request_asks_for_one_ipv4_destination() {
        let m = get_route_request(Ipv4Addr::new(10, 1, 2, 3).into(), 9);
        assert_eq!(m.len(), 36);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 36);
        assert_eq!(&m[16..18], &[libc::AF_INET as u8, 32]);
        assert_eq!(&m[32..36], &[10, 1, 2, 3]);
    }

    #[test]
    fn an_ipv6_request_carries_the_whole_address() {
        let addr: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let m = get_route_request(addr.into(), 9);
        assert_eq!((m.len(), u32::from_ne_bytes(m[0..4].try_into().unwrap())), (48, 48));
        assert_eq!(&m[16..18], &[libc::AF_INET6 as u8, 128]);
        assert_eq!(u16::from_ne_bytes([m[28], m[29]]), 20, "RTA_DST's length");
        assert_eq!(&m[32..48], &addr.octets());
    }

    #[test]
    fn replies_parse() {
        assert_eq!(parse_route_reply(&new_route(RTN_UNICAST, Some(7)), names).unwrap(), Route::Via("eth7".into()));
        assert_eq!(parse_route_reply(&new_route(RTN_UNICAST, Some(8)), names).unwrap(), Route::Via("ifindex 8".into()));
        assert_eq!(parse_route_reply(&new_route(RTN_LOCAL, Some(1)), names).unwrap(), Route::Local);
        assert!(matches!(parse_route_reply(&new_route(6, None), names).unwrap(), Route::Unusable(_)));
        let mut err = header(NLMSG_HDRLEN + 4, NLMSG_ERROR);
        err.extend_from_slice(&(-libc::ENETUNREACH).to_ne_bytes());
        let Route::Unusable(why) = parse_route_reply(&err, names).unwrap() else { panic!("an error is no route") };
        assert_eq!(why, "Network is unreachable");
        assert!(parse_route_reply(&err[..8], names).is_err());
        let mut cut = new_route(RTN_UNICAST, Some(7));
        cut[NLMSG_HDRLEN + RTMSG_LEN] = 200; // an attribute longer than the message
        assert!(parse_route_reply(&cut, names).is_err());
    }

    #[test]
    fn the_preferred_source_parses() {
        let mut m = new_route(RTN_UNICAST, Some(7));
        m.extend_from_slice(&8u16.to_ne_bytes());
        m.extend_from_slice(&RTA_PREFSRC.to_ne_bytes());
        m.extend_from_slice(&[10, 200, 1, 1]);
        let len = m.len() as u32;
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(parse_route_source(&m).unwrap(), Some(Ipv4Addr::new(10, 200, 1, 1).into()));
        let mut m6 = new_route(RTN_UNICAST, Some(7));
        m6.extend_from_slice(&20u16.to_ne_bytes());
        m6.extend_from_slice(&RTA_PREFSRC.to_ne_bytes());
        let src: Ipv6Addr = "2001:db8:1::fe".parse().unwrap();
        m6.extend_from_slice(&src.octets());
        let len = m6.len() as u32;
        m6[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(parse_route_source(&m6).unwrap(), Some(src.into()));
        assert_eq!(parse_route_source(&new_route(RTN_UNICAST, Some(7))).unwrap(), None);
        let mut local = m.clone();
        local[NLMSG_HDRLEN + 7] = RTN_LOCAL;
        assert_eq!(parse_route_source(&local).unwrap(), None, "a local address is no route out");
    }

    /// This namespace's own loopback address is local, whoever runs it.
    #[test]
    fn loopback_is_local() {
        let mut routes = RouteLookup::open().unwrap();
        for _ in 0..2 {
            assert_eq!(routes.route_to(Ipv4Addr::LOCALHOST).unwrap(), Route::Local);
        }
    }
}
