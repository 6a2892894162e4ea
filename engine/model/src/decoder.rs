//! The shared decoder with KV re-routing.
//!
//! Batches are right-padded: sequence `b` occupies positions `0..len[b]` and
//! padding sits after it, so causal attention alone keeps padding out of every
//! real token's view (a real query at position `i` only sees keys `j <= i`).
//! Padding rows compute garbage that pooling never reads.
//!
//! Re-routing (KV-Embedding): at the selected layers, the key and value of
//! each sequence's *final real token* are prepended as an extra column 0 that
//! every query may attend to, with `bias` added to that column's scaled logits
//! before the softmax.
//!
//! Compute dtype (`Decoder::dtype`): f32 on the CPU, bf16 on CUDA by default.
//! Matmul weights, biases and the dense embedding table are stored in it, and
//! every matmul (projections, MLP, Q·Kᵀ, P·V) runs in it (cuBLAS and candle's
//! CPU bf16 matmul accumulate in f32). f32 is kept where precision matters:
//! - the residual stream is f32 (unlike PyTorch's bf16 models): each block's
//!   output is upcast as it is added, which costs no extra kernel (the norms
//!   read f32 anyway) and cut the worst bf16-vs-f32 error on SmolLM2 about
//!   threefold (docs/GPU.md);
//! - every RMSNorm runs in f32 with f32 weights, its output rounded once;
//! - RoPE is applied in f32 with f32 cos/sin tables;
//! - attention logits are upcast to f32 before the scale, the additive mask
//!   (causal, sliding window, and the re-routed column with its bias) and the
//!   softmax; the probabilities go back to the compute dtype for P·V;
//! - the final norm's output, which pooling reads, is f32.
//!
//! In f32 every cast is a no-op and the CPU keeps its fused attention kernel.

use crate::arch::{Activation, ArchConfig, RopeScaling};
use crate::error::{EngineError, Result};
use crate::loader::{Embedding, TensorStore, WeightFormat};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;

/// Where the re-routed key sits in rotary space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixPosition {
    /// The final token's post-RoPE key, rotated for its own (last) position:
    /// the method as written.
    Last,
    /// The key rotated for position 0 (i.e. the pre-RoPE key).
    Zero,
}

#[derive(Debug, Clone)]
pub struct Reroute {
    /// `layers[l]` is true when layer `l` re-routes.
    pub layers: Vec<bool>,
    pub bias: f32,
    pub prefix: PrefixPosition,
}

impl Reroute {
    /// Re-route `layers` (0-based) of an `n_layers`-layer model.
    pub fn new(
        layers: &[usize],
        n_layers: usize,
        bias: f32,
        prefix: PrefixPosition,
    ) -> Result<Reroute> {
        let mut mask = vec![false; n_layers];
        for &l in layers {
            if l >= n_layers {
                return Err(EngineError::invalid(
                    "layers",
                    format!(
                        "layer {l} does not exist (the model has layers 0..{})",
                        n_layers - 1
                    ),
                ));
            }
            mask[l] = true;
        }
        Ok(Reroute {
            layers: mask,
            bias,
            prefix,
        })
    }
}

/// Token Prepending (Fu et al., 2024): the placeholder token at `position`
/// is overwritten, at the input of each layer in `layers`, by the previous
/// layer's state of the sequence's last token.
#[derive(Debug, Clone)]
pub struct TokenPrepend {
    pub position: usize,
    pub layers: std::ops::Range<usize>,
}

/// Per-layer representation collected for intrinsic-dimension estimates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerPooling {
    Last,
    Mean,
}

#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    pub reroute: Option<Reroute>,
    pub prepend: Option<TokenPrepend>,
    /// Collect each layer's output pooled this way (before the final norm).
    pub collect_layers: Option<LayerPooling>,
}

pub struct ForwardOutput {
    /// Final hidden states after the final norm, `[B, T, D]`.
    pub hidden: Tensor,
    /// `layer_pooled[l]` is `[B, D]` when requested.
    pub layer_pooled: Vec<Tensor>,
}

struct Norm {
    weight: Tensor,
    eps: f32,
}

impl Norm {
    fn load(store: &TensorStore, name: &str, cfg: &ArchConfig, dev: &Device) -> Result<Norm> {
        let mut weight = store.tensor(name, dev)?;
        if cfg.norm_plus_one {
            weight = (weight + 1.0)?;
        }
        Ok(Norm {
            weight: weight.contiguous()?,
            eps: cfg.rms_eps as f32,
        })
    }

    /// RMSNorm computed in f32 (f32 weight), returned in `out`.
    fn forward_as(&self, x: &Tensor, out: DType) -> Result<Tensor> {
        let y = candle_nn::ops::rms_norm(
            &x.to_dtype(DType::F32)?.contiguous()?,
            &self.weight,
            self.eps,
        )?;
        Ok(y.to_dtype(out)?)
    }
}

