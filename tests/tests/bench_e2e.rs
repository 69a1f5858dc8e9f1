//! Smoke test of `cargo xtask bench e2e`: the whole machinery (topology,
//! nginx backends, lb-agent, HAProxy, NGINX stream, wrk, the merge, the
//! CPU accounting, the table and the JSON) for 1 s per case, about 25 s in
//! all. Figures this short mean nothing; that every case moved requests,
//! and that the outputs parse, does.
//!
//! `cargo test -p lb-tests --release --test bench_e2e -- --test-threads=1`
//! (needs root, wrk, haproxy, nginx and libnginx-mod-stream, which `cargo
//! xtask setup` installs, and lb-agent and lb-bench-e2e built).

use std::process::Command;

use lb_lab::{bins::built_bin, require_root};

const MODES: [&str; 5] = ["direct", "lb-tc", "lb-xdp", "haproxy", "nginx-stream"];
const STYLES: [&str; 2] = ["keep-alive", "new-connection"];

fn bench(args: &[&str]) -> String {
    let bin = built_bin("lb-bench-e2e", "LB_BENCH_E2E_BIN");
    let out = Command::new(&bin)
        .args(["--duration", "1s", "--runs", "1"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "lb-bench-e2e {args:?} {}:\n{stderr}\n{stdout}", out.status);
    // Progress goes to stderr, one line per run.
    assert_eq!(stderr.matches(" run 1/1: ").count(), MODES.len() * STYLES.len(), "{stderr}");
    stdout.into_owned()
}

#[test]
fn root_bench_e2e_moves_requests_in_every_case() {
    require_root!("root_bench_e2e_moves_requests_in_every_case");

    let json = bench(&["--json"]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}:\n{json}"));
    let cases = report["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), MODES.len() * STYLES.len(), "{json}");
    for mode in MODES {
        for style in STYLES {
            let c = cases
                .iter()
                .find(|c| c["mode"] == mode && c["style"] == style)
                .unwrap_or_else(|| panic!("no case {mode} {style}:\n{json}"));
            let run = &c["runs"][0];
            assert!(run["requests"].as_u64() > Some(0), "{mode} {style} moved no requests: {c}");
            assert!(c["req_per_s"].as_f64() > Some(0.0), "{c}");
            assert!(c["p99_us"].as_u64() >= c["p50_us"].as_u64(), "{c}");
            assert!(c["cpu_us_per_req"].as_f64() > Some(0.0), "no CPU time counted: {c}");
            assert!(c["vs_direct"]["req_per_s"].as_f64() > Some(0.0), "{c}");
        }
    }

    let table = bench(&[]);
    for (mode, label) in MODES.iter().zip(["direct", "this LB (tc)", "this LB (XDP)", "HAProxy tcp", "NGINX stream"]) {
        for style in STYLES {
            let row = table
                .lines()
                .find(|l| l.starts_with(style) && l.contains(label))
                .unwrap_or_else(|| panic!("no row for {mode} {style}:\n{table}"));
            // style, mode words, then req/s and its ratio.
            let after = row.split_once(label).expect("label").1;
            let rps: f64 = after.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            assert!(rps > 0.0, "row {row:?}");
            assert!(after.contains('x'), "no ratio in {row:?}");
        }
    }
}
