//! The scaling timeline (`[service.instances] timeline`): every decision
//! appended to a file as one JSON line, for charts and post-mortems. A
//! writer task appends the lines in the order they were recorded, each
//! write on tokio's blocking pool: a slow disk never holds up the agent's
//! loop.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::warn;

use crate::core::policy::Decision;

/// One service's timeline file and the task that writes it.
pub struct Timeline {
    service: String,
    lines: mpsc::UnboundedSender<String>,
    writer: JoinHandle<()>,
}

impl Timeline {
    /// Start the writer of `service`'s timeline at `path`.
    pub fn open(path: PathBuf, service: &str) -> Timeline {
        let (lines, rx) = mpsc::unbounded_channel();
        Timeline { service: service.to_owned(), lines, writer: tokio::spawn(write_lines(Arc::new(path), rx)) }
    }

    /// Queue `decision`, taken at `unix_time`, for the file.
    pub fn record(&self, unix_time: f64, decision: &Decision) {
        match line(unix_time, &self.service, decision) {
            // Fails only once the writer is gone, and it outlives `self`.
            Ok(l) => drop(self.lines.send(l)),
            Err(e) => warn!(service = self.service, error = %e, "serialising a timeline line failed"),
        }
    }

    /// Write what is queued, then end the writer.
    pub async fn close(self) {
        drop(self.lines);
        if let Err(e) = self.writer.await {
            warn!(service = self.service, error = %e, "the timeline writer failed");
        }
    }
}

async fn write_lines(path: Arc<PathBuf>, mut rx: mpsc::UnboundedReceiver<String>) {
    while let Some(mut text) = rx.recv().await {
        // Whatever queued up meanwhile goes in the same write.
        while let Ok(more) = rx.try_recv() {
            text.push_str(&more);
        }
        let p = path.clone();
        let written = tokio::task::spawn_blocking(move || append(&p, &text)).await;
        if let Some(e) = match written {
            Ok(r) => r.err(),
            Err(join) => Some(std::io::Error::other(join)),
        } {
            warn!(error = %e, path = %path.display(), "writing the timeline failed");
        }
    }
}

/// One decision as a JSON line (newline included).
fn line(unix_time: f64, service: &str, decision: &Decision) -> serde_json::Result<String> {
    #[derive(Serialize)]
    struct Line<'a> {
        unix_time: f64,
        service: &'a str,
        #[serde(flatten)]
        decision: &'a Decision,
    }
    serde_json::to_string(&Line { unix_time, service, decision }).map(|l| l + "\n")
}

fn append(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::scaling::tests::policy,
        core::policy::{decide, History, MetricsSnapshot},
    };

    #[tokio::test]
    async fn lines_are_written_in_order_and_close_flushes_them() {
        let dir = crate::testing::scratch_dir("timeline");
        let path = dir.join("t.jsonl");
        let p = policy("min_replicas = 1\nmax_replicas = 1");
        let now = tokio::time::Instant::now();
        let d = decide(&MetricsSnapshot::default(), &p, &History::for_policy(&p), now);
        let t = Timeline::open(path.clone(), "web");
        for i in 0..50 {
            t.record(i as f64, &d);
        }
        t.close().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let times: Vec<f64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["unix_time"].as_f64().unwrap())
            .collect();
        assert_eq!(times, (0..50).map(f64::from).collect::<Vec<_>>());
        assert!(text.lines().all(|l| l.contains(r#""service":"web""#) && l.contains(r#""rule":"min replicas""#)));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
