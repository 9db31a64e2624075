//! The `ballast-broker` command line, one module per concern: [`args`] (the `serve` and
//! `certs` flags, every one with `env =`, turned into a `ServeConfig`), [`admin`] (operator
//! commands against a running broker's Admin service), [`solve`] (one problem solved offline
//! from a JSON file, no server, no store). `main.rs` only dispatches.

pub mod admin;
pub mod args;
pub mod solve;
