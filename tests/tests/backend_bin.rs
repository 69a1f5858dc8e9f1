//! The demo backend and the load generator as binaries, on 127.0.0.1 only
//! (no root needed): lb-backend's endpoints, keep-alive, its connection cap
//! and its SIGTERM drain; lb-load against it, with exact counts.
//!
//! `cargo test -p lb-tests --test backend_bin`

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use lb_lab::bins::built_bin;
use lb_load::{Report, TimePoint};

/// lb-backend and lb-load are crates of their own (tools/); cargo builds
/// them beside this test's binaries (`cargo xtask test` does).
fn backend_bin() -> PathBuf {
    built_bin("lb-backend", "LB_BACKEND_BIN")
}

fn load_bin() -> PathBuf {
    built_bin("lb-load", "LB_LOAD_BIN")
}

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// An lb-backend child on 127.0.0.1; SIGTERM, then SIGKILL, on drop.
struct Backend {
    child: Child,
    addr: SocketAddr,
    /// stdout after the first line, collected by a thread.
    rest: mpsc::Receiver<String>,
}

impl Backend {
    fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Backend {
        let mut child = Command::new(backend_bin())
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn lb-backend");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (first_tx, first_rx) = mpsc::channel();
        let (rest_tx, rest) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = first_tx.send(lines.next());
            for line in lines.map_while(Result::ok) {
                let _ = rest_tx.send(line);
            }
        });
        let first = match first_rx.recv_timeout(IO_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            other => {
                let _ = child.kill();
                panic!("lb-backend did not print its address: {other:?}");
            }
        };
        // "lb-backend NAME listening on ADDR (...)"
        let addr = first
            .split_whitespace()
            .skip_while(|w| *w != "on")
            .nth(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {first:?}"));
        Backend { child, addr, rest }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on the pid of a child this test spawned and has
        // not reaped yet, so the pid cannot have been reused.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill: {}", std::io::Error::last_os_error());
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn output_after_start(&self) -> Vec<String> {
        self.rest.try_iter().collect()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGTERM);
            if self.wait_exit(Duration::from_secs(6)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// A response: status, headers (lowercase names), body.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to lb-backend");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Reads one Content-Length response off `reader`.
fn read_response(reader: &mut BufReader<TcpStream>) -> Response {
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let mut parts = line.trim_end().splitn(3, ' ');
    // hyper answers an HTTP/1.0 request in HTTP/1.0.
    assert!(matches!(parts.next(), Some("HTTP/1.1" | "HTTP/1.0")), "status line {line:?}");
    let status = parts.next().and_then(|s| s.parse().ok()).expect("status code");
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header line");
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').expect("header has a colon");
        headers.push((n.to_ascii_lowercase(), v.trim().to_owned()));
    }
    let len: usize = headers.iter().find(|(n, _)| n == "content-length").expect("Content-Length").1.parse().unwrap();
    let mut body = vec![0; len];
    reader.read_exact(&mut body).expect("body");
    Response { status, headers, body: String::from_utf8(body).expect("UTF-8 body") }
}

/// One request on a fresh connection that asks to be closed.
fn get(addr: SocketAddr, path: &str) -> Response {
    let mut s = connect(addr);
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
    let mut reader = BufReader::new(s);
    let resp = read_response(&mut reader);
    assert_eq!(resp.header("connection"), Some("close"));
    assert_eq!(reader.read(&mut [0u8; 16]).unwrap(), 0, "closed after the answer");
    resp
}

fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
}

