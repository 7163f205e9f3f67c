#!/usr/bin/env bash
# Two gateway builds side by side: this tree's release build against another
# build of switchyard-server (BASE, an earlier revision), with the bare
# tokio-tungstenite peer as the yardstick. Rounds alternate the three
# servers; prints one JSON line per run, then the medians per build.
# Bounded: every process is killed on exit.
#
# WORKLOAD=handshakes (the default): plain and TLS handshakes per second and
# the CPU each side spends on one. WORKLOAD=fanout: fan-out to 10,000
# subscribers at RATE msg/s (100) for 8 s (delivered/s, latency, and how late the
# publisher's requests were answered). WORKLOAD=idle: RSS per idle
# connection at IDLE connections (19000).
#
#   bench/ab.sh BASE [rounds=5] [handshakes=10000]
#
# A base build of an earlier revision, without disturbing this tree:
#   git worktree add /tmp/base REV
#   cargo build --release -p switchyard-server --manifest-path /tmp/base/Cargo.toml --target-dir /tmp/base/target
#   bench/ab.sh /tmp/base/target/release/switchyard-server
#
# BASE_LOAD=path runs the base build's rounds with another load generator
# (e.g. an earlier revision's switchyard-load); with this tree's server as
# BASE, that compares two load generators against one gateway.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${1:?usage: bench/ab.sh BASE [rounds] [handshakes]}
ROUNDS=${2:-5}
HANDSHAKES=${3:-10000}
WORKLOAD=${WORKLOAD:-handshakes}
SUBSCRIBERS=10000
IDLE=${IDLE:-19000}
RATE=${RATE:-100}
SECS=8
PORT=${PORT:-27080}
SOURCES=127.0.0.10,127.0.0.11,127.0.0.12,127.0.0.13,127.0.0.14,127.0.0.15
ulimit -n 20000 2>/dev/null || true

cargo build --release --quiet -p switchyard-server -p switchyard-bench
# shellcheck source=bench/lib.sh
source bench/lib.sh
need_commands openssl:openssl
bench_setup
make_certs "$WORK/tls"
# lib.sh starts "$BIN/switchyard-server": one directory per build.
for build in base head; do
  mkdir -p "$WORK/$build"
  ln -s "$PWD/target/release/tungstenite-peer" "$WORK/$build/"
done
ln -s "$(realpath "${BASE_LOAD:-target/release/switchyard-load}")" "$WORK/base/switchyard-load"
ln -s "$PWD/target/release/switchyard-load" "$WORK/head/switchyard-load"
ln -s "$(realpath "$BASE")" "$WORK/base/switchyard-server"
ln -s "$PWD/target/release/switchyard-server" "$WORK/head/switchyard-server"

label() { # build -> the last result line, labelled with the build
  tail -n 1 "$WORK/results" | python3 -c "import json,sys; r=json.load(sys.stdin); r['build']='$1'; print(json.dumps(r))" \
    | tee -a "$WORK/ab"
}

run() { # build server -> the workload's runs, labelled with the build
  local build=$1 server=$2
  BIN=$WORK/$build
  if [ "$WORKLOAD" = fanout ]; then
    VARIANT=fanout fanout "$server" >/dev/null
    label "$build"
    return
  fi
  if [ "$WORKLOAD" = idle ]; then
    VARIANT=idle idle "$server" >/dev/null
    label "$build"
    return
  fi
  local tls port
  for tls in "" "$WORK/tls"; do
    port=$PORT; [ -n "$tls" ] && port=$((PORT + 20))
    PORT=$port TLS_DIR=$tls handshakes "$server" >/dev/null
    label "$build"
  done
}

for _ in $(seq 1 "$ROUNDS"); do
  run base switchyard
  run head switchyard
  run head tungstenite-4k-batched
done

python3 - "$WORK/ab" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
summary = {}
for r in rows:
    key = f'{r["server"]}:{r["build"]}' if r["server"] == "switchyard" else r["server"]
    summary.setdefault(r["variant"], {}).setdefault(key, []).append(r)
med = lambda rs, f: round(statistics.median(f(x) for x in rs), 1)
def figures(rs):
    if "kib_per_connection" in rs[0]:
        return {"kib_per_connection": round(statistics.median(x["kib_per_connection"] for x in rs), 2),
                "runs": [x["kib_per_connection"] for x in rs]}
    if "handshakes_per_sec" in rs[0]:
        return {"per_sec": round(med(rs, lambda x: x["handshakes_per_sec"])),
                "server_cpu_us": med(rs, lambda x: x["server_cpu_us_per_handshake"]),
                "client_cpu_us": med(rs, lambda x: x["client_cpu_us_per_handshake"]),
                "runs": [round(x["handshakes_per_sec"]) for x in rs]}
    return {"per_sec": round(med(rs, lambda x: x["delivered_per_sec"])),
            "offered_per_sec": round(med(rs, lambda x: x["offered_per_sec"])),
            "p50_ms": med(rs, lambda x: x["latency_ms"]["p50"]),
            "p99_ms": med(rs, lambda x: x["latency_ms"]["p99"]),
            "publish_request_max_ms": med(rs, lambda x: x["publish_request_ms"]["max"]),
            "runs": [[round(x["delivered_per_sec"]), x["latency_ms"]["p99"]] for x in rs]}
out = {mode: {key: figures(rs) for key, rs in keys.items()} for mode, keys in summary.items()}
for mode, keys in out.items():
    base, head, peer = keys["switchyard:base"], keys["switchyard:head"], keys["tungstenite-4k-batched"]
    if "kib_per_connection" in head:
        keys["head_over_base"] = round(head["kib_per_connection"] / base["kib_per_connection"], 3)
        keys["head_over_peer"] = round(head["kib_per_connection"] / peer["kib_per_connection"], 3)
        continue
    keys["head_over_base"] = round(head["per_sec"] / base["per_sec"], 3)
    keys["head_over_peer"] = round(head["per_sec"] / peer["per_sec"], 3)
    if "p99_ms" in head:
        keys["p99_head_over_base"] = round(head["p99_ms"] / base["p99_ms"], 3)
        keys["p99_head_over_peer"] = round(head["p99_ms"] / peer["p99_ms"], 3)
print(json.dumps(out))
PY
