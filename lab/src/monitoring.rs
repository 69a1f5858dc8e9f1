//! Real Prometheus and Alertmanager servers for the tests (Debian's
//! `prometheus` and `prometheus-alertmanager`), each a child of the test on
//! a free loopback port, with its config and storage in a temp dir of its
//! own. The packages' services are never started. Drop kills exactly that
//! child by its pid and removes its dir; when the test is failing, it
//! prints the server's log first.
//!
//! A server starts in the network namespace of the calling thread (a child
//! inherits it), and requests go out from the calling thread's: a test
//! whose agent runs in a namespace enters it ([`crate::netns::NetNs::enter`])
//! around both.

use std::{
    cell::RefCell,
    fs::{self, File},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::scratch::TempDir;

pub const PROMETHEUS: &str = "/usr/bin/prometheus";
pub const PROMTOOL: &str = "/usr/bin/promtool";
pub const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

/// Each wait gives up after this long.
pub const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(250);

/// Installs Debian's `package` if `binary` is missing (needs root). Only the
/// binary is used; the package's service is not started by the tests.
pub fn ensure_package(binary: &str, package: &str) {
    if Path::new(binary).exists() {
        return;
    }
    eprintln!("{binary} missing: installing Debian's {package} package");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(args)
            .status()
            .unwrap_or_else(|e| panic!("run apt-get: {e}"))
            .success()
    };
    let install = ["install", "-y", "--no-install-recommends", package];
    // Stale package lists are the usual reason an install fails.
    if !apt(&install) {
        assert!(apt(&["update"]), "apt-get update failed");
        assert!(apt(&install), "apt-get install {package} failed");
    }
    assert!(Path::new(binary).exists(), "the {package} package did not install {binary}");
}

/// A server this test spawned. Fields drop in order: the child is killed
/// (see `Drop`), then its dir goes.
pub struct Server {
    name: &'static str,
    /// In a cell so `wait_until` can check on it while its closure uses
    /// `&self` for requests.
    child: RefCell<Child>,
    pub addr: SocketAddr,
    dir: TempDir,
}

