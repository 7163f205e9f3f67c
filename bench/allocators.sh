#!/usr/bin/env bash
# Which malloc for the gateway, measured rather than assumed: the same
# release binary under glibc's allocator and, through LD_PRELOAD, jemalloc,
# mimalloc and tcmalloc (Debian's packages, installed here if missing).
# Per allocator: idle RSS per connection at 19,000 connections, and fan-out
# to 10,000 subscribers at 100 msg/s (1M deliveries/s offered). Rounds
# alternate the allocators; prints one JSON line per run, then the medians.
# Bounded: every process stops by itself or is killed on exit (~6 min).
#
#   bench/allocators.sh [rounds=2] [secs=8]
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-2}
SECS=${2:-8}
IDLE=19000
SUBSCRIBERS=10000
RATE=100
PORT=${PORT:-23080}
SOURCES=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5
LIBS=/usr/lib/x86_64-linux-gnu
ulimit -n 20000 2>/dev/null || true

if [ ! -e $LIBS/libjemalloc.so.2 ] || [ ! -e $LIBS/libmimalloc.so.2 ] || [ ! -e $LIBS/libtcmalloc_minimal.so.4 ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -q libjemalloc2 libmimalloc2.0 libtcmalloc-minimal4 >/dev/null
fi
cargo build --release --quiet -p switchyard-server -p switchyard-bench
# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_setup

declare -A LIB=([glibc]="" [jemalloc]=$LIBS/libjemalloc.so.2 [mimalloc]=$LIBS/libmimalloc.so.2 [tcmalloc]=$LIBS/libtcmalloc_minimal.so.4)
for _ in $(seq 1 "$ROUNDS"); do
  for allocator in glibc jemalloc mimalloc tcmalloc; do
    PRELOAD=${LIB[$allocator]} VARIANT=$allocator idle switchyard
    PRELOAD=${LIB[$allocator]} VARIANT=$allocator fanout switchyard
  done
done

python3 - "$WORK/results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
out = {}
for a in ["glibc", "jemalloc", "mimalloc", "tcmalloc"]:
    idle = [r["kib_per_connection"] for r in rows if r["workload"] == "idle" and r["variant"] == a]
    fan = [r for r in rows if r["workload"] == "fanout" and r["variant"] == a]
    med = lambda xs: round(statistics.median(xs), 2)
    out[a] = {
        "idle_kib_per_connection": med(idle),
        "delivered_per_sec": round(statistics.median(r["delivered_per_sec"] for r in fan)),
        "p50_ms": med([r["latency_ms"]["p50"] for r in fan]),
        "p99_ms": med([r["latency_ms"]["p99"] for r in fan]),
    }
base = out["glibc"]
for a, v in out.items():
    v["idle_ratio_to_glibc"] = round(v["idle_kib_per_connection"] / base["idle_kib_per_connection"], 2)
    v["p99_ratio_to_glibc"] = round(v["p99_ms"] / base["p99_ms"], 2)
print(json.dumps(out, indent=1))
PY
