//! A real Prometheus scrapes `lb_agent::serve::metrics::serve` and stores every
//! series it serves, with the same labels, values, types and help texts: the
//! exposition is proven against Prometheus's own parser, not only against our
//! unit tests.
//!
//! Needs root: it installs Debian's `prometheus` package when
//! `/usr/bin/prometheus` is missing (`cargo xtask setup` should install it
//! too). The Debian service is never started here: the test runs the binary
//! itself as a child, on a free loopback port, with its config and TSDB in a
//! temp dir, and its guard kills that child (by its pid) and removes the dir,
//! also when the test fails. Everything stays on 127.0.0.1.
//!
//! `cargo test -p lb-tests --release --test prometheus_scrape -- --nocapture`

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lb_agent::{
    serve::metrics,
    status::{
        AgentInfo, BackendStatus, HealthCheckCounts, InterfaceStatus, MapFill, ReasonCount, ServiceStatus, Snapshot,
        Traffic,
    },
};
use lb_lab::root::skip_without_root;
use serde_json::Value;
use tokio::sync::watch;

const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Each wait below gives up after this long.
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(250);
const JOB: &str = "lb-agent";
/// Label values a parser could get wrong: quotes, backslashes, a newline.
const AWKWARD_SERVICE: &str = "we\"ird\\name\nline two";

#[test]
fn root_prometheus_scrapes_metrics() {
    if skip_without_root("root_prometheus_scrapes_metrics") {
        return;
    }
    let started = Instant::now();
    ensure_prometheus();

    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("tokio runtime");
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind the metrics server");
    let target = listener.local_addr().expect("metrics server address");
    let (publisher, snapshots) = watch::channel(Arc::new(snapshot(1)));
    let server = runtime.spawn(metrics::serve(listener, snapshots));

    let prometheus = Prometheus::start(target);
    eprintln!("prometheus {} scraping {target} every 1 s", prometheus.addr);
    prometheus.wait_until("ready", || match prometheus.get("/-/ready") {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!("{status}: {body}")),
        Err(e) => Err(e),
    });

    // The target is healthy: scraped, parsed, no error. Prometheus 2.x
    // applies new scrape targets at most every 5 s, so this takes ~5 s.
    let health = prometheus.wait_until("target up", || {
        let data = prometheus.api("/api/v1/targets?state=active")?;
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
        let data = prometheus.api("/api/v1/metadata")?;
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
fn stored_series(prometheus: &Prometheus) -> Result<BTreeMap<Series, f64>, String> {
    let data = prometheus.api(&format!(
        "/api/v1/query?query={}",
        encode(&format!("{{__name__=~\"lb_.+|process_.+\",job=\"{JOB}\"}}"))
    ))?;
    let mut stored = BTreeMap::new();
    for r in data["result"].as_array().ok_or("no result")? {
        let mut series: Series = serde_json::from_value(r["metric"].clone()).map_err(|e| e.to_string())?;
        series.remove("job");
        series.remove("instance");
        stored.insert(series, sample_value(r)?);
    }
    Ok(stored)
}

/// The value of an instant query that must return exactly one series.
fn query_value(prometheus: &Prometheus, query: &str) -> Result<f64, String> {
    let data = prometheus.api(&format!("/api/v1/query?query={}", encode(query)))?;
    match data["result"].as_array().map(Vec::as_slice) {
        Some([one]) => sample_value(one),
        other => Err(format!("{query}: expected one series, got {other:?}")),
    }
}

fn query_one(prometheus: &Prometheus, query: &str) -> f64 {
    prometheus.wait_until(query, || query_value(prometheus, query))
}

/// `"value": [<time>, "<number>"]` of a vector sample.
fn sample_value(r: &Value) -> Result<f64, String> {
    let v = r["value"][1].as_str().ok_or_else(|| format!("no value in {r}"))?;
    v.parse().map_err(|e| format!("value {v}: {e}"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Installs Debian's `prometheus` package if the binary is missing. Only
/// the binary is used; the package's service is not started by this test.
fn ensure_prometheus() {
    if Path::new(PROMETHEUS).exists() {
        return;
    }
    eprintln!("{PROMETHEUS} missing: installing Debian's prometheus package");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(args)
            .status()
            .unwrap_or_else(|e| panic!("run apt-get: {e}"))
            .success()
    };
    let install = ["install", "-y", "--no-install-recommends", "prometheus"];
    // Stale package lists are the usual reason an install fails.
    if !apt(&install) {
        assert!(apt(&["update"]), "apt-get update failed");
        assert!(apt(&install), "apt-get install prometheus failed");
    }
    assert!(Path::new(PROMETHEUS).exists(), "the prometheus package did not install {PROMETHEUS}");
}

/// A Prometheus server this test spawned, with its own config and TSDB in a
/// temp dir. Drop kills exactly that child by its pid and removes the dir;
/// if the test is failing, it prints Prometheus's log first.
struct Prometheus {
    /// In a cell so `wait_until` can check on it while its closure uses
    /// `&self` for requests.
    child: RefCell<Child>,
    dir: PathBuf,
    addr: SocketAddr,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("lb-prometheus-{}-{nanos}", std::process::id()));
        fs::create_dir_all(dir.join("data")).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let addr = free_loopback_port();
        let log = File::create(dir.join("prometheus.log")).expect("create prometheus.log");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--web.enable-lifecycle")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                // No guard yet to clean up after us.
                if let Err(e) = fs::remove_dir_all(&dir) {
                    eprintln!("warning: remove {}: {e}", dir.display());
                }
                panic!("spawn {PROMETHEUS}: {e}");
            }
        };
        Prometheus { child: RefCell::new(child), dir, addr }
    }

    /// `GET path` on Prometheus: (status, body).
    fn get(&self, path: &str) -> Result<(u16, String), String> {
        http_get(self.addr, path)
    }

    /// The `data` of a successful API response.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = self.get(path)?;
        let json: Value = serde_json::from_str(&body).map_err(|e| format!("{path}: {e}: {body}"))?;
        if status != 200 || json["status"] != "success" {
            return Err(format!("{path}: {status}: {body}"));
        }
        Ok(json["data"].clone())
    }

    /// Polls `check` until it succeeds; panics with its last error after
    /// `WAIT`, or at once if Prometheus has exited.
    fn wait_until<T>(&self, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let why = match check() {
                Ok(v) => return v,
                Err(why) => why,
            };
            match self.child.borrow_mut().try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => panic!("{what}: prometheus exited ({status}); last check: {why}"),
                Err(e) => panic!("{what}: wait for prometheus: {e}"),
            }
            if Instant::now() >= deadline {
                panic!("{what}: not within {WAIT:?}: {why}");
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let child = self.child.get_mut();
        // Child::kill sends SIGKILL to this child's pid only (and is a no-op
        // if it has already been reaped).
        if let Err(e) = child.kill() {
            eprintln!("warning: kill prometheus (pid {}): {e}", child.id());
        }
        if let Err(e) = child.wait() {
            eprintln!("warning: reap prometheus (pid {}): {e}", child.id());
        }
        if thread::panicking() {
            let log = fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
            eprintln!("---- prometheus log ----\n{log}---- end of prometheus log ----");
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: remove {}: {e}", self.dir.display());
        }
    }
}

/// A loopback port free right now (the kernel's pick; released for the
/// child to bind).
fn free_loopback_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr")
}

/// One GET on a new connection: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let SocketAddr::V4(addr) = addr else { return Err(format!("GET {path}: {addr} is not IPv4")) };
    lb_lab::http::get(addr, path, Duration::from_secs(5)).map_err(|e| format!("GET {path}: {e}"))
}
