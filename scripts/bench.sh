#!/usr/bin/env bash
# Throughput, overhead, SQL paths, memory and calibration in one run, on one
# machine, side by side; writes docs/BENCHMARKS.md and
# docs/img/bench-throughput.svg. Absolute times vary from machine to machine
# and run to run; the ratios, measured side by side, are the point.
#
#   scripts/bench.sh [options]          (or: make bench ARGS="options")
#
#   --models LIST        smollm2,qwen05,gemma3,qwen15 (default: smollm2,qwen05); the
#                        SQL part uses the first one
#   --repeat N           timed runs per figure (default 5)
#   --threads T          compute threads for every runtime (default: all cores)
#   --shapes LIST        batch shapes, texts x tokens (default 1x32,64x32,16x512,2x4096)
#   --peers LIST         llama,torch (default both; empty = the engine alone)
#   --cpu-level L        native (default) or x86-64-v3: caps every runtime to
#                        AVX2 + FMA, so that an AVX-512/AMX machine measures the
#                        path most CPUs take: the engine through KVEMBED_CPU,
#                        PyTorch through ATEN_CPU_CAPABILITY=avx2 (and MKL's and
#                        oneDNN's own caps), llama.cpp
#                        compiled without AVX-512 and AVX-VNNI (into its own
#                        directory of the venv). The report says which level ran;
#                        --out then defaults to docs/BENCHMARKS-x86-64-v3.md
#   --rows N             rows of the SQL part (default 2000)
#   --sql-repeat N       timed runs per SQL figure (default 3)
#   --sessions LIST      pgbench client counts (default 1,4,8)
#   --pgbench-seconds S  length of one pgbench run (default 20)
#   --mem-sessions N     sessions of the memory check (default 16)
#   --calib-rows N       rows for kv_select_layers (default 1000)
#   --no-sql / --sql-only / --no-peers-part
#   --quick              a short smoke run (small shapes and scales, 1 repeat)
#   --out FILE           the report (default docs/BENCHMARKS.md; its plot goes to
#                        img/bench-throughput.svg beside it, -x86-64-v3.svg at that level)
#   --results DIR        where the raw results go (default .cache/bench)
#   --report-only        rewrite the report from the last run's results
#   --install-ext        run scripts/install-ext.sh first (otherwise the
#                        installed extension is used as it is)
#   --omp-wait-policy P  passive (default), active or default: OMP_WAIT_POLICY of
#                        the peers, whose OpenMP threads otherwise spin at every
#                        barrier, which costs them up to 10x on a machine that is
#                        not idle
#   --wait-idle S        wait up to S seconds for the machine to become idle
#                        (other processes using < 15 % of the CPU) before measuring
#
# Setup (idempotent, skipped when already done): for the SQL part,
# scripts/setup.sh when the project's PostgreSQL is not installed yet; a Python venv .venv-bench
# with the pins of scripts/requirements-bench.txt and llama-cpp-python compiled
# from source for this CPU (every SIMD extension it has but AMX, see
# llama_cmake_args below); the release build of the engine.
# A peer that cannot be installed or run is reported as such in the report,
# with its error; no figure is ever made up.
#
# The SQL part runs on its own throwaway cluster (.cache/pg-bench, port 54339;
# override with KVEMBED_BENCH_PG_DIR / KVEMBED_BENCH_PGPORT), so that it
# neither disturbs nor is disturbed by the development cluster of
# scripts/pg.sh. It is started at the beginning and stopped at the end.
# Raw results stay in .cache/bench/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmdline="scripts/bench.sh${*:+ $*}"

