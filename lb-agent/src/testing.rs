//! Fakes of the ports, for unit tests: a data plane that records what is
//! written and answers reads with what the test sets, an orchestrator (and
//! its factory) that the test drives, and a prober whose answers it picks.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use lb_common::{
    v6::{Backend6, BackendAddr6, BackendVips6, Ip6, ServiceKey6},
    Backend, BackendAddr, BackendVips, Counters, Reason, Service, ServiceKey, MAGLEV_TABLE_SIZE,
};

use crate::{
    config::{ChecksumMode, Config, FastPathMode, HealthCheckConfig, HookMode, InterfaceConfig, ServiceConfig},
    ports::{
        AttachMode, Attachment, ConnectionTable, ConntrackScan, Dataplane, DataplaneError, DataplaneReads, Hook,
        HostFacts, InterfaceFacts, L4Checksums, MapWriter, Orchestrator, OrchestratorError, OrchestratorFactory,
        PinnedState, ProbeError, Prober, Replica, Route, Routes, SocketLbState,
    },
};

/// A fresh, empty directory for one test's files.
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "lb-agent-test-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One service "web", scaled between `min` and `max` on CPU; `extra` goes
/// in its table (before the sub-tables).
pub fn scaled(min: u32, max: u32, extra: &str) -> String {
    scaled_service("web", 100, 0, (min, max), extra)
}

/// "web" at 10.0.0.100:80 with `web` as its backends (address, weight),
/// and with `api`, "api" at 10.0.0.101:80 with those backends.
pub fn web_and_api_config(web: &[(&str, u32)], api: Option<&[&str]>) -> crate::config::Config {
    let service = |name: &str, vip: u8| {
        format!("[[service]]\nname = \"{name}\"\nvip = \"10.0.0.{vip}\"\nport = 80\ninterfaces = [\"eth0\"]\n")
    };
    let backend = |a: &str, w: u32| format!("[[service.backend]]\naddress = \"{a}\"\nweight = {w}\n");
    let mut text = service("web", 100);
    text.extend(web.iter().map(|(a, w)| backend(a, *w)));
    if let Some(api) = api {
        text += &service("api", 101);
        text.extend(api.iter().map(|a| backend(a, 1)));
    }
    crate::config::Config::parse(&text, std::path::Path::new("t.toml")).expect("a valid config")
}

/// A scaled service `name` at 10.0.0.`vip`:80, its instances on bridge
/// `lbp<bridge>` (which it names among its interfaces, with eth0).
pub fn scaled_service(name: &str, vip: u8, bridge: u8, (min, max): (u32, u32), extra: &str) -> String {
    format!(
        r#"
[[service]]
name = "{name}"
vip = "10.0.0.{vip}"
port = 80
interfaces = ["eth0", "lbp{bridge}"]
{extra}
[service.scaling]
min_replicas = {min}
max_replicas = {max}
target = {{ cpu = 50.0 }}
[service.instances.process]
command = ["/bin/srv", "--listen", "{{addr}}"]
port = 8080
bridge = "lbp{bridge}"
prefix = "10.{prefix}.0.0"
"#,
        prefix = 212 + bridge
    )
}

