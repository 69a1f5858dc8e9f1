//! wrk as the load generator: one process per share of the connections,
//! each printing its exact latency histogram, merged here without loss.
//!
//! wrk keeps every latency in a 1 µs bucket. Its `done()` hook hands a
//! script that histogram (`latency(i)`: the i-th non-empty bucket and its
//! count), and [`SCRIPT`] prints it, so the processes' results merge
//! exactly: the percentiles of the merge are those of one histogram that
//! saw every request. That histogram is the one wrk prints its own
//! percentiles from: after the run wrk corrects it for coordinated
//! omission (`stats_correct`: for a response slower than the mean interval
//! between requests it adds the requests that response held up), so it
//! holds more entries than there were requests.
//!
//! wrk measures a request from the moment it writes it to the moment the
//! response is complete. With a new connection per request
//! (`Connection: close`), the TCP handshake comes before that moment, so
//! it is not in the latency (it is in req/s and CPU per request).

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use lb_lab::netns::NetNs;
use serde::{Deserialize, Serialize};

use crate::proc::Proc;

/// Printed by wrk's `done()` after its own report: a summary line, then
/// one line per non-empty latency bucket (µs, count).
pub const SCRIPT: &str = r#"-- Written by lb-bench-e2e: exact results, for merging several wrk processes.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("lbbench summary %d %d %d %d %d %d %d\n", summary.duration, summary.requests,
    e.connect, e.read, e.write, e.status, e.timeout))
  for i = 1, #latency do
    local v, c = latency(i)
    io.write(string.format("lbbench latency %d %d\n", v, c))
  end
end
"#;

/// How the client talks HTTP/1.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Style {
    /// Each connection sends request after request.
    KeepAlive,
    /// `Connection: close`: the server closes after each response and wrk
    /// opens a new connection for the next request.
    NewConnection,
}

impl Style {
    pub const ALL: [Style; 2] = [Style::KeepAlive, Style::NewConnection];

    pub fn label(self) -> &'static str {
        match self {
            Style::KeepAlive => "keep-alive",
            Style::NewConnection => "new-connection",
        }
    }
}

/// wrk's error counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    /// Responses with a status other than 2xx or 3xx (wrk counts them as
    /// requests too).
    pub status: u64,
    pub timeout: u64,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.status + self.timeout
    }

    fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.read += o.read;
        self.write += o.write;
        self.status += o.status;
        self.timeout += o.timeout;
    }
}

/// One wrk process's result, or several merged.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Load {
    /// Completed requests.
    pub requests: u64,
    /// Requests per second: the sum of each process's own rate (they run
    /// side by side).
    pub rate: f64,
    pub errors: Errors,
    /// Latency in µs -> requests.
    pub latency: BTreeMap<u64, u64>,
}

impl Load {
    pub fn merge(parts: &[Load]) -> Load {
        let mut all = Load::default();
        for p in parts {
            all.requests += p.requests;
            all.rate += p.rate;
            all.errors.add(&p.errors);
            for (v, c) in &p.latency {
                *all.latency.entry(*v).or_default() += c;
            }
        }
        all
    }

    /// The smallest latency (µs) that at least `q` of the requests did not
    /// exceed; `None` without requests.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let n: u64 = self.latency.values().sum();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        self.latency.iter().find_map(|(v, c)| {
            seen += c;
            (seen >= rank).then_some(*v)
        })
    }
}

/// Reads what [`SCRIPT`] printed in a wrk process's stdout.
pub fn parse(stdout: &str) -> Result<Load> {
    let mut load = Load::default();
    let mut summary = None;
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("lbbench ") else { continue };
        let mut words = rest.split_whitespace();
        let kind = words.next();
        let nums: Vec<u64> =
            words.map(str::parse).collect::<Result<_, _>>().with_context(|| format!("bad wrk line {line:?}"))?;
        match (kind, nums.as_slice()) {
            (Some("summary"), &[duration_us, requests, connect, read, write, status, timeout]) => {
                ensure!(duration_us > 0, "wrk ran for 0 µs");
                summary = Some((duration_us, requests));
                load.requests = requests;
                load.rate = requests as f64 * 1e6 / duration_us as f64;
                load.errors = Errors { connect, read, write, status, timeout };
            }
            (Some("latency"), &[us, count]) => {
                *load.latency.entry(us).or_default() += count;
            }
            _ => bail!("unexpected wrk line {line:?}"),
        }
    }
    let Some((_, requests)) = summary else {
        bail!("no `lbbench summary` line in wrk's output (did the script run?):\n{stdout}");
    };
    let recorded: u64 = load.latency.values().sum();
    // wrk records a latency per completed request, except for those that
    // overran --timeout (counted as timeouts instead); its correction only
    // adds entries.
    ensure!(
        recorded + load.errors.timeout >= requests,
        "wrk recorded {recorded} latencies for {requests} requests ({} timeouts)",
        load.errors.timeout
    );
    Ok(load)
}

/// `connections` split over `processes` as evenly as whole numbers allow
/// (50 over 3: 17, 17, 16).
pub fn split(connections: u32, processes: u32) -> Vec<u32> {
    (0..processes).map(|i| connections / processes + u32::from(i < connections % processes)).collect()
}

/// One wrk process's job: where it sends and how many connections it keeps.
pub struct Share {
    pub target: SocketAddrV4,
    pub connections: u32,
}

