#!/usr/bin/env bash
# The main job: the one-host multi-cluster lab from a fresh clone.
#
# Installs what is missing (setup.sh), builds the release binaries, brings up three
# "clusters" (network namespaces + cgroups, joined through an emulated WAN with delays from
# real inter-region RTTs), the broker (SQLite, mTLS) and two nodes per cluster (one agent
# each, in its own cgroup under the cluster's), then runs a short scenario:
#   0. the broker's capacity per (service, cluster) must be per-pod x ready pods, not x the
#      number of nodes (every node reports it; the job fails otherwise)
#   1. baseline: where 400 connections from each node of c1 to demo/echo land, beside the weights
#   2. the delay between c1 and c2 is raised: the weights and the split move away from c2
#   3. c2's backends are stopped during a load and while keep-alive clients hold connections
#      there: the agents close those connections, traffic shifts to c3, nothing fails
#   4. optimized against round-robin: mean RTT, and the egress bytes measured in the kernel
#      and their dollars (broker admin savings), with the round-robin counterfactual
#   5. load-aware optimized: two clusters about as far, backends really slower under load;
#      declaring their service-time curves, or letting the agents measure them (the broker
#      fits), moves traffic to the flatter one and lowers the measured mean request time
#      against the linear model
#   6. broker failover (3 replicas on the lab's PostgreSQL): the leader is SIGKILLed while c1
#      opens connections steadily; no connect fails, another replica leads within the lease
#      time, and the weights still follow a changed delay afterwards
# and takes everything down again (also on failure or Ctrl-C).
#
# Nothing leaves this machine: clusters are namespaces with no default route, the service
# VIP is in 127.96.0.0/16. Run as root: sudo bash kind-tests/run-lab.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "run-lab.sh: run as root (network namespaces, cgroups, BPF): sudo bash $0" >&2
  exit 1
fi

bash kind-tests/setup.sh

# BALLAST_LAB_PROFILE=debug reuses the debug build (quicker on a small machine).
profile="${BALLAST_LAB_PROFILE:-release}"
case "$profile" in
  release) flags=(--release) ;;
  debug) flags=() ;;
  *) echo "run-lab.sh: BALLAST_LAB_PROFILE must be release or debug" >&2; exit 1 ;;
esac
echo "== building ballast-lab, ballast-broker, ballast-agent ($profile)"
cargo build "${flags[@]}" --locked -q \
  -p ballast-lab -p ballast-broker -p ballast-agent \
  --bin ballast-lab --bin ballast-broker --bin ballast-agent

