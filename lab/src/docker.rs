//! Docker for the container tests: an engine (started here only if none
//! runs, and stopped again only then), the demo image built from the static
//! `lb-backend`, and RAII guards for everything a test makes around it (its
//! containers, its network, an iptables rule, a scratch directory with the
//! agent's bpffs).
//!
//! Every guard removes exactly what its test created, also during a panic,
//! and never touches anything else: containers are found by the labels of
//! the test's own service, networks and rules by the names the test gave.
//! The image stays (cheap, and reused by the next run).
//!
//! Helpers panic instead of returning errors, as in [`crate::topology`].

use std::{
    fs,
    io::{self, Write as _},
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

pub use crate::http::get as http_get;
use crate::{
    bins::target_dir,
    command::run_cmd,
    netns::{del_link, link_exists},
    scratch::TempDir,
};

/// The demo backend's image; built by [`build_demo_image`], never removed.
pub const DEMO_IMAGE: &str = "lb-demo-backend:dev";

/// `require_root_and_docker!("test_name");` as a test's first line: returns
/// from the test when it must skip for want of root or Docker.
#[macro_export]
macro_rules! require_root_and_docker {
    ($name:literal) => {
        if $crate::root::skip_without_root($name) || $crate::docker::skip_without_docker($name) {
            return;
        }
    };
}

/// True (after saying why) when this machine has no Docker engine binary;
/// in CI that is a failure instead (a skip would pass silently).
pub fn skip_without_docker(test: &str) -> bool {
    let found = ["dockerd", "docker"].iter().all(|b| which(b).is_some());
    if found {
        return false;
    }
    if crate::root::in_ci() {
        panic!("{test}: needs dockerd and the docker CLI (apt-get install docker.io), and CI=true forbids skipping");
    }
    let _ = writeln!(io::stderr(), "{test}: skipped: needs dockerd and the docker CLI (apt-get install docker.io)");
    true
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

/// `docker <args>`; panics with its output on failure, returns stdout.
pub fn docker(args: &[&str]) -> String {
    run_cmd("docker", args)
}

/// `docker <args>`: success and combined output, never panics on failure.
pub fn docker_try(args: &[&str]) -> (bool, String) {
    match Command::new("docker").args(args).stdin(Stdio::null()).output() {
        Ok(o) => (
            o.status.success(),
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
        ),
        Err(e) => (false, format!("cannot run docker: {e}")),
    }
}

pub(crate) fn engine_answers() -> bool {
    Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Linux bridges the engine makes on its own: `docker0` at every start,
/// `docker_gwbridge` with a swarm, and again at every later start while
/// that network is in the engine's store (its bridge driver recreates the
/// bridge of every bridge network it stores, whether or not a swarm is on).
const ENGINE_BRIDGES: [&str; 2] = ["docker0", "docker_gwbridge"];

/// The Docker engine for a test. If one answers already it is left alone;
/// otherwise `dockerd` is started in the background (its init script does
/// not work on these machines) and stopped again on drop, and then the
/// engine's own bridges that were not there before it started go too.
pub struct Dockerd {
    /// Only set when this guard started the engine.
    child: Option<Child>,
    log: PathBuf,
    /// Those of [`ENGINE_BRIDGES`] that were not there before the start.
    new_bridges: Vec<&'static str>,
}

impl Dockerd {
    pub fn ensure() -> Dockerd {
        let log = std::env::temp_dir().join(format!("lbt-dockerd-{}.log", std::process::id()));
        if engine_answers() {
            return Dockerd { child: None, log, new_bridges: Vec::new() };
        }
        if let Some(pid) = live_dockerd_pid() {
            panic!(
                "dockerd (pid {pid}, /var/run/docker.pid) runs but does not answer; refusing to start a second one \
                 next to it"
            );
        }
        let new_bridges = ENGINE_BRIDGES.into_iter().filter(|b| !link_exists(b)).collect();
        let out = fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let child = Command::new("dockerd")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup log fd"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn dockerd: {e}"));
        let mut d = Dockerd { child: Some(child), log, new_bridges };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !engine_answers() {
            if let Some(Ok(Some(status))) = d.child.as_mut().map(Child::try_wait) {
                panic!("dockerd exited ({status}) before answering; its log:\n{}", d.log_text());
            }
            if Instant::now() >= deadline {
                panic!("dockerd did not answer within 30 s; its log:\n{}", d.log_text());
            }
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!("started dockerd (pid {}); it is stopped again at the end", d.child.as_ref().map_or(0, Child::id));
        d
    }

    /// Whether this guard started the engine (and will stop it).
    pub fn started_here(&self) -> bool {
        self.child.is_some()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else { return };
        stop_engine(child, "dockerd");
        // A stopped engine leaves its bridges; the next start makes them again.
        for bridge in &self.new_bridges {
            del_link(bridge);
        }
        let _ = fs::remove_file(&self.log);
    }
}

/// SIGTERM to an engine this process started (our own unreaped child),
/// then up to 20 s for it to stop, then SIGKILL.
pub(crate) fn stop_engine(child: &mut Child, what: &str) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on our own unreaped child: the pid is still its.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            _ => {
                eprintln!("warning: {what} (pid {pid}) did not stop within 20 s of SIGTERM; killing it");
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
}

/// The pid in /var/run/docker.pid, if that process is alive (dockerd
/// itself replaces a stale file).
fn live_dockerd_pid() -> Option<libc::pid_t> {
    let pid: libc::pid_t = fs::read_to_string("/var/run/docker.pid").ok()?.trim().parse().ok()?;
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

/// Where the static `lb-backend` is: `$LB_BACKEND_STATIC_BIN`, else
/// `<target>/x86_64-unknown-linux-gnu/release/lb-backend` of the target
/// directory the running executable is in. An error says how to build it.
pub fn try_static_backend_bin() -> io::Result<PathBuf> {
    let build = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p lb-backend \
                 --target x86_64-unknown-linux-gnu";
    let path = match std::env::var_os("LB_BACKEND_STATIC_BIN") {
        Some(p) => PathBuf::from(p),
        None => target_dir()?.join("x86_64-unknown-linux-gnu/release/lb-backend"),
    };
    if !path.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "the static lb-backend is not at {}: build it with `{build}` (`cargo xtask run` does), or set \
                 LB_BACKEND_STATIC_BIN",
                path.display()
            ),
        ));
    }
    if !is_static_elf(&path) {
        return Err(io::Error::other(format!(
            "{} is dynamically linked; a FROM scratch image has no loader. Build it with `{build}`",
            path.display()
        )));
    }
    Ok(path)
}