/// `QMatMul` in any compute dtype: a dense weight must already be in `x`'s
/// dtype; GGUF blocks (`KVEMBED_WEIGHTS=quantized`) take f32 input, so other
/// dtypes go through f32.
fn qmatmul(q: &QMatMul, x: &Tensor) -> Result<Tensor> {
    Ok(match q {
        QMatMul::QTensor(_) if x.dtype() != DType::F32 => {
            q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?
        }
        q => q.forward(x)?,
    })
}

/// A dense `QMatMul` weight in `dtype` (cast once, at load).
fn qmatmul_in(q: QMatMul, dtype: DType) -> Result<QMatMul> {
    Ok(match q {
        QMatMul::Tensor(w) if w.dtype() != dtype => QMatMul::Tensor(w.to_dtype(dtype)?),
        other => other,
    })
}

/// A linear layer's weight. Dense weights are kept transposed, `[in, out]`
/// and contiguous, and applied as one 2-D matmul over all tokens: the CPU
/// gemm then reads them in place. (`QMatMul` multiplies by `w.t()` of an
/// `[out, in]` weight, and the CPU gemm repacks such a weight on every call
/// with a scalar gather, which dominated small batches.)
enum Weight {
    Dense(Tensor),
    Quantized(QMatMul),
    /// bf16 tiles for the AMX kernel (f32 in, f32 out).
    Amx(crate::amx::PackedBf16),
    /// int8 rows for the int8 kernels (f32 in, f32 out).
    Int8(crate::int8::PackedI8),
}

impl Weight {
    /// Dense weights are stored in the compute dtype `dtype`.
    fn new(m: QMatMul, dtype: DType) -> Result<Weight> {
        Ok(match m {
            QMatMul::Tensor(w) => Weight::Dense(w.to_dtype(dtype)?.t()?.contiguous()?),
            other => Weight::Quantized(other),
        })
    }

    /// An `[out, in]` weight packed for the AMX kernel.
    fn amx(m: QMatMul) -> Result<Weight> {
        let (data, n, k) = dense_f32(m)?;
        Ok(Weight::Amx(crate::amx::PackedBf16::pack(&data, n, k)))
    }

    /// An `[out, in]` weight as int8 rows.
    fn int8(m: QMatMul) -> Result<Weight> {
        let (data, n, k) = dense_f32(m)?;
        Ok(Weight::Int8(crate::int8::PackedI8::pack(&data, n, k)))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Dense(wt) => {
                let dims = x.dims().to_vec();
                let (&k, lead) = dims
                    .split_last()
                    .expect("activations have a feature dimension");
                let rows = lead.iter().product::<usize>();
                let n = wt.dim(1)?;
                let mut out = lead.to_vec();
                out.push(n);
                if x.device().is_cpu() && x.dtype() == DType::F32 && wt.dtype() == DType::F32 {
                    // The CPU f32 product with its kernels chosen by crate::cpu.
                    let y = with_cpu_f32(x, |xs| {
                        with_cpu_f32(wt, |ws| crate::matmul::matmul(xs, rows, k, ws, n))
                    })??;
                    return Ok(Tensor::from_vec(y, out, x.device())?);
                }
                let y = x.contiguous()?.reshape((rows, k))?.matmul(wt)?;
                Ok(y.reshape(out)?)
            }
            Weight::Quantized(q) => qmatmul(q, x),
            Weight::Amx(_) | Weight::Int8(_) => {
                let [y] = Weight::forward_shared([self], x)?;
                Ok(y)
            }
        }
    }

    /// `forward` of several weights on the same input (a layer's q, k and v;
    /// gate and up): for the AMX tiles the input is converted to bf16 once,
    /// for the int8 kernels quantized once. (An AMX or int8 weight's own
    /// `forward` is this with one weight.)
    fn forward_shared<const N: usize>(ws: [&Weight; N], x: &Tensor) -> Result<[Tensor; N]> {
        let amx: Option<Vec<&crate::amx::PackedBf16>> = ws
            .iter()
            .map(|w| {
                if let Weight::Amx(p) = w {
                    Some(p)
                } else {
                    None
                }
            })
            .collect();
        let int8: Option<Vec<&crate::int8::PackedI8>> = ws
            .iter()
            .map(|w| {
                if let Weight::Int8(p) = w {
                    Some(p)
                } else {
                    None
                }
            })
            .collect();
        let mut lead = x.dims().to_vec();
        let k = lead.pop().expect("activations have a feature dimension");
        let rows = lead.iter().product::<usize>();
        let shaped = |y: Vec<f32>, n: usize| -> Result<Tensor> {
            Ok(Tensor::from_vec(y, [&lead[..], &[n]].concat(), x.device())?)
        };
        let ys = match (amx, int8) {
            (Some(packed), _) => {
                let tiles = with_cpu_f32(x, |data| crate::amx::Tiles::new(data, rows, k))?;
                packed
                    .iter()
                    .map(|p| shaped(p.matmul_tiles(&tiles), p.n()))
                    .collect::<Result<Vec<_>>>()?
            }
            (_, Some(packed)) => {
                let kernel = crate::int8::Kernel::detect();
                let q = with_cpu_f32(x, |data| crate::int8::QuantRows::new(data, rows, k, kernel))?;
                packed
                    .iter()
                    .map(|p| shaped(p.matmul_quantized(&q), p.n()))
                    .collect::<Result<Vec<_>>>()?
            }
            (None, None) => ws
                .iter()
                .map(|w| w.forward(x))
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(ys.try_into().expect("one output per weight"))
    }
}

