//! The agent's HTTP client: one GET on a fresh connection, with hyper's
//! HTTP/1.1 client over a `TcpStream` connected here. Health probes and
//! request-rate scrapes share it.

use std::{future::Future, net::SocketAddr, pin::pin, time::Duration};

use http_body_util::{BodyExt as _, Empty};
use hyper::{body::Bytes, client::conn::http1, header, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// `User-Agent` of the agent's requests.
const USER_AGENT: &str = concat!("lb-agent/", env!("CARGO_PKG_VERSION"));

#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("http: bad request target {path:?}")]
    Target {
        path: String,
        #[source]
        source: hyper::http::Error,
    },
    #[error("http: {0}")]
    Http(#[source] hyper::Error),
    #[error("http: status {got}, expected {want}")]
    Status { got: u16, want: u16 },
}

/// Connects to `addr` within `limit`: all a TCP health check does.
pub async fn connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream, GetError> {
    within(limit, async { TcpStream::connect(addr).await.map_err(GetError::Connect) }).await
}

/// GETs `path` from `addr` on a new connection (`Connection: close`),
/// connect included, within `limit`, and expects the status `want`. Returns
/// at most `max_body` bytes of the body and leaves the rest unread (0: only
/// the status matters).
pub async fn get(
    addr: SocketAddr,
    path: &str,
    want: u16,
    max_body: usize,
    limit: Duration,
) -> Result<Vec<u8>, GetError> {
    let (got, body) = fetch(addr, path, max_body, limit).await?;
    if got == want {
        Ok(body)
    } else {
        Err(GetError::Status { got, want })
    }
}

/// GETs `path` from `addr` as [`get`] does, whatever the status: the
/// status and at most `max_body` bytes of the body.
pub async fn fetch(addr: SocketAddr, path: &str, max_body: usize, limit: Duration) -> Result<(u16, Vec<u8>), GetError> {
    within(limit, get_unbounded(addr, path, max_body)).await
}

async fn within<T>(limit: Duration, f: impl Future<Output = Result<T, GetError>>) -> Result<T, GetError> {
    tokio::time::timeout(limit, f).await.map_err(|_| GetError::Timeout(limit))?
}

/// The status and the first `max_body` bytes of the body.
async fn get_unbounded(addr: SocketAddr, path: &str, max_body: usize) -> Result<(u16, Vec<u8>), GetError> {
    let request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .header(header::USER_AGENT, USER_AGENT)
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|source| GetError::Target { path: path.to_owned(), source })?;
    let stream = TcpStream::connect(addr).await.map_err(GetError::Connect)?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(GetError::Http)?;
    let exchange = async {
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut bytes = Vec::new();
        while bytes.len() < max_body {
            let Some(frame) = body.frame().await else { break };
            if let Ok(data) = frame?.into_data() {
                bytes.extend_from_slice(&data[..data.len().min(max_body - bytes.len())]);
            }
        }
        Ok((status, bytes))
    };
    // `conn` does the connection's I/O: poll it beside the exchange, and
    // drop it (closing the socket) as soon as the exchange is done.
    let mut conn = pin!(conn);
    tokio::select! {
        biased;
        reply = exchange => reply.map_err(GetError::Http),
        Err(e) = &mut conn => Err(GetError::Http(e)),
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// A server that answers one connection with `answer`, whatever it got.
    async fn answer_once(answer: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let std::net::SocketAddr::V4(addr) = listener.local_addr().unwrap() else { unreachable!() };
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
            assert!(request.starts_with("get /x http/1.1\r\n"), "{request}");
            assert!(request.contains(&format!("\r\nhost: {addr}\r\n")), "{request}");
            assert!(request.contains("\r\nconnection: close\r\n"), "{request}");
            let _ = s.write_all(answer.as_bytes()).await;
        });
        addr.into()
    }

    #[tokio::test]
    async fn get_checks_the_status_and_reads_at_most_max_body() {
        let page = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789";
        let body = get(answer_once(page).await, "/x", 200, 4, Duration::from_secs(2)).await.unwrap();
        assert_eq!(body, b"0123");
        let body = get(answer_once(page).await, "/x", 200, 1 << 20, Duration::from_secs(2)).await.unwrap();
        assert_eq!(body, b"0123456789");
        let err = get(answer_once(page).await, "/x", 204, 0, Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, GetError::Status { got: 200, want: 204 }), "{err}");
    }

    #[tokio::test]
    async fn get_refuses_what_is_not_http() {
        let not_http = answer_once("SSH-2.0-OpenSSH_9.2\r\n").await;
        let err = get(not_http, "/x", 200, 0, Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, GetError::Http(_)), "{err}");
        let err = get("127.0.0.1:9".parse().unwrap(), "no slash", 200, 0, Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, GetError::Target { .. }), "{err}");
    }
}
