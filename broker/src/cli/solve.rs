//! `ballast-broker solve --input FILE.json`: read a problem, validate it, solve it, print JSON.
//!
//! Input: a [`Problem`] (unknown fields rejected). Output:
//! `{"services": [{"name", "status", "reason", "weights", "flows", "objective", "solve_ms"}]}`.
//! Damping is off (one round, no history).

use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use ballast_model::{Problem, ServiceSolution, SolveOptions};

#[derive(Serialize)]
struct Output {
    services: Vec<ServiceSolution>,
}

/// Parses a problem from JSON text; errors name the field path (`services[0]: missing field
/// `demand_rps``).
///
/// # Errors
/// The JSON is malformed or does not have the [`Problem`] shape.
pub fn parse(text: &str) -> anyhow::Result<Problem> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            anyhow::anyhow!("invalid problem: {inner}")
        } else {
            anyhow::anyhow!("{path}: {inner}")
        }
    })
}

/// Reads, validates and solves the problem in `path`; returns the JSON to print.
///
/// # Errors
/// A clear message naming the bad field, or the file that could not be read.
pub fn run(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--input: cannot read {}", path.display()))?;
    let problem = parse(&text).with_context(|| format!("--input {}", path.display()))?;
    let services = ballast_model::solve(&problem, &SolveOptions::default())
        .with_context(|| format!("--input {}", path.display()))?;
    Ok(serde_json::to_string_pretty(&Output { services })?)
}
