//! The local control API: one JSON request per line on a Unix socket that
//! only root can open, one JSON response per line back.
//!
//! ```text
//! {"op":"status"}
//! {"op":"add_backend","service":"web","address":"10.0.1.5:8080","weight":1}
//! {"op":"remove_backend","service":"web","address":"10.0.1.5:8080"}
//! {"op":"set_weight","service":"web","address":"10.0.1.5:8080","weight":3}
//! {"op":"reset_backend","service":"web","address":"10.0.1.5:8080"}
//! {"op":"reset_backend","service":"web"}
//! {"op":"reload"}
//! {"op":"dump_config"}
//! {"op":"stop"}
//! {"op":"pin_replicas","service":"web","replicas":3}
//! {"op":"pause_scaling","service":"web"}
//! {"op":"resume_scaling","service":"web"}
//! {"op":"explain","service":"web","client":"10.0.9.2:40000","protocol":"tcp","vip":"10.0.0.100"}
//! ```
//! A request that does not parse, names an unknown service or backend, or
//! carries a bad value is refused whole with a message, and changes nothing.
//! Run-time changes (add, remove, weight) are an overlay on the config file
//! that every reload keeps, until `reset_backend` drops it (see
//! `core::overlay`); `dump_config` answers the effective config as TOML.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
    time::timeout,
};
use tracing::{debug, warn};

use crate::{
    config::{Protocol, MAX_WEIGHT},
    core::explain::Explanation,
    status::Snapshot,
};

pub const DEFAULT_SOCKET: &str = "/run/lb-agent/lb-agent.sock";
/// A request line longer than this is refused (and the connection closed).
const MAX_REQUEST: usize = 64 * 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    AddBackend {
        service: String,
        address: SocketAddr,
        #[serde(default = "one")]
        weight: u32,
    },
    RemoveBackend {
        service: String,
        address: SocketAddr,
    },
    SetWeight {
        service: String,
        address: SocketAddr,
        weight: u32,
    },
    /// Drop the run-time changes of a service, or of one of its backends.
    #[serde(rename = "reset_backend")]
    ResetBackends {
        service: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<SocketAddr>,
    },
    Reload,
    /// The effective config (file and run-time changes) as TOML.
    DumpConfig,
    /// Shut down for good: detach and remove pinned state.
    Stop,
    /// Hold a scaled service at `replicas` instances until resumed.
    PinReplicas {
        service: String,
        replicas: u32,
    },
    /// Hold a scaled service at its current count until resumed.
    PauseScaling {
        service: String,
    },
    /// Hand a pinned or paused service back to its policy.
    ResumeScaling {
        service: String,
    },
    /// Which backend a flow from `client` goes to, and why (`core::explain`).
    /// `protocol` and `vip` narrow the service down when they are given.
    Explain {
        service: String,
        client: SocketAddr,
        #[serde(default, skip_serializing_if = "Option::is_none", serialize_with = "protocol_name")]
        protocol: Option<Protocol>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vip: Option<std::net::IpAddr>,
    },
}

fn one() -> u32 {
    1
}

/// `Protocol` as the config spells it ("tcp", "udp").
fn protocol_name<S: serde::Serializer>(p: &Option<Protocol>, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&p.unwrap_or_default())
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<Snapshot>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain: Option<Box<Explanation>>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Response {
        Response { ok: true, message: Some(message.into()), ..Response::default() }
    }
    pub fn status(s: Snapshot) -> Response {
        Response { ok: true, status: Some(Box::new(s)), ..Response::default() }
    }
    pub fn explain(e: Explanation) -> Response {
        Response { ok: true, explain: Some(Box::new(e)), ..Response::default() }
    }
    pub fn error(e: impl std::fmt::Display) -> Response {
        Response { ok: false, error: Some(e.to_string()), ..Response::default() }
    }
}

/// A parsed request on its way to the agent's loop, with where to answer.
pub type Call = (Request, oneshot::Sender<Response>);

/// A request as it arrives, before each field is checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequest {
    op: String,
    service: Option<String>,
    address: Option<String>,
    weight: Option<i64>,
    replicas: Option<i64>,
    client: Option<String>,
    protocol: Option<String>,
    vip: Option<String>,
}

