//! Encoders: BERT-family models (bidirectional attention, WordPiece
//! vocabulary, learned absolute positions) from a Hugging Face directory
//! (`config.json`, `*.safetensors`, `tokenizer.json`). How the model's
//! embedding is made from its states (pooling, prompts, length) is read by
//! kvembed-core from the sentence-transformers files beside the weights.
//!
//! On the CPU the forward pass is the engine's own ([`CpuBert`]): the real
//! tokens of every sequence of a batch packed into one matrix, so each
//! projection is one f32 product over all of them (no padding computed),
//! and attention per sequence and head on the same f32 products. On a GPU
//! it is candle-transformers' BERT. Either way the states are returned
//! right-padded, as the decoder's: sequence `b` at positions `0..len[b]`.

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

enum Forward {
    Cpu(CpuBert),
    Candle(BertModel),
}

pub struct Encoder {
    model: Forward,
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
        let misshapen = |e: candle_core::Error| EngineError::Corrupt {
            path: dir.to_path_buf(),
            reason: format!("missing or misshapen BERT weights: {e}"),
        };
        let model = if device.is_cpu() {
            Forward::Cpu(CpuBert::load(&vb, &config).map_err(misshapen)?)
        } else {
            Forward::Candle(BertModel::load(vb, &config).map_err(misshapen)?)
        };
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

    /// The products it runs on: the engine's f32 kernels on the CPU,
    /// candle's elsewhere.
    pub fn kernel(&self) -> String {
        match &self.model {
            Forward::Cpu(_) => "f32".into(),
            Forward::Candle(_) => format!("candle-{:?}", self.dtype).to_lowercase(),
        }
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
        let hidden = match &self.model {
            Forward::Cpu(m) => {
                let d = self.cfg.hidden;
                let packed = m.forward(seqs);
                let mut out = vec![0f32; b * t * d];
                let mut at = 0;
                for (i, s) in seqs.iter().enumerate() {
                    let n = s.len() * d;
                    out[i * t * d..i * t * d + n].copy_from_slice(&packed[at..at + n]);
                    at += n;
                }
                Tensor::from_vec(out, (b, t, d), &self.device)?
            }
            Forward::Candle(m) => {
                // Right-padded ids and the mask that keeps padding out.
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
                m.forward(&ids, &types, Some(&mask))?.to_dtype(DType::F32)?
            }
        };
        self.passes.fetch_add(1, Ordering::Relaxed);
        Ok(hidden)
    }
}

/// A dense layer with its weight transposed for [`crate::matmul::matmul`]:
/// `wt[in, out]`, row-major.
struct Dense {
    wt: Vec<f32>,
    bias: Vec<f32>,
    n: usize,
}

