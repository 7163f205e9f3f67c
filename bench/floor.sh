#!/usr/bin/env bash
# The floor: what this machine allows, measured with the same load generator
# as every server. The floor peer (bench/peers/floor.rs) does the least a
# fan-out server can: one encoding per message, one write per connection per
# pass, no task or wake per subscriber, nothing read after the handshake. Its
# figures bound what any server can reach here, so they tell which of
# Switchyard's figures are the machine and which are the design.
#
# Per round and server: plain handshakes/s (with the server's CPU for the
# connect phase and for closing), then fan-out to 10,000 subscribers at
# 2 msg/s (each publish a lone burst) and at 100 msg/s (1M deliveries/s),
# with each process's CPU (bench/cpu.sh's window). Rounds alternate the
# servers; prints one JSON line per run, then medians and the ratios to the
# one-thread floor. Bounded: about 2.5 minutes per round.
#
#   bench/floor.sh [rounds=2]
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-2}
SUBSCRIBERS=10000
HANDSHAKES=10000
PORT=${PORT:-29080}
SERVERS=${SERVERS:-floor-1thread floor-2threads switchyard tungstenite-4k-batched}
ulimit -n 20000 2>/dev/null || true

cargo build --release --quiet -p switchyard-server -p switchyard-bench
# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_setup

for _ in $(seq 1 "$ROUNDS"); do
  for name in $SERVERS; do
    SOURCES=127.0.0.10,127.0.0.11,127.0.0.12,127.0.0.13,127.0.0.14,127.0.0.15
    handshakes "$name"
    SOURCES=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5
    for rate in 2 100; do fanout_cpu "$name" "$rate"; done
  done
done

python3 - "$WORK/results" <<'PY'
import collections, json, statistics, sys

runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = "handshakes" if r["workload"] == "handshakes" else f"fanout {r['rate']} msg/s"
    runs[(key, r["server"])].append(r)

def median(rows, field):
    return statistics.median(r[field] for r in rows)

fields = {
    "handshakes": ["handshakes_per_sec", "server_cpu_us_per_handshake",
                   "server_close_cpu_us_per_connection", "client_cpu_us_per_handshake"],
    "fanout": ["delivered_per_sec", "p50_ms", "p99_ms", "gateway_cpu_us_per_delivery",
               "gateway_cores", "load_generator_cores"],
}
summary = {}
for (key, server), rows in sorted(runs.items()):
    names = fields[key.split()[0]]
    summary.setdefault(key, {})[server] = {f: round(median(rows, f), 2) for f in names}
for key, servers in summary.items():
    floor = servers.get("floor-1thread")
    for server, figures in servers.items():
        if floor and server != "floor-1thread":
            # Not the close: the floor never reads after the handshake, so it
            # never notices one (its sockets go when it exits).
            figures["over_floor"] = {
                f: round(figures[f] / floor[f], 2)
                for f in figures if floor.get(f) and f != "server_close_cpu_us_per_connection"
            }
print(json.dumps({"floor_medians": summary}, indent=1))
PY
