//! Tokenizers, rebuilt from GGUF metadata (byte-level BPE for llama/qwen2
//! style vocabularies; score-based SentencePiece vocabularies such as Gemma's)
//! or read from a Hugging Face `tokenizer.json`.

use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{replace::Replace, NormalizerWrapper};
use tokenizers::pre_tokenizers::{
    byte_level::ByteLevel, digits::Digits, sequence::Sequence, PreTokenizerWrapper,
};
use tokenizers::Tokenizer;

pub struct TextTokenizer {
    inner: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether the model expects a BOS token in front of every input.
    pub add_bos: bool,
    pub vocab_size: usize,
}

fn md_u32(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    match md.get(key)? {
        Value::U32(v) => Some(*v),
        Value::I32(v) => Some(*v as u32),
        Value::U64(v) => Some(*v as u32),
        Value::I64(v) => Some(*v as u32),
        Value::U16(v) => Some(*v as u32),
        Value::U8(v) => Some(*v as u32),
        _ => None,
    }
}

fn md_bool(md: &HashMap<String, Value>, key: &str) -> Option<bool> {
    match md.get(key)? {
        Value::Bool(b) => Some(*b),
        _ => None,
    }
}

fn md_strings(md: &HashMap<String, Value>, key: &str) -> Option<Vec<String>> {
    match md.get(key)? {
        Value::Array(a) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn md_f32s(md: &HashMap<String, Value>, key: &str) -> Option<Vec<f32>> {
    match md.get(key)? {
        Value::Array(a) => a
            .iter()
            .map(|v| match v {
                Value::F32(x) => Some(*x),
                Value::F64(x) => Some(*x as f32),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

impl TextTokenizer {
    pub fn from_gguf(
        content: &candle_core::quantized::gguf_file::Content,
        path: &Path,
    ) -> Result<TextTokenizer> {
        let md = &content.metadata;
        let kind = match md.get("tokenizer.ggml.model") {
            Some(Value::String(s)) => s.to_lowercase(),
            _ => {
                return Err(EngineError::TokenizerMismatch(format!(
                    "'{}' has no embedded tokenizer (tokenizer.ggml.model)",
                    path.display()
                )))
            }
        };
        let tokens = md_strings(md, "tokenizer.ggml.tokens").ok_or_else(|| {
            EngineError::TokenizerMismatch("GGUF tokenizer has no token list".into())
        })?;
        let bos = md_u32(md, "tokenizer.ggml.bos_token_id");
        let eos = md_u32(md, "tokenizer.ggml.eos_token_id");
        let inner = match kind.as_str() {
            "gpt2" => {
                use candle_core::quantized::tokenizer::TokenizerFromGguf;
                let mut tk = Tokenizer::from_gguf(content)
                    .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
                let pre = match md.get("tokenizer.ggml.pre") {
                    Some(Value::String(s)) => s.clone(),
                    _ => "gpt2".into(),
                };
                match pre.as_str() {
                    "qwen2" | "llama3" | "llama-bpe" | "smaug-bpe" => {}
                    // SmolLM: digits split one by one, then GPT-2 byte-level
                    // without a prefix space.
                    "smollm" => {
                        let seq: PreTokenizerWrapper = Sequence::new(vec![
                            Digits::new(true).into(),
                            ByteLevel::new(false, true, true).into(),
                        ])
                        .into();
                        tk.with_pre_tokenizer(Some(seq));
                    }
                    _ => {
                        tk.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
                    }
                }
                // Byte-level post-processing only adjusts offsets; we add BOS
                // ourselves, so drop the template to keep encoding predictable.
                tk.with_post_processor(None::<tokenizers::processors::PostProcessorWrapper>);
                tk
            }
            "llama" => spm_from_scores(md, &tokens)?,
            other => {
                return Err(EngineError::TokenizerMismatch(format!(
                    "GGUF tokenizer model '{other}' is not supported (gpt2, llama)"
                )))
            }
        };
        let add_bos = md_bool(md, "tokenizer.ggml.add_bos_token").unwrap_or(kind == "llama");
        Ok(TextTokenizer {
            vocab_size: tokens.len(),
            inner,
            bos,
            eos,
            add_bos,
        })
    }

    pub fn from_file(path: &Path, config: &serde_json::Value) -> Result<TextTokenizer> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        let bos = config
            .get("bos_token_id")
            .and_then(|v| v.as_u64())
            .map(|v| v as u32);
        let eos = config
            .get("eos_token_id")
            .and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(|x| x.as_u64())))
            .map(|v| v as u32);
        // Does the tokenizer's own post-processor put BOS in front? Then the
        // model expects it.
        let probe = inner
            .encode("a", true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let add_bos = bos.is_some() && probe.get_ids().first().copied() == bos;
        inner.with_post_processor(None::<tokenizers::processors::PostProcessorWrapper>);
        let vocab_size = inner.get_vocab_size(true);
        Ok(TextTokenizer {
            inner,
            bos,
            eos,
            add_bos,
            vocab_size,
        })
    }

    /// Token ids of a piece of text, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Many pieces at once (parallel inside the tokenizers crate).
    pub fn encode_many(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// SentencePiece (Gemma, Llama 2) vocabularies in GGUF carry tokens and
/// scores but no merges. BPE merges are recovered the way Hugging Face's
/// SentencePiece converter does: every split of a token into two tokens of
/// the vocabulary is a merge, ranked by the merged token's score.
fn spm_from_scores(md: &HashMap<String, Value>, tokens: &[String]) -> Result<Tokenizer> {
    let scores = md_f32s(md, "tokenizer.ggml.scores").unwrap_or_else(|| vec![0.0; tokens.len()]);
    let types: Vec<u32> = match md.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::I32(x) => *x as u32,
                Value::U32(x) => *x,
                _ => 1,
            })
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: HashMap<String, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut merges: Vec<(f32, u32, String, String)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        // Only normal tokens are built by merges (1 = normal in llama.cpp).
        if types.get(id).copied().unwrap_or(1) != 1 || tok.chars().count() < 2 {
            continue;
        }
        for (split, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(split);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merges.push((
                    scores.get(id).copied().unwrap_or(0.0),
                    id as u32,
                    l.to_string(),
                    r.to_string(),
                ));
            }
        }
    }
    // Higher score first; ties by the merged token's id, then by the left
    // part's id (as the HF converter does).
    merges.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
            .then(vocab[&a.2].cmp(&vocab[&b.2]))
    });
    let merges: Vec<(String, String)> = merges.into_iter().map(|(_, _, l, r)| (l, r)).collect();
    let unk = md_u32(md, "tokenizer.ggml.unknown_token_id")
        .and_then(|i| tokens.get(i as usize))
        .cloned();
    let vocab: tokenizers::models::bpe::Vocab = vocab.into_iter().collect();
    let mut b = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    if let Some(u) = unk {
        b = b.unk_token(u);
    }
    let bpe = b
        .build()
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    let mut tk = Tokenizer::new(bpe);
    let mut norms: Vec<NormalizerWrapper> = Vec::new();
    if md_bool(md, "tokenizer.ggml.add_space_prefix").unwrap_or(false) {
        norms.push(tokenizers::normalizers::prepend::Prepend::new("▁".into()).into());
    }
    norms.push(
        Replace::new(" ", "▁")
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?
            .into(),
    );
    tk.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norms)))
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    // Control / user-defined tokens (e.g. <start_of_turn>) are matched whole.
    let specials: Vec<tokenizers::AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(_, t)| tokenizers::AddedToken::from(t.clone(), true))
        .collect();
    tk.add_special_tokens(specials)
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    tk.with_decoder(Some(tokenizers::decoders::sequence::Sequence::new(vec![
        tokenizers::decoders::DecoderWrapper::Replace(
            Replace::new("▁", " ").map_err(|e| EngineError::Tokenizer(e.to_string()))?,
        ),
        tokenizers::decoders::DecoderWrapper::ByteFallback(
            tokenizers::decoders::byte_fallback::ByteFallback::new(),
        ),
        tokenizers::decoders::DecoderWrapper::Fuse(tokenizers::decoders::fuse::Fuse::new()),
    ])));
    Ok(tk)
}
