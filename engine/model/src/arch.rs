//! One decoder, a table of per-architecture differences (the llama.cpp way,
//! rather than a copied file per model family).

use crate::error::{EngineError, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Family {
    pub fn parse(name: &str, path: &Path) -> Result<Family> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "llama" | "llamaforcausallm" | "smollm2" | "smollm" => Family::Llama,
            "mistral" | "mistralforcausallm" => Family::Mistral,
            "qwen2" | "qwen2forcausallm" => Family::Qwen2,
            "qwen3" | "qwen3forcausallm" => Family::Qwen3,
            "gemma3" | "gemma3_text" | "gemma3forcausallm" | "gemma3forconditionalgeneration" => {
                Family::Gemma3
            }
            other => {
                return Err(EngineError::UnsupportedArch {
                    arch: other.to_string(),
                    path: path.to_path_buf(),
                })
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    GeluTanh,
}

/// RoPE frequency scaling (applied to the inverse frequencies).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (Gemma 3 global layers of the larger models).
    Linear {
        factor: f32,
    },
    /// Llama 3.1 style wavelength-dependent scaling.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: f32,
    },
}

/// Everything the shared decoder needs to know about one model.
#[derive(Debug, Clone)]
pub struct ArchConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
    /// Gemma 3 local (sliding) layers use their own base frequency.
    pub rope_local_theta: Option<f32>,
    pub rope_scaling: RopeScaling,
    /// GGUF llama/mistral weights are permuted for interleaved (GPT-J) RoPE;
    /// every Hugging Face checkpoint and the other GGUF families use the
    /// rotate-half (NeoX) layout.
    pub rope_interleaved: bool,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    /// Hugging Face Gemma stores norm weights as `w` and applies `(1 + w)`;
    /// llama.cpp adds the 1 when converting to GGUF.
    pub norm_plus_one: bool,
    /// Gemma 3: extra norms after attention and after the MLP.
    pub sandwich_norm: bool,
    pub embed_scale: Option<f32>,
    pub activation: Activation,
    pub attn_scale: f32,
    pub sliding_window: Option<usize>,
    /// Per layer: does it use the sliding window?
    pub layer_sliding: Vec<bool>,
    pub max_position: usize,
}

impl ArchConfig {
    /// Fill in the per-family differences once the shape is known.
    fn finish(mut self, from_gguf: bool) -> Self {
        let f = self.family;
        self.rope_interleaved = from_gguf && matches!(f, Family::Llama | Family::Mistral);
        self.qkv_bias = f == Family::Qwen2;
        self.qk_norm = matches!(f, Family::Qwen3 | Family::Gemma3);
        self.norm_plus_one = f == Family::Gemma3 && !from_gguf;
        self.sandwich_norm = f == Family::Gemma3;
        if f == Family::Gemma3 {
            self.embed_scale = Some((self.hidden as f32).sqrt());
            self.activation = Activation::GeluTanh;
        }
        if self.layer_sliding.len() != self.n_layers {
            self.layer_sliding = vec![self.sliding_window.is_some(); self.n_layers];
        }
        self
    }

    fn base(family: Family) -> ArchConfig {
        ArchConfig {
            family,
            vocab_size: 0,
            hidden: 0,
            intermediate: 0,
            n_layers: 0,
            n_heads: 0,
            n_kv_heads: 0,
            head_dim: 0,
            rms_eps: 1e-6,
            rope_theta: 10_000.0,
            rope_local_theta: None,
            rope_scaling: RopeScaling::None,
            rope_interleaved: false,
            qkv_bias: false,
            qk_norm: false,
            norm_plus_one: false,
            sandwich_norm: false,
            embed_scale: None,
            activation: Activation::Silu,
            attn_scale: 1.0,
            sliding_window: None,
            layer_sliding: Vec::new(),
            max_position: 4096,
        }
    }

