//! Requests per second per instance, read off the instances' own Prometheus
//! endpoints: the one signal the data plane cannot count (a kept-alive
//! connection carries many requests; a new flow is not a request).
//!
//! `[service.instances.requests]` (`config::instances::RequestsMetric`)
//! names the counter, optionally with labels every counted series must
//! carry; matching series are summed, and the rate is the difference between
//! two scrapes over the time between them. The parsing is pure
//! ([`Selector::sum`]); [`scrape`] is the I/O.

use std::{net::SocketAddrV4, time::Duration};

use crate::adapters::http::{self, GetError};

use crate::config::instances::{parse_labels, Selector};

impl Selector {
    /// The sum of the matching series in a Prometheus text exposition;
    /// `None` when no series matches (the counter is missing, so no rate).
    pub fn sum(&self, exposition: &str) -> Option<f64> {
        let mut total = None;
        for line in exposition.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // What follows the series: the value, then an optional timestamp.
            let value = match line.find('{') {
                Some(open) if line[..open].trim() == self.name => {
                    // A malformed series is skipped, not the whole page.
                    let Some(close) = line.rfind('}').filter(|c| *c > open) else { continue };
                    let Some(labels) = parse_labels(&line[open + 1..close]) else { continue };
                    if !self.labels.iter().all(|want| labels.contains(want)) {
                        continue;
                    }
                    &line[close + 1..]
                }
                Some(_) => continue,
                None => match line.split_once(char::is_whitespace) {
                    Some((name, value)) if name == self.name && self.labels.is_empty() => value,
                    _ => continue,
                },
            };
            match value.split_whitespace().next().map(str::parse::<f64>) {
                Some(Ok(v)) if v.is_finite() => *total.get_or_insert(0.0) += v,
                _ => continue,
            }
        }
        total
    }
}

/// Requests per second from two readings of a counter; `None` across a
/// reset (the instance restarted) or without time between them.
pub fn rate(before: (f64, tokio::time::Instant), now: (f64, tokio::time::Instant)) -> Option<f64> {
    let dt = now.1.checked_duration_since(before.1)?.as_secs_f64();
    (dt > 0.0 && now.0 >= before.0).then(|| (now.0 - before.0) / dt)
}

/// Most of a metrics page read; the rest is left unread.
const MAX_PAGE: usize = 1 << 20;

/// GET `path` from `addr` (one connection) within `timeout`; the body of a
/// 200 answer, up to 1 MiB.
pub async fn scrape(addr: SocketAddrV4, path: &str, timeout: Duration) -> Result<String, GetError> {
    let body = http::get(addr.into(), path, 200, MAX_PAGE, timeout).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP demo_backend_requests_total Requests received, by route.
# TYPE demo_backend_requests_total counter
demo_backend_requests_total{route="/"} 120
demo_backend_requests_total{route="health"} 30
demo_backend_requests_total{route="/metrics"} 4
demo_backend_requests_total_other 9
plain_total 7 1700000000000
odd_total{path="a\"b,c",code="200"} 2
"#;

    fn sel(s: &str) -> Selector {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn sums_the_series_that_carry_every_label() {
        assert_eq!(sel("demo_backend_requests_total").sum(PAGE), Some(154.0));
        assert_eq!(sel(r#"demo_backend_requests_total{route="/"}"#).sum(PAGE), Some(120.0));
        assert_eq!(sel("plain_total").sum(PAGE), Some(7.0), "a timestamp after the value");
        assert_eq!(sel(r#"odd_total{path="a\"b,c"}"#).sum(PAGE), Some(2.0), "escapes and commas in values");
    }

    #[test]
    fn no_matching_series_is_no_reading() {
        assert_eq!(sel("missing_total").sum(PAGE), None);
        assert_eq!(sel(r#"demo_backend_requests_total{route="/nope"}"#).sum(PAGE), None);
        assert_eq!(sel(r#"plain_total{a="b"}"#).sum(PAGE), None);
    }

    #[test]
    fn rate_is_per_second_and_none_across_a_reset() {
        let t0 = tokio::time::Instant::now();
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(rate((100.0, t0), (120.0, t1)), Some(40.0));
        assert_eq!(rate((100.0, t0), (3.0, t1)), None, "the instance restarted");
        assert_eq!(rate((100.0, t0), (120.0, t0)), None);
    }

    #[tokio::test]
    async fn scrapes_a_real_http_answer() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else { unreachable!() };
        let server = tokio::spawn(async move {
            for status in ["200 OK", "404 Not Found"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap();
                assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /metrics HTTP/1.1\r\n"));
                s.write_all(format!("HTTP/1.0 {status}\r\nContent-Type: text/plain\r\n\r\n{PAGE}").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let body = scrape(addr, "/metrics", Duration::from_secs(2)).await.unwrap();
        assert_eq!(sel(r#"demo_backend_requests_total{route="/"}"#).sum(&body), Some(120.0));
        let err = scrape(addr, "/metrics", Duration::from_secs(2)).await.unwrap_err();
        assert!(err.to_string().contains("404"), "{err}");
        server.await.unwrap();
    }
}
