//! HTTP for the tests and tools, which are plain threads: the agent's own
//! hyper client (`lb_agent::adapters::http`), driven to completion on a
//! runtime of the calling thread's own (so it runs in whatever network
//! namespace that thread is in).

use std::{io, net::SocketAddrV4, time::Duration};

/// Bodies larger than this are cut (Prometheus API answers stay well below).
const MAX_BODY: usize = 16 << 20;

/// One GET of `path` on a new connection, connect included, within
/// `timeout`: the status and the body.
pub fn get(addr: SocketAddrV4, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (status, body) = runtime
        .block_on(lb_agent::adapters::http::fetch(addr.into(), path, MAX_BODY, timeout))
        .map_err(io::Error::other)?;
    let body = String::from_utf8(body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((status, body))
}

/// [`get`], expecting 200: the body.
pub fn get_ok(addr: SocketAddrV4, path: &str, timeout: Duration) -> io::Result<String> {
    match get(addr, path, timeout)? {
        (200, body) => Ok(body),
        (status, body) => Err(io::Error::other(format!("status {status}: {}", body.trim_end()))),
    }
}
