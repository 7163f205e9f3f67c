#!/usr/bin/env bash
# Migration benchmark (issue "Staggered migration"): N connections move from
# 3 blue to 3 green gateway processes, all on one private Redis, while a
# publisher runs. Bounded: every process stops by itself or is killed on exit.
#
#   bench/migration.sh [connections=50000] [mode=make_before_break] [rate_per_pod=700] [window_ms=10000]
#
# Blue and green each share one port (SO_REUSEPORT). The load processes
# (switchyard-load migrate) connect to blue and, on `migrate` or a 4000
# close, to green — the Service switch, as the client libraries follow it.
# A process may hold 20,000 files here: LOADERS processes share the
# connections (each needs 2 sockets per connection during the overlap).
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${1:-50000}
MODE=${2:-make_before_break}
RATE=${3:-700}
WINDOW=${4:-10000}
LOADERS=${LOADERS:-6}
MESSAGES=${MESSAGES:-40}
PUBLISH_RATE=${PUBLISH_RATE:-2}
BLUE=${BLUE_PORT:-21080}
GREEN=${GREEN_PORT:-21180}
SOURCES=127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9

cargo build --release --quiet -p switchyard-server -p switchyard-bench
BIN=${BIN:-target/release}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"; }
trap cleanup EXIT

# shellcheck source=bench/lib.sh
source bench/lib.sh
start_redis "$WORK"

for color in blue green; do
  port=$BLUE; [ "$color" = green ] && port=$GREEN
  for i in 1 2 3; do
    "$BIN/switchyard-server" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$((port + i))" \
      --server-id "$color-$i" --log-format json \
      --set reuse_port=true --set worker_threads=1 --set websocket.handshake_rate=0 --set broker=redis \
      --set "redis.url=redis://127.0.0.1:$REDIS_PORT" --set drain.migrate_grace_ms=15000 \
      --set redis.command_timeout_ms=5000 \
      2>"$WORK/$color$i.log" &
    PIDS+=($!)
  done
done
# Each pod's admin API answers once it runs; the shared public port answers
# /readyz 200 once the pods reached there have their backplane.
for port in $BLUE $GREEN; do
  for i in 1 2 3; do
    until curl -sf "127.0.0.1:$((port + i))/admin/status" >/dev/null; do sleep 0.1; done
  done
  for _ in $(seq 1 20); do
    until curl -sf "127.0.0.1:$port/readyz" >/dev/null; do sleep 0.1; done
  done
done

per=$(( (CONNS + LOADERS - 1) / LOADERS ))
loaders=()
for l in $(seq 1 "$LOADERS"); do
  "$BIN/switchyard-load" migrate --blue "127.0.0.1:$BLUE" --green "127.0.0.1:$GREEN" \
    --connections "$per" --sources "$SOURCES" --expect "$MESSAGES" --timeout-secs 240 \
    --ready-file "$WORK/ready$l" --reconnects-file "$WORK/reconnects$l" >"$WORK/loader$l.json" &
  loaders+=($!); PIDS+=($!)
done
for l in $(seq 1 "$LOADERS"); do
  until [ -f "$WORK/ready$l" ]; do sleep 0.2; done
