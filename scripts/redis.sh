#!/usr/bin/env bash
# A real Redis server for Headwater's tests, without Docker and without root.
#
# The server runs from a throwaway state directory on 127.0.0.1 only, in
# protected mode, with the password 'headwater' (requirepass) and an
# append-only file fsynced every second. It uses an installed redis-server
# when there is one on PATH; otherwise `fetch` downloads the Debian packages
# with `apt-get download` (no root, nothing installed system-wide) and unpacks
# them into REDIS_HOME, with the libraries they need that the machine lacks.
# As root, the server still runs as the unprivileged user 'nobody'.
#
# Usage: scripts/redis.sh COMMAND
#
#   fetch    make sure redis-server and redis-cli are available: installed ones,
#            or Debian packages unpacked into REDIS_HOME (no-op when cached)
#   start    start a server on fresh data; waits until it answers PING (no-op
#            if already running); prints the connection URL
#            (redis://:headwater@127.0.0.1:PORT/0) on stdout
#   stop     stop the server (SHUTDOWN NOSAVE, then SIGKILL) and delete its
#            data (the log stays)
#   status   report whether the server runs and answers
#            (exit 0 ready, 1 running but not answering, 3 stopped)
#   url      print the connection URL (whether the server runs or not)
#
# Environment (defaults in brackets):
#   REDIS_HOME             cache of downloaded packages [${XDG_CACHE_HOME:-$HOME/.cache}/headwater-redis]
#   REDIS_STATE_DIR        configuration, data, log [/tmp/headwater-redis-$REDIS_PORT]
#   REDIS_PORT             TCP port on 127.0.0.1 [26379], below Linux's ephemeral
#                          range (32768-60999), so that no outgoing connection of
#                          another program can hold it
#   REDIS_START_TIMEOUT    seconds to wait for readiness [30]
#   REDIS_STOP_TIMEOUT     seconds between SHUTDOWN NOSAVE (or SIGTERM) and SIGKILL [30]
#   REDIS_FORCE_DOWNLOAD   1: ignore an installed server, use (or fetch) the
#                          downloaded packages in REDIS_HOME [0]
#
# Messages go to stderr; every failure exits non-zero.
#
# Files in REDIS_STATE_DIR: redis.log (server output, kept after stop for
# post-mortems), redis.conf, redis.pid (the server's pid, recorded when it is
# launched), data/ (the append-only file) and, when root runs downloaded
# binaries that 'nobody' cannot read in REDIS_HOME, install/ (a hard-linked
# copy of them). REDIS_HOME holds redis-VERSION/root/ (the unpacked packages)
# and apt.log.

set -euo pipefail

