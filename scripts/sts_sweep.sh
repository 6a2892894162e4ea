#!/usr/bin/env bash
# Compare method variants on STS with `kvembed-lab eval`, one variant per line,
# and print a Markdown table (per-group Spearman x 100 and their average):
#
#   bash scripts/sts_sweep.sh [--report-only] MODEL LIMIT OUTDIR < variants.txt
#
#   --report-only  print the table of what OUTDIR holds, run nothing
#
#   MODEL    a GGUF file, HF model directory or cached repo id
#   LIMIT    pairs per STS file (0 = every pair)
#   OUTDIR   where each variant's JSON goes; a variant whose JSON is already
#            there (run with the same options) is not run again, so an
#            interrupted sweep resumes
#
# Each line of variants.txt is `name|kvembed eval options`, for example
#
#   prompteol|--method prompteol
#   kv-b0.5|--method kv --bias 0.5
#   kv-L6-8|--method kv --layers 6-8
#
# Blank lines and lines starting with # are skipped. The STS data comes from
# $KVEMBED_DATA/sts (default ../shared/data/sts); the binary from
# $KVEMBED_BIN (default target/release/kvembed-lab).
set -euo pipefail
# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KVEMBED_ROOT"

report_only=0
if [ "${1:-}" = --report-only ]; then report_only=1; shift; fi
if [ $# -ne 3 ]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
model=$1 limit=$2 out=$3
bin=${KVEMBED_BIN:-target/release/kvembed-lab}
sts=${KVEMBED_DATA:-../shared/data}/sts
[ -x "$bin" ] || { echo "sts_sweep: $bin not built (cargo build --release -p kvembed-tools)" >&2; exit 1; }
[ -d "$sts" ] || { echo "sts_sweep: no STS data in $sts" >&2; exit 1; }
mkdir -p "$out"

names=() missing=()
while IFS='|' read -r name args || [ -n "$name" ]; do
  case "$name" in '' | '#'*) continue ;; esac
  names+=("$name")
  if [ -s "$out/$name.json" ] && [ "$(cat "$out/$name.args" 2>/dev/null)" = "$args" ]; then
    continue
  fi
  if [ "$report_only" = 1 ]; then
    missing+=("$name")
    continue
  fi
  t0=$SECONDS
  # shellcheck disable=SC2086 # the options are meant to split
  if ! "$bin" eval -m "$model" --sts "$sts" --limit "$limit" $args --json \
      < /dev/null > "$out/$name.json.part" 2> "$out/$name.err"; then
    echo "sts_sweep: variant '$name' failed, see $out/$name.err" >&2
    exit 1
  fi
  mv "$out/$name.json.part" "$out/$name.json"
  printf '%s\n' "$args" > "$out/$name.args"
  echo "sts_sweep: $name done in $((SECONDS - t0)) s" >&2
done

SWEEP_MISSING="${missing[*]}" python3 - "$out" "$model" "$limit" "${names[@]}" <<'EOF'
import json, os, sys
out, model, limit, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
missing = set(os.environ.get("SWEEP_MISSING", "").split())
rows, groups = [], None
for n in names:
    path = os.path.join(out, n + ".json")
    if n in missing or not os.path.exists(path):
        rows.append((n, None, None))
        continue
    d = json.load(open(path))
    g = dict(d["sts_groups"])
    groups = groups or sorted(g)
    args = open(os.path.join(out, n + ".args")).read().strip()
    rows.append((n, args, [g[k] for k in groups]))
groups = groups or ["SICK", "STS12", "STS13", "STS14"]
print(f"Model `{os.path.basename(model)}`, "
      f"{'every pair' if limit == '0' else 'first ' + limit + ' pairs'} of each STS file; "
      "Spearman x 100 per group, and their average.\n")
print("| variant | options | " + " | ".join(groups) + " | average |")
print("| --- | --- | " + " | ".join("---" for _ in groups) + " | --- |")
for n, args, v in rows:
    if v is None:
        print(f"| {n} | (not run yet) | " + " | ".join("" for _ in groups) + " | |")
        continue
    print(f"| {n} | `{args}` | " + " | ".join(f"{x:.1f}" for x in v) + f" | **{sum(v) / len(v):.2f}** |")
EOF
