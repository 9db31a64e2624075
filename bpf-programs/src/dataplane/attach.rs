//! Attaching the programs to a cgroup v2 and detaching them: one bpf link per program, pinned
//! under `<pin_dir>/links/cgroup-<inode>/`, so an attachment outlives the loader (an agent
//! restart keeps steering) and a second loader sees it and keeps it.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::programs::{
    links::{FdLink, PinnedLink},
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
};
use tracing::info;

use super::{io, Dataplane, PROGRAMS};
use crate::error::{Error, Result};

impl Dataplane {
    fn link_dir(&self, cgroup: &Path) -> Result<PathBuf> {
        let md = fs::metadata(cgroup).map_err(|_| Error::CgroupMissing(cgroup.to_path_buf()))?;
        if !md.is_dir() || !cgroup.join("cgroup.procs").exists() {
            return Err(Error::CgroupMissing(cgroup.to_path_buf()));
        }
        Ok(self
            .pin_dir
            .join("links")
            .join(format!("cgroup-{}", md.ino())))
    }

    /// Whether the programs are attached to `cgroup` (their links are pinned).
    ///
    /// # Errors
    /// [`Error::CgroupMissing`].
    pub fn is_attached(&self, cgroup: impl AsRef<Path>) -> Result<bool> {
        let dir = self.link_dir(cgroup.as_ref())?;
        Ok(PROGRAMS.iter().all(|p| dir.join(p).exists()))
    }

    /// Attaches every program to the cgroup v2 directory `cgroup` through bpf links pinned under
    /// `<pin_dir>/links/cgroup-<inode>/`; programs already attached by any loader are kept, so
    /// attaching twice is a no-op.
    ///
    /// # Errors
    /// [`Error::CgroupMissing`], program load/attach or pin errors.
    pub fn attach(&mut self, cgroup: impl AsRef<Path>) -> Result<()> {
        let cgroup = cgroup.as_ref();
        let dir = self.link_dir(cgroup)?;
        // Two processes attaching at once would both see "no pinned link" and race.
        let _lock = crate::sys::DirLock::acquire(&self.pin_dir).map_err(|e| Error::PinDir {
            path: self.pin_dir.clone(),
            reason: format!("cannot lock it ({e})"),
        })?;
        fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        for name in PROGRAMS {
            let path = dir.join(name);
            if path.exists() && PinnedLink::from_pin(&path).is_ok() {
                continue;
            }
            let _ = fs::remove_file(&path);
            let perr = |source| Error::Program {
                program: name,
                source,
            };
            let file =
                fs::File::open(cgroup).map_err(|_| Error::CgroupMissing(cgroup.to_path_buf()))?;
            let program = self.ebpf.program_mut(name).ok_or(Error::Program {
                program: name,
                source: aya::programs::ProgramError::NotLoaded,
            })?;
            let pin_err = |e: aya::programs::links::LinkError| Error::Pin {
                path: path.clone(),
                reason: format!("{e}"),
            };
            macro_rules! attach_as {
                ($ty:ty $(, $how:expr)?) => {{
                    let prog: &mut $ty = program.try_into().map_err(perr)?;
                    if prog.fd().is_err() {
                        prog.load().map_err(perr)?;
                    }
                    let id = prog
                        .attach(file, $($how,)? CgroupAttachMode::Single)
                        .map_err(perr)?;
                    let fd: FdLink = prog
                        .take_link(id)
                        .map_err(perr)?
                        .try_into()
                        .map_err(pin_err)?;
                    fd
                }};
            }
            let fd = match name {
                "blst_sock_release" => attach_as!(CgroupSock),
                "blst_skb_egress" => attach_as!(CgroupSkb, CgroupSkbAttachType::Egress),
                "blst_skb_ingress" => attach_as!(CgroupSkb, CgroupSkbAttachType::Ingress),
                _ => attach_as!(CgroupSockAddr),
            };
            fd.pin(&path).map_err(|e| Error::Pin {
                path: path.clone(),
                reason: format!("{e}"),
            })?;
        }
        info!(cgroup = %cgroup.display(), "programs attached");
        Ok(())
    }

    /// Detaches the programs from `cgroup` and removes their pinned links. When no cgroup is
    /// left attached, the maps are unpinned too (steering state is gone).
    ///
    /// # Errors
    /// [`Error::CgroupMissing`], I/O errors on the pin dir.
    pub fn detach(&mut self, cgroup: impl AsRef<Path>) -> Result<()> {
        let dir = self.link_dir(cgroup.as_ref())?;
        for name in PROGRAMS {
            let path = dir.join(name);
            if let Ok(link) = PinnedLink::from_pin(&path) {
                if let Ok(fd) = link.unpin() {
                    drop(fd); // last reference: the kernel detaches the program
                }
            }
            let _ = fs::remove_file(&path);
        }
        let _ = fs::remove_dir(&dir);
        let links = self.pin_dir.join("links");
        let empty = fs::read_dir(&links)
            .map(|mut d| d.next().is_none())
            .unwrap_or(true);
        if empty {
            let _ = fs::remove_dir(&links);
            for entry in fs::read_dir(&self.pin_dir).map_err(io("reading pin dir"))? {
                let entry = entry.map_err(io("reading pin dir"))?;
                if entry.file_name().to_string_lossy().starts_with("blst_") {
                    fs::remove_file(entry.path()).map_err(io("unpinning map"))?;
                }
            }
            let _ = fs::remove_dir(&self.pin_dir);
        }
        info!(cgroup = %cgroup.as_ref().display(), "programs detached");
        Ok(())
    }

    /// Accumulated run time and run count of a program loaded (attached) by this loader, from
    /// the kernel's BPF stats (they only grow while `aya::sys::enable_stats` is held).
    #[must_use]
    pub fn program_stats(&self, name: &str) -> Option<(std::time::Duration, u64)> {
        let info = self.ebpf.program(name)?.info().ok()?;
        Some((info.run_time(), info.run_count()))
    }
}
