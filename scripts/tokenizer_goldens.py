#!/usr/bin/env python3
"""Reference token ids for the tokenizer conformance test.

    scripts/tokenizer_goldens.py [--sts DIR] [--models LIST] [--out FILE]

Writes engine/tools/tests/tokenizer_golden.tsv: for every string of the
conformance corpus (`kvembed-lab tokenize --corpus`, built in
engine/tools/src/conformance.rs), a hash of the string and, per model, a hash
of the ids the model's reference tokenizer gives it:

- a GGUF file: llama.cpp's tokenizer (llama-cpp-python, `vocab_only`), with
  `add_bos=False` (BOS is the engine's business, checked elsewhere) and
  `special=False`: text is text, a `<|endoftext|>` typed by a user is not the
  control token;
- a Hugging Face directory: `tokenizers` on its tokenizer.json,
  `add_special_tokens=False`, `encode_special_tokens=True` (the special
  tokens it lists, spelled in a text, are text too).

Only hashes are written (FNV-1a 64 of the UTF-8 string; of the ids as
little-endian u32, its low 32 bits), never the strings: the evaluation text
is not committed. The test (engine/tools/tests/tokenizer_conformance.rs)
rebuilds the corpus and compares.

Needs the benchmark venv (.venv-bench, made by scripts/bench.sh; llama.cpp
is found in it or in one of its capped builds) and a release build of
kvembed-lab. CI does not run this script: the golden file is committed.
"""
import argparse
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.environ.get("KVEMBED_MODELS", os.path.join(ROOT, ".cache/models"))
# name -> (kind, path)
KNOWN = {
    "smollm2": ("gguf", os.path.join(MODELS, "SmolLM2-135M-Instruct.Q4_1.gguf")),
    "qwen05": ("gguf", os.path.join(MODELS, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")),
    "qwen15": ("gguf", os.path.join(MODELS, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")),
    "gemma3": ("gguf", os.path.join(MODELS, "gemma-3-270m-q4_k_m.gguf")),
    "hf-llama": ("hf", os.path.join(ROOT, "engine/core/tests/golden/llama")),
}


def fnv1a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def ids_hash(ids) -> int:
    return fnv1a(b"".join(int(i).to_bytes(4, "little") for i in ids)) & 0xFFFFFFFF


def import_llama():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        # A capped build of scripts/bench.sh (--cpu-level) lives in its own directory.
        for d in sorted(glob.glob(os.path.join(ROOT, ".venv-bench", "llama-*"))):
            sys.path.insert(0, d)
            try:
                import llama_cpp  # noqa: F401
                break
            except ImportError:
                sys.path.pop(0)
    import llama_cpp
    return llama_cpp


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sts", default=os.path.join(ROOT, "..", "shared", "data", "sts"))
    ap.add_argument("--models", default="smollm2,qwen05,qwen15,gemma3,hf-llama")
    ap.add_argument("--out", default=os.path.join(ROOT, "engine/tools/tests/tokenizer_golden.tsv"))
    ap.add_argument("--lab", default=os.path.join(ROOT, "target/release/kvembed-lab"))
    args = ap.parse_args()

    corpus = [json.loads(l) for l in subprocess.run(
        [args.lab, "tokenize", "--corpus", "--sts", args.sts],
        check=True, capture_output=True, text=True).stdout.split("\n") if l]
    print(f"corpus: {len(corpus)} strings", file=sys.stderr)

    columns, versions = [], []
    for name in args.models.split(","):
        kind, path = KNOWN[name]
        if not os.path.exists(path):
            sys.exit(f"{name}: {path} is missing (scripts/fetch-models.sh {name})")
        if kind == "gguf":
            llama_cpp = import_llama()
            llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
            encode = lambda s, llm=llm: llm.tokenize(s.encode("utf-8"), add_bos=False, special=False)
            versions.append(f"{name}=llama.cpp {llama_cpp.__version__} on {os.path.basename(path)}")
        else:
            import tokenizers
            tk = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
            # Special tokens spelled in a text are text, as llama.cpp's
            # parse_special=False reads them.
            tk.encode_special_tokens = True
            encode = lambda s, tk=tk: tk.encode(s, add_special_tokens=False).ids
            versions.append(f"{name}=tokenizers {tokenizers.__version__} on {os.path.relpath(path, ROOT)}/tokenizer.json, special tokens as text")
        columns.append((name, [ids_hash(encode(s)) for s in corpus]))
        print(f"{name}: done", file=sys.stderr)

    with open(args.out, "w") as f:
        f.write("# Tokenizer conformance: written by scripts/tokenizer_goldens.py, checked by\n")
        f.write("# engine/tools/tests/tokenizer_conformance.rs. Per corpus string: FNV-1a 64 of\n")
        f.write("# the string, then per model the low 32 bits of FNV-1a 64 of the reference's ids.\n")
        for v in versions:
            f.write(f"# {v}\n")
        f.write("string\t" + "\t".join(n for n, _ in columns) + "\n")
        for i, s in enumerate(corpus):
            f.write(f"{fnv1a(s.encode('utf-8')):016x}\t" + "\t".join(f"{c[i]:08x}" for _, c in columns) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
