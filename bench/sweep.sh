#!/usr/bin/env bash
# Curves for the performance comparison: idle memory per connection at
# several connection counts, and fan-out latency at several offered rates
# (10,000 subscribers), for Switchyard and the reference peers, in one run;
# then bench/plot.py draws them as SVG into docs/plots/. Bounded: every
# process stops by itself or is killed on exit (about 7 minutes here).
#
#   bench/sweep.sh [subscribers=10000] [secs=8]
set -euo pipefail
cd "$(dirname "$0")/.."

SUBSCRIBERS=${1:-10000}
SECS=${2:-8}
IDLE=19000
RATE=100
PORT=${PORT:-25080}
SOURCES=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5
ulimit -n 20000 2>/dev/null || true

cargo build --release --quiet -p switchyard-server -p switchyard-bench
# shellcheck source=bench/lib.sh
source bench/lib.sh
need_node_peer
bench_setup

for connections in 2000 5000 10000 19000; do
  for name in switchyard tungstenite-4k-batched node-ws; do idle "$name" "$connections"; done
done
for rate in 10 25 50 100; do
  fanout switchyard "$rate"
  fanout tungstenite-4k-batched "$rate"
  fanout node-ws "$rate"
done

mkdir -p docs/plots
cp "$WORK/results" docs/plots/sweep.jsonl
python3 bench/plot.py docs/plots/sweep.jsonl docs/plots
