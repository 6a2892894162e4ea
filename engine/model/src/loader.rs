//! Finding and opening model weights, offline: a GGUF file, a Hugging Face
//! model directory (`config.json`, `*.safetensors`, sharded with an index),
//! or a Hugging Face repo id already in the local HF cache.

use crate::arch::ArchConfig;
use crate::error::{EngineError, Result};
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where weights come from, resolved from the user's model string.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

impl ModelSource {
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(p) | ModelSource::HfDir(p) => p,
        }
    }
}

/// Resolve a model string: an existing path (GGUF file or HF directory), or
/// `owner/name[@revision]` looked up in the local Hugging Face cache
/// (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`). Never downloads.
pub fn resolve(model: &str) -> Result<ModelSource> {
    let model = model.trim();
    if model.is_empty() {
        return Err(EngineError::invalid("model", "empty model path"));
    }
    let path = PathBuf::from(model);
    if path.exists() {
        return classify(&path);
    }
    let looks_like_repo = !model.starts_with('/')
        && !model.starts_with('.')
        && model.split('/').count() == 2
        && !model.ends_with(".gguf");
    if looks_like_repo {
        return resolve_hf_cache(model);
    }
    Err(EngineError::NotFound { path })
}

fn classify(path: &Path) -> Result<ModelSource> {
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(ModelSource::HfDir(path.to_path_buf()));
        }
        // A directory holding exactly one GGUF file is accepted too.
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| EngineError::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        return match ggufs.len() {
            1 => Ok(ModelSource::Gguf(ggufs[0].clone())),
            0 => Err(EngineError::NotAModel {
                path: path.into(),
                reason: "directory has neither config.json nor a .gguf file".into(),
            }),
            n => Err(EngineError::NotAModel {
                path: path.into(),
                reason: format!("directory has {n} .gguf files; name one"),
            }),
        };
    }
    let mut magic = [0u8; 4];
    let mut f = File::open(path).map_err(|e| EngineError::io(path, e))?;
    use std::io::Read;
    if f.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
        return Err(EngineError::NotAModel {
            path: path.into(),
            reason: "not a GGUF file (bad magic) and not a model directory".into(),
        });
    }
    Ok(ModelSource::Gguf(path.to_path_buf()))
}

fn resolve_hf_cache(spec: &str) -> Result<ModelSource> {
    let (repo, revision) = match spec.split_once('@') {
        Some((r, rev)) => (r, rev.to_string()),
        None => (spec, "main".to_string()),
    };
    let cache = match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => hf_hub::Cache::new(PathBuf::from(p)),
        None => hf_hub::Cache::from_env(),
    };
    let cache_dir = cache.path().display().to_string();
    let r = cache.repo(hf_hub::Repo::with_revision(
        repo.to_string(),
        hf_hub::RepoType::Model,
        revision,
    ));
    let not_cached = || EngineError::NotCached {
        repo: spec.to_string(),
        cache: cache_dir.clone(),
    };
    let config = r.get("config.json").ok_or_else(not_cached)?;
    let dir = config.parent().ok_or_else(not_cached)?.to_path_buf();
    Ok(ModelSource::HfDir(dir))
}

/// Open tensors by their GGUF names; Hugging Face names are mapped.
pub enum TensorStore {
    Gguf {
        path: PathBuf,
        content: gguf_file::Content,
    },
    Safetensors {
        path: PathBuf,
        st: candle_core::safetensors::MmapedSafetensors,
        prefix: String,
    },
}

/// How matmul weights are held on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// The default: AMX bf16 tiles where the CPU has AMX-BF16, else int8
    /// ([`crate::int8`]) on the CPU in f32, else dense in the compute dtype.
    Auto,
    /// Keep GGUF quantized blocks (candle's kernels).
    Quantized,
    /// Dequantize to dense tensors (f32, then cast once to the decoder's
    /// compute dtype): the reference the other formats are measured against.
    F32,
    /// Dequantize, then pack as bf16 tiles for the AMX matmul kernel
    /// ([`crate::amx`]); `F32` where the CPU has no AMX-BF16, off the CPU,
    /// or when the compute dtype is not f32.
    Amx,
    /// Dequantize, then requantize to int8 rows ([`crate::int8`]); `F32`
    /// off the CPU or when the compute dtype is not f32.
    Int8,
}

