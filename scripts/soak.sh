#!/usr/bin/env bash
# Run the chaos tests several times in a row while other processes keep every core busy, and
# stop at the first failure: the chaos tests must not depend on the machine being idle.
# Usage: bash scripts/soak.sh [RUNS [LOADERS [pytest arguments]]]
#   RUNS     how many times to run them (default 5)
#   LOADERS  busy processes beside them (default: one per core)
#   pytest arguments default to tests/chaos
# Needs the broker of `bash scripts/kafka.sh start` for the Kafka tests (HEADWATER_TEST_KAFKA).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-5}
loaders=${2:-$(nproc)}
shift $(( $# < 2 ? $# : 2 ))
[ $# -gt 0 ] || set -- tests/chaos

busy=()
stop_load() {
  [ ${#busy[@]} -eq 0 ] && return
  kill "${busy[@]}" 2>/dev/null || true
  wait "${busy[@]}" 2>/dev/null || true
}
trap stop_load EXIT
for _ in $(seq "$loaders"); do
  python3 -c 'while True: pass' &
  busy+=($!)
done

for run in $(seq "$runs"); do
  started=$(date +%s)
  if ! python3 -m pytest -q -p no:cacheprovider "$@"; then
    echo "soak: run $run of $runs failed (with $loaders busy processes)" >&2
    exit 1
  fi
  echo "soak: run $run of $runs passed in $(( $(date +%s) - started ))s with $loaders busy processes"
done
