#!/usr/bin/env bash
# The test command: installs what is missing, starts PostgreSQL on loopback, then runs
# formatting, lints and every test of the workspace (the BPF tests load programs into this
# kernel, so this runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo "run-tests: $(date -u +%H:%M:%S) $*" >&2; }

step "installing what is missing"
bash kind-tests/setup.sh
step "starting PostgreSQL on loopback"
BALLAST_TEST_PG_URL=$(bash kind-tests/postgres.sh)
case "$BALLAST_TEST_PG_URL" in
  postgres://*) ;;
  *) echo "run-tests: postgres.sh printed no usable URL: '$BALLAST_TEST_PG_URL'" >&2; exit 1 ;;
esac
export BALLAST_TEST_PG_URL

# A one-shot build gains nothing from incremental state, which would cost ~2 GB of disk.
export CARGO_INCREMENTAL=0
echo "run-tests: free disk before the build: $(df -h --output=avail . | tail -1 | tr -d ' ')"

# CI stops a run after 90 minutes and shows little of it; a hang here should instead fail
# with its step named. A clean run takes about 5 minutes.
step "cargo fmt"
cargo fmt --all -- --check
step "cargo clippy"
timeout 30m cargo clippy --workspace --all-targets --locked -- -D warnings
step "charts: real Helm 4 (lint, render), Kubernetes 1.29/1.37 and CRD schemas, checkov"
charts_python=$(bash kind-tests/chart-tools.sh)
timeout 15m "$charts_python" kind-tests/charts/check.py
step "cargo test"
timeout 50m cargo test --workspace --locked --no-fail-fast
step "done"