/// The errors of a config whose one service has `[service.<table>]` =
/// `body`: how a sub-table's test sees what the whole parse says of it.
pub fn config_errors_with(table: &str, body: &str) -> String {
    let text = format!(
        "[[service]]\nname = \"web\"\nvip = \"10.0.0.1\"\nport = 80\ninterfaces = [\"eth0\"]\n[service.{table}]\n{body}\n"
    );
    match crate::config::Config::parse(&text, std::path::Path::new("t.toml")) {
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// "web" at 10.0.0.100:80 on eth0 (plus `extra`), with `backends`.
pub fn web(extra: &str, backends: &[&str]) -> String {
    let mut text =
        format!("[[service]]\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\ninterfaces = [\"eth0\"]\n{extra}\n");
    for b in backends {
        text += &format!("[[service.backend]]\naddress = \"{b}\"\n");
    }
    text
}

/// An interface as plain as can be: XDP with a fast path, forwarding, no
/// reverse-path filter, Linux's default accept_local (off).
pub fn plain_interface() -> InterfaceFacts {
    InterfaceFacts {
        hook: Hook::Xdp,
        hook_why: "a NIC".into(),
        fast_path: true,
        fast_path_why: "a NIC".into(),
        forwarding: true,
        may_be_partial: false,
        rp_filter: 0,
        accept_local: false,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------
// The data plane.

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Backend { id: u32, backend: Backend },
    Table { service_id: u32, table: u32, entries: usize },
    Service { key: ServiceKey, service: Service },
    RemoveService { key: ServiceKey },
    BackendVips { addr: BackendAddr, vips: Option<BackendVips> },
    Backend6 { id: u32, backend: Backend6 },
    Service6 { key: ServiceKey6, service: Service },
    RemoveService6 { key: ServiceKey6 },
    Source6 { service_id: u32, source: Ip6 },
    BackendVips6 { addr: BackendAddr6, vips: Option<BackendVips6> },
}

impl Write {
    pub fn kind(&self) -> &'static str {
        match self {
            Write::Backend { .. } => "backend",
            Write::Table { .. } => "table",
            Write::Service { .. } => "service",
            Write::RemoveService { .. } => "remove_service",
            Write::BackendVips { .. } => "backend_vips",
            Write::Backend6 { .. } => "backend6",
            Write::Service6 { .. } => "service6",
            Write::RemoveService6 { .. } => "remove_service6",
            Write::Source6 { .. } => "source6",
            Write::BackendVips6 { .. } => "backend_vips6",
        }
    }
}

/// Holds what the maps would hold, and the order things were written in;
/// the reads answer with what the test put in the other fields.
#[derive(Debug, Default)]
pub struct FakeDataplane {
    pub log: Vec<Write>,
    pub backends: BTreeMap<u32, Backend>,
    pub tables: BTreeMap<(u32, u32), Vec<u32>>,
    pub services: BTreeMap<ServiceKey, Service>,
    pub backend_vips: BTreeMap<BackendAddr, BackendVips>,
    /// The IPv6 maps: `BACKENDS6`, `SERVICES6`, `BACKEND_VIPS6`.
    pub backends6: BTreeMap<u32, Backend6>,
    pub services6: BTreeMap<ServiceKey6, Service>,
    pub backend_vips6: BTreeMap<BackendAddr6, BackendVips6>,
    /// `SOURCES6`, by service id.
    pub sources6: BTreeMap<u32, Ip6>,
    /// Counters by service id and by backend id (zero when absent).
    pub service_counters: BTreeMap<u32, Counters>,
    pub backend_counters: BTreeMap<u32, Counters>,
    pub reasons: Vec<(Reason, u64)>,
    /// Open flows by backend id, as a walk of the connection table finds them.
    pub open: BTreeMap<u32, u64>,
    /// Backend ids whose flows were flushed, in order.
    pub flushes: Vec<u32>,
    /// Walks of the connection table so far.
    pub scans: u32,
    /// Entries a flow lookup finds.
    pub flow_entries: Vec<(crate::core::explain::TableKey, crate::core::explain::FlowSeen)>,
    /// Interfaces that do not exist here (every other one does).
    pub missing_interfaces: BTreeSet<String>,
    pub attached: BTreeMap<String, (HookMode, ChecksumMode)>,
    /// The cgroup socket load balancing is attached to.
    pub socket_lb: Option<PathBuf>,
    /// The cgroup v2 mount `host_facts` reports.
    pub cgroup2_mount: Option<PathBuf>,
    /// The host's routes (`ports::Routes`); addresses not here are not judged.
    pub routes: BTreeMap<Ipv4Addr, Route>,
    pub removed_all: bool,
    pub kept: bool,
    /// Every write to `BACKENDS` fails while set.
    pub fail_backend_writes: bool,
    /// What `adopted_state` answers: a previous agent's pinned maps.
    pub pinned: Option<PinnedState>,
}

impl FakeDataplane {
    pub fn table(&self, service_id: u32, table: u32) -> Vec<u32> {
        self.tables.get(&(service_id, table)).cloned().unwrap_or_else(|| vec![0; MAGLEV_TABLE_SIZE as usize])
    }

    /// The id of the live backend entry for `addr`.
    pub fn backend_id(&self, addr: SocketAddr) -> Option<u32> {
        self.backends.iter().find(|(id, b)| b.flags != 0 && self.backend_addr(**id, b) == addr).map(|(id, _)| *id)
    }

    /// The address of backend `id` (entry `b`): IPv6 in `BACKENDS6`.
    fn backend_addr(&self, id: u32, b: &Backend) -> SocketAddr {
        match self.backends6.get(&id) {
            Some(b6) if b.ip_be == 0 => b6.addr().into(),
            _ => SocketAddr::new(Ipv4Addr::from(u32::from_be(b.ip_be)).into(), u16::from_be(b.port_be)),
        }
    }

    /// The addresses of the live backend entries.
    pub fn live_backends(&self) -> BTreeSet<SocketAddr> {
        self.backends.iter().filter(|(_, b)| b.flags != 0).map(|(id, b)| self.backend_addr(*id, b)).collect()
    }

    /// The backend ids in the live half of every service's table.
    pub fn in_tables(&self) -> BTreeSet<u32> {
        self.services.values().flat_map(|s| self.table(s.id, s.table)).filter(|id| *id != 0).collect()
    }

    /// The maps as a new agent reads them back after a restart.
    pub fn pinned_state(&self) -> PinnedState {
        let live = || self.backends.iter().filter(|(_, b)| b.flags != 0);
        PinnedState {
            services: self.services.iter().map(|(k, s)| (*k, *s)).collect(),
            backends: live().map(|(id, b)| (*id, *b)).collect(),
            tables: self
                .services
                .values()
                .chain(self.services6.values())
                .map(|s| (s.id, [self.table(s.id, 0), self.table(s.id, 1)]))
                .collect(),
            backend_vips: self.backend_vips.iter().map(|(a, v)| (*a, *v)).collect(),
            services6: self.services6.iter().map(|(k, s)| (*k, *s)).collect(),
            backends6: live()
                .filter(|(_, b)| b.ip_be == 0)
                .map(|(id, _)| (*id, self.backends6.get(id).copied().unwrap_or_default()))
                .collect(),
            sources6: self
                .services6
                .values()
                .map(|s| (s.id, self.sources6.get(&s.id).copied().unwrap_or_default()))
                .collect(),
            backend_vips6: self.backend_vips6.iter().map(|(a, v)| (*a, *v)).collect(),
        }
    }
}

impl MapWriter for FakeDataplane {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        if self.fail_backend_writes {
            let source = Box::new(std::io::Error::other("injected failure"));
            return Err(DataplaneError::Map { map: lb_common::BACKENDS, op: "write", source });
        }
        self.backends.insert(id, *backend);
        self.log.push(Write::Backend { id, backend: *backend });
        Ok(())
    }

    fn set_table_entries(&mut self, service_id: u32, table: u32, entries: &[(u32, u32)]) -> Result<(), DataplaneError> {
        let mut t = self.table(service_id, table);
        for (slot, id) in entries {
            t[*slot as usize] = *id;
        }
        self.tables.insert((service_id, table), t);
        self.log.push(Write::Table { service_id, table, entries: entries.len() });
        Ok(())
    }

    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> Result<(), DataplaneError> {
        self.services.insert(*key, *service);
        self.log.push(Write::Service { key: *key, service: *service });
        Ok(())
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        self.services.remove(key);
        self.log.push(Write::RemoveService { key: *key });
        Ok(())
    }

    fn set_backend_vips(&mut self, addr: &BackendAddr, vips: Option<&BackendVips>) -> Result<(), DataplaneError> {
        match vips {
            Some(v) => self.backend_vips.insert(*addr, *v),
            None => self.backend_vips.remove(addr),
        };
        self.log.push(Write::BackendVips { addr: *addr, vips: vips.copied() });
        Ok(())
    }

    fn set_backend6(&mut self, id: u32, backend: &Backend6) -> Result<(), DataplaneError> {
        self.backends6.insert(id, *backend);
        self.log.push(Write::Backend6 { id, backend: *backend });
        Ok(())
    }

    fn set_service6(&mut self, key: &ServiceKey6, service: &Service) -> Result<(), DataplaneError> {
        self.services6.insert(*key, *service);
        self.log.push(Write::Service6 { key: *key, service: *service });
        Ok(())
    }

    fn set_source6(&mut self, service_id: u32, source: &Ip6) -> Result<(), DataplaneError> {
        self.sources6.insert(service_id, *source);
        self.log.push(Write::Source6 { service_id, source: *source });
        Ok(())
    }

    fn remove_service6(&mut self, key: &ServiceKey6) -> Result<(), DataplaneError> {
        self.services6.remove(key);
        self.log.push(Write::RemoveService6 { key: *key });
        Ok(())
    }

    fn set_backend_vips6(&mut self, addr: &BackendAddr6, vips: Option<&BackendVips6>) -> Result<(), DataplaneError> {
        match vips {
            Some(v) => self.backend_vips6.insert(*addr, *v),
            None => self.backend_vips6.remove(addr),
        };
        self.log.push(Write::BackendVips6 { addr: *addr, vips: vips.copied() });
        Ok(())
    }
}

/// A [`FakeDataplane`] the agent owns while the test keeps a handle on it;
/// it is its own connection table too.
#[derive(Clone, Default)]
pub struct SharedDataplane(Arc<Mutex<FakeDataplane>>);

impl SharedDataplane {
    pub fn lock(&self) -> MutexGuard<'_, FakeDataplane> {
        lock(&self.0)
    }

    /// Whether the backend at `addr` has slots in its service's live table.
    pub fn in_table(&self, addr: SocketAddr) -> bool {
        let dp = self.lock();
        dp.backend_id(addr).is_some_and(|id| dp.in_tables().contains(&id))
    }

    /// Set the open flows a walk finds for the backend at `addr`.
    pub fn set_open(&self, addr: SocketAddr, open: u64) {
        let mut dp = self.lock();
        let id = dp.backend_id(addr).unwrap_or_else(|| panic!("no backend {addr} in the maps"));
        dp.open.insert(id, open);
    }
}