/// Parse one request line; the error says what and where.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let raw: RawRequest = serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
    let op = raw.op.as_str();
    let service = || raw.service.clone().ok_or(format!("bad request: {op} needs \"service\""));
    let address = || -> Result<SocketAddr, String> {
        let a = raw.address.as_deref().ok_or(format!("bad request: {op} needs \"address\""))?;
        a.parse().map_err(|_| {
            format!("bad request: address: {a:?} is not an IPv4 address with a port, like \"10.0.0.5:8080\"")
        })
    };
    let weight = |default: Option<u32>| -> Result<u32, String> {
        match (raw.weight, default) {
            (None, Some(d)) => Ok(d),
            (None, None) => Err(format!("bad request: {op} needs \"weight\"")),
            (Some(w), _) => u32::try_from(w)
                .ok()
                .filter(|w| *w <= MAX_WEIGHT)
                .ok_or(format!("bad request: weight: {w} is not in 0..={MAX_WEIGHT}")),
        }
    };
    let unused = |fields: &[(&str, bool)]| -> Result<(), String> {
        match fields.iter().find(|(_, present)| *present) {
            Some((name, _)) => Err(format!("bad request: {op} takes no \"{name}\"")),
            None => Ok(()),
        }
    };
    let (has_service, has_address, has_weight) = (raw.service.is_some(), raw.address.is_some(), raw.weight.is_some());
    const OPS: [&str; 12] = [
        "status",
        "add_backend",
        "remove_backend",
        "set_weight",
        "reset_backend",
        "reload",
        "dump_config",
        "stop",
        "pin_replicas",
        "pause_scaling",
        "resume_scaling",
        "explain",
    ];
    if !OPS.contains(&op) {
        return Err(format!("bad request: op: unknown {op:?}; one of {}", OPS.join(", ")));
    }
    if raw.replicas.is_some() && op != "pin_replicas" {
        return Err(format!("bad request: {op} takes no \"replicas\""));
    }
    if op == "explain" {
        unused(&[("address", has_address), ("weight", has_weight)])?;
        return parse_explain(service()?, &raw);
    }
    for (name, present) in
        [("client", raw.client.is_some()), ("protocol", raw.protocol.is_some()), ("vip", raw.vip.is_some())]
    {
        if present {
            return Err(format!("bad request: {op} takes no \"{name}\""));
        }
    }
    match op {
        "status" | "reload" | "stop" => {
            unused(&[("service", has_service), ("address", has_address), ("weight", has_weight)])?;
            Ok(match op {
                "status" => Request::Status,
                "reload" => Request::Reload,
                _ => Request::Stop,
            })
        }
        "add_backend" => Ok(Request::AddBackend { service: service()?, address: address()?, weight: weight(Some(1))? }),
        "remove_backend" => {
            unused(&[("weight", has_weight)])?;
            Ok(Request::RemoveBackend { service: service()?, address: address()? })
        }
        "set_weight" => Ok(Request::SetWeight { service: service()?, address: address()?, weight: weight(None)? }),
        "pin_replicas" | "pause_scaling" | "resume_scaling" => {
            unused(&[("address", has_address), ("weight", has_weight)])?;
            parse_scale(op, service()?, raw.replicas)
        }
        "reset_backend" => {
            unused(&[("weight", has_weight)])?;
            let address = if has_address { Some(address()?) } else { None };
            Ok(Request::ResetBackends { service: service()?, address })
        }
        "dump_config" => {
            unused(&[("service", has_service), ("address", has_address), ("weight", has_weight)])?;
            Ok(Request::DumpConfig)
        }
        other => Err(format!("bad request: op {other:?} is not handled")),
    }
}

/// `explain` needs `client` (ip:port); `protocol` and `vip` are optional.
fn parse_explain(service: String, raw: &RawRequest) -> Result<Request, String> {
    let c = raw.client.as_deref().ok_or("bad request: explain needs \"client\"")?;
    let client = c.parse().map_err(|_| {
        format!(
            "bad request: client: {c:?} is not an address with a port, like \"10.0.9.2:40000\" or \
             \"[2001:db8::5]:40000\""
        )
    })?;
    let protocol = match raw.protocol.as_deref() {
        None => None,
        Some("tcp") => Some(Protocol::Tcp),
        Some("udp") => Some(Protocol::Udp),
        Some(p) => return Err(format!("bad request: protocol: {p:?} is not \"tcp\" or \"udp\"")),
    };
    let vip = match raw.vip.as_deref() {
        None => None,
        Some(v) => Some(v.parse().map_err(|_| format!("bad request: vip: {v:?} is not an IP address"))?),
    };
    Ok(Request::Explain { service, client, protocol, vip })
}