impl Dense {
    /// The Linear `prefix` (`weight [out, in]`, `bias [out]`); several
    /// Linears of the same input are fused into one product by
    /// concatenating their outputs.
    fn load(
        vb: &candle_nn::VarBuilder,
        prefixes: &[&str],
        k: usize,
        n_each: usize,
    ) -> candle_core::Result<Dense> {
        let n = n_each * prefixes.len();
        let mut wt = vec![0f32; k * n];
        let mut bias = Vec::with_capacity(n);
        for (p, prefix) in prefixes.iter().enumerate() {
            let w = vb
                .pp(*prefix)
                .get((n_each, k), "weight")?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            for (o, row) in w.iter().enumerate() {
                for (i, &x) in row.iter().enumerate() {
                    wt[i * n + p * n_each + o] = x;
                }
            }
            bias.extend(
                vb.pp(*prefix)
                    .get(n_each, "bias")?
                    .to_dtype(DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        Ok(Dense { wt, bias, n })
    }

    fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let k = self.wt.len() / self.n;
        let mut y = crate::matmul::matmul(x, rows, k, &self.wt, self.n);
        for row in y.chunks_exact_mut(self.n) {
            row.iter_mut().zip(&self.bias).for_each(|(v, b)| *v += b);
        }
        y
    }
}

struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    fn load(vb: &candle_nn::VarBuilder, d: usize, eps: f64) -> candle_core::Result<LayerNorm> {
        // Older checkpoints name them gamma and beta.
        let get = |a: &str, b: &str| -> candle_core::Result<Vec<f32>> {
            vb.get(d, a)
                .or_else(|_| vb.get(d, b))?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()
        };
        Ok(LayerNorm {
            weight: get("weight", "gamma")?,
            bias: get("bias", "beta")?,
            eps: eps as f32,
        })
    }

    /// `x = norm(x + residual)` row by row, in place.
    fn forward(&self, x: &mut [f32], residual: &[f32]) {
        let d = self.weight.len();
        x.par_chunks_mut(d)
            .zip(residual.par_chunks(d))
            .for_each(|(row, res)| {
                row.iter_mut().zip(res).for_each(|(v, r)| *v += r);
                let mean = row.iter().sum::<f32>() / d as f32;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                let inv = 1.0 / (var + self.eps).sqrt();
                for ((v, w), b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
                    *v = (*v - mean) * inv * w + b;
                }
            });
    }
}

struct BertLayer {
    qkv: Dense,
    out: Dense,
    ln_attn: LayerNorm,
    up: Dense,
    down: Dense,
    ln_ffn: LayerNorm,
}

/// BERT's forward pass on the engine's own f32 products
/// (transformers' `BertModel`, eval mode: embeddings + LayerNorm, then per
/// layer self-attention → dense → LayerNorm(x + ·) → dense → GELU (erf) →
/// dense → LayerNorm(x + ·)).
pub struct CpuBert {
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    ln_embed: LayerNorm,
    layers: Vec<BertLayer>,
    hidden: usize,
    heads: usize,
    act: candle_transformers::models::bert::HiddenAct,
}

use rayon::prelude::*;

impl CpuBert {
    fn load(vb: &candle_nn::VarBuilder, c: &Config) -> candle_core::Result<CpuBert> {
        // Checkpoints saved from BertForXxx prefix everything with `bert.`.
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb.clone()
        };
        let d = c.hidden_size;
        let table = |name: &str, rows: usize| -> candle_core::Result<Vec<f32>> {
            vb.pp("embeddings")
                .pp(name)
                .get((rows, d), "weight")?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let lv = vb.pp(format!("encoder.layer.{l}"));
            let att = lv.pp("attention");
            layers.push(BertLayer {
                qkv: Dense::load(&att.pp("self"), &["query", "key", "value"], d, d)?,
                out: Dense::load(&att.pp("output"), &["dense"], d, d)?,
                ln_attn: LayerNorm::load(&att.pp("output").pp("LayerNorm"), d, c.layer_norm_eps)?,
                up: Dense::load(&lv.pp("intermediate"), &["dense"], d, c.intermediate_size)?,
                down: Dense::load(&lv.pp("output"), &["dense"], c.intermediate_size, d)?,
                ln_ffn: LayerNorm::load(&lv.pp("output").pp("LayerNorm"), d, c.layer_norm_eps)?,
            });
        }
        Ok(CpuBert {
            word: table("word_embeddings", c.vocab_size)?,
            position: table("position_embeddings", c.max_position_embeddings)?,
            token_type: table("token_type_embeddings", c.type_vocab_size)?,
            ln_embed: LayerNorm::load(&vb.pp("embeddings").pp("LayerNorm"), d, c.layer_norm_eps)?,
            layers,
            hidden: d,
            heads: c.num_attention_heads,
            act: c.hidden_act,
        })
    }

