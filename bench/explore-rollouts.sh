#!/usr/bin/env bash
# The rollout planner's explorer (operator/src/rollout/explore.rs) at a
# deeper bound than the test command's, in a release build. Exhaustive up to
# the bound, bounded in time by it; prints the bound and the states explored.
#
#   bench/explore-rollouts.sh [rounds=9] [disturbances=3] [crashes=2]
set -euo pipefail
cd "$(dirname "$0")/.."
export SWITCHYARD_EXPLORE_ROUNDS=${1:-9}
export SWITCHYARD_EXPLORE_DISTURBANCES=${2:-3}
export SWITCHYARD_EXPLORE_CRASHES=${3:-2}
start=$(date +%s)
cargo test --release --quiet -p switchyard-operator --lib \
  rollout::explore -- --nocapture 2>&1 | grep -E "rollout explorer|test result|invariant|after:|^ {9}"
echo "took $(( $(date +%s) - start )) s"
