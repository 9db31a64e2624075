//! ballast data plane: connect-time steering of service VIPs in eBPF.
//!
//! The C programs in `c/` (compiled by build.rs, embedded in every binary) hook
//! `cgroup/connect4|6`, `sendmsg4|6`, `recvmsg4|6` and `getpeername4|6`. This crate loads them
//! with aya, pins maps and links under a bpffs directory, and gives a typed API over the maps:
//!
//! ```no_run
//! # fn main() -> Result<(), ballast_bpf::Error> {
//! use ballast_bpf::{BackendSpec, Dataplane, Protocol, SelectMode, ServiceSpec};
//! let mut dp = Dataplane::open("/sys/fs/bpf/ballast")?;
//! dp.attach("/sys/fs/cgroup/unified/my-pod")?;
//! dp.upsert_service(&ServiceSpec {
//!     name: "demo/web".into(),
//!     vip: "127.96.0.10".parse().unwrap(),
//!     port: 80,
//!     protocol: Protocol::Tcp,
//!     backends: vec![BackendSpec {
//!         addr: "127.0.0.1:8081".parse().unwrap(),
//!         cluster: "c2".into(),
//!         weight: 3,
//!         healthy: true,
//!     }],
//!     canary: None,
//!     select: SelectMode::Slots,
//! })?;
//! for c in dp.counters()? { println!("{} {} {}", c.service, c.backend, c.connects); }
//! # Ok(()) }
//! ```
//!
//! [`reuseport`] is apart from the data plane: the `sk_reuseport` program with which two
//! broker processes share a port (hot standby).
//!
//! Cluster ids: the kernel stores a `u32` per backend, [`cluster_id`] of the cluster name
//! (FNV-1a 32-bit; a decimal name is its own number); names are kept in a map for display.

pub mod config;
mod dataplane;
mod error;
pub mod layout;
pub mod reuseport;
pub mod sockdiag;
mod spec;
pub mod sys;

pub use dataplane::{
    BackendCounter, Dataplane, InstalledService, BPF_OBJECT, DEFAULT_PIN_DIR, PROGRAMS,
};
pub use error::{Error, Result};
pub use spec::{
    addr_words, cluster_id, cumulative, slot_table, words_addr, BackendSpec, Canary, Protocol,
    SelectMode, ServiceSpec,
};
