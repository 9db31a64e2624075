//! ballast broker: the model (cost, policies, solvers), the store, and the gRPC server that
//! turns agents' measurements into per-ServiceImport weights.

pub mod model;
pub mod solve_cli;