cpu_level=native; out_given=0
models="smollm2,qwen05"; repeat=5; threads=""; shapes="1x32,64x32,16x512,2x4096"; peers="llama,torch"
rows=2000; sql_repeat=3; sessions="1,4,8"; pgbench_s=20; mem_sessions=16; calib_rows=1000
do_peers=1; do_sql=1; report_only=0; install_ext=0; wait_idle=0; omp_wait_policy=passive; results=""; out="$root/docs/BENCHMARKS.md"
while [ $# -gt 0 ]; do
  case "$1" in
    --models) models=$2; shift ;;
    --repeat) repeat=$2; shift ;;
    --threads) threads=$2; shift ;;
    --shapes) shapes=$2; shift ;;
    --peers) peers=$2; shift ;;
    --cpu-level) cpu_level=$2; shift ;;
    --rows) rows=$2; shift ;;
    --sql-repeat) sql_repeat=$2; shift ;;
    --sessions) sessions=$2; shift ;;
    --pgbench-seconds) pgbench_s=$2; shift ;;
    --mem-sessions) mem_sessions=$2; shift ;;
    --calib-rows) calib_rows=$2; shift ;;
    --no-sql) do_sql=0 ;;
    --sql-only) do_peers=0 ;;
    --no-peers-part) do_peers=0 ;;
    --quick) repeat=1; sql_repeat=1; shapes="1x32,8x32,2x256"; rows=64; pgbench_s=3; mem_sessions=4; calib_rows=32 ;;
    --out) out=$(realpath -m "$2"); out_given=1; shift ;;
    --report-only) report_only=1 ;;
    --results) results=$(realpath -m "$2"); shift ;;
    --install-ext) install_ext=1 ;;
    --wait-idle) wait_idle=$2; shift ;;
    --omp-wait-policy) omp_wait_policy=$2; shift ;;
    -h|--help) sed -n '2,54p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# The benchmark's own cluster: set before env.sh, which derives PGHOST etc.
export KVEMBED_PG_DIR="${KVEMBED_BENCH_PG_DIR:-$root/.cache/pg-bench}"
export KVEMBED_PGPORT="${KVEMBED_BENCH_PGPORT:-54339}"
# shellcheck source=scripts/env.sh
source "$root/scripts/env.sh"
cd "$KVEMBED_ROOT"

say() { echo "==== [bench] $*"; }
die() { echo "bench.sh: error: $*" >&2; exit 1; }

# The instruction-set cap of every runtime (the engine's server in the SQL
# part inherits it from the benchmark cluster's environment).
llama_dir=""
case "$cpu_level" in
  native) ;;
  x86-64-v3)
    # PyTorch: ATen's kernels through ATEN_CPU_CAPABILITY, its BLAS (MKL)
    # and oneDNN through their own switches (without them MKL's sgemm keeps
    # AVX-512: about 10 % faster here than capped).
    export KVEMBED_CPU=x86-64-v3 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
    [ "$out_given" = 1 ] || out="$KVEMBED_ROOT/docs/BENCHMARKS-x86-64-v3.md" ;;
  *) die "--cpu-level is native or x86-64-v3, not '$cpu_level'" ;;
esac

[ -n "$threads" ] || threads=$(nproc)
[ -n "$results" ] || results="$KVEMBED_ROOT/.cache/bench"
venv="$KVEMBED_ROOT/.venv-bench"
py="$venv/bin/python"
if [ "$cpu_level" != native ]; then
  llama_dir="$venv/llama-$cpu_level"
  export PYTHONPATH="$llama_dir${PYTHONPATH:+:$PYTHONPATH}"
fi
mkdir -p "$results"

model_path() {
  case "$1" in
    smollm2) echo "$KVEMBED_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    qwen05) echo "$KVEMBED_MODELS/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" ;;
    gemma3) echo "$KVEMBED_MODELS/gemma-3-270m-q4_k_m.gguf" ;;
    qwen15) echo "$KVEMBED_MODELS/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf" ;;
    *.gguf) realpath -m "$1" ;;
    *) die "unknown model '$1' (smollm2, qwen05, gemma3, qwen15 or a .gguf path)" ;;
  esac
}

report() {
  local rpy=python3
  [ -x "$py" ] && rpy=$py
  local suffix=""
  [ "$cpu_level" = native ] || suffix="-$cpu_level"
  "$rpy" scripts/bench_report.py --results "$results" --out "$out" \
    --svg "$(dirname "$out")/img/bench-throughput$suffix.svg"
}

if [ "$report_only" = 1 ]; then
  # Rewriting the report from nothing would blank every figure in it.
  [ -s "$results/run.json" ] || die "no results in $results to report (run the benchmark first)"
  report; exit 0
fi

