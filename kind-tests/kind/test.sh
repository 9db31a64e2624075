#!/usr/bin/env bash
# Exports the echo service from every member, writes the MCS objects (ServiceImport with a
# VIP, one EndpointSlice per serving cluster pointing at that cluster's node IP + NodePort;
# no Submariner: the harness plays its part), sets a per-service policy on the broker, and
# checks from a client pod that connections to the VIP split across clusters as the
# weights say, within a tolerance.
#
# Expected split: the weights the broker publishes for (demo/echo, client's cluster), read with
# `ballast-broker admin weights` (admin certificate from up.sh); EXPECT="c1=0.5,c2=0.5"
# overrides them. The ServiceLoadBalancingPolicy this script applies (round-robin) must show
# in those weights: that checks the broker's CRD watch end to end.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_tools docker kind kubectl
[ -f "${WORK_DIR}/certs/admin.pem" ] || die "no certificates in ${WORK_DIR}/certs: run up.sh first"

REQUESTS="${REQUESTS:-300}"
TOLERANCE="${TOLERANCE:-0.10}"
CLIENT_CLUSTER="${CLIENT_CLUSTER:-${MEMBERS[0]}}"

declare -A ip
for c in "${MEMBERS[@]}"; do
  ip[${c}]="$(node_ip "${c}")"
  [ -n "${ip[${c}]}" ] || die "no docker IP for $(kind_name "${c}")-control-plane (run up.sh first)"
done

# 1. The service, exported from every member.
for c in "${MEMBERS[@]}"; do
  log "member ${c}: echo Deployment + Service + ServiceExport"
  sed -e "s/CLUSTER_ID/${c}/" -e "s/ECHO_NODE_PORT/${ECHO_NODE_PORT}/" \
    "${HARNESS_DIR}/manifests/echo.yaml" | kc "${c}" apply -f -
done
for c in "${MEMBERS[@]}"; do
  kc "${c}" -n demo rollout status deploy/echo --timeout=180s
done

# 2. The MCS import side, written by the harness in every member: one ServiceImport with the
# VIP, one EndpointSlice per exporting cluster.
import_yaml() {
  local m
  cat <<YAML
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceImport
metadata:
  name: echo
  namespace: demo
spec:
  type: ClusterSetIP
  ips: ["${ECHO_VIP}"]
  ports:
    - {name: http, protocol: TCP, port: ${ECHO_PORT}}
YAML
  for m in "${MEMBERS[@]}"; do
    cat <<YAML
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-${m}
  namespace: demo
  labels:
    multicluster.kubernetes.io/service-name: echo
    multicluster.kubernetes.io/source-cluster: ${m}
addressType: IPv4
ports:
  - {name: http, protocol: TCP, port: ${ECHO_NODE_PORT}}
endpoints:
  - addresses: ["${ip[${m}]}"]
    conditions: {ready: true}
YAML
  done
}
for c in "${MEMBERS[@]}"; do
  log "member ${c}: ServiceImport demo/echo (${ECHO_VIP}:${ECHO_PORT}) + EndpointSlices"
  import_yaml | kc "${c}" apply -f -
  # status.clusters, as an MCS controller would set it (informational: the agent reads the
  # EndpointSlices); best effort, an older kubectl without --subresource just skips it.
  members_json="$(printf '{"cluster":"%s"},' "${MEMBERS[@]}")"
  kc "${c}" -n demo patch serviceimport echo --subresource=status --type=merge \
    -p "{\"status\":{\"clusters\":[${members_json%,}]}}" >/dev/null || true
done

# 3. The policy for this service, on the broker: round-robin (equal weights).
log "broker: ServiceLoadBalancingPolicy demo/echo -> round-robin"
kc "${BROKER_CLUSTER}" create namespace demo --dry-run=client -o yaml | kc "${BROKER_CLUSTER}" apply -f -
kc "${BROKER_CLUSTER}" apply -f - <<YAML
apiVersion: ballast.io/v1alpha1
kind: ServiceLoadBalancingPolicy
metadata:
  name: echo
  namespace: demo
spec:
  serviceImportName: echo
  serviceDiscoveryLoadBalancing: round-robin
