//! A service's key in the data plane, IPv4 (`SERVICES`) or IPv6
//! (`SERVICES6`): what the registry and the reconciler know a service by.

use std::{
    fmt,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

use lb_common::{v6::ServiceKey6, ServiceKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VipKey {
    V4(ServiceKey),
    V6(ServiceKey6),
}

impl VipKey {
    /// The key of the service at `vip`:`port` for protocol number `proto`.
    pub fn new(vip: IpAddr, port: u16, proto: u8) -> Self {
        match vip {
            IpAddr::V4(ip) => {
                VipKey::V4(ServiceKey { vip_be: u32::from(ip).to_be(), port_be: port.to_be(), proto, _pad: 0 })
            }
            IpAddr::V6(ip) => VipKey::V6(ServiceKey6::new(SocketAddrV6::new(ip, port, 0, 0), proto)),
        }
    }

    /// The VIP and port.
    pub fn addr(&self) -> SocketAddr {
        match self {
            VipKey::V4(k) => SocketAddrV4::new(u32::from_be(k.vip_be).into(), u16::from_be(k.port_be)).into(),
            VipKey::V6(k) => k.addr().into(),
        }
    }

    pub fn proto(&self) -> u8 {
        match self {
            VipKey::V4(k) => k.proto,
            VipKey::V6(k) => k.proto,
        }
    }
}

/// `ip` if it is IPv4: the host checks (routes, instance subnets, full NAT's
/// sources) are IPv4's, and an IPv6 address is left out of them.
pub fn ipv4(ip: IpAddr) -> Option<std::net::Ipv4Addr> {
    match ip {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    }
}

impl From<ServiceKey> for VipKey {
    fn from(k: ServiceKey) -> Self {
        VipKey::V4(k)
    }
}

impl fmt::Display for VipKey {
    /// `10.0.0.1:80/6`, `[2001:db8::1]:80/17`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.proto())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_their_address_in_either_family() {
        for text in ["10.0.0.1:80", "[2001:db8::10]:443"] {
            let addr: SocketAddr = text.parse().unwrap();
            let key = VipKey::new(addr.ip(), addr.port(), 6);
            assert_eq!((key.addr(), key.proto()), (addr, 6), "{text}");
        }
        assert_eq!(VipKey::new("2001:db8::10".parse().unwrap(), 80, 17).to_string(), "[2001:db8::10]:80/17");
    }
}