/// True once the peer has closed the connection (EOF or reset).
fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    stream.set_read_timeout(Some(timeout)).unwrap();
    match stream.read(&mut [0u8; 64]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

#[test]
fn backend_answers_root_health_and_metrics() {
    // Settings from the environment, as in a container.
    let backend = Backend::spawn(&[], &[("LB_BACKEND_NAME", "web-env"), ("LB_BACKEND_WORK_MS", "30")]);
    let addr = backend.addr;

    let started = Instant::now();
    let resp = get(addr, "/");
    assert_eq!((resp.status, resp.body.as_str()), (200, "web-env\n"));
    assert!(started.elapsed() >= Duration::from_millis(30), "30 ms of CPU take at least 30 ms");
    assert_eq!(resp.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(get(addr, "/?work_ms=0").body, "web-env\n");
    assert_eq!(get(addr, "/?work_ms=oops").status, 400);

    let health = get(addr, "/healthz");
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    assert_eq!(get(addr, "/nope").status, 404);

    let metrics = get(addr, "/metrics");
    assert_eq!(metrics.status, 200);
    assert_eq!(metrics.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    let body = &metrics.body;
    assert_eq!(metric(body, "demo_backend_requests_total{route=\"/\"}"), 3.0);
    assert_eq!(metric(body, "demo_backend_requests_total{route=\"health\"}"), 1.0);
    assert_eq!(metric(body, "demo_backend_requests_total{route=\"/metrics\"}"), 1.0);
    assert_eq!(metric(body, "demo_backend_requests_total{route=\"other\"}"), 1.0);
    assert_eq!(metric(body, "demo_backend_in_flight_requests"), 1.0, "the scrape itself");
    assert_eq!(metric(body, "demo_backend_work_ms"), 30.0);
    assert_eq!(metric(body, "demo_backend_up"), 1.0);
    assert!(metric(body, "demo_backend_cpu_seconds_total") >= 0.03, "{body}");
    let uptime = metric(body, "demo_backend_uptime_seconds");
    assert!(uptime > 0.0 && uptime < 60.0, "{uptime}");
}

#[test]
fn backend_keeps_connections_alive_until_asked_to_close() {
    let backend = Backend::spawn(&["--name", "web-ka", "--work-ms", "0"], &[]);
    let stream = connect(backend.addr);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for _ in 0..3 {
        writer.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let resp = read_response(&mut reader);
        assert_eq!((resp.status, resp.body.as_str()), (200, "web-ka\n"));
        assert_eq!(resp.header("connection"), Some("keep-alive"));
    }
    // Pipelined: two requests in one write, two answers in order.
    writer.write_all(b"GET /healthz HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut reader).status, 200);
    assert_eq!(read_response(&mut reader).status, 404);
    // A request body is read and skipped, not taken for the next request.
    writer.write_all(b"POST /nope HTTP/1.1\r\nContent-Length: 5\r\n\r\nGET /GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut reader).status, 404);
    assert_eq!(read_response(&mut reader).status, 200);
    writer.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut reader).header("connection"), Some("close"));
    assert_eq!(reader.read(&mut [0u8; 16]).unwrap(), 0);

    // HTTP/1.0 closes unless asked to keep alive.
    let mut s = connect(backend.addr);
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut reader = BufReader::new(s);
    assert_eq!(read_response(&mut reader).header("connection"), Some("close"));
    assert_eq!(reader.read(&mut [0u8; 16]).unwrap(), 0);

    // Garbage gets a 400 and a close.
    let mut s = connect(backend.addr);
    s.write_all(b"HELLO\r\n\r\n").unwrap();
    let mut reader = BufReader::new(s);
    assert_eq!(read_response(&mut reader).status, 400);
    assert_eq!(reader.read(&mut [0u8; 16]).unwrap(), 0);
}

#[test]
fn backend_over_its_connection_cap_answers_503() {
    let backend = Backend::spawn(&["--name", "web-cap", "--max-connections", "1"], &[]);
    let held = connect(backend.addr);
    // The first connection is counted once its thread runs; give it a moment.
    thread::sleep(Duration::from_millis(200));
    let mut s = connect(backend.addr);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let resp = read_response(&mut BufReader::new(s));
    assert_eq!((resp.status, resp.header("connection")), (503, Some("close")));
    drop(held);
    thread::sleep(Duration::from_millis(300));
    let metrics = get(backend.addr, "/metrics");
    assert_eq!(metric(&metrics.body, "demo_backend_rejected_connections_total"), 1.0);
}

#[test]
fn backend_finishes_in_flight_work_on_sigterm_and_exits_0() {
    let mut backend = Backend::spawn(&["--name", "web-term", "--work-ms", "0"], &[]);
    let addr = backend.addr;
    // An idle keep-alive connection, and one with a slow request running.
    let mut idle = connect(addr);
    idle.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut idle_reader = BufReader::new(idle.try_clone().unwrap());
    assert_eq!(read_response(&mut idle_reader).status, 200);
    let mut busy = connect(addr);
    busy.write_all(b"GET /?work_ms=600 HTTP/1.1\r\n\r\n").unwrap();
    thread::sleep(Duration::from_millis(150));

    let signalled = Instant::now();
    backend.signal(libc::SIGTERM);
    // The idle connection is closed promptly; the slow request still gets
    // its answer, marked as the last on its connection.
    assert!(closed_within(&mut idle, Duration::from_secs(2)), "idle keep-alive connection stays open");
    let resp = read_response(&mut BufReader::new(busy.try_clone().unwrap()));
    assert_eq!((resp.status, resp.body.as_str()), (200, "web-term\n"));
    assert_eq!(resp.header("connection"), Some("close"));
    let status = backend.wait_exit(Duration::from_secs(3)).expect("lb-backend exits after SIGTERM");
    assert!(status.success(), "{status}");
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let log = backend.output_after_start().join("\n");
    assert!(log.contains("shutting down") && log.contains("stopped after"), "{log}");
    // Nothing listens any more.
    let err = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect_err("the listener is closed");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
}

#[test]
fn backend_skips_work_for_clients_that_left() {
    let backend = Backend::spawn(&["--name", "web-q", "--cpu-workers", "1", "--work-ms", "0"], &[]);
    let mut holder = connect(backend.addr);
    holder.write_all(b"GET /?work_ms=400 HTTP/1.1\r\n\r\n").unwrap();
    thread::sleep(Duration::from_millis(100));
    // Queued behind the holder, then given up on by its client.
    let mut quitter = connect(backend.addr);
    quitter.write_all(b"GET /?work_ms=2000 HTTP/1.1\r\n\r\n").unwrap();
    thread::sleep(Duration::from_millis(100));
    drop(quitter);
    let started = Instant::now();
    assert_eq!(read_response(&mut BufReader::new(holder.try_clone().unwrap())).status, 200);
    // Had the 2 s of work run, this would queue behind it.
    let resp = get(backend.addr, "/?work_ms=1");
    assert_eq!(resp.status, 200);
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    let metrics = get(backend.addr, "/metrics");
    assert_eq!(metric(&metrics.body, "demo_backend_abandoned_requests_total"), 1.0);
}

#[test]
fn backend_exits_at_once_when_idle() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut backend = Backend::spawn(&["--name", "web-idle"], &[]);
        let started = Instant::now();
        backend.signal(sig);
        let status = backend.wait_exit(Duration::from_secs(3)).expect("exits");
        assert!(status.success(), "signal {sig}: {status}");
        assert!(started.elapsed() < Duration::from_millis(700), "signal {sig}: {:?}", started.elapsed());
    }
}

#[test]
fn backend_refuses_bad_settings() {
    for args in [&["--health-path", "healthz"][..], &["--work-ms", "100000"], &["--listen", "localhost:80"]] {
        let out = Command::new(backend_bin()).args(args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A path in the temp dir that is removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> TempFile {
        TempFile(std::env::temp_dir().join(format!("lb-tests-{}-{name}", std::process::id())))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run_load(args: &[&str]) -> (String, Report) {
    let json = TempFile::new("load.json");
    let out = Command::new(load_bin())
        .args(args)
        .arg("--json")
        .arg(&json.0)
        .stdin(Stdio::null())
        .output()
        .expect("run lb-load");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "lb-load failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&json.0).expect("lb-load wrote its JSON");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let report = Report {
        series: serde_json::from_value(doc["series"].clone()).expect("series"),
        summary: serde_json::from_value(doc["summary"].clone()).expect("summary"),
    };
    (stdout, report)
}

#[test]
fn load_follows_its_ramp_against_the_backend_and_counts_exactly() {
    let backend = Backend::spawn(&["--name", "web-load", "--work-ms", "1"], &[]);
    let target = backend.addr.to_string();
    let svg = TempFile::new("load.svg");
    let csv = TempFile::new("load.csv");
    let svg_path = svg.0.to_str().unwrap();
    let csv_path = csv.0.to_str().unwrap();
    let (stdout, report) = run_load(&[
        "--target",
        &target,
        "--ramp",
        "0s:20,2s:60",
        "--duration",
        "3s",
        "--svg",
        svg_path,
        "--csv",
        csv_path,
    ]);
    report.assert_consistent();
    // 20 -> 60 over 2 s is 80 requests, then 60 in the third second.
    let offered: Vec<u64> = report.series.iter().map(|p: &TimePoint| p.offered).collect();
    assert_eq!(offered.iter().sum::<u64>(), 140, "{offered:?}");
    assert_eq!(offered.len(), 3);
    assert!((offered[0] as i64 - 30).abs() <= 1 && (offered[1] as i64 - 50).abs() <= 1, "{offered:?}");
    assert_eq!(offered[2], 60);
    let s = &report.summary;
    assert_eq!((s.ok, s.failed), (140, 0), "{:?}", s.first_errors);
    assert_eq!(s.backends.get("web-load"), Some(&140));
    assert!(s.latency.p50_ms.is_some_and(|v| v >= 1.0), "{:?}", s.latency);
    assert!(stdout.contains("web-load=") && stdout.contains("(availability)"), "{stdout}");
    assert!(std::fs::read_to_string(&svg.0).unwrap().starts_with("<svg"));
    assert_eq!(std::fs::read_to_string(&csv.0).unwrap().lines().count(), 4);

    let metrics = get(backend.addr, "/metrics");
    assert_eq!(metric(&metrics.body, "demo_backend_requests_total{route=\"/\"}"), 140.0);
}

#[test]
fn load_counts_refused_connections_exactly() {
    // A port that was free a moment ago: every request is refused.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (_, report) = run_load(&["--target", &free, "--rate", "25", "--duration", "2s", "--timeout", "500ms"]);
    report.assert_consistent();
    let s = &report.summary;
    assert_eq!((s.offered, s.failures.refused, s.availability), (50, 50, 0.0));
}

#[test]
fn load_closed_loop_with_keep_alive() {
    let backend = Backend::spawn(&["--name", "web-cl", "--work-ms", "0"], &[]);
    let target = backend.addr.to_string();
    let (_, report) = run_load(&["--target", &target, "--concurrency", "4", "--duration", "2s", "--keep-alive"]);
    report.assert_consistent();
    let s = &report.summary;
    assert!(s.ok > 100, "{s:?}");
    assert_eq!(s.failed, 0);
    // Four clients, four connections (and a fifth for this scrape).
    let metrics = get(backend.addr, "/metrics");
    assert_eq!(metric(&metrics.body, "demo_backend_requests_total{route=\"/\"}"), s.ok as f64);
    assert_eq!(metric(&metrics.body, "demo_backend_connections_total"), 5.0);
}
