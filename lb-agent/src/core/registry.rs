//! What each service's backends should be, from the config, control-API
//! changes, health results and drains. Pure: time comes in as arguments, and
//! the output (`desired`) is what the reconciler writes to the maps.
//!
//! A backend is in the Maglev table only while it is `active` and up. Leaving
//! it (removal, or a health failure) stops new flows at once; the backend
//! stays registered, keeping its id and counters, while its connections
//! drain. A removed backend leaves the registry when its open connections
//! reach zero or its drain deadline passes; a down one stays, and comes back
//! into the table after `rise` good probes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    config::{
        instances::Ipv4Subnet, unusable_backend_ip, BackendConfig, Config, ForwardMode, ServiceConfig, MAX_WEIGHT,
    },
    core::{
        deploy,
        health::{Health, Transition},
        slow_start::{self, SlowStart, TableNow},
        vip::{ipv4, VipKey},
    },
    ports::Route,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Active,
    /// Removed: no new flows; existing ones go on until `deadline`.
    Draining {
        deadline: Instant,
    },
}

/// Who added a backend. A config reload replaces config and API backends,
/// and never touches the scaler's instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Config,
    Api,
    Scaler,
}

#[derive(Clone, Debug)]
pub struct BackendEntry {
    pub origin: Origin,
    pub weight: u32,
    pub state: BackendState,
    /// `None` when the service has no health check.
    pub health: Option<Health>,
    /// Why the data plane cannot reach it as the host routes it now (see
    /// `core::deploy::unroutable`); it stays out of the table meanwhile.
    pub unroutable: Option<String>,
}

impl BackendEntry {
    pub fn in_table(&self) -> bool {
        self.state == BackendState::Active
            && self.health.is_none_or(|h| h.is_up())
            && self.weight > 0
            && self.unroutable.is_none()
    }

    /// The word `status` shows: active, draining, unroutable or down.
    pub fn state_name(&self) -> &'static str {
        match (self.state, &self.unroutable, self.health.is_some_and(|h| !h.is_up())) {
            (BackendState::Draining { .. }, _, _) => "draining",
            (BackendState::Active, Some(_), _) => "unroutable",
            (BackendState::Active, None, true) => "down",
            (BackendState::Active, None, false) => "active",
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServiceEntry {
    pub config: ServiceConfig,
    pub backends: BTreeMap<SocketAddr, BackendEntry>,
}

/// One service as the reconciler should write it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub config: ServiceConfig,
    /// Every registered backend; those with `in_table == false` keep their id
    /// but get no Maglev slots.
    pub backends: Vec<DesiredBackend>,
}

impl DesiredService {
    /// Every backend of `config` in the table: what a fresh registry wants.
    pub fn all_in_table(config: &Config) -> Vec<DesiredService> {
        config
            .services
            .iter()
            .map(|s| DesiredService {
                config: s.clone(),
                backends: s
                    .backends
                    .iter()
                    .map(|b| DesiredBackend { addr: b.address, weight: b.weight, in_table: b.weight > 0 })
                    .collect(),
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub addr: SocketAddr,
    pub weight: u32,
    pub in_table: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("no service named {0:?}")]
    UnknownService(String),
    #[error("service {service:?} has no backend {addr}")]
    UnknownBackend { service: String, addr: SocketAddr },
    #[error("service {service:?} already has backend {addr}")]
    DuplicateBackend { service: String, addr: SocketAddr },
    #[error("weight {0} is above the maximum {MAX_WEIGHT}")]
    Weight(u32),
    #[error("backend {addr}: {why}")]
    BadAddress { addr: SocketAddr, why: &'static str },
    #[error(
        "backend {addr} is inside {subnet} (instances.{kind}.{key}) of service {owner:?}, whose addresses its \
         orchestrator hands out"
    )]
    InInstanceNet { addr: SocketAddr, owner: String, subnet: Ipv4Subnet, kind: &'static str, key: &'static str },
}

/// A backend whose drain ended, for the caller to forget in the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    pub addr: SocketAddr,
    /// The deadline passed with connections still open: the caller drops
    /// their connection-table entries.
    pub expired: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Registry {
    services: BTreeMap<String, ServiceEntry>,
    /// Backends a previous agent had out of the table (down, draining or
    /// weight 0) when this one adopted its data plane: with a health check
    /// they start down, and join only once they pass `rise` checks.
    /// Taken by the first `set_config`.
    start_down: BTreeSet<(VipKey, SocketAddr)>,
    /// Backends that joined a table lately, ramping up to their weight.
    slow_start: SlowStart,
}

impl Registry {
    pub fn services(&self) -> impl Iterator<Item = (&String, &ServiceEntry)> {
        self.services.iter()
    }

