//! `--scenario availability`: the KVM + HAProxy setup's table. siege with
//! 30 users against 1 instance, 2 instances, the autoscaled service (1-4,
//! CPU above 60 % up, below 10 % down) and the autoscaled service with one
//! instance killed mid-run.

use std::{sync::mpsc::RecvTimeoutError, time::Duration};

use lb_agent::status::ScalingStatus;
use lb_load::stop::stopped;

use super::{
    report::{self, ResultsFile},
    siege::{Siege, SiegeSummary},
    table::Table,
    watch::{self, kill_one, ready_count, Setup, Watch},
    Common, Outcome,
};
use crate::{
    autoscale::{VIP, VIP_PORT},
    monitor::Sample,
    results::instance_path,
};

/// siege's users and their delay (a random 0..DELAY s between requests).
pub(crate) const USERS: u32 = 30;
pub(crate) const DELAY_S: u32 = 1;
/// CPU burned per request: one instance (one worker thread) serves at most
/// 1000 / WORK_MS requests per second, fewer than 30 siege users ask for.
pub(crate) const WORK_MS: u64 = 20;
/// Connections an instance serves at once; more get a 503 (a full worker
/// pool), which siege counts as a failed transaction. Small: an instance
/// that keeps up has a few requests in hand, one that does not has a queue
/// of up to 30.
pub(crate) const MAX_CONNECTIONS: u64 = 8;
/// The seed's step policy (examples/scale-cpu-60-10.toml), with the
/// cooldown cut to fit runs of under a minute.
pub(crate) const COOLDOWN: &str = "10s";

struct Stage {
    /// Their row's name, their figure, ours.
    theirs: (&'static str, &'static str),
    ours: &'static str,
    mark: &'static str,
    scaling: String,
    ready: u32,
    kill: bool,
}

/// What one stage measured.
struct Measured {
    siege: SiegeSummary,
    samples: Vec<Sample>,
    /// The kill: when (shared clock), which, instances before it, and when
    /// they were back.
    kill: Option<Kill>,
}

struct Kill {
    at: f64,
    name: String,
    before: u32,
    back: Option<f64>,
}

fn fixed(n: u32) -> String {
    format!("min_replicas = {n}\nmax_replicas = {n}\ntarget = {{ cpu = 60.0 }}\n")
}

fn autoscaled() -> String {
    format!(
        "min_replicas = 1\nmax_replicas = 4\n[service.scaling.threshold]\n\
         up = {{ cpu = 60.0, step = 1, cooldown = \"{COOLDOWN}\" }}\n\
         down = {{ cpu = 10.0, step = 1, cooldown = \"{COOLDOWN}\" }}\n"
    )
}

fn stages() -> Vec<Stage> {
    vec![
        Stage {
            theirs: ("1 VM (30 users)", "62.5%"),
            ours: "1 instance",
            mark: "1 instance",
            scaling: fixed(1),
            ready: 1,
            kill: false,
        },
        Stage {
            theirs: ("2 VMs", "100%"),
            ours: "2 instances",
            mark: "2 instances",
            scaling: fixed(2),
            ready: 2,
            kill: false,
        },
        Stage {
            theirs: ("3 VMs (scaled)", "91%+"),
            ours: "autoscaled 1-4",
            mark: "autoscaled",
            scaling: autoscaled(),
            ready: 1,
            kill: false,
        },
        Stage {
            theirs: ("After VM Failure", "Recovered"),
            ours: "autoscaled 1-4, one instance killed (kill -9) mid-run",
            mark: "autoscaled + kill",
            scaling: autoscaled(),
            ready: 1,
            kill: true,
        },
    ]
}

