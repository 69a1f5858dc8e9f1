//! Summary and results.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use lb_load::{self as load, plot};

use crate::{
    autoscale::{CPU_TARGET, MIN_REPLICAS, SERVICE},
    monitor::{Record, Sample},
    shape::Shape,
    view::fmt_ms,
};

pub(crate) fn summarize(r: &Record, shape: &Shape, ramp_text: &str) -> String {
    let s = &r.report.summary;
    let m = &r.milestones;
    let mut out = String::new();
    let _ = writeln!(out, "summary ({}; ramp {ramp_text})", r.stop_reason);
    let _ = writeln!(
        out,
        "  requests       {} offered over {:.0} s, {} ok, {} failed: availability {:.3} %",
        s.offered,
        s.duration_s,
        s.ok,
        s.failed,
        100.0 * s.availability
    );
    for (kind, e) in &s.first_errors {
        let _ = writeln!(out, "    first {kind} failure: {e}");
    }
    let l = &s.latency;
    let _ = writeln!(
        out,
        "  latency        p50 {} ms, p99 {} ms, max {} ms",
        fmt_ms(l.p50_ms),
        fmt_ms(l.p99_ms),
        fmt_ms(l.max_ms)
    );
    let max_ready = r.samples.iter().map(|s| s.ready).max().unwrap_or(0);
    let initial: Vec<&str> = r.initial.iter().map(String::as_str).collect();
    let _ = writeln!(
        out,
        "  instances      {}   (max {max_ready} ready at once; {} at the start)",
        instance_path(&r.samples),
        initial.join(", ")
    );
    match (shape.start, &m.first_new_answer) {
        (Some(start), Some((window, name))) => {
            // It answered in that second, and not before it was in the table.
            let ready = m.first_new_ready.as_ref().filter(|(_, n)| n == name).map(|(t, _)| *t);
            let at = ready.map_or(*window, |r| r.max(*window));
            let _ = writeln!(
                out,
                "  scale-up       reaction {:.1} s: the ramp started at +{start:.0} s, a new instance ({name}) first \
                 answered at +{at:.1} s",
                at - start
            );
            let mut steps = Vec::new();
            if let Some(d) = m.first_up_decision {
                steps.push(format!("decided at +{d:.1} s"));
            }
            if let Some((t, n)) = &m.first_new_started {
                steps.push(format!("{n} started at +{t:.1} s"));
            }
            if let Some((t, n)) = &m.first_new_ready {
                steps.push(format!("{n} ready by +{t:.1} s"));
            }
            if !steps.is_empty() {
                let _ = writeln!(out, "                 ({})", steps.join(", "));
            }
        }
        (Some(_), None) => {
            let _ =
                writeln!(out, "  scale-up       none: no new instance answered (the load stayed within the target?)");
        }
        (None, _) => {
            let _ = writeln!(out, "  scale-up       n/a: the ramp never rises");
        }
    }
    match (m.back_to_min, shape.drop) {
        (Some(t), Some(d)) => {
            let _ = writeln!(
                out,
                "  scale-in       back to {MIN_REPLICAS} instance at +{t:.0} s, {:.0} s after the load dropped at +{d:.0} s",
                t - d
            );
        }
        (Some(t), None) => {
            let _ = writeln!(out, "  scale-in       back to {MIN_REPLICAS} instance at +{t:.0} s");
        }
        (None, _) if max_ready > MIN_REPLICAS => {
            let _ = writeln!(out, "  scale-in       not back to {MIN_REPLICAS} instance when the load stopped");
        }
        (None, _) => {}
    }
    if !s.backends.is_empty() {
        let parts: Vec<String> = s
            .backends
            .iter()
            .map(|(n, c)| format!("{n} {c} ({:.0}%)", if s.ok == 0 { 0.0 } else { 100.0 * *c as f64 / s.ok as f64 }))
            .collect();
        let _ = writeln!(out, "  answered by    {}", parts.join(", "));
    }
    if s.delayed > 0 {
        let _ = writeln!(
            out,
            "  note           {} requests started over 10 ms late: the load generator was short of CPU",
            s.delayed
        );
    }
    out
}

/// Ready counts as they changed, e.g. "1 -> 2 -> 4 -> 2 -> 1".
pub(crate) fn instance_path(samples: &[Sample]) -> String {
    let mut steps: Vec<u32> = Vec::new();
    for s in samples {
        if steps.last() != Some(&s.ready) {
            steps.push(s.ready);
        }
    }
    if steps.len() > 14 {
        let tail = steps.split_off(steps.len() - 6);
        steps.truncate(7);
        let head: Vec<String> = steps.iter().map(u32::to_string).collect();
        let tail: Vec<String> = tail.iter().map(u32::to_string).collect();
        return format!("{} -> ... -> {}", head.join(" -> "), tail.join(" -> "));
    }
    steps.iter().map(u32::to_string).collect::<Vec<_>>().join(" -> ")
}

