//! Health probes: a TCP connect, or an HTTP/1.1 GET whose status must match.
//! Each probe is bounded by the check's timeout as a whole.

use std::net::SocketAddrV4;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout,
};

use crate::config::{CheckKind, HealthCheckConfig};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("http: {0}")]
    Io(#[source] std::io::Error),
    #[error("http: status {got}, expected {want}")]
    Status { got: u16, want: u16 },
    #[error("http: malformed status line {0:?}")]
    Malformed(String),
}

/// Probe one backend once.
pub async fn probe(addr: SocketAddrV4, check: &HealthCheckConfig) -> Result<(), ProbeError> {
    let limit = check.timeout();
    timeout(limit, probe_unbounded(addr, check)).await.map_err(|_| ProbeError::Timeout(limit))?
}

async fn probe_unbounded(addr: SocketAddrV4, check: &HealthCheckConfig) -> Result<(), ProbeError> {
    let mut stream = TcpStream::connect(addr).await.map_err(ProbeError::Connect)?;
    if check.kind == CheckKind::Tcp {
        return Ok(());
    }
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: lb-agent/{}\r\nConnection: close\r\n\r\n",
        check.path,
        env!("CARGO_PKG_VERSION")
    );
    stream.write_all(request.as_bytes()).await.map_err(ProbeError::Io)?;
    let got = read_status(&mut stream).await?;
    if got == check.expect_status {
        Ok(())
    } else {
        Err(ProbeError::Status { got, want: check.expect_status })
    }
}

/// Read up to the end of the status line (at most 1 KiB) and parse its code.
async fn read_status(stream: &mut TcpStream) -> Result<u16, ProbeError> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        let n = stream.read(&mut chunk).await.map_err(ProbeError::Io)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or_default();
    parse_status_line(line).ok_or_else(|| ProbeError::Malformed(line.chars().take(80).collect()))
}

fn parse_status_line(line: &str) -> Option<u16> {
    let mut parts = line.split_ascii_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok().filter(|c| (100..=599).contains(c))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;

    fn check(kind: CheckKind, path: &str) -> HealthCheckConfig {
        HealthCheckConfig {
            kind,
            path: path.into(),
            expect_status: 200,
            interval: Duration::from_secs(1),
            timeout: Some(Duration::from_millis(300)),
            rise: 1,
            fall: 1,
        }
    }

    async fn local_addr(l: &TcpListener) -> SocketAddrV4 {
        match l.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("not v4: {other}"),
        }
    }

    /// A one-shot HTTP server that answers every request with `status`.
    async fn http_server(status: &'static str) -> SocketAddrV4 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = local_addr(&l).await;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /healthz HTTP/1.1\r\n"));
                let _ = s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn tcp_probe_connects_and_fails_on_a_closed_port() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = local_addr(&l).await;
        probe(addr, &check(CheckKind::Tcp, "/")).await.unwrap();
        drop(l);
        let err = probe(addr, &check(CheckKind::Tcp, "/")).await.unwrap_err();
        assert!(matches!(err, ProbeError::Connect(_)), "{err}");
    }

    #[tokio::test]
    async fn http_probe_checks_the_status() {
        probe(http_server("200 OK").await, &check(CheckKind::Http, "/healthz")).await.unwrap();
        let err =
            probe(http_server("503 Service Unavailable").await, &check(CheckKind::Http, "/healthz")).await.unwrap_err();
        assert!(matches!(err, ProbeError::Status { got: 503, want: 200 }), "{err}");
    }

    #[tokio::test]
    async fn http_probe_times_out_on_a_silent_server() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = local_addr(&l).await;
        // Accepts (the kernel does) but never answers.
        let err = probe(addr, &check(CheckKind::Http, "/healthz")).await.unwrap_err();
        assert!(matches!(err, ProbeError::Timeout(_)), "{err}");
        drop(l);
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 204 No Content"), Some(204));
        assert_eq!(parse_status_line("HTTP/1.0 500"), Some(500));
        assert_eq!(parse_status_line("SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status_line("HTTP/1.1 99 Odd"), None);
        assert_eq!(parse_status_line(""), None);
    }
}
