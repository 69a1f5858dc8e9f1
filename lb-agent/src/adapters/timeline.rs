//! The scaling timeline (`[service.instances] timeline`): every decision
//! appended to a file as one JSON line, for charts and post-mortems. A
//! writer task appends the lines in the order they were recorded, each
//! write on tokio's blocking pool: a slow disk never holds up the agent's
//! loop. Before a line would take the file past `timeline_max_bytes`, the
//! file is rotated (`<file>` to `<file>.1`, `.1` to `.2`, up to
//! `timeline_keep`): rotation happens only between whole lines, and the
//! writer is the file's only writer, so no line is ever split.

use std::{
    ffi::OsString,
    fs::File,
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Serialize;
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::warn;

use crate::{config::instances::TimelineRotation, core::policy::Decision};

/// One service's timeline file and the task that writes it.
pub struct Timeline {
    service: String,
    lines: mpsc::UnboundedSender<String>,
    writer: JoinHandle<()>,
}

impl Timeline {
    /// Start the writer of `service`'s timeline at `path`.
    pub fn open(path: PathBuf, rotation: TimelineRotation, service: &str) -> Timeline {
        let (lines, rx) = mpsc::unbounded_channel();
        Timeline { service: service.to_owned(), lines, writer: tokio::spawn(write_lines(Arc::new(path), rotation, rx)) }
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

async fn write_lines(path: Arc<PathBuf>, rotation: TimelineRotation, mut rx: mpsc::UnboundedReceiver<String>) {
    while let Some(mut text) = rx.recv().await {
        // Whatever queued up meanwhile goes in the same write.
        while let Ok(more) = rx.try_recv() {
            text.push_str(&more);
        }
        let p = path.clone();
        let written = tokio::task::spawn_blocking(move || append(&p, &text, rotation)).await;
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

/// Append `text` (whole lines), rotating the file between lines whenever
/// the next one would take it past the limit. A line longer than the limit
/// still goes in whole, alone in a fresh file.
fn append(path: &Path, text: &str, rotation: TimelineRotation) -> io::Result<()> {
    let mut file = open_for_append(path)?;
    let mut len = file.metadata()?.len();
    let mut pending = String::new();
    for line in text.split_inclusive('\n') {
        let before = len + pending.len() as u64;
        if before > 0 && before + line.len() as u64 > rotation.max_bytes {
            file.write_all(pending.as_bytes())?;
            pending.clear();
            drop(file);
            rotate(path, rotation.keep)?;
            file = open_for_append(path)?;
            len = 0;
        }
        pending.push_str(line);
    }
    file.write_all(pending.as_bytes())
}

fn open_for_append(path: &Path) -> io::Result<File> {
    File::options().create(true).append(true).open(path)
}

/// `path` becomes `path.1`, `path.1` becomes `path.2`, ..., and
/// `path.<keep>` is overwritten; with `keep` 0, `path` is removed.
fn rotate(path: &Path, keep: u32) -> io::Result<()> {
    if keep == 0 {
        return std::fs::remove_file(path);
    }
    for n in (1..keep).rev() {
        match std::fs::rename(rotated(path, n), rotated(path, n + 1)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::rename(path, rotated(path, 1))
}

/// `path.<n>`: the `n`th newest rotated file.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!(".{n}"));
    name.into()
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
        let t = Timeline::open(path.clone(), TimelineRotation { max_bytes: 64 << 20, keep: 2 }, "web");
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

    /// The `unix_time` of each line of `path` (none if it is missing);
    /// panics on a line that is not whole JSON.
    fn times_in(path: &Path) -> Vec<u64> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        assert!(text.is_empty() || text.ends_with('\n'), "{} ends mid-line", path.display());
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["unix_time"].as_f64().unwrap() as u64)
            .collect()
    }

    #[tokio::test]
    async fn the_file_rotates_at_its_limit_between_whole_lines() {
        let dir = crate::testing::scratch_dir("timeline-rotate");
        let path = dir.join("t.jsonl");
        let p = policy("min_replicas = 1\nmax_replicas = 1");
        let d = decide(&MetricsSnapshot::default(), &p, &History::for_policy(&p), tokio::time::Instant::now());
        let line_len = line(100.0, "web", &d).unwrap().len() as u64;
        // Three lines and a half per file.
        let max_bytes = line_len * 7 / 2;
        let t = Timeline::open(path.clone(), TimelineRotation { max_bytes, keep: 2 }, "web");
        for i in 100..120 {
            t.record(f64::from(i), &d);
        }
        t.close().await;
        let files = [rotated(&path, 2), rotated(&path, 1), path.clone()];
        for f in &files {
            let size = std::fs::metadata(f).unwrap().len();
            assert!(size <= max_bytes, "{} holds {size} bytes, above {max_bytes}", f.display());
        }
        assert!(!rotated(&path, 3).exists(), "only two old files are kept");
        // The newest lines, in order and none cut, across .2, .1 and the file.
        let kept: Vec<u64> = files.iter().flat_map(|f| times_in(f)).collect();
        assert_eq!(kept, (120 - kept.len() as u64..120).collect::<Vec<_>>());
        assert_eq!(times_in(&rotated(&path, 1)), [115, 116, 117], "three lines fit a file");
        assert_eq!(times_in(&path), [118, 119]);

        // A file already there (a restarted agent's) counts: it fills up,
        // then rotates; with keep = 0 its old lines go.
        std::fs::remove_file(rotated(&path, 1)).unwrap();
        let t = Timeline::open(path.clone(), TimelineRotation { max_bytes, keep: 0 }, "web");
        t.record(200.0, &d);
        t.record(201.0, &d);
        t.close().await;
        assert_eq!(times_in(&path), [201]);
        assert!(!rotated(&path, 1).exists());
        assert_eq!(times_in(&rotated(&path, 2)), [112, 113, 114], "untouched");

        // A line longer than the limit still goes in whole, alone.
        let t = Timeline::open(path.clone(), TimelineRotation { max_bytes: line_len / 2, keep: 1 }, "web");
        t.record(300.0, &d);
        t.record(301.0, &d);
        t.close().await;
        assert_eq!((times_in(&rotated(&path, 1)), times_in(&path)), (vec![300], vec![301]));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
