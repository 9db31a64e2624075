//! ballast member agent: discovery, RTT measurement, capacity, weight expansion, metrics,
//! configuration. The binary (`ballast-agent`) wires them together.
//!
//! - [`catalog`]: the plain model every discovery source produces
//! - [`discovery`]: the `Discovery` trait, the topology file and the Kubernetes (MCS) sources
//! - [`probe`]: RTT to peer gateways (ICMP with surge-ping, TCP-connect fallback)
//! - [`capacity`]: per-pod capacity × ready local endpoints
//! - [`weights`]: broker cluster weights → per-backend integer weights (pure)
//! - [`config`]: CLI flags, environment and config file
//! - [`metrics`]: Prometheus registry and `/metrics` server

pub mod capacity;
pub mod catalog;
pub mod config;
pub mod discovery;
pub mod install;
pub mod metrics;
pub mod probe;
pub mod session;
pub mod weights;
