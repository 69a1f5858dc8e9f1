//! Applying a config: at start-up and on every reload (the file changed,
//! SIGHUP, or the `reload` call). The orchestrators of services a config
//! newly scales are made off the loop (Docker, iptables, bridges); the
//! config is applied, whole or not at all, once they are in.

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use tokio::{sync::oneshot, time::Instant};
use tracing::{info, warn};

use super::{config_file, scaler::Scaler, stamped, Agent, Done, Preparing};
use crate::{
    config::{Config, ServiceConfig},
    core::{
        changes::{self, ReloadChanges},
        deploy,
        reconcile::{ApplySummary, Reconciler},
    },
    ports::{Dataplane, HostFacts, Orchestrator, OrchestratorFactory, Prober, Replica},
    serve::api::Response,
};

impl<D: Dataplane, F: OrchestratorFactory, P: Prober> Agent<D, F, P> {
    /// Services `config` scales that have no scaler yet.
    pub(super) fn newly_scaled(&self, config: &Config) -> Vec<ServiceConfig> {
        config.services.iter().filter(|s| s.scaling.is_some() && !self.scalers.contains_key(&s.name)).cloned().collect()
    }

    /// Apply the config `file`, with the run-time overlay laid over it
    /// (`core::overlay`) and the orchestrators made for the services it
    /// newly scales (their bridges or networks are what the service's
    /// interfaces name): attach new interfaces, write the maps, detach the
    /// interfaces no service names any more, then start and retire
    /// scalers. If anything fails, the running config (and overlay) stays
    /// as it was and the new orchestrators are released.
    pub(super) fn switch_to(
        &mut self,
        file: Config,
        made: Vec<(ServiceConfig, F::Orchestrator)>,
    ) -> anyhow::Result<(ApplySummary, ReloadChanges)> {
        let (overlay, dropped) = self.overlay.rebase(&file);
        let config = overlay.apply(&file);
        let serving = std::mem::take(&mut self.serving_at_start);
        let mut new = Vec::new();
        for (svc, orch) in made {
            let mut s = Scaler::new(&svc, orch, self.prober.clone(), self.scaler_tx.clone())
                .with_context(|| format!("service {:?}: set up its instances", svc.name))?;
            let mine = serving.iter().filter(|(name, _)| *name == svc.name).map(|(_, r)| r.clone());
            for e in s.adopt_serving(mine.collect()) {
                self.event(e);
            }
            new.push((svc.name, s));
        }
        let summary = match self.apply(&config, &serving) {
            Ok(s) => s,
            Err(e) => {
                // They have run no round yet: all they hold is what they
                // adopted, which still serves through the pinned table.
                for (_, s) in new {
                    tokio::spawn(s.abandon());
                }
                return Err(e);
            }
        };
        for svc in &config.services {
            if let (Some(s), Some(p)) = (self.scalers.get_mut(&svc.name), &svc.scaling) {
                s.set_policy(p.clone());
            }
        }
        for (name, s) in new {
            info!(service = name, "autoscaling");
            self.scalers.insert(name, s);
        }
        let changes = changes::summarize(&self.config, &config, &summary.slots_moved, &dropped, overlay.len());
        self.config = config;
        self.file_config = file;
        self.overlay = overlay;
        self.retire_scalers();
        Ok((summary, changes))
    }

    /// The data-plane half of `switch_to`, with the instances `serving`
    /// in the registry. If an attach fails, the interfaces attached for it
    /// are detached again.
    fn apply(&mut self, config: &Config, serving: &[(String, Replica)]) -> anyhow::Result<ApplySummary> {
        let facts = self.check_deployment(config)?;
        let wanted = interfaces(config);
        let had = interfaces(&self.config);
        let mut attached_now = Vec::new();
        // Every wanted interface: new ones are attached, and one whose
        // `hook` or `checksums` setting changed gets the other program.
        for iface in &wanted {
            let new = !had.contains(iface);
            let attached = self
                .dataplane
                .attach(iface, config.interface(iface))
                .and_then(|_| self.dataplane.set_fast_path(iface, config.fast_path(iface)));
            match attached {
                Ok(_) if new => attached_now.push(iface.clone()),
                Ok(_) => {}
                Err(e) => {
                    for done in &attached_now {
                        if let Err(e) = self.dataplane.detach(done) {
                            warn!(error = %e, interface = done, "rollback detach failed");
                        }
                    }
                    return Err(e);
                }
            }
        }
        self.registry.set_config(config, Instant::now());
        for (service, r) in serving {
            if let Err(e) = self.registry.add_instance(service, r.socket()) {
                warn!(service, instance = r.name, error = %e, "adopting a serving instance failed");
            }
        }
        // New backends come in flagged if the host cannot route them (a
        // warning above), never in the table for a tick.
        let flags = self.registry.judge_routes(&facts.routes);
        self.report_route_flags(&flags);
        let summary = self.sync()?;
        for iface in had.difference(&wanted) {
            self.dataplane.detach(iface)?;
        }
        self.apply_socket_lb(config, &facts);
        Ok(summary)
    }