/// Scaling decisions as chart marks: each time the desired count changed,
/// labelled "from -> to".
pub(crate) fn decision_marks(samples: &[Sample]) -> Vec<(f64, String)> {
    samples
        .windows(2)
        .filter(|w| w[0].desired != w[1].desired && w[0].desired > 0)
        .map(|w| (w[1].t, format!("{} -> {}", w[0].desired, w[1].desired)))
        .collect()
}

pub(crate) fn write_results(
    out: &ResultsDir,
    r: &Record,
    summary: &str,
    ramp_text: &str,
    orchestrator: &str,
) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    let s = &r.report.summary;
    let max_ready = r.samples.iter().map(|s| s.ready).max().unwrap_or(0);
    let title = format!(
        "lb-demo ({orchestrator} instances) {SERVICE}: cpu {CPU_TARGET:.0}% target\nramp {ramp_text}: {} requests, \
         availability {:.3} %, instances {}, max {max_ready}",
        s.offered,
        100.0 * s.availability,
        instance_path(&r.samples)
    );
    let instances: Vec<(f64, u32)> = r.samples.iter().map(|s| (s.t, s.ready)).collect();
    let mut write = |name: &str, text: &str| -> anyhow::Result<()> {
        let path = out.path.join(name);
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        files.push(name.to_owned());
        Ok(())
    };
    let cpu: Vec<(f64, Option<f64>)> = r.samples.iter().map(|s| (s.t, s.cpu)).collect();
    let metric = plot::ScalingMetric { name: "CPU per instance (%)", target: CPU_TARGET, points: &cpu };
    let marks = decision_marks(&r.samples);
    write("demo.svg", &plot::render_svg_scaling(&title, &r.report.series, &instances, Some(&metric), &marks))?;
    write("summary.txt", summary)?;
    write("load.csv", &load::series_to_csv(&r.report.series))?;
    let mut csv = String::from("t,ready,starting,draining,desired,cpu_percent\n");
    for s in &r.samples {
        let cpu = s.cpu.map_or(String::new(), |c| format!("{c:.1}"));
        let _ = writeln!(csv, "{:.2},{},{},{},{},{cpu}", s.t, s.ready, s.starting, s.draining, s.desired);
    }
    write("instances.csv", &csv)?;
    if out.path.join("timeline.jsonl").is_file() {
        files.push("timeline.jsonl (the agent's decisions)".into());
    }
    Ok(files)
}

/// Where the results go. Created before the agent starts (the agent writes
/// its timeline there); kept at the end, unless nothing was written to it.
pub(crate) struct ResultsDir {
    pub(crate) path: PathBuf,
}

impl ResultsDir {
    pub(crate) fn create(explicit: Option<&Path>) -> anyhow::Result<ResultsDir> {
        let path = match explicit {
            Some(p) => p.to_owned(),
            None => {
                let parent = std::env::var_os("LB_DEMO_RESULTS")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| std::env::temp_dir().join("lb-demo"));
                let stamp = utc_stamp(SystemTime::now());
                let mut p = parent.join(&stamp);
                if p.exists() {
                    p = parent.join(format!("{stamp}-{}", std::process::id()));
                }
                p
            }
        };
        fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        let path = fs::canonicalize(&path).with_context(|| format!("resolve {}", path.display()))?;
        Ok(ResultsDir { path })
    }

    pub(crate) fn copy_in(&self, from: &Path, name: &str) {
        if from.is_file() {
            let _ = fs::copy(from, self.path.join(name));
        }
    }

    /// Remove the directory if nothing was written to it; after a failure,
    /// say what is kept there.
    pub(crate) fn finish(&self, ok: bool) {
        let mut names: Vec<String> = fs::read_dir(&self.path)
            .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        names.sort();
        if names.is_empty() {
            let _ = fs::remove_dir(&self.path);
        } else if !ok {
            println!("kept for a look: {} ({})", self.path.display(), names.join(", "));
        }
    }
}

/// `YYYYmmdd-HHMMSS` in UTC.
pub(crate) fn utc_stamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn stamps_are_utc_civil_time() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(utc_stamp(t), "20231114-221320");
        assert_eq!(utc_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)), "20000229-000000");
    }

    #[test]
    fn instance_paths_collapse_repeats() {
        let s = |ready| Sample { ready, ..Sample::default() };
        assert_eq!(instance_path(&[s(1), s(1), s(2), s(4), s(4), s(2), s(1)]), "1 -> 2 -> 4 -> 2 -> 1");
    }

    #[test]
    fn decisions_are_marked_where_the_desired_count_changed() {
        let s = |t, desired| Sample { t, desired, ..Sample::default() };
        let samples = [s(0.0, 0), s(0.5, 1), s(1.0, 1), s(1.5, 3), s(2.0, 3), s(2.5, 1)];
        let marks = decision_marks(&samples);
        assert_eq!(marks, [(1.5, "1 -> 3".to_owned()), (2.5, "3 -> 1".to_owned())], "not before a first decision");
    }
}
