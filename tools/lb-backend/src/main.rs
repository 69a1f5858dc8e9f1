//! lb-backend: the demo backend behind the load balancer. A small HTTP/1.1
//! server on std threads that burns a configurable amount of CPU per request,
//! so that load on it shows up as CPU (what the seeds' autoscalers measure),
//! answers with its own name (so a client sees which backend served it), and
//! exposes Prometheus metrics.
//!
//! - `GET /` burns `--work-ms` of this thread's CPU time (`?work_ms=N`
//!   overrides it per request), then answers `200` with `<name>\n`.
//! - `GET /healthz` (`--health-path`) answers `200 ok`, or `503` once
//!   shutting down.
//! - `GET /metrics`: requests by route, in-flight requests, CPU seconds,
//!   uptime, open and rejected connections.
//!
//! One thread per connection, at most `--max-connections` of them; a
//! connection over the cap gets a `503` and is closed. At most
//! `--cpu-workers` requests burn CPU at once (default: the CPUs this process
//! may use), the others queue: an overloaded backend keeps serving at its
//! capacity, with growing latency, instead of slowing every request down at
//! once. Health checks and scrapes never queue behind the work.
//!
//! SIGTERM or SIGINT: stop accepting, fail health checks, let in-flight
//! requests finish (at most `--drain-timeout-ms`), close idle keep-alive
//! connections, exit 0. So `docker stop` returns at once, also when this runs
//! as PID 1 (which the kernel spares signals it has no handler for).
//!
//! Builds as a fully static binary for a `FROM scratch` image:
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p lb-tests
//! --bin lb-backend --target x86_64-unknown-linux-gnu`. It needs no /etc
//! files and no DNS: the listen address is a literal, the name comes from
//! gethostname(2).

