//! A real Prometheus scrapes `lb_agent::serve::metrics::serve` and stores every
//! series it serves, with the same labels, values, types and help texts: the
//! exposition is proven against Prometheus's own parser, not only against our
//! unit tests.
//!
//! Needs root: it installs Debian's `prometheus` package when
//! `/usr/bin/prometheus` is missing (`cargo xtask setup` should install it
//! too). The Debian service is never started here: the test runs the binary
//! itself as a child ([`lb_lab::monitoring`]), on a free loopback port, with
//! its config and TSDB in a temp dir, and its guard kills that child (by its
//! pid) and removes the dir, also when the test fails. Everything stays on
//! 127.0.0.1.
//!
//! `cargo test -p lb-tests --release --test prometheus_scrape -- --nocapture`

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Instant,
};

use lb_agent::{
    serve::metrics,
    status::{
        AgentInfo, BackendStatus, HealthCheckCounts, InterfaceStatus, MapFill, ReasonCount, ServiceStatus, Snapshot,
        Traffic,
    },
};
use lb_lab::{
    monitoring::{api, query, query_one, query_value, sample_value, start_prometheus, Server},
    root::skip_without_root,
};
use tokio::sync::watch;

const JOB: &str = "lb-agent";
/// Label values a parser could get wrong: quotes, backslashes, a newline.
const AWKWARD_SERVICE: &str = "we\"ird\\name\nline two";

