//! What the bench reports: one row per (mode, style), the median of its
//! runs, and each figure against direct's in the same style.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::wrk::{Errors, Style};

/// What sits between the client and the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No balancer: each wrk process sends to one backend, routed through
    /// the LB namespace.
    Direct,
    /// lb-agent with its program at tc on the LB namespace's veths (what
    /// `hook = "auto"` gives a veth), the VIP in front of the backends.
    LbTc,
    /// lb-agent with its XDP program on the same veths (`hook = "xdp"`;
    /// the fast path off, as `auto` leaves it on a veth).
    LbXdp,
    Haproxy,
    NginxStream,
}

impl Mode {
    pub const ALL: [Mode; 5] = [Mode::Direct, Mode::LbTc, Mode::LbXdp, Mode::Haproxy, Mode::NginxStream];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::LbTc => "this LB (tc)",
            Mode::LbXdp => "this LB (XDP)",
            Mode::Haproxy => "HAProxy tcp",
            Mode::NginxStream => "NGINX stream",
        }
    }
}

/// One run: all wrk processes of one measurement, merged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub requests: u64,
    pub req_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub errors: Errors,
    /// See [`Meta::cpu`].
    pub cpu_us_per_req: f64,
    /// All CPUs' busy time over the run, per request (includes whatever
    /// else the machine did).
    pub system_cpu_us_per_req: f64,
    /// All CPUs' softirq time over the run, per request.
    pub softirq_us_per_req: f64,
    /// This LB only: the new flows each backend got during the run, in
    /// backend order. A hash spreads wrk's few connections unevenly, and
    /// the busiest single-process backend then sets the pace and the tail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows_per_backend: Option<Vec<u64>>,
}

/// A figure against direct's in the same style.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VsDirect {
    pub req_per_s: f64,
    pub p50: f64,
    pub p99: f64,
    pub cpu_per_req: f64,
    /// CPU per request minus direct's, µs.
    pub extra_cpu_us_per_req: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Case {
    pub mode: Mode,
    pub style: Style,
    /// Medians of the runs, each figure on its own.
    pub req_per_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub cpu_us_per_req: f64,
    pub system_cpu_us_per_req: f64,
    /// `None` until direct's figures for the style are known.
    pub vs_direct: Option<VsDirect>,
    pub runs: Vec<Run>,
}

