//! CPU time over a run, in two ways:
//!
//! - **bench**: the CPU time of every process the bench runs (wrk, the nginx
//!   backends, lb-agent or the proxy, and the bench itself, mostly asleep)
//!   from a cgroup v2 of its own, plus the time of the `ksoftirqd` threads.
//!   This kernel accounts CPU time by tick without IRQ time accounting
//!   (`CONFIG_IRQ_TIME_ACCOUNTING` unset), so the softirq work a process
//!   causes (veth delivery, the XDP program, forwarding, all run from the
//!   sender's `local_bh_enable`) is charged to that process; only what the
//!   kernel defers to `ksoftirqd` is not, hence that addition. Other work on
//!   a shared machine stays out of it.
//! - **system**: busy time of all CPUs from `/proc/stat` (everything but
//!   idle and iowait), which also holds whatever else the machine did.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, ensure, Context as _, Result};

/// The bench process inside a cgroup v2 of its own, so that every process
/// it starts from then on is counted there. Drop moves it back to where it
/// was and removes the cgroup.
pub struct Cgroup {
    dir: PathBuf,
    home: PathBuf,
}

impl Cgroup {
    /// Makes `<cgroup2 mount>/<name>` (refused if it exists) and moves this
    /// process into it.
    pub fn enter(name: &str) -> Result<Cgroup> {
        let mount = cgroup2_mount()?;
        let home = mount.join(own_cgroup()?.trim_start_matches('/'));
        let dir = mount.join(name);
        fs::create_dir(&dir).with_context(|| format!("create cgroup {}", dir.display()))?;
        let cg = Cgroup { dir, home };
        move_self(&cg.dir)?;
        Ok(cg)
    }

    /// CPU time of every process that was ever in it, in µs.
    pub fn usage_us(&self) -> Result<u64> {
        let path = self.dir.join("cpu.stat");
        let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        text.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no usage_usec in {}", path.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Every child has been reaped by now (their guards drop first), so
        // once this process leaves, the cgroup is empty and can go.
        if let Err(e) = move_self(&self.home) {
            eprintln!("[bench] warning: {e:#}");
        }
        if let Err(e) = fs::remove_dir(&self.dir) {
            eprintln!("[bench] warning: remove cgroup {}: {e}", self.dir.display());
        }
    }
}

fn move_self(dir: &Path) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string()).with_context(|| format!("move the bench into {}", dir.display()))
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on a hybrid system).
fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("read /proc/self/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(PathBuf::from))
        .context("no cgroup2 file system is mounted: the bench counts its processes' CPU time in a cgroup v2")
}

/// This process's cgroup v2 path ("0::/path" in /proc/self/cgroup).
fn own_cgroup() -> Result<String> {
    let text = fs::read_to_string("/proc/self/cgroup").context("read /proc/self/cgroup")?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
        .context("no cgroup v2 entry (0::) in /proc/self/cgroup")
}

/// One reading of the counters; subtract two with [`Sample::since`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// The bench's cgroup, µs.
    cgroup_us: u64,
    /// All `ksoftirqd/N` threads, clock ticks.
    ksoftirqd_ticks: u64,
    /// /proc/stat, all CPUs, clock ticks: busy, and softirq alone.
    busy_ticks: u64,
    softirq_ticks: u64,
}

/// CPU time spent between two samples, µs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spent {
    /// The bench's processes plus ksoftirqd.
    pub bench_us: f64,
    /// All CPUs' busy time, whatever ran.
    pub system_us: f64,
    /// All CPUs' softirq time (part of `system_us`).
    pub softirq_us: f64,
}

impl Sample {
    pub fn take(cg: &Cgroup) -> Result<Sample> {
        let (busy_ticks, softirq_ticks) = proc_stat()?;
        Ok(Sample { cgroup_us: cg.usage_us()?, ksoftirqd_ticks: ksoftirqd_ticks()?, busy_ticks, softirq_ticks })
    }

    pub fn since(&self, before: &Sample) -> Spent {
        let tick_us = 1e6 / clock_ticks_per_second();
        let ticks = |a: u64, b: u64| a.saturating_sub(b) as f64 * tick_us;
        Spent {
            bench_us: self.cgroup_us.saturating_sub(before.cgroup_us) as f64
                + ticks(self.ksoftirqd_ticks, before.ksoftirqd_ticks),
            system_us: ticks(self.busy_ticks, before.busy_ticks),
            softirq_us: ticks(self.softirq_ticks, before.softirq_ticks),
        }
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// (busy, softirq) ticks of all CPUs from /proc/stat.
fn proc_stat() -> Result<(u64, u64)> {
    let text = fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    parse_proc_stat(&text)
}

fn parse_proc_stat(text: &str) -> Result<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu ")).context("no `cpu` line in /proc/stat")?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]; the
    // guest times are inside user and nice already.
    ensure!(v.len() >= 8, "short `cpu` line in /proc/stat: {line}");
    let busy = v[..8].iter().sum::<u64>() - v[3] - v[4];
    Ok((busy, v[6]))
}

/// utime + stime of every `ksoftirqd/N` thread, in ticks.
fn ksoftirqd_ticks() -> Result<u64> {
    let mut total = 0;
    let mut found = false;
    for entry in fs::read_dir("/proc").context("list /proc")? {
        let Ok(entry) = entry else { continue };
        let pid = entry.file_name();
        if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A process may end between the listing and the read: skip it.
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        if let Some(ticks) = kernel_thread_ticks(&stat, "ksoftirqd/") {
            total += ticks;
            found = true;
        }
    }
    if !found {
        bail!("no ksoftirqd threads in /proc");
    }
    Ok(total)
}

/// utime + stime from a /proc/<pid>/stat line whose command starts with
/// `prefix`.
fn kernel_thread_ticks(stat: &str, prefix: &str) -> Option<u64> {
    // "pid (comm) state ppid ...": comm may hold spaces, so split at the
    // last ')'; utime and stime are fields 14 and 15, i.e. the 12th and
    // 13th after the command.
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1;
    if !comm.starts_with(prefix) {
        return None;
    }
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_busy_leaves_out_idle_and_iowait() {
        let text = "cpu  100 1 50 1000 7 2 30 4 0 0\ncpu0 50 0 25 500 3 1 15 2 0 0\n";
        assert_eq!(parse_proc_stat(text).unwrap(), (100 + 1 + 50 + 2 + 30 + 4, 30));
        assert!(parse_proc_stat("cpu0 1 2 3\n").is_err());
    }

    #[test]
    fn ksoftirqd_times_are_read() {
        let stat = "14 (ksoftirqd/0) S 2 0 0 0 -1 69238848 0 0 0 0 12 345 0 0 20 0 1 0 5 0 0";
        assert_eq!(kernel_thread_ticks(stat, "ksoftirqd/"), Some(357));
        let other = "99 (my (odd) name) S 1 0 0 0 -1 0 0 0 0 0 7 8 0 0 20 0 1 0 5 0 0";
        assert_eq!(kernel_thread_ticks(other, "ksoftirqd/"), None);
        assert_eq!(kernel_thread_ticks(other, "my (odd)"), Some(15));
    }
}
