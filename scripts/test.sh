#!/usr/bin/env bash
# Install Headwater with its test dependencies, start real Kafka brokers (one plain, one
# secured, and a cluster of three), a real PostgreSQL server and a real Redis, run the whole
# test suite, stop what it started.
# Usage: bash scripts/test.sh [pytest arguments]. With HEADWATER_TEST_KAFKA=host:port set, that
# broker is used and none is started; likewise HEADWATER_TEST_KAFKA_SECURED (with
# HEADWATER_TEST_KAFKA_SECURED_DIR), HEADWATER_TEST_KAFKA_CLUSTER=host:port,host:port,host:port,
# HEADWATER_TEST_REDIS=redis://... and HEADWATER_TEST_POSTGRES=postgresql://...
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check -e '.[dev]'

stops=()  # the commands that stop what this script started
trap 'for stop in "${stops[@]}"; do $stop || true; done' EXIT

if [ -z "${HEADWATER_TEST_KAFKA:-}" ]; then
  bash scripts/kafka.sh fetch
  bash scripts/kafka.sh status >/dev/null 2>&1 || stops+=("bash scripts/kafka.sh stop")
  bash scripts/kafka.sh start >/dev/null
  export HEADWATER_TEST_KAFKA=127.0.0.1:${KAFKA_PORT:-9092}
fi

# a second broker that demands SASL_SSL (SCRAM) or a client certificate, with ACLs
if [ -z "${HEADWATER_TEST_KAFKA_SECURED:-}" ]; then
  export KAFKA_SECURED=1
  bash scripts/kafka.sh status >/dev/null 2>&1 || stops+=("env KAFKA_SECURED=1 bash scripts/kafka.sh stop")
  HEADWATER_TEST_KAFKA_SECURED=$(bash scripts/kafka.sh start | head -n 1)
  unset KAFKA_SECURED
  export HEADWATER_TEST_KAFKA_SECURED
  export HEADWATER_TEST_KAFKA_SECURED_DIR=${KAFKA_SECURED_STATE_DIR:-/tmp/headwater-kafka-secured}
fi

# three brokers with every topic on all of them, for the test that kills one mid-run
if [ -z "${HEADWATER_TEST_KAFKA_CLUSTER:-}" ]; then
  KAFKA_BROKERS=3 bash scripts/kafka.sh status >/dev/null 2>&1 || stops+=("env KAFKA_BROKERS=3 bash scripts/kafka.sh stop")
  HEADWATER_TEST_KAFKA_CLUSTER=$(KAFKA_BROKERS=3 bash scripts/kafka.sh start | head -n 1)
  export HEADWATER_TEST_KAFKA_CLUSTER
fi

if [ -z "${HEADWATER_TEST_REDIS:-}" ]; then
  bash scripts/redis.sh fetch
  bash scripts/redis.sh status >/dev/null 2>&1 || stops+=("bash scripts/redis.sh stop")
  HEADWATER_TEST_REDIS=$(bash scripts/redis.sh start)
  export HEADWATER_TEST_REDIS
fi

if [ -z "${HEADWATER_TEST_POSTGRES:-}" ]; then
  bash scripts/postgres.sh fetch
  bash scripts/postgres.sh status >/dev/null 2>&1 || stops+=("bash scripts/postgres.sh stop")
  HEADWATER_TEST_POSTGRES=$(bash scripts/postgres.sh start)
  export HEADWATER_TEST_POSTGRES
fi

python3 -m pytest "$@"