#[test]
fn root_prometheus_scrapes_metrics() {
    if skip_without_root("root_prometheus_scrapes_metrics") {
        return;
    }
    let started = Instant::now();

    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio runtime");
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind the metrics server");
    let target = listener.local_addr().expect("metrics server address");
    let (publisher, snapshots) = watch::channel(Arc::new(snapshot(1)));
    let server = runtime.spawn(metrics::serve(listener, snapshots));

    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
         scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n"
    );
    let prometheus = start_prometheus(&config, &[]);
    eprintln!("prometheus {} scraping {target} every 1 s", prometheus.addr);
    prometheus.wait_ready();

    // The target is healthy: scraped, parsed, no error. Prometheus 2.x
    // applies new scrape targets at most every 5 s, so this takes ~5 s.
    let health = prometheus.wait_until("target up", || {
        let data = api(&prometheus, "/api/v1/targets?state=active")?;
        let targets = data["activeTargets"].as_array().ok_or("no activeTargets")?;
        let [t] = targets.as_slice() else { return Err(format!("expected one target: {targets:?}")) };
        if t["health"] != "up" || t["lastError"] != "" {
            return Err(format!("health {} lastError {}", t["health"], t["lastError"]));
        }
        Ok(t.clone())
    });
    eprintln!("target up after {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(health["scrapeUrl"], format!("http://{target}/metrics"));
    assert_eq!(health["labels"]["job"], JOB);
    assert_eq!(query_one(&prometheus, &format!("up{{job=\"{JOB}\"}}")), 1.0);

    // Every series served is stored, with the same labels and value.
    let served = parse_exposition(&metrics::render(&snapshot(1)).expect("render"));
    let sample_count = served.samples.len();
    assert_eq!(query_one(&prometheus, &format!("scrape_samples_scraped{{job=\"{JOB}\"}}")), sample_count as f64);
    let stored = prometheus.wait_until("all series stored", || {
        let stored = stored_series(&prometheus)?;
        if stored == served.samples {
            Ok(stored)
        } else {
            Err(describe_difference(&served.samples, &stored))
        }
    });
    eprintln!("{} series stored as served, awkward label value included", stored.len());

    // Spot checks, so a failure reads plainly.
    let backend = r#"service="web",backend="10.1.0.1:8080""#;
    assert_eq!(query_one(&prometheus, &format!("lb_backend_open_connections{{{backend}}}")), 7.0);
    assert_eq!(query_one(&prometheus, &format!("lb_backend_table_share{{{backend}}}")), 0.75);
    assert_eq!(
        query_one(&prometheus, r#"lb_backend_state{service="web",backend="10.1.0.2:8080",state="draining"}"#),
        1.0
    );
    assert_eq!(query_one(&prometheus, r#"lb_packets_total{reason="drop_no_backend",verdict="drop"}"#), 2.0);
    assert_eq!(
        query_one(
            &prometheus,
            r#"lb_backend_health_checks_total{service="web",backend="10.1.0.3:8080",result="fail"}"#
        ),
        3.0
    );
    assert_eq!(query_one(&prometheus, &format!("lb_backend_health_check_duration_seconds_count{{{backend}}}")), 7.0);
    assert_eq!(query_one(&prometheus, "process_start_time_seconds"), 1_700_000_000.25);
    let escaped = AWKWARD_SERVICE.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    assert_eq!(query_one(&prometheus, &format!("lb_service_packets_total{{service=\"{escaped}\"}}")), 50.0);

    // Types and help texts as served.
    let metadata = prometheus.wait_until("metadata", || {
        let data = api(&prometheus, "/api/v1/metadata")?;
        let got: BTreeMap<String, (String, String)> = served
            .families
            .keys()
            .filter_map(|name| {
                let m = &data[name.as_str()][0];
                Some((name.clone(), (m["type"].as_str()?.to_owned(), m["help"].as_str()?.to_owned())))
            })
            .collect();
        if got == served.families {
            Ok(got)
        } else {
            Err(format!("metadata {got:?}\nserved {:?}", served.families))
        }
    });
    eprintln!("{} families with the served TYPE and HELP", metadata.len());

    // A new snapshot is served on the next scrape: counters are absolute.
    publisher.send(Arc::new(snapshot(2))).expect("the server holds a receiver");
    let query = format!("lb_backend_packets_total{{{backend}}}");
    prometheus.wait_until("updated counter", || {
        let v = query_value(&prometheus, &query)?;
        if v == 1200.0 {
            Ok(())
        } else {
            Err(format!("{query} = {v}"))
        }
    });
    assert_eq!(query_one(&prometheus, &format!("resets(lb_backend_packets_total{{{backend}}}[5m])")), 0.0);

    assert!(!server.is_finished(), "the metrics server stopped");
    drop(prometheus);
    eprintln!("root_prometheus_scrapes_metrics: {:.1} s", started.elapsed().as_secs_f64());
}

// ---- The snapshot served ------------------------------------------------------

fn traffic(packets: u64) -> Traffic {
    Traffic {
        packets,
        bytes: packets * 64,
        new_flows: packets / 10,
        reply_packets: packets * 9 / 10,
        reply_bytes: packets * 1200,
        closed_flows: packets / 20,
        ..Traffic::default()
    }
}

fn backend(address: &str, state: &str, weight: u32, table_share: f64, open: u64, packets: u64) -> BackendStatus {
    BackendStatus {
        address: address.to_owned(),
        state: state.to_owned(),
        reason: None,
        weight,
        ramp_percent: None,
        in_table: table_share > 0.0,
        table_share,
        open_connections: open,
        drain_seconds_left: (state == "draining").then_some(20.0),
        counters: traffic(packets),
        run_time: None,
        health_checks: Some(HealthCheckCounts {
            ok: packets / 100,
            fail: u64::from(state == "down") * 3,
            timeout: 1,
            seconds_total: 0.5,
        }),
    }
}

fn service(name: &str, port: u16, protocol: &str, packets: u64, backends: Vec<BackendStatus>) -> ServiceStatus {
    ServiceStatus {
        name: name.to_owned(),
        vip: "10.0.0.100".to_owned(),
        port,
        protocol: protocol.to_owned(),
        mode: "dnat".to_owned(),
        snat_sources: vec![],
        interfaces: vec!["eth0".to_owned()],
        counters: traffic(packets),
        usable_backends: backends.iter().filter(|b| b.in_table).count() as u32,
        backends,
    }
}

/// The same agent at scrape generation `n`: the counters grow with `n`.
fn snapshot(n: u64) -> Snapshot {
    Snapshot {
        agent: AgentInfo {
            version: "0.1.0".to_owned(),
            pid: 4242,
            uptime_seconds: 60.5 * n as f64,
            config_path: "/etc/lb/lb.toml".to_owned(),
            errors_total: 3,
            interfaces: vec![InterfaceStatus {
                name: "eth0".to_owned(),
                hook: "xdp".to_owned(),
                xdp_mode: "generic".to_owned(),
                checksums: "complete".to_owned(),
                ..Default::default()
            }],
            socket_lb: Default::default(),
            config_refused: None,
            start_time_seconds: 1_700_000_000.25,
        },
        services: vec![
            service(
                "web",
                80,
                "tcp",
                1000 * n,
                vec![
                    backend("10.1.0.1:8080", "active", 3, 0.75, 7, 600 * n),
                    backend("10.1.0.2:8080", "draining", 1, 0.0, 2, 400 * n),
                    backend("10.1.0.3:8080", "down", 1, 0.0, 0, 0),
                ],
            ),
            service("dns", 53, "udp", 300 * n, vec![backend("10.1.0.4:5353", "active", 1, 1.0, 1, 300 * n)]),
            service(AWKWARD_SERVICE, 443, "tcp", 50 * n, vec![backend("10.1.0.5:8443", "active", 1, 1.0, 0, 50 * n)]),
        ],
        reasons: vec![
            ReasonCount { reason: "forwarded".to_owned(), verdict: "forward".to_owned(), packets: 1350 * n },
            ReasonCount { reason: "reply_translated".to_owned(), verdict: "forward".to_owned(), packets: 1200 * n },
            ReasonCount { reason: "pass_not_ipv4".to_owned(), verdict: "pass".to_owned(), packets: 12 },
            ReasonCount { reason: "drop_no_backend".to_owned(), verdict: "drop".to_owned(), packets: 2 },
        ],
        maps: vec![
            MapFill { name: "CONNTRACK".to_owned(), entries: 10, max_entries: 65536 },
            MapFill { name: "BACKENDS".to_owned(), entries: 5, max_entries: 1024 },
        ],
        events: vec![],
        scaling: vec![],
    }
}

// ---- Our side of the comparison -----------------------------------------------

/// A series: its labels (name as `__name__`) in order.
type Series = BTreeMap<String, String>;

struct Exposition {
    samples: BTreeMap<Series, f64>,
    /// Family name → (type, help).
    families: BTreeMap<String, (String, String)>,
}

/// Reads back the text format `render` writes (one sample per line, labels
/// quoted with `\\`, `\"` and `\n` escapes), independently of the encoder.
fn parse_exposition(text: &str) -> Exposition {
    let mut samples = BTreeMap::new();
    let mut families: BTreeMap<String, (String, String)> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            families.entry(name.to_owned()).or_default().1 = unescape(help);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name type");
            families.entry(name.to_owned()).or_default().0 = kind.to_owned();
        } else {
            let (series, value) = parse_sample(line);
            assert!(samples.insert(series, value).is_none(), "duplicate series: {line}");
        }
    }
    Exposition { samples, families }
}

fn parse_sample(line: &str) -> (Series, f64) {
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("sample without value: {line}"));
    let mut series = Series::from([("__name__".to_owned(), line[..name_end].to_owned())]);
    let mut rest = &line[name_end..];
    if let Some(mut labels) = rest.strip_prefix('{') {
        while let Some((name, after)) = labels.split_once("=\"") {
            let name = name.trim_start_matches(',');
            // The value ends at the first quote that is not escaped.
            let mut escaped = false;
            let end = after
                .char_indices()
                .find(|&(_, c)| {
                    let end = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    end
                })
                .map(|(i, _)| i)
                .unwrap_or_else(|| panic!("unterminated label value: {line}"));
            series.insert(name.to_owned(), unescape(&after[..end]));
            labels = &after[end + 1..];
            if let Some(after_brace) = labels.strip_prefix('}') {
                rest = after_brace;
                break;
            }
        }
    }
    let value = rest.trim().parse().unwrap_or_else(|e| panic!("bad value in {line}: {e}"));
    (series, value)
}