use std::{
    fmt::Write as _,
    io::{self, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Condvar, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Parser;

/// The demo backend: an HTTP/1.1 server that burns CPU per request and
/// answers with its name.
#[derive(Parser, Debug)]
#[command(name = "lb-backend")]
struct Cli {
    /// Address to listen on (port 0 picks a free port; the chosen address is
    /// printed on the first line of stdout).
    #[arg(long, env = "LB_BACKEND_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// The name `GET /` answers with [default: the hostname].
    #[arg(long, env = "LB_BACKEND_NAME")]
    name: Option<String>,
    /// CPU time burned per `GET /`, in milliseconds (`?work_ms=N` overrides).
    #[arg(long, env = "LB_BACKEND_WORK_MS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=MAX_WORK_MS))]
    work_ms: u64,
    /// Path of the health check.
    #[arg(long, env = "LB_BACKEND_HEALTH_PATH", default_value = "/healthz", value_parser = parse_health_path)]
    health_path: String,
    /// Most connections served at once; more are answered `503` and closed.
    #[arg(long, env = "LB_BACKEND_MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=65_536))]
    max_connections: u64,
    /// Most requests burning CPU at once [default: the CPUs this process may use].
    #[arg(long, env = "LB_BACKEND_CPU_WORKERS", value_parser = clap::value_parser!(u64).range(1..=1024))]
    cpu_workers: Option<u64>,
    /// On SIGTERM, how long in-flight requests get to finish.
    #[arg(long, env = "LB_BACKEND_DRAIN_TIMEOUT_MS", default_value_t = 5000)]
    drain_timeout_ms: u64,
}

/// Upper bound for `--work-ms` and `?work_ms=`: every request stays bounded.
const MAX_WORK_MS: u64 = 10_000;
/// How often blocked threads look at the shutdown flag.
const POLL: Duration = Duration::from_millis(100);
/// An idle keep-alive connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A request head must arrive completely within this long.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Request heads larger than this are refused (431).
const MAX_HEAD: usize = 16 * 1024;
/// Request bodies larger than this are refused (413); the endpoints take none.
const MAX_BODY: usize = 1024 * 1024;
/// Longest name put in a response (names come from flags or the hostname).
const MAX_NAME: usize = 253;

fn parse_health_path(s: &str) -> Result<String, String> {
    if s.starts_with('/') && !s.contains('?') && s != "/" && s != "/metrics" {
        Ok(s.to_owned())
    } else {
        Err("must start with '/', have no query, and not be / or /metrics".into())
    }
}

// ---------------------------------------------------------------------------
// Signals

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> anyhow::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; the sigaction struct is fully initialised.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            bail!("sigaction({sig}): {}", io::Error::last_os_error());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Requests

#[derive(Clone, Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
    query: Option<String>,
    /// HTTP/1.`minor_version`.
    minor_version: u8,
    /// Whether the connection stays open after the answer: HTTP/1.1 unless
    /// `Connection: close`, HTTP/1.0 only with `Connection: keep-alive`.
    keep_alive: bool,
    content_length: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ParseError {
    HeadTooLarge,
    BadRequestLine,
    UnsupportedVersion,
    BadHeader,
    BadContentLength,
    BodyTooLarge,
    /// Chunked request bodies are not supported (no endpoint takes a body).
    TransferEncoding,
}

impl ParseError {
    fn status(self) -> (u16, &'static str) {
        match self {
            ParseError::HeadTooLarge => (431, "Request Header Fields Too Large"),
            ParseError::UnsupportedVersion => (505, "HTTP Version Not Supported"),
            ParseError::BodyTooLarge => (413, "Content Too Large"),
            ParseError::TransferEncoding => (501, "Not Implemented"),
            ParseError::BadRequestLine | ParseError::BadHeader | ParseError::BadContentLength => (400, "Bad Request"),
        }
    }
}

/// Parses one request head from the start of `buf`. `Ok(None)`: incomplete,
/// read more. `Ok(Some((request, n)))`: the head took `n` bytes; the body
/// (`request.content_length` bytes) follows.
fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, ParseError> {
    // RFC 9112 2.2: a server should ignore empty lines before a request line.
    let skip = buf.iter().take_while(|&&b| b == b'\r' || b == b'\n').count();
    let Some(head_len) = find_head_end(&buf[skip..]) else {
        return if buf.len() > MAX_HEAD { Err(ParseError::HeadTooLarge) } else { Ok(None) };
    };
    if head_len > MAX_HEAD {
        return Err(ParseError::HeadTooLarge);
    }
    let head = std::str::from_utf8(&buf[skip..skip + head_len]).map_err(|_| ParseError::BadHeader)?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().ok_or(ParseError::BadRequestLine)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::BadRequestLine);
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) || target.is_empty() {
        return Err(ParseError::BadRequestLine);
    }
    let minor_version = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        v if v.starts_with("HTTP/") => return Err(ParseError::UnsupportedVersion),
        _ => return Err(ParseError::BadRequestLine),
    };
    let (path, query) = match origin_form(target).split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (origin_form(target), None),
    };

    let mut close = false;
    let mut keep_alive = false;
    let mut content_length: Option<usize> = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or(ParseError::BadHeader)?;
        if name.is_empty() || name.contains([' ', '\t']) {
            return Err(ParseError::BadHeader);
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.parse().map_err(|_| ParseError::BadContentLength)?;
            // RFC 9112 6.3: differing lengths are an error, not a choice.
            if content_length.is_some_and(|old| old != n) {
                return Err(ParseError::BadContentLength);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ParseError::TransferEncoding);
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY {
        return Err(ParseError::BodyTooLarge);
    }
    let keep_alive = !close && (minor_version == 1 || keep_alive);
    let request =
        Request { method: method.to_owned(), path: path.to_owned(), query, minor_version, keep_alive, content_length };
    Ok(Some((request, skip + head_len)))
}

