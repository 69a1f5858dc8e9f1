//! The lab: namespaces, veths, the agent and its instances. Everything it
//! makes it records, and `cleanup` (also run by Drop, so on errors and
//! panics) removes exactly that.

use std::{
    fmt::Write as _,
    fs,
    io::{self, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use lb_lab::{
    agent::{Agent, AgentArgs},
    command::try_run_cmd,
    docker::{build_demo_image_from, docker_try, try_static_backend_bin, Dockerd, DEMO_IMAGE},
    netns::{netns_path, InstanceNamespaces, LinkGuard, NetNs},
    scratch::Scratch,
};

use crate::{
    autoscale::{
        CLIENT_ADDR, CLIENT_IFACE, CPU_TARGET, INSTANCE_NET, INSTANCE_PORT, LB_ADDR, LB_IFACE, MAX_REPLICAS,
        MIN_REPLICAS, SERVICE, VIP, VIP_PORT,
    },
    instances::{toml_string, InstancePlan},
    metrics_port::{bind_free_port, Relay, IN_NAMESPACE},
};

pub(crate) struct Lab {
    /// The agent's namespace: a namespace of ours for processes, the host's
    /// (`None`) for Docker, where dockerd's bridge is.
    pub(crate) lb_ns: Option<String>,
    /// The LB's client-facing veth: in `lb_ns`, or in the host's namespace
    /// (named after our pid) for Docker.
    lb_iface: String,
    pub(crate) client_ns: String,
    pub(crate) plan: InstancePlan,
    /// Scratch directory: config, control socket, pins (bpffs), agent log.
    /// `None` only once cleaned up.
    scratch: Option<Scratch>,
    /// Namespaces this run created, in order.
    namespaces: Vec<NetNs>,
    /// Processes: the namespaces the agent makes for its instances, which
    /// cleanup removes if the agent leaves any behind.
    instances: Option<InstanceNamespaces>,
    pub(crate) agent: Option<Agent>,
    /// Where the agent's `/metrics` is reachable from the host's namespace,
    /// and the relay that carries it there from the LB namespace.
    pub(crate) metrics: Option<SocketAddr>,
    relay: Option<Relay>,
    /// Docker: the engine, stopped again at the end if this run started it.
    dockerd: Option<Dockerd>,
    /// Docker: the network was absent when we started, so the one there at
    /// the end is the agent's, made for this run.
    network_is_ours: bool,
    /// Docker: the host end of the client's veth, deleted at once in the
    /// cleanup (the kernel would take it only once the client's namespace
    /// is torn down, seconds later: too late for the next scenario row).
    host_link: Option<LinkGuard>,
    cleaned: bool,
}

impl Lab {
    pub(crate) fn new(plan: InstancePlan) -> anyhow::Result<Lab> {
        let pid = std::process::id();
        let docker = plan.docker();
        let mut lab = Lab {
            lb_ns: (!docker).then(|| format!("lbd-{pid}-lb")),
            lb_iface: if docker { format!("lbc{pid}") } else { LB_IFACE.to_owned() },
            client_ns: format!("lbd-{pid}-client"),
            plan,
            scratch: None,
            namespaces: Vec::new(),
            instances: None,
            agent: None,
            metrics: None,
            relay: None,
            dockerd: None,
            network_is_ours: false,
            host_link: None,
            cleaned: false,
        };
        // Names carry our pid; anything by these names is a leftover of an
        // earlier run that had the same pid. Refuse rather than touch it.
        let taken: Vec<String> = lab
            .lb_ns
            .iter()
            .chain([&lab.client_ns])
            .filter(|n| netns_path(n).is_ok_and(|p| p.exists()))
            .cloned()
            .collect();
        if !taken.is_empty() {
            bail!(
                "network namespace(s) {} exist already (left by an earlier run?); this run does not touch what it \
                 did not create: remove them with `ip netns del NAME` and try again",
                taken.join(", ")
            );
        }
        if !lab.plan.docker() {
            // Only this run's agent makes `<bridge>-<n>` (the bridge name
            // holds our pid).
            let claimed = InstanceNamespaces::try_claim(&lab.plan.bridge)
                .context("remove them with `ip netns del NAME` and try again")?;
            lab.instances = Some(claimed);
        }
        if lab.lb_ns.is_none() && Path::new("/sys/class/net").join(&lab.lb_iface).exists() {
            bail!("interface {} exists already (left by an earlier run?); this run does not touch it", lab.lb_iface);
        }
        let scratch =
            Scratch::create_new(&format!("lbd-{pid}")).context("left by an earlier run? remove it and try again")?;
        lab.scratch = Some(scratch);
        Ok(lab)
    }

    pub(crate) fn scratch(&self) -> &Scratch {
        self.scratch.as_ref().expect("the scratch directory goes only with the cleanup")
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        self.namespaces.push(NetNs::create(name)?);
        Ok(())
    }

    /// One of this run's namespaces, once built.
    fn netns(&self, name: &str) -> Option<&NetNs> {
        self.namespaces.iter().find(|ns| ns.name() == name)
    }

    /// The client's namespace, once built.
    pub(crate) fn client(&self) -> Option<&NetNs> {
        self.netns(&self.client_ns)
    }

    /// Client ns ⇄ LB ns; the agent makes the instances' bridge itself.
    pub(crate) fn build(&mut self) -> anyhow::Result<()> {
        if self.plan.docker() {
            return self.build_docker();
        }
        let (lb, client) = (self.lb_ns.clone().expect("processes: an LB namespace"), self.client_ns.clone());
        self.add_netns(&lb)?;
        // Before any interface exists, so that the veth and the bridge
        // inherit rp_filter=0: a reply that falls back to the kernel comes
        // from a client the bridge does not route to.
        for setting in ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"] {
            try_run_cmd("ip", &["netns", "exec", &lb, "sysctl", "-qw", setting])?;
        }
        self.add_netns(&client)?;
        // Created directly inside the two namespaces: nothing ever appears
        // in the host's namespace.
        ip(&[
            "link",
            "add",
            "name",
            LB_IFACE,
            "netns",
            &lb,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_IFACE,
            "netns",
            &client,
        ])?;
        ip(&["-n", &lb, "addr", "add", &format!("{LB_ADDR}/24"), "dev", LB_IFACE])?;
        ip(&["-n", &lb, "link", "set", LB_IFACE, "up"])?;
        ip(&["-n", &client, "addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", CLIENT_IFACE])?;
        ip(&["-n", &client, "link", "set", CLIENT_IFACE, "up"])?;
        // The VIP is the LB's own address on this link: the client needs no
        // route, and has none beyond the link (no default route).
        Ok(())
    }

    /// Docker: the client namespace with a veth into the host's namespace,
    /// where the agent runs beside dockerd; the engine started if needed and
    /// the demo image built. The agent makes the network and its bridge.
    fn build_docker(&mut self) -> anyhow::Result<()> {
        let (exists, _) = docker_try(&["network", "inspect", &self.plan.network]);
        if exists {
            bail!("docker network {} exists already; this run does not touch it", self.plan.network);
        }
        let bin = try_static_backend_bin().context("or use --orchestrator process")?;
        // Panics (with the engine's log) if dockerd cannot start; the lab's
        // Drop still cleans up.
        let dockerd = Dockerd::ensure();
        println!(
            "  docker   {}",
            if dockerd.started_here() {
                "engine started for this run (stopped again at the end)"
            } else {
                "engine running"
            }
        );
        self.dockerd = Some(dockerd);
        let t = Instant::now();
        let image = build_demo_image_from(&bin);
        println!(
            "  image    {DEMO_IMAGE} ({}) built in {:.1} s",
            &image[..image.len().min(19)],
            t.elapsed().as_secs_f64()
        );
        self.network_is_ours = true;
        let client = self.client_ns.clone();
        self.add_netns(&client)?;
        let lb = self.lb_iface.clone();
        ip(&["link", "add", "name", &lb, "type", "veth", "peer", "name", CLIENT_IFACE, "netns", &client])?;
        self.host_link = Some(LinkGuard(lb.clone()));
        ip(&["addr", "add", &format!("{LB_ADDR}/24"), "dev", &lb])?;
        ip(&["link", "set", &lb, "up"])?;
        ip(&["-n", &client, "addr", "add", &format!("{CLIENT_ADDR}/24"), "dev", CLIENT_IFACE])?;
        ip(&["-n", &client, "link", "set", CLIENT_IFACE, "up"])?;
        // The VIP is the LB's own address on this link: the client needs no
        // route, and has none beyond the link (no default route).
        Ok(())
    }

    pub(crate) fn describe(&self) -> String {
        let mut s = String::new();
        let lb = self.lb_ns.as_deref().unwrap_or("(the host's)");
        let _ = writeln!(
            s,
            "  client   ns {:<20} {CLIENT_ADDR}/24 on {CLIENT_IFACE}, no route beyond the link",
            self.client_ns
        );
        let _ = writeln!(
            s,
            "  LB       ns {lb:<20} {LB_ADDR}/24 on {}, ip_forward=1; the VIP {VIP}:{VIP_PORT} is this address (host-address deployment)",
            self.lb_iface
        );
        if self.plan.docker() {
            let _ = writeln!(
                s,
                "  network  {:<23} bridge {}: containers get {INSTANCE_NET} addresses and listen on :{INSTANCE_PORT}",
                self.plan.network, self.plan.bridge
            );
        } else {
            let _ = writeln!(
                s,
                "  bridge   {:<23} in {lb}: instances {}-<n> get {INSTANCE_NET} addresses and listen on :{INSTANCE_PORT}",
                self.plan.bridge, self.plan.bridge
            );
        }
        let _ = writeln!(
            s,
            "  program  on {} and {}, at tc (lb-agent's hook for veths and bridges; both directions cross it)",
            self.lb_iface,
            self.plan.reply_interface()
        );
        s
    }

    pub(crate) fn config_toml(&self, timeline: &Path, quick: bool) -> String {
        let mut scaling = format!(
            "min_replicas = {MIN_REPLICAS}\nmax_replicas = {MAX_REPLICAS}\ntarget = {{ cpu = {CPU_TARGET:.1} }}\n"
        );
        if quick {
            scaling += "[service.scaling.scale_down]\nstabilization_window = \"5s\"\nperiod = \"5s\"\n";
        }
        self.config_toml_with(timeline, &scaling, "")
    }

    /// The config with `scaling` as `[service.scaling]`'s body (sub-tables
    /// may follow) and `instances` as more of `[service.instances]`' keys.
    pub(crate) fn config_toml_with(&self, timeline: &Path, scaling: &str, instances: &str) -> String {
        let mut s = format!(
            "# Written by lb-demo (pid {}); removed on exit.\n\n[[service]]\nname = \"{SERVICE}\"\nvip = \"{VIP}\"\n\
             port = {VIP_PORT}\ninterfaces = [{}, {}]\n\
             health_check = {{ kind = \"http\", path = \"/healthz\", interval = \"500ms\" }}\ndrain_timeout = \"10s\"\n\n\
             [service.scaling]\n{scaling}",
            std::process::id(),
            toml_string(&self.lb_iface),
            toml_string(self.plan.reply_interface()),
        );
        let _ =
            write!(s, "\n[service.instances]\ntimeline = {}\n{instances}", toml_string(&timeline.to_string_lossy()));
        s += &self.plan.toml();
        // Only the demo's own client namespace sends to the VIP.
        s += &lb_lab::cgroup::socket_lb_toml(None);
        s
    }

    pub(crate) fn write_config(&self, text: &str) -> anyhow::Result<PathBuf> {
        let path = self.scratch().config_path();
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// Start the agent in the LB namespace (the host's for Docker), with
    /// everything it keeps in the scratch directory.
    pub(crate) fn start_agent(&mut self) -> anyhow::Result<()> {
        // Metrics on the host's loopback: the agent's own listener beside
        // dockerd, or a relay into the LB namespace.
        let host_side = bind_free_port()?;
        let metrics_address = match self.lb_ns.as_deref() {
            Some(ns) => {
                let relay = Relay::start(host_side, ns, IN_NAMESPACE)?;
                self.metrics = Some(relay.addr);
                self.relay = Some(relay);
                IN_NAMESPACE
            }
            None => {
                let addr = host_side.local_addr()?;
                drop(host_side);
                self.metrics = Some(addr);
                addr
            }
        };
        let scratch = self.scratch();
        let args = AgentArgs {
            own_process_group: true,
            metrics_address: Some(metrics_address),
            ..scratch.agent_args(scratch.config_path())
        };
        let ns = self.lb_ns.as_deref().and_then(|n| self.netns(n));
        self.agent = Some(Agent::try_spawn(ns, &args)?);
        Ok(())
    }

    /// Remove everything this run made, in order: the agent (SIGTERM: it
    /// stops its instances and detaches XDP), instance namespaces it left,
    /// our namespaces (their veths and the bridge go with them), the bpffs
    /// the agent mounted for its pins, the scratch directory. Returns what
    /// it did, for the user.
    pub(crate) fn cleanup(&mut self) -> Vec<String> {
        if self.cleaned {
            return Vec::new();
        }
        self.cleaned = true;
        let mut notes = Vec::new();
        if let Some(mut agent) = self.agent.take() {
            let status = agent.stop_within(Duration::from_secs(20));
            notes.push(format!("lb-agent stopped ({})", status.map_or("killed".into(), |s| s.to_string())));
        }
        self.relay = None;
        for id in self.plan.leftover_containers() {
            match try_run_cmd("docker", &["rm", "-f", "-v", &id]) {
                Ok(_) => notes.push(format!("removed leftover container {}", &id[..id.len().min(12)])),
                Err(e) => notes.push(format!("WARNING: {e:#}")),
            }
        }
        if self.network_is_ours && docker_try(&["network", "inspect", &self.plan.network]).0 {
            match try_run_cmd("docker", &["network", "rm", &self.plan.network]) {
                Ok(_) => notes.push(format!("docker network {} removed", self.plan.network)),
                Err(e) => notes.push(format!("WARNING: {e:#}")),
            }
        }
        if let Some(instances) = self.instances.take() {
            // A process still in one is an instance the agent lost.
            notes.extend(instances.remove_left());
        }
        self.host_link = None;
        let mut removed = Vec::new();
        for ns in self.namespaces.drain(..).rev() {
            let name = ns.name().to_owned();
            match ns.remove() {
                Ok(()) => removed.push(name),
                Err(e) => notes.push(format!("WARNING: {e}")),
            }
        }
        if !removed.is_empty() {
            let bridge = if self.plan.docker() { String::new() } else { format!(" and bridge {}", self.plan.bridge) };
            notes.push(format!(
                "namespaces {} removed (with veth {}/{CLIENT_IFACE}{bridge})",
                removed.join(", "),
                self.lb_iface
            ));
        }
        if let Some(d) = self.dockerd.take() {
            let started = d.started_here();
            drop(d);
            if started {
                notes.push("dockerd (started for this run) stopped".into());
            }
        }
        if let Some(scratch) = self.scratch.take() {
            let path = scratch.path().display().to_string();
            match scratch.remove() {
                Ok(()) => notes.push(format!("{path} removed")),
                Err(e) => notes.push(format!("WARNING: {e}")),
            }
        }
        if notes.is_empty() {
            notes.push("nothing was created".into());
        }
        notes
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.cleaned {
            // Not eprintln: this may run while unwinding from a failed
            // write, and a second panic would abort before the cleanup.
            for n in self.cleanup() {
                let _ = writeln!(io::stderr(), "lb-demo cleanup: {n}");
            }
        }
    }
}

fn ip(args: &[&str]) -> std::io::Result<String> {
    try_run_cmd("ip", args)
}
