//! What the agent makes on the host's file systems before it starts (the
//! control socket's directory, a bpffs for its pins), remembered so that a
//! clean exit leaves nothing behind it made: `lb-agent run` then SIGTERM
//! leaves the host as it found it. What was there before is never touched.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

use super::{
    dataplane::pins::{is_bpffs, prepare_pin_dir},
    lock::{socket_lock_path, AgentLock},
};
use crate::serve::api::prepare_socket_dir;

/// What [`MadeDirs::prepare`] made, to undo on a clean exit.
#[derive(Debug, Default)]
pub struct MadeDirs {
    /// The control socket's lock file (always ours: it is the agent's).
    lock_file: Option<PathBuf>,
    /// The socket's directory, if it did not exist.
    socket_dir: Option<PathBuf>,
    /// The pin directory, if the agent mounted the bpffs it is on.
    pin_dir: Option<PathBuf>,
    /// Where that bpffs is mounted (the pin directory's parent).
    bpffs: Option<PathBuf>,
}

impl MadeDirs {
    /// Make the control socket's directory and the pin directory (mounting
    /// a bpffs for it if needed), noting what was not there before.
    pub fn prepare(api_socket: &Path, pin_dir: Option<&Path>) -> anyhow::Result<MadeDirs> {
        let dir = api_socket.parent().filter(|d| !d.as_os_str().is_empty());
        let socket_dir = dir.filter(|d| !d.exists()).map(Path::to_path_buf);
        prepare_socket_dir(api_socket)?;
        let mut made = MadeDirs { lock_file: Some(socket_lock_path(api_socket)), socket_dir, ..MadeDirs::default() };
        if let Some(pins) = pin_dir {
            let mount_point = pins.parent().map(Path::to_path_buf);
            let mounted_before = mount_point.as_deref().is_some_and(is_bpffs);
            prepare_pin_dir(pins)?;
            if !mounted_before {
                made.pin_dir = Some(pins.to_path_buf());
                made.bpffs = mount_point;
            }
        }
        Ok(made)
    }

    /// After a clean exit (the socket is gone), with the agent's locks:
    /// remove the lock file, let the locks go (one holds the pin directory
    /// open, which would keep its bpffs busy), then the socket's directory if the agent made it
    /// and it is empty, and unmount the bpffs the agent mounted if nothing
    /// is pinned on it (a `--keep-on-exit` agent leaves its pins, and so the
    /// bpffs, for the next one). Returns what it removed.
    pub fn remove(self, lock: AgentLock) -> Vec<String> {
        let mut removed = Vec::new();
        // Removed while the lock is held: an agent starting now opens a new
        // file, or fails to lock this one while we hold it.
        if let Some(lock) = self.lock_file.filter(|l| l.exists()) {
            note(fs::remove_file(&lock), &lock, &mut removed);
        }
        drop(lock);
        if let Some(dir) = self.socket_dir.filter(|d| is_empty_dir(d)) {
            note(fs::remove_dir(&dir), &dir, &mut removed);
        }
        if let (Some(pins), Some(bpffs)) = (self.pin_dir, self.bpffs) {
            match first_file(&bpffs) {
                None => {
                    // Empty directories only (the files are checked for above).
                    let _ = remove_empty_tree(&pins);
                    note(unmount(&bpffs), &bpffs, &mut removed);
                }
                Some(pin) => info!(
                    path = %bpffs.display(),
                    pin = %pin.display(),
                    "the bpffs the agent mounted still holds pins; left mounted"
                ),
            }
        }
        removed
    }
}

fn note(result: io::Result<()>, path: &Path, removed: &mut Vec<String>) {
    match result {
        Ok(()) => {
            info!(path = %path.display(), "removed what the agent made");
            removed.push(path.display().to_string());
        }
        Err(e) => warn!(path = %path.display(), error = %e, "could not remove what the agent made"),
    }
}

fn is_empty_dir(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none())
}

/// A file (anything but a directory) under `dir`, if there is one (an
/// unreadable or too deep directory counts as one). Names with a dot are
/// the kernel's (a new bpffs holds `maps.debug` and `progs.debug`; pins
/// cannot have a dot), not pins.
fn first_file(dir: &Path) -> Option<PathBuf> {
    fn walk(dir: &Path, depth: u32) -> Option<PathBuf> {
        let Ok(entries) = fs::read_dir(dir) else { return Some(dir.to_path_buf()) };
        let pins = entries.filter_map(Result::ok).filter(|e| !e.file_name().as_encoded_bytes().contains(&b'.'));
        pins.into_iter().find_map(|e| match e.file_type() {
            Ok(t) if t.is_dir() && depth < 8 => walk(&e.path(), depth + 1),
            _ => Some(e.path()),
        })
    }
    walk(dir, 0)
}

/// Remove `dir` and the empty directories under it, deepest first.
fn remove_empty_tree(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)?.filter_map(Result::ok) {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_tree(&e.path())?;
        }
    }
    fs::remove_dir(dir)
}

fn unmount(at: &Path) -> io::Result<()> {
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated path; no flags.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-host-dirs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_socket_directory_the_agent_made_goes_when_empty_and_one_it_found_stays() {
        let base = temp("sock");
        let sock = base.join("run").join("lb.sock");
        let made = MadeDirs::prepare(&sock, None).unwrap();
        let removed = made.remove(AgentLock::acquire(&sock, None).unwrap());
        assert!(!base.join("run").exists(), "the directory it made is left: {removed:?}");
        assert_eq!(removed.len(), 2, "{removed:?}");

        // Found there: only the lock file goes.
        let made = MadeDirs::prepare(&sock, None).unwrap();
        let again = MadeDirs::prepare(&sock, None).unwrap();
        drop(made);
        again.remove(AgentLock::acquire(&sock, None).unwrap());
        assert!(base.join("run").is_dir(), "a directory it found was removed");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_tree_with_a_file_is_not_empty() {
        let base = temp("tree");
        fs::create_dir_all(base.join("a/b")).unwrap();
        assert_eq!(first_file(&base), None);
        fs::write(base.join("progs.debug"), "").unwrap();
        assert_eq!(first_file(&base), None, "the kernel's, not a pin");
        fs::write(base.join("a/b/pin"), "").unwrap();
        assert_eq!(first_file(&base), Some(base.join("a/b/pin")));
        fs::remove_file(base.join("progs.debug")).unwrap();
        fs::remove_file(base.join("a/b/pin")).unwrap();
        remove_empty_tree(&base).unwrap();
        assert!(!base.exists());
    }
}
