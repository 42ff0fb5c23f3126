#!/usr/bin/env bash
# Install Headwater with its test dependencies, start a real Kafka broker and a real PostgreSQL
# server, run the whole test suite, stop what it started. Usage: bash scripts/test.sh [pytest
# arguments]. With HEADWATER_TEST_KAFKA=host:port set, that broker is used and none is started;
# with HEADWATER_TEST_POSTGRES=postgresql://... set, that server.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[dev]'

stops=()
trap 'for stop in "${stops[@]}"; do bash scripts/$stop.sh stop || true; done' EXIT

if [ -z "${HEADWATER_TEST_KAFKA:-}" ]; then
  bash scripts/kafka.sh fetch
  bash scripts/kafka.sh status >/dev/null 2>&1 || stops+=(kafka)
  bash scripts/kafka.sh start >/dev/null
  export HEADWATER_TEST_KAFKA=127.0.0.1:${KAFKA_PORT:-9092}
fi

if [ -z "${HEADWATER_TEST_POSTGRES:-}" ]; then
  bash scripts/postgres.sh fetch
  bash scripts/postgres.sh status >/dev/null 2>&1 || stops+=(postgres)
  HEADWATER_TEST_POSTGRES=$(bash scripts/postgres.sh start)
  export HEADWATER_TEST_POSTGRES
fi

python3 -m pytest "$@"
