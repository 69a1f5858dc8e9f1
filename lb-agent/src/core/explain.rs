//! `lb-agent explain`: which backend one flow goes to, and why.
//!
//! A flow in the connection table goes to the backend its entry holds. A
//! new one goes where the service's live Maglev table sends its hash: the
//! same pick the data plane makes (`lb-ebpf/src/select.rs`), and the same on
//! every node with this config, as the table is a function of the backend
//! set alone. "If it left" rebuilds the table without that backend.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_common::{
    hash::flow_hash,
    maglev::{build_table, MaglevBackend},
    v6::{ip6_raw, FlowKey6},
    FlowKey, TcpState, MAGLEV_TABLE_SIZE, PROTO_TCP,
};
use serde::{Deserialize, Serialize};

use crate::config::{Protocol, ServiceConfig};

/// The flow asked about: client to `vip` over `proto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowQuery {
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub proto: u8,
}

impl FlowQuery {
    /// The flow's key in its family's connection table (`CONNTRACK`,
    /// `CONNTRACK6`); `None` when client and VIP are not of one family.
    pub fn table_key(&self) -> Option<TableKey> {
        match (self.client, self.vip) {
            (SocketAddr::V4(c), SocketAddr::V4(v)) => Some(TableKey::V4(FlowKey::new(
                u32::from(*c.ip()).to_be(),
                c.port().to_be(),
                u32::from(*v.ip()).to_be(),
                v.port().to_be(),
                self.proto,
            ))),
            (SocketAddr::V6(c), SocketAddr::V6(v)) => Some(TableKey::V6(FlowKey6::new(
                ip6_raw(*c.ip()),
                c.port().to_be(),
                ip6_raw(*v.ip()),
                v.port().to_be(),
                self.proto,
            ))),
            _ => None,
        }
    }
}

/// A flow's key in the connection table of its family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKey {
    V4(FlowKey),
    V6(FlowKey6),
}

/// A service's live table as the agent last wrote it.
#[derive(Clone, Copy, Debug)]
pub struct LiveTable<'a> {
    /// Which of the two halves is live (0 or 1).
    pub half: u32,
    /// Backend ids per slot (0: none).
    pub slots: &'a [u32],
    /// The backends that built it (weight 0: out of the table).
    pub backends: &'a [MaglevBackend],
}