    pub fn service(&self, name: &str) -> Option<&ServiceEntry> {
        self.services.get(name)
    }

    /// Before the first `set_config` after a restart: the backends the
    /// adopted data plane had out of its table. A backend that was down
    /// stays out until it passes its checks, instead of rejoining as up
    /// and failing clients until `fall` probes take it out again.
    pub fn start_down(&mut self, out_of_table: BTreeSet<(VipKey, SocketAddr)>) {
        self.start_down = out_of_table;
    }

    /// Adopt a (validated) config: new backends join, backends it no longer
    /// lists start draining, a service it no longer lists goes at once (its
    /// VIP is gone, so there is nothing to drain to).
    pub fn set_config(&mut self, config: &Config, now: Instant) {
        self.services.retain(|name, _| config.services.iter().any(|s| &s.name == name));
        for svc in &config.services {
            let entry = self
                .services
                .entry(svc.name.clone())
                .or_insert_with(|| ServiceEntry { config: svc.clone(), backends: BTreeMap::new() });
            // Health state (up or down, the streak so far) belongs to the
            // backend: a reload keeps it unless the service's identity
            // changed. An edited check (interval, rise, fall, ...) only
            // changes how the next probes run.
            let same_service = entry.config.key() == svc.key();
            entry.config = svc.clone();
            for (addr, b) in entry.backends.iter_mut() {
                b.health = match (b.health, &svc.health_check) {
                    (Some(h), Some(c)) if same_service => Some(h.with_limits(c.rise, c.fall)),
                    _ => new_health(svc, false),
                };
                if b.origin == Origin::Scaler {
                    continue;
                }
                match svc.backends.iter().find(|c| c.address == *addr) {
                    Some(c) => {
                        b.weight = c.weight;
                        b.state = BackendState::Active;
                        b.origin = Origin::Config;
                    }
                    None => drain(b, svc.drain_timeout, now),
                }
            }
            for BackendConfig { address, weight } in &svc.backends {
                let was_out = self.start_down.contains(&(svc.key(), *address));
                entry.backends.entry(*address).or_insert_with(|| BackendEntry {
                    origin: Origin::Config,
                    weight: *weight,
                    state: BackendState::Active,
                    health: new_health(svc, was_out),
                    unroutable: None,
                });
            }
        }
        self.start_down.clear();
    }

    /// Add a backend at run time (it joins the table at once; with a health
    /// check, it is probed like any other). Re-adding a draining backend
    /// makes it active again.
    pub fn add_backend(&mut self, service: &str, addr: SocketAddr, weight: u32) -> Result<(), RegistryError> {
        self.add(service, addr, weight, Origin::Api)
    }

    /// A scaled instance that passed its first health check joins the table.
    pub fn add_instance(&mut self, service: &str, addr: SocketAddr) -> Result<(), RegistryError> {
        self.add(service, addr, 1, Origin::Scaler)
    }

    /// Forget a backend at once, without draining: its instance is gone
    /// (crashed), so its flows have nowhere to go.
    pub fn forget(&mut self, service: &str, addr: SocketAddr) -> bool {
        self.services.get_mut(service).is_some_and(|e| e.backends.remove(&addr).is_some())
    }

