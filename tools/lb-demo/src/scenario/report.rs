//! A scenario's results file: docs/results/<scenario>.md with its table
//! beside the reference figures, the command that made it, the machine, and
//! a chart beside it (lb-load's plotter).

use std::{fmt::Write as _, fs, path::Path, time::SystemTime};

use anyhow::Context as _;
use lb_load::{plot, TimePoint};

use crate::{
    monitor::Sample,
    results::{decision_marks, utc_stamp},
};

/// The command line as the user typed it through xtask, with the `nice`
/// it ran under, if any (on a shared machine the figures depend on it).
pub(crate) fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // SAFETY: getpriority(2) on this process; no pointers.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let nice = if nice == 0 { String::new() } else { format!("nice -n {nice} ") };
    format!("sudo -E {nice}cargo xtask run -- {}", args.join(" "))
}

/// Cores, kernel, date (UTC) and load average of this run.
pub(crate) fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let stamp = utc_stamp(SystemTime::now());
    let date = format!("{}-{}-{} {}:{} UTC", &stamp[..4], &stamp[4..6], &stamp[6..8], &stamp[9..11], &stamp[11..13]);
    // Other work on the machine shows in the results: say how much there was.
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("{cores} cores, Linux {}, {date}, load average {} at the end", kernel.trim(), load.join(" "))
}

/// The chart: requests and failures per second with the instances, latency,
/// the mean CPU per instance against `cpu_target`, scaling decisions and
/// `marks` (stage starts, a kill) as vertical lines.
pub(crate) fn chart(
    title: &str,
    series: &[TimePoint],
    samples: &[Sample],
    cpu_target: f64,
    marks: &[(f64, String)],
) -> String {
    let instances: Vec<(f64, u32)> = samples.iter().map(|s| (s.t, s.ready)).collect();
    let cpu: Vec<(f64, Option<f64>)> = samples.iter().map(|s| (s.t, s.cpu)).collect();
    let metric = plot::ScalingMetric { name: "CPU per instance (%)", target: cpu_target, points: &cpu };
    let mut marks = marks.to_vec();
    marks.extend(decision_marks(samples));
    marks.sort_by(|a, b| a.0.total_cmp(&b.0));
    plot::render_svg_scaling(title, series, &instances, Some(&metric), &marks)
}

/// The parts of a results file.
pub(crate) struct ResultsFile<'a> {
    pub(crate) title: &'a str,
    /// What the reference setup is and what it reported.
    pub(crate) reference: &'a str,
    /// The table, Markdown.
    pub(crate) table: &'a str,
    /// How ours was run: the per-request work, the policy, the load.
    pub(crate) method: &'a str,
    pub(crate) notes: &'a str,
}

/// Write `<dir>/<name>.md` and `<dir>/<name>.svg`; the paths written.
pub(crate) fn write(dir: &Path, name: &str, file: &ResultsFile<'_>, svg: &str) -> anyhow::Result<Vec<String>> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut md = format!("# {}\n\n{}\n\n{}\n", file.title, file.reference.trim_end(), file.table);
    let _ = write!(
        md,
        "\n![chart]({name}.svg)\n\n## How it was run\n\n```sh\n{}\n```\n\nMachine: {}.\n\n{}\n",
        command_line(),
        machine(),
        file.method.trim_end()
    );
    if !file.notes.trim().is_empty() {
        let _ = write!(md, "\n## Notes\n\n{}\n", file.notes.trim_end());
    }
    let mut written = Vec::new();
    for (ext, text) in [("md", md.as_str()), ("svg", svg)] {
        let path = dir.join(format!("{name}.{ext}"));
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}
