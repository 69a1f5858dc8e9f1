//! Health probes: a TCP connect, or an HTTP/1.1 GET whose status must match.
//! Each probe is bounded by the check's timeout as a whole.

use std::net::SocketAddr;

use crate::{
    adapters::{
        dsr_probe::{self, DsrProbeError},
        http::{self, GetError},
    },
    config::{CheckKind, HealthCheckConfig, Protocol},
    ports::{ProbeError, Prober},
};

/// The real prober: [`probe`] over the network.
pub struct NetProber;

impl Prober for NetProber {
    async fn probe(&self, addr: SocketAddr, check: &HealthCheckConfig) -> Result<(), ProbeError> {
        probe(addr, check).await
    }

    fn is_timeout(&self, error: &ProbeError) -> bool {
        matches!(error.downcast_ref::<GetError>(), Some(GetError::Timeout(_)))
            || error.downcast_ref::<DsrProbeError>().is_some_and(DsrProbeError::is_timeout)
    }
}

/// Probe one backend once. Through the tunnel first for a `dsr-ipip`
/// service (`through_tunnel`): for a TCP service with a TCP check that is
/// the whole check (the SYN-ACK came from VIP:port); a UDP service's echo
/// proves the tunnel and the VIP only, so its check follows.
pub async fn probe(addr: SocketAddr, check: &HealthCheckConfig) -> Result<(), ProbeError> {
    let limit = check.timeout();
    if let Some(tunnel) = check.through_tunnel {
        dsr_probe::probe(addr.ip(), tunnel, limit).await?;
        if check.kind == CheckKind::Tcp && tunnel.protocol == Protocol::Tcp {
            return Ok(());
        }
    }
    Ok(probe_direct(addr, check).await?)
}

/// Probe one backend at its own address.
pub async fn probe_direct(addr: SocketAddr, check: &HealthCheckConfig) -> Result<(), GetError> {
    let limit = check.timeout();
    if check.kind == CheckKind::Tcp {
        http::connect(addr, limit).await?;
    } else {
        // Only the status counts: no byte of the body is read.
        http::get(addr, &check.path, check.expect_status, 0, limit).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

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
            through_tunnel: None,
        }
    }

    async fn local_addr(l: &TcpListener) -> SocketAddr {
        match l.local_addr().unwrap() {
            a @ std::net::SocketAddr::V4(_) => a,
            other => panic!("not v4: {other}"),
        }
    }

    /// A one-shot HTTP server that answers every request with `status`.
    async fn http_server(status: &'static str) -> SocketAddr {
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
        probe_direct(addr, &check(CheckKind::Tcp, "/")).await.unwrap();
        drop(l);
        let err = probe_direct(addr, &check(CheckKind::Tcp, "/")).await.unwrap_err();
        assert!(matches!(err, GetError::Connect(_)), "{err}");
    }

    #[tokio::test]
    async fn http_probe_checks_the_status() {
        probe_direct(http_server("200 OK").await, &check(CheckKind::Http, "/healthz")).await.unwrap();
        let err = probe_direct(http_server("503 Service Unavailable").await, &check(CheckKind::Http, "/healthz"))
            .await
            .unwrap_err();
        assert!(matches!(err, GetError::Status { got: 503, want: 200 }), "{err}");
    }

    #[tokio::test]
    async fn http_probe_times_out_on_a_silent_server() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = local_addr(&l).await;
        // Accepts (the kernel does) but never answers.
        let err = NetProber.probe(addr, &check(CheckKind::Http, "/healthz")).await.unwrap_err();
        assert!(NetProber.is_timeout(&err), "not counted as a timeout: {err}");
        let bad =
            NetProber.probe(http_server("503 Service Unavailable").await, &check(CheckKind::Http, "/healthz")).await;
        assert!(!NetProber.is_timeout(&bad.unwrap_err()), "a bad answer counted as a timeout");
        let err = probe_direct(addr, &check(CheckKind::Http, "/healthz")).await.unwrap_err();
        assert!(matches!(err, GetError::Timeout(_)), "{err}");
        drop(l);
    }

    #[tokio::test]
    async fn http_probe_fails_on_an_answer_that_is_not_http() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = local_addr(&l).await;
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
            let _ = s.read(&mut [0u8; 1024]).await;
        });
        let err = probe_direct(addr, &check(CheckKind::Http, "/healthz")).await.unwrap_err();
        assert!(matches!(err, GetError::Http(_)), "{err}");
        assert!(err.to_string().starts_with("http: "), "{err}");
    }
}
