#!/usr/bin/env bash
# A real single-node Apache Kafka broker for Headwater's tests, without Docker.
#
# The broker is one JVM running KRaft in combined mode (broker + controller)
# on 127.0.0.1. Its jars come from Maven Central through Maven, using the
# dependency list in scripts/kafka-pom.xml, and are cached between runs.
#
# Usage: scripts/kafka.sh COMMAND
#
#   fetch                   resolve and cache the broker jars (no-op when cached)
#   start                   format fresh storage and start the broker; waits until
#                           it answers a real client (no-op if already running);
#                           prints the bootstrap address (127.0.0.1:PORT) on stdout
#   stop                    stop the broker (SIGTERM, then SIGKILL) and delete its data
#   status                  report whether the broker runs and answers
#                           (exit 0 ready, 1 running but not answering, 3 stopped)
#   restart-broker [--kill] stop the broker process (SIGKILL with --kill, to mimic
#                           a crash) and start it again on the SAME data
#
# Environment (defaults in brackets):
#   KAFKA_HOME              jar and Maven cache [${XDG_CACHE_HOME:-$HOME/.cache}/headwater-kafka]
#   KAFKA_STATE_DIR         pid, logs, config, data [/tmp/headwater-kafka-$KAFKA_PORT]
#   KAFKA_PORT              client (PLAINTEXT) port [9092]
#   KAFKA_CONTROLLER_PORT   KRaft controller port [9093]
#   KAFKA_HEAP_OPTS         JVM heap flags [-Xms512m -Xmx512m]
#   KAFKA_START_TIMEOUT     seconds to wait for readiness [60]
#   KAFKA_STOP_TIMEOUT      seconds between SIGTERM and SIGKILL [30]
#   JAVA_HOME               Java 17+ to use [java on PATH]
#   PYTHON                  interpreter with aiokafka for the readiness probe [python3]
#
# Secured mode (KAFKA_SECURED=1, for every command): a SECOND, separate broker that
# demands authentication, for the tests of Kafka security. `start` then also creates a
# throwaway PKI with openssl in KAFKA_SECURED_STATE_DIR/tls (a CA, the broker's certificate
# for 127.0.0.1/localhost, a client certificate signed by that CA, and a client
# certificate from a second, UNTRUSTED CA), formats storage with SCRAM-SHA-512 users
# `admin` (a super user) and `pipeline` (no ACLs: grant them), and starts a broker with:
#   SASL_SSL  KAFKA_SECURED_PORT [9192]             SCRAM-SHA-512 over TLS
#   SSL       KAFKA_SECURED_SSL_PORT [9193]         TLS, client certificate required
#                                                   (also the inter-broker listener)
#   CONTROLLER KAFKA_SECURED_CONTROLLER_PORT [9194] TLS, client certificate required
# ACLs are enforced (StandardAuthorizer, deny when no ACL matches); super users are
# User:admin and the broker's own certificate, User:CN=headwater-broker.
# Its state lives in KAFKA_SECURED_STATE_DIR [/tmp/headwater-kafka-secured] (KAFKA_PORT,
# KAFKA_CONTROLLER_PORT and KAFKA_STATE_DIR are ignored then); `start` prints the SASL_SSL
# address, then the SSL address, one a line, and writes secured.env in the state dir:
# KEY=VALUE lines (readable by `source` and by a test) with the addresses, the CA, the
# client certificate, key and key password, the untrusted CA and client certificate, and
# the user names and passwords. `stop` deletes the data, the PKI and secured.env.
#
#   KAFKA_SECURED=1 bash scripts/kafka.sh start    # about 7 s once the jars are cached
#   KAFKA_SECURED=1 bash scripts/kafka.sh status
#   KAFKA_SECURED=1 bash scripts/kafka.sh stop
#
# Secured mode needs openssl on PATH.
#
# Cluster mode (KAFKA_BROKERS=N with N >= 3, for every command): a THIRD, separate set of
# N KRaft nodes, each a broker and a controller (one N-voter quorum), for the tests of
# broker loss. Node I (1..N) listens on 127.0.0.1 at KAFKA_CLUSTER_PORT + 2*(I-1) for
# clients [9292, 9294, 9296] and on the next port for its controller [9293, 9295, 9297].
# Every topic is replicated to all nodes by default (default.replication.factor=N, the
# offsets and transaction logs too) with min.insync.replicas=2, so one node may die.
# Its state lives in KAFKA_CLUSTER_STATE_DIR [/tmp/headwater-kafka-cluster], one
# directory node-I per node (kafka.pid, broker.log, server.properties, data/); each JVM
# gets KAFKA_CLUSTER_HEAP_OPTS [-Xms128m -Xmx384m]. KAFKA_PORT, KAFKA_CONTROLLER_PORT,
# KAFKA_STATE_DIR and KAFKA_HEAP_OPTS are ignored then. `start` prints the bootstrap list
# (127.0.0.1:9292,127.0.0.1:9294,127.0.0.1:9296) on stdout once every node is registered
# and a topic replicated to all of them can be created. Commands:
#   fetch | start | stop | status   the whole cluster (stop: SIGTERM, SIGKILL after 5 s;
#                                   status 0: every node ready, 1: not, 3: all stopped)
#   kill I                          SIGKILL node I (a crash); its data stays
#   stop-one I                      stop node I (SIGTERM); its data stays
#   start-one I                     start node I again on its data; waits until it answers
#
#   KAFKA_BROKERS=3 bash scripts/kafka.sh start    # about 20 s once the jars are cached
#   KAFKA_BROKERS=3 bash scripts/kafka.sh kill 2
#   KAFKA_BROKERS=3 bash scripts/kafka.sh start-one 2
#   KAFKA_BROKERS=3 bash scripts/kafka.sh stop
#
# Messages go to stderr; every failure exits non-zero.
#
# Files in KAFKA_STATE_DIR: kafka.pid, broker.log (stdout/stderr of the
# broker, kept after stop for post-mortems), format.log, server.properties,
# log4j2.properties, cluster.id and data/ (the Kafka log dirs).

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POM="$SCRIPT_DIR/kafka-pom.xml"

