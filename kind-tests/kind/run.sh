#!/usr/bin/env bash
# The whole kind e2e: up.sh, test.sh, then down.sh (KEEP=1 keeps the clusters).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_tools docker kind kubectl helm

cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then
    "${HARNESS_DIR}/down.sh"
  else
    log "KEEP=1: clusters left running (kind-tests/kind/down.sh removes them)"
  fi
}
trap cleanup EXIT

"${HARNESS_DIR}/up.sh"
"${HARNESS_DIR}/test.sh"
