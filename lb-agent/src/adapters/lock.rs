//! One agent per pin directory and per control socket.
//!
//! Two agents on one pin directory would each load and attach their own
//! program, overwrite each other's maps, and remove each other's pins on
//! exit; two on one control socket would take each other's calls. So an
//! agent takes, before it touches anything, an exclusive `flock` on
//! `<socket>.lock` (every agent, `--no-pin` ones too: they share nothing
//! else, but a socket path is still one agent's) and on the pin directory
//! itself (bpffs holds no plain files to lock; a directory locks as well).
//! The kernel drops both when the agent exits, however it exits: a lock is
//! never stale. The holder's pid is read back from /proc/locks.

use std::{
    fs::File,
    io,
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// The locks of a running agent; dropping it (or exiting) releases them.
#[derive(Debug)]
pub struct AgentLock {
    _held: Vec<File>,
}

impl AgentLock {
    /// Lock `socket`'s lock file (its directory must exist, see
    /// `serve::api::prepare_dir`) and, with one, the pin directory (which
    /// must exist, see `dataplane::pins::prepare_pin_dir`). Refused, naming
    /// the holder's pid, if another agent holds either.
    pub fn acquire(socket: &Path, pin_dir: Option<&Path>) -> anyhow::Result<AgentLock> {
        let path = socket_lock_path(socket);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        const SECOND: &str = "not starting a second agent there";
        let mut held = vec![take(file, &path, &format!("control socket {}", socket.display()), SECOND)?];
        if let Some(dir) = pin_dir {
            let file = File::open(dir).with_context(|| format!("open {}", dir.display()))?;
            held.push(take(file, dir, &format!("pin directory {}", dir.display()), SECOND)?);
        }
        Ok(AgentLock { _held: held })
    }

    /// Lock the pin directory, if there is one, for `lb-agent stop` to
    /// remove what is pinned there: refused while an agent runs on it.
    pub fn for_removal(pin_dir: &Path) -> anyhow::Result<Option<AgentLock>> {
        let file = match File::open(pin_dir) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("open {}", pin_dir.display())),
        };
        let what = format!("pin directory {}", pin_dir.display());
        let refusal = "not removing its pinned state (stop it with `lb-agent stop --api-socket <its socket>`)";
        Ok(Some(AgentLock { _held: vec![take(file, pin_dir, &what, refusal)?] }))
    }
}

/// The pid of the agent holding `socket`'s lock, if one does.
pub fn socket_holder(socket: &Path) -> Option<u32> {
    let file = File::open(socket_lock_path(socket)).ok()?;
    let m = file.metadata().ok()?;
    // SAFETY: flock on a descriptor we own. Taken at once: nobody holds it.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        return None;
    }
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    flock_holder(&locks, libc::major(m.dev()), libc::minor(m.dev()), m.ino())
}