/// How the figures were made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub topology: String,
    pub load: String,
    pub connections: u32,
    pub wrk_processes: u32,
    pub duration_s: u64,
    pub runs: u32,
    /// What `cpu_us_per_req` counts.
    pub cpu: String,
    /// /proc/loadavg at the start and at the end.
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub versions: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub meta: Meta,
    pub cases: Vec<Case>,
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn median_u(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

impl Case {
    /// The medians of `runs` (the middle one of an odd count, the upper
    /// middle of an even one).
    pub fn of_runs(mode: Mode, style: Style, runs: Vec<Run>) -> Case {
        let f = |g: fn(&Run) -> f64| median_f(runs.iter().map(g).collect());
        let u = |g: fn(&Run) -> u64| median_u(runs.iter().map(g).collect());
        Case {
            mode,
            style,
            req_per_s: f(|r| r.req_per_s),
            p50_us: u(|r| r.p50_us),
            p99_us: u(|r| r.p99_us),
            cpu_us_per_req: f(|r| r.cpu_us_per_req),
            system_cpu_us_per_req: f(|r| r.system_cpu_us_per_req),
            vs_direct: None,
            runs,
        }
    }
}

/// Fills in every case's `vs_direct` from the direct case of its style.
pub fn compare_to_direct(cases: &mut [Case]) {
    let direct: Vec<Case> = cases.iter().filter(|c| c.mode == Mode::Direct).cloned().collect();
    for c in cases.iter_mut() {
        let Some(d) = direct.iter().find(|d| d.style == c.style) else { continue };
        // 0 for a direct figure of 0 (JSON has no NaN); the bench refuses a
        // case that moved no requests, so that does not happen there.
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        c.vs_direct = Some(VsDirect {
            req_per_s: ratio(c.req_per_s, d.req_per_s),
            p50: ratio(c.p50_us as f64, d.p50_us as f64),
            p99: ratio(c.p99_us as f64, d.p99_us as f64),
            cpu_per_req: ratio(c.cpu_us_per_req, d.cpu_us_per_req),
            extra_cpu_us_per_req: c.cpu_us_per_req - d.cpu_us_per_req,
        });
    }
}

/// The human table.
pub fn render_table(r: &Report) -> String {
    let m = &r.meta;
    let mut s = String::new();
    let _ = writeln!(s, "{}", m.topology);
    let _ = writeln!(s, "{}; {} s per run, median of {} run(s)", m.load, m.duration_s, m.runs);
    let _ = writeln!(s, "CPU/req: {}", m.cpu);
    let _ = writeln!(s, "load average: {} at the start, {} at the end", m.loadavg_start, m.loadavg_end);
    let _ = writeln!(
        s,
        "\n{:<15} {:<14} {:>9} {:>7} {:>8} {:>7} {:>8} {:>7} {:>8} {:>8} {:>7}",
        "style", "mode", "req/s", "x", "p50 ms", "x", "p99 ms", "x", "CPU us", "+us", "errors"
    );
    // Grouped by style, modes in their measuring order.
    let rows = Style::ALL.iter().flat_map(|s| r.cases.iter().filter(move |c| c.style == *s));
    for c in rows {
        let x = |f: fn(&VsDirect) -> f64| c.vs_direct.as_ref().map_or("-".to_owned(), |v| format!("{:.2}x", f(v)));
        let extra = c.vs_direct.as_ref().map_or("-".to_owned(), |v| format!("{:+.1}", v.extra_cpu_us_per_req));
        let errors: u64 = c.runs.iter().map(|r| r.errors.total()).sum();
        let _ = writeln!(
            s,
            "{:<15} {:<14} {:>9.0} {:>7} {:>8.3} {:>7} {:>8.3} {:>7} {:>8.1} {:>8} {:>7}",
            c.style.label(),
            c.mode.label(),
            c.req_per_s,
            x(|v| v.req_per_s),
            c.p50_us as f64 / 1000.0,
            x(|v| v.p50),
            c.p99_us as f64 / 1000.0,
            x(|v| v.p99),
            c.cpu_us_per_req,
            extra,
            errors
        );
    }
    let _ =
        writeln!(s, "\nx: against direct in the same style; CPU us: CPU time per request; +us: more than direct's.");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(rps: f64, p99: u64, cpu: f64) -> Run {
        Run {
            requests: 10,
            req_per_s: rps,
            p50_us: p99 / 2,
            p99_us: p99,
            errors: Errors::default(),
            cpu_us_per_req: cpu,
            system_cpu_us_per_req: cpu * 2.0,
            softirq_us_per_req: 1.0,
            flows_per_backend: None,
        }
    }

    #[test]
    fn medians_and_ratios() {
        let d = Case::of_runs(
            Mode::Direct,
            Style::KeepAlive,
            vec![run(100.0, 300, 20.0), run(90.0, 200, 30.0), run(110.0, 400, 25.0)],
        );
        assert_eq!((d.req_per_s, d.p99_us, d.cpu_us_per_req), (100.0, 300, 25.0));
        let lb = Case::of_runs(Mode::LbXdp, Style::KeepAlive, vec![run(80.0, 600, 30.0)]);
        let other = Case::of_runs(Mode::LbXdp, Style::NewConnection, vec![run(80.0, 600, 30.0)]);
        let mut cases = vec![d, lb, other];
        compare_to_direct(&mut cases);
        assert_eq!(cases[0].vs_direct.as_ref().unwrap().req_per_s, 1.0);
        let v = cases[1].vs_direct.as_ref().unwrap();
        assert_eq!((v.req_per_s, v.p99, v.extra_cpu_us_per_req), (0.8, 2.0, 5.0));
        assert!(cases[2].vs_direct.is_none(), "no direct case for new-connection");
        let report = Report {
            meta: Meta {
                topology: "t".into(),
                load: "l".into(),
                connections: 50,
                wrk_processes: 3,
                duration_s: 1,
                runs: 1,
                cpu: "c".into(),
                loadavg_start: "0".into(),
                loadavg_end: "0".into(),
                versions: vec![],
            },
            cases,
        };
        let table = render_table(&report);
        assert!(table.contains("keep-alive      this LB (XDP)         80   0.80x"), "{table}");
        let lines: Vec<&str> = table.lines().filter(|l| l.contains("this LB")).collect();
        assert!(lines[0].starts_with("keep-alive") && lines[1].starts_with("new-connection"), "{table}");
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), report);
        assert!(json.contains(r#""mode":"nginx-stream""#) || json.contains(r#""mode":"lb-xdp""#));
    }
}
