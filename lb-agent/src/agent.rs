//! `lb-agent run`: load, attach, apply the config, follow its changes, and
//! detach everything on SIGINT or SIGTERM.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::{
    config::Config,
    dataplane::AyaDataplane,
    reconcile::{ApplySummary, Reconciler},
    registry::Registry,
};

/// How often the config file's modification time is checked.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

pub struct Agent {
    dataplane: AyaDataplane,
    reconciler: Reconciler,
    registry: Registry,
    config: Config,
    path: PathBuf,
}

impl Agent {
    /// Validate the config, load the program, attach it and write the maps.
    /// A bad config or interface stops here with nothing left attached.
    pub fn start(path: &Path) -> anyhow::Result<Agent> {
        let config = Config::load(path)?;
        check_interfaces(&config)?;
        let dataplane = AyaDataplane::load()?;
        let mut agent = Agent {
            dataplane,
            reconciler: Reconciler::default(),
            registry: Registry::default(),
            config: Config { services: vec![] },
            path: path.into(),
        };
        agent.switch_to(config)?;
        Ok(agent)
    }

    /// Apply `config`: attach new interfaces, write the maps, detach the
    /// interfaces no service names any more. If attaching fails, the running
    /// config stays as it was.
    fn switch_to(&mut self, config: Config) -> anyhow::Result<ApplySummary> {
        let wanted = interfaces(&config);
        let had = interfaces(&self.config);
        let mut attached_now = Vec::new();
        for iface in wanted.difference(&had) {
            match self.dataplane.attach(iface) {
                Ok(_) => attached_now.push(iface.clone()),
                Err(e) => {
                    for done in &attached_now {
                        let _ =
                            self.dataplane.detach(done).inspect_err(|e| warn!(error = %e, "rollback detach failed"));
                    }
                    return Err(e);
                }
            }
        }
        self.registry.set_config(&config, tokio::time::Instant::now());
        let summary = self.sync()?;
        for iface in had.difference(&wanted) {
            self.dataplane.detach(iface)?;
        }
        self.config = config;
        Ok(summary)
    }

    /// Write the registry's desired state to the maps.
    fn sync(&mut self) -> anyhow::Result<ApplySummary> {
        self.reconciler.apply(&self.registry.desired(), &mut self.dataplane).context("write the load balancer's maps")
    }

    /// Every registered backend's id in the data plane.
    fn backend_ids(&self) -> std::collections::BTreeMap<(String, std::net::SocketAddrV4), u32> {
        let mut ids = std::collections::BTreeMap::new();
        for (name, e) in self.registry.services() {
            let key = e.config.key();
            for addr in e.backends.keys() {
                if let Some(id) = self.reconciler.backend_id(&key, *addr) {
                    ids.insert((name.clone(), *addr), id);
                }
            }
        }
        ids
    }

    /// End the drains that are over; flush the flows of those that hit their
    /// deadline with connections still open.
    fn finish_drains(&mut self) -> anyhow::Result<()> {
        let open = self.dataplane.open_flows()?;
        let ids = self.backend_ids();
        let open_of =
            |name: &str, addr| ids.get(&(name.to_owned(), addr)).and_then(|id| open.get(id)).copied().unwrap_or(0);
        let done = self.registry.finish_drains(tokio::time::Instant::now(), open_of);
        if done.is_empty() {
            return Ok(());
        }
        for (service, d) in &done {
            let id = ids.get(&(service.clone(), d.addr)).copied();
            if let (true, Some(id)) = (d.expired, id) {
                let flushed = self.dataplane.flush_backend_flows(id)?;
                warn!(service, backend = %d.addr, flushed, "drain deadline passed; open flows cut");
            } else {
                info!(service, backend = %d.addr, "drained");
            }
        }
        self.sync()?;
        Ok(())
    }

    /// Re-read the config; a bad one is refused whole and the running one
    /// stays in force.
    fn reload(&mut self, why: &str) {
        let result = Config::load(&self.path).map_err(anyhow::Error::from).and_then(|c| {
            check_interfaces(&c)?;
            if c == self.config {
                return Ok(None);
            }
            self.switch_to(c).map(Some)
        });
        match result {
            Ok(Some(s)) => info!(
                trigger = why,
                services_added = s.services_added,
                services_removed = s.services_removed,
                backends_added = s.backends_added,
                backends_removed = s.backends_removed,
                tables_rebuilt = s.tables_rebuilt,
                slots_written = s.slots_written,
                "config applied"
            ),
            Ok(None) => info!(trigger = why, "config unchanged"),
            Err(e) => warn!(trigger = why, error = format!("{e:#}"), "config refused; keeping the running one"),
        }
    }

    fn describe(&self) {
        for (_, s) in self.reconciler.services() {
            info!(service = s.name, id = s.id, backends = s.backends.len(), "service live");
        }
        for (iface, mode) in self.dataplane.attachments() {
            info!(interface = iface, mode = %mode, "xdp");
        }
    }

    /// Serve until SIGINT or SIGTERM; reload on SIGHUP or a file change.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let mut mtime = modified(&self.path);
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        self.describe();
        info!(config = %self.path.display(), "ready");
        loop {
            tokio::select! {
                _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
                _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
                _ = sighup.recv() => { mtime = modified(&self.path); self.reload("SIGHUP"); }
                _ = tick.tick() => {
                    let now = modified(&self.path);
                    if now != mtime {
                        mtime = now;
                        self.reload("file changed");
                    }
                    if let Err(e) = self.finish_drains() {
                        warn!(error = format!("{e:#}"), "drain check failed");
                    }
                }
            }
        }
        self.dataplane.detach_all();
        info!("detached; maps released");
        Ok(())
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn interfaces(config: &Config) -> BTreeSet<String> {
    config.services.iter().flat_map(|s| s.interfaces.iter().cloned()).collect()
}

/// Every named interface must exist before anything is loaded or attached.
fn check_interfaces(config: &Config) -> anyhow::Result<()> {
    let missing: Vec<String> = config
        .services
        .iter()
        .enumerate()
        .flat_map(|(i, s)| s.interfaces.iter().enumerate().map(move |(j, ifname)| (i, s, j, ifname)))
        .filter(|(_, _, _, ifname)| !Path::new("/sys/class/net").join(ifname).exists())
        .map(|(i, s, j, ifname)| {
            format!("service[{i}] {:?}: interfaces[{j}]: no interface named {ifname:?} here", s.name)
        })
        .collect();
    anyhow::ensure!(missing.is_empty(), "config refused:\n  - {}", missing.join("\n  - "));
    Ok(())
}
