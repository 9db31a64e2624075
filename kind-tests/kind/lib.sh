# shellcheck shell=bash disable=SC2034
# Shared by the kind harness scripts: the clusters (declared here, once), tool checks, helpers.
# Sourced, not run.

# The clusters: one broker cluster and the member clusters, by ballast cluster id.
BROKER_CLUSTER="${BROKER_CLUSTER:-broker}"
read -r -a MEMBERS <<< "${MEMBERS:-c1 c2}"
# kind cluster names and kubectl contexts derive from these.
KIND_PREFIX="${KIND_PREFIX:-ballast-}"

HARNESS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${HARNESS_DIR}/../.." && pwd)"
WORK_DIR="${WORK_DIR:-${HARNESS_DIR}/.work}"

IMAGE_TAG="${IMAGE_TAG:-kind}"
# Local images, built from the workspace and loaded into the kind nodes from image archives
# (never pulled: the charts get pullPolicy Never).
BROKER_REPO="${BROKER_REPO:-ballast/broker}"
AGENT_REPO="${AGENT_REPO:-ballast/agent}"
BROKER_IMAGE="${BROKER_REPO}:${IMAGE_TAG}"
AGENT_IMAGE="${AGENT_REPO}:${IMAGE_TAG}"
NAMESPACE="${NAMESPACE:-ballast-system}"
# The broker's gRPC port as a NodePort on the broker cluster's node, reachable from the
# member clusters' nodes over kind's docker network.
BROKER_NODE_PORT="${BROKER_NODE_PORT:-30051}"
# The demo service: an echo Deployment per member, exposed on this NodePort.
ECHO_NODE_PORT="${ECHO_NODE_PORT:-30080}"
# The ServiceImport's VIP: only ever reached through the connect4 hook, which rewrites it to
# a backend; unsteered, a connect to it stays inside the pod (loopback range).
ECHO_VIP="${ECHO_VIP:-127.96.0.10}"
ECHO_PORT=80

log() { printf '[kind-harness] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

kind_name() { printf '%s%s' "${KIND_PREFIX}" "$1"; }
ctx() { printf 'kind-%s' "$(kind_name "$1")"; }
kc() { local c="$1"; shift; kubectl --context "$(ctx "${c}")" "$@"; }

# Checks every tool up front and says plainly which are missing (exit 2).
require_tools() {
  local missing=() tool
  for tool in "$@"; do
    command -v "${tool}" >/dev/null 2>&1 || missing+=("${tool}")
  done
  if [[ " $* " == *" docker "* ]] && command -v docker >/dev/null 2>&1 \
    && ! docker info >/dev/null 2>&1; then
    missing+=("a running docker daemon (docker info failed)")
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    log "missing: $(printf "%s; " "${missing[@]}")"
    log "the kind harness needs docker (with a running daemon), kind, kubectl and helm;"
    log "this machine's CI runs the one-host lab (kind-tests/, ballast-lab) instead, not kind."
    exit 2
  fi
}

# The IP of a kind cluster's (single) node on the docker network.
node_ip() {
  docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' \
    "$(kind_name "$1")-control-plane"
}

# Waits until CMD... succeeds, at most $1 seconds.
wait_until() {
  local timeout="$1"; shift
  local start
  start="$(date +%s)"
  until "$@" >/dev/null 2>&1; do
    if [ $(( $(date +%s) - start )) -ge "${timeout}" ]; then
      return 1
    fi
    sleep 2
  done
}