/// A dense `[out, in]` weight's f32 values, with `out` and `in`.
fn dense_f32(m: QMatMul) -> Result<(Vec<f32>, usize, usize)> {
    let QMatMul::Tensor(w) = m else {
        return Err(EngineError::invalid(
            "weights",
            "AMX packing needs a dense weight",
        ));
    };
    let (n, k) = w.dims2()?;
    Ok((
        w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        n,
        k,
    ))
}

/// A layer's MLP weights.
enum Ffn {
    /// Gate, up and down, applied one after the other.
    Split {
        gate: Weight,
        up: Weight,
        down: Weight,
    },
    /// SiLU-gated on the AMX tiles, gate and up packed together so that
    /// their outputs become the down projection's bf16 input block by
    /// block ([`crate::amx::SiluGatedBf16`]).
    AmxSilu {
        gate_up: crate::amx::SiluGatedBf16,
        down: crate::amx::PackedBf16,
    },
}

struct Linear {
    w: Weight,
    b: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.add_bias(self.w.forward(x)?)
    }

    /// [`Weight::forward_shared`] with each layer's bias.
    fn forward_shared<const N: usize>(ls: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        let ys = Weight::forward_shared(ls.map(|l| &l.w), x)?;
        let ys = ls
            .iter()
            .zip(ys)
            .map(|(l, y)| l.add_bias(y))
            .collect::<Result<Vec<_>>>()?;
        Ok(ys.try_into().expect("one output per layer"))
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Layer {
    attn_norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    post_attn_norm: Option<Norm>,
    ffn_norm: Norm,
    post_ffn_norm: Option<Norm>,
    ffn: Ffn,
    theta: f32,
    scaling: RopeScaling,
    window: Option<usize>,
}

pub struct Decoder {
    pub cfg: ArchConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    final_norm: Norm,
    lm_head: QMatMul,
    device: Device,
    /// Compute dtype of weights and activations (see the module docs).
    dtype: DType,
    /// Whether the layers' matmuls run on AMX bf16 tiles.
    pub amx: bool,
    /// The int8 kernel the layers' matmuls run on, if they do.
    pub int8: Option<crate::int8::Kernel>,
    /// The fused CPU attention kernel (true on CPU, used only in f32);
    /// tensor ops otherwise.
    pub cpu_attention_kernel: bool,
    /// Forward passes started so far (the server reports it: how much work
    /// ran, counted in units that do not depend on the CPU's speed).
    pub passes: std::sync::atomic::AtomicU64,
}

/// The compute dtype when none is asked for: f32 on the CPU (exact against
/// the f32 goldens, and the CPU has no fast bf16 matmul), bf16 on a GPU.
pub fn default_dtype(dev: &Device) -> DType {
    if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// Parse a compute dtype: `f32`, `bf16`, `f16`; `auto` or empty = `None`
/// (the device's default).
pub fn parse_dtype(s: &str) -> Result<Option<DType>> {
    match s.trim().to_ascii_lowercase().as_str() {
        "" | "auto" | "default" => Ok(None),
        "f32" | "float32" | "fp32" => Ok(Some(DType::F32)),
        "bf16" | "bfloat16" => Ok(Some(DType::BF16)),
        "f16" | "float16" | "fp16" | "half" => Ok(Some(DType::F16)),
        other => Err(EngineError::invalid(
            "dtype",
            format!("'{other}' (f32, bf16, f16, auto)"),
        )),
    }
}

/// Per-forward-pass tables shared by the layers: RoPE cos/sin per base
/// frequency and scaling, and the additive attention masks, so that each is
/// built (and, on a GPU, uploaded) once per batch rather than once per layer.
#[derive(Default)]
struct PassCache {
    rope: RefCell<Vec<(f32, RopeScaling, Tensor, Tensor)>>,
    masks: RefCell<HashMap<MaskKey, Tensor>>,
}

/// Query rows `start..end`, prefix offset, bias bits, window.
type MaskKey = (usize, usize, usize, Option<u32>, Option<usize>);

impl PassCache {
    fn rope(
        &self,
        t: usize,
        hd: usize,
        theta: f32,
        scaling: &RopeScaling,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let mut cache = self.rope.borrow_mut();
        if let Some((_, _, c, s)) = cache
            .iter()
            .find(|(th, sc, _, _)| *th == theta && sc == scaling)
        {
            return Ok((c.clone(), s.clone()));
        }
        let (c, s) = rope_tables(t, hd, theta, scaling, dev)?;
        cache.push((theta, scaling.clone(), c.clone(), s.clone()));
        Ok((c, s))
    }

    fn mask(
        &self,
        start: usize,
        end: usize,
        offset: usize,
        bias: Option<f32>,
        window: Option<usize>,
        dev: &Device,
    ) -> Result<Tensor> {
        let key = (start, end, offset, bias.map(f32::to_bits), window);
        if let Some(m) = self.masks.borrow().get(&key) {
            return Ok(m.clone());
        }
        let m = attention_mask(start, end, offset, bias, window, dev)?;
        self.masks.borrow_mut().insert(key, m.clone());
        Ok(m)
    }
}

/// Queries are processed in blocks of this many rows so a 4,096-token input
/// never materialises a full T x T score matrix per head.
const QUERY_BLOCK: usize = 512;

/// Reads one layer's weights in the form the decoder runs them: bf16 tiles
/// where AMX runs the products (with the SiLU gate and up projections
/// packed together), candle tensors or quantised matrices otherwise.
struct LayerLoader<'a> {
    store: &'a TensorStore,
    cfg: &'a ArchConfig,
    dev: &'a Device,
    format: WeightFormat,
    dtype: DType,
    amx: bool,
    int8: bool,
}

impl LayerLoader<'_> {
    fn weight(&self, n: &str) -> Result<Weight> {
        let m = self.store.matmul(n, self.dev, self.format)?;
        if self.amx {
            Weight::amx(m)
        } else if self.int8 {
            Weight::int8(m)
        } else {
            Weight::new(m, self.dtype)
        }
    }

    fn ffn(&self, gate: &str, up: &str, down: &str) -> Result<Ffn> {
        if !(self.amx && self.cfg.activation == Activation::Silu) {
            return Ok(Ffn::Split {
                gate: self.weight(gate)?,
                up: self.weight(up)?,
                down: self.weight(down)?,
            });
        }
        let (store, dev, format) = (self.store, self.dev, self.format);
        let (g, n, k) = dense_f32(store.matmul(gate, dev, format)?)?;
        let (u, nu, ku) = dense_f32(store.matmul(up, dev, format)?)?;
        if (nu, ku) != (n, k) {
            return Err(EngineError::Corrupt {
                path: store.path().into(),
                reason: format!("{gate} is {n}x{k} but {up} is {nu}x{ku}"),
            });
        }
        let packed = crate::amx::SiluGatedBf16::pack(&g, &u, n, k);
        let (d, dn, dk) = dense_f32(store.matmul(down, dev, format)?)?;
        let down = crate::amx::PackedBf16::pack(&d, dn, dk);
        Ok(match packed {
            Some(gate_up) => Ffn::AmxSilu { gate_up, down },
            // The weights already read, packed one by one.
            None => Ffn::Split {
                gate: Weight::Amx(crate::amx::PackedBf16::pack(&g, n, k)),
                up: Weight::Amx(crate::amx::PackedBf16::pack(&u, n, k)),
                down: Weight::Amx(down),
            },
        })
    }

    fn norm(&self, n: &str) -> Result<Norm> {
        Norm::load(self.store, n, self.cfg, self.dev)
    }

    fn opt_norm(&self, n: &str) -> Result<Option<Norm>> {
        if self.store.has(n) {
            Ok(Some(self.norm(n)?))
        } else {
            Ok(None)
        }
    }

    fn bias(&self, n: &str) -> Result<Option<Tensor>> {
        if self.cfg.qkv_bias && self.store.has(n) {
            Ok(Some(self.store.tensor(n, self.dev)?.to_dtype(self.dtype)?))
        } else {
            Ok(None)
        }
    }

    fn linear(&self, prefix: &str) -> Result<Linear> {
        Ok(Linear {
            w: self.weight(&format!("{prefix}.weight"))?,
            b: self.bias(&format!("{prefix}.bias"))?,
        })
    }

    fn layer(&self, i: usize) -> Result<Layer> {
        let cfg = self.cfg;
        let p = |s: &str| format!("blk.{i}.{s}");
        let (ffn_norm_name, post_attn_norm) = if cfg.sandwich_norm {
            // Gemma 3 in GGUF: ffn_norm is the pre-MLP norm; in HF it is
            // pre_feedforward_layernorm.
            let pre = if matches!(self.store, TensorStore::Gguf { .. }) {
                p("ffn_norm")
            } else {
                p("pre_ffw_norm")
            };
            (pre, Some(self.norm(&p("post_attention_norm.weight"))?))
        } else {
            (p("ffn_norm"), None)
        };
        let layer = Layer {
            attn_norm: self.norm(&p("attn_norm.weight"))?,
            q: self.linear(&p("attn_q"))?,
            k: self.linear(&p("attn_k"))?,
            v: self.linear(&p("attn_v"))?,
            o: Linear {
                w: self.weight(&p("attn_output.weight"))?,
                b: None,
            },
            q_norm: if cfg.qk_norm {
                self.opt_norm(&p("attn_q_norm.weight"))?
            } else {
                None
            },
            k_norm: if cfg.qk_norm {
                self.opt_norm(&p("attn_k_norm.weight"))?
            } else {
                None
            },
            post_attn_norm,
            ffn_norm: self.norm(&format!("{ffn_norm_name}.weight"))?,
            post_ffn_norm: if cfg.sandwich_norm {
                self.opt_norm(&p("post_ffw_norm.weight"))?
            } else {
                None
            },
            ffn: self.ffn(
                &p("ffn_gate.weight"),
                &p("ffn_up.weight"),
                &p("ffn_down.weight"),
            )?,
            theta: cfg.layer_rope_theta(i),
            scaling: cfg.layer_rope_scaling(i),
            window: cfg.layer_window(i),
        };
        if cfg.qk_norm && (layer.q_norm.is_none() || layer.k_norm.is_none()) {
            return Err(EngineError::Corrupt {
                path: self.store.path().into(),
                reason: format!(
                    "{} model lacks q/k norm weights in layer {i}",
                    cfg.family.name()
                ),
            });
        }
        Ok(layer)
    }
}