impl Server {
    /// Runs `program` with the arguments `args(dir, addr)` gives, where
    /// `dir` is its own new temp dir (with `files` written into it: name,
    /// content) and `addr` a free loopback address for it to listen on.
    pub fn start(
        name: &'static str,
        program: &str,
        files: &[(&str, &str)],
        args: impl FnOnce(&Path, SocketAddr) -> Vec<String>,
    ) -> Server {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = TempDir::create(&format!("lb-{name}-{}-{nanos}", std::process::id()));
        for (file, content) in files {
            let path = dir.path().join(file);
            fs::write(&path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
        let addr = free_loopback_port();
        let log = File::create(dir.path().join("server.log")).expect("create server.log");
        let child = Command::new(program)
            .args(args(dir.path(), addr))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        Server { name, child: RefCell::new(child), addr, dir }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `GET path`: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        let SocketAddr::V4(addr) = self.addr else { return Err(format!("GET {path}: {} is not IPv4", self.addr)) };
        crate::http::get(addr, path, Duration::from_secs(5)).map_err(|e| format!("GET {path}: {e}"))
    }

    /// The parsed body of a 200 answer.
    pub fn get_json(&self, path: &str) -> Result<Value, String> {
        match self.get(path)? {
            (200, body) => serde_json::from_str(&body).map_err(|e| format!("{path}: {e}: {body}")),
            (status, body) => Err(format!("{path}: {status}: {body}")),
        }
    }

    /// Waits until `GET /-/ready` answers 200 (both servers have it).
    pub fn wait_ready(&self) {
        self.wait_until("ready", || match self.get("/-/ready") {
            Ok((200, _)) => Ok(()),
            Ok((status, body)) => Err(format!("{status}: {body}")),
            Err(e) => Err(e),
        });
    }

    /// Polls `check` until it succeeds; panics with its last error after
    /// [`WAIT`], or at once if the server has exited.
    pub fn wait_until<T>(&self, what: &str, check: impl FnMut() -> Result<T, String>) -> T {
        self.wait_within(what, WAIT, check)
    }

    /// [`Server::wait_until`] with its own limit.
    pub fn wait_within<T>(&self, what: &str, limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            let why = match check() {
                Ok(v) => return v,
                Err(why) => why,
            };
            match self.child.borrow_mut().try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => panic!("{what}: {} exited ({status}); last check: {why}", self.name),
                Err(e) => panic!("{what}: wait for {}: {e}", self.name),
            }
            if Instant::now() >= deadline {
                panic!("{what}: not within {limit:?}: {why}");
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let child = self.child.get_mut();
        // Child::kill sends SIGKILL to this child's pid only (and is a no-op
        // if it has already been reaped).
        if let Err(e) = child.kill() {
            eprintln!("warning: kill {} (pid {}): {e}", self.name, child.id());
        }
        if let Err(e) = child.wait() {
            eprintln!("warning: reap {} (pid {}): {e}", self.name, child.id());
        }
        if thread::panicking() {
            let log = fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            eprintln!("---- {} log ----\n{log}---- end of {} log ----", self.name, self.name);
        }
    }
}

/// A Prometheus server with `prometheus.yml` and the other `files` in its
/// dir (rule files named there by relative path).
pub fn start_prometheus(config: &str, files: &[(&str, &str)]) -> Server {
    ensure_package(PROMETHEUS, "prometheus");
    let files: Vec<(&str, &str)> = std::iter::once(("prometheus.yml", config)).chain(files.iter().copied()).collect();
    Server::start("prometheus", PROMETHEUS, &files, |dir, addr| {
        vec![
            format!("--config.file={}", dir.join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={addr}"),
            "--web.enable-lifecycle".to_owned(),
        ]
    })
}

/// An Alertmanager with `config` as its alertmanager.yml, its cluster
/// listener off (no gossip port), its storage in its dir.
pub fn start_alertmanager(config: &str) -> Server {
    ensure_package(ALERTMANAGER, "prometheus-alertmanager");
    Server::start("alertmanager", ALERTMANAGER, &[("alertmanager.yml", config)], |dir, addr| {
        vec![
            format!("--config.file={}", dir.join("alertmanager.yml").display()),
            format!("--storage.path={}", dir.join("data").display()),
            format!("--web.listen-address={addr}"),
            "--cluster.listen-address=".to_owned(),
        ]
    })
}

/// The `data` of a successful Prometheus API answer.
pub fn api(prometheus: &Server, path: &str) -> Result<Value, String> {
    let json = prometheus.get_json(path)?;
    if json["status"] != "success" {
        return Err(format!("{path}: {json}"));
    }
    Ok(json["data"].clone())
}

/// The result vector of an instant query.
pub fn query(prometheus: &Server, query: &str) -> Result<Vec<Value>, String> {
    let data = api(prometheus, &format!("/api/v1/query?query={}", encode(query)))?;
    data["result"].as_array().cloned().ok_or_else(|| format!("{query}: no result vector: {data}"))
}

/// The value of an instant query that must return exactly one series.
pub fn query_value(prometheus: &Server, q: &str) -> Result<f64, String> {
    match query(prometheus, q)?.as_slice() {
        [one] => sample_value(one),
        other => Err(format!("{q}: expected one series, got {other:?}")),
    }
}

/// [`query_value`], waited for.
pub fn query_one(prometheus: &Server, q: &str) -> f64 {
    prometheus.wait_until(q, || query_value(prometheus, q))
}

/// `"value": [<time>, "<number>"]` of a vector sample.
pub fn sample_value(r: &Value) -> Result<f64, String> {
    let v = r["value"][1].as_str().ok_or_else(|| format!("no value in {r}"))?;
    v.parse().map_err(|e| format!("value {v}: {e}"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => char::from(b).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A loopback port free right now (the kernel's pick; released for the
/// child to bind).
pub fn free_loopback_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr")
}

/// The `deploy/` directory of this workspace (the shipped dashboards and
/// rules).
pub fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}