/// [`try_static_backend_bin`] for tests: panics with the error.
pub fn static_backend_bin() -> PathBuf {
    try_static_backend_bin().unwrap_or_else(|e| panic!("{e}"))
}

/// True when an ELF64 file has no PT_INTERP program header (no dynamic
/// loader needed).
fn is_static_elf(path: &Path) -> bool {
    let Ok(bytes) = fs::read(path) else { return false };
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| bytes.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    if bytes.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else { return false };
    const PT_INTERP: u32 = 3;
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        bytes.get(o..o + 4).is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) != PT_INTERP)
    })
}

/// Build [`DEMO_IMAGE`]: `FROM scratch`, the static `lb-backend` as its
/// entry point (it handles SIGTERM as PID 1, so `docker stop` is quick).
/// Rebuilt every time (well under a second; the layer cache makes an
/// unchanged binary a no-op); an older build it replaces is removed.
/// Returns the image id.
pub fn build_demo_image() -> String {
    build_demo_image_from(&static_backend_bin())
}

/// [`build_demo_image`] from a given static `lb-backend`.
pub fn build_demo_image_from(bin: &Path) -> String {
    assert!(is_static_elf(bin), "{} is not a static executable; a FROM scratch image has no loader", bin.display());
    let ctx = TempDir::create(&format!("lbt-image-{}", std::process::id()));
    fs::copy(bin, ctx.path().join("lb-backend")).unwrap_or_else(|e| panic!("copy {}: {e}", bin.display()));
    fs::write(
        ctx.path().join("Dockerfile"),
        "FROM scratch\n\
         COPY lb-backend /lb-backend\n\
         LABEL io.lb-agent.demo=\"lb-backend\"\n\
         EXPOSE 8080\n\
         ENTRYPOINT [\"/lb-backend\"]\n",
    )
    .expect("write Dockerfile");
    // The classic builder: this engine has no BuildKit/buildx, and a CLI
    // that has buildx would otherwise pick it.
    let out = Command::new("docker")
        .args(["build", "-q", "-t", DEMO_IMAGE])
        .arg(ctx.path())
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::null())
        .output()
        .expect("run docker build");
    assert!(out.status.success(), "docker build failed:\n{}", String::from_utf8_lossy(&out.stderr));
    // The previous build, if the binary changed: untagged now, and ours by
    // its label. (Only dangling images with that label go.)
    let (ok, pruned) = docker_try(&["image", "prune", "-f", "--filter", "label=io.lb-agent.demo=lb-backend"]);
    if !ok {
        eprintln!("warning: docker image prune: {pruned}");
    }
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes, on drop, every container that carries the agent's labels for
/// `service` (a name unique to the test), whether the test or an
/// orchestrator made it.
pub struct ServiceContainers {
    pub service: String,
}

