#!/usr/bin/env python3
"""An encoder served by kvembed against PyTorch (transformers) on the same
weights, texts and threads: texts/s and tokens/s end to end (tokenizer,
forward passes, pooling), written as a Markdown page.

    .venv-bench/bin/python scripts/bench_encoder.py [--model DIR] [--threads N]
        [--repeat R] [--decoder GGUF] [--cpu-levels native,x86-64-v3]
        [--out docs/BENCHMARKS-encoder.md]

The texts are generated from a seed (short: 512 texts of 8-24 words; long:
64 texts of 150-220 words, near all-MiniLM-L6-v2's 256-token limit), so the
run needs no data set. kvembed: `kvembed-lab bench --file` (the engine's
embedding path with its token-budget batches). PyTorch: what
sentence-transformers' `encode` does (texts sorted by length, batches of 32,
the tokenizer's padding, mean pooling, normalisation), in
torch.inference_mode with torch.set_num_threads(N). Each side is warmed up,
then timed `--repeat` times; the median counts. With `--decoder`, the same
texts are also embedded by kvembed with that decoder LLM and its default
method (`kv`), for the cost of the training-free path beside the encoder.
Each CPU level of `--cpu-levels` is measured in the same run: `native`
(what each runtime picks on this CPU) and `x86-64-v3`, which caps every
runtime to AVX2 + FMA (the engine with KVEMBED_CPU=x86-64-v3, PyTorch with
ATEN_CPU_CAPABILITY=avx2), the path of CPUs without AVX-512. PyTorch runs
in a child process so that its capability is set before it starts.
The .venv-bench of scripts/bench.sh has torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORDS = (
    "the a of and to in is that for it on with as was at by an be this from or "
    "which one had not but what all were when we there can more if out so said "
    "time people year way day man woman child world life hand part place case week "
    "company system program question work government number night point home water "
    "room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body "
    "information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher "
    "force education runs plays builds writes finds shows makes gives takes sees "
    "quickly slowly carefully green small large early late important public private"
).split()


def texts(n: int, lo: int, hi: int, seed: int) -> list[str]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        words = [r.choice(WORDS) for _ in range(r.randint(lo, hi))]
        s = " ".join(words)
        out.append(s[0].upper() + s[1:] + ".")
    return out


def cpu_level(lab: Path, level: str) -> str:
    """The level the engine's kernels run at here (`kvembed cpu`) at `level`."""
    engine = lab.parent / "kvembed"
    try:
        out = subprocess.run([str(engine), "cpu"], check=True, capture_output=True, text=True,
                             env=level_env(level))
        return json.loads(out.stdout)["level"]
    except (OSError, subprocess.CalledProcessError, ValueError, KeyError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


LEVELS = {
    # level: (KVEMBED_CPU, ATEN_CPU_CAPABILITY); None leaves the variable unset
    "native": (None, None),
    "x86-64-v3": ("x86-64-v3", "avx2"),
}


def level_env(level: str) -> dict:
    env = dict(os.environ)
    for name, value in zip(("KVEMBED_CPU", "ATEN_CPU_CAPABILITY"), LEVELS[level]):
        env.pop(name, None)
        if value:
            env[name] = value
    return env


def bench_kvembed(lab: Path, model: Path, file: Path, threads: int, repeat: int, level: str) -> dict:
    out = subprocess.run(
        [str(lab), "bench", "-m", str(model), "--file", str(file), "--threads", str(threads),
         "--repeat", str(repeat), "--json"],
        check=True, capture_output=True, text=True, env=level_env(level))
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_torch_at(model: Path, file: Path, threads: int, repeat: int, level: str) -> dict:
    """bench_torch in a child process with the level's ATen capability."""
    out = subprocess.run(
        [sys.executable, __file__, "--torch-worker", str(file), "--model", str(model),
         "--threads", str(threads), "--repeat", str(repeat)],
        check=True, capture_output=True, text=True, env=level_env(level))
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_torch(model: Path, ts: list[str], threads: int, repeat: int) -> dict:
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModel.from_pretrained(model).eval()
    max_len = json.loads((model / "sentence_bert_config.json").read_text()).get("max_seq_length", 512)

    def run() -> int:
        order = sorted(range(len(ts)), key=lambda i: -len(ts[i]))
        tokens = 0
        with torch.inference_mode():
            for at in range(0, len(order), 32):
                batch = [ts[i] for i in order[at:at + 32]]
                b = tok(batch, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
                h = m(**b).last_hidden_state
                mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                e = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                torch.nn.functional.normalize(e, dim=-1)
                tokens += int(b["attention_mask"].sum())
        return tokens

    run()
    times = []
    tokens = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        tokens = run()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"seconds": sorted(times), "texts_per_s_median": len(ts) / med,
            "tokens_per_s_median": tokens / med, "tokens": tokens,
            "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / ".cache/models/all-MiniLM-L6-v2"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--decoder", help="a decoder LLM (GGUF) embedded with kv on the same texts")
    ap.add_argument("--cpu-levels", default="native,x86-64-v3",
                    help="comma-separated: native, x86-64-v3")
    ap.add_argument("--out", default=str(ROOT / "docs/BENCHMARKS-encoder.md"))
    ap.add_argument("--torch-worker", metavar="FILE", help=argparse.SUPPRESS)
    a = ap.parse_args()
    model = Path(a.model)
    if a.torch_worker:
        ts = Path(a.torch_worker).read_text().splitlines()
        print(json.dumps(bench_torch(model, ts, a.threads, a.repeat)))
        return 0
    levels = [x.strip() for x in a.cpu_levels.split(",") if x.strip()]
    for level in levels:
        if level not in LEVELS:
            ap.error(f"unknown CPU level '{level}' (native, x86-64-v3)")
    lab = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release/kvembed-lab"
    work = ROOT / "target/bench-encoder"
    work.mkdir(parents=True, exist_ok=True)
    shapes = [("short", texts(512, 8, 24, 1)), ("long", texts(64, 150, 220, 2))]
    rows = []
    seen = {}
    for level in levels:
        for name, ts in shapes:
            f = work / f"{name}.txt"
            f.write_text("\n".join(ts) + "\n")
            k = bench_kvembed(lab, model, f, a.threads, a.repeat, level)
            t = bench_torch_at(model, f, a.threads, a.repeat, level)
            d = (bench_kvembed(lab, Path(a.decoder), f, a.threads, a.repeat, level)
                 if a.decoder else None)
            rows.append((level, name, len(ts), k, t, d))
            seen[level] = (cpu_level(lab, level), t["capability"], d["matmul"] if d else None)
            print(f"{level} {name}: kvembed {k['texts_per_s_median']:.1f} texts/s, "
                  f"PyTorch {t['texts_per_s_median']:.1f} texts/s", file=sys.stderr)
    cmd = "scripts/bench_encoder.py" + "".join(f" {x}" for x in sys.argv[1:])
    lines = [
        "# Benchmarks: an encoder (all-MiniLM-L6-v2) against PyTorch",
        "",
        f"Generated by `.venv-bench/bin/python {cmd}`; do not edit by hand.",
        "",
        f"CPU: {cpu_name()}, {a.threads} threads for both. Model: `{model.name}` "
        f"(BERT, 6 layers, d=384; f32 weights on both sides). PyTorch {rows[0][4]['torch']}.",
        "",
        "| CPU level | kvembed kernels (`kvembed cpu`) | PyTorch ATen capability |"
        + (" decoder matrix products |" if a.decoder else ""),
        "| --- | --- | --- |" + (" --- |" if a.decoder else ""),
    ]
    for level, (engine, aten, matmul) in seen.items():
        lines.append(f"| {level} | {engine} | {aten} |" + (f" {matmul} |" if a.decoder else ""))
    lines += [
        "",
        "End to end: tokenizer, forward passes, pooling and normalisation, the same generated texts "
        "on both sides (short: 8-24 words; long: 150-220 words). Tokens are the model's, "
        "special tokens included. Median of the timed runs.",
        "",
        "| CPU level | texts | kvembed texts/s | PyTorch texts/s | × PyTorch | kvembed tokens/s | PyTorch tokens/s |"
        + (" kvembed, decoder `kv` texts/s | encoder × decoder |" if a.decoder else ""),
        "| --- | --- | --- | --- | --- | --- | --- |" + (" --- | --- |" if a.decoder else ""),
    ]
    for level, name, n, k, t, d in rows:
        line = (
            f"| {level} | {n} {name} | {k['texts_per_s_median']:.1f} | {t['texts_per_s_median']:.1f} | "
            f"{k['texts_per_s_median'] / t['texts_per_s_median']:.2f} | {k['tokens_per_s_median']:.0f} | "
            f"{t['tokens_per_s_median']:.0f} |")
        if d:
            line += f" {d['texts_per_s_median']:.1f} | {k['texts_per_s_median'] / d['texts_per_s_median']:.1f} |"
        lines.append(line)
    if a.decoder:
        lines += ["", f"The decoder column: `{Path(a.decoder).name}` with the method `kv` "
                  "(PromptEOL prompt, re-routing), kvembed's default matrix products at each level "
                  "(the table above); its tokens include the prompt."]
    lines += ["", "kvembed's encoder on the CPU: the real tokens of a batch packed into one f32 "
              "product per projection (no padding computed), attention per sequence and head, the "
              "engine's vectorised exp and erf; the kernels are chosen at run time "
              "(`KVEMBED_CPU=x86-64-v3` caps them to AVX2 + FMA).", ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