/// Length of the head including its blank line, if `buf` holds all of it.
/// Accepts bare LF line ends as well as CRLF (RFC 9112 2.2).
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let limit = buf.len().min(MAX_HEAD + 4);
    (0..limit).find_map(|i| {
        if buf[i..].starts_with(b"\n\r\n") {
            Some(i + 3)
        } else if buf[i..].starts_with(b"\n\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// `http://host/path?q` (absolute form, as proxies send) -> `/path?q`.
fn origin_form(target: &str) -> &str {
    match target.strip_prefix("http://").or_else(|| target.strip_prefix("https://")) {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    }
}

/// The value of `key` in a query string (`a=1&work_ms=5`).
fn query_param<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?.split('&').find_map(|kv| match kv.split_once('=') {
        Some((k, v)) if k == key => Some(v),
        _ => None,
    })
}

// ---------------------------------------------------------------------------
// The handler

#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    extra_headers: Vec<(&'static str, String)>,
    body: String,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            extra_headers: Vec::new(),
            body: body.into(),
        }
    }
}

/// The routes `/metrics` counts requests by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Work,
    Health,
    Metrics,
    Other,
}

impl Route {
    const ALL: [Route; 4] = [Route::Work, Route::Health, Route::Metrics, Route::Other];

    fn label(self) -> &'static str {
        match self {
            Route::Work => "/",
            Route::Health => "health",
            Route::Metrics => "/metrics",
            Route::Other => "other",
        }
    }
}

/// Everything the connection threads share.
struct Server {
    name: String,
    work_ms: u64,
    health_path: String,
    started: Instant,
    shutting_down: AtomicBool,
    /// Requests between parsed and answered.
    in_flight: AtomicU64,
    /// Requests waiting for a CPU permit.
    queued: AtomicU64,
    /// Requests dropped because their client left while they queued.
    abandoned: AtomicU64,
    requests: [AtomicU64; Route::ALL.len()],
    connections_open: AtomicUsize,
    connections_served: AtomicU64,
    connections_rejected: AtomicU64,
    cpu: CpuPermits,
}

impl Server {
    fn new(name: String, work_ms: u64, health_path: String, cpu_workers: usize) -> Server {
        Server {
            name,
            work_ms,
            health_path,
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            requests: Default::default(),
            connections_open: AtomicUsize::new(0),
            connections_served: AtomicU64::new(0),
            connections_rejected: AtomicU64::new(0),
            cpu: CpuPermits::new(cpu_workers),
        }
    }

    fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    fn route(&self, path: &str) -> Route {
        match path {
            "/" => Route::Work,
            "/metrics" => Route::Metrics,
            p if p == self.health_path => Route::Health,
            _ => Route::Other,
        }
    }
}

