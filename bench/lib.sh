# Shared by the bench scripts (compare, sweep, allocators): starting Switchyard or a
# reference peer on $PORT (admin $PORT+1), measuring idle memory per
# connection and fan-out. Expects BIN, WORK, PIDS (bench_setup) and SOURCES,
# PORT set by the caller (and IDLE, SUBSCRIBERS, RATE, SECS for the defaults of idle/fanout).
# Optional: PRELOAD (a malloc library for Switchyard's process, LD_PRELOAD)
# and VARIANT (a label added to each result line as "variant").

# Installs, from Debian, the packages of the commands missing here
# (command:package ...), so a benchmark runs on a fresh machine as the test
# command does. Needs root or sudo only when something is missing.
need_commands() {
  local missing=() pair sudo=""
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing Debian packages: ${missing[*]}" >&2
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Node and the `ws` package for the Node reference peer (bench/peers/node-ws).
need_node_peer() {
  need_commands node:nodejs npm:npm
  [ -d bench/peers/node-ws/node_modules/ws ] ||
    npm ci --prefix bench/peers/node-ws --no-audit --no-fund --silent
}

# A private redis-server on a free port, in $1 (its scratch directory):
# sets REDIS_PORT and adds the server to PIDS. Fails, rather than waiting for
# ever, when the server does not answer within 10 s.
start_redis() {
  need_commands redis-server:redis-server redis-cli:redis-tools
  REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$1" >/dev/null &
  PIDS+=($!)
  for _ in $(seq 1 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "redis-server on port $REDIS_PORT did not answer within 10 s" >&2
  return 1
}

# A CA and an ECDSA P-256 certificate for 127.0.0.1 it signed, in $1
# (ca.crt, server.crt, server.key): what the TLS handshake runs use.
make_certs() {
  local dir=$1
  mkdir -p "$dir"
  (
    cd "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt \
      -days 2 -subj /CN=switchyard-bench-ca 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key -out server.csr \
      -subj /CN=127.0.0.1 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >ext.cnf
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
      -extfile ext.cnf -out server.crt 2>/dev/null
  )
}

# The common preamble: BIN, a scratch WORK directory, and PIDS (processes
# the caller starts) killed on exit, when WORK is removed.
bench_setup() {
  BIN=target/release
  WORK=$(mktemp -d)
  PIDS=()
  trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"' EXIT
}

# Admission control (websocket.handshake_rate) is off in the benchmarks that
# measure capacity against peers that have none; bench/crash.sh measures it.
start() { # name -> sets SERVER_PID; with TLS_DIR set, the WebSocket port is wss://
  local name=$1 admin=$((PORT + 1)) sy_tls=() peer_tls=() node_tls=()
  if [ -n "${TLS_DIR:-}" ]; then
    sy_tls=(--set "tls.cert_file=$TLS_DIR/server.crt" --set "tls.key_file=$TLS_DIR/server.key")
    peer_tls=(--tls-cert "$TLS_DIR/server.crt" --tls-key "$TLS_DIR/server.key")
    node_tls=("$TLS_DIR/server.crt" "$TLS_DIR/server.key")
  fi
  case $name in
    switchyard)
      env ${PRELOAD:+LD_PRELOAD=$PRELOAD} "$BIN/switchyard-server" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$admin" \
        --set log.level=warn --set topics.max_topic_length=128 \
        --set websocket.handshake_rate=0 --set websocket.max_handshakes_in_flight=0 "${sy_tls[@]}" 2>"$WORK/$name.log" & ;;
    tungstenite-4k-batched)
      "$BIN/tungstenite-peer" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$admin" --batch "${peer_tls[@]}" 2>"$WORK/$name.log" & ;;
    tungstenite-4k-per-message)
      "$BIN/tungstenite-peer" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$admin" 2>"$WORK/$name.log" & ;;
    tungstenite-default-config)
      "$BIN/tungstenite-peer" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$admin" --buffer 0 --batch 2>"$WORK/$name.log" & ;;
    floor-1thread|floor-2threads)
      "$BIN/floor-peer" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$admin" --threads "${name:6:1}" 2>"$WORK/$name.log" & ;;
    node-ws)
      node bench/peers/node-ws/server.mjs "$PORT" "$admin" "${node_tls[@]}" 2>"$WORK/$name.log" & ;;
    *) echo "unknown server $name" >&2; exit 2 ;;
  esac
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$admin") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "$name did not start" >&2; cat "$WORK/$name.log" >&2; exit 1
}

stop() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; sleep 1; }

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

tag() { python3 -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); r['server']='$1'; r.update({'variant': '${VARIANT:-}'} if '${VARIANT:-}' else {}); print(json.dumps(r))"; }