    fn add(&mut self, service: &str, addr: SocketAddr, weight: u32, origin: Origin) -> Result<(), RegistryError> {
        if weight > MAX_WEIGHT {
            return Err(RegistryError::Weight(weight));
        }
        if addr.port() == 0 {
            return Err(RegistryError::BadAddress { addr, why: "port 0" });
        }
        if let Some(why) = unusable_backend_ip(addr.ip()) {
            return Err(RegistryError::BadAddress { addr, why });
        }
        if origin == Origin::Api {
            // An unknown service is the first thing to say.
            self.service_mut(service)?;
            self.refuse_instance_address(addr)?;
        }
        let entry = self.service_mut(service)?;
        if addr.ip() == entry.config.vip {
            return Err(RegistryError::BadAddress { addr, why: "that is the service's own VIP" });
        }
        if addr.is_ipv6() != entry.config.vip.is_ipv6() {
            return Err(RegistryError::BadAddress { addr, why: "not of the family of the service's VIP" });
        }
        let health = new_health(&entry.config, false);
        match entry.backends.get_mut(&addr) {
            Some(b) if b.state == BackendState::Active => {
                Err(RegistryError::DuplicateBackend { service: service.into(), addr })
            }
            Some(b) => {
                b.state = BackendState::Active;
                b.weight = weight;
                b.origin = origin;
                Ok(())
            }
            None => {
                let b = BackendEntry { origin, weight, state: BackendState::Active, health, unroutable: None };
                entry.backends.insert(addr, b);
                Ok(())
            }
        }
    }

    /// A scaled service's orchestrator hands out the addresses of its
    /// subnet: a backend added by hand there would clash with an instance
    /// (the config check refuses the same for listed backends).
    fn refuse_instance_address(&self, addr: SocketAddr) -> Result<(), RegistryError> {
        for (owner, e) in &self.services {
            let Some(net) = e.config.instances.as_ref().and_then(|i| i.net()) else { continue };
            if ipv4(addr.ip()).is_some_and(|ip| net.subnet.contains(ip)) {
                return Err(RegistryError::InInstanceNet {
                    addr,
                    owner: owner.clone(),
                    subnet: net.subnet,
                    kind: net.kind,
                    key: net.subnet_key,
                });
            }
        }
        Ok(())
    }

    /// Start draining a backend now.
    pub fn remove_backend(&mut self, service: &str, addr: SocketAddr, now: Instant) -> Result<(), RegistryError> {
        let entry = self.service_mut(service)?;
        let timeout = entry.config.drain_timeout;
        let b = entry.backends.get_mut(&addr).ok_or(RegistryError::UnknownBackend { service: service.into(), addr })?;
        drain(b, timeout, now);
        Ok(())
    }

    pub fn set_weight(&mut self, service: &str, addr: SocketAddr, weight: u32) -> Result<(), RegistryError> {
        if weight > MAX_WEIGHT {
            return Err(RegistryError::Weight(weight));
        }
        let entry = self.service_mut(service)?;
        let b = entry.backends.get_mut(&addr).ok_or(RegistryError::UnknownBackend { service: service.into(), addr })?;
        b.weight = weight;
        Ok(())
    }

    /// Every IPv4 backend's address, for a route lookup (the host checks
    /// are IPv4's; IPv6 backends are not judged).
    pub fn backend_ips(&self) -> BTreeSet<Ipv4Addr> {
        self.services.values().flat_map(|e| e.backends.keys().filter_map(|a| ipv4(a.ip()))).collect()
    }

    /// Flag (or clear) each backend as the host routes it now (see
    /// `deploy::unroutable`; one whose route is not in `routes` keeps its
    /// flag). Returns the flags that changed: service, backend, and why it
    /// cannot be served (`None`: it can again).
    pub fn judge_routes(&mut self, routes: &BTreeMap<Ipv4Addr, Route>) -> Vec<(String, SocketAddr, Option<String>)> {
        let mut changed = Vec::new();
        for (name, e) in self.services.iter_mut() {
            for (addr, b) in e.backends.iter_mut() {
                let Some(route) = ipv4(addr.ip()).and_then(|ip| routes.get(&ip)) else { continue };
                let why = deploy::unroutable(&e.config, route);
                if b.unroutable != why {
                    b.unroutable.clone_from(&why);
                    changed.push((name.clone(), *addr, why));
                }
            }
        }
        changed
    }

