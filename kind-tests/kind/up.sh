#!/usr/bin/env bash
# Creates the broker cluster and the member clusters with kind, builds and loads the images,
# makes the certificates (ballast-broker certs), installs the MCS CRDs and both charts.
# Idempotent: existing clusters are reused, helm releases upgraded.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_tools docker kind kubectl helm

mkdir -p "${WORK_DIR}"

log "charts: helm lint"
helm lint "${REPO_ROOT}/helm/ballast-broker" \
  --set-string tls.cert=x,tls.key=x,tls.ca=x >/dev/null
helm lint "${REPO_ROOT}/helm/ballast-agent" \
  --set clusterId=c1,broker.address=https://broker:50051 \
  --set-string broker.tls.cert=x,broker.tls.key=x,broker.tls.ca=x >/dev/null

existing="$(kind get clusters 2>/dev/null || true)"
for c in "${BROKER_CLUSTER}" "${MEMBERS[@]}"; do
  if grep -qx "$(kind_name "${c}")" <<< "${existing}"; then
    log "cluster $(kind_name "${c}"): exists"
  else
    log "cluster $(kind_name "${c}"): creating"
    kind create cluster --name "$(kind_name "${c}")" --config "${HARNESS_DIR}/kind-config.yaml" --wait 120s
  fi
done

# The agent pins its maps in the node's bpffs and attaches to the node's cgroup v2 root:
# make sure both are there on every member node (kind nodes are containers).
for c in "${MEMBERS[@]}"; do
  node="$(kind_name "${c}")-control-plane"
  docker exec "${node}" sh -c \
    'grep -q " /sys/fs/bpf bpf " /proc/mounts || mount -t bpf bpf /sys/fs/bpf'
  docker exec "${node}" sh -c 'grep -q " /sys/fs/cgroup cgroup2 " /proc/mounts' \
    || die "${node}: /sys/fs/cgroup is not cgroup v2 (the agent needs a cgroup v2 Docker host)"
done

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  log "images: building ${BROKER_IMAGE} and ${AGENT_IMAGE} (context: ${REPO_ROOT})"
  # buildx (BuildKit: the Dockerfiles use cache mounts); --load into the local image store,
  # for this machine's platform only; no provenance attestation (a local image).
  docker buildx build --load --provenance=false -f "${REPO_ROOT}/broker/Dockerfile" \
    -t "${BROKER_IMAGE}" "${REPO_ROOT}"
  docker buildx build --load --provenance=false -f "${REPO_ROOT}/member-agent/Dockerfile" \
    -t "${AGENT_IMAGE}" "${REPO_ROOT}"
fi
# Into the kind nodes through image archives (`docker save` to a file, `kind load
# image-archive`): `kind load docker-image` fails with Docker >= 29, whose containerd image
# store hands kind an archive its import rejects.
images="${WORK_DIR}/images"
mkdir -p "${images}"
log "images: saving to ${images}, loading with kind load image-archive"
docker save -o "${images}/broker.tar" "${BROKER_IMAGE}"
docker save -o "${images}/agent.tar" "${AGENT_IMAGE}"
kind load image-archive "${images}/broker.tar" --name "$(kind_name "${BROKER_CLUSTER}")"
for c in "${MEMBERS[@]}"; do
  kind load image-archive "${images}/agent.tar" --name "$(kind_name "${c}")"
done

broker_ip="$(node_ip "${BROKER_CLUSTER}")"
[ -n "${broker_ip}" ] || die "no docker IP for $(kind_name "${BROKER_CLUSTER}")-control-plane"
log "broker node: ${broker_ip}, gRPC NodePort ${BROKER_NODE_PORT}"

certs="${WORK_DIR}/certs"
if [ ! -f "${certs}/ca.pem" ]; then
  log "certificates: ballast-broker certs --out ${certs}"
  mkdir -p "${certs}"
  members_csv="$(IFS=,; echo "${MEMBERS[*]}")"
  docker run --rm --user "$(id -u):$(id -g)" -v "${certs}:/certs" "${BROKER_IMAGE}" \
    certs --out /certs --clusters "${members_csv}" --server-san "${broker_ip}"
fi

log "broker: CRDs + helm install in $(ctx "${BROKER_CLUSTER}")"
# helm installs crds/ only on first install; apply them so a re-run picks up changes.
kc "${BROKER_CLUSTER}" apply -f "${REPO_ROOT}/helm/ballast-broker/crds/"
helm upgrade --install ballast-broker "${REPO_ROOT}/helm/ballast-broker" \
  --kube-context "$(ctx "${BROKER_CLUSTER}")" --namespace "${NAMESPACE}" --create-namespace \
  --set image.repository="${BROKER_REPO}" --set image.tag="${IMAGE_TAG}" \
  --set image.pullPolicy=Never \
  --set service.type=NodePort --set service.grpcNodePort="${BROKER_NODE_PORT}" \
  --set serviceDiscoveryLoadBalancing="${POLICY:-optimized}" \
  --set optimizedLoadBalancingParams="${PARAMS:-mixed}" \
  --set-file tls.cert="${certs}/server.pem" \
  --set-file tls.key="${certs}/server-key.pem" \
  --set-file tls.ca="${certs}/ca.pem" \
  --wait --timeout 5m

declare -A member_ip
for c in "${MEMBERS[@]}"; do
  member_ip[${c}]="$(node_ip "${c}")"
  [ -n "${member_ip[${c}]}" ] || die "no docker IP for $(kind_name "${c}")-control-plane"
done

for c in "${MEMBERS[@]}"; do
  log "member ${c}: MCS CRDs, agent (gateway ${member_ip[${c}]})"
  kc "${c}" apply -f "${HARNESS_DIR}/mcs-crds/"
  # The other members, as the agent's peers: their node IP is their gateway (RTT probes).
  peers="${WORK_DIR}/peers-${c}.yaml"
  {
    echo "peers:"
    for m in "${MEMBERS[@]}"; do
      [ "${m}" = "${c}" ] && continue
      echo "  - {id: ${m}, region: kind, zone: kind-${m}, provider: kind, gateway: ${member_ip[${m}]}}"
    done
  } > "${peers}"
  helm upgrade --install ballast-agent "${REPO_ROOT}/helm/ballast-agent" \
    --kube-context "$(ctx "${c}")" --namespace "${NAMESPACE}" --create-namespace \
    --set image.repository="${AGENT_REPO}" --set image.tag="${IMAGE_TAG}" \
    --set image.pullPolicy=Never \
    --set clusterId="${c}" \
    --set region=kind --set zone="kind-${c}" --set provider=kind \
    --set gateway="${member_ip[${c}]}" \
    --values "${peers}" \
    --set broker.address="https://${broker_ip}:${BROKER_NODE_PORT}" \
    --set-file broker.tls.cert="${certs}/cluster-${c}.pem" \
    --set-file broker.tls.key="${certs}/cluster-${c}-key.pem" \
    --set-file broker.tls.ca="${certs}/ca.pem" \
    --wait --timeout 5m
done
log "up: broker in $(ctx "${BROKER_CLUSTER}"), members ${MEMBERS[*]}"
