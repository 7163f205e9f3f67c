#!/usr/bin/env bash
# Crash-storm benchmark (issue 22): N connections on one of 3 gateway
# processes on one private Redis; that gateway is killed with SIGKILL while a
# publisher runs on a survivor, and every connection comes back to the
# survivors (they share the port with SO_REUSEPORT: the kernel stands in for
# the Service) and resumes. Bounded: every process stops by itself or is
# killed on exit.
#
#   bench/crash.sh [connections=10000] [variants="plain-new plain-no-admission plain-old-client plain-old tls-new tls-old"]
#
# A variant is TRANSPORT-CONFIG: plain or tls; `new` = admission control at
# the survivors (websocket.handshake_rate=$BOUND, burst $BURST) and the
# clients' 2 s abnormal-close window; `no-admission` = the window without
# the bound; `old-client` = the bound with the clients' old first wait
# (0-100 ms); `old` = neither. One JSON line per variant on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${1:-10000}
VARIANTS=${2:-"plain-new plain-no-admission plain-old-client plain-old tls-new tls-old"}
BOUND=${BOUND:-2000}
BURST=${BURST:-500}
MESSAGES=${MESSAGES:-60}
PUBLISH_RATE=${PUBLISH_RATE:-4}
PORT=${PORT:-22080}
SOURCES=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5

cargo build --release --quiet -p switchyard-server -p switchyard-bench
BIN=${BIN:-target/release}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

# shellcheck source=bench/lib.sh
source bench/lib.sh
need_commands curl:curl openssl:openssl
make_certs "$WORK/tls"

run_variant() {
  local variant=$1 transport=${1%%-*} config=${1#*-}
  local rate=$BOUND window=2000 tls=() load_tls=() topic="crash-$RANDOM"
  case $config in
    new) ;;
    no-admission) rate=0 ;;
    old-client) window=100 ;;
    old) rate=0; window=100 ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  if [ "$transport" = tls ]; then
    tls=(--set "tls.cert_file=$WORK/tls/server.crt" --set "tls.key_file=$WORK/tls/server.key")
    load_tls=(--tls-ca "$WORK/tls/ca.crt")
  fi
  local gws=()
  start_gateway() { # index
    "$BIN/switchyard-server" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$((PORT + $1))" \
      --server-id "gw-$1" --log-format json --set log.level=warn \
      --set reuse_port=true --set worker_threads=1 --set broker=redis \
      --set "redis.url=redis://127.0.0.1:$REDIS_PORT" --set redis.command_timeout_ms=5000 \
      --set "websocket.handshake_rate=$rate" --set "websocket.handshake_burst=$BURST" \
      "${tls[@]}" 2>"$WORK/gw$1.log" &
    gws+=($!); PIDS+=($!)
    until curl -sf "127.0.0.1:$((PORT + $1))/admin/status" >/dev/null; do sleep 0.1; done
  }
  # Everyone on gw-1 first (alone on the port; its bound off for the setup).
  local setup_rate=$rate; rate=0; start_gateway 1; rate=$setup_rate
  "$BIN/switchyard-load" "${load_tls[@]}" crash --target "127.0.0.1:$PORT" --connections "$CONNS" \
    --sources "$SOURCES" --topic "$topic" --expect "$MESSAGES" --first-retry-ms "$window" \
    --watch "127.0.0.1:$((PORT + 2)),127.0.0.1:$((PORT + 3))" --timeout-secs 120 \
    --ready-file "$WORK/ready-$variant" >"$WORK/$variant.json" &
  local loader=$!; PIDS+=($loader)
  until [ -f "$WORK/ready-$variant" ]; do sleep 0.2; done
  start_gateway 2; start_gateway 3
  "$BIN/switchyard-load" publish --admin "127.0.0.1:$((PORT + 2))" --topic "$topic" \
    --rate "$PUBLISH_RATE" --count "$MESSAGES" >/dev/null &
  local publisher=$!; PIDS+=($publisher)
  sleep 2
  kill -9 "${gws[0]}"
  wait "${gws[0]}" 2>/dev/null || true
  wait "$loader" || true
  wait "$publisher" || true
  for pid in "${gws[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  python3 - "$variant" "$WORK/$variant.json" "$rate" "$window" <<'EOF'
import json, sys
variant, path, rate, window = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
result = json.loads(open(path).read().strip().splitlines()[-1])
print(json.dumps({"variant": variant, "bound_per_s": rate, "first_retry_window_ms": window, **result}))
EOF
}

start_redis "$WORK"
for variant in $VARIANTS; do
  run_variant "$variant"
done
