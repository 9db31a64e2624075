#!/usr/bin/env bash
# The test command: installs what is missing, starts PostgreSQL on loopback, then runs
# formatting, lints and every test of the workspace (the BPF tests load programs into this
# kernel, so this runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

bash kind-tests/setup.sh
BALLAST_TEST_PG_URL=$(bash kind-tests/postgres.sh)
export BALLAST_TEST_PG_URL

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast
