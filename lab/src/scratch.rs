//! Scratch directories under the system temp dir, removed on drop: a plain
//! [`TempDir`], and a [`Scratch`] for an agent, which keeps its config,
//! control socket, log and pins there, the pins on a bpffs it mounts itself.

use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

use crate::agent::AgentArgs;

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    /// Empty once removed.
    path: PathBuf,
}

impl TempDir {
    /// `<temp dir>/<name>`, and its parents, made if missing; panics on
    /// failure.
    pub fn create(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(name);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    /// `<temp dir>/<name>`, refused if it exists already (this run did not
    /// make it).
    pub fn create_new(name: &str) -> io::Result<TempDir> {
        let path = std::env::temp_dir().join(name);
        fs::create_dir(&path).map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", path.display())))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directory now (as drop does), with the error.
    pub fn remove(mut self) -> io::Result<()> {
        self.remove_dir()
    }

    fn remove_dir(&mut self) -> io::Result<()> {
        let path = std::mem::take(&mut self.path);
        if path.as_os_str().is_empty() {
            return Ok(());
        }
        fs::remove_dir_all(&path).map_err(|e| io::Error::new(e.kind(), format!("remove {}: {e}", path.display())))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = self.remove_dir() {
            eprintln!("warning: {e}");
        }
    }
}

/// A scratch directory for an agent: `lb.toml`, `api.sock`, `agent.log`,
/// and `bpf/`, where the agent mounts a bpffs for its pins (`bpf/lb`).
/// Dropping it unmounts that bpffs, which releases whatever a killed agent
/// left pinned (XDP links included), and removes the directory.
///
/// The agent must share the mount namespace of the process that drops
/// this (see [`crate::agent::Agent`]), or the bpffs would be out of reach.
#[derive(Debug)]
pub struct Scratch {
    dir: TempDir,
}

impl Scratch {
    /// `<temp dir>/<name>`; panics on failure.
    pub fn create(name: &str) -> Scratch {
        Scratch::with_bpf_dir(TempDir::create(name)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `<temp dir>/<name>`, refused if it exists already.
    pub fn create_new(name: &str) -> io::Result<Scratch> {
        Scratch::with_bpf_dir(TempDir::create_new(name)?)
    }

    fn with_bpf_dir(dir: TempDir) -> io::Result<Scratch> {
        let scratch = Scratch { dir };
        let bpf = scratch.bpf_dir();
        fs::create_dir_all(&bpf).map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", bpf.display())))?;
        Ok(scratch)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where the agent's config goes: `<dir>/lb.toml`.
    pub fn config_path(&self) -> PathBuf {
        self.path().join("lb.toml")
    }

    /// The agent's control socket: `<dir>/api.sock`.
    pub fn api_socket(&self) -> PathBuf {
        self.path().join("api.sock")
    }

    /// Where the agent pins its maps and links: `<dir>/bpf/lb`. The agent
    /// mounts bpffs on `<dir>/bpf`.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpf_dir().join("lb")
    }

    /// The agent's stdout and stderr: `<dir>/agent.log`.
    pub fn log_path(&self) -> PathBuf {
        self.path().join("agent.log")
    }

    fn bpf_dir(&self) -> PathBuf {
        self.path().join("bpf")
    }

    /// Arguments for an agent that keeps everything here: control socket,
    /// pins and log, with metrics off.
    pub fn agent_args(&self, config: PathBuf) -> AgentArgs {
        AgentArgs {
            config,
            api_socket: self.api_socket(),
            metrics_address: None,
            pin_dir: Some(self.pin_dir()),
            keep_on_exit: false,
            log: self.log_path(),
            own_process_group: false,
            env: Vec::new(),
        }
    }

    /// Unmounts every bpffs mounted on `<dir>/bpf` (a directory we made, so
    /// whatever is mounted there an agent of ours mounted). Bounded: a few
    /// stacked mounts at most.
    pub fn unmount_bpffs(&self) -> io::Result<()> {
        let bpf = self.bpf_dir();
        let Ok(c) = CString::new(bpf.as_os_str().as_encoded_bytes()) else { return Ok(()) };
        for _ in 0..4 {
            if !is_bpffs(&c) {
                return Ok(());
            }
            // SAFETY: a NUL-terminated path. MNT_DETACH: nothing holds files
            // open there, but a lazy unmount cannot fail on a straggler.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(e.kind(), format!("umount {}: {e}", bpf.display())));
            }
        }
        Err(io::Error::other(format!("{} is still a bpffs after 4 unmounts", bpf.display())))
    }

    /// Unmounts the bpffs and removes the directory now (as drop does),
    /// with the error.
    pub fn remove(mut self) -> io::Result<()> {
        self.unmount_bpffs()?;
        self.dir.remove_dir()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.path().as_os_str().is_empty() {
            return; // removed already
        }
        if let Err(e) = self.unmount_bpffs() {
            eprintln!("warning: {e}");
        }
    }
}

fn is_bpffs(path: &CString) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    // SAFETY: a zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out-parameter.
    (unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}
