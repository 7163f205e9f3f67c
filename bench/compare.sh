#!/usr/bin/env bash
# The whole performance comparison (issue "Performance"), one command:
# Switchyard against its reference peers (bench/peers/: a bare
# tokio-tungstenite broadcast server and a Node `ws` server) under the same
# load generator on the same machine, runs alternating between servers, each
# figure printed with the ratio Switchyard/peer; then the workloads only
# Switchyard has (fan-out through the Redis backplane, a migration of 50,000
# connections from 3 blue to 3 green gateway processes) and the goals.
#
# Workloads per round: idle memory per connection; fan-out to 10,000
# subscribers at 100 msg/s (delivered/s, latency p50/p99/p999); handshakes
# per second, plain and TLS (ECDSA P-256 certificate), with the server's own
# CPU time per handshake. Bounded: every process stops by itself or is killed
# on exit; about 9 minutes with the defaults, plus ~4 for Redis and the
# migration (SKIP_CLUSTER=1 leaves those two out).
#
#   bench/compare.sh [rounds=2] [idle_connections=19000] [subscribers=10000] [rate=100] [secs=8]
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-2}
IDLE=${2:-19000}
SUBSCRIBERS=${3:-10000}
RATE=${4:-100}
SECS=${5:-8}
HANDSHAKES=10000
PORT=${PORT:-24080}
SOURCES=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5
# Handshake runs close 10,000 connections each: their TIME_WAIT sockets
# get source addresses and a port of their own.
HANDSHAKE_SOURCES=127.0.0.10,127.0.0.11,127.0.0.12,127.0.0.13,127.0.0.14,127.0.0.15
ulimit -n 20000 2>/dev/null || true

cargo build --release --quiet -p switchyard-server -p switchyard-bench
# shellcheck source=bench/lib.sh
source bench/lib.sh
need_node_peer
need_commands openssl:openssl
bench_setup
make_certs "$WORK/tls"

# Every other round runs the servers in reverse order: whichever goes first
# after the idle phase inherits its aftermath (tens of thousands of sockets
# being torn down, TIME_WAIT), which in a fixed order always fell on the same
# server (Switchyard's fan-out p99 was 1.5x worse first than in isolation).
in_order() { # round names... -> the names, reversed on even rounds
  local round=$1; shift
  if [ $((round % 2)) -eq 1 ]; then printf '%s\n' "$@"; else printf '%s\n' "$@" | tac; fi
}

for round in $(seq 1 "$ROUNDS"); do
  for name in $(in_order "$round" switchyard tungstenite-4k-batched tungstenite-default-config node-ws); do
    idle "$name"
  done
  sleep 5 # let the idle runs' sockets go before timing anything
  for name in $(in_order "$round" switchyard tungstenite-4k-batched tungstenite-4k-per-message node-ws); do
    fanout "$name"
  done
  for name in $(in_order "$round" switchyard tungstenite-4k-batched node-ws); do
    PORT=$((PORT + 10)) SOURCES=$HANDSHAKE_SOURCES handshakes "$name"
    PORT=$((PORT + 20)) SOURCES=$HANDSHAKE_SOURCES TLS_DIR=$WORK/tls handshakes "$name"
  done
done

if [ -z "${SKIP_CLUSTER:-}" ]; then
  # Switchyard only: the peers have neither a backplane nor migrations.
  bench/backplane.sh "$SUBSCRIBERS" 50 "$SECS" 1 | tail -n 1 |
    python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['workload']='backplane'; print(json.dumps(r))" |
    tee -a "$WORK/results"
  MESSAGES=80 bench/migration.sh 50000 make_before_break 700 10000 | tail -n 1 | tee -a "$WORK/results"
fi

python3 - "$WORK/results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
med = lambda xs: round(statistics.median(xs), 2)
def by(workload, variant=None):
    out = {}
    for r in rows:
        if r["workload"] == workload and (variant is None or r.get("variant") == variant):
            out.setdefault(r["server"], []).append(r)
    return out
idle = {s: med([r["kib_per_connection"] for r in rs]) for s, rs in by("idle").items()}
fan = {s: {
    "delivered_per_sec": round(statistics.median(r["delivered_per_sec"] for r in rs)),
    "p50_ms": med([r["latency_ms"]["p50"] for r in rs]),
    "p99_ms": med([r["latency_ms"]["p99"] for r in rs]),
    "p999_ms": med([r["latency_ms"]["p999"] for r in rs]),
    "lost": sum(r["expected_deliveries"] - r["delivered"] for r in rs),
} for s, rs in by("fanout").items()}
hs = {mode: {s: {
    "per_sec": round(statistics.median(r["handshakes_per_sec"] for r in rs)),
    "server_cpu_us": med([r["server_cpu_us_per_handshake"] for r in rs]),
    "load_generator_cpu_us": med([r["client_cpu_us_per_handshake"] for r in rs]),
} for s, rs in by("handshakes", mode).items()} for mode in ("plain", "tls")}
ratio = lambda a, b: round(a / b, 2) if b else None
sy = "switchyard"
summary = {
    "rounds": max(len(rs) for rs in by("idle").values()),
    "idle_kib_per_connection": idle,
    "idle_ratio_switchyard_over": {s: ratio(idle[sy], v) for s, v in idle.items() if s != sy},
    "fanout": fan,
    "fanout_throughput_ratio_switchyard_over": {s: ratio(fan[sy]["delivered_per_sec"], v["delivered_per_sec"]) for s, v in fan.items() if s != sy},
    "fanout_p99_ratio_switchyard_over": {s: ratio(fan[sy]["p99_ms"], v["p99_ms"]) for s, v in fan.items() if s != sy},
    "handshakes": hs,
    "handshakes_ratio_switchyard_over": {mode: {s: ratio(hs[mode][sy]["per_sec"], v["per_sec"]) for s, v in hs[mode].items() if s != sy} for mode in hs},
}
backplane = next((r for r in rows if r["workload"] == "backplane"), None)
migration = next((r for r in rows if r["workload"] == "migration"), None)
if backplane:
    summary["backplane"] = backplane["summary"]
if migration:
    summary["migration"] = migration
goals = {
    "idle <= 4 KiB/conn": [idle[sy], idle[sy] <= 4],
    # 1M/s offered (10,000 x 100 msg/s) and every delivery made; delivered/s
    # is counted from the first publish to the last delivery, so a little under.
    ">= 1M deliveries/s, none lost": [fan[sy]["delivered_per_sec"], fan[sy]["lost"] == 0 and fan[sy]["delivered_per_sec"] >= 0.98e6],
    "p99 <= 50 ms at that rate": [fan[sy]["p99_ms"], fan[sy]["p99_ms"] <= 50],
    ">= 8x Node ws fan-out": [summary["fanout_throughput_ratio_switchyard_over"].get("node-ws"), (summary["fanout_throughput_ratio_switchyard_over"].get("node-ws") or 0) >= 8],
    ">= 20k handshakes/s (plain)": [hs["plain"][sy]["per_sec"], hs["plain"][sy]["per_sec"] >= 20000],
}
if migration:
    goals["migration: 0 lost"] = [migration["lost"], migration["lost"] == 0]
    goals["migration: close rate <= cap + 10% (sent, gateways' counters)"] = [migration["peak_sent_over_cap"], migration["peak_sent_over_cap"] <= 1.1]
    goals["migration: close rate <= cap + 10% (received, load processes)"] = [migration["peak_received_over_cap"], migration["peak_received_over_cap"] <= 1.1]
summary["goals"] = goals
print(json.dumps(summary, indent=1))
PY