/// Answers one request. `None`: the client went away while the request
/// waited for a CPU worker, so it gets no answer and costs no work.
fn handle(req: &Request, server: &Server, client_gone: &dyn Fn() -> bool) -> Option<Response> {
    let route = server.route(&req.path);
    server.requests[route as usize].fetch_add(1, Ordering::Relaxed);
    if route != Route::Other && req.method != "GET" && req.method != "HEAD" {
        let mut resp = Response::text(405, "Method Not Allowed", "only GET and HEAD\n");
        resp.extra_headers.push(("Allow", "GET, HEAD".into()));
        return Some(resp);
    }
    Some(match route {
        Route::Work => {
            let work_ms = match query_param(req.query.as_deref(), "work_ms") {
                None => server.work_ms,
                Some(v) => match v.parse::<u64>() {
                    Ok(ms) if ms <= MAX_WORK_MS => ms,
                    _ => {
                        return Some(Response::text(400, "Bad Request", format!("work_ms must be 0..={MAX_WORK_MS}\n")))
                    }
                },
            };
            if work_ms > 0 {
                server.queued.fetch_add(1, Ordering::Relaxed);
                let permit = server.cpu.acquire();
                server.queued.fetch_sub(1, Ordering::Relaxed);
                // Under overload a request can wait longer than its client
                // does; burning CPU for nobody would starve the requests
                // still wanted (what nginx logs as 499).
                if client_gone() {
                    server.abandoned.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                burn_cpu(Duration::from_millis(work_ms));
                drop(permit);
            }
            Response::text(200, "OK", format!("{}\n", server.name))
        }
        Route::Health if server.shutting_down() => Response::text(503, "Service Unavailable", "shutting down\n"),
        Route::Health => Response::text(200, "OK", "ok\n"),
        Route::Metrics => {
            let mut resp = Response::text(200, "OK", render_metrics(server, process_cpu_seconds()));
            resp.content_type = "text/plain; version=0.0.4; charset=utf-8";
            resp
        }
        Route::Other => Response::text(404, "Not Found", "not found\n"),
    })
}

/// True when the client has closed its side (or reset): a non-blocking
/// peek sees EOF or an error instead of "no data yet".
fn peer_closed(stream: &TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv writes at most one byte into `byte`; MSG_PEEK leaves the
    // data queued and MSG_DONTWAIT keeps the call from blocking.
    let n = unsafe { libc::recv(stream.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => !matches!(io::Error::last_os_error().kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
    }
}

/// Prometheus text exposition of the server's counters. Names start with
/// `demo_backend_`: `lb_backend_*` belongs to lb-agent, and one Prometheus
/// may scrape both.
fn render_metrics(server: &Server, cpu_seconds: f64) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let requests: Vec<_> = Route::ALL
        .iter()
        .map(|r| {
            (format!("{{route=\"{}\"}}", r.label()), server.requests[*r as usize].load(Ordering::Relaxed).to_string())
        })
        .collect();
    family("demo_backend_requests_total", "counter", "Requests received, by route.", &requests);
    let gauge = |v: u64| vec![(String::new(), v.to_string())];
    family(
        "demo_backend_in_flight_requests",
        "gauge",
        "Requests received and not yet answered.",
        &gauge(server.in_flight.load(Ordering::Relaxed)),
    );
    family(
        "demo_backend_queued_requests",
        "gauge",
        "Requests waiting for a CPU worker.",
        &gauge(server.queued.load(Ordering::Relaxed)),
    );
    family(
        "demo_backend_abandoned_requests_total",
        "counter",
        "Requests dropped unanswered because the client closed the connection while they waited for a CPU worker.",
        &gauge(server.abandoned.load(Ordering::Relaxed)),
    );
    family(
        "demo_backend_cpu_workers",
        "gauge",
        "Requests that may burn CPU at once.",
        &gauge(server.cpu.capacity as u64),
    );
    family("demo_backend_work_ms", "gauge", "CPU milliseconds GET / burns by default.", &gauge(server.work_ms));
    family(
        "demo_backend_cpu_seconds_total",
        "counter",
        "User and system CPU time this process has used (getrusage).",
        &[(String::new(), format!("{cpu_seconds:.6}"))],
    );
    family(
        "demo_backend_uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        &[(String::new(), format!("{:.3}", server.started.elapsed().as_secs_f64()))],
    );
    family(
        "demo_backend_open_connections",
        "gauge",
        "Client connections open now.",
        &gauge(server.connections_open.load(Ordering::Relaxed) as u64),
    );
    family(
        "demo_backend_connections_total",
        "counter",
        "Connections accepted and served (new connections per second, as a rate).",
        &gauge(server.connections_served.load(Ordering::Relaxed)),
    );
    family(
        "demo_backend_rejected_connections_total",
        "counter",
        "Connections answered 503 because --max-connections were open.",
        &gauge(server.connections_rejected.load(Ordering::Relaxed)),
    );
    family(
        "demo_backend_up",
        "gauge",
        "0 once the server is shutting down.",
        &gauge(u64::from(!server.shutting_down())),
    );
    out
}

/// User plus system CPU time of the whole process.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the zeroed struct we pass.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return f64::NAN;
        }
        usage
    };
    let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only the timespec we pass; this clock
    // exists on every Linux since 2.6.12.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Busy-loops until this thread has used `amount` more CPU time. CPU time,
/// not wall time: a request costs the same CPU however busy the machine is,
/// as real work would, and contention shows up as latency.
fn burn_cpu(amount: Duration) {
    let until = thread_cpu_time() + amount;
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    while thread_cpu_time() < until {
        for _ in 0..1000 {
            // xorshift: cheap work the optimiser cannot remove.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
        }
        std::hint::black_box(x);
    }
}

