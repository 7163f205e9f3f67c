#!/usr/bin/env bash
# Handshakes per second, anonymous vs an HS256 bearer token verified on every
# handshake: what token verification adds. Rounds alternate between the two
# gateways in one run; prints one JSON line per round, then the medians and
# the gateways' own counts (every bearer handshake must have opened a
# session, none refused). Bounded: every process is killed on exit.
#
#   bench/handshakes.sh [connections=10000] [rounds=3]
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS=${1:-10000}
ROUNDS=${2:-3}
PORT=${PORT:-26080}
SECRET=bench-secret-0123456789abcdef0123

cargo build --release --quiet -p switchyard-server -p switchyard-bench
BIN=target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

# An HS256 JWT valid for an hour, minted with the Python standard library.
TOKEN=$(SECRET=$SECRET python3 - <<'PY'
import base64, hashlib, hmac, json, os, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": "bench", "exp": int(time.time()) + 3600}).encode())
sig = hmac.new(os.environ["SECRET"].encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
print(f"{head}.{body}.{b64(sig)}")
PY
)

start() { # name port extra-args...
  local name=$1 port=$2; shift 2
  "$BIN/switchyard-server" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$((port + 1))" \
    --log-format json --set log.level=warn --set websocket.handshake_rate=0 "$@" 2>"$WORK/$name.log" &
  PIDS+=($!)
  for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "gateway $name did not start" >&2; cat "$WORK/$name.log" >&2; exit 1
}

start anonymous "$PORT"
start bearer "$((PORT + 10))" --set "auth.jwt.secret=$SECRET" --set auth.anonymous=false

run() { # name port extra-args...
  local name=$1 port=$2; shift 2
  "$BIN/switchyard-load" "$@" idle --target "127.0.0.1:$port" --connections "$CONNECTIONS" \
    --sources 127.0.0.2,127.0.0.3 --concurrency 128 --hold-secs 0 \
    | python3 -c "import json,sys; r=json.load(sys.stdin); r['gateway']='$name'; print(json.dumps(r))"
}

for round in $(seq 1 "$ROUNDS"); do
  run anonymous "$PORT" | tee -a "$WORK/results"
  run bearer "$((PORT + 10))" --bearer "$TOKEN" | tee -a "$WORK/results"
done

# The gateways' own accounting: every handshake opened a session.
for port in "$PORT" "$((PORT + 10))"; do
  curl -sf "http://127.0.0.1:$port/metrics" \
    | grep -E '^switchyard_(connections_opened_total|handshakes_rejected_total)' >>"$WORK/metrics-$port" || true
done
opened_bearer=$(awk '/^switchyard_connections_opened_total/ {print $2}' "$WORK/metrics-$((PORT + 10))")
if [ "$opened_bearer" != "$((CONNECTIONS * ROUNDS))" ] || grep -q handshakes_rejected "$WORK/metrics-$((PORT + 10))"; then
  echo "bearer gateway did not open every session:" >&2; cat "$WORK/metrics-$((PORT + 10))" >&2; exit 1
fi

python3 - "$WORK/results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
median = {g: statistics.median(r["handshakes_per_sec"] for r in rows if r["gateway"] == g) for g in ("anonymous", "bearer")}
failed = sum(r["failed"] for r in rows)
print(json.dumps({"median_handshakes_per_sec": median, "bearer_over_anonymous": round(median["bearer"] / median["anonymous"], 3), "failed": failed}))
PY
