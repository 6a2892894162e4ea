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
    /// The special tokens the model's own tokenizer puts around a text
    /// (Hugging Face's post-processor: `[CLS]` … `[SEP]` for BERT, BOS, an
    /// EOS some embedding models end with; GGUF: BOS and EOS as its
    /// `add_bos_token` / `add_eos_token` say). The `native` method wraps
    /// every input in them, as the model was trained to read it.
    pub specials: (Vec<u32>, Vec<u32>),
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
                // candle reads the vocabulary and merges and picks the
                // pre-tokenizer; the rest is set here as llama.cpp does it:
                // no normalizer (candle puts NFC on Qwen2, as Hugging Face's
                // tokenizer.json does, but llama.cpp reads `e` + U+0301 as
                // two characters) and the added tokens of `added_tokens`.
                let built = Tokenizer::from_gguf(content)
                    .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
                let mut tk = Tokenizer::new(built.get_model().clone());
                tk.with_pre_tokenizer(built.get_pre_tokenizer().cloned());
                tk.with_decoder(built.get_decoder().cloned());
                added_tokens(&mut tk, md, &tokens)?;
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
        let add_eos = md_bool(md, "tokenizer.ggml.add_eos_token").unwrap_or(false);
        let specials = (
            bos.filter(|_| add_bos).into_iter().collect(),
            eos.filter(|_| add_eos).into_iter().collect(),
        );
        Ok(TextTokenizer {
            specials,
            vocab_size: tokens.len(),
            inner,
            bos,
            eos,
            add_bos,
        })
    }

    /// The tokenizer of a model alone, without its weights: a GGUF file's
    /// embedded vocabulary, or a Hugging Face directory's `tokenizer.json`
    /// (with its `config.json` for BOS and EOS).
    pub fn open(path: &Path) -> Result<TextTokenizer> {
        let io = |e: std::io::Error| EngineError::Tokenizer(format!("{}: {e}", path.display()));
        if path.is_dir() {
            return TextTokenizer::from_hf_dir(path);
        }
        let mut f = std::fs::File::open(path).map_err(io)?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut f)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        TextTokenizer::from_gguf(&content, path)
    }

    /// A Hugging Face directory's tokenizer: its `tokenizer.json`, with BOS
    /// and EOS from its `config.json` (if that reads).
    pub fn from_hf_dir(dir: &Path) -> Result<TextTokenizer> {
        let tk = dir.join("tokenizer.json");
        if !tk.is_file() {
            return Err(EngineError::NotAModel {
                path: dir.to_path_buf(),
                reason: "no tokenizer.json beside config.json".into(),
            });
        }
        let config: serde_json::Value = match std::fs::read(dir.join("config.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        };
        TextTokenizer::from_file(&tk, &config)
    }

    pub fn from_file(path: &Path, config: &serde_json::Value) -> Result<TextTokenizer> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
        // Padding and truncation are the engine's to do (batches are padded
        // by the model, texts cut with a notice): a tokenizer.json that
        // pads every text to a fixed length or cuts it silently would
        // change what is embedded.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
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
        let plain = inner
            .encode("a", false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let specials = around(probe.get_ids(), plain.get_ids());
        inner.with_post_processor(None::<tokenizers::processors::PostProcessorWrapper>);
        // A text that spells a special token is text (as for GGUF files).
        inner.set_encode_special_tokens(true);
        let vocab_size = inner.get_vocab_size(true);
        Ok(TextTokenizer {
            inner,
            bos,
            eos,
            add_bos,
            specials,
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

    /// Many pieces at once, each with its tokens' byte ranges in the piece
    /// (a token holding part of a character covers the whole character).
    pub fn encode_many_with_offsets(
        &self,
        texts: &[&str],
    ) -> Result<Vec<(Vec<u32>, Vec<(usize, usize)>)>> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(encs
            .into_iter()
            .map(|e| (e.get_ids().to_vec(), e.get_offsets().to_vec()))
            .collect())
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

/// What a post-processor put around `plain` to make `full`: the ids before
/// and after the first place `plain` occurs in `full` (nothing where it does
/// not occur, as for a processor that rewrites the text's own ids).
fn around(full: &[u32], plain: &[u32]) -> (Vec<u32>, Vec<u32>) {
    if plain.is_empty() || plain.len() > full.len() {
        return (Vec::new(), Vec::new());
    }
    match full.windows(plain.len()).position(|w| w == plain) {
        Some(at) => (full[..at].to_vec(), full[at + plain.len()..].to_vec()),
        None => (Vec::new(), Vec::new()),
    }
}

/// SentencePiece (Gemma, Llama 2) vocabularies in GGUF carry tokens and
/// scores but no merges. BPE merges are recovered the way Hugging Face's
/// SentencePiece converter does: every split of a token into two tokens of
/// the vocabulary is a merge, ranked by the merged token's score.
fn spm_from_scores(md: &HashMap<String, Value>, tokens: &[String]) -> Result<Tokenizer> {
    let scores = md_f32s(md, "tokenizer.ggml.scores").unwrap_or_else(|| vec![0.0; tokens.len()]);
    let types = token_types(md, tokens.len());
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
    added_tokens(&mut tk, md, tokens)?;
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

/// llama.cpp's token types (`tokenizer.ggml.token_type`): 1 normal,
/// 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. Missing: normal.
fn token_types(md: &HashMap<String, Value>, n: usize) -> Vec<u32> {
    match md.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::I32(x) => *x as u32,
                Value::U32(x) => *x,
                _ => 1,
            })
            .collect(),
        _ => vec![1; n],
    }
}

/// The tokens matched whole in a text before the model's own splitting, as
/// llama.cpp tokenizes text (`parse_special = false`): user-defined tokens
/// (Qwen's `<tool_call>`) are; control tokens (`<|endoftext|>`,
/// `<start_of_turn>`, BOS, EOS) are not. A text that spells a control
/// token is text, tokenized like any other: no input can inject one.
/// Control tokens are registered as special (for `decode` to skip them) and
/// the tokenizer told to read them as text.
fn added_tokens(tk: &mut Tokenizer, md: &HashMap<String, Value>, tokens: &[String]) -> Result<()> {
    let types = token_types(md, tokens.len());
    // llama.cpp also reads a user-defined token whose text is one of its
    // end-of-generation or fill-in-the-middle markers as a control token
    // (Gemma 3's `</s>` is user-defined in its GGUF).
    let control =
        |tok: &str, ty: u32| ty == 3 || (ty == 4 && LLAMA_CPP_CONTROL_TEXTS.contains(&tok));
    let of_type = |user_defined: bool, special: bool| -> Vec<tokenizers::AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(tok, &ty)| {
                if user_defined {
                    ty == 4 && !control(tok, ty)
                } else {
                    control(tok, ty)
                }
            })
            .map(|(tok, _)| tokenizers::AddedToken::from(tok.clone(), special))
            .collect()
    };
    let err = |e: tokenizers::Error| EngineError::Tokenizer(e.to_string());
    tk.add_tokens(of_type(true, false)).map_err(err)?;
    tk.add_special_tokens(of_type(false, true)).map_err(err)?;
    tk.set_encode_special_tokens(true);
    Ok(())
}

/// The token texts llama.cpp (llama-vocab.cpp, as of llama-cpp-python
/// 0.3.36) makes control tokens whatever their GGUF type: its end-of-turn,
/// end-of-generation and fill-in-the-middle markers.
const LLAMA_CPP_CONTROL_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
    "<|eom_id|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "</s>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "[e~[",
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<PAD>",
    "[PAD]",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];