impl Routes for SharedDataplane {
    fn routes(&self, addrs: &BTreeSet<Ipv4Addr>) -> anyhow::Result<BTreeMap<Ipv4Addr, Route>> {
        let dp = self.lock();
        Ok(addrs.iter().filter_map(|a| Some((*a, dp.routes.get(a)?.clone()))).collect())
    }
}

impl MapWriter for SharedDataplane {
    fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        self.lock().set_backend(id, backend)
    }

    fn set_table_entries(&mut self, service_id: u32, table: u32, entries: &[(u32, u32)]) -> Result<(), DataplaneError> {
        self.lock().set_table_entries(service_id, table, entries)
    }

    fn set_service(&mut self, key: &ServiceKey, service: &Service) -> Result<(), DataplaneError> {
        self.lock().set_service(key, service)
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        self.lock().remove_service(key)
    }

    fn set_backend_vips(&mut self, addr: &BackendAddr, vips: Option<&BackendVips>) -> Result<(), DataplaneError> {
        self.lock().set_backend_vips(addr, vips)
    }

    fn set_backend6(&mut self, id: u32, backend: &Backend6) -> Result<(), DataplaneError> {
        self.lock().set_backend6(id, backend)
    }

    fn set_service6(&mut self, key: &ServiceKey6, service: &Service) -> Result<(), DataplaneError> {
        self.lock().set_service6(key, service)
    }

    fn remove_service6(&mut self, key: &ServiceKey6) -> Result<(), DataplaneError> {
        self.lock().remove_service6(key)
    }

    fn set_source6(&mut self, service_id: u32, source: &Ip6) -> Result<(), DataplaneError> {
        self.lock().set_source6(service_id, source)
    }

    fn set_backend_vips6(&mut self, addr: &BackendAddr6, vips: Option<&BackendVips6>) -> Result<(), DataplaneError> {
        self.lock().set_backend_vips6(addr, vips)
    }
}

