#!/usr/bin/env bash
# Main job until the multi-cluster lab lands here: the kernel data-plane demo.
# Starts three real loopback TCP backends, steers VIP 127.96.0.10:80 to them by weight (5:3:2)
# with ballast-dataplane for processes in a fresh cgroup, connects N times from inside the
# cgroup, and prints the observed split next to the weights. Cleans up on exit, also on failure.
# Nothing leaves the machine: the VIP is in 127.96.0.0/16 and the backends are on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${BALLAST_DEMO_CONNECTS:-10000}

bash kind-tests/setup.sh
cargo build -q -p ballast-bpf --bins
BIN=target/debug

cg_root=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
CG="$cg_root/ballast-demo-$$"
PIN="/sys/fs/bpf/ballast-demo-$$"
TMP=$(mktemp -d)
BACKENDS_PID=""

cleanup() {
  set +e
  [ -d "$CG" ] && "$BIN/ballast-dataplane" detach --cgroup "$CG" --pin-dir "$PIN" 2>/dev/null
  if [ -d "$CG" ]; then
    for p in $(cat "$CG/cgroup.procs" 2>/dev/null); do echo "$p" >"$cg_root/cgroup.procs"; done
    rmdir "$CG"
  fi
  rm -rf "$PIN"
  [ -n "$BACKENDS_PID" ] && kill "$BACKENDS_PID" 2>/dev/null && wait "$BACKENDS_PID" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

# three backends; each answers a connection with its port, then closes
python3 -u - "$TMP/ports" <<'PY' &
import socket, sys, threading
ports = []
def serve(s):
    while True:
        c, _ = s.accept()
        try:
            c.sendall(b"%d\n" % s.getsockname()[1])
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        c.close()
for _ in range(3):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(512)
    ports.append(s.getsockname()[1])
    threading.Thread(target=serve, args=(s,), daemon=True).start()
open(sys.argv[1] + ".tmp", "w").write(" ".join(map(str, ports)) + "\n")
import os; os.rename(sys.argv[1] + ".tmp", sys.argv[1])
threading.Event().wait()
PY
BACKENDS_PID=$!
for _ in $(seq 1 100); do [ -f "$TMP/ports" ] && break; sleep 0.05; done
read -r P1 P2 P3 <"$TMP/ports"

mkdir "$CG"
cat >"$TMP/services.yaml" <<YAML
services:
  - name: demo/web
    vip: 127.96.0.10
    port: 80
    protocol: tcp
    backends:
      - {address: "127.0.0.1:$P1", cluster: c1, weight: 5}
      - {address: "127.0.0.1:$P2", cluster: c2, weight: 3}
      - {address: "127.0.0.1:$P3", cluster: c3, weight: 2}
YAML
echo "== services file"
cat "$TMP/services.yaml"
"$BIN/ballast-dataplane" apply --cgroup "$CG" --pin-dir "$PIN" "$TMP/services.yaml"

echo "== $N connects to 127.96.0.10:80 from inside the cgroup"
"$BIN/ballast-probe" --cgroup "$CG" --to 127.96.0.10:80 --count "$N" >"$TMP/inside.json"
echo "== 5 connects from outside the cgroup (not steered: refused on loopback)"
"$BIN/ballast-probe" --to 127.96.0.10:80 --count 5 >"$TMP/outside.json"
"$BIN/ballast-dataplane" show --pin-dir "$PIN" --json >"$TMP/show.json"

python3 - "$TMP" "$P1" "$P2" "$P3" <<'PY'
import json, sys
tmp, ports = sys.argv[1], sys.argv[2:]
inside = json.load(open(tmp + "/inside.json"))
outside = json.load(open(tmp + "/outside.json"))
show = json.load(open(tmp + "/show.json"))
weights = {b["address"].split(":")[1]: (b["weight"], b["connects"], b["cluster"])
           for b in show["services"][0]["backends"]}
total_w = sum(w for w, _, _ in weights.values())
print(f"{'backend':<18}{'cluster':<9}{'weight':>7}{'expected':>10}{'observed':>10}{'kernel count':>14}")
for p in ports:
    w, kc, cl = weights[p]
    got = inside["by_backend"].get(p, 0)
    print(f"{'127.0.0.1:' + p:<18}{cl:<9}{w:>7}{100 * w / total_w:>9.1f}%{100 * got / max(inside['ok'], 1):>9.1f}%{kc:>14}")
print(f"inside: {inside['ok']} ok, errors {inside['errors'] or 'none'}, getpeername showed the VIP {inside['peer_is_target']} times")
print(f"outside: {outside['ok']} ok, errors {outside['errors']}")
ok = inside["ok"] > 0 and not inside["errors"] and outside["ok"] == 0
for p in ports:
    w = weights[p][0]
    ok = ok and abs(inside["by_backend"].get(p, 0) / inside["ok"] - w / total_w) < 0.03
print("demo:", "OK, traffic follows the weights" if ok else "FAILED")
sys.exit(0 if ok else 1)
PY
