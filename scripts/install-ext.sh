#!/usr/bin/env bash
# Build kvembed and install it into the PostgreSQL named by $PG_CONFIG (the
# pgserver install in .venv by default, Debian's PostgreSQL N with --pg N;
# see scripts/env.sh):
#
#   1. the inference server `kvembed` (engine/server, package kvembed-server), copied to
#      $(pg_config --bindir)/kvembed, where the extension's background worker
#      looks for it;
#   2. the extension itself (the package `kvembed` at the repository root) with
#      `cargo pgrx install`: kvembed.so into $(pg_config --pkglibdir),
#      kvembed.control and kvembed--<version>.sql into $(pg_config --sharedir)/extension.
#
#   3. a check that the install script pgrx generated (the whole SQL surface:
#      sql/bootstrap.sql, the #[pg_extern] functions, sql/finalize.sql) is
#      the reviewed copy checked in as sql/kvembed--<version>.sql (source
#      line numbers left out); --update-sql rewrites that copy instead.
#
#   scripts/install-ext.sh [--pg N] [--update-sql]
#
# A running cluster keeps the old library loaded: `scripts/pg.sh restart`.
set -euo pipefail
if [ "${1:-}" = --pg ]; then export KVEMBED_PG=${2:?--pg needs a major version}; shift 2; fi
update_sql=0
if [ "${1:-}" = --update-sql ]; then update_sql=1; shift; fi
# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KVEMBED_ROOT"

die() { echo "install-ext.sh: error: $*" >&2; exit 1; }

[ -x "$PG_CONFIG" ] || die "no PostgreSQL install at $PG_CONFIG; run scripts/setup.sh first"
[ -f "$KVEMBED_XLOCALE_DIR/xlocale.h" ] || die "missing $KVEMBED_XLOCALE_DIR/xlocale.h; run scripts/setup.sh first"
command -v cargo >/dev/null || die "cargo not found; install Rust 1.95 (rustup) first"

bindir=$("$PG_CONFIG" --bindir)
if [ -n "${KVEMBED_ENGINE_BIN:-}" ]; then
  # A prebuilt engine, e.g. the CUDA one from scripts/build-cuda.sh
  # (KVEMBED_ENGINE_BIN=target/cuda/release/kvembed).
  [ -x "$KVEMBED_ENGINE_BIN" ] || die "KVEMBED_ENGINE_BIN=$KVEMBED_ENGINE_BIN is not an executable"
  engine_bin=$KVEMBED_ENGINE_BIN
else
  echo "install-ext.sh: building the inference server (cargo build --release -p kvembed-server --bin kvembed)"
  cargo build --release -p kvembed-server --bin kvembed
  engine_bin=${CARGO_TARGET_DIR:-$KVEMBED_ROOT/target}/release/kvembed
fi
# Copy then rename, so that a server still running the old binary keeps it.
install -m 755 "$engine_bin" "$bindir/.kvembed.new"
mv -f "$bindir/.kvembed.new" "$bindir/kvembed"
echo "install-ext.sh: installed $bindir/kvembed"

have=$(cargo pgrx --version 2>/dev/null | awk '{print $2}') || true
[ "$have" = "$KVEMBED_PGRX_VERSION" ] \
  || die "cargo-pgrx $KVEMBED_PGRX_VERSION is required (found: '${have:-none}'); run scripts/setup.sh"

if ! grep -qsF "pg$KVEMBED_PG = \"$PG_CONFIG\"" "$PGRX_HOME/config.toml"; then
  mapfile -t init_args < <(kvembed_pgrx_init_args)
  echo "install-ext.sh: cargo pgrx init ${init_args[*]} (PGRX_HOME=$PGRX_HOME)"
  cargo pgrx init "${init_args[@]}"
fi

echo "install-ext.sh: building and installing the extension for PostgreSQL $KVEMBED_PG (cargo pgrx install --release)"
cargo pgrx install --release -p kvembed --pg-config "$PG_CONFIG" \
  --no-default-features --features "pg$KVEMBED_PG"
pkglibdir=$("$PG_CONFIG" --pkglibdir)
sharedir=$("$PG_CONFIG" --sharedir)
# Install scripts of earlier releases, so that upgrades from them can be
# tested (CREATE EXTENSION ... VERSION 'old'; ALTER EXTENSION ... UPDATE).
for old in sql/releases/kvembed--*.sql; do
  [ -e "$old" ] || continue
  install -m 644 "$old" "$sharedir/extension/$(basename "$old")"
done
[ -f "$pkglibdir/kvembed.so" ] || die "cargo pgrx install finished but $pkglibdir/kvembed.so is missing"
[ -f "$sharedir/extension/kvembed.control" ] || die "cargo pgrx install finished but $sharedir/extension/kvembed.control is missing"
echo "install-ext.sh: installed $pkglibdir/kvembed.so and $sharedir/extension/kvembed.control"

# The SQL surface as installed, against the reviewed copy in sql/. pgrx
# writes "-- src/file.rs:LINE" above each object; the line numbers are left
# out so that the copy changes only when the SQL does. pgrx may also order
# objects that do not depend on each other differently from one build to
# the next, so the two are compared as sets of objects.
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
generated="$sharedir/extension/kvembed--$version.sql"
[ -f "$generated" ] || die "cargo pgrx install finished but $generated is missing"
reviewed="sql/kvembed--$version.sql"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sed -E 's/^(-- [^ ]+\.rs):[0-9]+$/\1/' "$generated" > "$work/generated.sql"
# One object ("connected objects" block) per paragraph, in a fixed order.
objects() {
  "${KVEMBED_PYTHON:-python3}" - "$1" <<'PY'
import sys
text = open(sys.argv[1]).read()
begin, end = "/* <begin connected objects> */", "/* </end connected objects> */"
head, *rest = text.split(begin)
blocks = sorted(begin + chunk.split(end)[0] + end for chunk in rest)
print(head.strip() + "\n\n" + "\n\n".join(blocks))
PY
}
if [ "$update_sql" = 1 ]; then
  cp "$work/generated.sql" "$reviewed"
  echo "install-ext.sh: wrote $reviewed"
else
  objects "$reviewed" > "$work/reviewed.objects"
  objects "$work/generated.sql" > "$work/generated.objects"
  if ! diff -u "$work/reviewed.objects" "$work/generated.objects" >&2; then
    die "the generated install script differs from $reviewed (above, object by object): review the change, then run scripts/install-ext.sh --update-sql and commit it"
  fi
  echo "install-ext.sh: the generated install script is $reviewed"
fi