impl ServiceContainers {
    pub fn ids(&self) -> Vec<String> {
        let owner = format!("label={}={}", lb_agent::adapters::docker::LABEL_OWNER, lb_agent::adapters::docker::OWNER);
        let svc = format!("label={}={}", lb_agent::adapters::docker::LABEL_SERVICE, self.service);
        let (ok, out) = docker_try(&["ps", "-aq", "--no-trunc", "--filter", &owner, "--filter", &svc]);
        if !ok {
            eprintln!("warning: docker ps for service {}: {out}", self.service);
            return Vec::new();
        }
        out.split_whitespace().map(str::to_owned).collect()
    }
}

impl Drop for ServiceContainers {
    fn drop(&mut self) {
        for id in self.ids() {
            let (ok, out) = docker_try(&["rm", "-f", "-v", &id]);
            if !ok {
                eprintln!("warning: docker rm -f {id}: {out}");
            }
        }
    }
}

/// One container this test ran by name (e.g. a foreign one without our
/// labels); `docker rm -f` on drop.
pub struct NamedContainer {
    pub name: String,
}

impl NamedContainer {
    /// `docker run -d --name <name> <args...>`.
    pub fn run(name: &str, args: &[&str]) -> NamedContainer {
        let (exists, _) = docker_try(&["container", "inspect", name]);
        assert!(!exists, "a container named {name} exists already; refusing to touch it");
        let mut all = vec!["run", "-d", "--name", name];
        all.extend_from_slice(args);
        let guard = NamedContainer { name: name.to_owned() };
        docker(&all);
        guard
    }

    pub fn id(&self) -> String {
        docker(&["container", "inspect", "-f", "{{.Id}}", &self.name]).trim().to_owned()
    }

    pub fn is_running(&self) -> bool {
        docker_try(&["container", "inspect", "-f", "{{.State.Running}}", &self.name]).1.trim() == "true"
    }
}

impl Drop for NamedContainer {
    fn drop(&mut self) {
        let (ok, out) = docker_try(&["rm", "-f", "-v", &self.name]);
        if !ok && !out.contains("No such container") {
            eprintln!("warning: docker rm -f {}: {out}", self.name);
        }
    }
}

/// A Docker network that must not exist before the test; removed on drop
/// (after the test's containers, which must be gone by then: declare this
/// guard before [`ServiceContainers`] so it drops after it).
pub struct NetworkGuard {
    pub name: String,
}

impl NetworkGuard {
    /// Panics if `name` exists already: it would be someone else's.
    pub fn expect_new(name: &str) -> NetworkGuard {
        let (exists, _) = docker_try(&["network", "inspect", name]);
        assert!(!exists, "docker network {name} exists already; refusing to use or remove someone else's network");
        NetworkGuard { name: name.to_owned() }
    }
}

impl Drop for NetworkGuard {
    fn drop(&mut self) {
        let (ok, out) = docker_try(&["network", "rm", &self.name]);
        if !ok && !out.contains("not found") {
            eprintln!("warning: docker network rm {}: {out}", self.name);
        }
    }
}

/// One rule this test inserted into an iptables chain; deleted (exactly
/// that rule, by its specification) on drop.
pub struct IptablesRule {
    chain: String,
    spec: Vec<String>,
}

impl IptablesRule {
    /// `iptables -I <chain> <spec...>`.
    pub fn insert(chain: &str, spec: &[&str]) -> IptablesRule {
        let mut args = vec!["-w", "-I", chain];
        args.extend_from_slice(spec);
        run_cmd("iptables", &args);
        IptablesRule { chain: chain.to_owned(), spec: spec.iter().map(|s| (*s).to_owned()).collect() }
    }
}

impl Drop for IptablesRule {
    fn drop(&mut self) {
        let mut args = vec!["-w", "-D", self.chain.as_str()];
        args.extend(self.spec.iter().map(String::as_str));
        match Command::new("iptables").args(&args).stdin(Stdio::null()).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("warning: iptables {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("warning: cannot run iptables: {e}"),
        }
    }
}

/// [`http_get`] again and again until it answers 200 or `within` passes.
pub fn wait_http_ok(addr: SocketAddrV4, path: &str, within: Duration) -> Result<String, String> {
    let deadline = Instant::now() + within;
    loop {
        let last = match http_get(addr, path, Duration::from_millis(500)) {
            Ok((200, body)) => return Ok(body),
            Ok((code, body)) => format!("status {code}: {body}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(format!("{addr}{path} did not answer 200 within {within:?}; last: {last}"));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_elf_is_told_from_dynamic() {
        // This test binary is dynamically linked (a normal cargo build).
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me));
        let dir = TempDir::create(&format!("lbt-elf-{}", std::process::id()));
        let f = dir.path().join("not-elf");
        fs::write(&f, b"#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(&f));
    }
}
