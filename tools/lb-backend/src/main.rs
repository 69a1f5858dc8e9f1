//! lb-backend: the demo backend behind the load balancer. A small HTTP/1.1
//! server (hyper on a current-thread tokio runtime) that burns a
//! configurable amount of CPU per request, so that load on it shows up as
//! CPU (what the seeds' autoscalers measure), answers with its own name (so
//! a client sees which backend served it), and exposes Prometheus metrics.
//!
//! - `GET /` burns `--work-ms` of one thread's CPU time (`?work_ms=N`
//!   overrides it per request), then answers `200` with `<name>\n`.
//! - `GET /healthz` (`--health-path`) answers `200 ok`, or `503` once
//!   shutting down.
//! - `GET /metrics`: requests by route, in-flight requests, CPU seconds,
//!   uptime, open and rejected connections.
//!
//! At most `--max-connections` connections are served at once; a connection
//! over the cap gets a `503` and is closed. At most `--cpu-workers` requests
//! burn CPU at once, each on a thread of its own (default: the CPUs this
//! process may use); the others queue, first come first served: an
//! overloaded backend keeps serving at its capacity, with growing latency,
//! instead of slowing every request down at once. Health checks and scrapes
//! never queue behind the work. A request whose client leaves while it
//! queues is dropped unanswered and costs no work.
//!
//! SIGTERM or SIGINT: stop accepting, fail health checks, let in-flight
//! requests finish (at most `--drain-timeout-ms`), close idle keep-alive
//! connections, exit 0. So `docker stop` returns at once, also when this runs
//! as PID 1 (which the kernel spares signals it has no handler for).
//!
//! Builds as a fully static binary for a `FROM scratch` image:
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p lb-backend
//! --target x86_64-unknown-linux-gnu`. It needs no /etc files and no DNS: the
//! listen address is a literal, the name comes from gethostname(2).

