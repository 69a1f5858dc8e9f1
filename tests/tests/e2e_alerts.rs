//! The shipped monitoring (deploy/, README "Monitoring") against real
//! servers:
//!
//! - `promtool check config`, `check rules` and `test rules` (the synthetic
//!   series for every alert in `lb-alerts.test.yml`) on the shipped files.
//! - A real Prometheus scrapes a real agent with the shipped rules (their
//!   `for:` cut to 1 s, scrape and evaluation every second), a backend is
//!   killed, and `LbBackendDown` reaches a real Alertmanager
//!   (`/api/v2/alerts`). Then every query of the shipped dashboard returns
//!   data from that Prometheus.
//!
//! The agent runs in the topology's LB namespace with its metrics on that
//! namespace's loopback; Prometheus and Alertmanager run in there too (the
//! test's thread enters it to start them and to query), each on a free
//! port, with its files in a temp dir of its own; their guards kill them by
//! pid (Alertmanager's cluster listener is off). The scaled service gives
//! the scaling panels their series: one process instance of lb-backend
//! behind a bridge.
//!
//! Needs root and built binaries (`cargo build --release -p lb-agent -p
//! lb-backend --bins`), then `cargo test -p lb-tests --release --test
//! e2e_alerts -- --test-threads=1 --nocapture` (about 20 s).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lb_lab::{
    bins::built_bin,
    monitoring::{
        deploy_dir, ensure_package, query, query_one, start_alertmanager, start_prometheus, Server, PROMTOOL,
    },
    netns::InstanceNamespaces,
    root::{is_root, skip_without_root},
    topology::{tcp_request, Options, Topology, LB_CLIENT_IFACE, VIP},
};
use serde_json::Value;

const JOB: &str = "lb-agent";
/// The scaled service's port on the VIP (the topology's own `web` has 80).
const APP_PORT: u16 = 8081;
/// What the dashboard's variables stand for in its queries here: every
/// service, and a rate window of several 1 s scrapes.
const DASHBOARD_VARIABLES: [(&str, &str); 2] = [("$service", ".*"), ("$__rate_interval", "10s")];

fn promtool(args: &[&str]) {
    let out = Command::new(PROMTOOL)
        .args(args)
        .current_dir(deploy_dir())
        .output()
        .unwrap_or_else(|e| panic!("run {PROMTOOL}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {}: {}\n{text}", args.join(" "), out.status);
    eprintln!("promtool {}: ok", args.join(" "));
}

#[test]
fn promtool_checks_the_shipped_files() {
    // promtool needs no root; installing it does.
    if !Path::new(PROMTOOL).exists() && skip_without_root("promtool_checks_the_shipped_files") {
        return;
    }
    if is_root() {
        ensure_package(PROMTOOL, "prometheus");
    }
    promtool(&["check", "config", "prometheus/prometheus.yml"]);
    promtool(&["check", "rules", "prometheus/lb-alerts.yml"]);
    promtool(&["test", "rules", "prometheus/lb-alerts.test.yml"]);
}

/// The shipped rules with every `for:` cut to 1 s, so the test need not
/// wait minutes.
fn rules_for_test() -> String {
    let path = deploy_dir().join("prometheus/lb-alerts.yml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let rules: Vec<String> = text
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for:") {
            Some(_) => format!("{}for: 1s", &l[..l.len() - l.trim_start().len()]),
            None => l.to_owned(),
        })
        .collect();
    assert!(rules.iter().filter(|l| l.trim() == "for: 1s").count() >= 7, "the rules have no `for:` to cut");
    rules.join("\n")
}

/// Every `expr` of the shipped dashboard, with its variables filled in.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = deploy_dir().join("grafana/lb-dashboard.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let dashboard: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let mut expr = target["expr"].as_str().expect("expr").to_owned();
            for (variable, value) in DASHBOARD_VARIABLES {
                expr = expr.replace(variable, value);
            }
            out.push((panel["title"].as_str().expect("title").to_owned(), expr));
        }
    }
    out
}

/// The firing alerts Alertmanager holds.
fn alerts(alertmanager: &Server) -> Result<Vec<Value>, String> {
    let json = alertmanager.get_json("/api/v2/alerts?active=true")?;
    json.as_array().cloned().ok_or_else(|| format!("not a list of alerts: {json}"))
}

