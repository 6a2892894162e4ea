#!/usr/bin/env python3
"""Reference ("golden") embeddings from Hugging Face transformers for the
engine's `native` method: a model's own embedding, as sentence-transformers
makes it.

Writes two tiny generated models with their golden.json:

    engine/core/tests/golden/bert/            an encoder: a random BertModel
        (hidden 32, 2 layers, 4 heads, 64 positions), a WordPiece tokenizer
        (lower-casing, [CLS] text [SEP]), the sentence-transformers files
        (modules.json, 1_Pooling/config.json with CLS pooling,
        sentence_bert_config.json with max_seq_length 24, query/passage
        prompts in config_sentence_transformers.json)
    engine/core/tests/golden/qwen3-embedding/ a decoder embedding model in the
        Qwen3-Embedding layout: the tiny qwen3 of scripts/make_goldens.py
        (weights and config copied), its tokenizer with a post-processor that
        ends every input with <|endoftext|>, last-token pooling and the
        query instruction in config_sentence_transformers.json

golden.json: {"cases": [{"role": "query"|"document", "text", "input_ids",
"embedding"}], "hidden": [{"text", "final_hidden": [T][hidden]}]} where
`input_ids` are what transformers' tokenizer gives for prompt + text with
truncation to max_seq_length, and `embedding` is the pooled, L2-normalised
vector, computed for the whole batch at once (so padding is exercised).
The engine's test (engine/core/tests/native.rs) compares against them; CI
needs neither torch nor transformers. With the real all-MiniLM-L6-v2 fetched
(scripts/fetch-models.sh minilm), it also writes transformers' vectors for a
few sentences to tests/golden/all-MiniLM-L6-v2.json, which the SQL test
tests/tests/encoder.rs compares kv_embed against.

Regenerate with the venv of scripts/make_goldens.py (or .venv-bench):

    .venv-goldens/bin/python scripts/make_encoder_goldens.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, AutoModel

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "engine/core/tests/golden"

WORDS = (
    "the a an of to and in is was for on with as by at from that this it be are "
    "man woman dog cat child play playing guitar music stage street car road house "
    "run running walk walking eat eating food water red blue green small big old new "
    "two three people group sit sitting stand standing on under over near ball game "
    "search query passage answer question what who where how why"
).split()


def wordpiece() -> Tokenizer:
    chars = [chr(c) for c in range(33, 127)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += chars + ["##" + c for c in chars if c.isalnum()]
    vocab += ["##ing", "##ed", "##s", "##er", "##ly"] + WORDS
    seen = []
    for v in vocab:
        if v not in seen:
            seen.append(v)
    tk = Tokenizer(models.WordPiece({t: i for i, t in enumerate(seen)}, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tk.decoder = decoders.WordPiece()
    # A tokenizer.json that pads and truncates on its own, as many on the hub
    # do: the engine must not let either change what it embeds.
    tk.enable_padding(pad_id=0, pad_token="[PAD]", length=40)
    tk.enable_truncation(max_length=40)
    return tk


TEXTS = [
    "A man is playing a guitar on the stage.",
    "Two dogs are running in the street!",
    "",
    "what is the answer?",
    "The old woman walks near the small red house, and the child eats food by the water "
    "while three people sit under the big green tree playing music and a ball game.",
    "Über café naïve — 東京 2024 #tag",
]


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def st_files(d: Path, pooling: str, max_seq: int | None, prompts: dict) -> None:
    write_json(d / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    (d / "1_Pooling").mkdir(exist_ok=True)
    write_json(d / "1_Pooling/config.json", {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_lasttoken": pooling == "lasttoken",
        "include_prompt": True,
    })
    write_json(d / "config_sentence_transformers.json", {"prompts": prompts, "default_prompt_name": None})
    if max_seq is not None:
        write_json(d / "sentence_bert_config.json", {"max_seq_length": max_seq, "do_lower_case": False})


def pool(h: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "cls":
        v = h[:, 0]
    elif how == "mean":
        m = mask.unsqueeze(-1).float()
        v = (h * m).sum(1) / m.sum(1)
    else:  # last token of a right-padded batch
        last = mask.sum(1) - 1
        v = h[torch.arange(h.shape[0]), last]
    return torch.nn.functional.normalize(v, dim=-1)


def goldens(d: Path, model, fast: PreTrainedTokenizerFast, how: str, max_len: int, prompts: dict) -> dict:
    cases = []
    for role in ("query", "document"):
        prompt = prompts.get(role, "")
        inputs = [prompt + t for t in TEXTS]
        b = fast(inputs, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        with torch.no_grad():
            h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        e = pool(h, b["attention_mask"], how)
        for i, t in enumerate(TEXTS):
            n = int(b["attention_mask"][i].sum())
            cases.append({
                "role": role, "text": t,
                "input_ids": b["input_ids"][i, :n].tolist(),
                "embedding": [float(x) for x in e[i]],
            })
    hidden = []
    for t in TEXTS[:2]:
        b = fast([t], return_tensors="pt", truncation=True, max_length=max_len)
        with torch.no_grad():
            h = model(**{k: b[k] for k in ("input_ids", "attention_mask")}).last_hidden_state[0]
        hidden.append({"text": t, "input_ids": b["input_ids"][0].tolist(),
                       "final_hidden": [[float(x) for x in row] for row in h]})
    return {"pooling": how, "max_seq_length": max_len, "cases": cases, "hidden": hidden,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}


def make_bert() -> None:
    d = GOLDEN / "bert"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    tk = wordpiece()
    tk.save(str(d / "tokenizer.json"))
    torch.manual_seed(7)
    cfg = BertConfig(vocab_size=tk.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                     type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(d, safe_serialization=True)
    prompts = {"query": "query: ", "passage": "passage: "}
    st_files(d, "cls", 24, prompts)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), pad_token="[PAD]")
    reloaded = AutoModel.from_pretrained(d).eval()
    g = goldens(d, reloaded, fast, "cls", 24, {"query": "query: ", "document": "passage: "})
    write_json(d / "golden.json", g)


def make_qwen3_embedding() -> None:
    src = GOLDEN / "qwen3"
    d = GOLDEN / "qwen3-embedding"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, d / f)
    tk = Tokenizer.from_file(str(src / "tokenizer.json"))
    eos = "<|endoftext|>"
    eos_id = tk.token_to_id(eos)
    assert eos_id is not None, "the tiny qwen3 tokenizer has <|endoftext|>"
    tk.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, eos_id)])
    tk.save(str(d / "tokenizer.json"))
    instruction = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
    prompts = {"query": instruction, "document": ""}
    st_files(d, "lasttoken", None, prompts)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), pad_token=eos)
    model = AutoModel.from_pretrained(d, attn_implementation="eager").eval()
    g = goldens(d, model, fast, "lasttoken", 4096, prompts)
    write_json(d / "golden.json", g)


# Sentences written for these references (none from any evaluation set).
MINILM_TEXTS = [
    "Simmer the tomato sauce with garlic and basil for twenty minutes.",
    "The goalkeeper saved a penalty in the last minute of the match.",
    "How do I reset a forgotten database password?",
    "Quantum computers use qubits instead of classical bits.",
    "",
]


def make_minilm_reference() -> None:
    """transformers' all-MiniLM-L6-v2 vectors (mean pooling, normalised,
    max_seq_length 256) for tests/golden/all-MiniLM-L6-v2.json, when
    `scripts/fetch-models.sh minilm` has fetched the model."""
    d = ROOT / ".cache/models/all-MiniLM-L6-v2"
    if not (d / "model.safetensors").is_file():
        print("skipping the all-MiniLM-L6-v2 reference: run scripts/fetch-models.sh minilm")
        return
    fast = PreTrainedTokenizerFast.from_pretrained(d)
    model = AutoModel.from_pretrained(d).eval()
    b = fast(MINILM_TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**{k: b[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    e = pool(h, b["attention_mask"], "mean")
    out = ROOT / "tests/golden/all-MiniLM-L6-v2.json"
    out.parent.mkdir(exist_ok=True)
    write_json(out, {"model": "all-MiniLM-L6-v2", "pooling": "mean", "cases": [
        {"text": t, "embedding": [float(x) for x in e[i]]} for i, t in enumerate(MINILM_TEXTS)]})


if __name__ == "__main__":
    make_bert()
    make_qwen3_embedding()
    make_minilm_reference()
    print("wrote", GOLDEN / "bert", "and", GOLDEN / "qwen3-embedding")
