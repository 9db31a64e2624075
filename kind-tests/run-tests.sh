#!/usr/bin/env bash
# The test command: installs what is missing, starts PostgreSQL on loopback, then runs
# formatting, lints and every test of the workspace (the BPF tests load programs into this
# kernel, so this runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

bash kind-tests/setup.sh
BALLAST_TEST_PG_URL=$(bash kind-tests/postgres.sh)
case "$BALLAST_TEST_PG_URL" in
  postgres://*) ;;
  *) echo "run-tests: postgres.sh printed no usable URL: '$BALLAST_TEST_PG_URL'" >&2; exit 1 ;;
esac
export BALLAST_TEST_PG_URL

# A one-shot build gains nothing from incremental state, which would cost ~2 GB of disk.
export CARGO_INCREMENTAL=0
echo "run-tests: free disk before the build: $(df -h --output=avail . | tail -1 | tr -d ' ')"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast
