//! The connection-table worker: walks (`scan`) and flushes run here, one at a
//! time on tokio's blocking pool, never on the agent's loop. A walk of a
//! full table reads 262k entries.
//!
//! Walks are asked for with [`FlowWorker::request_scan`], which returns a
//! ticket; each result carries the highest ticket asked for before its walk
//! began, so a result answers every ticket up to its own. Flushes go first
//! when both wait, and results come back in the order the work was done.

use std::sync::Arc;

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::ports::{ConnectionTable, ConntrackScan};

/// Why a backend's flows are flushed: what the agent does once they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlushFor {
    /// Its drain ended; `expired` when the deadline passed with flows open.
    Drain { service: String, addr: std::net::SocketAddr, expired: bool },
    /// Its instance exited.
    Exited { addr: std::net::SocketAddr },
    /// A UDP backend failed its checks.
    Down { addr: std::net::SocketAddr },
}

/// What the worker reports back to the agent's loop.
pub enum FlowReport {
    Scanned { ticket: u64, result: anyhow::Result<Arc<ConntrackScan>> },
    Flushed { backend_id: u32, why: FlushFor, result: anyhow::Result<u64> },
}

struct Flush {
    backend_id: u32,
    why: FlushFor,
}

/// The agent's handle on the worker; the worker stops when this is dropped.
pub struct FlowWorker {
    tickets: watch::Sender<u64>,
    flushes: mpsc::UnboundedSender<Flush>,
    task: JoinHandle<()>,
}

impl FlowWorker {
    pub fn start(table: Arc<dyn ConnectionTable>, reports: mpsc::Sender<FlowReport>) -> FlowWorker {
        let (tickets, ticket_rx) = watch::channel(0);
        let (flushes, flush_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(work(table, ticket_rx, flush_rx, reports));
        FlowWorker { tickets, flushes, task }
    }

    /// Ask for a walk that starts from now on; returns its ticket.
    pub fn request_scan(&self) -> u64 {
        self.tickets.send_modify(|t| *t += 1);
        *self.tickets.borrow()
    }

    /// The last ticket given out: a result with a higher one comes from a
    /// walk that began after this call.
    pub fn last_ticket(&self) -> u64 {
        *self.tickets.borrow()
    }

    /// Flush `backend_id`'s flows; reported back with `why`.
    pub fn flush(&self, backend_id: u32, why: FlushFor) {
        // Fails only once the worker is gone, which `Drop` alone does.
        let _ = self.flushes.send(Flush { backend_id, why });
    }
}

impl Drop for FlowWorker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn work(
    table: Arc<dyn ConnectionTable>,
    mut tickets: watch::Receiver<u64>,
    mut flushes: mpsc::UnboundedReceiver<Flush>,
    reports: mpsc::Sender<FlowReport>,
) {
    loop {
        let report = tokio::select! {
            biased;
            Some(Flush { backend_id, why }) = flushes.recv() => {
                let t = table.clone();
                let result = blocking(move || t.flush_backend(backend_id)).await;
                FlowReport::Flushed { backend_id, why, result }
            }
            Ok(()) = tickets.changed() => {
                let ticket = *tickets.borrow_and_update();
                let t = table.clone();
                let result = blocking(move || t.scan()).await.map(Arc::new);
                FlowReport::Scanned { ticket, result }
            }
            else => return,
        };
        if reports.send(report).await.is_err() {
            return;
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::ports::DataplaneError> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(f).await??)
}