    /// Attach socket load balancing where `config` and the host say, or
    /// detach it. Clients on this host are a part of the service, not all
    /// of it: a failure is an error to see in `status`, not a refusal.
    fn apply_socket_lb(&mut self, config: &Config, facts: &HostFacts) {
        let cgroup = deploy::socket_lb_cgroup(config, facts);
        self.socket_lb_note = match (&cgroup, config.socket_lb.enabled) {
            (_, false) => "disabled in the config ([socket_lb] enabled = false)".into(),
            (None, true) => "no cgroup v2 mount on this host: processes on it cannot reach the services".into(),
            (Some(_), true) => String::new(),
        };
        if let Err(e) = self.dataplane.set_socket_lb(cgroup.as_deref()) {
            let at = cgroup.as_deref().unwrap_or(std::path::Path::new("-")).display().to_string();
            warn!(error = format!("{e:#}"), cgroup = at, "socket load balancing failed");
            self.socket_lb_note = format!("attaching to {at} failed: {e:#}");
            self.error(format!("socket load balancing: attaching to {at} failed: {e:#}"));
        }
    }

    /// Refuse a config the data plane cannot serve here (a named interface
    /// that does not exist, a backend it cannot route to, ...); log what it
    /// can serve only in part. `check` judges the same (`core::deploy`).
    /// Scaled services' orchestrators have made their bridges by now.
    fn check_deployment(&self, config: &Config) -> anyhow::Result<HostFacts> {
        let facts = self.dataplane.host_facts(config).context("read this host's addresses and interfaces")?;
        // A backend already serving is not refused for a route that moved
        // since it came in (that would refuse every reload and `backend
        // reset` until the route is back): the registry flags it
        // `unroutable` and keeps it out of the table, as between reloads.
        let mut judged = facts.clone();
        for ip in self.registry.backend_ips() {
            judged.routes.remove(&ip);
        }
        let mut refused = Vec::new();
        for f in deploy::judge(config, &judged) {
            match f.severity {
                deploy::Severity::Warn => warn!(finding = %f.text, "config can be served only in part"),
                deploy::Severity::Refuse => refused.push(f.text),
            }
        }
        anyhow::ensure!(refused.is_empty(), "config refused:\n  - {}", refused.join("\n  - "));
        Ok(facts)
    }

    /// Re-read the config; a bad one is refused whole and the running one
    /// stays in force. Orchestrators for newly scaled services are made off
    /// the loop, and the config applied when they are in; `replies` get the
    /// outcome then. A reload asked for meanwhile runs after that one.
    pub(super) fn reload(&mut self, why: &str, replies: Vec<oneshot::Sender<Response>>) {
        if self.preparing.is_some() {
            let (_, waiting) = self.queued_reload.get_or_insert_with(|| (why.to_owned(), Vec::new()));
            waiting.extend(replies);
            return;
        }
        let config = match config_file::load_for_reload(&self.options.config) {
            Err(e) => return self.finish_reload(why, Err(e), replies),
            Ok(c) if c == self.file_config => return self.finish_reload(why, Ok(None), replies),
            Ok(c) => c,
        };
        if config.dataplane != self.config.dataplane {
            warn!(trigger = why, "[dataplane] changed: it takes effect at the agent's next start");
        }
        let new = self.newly_scaled(&config);
        if new.is_empty() {
            let result = self.switch_to(config, Vec::new()).map(|(_, c)| Some(c));
            return self.finish_reload(why, result, replies);
        }
        let (factory, done) = (self.orchestrators.clone(), self.done_tx.clone());
        let task = tokio::spawn(async move {
            let _ = done.send(Done::Prepared(make_orchestrators(factory, new).await));
        });
        self.preparing = Some(Preparing { config, why: why.to_owned(), replies, task });
    }

    /// The orchestrators of a reload are in: apply it.
    pub(super) fn on_prepared(&mut self, made: anyhow::Result<Vec<(ServiceConfig, F::Orchestrator)>>) {
        let Some(p) = self.preparing.take() else { return };
        let result = made.and_then(|m| self.switch_to(p.config, m)).map(|(_, c)| Some(c));
        self.finish_reload(&p.why, result, p.replies);
        if let Some((why, replies)) = self.queued_reload.take() {
            self.reload(&why, replies);
        }
    }

