"""Prompt ensembles on STS: a method (default `kv`) under several one-word
prompts, each alone and every ensemble of them, scored like `kvembed-lab eval
--sts` (Spearman x 100 per file on its first N pairs, the mean per group, the
mean of the groups).

    .venv/bin/python scripts/prompt_ensemble.py MODEL_FILE LIMIT [--method M] [--out DIR]

MODEL_FILE is a file in $KVEMBED_MODELS (default .cache/models); the STS root
is $KVEMBED_DATA/sts (default ../shared/data/sts). Each prompt's vectors are
written by `kvembed-lab embed --npy` to DIR (default .cache/ensemble/MODEL)
and reused while they exist. An ensemble's vector is the engine's (a prompt
set, `kv-ensemble`, `prompteol-ensemble`; engine/core/src/method.rs): the
normalized mean of the unit vectors under each prompt. Prints a Markdown
table: each prompt, each ensemble of two, and all three, raw and calibrated
like `--space whiten:0.5 --space-sample 1024` (the same map as
engine/core/src/space.rs, fitted on the ensemble's own vectors, on a sample of
1,024 sentences drawn with numpy's generator seeded 0, so not the very sample
`kvembed-lab eval` draws). Run it with the venv's Python (numpy).

Why a script beside `kvembed-lab eval --method kv-ensemble`: it embeds each
prompt once and scores every subset from those vectors, where the engine
would embed each subset again (nine prompt passes instead of three per
text). Its STS loader, Spearman and whitening mirror engine/tools/src/eval.rs
and engine/core/src/space.rs; `kvembed-lab eval --method kv-ensemble`
reproduces its raw figure for all three prompts (docs/QUALITY.md).

The prompts (training-free, from the literature on prompting decoder LLMs for
sentence embeddings): PromptEOL (Jiang et al., 2023; the default of `kv`),
its "pretended chain of thought" and "knowledge enhancement" variants (Zhang
et al., 2024), the engine's PROMPTEOL, PCOT and KE.
"""
import argparse
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = {
    "prompteol": 'This sentence : "{text}" means in one word:"',
    "pcot": 'After thinking step by step , this sentence : "{text}" means in one word:"',
    "ke": (
        "The essence of a sentence is often captured by its main subjects and actions, "
        "while descriptive terms provide additional but less central details. With this "
        'in mind , this sentence : "{text}" means in one word:"'
    ),
}


def load_sts(root: Path, limit: int):
    """[(group, file name, [(score, a, b)])], parsed like kvembed-lab's loader:
    SICK_trial.txt by its header, other files as `score<TAB>a<TAB>b` with
    exactly three fields; unparsable lines skipped."""
    sets = []
    for year in sorted(p for p in root.iterdir() if p.is_dir()):
        if year.name.isdigit() and len(year.name) == 4:
            group, files = "STS" + year.name[2:], sorted(year.glob("*.tsv"))
        elif year.name.lower() == "sick":
            group, files = "SICK", [year / "SICK_trial.txt"]
        else:
            continue
        for f in files:
            lines = f.read_text(encoding="utf-8").lstrip("\ufeff").splitlines()
            cols = None
            if lines and lines[0].split("\t")[0].strip() == "pair_ID":
                h = [x.strip() for x in lines[0].split("\t")]
                cols = (h.index("relatedness_score"), h.index("sentence_A"), h.index("sentence_B"))
                lines = lines[1:]
            pairs = []
            for line in lines:
                line = line.rstrip("\r")
                if not line.strip():
                    continue
                p = line.split("\t")
                try:
                    if cols:
                        s, a, b = float(p[cols[0]]), p[cols[1]], p[cols[2]]
                    elif len(p) == 3:
                        s, a, b = float(p[0]), p[1], p[2]
                    else:
                        continue
                except (ValueError, IndexError):
                    continue
                a, b = a.strip(), b.strip()
                if a and b and np.isfinite(s):
                    pairs.append((s, a, b))
            sets.append((group, f.name, pairs[:limit] if limit else pairs))
    return sorted(sets)