/// The flow's connection-table entry (either family), as read with how
/// long ago it was seen.
#[derive(Clone, Copy, Debug)]
pub struct FlowSeen {
    /// The backend the entry sends the flow to.
    pub backend: SocketAddr,
    /// `Conn::tcp_seen`.
    pub tcp_seen: u8,
    pub idle: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub service: String,
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub protocol: String,
    /// Where the flow's next packet goes; `None`: dropped, no backend.
    pub backend: Option<SocketAddr>,
    /// "connection table", "maglev" or "no backend".
    pub reason: String,
    /// Its connection-table entry, if it has one.
    pub entry: Option<EntryView>,
    /// The Maglev pick a new flow with this 5-tuple gets.
    pub maglev: MaglevPick,
    /// Where a new flow would go if `backend` left the set.
    pub if_backend_left: Option<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryView {
    pub backend: SocketAddr,
    /// "half-open", "open" or "closed" for TCP; "active" for UDP.
    pub state: String,
    pub last_seen_ms_ago: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaglevPick {
    pub hash: u32,
    pub slot: u32,
    pub table_size: u32,
    /// The live half of the service's two tables.
    pub table_half: u32,
    pub backend: Option<SocketAddr>,
    /// The backends and weights that built the table, by address.
    pub backends: Vec<TableMember>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableMember {
    pub address: SocketAddr,
    pub weight: u32,
}

/// The service `explain` asks about, by its (unique) name; `protocol` and
/// `vip`, when given, must be its own. The error says what there is instead.
pub fn select_service<'a>(
    services: &'a [ServiceConfig],
    name: &str,
    protocol: Option<Protocol>,
    vip: Option<std::net::IpAddr>,
) -> Result<&'a ServiceConfig, String> {
    let Some(s) = services.iter().find(|s| s.name == name) else {
        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        return Err(format!("no service named {name:?}; the agent has: {}", names.join(", ")));
    };
    if protocol.is_some_and(|p| s.protocol != p) || vip.is_some_and(|v| s.vip != v) {
        return Err(format!("service {name:?} has no such VIP; it has {}:{}/{}", s.vip, s.port, s.protocol));
    }
    Ok(s)
}

/// The flow hash the data plane computes for `q` (fields in network order,
/// as it loads them): for IPv6 `flow_hash` over the folded addresses, which
/// is `lb_common::v6::flow_hash6`.
pub fn hash_of(q: &FlowQuery) -> u32 {
    let fold = |ip: IpAddr| match ip {
        IpAddr::V4(ip) => u32::from(ip).to_be(),
        IpAddr::V6(ip) => lb_common::v6::fold_ip6(&lb_common::v6::ip6_raw(ip)),
    };
    flow_hash(fold(q.client.ip()), fold(q.vip.ip()), q.client.port().to_be(), q.vip.port().to_be(), q.proto)
}

/// The backend `slots` names for `hash`, by address.
fn pick(slots: &[u32], backends: &[MaglevBackend], hash: u32) -> Option<SocketAddr> {
    let id = *slots.get((hash % MAGLEV_TABLE_SIZE) as usize)?;
    backends.iter().find(|b| b.id == id && id != 0).map(|b| b.addr)
}

/// Where a new flow with `hash` goes once `gone` leaves the backend set.
pub fn pick_without(backends: &[MaglevBackend], gone: SocketAddr, hash: u32) -> Option<SocketAddr> {
    let rest: Vec<MaglevBackend> = backends.iter().filter(|b| b.addr != gone).copied().collect();
    pick(&build_table(&rest, MAGLEV_TABLE_SIZE), &rest, hash)
}

/// Explain `q` for `service`, whose live table is `table`, and whose flow
/// entry (if any) is `seen`.
pub fn explain(service: &str, q: &FlowQuery, table: LiveTable<'_>, seen: Option<FlowSeen>) -> Explanation {
    let hash = hash_of(q);
    let maglev_backend = pick(table.slots, table.backends, hash);
    let entry = seen.map(|s| EntryView {
        backend: s.backend,
        state: state_name(q.proto, s.tcp_seen),
        last_seen_ms_ago: u64::try_from(s.idle.as_millis()).unwrap_or(u64::MAX),
    });
    let (backend, reason) = match (&entry, maglev_backend) {
        (Some(e), _) => (Some(e.backend), "connection table"),
        (None, Some(b)) => (Some(b), "maglev"),
        (None, None) => (None, "no backend"),
    };
    let mut members: Vec<TableMember> =
        table.backends.iter().map(|b| TableMember { address: b.addr, weight: b.weight }).collect();
    members.sort_by_key(|m| m.address);
    Explanation {
        service: service.to_string(),
        client: q.client,
        vip: q.vip,
        protocol: if q.proto == PROTO_TCP { "tcp" } else { "udp" }.to_string(),
        backend,
        reason: reason.to_string(),
        entry,
        maglev: MaglevPick {
            hash,
            slot: hash % MAGLEV_TABLE_SIZE,
            table_size: MAGLEV_TABLE_SIZE,
            table_half: table.half,
            backend: maglev_backend,
            backends: members,
        },
        if_backend_left: backend.and_then(|b| pick_without(table.backends, b, hash)),
    }
}

fn state_name(proto: u8, tcp_seen: u8) -> String {
    if proto != PROTO_TCP {
        return "active".into();
    }
    match TcpState::of(tcp_seen) {
        TcpState::HalfOpen => "half-open",
        TcpState::Open => "open",
        TcpState::Closed => "closed",
    }
    .into()
}

impl Explanation {
    /// The human answer, a few lines.
    pub fn render(&self) -> String {
        let show = |a: Option<SocketAddr>| a.map_or("nothing (no backend: dropped)".to_string(), |a| a.to_string());
        let mut out = format!(
            "{} {} -> {} ({}, service {}): goes to {}\n",
            self.protocol,
            self.client,
            self.vip,
            self.reason,
            self.service,
            show(self.backend)
        );
        match &self.entry {
            Some(e) => {
                out += &format!(
                    "  connection table: backend {}, {}, last seen {} ms ago\n",
                    e.backend, e.state, e.last_seen_ms_ago
                )
            }
            None => out += "  connection table: no entry (a new flow)\n",
        }
        let m = &self.maglev;
        out += &format!(
            "  maglev: hash {:#010x}, slot {} of {}, table half {} -> {}\n",
            m.hash,
            m.slot,
            m.table_size,
            m.table_half,
            show(m.backend)
        );
        let members: Vec<String> = m.backends.iter().map(|b| format!("{} (weight {})", b.address, b.weight)).collect();
        out +=
            &format!("  built from: {}\n", if members.is_empty() { "no backends".into() } else { members.join(", ") });
        if let Some(b) = self.backend {
            out += &format!("  if {b} left: {}\n", show(self.if_backend_left));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn backends(n: u8) -> Vec<MaglevBackend> {
        (1..=n)
            .map(|i| MaglevBackend {
                id: u32::from(i) * 7,
                addr: SocketAddr::new(Ipv4Addr::new(10, 1, 0, i).into(), 8080),
                weight: 1,
            })
            .collect()
    }

    fn query(port: u16) -> FlowQuery {
        FlowQuery {
            client: SocketAddr::new(Ipv4Addr::new(10, 9, 0, 2).into(), port),
            vip: SocketAddr::new(Ipv4Addr::new(10, 0, 0, 100).into(), 80),
            proto: PROTO_TCP,
        }
    }

    #[test]
    fn a_new_flow_gets_the_slot_its_hash_names() {
        let set = backends(3);
        let slots = build_table(&set, MAGLEV_TABLE_SIZE);
        let q = query(40000);
        let e = explain("web", &q, LiveTable { half: 1, slots: &slots, backends: &set }, None);
        let slot = flow_hash(0x0a09_0002u32.to_be(), 0x0a00_0064u32.to_be(), 40000u16.to_be(), 80u16.to_be(), 6)
            % MAGLEV_TABLE_SIZE;
        assert_eq!(e.maglev.slot, slot);
        let id = slots[slot as usize];
        assert_eq!(e.backend, set.iter().find(|b| b.id == id).map(|b| b.addr));
        assert_eq!((e.reason.as_str(), e.maglev.table_half), ("maglev", 1));
        assert_ne!(e.if_backend_left, e.backend);
        assert!(e.if_backend_left.is_some());
    }

    #[test]
    fn an_entry_wins_over_the_table() {
        let set = backends(3);
        let slots = build_table(&set, MAGLEV_TABLE_SIZE);
        let q = query(40001);
        let pick = explain("web", &q, LiveTable { half: 0, slots: &slots, backends: &set }, None).backend.unwrap();
        let other = set.iter().find(|b| b.addr != pick).unwrap().addr;
        let seen = FlowSeen { backend: other, tcp_seen: lb_common::TCP_SEEN_REPLY, idle: Duration::from_millis(1500) };
        let e = explain("web", &q, LiveTable { half: 0, slots: &slots, backends: &set }, Some(seen));
        assert_eq!((e.backend, e.reason.as_str()), (Some(other), "connection table"));
        let entry = e.entry.as_ref().unwrap();
        assert_eq!((entry.state.as_str(), entry.last_seen_ms_ago), ("open", 1500));
        assert_eq!(e.maglev.backend, Some(pick));
        assert!(e.render().contains("last seen 1500 ms ago"), "{}", e.render());
    }

    #[test]
    fn leaving_moves_the_flow_only_to_a_survivor_and_survivors_keep_theirs() {
        let set = backends(4);
        let slots = build_table(&set, MAGLEV_TABLE_SIZE);
        let (mut kept, mut total) = (0, 0);
        for port in 30000..30200 {
            let q = query(port);
            let hash = hash_of(&q);
            let before = pick(&slots, &set, hash).unwrap();
            let after = pick_without(&set, set[0].addr, hash).unwrap();
            assert_ne!(after, set[0].addr);
            if before != set[0].addr {
                total += 1;
                kept += usize::from(after == before);
            }
        }
        // Maglev: most flows of the survivors stay where they were.
        assert!(kept * 10 >= total * 9, "{kept} of {total}");
    }

    #[test]
    fn a_service_is_found_by_name_and_checked_against_protocol_and_vip() {
        let text = "[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\ninterfaces = [\"eth0\"]\n\
                    [[service]]\nname = \"dns\"\nvip = \"10.0.0.100\"\nport = 53\nprotocol = \"udp\"\ninterfaces = [\"eth0\"]\n";
        let config = crate::config::Config::parse(text, std::path::Path::new("t.toml")).unwrap();
        let s = &config.services;
        assert_eq!(select_service(s, "dns", None, None).unwrap().port, 53);
        let vip = Some(Ipv4Addr::new(10, 0, 0, 100).into());
        assert_eq!(select_service(s, "web", Some(Protocol::Tcp), vip).unwrap().port, 80);
        let err = select_service(s, "web", Some(Protocol::Udp), None).unwrap_err();
        assert!(err.contains("no such VIP") && err.contains("10.0.0.100:80/tcp"), "{err}");
        let err = select_service(s, "web", None, Some(Ipv4Addr::new(10, 0, 0, 1).into())).unwrap_err();
        assert!(err.contains("no such VIP"), "{err}");
        let err = select_service(s, "api", None, None).unwrap_err();
        assert!(err.contains("no service named \"api\"") && err.contains("web, dns"), "{err}");
    }

    /// An IPv6 flow: its key is `CONNTRACK6`'s, its hash `flow_hash6`, and
    /// its entry names an IPv6 backend.
    #[test]
    fn an_ipv6_flow_hashes_as_the_ipv6_path_and_shows_its_entry() {
        let set: Vec<MaglevBackend> = (1..=3u16)
            .map(|i| MaglevBackend {
                id: u32::from(i),
                addr: SocketAddr::new(std::net::Ipv6Addr::new(0xfd00, i, 0, 0, 0, 0, 0, 2).into(), 8080),
                weight: 1,
            })
            .collect();
        let slots = build_table(&set, MAGLEV_TABLE_SIZE);
        let q = FlowQuery {
            client: "[2001:db8::5]:40000".parse().unwrap(),
            vip: "[2001:db8:ff::1]:80".parse().unwrap(),
            proto: PROTO_TCP,
        };
        let Some(TableKey::V6(key)) = q.table_key() else { panic!("not an IPv6 key: {:?}", q.table_key()) };
        assert_eq!(key, FlowKey6::new(key.src, 40000u16.to_be(), key.dst, 80u16.to_be(), PROTO_TCP));
        assert_eq!(lb_common::v6::ip6_addr(key.src), "2001:db8::5".parse::<std::net::Ipv6Addr>().unwrap());
        let hash = lb_common::v6::flow_hash6(&key.src, &key.dst, key.src_port_be, key.dst_port_be, key.proto);
        let table = LiveTable { half: 1, slots: &slots, backends: &set };
        let e = explain("web6", &q, table, None);
        assert_eq!((e.maglev.hash, e.maglev.slot), (hash, hash % MAGLEV_TABLE_SIZE));
        let seen = FlowSeen { backend: set[2].addr, tcp_seen: lb_common::TCP_SEEN_REPLY, idle: Duration::ZERO };
        let e = explain("web6", &q, table, Some(seen));
        assert_eq!((e.backend, e.reason.as_str()), (Some(set[2].addr), "connection table"));
        assert!(e.if_backend_left.is_some_and(|b| b != set[2].addr && b.is_ipv6()));
        assert!(e.render().contains("[fd00:3::2]:8080"), "{}", e.render());
    }

    #[test]
    fn a_query_of_two_families_has_no_table_key() {
        let q = FlowQuery {
            client: "[2001:db8::5]:40000".parse().unwrap(),
            vip: "10.0.0.100:80".parse().unwrap(),
            proto: PROTO_TCP,
        };
        assert_eq!(q.table_key(), None);
        assert!(matches!(query(1).table_key(), Some(TableKey::V4(k)) if k.src_port_be == 1u16.to_be()));
    }

    #[test]
    fn no_backend_says_so() {
        let e = explain("web", &query(1), LiveTable { half: 0, slots: &[], backends: &[] }, None);
        assert_eq!((e.backend, e.reason.as_str(), e.if_backend_left), (None, "no backend", None));
        assert!(e.render().contains("no backend"));
    }
}
