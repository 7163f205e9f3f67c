#!/usr/bin/env bash
# Where an idle connection's memory goes: heaptrack (Debian) records one
# gateway while it holds N idle connections, and the biggest consumers at
# the heap's peak are printed with their counts, so the bytes per connection
# of each can be read off (consumed / calls). Bounded: about 20 s.
#
#   bench/heap-profile.sh [connections=5000]
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS=${1:-5000}
PORT=${PORT:-20080}
ulimit -n 20000 2>/dev/null || true
cargo build --release --quiet -p switchyard-server -p switchyard-bench
# shellcheck source=bench/lib.sh
source bench/lib.sh
need_commands heaptrack:heaptrack
bench_setup

heaptrack -o "$WORK/gateway" "$BIN/switchyard-server" --listen "127.0.0.1:$PORT" \
  --admin-listen "127.0.0.1:$((PORT + 1))" --set log.level=warn --set websocket.handshake_rate=0 >"$WORK/heaptrack.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$((PORT + 1))") 2>/dev/null && break; sleep 0.1; done
"$BIN/switchyard-load" idle --target "127.0.0.1:$PORT" --connections "$CONNECTIONS" \
  --sources 127.0.0.2,127.0.0.3 --hold-secs 4 | tail -n 1
pkill -INT -f "switchyard-server --listen 127.0.0.1:$PORT" || true
for _ in $(seq 1 100); do ls "$WORK"/gateway*.zst >/dev/null 2>&1 && ! pgrep -f "heaptrack.*127.0.0.1:$PORT" >/dev/null && break; sleep 0.2; done
heaptrack_print -f "$WORK"/gateway*.zst --print-peaks 1 --print-allocators 0 --print-temporary 0 \
  --print-leaks 0 --peak-limit 12 2>/dev/null >"$WORK/peaks.txt"
# Each consumer with its calls and bytes per call; those called about once
# per connection are per-connection costs.
awk '/PEAK MEMORY/{p=1} p && /consumed over [0-9]+ calls from:/' "$WORK/peaks.txt" | python3 -c "
import re, sys
units = {'': 1, 'K': 1024, 'M': 1024**2, 'G': 1024**3}
rows = []
for line in sys.stdin:
    m = re.match(r'\s*([0-9.]+)([KMG]?)B? consumed over ([0-9]+) calls', line)
    if m:
        size, calls = float(m[1]) * units[m[2]], int(m[3])
        rows.append((size, calls))
per = [(round(s / c), c, round(s / 1024)) for s, c in rows if c >= $CONNECTIONS * 0.9]
for each, calls, kib in sorted(per, reverse=True):
    print(f'{each:>6} bytes x {calls} calls = {kib} KiB')
print('sum per connection:', sum(e for e, _, _ in per), 'bytes (heap only; not the kernel socket)')
"
grep -E '^peak heap memory consumption' "$WORK/peaks.txt"
