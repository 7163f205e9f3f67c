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

start() { # name -> sets SERVER_PID
  local name=$1 admin=$((PORT + 1))
  case $name in
    switchyard)
      "$BIN/switchyard-server" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$admin" \
        --set log.level=warn --set topics.max_topic_length=128 2>"$WORK/$name.log" & ;;
    tungstenite-4k-batched)
      "$BIN/tungstenite-peer" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$admin" --batch 2>"$WORK/$name.log" & ;;
    tungstenite-4k-per-message)
      "$BIN/tungstenite-peer" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$admin" 2>"$WORK/$name.log" & ;;
    tungstenite-default-config)
      "$BIN/tungstenite-peer" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$admin" --buffer 0 --batch 2>"$WORK/$name.log" & ;;
    node-ws)
      node bench/peers/node-ws/server.mjs "$PORT" "$admin" 2>"$WORK/$name.log" & ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$admin") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "$name did not start" >&2; cat "$WORK/$name.log" >&2; exit 1
}

stop() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; sleep 1; }

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

tag() { python3 -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); r['server']='$1'; print(json.dumps(r))"; }

idle() { # name
  local name=$1
  start "$name"
  sleep 1
  local before; before=$(rss_kib "$SERVER_PID")
  rm -f "$WORK/ready"
  "$BIN/switchyard-load" idle --target "127.0.0.1:$PORT" --connections "$IDLE" --sources "$SOURCES" \
    --hold-secs 6 --ready-file "$WORK/ready" >"$WORK/idle-$name.json" &
  local load=$!; PIDS+=("$load")
  for _ in $(seq 1 1200); do [ -f "$WORK/ready" ] && break; sleep 0.1; done
  sleep 2
  local after; after=$(rss_kib "$SERVER_PID")
  wait "$load" || true
  python3 -c "import json; print(json.dumps({'workload': 'idle', 'server': '$name', 'connections': $IDLE, 'opened': int(open('$WORK/ready').read()), 'rss_before_kib': $before, 'rss_after_kib': $after, 'kib_per_connection': round(($after - $before) / $IDLE, 2)}))" | tee -a "$WORK/results"
  stop
}

fanout() { # name protocol
  local name=$1 protocol=$2
  start "$name"
  "$BIN/switchyard-load" fanout --target "127.0.0.1:$PORT" --admin "127.0.0.1:$((PORT + 1))" \
    --subscribers "$SUBSCRIBERS" --rate "$RATE" --duration-secs "$SECS" --sources "$SOURCES" \
    --protocol "$protocol" | tag "$name" | tee -a "$WORK/results"
  stop
}

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