pub(crate) fn run(c: &Common<'_>) -> anyhow::Result<Outcome> {
    let secs = c.siege_time.as_secs();
    println!(
        "scenario availability: siege -c {USERS} -d {DELAY_S} -t {secs}S against 4 configurations \
         ({WORK_MS} ms of CPU per request, at most {MAX_CONNECTIONS} connections per instance)"
    );
    let url = format!("http://{VIP}:{VIP_PORT}/?work_ms={WORK_MS}");
    let mut offset = 0.0;
    let (mut series, mut samples, mut marks) = (Vec::new(), Vec::new(), Vec::new());
    let mut rows = Vec::new();
    for stage in stages() {
        println!();
        println!("== {}: starting the agent ...", stage.ours);
        let setup = Setup {
            kind: c.kind,
            backend: c.backend,
            max_connections: Some(MAX_CONNECTIONS),
            scaling: stage.scaling.clone(),
            instances: "",
            ready: stage.ready,
        };
        let Some(mut lab) = watch::start(&setup)? else { return Ok(Outcome::Interrupted) };
        println!("== {}: siege -c {USERS} -d {DELAY_S} -t {secs}S {url}", stage.ours);
        marks.push((offset, stage.mark.to_owned()));
        let measured = measure(&mut lab, &stage, &url, c.siege_time, offset);
        let notes = lab.cleanup();
        println!("cleaned up: {}", notes.join("; "));
        let (m, w) = measured?;
        if stopped() {
            return Ok(Outcome::Interrupted);
        }
        println!(
            "== {}: availability {:.2} %, {} ok, {} failed, instances {}",
            stage.ours,
            m.siege.availability,
            m.siege.successful,
            m.siege.failed,
            instance_path(&m.samples)
        );
        if let Some(k) = &m.kill {
            marks.push((k.at, format!("kill -9 {}", k.name)));
        }
        offset = w.clock() + 3.0;
        series.extend(w.series);
        samples.extend(m.samples.iter().cloned());
        rows.push((stage, m));
    }
    let table = table(&rows);
    println!();
    print!("{}", table.text());
    let title = format!(
        "availability: siege -c {USERS} -d {DELAY_S} -t {secs}S, {WORK_MS} ms CPU per request\n\
         1 instance | 2 instances | autoscaled 1-4 (60% / 10% CPU) | autoscaled, one instance killed"
    );
    let svg = report::chart(&title, &series, &samples, 60.0, &marks);
    let reference = "The KVM + HAProxy setup (FastAPI VMs behind HAProxy, a script that adds a VM above 60 % CPU \
         and removes one below 10 %, 1-4 VMs) measured availability with `siege -c 30 -d 1 -t 300S`. \
         Their figures, and ours from the same siege command against this load balancer and its autoscaler:";
    let method = format!(
        "- Load: `siege -c {USERS} -d {DELAY_S} -t {secs}S http://{VIP}:{VIP_PORT}/?work_ms={WORK_MS}` (Debian's siege \
         4, one connection per request) from a client namespace, once per configuration; each configuration gets a \
         fresh agent and instances.\n\
         - Per-request work: every request burns {WORK_MS} ms of CPU on the instance's one worker thread, so one \
         instance serves at most {} requests/s, while 30 users waiting 0-1 s (0.5 s on average) between requests ask \
         for up to 60/s: one instance is overloaded, two are not. An instance serves at most {MAX_CONNECTIONS} \
         connections at once (lb-backend `--max-connections`); more get `503`, as from a full worker pool, which \
         siege counts as failed transactions.\n\
         - Policy of the autoscaled rows: the seed's (`examples/scale-cpu-60-10.toml`): one instance more above 60 % \
         mean CPU, one less below 10 %, 1-4 instances, cooldown {COOLDOWN} (theirs 30 s; cut to fit a \
         {secs} s run). The killed instance is `kill -9`ed at half time; the orchestrator replaces it.\n\
         - Instances: {}.",
        1000 / WORK_MS,
        c.kind_name
    );
    let files = report::write(
        c.results_dir,
        "availability",
        &ResultsFile {
            title: "Availability under siege (the KVM + HAProxy setup's table)",
            reference,
            table: &table.markdown(),
            method: &method,
            notes: "Availability is siege's own figure: successful / (successful + failed) transactions. \
                    The chart shows the four runs one after the other on one time axis.",
        },
        &svg,
    )?;
    println!("written: {}", files.join(", "));
    Ok(Outcome::Done)
}

