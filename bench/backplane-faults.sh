#!/usr/bin/env bash
# The backplane's fault checker (tests/tests/backplane_faults.rs) for longer
# than the test command's 15 s: three gateways on one real redis-server,
# clients resuming and hopping, publishers, and a nemesis overlapping Redis
# restarts (with and without lost writes), pauses, deleted keys, killed
# pub/sub connections and stopped gateways. Each round prints its seed, the
# faults it injected, the publishes by outcome and the messages delivered,
# and fails naming every violation of the resume promise. Bounded: rounds x
# (seconds + ~30 s).
#
#   bench/backplane-faults.sh [seconds=300] [rounds=1]
#   FAULTS_SEED=N bench/backplane-faults.sh 300   # replay one schedule
set -euo pipefail
cd "$(dirname "$0")/.."
export FAULTS_SECONDS=${1:-300}
ROUNDS=${2:-1}
cargo test --quiet -p switchyard-tests --test backplane_faults --no-run
for round in $(seq 1 "$ROUNDS"); do
  start=$(date +%s)
  cargo test --quiet -p switchyard-tests --test backplane_faults \
    the_resume_promise -- --nocapture 2>&1 |
    grep -E "backplane faults|test result|violations|^client |panicked"
  echo "round $round took $(( $(date +%s) - start )) s"
done
