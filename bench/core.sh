#!/usr/bin/env bash
# Gateway core benchmark (issue "Gateway core"): idle memory per connection
# and fan-out throughput/latency. Bounded: every process stops by itself or is
# killed on exit. Prints one JSON line per figure.
#
#   bench/core.sh [idle_connections=50000] [fanout_subscribers=10000] [fanout_rate=50] [fanout_secs=10]
#
# Idle: a process may hold at most 20,000 open files here, so the connections
# are spread over GATEWAYS gateway processes sharing one port (SO_REUSEPORT,
# the kernel balances them) and LOADERS load-generator processes, from several
# 127.0.0.x source addresses (past the 64k ephemeral ports of one address).
# RSS per connection = (sum of gateway RSS with connections - sum before) / connections.
set -euo pipefail
cd "$(dirname "$0")/.."

IDLE=${1:-50000}
SUBSCRIBERS=${2:-10000}
RATE=${3:-50}
SECS=${4:-10}
GATEWAYS=${GATEWAYS:-4}
LOADERS=${LOADERS:-3}
PORT=${PORT:-28080}
SOURCES=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9

cargo build --release --quiet -p switchyard-server -p switchyard-bench
BIN=target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

start_gateways() { # n extra-args...
  local n=$1; shift
  GW_PIDS=()
  for i in $(seq 1 "$n"); do
    "$BIN/switchyard-server" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$((PORT + i))" \
      --set reuse_port=true --set websocket.handshake_rate=0 --log-format json "$@" 2>"$WORK/gw$i.log" &
    GW_PIDS+=($!); PIDS+=($!)
  done
  for i in $(seq 1 "$n"); do
    until curl -sf "127.0.0.1:$((PORT + i))/admin/status" >/dev/null; do sleep 0.1; done
  done
}
stop_gateways() { kill "${GW_PIDS[@]}" 2>/dev/null || true; wait "${GW_PIDS[@]}" 2>/dev/null || true; }

idle_run() { # label connections gateways extra-args...
  local label=$1 total=$2 gateways=$3; shift 3
  start_gateways "$gateways" "$@"
  local before; before=$("$BIN/switchyard-load" rss "${GW_PIDS[@]}")
  local per=$(( (total + LOADERS - 1) / LOADERS ))
  rm -f "$WORK"/ready* "$WORK"/idle*.json
  local loaders=()
  for l in $(seq 1 "$LOADERS"); do
    timeout 300 "$BIN/switchyard-load" idle --target "127.0.0.1:$PORT" --connections "$per" \
      --sources "$SOURCES" --hold-secs 120 --ready-file "$WORK/ready$l" >"$WORK/idle$l.json" &
    loaders+=($!); PIDS+=($!)
  done
  for l in $(seq 1 "$LOADERS"); do
    until [ -f "$WORK/ready$l" ]; do sleep 0.2; done
  done
  sleep 3   # let every connection finish its welcome write
  local after; after=$("$BIN/switchyard-load" rss "${GW_PIDS[@]}")
  local opened=0 conns=0
  for l in $(seq 1 "$LOADERS"); do opened=$((opened + $(cat "$WORK/ready$l"))); done
  for i in $(seq 1 "$gateways"); do
    conns=$((conns + $(curl -s "127.0.0.1:$((PORT + i))/admin/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["connections"])')))
  done
  local hs; hs=$(python3 -c "import json,sys; print(round(sum(json.load(open(f))['handshakes_per_sec'] for f in sys.argv[1:])))" "$WORK"/idle*.json)
  python3 -c "import json; print(json.dumps({'workload':'idle','label':'$label','gateways':$gateways,'opened':$opened,'held_by_gateways':$conns,'rss_before_kib':$before,'rss_after_kib':$after,'kib_per_connection':round(($after-$before)/$conns,2),'handshakes_per_sec_sum':$hs}))"
  kill "${loaders[@]}" 2>/dev/null || true; wait "${loaders[@]}" 2>/dev/null || true
  stop_gateways
}

idle_run "defaults" "$IDLE" "$GATEWAYS"
# The same with tungstenite's default 128 KiB read buffer, to show what the
# configured 2 KiB buffer saves (fewer connections: the cost is linear).
idle_run "read_buffer_128k" 10000 1 --set websocket.read_buffer_bytes=131072

start_gateways 1
"$BIN/switchyard-load" fanout --target "127.0.0.1:$PORT" --admin "127.0.0.1:$((PORT + 1))" \
  --subscribers "$SUBSCRIBERS" --rate "$RATE" --duration-secs "$SECS" --sources "$SOURCES"
stop_gateways