LAB="$PWD/target/$profile/ballast-lab"
export BALLAST_LAB_PREFIX="${BALLAST_LAB_PREFIX:-ballast}"
tmp=$(mktemp -d)
cleanup() {
  local rc=$?
  echo "== down"
  "$LAB" down || true
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$LAB" down >/dev/null # leftovers of an earlier run

# c3 on another provider (Azure West Europe), so that egress price, not only RTT, tells the
# policies apart (AWS bills every inter-region transfer from us-east-1 at the same $0.02/GB).
REGIONS="${BALLAST_LAB_REGIONS:-us-east-1,us-west-2,westeurope}"
NODES="${BALLAST_LAB_NODES:-2}"
BROKERS="${BALLAST_LAB_BROKERS:-3}"
echo "== up: 3 clusters ($REGIONS), $BROKERS broker replica(s) (policy optimized), $NODES nodes (agents) per cluster"
# `up` fails (the trap then takes the lab down) when the agents install no weights in time,
# naming the directory with the broker's and agents' logs.
"$LAB" up --clusters 3 --nodes "$NODES" --brokers "$BROKERS" --regions "$REGIONS"
"$LAB" brokers

echo
echo "== 0. capacity is a cluster fact: every node reports it, the broker counts it once"
echo "      (per-pod x ready pods; 'MISMATCH' and a non-zero exit otherwise)"
"$LAB" capacity --check --wait-secs 30

echo
echo "== 1. baseline: 400 connections from each node of c1 (the weights are c1's, from the broker)"
"$LAB" settle --from c1 --wait-secs 120
for n in $(seq 1 "$NODES"); do
  "$LAB" load --from c1 --node "n$n" --service demo/echo --connections 400
done

echo
echo "== 2. the delay c1 <-> c2 is raised to 150 ms one way; the agents measure it and the"
echo "      broker moves c1's weight, in damped steps"
"$LAB" delay c1 c2 150
"$LAB" settle --from c1 --wait-secs 120
"$LAB" load --from c1 --service demo/echo --connections 400
echo "-- a quiet client: 3 connections/s from c1, c2 still 150 ms away. The liveness floor is a"
echo "   share of the source's demand (min(1 rps, 1 %, 10 %/clusters)), so it goes where a busy"
echo "   one goes; and a steady load publishes (almost) no new generation (hysteresis)"
"$LAB" load --from c1 --service demo/echo --connections 120 --rate 3 >/dev/null # demand settles
gen() { "$LAB" status --json | python3 -c 'import json, sys; print(json.load(sys.stdin).get("generation") or 0)'; }
g0=$(gen)
"$LAB" load --from c1 --service demo/echo --connections 120 --rate 3 --json >"$tmp/quiet.json"
g1=$(gen)
python3 - "$tmp/quiet.json" "$g0" "$g1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
g0, g1 = int(sys.argv[2]), int(sys.argv[3])
to_c2 = r["observed"].get("c2", 0.0)
per_hour = (g1 - g0) / r["elapsed_s"] * 3600
print(f"quiet client: {r['connections']} connections in {r['elapsed_s']:.0f} s, {r['failed']} failed; "
      f"observed split {r['observed']} (weights {r.get('weights_end')})")
print(f"generations published meanwhile: {g1 - g0} ({per_hour:.0f} per hour)")
if r["failed"] != 0:
    sys.exit("run-lab.sh: the quiet client's connections failed")
if to_c2 > 0.10:
    sys.exit(f"run-lab.sh: a 3-connection/s client still sends {to_c2:.0%} to c2 150 ms away")
if g1 - g0 > 3:
    sys.exit(f"run-lab.sh: {g1 - g0} generations in {r['elapsed_s']:.0f} s of steady load")
PY
echo "-- back to the default delay (the RTT average needs a few probes to come down)"
"$LAB" delay c1 c2 --default
"$LAB" settle --from c1 --stable-secs 8 --wait-secs 120

echo
echo "== 3. c2's backends are stopped while c1 opens 1200 connections and 4 keep-alive clients"
echo "      send 60 requests/s on long-lived connections: the agents drain c2 (readiness first),"
echo "      close the connections they steered there, the traffic shifts to c3, nothing fails"
"$LAB" load --from c1 --service demo/echo --keepalive --concurrency 4 --connections 1200 \
  --rate 60 --json >"$tmp/held.json" &
held_pid=$!
"$LAB" load --from c1 --service demo/echo --connections 1200 >"$tmp/during.txt" &
load_pid=$!
sleep 1
"$LAB" backends c2 demo/echo stop
wait "$load_pid"
wait "$held_pid"
cat "$tmp/during.txt"
destroyed=0
for n in $(seq 1 "$NODES"); do
  addr=$(python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); c = [c for c in s["clusters"] if c["id"] == "c1"][0]; print(c["nodes"][int(sys.argv[2]) - 1]["metrics_addr"])' \
    "${BALLAST_LAB_STATE_DIR:-/run/$BALLAST_LAB_PREFIX-lab}/state.json" "$n")
  m=$("$LAB" exec c1 --node "n$n" -- python3 -c \
    'import sys, urllib.request; print(urllib.request.urlopen("http://" + sys.argv[1] + "/metrics").read().decode())' "$addr" |
    awk '$1 == "ballast_agent_sockets_destroyed_total" { print int($2) }')
  destroyed=$((destroyed + ${m:-0}))
done
python3 - "$tmp/held.json" "$destroyed" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
destroyed = int(sys.argv[2])
print(f"keep-alive clients: {r['ok']} requests answered on {r['opened']} connections "
      f"({r['reconnects']} reconnects), {r['failed']} failed; split {r['by_cluster']}; "
      f"c1's agents closed {destroyed} steered connection(s) to c2")
if r["failed"] != 0:
    sys.exit("run-lab.sh: keep-alive requests failed while c2 was drained")
if r["by_cluster"].get("c2", 0) > 0 and destroyed == 0:
    sys.exit("run-lab.sh: keep-alive connections held c2 but no agent closed them")
if r["by_cluster"].get("c3", 0) == 0:
    sys.exit("run-lab.sh: the keep-alive clients never moved to c3")
PY
echo "-- after"
"$LAB" load --from c1 --service demo/echo --connections 200
"$LAB" backends c2 demo/echo start
"$LAB" settle --from c1 --wait-secs 120 >/dev/null

echo "-- capacity after c2's backends came back"
"$LAB" capacity --check --wait-secs 30

echo
echo "== 4. optimized against round-robin from c1: 40 connections/s, 64 kB answers; the bytes"
echo "      the agents' BPF programs counted, priced by the broker per direction (admin savings),"
echo "      must cost less under optimized, and the round-robin counterfactual the broker computes"
echo "      under optimized must match (within 25 %) what round-robin then really spends"
"$LAB" compare --from c1 --service demo/echo --policies optimized,round-robin \
  --connections 480 --rate 40 --response-bytes 65536 --check
"$LAB" policy optimized >/dev/null

echo
echo "== 5. load-aware optimized: c2 and c3 about as far from c1 (30 and 31 ms one way), their"
echo "      backends really slower under load (c2: 2 ms + 1 ms per RPS per pod, c3: 2 ms +"
echo "      0.25 ms per RPS). Unknown to the broker, the linear model fills the nearer c2;"
echo "      declared (topology service_time = ServiceExport annotation ballast.io/service-time)"
echo "      or measured (the agents probe their backends, service_time_probe = annotation"
echo "      ballast.io/service-time-probe, and the broker fits the curves), the broker balances"
echo "      the marginal costs. Same backends, same 40 connections/s"
"$LAB" policy optimized --params performance >/dev/null
"$LAB" delay c1 c2 30 >/dev/null
"$LAB" delay c1 c3 31 >/dev/null
"$LAB" service-time c2 demo/echo --backends base_ms=2,slope_ms_per_rps=1
"$LAB" service-time c3 demo/echo --backends base_ms=2,slope_ms_per_rps=0.25
"$LAB" settle --from c1 --wait-secs 120 >/dev/null
measure() { # warm-up (the agents measure the demand, the broker re-solves), then 30 s measured
  "$LAB" load --from c1 --service demo/echo --connections 800 --rate 40 >/dev/null
  "$LAB" load --from c1 --service demo/echo --connections 1200 --rate 40 --json >"$1"
}
measure "$tmp/linear.json"
echo "-- the agents of c2 and c3 probe GET / on their backends; nothing is declared"
"$LAB" service-time c2 demo/echo --probe / >/dev/null
"$LAB" service-time c3 demo/echo --probe / >/dev/null
measure "$tmp/measured.json"
"$LAB" explain --from c1 --service demo/echo
echo "-- the probes removed (their curves go with them), the curves declared instead"
"$LAB" service-time c2 demo/echo --probe none --declare base_ms=2,slope_ms_per_rps=1
"$LAB" service-time c3 demo/echo --probe none --declare base_ms=2,slope_ms_per_rps=0.25
measure "$tmp/declared.json"
python3 - "$tmp/linear.json" "$tmp/declared.json" "$tmp/measured.json" <<'PY'
import json, sys
lin, dec, mea = (json.load(open(p)) for p in sys.argv[1:4])
for name, r in (("linear (nothing known)", lin), ("load-aware, curves measured", mea),
                ("load-aware, curves declared", dec)):
    print(f"{name:<28} split {', '.join(f'{c} {s:.0%}' for c, s in r['observed'].items())}; "
          f"mean request {r['mean_latency_ms']:.1f} ms (connect {r['mean_connect_ms']:.1f} ms); "
          f"{r['failed']} failed of {r['connections']}")
for name, r in (("measured", mea), ("declared", dec)):
    drop = 1 - r["mean_latency_ms"] / lin["mean_latency_ms"]
    print(f"mean request time {drop:.1%} lower with the curves {name}")
    if r["failed"] or lin["failed"]:
        sys.exit("run-lab.sh: connections failed in the load-aware step")
    if r["observed"].get("c2", 0.0) > lin["observed"].get("c2", 0.0) - 0.2:
        sys.exit(f"run-lab.sh: the {name} curves did not move c1's traffic off the steeper c2")
    if drop < 0.08:
        sys.exit(f"run-lab.sh: the mean request time did not drop by 8 % with the curves {name}")
PY
for c in c2 c3; do
  "$LAB" service-time "$c" demo/echo --backends none --declare none --probe none >/dev/null
  "$LAB" delay c1 "$c" --default >/dev/null
done
"$LAB" policy optimized --params mixed >/dev/null
"$LAB" settle --from c1 --stable-secs 8 --wait-secs 120 >/dev/null

if [ "$BROKERS" -gt 1 ]; then
  echo
  echo "== 6. broker failover: the leader is SIGKILLed while c1 opens 50 connections/s; the data"
  echo "      plane keeps steering, another replica leads within the lease time, the killed one"
  echo "      rejoins as a follower, and the weights still follow a changed delay"
  "$LAB" load --from c1 --service demo/echo --connections 400 --rate 50 --json >"$tmp/failover-load.json" &
  load_pid=$!
  sleep 2
  "$LAB" failover --json >"$tmp/failover.json"
  wait "$load_pid"
  python3 - "$tmp/failover-load.json" "$tmp/failover.json" <<'PY'
import json, sys
load = json.load(open(sys.argv[1]))
fo = json.load(open(sys.argv[2]))
print(f"killed broker-{fo['killed']['index']} (leader, term {fo['killed']['term']}); "
      f"broker-{fo['new_leader']['index']} leads term {fo['new_leader']['term']} "
      f"after {fo['takeover_ms']:.0f} ms (lease 3 s)")
print(f"connections during the failover: {load['connections']} opened, {load['failed']} failed")
if load["failed"] != 0:
    sys.exit("run-lab.sh: connections failed during the broker failover")
if fo["takeover_ms"] > 3000 + 1000:
    sys.exit("run-lab.sh: the new leader took longer than the lease time (+1 s of rounds)")
PY
  "$LAB" brokers
  echo "-- the delay c1 <-> c2 is raised again: the new leader moves c1's weight off c2"
  "$LAB" delay c1 c2 150
  "$LAB" settle --from c1 --wait-secs 120
  python3 - <<PY
import json, subprocess, sys
st = json.loads(subprocess.check_output(["$LAB", "status", "--json"]))
w = st["weights"]["demo/echo"]["c1"]
print(f"c1's weights after the failover: {w}")
if w.get("c2", 0.0) > 0.5:
    sys.exit("run-lab.sh: c1's weight on c2 did not move away after the failover")
PY
  "$LAB" delay c1 c2 --default
fi
echo
echo "run-lab.sh: done"