    /// Feed a probe result; returns the transition, if this result made one.
    pub fn observe_health(&mut self, service: &str, addr: SocketAddr, ok: bool) -> Option<Transition> {
        self.services.get_mut(service)?.backends.get_mut(&addr)?.health.as_mut()?.observe(ok)
    }

    /// End the drains that are over: no open connections left (as the data
    /// plane counts them), or the deadline passed.
    /// Whether any backend is draining (so `finish_drains` has work).
    pub fn is_draining(&self) -> bool {
        self.services
            .values()
            .flat_map(|e| e.backends.values())
            .any(|b| matches!(b.state, BackendState::Draining { .. }))
    }

    pub fn finish_drains(&mut self, now: Instant, open: impl Fn(&str, SocketAddr) -> u64) -> Vec<(String, Drained)> {
        let mut done = Vec::new();
        for (name, entry) in self.services.iter_mut() {
            entry.backends.retain(|addr, b| {
                let BackendState::Draining { deadline } = b.state else { return true };
                let expired = now >= deadline;
                if expired || open(name, *addr) == 0 {
                    done.push((name.clone(), Drained { addr: *addr, expired: expired && open(name, *addr) > 0 }));
                    return false;
                }
                true
            });
        }
        done
    }

    /// Start the slow-start ramps of backends that joined a table since the
    /// last call (none on the first: those serving at start keep their
    /// weight), and move the ramps on to `now`. Returns whether a ramping
    /// weight changed, so the table needs writing again.
    pub fn advance_ramps(&mut self, now: Instant) -> bool {
        let tables = self
            .services
            .iter()
            .map(|(name, e)| {
                let in_table = e.backends.iter().filter(|(_, b)| b.in_table()).map(|(a, _)| *a).collect();
                (name.clone(), TableNow { slow_start: e.config.slow_start, in_table })
            })
            .collect();
        self.slow_start.advance(&tables, now)
    }

    /// Whether a slow-start ramp is under way.
    pub fn ramping(&self) -> bool {
        self.slow_start.ramping()
    }

    /// The share of its weight a ramping backend has now, in percent; `None`
    /// when it does not ramp.
    pub fn ramp_percent(&self, service: &str, addr: SocketAddr) -> Option<u32> {
        let step = self.slow_start.step_of(service, addr);
        (step < slow_start::STEPS).then_some(step * 100 / slow_start::STEPS)
    }

