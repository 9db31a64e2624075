//! Hot standby on one host: the `sk_reuseport` program (`c/reuseport.bpf.c`) that sends new
//! connections of a `SO_REUSEPORT` group to the socket in slot 0 (the active broker), else to
//! the one in slot 1 (the standby), and migrates a closed listener's pending requests the same
//! way (attach type `BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`, kernel >= 5.14).
//!
//! [`ReuseportGroup::open`] loads the program and its maps, or opens them when already pinned
//! under the pin directory (the second process of the group finds them there), so both
//! processes' sockets meet in one map. The kernel empties a slot when its socket closes.
//!
//! ```no_run
//! # fn main() -> Result<(), ballast_bpf::reuseport::ReuseportError> {
//! use ballast_bpf::reuseport::{ReuseportGroup, Slot};
//! # let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
//! let mut group = ReuseportGroup::open("/sys/fs/bpf/ballast-broker-7443")?;
//! group.attach(&listener)?; // a SO_REUSEPORT listener
//! group.set(Slot::Standby, &listener)?;
//! // ... later, holding the database lock:
//! group.promote(&listener)?; // slot 0 = this socket, slot 1 cleared if it was this one
//! # Ok(()) }
//! ```

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData, MapError};
use aya::programs::{ProgramError, SkReuseport, SkReuseportAttachType};
use aya::{Ebpf, EbpfError, EbpfLoader};

/// The compiled `sk_reuseport` object (built by build.rs from `c/reuseport.bpf.c`).
pub static REUSEPORT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reuseport.bpf.o"));

/// The program's name in the object, and its pin's file name under the pin dir.
pub const PROGRAM: &str = "blst_reuseport";
/// The 2-slot `REUSEPORT_SOCKARRAY` (pinned by name).
pub const SOCKARRAY: &str = "blst_reuse";
/// Selections by outcome (pinned by name).
pub const STATS: &str = "blst_reuse_stats";

/// The slots of the socket array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Slot 0: the process that serves (holds the database lock).
    Primary = 0,
    /// Slot 1: the process that waits to take over.
    Standby = 1,
}