/// The scaling ops: `pin_replicas` needs `replicas`, a count.
fn parse_scale(op: &str, service: String, replicas: Option<i64>) -> Result<Request, String> {
    match op {
        "pin_replicas" => {
            let n = replicas.ok_or(format!("bad request: {op} needs \"replicas\""))?;
            let replicas = u32::try_from(n).map_err(|_| format!("bad request: replicas: {n} is not a count"))?;
            Ok(Request::PinReplicas { service, replicas })
        }
        "pause_scaling" => Ok(Request::PauseScaling { service }),
        _ => Ok(Request::ResumeScaling { service }),
    }
}

/// Bind the socket: root-only. Its directory is made 0700 if it does not
/// exist; an existing one is used only if it is safe (see `judge_dir`), and
/// never chmod-ed. The socket is made under umask 0177, so it is never
/// reachable by others, not even for an instant. A stale socket from an
/// agent that died is replaced; a live one is an error.
pub async fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    prepare_socket_dir(path)?;
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!("another lb-agent is already listening on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("remove stale socket {}", path.display()))?;
    }
    let listener = with_umask(0o177, || UnixListener::bind(path))
        .with_context(|| format!("bind control socket {}", path.display()))?;
    Ok(listener)
}

/// Make the directory of the control socket `path` (0700, ours) if it is
/// missing, or check that the one there is safe to hold it.
pub fn prepare_socket_dir(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("create {}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir).with_context(|| format!("inspect {}", dir.display()))?;
    let facts = DirFacts { is_dir: meta.file_type().is_dir(), uid: meta.uid(), mode: meta.mode() };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    judge_dir(&facts, euid).map_err(|why| anyhow::anyhow!("control socket directory {}: {why}", dir.display()))
}

/// What `judge_dir` looks at.
#[derive(Clone, Copy, Debug)]
pub struct DirFacts {
    /// A directory itself (not a symlink to one).
    pub is_dir: bool,
    pub uid: u32,
    pub mode: u32,
}

/// A directory may hold the control socket if it is a real directory owned
/// by the agent's user, that no one else can write to (so no one else can
/// put a socket or a symlink of their own there). Sticky shared
/// directories like /tmp fail the last test: give the socket a directory
/// of its own.
pub fn judge_dir(d: &DirFacts, euid: u32) -> Result<(), String> {
    if !d.is_dir {
        return Err("not a directory (a symlink, or a file)".into());
    }
    if d.uid != euid {
        return Err(format!(
            "owned by uid {}, not by this agent's uid {euid}; give the socket a directory of its own",
            d.uid
        ));
    }
    if d.mode & 0o022 != 0 {
        return Err(format!(
            "mode {:04o}: others can write to it; the agent never changes an existing directory's mode: \
             use one of its own (a missing directory is made 0700)",
            d.mode & 0o7777
        ));
    }
    Ok(())
}

/// Run `f` with the process umask set to `mask`, then restore it.
fn with_umask<T>(mask: libc::mode_t, f: impl FnOnce() -> T) -> T {
    // SAFETY: umask cannot fail; the old mask is put back just after.
    let old = unsafe { libc::umask(mask) };
    let out = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    out
}

/// Accept connections and hand their requests to the agent's loop.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let calls = calls.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, calls).await {
                        debug!(error = %e, "control connection ended");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(stream: UnixStream, calls: mpsc::Sender<Call>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let n = timeout(IDLE_TIMEOUT, AsyncReadExt::take(&mut lines, MAX_REQUEST as u64 + 1).read_line(&mut line))
            .await??;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_REQUEST {
            let r = Response::error(format!("request longer than {MAX_REQUEST} bytes"));
            write_response(&mut write, &r).await?;
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let response = match parse_request(line.trim()) {
            Ok(req) => {
                let (tx, rx) = oneshot::channel();
                calls.send((req, tx)).await.context("agent is shutting down")?;
                rx.await.unwrap_or_else(|_| Response::error("agent is shutting down"))
            }
            Err(e) => Response::error(e),
        };
        write_response(&mut write, &response).await?;
    }
}

async fn write_response(w: &mut tokio::net::unix::OwnedWriteHalf, r: &Response) -> anyhow::Result<()> {
    let mut text = serde_json::to_string(r)?;
    text.push('\n');
    w.write_all(text.as_bytes()).await?;
    Ok(())
}

/// Send one request to a running agent and wait for its answer.
pub async fn call(path: &Path, request: &Request) -> anyhow::Result<Response> {
    let stream = UnixStream::connect(path).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            anyhow::anyhow!("no lb-agent is running (nothing listens on {})", path.display())
        }
        std::io::ErrorKind::PermissionDenied => {
            anyhow::anyhow!("permission denied on {}: the control socket is root's", path.display())
        }
        _ => anyhow::Error::new(e).context(format!("connect to {}", path.display())),
    })?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    timeout(IDLE_TIMEOUT, BufReader::new(read).read_line(&mut line)).await.context("agent did not answer")??;
    serde_json::from_str(&line).with_context(|| format!("unreadable answer from the agent: {line:?}"))
}

