#!/usr/bin/env bash
# A real PostgreSQL server for Headwater's tests, without Docker and without root.
#
# The server runs from a throwaway data directory on 127.0.0.1 only, with a
# superuser 'headwater' (password 'headwater', scram-sha-256 over TCP) and a
# database 'headwater'. It uses an installed PostgreSQL server when there is
# one (pg_config --bindir, then the newest /usr/lib/postgresql/*/bin);
# otherwise `fetch` downloads the Debian packages with `apt-get download` (no
# root, nothing installed system-wide) and unpacks them into PG_HOME.
# PostgreSQL refuses to run as root: as root, the server runs as the
# 'postgres' system user (or 'nobody' when there is none).
#
# Usage: scripts/postgres.sh COMMAND
#
#   fetch    make sure initdb, pg_ctl and postgres are available: an installed
#            server, or Debian packages unpacked into PG_HOME (no-op when cached)
#   start    create a fresh data directory and start the server; waits until it
#            answers (no-op if already running); prints the connection URL
#            (postgresql://headwater:headwater@127.0.0.1:PORT/headwater) on stdout
#   stop     stop the server (pg_ctl stop -m fast, then SIGKILL) and delete its data
#   status   report whether the server runs and answers
#            (exit 0 ready, 1 running but not answering, 3 stopped)
#   url      print the connection URL (whether the server runs or not)
#
# Environment (defaults in brackets):
#   PG_HOME              cache of downloaded packages [${XDG_CACHE_HOME:-$HOME/.cache}/headwater-postgres]
#   PG_STATE_DIR         data, socket, logs [/tmp/headwater-postgres-$PG_PORT]
#   PG_PORT              TCP port on 127.0.0.1 [25432], below Linux's ephemeral
#                        range (32768-60999), where a client socket of another
#                        program (even one in TIME-WAIT) could hold it: start
#                        retries a port held so until PG_START_TIMEOUT, and says so
#   PG_START_TIMEOUT     seconds to wait for readiness [60]
#   PG_STOP_TIMEOUT      seconds between 'pg_ctl stop -m fast' and SIGKILL [30]
#   PG_VERSION           major version to download, e.g. 15 [the one the
#                        'postgresql' package depends on]; when set, an installed
#                        server of another major version is not used
#   PG_FORCE_DOWNLOAD    1: ignore installed servers, use (or fetch) the
#                        downloaded packages in PG_HOME [0]
#
# Messages go to stderr; every failure exits non-zero.
#
# Files in PG_STATE_DIR: postgres.log (server output, kept after stop for
# post-mortems), initdb.log, data/ (the data directory, postmaster.pid
# inside), run/ (the unix socket) and, when root runs downloaded binaries that
# the server user cannot read in PG_HOME, install/ (hard-linked copy of them).
# PG_HOME holds postgresql-MAJOR/root/ (the unpacked packages) and apt.log.

set -euo pipefail