impl WeightFormat {
    /// `KVEMBED_WEIGHTS=auto|quantized|f32|amx|int8` overrides the default
    /// (`auto`).
    pub fn from_env() -> WeightFormat {
        match std::env::var("KVEMBED_WEIGHTS").ok().as_deref() {
            Some("quantized") | Some("q") => WeightFormat::Quantized,
            Some("f32") => WeightFormat::F32,
            Some("amx") => WeightFormat::Amx,
            Some("int8") => WeightFormat::Int8,
            _ => WeightFormat::Auto,
        }
    }
}

impl TensorStore {
    pub fn open(source: &ModelSource) -> Result<(TensorStore, ArchConfig)> {
        match source {
            ModelSource::Gguf(path) => {
                let f = File::open(path).map_err(|e| EngineError::io(path, e))?;
                let mut r = BufReader::new(f);
                let content =
                    gguf_file::Content::read(&mut r).map_err(|e| EngineError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                let cfg = ArchConfig::from_gguf(&content.metadata, path)?;
                let mut cfg = cfg;
                if cfg.vocab_size == 0 {
                    if let Some(t) = content.tensor_infos.get("token_embd.weight") {
                        cfg.vocab_size = t.shape.dims()[0];
                    }
                }
                // Check that the data section really holds every tensor (a
                // truncated download is the common corruption).
                let file_len = std::fs::metadata(path)
                    .map_err(|e| EngineError::io(path, e))?
                    .len();
                for (name, info) in &content.tensor_infos {
                    let elems = info.shape.elem_count();
                    let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
                    if content.tensor_data_offset + info.offset + bytes as u64 > file_len {
                        return Err(EngineError::Corrupt {
                            path: path.clone(),
                            reason: format!("tensor '{name}' extends past the end of the file (truncated download?)"),
                        });
                    }
                }
                cfg.validate(path)?;
                Ok((
                    TensorStore::Gguf {
                        path: path.clone(),
                        content,
                    },
                    cfg,
                ))
            }
            ModelSource::HfDir(dir) => {
                let cfg_path = dir.join("config.json");
                let text = std::fs::read_to_string(&cfg_path)
                    .map_err(|e| EngineError::io(&cfg_path, e))?;
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| EngineError::Corrupt {
                        path: cfg_path.clone(),
                        reason: e.to_string(),
                    })?;
                let cfg = ArchConfig::from_hf_config(&v, &cfg_path)?;
                cfg.validate(&cfg_path)?;
                let files = safetensors_files(dir)?;
                // SAFETY: the files are memory-mapped read-only; kvembed never
                // writes model files, and users must not modify them while loaded.
                let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
                    .map_err(|e| EngineError::Corrupt {
                        path: dir.clone(),
                        reason: e.to_string(),
                    })?;
                let names: Vec<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
                let prefix = [
                    "model.",
                    "language_model.model.",
                    "model.language_model.",
                    "",
                ]
                .into_iter()
                .find(|p| {
                    names
                        .iter()
                        .any(|n| *n == format!("{p}embed_tokens.weight"))
                })
                .ok_or_else(|| EngineError::NotAModel {
                    path: dir.clone(),
                    reason: "no embed_tokens.weight tensor in the safetensors files".into(),
                })?
                .to_string();
                Ok((
                    TensorStore::Safetensors {
                        path: dir.clone(),
                        st,
                        prefix,
                    },
                    cfg,
                ))
            }
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            TensorStore::Gguf { path, .. } | TensorStore::Safetensors { path, .. } => path,
        }
    }

