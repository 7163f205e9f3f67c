#!/usr/bin/env bash
# Handshakes of two gateway builds side by side: this tree's release build
# against another build of switchyard-server (BASE, an earlier revision), with
# the bare tokio-tungstenite peer as the yardstick. Rounds alternate the three
# servers, plain and TLS; prints one JSON line per run, then the medians per
# build. Bounded: every process is killed on exit.
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

run() { # build server -> one plain and one TLS run, labelled with the build
  local build=$1 server=$2
  BIN=$WORK/$build
  local tls port
  for tls in "" "$WORK/tls"; do
    port=$PORT; [ -n "$tls" ] && port=$((PORT + 20))
    PORT=$port TLS_DIR=$tls handshakes "$server" >/dev/null
    tail -n 1 "$WORK/results" | python3 -c "import json,sys; r=json.load(sys.stdin); r['build']='$build'; print(json.dumps(r))" \
      | tee -a "$WORK/ab"
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
out = {mode: {key: {"per_sec": round(statistics.median(x["handshakes_per_sec"] for x in rs)),
                    "server_cpu_us": statistics.median(x["server_cpu_us_per_handshake"] for x in rs),
                    "client_cpu_us": statistics.median(x["client_cpu_us_per_handshake"] for x in rs),
                    "runs": [round(x["handshakes_per_sec"]) for x in rs]}
              for key, rs in keys.items()} for mode, keys in summary.items()}
for mode, keys in out.items():
    base, head = keys["switchyard:base"], keys["switchyard:head"]
    keys["head_over_base"] = round(head["per_sec"] / base["per_sec"], 3)
    keys["head_over_peer"] = round(head["per_sec"] / keys["tungstenite-4k-batched"]["per_sec"], 3)
print(json.dumps(out))
PY