PG_HOME="${PG_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/headwater-postgres}"
PG_PORT="${PG_PORT:-25432}"
PG_STATE_DIR="${PG_STATE_DIR:-/tmp/headwater-postgres-$PG_PORT}"
PG_START_TIMEOUT="${PG_START_TIMEOUT:-60}"
PG_STOP_TIMEOUT="${PG_STOP_TIMEOUT:-30}"
PG_VERSION="${PG_VERSION:-}"
PG_FORCE_DOWNLOAD="${PG_FORCE_DOWNLOAD:-0}"
HOST=127.0.0.1
DB_USER=headwater
DB_PASSWORD=headwater
DB_NAME=headwater
[[ "$PG_STATE_DIR" == /* ]] || PG_STATE_DIR="$PWD/$PG_STATE_DIR"
[[ "$PG_HOME" == /* ]] || PG_HOME="$PWD/$PG_HOME"
PG_STATE_DIR="${PG_STATE_DIR%/}"

DATA_DIR="$PG_STATE_DIR/data"
SOCKET_DIR="$PG_STATE_DIR/run"
INSTALL_COPY="$PG_STATE_DIR/install"
SERVER_LOG="$PG_STATE_DIR/postgres.log"
INITDB_LOG="$PG_STATE_DIR/initdb.log"
PID_FILE="$DATA_DIR/postmaster.pid"

# Set by resolve_install: the directory with initdb/pg_ctl/postgres, the root
# of an unpacked package tree (empty for an installed server) and the library
# path the unpacked binaries need (empty for an installed server).
BINDIR=""
PG_ROOT=""
LIBPATH=""

# Set by server_identity: who runs initdb/pg_ctl/postgres (empty: the caller).
RUN_USER=""
RUN_GROUP=""

# ---------------------------------------------------------------- helpers

say() { printf 'postgres.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not on PATH${2:+ ($2)}"
}

check_settings() {
  local v
  for v in PG_PORT PG_START_TIMEOUT PG_STOP_TIMEOUT; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a number, got '${!v}'"
  done
  (( PG_PORT >= 1 && PG_PORT <= 65535 )) || die "PG_PORT must be a TCP port, got '$PG_PORT'"
  [[ -z "$PG_VERSION" || "$PG_VERSION" =~ ^[0-9]+$ ]] ||
    die "PG_VERSION must be a major version like 15, got '$PG_VERSION'"
  [[ "$PG_STATE_DIR" != "" && "$PG_STATE_DIR" != "/" ]] || die "PG_STATE_DIR must not be /"
  # A unix socket path is limited to 107 bytes.
  local socket="$SOCKET_DIR/.s.PGSQL.$PG_PORT"
  (( ${#socket} <= 107 )) || die "PG_STATE_DIR is too long for a unix socket path ($socket)"
}

url() {
  printf 'postgresql://%s:%s@%s:%s/%s\n' "$DB_USER" "$DB_PASSWORD" "$HOST" "$PG_PORT" "$DB_NAME"
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

show_log_tail() {
  local file="${1:-$SERVER_LOG}" n="${2:-40}"
  if [[ -s "$file" ]]; then
    say "last $n lines of $file:"
    tail -n "$n" "$file" | sed 's/^/  | /' >&2
  else
    say "($file is empty or missing)"
  fi
}

# ---------------------------------------------------------------- finding a server

has_server() { [[ -x "$1/initdb" && -x "$1/pg_ctl" && -x "$1/postgres" ]]; }

# Major version of the server in bindir $1 (run with library path $2).
server_major() {
  local line
  line="$(LD_LIBRARY_PATH="${2:-${LD_LIBRARY_PATH:-}}" "$1/postgres" --version 2>/dev/null)" || return 1
  # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)" -> 15 (9.6.24 -> 9)
  sed -n 's/^[^0-9]*\([0-9][0-9]*\).*/\1/p' <<<"$line" | head -n 1
}

# Prints the bindir of an installed server: pg_config --bindir, then the
# newest /usr/lib/postgresql/*/bin. Honours PG_VERSION when set.
system_bindir() {
  local dir
  local -a candidates=()
  if command -v pg_config >/dev/null 2>&1; then
    dir="$(pg_config --bindir 2>/dev/null || true)"
    [[ -n "$dir" ]] && candidates+=("$dir")
  fi
  if compgen -G '/usr/lib/postgresql/*/bin' >/dev/null; then
    while IFS= read -r dir; do
      candidates+=("$dir")
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r)
  fi
  for dir in ${candidates[@]+"${candidates[@]}"}; do
    has_server "$dir" || continue
    if [[ -n "$PG_VERSION" && "$(server_major "$dir" || true)" != "$PG_VERSION" ]]; then
      continue
    fi
    printf '%s\n' "$dir"
    return 0
  done
  return 1
}