#[test]
fn root_backend_down_alert_reaches_alertmanager() {
    if skip_without_root("root_backend_down_alert_reaches_alertmanager") {
        return;
    }
    let started = Instant::now();
    let backend_bin = built_bin("lb-backend", "LB_BACKEND_BIN");
    let mut topo = Topology::build(Options::with_backends(&["a", "b"]));
    let pid = std::process::id();
    let bridge = format!("lba{}", pid % 100_000);
    let instances = InstanceNamespaces::claim(&bridge);
    // A /24 of its own: e2e_scaling keeps to 10.213.x, the demo to 10.212.0.
    let prefix = Ipv4Addr::new(10, 214, (pid % 250) as u8 + 1, 0);
    let web = topo.config_toml_with(
        &[("a", 1), ("b", 1)],
        r#"health_check = { kind = "tcp", interval = "200ms", rise = 1, fall = 2 }"#,
    );
    let config = format!(
        r#"{web}
[[service]]
name = "app"
vip = "{VIP}"
port = {APP_PORT}
interfaces = ["{LB_CLIENT_IFACE}", "{bridge}"]
health_check = {{ kind = "http", path = "/healthz", interval = "500ms" }}

[service.scaling]
min_replicas = 1
max_replicas = 1

[service.scaling.threshold]
up = {{ cpu = 60.0 }}
down = {{ cpu = 10.0 }}

[service.instances]
requests = {{ counter = 'demo_backend_requests_total{{route="/"}}' }}

[service.instances.process]
command = [{backend_bin:?}, "--listen", "{{addr}}", "--name", "{{name}}"]
port = 8080
bridge = "{bridge}"
prefix = "{prefix}"
stop_grace = "1s"
"#
    );
    topo.write_raw_config(&config);
    let metrics = SocketAddr::from(([127, 0, 0, 1], 9641));
    let mut args = topo.agent_args();
    args.metrics_address = Some(metrics);
    let agent = topo.start_agent_with(&args);

    // Everything that listens or asks from here on is in the LB namespace.
    let inside = topo.lb.enter().expect("enter the LB namespace");
    let alertmanager = start_alertmanager(
        "route:\n  receiver: test\n  group_wait: 1s\n  group_interval: 1s\nreceivers:\n  - name: test\n",
    );
    alertmanager.wait_ready();
    let prometheus_config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - lb-alerts.yml\n\
         alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{}']\n\
         scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{metrics}']\n",
        alertmanager.addr
    );
    let prometheus = start_prometheus(&prometheus_config, &[("lb-alerts.yml", &rules_for_test())]);
    prometheus.wait_ready();
    eprintln!("prometheus {} -> alertmanager {}, scraping {metrics}", prometheus.addr, alertmanager.addr);
    drop(inside);

    // Traffic through both services, so every counter has moved.
    let app = SocketAddrV4::new(VIP, APP_PORT);
    let vip = topo.vip_tcp();
    topo.client.run(|| {
        for _ in 0..5 {
            tcp_request(vip).expect("a request to web");
        }
        // The instance starts with the agent: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = lb_lab::http::get_ok(app, "/", Duration::from_secs(2)) {
            assert!(Instant::now() < deadline, "the app instance does not answer on {app}: {e}");
            std::thread::sleep(Duration::from_millis(200));
        }
    });

    let inside = topo.lb.enter().expect("enter the LB namespace");
    assert_eq!(query_one(&prometheus, &format!("up{{job=\"{JOB}\"}}")), 1.0);
    assert_eq!(query_one(&prometheus, r#"sum(lb_backend_state{service="web", state="active"})"#), 2.0);
    // Others may have fired while the agent was starting (no target yet,
    // the app's instance not ready); a backend down must not have.
    let early = alerts(&alertmanager).expect("alerts");
    assert!(!early.iter().any(|a| a["labels"]["alertname"] == "LbBackendDown"), "before any kill: {early:?}");
    eprintln!("agent scraped, both backends active after {:.1} s", started.elapsed().as_secs_f64());
    drop(inside);

    // Kill backend b: its listener closes, the health checks fail.
    let down = topo.backend("b").tcp_addr().to_string();
    topo.stop_backend("b");
    let killed = Instant::now();
    let inside = topo.lb.enter().expect("enter the LB namespace");
    let alert = alertmanager.wait_until("LbBackendDown in Alertmanager", || {
        let all = alerts(&alertmanager)?;
        all.iter()
            .find(|a| a["labels"]["alertname"] == "LbBackendDown" && a["labels"]["backend"] == down.as_str())
            .cloned()
            .ok_or_else(|| format!("alerts: {all:?}"))
    });
    eprintln!("LbBackendDown for {down} in Alertmanager {:.1} s after the kill", killed.elapsed().as_secs_f64());
    assert_eq!(alert["labels"]["service"], "web");
    assert_eq!(alert["labels"]["severity"], "warning");
    assert_eq!(alert["status"]["state"], "active");
    assert_eq!(alert["annotations"]["summary"], format!("Backend {down} of service web is down"));

    // Every panel's query has data (the instance's CPU and request rate
    // come with the agent's next samples of it).
    let queries = dashboard_queries();
    prometheus.wait_until("every dashboard query has data", || {
        let empty: Vec<String> = queries
            .iter()
            .filter_map(|(panel, expr)| match query(&prometheus, expr) {
                Ok(result) if !result.is_empty() => None,
                Ok(_) => Some(format!("{panel}: {expr}: no data")),
                Err(e) => Some(format!("{panel}: {e}")),
            })
            .collect();
        if empty.is_empty() {
            Ok(())
        } else {
            Err(format!("dashboard queries without data:\n{}", empty.join("\n")))
        }
    });
    eprintln!("{} dashboard queries, each with data", queries.len());
    drop((prometheus, alertmanager, inside));
    drop((agent, instances));
    eprintln!("root_backend_down_alert_reaches_alertmanager: {:.1} s", started.elapsed().as_secs_f64());
}