/// Errors of the reuseport loader.
#[derive(Debug, thiserror::Error)]
pub enum ReuseportError {
    #[error("pin dir {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the sk_reuseport object")]
    Load(#[from] EbpfError),
    #[error("sk_reuseport program {PROGRAM}")]
    Program(#[from] ProgramError),
    #[error("pinning {PROGRAM} at {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("map {map}: {reason}")]
    Map { map: &'static str, reason: String },
    #[error("{op} on slot {slot}")]
    Slot {
        op: &'static str,
        slot: u32,
        #[source]
        source: io::Error,
    },
    #[error("attaching {PROGRAM} to the socket (SO_ATTACH_REUSEPORT_EBPF): {0}")]
    Attach(String),
}

/// Connections the program placed, by outcome, since the maps were created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReuseportStats {
    /// New connections sent to slot 0.
    pub primary: u64,
    /// New connections sent to slot 1.
    pub standby: u64,
    /// New connections left to the kernel's hash (no slot filled).
    pub kernel: u64,
    /// Requests of a closed listener moved to slot 0.
    pub migrated_primary: u64,
    /// Requests of a closed listener moved to slot 1.
    pub migrated_standby: u64,
    /// Requests of a closed listener left to the kernel's hash.
    pub migrated_kernel: u64,
}

/// The loaded (or pinned) program and its maps.
pub struct ReuseportGroup {
    pin_dir: PathBuf,
    program: SkReuseport,
    slots: MapData,
    stats: Array<MapData, u64>,
    _ebpf: Ebpf,
}

impl std::fmt::Debug for ReuseportGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReuseportGroup")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl ReuseportGroup {
    /// Creates `pin_dir` (its parent must exist), then loads the program and maps, reusing
    /// the pinned ones: maps by name, the program as `<pin_dir>/blst_reuseport`.
    ///
    /// # Errors
    /// The pin dir cannot be made or locked; the kernel refuses the program or the maps.
    pub fn open(pin_dir: impl AsRef<Path>) -> Result<Self, ReuseportError> {
        let pin_dir = pin_dir.as_ref().to_path_buf();
        let dir_err = |source| ReuseportError::PinDir {
            path: pin_dir.clone(),
            source,
        };
        match std::fs::create_dir(&pin_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(dir_err(e)),
        }
        // Two brokers starting at once must not both create the pins.
        let lock = crate::sys::DirLock::acquire(&pin_dir).map_err(dir_err)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(REUSEPORT_OBJECT)?;
        let prog_pin = pin_dir.join(PROGRAM);
        let attach = SkReuseportAttachType::SelectOrMigrate;
        let program = if prog_pin.exists() {
            SkReuseport::from_pin(&prog_pin, attach)?
        } else {
            let p: &mut SkReuseport = ebpf
                .program_mut(PROGRAM)
                .ok_or_else(|| ReuseportError::Map {
                    map: PROGRAM,
                    reason: "missing from the object".into(),
                })?
                .try_into()?;
            p.load()?;
            p.pin(&prog_pin).map_err(|e| ReuseportError::Pin {
                path: prog_pin.clone(),
                reason: e.to_string(),
            })?;
            // A handle of our own on the pinned program (the object's stays with `ebpf`).
            SkReuseport::from_pin(&prog_pin, attach)?
        };
        drop(lock);
        let slots = match ebpf.take_map(SOCKARRAY) {
            Some(Map::ReusePortSockArray(m)) => m,
            _ => {
                return Err(ReuseportError::Map {
                    map: SOCKARRAY,
                    reason: "missing, or not a REUSEPORT_SOCKARRAY".into(),
                })
            }
        };
        let stats = ebpf
            .take_map(STATS)
            .ok_or_else(|| ReuseportError::Map {
                map: STATS,
                reason: "missing".into(),
            })
            .and_then(|m| {
                Array::try_from(m).map_err(|e: MapError| ReuseportError::Map {
                    map: STATS,
                    reason: e.to_string(),
                })
            })?;
        Ok(Self {
            pin_dir,
            program,
            slots,
            stats,
            _ebpf: ebpf,
        })
    }

    /// The pin directory.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches the program to the reuseport group of `socket` (a listening socket with
    /// `SO_REUSEPORT`); the whole group uses it, and attaching again replaces it with itself.
    ///
    /// # Errors
    /// `SO_ATTACH_REUSEPORT_EBPF` failed.
    pub fn attach(&self, socket: &impl AsFd) -> Result<(), ReuseportError> {
        self.program.attach(socket.as_fd()).map_err(|e| {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                s = format!("{s}: {c}");
                src = c.source();
            }
            ReuseportError::Attach(s)
        })
    }

    /// Puts `socket` (a listening `SO_REUSEPORT` socket) in `slot`, replacing what was there.
    ///
    /// # Errors
    /// The kernel refused (not listening, no `SO_REUSEPORT`, ...).
    pub fn set(&mut self, slot: Slot, socket: &impl AsRawFd) -> Result<(), ReuseportError> {
        let fd = u64::try_from(socket.as_raw_fd()).map_err(|_| ReuseportError::Slot {
            op: "update",
            slot: slot as u32,
            source: io::Error::from_raw_os_error(libc::EBADF),
        })?;
        map_update(self.slots.fd().as_fd(), slot as u32, fd).map_err(|source| {
            ReuseportError::Slot {
                op: "update",
                slot: slot as u32,
                source,
            }
        })
    }

    /// The socket cookie in `slot`, `None` when the slot is empty.
    ///
    /// # Errors
    /// The lookup failed for another reason than an empty slot.
    pub fn cookie(&self, slot: Slot) -> Result<Option<u64>, ReuseportError> {
        map_lookup(self.slots.fd().as_fd(), slot as u32).map_err(|source| ReuseportError::Slot {
            op: "lookup",
            slot: slot as u32,
            source,
        })
    }

