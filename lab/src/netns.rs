//! Network namespaces for tests, as RAII values (the shape of aya's
//! `NetNsGuard` in `aya/src/test_helpers.rs`, without persisting a name under
//! /var/run/netns, so nothing is left behind even if the process is killed).
//!
//! A `NetNs` is an open file descriptor on a fresh namespace; the kernel frees
//! the namespace when the last descriptor and the last thread inside it are
//! gone. `NetNs::enter` moves the calling thread in and returns a guard that
//! moves it back on drop, also while unwinding from a panic.
//! Needs CAP_SYS_ADMIN. Uses only syscalls, no `ip` binary, so it also works
//! from a static test binary in a bare initramfs.

use std::{
    fs::File,
    io,
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

/// The calling thread's namespace (`/proc/self/ns/net` would name the main
/// thread's, and tests run on other threads).
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// A network namespace that lives as long as this value (or longer, while a
/// thread or a device still sits in it).
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// Creates a namespace without moving the caller: a short-lived thread
    /// unshares into it and hands back a descriptor before it exits.
    pub fn new() -> io::Result<Self> {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: plain syscall; it only changes this helper thread.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(Self { fd: File::open(THREAD_NETNS)?.into() })
            })
            .join()
            .map_err(|_| io::Error::other("netns helper thread panicked"))?
        })
    }

    /// Moves the calling thread into this namespace until the guard drops.
    /// The guard does not borrow `self`: a thread inside a namespace keeps
    /// it alive on its own.
    pub fn enter(&self) -> io::Result<Entered> {
        let previous: OwnedFd = File::open(THREAD_NETNS)?.into();
        set_thread_netns(self.fd.as_fd())?;
        Ok(Entered { previous, _not_send: PhantomData })
    }

    /// The namespace's inode number, which identifies it (as `ip netns
    /// identify` and `/proc/*/ns/net` links show).
    pub fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(File::from(self.fd.try_clone()?).metadata()?.ino())
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The calling thread is inside a `NetNs`; dropping this moves it back.
/// Not `Send`: namespaces belong to threads, so the guard must drop on the
/// thread that entered.
#[must_use = "the thread leaves the namespace when the guard drops"]
pub struct Entered {
    previous: OwnedFd,
    _not_send: PhantomData<*mut ()>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Err(e) = set_thread_netns(self.previous.as_fd()) {
            // A thread stranded in a test namespace would make every later
            // result on it meaningless, and panicking while unwinding would
            // abort anyway: stop here, loudly.
            eprintln!("cannot return to the previous network namespace: {e}");
            std::process::abort();
        }
    }
}

/// The inode of the calling thread's current namespace.
pub fn current_inode() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(THREAD_NETNS)?.ino())
}

fn set_thread_netns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid namespace descriptor; it only changes
    // the calling thread.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates a fresh namespace, moves the calling thread in, and on drop moves
/// it back and releases the namespace: the usual one-liner for a test.
pub struct NetNsGuard {
    _entered: Entered,
    ns: NetNs,
}

impl NetNsGuard {
    pub fn new() -> io::Result<Self> {
        let ns = NetNs::new()?;
        Ok(Self { _entered: ns.enter()?, ns })
    }

    pub fn netns(&self) -> &NetNs {
        &self.ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::root::skip_without_root;

    fn links_in_current_netns() -> Vec<String> {
        // /proc/thread-self/net follows the thread's namespace (sysfs would
        // show the namespace it was mounted in).
        let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        dev.lines().skip(2).filter_map(|l| l.split(':').next()).map(|n| n.trim().to_owned()).collect()
    }

    #[test]
    fn root_guard_enters_a_fresh_namespace_and_returns() {
        if skip_without_root("root_guard_enters_a_fresh_namespace_and_returns") {
            return;
        }
        let outside = current_inode().unwrap();
        {
            let guard = NetNsGuard::new().unwrap();
            let inside = current_inode().unwrap();
            assert_ne!(inside, outside);
            assert_eq!(inside, guard.netns().inode().unwrap());
            assert_eq!(links_in_current_netns(), ["lo"]);
        }
        assert_eq!(current_inode().unwrap(), outside);
    }

    #[test]
    fn root_guard_returns_when_the_test_panics() {
        if skip_without_root("root_guard_returns_when_the_test_panics") {
            return;
        }
        let outside = current_inode().unwrap();
        let result = std::panic::catch_unwind(|| {
            let _guard = NetNsGuard::new().unwrap();
            panic!("a failing test inside the namespace");
        });
        assert!(result.is_err());
        assert_eq!(current_inode().unwrap(), outside);
    }

    #[test]
    fn root_new_does_not_move_the_caller() {
        if skip_without_root("root_new_does_not_move_the_caller") {
            return;
        }
        let outside = current_inode().unwrap();
        let ns = NetNs::new().unwrap();
        assert_eq!(current_inode().unwrap(), outside);
        assert_ne!(ns.inode().unwrap(), outside);
    }
}