KAFKA_HOME="${KAFKA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/headwater-kafka}"
KAFKA_SECURED="${KAFKA_SECURED:-0}"
KAFKA_BROKERS="${KAFKA_BROKERS:-1}"
KAFKA_CLUSTER_PORT="${KAFKA_CLUSTER_PORT:-9292}"
KAFKA_CLUSTER_STATE_DIR="${KAFKA_CLUSTER_STATE_DIR:-/tmp/headwater-kafka-cluster}"
[[ "$KAFKA_CLUSTER_STATE_DIR" == /* ]] || KAFKA_CLUSTER_STATE_DIR="$PWD/$KAFKA_CLUSTER_STATE_DIR"
if [[ "$KAFKA_BROKERS" != 1 ]]; then
  # Cluster mode: select_node sets the per-node values (these are placeholders).
  KAFKA_PORT=0
  KAFKA_CONTROLLER_PORT=1
  KAFKA_STATE_DIR="$KAFKA_CLUSTER_STATE_DIR"
  KAFKA_HEAP_OPTS="${KAFKA_CLUSTER_HEAP_OPTS:--Xms128m -Xmx384m}"
elif [[ "$KAFKA_SECURED" == 1 ]]; then
  # Own variables, so that a KAFKA_PORT exported for the PLAINTEXT broker never points
  # the secured one at the same ports or state.
  KAFKA_PORT="${KAFKA_SECURED_PORT:-9192}"
  KAFKA_SSL_PORT="${KAFKA_SECURED_SSL_PORT:-9193}"
  KAFKA_CONTROLLER_PORT="${KAFKA_SECURED_CONTROLLER_PORT:-9194}"
  KAFKA_STATE_DIR="${KAFKA_SECURED_STATE_DIR:-/tmp/headwater-kafka-secured}"
else
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_STATE_DIR="${KAFKA_STATE_DIR:-/tmp/headwater-kafka-$KAFKA_PORT}"
fi
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms512m -Xmx512m}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-60}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
PYTHON="${PYTHON:-python3}"
HOST=127.0.0.1
[[ "$KAFKA_STATE_DIR" == /* ]] || KAFKA_STATE_DIR="$PWD/$KAFKA_STATE_DIR"
[[ "$KAFKA_HOME" == /* ]] || KAFKA_HOME="$PWD/$KAFKA_HOME"

if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
  JAVA="$JAVA_HOME/bin/java"
else
  JAVA=java
fi

PID_FILE="$KAFKA_STATE_DIR/kafka.pid"
BROKER_LOG="$KAFKA_STATE_DIR/broker.log"
FORMAT_LOG="$KAFKA_STATE_DIR/format.log"
SERVER_PROPS="$KAFKA_STATE_DIR/server.properties"
LOG4J_CONF="$KAFKA_STATE_DIR/log4j2.properties"
DATA_DIR="$KAFKA_STATE_DIR/data"
TLS_DIR="$KAFKA_STATE_DIR/tls"
SECURED_ENV="$KAFKA_STATE_DIR/secured.env"

# ---------------------------------------------------------------- helpers

say() { printf 'kafka.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not on PATH${2:+ ($2)}"
}

check_settings() {
  local v
  [[ "$KAFKA_SECURED" == 0 || "$KAFKA_SECURED" == 1 ]] ||
    die "KAFKA_SECURED must be 0 or 1, got '$KAFKA_SECURED'"
  [[ "$KAFKA_BROKERS" =~ ^[1-9]$ ]] ||
    die "KAFKA_BROKERS must be a number from 1 to 9, got '$KAFKA_BROKERS'"
  if clustered; then
    ! secured || die "KAFKA_SECURED=1 with KAFKA_BROKERS=$KAFKA_BROKERS: a secured cluster is not supported"
    (( KAFKA_BROKERS >= 3 )) ||
      die "KAFKA_BROKERS must be 1 or at least 3 (a quorum that survives losing a node)"
    [[ "$KAFKA_CLUSTER_PORT" =~ ^[0-9]+$ ]] ||
      die "KAFKA_CLUSTER_PORT must be a number, got '$KAFKA_CLUSTER_PORT'"
  fi
  if secured; then
    for v in KAFKA_PORT KAFKA_SSL_PORT KAFKA_CONTROLLER_PORT; do
      [[ "${!v}" =~ ^[0-9]+$ ]] || die "${v/KAFKA_/KAFKA_SECURED_} must be a number, got '${!v}'"
    done
    [[ "$KAFKA_PORT" != "$KAFKA_CONTROLLER_PORT" && "$KAFKA_PORT" != "$KAFKA_SSL_PORT" &&
       "$KAFKA_SSL_PORT" != "$KAFKA_CONTROLLER_PORT" ]] ||
      die "KAFKA_SECURED_PORT, KAFKA_SECURED_SSL_PORT and KAFKA_SECURED_CONTROLLER_PORT must differ"
  fi
  for v in KAFKA_PORT KAFKA_CONTROLLER_PORT KAFKA_START_TIMEOUT KAFKA_STOP_TIMEOUT; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a number, got '${!v}'"
  done
  [[ "$KAFKA_PORT" != "$KAFKA_CONTROLLER_PORT" ]] ||
    die "KAFKA_PORT and KAFKA_CONTROLLER_PORT must differ"
}

secured() { [[ "$KAFKA_SECURED" == 1 ]]; }
clustered() { [[ "$KAFKA_BROKERS" != 1 ]]; }

# The ports this broker listens on.
broker_ports() {
  if secured; then
    printf '%s\n' "$KAFKA_PORT" "$KAFKA_SSL_PORT" "$KAFKA_CONTROLLER_PORT"
  else
    printf '%s\n' "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"
  fi
}

# What `start` prints on stdout: the bootstrap address(es).
print_addresses() {
  printf '%s:%s\n' "$HOST" "$KAFKA_PORT"
  if secured; then printf '%s:%s\n' "$HOST" "$KAFKA_SSL_PORT"; fi
}

kafka_version() {
  sed -n 's:.*<kafka.version>\([^<]*\)</kafka.version>.*:\1:p' "$POM" | head -n 1
}

# The jar set lives in a directory named after the Kafka version and a hash
# of the POM, so editing the POM never mixes old and new jars.
lib_dir() {
  local hash
  hash="$(sha256 "$POM" | cut -c1-12)"
  printf '%s/kafka-%s-%s/lib' "$KAFKA_HOME" "$(kafka_version)" "$hash"
}

check_java() {
  need "$JAVA" "install a Java 17+ runtime or set JAVA_HOME"
  local line major
  line="$("$JAVA" -version 2>&1 | head -n 1)"
  major="$(printf '%s\n' "$line" | sed -n 's/.*version "\([0-9]*\)[."].*/\1/p')"
  [[ "$major" == 1 ]] && major=8
  [[ -n "$major" ]] || die "cannot read the Java version from: $line"
  (( major >= 17 )) || die "Kafka $(kafka_version) needs Java 17 or newer, found: $line"
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
  if command -v timeout >/dev/null 2>&1; then
    # shellcheck disable=SC2016  # $0/$1 expand in the child bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$HOST" "$1" 2>/dev/null
  else
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
  fi
}

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -d' ' -f1
  else
    shasum -a 256 "$1" | cut -d' ' -f1
  fi
}