done
blue_conns() {
  local sum=0
  for i in 1 2 3; do
    sum=$((sum + $(curl -s "127.0.0.1:$((BLUE + i))/admin/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["connections"])')))
  done
  echo "$sum"
}
echo "{\"connections_on_blue\": $(blue_conns)}" >&2

"$BIN/switchyard-load" publish --admin "127.0.0.1:$((GREEN + 1))" --topic migrate \
  --rate "$PUBLISH_RATE" --count "$MESSAGES" >"$WORK/publisher.json" &
publisher=$!; PIDS+=($!)
sleep 3
# The gateways' own view of the pace, independent of the starved load
# processes: every 50 ms, each blue pod's drain status, which carries the
# signals it sent so far, the connections still on it, and the drain's age
# in the pod's own clock (the pods share the public port, so /metrics cannot
# be asked of each one). The pod's clock matters: a status request can wait
# hundreds of milliseconds in a saturated pod, so the poller's clock would
# stretch and squeeze the windows.
python3 - "$WORK/drain-samples" "$BLUE" <<'PY' &
import json, sys, time, urllib.request
out, blue = sys.argv[1], int(sys.argv[2])
with open(out, "w") as f:
    while True:
        began = time.monotonic()
        for i in (1, 2, 3):
            with urllib.request.urlopen(f"http://127.0.0.1:{blue + i}/admin/status", timeout=5) as r:
                drain = json.load(r).get("drain")
            if drain:
                ended = drain["total"] - drain["remaining"]
                f.write(f'{i} {drain["elapsed_ms"]} {drain.get("signals_sent", 0)} {ended}\n')
        f.flush()
        time.sleep(max(0.0, 0.05 - (time.monotonic() - began)))
PY
poller=$!; PIDS+=($poller)
start_ms=$(date +%s%3N)
for i in 1 2 3; do
  curl -sf -XPOST "127.0.0.1:$((BLUE + i))/admin/drain" -H "content-type: application/json" -d \
    "{\"window_ms\":$WINDOW,\"max_rate\":$RATE,\"deadline_ms\":120000,\"mode\":\"$MODE\",\"retry_jitter_ms\":2000}" >/dev/null
done
while [ "$(blue_conns)" -gt 0 ]; do sleep 0.2; done
end_ms=$(date +%s%3N)
sleep 0.5; kill "$poller" 2>/dev/null || true
for i in 1 2 3; do curl -s "127.0.0.1:$((BLUE + i))/admin/status" > "$WORK/blue$i.status"; done
wait "$publisher"
for pid in "${loaders[@]}"; do wait "$pid"; done

python3 - "$WORK" "$LOADERS" "$start_ms" "$end_ms" "$RATE" "$CONNS" "$MODE" "$WINDOW" <<'PY'
import json, statistics, sys
work, loaders, start, end, rate, conns, mode, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7], int(sys.argv[8])
runs = [json.loads(open(f"{work}/loader{l}.json").read()) for l in range(1, loaders + 1)]
def peak_per_second(name):
    times = sorted(int(t) for l in range(1, loaders + 1) for t in open(f"{work}/{name}{l}" + ("" if name == "reconnects" else "")).read().split())
    peak, j = 0, 0
    for i in range(len(times)):
        while times[i] - times[j] >= 1000:
            j += 1
        peak = max(peak, i - j + 1)
    return peak
peak = peak_per_second("reconnects")
told = 0
import glob
told_times = sorted(int(t) for f in glob.glob(f"{work}/reconnects*.told") for t in open(f).read().split())
j = 0
for i in range(len(told_times)):
    while told_times[i] - told_times[j] >= 1000:
        j += 1
    told = max(told, i - j + 1)
drains = [json.load(open(f"{work}/blue{i}.status"))["drain"] for i in (1, 2, 3)]
# Peak per second in each pod, from its own counters and clock, over windows
# of at least one second (sample j the last one at least 1 s before sample
# i), as a rate; the cap (max_rate) is per pod.
samples = {}
for line in open(f"{work}/drain-samples"):
    pod, *values = (int(x) for x in line.split())
    samples.setdefault(pod, []).append(values)
def peak_rate(column):
    peak = 0.0
    for series in samples.values():
        j = 0
        for i in range(len(series)):
            while j + 1 < i and series[i][0] - series[j + 1][0] >= 1000:
                j += 1
            span = series[i][0] - series[j][0]
            if span >= 1000:
                peak = max(peak, (series[i][column] - series[j][column]) * 1000 / span)
    return round(peak)
sent_peak, ended_peak = peak_rate(1), peak_rate(2)
print(json.dumps({
    "workload": "migration", "mode": mode, "connections": sum(r["connections"] for r in runs),
    "window_ms": window, "cap_per_second": rate * 3,
    "migration_secs": (end - start) / 1000,
    "moved": sum(r["moved"] for r in runs), "moved_by_close": sum(r["moved_by_close"] for r in runs),
    "peak_reconnects_per_second": peak,
    "peak_over_cap": round(peak / (rate * 3), 3),
    "peak_migrate_received_per_second": told,
    "peak_received_over_cap": round(told / (rate * 3), 3),
    "pod_cap_per_second": rate,
    "peak_signals_sent_per_second_per_pod": sent_peak,
    "peak_sent_over_cap": round(sent_peak / rate, 3),
    "peak_ended_per_second_per_pod": ended_peak,
    "peak_ended_over_cap": round(ended_peak / rate, 3),
    "gateway_samples": sum(len(s) for s in samples.values()),
    "gap_ms_p50_median_of_loaders": statistics.median(r["gap_ms"]["p50"] for r in runs),
    "gap_ms_p99_worst_loader": max(r["gap_ms"]["p99"] for r in runs),
    "messages_per_connection": runs[0]["messages_expected_per_connection"],
    "complete_connections": sum(r["complete"] for r in runs),
    "lost": sum(r["lost"] for r in runs),
    "duplicates_dropped": sum(r["duplicates_dropped"] for r in runs),
    "blue": {k: sum(d[k] for d in drains) for k in ("total", "migrated_by_client", "closed_at_slot", "forced_at_deadline")},
}))
PY