    /// Final states of the real tokens of every sequence, packed:
    /// `[sum of lengths, hidden]`, sequence after sequence. The callers
    /// have checked the ids and lengths.
    fn forward(&self, seqs: &[Vec<u32>]) -> Vec<f32> {
        let d = self.hidden;
        let rows: usize = seqs.iter().map(Vec::len).sum();
        let mut x = Vec::with_capacity(rows * d);
        for s in seqs {
            for (p, &id) in s.iter().enumerate() {
                let w = &self.word[id as usize * d..(id as usize + 1) * d];
                let pos = &self.position[p * d..(p + 1) * d];
                x.extend(
                    w.iter()
                        .zip(pos)
                        .zip(&self.token_type[..d])
                        .map(|((a, b), c)| a + b + c),
                );
            }
        }
        let zeros = vec![0f32; rows * d];
        self.ln_embed.forward(&mut x, &zeros);
        let starts: Vec<usize> = seqs
            .iter()
            .scan(0, |at, s| {
                let start = *at;
                *at += s.len();
                Some(start)
            })
            .collect();
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x, rows);
            let ctx = self.attention(&qkv, seqs, &starts, rows);
            let mut h = layer.out.forward(&ctx, rows);
            layer.ln_attn.forward(&mut h, &x);
            let mut u = layer.up.forward(&h, rows);
            self.activate(&mut u);
            let mut y = layer.down.forward(&u, rows);
            layer.ln_ffn.forward(&mut y, &h);
            x = y;
        }
        x
    }

    fn activate(&self, u: &mut [f32]) {
        use candle_transformers::models::bert::HiddenAct;
        let act = self.act;
        u.par_chunks_mut(4096).for_each(|c| {
            if act == HiddenAct::Gelu {
                crate::fastmath::gelu_erf(c);
                return;
            }
            for v in c {
                *v = match act {
                    HiddenAct::Gelu => unreachable!("done above"),
                    HiddenAct::GeluApproximate => {
                        let x = *v;
                        0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh())
                    }
                    HiddenAct::Relu => v.max(0.0),
                };
            }
        });
    }

    /// Bidirectional self-attention of each sequence over its own tokens,
    /// one task per sequence and head: `softmax(q·kᵀ/√hd)·v` on the packed
    /// `qkv [rows, 3·hidden]`; returns the context `[rows, hidden]`.
    fn attention(&self, qkv: &[f32], seqs: &[Vec<u32>], starts: &[usize], rows: usize) -> Vec<f32> {
        let d = self.hidden;
        let hd = d / self.heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut ctx = vec![0f32; rows * d];
        let ctx_ptr = crate::parallel::SendPtr::new(&mut ctx);
        let tasks: Vec<(usize, usize)> = (0..seqs.len())
            .flat_map(|s| (0..self.heads).map(move |h| (s, h)))
            .collect();
        tasks.par_iter().for_each(|&(s, h)| {
            let len = seqs[s].len();
            let base = starts[s] * 3 * d;
            let q = &qkv[base + h * hd..];
            let k = &qkv[base + d + h * hd..];
            let v = &qkv[base + 2 * d + h * hd..];
            let mut scores = Vec::<f32>::with_capacity(len * len);
            // SAFETY: q, k and v address rows `0..len` of the packed qkv
            // (row stride 3·hidden, `hd` columns from the head's offset),
            // inside `qkv`; `scores` has room for len x len and is written
            // whole (read_dst false) before its length is set.
            unsafe {
                crate::matmul::Gemm {
                    m: len,
                    n: len,
                    k: hd,
                    dst_cs: 1,
                    dst_rs: len as isize,
                    read_dst: false,
                    lhs_cs: 1,
                    lhs_rs: (3 * d) as isize,
                    rhs_cs: (3 * d) as isize,
                    rhs_rs: 1,
                    alpha: 0.0,
                    beta: scale,
                    parallel: false,
                }
                .run(scores.as_mut_ptr(), q.as_ptr(), k.as_ptr());
                scores.set_len(len * len);
            }
            for row in scores.chunks_exact_mut(len) {
                let max = crate::fastmath::max(row);
                let inv = 1.0 / crate::fastmath::exp_shifted_sum(row, max);
                row.iter_mut().for_each(|x| *x *= inv);
            }
            // SAFETY: each (sequence, head) task writes its own rows and
            // columns of `ctx` (rows starts[s]..+len, columns h·hd..+hd),
            // disjoint from every other task's; v is read as q and k are.
            unsafe {
                let dst = ctx_ptr.get().add(starts[s] * d + h * hd);
                crate::matmul::Gemm {
                    m: len,
                    n: hd,
                    k: len,
                    dst_cs: 1,
                    dst_rs: d as isize,
                    read_dst: false,
                    lhs_cs: 1,
                    lhs_rs: len as isize,
                    rhs_cs: 1,
                    rhs_rs: (3 * d) as isize,
                    alpha: 0.0,
                    beta: 1.0,
                    parallel: false,
                }
                .run(dst, scores.as_ptr(), v.as_ptr());
            }
        });
        ctx
    }
}
