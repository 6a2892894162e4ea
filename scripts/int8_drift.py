"""How far int8 products move a backbone's embeddings from f32 products: the
cosine between each text's vector under `KVEMBED_WEIGHTS=f32` and under
`KVEMBED_WEIGHTS=int8`, in the same build, for SciFact claims embedded as
queries (the query prompt), the same claims embedded as documents, and
abstracts embedded as documents (cut at --max-tokens).

    .venv/bin/python scripts/int8_drift.py MODEL_FILE [--n 60] [--method kv] [--max-tokens 200]
        [--query-prompt TEMPLATE] [--queries-only]

MODEL_FILE is a file in $KVEMBED_MODELS (default .cache/models); the texts
are the first N queries and the first N documents of
$KVEMBED_DATA/scifact (default ../shared/data/scifact; documents as
`kvembed-lab eval --beir` joins them, title and text). Vectors come from
`kvembed-lab embed --npy` ($KVEMBED_BIN, default
target/release/kvembed-lab) with 2 threads and are not kept. Prints a
Markdown table: per side, the median, 10th percentile and minimum cosine.
--query-prompt replaces the method's query prompt (to find which wording
drifts); --queries-only measures the claims as queries alone.
Run it with the venv's Python (numpy).

This is the measurement behind Gemma 3's f32 default on CPUs without AMX
(docs/QUALITY.md, "Int8 products"); the real-model test
`gemma3_default_products_keep_its_query_embeddings` holds the default to it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def first_lines(path: Path, n: int, field):
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if len(out) == n:
                break
            out.append(" ".join(field(json.loads(line)).split()))
    return out


def doc_text(v):
    title, text = v.get("title", "") or "", v.get("text", "") or ""
    return f"{title} {text}".strip() if title.strip() else text.strip()


def embed(lab, model, texts, weights, method, max_tokens, query, tmp, query_prompt=None):
    src = Path(tmp) / "texts.txt"
    src.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    npy = Path(tmp) / "out.npy"
    cmd = [lab, "embed", "-m", str(model), "--threads", "2", "--method", method,
           "--max-tokens", str(max_tokens), "--file", str(src), "--npy", str(npy)]
    if query:
        cmd.append("--query")
        if query_prompt:
            cmd += ["--query-prompt", query_prompt]
    env = dict(os.environ, KVEMBED_WEIGHTS=weights)
    subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL)
    v = np.load(npy).astype(np.float64)
    if v.shape[0] != len(texts):
        sys.exit(f"int8_drift.py: {v.shape[0]} vectors for {len(texts)} texts")
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--method", default="kv")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--query-prompt")
    ap.add_argument("--queries-only", action="store_true")
    args = ap.parse_args()
    models = Path(os.environ.get("KVEMBED_MODELS", ROOT / ".cache/models"))
    data = Path(os.environ.get("KVEMBED_DATA", ROOT.parent / "shared/data")) / "scifact"
    lab = os.environ.get("KVEMBED_BIN", str(ROOT / "target/release/kvembed-lab"))
    model = models / args.model

    claims = first_lines(data / "queries.jsonl", args.n, lambda v: v["text"])
    docs = first_lines(data / "corpus.jsonl", args.n, doc_text)
    sides = [("claims as queries", claims, True),
             ("claims as documents", claims, False),
             ("abstracts as documents", docs, False)]
    if args.queries_only:
        sides = sides[:1]
    print(f"`{args.method}` on {args.model}, first {args.n} SciFact queries and documents, "
          f"at most {args.max_tokens} tokens"
          + (f", query prompt `{args.query_prompt}`" if args.query_prompt else "")
          + "; cosine of each text's int8-product vector "
          "to its f32-product vector:\n")
    print("| texts | median | 10th percentile | min |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name, texts, query in sides:
            run = (args.method, args.max_tokens, query, tmp, args.query_prompt)
            f32 = embed(lab, model, texts, "f32", *run)
            i8 = embed(lab, model, texts, "int8", *run)
            cos = np.sum(f32 * i8, axis=1)
            print(f"| {name} | {np.median(cos):.3f} | {np.percentile(cos, 10):.3f} | "
                  f"{cos.min():.3f} |")


if __name__ == "__main__":
    main()
