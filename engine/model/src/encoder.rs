//! Encoders: BERT-family models (bidirectional attention, WordPiece
//! vocabulary, learned absolute positions) from a Hugging Face directory
//! (`config.json`, `*.safetensors`, `tokenizer.json`). The forward pass is
//! candle-transformers' BERT; how the model's embedding is made from its
//! states (pooling, prompts, length) is read by kvembed-core from the
//! sentence-transformers files beside the weights.
//!
//! Batches are right-padded, as for the decoder: sequence `b` occupies
//! positions `0..len[b]`, and the attention mask keeps padding out of every
//! real token's attention.

use crate::error::{EngineError, Result};
use crate::loader::safetensors_files;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The encoder families this engine runs. RoBERTa-style models (XLM-R,
/// bge-m3, multilingual e5) number their positions from the padding id on,
/// which this forward pass does not, so they are refused rather than run
/// wrongly.
pub const ENCODER_FAMILIES: &[&str] = &["bert"];

/// What `config.json` says of an encoder, as far as the engine needs it.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// `config.json`'s `model_type` (`bert`).
    pub family: String,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Rows of the position table: the longest input, special tokens included.
    pub max_position: usize,
    pub vocab_size: usize,
}

/// Whether the Hugging Face directory `dir` holds an encoder (by its
/// `config.json`'s `model_type`, else its `architectures`), so that the
/// caller loads it with [`Encoder::load`] instead of the decoder.
pub fn is_encoder_dir(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let model_type = v.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
    let encoder_types = [
        "bert",
        "roberta",
        "xlm-roberta",
        "distilbert",
        "mpnet",
        "nomic_bert",
        "new",
        "modernbert",
    ];
    if encoder_types.contains(&model_type) {
        return true;
    }
    v.get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| {
            a.iter().filter_map(|x| x.as_str()).any(|x| {
                x.starts_with("Bert") || x.contains("Roberta") || x.starts_with("DistilBert")
            })
        })
}

pub struct Encoder {
    model: BertModel,
    pub cfg: EncoderConfig,
    device: Device,
    dtype: DType,
    /// Forward passes run (the engine's status reports it).
    pub passes: AtomicU64,
}

impl Encoder {
    /// Load the encoder in `dir` onto `device`, its weights in `dtype`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Encoder> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| EngineError::io(&cfg_path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| EngineError::Corrupt {
                path: cfg_path.clone(),
                reason: e.to_string(),
            })?;
        let family = v
            .get("model_type")
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_string();
        if !ENCODER_FAMILIES.contains(&family.as_str()) {
            return Err(EngineError::UnsupportedArch {
                arch: if family.is_empty() {
                    "an encoder without model_type".into()
                } else {
                    family
                },
                path: dir.to_path_buf(),
            });
        }
        let config: Config =
            serde_json::from_value(v.clone()).map_err(|e| EngineError::Corrupt {
                path: cfg_path.clone(),
                reason: format!("not a BERT config: {e}"),
            })?;
        if config.hidden_size == 0
            || config.num_hidden_layers == 0
            || config.num_attention_heads == 0
            || config.hidden_size % config.num_attention_heads != 0
            || config.max_position_embeddings == 0
        {
            return Err(EngineError::Corrupt {
                path: cfg_path,
                reason: format!(
                    "hidden size {} with {} heads, {} layers, {} positions",
                    config.hidden_size,
                    config.num_attention_heads,
                    config.num_hidden_layers,
                    config.max_position_embeddings
                ),
            });
        }
        let files = safetensors_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; kvembed never writes
        // model files, and users must not modify them while loaded.
        let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
            .map_err(|e| EngineError::Corrupt {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let model = BertModel::load(vb, &config).map_err(|e| EngineError::Corrupt {
            path: dir.to_path_buf(),
            reason: format!("missing or misshapen BERT weights: {e}"),
        })?;
        Ok(Encoder {
            model,
            cfg: EncoderConfig {
                family,
                hidden: config.hidden_size,
                n_layers: config.num_hidden_layers,
                n_heads: config.num_attention_heads,
                max_position: config.max_position_embeddings,
                vocab_size: config.vocab_size,
            },
            device: device.clone(),
            dtype,
            passes: AtomicU64::new(0),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Final hidden states `[B, T, D]` (f32) of a right-padded batch:
    /// `seqs[b]` are sequence `b`'s token ids, special tokens included.
    pub fn forward(&self, seqs: &[Vec<u32>]) -> Result<Tensor> {
        let b = seqs.len();
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if b == 0 || seqs.iter().any(Vec::is_empty) {
            return Err(EngineError::invalid("batch", "an empty sequence"));
        }
        if t > self.cfg.max_position {
            return Err(EngineError::invalid(
                "input",
                format!(
                    "{t} tokens, more than the encoder's {} positions",
                    self.cfg.max_position
                ),
            ));
        }
        if let Some(&id) = seqs
            .iter()
            .flatten()
            .find(|&&id| id as usize >= self.cfg.vocab_size)
        {
            return Err(EngineError::Other(format!(
                "token id {id} outside the encoder's vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        for (i, s) in seqs.iter().enumerate() {
            ids[i * t..i * t + s.len()].copy_from_slice(s);
            mask[i * t..i * t + s.len()]
                .iter_mut()
                .for_each(|m| *m = 1.0);
        }
        let ids = Tensor::from_vec(ids, (b, t), &self.device)?;
        let types = ids.zeros_like()?;
        let mask = Tensor::from_vec(mask, (b, t), &self.device)?;
        let hidden = self.model.forward(&ids, &types, Some(&mask))?;
        self.passes.fetch_add(1, Ordering::Relaxed);
        Ok(hidden.to_dtype(DType::F32)?)
    }
}
