//! Debian's siege, as the KVM + HAProxy setup ran it: `siege -c USERS -d
//! DELAY -t TIME URL`, from the client namespace. Its verbose lines (one per
//! transaction) become per-second points for the chart as they arrive; its
//! summary is the table's figures, as siege reports them.

use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use lb_load::{Aggregator, Ended, Failure, Outcome, TimePoint};

/// siege's settings for the run (`-R FILE`): one transaction per line,
/// no colours, a connection per request (each a new flow for the load
/// balancer to place), no giving up after many failures, no log file.
/// `timeout` bounds a transaction that the server never answers.
pub(crate) const SIEGERC: &str = "\
verbose = true
color = off
quiet = false
timeout = 10
failures = 1000000
connection = close
protocol = HTTP/1.1
logging = false
show-logfile = false
parser = false
";

/// siege's summary, the figures it prints at the end.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct SiegeSummary {
    pub(crate) transactions: u64,
    /// Percent: transactions / (transactions + failed).
    pub(crate) availability: f64,
    pub(crate) elapsed_s: f64,
    /// Mean response time, seconds.
    pub(crate) response_time_s: f64,
    pub(crate) transaction_rate: f64,
    pub(crate) successful: u64,
    pub(crate) failed: u64,
    pub(crate) longest_s: f64,
}

/// siege's summary from its output: the text form of siege 4.0
/// (`Availability:  62.50 %`) or the JSON form of siege 4.1
/// (`"availability": 62.50,`). Every figure must be there.
pub(crate) fn parse_summary(output: &str) -> Result<SiegeSummary, String> {
    let mut fields = std::collections::BTreeMap::new();
    for line in output.lines() {
        let line = strip_ansi(line);
        let Some((key, value)) = line.split_once(':') else { continue };
        let key = key
            .trim_matches(|c: char| c == '"' || c == '{' || c.is_whitespace())
            .to_ascii_lowercase()
            .replace(' ', "_");
        let number: String = value
            .trim()
            .trim_end_matches(',')
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == '-')
            .collect();
        if let Ok(v) = number.parse::<f64>() {
            fields.entry(key).or_insert(v);
        }
    }
    let get = |key: &str| fields.get(key).copied().ok_or_else(|| format!("siege's summary has no {key:?}"));
    Ok(SiegeSummary {
        transactions: get("transactions")? as u64,
        availability: get("availability")?,
        elapsed_s: get("elapsed_time")?,
        response_time_s: get("response_time")?,
        transaction_rate: get("transaction_rate")?,
        successful: get("successful_transactions")? as u64,
        failed: get("failed_transactions")? as u64,
        longest_s: get("longest_transaction")?,
    })
}

/// One verbose transaction line, `HTTP/1.1 200     0.25 secs:  6 bytes ==>
/// GET  /`: its status code and seconds. `None` for any other line.
pub(crate) fn parse_transaction(line: &str) -> Option<(u16, f64)> {
    let line = strip_ansi(line);
    let mut words = line.split_whitespace();
    if !words.next()?.starts_with("HTTP/") {
        return None;
    }
    let code = words.next()?.parse().ok()?;
    let secs = words.next()?.parse().ok()?;
    (words.next()? == "secs:").then_some((code, secs))
}

/// A siege error line (`[error] socket: ... timed out`): a transaction that
/// failed without an answer.
pub(crate) fn is_error_line(line: &str) -> bool {
    let line = strip_ansi(line);
    line.starts_with("[error]") || line.starts_with("[alert]")
}

/// The line without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A running siege.
pub(crate) struct Siege {
    child: Child,
    reader: Option<JoinHandle<()>>,
    stderr: PathBuf,
    /// Per-second points of its transactions, as they complete.
    pub(crate) points: Receiver<TimePoint>,
}

impl Siege {
    /// `siege -c users -d delay -t time url` inside network namespace `ns`,
    /// with its settings and home in `dir` (so nothing lands in root's home).
    pub(crate) fn spawn(
        ns: &str,
        dir: &Path,
        users: u32,
        delay_s: u32,
        time: Duration,
        url: &str,
    ) -> anyhow::Result<Siege> {
        let rc = dir.join("siegerc");
        fs::write(&rc, SIEGERC).with_context(|| format!("write {}", rc.display()))?;
        let stderr = dir.join("siege.stderr");
        let err = File::create(&stderr).with_context(|| format!("create {}", stderr.display()))?;
        let rc = rc.to_string_lossy().into_owned();
        let (c, d, t) = (users.to_string(), delay_s.to_string(), format!("{}S", time.as_secs().max(1)));
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "siege", "-R", &rc, "-c", &c, "-d", &d, "-t", &t, url])
            .env("HOME", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .context("start siege (`cargo xtask setup` installs it)")?;
        let out = child.stdout.take().expect("piped");
        let (tx, points) = mpsc::channel();
        let limit = time + Duration::from_secs(30);
        let reader = thread::Builder::new()
            .name("siege".into())
            .spawn(move || {
                let start = Instant::now();
                let mut agg = Aggregator::new(limit);
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let second = start.elapsed().as_secs();
                    let ended = match parse_transaction(&line) {
                        Some((code, secs)) => transaction(code, secs),
                        None if is_error_line(&line) => Ended {
                            outcome: Outcome::Failed { kind: Failure::Other, detail: line.clone() },
                            latency: Duration::ZERO,
                            start_delay: Duration::ZERO,
                            retried: false,
                        },
                        None => continue,
                    };
                    agg.scheduled(second);
                    agg.ended(second, ended);
                    agg.close(second);
                    for p in agg.take_ready() {
                        let _ = tx.send(p);
                    }
                }
                agg.finish(start.elapsed().as_secs_f64());
                for p in agg.take_ready() {
                    let _ = tx.send(p);
                }
            })
            .context("start siege's reader")?;
        Ok(Siege { child, reader: Some(reader), stderr, points })
    }

    /// Ask siege to stop early (SIGINT: it still prints its summary).
    pub(crate) fn interrupt(&self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, libc::SIGINT) };
        }
    }

    /// Wait for siege to end; its summary.
    pub(crate) fn finish(mut self) -> anyhow::Result<SiegeSummary> {
        let status = self.child.wait().context("wait for siege")?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let text = fs::read_to_string(&self.stderr).unwrap_or_default();
        match parse_summary(&text) {
            Ok(s) => Ok(s),
            Err(e) => bail!("siege ({status}): {e}; its output:\n{}", text.trim_end()),
        }
    }
}