impl DataplaneReads for SharedDataplane {
    fn service_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        Ok(self.lock().service_counters.get(&id).copied().unwrap_or_default())
    }

    fn backend_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        Ok(self.lock().backend_counters.get(&id).copied().unwrap_or_default())
    }

    fn reason_counters(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Ok(self.lock().reasons.clone())
    }

    fn attachments(&self) -> Vec<Attachment> {
        let dp = self.lock();
        let l4 = |mode: &ChecksumMode| match mode {
            ChecksumMode::Complete => L4Checksums::Complete,
            ChecksumMode::Auto | ChecksumMode::MayBePartial => L4Checksums::MayBePartial,
        };
        dp.attached
            .iter()
            .map(|(i, (hook, mode))| Attachment {
                interface: i.clone(),
                mode: if *hook == HookMode::Tc { AttachMode::Tc } else { AttachMode::Generic },
                checksums: (*hook != HookMode::Tc).then(|| l4(mode)),
                fast_path: false,
                fast_path_reason: "fake".into(),
                paths: Vec::new(),
            })
            .collect()
    }

    fn socket_lb(&self) -> SocketLbState {
        SocketLbState { cgroup: self.lock().socket_lb.clone(), counters: Vec::new() }
    }
}

impl Dataplane for SharedDataplane {
    fn has_interface(&self, name: &str) -> bool {
        !self.lock().missing_interfaces.contains(name)
    }