impl Decoder {
    /// Load the weights onto `dev`, matmul weights in `dtype` (the f32 that
    /// dequantization produces is cast once, here).
    pub fn load(
        store: &TensorStore,
        cfg: ArchConfig,
        dev: &Device,
        format: WeightFormat,
        dtype: DType,
    ) -> Result<Decoder> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(EngineError::invalid(
                "dtype",
                format!("{dtype:?} (f32, bf16, f16)"),
            ));
        }
        let embed = store.embedding("token_embd.weight", dev)?.to_dtype(dtype)?;
        if embed.rows() < cfg.vocab_size.max(1) && cfg.vocab_size > 0 {
            return Err(EngineError::Corrupt {
                path: store.path().into(),
                reason: format!(
                    "embedding has {} rows, config says vocab {}",
                    embed.rows(),
                    cfg.vocab_size
                ),
            });
        }
        let cpu_f32 = dev.is_cpu() && dtype == DType::F32;
        let amx = matches!(format, WeightFormat::Auto | WeightFormat::Amx)
            && cpu_f32
            && crate::amx::available();
        // Gemma 3 keeps f32 products by default where there is no AMX: on
        // int8 products its query embeddings (the query side of PromptEOL)
        // drift to a cosine of about 0.7 from the f32 ones, and its SciFact
        // retrieval with `kv` fell from 60.8 to 24.6 nDCG@10 (docs/QUALITY.md,
        // "Int8 products"); the other families lose about a point.
        // `KVEMBED_WEIGHTS=int8` still asks for int8.
        let int8_by_default = cfg.family != crate::arch::Family::Gemma3;
        let int8 = !amx
            && (format == WeightFormat::Int8 || (format == WeightFormat::Auto && int8_by_default))
            && cpu_f32;
        let loader = LayerLoader {
            store,
            cfg: &cfg,
            dev,
            format,
            dtype,
            amx,
            int8,
        };
        let layers = (0..cfg.n_layers)
            .map(|i| loader.layer(i))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = Norm::load(store, "output_norm.weight", &cfg, dev)?;
        // The output head only serves generation (tools, tokenizer checks):
        // on the CPU it stays in its stored blocks unless f32 weights were
        // asked for (a dense copy is the size of the vocabulary times the
        // width, the largest matrix of small models). A GPU keeps it dense,
        // as every other weight there.
        let head_format = if format == WeightFormat::F32 || !dev.is_cpu() {
            format
        } else {
            WeightFormat::Quantized
        };
        let lm_head = qmatmul_in(
            if store.has("output.weight") {
                store.matmul("output.weight", dev, head_format)?
            } else {
                embed.as_matmul()?
            },
            dtype,
        )?;
        Ok(Decoder {
            cfg,
            embed,
            layers,
            final_norm,
            lm_head,
            device: dev.clone(),
            dtype,
            amx,
            int8: int8.then(crate::int8::Kernel::detect),
            cpu_attention_kernel: dev.is_cpu(),
            passes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype of weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// How the layers' matrix products run: `amx-bf16` (bf16 tiles, f32
    /// activations around them), `int8-avx2` etc. (int8 weights, f32
    /// activations around them), else the compute dtype (`f32`, `bf16`, ...).
    pub fn matmul_kernel(&self) -> String {
        if self.amx {
            "amx-bf16".into()
        } else if let Some(kernel) = self.int8 {
            kernel.name().into()
        } else {
            self.dtype.as_str().into()
        }
    }

    /// Run a right-padded batch. `seqs[b]` are the token ids of sequence `b`.
    pub fn forward(&self, seqs: &[Vec<u32>], opts: &ForwardOptions) -> Result<ForwardOutput> {
        let b = seqs.len();
        let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
        if b == 0 || lens.contains(&0) {
            return Err(EngineError::invalid("batch", "empty sequence"));
        }
        let t = *lens.iter().max().unwrap();
        let vocab = self.embed.rows() as u32;
        let mut flat = Vec::with_capacity(b * t);
        for s in seqs {
            if let Some(bad) = s.iter().find(|&&id| id >= vocab) {
                // The model loaded fine; its tokenizer and weights disagree
                // (an engine error, not a load failure).
                return Err(EngineError::Other(format!(
                    "the tokenizer produced token id {bad}, outside the model's vocabulary of {vocab}: \
                     the tokenizer does not match the weights"
                )));
            }
            flat.extend_from_slice(s);
            flat.extend(std::iter::repeat_n(0u32, t - s.len()));
        }
        self.passes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ids = Tensor::from_vec(flat, (b, t), &self.device)?;
        let mut x = self.embed.lookup(&ids)?;
        if let Some(scale) = self.cfg.embed_scale {
            x = (x.to_dtype(DType::F32)? * scale as f64)?;
        }
        // The residual stream stays f32 (see the module docs).
        let mut x = x.to_dtype(DType::F32)?;
        let last: Vec<usize> = lens.iter().map(|l| l - 1).collect();
        let cache = PassCache::default();
        let mut layer_pooled = Vec::new();
        for (li, layer) in self.layers.iter().enumerate() {
            if let Some(tp) = &opts.prepend {
                if tp.layers.contains(&li) && li > 0 {
                    x = replace_rows(&x, tp.position, &last)?;
                }
            }
            let reroute = opts
                .reroute
                .as_ref()
                .filter(|r| r.layers.get(li).copied().unwrap_or(false));
            x = self.layer_forward(layer, &x, &last, reroute, &cache)?;
            if let Some(mode) = opts.collect_layers {
                layer_pooled.push(pool_rows(&x, &lens, mode)?);
            }
        }
        // f32 whatever the compute dtype: pooling reads it.
        let hidden = self.final_norm.forward_as(&x, DType::F32)?;
        Ok(ForwardOutput {
            hidden,
            layer_pooled,
        })
    }

    /// Logits of the last real position of each sequence (for generation tests).
    pub fn last_logits(&self, out: &ForwardOutput, lens: &[usize]) -> Result<Tensor> {
        let rows: Vec<Tensor> = lens
            .iter()
            .enumerate()
            .map(|(bi, &l)| {
                out.hidden
                    .narrow(0, bi, 1)?
                    .narrow(1, l - 1, 1)?
                    .squeeze(0)?
                    .squeeze(0)
            })
            .collect::<candle_core::Result<_>>()?;
        let h = Tensor::stack(&rows, 0)?.to_dtype(self.dtype)?;
        Ok(qmatmul(&self.lm_head, &h)?.to_dtype(DType::F32)?)
    }

    fn layer_forward(
        &self,
        l: &Layer,
        x: &Tensor,
        last: &[usize],
        reroute: Option<&Reroute>,
        cache: &PassCache,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        // Each block's output joins the f32 residual stream.
        let att = self.attention_block(l, x, last, reroute, cache)?;
        let x = (x + att.reshape((b, t, d))?)?;
        let m = self.mlp_block(l, &x)?;
        Ok((x + m.reshape((b, t, d))?)?)
    }

    /// The attention half of a layer on the residual stream `x`
    /// (`[B, T, D]`, f32): norm, q/k/v with their norms and RoPE, the
    /// re-routed prefix column where this layer has one, attention, output
    /// projection and post-norm. Returns `[B * T, D]` in f32.
    fn attention_block(
        &self,
        l: &Layer,
        x: &Tensor,
        last: &[usize],
        reroute: Option<&Reroute>,
        cache: &PassCache,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (q, k_pre, k, v) = self.qkv(l, x, cache)?;
        // The prefix column: each sequence's own last real token.
        let prefix = match reroute {
            Some(r) => {
                let src = match r.prefix {
                    PrefixPosition::Last => &k,
                    PrefixPosition::Zero => &k_pre,
                };
                let kp = gather_positions(src, last)?;
                let vp = gather_positions(&v, last)?;
                Some((kp, vp, r.bias))
            }
            None => None,
        };
        let (k, v) = match &prefix {
            Some((kp, vp, _)) => (Tensor::cat(&[kp, &k], 2)?, Tensor::cat(&[vp, &v], 2)?),
            None => (k, v),
        };
        let offset = usize::from(prefix.is_some());
        let bias = prefix.as_ref().map(|p| p.2);
        let att = if self.cpu_attention_kernel && self.device.is_cpu() && self.dtype == DType::F32 {
            let cfg = &self.cfg;
            let shape = crate::attention::AttnShape {
                batch: b,
                seq: t,
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: cfg.head_dim,
                scale: cfg.attn_scale,
                window: l.window,
                prefix_bias: bias,
                bf16_products: self.amx,
            };
            let lens: Vec<usize> = last.iter().map(|&i| i + 1).collect();
            // The kernel reads the tensors' own storage (no copies).
            let out = with_cpu_f32(&q, |q| {
                with_cpu_f32(&k, |k| {
                    with_cpu_f32(&v, |v| crate::attention::attention(q, k, v, shape, &lens))
                })
            })???;
            Tensor::from_vec(out, (b * t, cfg.n_heads * cfg.head_dim), &self.device)?
        } else {
            self.attention_tensors(q, k, v, t, offset, bias, l.window, cache)?
        };
        // Through the post-norm, in f32, where the model has one.
        let att = l.o.forward(&att)?;
        Ok(match &l.post_attn_norm {
            Some(n) => n.forward_as(&att, DType::F32)?,
            None => att.to_dtype(DType::F32)?,
        })
    }

    /// Queries, keys and values of `x` as `[B, H, T, hd]`: projected, through
    /// the q/k norms where the model has them, and rotated. Returns
    /// `(q, k before RoPE, k, v)`; the unrotated keys serve the
    /// `PrefixPosition::Zero` variant.
    fn qkv(
        &self,
        l: &Layer,
        x: &Tensor,
        cache: &PassCache,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let (b, t, d) = x.dims3()?;
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let dt = self.dtype;
        let h = l.attn_norm.forward_as(x, dt)?.reshape((b * t, d))?;
        let [q, k, v] = Linear::forward_shared([&l.q, &l.k, &l.v], &h)?;
        let q = q.reshape((b, t, nh, hd))?;
        let k = k.reshape((b, t, nkv, hd))?;
        let v = v.reshape((b, t, nkv, hd))?;
        let q = match &l.q_norm {
            Some(n) => n.forward_as(&q, dt)?,
            None => q,
        };
        let k = match &l.k_norm {
            Some(n) => n.forward_as(&k, dt)?,
            None => k,
        };
        let q = q.transpose(1, 2)?.contiguous()?;
        let k_pre = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (cos, sin) = cache.rope(t, hd, l.theta, &l.scaling, &self.device)?;
        // RoPE in f32 (f32 tables), back to the compute dtype.
        let rope = |x: &Tensor| -> Result<Tensor> {
            let xf = x.to_dtype(DType::F32)?;
            let y = if cfg.rope_interleaved {
                candle_nn::rotary_emb::rope_i(&xf, &cos, &sin)?
            } else {
                candle_nn::rotary_emb::rope(&xf, &cos, &sin)?
            };
            Ok(y.to_dtype(x.dtype())?)
        };
        let q = rope(&q)?;
        let k = rope(&k_pre)?;
        Ok((q, k_pre, k, v))
    }

    /// The MLP half of a layer on the residual stream `x`: norm, the gated
    /// MLP (AMX tiles with the gate and up products fused where they run),
    /// post-norm. Returns `[B * T, D]` in f32.
    fn mlp_block(&self, l: &Layer, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let h = l.ffn_norm.forward_as(x, self.dtype)?.reshape((b * t, d))?;
        let m = match &l.ffn {
            Ffn::AmxSilu { gate_up, down } => {
                let rows = b * t;
                let act = with_cpu_f32(&h, |x| {
                    gate_up.activation(&crate::amx::Tiles::new(x, rows, d))
                })?;
                Tensor::from_vec(down.matmul_tiles(&act), (rows, down.n()), &self.device)?
            }
            Ffn::Split { gate, up, down } => {
                let [gate, up] = Weight::forward_shared([gate, up], &h)?;
                match self.cfg.activation {
                    Activation::Silu if gate.device().is_cpu() && gate.dtype() == DType::F32 => {
                        down.forward(&silu_mul_cpu(&gate, &up)?)?
                    }
                    Activation::Silu => down.forward(&(candle_nn::ops::silu(&gate)? * up)?)?,
                    Activation::GeluTanh => down.forward(&(gate.gelu()? * up)?)?,
                }
            }
        };
        Ok(match &l.post_ffn_norm {
            Some(n) => n.forward_as(&m, DType::F32)?,
            None => m.to_dtype(DType::F32)?,
        })
    }
}

impl Decoder {
    /// Attention with tensor ops (the GPU path, and any dtype but f32 on the
    /// CPU): blocks of queries, an additive f32 mask carrying the causal and
    /// window masks and the re-routed column's bias. The logits are upcast to
    /// f32 before the scale, the mask and the softmax; the probabilities go
    /// back to the compute dtype for the product with V.
    #[allow(clippy::too_many_arguments)]
    fn attention_tensors(
        &self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        t: usize,
        offset: usize,
        bias: Option<f32>,
        window: Option<usize>,
        cache: &PassCache,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, nh, hd) = (q.dim(0)?, cfg.n_heads, cfg.head_dim);
        let n_rep = nh / cfg.n_kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, n_rep)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, n_rep)?.contiguous()?;
        let mut blocks = Vec::with_capacity(t.div_ceil(QUERY_BLOCK));
        let mut start = 0;
        while start < t {
            let end = (start + QUERY_BLOCK).min(t);
            let qb = q.narrow(2, start, end - start)?;
            // Keys after the block's last query are always masked: skip them.
            let kv_len = end + offset;
            let kb = k.narrow(2, 0, kv_len)?;
            let vb = v.narrow(2, 0, kv_len)?;
            let scores = (qb.matmul(&kb.t()?)?.to_dtype(DType::F32)? * cfg.attn_scale as f64)?;
            let mask = cache.mask(start, end, offset, bias, window, &self.device)?;
            let scores = scores.broadcast_add(&mask)?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(vb.dtype())?;
            blocks.push(p.matmul(&vb)?);
            start = end;
        }
        let att = if blocks.len() == 1 {
            blocks.pop().unwrap()
        } else {
            Tensor::cat(&blocks, 2)?
        };
        Ok(att.transpose(1, 2)?.reshape((b * t, nh * hd))?)
    }
}

