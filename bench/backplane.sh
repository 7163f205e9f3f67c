#!/usr/bin/env bash
# Redis backplane vs in-memory broker, fan-out in the same run (issue "Redis
# backplane"). Bounded: every process stops by itself or is killed on exit.
#
#   bench/backplane.sh [subscribers=10000] [rate=50] [secs=10] [rounds=2]
#
# memory: one gateway, all subscribers on it.
# redis:  PODS gateways sharing one port (SO_REUSEPORT spreads the
#         subscribers across them) on one private redis-server; the publisher
#         posts to pod 1, so most deliveries cross pods through Redis pub/sub.
#         Each pod runs POD_THREADS (default 1) worker threads, as a pod with
#         a one-CPU limit would.
# Rounds alternate memory/redis; one JSON line per run, then the medians.
set -euo pipefail
cd "$(dirname "$0")/.."

SUBSCRIBERS=${1:-10000}
RATE=${2:-50}
SECS=${3:-10}
ROUNDS=${4:-2}
PODS=${PODS:-3}
PORT=${PORT:-22080}
SOURCES=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7

cargo build --release --quiet -p switchyard-server -p switchyard-bench
BIN=target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEP:-}" ] && echo "kept $WORK" || rm -rf "$WORK"; }
trap cleanup EXIT

# shellcheck source=bench/lib.sh
source bench/lib.sh
start_redis "$WORK"

run() { # label pods extra-args...
  local label=$1 pods=$2; shift 2
  local gws=()
  for i in $(seq 1 "$pods"); do
    "$BIN/switchyard-server" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$((PORT + i))" \
      --set reuse_port=true --set websocket.handshake_rate=0 --log-format json "$@" 2>"$WORK/gw$i.log" &
    gws+=($!); PIDS+=($!)
  done
  for i in $(seq 1 "$pods"); do
    until curl -sf "127.0.0.1:$PORT/readyz" >/dev/null && curl -sf "127.0.0.1:$((PORT + i))/admin/status" >/dev/null; do sleep 0.1; done
  done
  "$BIN/switchyard-load" fanout --target "127.0.0.1:$PORT" --admin "127.0.0.1:$((PORT + 1))" \
    --subscribers "$SUBSCRIBERS" --rate "$RATE" --duration-secs "$SECS" --sources "$SOURCES" \
    --topic "bench$RANDOM" > "$WORK/out.json"
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d['broker']=sys.argv[2]; d['pods']=int(sys.argv[3]); print(json.dumps(d))" \
    "$WORK/out.json" "$label" "$pods" | tee -a "$WORK/all.jsonl"
  kill "${gws[@]}" 2>/dev/null || true; wait "${gws[@]}" 2>/dev/null || true
}

for _ in $(seq 1 "$ROUNDS"); do
  run memory 1
  run redis "$PODS" --set broker=redis --set "redis.url=redis://127.0.0.1:$REDIS_PORT" \
    --set "worker_threads=${POD_THREADS:-1}"
done

python3 - "$WORK/all.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
summary = {}
for broker in ("memory", "redis"):
    rs = [r for r in runs if r["broker"] == broker]
    summary[broker] = {
        "runs": len(rs),
        "delivered_per_sec": round(statistics.median(r["delivered_per_sec"] for r in rs)),
        "lost": sum(r["expected_deliveries"] - r["delivered"] for r in rs),
        "p50_ms": round(statistics.median(r["latency_ms"]["p50"] for r in rs), 1),
        "p99_ms": round(statistics.median(r["latency_ms"]["p99"] for r in rs), 1),
    }
summary["ratio_redis_over_memory"] = {
    "delivered_per_sec": round(summary["redis"]["delivered_per_sec"] / summary["memory"]["delivered_per_sec"], 3),
    "p99": round(summary["redis"]["p99_ms"] / summary["memory"]["p99_ms"], 2),
}
print(json.dumps({"summary": summary}))
PY