    fn attach(&mut self, iface: &str, settings: InterfaceConfig) -> anyhow::Result<AttachMode> {
        let InterfaceConfig { hook, checksums, .. } = settings;
        let mut dp = self.lock();
        anyhow::ensure!(!dp.missing_interfaces.contains(iface), "no interface {iface}");
        dp.attached.insert(iface.to_owned(), (hook, checksums));
        Ok(if hook == HookMode::Tc { AttachMode::Tc } else { AttachMode::Generic })
    }

    fn detach(&mut self, iface: &str) -> anyhow::Result<()> {
        self.lock().attached.remove(iface);
        Ok(())
    }

    fn set_fast_path(&mut self, _iface: &str, _mode: FastPathMode) -> anyhow::Result<()> {
        Ok(())
    }

    fn set_socket_lb(&mut self, cgroup: Option<&std::path::Path>) -> anyhow::Result<()> {
        self.lock().socket_lb = cgroup.map(ToOwned::to_owned);
        Ok(())
    }

    /// No local address; every interface but the missing ones is here,
    /// as plain as can be (XDP with a fast path, forwarding, no filter).
    fn host_facts(&self, config: &Config) -> anyhow::Result<HostFacts> {
        let dp = self.lock();
        let interfaces = config
            .services
            .iter()
            .flat_map(|s| s.interfaces.iter())
            .filter(|i| !dp.missing_interfaces.contains(*i))
            .map(|i| (i.clone(), plain_interface()))
            .collect();
        let addrs = config
            .services
            .iter()
            .flat_map(|s| s.backends.iter().filter_map(|b| crate::core::vip::ipv4(b.address.ip())));
        let routes = addrs.filter_map(|a| Some((a, dp.routes.get(&a)?.clone()))).collect();
        Ok(HostFacts { cgroup2_mount: dp.cgroup2_mount.clone(), interfaces, routes, ..HostFacts::default() })
    }

