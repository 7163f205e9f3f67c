#!/usr/bin/env bash
# The clients' generated interleavings (tests/tests/client_interleavings.rs)
# at more runs than the test command's 3 per client: each run plays one
# seeded schedule of publishes, migrations, closes of either side with any
# code and hint, crashes, half-open connections, refusals before welcome,
# lost history and frames of a later protocol version against the Rust
# client and the browser client (Node + ws), and checks the application's
# event stream. Prints every seed; a violation names its seed and schedule.
# Bounded: about 1.5 s per run per client.
#
#   bench/client-interleavings.sh [runs=200] [steps=40]
#   CLIENT_SEED=N bench/client-interleavings.sh   # replay one schedule
set -euo pipefail
cd "$(dirname "$0")/.."
export CLIENT_RUNS=${1:-200}
export CLIENT_STEPS=${2:-40}
start=$(date +%s)
cargo test --quiet -p switchyard-tests --test client_interleavings -- --nocapture 2>&1 \
  | grep -E "client, seed|client: |replay|test result|panicked"
echo "runs: $(( CLIENT_RUNS * 2 )) of $CLIENT_STEPS steps; took $(( $(date +%s) - start )) s"
