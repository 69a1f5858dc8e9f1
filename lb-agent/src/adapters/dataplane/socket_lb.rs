//! Socket load balancing: the object's four cgroup socket-address programs
//! (`lb_common::SOCK_PROGRAMS`) attached to one cgroup v2 directory through
//! bpf_links, so that processes in its subtree (containers included) reach
//! services at connect/sendmsg time.
//!
//! With pinning on, each link is pinned as `links/cgroup-<id>-<program>`,
//! `<id>` being the link's own kernel id. A restarted agent attaches its own
//! links first and only then removes its predecessor's pins (they are stale
//! link pins, see `AyaDataplane::stale_link_pins`): for that moment both run,
//! and the second one sees a backend's address, which is no service, so it
//! leaves it alone. No connect() ever goes untranslated.

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
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
    pub(super) links: Vec<(FdLink, Option<PathBuf>)>,
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
        let mut attached = SocketLb { cgroup: cgroup.to_owned(), links: Vec::new() };
        for name in SOCK_PROGRAMS {
            match self.attach_sock_program(name, &dir, cgroup) {
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
        let cgroup_id = dir.metadata().map(|m| m.ino()).unwrap_or_default();
        info!(cgroup = %cgroup.display(), cgroup_id, "socket load balancing attached");
        Ok(attached)
    }

    /// Attach the program `name` to the cgroup `dir` (at `path`): its link,
    /// pinned when pinning is on.
    fn attach_sock_program(
        &mut self,
        name: &str,
        dir: &File,
        path: &Path,
    ) -> anyhow::Result<(FdLink, Option<PathBuf>)> {
        let program = sock_program_mut(&mut self.ebpf, name)?;
        // bpf_link_create takes no attach flags for cgroups: a link is
        // always one of many on its cgroup.
        let id = program
            .attach(dir, CgroupAttachMode::Single)
            .with_context(|| format!("attach {name} to {}", path.display()))?;
        let link = FdLink::try_from(program.take_link(id)?)
            .context("the kernel attached to the cgroup without a bpf_link (kernel older than 5.7?)")?;
        let Some(pins) = &self.pins else { return Ok((link, None)) };
        let link_id = link.info().with_context(|| format!("read {name}'s link"))?.id();
        let pin = pins.join("links").join(format!("{PIN_PREFIX}{link_id}-{name}"));
        let link = link.pin(&pin).with_context(|| format!("pin {name}'s link at {}", pin.display()))?;
        Ok((FdLink::from(link), Some(pin)))
    }

    /// The cgroup the socket programs are attached to.
    pub fn socket_lb_cgroup(&self) -> Option<&Path> {
        self.socket_lb.as_ref().map(|s| s.cgroup.as_path())
    }
}