t_start=$SECONDS
rm -f "$results"/*.json "$results"/*.err "$results"/*.log
rm -rf "$results/peers" "$results/sql"
# What the report needs to say how it was made.
{
  echo "{\"command\": $(printf '%s' "$cmdline" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))'),"
  echo " \"threads\": $threads, \"repeat\": $repeat, \"models\": \"$models\", \"shapes\": \"$shapes\","
  echo " \"cpu_level\": \"$cpu_level\","
  echo " \"started\": \"$(date -u '+%Y-%m-%d %H:%M UTC')\"}"
} > "$results/run.json"

# ---------------------------------------------------------------- setup
# llama.cpp's build options: every SIMD extension this CPU has (what
# GGML_NATIVE=ON would pick), except AMX. ggml's AMX kernels crash with an
# illegal instruction (SIGILL at `tileloadd`) on the machines this was written
# on, although AMX itself works there; a known ggml problem (the tile
# configuration is optimised away). KVEMBED_BENCH_LLAMA_CMAKE_ARGS overrides,
# e.g. "-DGGML_NATIVE=ON" to try AMX.
llama_cmake_args() {
  if [ -n "${KVEMBED_BENCH_LLAMA_CMAKE_ARGS:-}" ]; then echo "$KVEMBED_BENCH_LLAMA_CMAKE_ARGS"; return; fi
  local flags a="" f opt
  flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  case "$flags" in *" avx2 "*) ;; *) echo "-DGGML_NATIVE=ON"; return ;; esac   # not an x86-64 with AVX2
  for f in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI avx512f:AVX512 \
           avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    opt=${f#*:}
    # At x86-64-v3 nothing above AVX2 + FMA (+ F16C, BMI2).
    if [ "$cpu_level" != native ]; then case "$opt" in AVX512*|AVX_VNNI) a="$a -DGGML_$opt=OFF"; continue ;; esac; fi
    case "$flags" in *" ${f%%:*} "*) a="$a -DGGML_$opt=ON" ;; *) a="$a -DGGML_$opt=OFF" ;; esac
  done
  echo "-DGGML_NATIVE=OFF$a -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
}

setup_venv() {
  if [ ! -x "$py" ]; then
    say "creating $venv"
    python3 -m venv "$venv"
  fi
  local stamp="$venv/.requirements-bench.sha256" want
  want=$(sha256sum scripts/requirements-bench.txt | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] \
     || ! "$py" -c 'import torch, transformers, gguf, accelerate, numpy, psycopg' 2>/dev/null; then
    say "installing scripts/requirements-bench.txt into $venv (torch is ~5 GB with its CUDA libraries)"
    if nice -n 10 "$py" -m pip install -q --disable-pip-version-check -r scripts/requirements-bench.txt \
         > "$results/setup-pip.log" 2>&1; then
      echo "$want" > "$stamp"
    else
      tail -n 30 "$results/setup-pip.log" > "$results/setup-torch.err"
      say "WARNING: pip install failed; see $results/setup-pip.log"
    fi
  fi
  local llama_ver cmake_args stamp_llama="$venv/.llama-cmake-args" target=()
  if [ -n "$llama_dir" ]; then
    # A capped build beside the native one: its own directory, first on
    # the peers' PYTHONPATH.
    stamp_llama="$llama_dir/.llama-cmake-args"; target=(--target "$llama_dir")
  fi
  llama_ver=$(sed -n 's/^#   llama-cpp-python==\(.*\)$/\1/p' scripts/requirements-bench.txt)
  cmake_args=$(llama_cmake_args)
  if ! "$py" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$llama_ver')" 2>/dev/null \
     || [ "$(cat "$stamp_llama" 2>/dev/null)" != "$cmake_args" ]; then
    say "compiling llama-cpp-python $llama_ver for $cpu_level ($cmake_args; ~12 min on 2 cores)"
    if CMAKE_ARGS="$cmake_args" FORCE_CMAKE=1 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
         nice -n 10 "$py" -m pip install -v --disable-pip-version-check --no-cache-dir --no-build-isolation \
         --force-reinstall --no-deps --no-binary llama-cpp-python "${target[@]}" "llama-cpp-python==$llama_ver" \
         > "$results/setup-llama.log" 2>&1 \
       && { [ -n "$llama_dir" ] || "$py" -m pip install -q --disable-pip-version-check "llama-cpp-python==$llama_ver" >> "$results/setup-llama.log" 2>&1; }; then
      echo "$cmake_args" > "$stamp_llama"
    else
      grep -iE "error|fail" "$results/setup-llama.log" | tail -n 20 > "$results/setup-llama.err" || true
      say "WARNING: llama-cpp-python could not be built; see $results/setup-llama.log"
    fi
  fi
}

if [ "$do_peers" = 1 ] && [ -n "$peers" ]; then setup_venv; fi
cp "${llama_dir:-$venv}/.llama-cmake-args" "$results/llama-cmake-args.txt" 2>/dev/null || true
if [ "$do_sql" = 1 ] && ! "$py" -c 'import psycopg' 2>/dev/null; then setup_venv; fi
# The SQL part needs the project's PostgreSQL with pgvector and the extension:
# set them up now, not after the long peers part.
if [ "$do_sql" = 1 ] && [ ! -x "$PG_CONFIG" ]; then
  say "no PostgreSQL install at $PG_CONFIG: running scripts/setup.sh"
  bash scripts/setup.sh
fi

say "building the research CLI (cargo build --release -p kvembed-tools)"
nice -n 10 cargo build --release -q -p kvembed-tools --bin kvembed-lab
kvembed="${CARGO_TARGET_DIR:-$KVEMBED_ROOT/target}/release/kvembed-lab"
"$kvembed" --version > "$results/engine-version.txt"

# Share of the machine's CPU capacity in use over 5 seconds, in percent.
cpu_busy() {
  local a b
  a=($(head -1 /proc/stat)); sleep 5; b=($(head -1 /proc/stat))
  local tot=0 idle i
  for i in 1 2 3 4 5 6 7 8; do tot=$((tot + b[i] - a[i])); done
  idle=$((b[4] - a[4] + b[5] - a[5]))
  echo $(( tot > 0 ? 100 * (tot - idle) / tot : 0 ))
}
if [ "$wait_idle" -gt 0 ]; then
  t_wait=$SECONDS
  while :; do
    busy=$(cpu_busy)
    [ "$busy" -lt 15 ] && { say "machine idle enough (${busy}% busy)"; break; }
    if [ $((SECONDS - t_wait)) -ge "$wait_idle" ]; then
      say "WARNING: the machine is still ${busy}% busy after ${wait_idle}s; measuring anyway (the report says how busy)"
      break
    fi
    say "machine ${busy}% busy; waiting for it to become idle"
    sleep 25
  done
fi

model_args=()
IFS=, read -r -a model_list <<< "$models"
for m in "${model_list[@]}"; do
  p=$(model_path "$m")
  [ -s "$p" ] || bash scripts/fetch-models.sh "$m"
  [ -s "$p" ] || die "model $m missing at $p"
  model_args+=(--model "$m=$p")
done

# ------------------------------------------- 1+2: engine vs peers, re-routing
if [ "$do_peers" = 1 ]; then
  say "engine vs peers: models $models, shapes $shapes, $repeat runs each, $threads threads"
  peer_py=$py; [ -x "$peer_py" ] || peer_py=python3
  "$peer_py" scripts/bench_peers.py run --kvembed "$kvembed" "${model_args[@]}" --shapes "$shapes" \
    --peers "$peers" --threads "$threads" --repeat "$repeat" --omp-wait-policy "$omp_wait_policy" \
    --workdir "$results/peers" \
    --out "$results/peers.json"
fi

# ------------------------------------------- 3-5: SQL, sessions, memory, calibration
if [ "$do_sql" = 1 ]; then
  if [ "$install_ext" = 1 ]; then bash scripts/install-ext.sh; fi
  [ -f "$("$PG_CONFIG" --pkglibdir)/kvembed.so" ] \
    || die "the extension is not installed; run scripts/install-ext.sh (or pass --install-ext)"
  first=${model_list[0]}
  export KVEMBED_MODEL; KVEMBED_MODEL=$(model_path "$first")
  export KVEMBED_PG_SETTINGS="kvembed.threads = $threads"
  say "SQL part on its own cluster ($KVEMBED_PG_DIR, port $PGPORT), model $first"
  bash scripts/pg.sh stop >/dev/null 2>&1 || true
  bash scripts/pg.sh start
  trap 'bash scripts/pg.sh stop >/dev/null 2>&1 || true' EXIT
  sql_rc=0
  "$py" scripts/bench_sql.py --kvembed "$kvembed" --server-kvembed "$PG_BINDIR/kvembed" \
    --model "$KVEMBED_MODEL" --threads "$threads" --rows "$rows" --repeat "$sql_repeat" \
    --sessions "$sessions" --pgbench-seconds "$pgbench_s" --mem-sessions "$mem_sessions" \
    --calib-rows "$calib_rows" --workdir "$results/sql" --out "$results/sql.json" || sql_rc=$?
  cp "$KVEMBED_PG_LOG" "$results/sql-server.log" 2>/dev/null || true
  bash scripts/pg.sh stop || true
  trap - EXIT
  [ "$sql_rc" = 0 ] || say "WARNING: the SQL part failed (exit $sql_rc); the report says what is missing"
fi

python3 - "$results/run.json" "$((SECONDS - t_start))" <<'EOF'
import json, sys
p = sys.argv[1]; d = json.load(open(p)); d["wall_s"] = int(sys.argv[2]); json.dump(d, open(p, "w"))
EOF
report
say "done in $((SECONDS - t_start))s; report: ${out#"$KVEMBED_ROOT"/}"