read_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(tr -dc '0-9' <"$PID_FILE")"
  [[ -n "$pid" ]] || return 1
  printf '%s\n' "$pid"
}

# True when $1 is alive and is the broker started from this state dir
# (guards against a recycled pid belonging to some other process).
is_our_broker() {
  local pid="$1" args
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/cmdline" ]]; then
    args="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
  else
    args="$(ps -p "$pid" -o args= 2>/dev/null || true)"
  fi
  [[ "$args" == *kafka.Kafka* && "$args" == *"$SERVER_PROPS"* ]]
}

# Prints the pid of the running broker of this state dir, or fails.
running_pid() {
  local pid
  pid="$(read_pid)" || return 1
  is_our_broker "$pid" || return 1
  printf '%s\n' "$pid"
}

show_log_tail() {
  local file="${1:-$BROKER_LOG}" n="${2:-60}"
  if [[ -s "$file" ]]; then
    say "last $n lines of $file:"
    tail -n "$n" "$file" | sed 's/^/  | /' >&2
  else
    say "($file is empty or missing)"
  fi
}

# A random Kafka Uuid in its string form: 16 random bytes, URL-safe base64
# without padding (22 chars). Like Kafka's Uuid.randomUuid(), avoid ids that
# start with '-' since they look like command-line flags.
new_cluster_id() {
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)"
    # (the two reserved ids, ZERO and METADATA_TOPIC_ID, are excluded too)
    [[ ${#id} -eq 22 && "$id" != -* && "$id" != AAAAAAAAAAAAAAAAAAAAA[AQ] ]] && break
  done
  printf '%s\n' "$id"
}

# ---------------------------------------------------------------- fetch

cmd_fetch() {
  check_settings
  need mvn "install Apache Maven 3.6.3+"
  check_java
  [[ -f "$POM" ]] || die "missing $POM"

  local lib version stamp
  lib="$(lib_dir)"
  version="$(kafka_version)"
  stamp="$lib/.complete"
  if [[ -f "$stamp" ]]; then
    say "Kafka $version jars already in $lib"
    return 0
  fi

  mkdir -p "$KAFKA_HOME"
  # Several jobs may share one cache: serialise fetches.
  exec 8>"$KAFKA_HOME/.fetch.lock"
  if command -v flock >/dev/null 2>&1; then
    flock 8
  fi
  if [[ -f "$stamp" ]]; then
    say "Kafka $version jars already in $lib"
    return 0
  fi

  local work="${lib%/lib}" started=$SECONDS
  local tmp_lib="$work/lib.partial.$$"
  local settings="$KAFKA_HOME/maven-settings.xml"
  mkdir -p "$work"
  rm -rf "$tmp_lib"
  cp "$POM" "$work/pom.xml"
  # An empty settings file for both user and global settings: no mirrors or
  # extra repositories from the machine, so only Maven Central is used.
  printf '<settings/>\n' >"$settings"

  say "resolving Kafka $version from Maven Central into $lib (Maven log: $work/mvn.log)"
  if ! mvn -B -ntp \
      -s "$settings" -gs "$settings" \
      -Dmaven.repo.local="$KAFKA_HOME/m2" \
      -f "$work/pom.xml" \
      dependency:copy-dependencies \
      -DoutputDirectory="$tmp_lib" \
      -DincludeScope=runtime \
      >"$work/mvn.log" 2>&1; then
    show_log_tail "$work/mvn.log" 40
    rm -rf "$tmp_lib"
    die "mvn dependency:copy-dependencies failed"
  fi

  local jar
  for jar in "kafka_2.13-$version.jar" "kafka-clients-$version.jar" \
             "log4j-slf4j-impl-*.jar" "log4j-core-*.jar" "slf4j-api-1.*.jar"; do
    compgen -G "$tmp_lib/$jar" >/dev/null || { rm -rf "$tmp_lib"; die "expected $jar after fetch, not found"; }
  done
  if compgen -G "$tmp_lib/slf4j-api-2.*.jar" >/dev/null; then
    rm -rf "$tmp_lib"
    die "slf4j-api 2.x on the classpath would silence the SLF4J 1.x log4j binding"
  fi

  # Cheap smoke test that the class path is complete enough to boot.
  local got
  if ! got="$("$JAVA" -cp "$tmp_lib/*" kafka.Kafka --version 2>&1)"; then
    printf '%s\n' "$got" | tail -n 20 >&2
    rm -rf "$tmp_lib"
    die "'kafka.Kafka --version' failed on the fetched jars"
  fi
  [[ "$got" == *"$version"* ]] || say "warning: 'kafka.Kafka --version' printed: $got"

  rm -rf "$lib"
  mv "$tmp_lib" "$lib"
  touch "$stamp"
  say "fetched $(find "$lib" -name '*.jar' | wc -l) jars ($(du -sh "$lib" | cut -f1)) in $((SECONDS - started))s"
}

ensure_jars() {
  [[ -f "$(lib_dir)/.complete" ]] || cmd_fetch
}

# ---------------------------------------------------------------- config

# The listener part of server.properties of the PLAINTEXT broker.
plaintext_listeners() {
  cat <<EOF
# Generated by scripts/kafka.sh; rewritten on every start.
# One KRaft node acting as broker and controller, with a static voter set,
# so storage is formatted with just a cluster id (no --standalone).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA_DIR
EOF
}

# The listener and security part of server.properties of the secured broker: every
# listener is TLS; the broker talks to itself and to its controller over the SSL
# listeners with its own certificate (a super user), clients over SASL_SSL (SCRAM) or SSL
# with a client certificate.
secured_listeners() {
  cat <<EOF
# Generated by scripts/kafka.sh (KAFKA_SECURED=1); rewritten on every start.
# One KRaft node acting as broker and controller, with a static voter set.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=SASL_SSL://$HOST:$KAFKA_PORT,SSL://$HOST:$KAFKA_SSL_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=SASL_SSL://$HOST:$KAFKA_PORT,SSL://$HOST:$KAFKA_SSL_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
inter.broker.listener.name=SSL
listener.security.protocol.map=CONTROLLER:SSL,SSL:SSL,SASL_SSL:SASL_SSL
log.dirs=$DATA_DIR

# TLS: the broker's key and certificate (PKCS12), the test CA as trust store (PEM).
ssl.keystore.type=PKCS12
ssl.keystore.location=$TLS_DIR/broker.p12
ssl.keystore.password=$BROKER_STORE_PASSWORD
ssl.key.password=$BROKER_STORE_PASSWORD
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
ssl.endpoint.identification.algorithm=https
listener.name.ssl.ssl.client.auth=required
listener.name.controller.ssl.client.auth=required
listener.name.sasl_ssl.ssl.client.auth=none

# SASL: SCRAM-SHA-512 only; the users are created when the storage is formatted.
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;

# ACLs: nothing is allowed without one, except to the super users.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:$ADMIN_USER;User:CN=headwater-broker
EOF
}

# The listener part of server.properties of node $NODE of the cluster: a broker and one of
# the KAFKA_BROKERS voters of the controller quorum (a static voter set, so storage is
# formatted with just the shared cluster id).
cluster_listeners() {
  local voters="" i
  for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
    voters+="${voters:+,}$i@$HOST:$(node_port "$i" controller)"
  done
  cat <<EOF
# Generated by scripts/kafka.sh (KAFKA_BROKERS=$KAFKA_BROKERS); rewritten on every start.
# Node $NODE of $KAFKA_BROKERS KRaft nodes, each a broker and a controller.
process.roles=broker,controller
node.id=$NODE
controller.quorum.voters=$voters
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA_DIR
EOF
}

# Every topic on every node, internal ones too, and acks=all writes need two replicas in
# sync: one node may die without losing an acknowledged write or stopping the writers. The
# offsets and transaction logs get one partition per node, so their coordinators spread.
cluster_replication() {
  cat <<EOF

# Every topic on all $KAFKA_BROKERS nodes; a write with acks=all needs 2 replicas in sync.
default.replication.factor=$KAFKA_BROKERS
min.insync.replicas=2
offsets.topic.replication.factor=$KAFKA_BROKERS
offsets.topic.num.partitions=$KAFKA_BROKERS
transaction.state.log.replication.factor=$KAFKA_BROKERS
transaction.state.log.min.isr=2
transaction.state.log.num.partitions=$KAFKA_BROKERS
share.coordinator.state.topic.replication.factor=$KAFKA_BROKERS
share.coordinator.state.topic.min.isr=2
EOF
}

write_config() {
  mkdir -p "$KAFKA_STATE_DIR"
  {
    if clustered; then
      cluster_listeners
      cluster_replication
    else
      if secured; then secured_listeners; else plaintext_listeners; fi
      cat <<EOF

# A single broker cannot satisfy the default replication of internal topics.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
default.replication.factor=1
min.insync.replicas=1
EOF
    fi
    cat <<EOF

# Test ergonomics: no join delay, explicit topic creation only.
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
num.partitions=1

# After an unclean stop (restart-broker --kill) the restarted controller keeps
# the old broker incarnation registered until its session times out (default
# 9 s); a shorter session makes crash-restarts in tests quicker.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000

# Keep a small footprint (the log cleaner reserves 128 MiB of heap by default).
log.cleaner.dedupe.buffer.size=33554432
num.network.threads=2
num.io.threads=4
EOF
  } >"$SERVER_PROPS"

  cat >"$LOG4J_CONF" <<'EOF'
# Generated by scripts/kafka.sh: everything to stdout, which goes to broker.log.
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = STDOUT
logger.statechange.name = state.change.logger
logger.statechange.level = warn
logger.kafkarequest.name = kafka.request.logger
logger.kafkarequest.level = warn
EOF
}

jvm_opts() {
  # Roughly what Kafka's own start scripts pass, with a small heap.
  # shellcheck disable=SC2206
  local heap=($KAFKA_HEAP_OPTS)
  printf '%s\n' "${heap[@]}" \
    -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    "-Dlog4j2.configurationFile=$LOG4J_CONF"
}

# Formats DATA_DIR with cluster id $1 [a new one].
format_storage() {
  local cluster_id="${1:-}"
  [[ -n "$cluster_id" ]] || cluster_id="$(new_cluster_id)"
  printf '%s\n' "$cluster_id" >"$KAFKA_STATE_DIR/cluster.id"
  local -a scram=()
  if secured; then
    # SCRAM users must exist before the broker starts: they go into the first metadata.
    scram=(--add-scram "SCRAM-SHA-512=[name=$ADMIN_USER,password=$ADMIN_PASSWORD]"
           --add-scram "SCRAM-SHA-512=[name=$PIPELINE_USER,password=$PIPELINE_PASSWORD]")
  fi
  if ! "$JAVA" -Xmx256m "-Dlog4j2.configurationFile=$LOG4J_CONF" -cp "$(lib_dir)/*" \
      kafka.tools.StorageTool format -t "$cluster_id" -c "$SERVER_PROPS" \
      ${scram[@]+"${scram[@]}"} >"$FORMAT_LOG" 2>&1 </dev/null; then
    show_log_tail "$FORMAT_LOG" 30
    die "formatting $DATA_DIR failed"
  fi
  [[ -f "$DATA_DIR/meta.properties" ]] || { show_log_tail "$FORMAT_LOG" 30; die "format did not write $DATA_DIR/meta.properties"; }
  say "formatted $DATA_DIR (cluster id $cluster_id)"
}

# ---------------------------------------------------------------- secured mode

ADMIN_USER=admin
PIPELINE_USER=pipeline
CLIENT_CN=headwater-pipeline

new_password() {
  local pw=""
  while (( ${#pw} < 24 )); do
    pw+="$(head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')"
  done
  printf '%s\n' "${pw:0:24}"
}

# openssl, with its output in $TLS_DIR/openssl.log (shown on failure).
ossl() {
  if ! openssl "$@" >>"$TLS_DIR/openssl.log" 2>&1 </dev/null; then
    show_log_tail "$TLS_DIR/openssl.log" 20
    die "openssl $1 failed"
  fi
}

# new_ca NAME CN: a self-signed CA, NAME.key and NAME.pem.
new_ca() {
  local name="$1" cn="$2"
  printf 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n' \
    >"$TLS_DIR/$name.ext"
  ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS_DIR/$name.key"
  ossl req -new -key "$TLS_DIR/$name.key" -subj "/CN=$cn" -out "$TLS_DIR/$name.csr"
  ossl x509 -req -in "$TLS_DIR/$name.csr" -signkey "$TLS_DIR/$name.key" -days 30 \
    -extfile "$TLS_DIR/$name.ext" -out "$TLS_DIR/$name.pem"
}

# new_leaf NAME CN CA USAGE [SAN]: NAME.key (unencrypted) and NAME.pem signed by CA.
new_leaf() {
  local name="$1" cn="$2" ca="$3" usage="$4" san="${5:-}"
  {
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n'
    printf 'extendedKeyUsage=%s\n' "$usage"
    [[ -z "$san" ]] || printf 'subjectAltName=%s\n' "$san"
  } >"$TLS_DIR/$name.ext"
  ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS_DIR/$name.key"
  ossl req -new -key "$TLS_DIR/$name.key" -subj "/CN=$cn" -out "$TLS_DIR/$name.csr"
  ossl x509 -req -in "$TLS_DIR/$name.csr" -CA "$TLS_DIR/$ca.pem" -CAkey "$TLS_DIR/$ca.key" \
    -set_serial "0x$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')" -days 30 \
    -extfile "$TLS_DIR/$name.ext" -out "$TLS_DIR/$name.pem"
}

# A fresh throwaway PKI and fresh passwords, for one `start` of the secured broker.
make_pki() {
  need openssl "secured mode makes its certificates with openssl"
  rm -rf "$TLS_DIR"
  mkdir -p "$TLS_DIR"
  chmod 700 "$TLS_DIR"
  BROKER_STORE_PASSWORD="$(new_password)"
  ADMIN_PASSWORD="$(new_password)"
  PIPELINE_PASSWORD="$(new_password)"
  CLIENT_KEY_PASSWORD="$(new_password)"
  export CLIENT_KEY_PASSWORD BROKER_STORE_PASSWORD

  new_ca ca "Headwater test CA"
  new_ca untrusted-ca "Untrusted test CA"
  new_leaf broker headwater-broker ca serverAuth,clientAuth "IP:$HOST,DNS:localhost"
  new_leaf client "$CLIENT_CN" ca clientAuth
  new_leaf untrusted-client "$CLIENT_CN" untrusted-ca clientAuth
  # the broker's key store: its key, certificate and the CA
  ossl pkcs12 -export -in "$TLS_DIR/broker.pem" -inkey "$TLS_DIR/broker.key" \
    -certfile "$TLS_DIR/ca.pem" -name broker -out "$TLS_DIR/broker.p12" \
    -passout env:BROKER_STORE_PASSWORD
  # the trusted client's key, encrypted with a password (the untrusted one's is not)
  ossl pkcs8 -topk8 -v2 aes-256-cbc -in "$TLS_DIR/client.key" -out "$TLS_DIR/client-key.pem" \
    -passout env:CLIENT_KEY_PASSWORD
  rm -f "$TLS_DIR"/*.csr "$TLS_DIR"/*.ext "$TLS_DIR/client.key" "$TLS_DIR/broker.key"
  export -n CLIENT_KEY_PASSWORD BROKER_STORE_PASSWORD
  say "made a throwaway CA and certificates in $TLS_DIR"
}

write_secured_env() {
  local tmp="$SECURED_ENV.partial"
  ( umask 077 && cat >"$tmp" <<EOF
# Written by scripts/kafka.sh (KAFKA_SECURED=1) for the tests; deleted by stop.
KAFKA_SECURED_SASL_SSL_BOOTSTRAP=$HOST:$KAFKA_PORT
KAFKA_SECURED_SSL_BOOTSTRAP=$HOST:$KAFKA_SSL_PORT
KAFKA_SECURED_SASL_MECHANISM=SCRAM-SHA-512
KAFKA_SECURED_CA=$TLS_DIR/ca.pem
KAFKA_SECURED_ADMIN_USER=$ADMIN_USER
KAFKA_SECURED_ADMIN_PASSWORD=$ADMIN_PASSWORD
KAFKA_SECURED_PIPELINE_USER=$PIPELINE_USER
KAFKA_SECURED_PIPELINE_PASSWORD=$PIPELINE_PASSWORD
KAFKA_SECURED_CLIENT_CERT=$TLS_DIR/client.pem
KAFKA_SECURED_CLIENT_KEY=$TLS_DIR/client-key.pem
KAFKA_SECURED_CLIENT_KEY_PASSWORD=$CLIENT_KEY_PASSWORD
KAFKA_SECURED_CLIENT_PRINCIPAL=User:CN=$CLIENT_CN
KAFKA_SECURED_UNTRUSTED_CA=$TLS_DIR/untrusted-ca.pem
KAFKA_SECURED_UNTRUSTED_CLIENT_CERT=$TLS_DIR/untrusted-client.pem
KAFKA_SECURED_UNTRUSTED_CLIENT_KEY=$TLS_DIR/untrusted-client.key
EOF
  ) && mv "$tmp" "$SECURED_ENV"
}

# The admin credentials for the readiness probe, from secured.env.
load_admin_credentials() {
  [[ -f "$SECURED_ENV" ]] || die "no $SECURED_ENV: start the secured broker with 'start'"
  ADMIN_PASSWORD="$(sed -n 's/^KAFKA_SECURED_ADMIN_PASSWORD=//p' "$SECURED_ENV")"
  [[ -n "$ADMIN_PASSWORD" ]] || die "no admin password in $SECURED_ENV"
}

# ---------------------------------------------------------------- process control

launch_broker() {
  local -a opts
  mapfile -t opts < <(jvm_opts)
  local -a detach=()
  # Own session: a Ctrl-C or a CI step ending the caller's process group does
  # not take the broker down half-way; `stop` ends it by pid.
  command -v setsid >/dev/null 2>&1 && detach=(setsid)

  printf '\n===== kafka.sh: launching broker at %s =====\n' "$(date '+%Y-%m-%d %H:%M:%S')" >>"$BROKER_LOG"
  # The subshell execs (setsid execs too, as it is not a group leader here),
  # so $! is the java process itself.
  ( cd "$KAFKA_STATE_DIR" && exec ${detach[@]+"${detach[@]}"} nohup "$JAVA" "${opts[@]}" \
      -cp "$(lib_dir)/*" kafka.Kafka "$SERVER_PROPS" >>"$BROKER_LOG" 2>&1 </dev/null ) &
  local pid=$!
  printf '%s\n' "$pid" >"$PID_FILE"
  say "broker launched (pid $pid), log: $BROKER_LOG"
}

# Sends $2 (TERM or KILL) to broker pid $1 and waits for it to go away;
# escalates to SIGKILL after KAFKA_STOP_TIMEOUT seconds.
end_process() {
  local pid="$1" sig="${2:-TERM}" waited=0
  kill "-$sig" "$pid" 2>/dev/null || true
  if [[ "$sig" == TERM ]]; then
    while kill -0 "$pid" 2>/dev/null && (( waited < KAFKA_STOP_TIMEOUT * 10 )); do
      sleep 0.1; waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "broker (pid $pid) still alive after ${KAFKA_STOP_TIMEOUT}s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  waited=0
  while kill -0 "$pid" 2>/dev/null && (( waited < 100 )); do
    sleep 0.1; waited=$((waited + 1))
  done
  ! kill -0 "$pid" 2>/dev/null || die "broker (pid $pid) did not exit"
}

wait_ports_free() {
  local waited=0 p
  for p in $(broker_ports); do
    while port_open "$p"; do
      (( waited < 50 )) || die "port $p on $HOST is in use by another process"
      sleep 0.2; waited=$((waited + 1))
    done
  done
}

# The real client check: metadata over the PLAINTEXT listener with aiokafka,
# then FindCoordinator, which makes the broker create and load
# __consumer_offsets so the first consumer group of a test does not race it.
PROBE_PY='
import asyncio, os, sys, time

async def main(bootstrap, timeout, pid):
    from aiokafka.admin import AIOKafkaAdminClient
    deadline = time.monotonic() + timeout
    last = None
    while True:
        if pid:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                print("broker process exited", file=sys.stderr)
                return 2
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        secured = {}
        if os.environ.get("KAFKA_PROBE_CAFILE"):
            import ssl
            secured = dict(
                security_protocol="SASL_SSL",
                ssl_context=ssl.create_default_context(cafile=os.environ["KAFKA_PROBE_CAFILE"]),
                sasl_mechanism="SCRAM-SHA-512",
                sasl_plain_username=os.environ["KAFKA_PROBE_USER"],
                sasl_plain_password=os.environ["KAFKA_PROBE_PASSWORD"],
            )
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                    client_id="headwater-kafka-probe",
                                    request_timeout_ms=5000, **secured)
        try:
            async def probe():
                await admin.start()
                cluster = await admin.describe_cluster()
                if not cluster.get("brokers"):
                    raise RuntimeError("metadata lists no brokers")
                await admin.list_topics()
                await admin.find_coordinator("headwater-kafka-probe")
            await asyncio.wait_for(probe(), timeout=min(max(remaining, 1), 10))
            return 0
        except Exception as exc:  # not ready yet: refused, coordinator loading, ...
            last = exc
        finally:
            try:
                await admin.close()
            except Exception:
                pass
        await asyncio.sleep(0.5)
    print(f"no answer from Kafka at {bootstrap} within {timeout:.0f}s: {last!r}",
          file=sys.stderr)
    return 1

sys.exit(asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))))
'

client_probe() {
  # $1 timeout seconds, $2 broker pid (0: do not watch a process)
  if secured; then
    # as the admin over SASL_SSL; the password through the environment, not argv
    KAFKA_PROBE_CAFILE="$TLS_DIR/ca.pem" KAFKA_PROBE_USER="$ADMIN_USER" \
      KAFKA_PROBE_PASSWORD="$ADMIN_PASSWORD" "$PYTHON" -c "$PROBE_PY" "$HOST:$KAFKA_PORT" "$1" "$2"
    return
  fi
  env -u KAFKA_PROBE_CAFILE "$PYTHON" -c "$PROBE_PY" "$HOST:$KAFKA_PORT" "$1" "$2"
}

check_probe_deps() {
  need "$PYTHON" "set PYTHON to an interpreter with aiokafka"
  "$PYTHON" -c 'import aiokafka' 2>/dev/null ||
    die "$PYTHON cannot import aiokafka (needed for the readiness check); pip install aiokafka or set PYTHON"
}

# Waits until broker $1 accepts connections and answers a client, or fails.
wait_ready() {
  local pid="$1" started=$SECONDS deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  # Kafka opens the client port only once the broker is unfenced and RUNNING.
  until port_open "$KAFKA_PORT"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      show_log_tail
      rm -f "$PID_FILE"
      die "broker exited during startup"
    fi
    if (( SECONDS >= deadline )); then
      show_log_tail
      end_process "$pid" TERM
      rm -f "$PID_FILE"
      die "port $HOST:$KAFKA_PORT not open after ${KAFKA_START_TIMEOUT}s; broker stopped"
    fi
    sleep 0.2
  done
  local rc=0 left=$((deadline - SECONDS))
  (( left > 5 )) || left=5
  client_probe "$left" "$pid" || rc=$?
  if (( rc != 0 )); then
    show_log_tail
    if kill -0 "$pid" 2>/dev/null; then end_process "$pid" TERM; fi
    rm -f "$PID_FILE"
    die "broker did not answer a client within ${KAFKA_START_TIMEOUT}s; broker stopped"
  fi
  say "Kafka $(kafka_version) ready on $HOST:$KAFKA_PORT (pid $pid, $((SECONDS - started))s after launch)"
}

# ---------------------------------------------------------------- commands

cmd_start() {
  check_settings
  check_java
  check_probe_deps
  ensure_jars

  local pid
  if pid="$(running_pid)"; then
    if secured; then load_admin_credentials; fi
    if port_open "$KAFKA_PORT" && client_probe 10 "$pid" 2>/dev/null; then
      say "already running and ready on $HOST:$KAFKA_PORT (pid $pid)"
      print_addresses
      return 0
    fi
    say "broker (pid $pid) is running but not ready yet; waiting"
    wait_ready "$pid"
    print_addresses
    return 0
  fi
  rm -f "$PID_FILE"

  local p
  for p in $(broker_ports); do
    if secured; then
      ! port_open "$p" || die "port $p on $HOST is already in use by another process (set KAFKA_SECURED_PORT / KAFKA_SECURED_SSL_PORT / KAFKA_SECURED_CONTROLLER_PORT)"
    else
    ! port_open "$p" || die "port $p on $HOST is already in use by another process (set KAFKA_PORT / KAFKA_CONTROLLER_PORT)"
    fi
  done

  local started=$SECONDS
  mkdir -p "$KAFKA_STATE_DIR"
  rm -rf "$DATA_DIR"
  : >"$BROKER_LOG"
  if secured; then
    rm -f "$SECURED_ENV"
    make_pki
  fi
  write_config
  if secured; then chmod 600 "$SERVER_PROPS"; fi
  format_storage
  if secured; then write_secured_env; fi
  launch_broker
  wait_ready "$(read_pid)"
  say "start took $((SECONDS - started))s in total"
  if secured; then say "clients' certificates, keys and passwords: $SECURED_ENV"; fi
  print_addresses
}

cmd_stop() {
  check_settings
  local pid
  if pid="$(running_pid)"; then
    say "stopping broker (pid $pid)"
    end_process "$pid" TERM
    say "broker stopped"
  elif [[ -f "$PID_FILE" ]]; then
    say "broker not running (removing stale pid file)"
  else
    say "broker not running"
  fi
  rm -f "$PID_FILE" "$KAFKA_STATE_DIR/cluster.id"
  rm -rf "$DATA_DIR"
  if secured; then rm -rf "$TLS_DIR" "$SECURED_ENV" "$SERVER_PROPS"; fi
}

cmd_status() {
  check_settings
  local pid
  if ! pid="$(running_pid)"; then
    say "stopped (state dir $KAFKA_STATE_DIR)"
    return 3
  fi
  local listeners
  listeners="$(sed -n 's/^listeners=//p' "$SERVER_PROPS" 2>/dev/null || true)"
  if secured; then load_admin_credentials; fi
  if port_open "$KAFKA_PORT" && client_probe 5 "$pid" 2>/dev/null; then
    say "running and ready: pid $pid, listeners $listeners, log $BROKER_LOG"
    return 0
  fi
  say "running but not answering on $HOST:$KAFKA_PORT: pid $pid, listeners $listeners, log $BROKER_LOG"
  return 1
}

cmd_restart_broker() {
  local sig=TERM
  case "${1:-}" in
    "") ;;
    --kill) sig=KILL ;;
    *) die "restart-broker: unknown option '$1' (expected --kill)" ;;
  esac
  check_settings
  check_java
  check_probe_deps
  [[ -f "$DATA_DIR/meta.properties" && -f "$SERVER_PROPS" ]] ||
    die "no formatted broker data in $DATA_DIR; use 'start' first"
  if secured; then load_admin_credentials; fi
  ensure_jars

  local pid started=$SECONDS
  if pid="$(running_pid)"; then
    say "stopping broker (pid $pid, SIG$sig), keeping $DATA_DIR"
    end_process "$pid" "$sig"
  else
    say "broker was not running; starting it on the existing data"
  fi
  rm -f "$PID_FILE"
  wait_ports_free
  launch_broker
  wait_ready "$(read_pid)"
  say "restart took $((SECONDS - started))s in total"
}

# ---------------------------------------------------------------- cluster mode

# node_port I [controller]: the client (or controller) port of node I.
node_port() {
  local port=$((KAFKA_CLUSTER_PORT + 2 * ($1 - 1)))
  [[ "${2:-}" != controller ]] || port=$((port + 1))
  printf '%s\n' "$port"
}

# Points every per-broker variable (ports, state dir, files) at node $1 of the cluster.
select_node() {
  NODE="$1"
  KAFKA_PORT="$(node_port "$NODE")"
  KAFKA_CONTROLLER_PORT="$(node_port "$NODE" controller)"
  KAFKA_STATE_DIR="$KAFKA_CLUSTER_STATE_DIR/node-$NODE"
  PID_FILE="$KAFKA_STATE_DIR/kafka.pid"
  BROKER_LOG="$KAFKA_STATE_DIR/broker.log"
  FORMAT_LOG="$KAFKA_STATE_DIR/format.log"
  SERVER_PROPS="$KAFKA_STATE_DIR/server.properties"
  LOG4J_CONF="$KAFKA_STATE_DIR/log4j2.properties"
  DATA_DIR="$KAFKA_STATE_DIR/data"
}

cluster_bootstrap() {
  local i list=""
  for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
    list+="${list:+,}$HOST:$(node_port "$i")"
  done
  printf '%s\n' "$list"
}

# The node number argument of kill, stop-one and start-one.
node_arg() {
  [[ "${1:-}" =~ ^[1-9]$ ]] && (( $1 <= KAFKA_BROKERS )) ||
    die "expected a node number from 1 to $KAFKA_BROKERS, got '${1:-}'"
  printf '%s\n' "$1"
}

# The cluster check: every node registered, a topic replicated to all of them created (and
# deleted), the consumer offsets and transaction logs created, so that the first test does
# not wait for them.
CLUSTER_PROBE_PY='
import asyncio, sys, time, uuid

async def attempt(bootstrap, nodes):
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="headwater-kafka-probe",
                                request_timeout_ms=5000)
    try:
        await admin.start()
        registered = len((await admin.describe_cluster()).get("brokers", []))
        if registered != nodes:
            raise RuntimeError(f"{registered} of {nodes} brokers registered")
        topic = f"headwater-cluster-probe-{uuid.uuid4().hex[:8]}"
        response = await admin.create_topics([NewTopic(topic, nodes, nodes)])
        for name, code, *_ in response.topic_errors:
            if code:
                raise RuntimeError(f"creating {name} with {nodes} replicas: error code {code}")
        try:
            while True:
                described = await admin.describe_topics([topic])
                partitions = described[0].get("partitions") or []
                if partitions and all(len(p["isr"]) == nodes for p in partitions):
                    break
                await asyncio.sleep(0.2)
        finally:
            await admin.delete_topics([topic])
        await admin.find_coordinator("headwater-kafka-probe")
    finally:
        try:
            await admin.close()
        except Exception:
            pass
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, client_id="headwater-kafka-probe",
                                transactional_id="headwater-kafka-probe", request_timeout_ms=5000)
    try:
        await producer.start()
        await producer.begin_transaction()
        await producer.commit_transaction()
    finally:
        await producer.stop()

async def main(bootstrap, nodes, timeout):
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            await asyncio.wait_for(attempt(bootstrap, nodes), max(remaining, 1))
            return 0
        except Exception as exc:
            if time.monotonic() + 1 > deadline:
                print(f"the cluster at {bootstrap} is not ready within {timeout:.0f}s: {exc!r}",
                      file=sys.stderr)
                return 1
        await asyncio.sleep(0.5)

sys.exit(asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))))
'

cluster_probe() {
  # $1 timeout seconds
  env -u KAFKA_PROBE_CAFILE "$PYTHON" -c "$CLUSTER_PROBE_PY" "$(cluster_bootstrap)" "$KAFKA_BROKERS" "$1"
}

# Pids of the running nodes, one "NODE PID" a line.
running_nodes() {
  local i pid
  for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
    select_node "$i"
    if pid="$(running_pid)"; then printf '%s %s\n' "$i" "$pid"; fi
  done
}

# SIGTERM to every running node at once, then wait for each (SIGKILL after
# KAFKA_STOP_TIMEOUT seconds).
stop_nodes() {
  local node pid
  local -a pids=()
  while read -r node pid; do
    say "stopping node $node (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
  done < <(running_nodes)
  for pid in ${pids[@]+"${pids[@]}"}; do end_process "$pid" TERM; done
}

CLUSTER_STARTING=0
# On a failed start: stop every node that was launched (their logs stay).
cluster_start_failed() {
  if [[ "$CLUSTER_STARTING" == 1 ]]; then
    CLUSTER_STARTING=0
    say "stopping the cluster after the failed start (logs: $KAFKA_CLUSTER_STATE_DIR/node-*/broker.log)"
    stop_nodes || true
  fi
}

cmd_cluster_start() {
  check_settings
  check_java
  check_probe_deps
  ensure_jars

  local i pid running
  running="$(running_nodes | wc -l)"
  if (( running == KAFKA_BROKERS )); then
    for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
      select_node "$i"
      port_open "$KAFKA_PORT" || wait_ready "$(read_pid)"
    done
    cluster_probe "$KAFKA_START_TIMEOUT" || die "the cluster runs but is not ready"
    say "already running and ready: $(cluster_bootstrap)"
    cluster_bootstrap
    return 0
  fi
  if (( running > 0 )); then
    say "$running of $KAFKA_BROKERS nodes run: starting the others on their data"
    for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
      select_node "$i"
      running_pid >/dev/null || cmd_cluster_start_one "$i"
    done
    cluster_probe "$KAFKA_START_TIMEOUT" || die "the cluster runs but is not ready"
    cluster_bootstrap
    return 0
  fi

  for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
    select_node "$i"
    for pid in $(broker_ports); do
      ! port_open "$pid" || die "port $pid on $HOST is already in use by another process (set KAFKA_CLUSTER_PORT)"
    done
  done

  local started=$SECONDS cluster_id
  cluster_id="$(new_cluster_id)"
  mkdir -p "$KAFKA_CLUSTER_STATE_DIR"
  printf '%s\n' "$cluster_id" >"$KAFKA_CLUSTER_STATE_DIR/cluster.id"
  local -a formats=()
  for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
    select_node "$i"
    mkdir -p "$KAFKA_STATE_DIR"
    rm -rf "$DATA_DIR"
    rm -f "$PID_FILE"
    : >"$BROKER_LOG"
    write_config
    format_storage "$cluster_id" &  # one JVM each: in parallel
    formats+=($!)
  done
  for pid in "${formats[@]}"; do wait "$pid" || die "formatting a node's storage failed"; done

  CLUSTER_STARTING=1
  trap cluster_start_failed EXIT
  for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
    select_node "$i"
    launch_broker
  done
  # a node opens its client port once the quorum has a leader and it is unfenced
  for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
    select_node "$i"
    wait_ready "$(read_pid)"
  done
  if ! cluster_probe "$KAFKA_START_TIMEOUT"; then
    show_log_tail "$BROKER_LOG" 30
    die "the cluster did not become ready"
  fi
  CLUSTER_STARTING=0
  trap - EXIT
  say "cluster of $KAFKA_BROKERS nodes ready in $((SECONDS - started))s: $(cluster_bootstrap) (state: $KAFKA_CLUSTER_STATE_DIR)"
  cluster_bootstrap
}

cmd_cluster_stop() {
  check_settings
  # The data goes anyway, and the last nodes cannot finish a controlled shutdown once the
  # quorum is gone: SIGKILL after a short grace.
  local i KAFKA_STOP_TIMEOUT=5
  if [[ -z "$(running_nodes)" ]]; then say "cluster not running"; fi
  stop_nodes
  for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
    select_node "$i"
    rm -f "$PID_FILE" "$KAFKA_STATE_DIR/cluster.id"
    rm -rf "$DATA_DIR"
  done
  rm -f "$KAFKA_CLUSTER_STATE_DIR/cluster.id"
  say "cluster stopped"
}

cmd_cluster_status() {
  check_settings
  local i pid ready=0 running=0
  for (( i = 1; i <= KAFKA_BROKERS; i++ )); do
    select_node "$i"
    if ! pid="$(running_pid)"; then
      say "node $i: stopped (port $KAFKA_PORT, state dir $KAFKA_STATE_DIR)"
      continue
    fi
    running=$((running + 1))
    if port_open "$KAFKA_PORT" && client_probe 5 "$pid" 2>/dev/null; then
      ready=$((ready + 1))
      say "node $i: running and ready on $HOST:$KAFKA_PORT (pid $pid, log $BROKER_LOG)"
    else
      say "node $i: running but not answering on $HOST:$KAFKA_PORT (pid $pid, log $BROKER_LOG)"
    fi
  done
  (( running > 0 )) || return 3
  (( ready == KAFKA_BROKERS )) || return 1
}

# cmd_cluster_signal I KILL|TERM: end node I, keeping its data.
cmd_cluster_end_one() {
  local node sig="$2" pid
  check_settings
  node="$(node_arg "${1:-}")"
  select_node "$node"
  pid="$(running_pid)" || die "node $node is not running"
  say "stopping node $node (pid $pid, SIG$sig), keeping $DATA_DIR"
  end_process "$pid" "$sig"
  rm -f "$PID_FILE"
  say "node $node stopped"
}

cmd_cluster_start_one() {
  local node pid started=$SECONDS
  check_settings
  node="$(node_arg "${1:-}")"
  check_java
  check_probe_deps
  ensure_jars
  select_node "$node"
  [[ -f "$DATA_DIR/meta.properties" && -f "$SERVER_PROPS" ]] ||
    die "no formatted data for node $node in $DATA_DIR; start the cluster first"
  if pid="$(running_pid)"; then
    say "node $node already running (pid $pid)"
  else
    rm -f "$PID_FILE"
    wait_ports_free
    launch_broker
  fi
  wait_ready "$(read_pid)"
  say "node $node back in $((SECONDS - started))s"
}

cluster_main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    fetch) cmd_fetch "$@" ;;
    start) cmd_cluster_start "$@" ;;
    stop) cmd_cluster_stop "$@" ;;
    status) cmd_cluster_status "$@" ;;
    kill) cmd_cluster_end_one "${1:-}" KILL ;;
    stop-one) cmd_cluster_end_one "${1:-}" TERM ;;
    start-one) cmd_cluster_start_one "$@" ;;
    -h|--help|help) usage ;;
    *) usage; [[ -z "$cmd" ]] && die "missing command"; die "unknown command '$cmd' with KAFKA_BROKERS=$KAFKA_BROKERS" ;;
  esac
}

usage() {
  sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

main() {
  if clustered; then cluster_main "$@"; return; fi
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$cmd" in
    fetch) cmd_fetch "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    restart-broker) cmd_restart_broker "$@" ;;
    -h|--help|help) usage ;;
    *) usage; [[ -z "$cmd" ]] && die "missing command"; die "unknown command '$cmd'" ;;
  esac
}

main "$@"
