#!/usr/bin/env python3
"""Reference ("golden") outputs from Hugging Face transformers for tiny random models.

For each architecture (llama, mistral, qwen2, qwen3, gemma3) this script builds a
tiny randomly initialised decoder-only model with transformers (fixed seeds), saves
it as a Hugging Face model directory and writes reference hidden states, for a
plain forward pass and for KV-Embedding re-routing (defined below), to

    engine/core/tests/golden/<arch>/{config.json, model.safetensors, tokenizer.json, golden.json}
    engine/core/tests/golden/llama-sharded/  (same llama weights, split into several
        model-0000i-of-0000N.safetensors + model.safetensors.index.json, same golden.json)

The Rust engine's tests compare against these files; CI only reads them and needs
neither torch nor transformers.

Regenerate (Linux x86_64, CPython 3.11; about 1.5 minutes of installs, 5.4 GB):

    python3 -m venv .venv-goldens
    .venv-goldens/bin/pip install -r scripts/requirements-goldens.txt
    .venv-goldens/bin/python scripts/make_goldens.py

(PyPI only has the CUDA build of torch for Linux; `pip install torch --no-deps`
fails at `import torch` -- "libcublasLt.so.*[0-9] not found" -- so the nvidia-*
wheels are installed too. Everything runs on CPU.)  Outputs are deterministic for
the pinned versions; the script runs in a few seconds.

Models
------
float32 weights, eager attention, hidden_size 32, GQA with 4 query heads / 2 KV
heads, vocab 320 (the tokenizer uses ids 0..299), max_position_embeddings 4096,
rms_norm_eps 1e-6, 3 layers (gemma3: 4). head_dim is 8 (= hidden / heads) for llama
and qwen2, and 16 (so heads * head_dim = 64 != hidden) for mistral, qwen3, gemma3.
The per-family settings are in ARCHS below (sizes are kept tiny so that all golden
folders together stay around 1.5 MB). Every weight is re-drawn from a seeded generator (see
`randomize`) so that attention is far from uniform: linear weights
N(0, 1/fan_in), embeddings N(0, 1), qwen2's q/k/v biases N(0, 0.5^2), and ALL
RMSNorm weights (layer norms, final norm, q/k norms) random: U(0.5, 1.5) where the
norm multiplies by w, and U(-0.5, 0.5) for gemma3, whose norms multiply by (1 + w).

config.json is written in the classic Hub layout that real checkpoints use
(`rope_theta`, `rope_local_base_freq`, `rope_scaling: null`, `sliding_window_pattern`,
`torch_dtype`), not the `rope_parameters` layout that transformers 5 itself would
save; the script reloads every directory with transformers and checks it parses
back to exactly the intended model and reproduces the goldens bit for bit.

Tokenizer: one byte-level BPE trained here on the inline CORPUS with the
`tokenizers` library (ids 0..2 special tokens, 3..258 the 256 byte symbols, then
merges up to 300). llama/mistral/gemma3 tokenizers prepend <|begin_of_text|> (id 2),
like their real counterparts; qwen2/qwen3 add nothing. `input_ids` in golden.json
are `tokenizer.encode(text, add_special_tokens=True).ids`.

golden.json
-----------
    {"arch", "model_type", "num_hidden_layers", "hidden_size",
     "sliding_window_per_layer": [w or null per layer], "versions", "cases": [
       {"name": "plain", "text", "input_ids",
        "embed_output": [T][hidden]     # input embeddings (gemma3: already * sqrt(hidden))
        "layer_hidden": [L][T][hidden]  # output of decoder layer i, BEFORE the final norm
        "final_hidden": [T][hidden]}    # last hidden state AFTER the final norm
       {"name": "reroute", ..., "reroute_layers": [1], "bias": 1.0, "layer_hidden", "final_hidden"},
       {"name": "reroute-b3", ..., "reroute_layers": [0, 2], "bias": 3.0, "final_hidden"},
       {"name": "reroute-all-b0", ..., "reroute_layers": [0..L-1], "bias": 0.0, "final_hidden"}]}
    (`layer_hidden` only in "plain" and "reroute", to keep the files small.)

`final_hidden` is `model(..., output_hidden_states=True).hidden_states[-1]`, which in
transformers 5 is the post-final-norm state for all five families (checked below
against model.model.norm applied to the last layer's hooked output). `layer_hidden`
comes from forward hooks on the decoder layers. Numbers are float32 values printed
with the shortest decimal that round-trips to the same float32.

KV-Embedding re-routing (the reference semantics the Rust engine is tested against)
-----------------------------------------------------------------------------------
Given selected layers S and a scalar bias b, the forward pass is unchanged except in
the self-attention of every layer l in S, which becomes (one sequence of T tokens,
no padding, no cache):

  1. q, k, v are computed exactly as in the unmodified layer: projections (+ qwen2's
     biases), the per-head q/k RMSNorms where the family has them (qwen3, gemma3),
     then RoPE at positions 0..T-1 (q: [Hq, T, D], k and v: [Hkv, T, D]).
  2. For every KV head h, the key and value of the FINAL token (position T-1) are
     prepended as an extra column 0:  K'_h = [k_h[T-1]; k_h[0..T-1]] and
     V'_h = [v_h[T-1]; v_h[0..T-1]]  (T+1 columns). The prefix key keeps the RoPE
     rotation of position T-1 it already has; nothing is re-rotated.
  3. GQA: query head j uses K'/V' of KV head j // (Hq / Hkv), exactly like the
     normal keys (transformers' repeat_kv).
  4. logits[j, i, c] = (q_j[i] . K'_{kv(j)}[c]) * scaling, with the family's own
     scaling (head_dim^-0.5; gemma3: query_pre_attn_scalar^-0.5). No softcapping is
     involved (none of these configs uses attention softcapping).
  5. b is added to column 0 of the logits for every query row i. Column 0 is
     visible to every query (never masked). Columns 1..T (= keys 0..T-1) keep the
     layer's normal mask exactly: key t is visible to query i iff t <= i, and for a
     sliding-window layer additionally t > i - sliding_window (i.e. the window holds
     `sliding_window` keys including the query's own position; this is how
     transformers masks mistral (sliding_window set) and gemma3's
     "sliding_attention" layers; qwen2/qwen3 here have no sliding layers).
  6. P = softmax over the T+1 columns (float32); output_j[i] = P[j, i, :] @ V'_{kv(j)};
     heads are concatenated and go through o_proj as usual (and, for gemma3, the
     usual post_attention_layernorm etc.).
Layers not in S are untouched. `kv_reroute_attention` below is the implementation.

Family notes (transformers 5.23, as verified by this script)
------------------------------------------------------------
* RoPE: all five families use the rotate_half ("NeoX", split-halves) layout on the
  HF weights: x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1] and
  inv_freq[i] = theta^(-2i/head_dim), cos/sin repeated over both halves. Default rope
  type, no scaling. llama theta 5e5, mistral 1e4, qwen2/qwen3 1e6; gemma3 uses
  rope_theta 1e6 on full_attention layers and rope_local_base_freq 1e4 on
  sliding_attention layers.
* qwen3/gemma3: q_norm/k_norm are RMSNorms over head_dim, applied per head after the
  projections and BEFORE RoPE.
* gemma3: embeddings are multiplied by sqrt(hidden_size) (computed in float32);
  RMSNorm computes x / rms(x) * (1 + w) with w stored in the checkpoint (zeros =
  identity); decoder layer: h += post_attention_layernorm(attn(input_layernorm(h)));
  h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h))); MLP is
  down(gelu_tanh(gate(x)) * up(x)) ("gelu_pytorch_tanh"); attention scaling
  query_pre_attn_scalar^-0.5; layer_types (also given as sliding_window_pattern=3).
* llama/mistral/qwen2/qwen3: RMSNorm x / rms(x) * w, MLP down(silu(gate(x)) * up(x)).
* qwen2: use_sliding_window=false, so its sliding_window (4096) is ignored.
* RMSNorm: variance = mean(x^2) over the last dim, x * rsqrt(variance + eps), in fp32.

Self-checks kept in the script: with b = -1e9 re-routing all layers reproduces the
plain pass (atol 1e-5); with b = +1e9 every query attends only to the prefix, so the
attention output of every row equals the final token's value vectors; the patched
attention is called exactly once per selected layer; the mask rebuilt in step 5
equals transformers' own mask; hidden_states[-1] is post-norm; the saved
directories (single file and sharded) reload and reproduce every golden exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

REPO = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO / "engine" / "tests" / "golden"

# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|begin_of_text|>"]
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
TOKENIZER_VOCAB = 300
MODEL_VOCAB = 320

CORPUS = """\
The quick brown fox jumps over the lazy dog.
A small model can still learn the shape of the words in a sentence.
The cat sat on the mat and the dog sat on the log.
Text embeddings map a sentence to a vector of numbers.
The key and the value of the last token are shared with every query.
We read the text, we write the text, and then we read it again.
The weather is nice today, so the children play in the park.
There is a house on the hill and a tree next to the house.
Search engines rank the documents that are closest to the query.
The train leaves the station at seven in the morning.
"""

TEXTS = {
    # 10-13 tokens without BOS, 11-14 with; "é" exercises multi-byte byte tokens.
    "plain": "The cat sat on the mat.",
    "reroute": "We read the text and the query.",
    "reroute-b3": "A dog in the café!",
    "reroute-all-b0": "The cat sat on the mat.",
}


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())  # byte-level: every string is covered, no <unk>
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    assert tok.get_vocab_size() == TOKENIZER_VOCAB, tok.get_vocab_size()
    return tok


def tokenizer_variant(base: Tokenizer, add_bos: bool) -> Tokenizer:
    tok = Tokenizer.from_str(base.to_str())
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos:
        bos = SPECIAL_TOKENS[BOS_ID]
        tok.post_processor = processors.Sequence(
            [
                byte_level,
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)]
                ),
            ]
        )
    else:
        tok.post_processor = byte_level
    return tok


# ----------------------------------------------------------------------------
# Model configs, in the Hub's classic config.json layout
# ----------------------------------------------------------------------------
COMMON = {
    "vocab_size": MODEL_VOCAB,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "use_cache": True,
    "torch_dtype": "float32",
}

GEMMA3_LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]

ARCHS = {
    # Llama-3 style: hidden = heads * head_dim (4 * 8), untied lm_head, rope_theta 5e5.
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "head_dim": 8,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    },
    # Mistral: sliding window 5 over all layers, rope_theta 1e4,
    # head_dim * heads (64) != hidden (32), untied.
    "mistral": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "head_dim": 16,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "sliding_window": 5,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    },
    # Qwen2: q/k/v biases (o_proj has none), tied embeddings, sliding window
    # present but disabled (use_sliding_window false) exactly like the real configs.
    # No head_dim key: head_dim = hidden / heads = 8.
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "hidden_act": "silu",
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 3,
        "tie_word_embeddings": True,
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
    },
    # Qwen3: per-head q_norm/k_norm (before RoPE), no biases, tied,
    # head_dim * heads (64) != hidden (32).
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "head_dim": 16,
        "hidden_act": "silu",
        "attention_bias": False,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 3,
        "tie_word_embeddings": True,
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
    },
    # Gemma3 text (as google/gemma-3-1b): embeddings * sqrt(hidden), (1 + w) RMSNorms,
    # pre/post attention and feed-forward norms, q/k norms, GELU-tanh MLP,
    # query_pre_attn_scalar 32 != head_dim 16, local layers: window 5 and rope 1e4,
    # global layers: rope 1e6. Layer pattern: sliding, sliding, full, sliding.
    "gemma3": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "head_dim": 16,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 32,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "sliding_window": 5,
        "sliding_window_pattern": 3,
        "layer_types": GEMMA3_LAYER_TYPES,
        "attention_bias": False,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "tie_word_embeddings": True,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    },
}

ADDS_BOS = {"llama": True, "mistral": True, "qwen2": False, "qwen3": False, "gemma3": True}
SEEDS = {"llama": 1001, "mistral": 1002, "qwen2": 1003, "qwen3": 1004, "gemma3": 1005}


def reroute_cases(n_layers: int) -> list[tuple[str, list[int], float]]:
    return [
        ("reroute", [1], 1.0),
        ("reroute-b3", [0, 2], 3.0),
        ("reroute-all-b0", list(range(n_layers)), 0.0),
    ]


def expected_windows(arch: str, n_layers: int) -> list[int | None]:
    if arch == "mistral":
        return [5] * n_layers
    if arch == "gemma3":
        return [5 if t == "sliding_attention" else None for t in GEMMA3_LAYER_TYPES]
    return [None] * n_layers


def hub_config(arch: str) -> dict:
    cfg = dict(COMMON)
    cfg.update(ARCHS[arch])
    return dict(sorted(cfg.items()))


# ----------------------------------------------------------------------------
# Random weights
# ----------------------------------------------------------------------------
def randomize(model: torch.nn.Module, seed: int, one_plus_norms: bool) -> None:
    """Re-draw every parameter from a seeded generator (deterministic order)."""
    g = torch.Generator().manual_seed(seed)
    norm_weights = {id(m.weight) for m in model.modules() if "RMSNorm" in type(m).__name__}
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):  # tied weights appear once
            if id(p) in norm_weights:
                u = torch.rand(p.shape, generator=g)
                # effective scale in [0.5, 1.5) either way
                p.copy_(u - 0.5 if one_plus_norms else u + 0.5)
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                assert p.dim() == 2, name
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


# ----------------------------------------------------------------------------
# KV-Embedding re-routing (reference implementation, see module docstring)
# ----------------------------------------------------------------------------
REROUTE = {"layers": frozenset(), "bias": 0.0, "calls": [], "values": {}, "windows": {}}


def visibility(T: int, sliding_window: int | None) -> torch.Tensor:
    """[T, T] bool: may query i attend to key t (causal, optional sliding window)."""
    i = torch.arange(T)[:, None]
    t = torch.arange(T)[None, :]
    vis = t <= i
    if sliding_window is not None:
        vis = vis & (t > i - sliding_window)
    return vis


def kv_reroute_attention(module, query, key, value, attention_mask, *, scaling, sliding_window=None,
                         softcap=None, dropout=0.0, **_kwargs):
    """query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] (after projections, q/k norms, RoPE)."""
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    assert B == 1 and not module.training and softcap is None and dropout == 0.0
    bias = REROUTE["bias"]

    # The layer's own mask over keys 0..T-1, rebuilt explicitly and checked
    # against the additive mask transformers built for this layer (0 = visible).
    vis = visibility(T, sliding_window)
    assert attention_mask is not None and attention_mask.shape[-2:] == (T, T)
    assert torch.equal(attention_mask[0, 0] == 0, vis), "mask mismatch"

    # Step 2: prepend the final token's key/value (per KV head) as column 0.
    k_ext = torch.cat([key[:, :, T - 1 : T, :], key], dim=2)  # [1, Hkv, T+1, D]
    v_ext = torch.cat([value[:, :, T - 1 : T, :], value], dim=2)
    REROUTE["values"][module.layer_idx] = value.detach().clone()

    # Step 3: GQA, query head j -> KV head j // (Hq // Hkv).
    k_ext = k_ext.repeat_interleave(Hq // Hkv, dim=1)  # [1, Hq, T+1, D]
    v_ext = v_ext.repeat_interleave(Hq // Hkv, dim=1)

    # Steps 4-5: scaled logits, + bias on column 0, normal mask on columns 1..T.
    logits = torch.matmul(query, k_ext.transpose(2, 3)) * scaling  # [1, Hq, T, T+1]
    additive = torch.empty(T, T + 1, dtype=torch.float32)
    additive[:, 0] = bias
    additive[:, 1:] = torch.where(vis, 0.0, float("-inf"))
    # Step 6: softmax over T+1 columns, weighted sum of values.
    probs = torch.softmax(logits + additive, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, v_ext)  # [1, Hq, T, D]
    REROUTE["calls"].append(module.layer_idx)
    REROUTE["windows"][module.layer_idx] = sliding_window
    return out.transpose(1, 2).contiguous(), probs


def _dispatching(original):
    def eager_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
        if module.layer_idx in REROUTE["layers"]:
            assert not args
            return kv_reroute_attention(module, query, key, value, attention_mask, **kwargs)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    return eager_attention_forward


# With attn_implementation="eager", each family's attention calls its module-level
# `eager_attention_forward`; replace it by a dispatcher that re-routes selected layers.
for _mod in (modeling_llama, modeling_mistral, modeling_qwen2, modeling_qwen3, modeling_gemma3):
    _mod.eager_attention_forward = _dispatching(_mod.eager_attention_forward)


@contextlib.contextmanager
def rerouted(layers, bias: float):
    REROUTE.update(layers=frozenset(layers), bias=float(bias), calls=[], values={}, windows={})
    try:
        yield
    finally:
        REROUTE.update(layers=frozenset(), bias=0.0)


# ----------------------------------------------------------------------------
# Forward passes
# ----------------------------------------------------------------------------
def run(model, input_ids: list[int]) -> dict:
    """Plain (or, inside `rerouted`, re-routed) forward pass."""
    layers = model.model.layers
    captured: dict[int, torch.Tensor] = {}
    attn_out: dict[int, torch.Tensor] = {}

    def layer_hook(idx):
        def hook(_m, _inp, out):
            captured[idx] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook

    def attn_hook(idx):
        def hook(_m, _inp, out):
            attn_out[idx] = out[0].detach().clone()
        return hook

    handles = [l.register_forward_hook(layer_hook(i)) for i, l in enumerate(layers)]
    handles += [l.self_attn.register_forward_hook(attn_hook(i)) for i, l in enumerate(layers)]
    try:
        with torch.no_grad():
            ids = torch.tensor([input_ids], dtype=torch.long)
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    L = len(layers)
    assert len(hs) == L + 1
    layer_hidden = torch.stack([captured[i][0] for i in range(L)])  # [L, T, H]
    # hidden_states[1..L-1] are the layer outputs; hidden_states[L] is post-final-norm.
    for i in range(L - 1):
        assert torch.equal(hs[i + 1][0], layer_hidden[i]), f"hidden_states[{i + 1}] != layer {i} output"
    with torch.no_grad():
        normed = model.model.norm(layer_hidden[L - 1])
    assert torch.allclose(hs[L][0], normed, atol=1e-6, rtol=0), "hidden_states[-1] is not post-norm"
    assert not torch.allclose(hs[L][0], layer_hidden[L - 1], atol=1e-3), "final norm had no effect?"
    return {
        "embed_output": hs[0][0],
        "layer_hidden": layer_hidden,
        "final_hidden": hs[L][0],
        "attn_out": attn_out,
    }


def load(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    assert model.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model


def check_parsed_config(arch: str, model) -> None:
    """The Hub-style config.json must parse to exactly the intended model."""
    c = model.config
    want = ARCHS[arch]
    L = want["num_hidden_layers"]
    hd = want.get("head_dim", want["hidden_size"] // COMMON["num_attention_heads"])
    attns = [l.self_attn for l in model.model.layers]
    assert len(attns) == L
    for a in attns:
        assert a.head_dim == hd and a.num_key_value_groups == 2
        assert a.q_proj.weight.shape == (4 * hd, want["hidden_size"])
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (2 * hd, want["hidden_size"])
    rp = c.rope_parameters
    if arch == "gemma3":
        assert c.layer_types == GEMMA3_LAYER_TYPES
        assert rp["full_attention"]["rope_theta"] == want["rope_theta"]
        assert rp["sliding_attention"]["rope_theta"] == want["rope_local_base_freq"]
        assert rp["full_attention"]["rope_type"] == rp["sliding_attention"]["rope_type"] == "default"
        for a, lt in zip(attns, GEMMA3_LAYER_TYPES):
            assert a.sliding_window == (5 if lt == "sliding_attention" else None)
            assert a.scaling == 32 ** -0.5
        assert c.hidden_activation == "gelu_pytorch_tanh"
        emb = model.model.embed_tokens
        assert float(emb.embed_scale) == torch.tensor(want["hidden_size"] ** 0.5).item()
        inv = model.model.rotary_emb
        assert torch.allclose(inv.sliding_attention_inv_freq,
                              1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        assert torch.allclose(inv.full_attention_inv_freq,
                              1.0 / 1e6 ** (torch.arange(0, hd, 2).float() / hd))
    else:
        assert rp["rope_theta"] == want["rope_theta"] and rp["rope_type"] == "default"
        for a in attns:
            assert a.scaling == hd ** -0.5
        inv = model.model.rotary_emb.inv_freq
        assert torch.allclose(inv, 1.0 / want["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    if arch == "mistral":
        assert c.sliding_window == 5
    if arch in ("qwen2", "qwen3"):
        assert c.sliding_window is None and set(c.layer_types) == {"full_attention"}
        for a in attns:
            assert a.sliding_window is None
    if arch == "qwen2":
        for a in attns:
            assert a.q_proj.bias is not None and a.k_proj.bias is not None and a.v_proj.bias is not None
            assert a.o_proj.bias is None
    if arch in ("qwen3", "gemma3"):
        for a in attns:
            assert a.q_norm.weight.shape == (hd,) and a.k_norm.weight.shape == (hd,)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == want["tie_word_embeddings"], (arch, tied)


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------
def f32_list(t: torch.Tensor):
    """Nested lists of floats, each the shortest decimal that round-trips as float32."""
    a = t.detach().cpu().numpy().astype(np.float32)
    assert np.isfinite(a).all()
    if a.ndim == 1:
        return [float(str(x)) for x in a]
    return [f32_list(torch.from_numpy(r)) for r in a]


def dump_golden(obj: dict) -> str:
    """JSON with one matrix row per line (compact numbers, readable structure)."""

    def enc(v, indent):
        pad = " " * indent
        if isinstance(v, dict):
            items = [f'{pad} {json.dumps(k)}: {enc(x, indent + 1).lstrip()}' for k, x in v.items()]
            return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(v, list) and v and isinstance(v[0], list):
            return pad + "[\n" + ",\n".join(enc(x, indent + 1) for x in v) + "\n" + pad + "]"
        if isinstance(v, list) and v and isinstance(v[0], dict):
            return pad + "[\n" + ",\n".join(enc(x, indent + 1) for x in v) + "\n" + pad + "]"
        return pad + json.dumps(v, separators=(",", ":"))

    return enc(obj, 0) + "\n"


def write_json(path: Path, obj, golden: bool = False) -> None:
    path.write_text(dump_golden(obj) if golden else json.dumps(obj, indent=2) + "\n")


def make_arch(arch: str, base_tok: Tokenizer) -> None:
    out = GOLDEN_DIR / arch
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    # config.json (Hub layout) and tokenizer.json
    cfg = hub_config(arch)
    write_json(out / "config.json", cfg)
    tok = tokenizer_variant(base_tok, ADDS_BOS[arch])
    tok.save(str(out / "tokenizer.json"))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))

    # Build the model from the parsed config.json, randomise, save weights.
    config = AutoConfig.from_pretrained(out)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize(model, SEEDS[arch], one_plus_norms=(arch == "gemma3"))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = sorted(p.name for p in Path(tmp).iterdir())
        assert "model.safetensors" in files, files
        shutil.copy(Path(tmp) / "model.safetensors", out / "model.safetensors")
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}
    del model

    # Everything below uses the model as reloaded from the written directory.
    model = load(out)
    check_parsed_config(arch, model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    L = config.num_hidden_layers

    cases = []
    plain_by_text = {}
    # plain case
    text = TEXTS["plain"]
    ids = tok.encode(text).ids
    r = run(model, ids)
    plain_by_text[text] = (ids, r)
    cases.append({
        "name": "plain", "text": text, "input_ids": ids,
        "embed_output": f32_list(r["embed_output"]),
        "layer_hidden": f32_list(r["layer_hidden"]),
        "final_hidden": f32_list(r["final_hidden"]),
    })
    # re-routing cases
    for name, layers, bias in reroute_cases(L):
        text = TEXTS[name]
        ids = tok.encode(text).ids
        if text not in plain_by_text:
            plain_by_text[text] = (ids, run(model, ids))
        with rerouted(layers, bias):
            r = run(model, ids)
            assert REROUTE["calls"] == sorted(layers), (REROUTE["calls"], layers)
        plain = plain_by_text[text][1]
        # layers before the first re-routed one are unchanged, the re-routed one differs
        first = min(layers)
        for i in range(first):
            assert torch.equal(r["layer_hidden"][i], plain["layer_hidden"][i])
        assert (r["layer_hidden"][first] - plain["layer_hidden"][first]).abs().max() > 1e-3
        case = {"name": name, "text": text, "input_ids": ids, "reroute_layers": layers, "bias": bias}
        if name == "reroute":  # per-layer states for one re-routed case only (size)
            case["layer_hidden"] = f32_list(r["layer_hidden"])
        case["final_hidden"] = f32_list(r["final_hidden"])
        cases.append(case)

    # Sanity: bias -1e9 on all layers == plain.
    for text, (ids, plain) in plain_by_text.items():
        with rerouted(range(L), -1e9):
            r = run(model, ids)
            assert REROUTE["calls"] == list(range(L))
            # the mask each layer really used (checked against transformers' mask
            # inside kv_reroute_attention) has the intended sliding window
            assert [REROUTE["windows"][i] for i in range(L)] == expected_windows(arch, L), REROUTE["windows"]
        for key in ("layer_hidden", "final_hidden"):
            d = (r[key] - plain[key]).abs().max().item()
            assert d <= 1e-5, (arch, "bias -1e9 differs from plain", key, d)
    # Sanity: bias +1e9 -> every query sees only the prefix: attention rows equal
    # o_proj(value of the final token, per head).
    ids, _ = plain_by_text[TEXTS["plain"]]
    for layer in range(L):
        with rerouted([layer], 1e9):
            r = run(model, ids)
            v = REROUTE["values"][layer]  # [1, Hkv, T, D]
        attn = model.model.layers[layer].self_attn
        v_last = v[0, :, -1, :].repeat_interleave(attn.num_key_value_groups, dim=0).reshape(-1)
        with torch.no_grad():
            expect = attn.o_proj(v_last)
        got = r["attn_out"][layer][0]  # [T, H]
        assert torch.allclose(got, expect.expand_as(got), atol=1e-5), (arch, layer)

    for c in cases:
        T = len(c["input_ids"])
        assert 9 <= T <= 14, (arch, c["name"], T)
        assert max(c["input_ids"]) < TOKENIZER_VOCAB
        assert tok.decode(c["input_ids"], skip_special_tokens=True) == c["text"]
        if ADDS_BOS[arch]:
            assert c["input_ids"][0] == BOS_ID
        win = cfg.get("sliding_window") if arch in ("mistral", "gemma3") else None
        assert win is None or T > win

    golden = {
        "arch": arch,
        "model_type": cfg["model_type"],
        "num_hidden_layers": L,
        "hidden_size": cfg["hidden_size"],
        # per layer: the sliding window its mask uses (null = plain causal)
        "sliding_window_per_layer": expected_windows(arch, L),
        "versions": {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__},
        "cases": cases,
    }
    write_json(out / "golden.json", golden, golden=True)
    verify_reload(out, golden)

    if arch == "llama":
        make_sharded(out, golden)


def verify_reload(model_dir: Path, golden: dict) -> None:
    """Reload the directory from disk and check every golden reproduces exactly."""
    model = load(model_dir)
    parsed = json.loads((model_dir / "golden.json").read_text())
    assert parsed == golden
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for c in parsed["cases"]:
        assert tok.encode(c["text"]).ids == c["input_ids"]
        ctx = rerouted(c["reroute_layers"], c["bias"]) if "reroute_layers" in c else contextlib.nullcontext()
        with ctx:
            r = run(model, c["input_ids"])
        for key in ("final_hidden", "layer_hidden", "embed_output"):
            if key in c:
                want = torch.tensor(c[key], dtype=torch.float32)
                assert torch.equal(r[key], want), (model_dir.name, c["name"], key)


def make_sharded(src: Path, golden: dict) -> None:
    out = GOLDEN_DIR / "llama-sharded"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = load(src)
    total = sum(p.numel() * 4 for p in model.state_dict().values())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size=total // 3)
        names = sorted(p.name for p in Path(tmp).iterdir())
        shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
        assert len(shards) >= 2 and "model.safetensors.index.json" in names, names
        for n in shards + ["model.safetensors.index.json"]:
            shutil.copy(Path(tmp) / n, out / n)
    for n in ("config.json", "tokenizer.json", "golden.json"):
        shutil.copy(src / n, out / n)
    verify_reload(out, golden)


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # deterministic reductions
    base_tok = train_tokenizer()
    for arch in ARCHS:
        make_arch(arch, base_tok)
        print(f"{arch}: ok")
    sizes = {p.relative_to(GOLDEN_DIR): p.stat().st_size for p in sorted(GOLDEN_DIR.rglob("*")) if p.is_file()}
    for p, s in sizes.items():
        print(f"  {s:>8}  {p}")
    total = sum(sizes.values())
    print(f"total {total} bytes")
    assert total < 2_000_000, total
    return 0


if __name__ == "__main__":
    sys.exit(main())