/// Runs `f` on the values of an f32 CPU tensor, in row-major order, without
/// copying them when the tensor is already contiguous.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(EngineError::invalid(
            "device",
            "this CPU kernel needs a CPU tensor",
        ));
    };
    let start = layout.start_offset();
    Ok(f(&cpu.as_slice::<f32>()?[start..start + t.elem_count()]))
}

/// `silu(gate) * up` on the CPU in f32, in one pass with the vectorised exp.
fn silu_mul_cpu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    const CHUNK: usize = 1 << 14;
    let out = with_cpu_f32(gate, |g| {
        with_cpu_f32(up, |u| {
            let mut out = vec![0f32; g.len()];
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(i, o)| {
                let r = i * CHUNK..i * CHUNK + o.len();
                crate::fastmath::silu_mul(&g[r.clone()], &u[r], o);
            });
            out
        })
    })??;
    Ok(Tensor::from_vec(out, gate.shape(), gate.device())?)
}

/// `[B, H, T, hd]` → `[B, H, 1, hd]` taking position `pos[b]` of sequence `b`.
fn gather_positions(x: &Tensor, pos: &[usize]) -> Result<Tensor> {
    let rows: Vec<Tensor> = pos
        .iter()
        .enumerate()
        .map(|(b, &p)| x.narrow(0, b, 1)?.narrow(2, p, 1))
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// Overwrite row `position` of each sequence with its row `last[b]`.
fn replace_rows(x: &Tensor, position: usize, last: &[usize]) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let mut idx = Vec::with_capacity(b * t);
    for (bi, &l) in last.iter().enumerate() {
        for ti in 0..t {
            let src = if ti == position && position < l {
                l
            } else {
                ti
            };
            idx.push((bi * t + src) as u32);
        }
    }
    let idx = Tensor::from_vec(idx, b * t, x.device())?;
    Ok(x.reshape((b * t, d))?
        .index_select(&idx, 0)?
        .reshape((b, t, d))?)
}