    /// What the maps should hold; ramping backends at their step's share
    /// as the last `advance_ramps` left them.
    pub fn desired(&self) -> Vec<DesiredService> {
        self.services
            .iter()
            .map(|(name, e)| {
                let steps: Vec<(u32, u32)> =
                    e.backends.iter().map(|(addr, b)| (b.weight, self.slow_start.step_of(name, *addr))).collect();
                let weights = slow_start::weights(&steps);
                DesiredService {
                    config: e.config.clone(),
                    backends: e
                        .backends
                        .iter()
                        .zip(weights)
                        .map(|((addr, b), weight)| DesiredBackend { addr: *addr, weight, in_table: b.in_table() })
                        .collect(),
                }
            })
            .collect()
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut ServiceEntry, RegistryError> {
        self.services.get_mut(name).ok_or_else(|| RegistryError::UnknownService(name.into()))
    }
}

fn new_health(svc: &ServiceConfig, was_out: bool) -> Option<Health> {
    // New backends start up (as HAProxy's servers do): traffic is not held
    // back from a healthy pool on start-up or on an agent restart. One the
    // previous agent had out of the table starts down: it may well be down
    // still, and the pinned table kept clients off it so far.
    // A dsr-ipip backend starts down: it gets traffic once its probe
    // through the tunnel shows it set up (`adapters::dsr_probe`).
    let starts_up = !was_out && svc.mode != ForwardMode::DsrIpip;
    svc.health_check.as_ref().map(|h| Health::new(starts_up, h.rise, h.fall))
}

fn drain(b: &mut BackendEntry, timeout: Duration, now: Instant) {
    if b.state == BackendState::Active {
        b.state = BackendState::Draining { deadline: now + timeout };
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(backends: &[&str], extra: &str) -> Config {
        let mut text = format!(
            "[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\ninterfaces = [\"eth0\"]\ndrain_timeout = \"10s\"\n{extra}\n"
        );
        for addr in backends {
            text += &format!("[[service.backend]]\naddress = \"{addr}\"\n");
        }
        Config::parse(&text, Path::new("t.toml")).unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn table(r: &Registry) -> Vec<(String, bool)> {
        r.desired()[0].backends.iter().map(|b| (b.addr.to_string(), b.in_table)).collect()
    }

    #[test]
    fn config_removal_drains_until_connections_close() {
        let now = Instant::now();
        let mut r = Registry::default();
        r.set_config(&config(&["10.1.0.1:80", "10.1.0.2:80"], ""), now);
        r.set_config(&config(&["10.1.0.1:80"], ""), now);
        assert_eq!(table(&r), [("10.1.0.1:80".into(), true), ("10.1.0.2:80".into(), false)]);
        assert_eq!(r.service("web").unwrap().backends[&addr("10.1.0.2:80")].state_name(), "draining");
        assert!(r.is_draining());
        // Still 3 connections open: it stays.
        assert!(r.finish_drains(now + Duration::from_secs(1), |_, _| 3).is_empty());
        // They closed: it goes, not expired.
        let done = r.finish_drains(now + Duration::from_secs(2), |_, _| 0);
        assert_eq!(done, [("web".into(), Drained { addr: addr("10.1.0.2:80"), expired: false })]);
        assert_eq!(table(&r), [("10.1.0.1:80".into(), true)]);
        assert!(!r.is_draining());
    }

    #[test]
    fn drain_deadline_expires_open_connections() {
        let now = Instant::now();
        let mut r = Registry::default();
        r.set_config(&config(&["10.1.0.1:80", "10.1.0.2:80"], ""), now);
        r.remove_backend("web", addr("10.1.0.1:80"), now).unwrap();
        assert!(r.finish_drains(now + Duration::from_secs(9), |_, _| 5).is_empty());
        let done = r.finish_drains(now + Duration::from_secs(10), |_, _| 5);
        assert_eq!(done, [("web".into(), Drained { addr: addr("10.1.0.1:80"), expired: true })]);
    }

    #[test]
    fn health_failure_leaves_table_and_recovery_returns() {
        let now = Instant::now();
        let mut r = Registry::default();
        r.set_config(&config(&["10.1.0.1:80", "10.1.0.2:80"], "health_check = { rise = 2, fall = 2 }"), now);
        let b = addr("10.1.0.2:80");
        assert_eq!(r.observe_health("web", b, false), None);
        assert_eq!(r.observe_health("web", b, false), Some(Transition::Down));
        assert_eq!(table(&r)[1], ("10.1.0.2:80".into(), false));
        assert_eq!(r.service("web").unwrap().backends[&b].state_name(), "down");
        // A down backend is not drained away: it stays registered.
        assert!(r.finish_drains(now + Duration::from_secs(60), |_, _| 0).is_empty());
        assert_eq!(r.observe_health("web", b, true), None);
        assert_eq!(r.observe_health("web", b, true), Some(Transition::Up));
        assert_eq!(table(&r)[1], ("10.1.0.2:80".into(), true));
    }

    #[test]
    fn backends_that_join_ramp_up_and_those_serving_at_start_do_not() {
        let now = Instant::now();
        let secs = Duration::from_secs;
        let weights = |r: &Registry| -> Vec<u32> { r.desired()[0].backends.iter().map(|b| b.weight).collect() };
        let mut r = Registry::default();
        let extra = "slow_start = \"9s\"\nhealth_check = { rise = 1, fall = 1 }";
        r.set_config(&config(&["10.1.0.1:80", "10.1.0.2:80"], extra), now);
        assert!(!r.advance_ramps(now), "serving at start: no ramp");
        assert_eq!(weights(&r), [1, 1]);
        // Added at run time: a tenth of its weight, then its step.
        let three = addr("10.1.0.3:80");
        r.add_backend("web", three, 2).unwrap();
        assert!(r.advance_ramps(now));
        assert_eq!((weights(&r), r.ramp_percent("web", three)), (vec![10, 10, 2], Some(10)));
        assert!(r.advance_ramps(now + secs(4)));
        assert_eq!((weights(&r), r.ramp_percent("web", three)), (vec![10, 10, 10], Some(50)));
        assert!(r.advance_ramps(now + secs(9)));
        assert_eq!((weights(&r), r.ramp_percent("web", three)), (vec![1, 1, 2], None));
        assert!(!r.ramping());
        // Up again after failed checks: it ramps again.
        let one = addr("10.1.0.1:80");
        r.observe_health("web", one, false);
        r.advance_ramps(now + secs(10));
        r.observe_health("web", one, true);
        assert!(r.advance_ramps(now + secs(11)));
        assert_eq!(r.ramp_percent("web", one), Some(10));
        // A reload keeps the ramp going.
        r.set_config(&config(&["10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80"], extra), now + secs(11));
        assert!(!r.advance_ramps(now + secs(11) + Duration::from_millis(500)));
        assert_eq!(r.ramp_percent("web", one), Some(10));
    }

    #[test]
    fn a_reload_keeps_health_unless_the_address_or_service_changes() {
        let now = Instant::now();
        let check = |interval: &str, rise: u32| {
            format!("health_check = {{ interval = \"{interval}\", rise = {rise}, fall = 2 }}")
        };
        let mut r = Registry::default();
        r.set_config(&config(&["10.1.0.1:80", "10.1.0.2:80"], &check("1s", 2)), now);
        let (one, two) = (addr("10.1.0.1:80"), addr("10.1.0.2:80"));
        for b in [one, two] {
            r.observe_health("web", b, false);
            assert_eq!(r.observe_health("web", b, false), Some(Transition::Down));
        }
        // One good probe of the two `rise` needs so far.
        assert_eq!(r.observe_health("web", one, true), None);
        // Only the interval changes: both stay down, the streak stays.
        r.set_config(&config(&["10.1.0.1:80", "10.1.0.2:80"], &check("3s", 2)), now);
        assert_eq!(table(&r), [("10.1.0.1:80".into(), false), ("10.1.0.2:80".into(), false)]);
        assert_eq!(r.observe_health("web", one, true), Some(Transition::Up));
        // A new `rise` applies to the next probes, from the state they found.
        r.set_config(&config(&["10.1.0.1:80", "10.1.0.2:80"], &check("3s", 1)), now);
        assert_eq!(table(&r), [("10.1.0.1:80".into(), true), ("10.1.0.2:80".into(), false)]);
        assert_eq!(r.observe_health("web", two, true), Some(Transition::Up));
        r.observe_health("web", two, false);
        assert_eq!(r.observe_health("web", two, false), Some(Transition::Down));
        // Another VIP is another service: its backends start afresh (up).
        let moved = config(&["10.1.0.1:80", "10.1.0.2:80"], &check("3s", 1)).services[0].clone();
        let moved = Config {
            services: vec![ServiceConfig { vip: "10.0.0.101".parse().unwrap(), ..moved }],
            ..Config::default()
        };
        r.set_config(&moved, now);
        assert_eq!(table(&r), [("10.1.0.1:80".into(), true), ("10.1.0.2:80".into(), true)]);
    }

    #[test]
    fn a_backend_out_of_the_adopted_table_starts_down_until_it_passes() {
        let now = Instant::now();
        let c = config(&["10.1.0.1:80", "10.1.0.2:80"], "health_check = { rise = 2, fall = 2 }");
        let b = addr("10.1.0.2:80");
        let mut r = Registry::default();
        r.start_down([(c.services[0].key(), b)].into());
        r.set_config(&c, now);
        assert_eq!(table(&r), [("10.1.0.1:80".into(), true), ("10.1.0.2:80".into(), false)]);
        assert_eq!(r.service("web").unwrap().backends[&b].state_name(), "down");
        assert_eq!(r.observe_health("web", b, true), None);
        assert_eq!(r.observe_health("web", b, true), Some(Transition::Up));
        assert_eq!(table(&r)[1], ("10.1.0.2:80".into(), true));
        // Only the first config after the restart: a backend removed and
        // added again later starts up, as any new one.
        r.set_config(&config(&["10.1.0.1:80"], "health_check = { rise = 2, fall = 2 }"), now);
        r.finish_drains(now, |_, _| 0);
        r.set_config(&c, now);
        assert_eq!(table(&r)[1], ("10.1.0.2:80".into(), true));
    }

    #[test]
    fn without_a_health_check_the_adopted_table_does_not_matter() {
        let c = config(&["10.1.0.1:80", "10.1.0.2:80"], "");
        let mut r = Registry::default();
        r.start_down([(c.services[0].key(), addr("10.1.0.2:80"))].into());
        r.set_config(&c, Instant::now());
        assert_eq!(table(&r), [("10.1.0.1:80".into(), true), ("10.1.0.2:80".into(), true)]);
    }

    #[test]
    fn routes_flag_the_backends_the_service_cannot_reach() {
        let mut r = Registry::default();
        r.set_config(&config(&["10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80"], ""), Instant::now());
        let ip = |s: &str| crate::core::vip::ipv4(addr(s).ip()).unwrap();
        assert_eq!(r.backend_ips(), [ip("10.1.0.1:80"), ip("10.1.0.2:80"), ip("10.1.0.3:80")].into());
        let listed = r.service("web").unwrap().config.interfaces[0].clone();
        let mut routes: BTreeMap<Ipv4Addr, Route> = [
            (ip("10.1.0.1:80"), Route::Via(listed.clone())),
            (ip("10.1.0.2:80"), Route::Via("eth9".into())),
            (ip("10.1.0.3:80"), Route::Unusable("Network is unreachable".into())),
        ]
        .into();
        let changed = r.judge_routes(&routes);
        let flagged: Vec<_> = changed.iter().map(|(s, a, why)| (s.as_str(), a.to_string(), why.is_some())).collect();
        assert_eq!(flagged, [("web", "10.1.0.2:80".into(), true), ("web", "10.1.0.3:80".into(), true)]);
        assert!(changed[0].2.as_deref().unwrap().starts_with("its route leaves by eth9"), "{changed:?}");
        assert_eq!(r.judge_routes(&routes), vec![], "no change, nothing to say");
        let b = &r.service("web").unwrap().backends[&addr("10.1.0.2:80")];
        assert_eq!((b.state_name(), b.in_table()), ("unroutable", false));
        // A reload keeps the flags: routes are looked up again, not reset.
        r.set_config(&config(&["10.1.0.1:80", "10.1.0.2:80", "10.1.0.3:80"], ""), Instant::now());
        assert_eq!(r.judge_routes(&routes), vec![]);
        // The route comes back through a listed interface; one not looked up keeps its flag.
        routes.insert(ip("10.1.0.2:80"), Route::Via(listed));
        routes.remove(&ip("10.1.0.3:80"));
        assert_eq!(r.judge_routes(&routes), vec![("web".to_owned(), addr("10.1.0.2:80"), None)]);
        let in_table: Vec<bool> = r.desired()[0].backends.iter().map(|b| b.in_table).collect();
        assert_eq!(in_table, [true, true, false]);
    }

    #[test]
    fn api_changes_are_checked_whole() {
        let now = Instant::now();
        let mut r = Registry::default();
        r.set_config(&config(&["10.1.0.1:80"], ""), now);
        let before = r.desired();
        assert_eq!(r.add_backend("nope", addr("10.1.0.9:80"), 1), Err(RegistryError::UnknownService("nope".into())));
        assert!(matches!(r.add_backend("web", addr("10.1.0.1:80"), 1), Err(RegistryError::DuplicateBackend { .. })));
        assert_eq!(r.add_backend("web", addr("10.1.0.9:80"), 20_000), Err(RegistryError::Weight(20_000)));
        assert!(matches!(r.add_backend("web", addr("10.0.0.100:80"), 1), Err(RegistryError::BadAddress { .. })));
        assert!(matches!(r.add_backend("web", addr("10.1.0.9:0"), 1), Err(RegistryError::BadAddress { .. })));
        for ip in ["127.0.0.1:80", "127.1.2.3:80", "0.0.0.0:80"] {
            let e = r.add_backend("web", addr(ip), 1).unwrap_err();
            assert!(matches!(e, RegistryError::BadAddress { .. }), "{ip}: {e}");
        }
        assert!(r.add_backend("web", addr("127.0.0.1:80"), 1).unwrap_err().to_string().contains("loopback"));
        assert!(matches!(r.remove_backend("web", addr("10.1.0.9:80"), now), Err(RegistryError::UnknownBackend { .. })));
        assert_eq!(r.desired(), before);
        r.add_backend("web", addr("10.1.0.9:80"), 3).unwrap();
        r.set_weight("web", addr("10.1.0.1:80"), 0).unwrap();
        assert_eq!(table(&r), [("10.1.0.1:80".into(), false), ("10.1.0.9:80".into(), true)]);
    }

    #[test]
    fn readding_a_draining_backend_reactivates_it() {
        let now = Instant::now();
        let mut r = Registry::default();
        r.set_config(&config(&["10.1.0.1:80", "10.1.0.2:80"], ""), now);
        r.set_config(&config(&["10.1.0.1:80"], ""), now);
        r.set_config(&config(&["10.1.0.1:80", "10.1.0.2:80"], ""), now);
        assert_eq!(table(&r), [("10.1.0.1:80".into(), true), ("10.1.0.2:80".into(), true)]);
    }

    #[test]
    fn reload_keeps_scaled_instances_and_forget_removes_at_once() {
        let now = Instant::now();
        let mut r = Registry::default();
        r.set_config(&config(&[], ""), now);
        r.add_instance("web", addr("10.212.0.2:8080")).unwrap();
        r.set_config(&config(&["10.1.0.1:80"], ""), now);
        assert_eq!(table(&r), [("10.1.0.1:80".into(), true), ("10.212.0.2:8080".into(), true)]);
        assert!(r.forget("web", addr("10.212.0.2:8080")));
        assert_eq!(table(&r), [("10.1.0.1:80".into(), true)]);
        assert!(!r.forget("web", addr("10.212.0.2:8080")));
    }

    #[test]
    fn api_backends_stay_out_of_every_instance_subnet() {
        let now = Instant::now();
        let mut r = Registry::default();
        let text = crate::testing::scaled_service("web", 100, 0, (1, 2), "")
            + &crate::testing::scaled_service("api", 101, 1, (1, 2), "");
        r.set_config(&Config::parse(&text, Path::new("t.toml")).unwrap(), now);
        let err = r.add_backend("api", addr("10.212.0.9:8080"), 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "backend 10.212.0.9:8080 is inside 10.212.0.0/24 (instances.process.prefix) of service \"web\", whose \
             addresses its orchestrator hands out"
        );
        assert!(r.service("api").unwrap().backends.is_empty());
        r.add_instance("web", addr("10.212.0.9:8080")).unwrap();
        r.add_backend("api", addr("10.1.0.1:80"), 1).unwrap();
    }

    #[test]
    fn removed_service_goes_at_once() {
        let now = Instant::now();
        let mut r = Registry::default();
        r.set_config(&config(&["10.1.0.1:80"], ""), now);
        r.set_config(&Config::default(), now);
        assert!(r.desired().is_empty());
    }
}