idle() { # name [connections]
  local name=$1 connections=${2:-$IDLE}
  start "$name"
  sleep 1
  local before; before=$(rss_kib "$SERVER_PID")
  rm -f "$WORK/ready"
  "$BIN/switchyard-load" idle --target "127.0.0.1:$PORT" --connections "$connections" --sources "$SOURCES" \
    --hold-secs 6 --ready-file "$WORK/ready" >"$WORK/idle-$name.json" &
  local load=$!; PIDS+=("$load")
  for _ in $(seq 1 1200); do [ -f "$WORK/ready" ] && break; sleep 0.1; done
  sleep 2
  local after; after=$(rss_kib "$SERVER_PID")
  wait "$load" || true
  python3 -c "import json; print(json.dumps({'workload': 'idle', 'server': '$name', 'connections': $connections, 'opened': int(open('$WORK/ready').read()), 'rss_before_kib': $before, 'rss_after_kib': $after, 'kib_per_connection': round(($after - $before) / $connections, 2)}))" | tag "$name" | tee -a "$WORK/results"
  stop
}

# The load generator's protocol for a server: Switchyard's own frames, or
# raw text frames for the reference peers.
protocol_of() { [ "$1" = switchyard ] && echo switchyard || echo raw; }

fanout() { # name [rate]
  local name=$1 rate=${2:-$RATE} protocol
  protocol=$(protocol_of "$name")
  start "$name"
  "$BIN/switchyard-load" fanout --target "127.0.0.1:$PORT" --admin "127.0.0.1:$((PORT + 1))" \
    --subscribers "$SUBSCRIBERS" --rate "$rate" --duration-secs "$SECS" --sources "$SOURCES" \
    --protocol "$protocol" | tag "$name" | tee -a "$WORK/results"
  stop
}


handshakes() { # name [connections] -> handshakes/s opening connections and closing them at once
  local name=$1 connections=${2:-$HANDSHAKES} tls_args=() mode=plain load connected
  if [ -n "${TLS_DIR:-}" ]; then tls_args=(--tls-ca "$TLS_DIR/ca.crt"); mode=tls; fi
  start "$name"
  sleep 0.5
  # The server's own CPU time (utime + stime, in clock ticks): the rate is
  # bounded by the load generator sharing the cores, the CPU cost per
  # handshake is the server's alone. Read when the last connection is open
  # (the load generator's ready file), then after its exit has closed them
  # all: the second part is what closing costs the server.
  local before; before=$(cpu_ticks "$SERVER_PID")
  rm -f "$WORK/ready"
  "$BIN/switchyard-load" "${tls_args[@]}" idle --target "127.0.0.1:$PORT" --connections "$connections" \
    --sources "$SOURCES" --concurrency 128 --hold-secs 1 --ready-file "$WORK/ready" >"$WORK/handshakes.json" &
  load=$!; PIDS+=("$load")
  while [ ! -f "$WORK/ready" ] && kill -0 "$load" 2>/dev/null; do sleep 0.01; done
  connected=$(cpu_ticks "$SERVER_PID")
  wait "$load"
  sleep 1
  local after; after=$(cpu_ticks "$SERVER_PID")
  VARIANT=$mode tag "$name" <"$WORK/handshakes.json" | python3 -c "
import json, os, sys
r = json.loads(sys.stdin.read())
r['workload'] = 'handshakes'
tick = os.sysconf('SC_CLK_TCK')
opened = max(r['opened'], 1)
# Until 2026-11-29 late this was the CPU from the start to the load
# generator's exit, which took in part of the teardown, as much as the
# moment of reading it allowed: now the connect phase alone.
r['server_cpu_us_per_handshake'] = round(($connected - $before) / tick * 1e6 / opened, 1)
r['server_close_cpu_us_per_connection'] = round(($after - $connected) / tick * 1e6 / opened, 1)
print(json.dumps(r))" | tee -a "$WORK/results"
  stop
}

cpu_ticks() { # pid -> utime + stime of the process (and its threads), in clock ticks
  awk '{print $14 + $15}' "/proc/$1/stat"
}

fanout_cpu() { # name rate -> one line: the server's and the load generator's CPU over a
  # 4 s window in the middle of a 12 s fan-out (SUBSCRIBERS, SOURCES), CPU per
  # delivery, latency; PERF=1 (or PERF=load) adds a profile, SYSCALLS=1 the
  # server's write calls. Appended to $WORK/results.
  local name=$1 rate=$2 load g1 g2 l1 l2 t1 t2 profiled
  start "$name"
  "$BIN/switchyard-load" fanout --target "127.0.0.1:$PORT" --admin "127.0.0.1:$((PORT + 1))" \
    --subscribers "$SUBSCRIBERS" --rate "$rate" --duration-secs 12 --sources "$SOURCES" \
    --protocol "$(protocol_of "$name")" >"$WORK/fanout.json" &
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
  SERVER=$name WRITES=${SYSCALLS:+$WORK/syscalls.csv} python3 - "$WORK/fanout.json" "$rate" "$g1" "$g2" "$l1" "$l2" "$t1" "$t2" "$SUBSCRIBERS" <<'PY' | tee -a "$WORK/results"
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
}