/// Run siege against the lab, watching the instances; kill one at half
/// time when the stage says so.
fn measure(
    lab: &mut crate::lab::Lab,
    stage: &Stage,
    url: &str,
    time: Duration,
    offset: f64,
) -> anyhow::Result<(Measured, Watch)> {
    let dir = lab.scratch().path().to_owned();
    let siege = Siege::spawn(&lab.client_ns.clone(), &dir, USERS, DELAY_S, time, url)?;
    let mut w = Watch::new(stage.mark, offset);
    let mut kill: Option<Kill> = None;
    let mut interrupted = false;
    loop {
        match siege.points.recv_timeout(Duration::from_millis(200)) {
            Ok(p) => w.point(p),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        w.poll(lab)?;
        if stopped() && !interrupted {
            siege.interrupt();
            interrupted = true;
        }
        if stage.kill && kill.is_none() && w.t() >= time.as_secs_f64() / 2.0 {
            if let Some(sc) = &w.status {
                let before = ready_count(sc);
                let name = kill_one(lab, sc)?;
                println!("[{} +{:>3.0}s] kill -9 {name} (ready: {before})", stage.mark, w.t());
                kill = Some(Kill { at: w.clock(), name, before, back: None });
            }
        }
        if let Some(k) = kill.as_mut().filter(|k| k.back.is_none()) {
            // Back once the agent has let the killed one go and as many
            // are ready as before.
            if let Some(sc) = w.status.as_ref().filter(|sc| recovered(sc, &k.name, w.clock() - k.at, k.before)) {
                k.back = Some(w.clock());
                println!(
                    "[{} +{:>3.0}s] {} instances ready again ({}), {:.1} s after the kill",
                    stage.mark,
                    w.t(),
                    ready_count(sc),
                    ready_names(sc),
                    w.clock() - k.at
                );
            }
        }
    }
    let siege = siege.finish()?;
    Ok((Measured { siege, samples: std::mem::take(&mut w.samples), kill }, w))
}

/// `before` instances are ready again, not counting the killed one (a
/// stale status may still list it as ready; its replacement may take its
/// name, but is younger than the kill).
fn recovered(sc: &ScalingStatus, killed: &str, since_kill: f64, before: u32) -> bool {
    let ready = sc.replicas.iter().filter(|r| r.phase == "ready" && (r.name != killed || r.age_seconds < since_kill));
    ready.count() as u32 >= before
}

fn ready_names(sc: &ScalingStatus) -> String {
    sc.replicas.iter().filter(|r| r.phase == "ready").map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ")
}

fn table(rows: &[(Stage, Measured)]) -> Table {
    let mut t = Table::new(&[
        "Configuration (theirs)",
        "Theirs",
        "Configuration (ours)",
        "Availability",
        "OK / failed",
        "Response time (mean / longest)",
        "Instances over time",
    ]);
    for (stage, m) in rows {
        let s = &m.siege;
        let mut instances = instance_path(&m.samples);
        if let Some(k) = &m.kill {
            instances += &match k.back {
                Some(back) => format!(" ({} killed; {} again after {:.1} s: recovered)", k.name, k.before, back - k.at),
                None => format!(" ({} killed; not back to {} by the end)", k.name, k.before),
            };
        }
        t.row(vec![
            stage.theirs.0.into(),
            stage.theirs.1.into(),
            stage.ours.into(),
            format!("{:.2}%", s.availability),
            format!("{} / {}", s.successful, s.failed),
            format!("{:.2} s / {:.2} s", s.response_time_s, s.longest_s),
            instances,
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use lb_agent::status::ReplicaStatus;

    use super::*;

    fn replica(name: &str, phase: &str) -> ReplicaStatus {
        ReplicaStatus {
            id: name.into(),
            name: name.into(),
            address: String::new(),
            phase: phase.into(),
            cpu_percent: None,
            requests_per_second: None,
            age_seconds: 1.0,
        }
    }

    fn measured(availability: f64, ok: u64, failed: u64, ready: &[u32], kill: Option<Kill>) -> Measured {
        let samples = ready.iter().enumerate().map(|(i, &ready)| Sample { t: i as f64, ready, ..Sample::default() });
        Measured {
            siege: SiegeSummary {
                availability,
                successful: ok,
                failed,
                response_time_s: 0.25,
                longest_s: 1.5,
                ..SiegeSummary::default()
            },
            samples: samples.collect(),
            kill,
        }
    }

    #[test]
    fn the_table_puts_ours_beside_theirs() {
        let mut s = stages();
        let kill = Kill { at: 20.0, name: "web-1".into(), before: 2, back: Some(22.5) };
        let lost = Kill { at: 20.0, name: "web-2".into(), before: 2, back: None };
        let rows = vec![
            (s.remove(0), measured(48.1, 481, 519, &[1, 1], None)),
            (s.remove(0), measured(100.0, 900, 0, &[2], None)),
            (s.remove(0), measured(97.5, 975, 25, &[1, 2, 2, 3], Some(lost))),
            (s.remove(0), measured(95.0, 950, 50, &[1, 2, 1, 2], Some(kill))),
        ];
        let md = table(&rows).markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 6, "{md}");
        assert!(lines[2].starts_with("| 1 VM (30 users)        | 62.5%     | 1 instance "), "{md}");
        assert!(lines[2].contains("| 48.10%       | 481 / 519   | 0.25 s / 1.50 s "), "{md}");
        assert!(lines[3].contains("| 100.00%      | 900 / 0 "), "{md}");
        assert!(lines[4].contains("| 1 -> 2 -> 3 (web-2 killed; not back to 2 by the end)"), "{md}");
        assert!(lines[5].starts_with("| After VM Failure       | Recovered |"), "{md}");
        assert!(lines[5].contains("| 1 -> 2 -> 1 -> 2 (web-1 killed; 2 again after 2.5 s: recovered) |"), "{md}");
    }

    #[test]
    fn recovery_needs_the_killed_one_gone_and_as_many_ready() {
        let sc = |replicas: Vec<ReplicaStatus>| ScalingStatus { replicas, ..ScalingStatus::default() };
        // The agent has not noticed yet: still two ready, one of them dead
        // (older than the 0.5 s since the kill).
        assert!(!recovered(&sc(vec![replica("web-1", "ready"), replica("web-2", "ready")]), "web-1", 0.5, 2));
        assert!(!recovered(&sc(vec![replica("web-2", "ready"), replica("web-3", "starting")]), "web-1", 3.0, 2));
        let back = sc(vec![replica("web-2", "ready"), replica("web-3", "ready")]);
        assert!(recovered(&back, "web-1", 3.0, 2));
        assert_eq!(ready_names(&back), "web-2, web-3");
        // A replacement by the same name, started after the kill.
        assert!(recovered(&sc(vec![replica("web-1", "ready")]), "web-1", 3.0, 1));
    }
}
