#!/usr/bin/env bash
# Install Headwater with its test dependencies, start a real Kafka broker, run the whole test
# suite, stop the broker. Usage: bash scripts/test.sh [pytest arguments]
# With HEADWATER_TEST_KAFKA=host:port set, that broker is used and none is started.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[dev]'

if [ -z "${HEADWATER_TEST_KAFKA:-}" ]; then
  bash scripts/kafka.sh fetch
  started=$(bash scripts/kafka.sh status >/dev/null 2>&1 && echo no || echo yes)
  bash scripts/kafka.sh start >/dev/null
  if [ "$started" = yes ]; then
    trap 'bash scripts/kafka.sh stop' EXIT
  fi
  export HEADWATER_TEST_KAFKA=127.0.0.1:${KAFKA_PORT:-9092}
fi

python3 -m pytest "$@"
