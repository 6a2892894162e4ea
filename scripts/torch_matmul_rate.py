#!/usr/bin/env python3
"""PyTorch's f32 matrix-product rate at SmolLM2-135M's layer shapes, the
figure docs/DEVELOPMENT.md ("What bounds the AVX2 path") sets beside
`cargo test --release -p kvembed-model --lib int8::speed -- --ignored --nocapture`.

    .venv-bench/bin/python scripts/torch_matmul_rate.py [--threads 2]

Capped to AVX2 as scripts/bench.sh --cpu-level x86-64-v3 caps it:
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
      .venv-bench/bin/python scripts/torch_matmul_rate.py
"""
import argparse
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeat", type=int, default=20)
a = ap.parse_args()
torch.set_num_threads(a.threads)
print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, {a.threads} threads")
# (m, k, n): the same shapes as int8::speed.
for m, k, n in [(2048, 576, 1536), (2048, 1536, 576), (32, 576, 1536), (8192, 576, 576)]:
    x, w = torch.randn(m, k), torch.randn(k, n)
    with torch.inference_mode():
        for _ in range(3):
            x @ w
        t = time.perf_counter()
        for _ in range(a.repeat):
            x @ w
        dt = (time.perf_counter() - t) / a.repeat
    print(f"{m}x{k}x{n}: {2 * m * k * n / dt / 1e9:.1f} GFLOP/s")
