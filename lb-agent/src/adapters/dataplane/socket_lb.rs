//! Socket load balancing: the object's cgroup socket-address programs, IPv4 and IPv6
//! (`lb_common::SOCK_PROGRAMS`) attached to one cgroup v2 directory through
//! bpf_links, so that processes in its subtree (containers included) reach
//! services at connect/sendmsg time.
//!
//! With pinning on, each link is pinned as `links/cgroup-<id>-<program>`,
//! `<id>` being the cgroup's id (its directory's inode number). A restarted
//! agent takes over the links it finds pinned for its cgroup, switching
//! each to its own program in place (BPF_LINK_UPDATE), so no connect() ever
//! goes untranslated; links pinned for another cgroup are stale link pins
//! (`AyaDataplane::stale_link_pins`), removed once the agent is up.

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use aya::programs::{links::FdLink, CgroupAttachMode};
use lb_common::SOCK_PROGRAMS;
use tracing::{info, warn};

use super::{object::sock_program_mut, pins::fs_magic, AyaDataplane};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The prefix of a socket link's pin name.
pub(super) const PIN_PREFIX: &str = "cgroup-";

/// Our links on one cgroup.
pub(super) struct SocketLb {
    pub(super) cgroup: PathBuf,
    /// One per program: the link, and its pin when pinning is on.
    pub(super) links: Vec<(Held, Option<PathBuf>)>,
}

/// A link this agent holds: one it made, or one a predecessor pinned and
/// this agent took over. Dropping it closes our descriptor only; the pin,
/// while it exists, keeps the link.
pub(super) enum Held {
    Made(#[expect(dead_code, reason = "held for its descriptor")] FdLink),
    Adopted(#[expect(dead_code, reason = "held for its descriptor")] OwnedFd),
}

impl SocketLb {
    /// Whether `path` is the pin of one of our links.
    pub(super) fn holds_pin(&self, path: &Path) -> bool {
        self.links.iter().any(|(_, pin)| pin.as_deref() == Some(path))
    }

    /// Remove the pins, then close the links: the programs are detached.
    fn remove(self) -> anyhow::Result<()> {
        for (link, pin) in self.links {
            if let Some(pin) = pin {
                std::fs::remove_file(&pin).with_context(|| format!("unpin {}", pin.display()))?;
            }
            drop(link);
        }
        Ok(())
    }
}

impl AyaDataplane {
    /// Attach the socket programs to the cgroup v2 directory `cgroup`, or
    /// move them there from another one; `None` detaches them. Only links
    /// this agent made (or took over) are ever touched.
    pub fn set_socket_lb(&mut self, cgroup: Option<&Path>) -> anyhow::Result<()> {
        if self.socket_lb.as_ref().map(|s| s.cgroup.as_path()) == cgroup {
            return Ok(());
        }
        let new = cgroup.map(|c| self.attach_socket_lb(c)).transpose()?;
        if let Some(old) = std::mem::replace(&mut self.socket_lb, new) {
            let from = old.cgroup.display().to_string();
            old.remove()?;
            info!(cgroup = from, "socket load balancing detached");
        }
        Ok(())
    }

    fn attach_socket_lb(&mut self, cgroup: &Path) -> anyhow::Result<SocketLb> {
        if fs_magic(cgroup)? != CGROUP2_SUPER_MAGIC {
            bail!("{} is not a cgroup v2 directory (mount -t cgroup2 none <dir>)", cgroup.display());
        }
        let dir = File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
        let cgroup_id = dir.metadata().with_context(|| format!("stat {}", cgroup.display()))?.ino();
        let mut attached = SocketLb { cgroup: cgroup.to_owned(), links: Vec::new() };
        for name in SOCK_PROGRAMS {
            let pin = self.pins.as_ref().map(|p| p.join("links").join(format!("{PIN_PREFIX}{cgroup_id}-{name}")));
            let link = match pin {
                Some(pin) if pin.exists() => self.adopt_sock_link(name, pin),
                pin => self.attach_sock_program(name, &dir, cgroup, pin),
            };
            match link {
                Ok(link) => attached.links.push(link),
                Err(e) => {
                    // The ones attached already are pinned: undo them.
                    if let Err(undo) = attached.remove() {
                        warn!(error = format!("{undo:#}"), "undoing a partial socket attach failed");
                    }
                    return Err(e);
                }
            }
        }
        info!(cgroup = %cgroup.display(), cgroup_id, "socket load balancing attached");
        Ok(attached)
    }

    /// Attach the program `name` to the cgroup `dir` (at `path`): its link,
    /// pinned at `pin` when pinning is on.
    fn attach_sock_program(
        &mut self,
        name: &str,
        dir: &File,
        path: &Path,
        pin: Option<PathBuf>,
    ) -> anyhow::Result<(Held, Option<PathBuf>)> {
        let program = sock_program_mut(&mut self.ebpf, name)?;
        // bpf_link_create takes no attach flags for cgroups: a link is
        // always one of many on its cgroup.
        let id = program
            .attach(dir, CgroupAttachMode::Single)
            .with_context(|| format!("attach {name} to {}", path.display()))?;
        let link = FdLink::try_from(program.take_link(id)?)
            .context("the kernel attached to the cgroup without a bpf_link (kernel older than 5.7?)")?;
        let Some(pin) = pin else { return Ok((Held::Made(link), None)) };
        let link = link.pin(&pin).with_context(|| format!("pin {name}'s link at {}", pin.display()))?;
        Ok((Held::Made(FdLink::from(link)), Some(pin)))
    }

    /// Take over the link a predecessor pinned at `pin` for the program
    /// `name`: switch it to this agent's program in place.
    fn adopt_sock_link(&mut self, name: &str, pin: PathBuf) -> anyhow::Result<(Held, Option<PathBuf>)> {
        let link = bpf_obj_get(&pin).with_context(|| format!("open the pinned link {}", pin.display()))?;
        let program = sock_program_mut(&mut self.ebpf, name)?;
        bpf_link_update(link.as_fd(), program.fd()?.as_fd())
            .with_context(|| format!("switch the pinned link {} to this agent's {name}", pin.display()))?;
        info!(program = name, pin = %pin.display(), "adopted pinned socket link");
        Ok((Held::Adopted(link), Some(pin)))
    }

    /// The cgroup the socket programs are attached to.
    pub fn socket_lb_cgroup(&self) -> Option<&Path> {
        self.socket_lb.as_ref().map(|s| s.cgroup.as_path())
    }
}

/// BPF_OBJ_GET: a descriptor of the object pinned at `path`.
fn bpf_obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())?;
    let attr = ObjGet { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_OBJ_GET (the kernel
    // zero-fills the rest), and `c_path` outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, &attr, size_of::<ObjGet>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// BPF_LINK_UPDATE: run `program` on `link` from now on (Linux 5.7; aya
/// 0.14 has it for XDP links only).
fn bpf_link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> std::io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: `attr` is a valid bpf_attr prefix for BPF_LINK_UPDATE; both
    // descriptors are borrowed for the call.
    if unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, &attr, size_of::<LinkUpdate>()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