/// Pool each sequence's rows: last real token or mean over real tokens (in f32).
fn pool_rows(x: &Tensor, lens: &[usize], mode: LayerPooling) -> Result<Tensor> {
    let x = &x.to_dtype(DType::F32)?;
    let rows: Vec<Tensor> = lens
        .iter()
        .enumerate()
        .map(|(b, &l)| {
            let s = x.narrow(0, b, 1)?.squeeze(0)?;
            match mode {
                LayerPooling::Last => s.narrow(0, l - 1, 1)?.squeeze(0),
                LayerPooling::Mean => s.narrow(0, 0, l)?.mean(0),
            }
        })
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// Additive mask for query rows `start..end` over `offset + end` key columns
/// (column 0 is the re-routed prefix when `offset == 1`), by the rule of
/// [`crate::attention::visible_keys`].
fn attention_mask(
    start: usize,
    end: usize,
    offset: usize,
    bias: Option<f32>,
    window: Option<usize>,
    dev: &Device,
) -> Result<Tensor> {
    let rows = end - start;
    let cols = end + offset;
    let mut m = vec![0f32; rows * cols];
    for r in 0..rows {
        let i = start + r;
        let row = &mut m[r * cols..(r + 1) * cols];
        if offset == 1 {
            row[0] = bias.unwrap_or(0.0);
        }
        let keys = crate::attention::visible_keys(i, window);
        for j in (0..end).filter(|j| !keys.contains(j)) {
            row[offset + j] = f32::NEG_INFINITY;
        }
    }
    Ok(Tensor::from_vec(m, (rows, cols), dev)?)
}

/// cos/sin tables `[T, hd/2]` for positions `0..t`.
fn rope_tables(
    t: usize,
    hd: usize,
    theta: f32,
    scaling: &RopeScaling,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = hd / 2;
    let mut inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / (theta as f64).powf(2.0 * i as f64 / hd as f64))
        .collect();
    match *scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= factor as f64),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position,
        } => {
            let (factor, lo, hi, orig) = (
                factor as f64,
                low_freq_factor as f64,
                high_freq_factor as f64,
                original_max_position as f64,
            );
            let low_wavelen = orig / lo;
            let high_wavelen = orig / hi;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (orig / wavelen - lo) / (hi - lo);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
    }
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in 0..t {
        for f in &inv {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, half), dev)?,
        Tensor::from_vec(sin, (t, half), dev)?,
    ))
}

/// Helper for tests and tools: `[B, T, D]` tensor row of sequence `b` as
/// nested vectors of its first `len` positions.
pub fn rows_of(hidden: &Tensor, b: usize, len: usize) -> Result<Vec<Vec<f32>>> {
    Ok(hidden
        .narrow(0, b, 1)?
        .squeeze(0)?
        .narrow(0, 0, len)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?)
}
