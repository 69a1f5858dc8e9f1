//! The connection tables (`CONNTRACK`, and `CONNTRACK6` for IPv6 flows) as
//! `ports::ConnectionTable`: walks that count open flows per backend, and
//! flushes of one backend's flows. Backend ids are shared by both families,
//! so a walk and a flush cover both tables alike. Full NAT's port claims
//! (`SNAT_FLOWS`, `SNAT_FLOWS6`) go with their flows: a flow deleted here
//! gives its claim back, and a walk reaps claims whose flow is gone. A walk
//! reads up to `CONNTRACK_MAX` entries a table, so the agent runs these on a
//! worker off its loop, through handles of their own on the maps.

use std::{
    collections::BTreeMap,
    os::fd::AsFd as _,
    sync::{Mutex, MutexGuard},
};

use aya::maps::{HashMap, IterableMap as _, Map, MapData};
use lb_common::{
    v6::{ip6_addr, Conn6, FlowKey6, CONNTRACK6, SNAT_FLOWS6},
    Conn, FlowKey, TcpState, CONNTRACK, PROTO_TCP, PROTO_UDP, SNAT_FLOWS,
};

use super::{map_err, object::Maps};
use crate::{
    core::explain::{FlowSeen, TableKey},
    ports::{ConnectionTable, ConntrackScan, DataplaneError},
};

/// A UDP flow counts as open while it saw a packet this recently.
pub const UDP_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// A TCP flow whose backend never answered is forgotten after this long
/// idle (a walk deletes it): a SYN flood's entries leave the table early.
pub const HALF_OPEN_IDLE: std::time::Duration = std::time::Duration::from_secs(5);
/// A closed TCP flow (both FINs, or an RST) is kept this long after its
/// last packet, for the last ACKs and retransmissions, then deleted.
pub const CLOSED_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The connection tables through file descriptors of their own, so that
/// the worker that walks them shares nothing with the agent's `AyaDataplane`.
pub(super) struct AyaConnections {
    /// Removing entries takes `&mut`; walks and flushes take turns.
    map: Mutex<Tables>,
}

/// Both families' connection tables and full NAT's claims, locked together.
struct Tables {
    v4: Family<FlowKey, Conn>,
    v6: Family<FlowKey6, Conn6>,
}

/// One family's flows and claims (reply 5-tuple -> forward key), and the
/// flow table's size, fixed when the map was created.
struct Family<K, C> {
    flows: HashMap<MapData, K, C>,
    claims: HashMap<MapData, K, K>,
    max_entries: u32,
    name: &'static str,
}

/// A connection-table entry of either family, as the walks read it.
trait FlowEntry: aya::Pod {
    type Key: aya::Pod + PartialEq;
    /// The IPv4-shaped part: backend id, state, last packet, claimed port.
    fn conn(&self) -> &Conn;
    /// Its backend's address.
    fn backend(&self) -> std::net::SocketAddr;
    /// Its claim's key (`snat_reply_key`).
    fn reply_key(&self, key: &Self::Key) -> Self::Key;
    fn proto(key: &Self::Key) -> u8;
}

impl FlowEntry for Conn {
    type Key = FlowKey;
    fn conn(&self) -> &Conn {
        self
    }
    fn backend(&self) -> std::net::SocketAddr {
        std::net::SocketAddrV4::new(u32::from_be(self.nat_ip_be).into(), u16::from_be(self.nat_port_be)).into()
    }
    fn reply_key(&self, key: &FlowKey) -> FlowKey {
        self.snat_reply_key(key.proto)
    }
    fn proto(key: &FlowKey) -> u8 {
        key.proto
    }
}

impl FlowEntry for Conn6 {
    type Key = FlowKey6;
    fn conn(&self) -> &Conn {
        &self.conn
    }
    fn backend(&self) -> std::net::SocketAddr {
        std::net::SocketAddrV6::new(ip6_addr(self.nat_ip), u16::from_be(self.conn.nat_port_be), 0, 0).into()
    }
    fn reply_key(&self, key: &FlowKey6) -> FlowKey6 {
        self.snat_reply_key(key.proto)
    }
    fn proto(key: &FlowKey6) -> u8 {
        key.proto
    }
}

