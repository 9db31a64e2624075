//! `ballast-lab`: the one-host multi-cluster lab of ballast.
//!
//! Each "cluster" is a network namespace with its own cgroup v2; namespaces are joined
//! through a wan namespace by veth pairs, and a WAN emulator there delays (and can drop)
//! packets per link. The demo service `demo/echo` runs HTTP backends in the clusters; a
//! load generator runs inside a cluster and shows where its connections landed.
//!
//! - [`config`]: names, addresses, default delays from `broker/data/`
//! - [`sys`]: commands, namespaces, cgroups, entering a cluster, the lab's processes
//! - [`net`]: the lab's network (namespaces, veths, addresses, routes, rules; through `ip`)
//! - [`wan`]: the WAN emulator (TUN forwarder) and its link table
//! - [`echo`]: the demo backend
//! - [`load`]: the load generator
//! - [`lab`]: `up`, `down`, `status`, `delay`, `backends`
//! - [`control`]: broker and agents, topology files, the broker's Admin API (gRPC)

pub mod config;
pub mod control;
pub mod echo;
pub mod error;
pub mod lab;
pub mod load;
pub mod net;
pub mod probe;
pub mod sys;
pub mod wan;

pub use error::{LabError, Result};
