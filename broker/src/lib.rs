//! ballast broker, the service: turns agents' measurements into per-ServiceImport weights
//! and streams them back. The model (`ballast-model`) and the store (`ballast-store`) are
//! crates of their own; here:
//!
//! - [`engine`]: a pure core (plan, round, status) inside an I/O shell (store, publication,
//!   solve loop, metrics) that offers the operations the gRPC layer calls;
//! - [`grpc`]: the Broker and Admin services — conversion, validation, identity;
//! - [`listener`]: the gRPC accept loop with connection caps and descriptor back-off;
//! - [`standby`]: hot standby on one host (SQLite lock, `--reuseport` listener);
//! - [`server`]: wiring (store, engine, gRPC over mTLS, admin HTTP port) for `serve`;
//! - [`policy`]: the policy CRDs resolved, watched and applied;
//! - [`tls`] and [`certs`]: mTLS material and the lab certificate generator;
//! - [`metrics`]: the Prometheus metrics;
//! - [`cli`]: the command line (`serve`/`certs` flags, `admin`, `solve`).

pub mod certs;
pub mod cli;
pub mod engine;
pub mod grpc;
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod standby;
pub mod tls;
