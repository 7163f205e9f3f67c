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
  fanout_cpu "$SERVER" "$rate"
done