/// wrk processes under way, started by [`start`].
pub struct Running {
    procs: Vec<(Proc, PathBuf)>,
    /// When they were started.
    pub started: Instant,
    duration: Duration,
}

/// Starts one wrk process per share, side by side in `client`, each for
/// `duration`.
pub fn start(client: &NetNs, dir: &Path, shares: &[Share], style: Style, duration: Duration) -> Result<Running> {
    let script = dir.join("wrk.lua");
    if !script.exists() {
        fs::write(&script, SCRIPT).with_context(|| format!("write {}", script.display()))?;
    }
    let secs = format!("{}s", duration.as_secs());
    let started = Instant::now();
    let mut procs = Vec::new();
    for (i, share) in shares.iter().enumerate() {
        let out = dir.join(format!("wrk-{i}.out"));
        let mut args = vec!["-t1".to_owned(), format!("-c{}", share.connections), format!("-d{secs}")];
        args.extend(["--timeout".to_owned(), "2s".to_owned(), "-s".to_owned(), script.display().to_string()]);
        if style == Style::NewConnection {
            args.extend(["-H".to_owned(), "Connection: close".to_owned()]);
        }
        args.push(format!("http://{}/", share.target));
        procs.push((Proc::spawn_in(client, &format!("wrk #{i}"), "wrk", &args, &out)?, out));
    }
    Ok(Running { procs, started, duration })
}

impl Running {
    /// Sleeps until the load should be over (`duration` after the start).
    /// wrk then still prints its histogram, which takes a while and is
    /// not part of the measurement. Fails when `stopped` turns true.
    pub fn sleep_through(&self, stopped: &impl Fn() -> bool) -> Result<()> {
        let end = self.started + self.duration;
        while Instant::now() < end {
            if stopped() {
                bail!("interrupted");
            }
            std::thread::sleep(Duration::from_millis(20).min(end.saturating_duration_since(Instant::now())));
        }
        Ok(())
    }

    /// Waits for every process to end and merges their results. When
    /// `stopped` turns true the processes are ended and this fails.
    pub fn finish(self, stopped: &impl Fn() -> bool) -> Result<Load> {
        // wrk stops on its own after `duration`; allow for its --timeout, a
        // slow start on a loaded machine, and printing the histogram.
        let deadline = self.started + self.duration + Duration::from_secs(30);
        let mut parts = Vec::new();
        for (mut p, out) in self.procs {
            let status = wait(&mut p, deadline, stopped)?;
            let text = fs::read_to_string(&out).with_context(|| format!("read {}", out.display()))?;
            ensure!(status.success(), "{} {status}:\n{text}", p.name());
            parts.push(parse(&text).with_context(|| format!("{} ({})", p.name(), out.display()))?);
        }
        Ok(Load::merge(&parts))
    }
}

fn wait(p: &mut Proc, deadline: Instant, stopped: &impl Fn() -> bool) -> Result<ExitStatus> {
    loop {
        if let Some(status) = p.try_wait()? {
            return Ok(status);
        }
        if stopped() {
            bail!("interrupted");
        }
        if Instant::now() >= deadline {
            bail!("{} did not finish in time", p.name());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "Running 2s test @ http://127.0.0.1:18080/\n  1 threads and 17 connections\n\
        80755 requests in 2.02s, 11.63MB read\n\
        lbbench summary 2000000 6 0 1 0 0 1\n\
        lbbench latency 46 2\nlbbench latency 47 1\nlbbench latency 900 2\n";

    #[test]
    fn wrk_output_is_parsed() {
        let load = parse(OUT).unwrap();
        assert_eq!(load.requests, 6);
        assert_eq!(load.rate, 3.0);
        assert_eq!(load.errors, Errors { read: 1, timeout: 1, ..Errors::default() });
        assert_eq!(load.latency, BTreeMap::from([(46, 2), (47, 1), (900, 2)]));
    }

    #[test]
    fn output_without_the_script_is_refused() {
        assert!(parse("Running 2s test\n").is_err());
        assert!(parse("lbbench summary 1 2\n").is_err());
        // Fewer latencies than requests that did not time out cannot be.
        assert!(parse("lbbench summary 10 3 0 0 0 0 1\nlbbench latency 5 1\n").is_err());
    }

    #[test]
    fn merged_quantiles_are_exact() {
        let a = Load { requests: 3, rate: 3.0, latency: BTreeMap::from([(10, 2), (30, 1)]), ..Load::default() };
        let b = Load { requests: 2, rate: 2.0, latency: BTreeMap::from([(20, 1), (40, 1)]), ..Load::default() };
        let m = Load::merge(&[a, b]);
        assert_eq!((m.requests, m.rate), (5, 5.0));
        // 10 10 20 30 40
        assert_eq!(m.quantile_us(0.5), Some(20));
        assert_eq!(m.quantile_us(0.99), Some(40));
        assert_eq!(m.quantile_us(0.0), Some(10));
        assert_eq!(Load::default().quantile_us(0.5), None);
    }

    #[test]
    fn connections_split_evenly() {
        assert_eq!(split(50, 3), vec![17, 17, 16]);
        assert_eq!(split(3, 3), vec![1, 1, 1]);
        assert_eq!(split(50, 1), vec![50]);
    }
}
