# Shared by bench/compare.sh and bench/sweep.sh: starting Switchyard or a
# reference peer on $PORT (admin $PORT+1), measuring idle memory per
# connection and fan-out. Expects BIN, WORK, PIDS, SOURCES, PORT set by the
# caller (and IDLE, SUBSCRIBERS, RATE, SECS for the defaults of idle/fanout).

start() { # name -> sets SERVER_PID
  local name=$1 admin=$((PORT + 1))
  case $name in
    switchyard)
      "$BIN/switchyard-server" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$admin" \
        --set log.level=warn --set topics.max_topic_length=128 2>"$WORK/$name.log" & ;;
    tungstenite-4k-batched)
      "$BIN/tungstenite-peer" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$admin" --batch 2>"$WORK/$name.log" & ;;
    tungstenite-4k-per-message)
      "$BIN/tungstenite-peer" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$admin" 2>"$WORK/$name.log" & ;;
    tungstenite-default-config)
      "$BIN/tungstenite-peer" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$admin" --buffer 0 --batch 2>"$WORK/$name.log" & ;;
    node-ws)
      node bench/peers/node-ws/server.mjs "$PORT" "$admin" 2>"$WORK/$name.log" & ;;
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

tag() { python3 -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); r['server']='$1'; print(json.dumps(r))"; }

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
  python3 -c "import json; print(json.dumps({'workload': 'idle', 'server': '$name', 'connections': $connections, 'opened': int(open('$WORK/ready').read()), 'rss_before_kib': $before, 'rss_after_kib': $after, 'kib_per_connection': round(($after - $before) / $connections, 2)}))" | tee -a "$WORK/results"
  stop
}

fanout() { # name protocol [rate]
  local name=$1 protocol=$2 rate=${3:-$RATE}
  start "$name"
  "$BIN/switchyard-load" fanout --target "127.0.0.1:$PORT" --admin "127.0.0.1:$((PORT + 1))" \
    --subscribers "$SUBSCRIBERS" --rate "$rate" --duration-secs "$SECS" --sources "$SOURCES" \
    --protocol "$protocol" | tag "$name" | tee -a "$WORK/results"
  stop
}