YAML

# `ballast-broker admin` from the broker image, on kind's docker network, as the admin.
certs="${WORK_DIR}/certs"
broker_ip="$(node_ip "${BROKER_CLUSTER}")"
admin() {
  docker run --rm --network kind --user "$(id -u):$(id -g)" -v "${certs}:/certs:ro" \
    "${BROKER_IMAGE}" admin \
    --broker "https://${broker_ip}:${BROKER_NODE_PORT}" --server-name "${broker_ip}" \
    --ca /certs/ca.pem --cert /certs/admin.pem --key /certs/admin-key.pem "$@"
}
# "demo/echo from c1: c1=0.5000 c2=0.5000 [optimal round-robin/mixed]" -> that line.
published_line() {
  admin weights --service demo/echo --source "${CLIENT_CLUSTER}" \
    | grep "^demo/echo from ${CLIENT_CLUSTER}: "
}
is_round_robin() { published_line | grep -q ' round-robin/'; }
log "broker: waiting for round-robin weights for demo/echo from ${CLIENT_CLUSTER}"
wait_until 120 is_round_robin \
  || die "the broker never published round-robin weights for demo/echo (CRD watch?): $(published_line || true)"

# 4. A client in one member; wait until the VIP answers (the agent has installed weights).
kc "${CLIENT_CLUSTER}" apply -f "${HARNESS_DIR}/manifests/client.yaml"
kc "${CLIENT_CLUSTER}" -n demo wait --for=condition=Ready pod/client --timeout=180s
vip_answers() {
  kc "${CLIENT_CLUSTER}" -n demo exec client -- \
    curl -fsS --max-time 2 "http://${ECHO_VIP}:${ECHO_PORT}/"
}
log "waiting for ${ECHO_VIP}:${ECHO_PORT} to be steered in ${CLIENT_CLUSTER}"
wait_until 180 vip_answers || die "the VIP never answered from ${CLIENT_CLUSTER}: is the agent running? (kubectl --context $(ctx "${CLIENT_CLUSTER}") -n ${NAMESPACE} logs ds/ballast-agent)"

# 5. N new connections (one curl each), counted per answering cluster.
log "client in ${CLIENT_CLUSTER}: ${REQUESTS} connections to the VIP"
out="$(kc "${CLIENT_CLUSTER}" -n demo exec client -- sh -c \
  "i=0; while [ \$i -lt ${REQUESTS} ]; do curl -s --max-time 2 http://${ECHO_VIP}:${ECHO_PORT}/ || echo FAILED; echo; i=\$((i+1)); done")"

if [ -z "${EXPECT:-}" ]; then
  line="$(published_line)"
  log "published: ${line}"
  weights="${line#*: }"
  weights="${weights%%\[*}"
  read -r -a pairs <<< "${weights}"
  EXPECT="$(IFS=,; echo "${pairs[*]}")"
  [ -n "${EXPECT}" ] || die "no weights in: ${line}"
fi

failed="$(grep -c FAILED <<< "${out}" || true)"
status=0
printf '%-10s %8s %9s %9s\n' cluster count observed expected
IFS=, read -r -a expects <<< "${EXPECT}"
for e in "${expects[@]}"; do
  m="${e%%=*}"; want="${e#*=}"
  got="$(grep -c "\"cluster\": \"${m}\"" <<< "${out}" || true)"
  verdict="$(awk -v g="${got}" -v n="${REQUESTS}" -v w="${want}" -v t="${TOLERANCE}" \
    'BEGIN { o = g / n; d = o - w; if (d < 0) d = -d; printf "%.3f %s", o, (d <= t ? "ok" : "OUT") }')"
  printf '%-10s %8s %9s %9s %s\n' "${m}" "${got}" "${verdict% *}" "${want}" "${verdict#* }"
  [ "${verdict#* }" = ok ] || status=1
done
echo "failed connections: ${failed}"
[ "${failed}" -eq 0 ] || status=1
if [ "${status}" -ne 0 ]; then
  log "FAIL: split outside tolerance ${TOLERANCE} or failed connections"
  exit 1
fi
log "PASS: split within ${TOLERANCE} of ${EXPECT}"
