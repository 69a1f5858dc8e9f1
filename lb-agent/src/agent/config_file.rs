//! Watching and reading the config file safely: a change is seen even when
//! the mtime did not move (same-second writes, a restored mtime, a file
//! renamed over it), a file read while it was being written is never taken,
//! and one that a writer is still filling in place is not taken until it
//! holds still (a file renamed over it is taken at once).

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash as _, Hasher as _},
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use crate::config::{Config, ConfigError};

/// What the agent saw of its config file: any difference is a change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSeen {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    /// Of the contents, so an in-place rewrite of the same size with the
    /// same mtime is seen too.
    hash: u64,
}

impl FileSeen {
    /// The file as it is now; `None` if it cannot be read.
    pub fn of(path: &Path) -> Option<FileSeen> {
        read(path).ok().map(|(_, seen)| seen)
    }

    fn new(meta: &std::fs::Metadata, bytes: &[u8]) -> FileSeen {
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        FileSeen { hash: h.finish(), ..stat(meta) }
    }
}

fn stat(meta: &std::fs::Metadata) -> FileSeen {
    FileSeen {
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        hash: 0,
    }
}

/// The file's bytes, and what they were read from.
fn read(path: &Path) -> std::io::Result<(Vec<u8>, FileSeen)> {
    let bytes = std::fs::read(path)?;
    let seen = FileSeen::new(&std::fs::metadata(path)?, &bytes);
    Ok((bytes, seen))
}

/// Tells the loop when the file changed and held still for a tick.
#[derive(Debug, Default)]
pub struct Watch {
    /// The version last acted on (reloaded, or seen at start).
    taken: Option<FileSeen>,
    /// A different version seen at the last look (`Some(None)`: the file
    /// was gone or unreadable), not yet acted on.
    settling: Option<Option<FileSeen>>,
}

impl Watch {
    pub fn new(now: Option<FileSeen>) -> Watch {
        Watch { taken: now, settling: None }
    }

    /// Look at the file as it is `now`: true when it differs from the
    /// version last taken and is the same as at the last look (a writer
    /// that is still filling the file changes it between two looks), or is
    /// another file renamed over it (written whole elsewhere first).
    pub fn changed(&mut self, now: Option<FileSeen>) -> bool {
        if now == self.taken {
            self.settling = None;
            return false;
        }
        let renamed = match (&now, &self.taken) {
            (Some(n), Some(t)) => (n.dev, n.ino) != (t.dev, t.ino),
            _ => false,
        };
        if renamed || self.settling.as_ref() == Some(&now) {
            self.taken = now;
            self.settling = None;
            return true;
        }
        self.settling = Some(now);
        false
    }
}

/// Read and parse the file for a reload. Refused: a file that changed
/// while it was read (a writer is at work), and one with no services (an
/// empty file, or one cut short before its first service): a reload never
/// takes every service away.
pub fn load_for_reload(path: &Path) -> anyhow::Result<Config> {
    let before = std::fs::metadata(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let (bytes, seen) = read(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let len = bytes.len() as u64;
    anyhow::ensure!(
        stat(&before) == FileSeen { hash: 0, ..seen } && len == seen.len,
        "{} changed while it was read (a writer is at work; write the file elsewhere and rename it over)",
        path.display()
    );
    let text = String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{} is not UTF-8: {e}", path.display()))?;
    let config = Config::parse(&text, path)?;
    anyhow::ensure!(
        !config.services.is_empty(),
        "{} names no services ({}); a reload never removes every service (stop the agent for that)",
        path.display(),
        if text.trim().is_empty() { "it is empty" } else { "cut short while being written?" }
    );
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::scratch_dir;

    #[test]
    fn a_rewrite_with_the_same_size_and_mtime_is_a_change() {
        let dir = scratch_dir("seen");
        let path = dir.join("lb.toml");
        std::fs::write(&path, "aaaa").unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let first = FileSeen::of(&path).unwrap();
        std::fs::write(&path, "bbbb").unwrap();
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
        let second = FileSeen::of(&path).unwrap();
        assert_eq!((first.len, first.mtime_ns), (second.len, second.mtime_ns));
        assert_ne!(first, second);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_change_is_taken_once_it_holds_still_for_a_look() {
        let seen = |n: u64| Some(FileSeen { dev: 1, ino: 1, len: n, mtime_ns: 0, hash: n });
        let mut w = Watch::new(seen(1));
        assert!(!w.changed(seen(1)));
        // A writer at work: each look differs from the last.
        assert!(!w.changed(seen(2)));
        assert!(!w.changed(seen(3)));
        // Still for one look: taken, once.
        assert!(w.changed(seen(3)));
        assert!(!w.changed(seen(3)));
        // Gone, then back as it was: nothing to take.
        assert!(!w.changed(None));
        assert!(!w.changed(seen(3)));
        // Gone for good: taken (the reload says why it cannot read it).
        assert!(!w.changed(None));
        assert!(w.changed(None));
        // Another file renamed over it: taken at once.
        let mut w = Watch::new(seen(3));
        assert!(w.changed(Some(FileSeen { ino: 2, ..seen(4).unwrap() })));
    }

    #[test]
    fn an_empty_file_or_one_with_no_services_is_refused() {
        let dir = scratch_dir("noservices");
        let path = dir.join("lb.toml");
        for (text, says) in [("", "it is empty"), ("\n  \n", "it is empty"), ("[socket_lb]\n", "cut short")] {
            std::fs::write(&path, text).unwrap();
            let e = format!("{:#}", load_for_reload(&path).unwrap_err());
            assert!(e.contains("names no services") && e.contains(says), "{text:?}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
