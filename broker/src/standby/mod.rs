//! Hot standby on one host: two `serve` processes on one SQLite file and one port.
//!
//! - [`DbLock`]: the single-writer rule. `serve` on SQLite takes an exclusive `flock(2)` on
//!   `<database file>.lock` before it opens the store (with or without `--reuseport`), so two
//!   processes never both write one file. The holder writes its pid into the file; a process
//!   that finds the lock held says so, reports `ballast_broker_standby 1` and blocks until the
//!   holder exits (the kernel drops the lock with the holder's last descriptor, `kill -9`
//!   included), then takes over.
//! - [`SharedListener`] (`--reuseport`): the gRPC listener bound with `SO_REUSEPORT`, with the
//!   `sk_reuseport` program of `ballast_bpf::reuseport` attached to its group. A standby binds
//!   and enters slot 1 before it waits, so the kernel has a socket to queue connections on the
//!   moment the primary's socket is gone; on taking the lock it moves to slot 0.
//!
//! Leadership (lease, terms) is the store's and engine's business, not this module's: here
//! only "nothing touches the store before the lock is held".

mod lock;
mod shared;

pub use lock::{sqlite_file, DbLock, LockAttempt, LockWaiter};
pub use shared::{default_pin_dir, ReuseportConfig, SharedListener, LISTEN_BACKLOG};

/// Failures of the hot-standby machinery.
#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error("database lock {path}")]
    Lock {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("database lock {path}: the waiting thread ended without the lock")]
    LockThread { path: std::path::PathBuf },
    #[error("--reuseport listener {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("--reuseport program (pin dir {pin_dir})")]
    Program {
        pin_dir: std::path::PathBuf,
        #[source]
        source: Box<ballast_bpf::reuseport::ReuseportError>,
    },
}
