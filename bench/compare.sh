#!/usr/bin/env bash
# Switchyard against its reference peers, same load generator, same machine,
# one run (issue "Performance"): idle memory per connection and fan-out
# throughput/latency. Peers (bench/peers/): a bare tokio-tungstenite broadcast
# server in three variants and a Node `ws` server. Bounded: every process
# stops by itself or is killed on exit; prints one JSON line per measurement,
# then a summary with the ratios Switchyard/peer.
#
#   bench/compare.sh [idle_connections=19000] [subscribers=10000] [rate=100] [secs=10]
set -euo pipefail
cd "$(dirname "$0")/.."

IDLE=${1:-19000}
SUBSCRIBERS=${2:-10000}
RATE=${3:-100}
SECS=${4:-10}
PORT=${PORT:-24080}
SOURCES=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5
ulimit -n 20000 2>/dev/null || true

cargo build --release --quiet -p switchyard-server -p switchyard-bench
[ -d bench/peers/node-ws/node_modules/ws ] ||
  npm ci --prefix bench/peers/node-ws --no-audit --no-fund --silent
BIN=target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

# shellcheck source=bench/lib.sh
source bench/lib.sh

for name in switchyard tungstenite-4k-batched tungstenite-default-config node-ws; do idle "$name"; done
fanout switchyard switchyard
fanout tungstenite-4k-batched raw
fanout tungstenite-4k-per-message raw
fanout node-ws raw

python3 - "$WORK/results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
idle = {r["server"]: r["kib_per_connection"] for r in rows if r["workload"] == "idle"}
fan = {r["server"]: r for r in rows if r["workload"] == "fanout"}
sy = fan.get("switchyard", {})
summary = {
    "idle_kib_per_connection": idle,
    "idle_ratio_switchyard_over": {k: round(idle["switchyard"] / v, 2) for k, v in idle.items() if k != "switchyard"},
    "fanout_delivered_per_sec": {k: round(v["delivered_per_sec"]) for k, v in fan.items()},
    "fanout_p50_p99_p999_ms": {k: [v["latency_ms"]["p50"], v["latency_ms"]["p99"], v["latency_ms"]["p999"]] for k, v in fan.items()},
    "fanout_throughput_ratio_switchyard_over": {k: round(sy["delivered_per_sec"] / v["delivered_per_sec"], 2) for k, v in fan.items() if k != "switchyard"},
}
print(json.dumps(summary, indent=1))
PY