    fn hf_name(prefix: &str, gguf: &str) -> String {
        if gguf == "output.weight" {
            return "lm_head.weight".into();
        }
        let map_tail = |t: &str| -> String {
            let (base, kind) = t.rsplit_once('.').unwrap_or((t, "weight"));
            let hf = match base {
                "attn_norm" => "input_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "attn_q_norm" => "self_attn.q_norm",
                "attn_k_norm" => "self_attn.k_norm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                // llama/qwen: the norm before the MLP is called post_attention_layernorm.
                "ffn_norm" => "post_attention_layernorm",
                "post_attention_norm" => "post_attention_layernorm",
                "pre_ffw_norm" => "pre_feedforward_layernorm",
                "post_ffw_norm" => "post_feedforward_layernorm",
                other => other,
            };
            format!("{hf}.{kind}")
        };
        if let Some(rest) = gguf.strip_prefix("blk.") {
            let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
            return format!("{prefix}layers.{layer}.{}", map_tail(tail));
        }
        match gguf {
            "token_embd.weight" => format!("{prefix}embed_tokens.weight"),
            "output_norm.weight" => format!("{prefix}norm.weight"),
            other => other.to_string(),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        match self {
            TensorStore::Gguf { content, .. } => content.tensor_infos.contains_key(name),
            TensorStore::Safetensors { st, prefix, .. } => {
                st.get(&Self::hf_name(prefix, name)).is_ok()
            }
        }
    }

    fn missing(&self, name: &str) -> EngineError {
        EngineError::Corrupt {
            path: self.path().into(),
            reason: format!("missing tensor '{name}'"),
        }
    }

    fn qtensor(&self, name: &str, dev: &Device) -> Result<QTensor> {
        match self {
            TensorStore::Gguf { path, content } => {
                if !content.tensor_infos.contains_key(name) {
                    return Err(self.missing(name));
                }
                let f = File::open(path).map_err(|e| EngineError::io(path, e))?;
                let mut r = BufReader::new(f);
                content
                    .tensor(&mut r, name, dev)
                    .map_err(|e| EngineError::Corrupt {
                        path: path.clone(),
                        reason: format!("tensor '{name}': {e}"),
                    })
            }
            TensorStore::Safetensors { .. } => {
                let t = self.tensor(name, dev)?;
                Ok(QTensor::quantize(
                    &t,
                    candle_core::quantized::GgmlDType::F32,
                )?)
            }
        }
    }

    /// A float tensor (norm weights, biases; or any weight, dequantized).
    pub fn tensor(&self, name: &str, dev: &Device) -> Result<Tensor> {
        match self {
            TensorStore::Gguf { .. } => self.dequantized(name, dev),
            TensorStore::Safetensors { st, prefix, path } => {
                let hf = Self::hf_name(prefix, name);
                let t = st.load(&hf, dev).map_err(|_| EngineError::Corrupt {
                    path: path.clone(),
                    reason: format!("missing tensor '{hf}'"),
                })?;
                Ok(t.to_dtype(DType::F32)?)
            }
        }
    }

    /// GGUF blocks dequantized to f32 on the CPU (where every GGML type
    /// has a dequantizer), then moved to `dev`: on a GPU this needs no
    /// quantized kernels and never holds the blocks and the dense copy there
    /// at once.
    fn dequantized(&self, name: &str, dev: &Device) -> Result<Tensor> {
        let t = self.qtensor(name, &Device::Cpu)?.dequantize(&Device::Cpu)?;
        Ok(if dev.is_cpu() { t } else { t.to_device(dev)? })
    }

    /// A linear layer's weight `[out, in]`.
    pub fn matmul(&self, name: &str, dev: &Device, format: WeightFormat) -> Result<QMatMul> {
        match self {
            TensorStore::Gguf { .. } => Ok(match format {
                WeightFormat::Quantized => QMatMul::from_arc(Arc::new(self.qtensor(name, dev)?))?,
                _ => QMatMul::Tensor(self.dequantized(name, dev)?),
            }),
            TensorStore::Safetensors { .. } => Ok(QMatMul::Tensor(self.tensor(name, dev)?)),
        }
    }

    /// The token embedding table; GGUF keeps it quantized on the CPU (it is
    /// large and only a few rows are read per batch). On a GPU it is dense
    /// (the decoder stores it in the compute dtype).
    pub fn embedding(&self, name: &str, dev: &Device) -> Result<Embedding> {
        match self {
            TensorStore::Gguf { .. } if !dev.is_cpu() => {
                Ok(Embedding::Dense(self.dequantized(name, dev)?))
            }
            TensorStore::Gguf { .. } => {
                let q = self.qtensor(name, dev)?;
                if q.dtype() == candle_core::quantized::GgmlDType::F32 {
                    Ok(Embedding::Dense(q.dequantize(dev)?))
                } else {
                    Ok(Embedding::Quantized(Arc::new(q)))
                }
            }
            TensorStore::Safetensors { .. } => Ok(Embedding::Dense(self.tensor(name, dev)?)),
        }
    }

    /// GGUF metadata (empty for safetensors).
    pub fn gguf_metadata(&self) -> Option<&std::collections::HashMap<String, gguf_file::Value>> {
        match self {
            TensorStore::Gguf { content, .. } => Some(&content.metadata),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub enum Embedding {
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// A dense table in `dtype`; a quantized one stays as it is (its lookup
    /// dequantizes the rows it reads to f32).
    pub fn to_dtype(self, dtype: DType) -> Result<Embedding> {
        Ok(match self {
            Embedding::Dense(t) if t.dtype() != dtype => Embedding::Dense(t.to_dtype(dtype)?),
            other => other,
        })
    }

    pub fn rows(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.dims()[0],
            Embedding::Quantized(q) => q.shape().dims()[0],
        }
    }

    pub fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Embedding::Dense(t) => {
                let flat = ids.flatten_all()?;
                let out = t.index_select(&flat, 0)?;
                let mut dims = ids.dims().to_vec();
                dims.push(t.dims()[1]);
                out.reshape(dims)?
            }
            Embedding::Quantized(q) => q.embedding(ids)?,
        })
    }