    /// Empties `slot` if it holds `socket` (an empty slot, or another socket, is left as is).
    ///
    /// # Errors
    /// A lookup or delete failed.
    pub fn clear_if(&mut self, slot: Slot, socket: &impl AsRawFd) -> Result<bool, ReuseportError> {
        let mine = socket_cookie(socket).map_err(|source| ReuseportError::Slot {
            op: "SO_COOKIE",
            slot: slot as u32,
            source,
        })?;
        if self.cookie(slot)? != Some(mine) {
            return Ok(false);
        }
        match map_delete(self.slots.fd().as_fd(), slot as u32) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(source) => Err(ReuseportError::Slot {
                op: "delete",
                slot: slot as u32,
                source,
            }),
        }
    }

    /// Takes over: slot 1 cleared if it held `socket`, then `socket` into slot 0. (A socket
    /// can sit in one slot only — the kernel answers `EBUSY` — so for the few microseconds
    /// in between no slot is filled and the kernel picks by hash among the group's
    /// listeners; at a takeover the primary's is gone, so that is this one.)
    ///
    /// # Errors
    /// A map operation failed.
    pub fn promote(&mut self, socket: &impl AsRawFd) -> Result<(), ReuseportError> {
        self.clear_if(Slot::Standby, socket)?;
        self.set(Slot::Primary, socket)?;
        Ok(())
    }

    /// The program's selections so far.
    ///
    /// # Errors
    /// The stats map cannot be read.
    pub fn stats(&self) -> Result<ReuseportStats, ReuseportError> {
        let get = |i: u32| {
            self.stats.get(&i, 0).map_err(|e| ReuseportError::Map {
                map: STATS,
                reason: e.to_string(),
            })
        };
        Ok(ReuseportStats {
            primary: get(0)?,
            standby: get(1)?,
            kernel: get(2)?,
            migrated_primary: get(3)?,
            migrated_standby: get(4)?,
            migrated_kernel: get(5)?,
        })
    }
}

/// The socket's cookie (`SO_COOKIE`), the id a `REUSEPORT_SOCKARRAY` lookup returns.
///
/// # Errors
/// `getsockopt` failed.
pub fn socket_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).unwrap_or(8);
    #[allow(unsafe_code)]
    // SAFETY: getsockopt writes at most `len` bytes into `v`, a u64 we own.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            std::ptr::from_mut(&mut v).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `union bpf_attr` for the map element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf_elem(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    key: &u32,
    value: Option<*mut u64>,
) -> io::Result<()> {
    let attr = ElemAttr {
        map_fd: u32::try_from(map.as_raw_fd())
            .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
        key: std::ptr::from_ref(key) as u64,
        value: value.map_or(0, |p| p as u64),
        ..ElemAttr::default()
    };
    #[allow(unsafe_code)]
    // SAFETY: bpf(2) reads `attr` (sized as passed) and the key/value pointers it holds, which
    // point at live values of the sizes the map was created with (u32 key, u64 value).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_ref(&attr),
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

fn map_update(map: BorrowedFd<'_>, key: u32, mut fd: u64) -> io::Result<()> {
    bpf_elem(BPF_MAP_UPDATE_ELEM, map, &key, Some(&raw mut fd))
}

fn map_delete(map: BorrowedFd<'_>, key: u32) -> io::Result<()> {
    bpf_elem(BPF_MAP_DELETE_ELEM, map, &key, None)
}

fn map_lookup(map: BorrowedFd<'_>, key: u32) -> io::Result<Option<u64>> {
    let mut v: u64 = 0;
    match bpf_elem(BPF_MAP_LOOKUP_ELEM, map, &key, Some(&raw mut v)) {
        Ok(()) => Ok(Some(v)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}