    /// From GGUF metadata (`<arch>.block_count`, ...).
    pub fn from_gguf(
        md: &std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
        path: &Path,
    ) -> Result<ArchConfig> {
        use candle_core::quantized::gguf_file::Value as V;
        let corrupt = |reason: String| EngineError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let arch = match md.get("general.architecture") {
            Some(V::String(s)) => s.clone(),
            _ => {
                return Err(EngineError::NotAModel {
                    path: path.into(),
                    reason: "GGUF without general.architecture".into(),
                })
            }
        };
        let family = Family::parse(&arch, path)?;
        let num = |key: &str| -> Option<f64> {
            match md.get(&format!("{arch}.{key}"))? {
                V::U8(v) => Some(*v as f64),
                V::I8(v) => Some(*v as f64),
                V::U16(v) => Some(*v as f64),
                V::I16(v) => Some(*v as f64),
                V::U32(v) => Some(*v as f64),
                V::I32(v) => Some(*v as f64),
                V::U64(v) => Some(*v as f64),
                V::I64(v) => Some(*v as f64),
                V::F32(v) => Some(*v as f64),
                V::F64(v) => Some(*v),
                _ => None,
            }
        };
        let req =
            |key: &str| num(key).ok_or_else(|| corrupt(format!("missing metadata {arch}.{key}")));
        let mut c = ArchConfig::base(family);
        c.hidden = req("embedding_length")? as usize;
        c.n_layers = req("block_count")? as usize;
        c.intermediate = req("feed_forward_length")? as usize;
        c.n_heads = req("attention.head_count")? as usize;
        c.n_kv_heads = num("attention.head_count_kv")
            .map(|v| v as usize)
            .unwrap_or(c.n_heads);
        c.head_dim = num("attention.key_length")
            .map(|v| v as usize)
            .unwrap_or(c.hidden / c.n_heads.max(1));
        c.rms_eps = num("attention.layer_norm_rms_epsilon").unwrap_or(1e-6);
        c.rope_theta = num("rope.freq_base").unwrap_or(10_000.0) as f32;
        c.max_position = num("context_length").unwrap_or(4096.0) as usize;
        c.vocab_size = num("vocab_size").map(|v| v as usize).unwrap_or(0);
        c.sliding_window = num("attention.sliding_window")
            .map(|v| v as usize)
            .filter(|&w| w > 0);
        if let Some(factor) = num("rope.scaling.factor").filter(|&f| f > 1.0) {
            let kind = match md.get(&format!("{arch}.rope.scaling.type")) {
                Some(V::String(s)) => s.clone(),
                _ => "linear".into(),
            };
            if kind == "linear" {
                c.rope_scaling = RopeScaling::Linear {
                    factor: factor as f32,
                };
            }
        }
        c.attn_scale = 1.0 / (c.head_dim as f32).sqrt();
        if family == Family::Gemma3 {
            // llama.cpp: every 6th layer is global; local layers use base 10k.
            c.rope_local_theta = Some(10_000.0);
            c.layer_sliding = (0..c.n_layers).map(|i| (i + 1) % 6 != 0).collect();
            if c.sliding_window.is_none() {
                c.sliding_window = Some(512);
            }
        } else if family == Family::Llama && c.sliding_window.is_some() {
            c.family = Family::Mistral;
        }
        Ok(c.finish(true))
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf_config(v: &Value, path: &Path) -> Result<ArchConfig> {
        // Multimodal Gemma 3 nests the language model config.
        let v = v.get("text_config").filter(|t| t.is_object()).unwrap_or(v);
        let arch = v
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| {
                v.get("architectures")
                    .and_then(|a| a.get(0))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .ok_or_else(|| EngineError::NotAModel {
                path: path.into(),
                reason: "config.json has no model_type".into(),
            })?;
        let family = Family::parse(&arch, path)?;
        let num = |k: &str| v.get(k).and_then(Value::as_f64);
        let req = |k: &str| {
            num(k).ok_or_else(|| EngineError::Corrupt {
                path: path.into(),
                reason: format!("config.json lacks {k}"),
            })
        };
        let mut c = ArchConfig::base(family);
        c.hidden = req("hidden_size")? as usize;
        c.n_layers = req("num_hidden_layers")? as usize;
        c.intermediate = req("intermediate_size")? as usize;
        c.n_heads = req("num_attention_heads")? as usize;
        c.n_kv_heads = num("num_key_value_heads")
            .map(|x| x as usize)
            .unwrap_or(c.n_heads);
        c.head_dim = num("head_dim")
            .map(|x| x as usize)
            .unwrap_or(c.hidden / c.n_heads.max(1));
        c.vocab_size = req("vocab_size")? as usize;
        c.rms_eps = num("rms_norm_eps").unwrap_or(1e-6);
        c.rope_theta = num("rope_theta").unwrap_or(10_000.0) as f32;
        c.max_position = num("max_position_embeddings").unwrap_or(4096.0) as usize;
        c.attn_scale = 1.0 / (c.head_dim as f32).sqrt();
        if let Some(rs) = v.get("rope_scaling").filter(|r| r.is_object()) {
            let kind = rs
                .get("rope_type")
                .or_else(|| rs.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let f = |k: &str, d: f64| rs.get(k).and_then(Value::as_f64).unwrap_or(d) as f32;
            c.rope_scaling = match kind {
                "linear" => RopeScaling::Linear {
                    factor: f("factor", 1.0),
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: f("factor", 8.0),
                    low_freq_factor: f("low_freq_factor", 1.0),
                    high_freq_factor: f("high_freq_factor", 4.0),
                    original_max_position: f("original_max_position_embeddings", 8192.0),
                },
                "default" | "" => RopeScaling::None,
                other => {
                    return Err(EngineError::invalid(
                        "rope_scaling",
                        format!("type '{other}' is not supported"),
                    ))
                }
            };
        }
        let sliding = num("sliding_window").map(|x| x as usize).filter(|&w| w > 0);
        match family {
            Family::Mistral => c.sliding_window = sliding,
            Family::Qwen2 | Family::Qwen3 => {
                if v.get("use_sliding_window")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
                {
                    c.sliding_window = sliding;
                    let max_window_layers =
                        num("max_window_layers").unwrap_or(c.n_layers as f64) as usize;
                    c.layer_sliding = (0..c.n_layers).map(|i| i >= max_window_layers).collect();
                }
            }
            Family::Gemma3 => {
                c.sliding_window = sliding.or(Some(512));
                c.rope_local_theta = Some(num("rope_local_base_freq").unwrap_or(10_000.0) as f32);
                if let Some(q) = num("query_pre_attn_scalar") {
                    c.attn_scale = 1.0 / (q as f32).sqrt();
                }
                c.layer_sliding = match v.get("layer_types").and_then(Value::as_array) {
                    Some(types) => types
                        .iter()
                        .map(|t| t.as_str() == Some("sliding_attention"))
                        .collect(),
                    None => {
                        let pattern = num("sliding_window_pattern").unwrap_or(6.0) as usize;
                        (0..c.n_layers)
                            .map(|i| (i + 1) % pattern.max(1) != 0)
                            .collect()
                    }
                };
            }
            Family::Llama => {}
        }
        Ok(c.finish(false))
    }

    /// RoPE base for a layer (Gemma 3 local layers differ).
    pub fn layer_rope_theta(&self, layer: usize) -> f32 {
        match (self.rope_local_theta, self.layer_sliding.get(layer)) {
            (Some(t), Some(true)) => t,
            _ => self.rope_theta,
        }
    }

    /// RoPE scaling for a layer: Gemma 3 scales only its global layers.
    pub fn layer_rope_scaling(&self, layer: usize) -> RopeScaling {
        if self.family == Family::Gemma3 && self.layer_sliding.get(layer) == Some(&true) {
            RopeScaling::None
        } else {
            self.rope_scaling.clone()
        }
    }

    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        if self.layer_sliding.get(layer).copied().unwrap_or(false) {
            self.sliding_window
        } else {
            None
        }
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| {
            Err(EngineError::Corrupt {
                path: path.into(),
                reason,
            })
        };
        if self.hidden == 0 || self.n_layers == 0 || self.n_heads == 0 || self.head_dim == 0 {
            return bad("zero-sized model dimensions".into());
        }
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return bad(format!(
                "{} heads not divisible by {} KV heads",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("odd head dimension {}", self.head_dim));
        }
        Ok(())
    }
}
