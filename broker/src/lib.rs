//! ballast broker: the model (cost, policies, solvers), the store, and the gRPC server that
//! turns agents' measurements into per-ServiceImport weights.

pub mod admin_cli;
pub mod certs;
pub mod config;
pub mod engine;
pub mod grpc;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod solve_cli;
pub mod tls;

/// The store crate, under the path the member agent's tests use.
pub use ballast_store as store;