    /// Log and record a reload's outcome (`None`: the config is unchanged),
    /// and answer whoever asked for it: the same summary each time.
    fn finish_reload(
        &mut self,
        why: &str,
        result: anyhow::Result<Option<ReloadChanges>>,
        replies: Vec<oneshot::Sender<Response>>,
    ) {
        if result.is_ok() {
            self.config_refused = None;
        }
        let response = match result {
            Ok(changes) => {
                let msg = match changes {
                    Some(c) => format!("config applied ({why}): {c}"),
                    None => {
                        let mut msg = format!("config unchanged ({why})");
                        let _ = changes::write_kept(&mut msg, self.overlay.len());
                        msg
                    }
                };
                info!(trigger = why, "{msg}");
                self.event(msg.clone());
                Response::ok(msg)
            }
            Err(e) => {
                let msg = format!("config refused ({why}); keeping the running one: {e:#}");
                warn!(trigger = why, error = format!("{e:#}"), "config refused; keeping the running one");
                self.error(msg.clone());
                self.config_refused = Some(stamped(msg.clone()));
                Response::error(msg)
            }
        };
        for reply in replies {
            let _ = reply.send(response.clone());
        }
    }

    /// `lb-agent backend reset`: drop the service's run-time changes (or
    /// one backend's) and apply the file as it was last read.
    pub(super) fn reset_overlay(&mut self, service: &str, addr: Option<SocketAddr>) -> Response {
        if self.registry.service(service).is_none() {
            return Response::error(format!("no service named {service:?}"));
        }
        let saved = self.overlay.clone();
        let n = self.overlay.reset(service, addr);
        if n == 0 {
            let of = addr.map(|a| format!(" for {a}")).unwrap_or_default();
            return Response::error(format!("{service}: no run-time change{of} to reset (see `lb-agent config dump`)"));
        }
        match self.switch_to(self.file_config.clone(), Vec::new()) {
            Ok((_, changes)) => {
                let msg =
                    format!("reset {service}: {n} run-time change(s) dropped, the file's backends apply: {changes}");
                info!("{msg}");
                self.event(msg.clone());
                Response::ok(msg)
            }
            Err(e) => {
                self.overlay = saved;
                let msg = format!("reset {service} failed; the run-time changes stay: {e:#}");
                self.error(msg.clone());
                Response::error(msg)
            }
        }
    }

    /// `lb-agent config dump`: the effective config as TOML, the file's
    /// text with each line the overlay changed commented.
    pub(super) fn dump_config(&self) -> Response {
        let path = &self.options.config;
        let dumped = std::fs::read_to_string(path)
            .with_context(|| format!("read {}", path.display()))
            .and_then(|text| self.overlay.dump(&text, &self.file_config, path));
        match dumped {
            Ok(text) => Response::ok(text),
            Err(e) => Response::error(format!("{e:#}")),
        }
    }

    /// Stop the scalers of services the running config no longer scales.
    fn retire_scalers(&mut self) {
        let gone: Vec<String> = self
            .scalers
            .keys()
            .filter(|n| !self.config.services.iter().any(|s| &s.name == *n && s.scaling.is_some()))
            .cloned()
            .collect();
        self.retiring.retain(|t| !t.is_finished());
        for name in gone {
            let Some(s) = self.scalers.remove(&name) else { continue };
            let done = self.done_tx.clone();
            self.retiring.push(tokio::spawn(async move {
                s.shut_down().await;
                let _ = done.send(Done::Retired(name));
            }));
        }
    }
}

/// After a restart: the running instances of `made`'s orchestrators that
/// the adopted data plane has in its table. They stay there (the first
/// sync would otherwise take them out until the scaler's readiness probes
/// put them back, and new flows would find no backend meanwhile).
pub(super) async fn serving_instances<O: Orchestrator>(
    reconciler: &Reconciler,
    made: &[(ServiceConfig, O)],
) -> Vec<(String, Replica)> {
    let out_of_table = reconciler.out_of_table();
    let mut serving = Vec::new();
    for (svc, orch) in made {
        let key = svc.key();
        let in_table = |r: &Replica| {
            reconciler.backend_id(&key, r.socket()).is_some() && !out_of_table.contains(&(key, r.socket()))
        };
        match orch.list().await {
            Ok(listed) => {
                serving.extend(listed.into_iter().filter(|r| r.running && in_table(r)).map(|r| (svc.name.clone(), r)))
            }
            // The scaler's own listing adopts them later, through its probes.
            Err(e) => warn!(service = svc.name, error = %e, "listing the instances left running failed"),
        }
    }
    serving
}

/// Make the orchestrators of `services`; if one fails, those already made
/// are released.
pub(super) async fn make_orchestrators<F: OrchestratorFactory>(
    factory: Arc<F>,
    services: Vec<ServiceConfig>,
) -> anyhow::Result<Vec<(ServiceConfig, F::Orchestrator)>> {
    let mut made = Vec::new();
    for svc in services {
        match factory.make(&svc).await.with_context(|| format!("service {:?}: set up its instances", svc.name)) {
            Ok(o) => made.push((svc, o)),
            Err(e) => {
                for (_, o) in made {
                    o.release().await;
                }
                return Err(e);
            }
        }
    }
    Ok(made)
}

fn interfaces(config: &Config) -> BTreeSet<String> {
    config.services.iter().flat_map(|s| s.interfaces.iter().cloned()).collect()
}