    /// As the LM head (tied embeddings): logits for the given hidden rows.
    pub fn as_matmul(&self) -> Result<QMatMul> {
        Ok(match self {
            Embedding::Dense(t) => QMatMul::Tensor(t.clone()),
            Embedding::Quantized(q) => QMatMul::from_arc(q.clone())?,
        })
    }
}

pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| EngineError::Corrupt {
                path: index.clone(),
                reason: e.to_string(),
            })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| EngineError::Corrupt {
                path: index.clone(),
                reason: "no weight_map".into(),
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.is_file() {
                return Err(EngineError::Corrupt {
                    path: f.clone(),
                    reason: "shard named in model.safetensors.index.json is missing".into(),
                });
            }
        }
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EngineError::NotAModel {
            path: dir.into(),
            reason: "no *.safetensors files".into(),
        });
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_map() {
        assert_eq!(
            TensorStore::hf_name("model.", "blk.3.attn_q.weight"),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            TensorStore::hf_name("model.", "blk.0.attn_k.bias"),
            "model.layers.0.self_attn.k_proj.bias"
        );
        assert_eq!(
            TensorStore::hf_name("model.", "token_embd.weight"),
            "model.embed_tokens.weight"
        );
        assert_eq!(
            TensorStore::hf_name("model.", "output_norm.weight"),
            "model.norm.weight"
        );
        assert_eq!(
            TensorStore::hf_name("model.", "output.weight"),
            "lm_head.weight"
        );
    }

    #[test]
    fn missing_path_is_not_found() {
        match resolve("/nonexistent/model.gguf") {
            Err(EngineError::NotFound { .. }) => {}
            other => panic!("unexpected {other:?}", other = other.map(|_| ())),
        }
    }

    #[test]
    fn non_model_file_is_rejected() {
        let dir = std::env::temp_dir().join(format!("kvembed-notmodel-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("x.gguf");
        std::fs::write(&f, b"hello world, definitely not gguf").unwrap();
        let err = resolve(f.to_str().unwrap()).map(|_| ()).unwrap_err();
        assert!(matches!(err, EngineError::NotAModel { .. }), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn uncached_repo_id_is_reported() {
        std::env::set_var(
            "HF_HUB_CACHE",
            std::env::temp_dir().join("kvembed-empty-hf-cache"),
        );
        let err = resolve("someone/not-a-cached-model")
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, EngineError::NotCached { .. }), "{err}");
    }
}