impl Drop for Siege {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A transaction as siege counts it: below 400 a success.
fn transaction(code: u16, secs: f64) -> Ended {
    let outcome = if code < 400 {
        Outcome::Ok { backend: String::new() }
    } else {
        Outcome::Failed { kind: Failure::Status, detail: format!("HTTP {code}") }
    };
    Ended { outcome, latency: Duration::from_secs_f64(secs.max(0.0)), start_delay: Duration::ZERO, retried: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str =
        "** SIEGE 4.0.7\n** Preparing 30 concurrent users for battle.\nThe server is now under siege...\n\n\
        Lifting the server siege...\nTransactions:\t\t          26 hits\nAvailability:\t\t       55.32 %\n\
        Elapsed time:\t\t        2.37 secs\nData transferred:\t        0.00 MB\nResponse time:\t\t        0.08 secs\n\
        Transaction rate:\t       10.97 trans/sec\nThroughput:\t\t        0.00 MB/sec\nConcurrency:\t\t        0.92\n\
        Successful transactions:          26\nFailed transactions:\t          21\nLongest transaction:\t        0.17\n\
        Shortest transaction:\t        0.00\n";

    const JSON: &str = "{\t\"transactions\":\t\t\t         100,\n\t\"availability\":\t\t\t       62.50,\n\
        \t\"elapsed_time\":\t\t\t       30.01,\n\t\"data_transferred\":\t\t        0.01,\n\
        \t\"response_time\":\t\t        1.25,\n\t\"transaction_rate\":\t\t        3.33,\n\
        \t\"throughput\":\t\t\t        0.00,\n\t\"concurrency\":\t\t\t        4.17,\n\
        \t\"successful_transactions\":\t         100,\n\t\"failed_transactions\":\t\t          60,\n\
        \t\"longest_transaction\":\t\t        9.02,\n\t\"shortest_transaction\":\t\t        0.00\n}\n";

    #[test]
    fn the_text_summary_of_siege_4_0_parses() {
        let s = parse_summary(TEXT).unwrap();
        assert_eq!(s.transactions, 26);
        assert_eq!(s.availability, 55.32);
        assert_eq!(s.elapsed_s, 2.37);
        assert_eq!(s.response_time_s, 0.08);
        assert_eq!(s.transaction_rate, 10.97);
        assert_eq!((s.successful, s.failed), (26, 21));
        assert_eq!(s.longest_s, 0.17);
    }

    #[test]
    fn the_json_summary_of_siege_4_1_parses() {
        let s = parse_summary(JSON).unwrap();
        assert_eq!((s.transactions, s.successful, s.failed), (100, 100, 60));
        assert_eq!(s.availability, 62.5);
        assert_eq!(s.longest_s, 9.02);
    }

    #[test]
    fn a_cut_summary_says_what_is_missing() {
        let cut: String = TEXT.lines().take_while(|l| !l.starts_with("Failed")).collect::<Vec<_>>().join("\n");
        assert_eq!(parse_summary(&cut).unwrap_err(), "siege's summary has no \"failed_transactions\"");
        assert!(parse_summary("").is_err());
    }

    #[test]
    fn transaction_lines_give_code_and_seconds() {
        assert_eq!(parse_transaction("HTTP/1.1 200     0.25 secs:       6 bytes ==> GET  /"), Some((200, 0.25)));
        assert_eq!(
            parse_transaction("\u{1b}[0;31mHTTP/1.1 503     0.00 secs:      21 bytes ==> GET  /\u{1b}[0m"),
            Some((503, 0.0))
        );
        assert_eq!(parse_transaction("Transactions:  26 hits"), None);
        assert_eq!(parse_transaction("HTTP/1.1 200 fast"), None);
        assert!(is_error_line("[error] socket: unable to connect sock.c:249: Connection refused"));
        assert!(!is_error_line("HTTP/1.1 200     0.25 secs: 6 bytes ==> GET  /"));
    }
}