# The library path for an unpacked package tree $1: every directory with
# shared libraries, except PostgreSQL's own module directory.
tree_libpath() {
  local root="$1" dirs=()
  local d
  for d in "$root/lib" "$root/usr/lib"; do
    [[ -d "$d" ]] && dirs+=("$d")
  done
  (( ${#dirs[@]} )) || return 0
  find "${dirs[@]}" -name '*.so*' \( -type f -o -type l \) -not -path '*/postgresql/*' \
      -printf '%h\n' 2>/dev/null | sort -u | paste -sd: -
}

cache_dir() { printf '%s/postgresql-%s\n' "$PG_HOME" "$1"; }

# Prints the cache dir of a complete download (PG_VERSION's, or the newest).
cached_download() {
  local dir
  if [[ -n "$PG_VERSION" ]]; then
    dir="$(cache_dir "$PG_VERSION")"
    [[ -f "$dir/.complete" ]] && { printf '%s\n' "$dir"; return 0; }
    return 1
  fi
  compgen -G "$PG_HOME/postgresql-*/.complete" >/dev/null || return 1
  dir="$(printf '%s\n' "$PG_HOME"/postgresql-*/.complete | sort -V -r | head -n 1)"
  printf '%s\n' "${dir%/.complete}"
}

# Sets BINDIR, PG_ROOT and LIBPATH from an unpacked tree $1 (a root/ dir).
use_tree() {
  local root="$1" bin
  bin="$(compgen -G "$root/usr/lib/postgresql/*/bin" | sort -V -r | head -n 1 || true)"
  [[ -n "$bin" ]] && has_server "$bin" || return 1
  BINDIR="$bin"
  PG_ROOT="$root"
  LIBPATH="$(tree_libpath "$root")"
}

# Sets BINDIR (and PG_ROOT/LIBPATH for downloaded binaries); fails when there
# is no server yet. A hard-linked copy in the state dir (see ensure_readable)
# is preferred, as it is what a running server was started from.
resolve_install() {
  local dir
  if [[ "$PG_FORCE_DOWNLOAD" != 1 ]] && dir="$(system_bindir)"; then
    BINDIR="$dir"; PG_ROOT=""; LIBPATH=""
    return 0
  fi
  dir="$(cached_download)" || return 1
  if [[ -f "$INSTALL_COPY/.source" && "$(cat "$INSTALL_COPY/.source")" == "$dir/root" ]] &&
      use_tree "$INSTALL_COPY"; then
    return 0
  fi
  use_tree "$dir/root"
}

ensure_install() {
  resolve_install || { cmd_fetch; resolve_install; } || die "no PostgreSQL server found after fetch"
}

# ---------------------------------------------------------------- fetch

is_installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == *" installed" ]]
}

# The major version to download: what the 'postgresql' package depends on,
# else the newest postgresql-NN the package lists know.
default_major() {
  local v
  v="$(apt-cache depends postgresql 2>/dev/null |
       sed -n 's/^ *|\{0,1\}Depends: postgresql-\([0-9][0-9]*\)$/\1/p' | head -n 1)"
  if [[ -z "$v" ]]; then
    v="$(apt-cache search --names-only '^postgresql-[0-9]+$' 2>/dev/null |
         sed -n 's/^postgresql-\([0-9][0-9]*\) .*/\1/p' | sort -n | tail -n 1)"
  fi
  [[ -n "$v" ]] || return 1
  printf '%s\n' "$v"
}

# The lib* packages that the packages "$@" need, directly or through other
# such libraries, and that are not installed.
missing_lib_packages() {
  local -A seen=()
  local -a queue=("$@")
  local pkg dep
  for pkg in "$@"; do seen[$pkg]=1; done
  while (( ${#queue[@]} )); do
    pkg="${queue[0]}"
    queue=("${queue[@]:1}")
    while IFS= read -r dep; do
      [[ -n "$dep" && -z "${seen[$dep]:-}" ]] || continue
      seen[$dep]=1
      is_installed "$dep" && continue
      printf '%s\n' "$dep"
      queue+=("$dep")
    done < <(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
               --no-replaces --no-enhances "$pkg" 2>/dev/null |
             sed -n 's/^ *|\{0,1\}\(Pre\)\{0,1\}Depends: \(lib[^ <>]*\)$/\2/p' | sed 's/:any$//')
  done
}

# Prints what ldd reports as missing for the files "$@" (library path $LDPATH).
ldd_missing() {
  local f
  for f in "$@"; do
    [[ -f "$f" && ! -L "$f" ]] || continue
    LD_LIBRARY_PATH="$LDPATH" ldd "$f" 2>&1 | grep 'not found' | sed "s|^[[:space:]]*|${f##*/}: |" || true
  done
}

download_server() {
  need apt-get "Debian/Ubuntu's apt, to download PostgreSQL packages"
  need apt-cache
  need dpkg-deb
  need dpkg-query
  need ldd

  local major
  major="${PG_VERSION:-$(default_major || true)}"
  [[ -n "$major" ]] ||
    die "no postgresql-NN package in the apt package lists (they may be empty: 'apt-get update' needs root); set PG_VERSION or install PostgreSQL"

  local dest
  dest="$(cache_dir "$major")"
  mkdir -p "$PG_HOME"
  # Several jobs may share one cache: serialise fetches.
  exec 8>"$PG_HOME/.fetch.lock"
  if command -v flock >/dev/null 2>&1; then
    flock 8
  fi
  if [[ -f "$dest/.complete" ]]; then
    say "PostgreSQL $major packages already unpacked in $dest"
    return 0
  fi

  local started=$SECONDS work="$dest.partial.$$"
  rm -rf "$work"
  mkdir -p "$work/debs" "$work/root"
  local -a pkgs=("postgresql-$major" "postgresql-client-$major" libpq5)
  local -a libs=()
  mapfile -t libs < <(missing_lib_packages "${pkgs[@]}")
  pkgs+=(${libs[@]+"${libs[@]}"})

  say "downloading ${pkgs[*]} into $dest (apt log: $PG_HOME/apt.log)"
  # apt-get download writes into the current directory; as root it warns that
  # its '_apt' sandbox user cannot write there, which is harmless.
  if ! (cd "$work/debs" && apt-get download "${pkgs[@]}") >"$PG_HOME/apt.log" 2>&1; then
    show_log_tail "$PG_HOME/apt.log" 20
    rm -rf "$work"
    die "apt-get download failed (are the apt package lists present? 'apt-get update' needs root)"
  fi

  local deb
  for deb in "$work"/debs/*.deb; do
    dpkg-deb -x "$deb" "$work/root" || { rm -rf "$work"; die "dpkg-deb -x $deb failed"; }
  done
  rm -rf "$work/debs"

  local bin="$work/root/usr/lib/postgresql/$major/bin"
  has_server "$bin" || { rm -rf "$work"; die "the packages have no initdb/pg_ctl/postgres in ${bin#"$work/"}"; }

  # Whatever the binaries still miss (libraries pulled in another way than
  # through Depends, or installed in a too old version) is fatal for bin/,
  # a warning for optional modules.
  local LDPATH missing
  LDPATH="$(tree_libpath "$work/root")"
  missing="$(ldd_missing "$bin"/*)"
  if [[ -n "$missing" ]]; then
    printf '%s\n' "$missing" | sed 's/^/  | /' >&2
    rm -rf "$work"
    die "the unpacked binaries miss the libraries above (find their packages with 'apt-file search')"
  fi
  missing="$(ldd_missing "$work/root/usr/lib/postgresql/$major/lib/"*.so)"
  if [[ -n "$missing" ]]; then
    say "warning: some optional server modules miss libraries:"
    printf '%s\n' "$missing" | sed 's/^/  | /' >&2
  fi

  local got
  if ! got="$(LD_LIBRARY_PATH="$LDPATH" "$bin/postgres" --version 2>&1)"; then
    printf '%s\n' "$got" >&2
    rm -rf "$work"
    die "'postgres --version' failed on the unpacked binaries"
  fi

  rm -rf "$dest"
  mv "$work" "$dest"
  touch "$dest/.complete"
  say "unpacked $got ($(du -sh "$dest" | cut -f1)) in $((SECONDS - started))s"
}

cmd_fetch() {
  check_settings
  local dir
  if [[ "$PG_FORCE_DOWNLOAD" != 1 ]] && dir="$(system_bindir)"; then
    say "using the installed PostgreSQL $(server_major "$dir" || echo '?') in $dir"
    return 0
  fi
  if dir="$(cached_download)"; then
    say "using the PostgreSQL $(basename "$dir" | sed 's/^postgresql-//') packages unpacked in $dir"
    return 0
  fi
  [[ "$PG_FORCE_DOWNLOAD" == 1 ]] && say "PG_FORCE_DOWNLOAD=1: not using an installed server"
  download_server
}

# ---------------------------------------------------------------- running as another user

# As root, the server runs as 'postgres' (or 'nobody'): PostgreSQL refuses root.
server_identity() {
  [[ "$(id -u)" == 0 ]] || return 0
  if id -u postgres >/dev/null 2>&1; then
    RUN_USER=postgres
  elif id -u nobody >/dev/null 2>&1; then
    RUN_USER=nobody
  else
    die "running as root, but there is neither a 'postgres' nor a 'nobody' user to run the server"
  fi
  RUN_GROUP="$(id -gn "$RUN_USER")"
  command -v setpriv >/dev/null 2>&1 || need runuser "to run the server as $RUN_USER"
}

# Runs "$@" as the server user (root: RUN_USER; else the caller), with the
# library path of downloaded binaries, from PG_STATE_DIR (a cwd of root's the
# server user cannot read makes initdb fail).
as_server_user() {
  local -a argv=(env)
  [[ -n "$LIBPATH" ]] && argv+=("LD_LIBRARY_PATH=$LIBPATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
  argv+=("$@")
  if [[ -z "$RUN_USER" ]]; then
    (cd "$PG_STATE_DIR" && exec "${argv[@]}")
  elif command -v setpriv >/dev/null 2>&1; then
    (cd "$PG_STATE_DIR" &&
      exec setpriv --reuid="$RUN_USER" --regid="$RUN_GROUP" --init-groups -- "${argv[@]}")
  else
    (cd "$PG_STATE_DIR" && exec runuser -u "$RUN_USER" -- "${argv[@]}")
  fi
}

# Runs client program $1 of BINDIR (psql, pg_isready) as the caller.
client() {
  local prog="$1"
  shift
  local -a argv=(env)
  [[ -n "$LIBPATH" ]] && argv+=("LD_LIBRARY_PATH=$LIBPATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
  "${argv[@]}" "$BINDIR/$prog" "$@"
}

# As root with downloaded binaries in a PG_HOME the server user cannot read
# (root's home is usually private), the server runs from a hard-linked (or,
# across file systems, copied) tree in the state dir.
ensure_readable() {
  [[ -n "$RUN_USER" && -n "$PG_ROOT" ]] || return 0
  as_server_user test -x "$BINDIR/postgres" -a -r "$BINDIR/postgres" 2>/dev/null && return 0
  local source="$PG_ROOT"
  [[ "$source" == "$INSTALL_COPY" ]] && source="$(cat "$INSTALL_COPY/.source")"
  say "$RUN_USER cannot read $source; linking the binaries into $INSTALL_COPY"
  rm -rf "$INSTALL_COPY"
  cp -al "$source" "$INSTALL_COPY" 2>/dev/null || {
    rm -rf "$INSTALL_COPY"
    cp -a "$source" "$INSTALL_COPY"
  }
  printf '%s\n' "$source" >"$INSTALL_COPY/.source"
  use_tree "$INSTALL_COPY" || die "copying $source to $INSTALL_COPY failed"
  as_server_user test -x "$BINDIR/postgres" -a -r "$BINDIR/postgres" ||
    die "$RUN_USER cannot run $BINDIR/postgres"
}

# ---------------------------------------------------------------- process control

# Prints the postmaster's pid when it runs from this state dir, or fails.
running_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid args
  pid="$(head -n 1 "$PID_FILE" 2>/dev/null | tr -dc '0-9')"
  [[ -n "$pid" ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a recycled pid belonging to some other process.
  if [[ -r "/proc/$pid/cmdline" ]]; then
    args="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
  else
    args="$(ps -p "$pid" -o args= 2>/dev/null || true)"
  fi
  [[ "$args" == *postgres* && "$args" == *"$DATA_DIR"* ]] || return 1
  printf '%s\n' "$pid"
}

# True when the server accepts connections on 127.0.0.1:PG_PORT.
answers() {
  if [[ -n "$BINDIR" && -x "$BINDIR/pg_isready" ]]; then
    client pg_isready -q -h "$HOST" -p "$PG_PORT" -d postgres -U "$DB_USER" -t "${1:-3}"
  else
    port_open "$PG_PORT"
  fi
}

# Waits until the postmaster $1 answers on TCP, or fails.
wait_answers() {
  local pid="$1" deadline=$((SECONDS + PG_START_TIMEOUT))
  until answers 2; do
    kill -0 "$pid" 2>/dev/null || { show_log_tail; die "the server exited during startup"; }
    if (( SECONDS >= deadline )); then
      show_log_tail
      stop_server
      die "the server did not answer on $HOST:$PG_PORT within ${PG_START_TIMEOUT}s; stopped it"
    fi
    sleep 0.2
  done
}

# Stops the server of this state dir, if it runs: pg_ctl stop -m fast, then
# SIGKILL to its process group after PG_STOP_TIMEOUT seconds.
stop_server() {
  local pid
  pid="$(running_pid)" || return 0
  local shm
  shm="$(sed -n '7p' "$PID_FILE" 2>/dev/null | awk '{print $2}')"
  say "stopping the server (pid $pid)"
  local deadline=$((SECONDS + PG_STOP_TIMEOUT))
  if [[ -n "$BINDIR" ]]; then
    as_server_user "$BINDIR/pg_ctl" stop -D "$DATA_DIR" -m fast -w -t "$PG_STOP_TIMEOUT" -s ||
      true
  else
    kill -INT "$pid" 2>/dev/null || true  # SIGINT is PostgreSQL's fast shutdown
  fi
  while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do
    sleep 0.1
  done
  local waited
  if kill -0 "$pid" 2>/dev/null; then
    say "the server (pid $pid) is still running after ${PG_STOP_TIMEOUT}s, sending SIGKILL"
    # Each server process leads a process group of its own (archive or
    # restore commands run in it): kill the postmaster's and its children's.
    local -a pids=("$pid")
    local child
    while IFS= read -r child; do
      [[ -n "$child" ]] && pids+=("$child")
    done < <(ps -o pid= --ppid "$pid" 2>/dev/null | tr -d ' ' || true)
    # Dynamic shared memory the server mapped (removed below, as a killed
    # server cannot remove it, and its next start would not know it).
    local -a segments=()
    mapfile -t segments < <(for child in "${pids[@]}"; do
        awk '$6 ~ "^/dev/shm/PostgreSQL[.]" {print $6}' "/proc/$child/maps" 2>/dev/null
      done | sort -u)
    for child in "${pids[@]}"; do
      kill -KILL -- "-$child" 2>/dev/null || kill -KILL "$child" 2>/dev/null || true
    done
    waited=0
    while kill -0 "$pid" 2>/dev/null && (( waited < 100 )); do
      sleep 0.1; waited=$((waited + 1))
    done
    ! kill -0 "$pid" 2>/dev/null || die "the server (pid $pid) did not exit"
    # A killed postmaster leaves its System V shared memory segment behind.
    if [[ "$shm" =~ ^[0-9]+$ ]] && command -v ipcrm >/dev/null 2>&1; then
      ipcrm -m "$shm" 2>/dev/null || true
    fi
    for child in "${pids[@]}"; do
      while kill -0 "$child" 2>/dev/null && (( waited < 150 )); do
        sleep 0.1; waited=$((waited + 1))
      done
    done
    (( ${#segments[@]} == 0 )) || rm -f "${segments[@]}"
  fi
  say "server stopped"
}

prepare_state_dir() {
  mkdir -p "$PG_STATE_DIR"
  if [[ -n "$RUN_USER" ]]; then
    chown "$RUN_USER:$RUN_GROUP" "$PG_STATE_DIR"
  else
    [[ -O "$PG_STATE_DIR" ]] || die "$PG_STATE_DIR belongs to another user; remove it or set PG_STATE_DIR"
  fi
  chmod 700 "$PG_STATE_DIR"
  rm -rf "$DATA_DIR" "$SOCKET_DIR"
  mkdir "$SOCKET_DIR"
  : >"$SERVER_LOG"
  : >"$INITDB_LOG"
  if [[ -n "$RUN_USER" ]]; then
    chown "$RUN_USER:$RUN_GROUP" "$SOCKET_DIR" "$SERVER_LOG" "$INITDB_LOG"
  fi
  chmod 700 "$SOCKET_DIR"
}

init_data_dir() {
  local pwfile="$PG_STATE_DIR/.pwfile"
  ( umask 077; printf '%s\n' "$DB_PASSWORD" >"$pwfile" )
  [[ -n "$RUN_USER" ]] && chown "$RUN_USER:$RUN_GROUP" "$pwfile"
  local rc=0
  as_server_user "$BINDIR/initdb" -D "$DATA_DIR" -U "$DB_USER" --pwfile="$pwfile" \
      --auth-host=scram-sha-256 --auth-local=trust --encoding=UTF8 --locale=C \
      >"$INITDB_LOG" 2>&1 </dev/null || rc=$?
  rm -f "$pwfile"
  if (( rc != 0 )); then
    show_log_tail "$INITDB_LOG" 30
    die "initdb failed"
  fi

  cat >>"$DATA_DIR/postgresql.conf" <<EOF

# ---- added by scripts/postgres.sh for Headwater's tests
listen_addresses = '$HOST'
port = $PG_PORT
unix_socket_directories = '$SOCKET_DIR'
max_connections = 200
password_encryption = 'scram-sha-256'
# logical decoding, for the change-data-capture source
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
EOF
}

# pg_ctl start, waiting until the server accepts connections. Should PG_PORT
# lie in Linux's ephemeral range (32768-60999), an outgoing connection of
# another program can hold 127.0.0.1:PG_PORT as its local address (also for
# the 60 s of its TIME-WAIT), and the bind fails although nothing listens
# there. That case is retried until PG_START_TIMEOUT.
launch_server() {
  local deadline=$((SECONDS + PG_START_TIMEOUT)) offset left out taken told="" hint=""
  while :; do
    offset="$(wc -c <"$SERVER_LOG")"
    left=$((deadline - SECONDS))
    (( left > 5 )) || left=5
    if out="$(as_server_user "$BINDIR/pg_ctl" start -D "$DATA_DIR" -l "$SERVER_LOG" \
        -w -t "$left" -s </dev/null 2>&1)"; then
      return 0
    fi
    taken=""
    if ! running_pid >/dev/null && ! port_open "$PG_PORT" &&
        tail -c "+$((offset + 1))" "$SERVER_LOG" | grep -q 'could not bind.*Address already in use'; then
      taken=1
    fi
    if [[ -n "$taken" ]] && (( SECONDS < deadline )); then
      if [[ -z "$told" ]]; then
        say "port $PG_PORT is held by another program's outgoing connection (see 'ss -tan'); retrying for up to ${PG_START_TIMEOUT}s"
        told=1
      fi
      sleep 2
      continue
    fi
    if [[ -n "$taken" ]]; then
      hint="; port $PG_PORT stayed taken: choose a PG_PORT outside the ephemeral range"
      hint+=" ($(tr -s '\t ' - </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768-60999))"
    fi
    break
  done
  [[ -z "$out" ]] || printf '%s\n' "$out" >&2
  show_log_tail "$SERVER_LOG" 20
  stop_server
  die "pg_ctl start failed$hint"
}

# ---------------------------------------------------------------- commands

cmd_start() {
  check_settings
  server_identity
  ensure_install

  local pid
  if pid="$(running_pid)"; then
    if answers 3; then
      say "already running and ready on $HOST:$PG_PORT (pid $pid)"
    else
      say "the server (pid $pid) is running but not answering yet; waiting"
      wait_answers "$pid"
    fi
    url
    return 0
  fi

  ! port_open "$PG_PORT" ||
    die "port $PG_PORT on $HOST is already in use by another process (set PG_PORT)"

  local started=$SECONDS major
  prepare_state_dir
  ensure_readable
  major="$(server_major "$BINDIR" "$LIBPATH")" || die "cannot run $BINDIR/postgres --version"
  init_data_dir

  launch_server
  pid="$(running_pid)" || { show_log_tail; die "the server is not running after pg_ctl start"; }
  wait_answers "$pid"

  # Before PostgreSQL 14 initdb stored the password as md5, which
  # scram-sha-256 authentication cannot use: set it again.
  local sql="CREATE DATABASE $DB_NAME;"
  (( major >= 14 )) || sql="ALTER ROLE $DB_USER PASSWORD '$DB_PASSWORD'; $sql"
  if ! client psql -X -q -v ON_ERROR_STOP=1 -h "$SOCKET_DIR" -p "$PG_PORT" -U "$DB_USER" \
      -d postgres -c "$sql" </dev/null >/dev/null; then
    show_log_tail
    stop_server
    die "creating the database '$DB_NAME' failed; stopped the server"
  fi
  say "PostgreSQL $major ready on $HOST:$PG_PORT (pid $pid${RUN_USER:+, user $RUN_USER}, log $SERVER_LOG) in $((SECONDS - started))s"
  url
}

cmd_stop() {
  check_settings
  server_identity
  resolve_install || true
  if running_pid >/dev/null; then
    stop_server
  else
    say "server not running"
  fi
  rm -rf "$DATA_DIR" "$SOCKET_DIR" "$INSTALL_COPY"
}

cmd_status() {
  check_settings
  resolve_install || true
  local pid
  if ! pid="$(running_pid)"; then
    say "stopped (state dir $PG_STATE_DIR)"
    return 3
  fi
  if answers 3; then
    say "running and ready: pid $pid, $HOST:$PG_PORT, log $SERVER_LOG"
    return 0
  fi
  say "running but not answering on $HOST:$PG_PORT: pid $pid, log $SERVER_LOG"
  return 1
}

cmd_url() {
  check_settings
  url
}

usage() {
  sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

main() {
  local cmd="${1:-}"
  [[ $# -gt 0 ]] && shift
  [[ $# -eq 0 || "$cmd" == help || "$cmd" == -h || "$cmd" == --help ]] ||
    die "'$cmd' takes no arguments"
  case "$cmd" in
    fetch) cmd_fetch ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    url) cmd_url ;;
    -h|--help|help) usage ;;
    *) usage; [[ -z "$cmd" ]] && die "missing command"; die "unknown command '$cmd'" ;;
  esac
}

main "$@"
