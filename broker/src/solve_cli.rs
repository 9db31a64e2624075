//! `ballast-broker solve --input FILE.json`: read a problem, validate it, solve it, print JSON.

use std::path::Path;

/// Reads, validates and solves the problem in `path`; returns the JSON to print.
///
/// # Errors
/// A clear message naming the bad field, or the file that could not be read.
pub fn run(path: &Path) -> anyhow::Result<String> {
    anyhow::bail!("solve is not implemented yet (input {})", path.display())
}