/// The running agent's status snapshot (`lb-agent status`, `top`).
pub async fn status(path: &Path) -> anyhow::Result<Snapshot> {
    let response = call(path, &Request::Status).await?;
    match response.status {
        Some(snapshot) => Ok(*snapshot),
        None => anyhow::bail!("the agent answered without a status: {}", response.error.unwrap_or_default()),
    }
}

pub fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(parse_request(r#"{"op":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(r#"{"op":"add_backend","service":"web","address":"10.0.0.1:80"}"#),
            Ok(Request::AddBackend { service: "web".into(), address: "10.0.0.1:80".parse().unwrap(), weight: 1 })
        );
        assert_eq!(
            parse_request(r#"{"op":"reset_backend","service":"web"}"#),
            Ok(Request::ResetBackends { service: "web".into(), address: None })
        );
        assert_eq!(
            parse_request(r#"{"op":"reset_backend","service":"web","address":"10.0.0.1:80"}"#),
            Ok(Request::ResetBackends { service: "web".into(), address: Some("10.0.0.1:80".parse().unwrap()) })
        );
        assert_eq!(parse_request(r#"{"op":"dump_config"}"#), Ok(Request::DumpConfig));
        // What the CLI sends is what the agent parses.
        let sent = serde_json::to_string(&Request::ResetBackends { service: "web".into(), address: None }).unwrap();
        assert_eq!(parse_request(&sent), Ok(Request::ResetBackends { service: "web".into(), address: None }));
    }

    #[test]
    fn explain_parses_as_the_client_sends_it_and_bad_fields_say_which() {
        let request = Request::Explain {
            service: "web".into(),
            client: "10.0.9.2:40000".parse().unwrap(),
            protocol: Some(Protocol::Udp),
            vip: Some(std::net::Ipv4Addr::new(10, 0, 0, 100).into()),
        };
        assert_eq!(parse_request(&serde_json::to_string(&request).unwrap()), Ok(request));
        let bare = Request::Explain {
            service: "web".into(),
            client: "10.0.9.2:1".parse().unwrap(),
            protocol: None,
            vip: None,
        };
        assert_eq!(parse_request(&serde_json::to_string(&bare).unwrap()), Ok(bare));
        let line = r#"{"op":"explain","service":"web6","client":"[2001:db8::5]:40000","vip":"2001:db8:ff::1"}"#;
        let v6 = Request::Explain {
            service: "web6".into(),
            client: "[2001:db8::5]:40000".parse().unwrap(),
            protocol: None,
            vip: Some("2001:db8:ff::1".parse().unwrap()),
        };
        assert_eq!(parse_request(line), Ok(v6));
        for (line, says) in [
            (r#"{"op":"explain","service":"web"}"#, "needs \"client\""),
            (r#"{"op":"explain","service":"web","client":"10.0.9.2"}"#, "client: \"10.0.9.2\""),
            (r#"{"op":"explain","service":"web","client":"10.0.9.2:1","protocol":"sctp"}"#, "protocol: \"sctp\""),
            (r#"{"op":"explain","service":"web","client":"10.0.9.2:1","vip":"x"}"#, "vip: \"x\""),
            (r#"{"op":"status","client":"10.0.9.2:1"}"#, "status takes no \"client\""),
        ] {
            let err = parse_request(line).unwrap_err();
            assert!(err.contains(says), "{line}: {err}");
        }
    }

    #[test]
    fn scaling_requests_parse_as_the_client_sends_them() {
        for req in [
            Request::PinReplicas { service: "web".into(), replicas: 3 },
            Request::PauseScaling { service: "web".into() },
            Request::ResumeScaling { service: "web".into() },
        ] {
            let line = serde_json::to_string(&req).unwrap();
            assert_eq!(parse_request(&line), Ok(req), "{line}");
        }
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        for (bad, says) in [
            ("hello", "expected value"),
            (r#"{"op":"explode"}"#, "op: unknown \"explode\""),
            (r#"{"op":"add_backend","service":"web","address":"10.0.0.1"}"#, "address: \"10.0.0.1\" is not an IPv4"),
            (r#"{"op":"add_backend","service":"web","address":"10.0.0.1:80","wieght":2}"#, "unknown field `wieght`"),
            (r#"{"op":"set_weight","service":"web","address":"10.0.0.1:80","weight":-1}"#, "weight: -1 is not in"),
            (r#"{"op":"set_weight","service":"web","address":"10.0.0.1:80"}"#, "set_weight needs \"weight\""),
            (r#"{"op":"remove_backend","address":"10.0.0.1:80"}"#, "remove_backend needs \"service\""),
            (r#"{"op":"status","service":"web"}"#, "status takes no \"service\""),
            (r#"{"op":"status"} trailing"#, "trailing characters"),
            (r#"{"op":"pin_replicas","service":"web"}"#, "pin_replicas needs \"replicas\""),
            (r#"{"op":"pin_replicas","service":"web","replicas":-2}"#, "replicas: -2 is not a count"),
            (r#"{"op":"pause_scaling","service":"web","replicas":2}"#, "pause_scaling takes no \"replicas\""),
            (r#"{"op":"resume_scaling"}"#, "resume_scaling needs \"service\""),
        ] {
            let err = parse_request(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn socket_round_trip_and_refusal() {
        let dir = std::env::temp_dir().join(format!("lb-api-test-{}", std::process::id()));
        let path = dir.join("s.sock");
        let listener = bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second agent on the same socket is refused.
        assert!(bind(&path).await.unwrap_err().to_string().contains("already listening"));
        let (tx, mut rx) = mpsc::channel::<Call>(4);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some((req, reply)) = rx.recv().await {
                let _ = reply.send(Response::ok(format!("{req:?}")));
            }
        });
        let r = call(&path, &Request::Reload).await.unwrap();
        assert_eq!(r.message.as_deref(), Some("Reload"));
        // Raw garbage gets an error line, and the connection stays usable.
        let s = UnixStream::connect(&path).await.unwrap();
        let (read, mut write) = s.into_split();
        let mut lines = BufReader::new(read).lines();
        write.write_all(b"{nope\n{\"op\":\"status\"}\n").await.unwrap();
        let first: Response = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert!(!first.ok && first.error.unwrap().starts_with("bad request"));
        let second: Response = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        assert!(second.ok);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_a_directory_of_our_own_that_others_cannot_write_holds_the_socket() {
        let dir = |is_dir, uid, mode| DirFacts { is_dir, uid, mode };
        for ok in [dir(true, 0, 0o40700), dir(true, 0, 0o40750), dir(true, 0, 0o40755)] {
            assert_eq!(judge_dir(&ok, 0), Ok(()), "{ok:?}");
        }
        for (bad, says) in [
            (dir(true, 0, 0o41777), "others can write"),
            (dir(true, 0, 0o40770), "mode 0770"),
            (dir(true, 1000, 0o40700), "owned by uid 1000"),
            (dir(false, 0, 0o120777), "not a directory"),
        ] {
            let e = judge_dir(&bad, 0).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[tokio::test]
    async fn a_missing_directory_is_made_0700_and_a_shared_one_is_refused_untouched() {
        let base = std::env::temp_dir().join(format!("lb-api-dir-test-{}", std::process::id()));
        let path = base.join("new").join("s.sock");
        let listener = bind(&path).await.unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&path), 0o600);
        drop(listener);
        let shared = base.join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = format!("{:#}", bind(&shared.join("s.sock")).await.unwrap_err());
        assert!(e.contains("others can write"), "{e}");
        assert_eq!(mode(&shared), 0o1777, "an existing directory's mode was changed");
        assert!(!shared.join("s.sock").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn the_socket_is_made_under_a_umask_that_keeps_others_out() {
        let base = std::env::temp_dir().join(format!("lb-api-umask-test-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let path = base.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let mode = with_umask(0o177, || {
            let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
            let m = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            drop(l);
            m
        });
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[tokio::test]
    async fn no_agent_is_said_plainly() {
        let err = call(Path::new("/nonexistent/lb.sock"), &Request::Status).await.unwrap_err();
        assert!(err.to_string().contains("no lb-agent is running"), "{err}");
    }
}
