#!/usr/bin/env bash
# Deletes the harness's kind clusters and its work directory (certificates). Idempotent.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_tools docker kind

existing="$(kind get clusters 2>/dev/null || true)"
for c in "${BROKER_CLUSTER}" "${MEMBERS[@]}"; do
  if grep -qx "$(kind_name "${c}")" <<< "${existing}"; then
    kind delete cluster --name "$(kind_name "${c}")"
  fi
done
rm -rf "${WORK_DIR}"
log "down"