    fn connection_table(&self) -> Result<Arc<dyn ConnectionTable>, DataplaneError> {
        Ok(Arc::new(self.clone()))
    }

    fn adopted_state(&self) -> anyhow::Result<Option<PinnedState>> {
        Ok(self.lock().pinned.clone())
    }

    fn stale_link_pins(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    fn remove_all(&mut self) {
        let mut dp = self.lock();
        dp.attached.clear();
        dp.socket_lb = None;
        dp.removed_all = true;
    }

    fn keep_on_drop(&mut self) {
        self.lock().kept = true;
    }
}

impl ConnectionTable for SharedDataplane {
    fn scan(&self) -> Result<ConntrackScan, DataplaneError> {
        let mut dp = self.lock();
        dp.scans += 1;
        let open = dp.open.clone();
        Ok(ConntrackScan {
            entries: open.values().sum::<u64>(),
            open,
            max_entries: lb_common::CONNTRACK_MAX,
            snat_claims: 0,
            entries6: 0,
            max_entries6: lb_common::CONNTRACK_MAX,
            snat_claims6: 0,
        })
    }

    fn flush_backend(&self, backend_id: u32) -> Result<u64, DataplaneError> {
        let mut dp = self.lock();
        dp.flushes.push(backend_id);
        Ok(dp.open.remove(&backend_id).unwrap_or(0))
    }

    fn lookup(
        &self,
        key: &crate::core::explain::TableKey,
    ) -> Result<Option<crate::core::explain::FlowSeen>, DataplaneError> {
        Ok(self.lock().flow_entries.iter().find(|(k, _)| k == key).map(|(_, seen)| *seen))
    }
}

// ---------------------------------------------------------------------------
// Orchestrators.

/// How a fake orchestrator answers a call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Answer {
    #[default]
    Ok,
    Fail,
    /// Never answers.
    Hang,
}

impl Answer {
    /// Wait forever for `Hang`; an error for `Fail`.
    async fn give(self, what: &str) -> Result<(), OrchestratorError> {
        match self {
            Answer::Ok => Ok(()),
            Answer::Fail => Err(OrchestratorError::Command { what: what.into(), detail: "refused (fake)".into() }),
            Answer::Hang => std::future::pending().await,
        }
    }
}

/// What a [`FakeOrchestrator`] holds and how it answers.
#[derive(Debug, Default)]
pub struct OrchState {
    /// Its instances by id; `running: false` once one exited.
    pub instances: BTreeMap<String, Replica>,
    pub start: Answer,
    pub stop: Answer,
    pub list: Answer,
    pub cpu: HashMap<String, f64>,
    /// Starts asked for, answered or not.
    pub starts: u32,
    /// Instances started.
    pub started: u32,
    /// Instances stopped, in order.
    pub stopped: Vec<String>,
    pub released: bool,
    /// The third octet of its instances' addresses.
    pub net: u8,
}

/// Instances `i1`, `i2`, ... at 10.9.<net>.1:8080, 10.9.<net>.2:8080, ...
#[derive(Clone, Default)]
pub struct FakeOrchestrator(Arc<Mutex<OrchState>>);

impl FakeOrchestrator {
    pub fn lock(&self) -> MutexGuard<'_, OrchState> {
        lock(&self.0)
    }

    /// The instance `id` exits (crashes).
    pub fn exit(&self, id: &str) {
        self.lock().instances.get_mut(id).unwrap_or_else(|| panic!("no instance {id}")).running = false;
    }

    pub fn instance(&self, id: &str) -> Replica {
        self.lock().instances.get(id).cloned().unwrap_or_else(|| panic!("no instance {id}"))
    }
}

