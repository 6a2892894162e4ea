#!/usr/bin/env bash
# Build a CUDA-enabled `kvembed` engine on a machine WITHOUT a GPU.
#
# CUDA's compiler and libraries come from PyPI wheels (pinned in
# scripts/requirements-cuda.txt) into a private venv; no system CUDA, no
# driver, no GPU is needed to build. See docs/GPU.md.
#
#   bash scripts/build-cuda.sh    # -> target/cuda/release/kvembed (+ kvembed-stripped)
#
# The venv, the link stubs (.cache/) and the target dir (target/cuda) are all
# under paths git already ignores.
#
# Environment (all optional):
#   CUDA_COMPUTE_CAP      GPU architecture of the kernels, default 90 (H100/H200)
#   KVEMBED_CUDA_VENV     the toolchain venv, default .cache/venv-cuda
#   KVEMBED_CUDA_TARGET   cargo target dir, default target/cuda
#   KVEMBED_CUDA_RPATH    extra run-time library path baked into the binary
#                         (e.g. the GPU machine's .../site-packages/nvidia/cu13/lib)
#   JOBS                  parallel compile jobs, default 2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${KVEMBED_CUDA_VENV:-$ROOT/.cache/venv-cuda}"
TARGET_DIR="${KVEMBED_CUDA_TARGET:-$ROOT/target/cuda}"
JOBS="${JOBS:-2}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
REQ="$ROOT/scripts/requirements-cuda.txt"

log() { printf '[build-cuda] %s\n' "$*" >&2; }

# 1. The toolchain venv (re-installed only when the pins change).
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
if ! cmp -s "$REQ" "$VENV/.kvembed-requirements" 2>/dev/null; then
  log "installing the CUDA wheels (about 1.2 GB unpacked)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ"
  cp "$REQ" "$VENV/.kvembed-requirements"
fi
CU="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
[ -x "$CU/bin/nvcc" ] || { log "no nvcc under $CU"; exit 1; }

# 2. A link directory: the wheels ship only versioned sonames
#    (libcudart.so.13) and no driver library, but the linker wants
#    libcudart.so, libcublas.so, ... and libcuda.so. libcuda.so here is a
#    stub made from the wheel's cuda.h, with the real soname libcuda.so.1:
#    at run time the GPU machine's driver provides the real one. Every stub
#    function returns CUDA_ERROR_NO_DEVICE (100), so the stub can also stand
#    in for a driver on a machine without one (docs/GPU.md, "Checking here").
LINK="$ROOT/.cache/cuda-link"
mkdir -p "$LINK/lib"
for so in "$CU"/lib/lib*.so.*; do
  base="$(basename "$so")"
  case "$base" in *builtins*|*.alt.*) continue ;; esac
  ln -sfn "$so" "$LINK/lib/${base%%.so.*}.so"
done
if [ ! -f "$LINK/lib/libcuda.so" ] || [ "$CU/include/cuda.h" -nt "$LINK/lib/libcuda.so" ] \
   || [ "${BASH_SOURCE[0]}" -nt "$LINK/lib/libcuda.so" ]; then
  log "making the libcuda.so link stub"
  echo '#include <cuda.h>' | cc -E -P -I "$CU/include" - | tr '\n' ' ' | sed 's/;/;\n/g' \
    | grep -oE '^\s*(extern\s+)?(__attribute__\S*\s+)*CUresult\s+cu[A-Za-z0-9_]+\s*\(' \
    | grep -oE 'cu[A-Za-z0-9_]+\s*\($' | tr -d ' (' | sort -u \
    | awk '{ printf "int %s(void) { return 100; }\n", $1 }' > "$LINK/libcuda_stub.c"
  cc -shared -fPIC -o "$LINK/lib/libcuda.so" -Wl,-soname,libcuda.so.1 "$LINK/libcuda_stub.c"
  ln -sfn libcuda.so "$LINK/lib/libcuda.so.1"
  log "stub exports $(grep -c . "$LINK/libcuda_stub.c") driver functions"
fi

# 3. Point cudarc (link search, CUDA version) and candle-kernels (nvcc,
#    compute capability) at the wheel layout.
export NVCC="$CU/bin/nvcc"
export PATH="$CU/bin:$PATH"
export CUDA_HOME="$CU"
export CUDA_ROOT="$LINK"
export CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS="$JOBS"
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-}"
if [ -n "${KVEMBED_CUDA_RPATH:-}" ]; then
  export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath,$KVEMBED_CUDA_RPATH"
fi
log "nvcc: $("$NVCC" --version | tail -2 | head -1)"
log "CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target dir $TARGET_DIR, $JOBS jobs"

start=$(date +%s)
nice -n 10 cargo build --release -p kvembed-server -p kvembed-tools --features cuda --target-dir "$TARGET_DIR" -j "$JOBS"
BIN="$TARGET_DIR/release/kvembed"
log "built $BIN in $(( $(date +%s) - start )) s, $(du -h "$BIN" | cut -f1)"
# A stripped copy (the debug line tables more than double the size): this is
# the one to carry to a GPU machine (xz packs it to about 8 MB).
strip -o "$BIN-stripped" "$BIN"
log "stripped copy: $BIN-stripped, $(du -h "$BIN-stripped" | cut -f1)"
log "shared libraries it needs at run time:"
readelf -d "$BIN" | awk '/NEEDED/ { gsub(/[\[\]]/, "", $5); print "  " $5 }' >&2
cat >&2 <<MSG
[build-cuda] On the GPU machine: a CUDA 13 driver (libcuda.so.1) plus the
[build-cuda] runtime libraries above on the loader path, e.g. PyTorch's wheels:
[build-cuda]   export LD_LIBRARY_PATH=\$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
[build-cuda]   $BIN embed --device cuda --model MODEL.gguf 'hello'
MSG