/// Undoes the text format's `\\`, `\"` and `\n` escapes.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(c) => out.push(c),
            None => panic!("dangling escape in {s:?}"),
        }
    }
    out
}

fn describe_difference(served: &BTreeMap<Series, f64>, stored: &BTreeMap<Series, f64>) -> String {
    let keys: BTreeSet<&Series> = served.keys().chain(stored.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| served.get(*k) != stored.get(*k))
        .take(10)
        .map(|k| format!("{k:?}: served {:?}, stored {:?}", served.get(k), stored.get(k)))
        .collect();
    format!("{} served, {} stored; first differences:\n{}", served.len(), stored.len(), diffs.join("\n"))
}

// ---- Prometheus's side --------------------------------------------------------

/// Every `lb_*` series of the job, as Prometheus stored it, without the
/// `job` and `instance` labels it adds.
fn stored_series(prometheus: &Server) -> Result<BTreeMap<Series, f64>, String> {
    let selector = format!("{{__name__=~\"lb_.+|process_.+\",job=\"{JOB}\"}}");
    let mut stored = BTreeMap::new();
    for r in query(prometheus, &selector)? {
        let mut series: Series = serde_json::from_value(r["metric"].clone()).map_err(|e| e.to_string())?;
        series.remove("job");
        series.remove("instance");
        stored.insert(series, sample_value(&r)?);
    }
    Ok(stored)
}
