#!/usr/bin/env bash
# Where the CPU goes during a fan-out: the gateway's and the load
# generator's CPU time over a 4-second window in the middle of a run (10,000
# subscribers, one publisher at RATE msg/s for 12 s), as cores in use and as
# gateway CPU microseconds per delivery. Switchyard by default;
# SERVER=tungstenite-4k-batched (or node-ws) measures a reference peer the
# same way. With PERF=1 the server is also profiled over the window (perf,
# call graphs) and the top symbols printed; PERF=load profiles the load
# generator instead; TOP=n prints n symbols (12). SYSCALLS=1 counts the
# server's socket writes over the window instead (perf stat on the syscall
# tracepoints) and adds write calls per second and frames per write call:
# how much the writes batch. BIN=<dir> runs another build (a directory
# holding switchyard-server and switchyard-load, as for bench/migration.sh).
# Bounded: about 30 s per rate.
#
#   bench/cpu.sh [rates=2,50,100] [subscribers=10000]
set -euo pipefail
cd "$(dirname "$0")/.."

RATES=${1:-2,50,100}
SUBSCRIBERS=${2:-10000}
PORT=${PORT:-21080}
SERVER=${SERVER:-switchyard}
BUILD=${BIN:-target/release}
ulimit -n 20000 2>/dev/null || true
cargo build --release --quiet -p switchyard-server -p switchyard-bench
# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_setup
BIN=$BUILD
[ -n "${PERF:-}${SYSCALLS:-}" ] && need_commands perf:linux-perf
[ "$SERVER" = node-ws ] && need_node_peer

sources=(127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5 127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9)
run=0
for rate in ${RATES//,/ }; do
  SOURCES=${sources[$((run % 2))]}
  run=$((run + 1))
  start "$SERVER"
  "$BIN/switchyard-load" fanout --target "127.0.0.1:$PORT" --admin "127.0.0.1:$((PORT + 1))" \
    --subscribers "$SUBSCRIBERS" --rate "$rate" --duration-secs 12 --sources "$SOURCES" \
    --protocol "$(protocol_of "$SERVER")" >"$WORK/fanout.json" &
  load=$!; PIDS+=("$load")
  sleep 7 # connected and publishing by now
  g1=$(cpu_ticks "$SERVER_PID"); l1=$(cpu_ticks "$load"); t1=$(date +%s.%N)
  if [ -n "${PERF:-}" ]; then
    profiled=$SERVER_PID; [ "$PERF" = load ] && profiled=$load
    perf record -F 999 -g -p "$profiled" -o "$WORK/perf.data" -- sleep 4 >/dev/null 2>&1
  elif [ -n "${SYSCALLS:-}" ]; then
    perf stat -x, -o "$WORK/syscalls.csv" -p "$SERVER_PID" \
      -e syscalls:sys_enter_sendto,syscalls:sys_enter_write,syscalls:sys_enter_writev -- sleep 4
  else
    sleep 4
  fi
  g2=$(cpu_ticks "$SERVER_PID"); l2=$(cpu_ticks "$load"); t2=$(date +%s.%N)
  wait "$load"
  SERVER=$SERVER WRITES=${SYSCALLS:+$WORK/syscalls.csv} python3 - "$WORK/fanout.json" "$rate" "$g1" "$g2" "$l1" "$l2" "$t1" "$t2" "$SUBSCRIBERS" <<'PY'
import json, os, sys
f, rate, g1, g2, l1, l2, t1, t2, subs = sys.argv[1:]
r = json.loads(open(f).read().strip().splitlines()[-1])
tick, dt = os.sysconf("SC_CLK_TCK"), float(t2) - float(t1)
gateway, load = (int(g2) - int(g1)) / tick, (int(l2) - int(l1)) / tick
per_sec = int(rate) * int(subs)
# Per delivery made, not offered: a saturated server delivers less than asked
# (its publisher falls behind), and dividing by the offered rate would
# flatter it. The run's own rate, first publish to last delivery.
delivered_per_sec = r["delivered_per_sec"]
out = {
    "workload": "cpu", "server": os.environ["SERVER"], "rate": int(rate), "offered_per_sec": per_sec,
    "gateway_cores": round(gateway / dt, 2), "load_generator_cores": round(load / dt, 2),
    "delivered_per_sec": round(delivered_per_sec),
    "gateway_cpu_us_per_delivery": round(gateway * 1e6 / (delivered_per_sec * dt), 2),
    "delivered": r["delivered"], "expected": r["expected_deliveries"],
    "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
}
if os.environ.get("WRITES"):
    # perf stat -x, lines: count,unit,event,...; the server's socket writes
    # over the window, and how many frames each carried on average.
    writes = sum(int(l.split(",")[0]) for l in open(os.environ["WRITES"])
                 if l.count(",") > 2 and l.split(",")[0].isdigit())
    out["write_calls_per_sec"] = round(writes / dt)
    out["frames_per_write_call"] = round(delivered_per_sec * dt / max(writes, 1), 1)
print(json.dumps(out))
PY
  if [ -n "${PERF:-}" ]; then
    perf report -i "$WORK/perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -4
    perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null |
      grep -E '^ +[0-9]' | head -"${TOP:-12}" | cut -c1-120
  fi
  stop
done
