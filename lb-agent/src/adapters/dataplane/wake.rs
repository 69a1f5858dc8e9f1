//! Reading `WAKE_EVENTS`, the ring buffer where the program reports clients
//! waiting for a service that scales from zero: a task woken by the ring's
//! fd (epoll through tokio's `AsyncFd`), no polling.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use lb_common::WakeEvent;
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::warn;

use crate::ports::Wake;

/// Start the reader of `ring`; its reports arrive on the returned channel.
pub fn start(ring: RingBuf<MapData>) -> mpsc::Receiver<Wake> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        if let Err(e) = read(ring, tx).await {
            warn!(error = %e, "reading the wake-from-zero events failed; services at zero wake at the next tick only");
        }
    });
    rx
}

async fn read(ring: RingBuf<MapData>, tx: mpsc::Sender<Wake>) -> std::io::Result<()> {
    // SAFETY: the AsyncFd owns the ring, and the ring its fd, for as long
    // as the registration lasts; nothing else closes it.
    let mut fd = unsafe { AsyncFd::register(ring)? };
    loop {
        let mut guard = fd.readable_mut().await?;
        let mut got = Vec::new();
        while let Some(item) = guard.get_inner_mut().next() {
            if let Some(event) = parse(&item) {
                got.push(event);
            }
        }
        guard.clear_ready();
        let now = monotonic_ns();
        for e in got {
            let wake = Wake { service_id: e.service_id, waited: Duration::from_nanos(now.saturating_sub(e.at_ns)) };
            if tx.send(wake).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// One record as the program wrote it; `None` if it is not one.
pub fn parse(bytes: &[u8]) -> Option<WakeEvent> {
    (bytes.len() == size_of::<WakeEvent>()).then(|| {
        // SAFETY: exactly a WakeEvent's bytes; any bit pattern is one.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<WakeEvent>()) }
    })
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