/// Poll `running` every `every` until it says no or `timeout` has passed;
/// returns how long it took, or `None` on the timeout.
pub fn wait_until_gone(
    mut running: impl FnMut() -> bool,
    timeout: std::time::Duration,
    every: std::time::Duration,
) -> Option<std::time::Duration> {
    let started = std::time::Instant::now();
    loop {
        if !running() {
            return Some(started.elapsed());
        }
        if started.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// `<socket>.lock`, beside the socket.
pub fn socket_lock_path(socket: &Path) -> PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Take `file`'s lock without waiting, or say who holds it, and `refusal`.
fn take(file: File, path: &Path, what: &str, refusal: &str) -> anyhow::Result<File> {
    // SAFETY: flock on a descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(file);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(e).with_context(|| format!("lock {}", path.display()));
    }
    let holder = file
        .metadata()
        .ok()
        .and_then(|m| {
            let locks = std::fs::read_to_string("/proc/locks").ok()?;
            flock_holder(&locks, libc::major(m.dev()), libc::minor(m.dev()), m.ino())
        })
        .map_or("another lb-agent".to_owned(), |pid| format!("another lb-agent (pid {pid})"));
    anyhow::bail!("{holder} is running on the {what}: {refusal}")
}

/// The pid holding a `flock` on the inode `ino` of device `major:minor`,
/// from the text of /proc/locks (lines like
/// `1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF`, device numbers in
/// hex; `->` lines are waiters). The device is matched when it can be: on
/// some file systems (btrfs) `stat` shows another device than the lock.
pub fn flock_holder(locks: &str, major: u32, minor: u32, ino: u64) -> Option<u32> {
    let mut on_inode = None;
    for line in locks.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[1] != "FLOCK" {
            continue;
        }
        let Ok(pid) = f[4].parse::<u32>() else { continue };
        let id: Vec<&str> = f[5].split(':').collect();
        let [maj, min, i] = id[..] else { continue };
        if i.parse() != Ok(ino) {
            continue;
        }
        if u32::from_str_radix(maj, 16) == Ok(major) && u32::from_str_radix(min, 16) == Ok(minor) {
            return Some(pid);
        }
        on_inode.get_or_insert(pid);
    }
    on_inode
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::scratch_dir;

    #[test]
    fn waiting_for_an_exit_ends_when_it_is_gone_or_at_the_timeout() {
        use std::time::Duration;
        let mut polls = 0;
        let took = wait_until_gone(
            || {
                polls += 1;
                polls < 3
            },
            Duration::from_secs(5),
            Duration::from_millis(1),
        );
        assert!(took.is_some_and(|t| t < Duration::from_secs(5)), "{took:?}");
        assert_eq!(polls, 3);
        assert_eq!(wait_until_gone(|| true, Duration::from_millis(20), Duration::from_millis(5)), None);
    }

    #[test]
    fn the_socket_holder_is_the_process_that_locked_it() {
        let dir = scratch_dir("lock-holder");
        let socket = dir.join("api.sock");
        assert_eq!(socket_holder(&socket), None, "no lock file");
        let lock = AgentLock::acquire(&socket, None).unwrap();
        assert_eq!(socket_holder(&socket), Some(std::process::id()));
        drop(lock);
        assert_eq!(socket_holder(&socket), None, "released");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_holder_is_found_in_proc_locks() {
        let text = "1: POSIX  ADVISORY  WRITE 99 00:1a:5678 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 777 fd:01:5678 0 EOF\n\
                    3: FLOCK  ADVISORY  WRITE 4321 00:2b:5678 0 EOF\n";
        assert_eq!(flock_holder(text, 0xfd, 1, 5678), Some(1234));
        assert_eq!(flock_holder(text, 0, 0x2b, 5678), Some(4321));
        // Another device (btrfs): the inode alone.
        assert_eq!(flock_holder(text, 0, 0x30, 5678), Some(1234));
        assert_eq!(flock_holder(text, 0xfd, 1, 1), None);
    }

    #[test]
    fn a_second_agent_on_a_socket_or_pin_directory_is_refused_naming_the_first() {
        let dir = scratch_dir("lock");
        let (socket, pins) = (dir.join("api.sock"), dir.join("pins"));
        std::fs::create_dir(&pins).unwrap();
        let first = AgentLock::acquire(&socket, Some(&pins)).unwrap();
        let pid = format!("(pid {})", std::process::id());
        // The same socket (a --no-pin agent too), or the same pins.
        let e = AgentLock::acquire(&socket, None).unwrap_err().to_string();
        assert!(e.contains(&pid) && e.contains("control socket"), "{e}");
        let e = AgentLock::acquire(&dir.join("other.sock"), Some(&pins)).unwrap_err().to_string();
        assert!(e.contains(&pid) && e.contains("pin directory"), "{e}");
        let e = AgentLock::for_removal(&pins).unwrap_err().to_string();
        assert!(e.contains(&pid) && e.contains("not removing its pinned state"), "{e}");
        drop(first);
        let second = AgentLock::acquire(&socket, Some(&pins)).unwrap();
        drop(second);
        assert!(AgentLock::for_removal(&pins).unwrap().is_some());
        assert!(AgentLock::for_removal(&dir.join("none")).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