def rank(x):
    """Ranks from 1 with ties averaged."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a, b):
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    d = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / d) if d > 0 else 0.0


def normalized(v):
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def whiten(v, sample, shrink=0.5, seed=0):
    """whiten:SHRINK fitted on `sample` rows of v drawn with a fixed seed, as
    engine/core/src/space.rs fits it: centre, then each principal direction
    of the sample covariance scaled by sqrt(a / ((1 - s) var + a)), where
    a = s * trace / dim."""
    rows = np.random.default_rng(seed).choice(len(v), size=min(sample, len(v)), replace=False)
    x = v[rows]
    mean = x.mean(0)
    xc = x - mean
    _, sing, vt = np.linalg.svd(xc, full_matrices=False)
    var = sing**2 / len(x)
    a = shrink * var.sum() / v.shape[1]
    gain = np.sqrt(a / ((1 - shrink) * var + a)) - 1
    y = v - mean
    return y + ((y @ vt.T) * gain) @ vt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("limit", type=int)
    ap.add_argument("--method", default="kv")
    ap.add_argument("--out")
    args = ap.parse_args()
    models = Path(os.environ.get("KVEMBED_MODELS", ROOT / ".cache/models"))
    data = Path(os.environ.get("KVEMBED_DATA", ROOT.parent / "shared/data"))
    lab = os.environ.get("KVEMBED_BIN", str(ROOT / "target/release/kvembed-lab"))
    out = Path(args.out or ROOT / ".cache/ensemble" / Path(args.model).stem)
    out.mkdir(parents=True, exist_ok=True)

    sets = load_sts(data / "sts", args.limit)
    texts = sorted({t for _, _, pairs in sets for _, a, b in pairs for t in (a, b)})
    index = {t: i for i, t in enumerate(texts)}
    text_file = out / f"texts-{args.limit}.txt"
    text_file.write_text("".join(t.replace("\n", " ") + "\n" for t in texts), encoding="utf-8")

    unit = {}
    for name, prompt in PROMPTS.items():
        npy = out / f"{args.method}-{name}-{args.limit}.npy"
        if not npy.exists():
            print(f"prompt_ensemble.py: {name}: {len(texts)} texts", file=sys.stderr)
            subprocess.run(
                [lab, "embed", "-m", str(models / args.model), "--threads", "2",
                 "--method", args.method, "--document-prompt", prompt,
                 "--file", str(text_file), "--npy", str(npy) + ".tmp.npy"],
                check=True,
            )
            os.replace(str(npy) + ".tmp.npy", npy)
        v = np.load(npy).astype(np.float64)
        if v.shape[0] != len(texts):
            sys.exit(f"{npy}: {v.shape[0]} vectors for {len(texts)} texts; delete it")
        unit[name] = normalized(v)

    def score(names, space):
        v = normalized(sum(unit[n] for n in names))
        if space != "raw":
            v = normalized(whiten(v, 1024))
        groups = {}
        for group, _, pairs in sets:
            ia = np.array([index[a] for _, a, _ in pairs])
            ib = np.array([index[b] for _, _, b in pairs])
            cos = (v[ia] * v[ib]).sum(1)
            groups.setdefault(group, []).append(100 * spearman(cos, [s for s, _, _ in pairs]))
        means = {g: float(np.mean(v)) for g, v in groups.items()}
        return means, float(np.mean(list(means.values())))

    combos = [(n,) for n in PROMPTS] + list(itertools.combinations(PROMPTS, 2))
    combos.append(tuple(PROMPTS))
    spaces = ("raw", "whiten:0.5@1024")
    print(f"| prompts (`--method {args.method}`, {args.limit} pairs per file) | "
          + " | ".join(spaces) + " | forward passes per text |")
    print("| --- " * (len(spaces) + 2) + "|")
    for c in combos:
        figures = " | ".join(f"{score(c, sp)[1]:.2f}" for sp in spaces)
        print(f"| {' + '.join(c)} | {figures} | {len(c)} |")

if __name__ == "__main__":
    main()
