//! The agent's `/metrics`, reachable from the user's shell while the demo
//! runs: on `127.0.0.1:<port>` of the host's namespace, the first free port
//! from 9642 (9641 is a default agent's). With Docker the agent runs in the
//! host's namespace and listens there itself; with processes it runs in the
//! demo's LB namespace, listening on its own loopback, and a small relay
//! here carries each connection from the host's loopback into it.

use std::{
    io,
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::Context as _;
use lb_lab::netns::NetNs;

/// Ports tried for the host's side, in order.
const PORTS: std::ops::RangeInclusive<u16> = 9642..=9660;
/// Where the agent listens inside the LB namespace (its loopback is its own).
pub(crate) const IN_NAMESPACE: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9641));

/// A listener on the first free port of [`PORTS`] on the host's loopback.
pub(crate) fn bind_free_port() -> anyhow::Result<TcpListener> {
    PORTS
        .clone()
        .find_map(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).ok())
        .with_context(|| format!("no free port in 127.0.0.1:{}-{} for the metrics", PORTS.start(), PORTS.end()))
}

/// Relays connections from `listener` (host's namespace) to `target` inside
/// the namespace `netns`, until dropped.
pub(crate) struct Relay {
    pub(crate) addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Relay {
    pub(crate) fn start(listener: TcpListener, netns: &str, target: SocketAddr) -> anyhow::Result<Relay> {
        let addr = listener.local_addr()?;
        // Polled, so that the thread sees `stop` between connections.
        listener.set_nonblocking(true)?;
        let ns = NetNs::open(netns)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        thread::Builder::new().name("metrics-relay".into()).spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => relay_one(client, &ns, target),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(100)),
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        })?;
        Ok(Relay { addr, stop })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One connection: a socket made inside the namespace (it stays there),
/// then bytes copied both ways until either side closes.
fn relay_one(client: TcpStream, ns: &NetNs, target: SocketAddr) {
    let Ok(Ok(upstream)) = ns.try_run(|| TcpStream::connect_timeout(&target, Duration::from_secs(2))) else {
        return;
    };
    let _ = client.set_nonblocking(false);
    let (Ok(client_r), Ok(upstream_w)) = (client.try_clone(), upstream.try_clone()) else { return };
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
    };
    let _ = thread::Builder::new().spawn(move || pipe(client_r, upstream_w));
    let _ = thread::Builder::new().spawn(move || pipe(upstream, client));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_port_is_found_in_the_range() {
        let first = bind_free_port().unwrap();
        let second = bind_free_port().unwrap();
        let (a, b) = (first.local_addr().unwrap().port(), second.local_addr().unwrap().port());
        assert!(PORTS.contains(&a) && PORTS.contains(&b) && a != b, "{a} {b}");
    }
}
