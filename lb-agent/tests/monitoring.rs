//! The shipped monitoring files (deploy/, README "Monitoring") query only
//! series the agent serves: a renamed or removed metric would otherwise
//! leave a panel empty or an alert that never fires, and promtool's own
//! tests (synthetic series) would not notice.
//!
//! Runs without root or Prometheus. `promtool check`/`test` and a real
//! Prometheus run in the root test `tests/tests/e2e_alerts.rs`.

use std::{collections::BTreeSet, fs, path::PathBuf};

use lb_agent::serve::metrics::series_names;
use serde_json::Value;

/// Series Prometheus makes itself for every target; the alerts and the
/// dashboard use `up` to tell whether the agent is scraped.
const SCRAPE_SERIES: [&str; 1] = ["up"];

fn deploy(path: &str) -> (PathBuf, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    (path, text)
}

fn known_series() -> BTreeSet<String> {
    series_names().into_iter().chain(SCRAPE_SERIES.map(str::to_owned)).collect()
}

/// Every `expr` string anywhere in `value`.
fn exprs_in_json(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(e)) => out.push(e.clone()),
                    _ => exprs_in_json(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| exprs_in_json(v, out)),
        _ => {}
    }
}

/// Every `expr:` of a rules file: inline, or a `|` block of the lines
/// indented deeper than the key.
fn exprs_in_rules(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else { continue };
        let rest = rest.trim();
        if rest != "|" {
            out.push(rest.to_owned());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let block: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
            .copied()
            .collect();
        out.push(block.join("\n"));
    }
    out
}

/// PromQL words that are not metric names: operators, modifiers, and the
/// aggregations (which may be followed by `by (...)` before their `(`).
const KEYWORDS: [&str; 24] = [
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The metric names a PromQL expression selects: identifiers outside
/// strings, label matchers `{...}`, ranges `[...]` and label lists, that
/// are neither keywords nor called as functions.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let skip_to = |from: usize, close: char| {
        let mut j = from;
        let mut quote = None;
        while j < chars.len() {
            match (quote, chars[j]) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), '\\') => j += 1,
                (None, '"' | '\'' | '`') => quote = Some(chars[j]),
                (None, c) if c == close => return j + 1,
                _ => {}
            }
            j += 1;
        }
        panic!("unclosed {close:?} in {expr}");
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '{' => i = skip_to(i + 1, '}'),
            '[' => i = skip_to(i + 1, ']'),
            '"' | '\'' | '`' => i = skip_to(i + 1, c),
            c if c.is_ascii_digit() => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let called = chars.get(next) == Some(&'(');
                if LABEL_LISTS.contains(&word.as_str()) && called {
                    i = skip_to(next + 1, ')');
                } else if !called && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                    names.push(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

/// Panics listing every expression that selects a series the agent does
/// not serve, or that selects none at all.
fn assert_known(what: &str, exprs: &[String]) {
    let known = known_series();
    let mut bad = Vec::new();
    for e in exprs {
        let names = metric_names(e);
        if names.is_empty() {
            bad.push(format!("{e:?} selects no metric"));
        }
        bad.extend(names.into_iter().filter(|n| !known.contains(n)).map(|n| format!("{n} in {e:?}")));
    }
    assert!(bad.is_empty(), "{what}: not served by lb-agent:\n{}\nserved: {known:?}", bad.join("\n"));
}

#[test]
fn metric_names_skip_functions_labels_and_ranges() {
    let expr = r#"sum by (service) (rate(lb_a_total{job="x", service=~"a}b"}[$__rate_interval] offset 5m))
        > on (job) group_left (version) 2 * lb_b / ignoring(x) absent(up{job="lb-agent"}) and bool 0.9"#;
    assert_eq!(metric_names(expr), ["lb_a_total", "lb_b", "up"]);
}

#[test]
fn dashboard_queries_only_served_series() {
    let (path, text) = deploy("grafana/lb-dashboard.json");
    let dashboard: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut exprs = Vec::new();
    exprs_in_json(&dashboard, &mut exprs);
    assert!(exprs.len() >= panels.len() / 2, "{}: only {} queries", path.display(), exprs.len());
    assert_known(&path.display().to_string(), &exprs);
    // Every panel but the rows has a query, and the ids are unique.
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate panel id in {p}");
        if p["type"] != "row" {
            assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()), "panel {} has no query", p["title"]);
        }
    }
}

#[test]
fn alert_rules_query_only_served_series() {
    let (path, text) = deploy("prometheus/lb-alerts.yml");
    let exprs = exprs_in_rules(&text);
    assert_eq!(exprs.len(), text.matches("- alert:").count(), "{}: one expr per alert", path.display());
    assert_known(&path.display().to_string(), &exprs);
}

#[test]
fn an_unknown_metric_is_reported() {
    let result = std::panic::catch_unwind(|| assert_known("test", &["rate(lb_no_such_total[1m])".to_owned()]));
    let message = *result.expect_err("an unknown metric must fail").downcast::<String>().expect("a message");
    assert!(message.contains("lb_no_such_total in"), "{message}");
}