/// A first-come, first-served counting semaphore for the CPU-burning part
/// of requests. FIFO so that queueing delay is fair and bounded by the
/// queue ahead, as in a real server's worker queue.
struct CpuPermits {
    capacity: usize,
    state: Mutex<PermitState>,
    changed: Condvar,
}

struct PermitState {
    free: usize,
    /// The ticket the next caller draws.
    next_ticket: u64,
    /// The ticket whose turn it is.
    serving: u64,
}

struct Permit<'a>(&'a CpuPermits);

impl CpuPermits {
    fn new(capacity: usize) -> CpuPermits {
        CpuPermits {
            capacity,
            state: Mutex::new(PermitState { free: capacity, next_ticket: 0, serving: 0 }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PermitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn acquire(&self) -> Permit<'_> {
        let mut st = self.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        while !(st.serving == ticket && st.free > 0) {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.serving += 1;
        st.free -= 1;
        drop(st);
        // The next ticket may go too if another permit is free.
        self.changed.notify_all();
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.lock().free += 1;
        self.0.changed.notify_all();
    }
}

// ---------------------------------------------------------------------------
// Connections

fn write_response(stream: &mut impl Write, resp: &Response, close: bool, head_only: bool) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        resp.status,
        resp.reason,
        resp.content_type,
        resp.body.len()
    );
    for (name, value) in &resp.extra_headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.push_str(if close { "Connection: close\r\n\r\n" } else { "Connection: keep-alive\r\n\r\n" });
    if !head_only {
        out.push_str(&resp.body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

/// Serves requests on one connection until the client closes it, asks to
/// close it, goes idle too long, or the server shuts down.
fn serve_connection(mut stream: TcpStream, server: &Server) -> io::Result<()> {
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut idle_since = Instant::now();
    let mut head_started: Option<Instant> = None;
    loop {
        match parse_request(&buf) {
            Ok(Some((req, head_len))) if buf.len() >= head_len + req.content_length => {
                buf.drain(..head_len + req.content_length);
                server.in_flight.fetch_add(1, Ordering::SeqCst);
                let Some(resp) = handle(&req, server, &|| peer_closed(&stream)) else {
                    server.in_flight.fetch_sub(1, Ordering::SeqCst);
                    return Ok(());
                };
                // Checked after the work: a request that was running when
                // SIGTERM came is answered with `Connection: close`.
                let close = !req.keep_alive || server.shutting_down();
                let written = write_response(&mut stream, &resp, close, req.method == "HEAD");
                server.in_flight.fetch_sub(1, Ordering::SeqCst);
                written?;
                if close {
                    return stream.shutdown(Shutdown::Write);
                }
                idle_since = Instant::now();
                head_started = None;
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                let (status, reason) = e.status();
                let resp = Response::text(status, reason, format!("{e:?}\n"));
                write_response(&mut stream, &resp, true, false)?;
                return stream.shutdown(Shutdown::Write);
            }
        }
        if buf.is_empty() && (server.shutting_down() || idle_since.elapsed() > IDLE_TIMEOUT) {
            return Ok(());
        }
        if head_started.is_some_and(|t| t.elapsed() > HEAD_TIMEOUT) {
            let resp = Response::text(408, "Request Timeout", "request timeout\n");
            write_response(&mut stream, &resp, true, false)?;
            return stream.shutdown(Shutdown::Write);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                head_started.get_or_insert_with(Instant::now);
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Over the connection cap: answer 503 without a thread and close.
fn reject_connection(mut stream: TcpStream) {
    let resp = Response::text(503, "Service Unavailable", "too many connections\n");
    // Best effort, bounded: a client that does not read its answer must not
    // stall the accept loop. Reading the request first (if it is there)
    // keeps the close from turning into a reset that would hide the 503.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = stream.read(&mut [0u8; 4096]);
    let _ = write_response(&mut stream, &resp, true, false);
    let _ = stream.shutdown(Shutdown::Write);
}

/// poll(2) for a pending connection, at most `timeout`.
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
    n > 0
}

fn accept_loop(listener: &TcpListener, server: &Arc<Server>, max_connections: usize) {
    while !STOP.load(Ordering::SeqCst) {
        if !wait_readable(listener, POLL) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => continue,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("lb-backend: accept: {e}");
                thread::sleep(POLL);
                continue;
            }
        };
        if server.connections_open.load(Ordering::SeqCst) >= max_connections {
            server.connections_rejected.fetch_add(1, Ordering::Relaxed);
            reject_connection(stream);
            continue;
        }
        server.connections_open.fetch_add(1, Ordering::SeqCst);
        server.connections_served.fetch_add(1, Ordering::Relaxed);
        let conn_server = Arc::clone(server);
        let spawned = thread::Builder::new().name("conn".into()).stack_size(256 * 1024).spawn(move || {
            if let Err(e) = serve_connection(stream, &conn_server) {
                // A client that leaves first is no error of ours.
                let gone = [ErrorKind::ConnectionReset, ErrorKind::BrokenPipe, ErrorKind::NotConnected];
                if !gone.contains(&e.kind()) && e.kind() != ErrorKind::WouldBlock {
                    eprintln!("lb-backend: connection: {e}");
                }
            }
            conn_server.connections_open.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            // The closure (and the stream in it) is gone: undo the count.
            server.connections_open.fetch_sub(1, Ordering::SeqCst);
            eprintln!("lb-backend: cannot spawn a connection thread: {e}");
        }
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if rc == 0 && !name.is_empty() => name.to_owned(),
        _ => "lb-backend".to_owned(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-backend: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let name = cli.name.unwrap_or_else(hostname);
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        bail!("--name must be 1..={MAX_NAME} bytes without control characters");
    }
    let cpu_workers = match cli.cpu_workers {
        Some(n) => n as usize,
        None => thread::available_parallelism().map_or(1, |n| n.get()),
    };
    install_signal_handlers()?;
    let listener = TcpListener::bind(cli.listen).with_context(|| format!("listen on {}", cli.listen))?;
    listener.set_nonblocking(true).context("make the listener non-blocking")?;
    let local = listener.local_addr().context("listener address")?;
    let server = Arc::new(Server::new(name, cli.work_ms, cli.health_path, cpu_workers));
    // The first line is the contract with scripts and tests: the address.
    println!(
        "lb-backend {} listening on {local} (work {} ms, {cpu_workers} CPU workers, health {})",
        server.name, server.work_ms, server.health_path
    );

    accept_loop(&listener, &server, cli.max_connections as usize);

    server.shutting_down.store(true, Ordering::SeqCst);
    drop(listener);
    let open = server.connections_open.load(Ordering::SeqCst);
    println!("lb-backend {}: shutting down, {open} connections open", server.name);
    let drain = Duration::from_millis(cli.drain_timeout_ms);
    let started = Instant::now();
    while server.connections_open.load(Ordering::SeqCst) > 0 && started.elapsed() < drain {
        thread::sleep(Duration::from_millis(10));
    }
    let left = server.in_flight.load(Ordering::SeqCst);
    if left > 0 {
        println!("lb-backend {}: gave up after {drain:?} with {left} requests in flight", server.name);
    } else {
        println!("lb-backend {}: stopped after {} ms", server.name, started.elapsed().as_millis());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<(Request, usize)>, ParseError> {
        parse_request(s.as_bytes())
    }

    fn parsed(s: &str) -> Request {
        let (req, n) = parse(s).unwrap().unwrap();
        assert_eq!(n, s.len(), "the whole head is consumed");
        req
    }

    fn server() -> Server {
        Server::new("web-1".into(), 0, "/healthz".into(), 1)
    }

    fn answer(req: &Request, server: &Server) -> Response {
        handle(req, server, &|| false).expect("an answer")
    }

    fn get(path: &str) -> Request {
        parsed(&format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
    }

    #[test]
    fn simple_get_keeps_alive_by_default() {
        let req = get("/");
        assert_eq!(
            req,
            Request {
                method: "GET".into(),
                path: "/".into(),
                query: None,
                minor_version: 1,
                keep_alive: true,
                content_length: 0,
            }
        );
    }

    #[test]
    fn incomplete_head_asks_for_more() {
        assert_eq!(parse(""), Ok(None));
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(parse("GET / HTTP/1.1\r\nHost: x\r\n\r"), Ok(None));
    }

    #[test]
    fn connection_header_decides_keep_alive() {
        assert!(!parsed("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!parsed("GET / HTTP/1.1\r\nconnection: Upgrade, CLOSE\r\n\r\n").keep_alive);
        assert!(!parsed("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(parsed("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(parsed("GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n").keep_alive);
    }

    #[test]
    fn query_and_absolute_form_are_split() {
        let req = get("/?work_ms=5&x=1");
        assert_eq!((req.path.as_str(), req.query.as_deref()), ("/", Some("work_ms=5&x=1")));
        assert_eq!(query_param(req.query.as_deref(), "work_ms"), Some("5"));
        assert_eq!(query_param(req.query.as_deref(), "y"), None);
        assert_eq!(get("http://10.0.0.1:8080/healthz").path, "/healthz");
        assert_eq!(get("http://10.0.0.1:8080").path, "/");
    }

    #[test]
    fn bare_lf_and_leading_blank_lines_are_accepted() {
        assert_eq!(parsed("GET /metrics HTTP/1.1\nHost: x\n\n").path, "/metrics");
        let input = "\r\nGET / HTTP/1.1\r\n\r\n";
        let (req, n) = parse(input).unwrap().unwrap();
        assert_eq!((req.path.as_str(), n), ("/", input.len()));
    }

    #[test]
    fn pipelined_requests_parse_one_at_a_time() {
        let two = "GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        let (first, n) = parse(two).unwrap().unwrap();
        assert_eq!(first.path, "/a");
        let (second, m) = parse(&two[n..]).unwrap().unwrap();
        assert_eq!((second.path.as_str(), n + m), ("/b", two.len()));
    }

    #[test]
    fn content_length_is_read() {
        let head = "POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n";
        let (req, n) = parse(&format!("{head}abc")).unwrap().unwrap();
        assert_eq!((req.content_length, n), (3, head.len()));
        assert_eq!(
            parse("POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 3\r\n\r\n")
                .unwrap()
                .unwrap()
                .0
                .content_length,
            3
        );
    }

    #[test]
    fn malformed_requests_are_refused() {
        let cases = [
            ("GET /\r\n\r\n", ParseError::BadRequestLine),
            ("GET  / HTTP/1.1\r\n\r\n", ParseError::BadRequestLine),
            ("get / HTTP/1.1\r\n\r\n", ParseError::BadRequestLine),
            ("GET / HTTP/2.0\r\n\r\n", ParseError::UnsupportedVersion),
            ("GET / FTP/1.1\r\n\r\n", ParseError::BadRequestLine),
            ("GET / HTTP/1.1\r\nno colon\r\n\r\n", ParseError::BadHeader),
            ("GET / HTTP/1.1\r\nHost : x\r\n\r\n", ParseError::BadHeader),
            ("GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", ParseError::BadContentLength),
            ("GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", ParseError::BadContentLength),
            ("GET / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", ParseError::BodyTooLarge),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", ParseError::TransferEncoding),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input), Err(want), "{input:?}");
        }
        let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse(&huge), Err(ParseError::HeadTooLarge));
        assert_eq!(parse(&format!("{huge}\r\n")), Err(ParseError::HeadTooLarge));
    }

    #[test]
    fn root_answers_with_the_name() {
        let s = server();
        let resp = answer(&get("/"), &s);
        assert_eq!((resp.status, resp.body.as_str()), (200, "web-1\n"));
        assert_eq!(s.requests[Route::Work as usize].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn work_ms_burns_cpu_time() {
        let s = server();
        let before = thread_cpu_time();
        let resp = answer(&get("/?work_ms=30"), &s);
        assert_eq!(resp.status, 200);
        assert!(thread_cpu_time() - before >= Duration::from_millis(30));
        assert_eq!(answer(&get("/?work_ms=lots"), &s).status, 400);
        assert_eq!(answer(&get(&format!("/?work_ms={}", MAX_WORK_MS + 1)), &s).status, 400);
    }

    #[test]
    fn work_for_a_departed_client_is_skipped() {
        let s = Server::new("web-1".into(), 50, "/healthz".into(), 1);
        let before = thread_cpu_time();
        assert_eq!(handle(&get("/"), &s, &|| true), None);
        assert!(thread_cpu_time() - before < Duration::from_millis(50));
        assert_eq!(s.abandoned.load(Ordering::Relaxed), 1);
        assert_eq!(answer(&get("/healthz"), &s).status, 200, "only work is skipped");
    }

    #[test]
    fn health_fails_once_shutting_down() {
        let s = server();
        assert_eq!(answer(&get("/healthz"), &s).status, 200);
        s.shutting_down.store(true, Ordering::SeqCst);
        assert_eq!(answer(&get("/healthz"), &s).status, 503);
        assert_eq!(answer(&get("/"), &s).status, 200, "in-flight work still completes");
    }

    #[test]
    fn custom_health_path_and_unknown_paths() {
        let s = Server::new("b".into(), 0, "/ready".into(), 1);
        assert_eq!(answer(&get("/ready"), &s).status, 200);
        assert_eq!(answer(&get("/healthz"), &s).status, 404);
        let post = parsed("POST /metrics HTTP/1.1\r\n\r\n");
        let resp = answer(&post, &s);
        assert_eq!(resp.status, 405);
        assert_eq!(resp.extra_headers, [("Allow", "GET, HEAD".to_owned())]);
    }

    #[test]
    fn metrics_count_requests_by_route() {
        let s = server();
        for path in ["/", "/", "/healthz", "/nope"] {
            answer(&get(path), &s);
        }
        let resp = answer(&get("/metrics"), &s);
        assert_eq!(resp.status, 200);
        assert!(resp.content_type.starts_with("text/plain; version=0.0.4"));
        for line in [
            "demo_backend_requests_total{route=\"/\"} 2",
            "demo_backend_requests_total{route=\"health\"} 1",
            "demo_backend_requests_total{route=\"/metrics\"} 1",
            "demo_backend_requests_total{route=\"other\"} 1",
            "# TYPE demo_backend_cpu_seconds_total counter",
            "demo_backend_up 1",
        ] {
            assert!(resp.body.lines().any(|l| l == line), "missing {line:?} in\n{}", resp.body);
        }
        let cpu = resp.body.lines().find_map(|l| l.strip_prefix("demo_backend_cpu_seconds_total ")).unwrap();
        assert!(cpu.parse::<f64>().unwrap() > 0.0);
    }

    #[test]
    fn responses_carry_length_and_connection() {
        let mut out = Vec::new();
        write_response(&mut out, &Response::text(200, "OK", "web-1\n"), false, false).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 6\r\n\
             Connection: keep-alive\r\n\r\nweb-1\n"
        );
        let mut out = Vec::new();
        write_response(&mut out, &Response::text(200, "OK", "web-1\n"), true, true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("Content-Length: 6\r\nConnection: close\r\n\r\n"), "{text}");
    }

    #[test]
    fn cpu_permits_are_first_come_first_served() {
        let permits = Arc::new(CpuPermits::new(1));
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = permits.acquire();
        let mut threads = Vec::new();
        for i in 0..5u64 {
            let (p, o) = (permits.clone(), order.clone());
            threads.push(thread::spawn(move || {
                let _permit = p.acquire();
                o.lock().unwrap().push(i);
            }));
            // Each waiter draws its ticket before the next one starts.
            while permits.lock().next_ticket < i + 2 {
                thread::yield_now();
            }
        }
        drop(first);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn cpu_permits_bound_concurrency() {
        let permits = Arc::new(CpuPermits::new(2));
        let busy = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (permits, busy, peak) = (permits.clone(), busy.clone(), peak.clone());
                thread::spawn(move || {
                    let _p = permits.acquire();
                    let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(20));
                    busy.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
        assert_eq!(permits.lock().free, 2);
    }
}
