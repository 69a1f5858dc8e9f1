//! The servers the bench runs, from Debian's packages: nginx as the HTTP
//! backend, and the two peers in the LB namespace, HAProxy (tcp mode) and
//! NGINX `stream`, each with one thread.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddrV4,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use lb_lab::netns::NetNs;

use crate::proc::Proc;

/// Where Debian's libnginx-mod-stream puts the module.
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// What every nginx here shares: one process that serves (no master, so
/// that nothing outlives the pid the bench stops; with one worker that is
/// the same work), its files under `dir`.
fn nginx_head(dir: &Path, modules: &str) -> String {
    let d = dir.display();
    format!(
        "# Written by lb-bench-e2e.\n{modules}worker_processes 1;\nmaster_process off;\ndaemon off;\n\
         pid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nworker_rlimit_nofile 16384;\n\
         events {{ worker_connections 8192; }}\n"
    )
}

/// An HTTP backend answering every request with `200 <name>\n`.
pub fn nginx_backend_conf(dir: &Path, name: &str, listen: SocketAddrV4) -> String {
    let d = dir.display();
    let mut s = nginx_head(dir, "");
    let temp: String = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .iter()
        .map(|t| format!("    {t}_temp_path {d}/{t};\n"))
        .collect();
    let _ = write!(
        s,
        "http {{\n    access_log off;\n{temp}\
         \x20   # nginx ends a keep-alive connection after 1000 requests by default.\n\
         \x20   keepalive_requests 1000000;\n    keepalive_timeout 60s;\n\
         \x20   server {{\n        listen {listen} backlog=4096;\n        default_type text/plain;\n\
         \x20       location / {{ return 200 \"{name}\\n\"; }}\n    }}\n}}\n"
    );
    s
}

/// NGINX `stream`: a TCP proxy from `listen` to `upstreams`, round robin.
pub fn nginx_stream_conf(dir: &Path, listen: SocketAddrV4, upstreams: &[SocketAddrV4]) -> String {
    let mut s = nginx_head(dir, &format!("load_module {NGINX_STREAM_MODULE};\n"));
    let servers: String = upstreams.iter().map(|u| format!("        server {u};\n")).collect();
    let _ = write!(
        s,
        "stream {{\n    upstream backends {{\n{servers}    }}\n\
         \x20   server {{\n        listen {listen} backlog=4096;\n        proxy_pass backends;\n    }}\n}}\n"
    );
    s
}

/// HAProxy in tcp mode, one thread: `listen` to `upstreams`, round robin.
pub fn haproxy_conf(listen: SocketAddrV4, upstreams: &[SocketAddrV4]) -> String {
    let servers: String = upstreams.iter().enumerate().map(|(i, u)| format!("    server b{} {u}\n", i + 1)).collect();
    format!(
        "# Written by lb-bench-e2e.\nglobal\n    nbthread 1\n    maxconn 4096\n\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 1m\n    timeout server 1m\n\n\
         frontend bench\n    bind {listen}\n    default_backend backends\n\n\
         backend backends\n    balance roundrobin\n{servers}"
    )
}

/// Starts nginx in `ns` with `conf`, its files in `dir` (made here).
pub fn start_nginx(ns: &NetNs, name: &str, dir: &Path, conf: &str) -> Result<Proc> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("nginx.conf");
    fs::write(&path, conf).with_context(|| format!("write {}", path.display()))?;
    let d = dir.display().to_string();
    let args = [
        "-p".to_owned(),
        d.clone(),
        "-e".to_owned(),
        format!("{d}/error.log"),
        "-c".to_owned(),
        path.display().to_string(),
    ];
    Proc::spawn_in(ns, name, "nginx", &args, &dir.join("stdout.log"))
}

/// Starts HAProxy in `ns` with `conf` (in the foreground: `-db`).
pub fn start_haproxy(ns: &NetNs, dir: &Path, conf: &str) -> Result<Proc> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("haproxy.cfg");
    fs::write(&path, conf).with_context(|| format!("write {}", path.display()))?;
    let args = ["-db".to_owned(), "-f".to_owned(), path.display().to_string()];
    Proc::spawn_in(ns, "haproxy", "haproxy", &args, &dir.join("haproxy.log"))
}

/// One `GET /` to `addr` on a new connection; the response body.
fn http_get(addr: SocketAddrV4) -> std::io::Result<String> {
    lb_lab::http::get_ok(addr, "/", Duration::from_secs(1)).map(|body| body.trim_end().to_owned())
}

/// Waits (at most 10 s) until `GET /` to `addr` from `client` is answered
/// with 200, and returns the body (the backend's name). Fails early if
/// `server` exits.
pub fn wait_http(client: &NetNs, addr: SocketAddrV4, mut server: Option<&mut Proc>, log: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let last = match client.try_run(|| http_get(addr)).context("enter the client namespace")? {
            Ok(body) => return Ok(body),
            Err(e) => e,
        };
        if let Some(p) = server.as_deref_mut() {
            if let Some(status) = p.try_wait()? {
                bail!("{} {status} before it answered on {addr}; its log:\n{}", p.name(), read_log(log));
            }
        }
        if Instant::now() >= deadline {
            bail!("no answer from {addr} within 10 s (last: {last}); log {}:\n{}", log.display(), read_log(log));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn addr(i: u8, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 200, i, 2), port)
    }

    #[test]
    fn configs_name_every_address() {
        let dir = Path::new("/tmp/x");
        let b = nginx_backend_conf(dir, "web-1", addr(1, 8080));
        assert!(b.contains("listen 10.200.1.2:8080 backlog=4096;"), "{b}");
        assert!(b.contains("return 200 \"web-1\\n\";"), "{b}");
        assert!(b.contains("client_body_temp_path /tmp/x/client_body;"), "{b}");
        let ups = [addr(1, 8080), addr(2, 8080)];
        let s = nginx_stream_conf(dir, addr(0, 80), &ups);
        assert!(s.starts_with("# Written by lb-bench-e2e.\nload_module "), "{s}");
        assert!(s.contains("server 10.200.1.2:8080;\n        server 10.200.2.2:8080;"), "{s}");
        let h = haproxy_conf(addr(0, 80), &ups);
        assert!(h.contains("bind 10.200.0.2:80\n"), "{h}");
        assert!(h.contains("server b2 10.200.2.2:8080\n"), "{h}");
        assert!(h.contains("nbthread 1") && h.contains("mode tcp"), "{h}");
    }
}