use std::{
    convert::Infallible,
    fmt::Write as _,
    io::{self, ErrorKind},
    net::SocketAddr,
    pin::pin,
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
use http_body_util::{BodyExt as _, Full};
use hyper::{
    body::{Bytes, Incoming},
    header::{self, HeaderValue},
    http::request::Parts,
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode, Version,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    signal::unix::{signal, SignalKind},
    sync::{oneshot, watch},
};

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
/// Pause after a failed accept (EMFILE and the like) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A connection waiting for a request head (idle between keep-alive
/// requests, or in the middle of a head) is closed after this long: hyper
/// has one timer for both.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// Request heads larger than this are refused (431).
const MAX_HEAD: usize = 16 * 1024;
/// Request bodies larger than this are refused (413); the endpoints take none.
const MAX_BODY: usize = 1024 * 1024;
/// Longest name put in a response (names come from flags or the hostname).
const MAX_NAME: usize = 253;
/// A connection over the cap gets this long to send its request and read
/// the 503.
const REJECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Stack of the threads that burn CPU: they only loop over a clock.
const WORKER_STACK: usize = 256 * 1024;

fn parse_health_path(s: &str) -> Result<String, String> {
    if s.starts_with('/') && !s.contains('?') && s != "/" && s != "/metrics" {
        Ok(s.to_owned())
    } else {
        Err("must start with '/', have no query, and not be / or /metrics".into())
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

type Body = Full<Bytes>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
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

/// Everything the connections share.
struct Server {
    name: String,
    work_ms: u64,
    health_path: String,
    started: Instant,
    shutting_down: AtomicBool,
    /// Requests between parsed and answered.
    in_flight: AtomicU64,
    requests: [AtomicU64; Route::ALL.len()],
    connections_open: AtomicUsize,
    connections_served: AtomicU64,
    connections_rejected: AtomicU64,
    cpu: CpuQueue,
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
            requests: Default::default(),
            connections_open: AtomicUsize::new(0),
            connections_served: AtomicU64::new(0),
            connections_rejected: AtomicU64::new(0),
            cpu: CpuQueue::new(cpu_workers),
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

/// One request through hyper: skip its body, answer it, and say whether
/// the connection stays open.
async fn serve_request(req: Request<Incoming>, server: &Server) -> Response<Body> {
    server.in_flight.fetch_add(1, Ordering::SeqCst);
    // Also when hyper drops this future (the client left).
    let _in_flight = OnDrop(|| {
        server.in_flight.fetch_sub(1, Ordering::SeqCst);
    });
    let (parts, body) = req.into_parts();
    let mut resp = match skip_body(body).await {
        Ok(()) => handle(&parts, server).await,
        Err(resp) => resp,
    };
    // Checked after the work: a request that was running when SIGTERM came
    // is answered with `Connection: close`.
    let keep_alive = resp.status() != StatusCode::PAYLOAD_TOO_LARGE && keeps_alive(&parts) && !server.shutting_down();
    let connection = HeaderValue::from_static(if keep_alive { "keep-alive" } else { "close" });
    resp.headers_mut().insert(header::CONNECTION, connection);
    resp
}

/// Runs a closure when dropped.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Reads and drops a request body (the endpoints take none), so the next
/// request on the connection starts where it should.
async fn skip_body(mut body: Incoming) -> Result<(), Response<Body>> {
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return Err(text(StatusCode::BAD_REQUEST, "bad request body\n")) };
        total += frame.data_ref().map_or(0, Bytes::len);
        if total > MAX_BODY {
            return Err(text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"));
        }
    }
    Ok(())
}

/// Whether the client lets the connection stay open after the answer:
/// HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with `Connection:
/// keep-alive`. hyper knows too, but says `keep-alive` only to HTTP/1.0.
fn keeps_alive(req: &Parts) -> bool {
    let has = |token: &str| {
        req.headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    !has("close") && (req.version == Version::HTTP_11 || has("keep-alive"))
}

/// Answers one request. If the client leaves while the request waits for a
/// CPU worker, hyper drops this future, and the request gets no answer and
/// costs no work.
async fn handle(req: &Parts, server: &Server) -> Response<Body> {
    let route = server.route(req.uri.path());
    server.requests[route as usize].fetch_add(1, Ordering::Relaxed);
    if route != Route::Other && req.method != Method::GET && req.method != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match route {
        Route::Work => {
            let work_ms = match query_param(req.uri.query(), "work_ms") {
                None => server.work_ms,
                Some(v) => match v.parse::<u64>() {
                    Ok(ms) if ms <= MAX_WORK_MS => ms,
                    _ => return text(StatusCode::BAD_REQUEST, format!("work_ms must be 0..={MAX_WORK_MS}\n")),
                },
            };
            if work_ms > 0 {
                if let Err(e) = server.cpu.burn(Duration::from_millis(work_ms)).await {
                    return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n"));
                }
            }
            text(StatusCode::OK, format!("{}\n", server.name))
        }
        Route::Health if server.shutting_down() => text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        Route::Health => text(StatusCode::OK, "ok\n"),
        Route::Metrics => {
            let mut resp = text(StatusCode::OK, render_metrics(server, process_cpu_seconds()));
            let exposition = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
            resp.headers_mut().insert(header::CONTENT_TYPE, exposition);
            resp
        }
        Route::Other => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The CPU work: at most `workers` requests burn CPU at once, the others
/// wait in line, first come first served. Each request burns on a thread of
/// its own that sleeps until its turn, as in the threaded server this was
/// before hyper: on a busy host, a thread that has just woken up is run
/// promptly, while one long-lived worker burning without a pause gets only
/// its fair share (measured here: about a fifth as much work done), and the
/// scaling tests' ramps were tuned with the former.
struct CpuQueue {
    permits: Arc<CpuPermits>,
    counts: Arc<QueueCounts>,
}

#[derive(Default)]
struct QueueCounts {
    /// Requests waiting for a CPU worker.
    queued: AtomicU64,
    /// Requests dropped because their client left while they queued.
    abandoned: AtomicU64,
}

impl CpuQueue {
    fn new(workers: usize) -> CpuQueue {
        CpuQueue { permits: Arc::new(CpuPermits::new(workers)), counts: Arc::default() }
    }

    fn workers(&self) -> usize {
        self.permits.capacity
    }

    /// Burns `amount` of CPU once the requests queued before have had their
    /// turn. When hyper drops this future (the client left), the request's
    /// thread skips the work when its turn comes.
    async fn burn(&self, amount: Duration) -> anyhow::Result<()> {
        let (done, finished) = oneshot::channel::<()>();
        let (permits, counts) = (Arc::clone(&self.permits), Arc::clone(&self.counts));
        counts.queued.fetch_add(1, Ordering::Relaxed);
        let spawned = thread::Builder::new().name("cpu".into()).stack_size(WORKER_STACK).spawn(move || {
            let permit = permits.acquire();
            counts.queued.fetch_sub(1, Ordering::Relaxed);
            // Under overload a request can wait longer than its client
            // does; burning CPU for nobody would starve the requests still
            // wanted (what nginx logs as 499).
            if done.is_closed() {
                counts.abandoned.fetch_add(1, Ordering::Relaxed);
                return;
            }
            burn_cpu(amount);
            drop(permit);
            // Fails only if the client left during the work: no one to tell.
            let _ = done.send(());
        });
        if let Err(e) = spawned {
            self.counts.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(e).context("spawn a CPU thread");
        }
        finished.await.context("the CPU thread ended without an answer")
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
    let queue = &server.cpu.counts;
    family(
        "demo_backend_queued_requests",
        "gauge",
        "Requests waiting for a CPU worker.",
        &gauge(queue.queued.load(Ordering::Relaxed)),
    );
    family(
        "demo_backend_abandoned_requests_total",
        "counter",
        "Requests dropped unanswered because the client closed the connection while they waited for a CPU worker.",
        &gauge(queue.abandoned.load(Ordering::Relaxed)),
    );
    family(
        "demo_backend_cpu_workers",
        "gauge",
        "Requests that may burn CPU at once.",
        &gauge(server.cpu.workers() as u64),
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

// ---------------------------------------------------------------------------
// Connections

/// hyper's HTTP/1.1 server settings for every connection.
fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(HEAD_TIMEOUT).max_buf_size(MAX_HEAD);
    builder
}

/// Serves requests on one connection until the client closes it, asks to
/// close it, goes idle too long, or the server shuts down (`shutdown`).
async fn serve_connection(stream: TcpStream, server: Arc<Server>, mut shutdown: watch::Receiver<bool>) {
    let _open = OnDrop(|| {
        server.connections_open.fetch_sub(1, Ordering::SeqCst);
    });
    if let Err(e) = stream.set_nodelay(true) {
        eprintln!("lb-backend: set TCP_NODELAY: {e}");
    }
    let service = service_fn(|req| {
        let server = Arc::clone(&server);
        async move { Ok::<_, Infallible>(serve_request(req, &server).await) }
    });
    let mut conn = pin!(http1_builder().serve_connection(TokioIo::new(stream), service));
    let result = tokio::select! {
        result = conn.as_mut() => result,
        // The one change there is: to shutting down.
        _ = shutdown.changed() => {
            // Idle: closed now. Busy: the answer in progress is the last.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    // A client that leaves first, or a request hyper refused with a 4xx, is
    // no error of ours.
    if let Some(e) = result.as_ref().err().and_then(io_error) {
        let gone = [ErrorKind::ConnectionReset, ErrorKind::BrokenPipe, ErrorKind::NotConnected];
        if !gone.contains(&e.kind()) {
            eprintln!("lb-backend: connection: {e}");
        }
    }
}

/// The I/O error under a hyper error, if that is what it is.
fn io_error(e: &hyper::Error) -> Option<&io::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return Some(io);
        }
        source = s.source();
    }
    None
}

/// Over the connection cap: answer whatever comes with a 503 and close.
/// Bounded, so a client that neither sends nor reads costs little.
async fn reject_connection(stream: TcpStream) {
    let service = service_fn(|_req| {
        std::future::ready(Ok::<_, Infallible>(text(StatusCode::SERVICE_UNAVAILABLE, "too many connections\n")))
    });
    let conn = http1_builder().keep_alive(false).serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REJECT_TIMEOUT, conn).await;
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
    let name = cli.name.clone().unwrap_or_else(hostname);
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
        bail!("--name must be 1..={MAX_NAME} bytes without control characters");
    }
    let cpu_workers = match cli.cpu_workers {
        Some(n) => n as usize,
        None => thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let server = Server::new(name, cli.work_ms, cli.health_path.clone(), cpu_workers);
    // One thread serves HTTP; the CPU work runs on threads of its own. Work
    // still burning after the drain timeout is not waited for.
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the tokio runtime")?;
    runtime.block_on(serve(&cli, Arc::new(server)))
}

async fn serve(cli: &Cli, server: Arc<Server>) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("handle SIGINT")?;
    let listener = TcpListener::bind(cli.listen).await.with_context(|| format!("listen on {}", cli.listen))?;
    let local = listener.local_addr().context("listener address")?;
    // The first line is the contract with scripts and tests: the address.
    println!(
        "lb-backend {} listening on {local} (work {} ms, {} CPU workers, health {})",
        server.name,
        server.work_ms,
        server.cpu.workers(),
        server.health_path
    );

    let (shutdown, shutdown_rx) = watch::channel(false);
    let max_connections = cli.max_connections as usize;
    loop {
        let stream = tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    eprintln!("lb-backend: accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        if server.connections_open.load(Ordering::SeqCst) >= max_connections {
            server.connections_rejected.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(reject_connection(stream));
            continue;
        }
        server.connections_open.fetch_add(1, Ordering::SeqCst);
        server.connections_served.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve_connection(stream, Arc::clone(&server), shutdown_rx.clone()));
    }

    server.shutting_down.store(true, Ordering::SeqCst);
    drop(listener);
    // Every connection task holds a receiver, so this reaches them all.
    shutdown.send_replace(true);
    let open = server.connections_open.load(Ordering::SeqCst);
    println!("lb-backend {}: shutting down, {open} connections open", server.name);
    let drain = Duration::from_millis(cli.drain_timeout_ms);
    let started = Instant::now();
    while server.connections_open.load(Ordering::SeqCst) > 0 && started.elapsed() < drain {
        tokio::time::sleep(Duration::from_millis(10)).await;
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

    fn request(method: Method, uri: &str) -> Parts {
        Request::builder().method(method).uri(uri).body(()).unwrap().into_parts().0
    }

    fn get(uri: &str) -> Parts {
        request(Method::GET, uri)
    }

    fn server() -> Server {
        server_with(0, 1)
    }

    fn server_with(work_ms: u64, cpu_workers: usize) -> Server {
        Server::new("web-1".into(), work_ms, "/healthz".into(), cpu_workers)
    }

    async fn body(resp: Response<Body>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn connection_header_decides_keep_alive() {
        let parts = |version, connection: Option<&str>| {
            let mut req = Request::builder().uri("/").version(version);
            if let Some(c) = connection {
                req = req.header(header::CONNECTION, c);
            }
            req.body(()).unwrap().into_parts().0
        };
        assert!(keeps_alive(&parts(Version::HTTP_11, None)));
        assert!(!keeps_alive(&parts(Version::HTTP_11, Some("close"))));
        assert!(!keeps_alive(&parts(Version::HTTP_11, Some("Upgrade, CLOSE"))));
        assert!(!keeps_alive(&parts(Version::HTTP_10, None)));
        assert!(keeps_alive(&parts(Version::HTTP_10, Some("keep-alive"))));
        assert!(keeps_alive(&parts(Version::HTTP_11, Some("keep-alive"))));
    }

    #[test]
    fn query_params_are_found() {
        let req = get("http://10.0.0.1:8080/?work_ms=5&x=1");
        assert_eq!((req.uri.path(), req.uri.query()), ("/", Some("work_ms=5&x=1")));
        assert_eq!(query_param(req.uri.query(), "work_ms"), Some("5"));
        assert_eq!(query_param(req.uri.query(), "y"), None);
        assert_eq!(query_param(get("/").uri.query(), "work_ms"), None);
    }

    #[tokio::test]
    async fn root_answers_with_the_name() {
        let s = server();
        let resp = handle(&get("/"), &s).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(body(resp).await, "web-1\n");
        assert_eq!(s.requests[Route::Work as usize].load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn work_ms_burns_cpu_time() {
        let s = server();
        let before = process_cpu_seconds();
        assert_eq!(handle(&get("/?work_ms=30"), &s).await.status(), StatusCode::OK);
        assert!(process_cpu_seconds() - before >= 0.03);
        assert_eq!(handle(&get("/?work_ms=lots"), &s).await.status(), StatusCode::BAD_REQUEST);
        let too_much = format!("/?work_ms={}", MAX_WORK_MS + 1);
        assert_eq!(handle(&get(&too_much), &s).await.status(), StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn work_for_a_departed_client_is_skipped() {
        let s = server_with(50, 1);
        // The one worker is busy; a request queues behind, and its client
        // leaves: hyper drops the request's future. The worker skips it
        // (and counts it) instead of burning 50 ms for nobody.
        let busy = s.cpu.burn(Duration::from_millis(100));
        let req = get("/");
        let left = async {
            // Only once the busy work holds the worker: the two threads
            // race for the permit otherwise.
            while s.cpu.permits.lock().free > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::timeout(Duration::from_millis(20), handle(&req, &s)).await
        };
        let (busy, left) = tokio::join!(busy, left);
        busy.unwrap();
        assert!(left.is_err(), "the request waits for the busy worker");
        let counts = &s.cpu.counts;
        let started = Instant::now();
        while counts.abandoned.load(Ordering::Relaxed) == 0 && started.elapsed() < Duration::from_secs(2) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!((counts.queued.load(Ordering::Relaxed), counts.abandoned.load(Ordering::Relaxed)), (0, 1));
        assert_eq!(handle(&get("/healthz"), &s).await.status(), StatusCode::OK, "only work is skipped");
    }

    #[tokio::test]
    async fn cpu_workers_bound_concurrent_work() {
        let s = Arc::new(server_with(30, 2));
        let started = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let s = Arc::clone(&s);
                tokio::spawn(async move { handle(&get("/"), &s).await.status() })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), StatusCode::OK);
        }
        // Four requests of 30 ms CPU on two workers take two rounds.
        assert!(started.elapsed() >= Duration::from_millis(60), "{:?}", started.elapsed());
        assert_eq!(s.cpu.counts.queued.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn health_fails_once_shutting_down() {
        let s = server();
        assert_eq!(handle(&get("/healthz"), &s).await.status(), StatusCode::OK);
        s.shutting_down.store(true, Ordering::SeqCst);
        assert_eq!(handle(&get("/healthz"), &s).await.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(handle(&get("/"), &s).await.status(), StatusCode::OK, "in-flight work still completes");
    }

    #[tokio::test]
    async fn custom_health_path_and_unknown_paths() {
        let s = Server::new("b".into(), 0, "/ready".into(), 1);
        assert_eq!(handle(&get("/ready"), &s).await.status(), StatusCode::OK);
        assert_eq!(handle(&get("/healthz"), &s).await.status(), StatusCode::NOT_FOUND);
        let resp = handle(&request(Method::POST, "/metrics"), &s).await;
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[header::ALLOW], "GET, HEAD");
    }

    #[tokio::test]
    async fn metrics_count_requests_by_route() {
        let s = server();
        for path in ["/", "/", "/healthz", "/nope"] {
            handle(&get(path), &s).await;
        }
        let resp = handle(&get("/metrics"), &s).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
        let body = body(resp).await;
        for line in [
            "demo_backend_requests_total{route=\"/\"} 2",
            "demo_backend_requests_total{route=\"health\"} 1",
            "demo_backend_requests_total{route=\"/metrics\"} 1",
            "demo_backend_requests_total{route=\"other\"} 1",
            "# TYPE demo_backend_cpu_seconds_total counter",
            "demo_backend_cpu_workers 1",
            "demo_backend_up 1",
        ] {
            assert!(body.lines().any(|l| l == line), "missing {line:?} in\n{body}");
        }
        let cpu = body.lines().find_map(|l| l.strip_prefix("demo_backend_cpu_seconds_total ")).unwrap();
        assert!(cpu.parse::<f64>().unwrap() > 0.0);
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
