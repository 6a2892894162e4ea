#!/usr/bin/env bash
# kvembed's SQL regression tests (pg_regress, in the style of pgvector's
# test/sql + test/expected), against the running local cluster:
#
#   bash scripts/regress.sh [--pg N] [--accept] [TEST ...]
#
#   --pg N     PostgreSQL N's cluster instead of 18's (as scripts/pg.sh);
#   --accept   after a run, copy each test's actual output over its expected
#              file (tests/expected/TEST.out); review `git diff tests/expected`
#              before committing, an expected file pins behaviour;
#   TEST ...   run only these tests (names of tests/sql/*.sql, without .sql);
#              `install` always runs first, since it creates the extension.
#
# The tests are tests/sql/*.sql, their expected output tests/expected/*.out.
# They pin kvembed's user-visible SQL behaviour: the functions and their
# results (dimensions, NULL handling, batches), settings, errors and their
# SQLSTATEs, roles and privileges, generated columns and backfill, HNSW plans
# and nearest neighbours, layer calibration. Vectors are never printed, only
# dimensions and comparisons with a tolerance, so the same expected files hold
# on every CPU and on PostgreSQL 15 and 18; they do assume the default test
# model, SmolLM2-135M (576 dimensions, 30 layers), that scripts/pg.sh
# configures. A run takes about a minute on 2 cores.
#
# The cluster must be running with the current build installed
# (scripts/install-ext.sh, then scripts/pg.sh [--pg N] start). pg_regress
# (re)creates the database kvembed_regress itself, in UTF-8 with the C locale
# whatever the cluster's defaults (--encoding, --no-locale), so that sorting
# and messages do not depend on the machine (there is no --use-existing,
# which would make it use an existing database and create nothing). The
# roles and extra databases some tests need are named regress_kvembed_* and
# dropped at the end of each test (and before, after an interrupted run), so
# the suite can run again and again on the same cluster.
#
# Results go to .cache/regress/pgN (results/*.out, regression.diffs). On a
# failure the diffs are printed and the exit status is non-zero. pg_regress
# itself may be another PostgreSQL version's (kvembed_pg_regress, env.sh).
set -euo pipefail
if [ "${1:-}" = --pg ]; then export KVEMBED_PG=${2:?--pg needs a major version}; shift 2; fi
accept=0
if [ "${1:-}" = --accept ]; then accept=1; shift; fi
# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KVEMBED_ROOT"

die() { echo "regress.sh: error: $*" >&2; exit 1; }
note() { echo "regress.sh: $*" >&2; }

# The tests, in the order they run: install creates the extension and waits
# for the engine; calibration stores (then deletes) a calibration, so it runs
# last.
all_tests=(install api settings errors privileges generated_columns hnsw chunk metrics profiles vectorize calibration)
# A test file left out of the list would silently never run.
for f in tests/sql/*.sql; do
  t=$(basename "$f" .sql)
  [[ " ${all_tests[*]} " == *" $t "* ]] || die "tests/sql/$t.sql is not in all_tests (scripts/regress.sh)"
done

tests=(install)
if [ $# -gt 0 ]; then
  for t in "$@"; do
    t=${t%.sql}; t=${t#tests/sql/}
    [ -f "tests/sql/$t.sql" ] || die "no test tests/sql/$t.sql"
    [ "$t" = install ] || tests+=("$t")
  done
else
  tests=("${all_tests[@]}")
fi
for t in "${tests[@]}"; do
  if [ ! -f "tests/expected/$t.out" ]; then
    [ "$accept" = 1 ] || die "no expected output tests/expected/$t.out (run with --accept to create it, then review it)"
    : > "tests/expected/$t.out"   # pg_regress needs one to diff against
  fi
done

[ -x "$PG_CONFIG" ] || die "no PostgreSQL $KVEMBED_PG at $PG_CONFIG; run scripts/setup.sh${KVEMBED_PG:+ --pg $KVEMBED_PG} first"
"$PG_BINDIR/pg_isready" -q -h "$PGHOST" -p "$PGPORT" \
  || die "the PostgreSQL $KVEMBED_PG cluster is not running ($KVEMBED_PG_URL); start it with: bash scripts/pg.sh --pg $KVEMBED_PG start"
[ -e "$("$PG_CONFIG" --pkglibdir)/kvembed.so" ] \
  || die "kvembed is not installed into PostgreSQL $KVEMBED_PG; run scripts/install-ext.sh${KVEMBED_PG:+ --pg $KVEMBED_PG}"

regress=$(kvembed_pg_regress) || die "no working pg_regress (apt-get install postgresql-client)"

# A scratch directory in the (git-ignored) cache, writable by whoever runs
# this: pg_regress only connects as a client, the server writes nothing here.
out="$KVEMBED_ROOT/.cache/regress/pg$KVEMBED_PG"
rm -rf "$out"
mkdir -p "$out"
[ -w "$out" ] || die "cannot write to $out"

note "$("$PG_CONFIG" --version) at $KVEMBED_PG_URL; pg_regress: $regress; psql: $PG_BINDIR/psql"
started=$SECONDS
rc=0
# pg_regress drops the database without FORCE, which fails while a client or
# a kvembed queue worker (a run stopped before its tables were unvectorized)
# is connected to it.
"$PG_BINDIR/psql" -X -q -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -d postgres \
  -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS kvembed_regress WITH (FORCE)" \
  || die "could not drop the database kvembed_regress"
"$regress" \
  --bindir="$PG_BINDIR" \
  --host="$PGHOST" --port="$PGPORT" --user="$PGUSER" \
  --inputdir="$KVEMBED_ROOT/tests" \
  --outputdir="$out" \
  --dbname=kvembed_regress --encoding=UTF8 --no-locale \
  "${tests[@]}" || rc=$?
elapsed=$((SECONDS - started))

# pg_regress exits 1 when some test's output differs, 2 when it could not run.
if [ "$rc" != 0 ] && [ "$rc" != 1 ]; then
  die "pg_regress could not run the tests (exit $rc); see $out"
fi
if [ "$accept" = 1 ]; then
  for t in "${tests[@]}"; do
    if [ -f "$out/results/$t.out" ]; then cp "$out/results/$t.out" "tests/expected/$t.out"; fi
  done
  note "copied the results of ${tests[*]} to tests/expected/ (${elapsed}s): review them (git diff tests/expected) before committing"
  exit 0
fi
if [ "$rc" != 0 ]; then
  if [ -s "$out/regression.diffs" ]; then
    echo "==== regression.diffs ($out/regression.diffs) ====" >&2
    cat "$out/regression.diffs" >&2
  fi
  die "the regression tests failed after ${elapsed}s; results in $out"
fi
note "all ${#tests[@]} tests passed in ${elapsed}s on PostgreSQL $KVEMBED_PG"