impl<C: FlowEntry> Family<C::Key, C> {
    /// Second handles on a family's flows and claims.
    fn open(
        flows: (&HashMap<MapData, C::Key, C>, &'static str),
        claims: (&HashMap<MapData, C::Key, C::Key>, &'static str),
    ) -> Result<Self, DataplaneError> {
        let (flows_map, max_entries) = second_handle(flows.0, flows.1)?;
        let (claims, _) = second_handle(claims.0, claims.1)?;
        Ok(Family { flows: flows_map, claims, max_entries, name: flows.1 })
    }

    /// Delete flow `key` and give its claim back (if it still holds it).
    /// Whether the flow's entry was there to delete.
    fn remove_flow(&mut self, key: &C::Key, conn: &C) -> bool {
        if conn.conn().snat_port_be != 0 {
            let rev = conn.reply_key(key);
            if self.claims.get(&rev, 0).is_ok_and(|holder| holder == *key) {
                // Gone meanwhile is fine.
                let _ = self.claims.remove(&rev);
            }
        }
        self.flows.remove(key).is_ok()
    }

    /// Delete claims whose flow is gone or holds another one (the flow was
    /// replaced, or evicted from the LRU table); returns the claims left.
    fn reap_claims(&mut self) -> u64 {
        let mut stale = Vec::new();
        let mut held = 0;
        for item in self.claims.iter() {
            let Ok((rev, fwd)) = item else { break };
            match self.flows.get(&fwd, 0) {
                Ok(conn) if conn.reply_key(&fwd) == rev => held += 1,
                _ => stale.push(rev),
            }
        }
        for rev in &stale {
            let _ = self.claims.remove(rev);
        }
        held
    }

    /// Count the open flows per backend id into `open`, delete those
    /// `is_expired` names; the entries left.
    fn walk(&mut self, now: u64, open: &mut BTreeMap<u32, u64>) -> u64 {
        let mut entries = 0;
        let mut expired = Vec::new();
        for item in self.flows.iter() {
            // An entry evicted mid-walk ends the walk early on some kernels;
            // a count that is briefly low is harmless (drains have deadlines).
            let Ok((key, entry)) = item else { break };
            entries += 1;
            let conn = entry.conn();
            if is_open(C::proto(&key), conn, now) {
                *open.entry(conn.backend_id).or_insert(0) += 1;
            }
            if is_expired(C::proto(&key), conn, now) {
                expired.push((key, entry));
            }
        }
        // Already gone (LRU eviction) is fine; a packet that came in
        // meanwhile re-creates the flow (a SYN, or within the budget).
        entries - expired.iter().filter(|(key, conn)| self.remove_flow(key, conn)).count() as u64
    }

    /// Delete backend `backend_id`'s flows; how many of them were open.
    fn flush(&mut self, backend_id: u32, now: u64) -> u64 {
        let of_backend: Vec<(C::Key, C)> =
            self.flows.iter().filter_map(Result::ok).filter(|(_, c)| c.conn().backend_id == backend_id).collect();
        // Already gone (LRU eviction) is fine.
        of_backend.iter().filter(|(k, c)| self.remove_flow(k, c) && is_open(C::proto(k), c.conn(), now)).count() as u64
    }

    /// `key`'s entry, with how long ago it saw a packet.
    fn look_up(&self, key: &C::Key) -> Result<Option<FlowSeen>, DataplaneError> {
        match self.flows.get(key, 0) {
            Ok(entry) => {
                let idle = monotonic_ns().saturating_sub(entry.conn().last_seen_ns);
                let (backend, tcp_seen) = (entry.backend(), entry.conn().tcp_seen);
                Ok(Some(FlowSeen { backend, tcp_seen, idle: std::time::Duration::from_nanos(idle) }))
            }
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(self.name, "look up a flow")(e)),
        }
    }
}

/// A second handle on `map` (a duplicate of its descriptor), and its size.
fn second_handle<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<(HashMap<MapData, K, V>, u32), DataplaneError> {
    let fd = map.map().fd().as_fd().try_clone_to_owned().map_err(map_err(name, "duplicate the fd"))?;
    let data = MapData::from_fd(fd).map_err(map_err(name, "open"))?;
    let max_entries = data.info().map_err(map_err(name, "read its info"))?.max_entries();
    let map = Map::from_map_data(data).map_err(map_err(name, "open"))?;
    Ok((HashMap::try_from(map).map_err(map_err(name, "open"))?, max_entries))
}

impl AyaConnections {
    /// Second handles on both connection tables and full NAT's claims.
    pub(super) fn open(maps: &Maps) -> Result<Self, DataplaneError> {
        let v4 = Family::open((&maps.conntrack, CONNTRACK), (&maps.snat_flows, SNAT_FLOWS))?;
        let v6 = Family::open((&maps.conntrack6, CONNTRACK6), (&maps.snat_flows6, SNAT_FLOWS6))?;
        Ok(AyaConnections { map: Mutex::new(Tables { v4, v6 }) })
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // A panic mid-walk leaves the maps as the kernel has them: still usable.
        self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ConnectionTable for AyaConnections {
    /// Open flows per backend id: TCP flows the backend answered and that
    /// are not closed, UDP flows active within `UDP_IDLE`; and the number of
    /// entries (one per flow) of each table. Deletes TCP flows half-open for
    /// `HALF_OPEN_IDLE` and closed for `CLOSED_GRACE`.
    fn scan(&self) -> Result<ConntrackScan, DataplaneError> {
        let mut map = self.lock();
        let now = monotonic_ns();
        let mut open = BTreeMap::new();
        let entries = map.v4.walk(now, &mut open);
        let entries6 = map.v6.walk(now, &mut open);
        let (snat_claims, snat_claims6) = (map.v4.reap_claims(), map.v6.reap_claims());
        Ok(ConntrackScan {
            open,
            entries,
            max_entries: map.v4.max_entries,
            snat_claims,
            entries6,
            max_entries6: map.v6.max_entries,
            snat_claims6,
        })
    }

    fn flush_backend(&self, backend_id: u32) -> Result<u64, DataplaneError> {
        let mut map = self.lock();
        let now = monotonic_ns();
        Ok(map.v4.flush(backend_id, now) + map.v6.flush(backend_id, now))
    }

    fn lookup(&self, key: &TableKey) -> Result<Option<FlowSeen>, DataplaneError> {
        let map = self.lock();
        match key {
            TableKey::V4(k) => map.v4.look_up(k),
            TableKey::V6(k) => map.v6.look_up(k),
        }
    }
}

/// Open as `scan` and drains count it (`proto`: the flow key's).
fn is_open(proto: u8, conn: &Conn, now_ns: u64) -> bool {
    if proto == PROTO_UDP {
        now_ns.saturating_sub(conn.last_seen_ns) < UDP_IDLE.as_nanos() as u64
    } else {
        TcpState::of(conn.tcp_seen) == TcpState::Open
    }
}

/// A flow a walk deletes: TCP half-open or closed, idle long enough; a
/// full-NAT UDP flow idle past `UDP_IDLE` (its claim holds a port).
fn is_expired(proto: u8, conn: &Conn, now_ns: u64) -> bool {
    let idle = now_ns.saturating_sub(conn.last_seen_ns);
    if proto == PROTO_UDP {
        return conn.snat_port_be != 0 && idle >= UDP_IDLE.as_nanos() as u64;
    }
    proto == PROTO_TCP
        && match TcpState::of(conn.tcp_seen) {
            TcpState::HalfOpen => idle >= HALF_OPEN_IDLE.as_nanos() as u64,
            TcpState::Closed => idle >= CLOSED_GRACE.as_nanos() as u64,
            TcpState::Open => false,
        }
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use lb_common::{tcp_seen_after, PROTO_TCP, PROTO_UDP};

    use super::*;

    const S: u64 = 1_000_000_000;

    fn flow(proto: u8, seen: u8, last_seen_s: u64) -> (FlowKey, Conn) {
        let key = FlowKey::new(1, 2, 3, 4, proto);
        let conn = Conn {
            nat_ip_be: 5,
            nat_port_be: 6,
            tcp_seen: seen,
            backend_id: 1,
            last_seen_ns: last_seen_s * S,
            ..Conn::default()
        };
        (key, conn)
    }

    #[test]
    fn only_answered_unclosed_tcp_flows_are_open() {
        let answered = tcp_seen_after(0, 0x10, true);
        let closed = tcp_seen_after(answered, 0x04, false);
        let now = 100 * S;
        assert!(!is_open(PROTO_TCP, &flow(PROTO_TCP, 0, 100).1, now), "half-open");
        let (k, c) = flow(PROTO_TCP, answered, 1);
        assert!(is_open(k.proto, &c, now) && !is_expired(k.proto, &c, now), "open flows never expire, however idle");
        let (k, c) = flow(PROTO_TCP, closed, 100);
        assert!(!is_open(k.proto, &c, now));
        let (k, c) = flow(PROTO_UDP, 0, 80);
        assert!(is_open(k.proto, &c, now) && !is_expired(k.proto, &c, now));
    }

    #[test]
    fn half_open_flows_expire_fast_and_closed_ones_after_a_grace() {
        let closed = tcp_seen_after(tcp_seen_after(0, 0x10, true), 0x04, false);
        let at = |idle_s: u64, seen: u8| {
            let (k, c) = flow(PROTO_TCP, seen, 100);
            is_expired(k.proto, &c, (100 + idle_s) * S)
        };
        assert!(!at(HALF_OPEN_IDLE.as_secs() - 1, 0) && at(HALF_OPEN_IDLE.as_secs(), 0));
        assert!(!at(CLOSED_GRACE.as_secs() - 1, closed) && at(CLOSED_GRACE.as_secs(), closed));
    }

    #[test]
    fn entries_of_either_family_name_their_backend_and_share_the_rules() {
        let (_, conn) = flow(PROTO_TCP, tcp_seen_after(0, 0x10, true), 100);
        let conn = Conn {
            nat_ip_be: u32::from(std::net::Ipv4Addr::new(10, 1, 0, 2)).to_be(),
            nat_port_be: 8080u16.to_be(),
            ..conn
        };
        assert_eq!(conn.backend(), "10.1.0.2:8080".parse().unwrap());
        let backend: std::net::SocketAddrV6 = "[fd00:2::2]:8080".parse().unwrap();
        let conn6 = Conn6 {
            conn: Conn { nat_ip_be: 0, nat_port_be: backend.port().to_be(), ..conn },
            nat_ip: lb_common::v6::ip6_raw(*backend.ip()),
            ..Conn6::default()
        };
        assert_eq!(conn6.backend(), backend.into());
        assert!(is_open(PROTO_TCP, conn6.conn(), 100 * S), "an IPv6 flow is open as an IPv4 one is");
    }

    #[test]
    fn idle_udp_flows_expire_only_when_they_hold_a_full_nat_port() {
        let idle = (100 + UDP_IDLE.as_secs()) * S;
        let (k, c) = flow(PROTO_UDP, 0, 100);
        assert!(!is_expired(k.proto, &c, idle), "a DNAT flow waits for the LRU");
        let c = Conn { snat_ip_be: 7, snat_port_be: 61000u16.to_be(), ..c };
        assert!(!is_expired(k.proto, &c, idle - S) && is_expired(k.proto, &c, idle));
        assert_eq!(c.snat_reply_key(PROTO_UDP), FlowKey::new(5, 6, 7, 61000u16.to_be(), PROTO_UDP));
    }
}