REDIS_HOME="${REDIS_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/headwater-redis}"
REDIS_PORT="${REDIS_PORT:-26379}"
REDIS_STATE_DIR="${REDIS_STATE_DIR:-/tmp/headwater-redis-$REDIS_PORT}"
REDIS_START_TIMEOUT="${REDIS_START_TIMEOUT:-30}"
REDIS_STOP_TIMEOUT="${REDIS_STOP_TIMEOUT:-30}"
REDIS_FORCE_DOWNLOAD="${REDIS_FORCE_DOWNLOAD:-0}"
HOST=127.0.0.1
PASSWORD=headwater
DATABASE=0
[[ "$REDIS_STATE_DIR" == /* ]] || REDIS_STATE_DIR="$PWD/$REDIS_STATE_DIR"
[[ "$REDIS_HOME" == /* ]] || REDIS_HOME="$PWD/$REDIS_HOME"
REDIS_STATE_DIR="${REDIS_STATE_DIR%/}"

DATA_DIR="$REDIS_STATE_DIR/data"
INSTALL_COPY="$REDIS_STATE_DIR/install"
SERVER_LOG="$REDIS_STATE_DIR/redis.log"
CONF="$REDIS_STATE_DIR/redis.conf"
PID_FILE="$REDIS_STATE_DIR/redis.pid"

# Set by resolve_install: the directory with redis-server and redis-cli, the
# root of an unpacked package tree (empty for an installed server) and the
# library path the unpacked binaries need (empty for an installed server).
BINDIR=""
REDIS_ROOT=""
LIBPATH=""

# Set by server_identity: who runs the server (empty: the caller).
RUN_USER=""
RUN_GROUP=""

# ---------------------------------------------------------------- helpers

say() { printf 'redis.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not on PATH${2:+ ($2)}"
}

check_settings() {
  local v
  for v in REDIS_PORT REDIS_START_TIMEOUT REDIS_STOP_TIMEOUT; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a number, got '${!v}'"
  done
  (( REDIS_PORT >= 1 && REDIS_PORT <= 65535 )) ||
    die "REDIS_PORT must be a TCP port, got '$REDIS_PORT'"
  [[ "$REDIS_STATE_DIR" != "" && "$REDIS_STATE_DIR" != "/" ]] ||
    die "REDIS_STATE_DIR must not be /"
  # redis.conf cannot quote a path with a newline or a double quote in it.
  [[ "$REDIS_STATE_DIR" != *[$'\n"']* ]] ||
    die "REDIS_STATE_DIR must not contain a newline or a double quote"
}

url() {
  printf 'redis://:%s@%s:%s/%s\n' "$PASSWORD" "$HOST" "$REDIS_PORT" "$DATABASE"
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

# True when process $1 exists and has not exited: a server whose launching
# script has ended is reparented, and stays a zombie (for kill -0 alive)
# until its new parent reaps it, which may take seconds.
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  # /proc/PID/stat: "PID (COMM) STATE ...", COMM may hold spaces and parentheses
  stat="${stat##*) }"
  [[ "${stat%% *}" != Z ]]
}

show_log_tail() {
  local file="${1:-$SERVER_LOG}" n="${2:-30}"
  if [[ -s "$file" ]]; then
    say "last $n lines of $file:"
    tail -n "$n" "$file" | sed 's/^/  | /' >&2
  else
    say "($file is empty or missing)"
  fi
}

# ---------------------------------------------------------------- finding a server

has_server() { [[ -x "$1/redis-server" && -x "$1/redis-cli" ]]; }

# Prints the directory of an installed redis-server (with redis-cli beside it
# or on PATH: the directory of redis-server is what counts).
system_bindir() {
  local server cli
  server="$(command -v redis-server 2>/dev/null)" || return 1
  cli="$(command -v redis-cli 2>/dev/null)" || return 1
  [[ "$(dirname "$server")" == "$(dirname "$cli")" ]] || return 1
  dirname "$server"
}

# "Redis server v=7.0.15 sha=..." -> 7.0.15, for the server in $1 (library path $2).
server_version() {
  local line
  line="$(LD_LIBRARY_PATH="${2:-${LD_LIBRARY_PATH:-}}" "$1/redis-server" --version 2>/dev/null)" ||
    return 1
  sed -n 's/.* v=\([0-9][0-9.]*\).*/\1/p' <<<"$line" | head -n 1
}

# The library path for an unpacked package tree $1: every directory with
# shared libraries in it.
tree_libpath() {
  local root="$1" dirs=()
  local d
  for d in "$root/lib" "$root/usr/lib"; do
    [[ -d "$d" ]] && dirs+=("$d")
  done
  (( ${#dirs[@]} )) || return 0
  find "${dirs[@]}" -name '*.so*' \( -type f -o -type l \) -printf '%h\n' 2>/dev/null |
    sort -u | paste -sd: -
}

# Prints the cache dir of the newest complete download.
cached_download() {
  compgen -G "$REDIS_HOME/redis-*/.complete" >/dev/null || return 1
  local dir
  dir="$(printf '%s\n' "$REDIS_HOME"/redis-*/.complete | sort -V -r | head -n 1)"
  printf '%s\n' "${dir%/.complete}"
}

# Sets BINDIR, REDIS_ROOT and LIBPATH from an unpacked tree $1 (a root/ dir).
use_tree() {
  local root="$1"
  has_server "$root/usr/bin" || return 1
  BINDIR="$root/usr/bin"
  REDIS_ROOT="$root"
  LIBPATH="$(tree_libpath "$root")"
}

# Sets BINDIR (and REDIS_ROOT/LIBPATH for downloaded binaries); fails when
# there is no server yet. A hard-linked copy in the state dir (see
# ensure_readable) is preferred, as it is what a running server was started from.
resolve_install() {
  local dir
  if [[ "$REDIS_FORCE_DOWNLOAD" != 1 ]] && dir="$(system_bindir)"; then
    BINDIR="$dir"; REDIS_ROOT=""; LIBPATH=""
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
  resolve_install || { cmd_fetch; resolve_install; } || die "no Redis server found after fetch"
}

# ---------------------------------------------------------------- fetch

is_installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == *" installed" ]]
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

# The sonames ldd reports as missing for the files "$@" (library path $LDPATH).
ldd_missing_sonames() {
  local f
  for f in "$@"; do
    [[ -f "$f" && ! -L "$f" ]] || continue
    LD_LIBRARY_PATH="$LDPATH" ldd "$f" 2>&1 | sed -n 's/^[[:space:]]*\([^[:space:]]*\) => not found.*/\1/p'
  done | sort -u
}

# The Debian package that ships soname $1, by the library packaging policy
# (libfoo.so.1 -> libfoo1, libfoo2.so.3 -> libfoo2-3), if apt knows it.
package_of_soname() {
  local soname="$1" name version pkg
  [[ "$soname" =~ ^(lib[^/]*)\.so\.([0-9]+)(\..*)?$ ]] || return 1
  name="${BASH_REMATCH[1]}"
  version="${BASH_REMATCH[2]}"
  if [[ "$name" == *[0-9] ]]; then
    pkg="$name-$version"
  else
    pkg="$name$version"
  fi
  pkg="$(tr '[:upper:]_' '[:lower:]-' <<<"$pkg")"
  apt-cache show --no-all-versions "$pkg" >/dev/null 2>&1 || return 1
  printf '%s\n' "$pkg"
}

# Downloads the packages "$@" into $WORK/debs and unpacks them into $WORK/root.
download_and_unpack() {
  say "downloading $* (apt log: $REDIS_HOME/apt.log)"
  # apt-get download writes into the current directory; as root it warns that
  # its '_apt' sandbox user cannot write there, which is harmless.
  if ! (cd "$WORK/debs" && apt-get download "$@") >>"$REDIS_HOME/apt.log" 2>&1; then
    show_log_tail "$REDIS_HOME/apt.log" 20
    rm -rf "$WORK"
    die "apt-get download $* failed (are the apt package lists present? 'apt-get update' needs root)"
  fi
  local deb
  for deb in "$WORK"/debs/*.deb; do
    dpkg-deb -x "$deb" "$WORK/root" || { rm -rf "$WORK"; die "dpkg-deb -x $deb failed"; }
  done
  rm -f "$WORK"/debs/*.deb
}

download_server() {
  need apt-get "Debian/Ubuntu's apt, to download the Redis packages (or install redis-server)"
  need apt-cache
  need dpkg-deb
  need dpkg-query
  need ldd

  mkdir -p "$REDIS_HOME"
  # Several jobs may share one cache: serialise fetches.
  exec 8>"$REDIS_HOME/.fetch.lock"
  if command -v flock >/dev/null 2>&1; then
    flock 8
  fi
  local dir
  if dir="$(cached_download)"; then
    say "Redis packages already unpacked in $dir"
    return 0
  fi

  local started=$SECONDS
  local WORK="$REDIS_HOME/partial.$$"
  rm -rf "$WORK"
  mkdir -p "$WORK/debs" "$WORK/root"
  : >"$REDIS_HOME/apt.log"
  apt-cache show --no-all-versions redis-server >/dev/null 2>&1 ||
    { rm -rf "$WORK"; die "apt knows no 'redis-server' package (the package lists may be empty: 'apt-get update' needs root); install Redis instead"; }
  local -a pkgs=(redis-server redis-tools)
  local -a libs=()
  mapfile -t libs < <(missing_lib_packages "${pkgs[@]}")
  pkgs+=(${libs[@]+"${libs[@]}"})
  download_and_unpack "${pkgs[@]}"

  local bin="$WORK/root/usr/bin"
  has_server "$bin" ||
    { rm -rf "$WORK"; die "the packages have no usr/bin/redis-server and usr/bin/redis-cli"; }

  # Libraries still missing (pulled in another way than through Depends, or
  # installed in a too old version): fetch the package each soname belongs
  # to by Debian's naming policy, a few rounds deep.
  local LDPATH round soname pkg
  local -a sonames=() extra=() unknown=()
  local -A tried=()
  for round in 1 2 3; do
    LDPATH="$(tree_libpath "$WORK/root")"
    mapfile -t sonames < <(ldd_missing_sonames "$bin/redis-check-rdb" "$bin/redis-server" "$bin/redis-cli")
    (( ${#sonames[@]} )) || break
    extra=(); unknown=()
    for soname in "${sonames[@]}"; do
      if pkg="$(package_of_soname "$soname")" && [[ -z "${tried[$pkg]:-}" ]]; then
        tried[$pkg]=1
        extra+=("$pkg")
      else
        unknown+=("$soname")
      fi
    done
    if (( ${#unknown[@]} )) || (( ${#extra[@]} == 0 )); then
      rm -rf "$WORK"
      die "the unpacked binaries miss ${unknown[*]:-${sonames[*]}} and no package for them was found (find one with 'apt-file search', or install redis-server)"
    fi
    say "ldd reports ${sonames[*]} missing (round $round)"
    download_and_unpack "${extra[@]}"
  done
  LDPATH="$(tree_libpath "$WORK/root")"
  mapfile -t sonames < <(ldd_missing_sonames "$bin/redis-check-rdb" "$bin/redis-server" "$bin/redis-cli")
  if (( ${#sonames[@]} )); then
    rm -rf "$WORK"
    die "the unpacked binaries still miss ${sonames[*]} (find their packages with 'apt-file search')"
  fi

  local version
  if ! version="$(server_version "$bin" "$LDPATH")" || [[ -z "$version" ]]; then
    LD_LIBRARY_PATH="$LDPATH" "$bin/redis-server" --version >&2 || true
    rm -rf "$WORK"
    die "'redis-server --version' failed on the unpacked binaries"
  fi
  rmdir "$WORK/debs" 2>/dev/null || true

  local dest="$REDIS_HOME/redis-$version"
  rm -rf "$dest"
  mv "$WORK" "$dest"
  touch "$dest/.complete"
  say "unpacked Redis $version ($(du -sh "$dest" | cut -f1)) into $dest in $((SECONDS - started))s"
}

cmd_fetch() {
  check_settings
  local dir
  if [[ "$REDIS_FORCE_DOWNLOAD" != 1 ]] && dir="$(system_bindir)"; then
    say "using the installed Redis $(server_version "$dir" || echo '?') in $dir"
    return 0
  fi
  if dir="$(cached_download)"; then
    say "using the Redis packages unpacked in $dir"
    return 0
  fi
  [[ "$REDIS_FORCE_DOWNLOAD" == 1 ]] && say "REDIS_FORCE_DOWNLOAD=1: not using an installed server"
  download_server
}

# ---------------------------------------------------------------- running as another user

# As root, the server runs as 'nobody': it needs no privilege, so it gets none.
server_identity() {
  [[ "$(id -u)" == 0 ]] || return 0
  id -u nobody >/dev/null 2>&1 ||
    die "running as root, but there is no 'nobody' user to run the server as"
  RUN_USER=nobody
  RUN_GROUP="$(id -gn "$RUN_USER")"
  command -v setpriv >/dev/null 2>&1 || need runuser "to run the server as $RUN_USER"
}

# Runs "$@" as the server user (root: RUN_USER; else the caller), with the
# library path of downloaded binaries, from REDIS_STATE_DIR.
as_server_user() {
  local -a argv=(env)
  [[ -n "$LIBPATH" ]] && argv+=("LD_LIBRARY_PATH=$LIBPATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
  argv+=("$@")
  if [[ -z "$RUN_USER" ]]; then
    (cd "$REDIS_STATE_DIR" && exec "${argv[@]}")
  elif command -v setpriv >/dev/null 2>&1; then
    (cd "$REDIS_STATE_DIR" &&
      exec setpriv --reuid="$RUN_USER" --regid="$RUN_GROUP" --init-groups -- "${argv[@]}")
  else
    (cd "$REDIS_STATE_DIR" && exec runuser -u "$RUN_USER" -- "${argv[@]}")
  fi
}

# redis-cli of BINDIR as the caller, authenticated (the password goes through
# the environment, not the command line), given CLI_TIMEOUT seconds at most
# (a stopped or hung server accepts the connection but never answers).
CLI_TIMEOUT=5
cli() {
  local -a argv=(env "REDISCLI_AUTH=$PASSWORD")
  [[ -n "$LIBPATH" ]] && argv+=("LD_LIBRARY_PATH=$LIBPATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
  if command -v timeout >/dev/null 2>&1; then
    argv=(timeout "$CLI_TIMEOUT" "${argv[@]}")
  fi
  "${argv[@]}" "$BINDIR/redis-cli" -h "$HOST" -p "$REDIS_PORT" "$@" </dev/null
}

# As root with downloaded binaries in a REDIS_HOME the server user cannot
# read (root's home is usually private), the server runs from a hard-linked
# (or, across file systems, copied) tree in the state dir.
ensure_readable() {
  [[ -n "$RUN_USER" && -n "$REDIS_ROOT" ]] || return 0
  as_server_user test -x "$BINDIR/redis-server" -a -r "$BINDIR/redis-server" 2>/dev/null &&
    return 0
  local source="$REDIS_ROOT"
  [[ "$source" == "$INSTALL_COPY" ]] && source="$(cat "$INSTALL_COPY/.source")"
  say "$RUN_USER cannot read $source; linking the binaries into $INSTALL_COPY"
  rm -rf "$INSTALL_COPY"
  cp -al "$source" "$INSTALL_COPY" 2>/dev/null || {
    rm -rf "$INSTALL_COPY"
    cp -a "$source" "$INSTALL_COPY"
  }
  printf '%s\n' "$source" >"$INSTALL_COPY/.source"
  use_tree "$INSTALL_COPY" || die "copying $source to $INSTALL_COPY failed"
  as_server_user test -x "$BINDIR/redis-server" -a -r "$BINDIR/redis-server" ||
    die "$RUN_USER cannot run $BINDIR/redis-server"
}

# ---------------------------------------------------------------- process control

# Prints the server's pid when it runs from this state dir, or fails.
running_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid args
  pid="$(head -n 1 "$PID_FILE" 2>/dev/null | tr -dc '0-9')"
  [[ -n "$pid" ]] || return 1
  alive "$pid" || return 1
  # Guard against a recycled pid belonging to some other process. Redis
  # replaces its command line with "redis-server 127.0.0.1:PORT" once started.
  if [[ -r "/proc/$pid/cmdline" ]]; then
    args="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
  else
    args="$(ps -p "$pid" -o args= 2>/dev/null || true)"
  fi
  [[ "$args" == *redis-server* ]] || return 1
  [[ "$args" == *"$CONF"* || "$args" == *"$HOST:$REDIS_PORT"* ]] || return 1
  printf '%s\n' "$pid"
}

# True when the server answers PING with PONG (not LOADING, not an auth error).
answers() {
  if [[ -n "$BINDIR" ]]; then
    [[ "$(cli ping 2>/dev/null)" == PONG ]]
  else
    port_open "$REDIS_PORT"
  fi
}

# Waits until the server $1 answers, or fails.
wait_answers() {
  local pid="$1" deadline=$((SECONDS + REDIS_START_TIMEOUT))
  until answers; do
    if ! alive "$pid"; then
      show_log_tail
      local hint=""
      grep -q 'Address already in use' "$SERVER_LOG" 2>/dev/null &&
        hint=": port $REDIS_PORT is taken (set REDIS_PORT)"
      die "the server exited during startup$hint"
    fi
    if (( SECONDS >= deadline )); then
      show_log_tail
      stop_server
      die "the server did not answer on $HOST:$REDIS_PORT within ${REDIS_START_TIMEOUT}s; stopped it"
    fi
    sleep 0.1
  done
}

# Stops the server of this state dir, if it runs: SHUTDOWN NOSAVE (SIGTERM
# without redis-cli), then SIGKILL to it and its children (an AOF rewrite)
# after REDIS_STOP_TIMEOUT seconds.
stop_server() {
  local pid
  pid="$(running_pid)" || return 0
  say "stopping the server (pid $pid)"
  local deadline=$((SECONDS + REDIS_STOP_TIMEOUT))
  # The connection drops as the server exits: redis-cli's status says nothing.
  if [[ -z "$BINDIR" ]] || ! CLI_TIMEOUT=2 cli shutdown nosave >/dev/null 2>&1; then
    kill -TERM "$pid" 2>/dev/null || true
  fi
  while alive "$pid" && (( SECONDS < deadline )); do
    sleep 0.1
  done
  if alive "$pid"; then
    say "the server (pid $pid) is still running after ${REDIS_STOP_TIMEOUT}s, sending SIGKILL"
    local -a pids=("$pid")
    local child waited=0
    while IFS= read -r child; do
      [[ -n "$child" ]] && pids+=("$child")
    done < <(ps -o pid= --ppid "$pid" 2>/dev/null | tr -d ' ' || true)
    for child in "${pids[@]}"; do
      kill -KILL "$child" 2>/dev/null || true
    done
    while alive "$pid" && (( waited < 100 )); do
      sleep 0.1; waited=$((waited + 1))
    done
    ! alive "$pid" || die "the server (pid $pid) did not exit"
  fi
  rm -f "$PID_FILE"
  say "server stopped"
}

prepare_state_dir() {
  mkdir -p "$REDIS_STATE_DIR"
  if [[ -n "$RUN_USER" ]]; then
    chown "$RUN_USER:$RUN_GROUP" "$REDIS_STATE_DIR"
  else
    [[ -O "$REDIS_STATE_DIR" ]] ||
      die "$REDIS_STATE_DIR belongs to another user; remove it or set REDIS_STATE_DIR"
  fi
  chmod 700 "$REDIS_STATE_DIR"
  rm -rf "$DATA_DIR"
  rm -f "$PID_FILE"
  mkdir "$DATA_DIR"
  : >"$SERVER_LOG"
  (umask 077; write_config >"$CONF")
  if [[ -n "$RUN_USER" ]]; then
    chown "$RUN_USER:$RUN_GROUP" "$DATA_DIR" "$SERVER_LOG" "$CONF"
  fi
  chmod 700 "$DATA_DIR"
}

write_config() {
  cat <<EOF
# Generated by scripts/redis.sh; rewritten on every start.
bind $HOST
port $REDIS_PORT
protected-mode yes
requirepass $PASSWORD
daemonize no
supervised no
dir "$DATA_DIR"
logfile "$SERVER_LOG"
loglevel notice
databases 16
maxclients 1000
always-show-logo no
# Durable enough for tests: every write is in the append-only file within a second.
appendonly yes
appendfsync everysec
save ""
EOF
}

# Starts redis-server in the background (its own session: a Ctrl-C or a CI
# step ending the caller's process group does not take it down) and records
# its pid. The subshell execs (setsid too, as it is no group leader here), so
# $! is the server process itself.
launch_server() {
  local -a detach=()
  command -v setsid >/dev/null 2>&1 && detach=(setsid)
  local -a argv=(env)
  [[ -n "$LIBPATH" ]] && argv+=("LD_LIBRARY_PATH=$LIBPATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
  argv+=("$BINDIR/redis-server" "$CONF")
  if [[ -n "$RUN_USER" ]]; then
    if command -v setpriv >/dev/null 2>&1; then
      argv=(setpriv --reuid="$RUN_USER" --regid="$RUN_GROUP" --init-groups -- "${argv[@]}")
    else
      argv=(runuser -u "$RUN_USER" -- "${argv[@]}")
    fi
  fi
  (cd "$REDIS_STATE_DIR" &&
    exec ${detach[@]+"${detach[@]}"} "${argv[@]}" >>"$SERVER_LOG" 2>&1 </dev/null) &
  local pid=$!
  printf '%s\n' "$pid" >"$PID_FILE"
}

# ---------------------------------------------------------------- commands

cmd_start() {
  check_settings
  server_identity
  ensure_install

  local pid
  if pid="$(running_pid)"; then
    if answers; then
      say "already running and ready on $HOST:$REDIS_PORT (pid $pid)"
    else
      say "the server (pid $pid) is running but not answering yet; waiting"
      wait_answers "$pid"
    fi
    url
    return 0
  fi

  ! port_open "$REDIS_PORT" ||
    die "port $REDIS_PORT on $HOST is already in use by another process (set REDIS_PORT)"

  local started=$SECONDS version
  version="$(server_version "$BINDIR" "$LIBPATH")" || die "cannot run $BINDIR/redis-server --version"
  prepare_state_dir
  ensure_readable
  launch_server
  pid="$(cat "$PID_FILE")"
  wait_answers "$pid"
  pid="$(running_pid)" || { show_log_tail; die "the server is not running after it answered"; }
  say "Redis $version ready on $HOST:$REDIS_PORT (pid $pid${RUN_USER:+, user $RUN_USER}, log $SERVER_LOG) in $((SECONDS - started))s"
  url
}

cmd_stop() {
  check_settings
  resolve_install || true
  if running_pid >/dev/null; then
    stop_server
  else
    say "server not running"
  fi
  rm -rf "$DATA_DIR" "$INSTALL_COPY"
  rm -f "$PID_FILE" "$CONF"
}

cmd_status() {
  check_settings
  resolve_install || true
  local pid
  if ! pid="$(running_pid)"; then
    say "stopped (state dir $REDIS_STATE_DIR)"
    return 3
  fi
  if answers; then
    say "running and ready: pid $pid, $HOST:$REDIS_PORT, log $SERVER_LOG"
    return 0
  fi
  say "running but not answering on $HOST:$REDIS_PORT: pid $pid, log $SERVER_LOG"
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
