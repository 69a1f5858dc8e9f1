//! One configuration of a scenario: a lab with the agent and its instances,
//! watched while a load runs, with a progress line every few seconds.

use std::{
    io::{self, Write as _},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use lb_agent::status::ScalingStatus;
use lb_lab::{command::try_run_cmd, netns::netns_pids};
use lb_load::{stop::stopped, TimePoint};

use crate::{
    agent::read_status,
    autoscale::{scaling_of, wait_first_instance},
    cli::OrchestratorKind,
    instances::InstancePlan,
    lab::Lab,
    monitor::{mean_cpu, Sample},
    view::fmt_cpu,
};

/// How often the agent's status is read, and how often a progress line is
/// printed.
const POLL: Duration = Duration::from_secs(1);
const PROGRESS_EVERY: f64 = 5.0;

/// What a configuration runs.
pub(crate) struct Setup<'a> {
    pub(crate) kind: OrchestratorKind,
    pub(crate) backend: &'a Path,
    pub(crate) max_connections: Option<u64>,
    /// `[service.scaling]`'s body.
    pub(crate) scaling: String,
    /// More keys of `[service.instances]`.
    pub(crate) instances: &'a str,
    /// Ready instances to wait for before the load starts.
    pub(crate) ready: u32,
}

/// The lab of one configuration, built, with the agent running and
/// `setup.ready` instances ready; `None` on Ctrl-C. The caller cleans it up
/// (its Drop does on errors).
pub(crate) fn start(setup: &Setup<'_>) -> anyhow::Result<Option<Lab>> {
    let mut plan = InstancePlan::new(setup.kind, setup.backend);
    plan.max_connections = setup.max_connections;
    let mut lab = Lab::new(plan)?;
    lab.build()?;
    let timeline = lab.scratch().path().join("timeline.jsonl");
    lab.write_config(&lab.config_toml_with(&timeline, &setup.scaling, setup.instances))?;
    lab.start_agent()?;
    if wait_first_instance(&mut lab)?.is_none() {
        return Ok(None);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if stopped() {
            return Ok(None);
        }
        let agent = lab.agent.as_mut().expect("started");
        if let Some(status) = agent.try_exit_status() {
            bail!("lb-agent exited ({status}); the end of its log:\n{}", agent.log_tail(30));
        }
        let ready = read_status(agent).ok().and_then(|s| scaling_of(&s).map(ready_count)).unwrap_or(0);
        if ready >= setup.ready {
            return Ok(Some(lab));
        }
        if Instant::now() > deadline {
            bail!(
                "{ready} of {} instances ready after 60 s; the end of the agent's log:\n{}",
                setup.ready,
                agent.log_tail(30)
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

pub(crate) fn ready_count(sc: &ScalingStatus) -> u32 {
    sc.replicas.iter().filter(|r| r.phase == "ready").count() as u32
}

/// The instances and the load of one configuration over time, on a clock
/// shared by all the configurations of a scenario (`offset` is where this
/// one starts on it).
pub(crate) struct Watch {
    label: String,
    start: Instant,
    offset: f64,
    next_poll: Instant,
    next_line: f64,
    /// Successes and failures since the last progress line.
    recent: (u64, u64),
    pub(crate) status: Option<ScalingStatus>,
    pub(crate) samples: Vec<Sample>,
    pub(crate) series: Vec<TimePoint>,
}

impl Watch {
    pub(crate) fn new(label: &str, offset: f64) -> Watch {
        Watch {
            label: label.to_owned(),
            start: Instant::now(),
            offset,
            next_poll: Instant::now(),
            next_line: PROGRESS_EVERY,
            recent: (0, 0),
            status: None,
            samples: Vec::new(),
            series: Vec::new(),
        }
    }

    /// Seconds since this configuration's load started.
    pub(crate) fn t(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// The shared clock.
    pub(crate) fn clock(&self) -> f64 {
        self.offset + self.t()
    }

    /// A second of load, with its time relative to the load's start.
    pub(crate) fn point(&mut self, mut p: TimePoint) {
        self.recent.0 += p.ok;
        self.recent.1 += p.failed;
        p.t += self.offset;
        self.series.push(p);
    }

    /// Read the agent's status when due, and print the progress line when
    /// due. An agent that exited is an error.
    pub(crate) fn poll(&mut self, lab: &mut Lab) -> anyhow::Result<()> {
        if Instant::now() < self.next_poll {
            return Ok(());
        }
        self.next_poll = Instant::now() + POLL;
        let agent = lab.agent.as_mut().expect("started");
        if let Some(status) = agent.try_exit_status() {
            bail!("lb-agent exited ({status}) during the run; the end of its log:\n{}", agent.log_tail(30));
        }
        if let Some(sc) = read_status(agent).ok().and_then(|s| scaling_of(&s).cloned()) {
            self.samples.push(Sample::of(self.clock(), &sc));
            self.status = Some(sc);
        }
        let t = self.t();
        if t >= self.next_line {
            self.next_line += PROGRESS_EVERY;
            println!("{}", self.progress_line(t));
            let _ = io::stdout().flush();
            self.recent = (0, 0);
        }
        Ok(())
    }

    fn progress_line(&self, t: f64) -> String {
        let mut s = format!(
            "[{} +{t:>3.0}s] last {PROGRESS_EVERY:.0} s: {} ok, {} failed |",
            self.label, self.recent.0, self.recent.1
        );
        match &self.status {
            Some(sc) => {
                s += &format!(" instances {} ready (desired {}):", ready_count(sc), sc.desired);
                for r in &sc.replicas {
                    s += &format!(" {} {} cpu {},", r.name, r.phase, fmt_cpu(r.cpu_percent));
                }
                s.pop();
            }
            None => s += " no status yet",
        }
        s
    }

    /// The mean CPU per instance over the samples from `from` on (shared
    /// clock).
    pub(crate) fn mean_cpu_since(&self, from: f64) -> Option<f64> {
        mean_cpu(self.samples.iter().filter(|s| s.t >= from).map(|s| s.cpu))
    }
}

/// `kill -9` one ready instance, as a crash would end it: its processes
/// (process orchestrator: everything in its namespace) or its container.
/// Returns its name.
pub(crate) fn kill_one(lab: &Lab, sc: &ScalingStatus) -> anyhow::Result<String> {
    let Some(victim) = sc.replicas.iter().find(|r| r.phase == "ready") else {
        bail!("no ready instance to kill");
    };
    if lab.plan.docker() {
        try_run_cmd("docker", &["kill", "--signal", "KILL", &victim.id])?;
    } else {
        let pids = netns_pids(&victim.id);
        if pids.is_empty() {
            bail!("no process in {}'s namespace {}", victim.name, victim.id);
        }
        for pid in pids {
            let pid = i32::try_from(pid).context("pid")?;
            // SAFETY: kill(2) on a process of the instance this run started.
            if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
                bail!("kill -9 {pid} ({}): {}", victim.name, io::Error::last_os_error());
            }
        }
    }
    Ok(victim.name.clone())
}