impl Orchestrator for FakeOrchestrator {
    async fn list(&self) -> Result<Vec<Replica>, OrchestratorError> {
        let answer = self.lock().list;
        answer.give("list").await?;
        Ok(self.lock().instances.values().cloned().collect())
    }

    async fn start(&self) -> Result<Replica, OrchestratorError> {
        let answer = {
            let mut o = self.lock();
            o.starts += 1;
            o.start
        };
        answer.give("start").await?;
        let mut o = self.lock();
        o.started += 1;
        let n = o.started;
        let r = Replica {
            id: format!("i{n}"),
            name: format!("web-{n}"),
            addr: std::net::SocketAddrV4::new(Ipv4Addr::new(10, 9, o.net, n as u8), 8080),
            running: true,
        };
        o.instances.insert(r.id.clone(), r.clone());
        Ok(r)
    }

    async fn stop(&self, id: &str) -> Result<(), OrchestratorError> {
        let answer = self.lock().stop;
        answer.give("stop").await?;
        let mut o = self.lock();
        o.stopped.push(id.to_owned());
        o.instances.remove(id).map(|_| ()).ok_or_else(|| OrchestratorError::Unknown(id.to_owned()))
    }

    async fn cpu_percent(&self) -> Result<HashMap<String, f64>, OrchestratorError> {
        Ok(self.lock().cpu.clone())
    }

    async fn release(&self) {
        self.lock().released = true;
    }
}

/// The factory's state: how `make` answers, and what it made.
#[derive(Default)]
pub struct FactoryState {
    pub make: Answer,
    /// The latest orchestrator made for each service.
    pub made: BTreeMap<String, FakeOrchestrator>,
    pub makes: u32,
    /// Instances a killed agent left running, by service: the next
    /// orchestrator made for the service finds them.
    pub left: BTreeMap<String, Vec<Replica>>,
}

#[derive(Clone, Default)]
pub struct FakeOrchestrators(Arc<Mutex<FactoryState>>);

impl FakeOrchestrators {
    pub fn lock(&self) -> MutexGuard<'_, FactoryState> {
        lock(&self.0)
    }

    /// The orchestrator made for `service`.
    pub fn of(&self, service: &str) -> FakeOrchestrator {
        self.lock().made.get(service).cloned().unwrap_or_else(|| panic!("no orchestrator made for {service}"))
    }
}

impl OrchestratorFactory for FakeOrchestrators {
    type Orchestrator = FakeOrchestrator;

    async fn make(&self, service: &ServiceConfig) -> anyhow::Result<FakeOrchestrator> {
        let answer = {
            let mut f = self.lock();
            f.makes += 1;
            f.make
        };
        answer.give("make").await?;
        let o = FakeOrchestrator::default();
        let mut f = self.lock();
        // Each service its own addresses: the first made gets 10.9.0.x.
        let others = f.made.keys().filter(|s| **s != service.name).count();
        {
            let mut state = o.lock();
            state.net = others as u8;
            let left = f.left.remove(&service.name).unwrap_or_default();
            state.started = left.len() as u32;
            state.instances = left.into_iter().map(|r| (r.id.clone(), r)).collect();
        }
        f.made.insert(service.name.clone(), o.clone());
        Ok(o)
    }
}

// ---------------------------------------------------------------------------
// Probes.

/// Every address answers, except those in `down`.
#[derive(Clone, Default)]
pub struct FakeProber(Arc<Mutex<ProberState>>);

#[derive(Debug, Default)]
pub struct ProberState {
    pub down: BTreeSet<SocketAddr>,
    pub probes: u32,
}

impl FakeProber {
    pub fn lock(&self) -> MutexGuard<'_, ProberState> {
        lock(&self.0)
    }
}

impl Prober for FakeProber {
    async fn probe(&self, addr: SocketAddr, _check: &HealthCheckConfig) -> Result<(), ProbeError> {
        let mut p = self.lock();
        p.probes += 1;
        if p.down.contains(&addr) {
            return Err("connection refused (fake)".into());
        }
        Ok(())
    }
}
