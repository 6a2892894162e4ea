//! The embedding pipeline: texts → prompts → token ids → batches packed by a
//! token budget (sorted by length to waste little on padding) → decoder →
//! pooling → L2-normalised vectors.

use crate::method::{Knobs, Method, Pooling, Prepend, Template, DEFAULT_METHOD};
use candle_core::{DType, Device, Tensor};
use kvembed_model::decoder::{Decoder, ForwardOptions, LayerPooling, Reroute, TokenPrepend};
use kvembed_model::encoder::{self, Encoder};
use kvembed_model::error::{EngineError, Result};
use kvembed_model::loader::{self, ModelSource, TensorStore, WeightFormat};
use kvembed_model::tokenizer::TextTokenizer;
use kvembed_proto::{EmbedOptions, LayerPoint, MethodInfo, Role, SelectOptions, Truncation};

/// What to load and where.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// GGUF file, HF model directory, or HF repo id in the local cache.
    pub model: String,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    /// Inference threads; 0 = all cores.
    pub threads: usize,
    /// How matmul weights are held; `None`: `KVEMBED_WEIGHTS`, else the
    /// default (AMX bf16 tiles where the CPU has them, f32 otherwise).
    pub weights: Option<WeightFormat>,
}

impl LoadSpec {
    pub fn new(model: impl Into<String>) -> LoadSpec {
        LoadSpec {
            model: model.into(),
            device: "cpu".into(),
            threads: 0,
            weights: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub model: String,
    pub model_id: String,
    /// The weights' content, wherever they lie: [`fingerprint`].
    pub fingerprint: String,
    pub architecture: String,
    pub dim: usize,
    pub layers: usize,
    pub device: String,
    pub default_method: String,
    pub default_layers: Vec<usize>,
    pub default_bias: f32,
    pub document_prompt: String,
    pub query_prompt: String,
    /// Default limit on a text's tokens: [`DEFAULT_MAX_TOKENS`], or the
    /// model's trained context where that is shorter.
    pub max_tokens: usize,
    /// The positions the model was trained on (its context length).
    pub context: usize,
}

#[derive(Debug, Clone)]
pub struct EmbedOutput {
    pub vectors: Vec<Vec<f32>>,
    pub truncated: Vec<Truncation>,
    /// Tokens run through the model (prompts included, padding excluded).
    pub tokens: usize,
}

#[derive(Debug, Clone)]
pub struct LayerSelection {
    pub curve: Vec<LayerPoint>,
    pub selected: Vec<usize>,
    pub rule: String,
    /// The corpus calibration of the space, when [`SelectOptions::space`]
    /// asked for one.
    pub space: Option<kvembed_proto::SpaceMap>,
}

/// One configuration scored by the agreement rule: `layers` empty is no
/// re-routing.
#[derive(Debug, Clone, PartialEq)]
pub struct AgreementPoint {
    pub layers: Vec<usize>,
    pub bias: f32,
    pub score: f64,
    /// [`crate::agreement::stability`] of the same embeddings (reported,
    /// not used by the rule).
    pub stability: f64,
    /// Each text's agreement ([`crate::agreement::agreement_per_text`]).
    pub per_text: Vec<f64>,
}

/// What [`Embedder::choose_by_agreement`] chose, and every score it saw.
#[derive(Debug, Clone)]
pub struct AgreementChoice {
    pub layers: Vec<usize>,
    pub bias: f32,
    pub rule: String,
    pub points: Vec<AgreementPoint>,
}

pub use kvembed_proto::DEFAULT_BATCH_TOKENS;

/// The network under the embedder: a decoder LLM (every method, KV
/// re-routing first) or an encoder (its own embedding only).
pub enum Backbone {
    Decoder(Decoder),
    Encoder(Encoder),
}

pub struct Embedder {
    pub backbone: Backbone,
    pub tokenizer: TextTokenizer,
    /// The model's own embedding (`native`), where its files describe one
    /// ([`crate::native`]): always for an encoder.
    pub native: Option<crate::native::Native>,
    /// The method a request without one runs: `native` for a model trained
    /// for embeddings, else [`DEFAULT_METHOD`].
    default_method: String,
    /// Longest input the model reads, special tokens included.
    context: usize,
    pub source: ModelSource,
    info: ModelInfo,
    /// Padded tokens per forward pass.
    pub batch_tokens: usize,
    /// The study's overrides (kvembed-lab); the server never sets them.
    pub knobs: Knobs,
}

/// One prepared input.
struct Prepared {
    ids: Vec<u32>,
    /// Token range of the last copy of the text (Echo pooling).
    last_copy: std::ops::Range<usize>,
    /// First position that counts for mean pooling (after BOS).
    mean_start: usize,
}

fn describe(method: &Method, n_layers: usize, family: kvembed_model::arch::Family) -> MethodInfo {
    MethodInfo {
        method: method.name.clone(),
        layers: method
            .reroute
            .as_ref()
            .map(|r| r.layers.resolve(n_layers, family))
            .unwrap_or_default(),
        bias: method.reroute.as_ref().map(|r| r.bias),
        document_prompt: method.document.source(),
        query_prompt: method.query.source(),
    }
}

pub fn pick_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "" | "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        s if s.starts_with("cuda") => {
            let n: usize = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map_err(|_| EngineError::invalid("device", format!("'{s}'")))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(EngineError::invalid(
                    "device",
                    format!(
                        "'{s}': this build has no CUDA support \
                         (build the engine with --features cuda, see docs/GPU.md)"
                    ),
                ));
            }
            Device::new_cuda(n).map_err(|e| {
                // candle appends a backtrace to driver errors: keep the message.
                let e = e.to_string();
                let e = e.lines().next().unwrap_or_default().trim();
                EngineError::invalid("device", format!("'{s}': cannot open CUDA device {n}: {e}"))
            })
        }
        other => Err(EngineError::invalid(
            "device",
            format!("'{other}' (cpu, cuda, cuda:N, auto)"),
        )),
    }
}

/// Start the process's compute threads (rayon's global pool), `threads` of
/// them (0: one per core). Done once per process, at the first load, so
/// that a failure is a clear load error rather than a panic at the first
/// parallel loop: rayon builds its global pool lazily and panics when it
/// cannot, and after one failed attempt it refuses every later one. Threads
/// fail to start when their stacks do not fit the address space
/// (`kvembed.engine_memory_limit`) or the process limit on threads.
fn start_threads(threads: usize) -> Result<()> {
    static STARTED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    STARTED
        .get_or_init(|| {
            if threads > 0 {
                // candle's CPU kernels read RAYON_NUM_THREADS.
                std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
            }
            let mut builder = rayon::ThreadPoolBuilder::new();
            if threads > 0 {
                builder = builder.num_threads(threads);
            }
            let wanted = match threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            };
            let advice = "lower kvembed.threads or raise kvembed.engine_memory_limit";
            // Checked before trying: threads that start while the address
            // space runs out can abort the process in their first allocation.
            if let Some((left, limit)) = address_space_left() {
                let stack = std::env::var("RUST_MIN_STACK")
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(2 << 20);
                let need = wanted as u64 * (stack + (64 << 10));
                if need > left {
                    return Err(format!(
                        "could not start {wanted} compute threads: their stacks need {} MB of \
                         address space and {} MB are left under the engine's memory limit of {} MB: \
                         {advice}",
                        need >> 20,
                        left >> 20,
                        limit >> 20
                    ));
                }
            }
            match builder.build_global() {
                Ok(()) => Ok(()),
                // Built before this by the embedding program: keep it.
                Err(e) if e.to_string().contains("already been initialized") => Ok(()),
                Err(e) => Err(format!(
                    "could not start {wanted} compute threads: {e}; out of memory or of threads \
                     (the engine's memory limit or the process limits): {advice}"
                )),
            }
        })
        .clone()
        .map_err(EngineError::OutOfResources)
}

/// Refuses, before reading them, weights larger than the address space
/// left under `RLIMIT_AS` (`kvembed.engine_memory_limit`, `ulimit -v`):
/// loading them would abort the process in an allocation, taking every
/// model already loaded with it. Any load needs at least the files' size.
fn check_weights_fit(source: &ModelSource) -> Result<()> {
    let Some((left, limit)) = address_space_left() else {
        return Ok(());
    };
    let files = match source {
        ModelSource::Gguf(p) => vec![p.clone()],
        // A directory the loader cannot list fails in the load, with its reason.
        ModelSource::HfDir(dir) => loader::safetensors_files(dir).unwrap_or_default(),
    };
    let need: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    if need > left {
        return Err(EngineError::OutOfResources(format!(
            "'{}' has {} MB of weights, more than the {} MB of address space left under the memory \
             limit of {} MB (kvembed.engine_memory_limit, or ulimit -v): raise it, or serve fewer models",
            source.path().display(),
            need >> 20,
            left >> 20,
            limit >> 20
        )));
    }
    Ok(())
}

/// The address space left under `RLIMIT_AS` and the limit, in bytes; `None`
/// without a limit.
fn address_space_left() -> Option<(u64, u64)> {
    #[cfg(target_os = "linux")]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0
            || lim.rlim_cur == libc::RLIM_INFINITY
        {
            return None;
        }
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = statm.split_whitespace().next()?.parse().ok()?;
        // SAFETY: sysconf only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let limit = lim.rlim_cur as u64;
        Some((limit.saturating_sub(pages * page), limit))
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Every operation of a forward pass allocates its output, many of them
/// megabytes. glibc serves allocations above 128 KiB with fresh `mmap`s and
/// returns them on free, so every pass page-faulted (and zeroed) its
/// activations anew: about 10 % of a 16 x 512 pass. Raising the mmap and
/// trim thresholds keeps freed buffers in the heap for the next pass; the
/// process keeps its peak activation memory, as a server does anyway.
/// Left alone when the glibc variables (`MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TRIM_THRESHOLD_`) are set.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            const LIMIT: libc::c_int = 1 << 30;
            // SAFETY: mallopt only adjusts glibc's allocator parameters.
            unsafe {
                if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
                    libc::mallopt(libc::M_MMAP_THRESHOLD, LIMIT);
                }
                if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
                    libc::mallopt(libc::M_TRIM_THRESHOLD, LIMIT);
                }
            }
        });
    }
}

/// The compute dtype asked for by `KVEMBED_DTYPE` (`f32`, `bf16`, `f16`;
/// unset, empty or `auto`: the device's default).
pub fn dtype_from_env() -> Result<Option<DType>> {
    match std::env::var("KVEMBED_DTYPE") {
        Ok(s) => kvembed_model::decoder::parse_dtype(&s),
        Err(_) => Ok(None),
    }
}

/// How the device and compute dtype are reported (`kv_status().device`):
/// `cpu` for the default f32 CPU engine, else e.g. `cuda:0 (bf16)`.
fn describe_device(device: &Device, dtype: DType) -> String {
    let name = match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}").to_lowercase(),
    };
    if device.is_cpu() && dtype == DType::F32 {
        name
    } else {
        format!("{name} ({})", dtype.as_str())
    }
}

impl Embedder {
    /// Load with the compute dtype from `KVEMBED_DTYPE`, else the device's
    /// default (f32 on the CPU, bf16 on CUDA).
    pub fn load(spec: &LoadSpec) -> Result<Embedder> {
        Self::load_with_dtype(spec, None)
    }

    /// Load with an explicit compute dtype (`None`: as [`Embedder::load`]).
    pub fn load_with_dtype(spec: &LoadSpec, dtype: Option<DType>) -> Result<Embedder> {
        start_threads(spec.threads)?;
        keep_freed_buffers();
        let device = pick_device(&spec.device)?;
        let dtype = match dtype {
            Some(d) => d,
            None => {
                dtype_from_env()?.unwrap_or_else(|| kvembed_model::decoder::default_dtype(&device))
            }
        };
        let source = loader::resolve(&spec.model)?;
        check_weights_fit(&source)?;
        if let ModelSource::HfDir(dir) = &source {
            if encoder::is_encoder_dir(dir) {
                return Self::load_encoder(spec, dir, &device, dtype);
            }
        }
        let (store, cfg) = TensorStore::open(&source)?;
        let tokenizer = match (&store, &source) {
            (TensorStore::Gguf { content, .. }, ModelSource::Gguf(p)) => {
                TextTokenizer::from_gguf(content, p)?
            }
            (_, ModelSource::HfDir(dir)) => TextTokenizer::from_hf_dir(dir)?,
            _ => unreachable!("store kind follows the source"),
        };
        let format = spec.weights.unwrap_or_else(WeightFormat::from_env);
        let decoder = Decoder::load(&store, cfg, &device, format, dtype)?;
        // The tokenizer must fit the embedding table.
        let rows = decoder.cfg.vocab_size;
        if tokenizer.vocab_size > rows && rows > 0 {
            return Err(EngineError::TokenizerMismatch(format!(
                "tokenizer has {} tokens but the model's embedding has {} rows",
                tokenizer.vocab_size, rows
            )));
        }
        let native = match &source {
            ModelSource::HfDir(dir) => crate::native::read(dir, false)?,
            ModelSource::Gguf(_) => store.gguf_metadata().and_then(crate::native::from_gguf),
        };
        let cfg = &decoder.cfg;
        let default_method = match &native {
            Some(n) => n.method.clone(),
            None => Method::from_name(DEFAULT_METHOD)?.for_family(cfg.family),
        };
        let default = describe(&default_method, cfg.n_layers, cfg.family);
        let context = native
            .as_ref()
            .and_then(|n| n.max_seq_length)
            .unwrap_or(cfg.max_position)
            .clamp(1, cfg.max_position.max(1));
        // The same weights must get the same id however the path is spelled.
        let canonical =
            std::fs::canonicalize(source.path()).unwrap_or_else(|_| source.path().to_path_buf());
        let model_id = format!(
            "{}:{}:{}x{}:{}",
            cfg.family.name(),
            canonical.display(),
            cfg.n_layers,
            cfg.hidden,
            std::fs::metadata(source.path())
                .map(|m| m.len())
                .unwrap_or(0)
        );
        let info = ModelInfo {
            model: spec.model.clone(),
            model_id,
            fingerprint: fingerprint(source.path())?,
            architecture: cfg.family.name().into(),
            dim: cfg.hidden,
            layers: cfg.n_layers,
            device: describe_device(&device, dtype),
            default_method: default.method,
            default_layers: default.layers,
            default_bias: default.bias.unwrap_or(0.0),
            document_prompt: default.document_prompt,
            query_prompt: default.query_prompt,
            max_tokens: kvembed_proto::DEFAULT_MAX_TOKENS_LIMIT.min(context),
            context,
        };
        Ok(Embedder {
            backbone: Backbone::Decoder(decoder),
            tokenizer,
            default_method: default_method.name.clone(),
            native,
            context,
            source,
            info,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            knobs: Knobs::default(),
        })
    }

    /// An encoder's embedder ([`Embedder::load`] found one in `dir`): its
    /// tokenizer, its weights, its own embedding (the only method it runs).
    fn load_encoder(
        spec: &LoadSpec,
        dir: &std::path::Path,
        device: &Device,
        dtype: DType,
    ) -> Result<Embedder> {
        // The weights first: an encoder family the engine does not run is
        // refused as such, whatever else the directory lacks.
        let enc = Encoder::load(dir, device, dtype)?;
        let tokenizer = TextTokenizer::from_hf_dir(dir)?;
        if tokenizer.vocab_size > enc.cfg.vocab_size {
            return Err(EngineError::TokenizerMismatch(format!(
                "tokenizer has {} tokens but the model's embedding has {} rows",
                tokenizer.vocab_size, enc.cfg.vocab_size
            )));
        }
        let native = crate::native::read(dir, true)?.expect("an encoder always has one");
        let specials = tokenizer.specials.0.len() + tokenizer.specials.1.len();
        let context = native
            .max_seq_length
            .unwrap_or(enc.cfg.max_position)
            .clamp(specials + 1, enc.cfg.max_position.max(specials + 1));
        let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let info = ModelInfo {
            model: spec.model.clone(),
            model_id: format!(
                "{}:{}:{}x{}",
                enc.cfg.family,
                canonical.display(),
                enc.cfg.n_layers,
                enc.cfg.hidden
            ),
            fingerprint: fingerprint(dir)?,
            architecture: enc.cfg.family.clone(),
            dim: enc.cfg.hidden,
            layers: enc.cfg.n_layers,
            device: describe_device(device, dtype),
            default_method: "native".into(),
            default_layers: Vec::new(),
            default_bias: 0.0,
            document_prompt: native.method.document.source(),
            query_prompt: native.method.query.source(),
            max_tokens: context - specials,
            context,
        };
        Ok(Embedder {
            backbone: Backbone::Encoder(enc),
            tokenizer,
            default_method: "native".into(),
            native: Some(native),
            context,
            source: ModelSource::HfDir(dir.to_path_buf()),
            info,
            batch_tokens: DEFAULT_BATCH_TOKENS,
            knobs: Knobs::default(),
        })
    }

    /// The decoder, for what only a decoder can do (re-routing, the
    /// training-free methods, layer selection, generation); on an encoder an
    /// error that says so.
    pub fn decoder(&self) -> Result<&Decoder> {
        match &self.backbone {
            Backbone::Decoder(d) => Ok(d),
            Backbone::Encoder(e) => Err(self.needs_decoder(&e.cfg.family)),
        }
    }

    pub fn decoder_mut(&mut self) -> Result<&mut Decoder> {
        match &mut self.backbone {
            Backbone::Decoder(d) => Ok(d),
            Backbone::Encoder(_) => Err(EngineError::invalid("model", "an encoder has no decoder")),
        }
    }

    fn needs_decoder(&self, family: &str) -> EngineError {
        EngineError::invalid(
            "method",
            format!(
                "the loaded model is an encoder ({family}): it makes its own embedding (method \
                 native, the default) and none of the methods that re-route or prompt a decoder \
                 LLM, nor layer selection"
            ),
        )
    }

    /// Forward passes run since the model loaded.
    pub fn forward_passes(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        match &self.backbone {
            Backbone::Decoder(d) => d.passes.load(Relaxed),
            Backbone::Encoder(e) => e.passes.load(Relaxed),
        }
    }

    /// The matrix-product kernel the model runs on.
    pub fn matmul_kernel(&self) -> String {
        match &self.backbone {
            Backbone::Decoder(d) => d.matmul_kernel(),
            Backbone::Encoder(e) => e.kernel(),
        }
    }

    /// (layers, family) of a decoder, for resolving a method's window; an
    /// encoder has no windows (its only method does not re-route).
    fn depth(&self) -> (usize, kvembed_model::arch::Family) {
        match &self.backbone {
            Backbone::Decoder(d) => (d.cfg.n_layers, d.cfg.family),
            Backbone::Encoder(e) => (e.cfg.n_layers, kvembed_model::arch::Family::Llama),
        }
    }

    pub fn info(&self) -> ModelInfo {
        self.info.clone()
    }

    /// What a request with `opts` runs on this model: the method as
    /// [`Embedder::embed`] builds it, its layers resolved to this depth.
    pub fn describe(&self, opts: &EmbedOptions) -> Result<MethodInfo> {
        let method = self.method(opts)?;
        let (n_layers, family) = self.depth();
        Ok(describe(&method, n_layers, family))
    }

    /// The method a request with `opts` runs (with this embedder's knobs):
    /// the one it names, else the model's default; `native` is the model's
    /// own embedding, the only method of an encoder.
    fn method(&self, opts: &EmbedOptions) -> Result<Method> {
        let name = opts.method.as_deref().unwrap_or(&self.default_method);
        let method = if name == "native" {
            match &self.native {
                Some(n) => n.method.clone(),
                None => {
                    return Err(EngineError::invalid(
                        "method",
                        "native: the loaded model has no embedding of its own (no \
                         sentence-transformers pooling config beside its weights); use kv or \
                         another training-free method",
                    ))
                }
            }
        } else {
            if let Backbone::Encoder(e) = &self.backbone {
                // Name it as asked, then say why it cannot run.
                Method::from_name(name)?;
                return Err(self.needs_decoder(&e.cfg.family));
            }
            Method::from_name(name)?.for_family(self.depth().1)
        };
        method.with_options(opts)?.with_knobs(&self.knobs)
    }

    /// The token ids the model reads for `text` under the request's method
    /// and role: BOS where the model takes one, the prompt and the text
    /// tokenized together, Token Prepending's placeholder (after truncation
    /// to the request's `max_tokens`).
    pub fn prompt_ids(&self, text: &str, role: Role, opts: &EmbedOptions) -> Result<Vec<u32>> {
        let method = self.method(opts)?;
        // Under a prompt ensemble, the ids of its first template.
        let template = method.prompts(role).first();
        let placeholder = method.prepend.map(|p| self.placeholder_position(p));
        let max_tokens = opts
            .max_tokens
            .unwrap_or(kvembed_proto::DEFAULT_MAX_TOKENS_LIMIT);
        let (mut prepared, _) = self.prepare(
            &[text.to_string()],
            template,
            max_tokens,
            opts.truncate.unwrap_or(true),
            placeholder,
            method.specials,
        )?;
        Ok(prepared.remove(0).ids)
    }

    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer
            .encode(text)
            .map(|v| v.len())
            .unwrap_or(text.len() / 4)
    }

    /// Cuts `text` into chunks of at most `max_tokens` tokens of this
    /// model, counted alone ([`crate::chunk`]); `overlap` tokens repeated
    /// between neighbours.
    pub fn chunk(
        &self,
        text: &str,
        max_tokens: usize,
        overlap: usize,
    ) -> Result<Vec<crate::chunk::Span>> {
        crate::chunk::check_args(max_tokens, overlap)
            .map_err(|m| EngineError::invalid("chunk size", m))?;
        crate::chunk::chunk_text(
            text,
            max_tokens,
            overlap,
            |t| {
                Ok(self
                    .tokenizer
                    .encode_many_with_offsets(&[t])?
                    .pop()
                    .map(|(_, offsets)| offsets)
                    .unwrap_or_default())
            },
            |t| Ok(self.tokenizer.encode(t)?.len()),
        )
    }

    /// Embed with the method named in `opts` (or the default) and its overrides.
    pub fn embed(&self, texts: &[String], role: Role, opts: &EmbedOptions) -> Result<EmbedOutput> {
        self.embed_cancellable(texts, role, opts, &|| true)
    }

    /// What a request's prompt adds to each text in a forward pass: the
    /// prompt's own tokens (BOS and placeholder included) and how many copies
    /// of the text it holds (two for Echo).
    pub fn prompt_cost(&self, role: Role, opts: &EmbedOptions) -> Result<(usize, usize)> {
        let method = self.method(opts)?;
        let extra = if method.specials {
            self.tokenizer.specials.0.len() + self.tokenizer.specials.1.len()
        } else {
            usize::from(self.tokenizer.add_bos && self.tokenizer.bos.is_some())
                + usize::from(method.prepend.is_some())
        };
        // A prompt ensemble runs every template: its cost is their sum.
        let (mut fixed, mut slots) = (0, 0);
        for template in method.prompts(role).templates() {
            let pieces: Vec<&str> = template.pieces.iter().map(String::as_str).collect();
            fixed += self
                .tokenizer
                .encode_many(&pieces)?
                .iter()
                .map(Vec::len)
                .sum::<usize>()
                + extra;
            slots += template.slots().max(1);
        }
        Ok((fixed, slots))
    }

    /// `embed`, asking `keep_going` before every forward pass: once it says
    /// no (everyone waiting went away), the work stops with
    /// [`EngineError::Cancelled`] after at most the pass already running.
    pub fn embed_cancellable(
        &self,
        texts: &[String],
        role: Role,
        opts: &EmbedOptions,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<EmbedOutput> {
        let method = self.method(opts)?;
        let max_tokens = opts
            .max_tokens
            .unwrap_or(kvembed_proto::DEFAULT_MAX_TOKENS_LIMIT);
        self.embed_with(
            texts,
            role,
            &method,
            max_tokens,
            opts.truncate.unwrap_or(true),
            keep_going,
        )
    }

    pub fn embed_with(
        &self,
        texts: &[String],
        role: Role,
        method: &Method,
        max_tokens: usize,
        truncate: bool,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<EmbedOutput> {
        if max_tokens == 0 {
            return Err(EngineError::invalid("max_tokens", "must be at least 1"));
        }
        let templates = method.prompts(role).templates();
        if let [template] = templates {
            return self.embed_template(texts, template, method, max_tokens, truncate, keep_going);
        }
        // A prompt ensemble: the normalized mean of the unit vectors under
        // each template (the texts are cut alike under every template, as
        // the limit counts the text's own tokens).
        let mut out: Option<EmbedOutput> = None;
        for template in templates {
            let one =
                self.embed_template(texts, template, method, max_tokens, truncate, keep_going)?;
            match &mut out {
                None => out = Some(one),
                Some(sum) => {
                    for (acc, v) in sum.vectors.iter_mut().zip(one.vectors) {
                        acc.iter_mut().zip(v).for_each(|(a, x)| *a += x);
                    }
                    sum.tokens += one.tokens;
                }
            }
        }
        let mut out = out.expect("a prompt set holds a template");
        out.vectors = out.vectors.into_iter().map(normalize).collect();
        Ok(out)
    }

    /// [`Embedder::embed_with`] under one template.
    fn embed_template(
        &self,
        texts: &[String],
        template: &Template,
        method: &Method,
        max_tokens: usize,
        truncate: bool,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<EmbedOutput> {
        let placeholder = method.prepend.map(|p| self.placeholder_position(p));
        let (prepared, truncated) = self.prepare(
            texts,
            template,
            max_tokens,
            truncate,
            placeholder,
            method.specials,
        )?;
        // One forward pass of a batch: the encoder's, or the decoder's with
        // the method's re-routing and Token Prepending.
        let forward: Box<dyn Fn(&[Vec<u32>]) -> Result<Tensor> + '_> = match &self.backbone {
            Backbone::Encoder(enc) => Box::new(move |seqs| enc.forward(seqs)),
            Backbone::Decoder(decoder) => {
                let n_layers = decoder.cfg.n_layers;
                let reroute = match &method.reroute {
                    Some(r) => Some(Reroute::new(
                        &r.layers.resolve(n_layers, decoder.cfg.family),
                        n_layers,
                        r.bias,
                        r.prefix,
                    )?),
                    None => None,
                };
                let prepend = method
                    .prepend
                    .zip(placeholder)
                    .map(|(p, position)| TokenPrepend {
                        position,
                        layers: 1..((p.fraction * n_layers as f32).round() as usize).max(2),
                    });
                let fopts = ForwardOptions {
                    reroute,
                    prepend,
                    collect_layers: None,
                };
                Box::new(move |seqs| Ok(decoder.forward(seqs, &fopts)?.hidden))
            }
        };
        let tokens = prepared.iter().map(|p| p.ids.len()).sum();
        let mut vectors = vec![Vec::new(); prepared.len()];
        for batch in self.batches(&prepared) {
            if !keep_going() {
                return Err(EngineError::Cancelled(
                    "embedding stopped: its clients went away".into(),
                ));
            }
            let seqs: Vec<Vec<u32>> = batch.iter().map(|&i| prepared[i].ids.clone()).collect();
            let hidden = forward(&seqs)?;
            for (bi, &i) in batch.iter().enumerate() {
                vectors[i] = pool(&hidden, bi, &prepared[i], method.pooling)?;
            }
        }
        Ok(EmbedOutput {
            vectors,
            truncated,
            tokens,
        })
    }

    /// Token Prepending's placeholder position: as asked, else right after
    /// BOS (the paper's place), first where the model adds no BOS.
    fn placeholder_position(&self, p: Prepend) -> usize {
        p.position.unwrap_or(usize::from(
            self.tokenizer.add_bos && self.tokenizer.bos.is_some(),
        ))
    }

    /// Token ids for each text in its template, BOS first where the model
    /// wants it, and Token Prepending's placeholder at position `placeholder`
    /// if given. Template pieces are tokenized on their own so the text's
    /// tokens (and truncation) never depend on the prompt.
    fn prepare(
        &self,
        texts: &[String],
        template: &Template,
        max_tokens: usize,
        truncate: bool,
        placeholder: Option<usize>,
        specials: bool,
    ) -> Result<(Vec<Prepared>, Vec<Truncation>)> {
        let (before, after): (&[u32], &[u32]) = if specials {
            (&self.tokenizer.specials.0, &self.tokenizer.specials.1)
        } else {
            (&[], &[])
        };
        // The model's own embedding reads at most `context` tokens, its
        // special tokens and the prompt included (sentence-transformers'
        // max_seq_length): the text gets what they leave.
        let max_tokens = if specials {
            let pieces: Vec<&str> = template.pieces.iter().map(String::as_str).collect();
            let prompt: usize = self
                .tokenizer
                .encode_many(&pieces)?
                .iter()
                .map(Vec::len)
                .sum();
            let room = self
                .context
                .saturating_sub(before.len() + after.len() + prompt)
                / template.slots();
            if room == 0 {
                return Err(EngineError::invalid(
                    "prompt",
                    format!(
                        "its {prompt} tokens leave no room for the text in the model's {} positions",
                        self.context
                    ),
                ));
            }
            max_tokens.min(room)
        } else {
            max_tokens
        };
        // Texts over the limit are cut where their first token past it
        // starts (counted alone, as the limit is stated), then wrapped in
        // the prompt.
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut truncated = Vec::new();
        let mut kept: Vec<&str> = Vec::with_capacity(texts.len());
        for (index, (text, (ids, offsets))) in texts
            .iter()
            .zip(self.tokenizer.encode_many_with_offsets(&refs)?)
            .enumerate()
        {
            if ids.len() <= max_tokens {
                kept.push(text);
                continue;
            }
            if !truncate {
                return Err(EngineError::TooLong {
                    index,
                    tokens: ids.len(),
                    max: max_tokens,
                });
            }
            truncated.push(Truncation {
                index,
                tokens: ids.len(),
                kept: max_tokens,
            });
            kept.push(&text[..floor_char_boundary(text, offsets[max_tokens].0)]);
        }
        // The prompt and the text are tokenized together, as one string, as
        // the model's own tokenizer (llama.cpp's, Hugging Face's) does: a
        // token may span the end of the text and the prompt after it (`."`),
        // which tokenizing the pieces apart would split.
        let rendered: Vec<String> = kept.iter().map(|t| template.render(t)).collect();
        let rendered_refs: Vec<&str> = rendered.iter().map(String::as_str).collect();
        let encoded = self.tokenizer.encode_many_with_offsets(&rendered_refs)?;
        let bos = if specials {
            None
        } else if self.tokenizer.add_bos {
            self.tokenizer.bos
        } else {
            None
        };
        // A token outside any text: the stand-in for an empty input and
        // Token Prepending's placeholder.
        let filler = self.tokenizer.eos.or(self.tokenizer.bos).unwrap_or(0);
        let mut out = Vec::with_capacity(texts.len());
        for (text, (t, offsets)) in kept.iter().zip(encoded) {
            let mut ids = Vec::with_capacity(t.len() + before.len() + after.len() + 1);
            ids.extend(bos);
            ids.extend_from_slice(before);
            // The native method pools over every token the model read, its
            // special tokens included (as sentence-transformers does).
            let mean_start = if specials { 0 } else { ids.len() };
            // The last copy of the text: bytes `at..at + len` of the rendered
            // string; its tokens are those overlapping them.
            let at = template.pieces[..template.slots()]
                .iter()
                .map(String::len)
                .sum::<usize>()
                + (template.slots() - 1) * text.len();
            let span = at..at + text.len();
            let first = offsets
                .iter()
                .position(|o| o.1 > span.start && o.0 < span.end);
            let mut last_copy = match first {
                Some(f) => {
                    let n = offsets[f..].iter().take_while(|o| o.0 < span.end).count();
                    mean_start + f..mean_start + f + n
                }
                _ => mean_start..mean_start,
            };
            ids.extend_from_slice(&t);
            if specials && ids.len() + after.len() > self.context {
                // The prompt and the text tokenized together came out longer
                // than apart: cut the end, as the model's tokenizer would.
                ids.truncate(self.context - after.len());
            }
            ids.extend_from_slice(after);
            if ids.is_empty() {
                // An empty text with no prompt and no BOS: one EOS token
                // stands for it, so every input gets a vector.
                ids.push(filler);
            }
            if let Some(at) = placeholder {
                // Any token works, its state is replaced from layer 1 on; EOS
                // keeps it out of the text. Where it goes matters, see
                // docs/QUALITY.md ("Token Prepending's placeholder").
                let at = at.min(ids.len());
                ids.insert(at, filler);
                let shift = |i: usize| if i >= at { i + 1 } else { i };
                last_copy = shift(last_copy.start)..shift(last_copy.end);
            }
            let mean_start = mean_start.min(ids.len() - 1);
            out.push(Prepared {
                ids,
                last_copy,
                mean_start,
            });
        }
        Ok((out, truncated))
    }

    /// Group inputs into forward passes of at most `batch_tokens` padded
    /// tokens, longest first, so similar lengths share a batch.
    fn batches(&self, prepared: &[Prepared]) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..prepared.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(prepared[i].ids.len()));
        let mut out: Vec<Vec<usize>> = Vec::new();
        let mut cur: Vec<usize> = Vec::new();
        let mut cur_max = 0;
        for i in order {
            let len = prepared[i].ids.len();
            let new_max = cur_max.max(len);
            if !cur.is_empty() && new_max * (cur.len() + 1) > self.batch_tokens {
                out.push(std::mem::take(&mut cur));
                cur_max = 0;
            }
            cur_max = cur_max.max(len);
            cur.push(i);
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }

    /// Per-layer representations of `texts` (in `template`), for intrinsic
    /// dimension estimates: `out[layer][text]`. `progress` gets the texts
    /// done after each batch; returning false stops the work (the caller went
    /// away) with an error.
    pub fn layer_representations(
        &self,
        texts: &[String],
        template: &Template,
        pooling: LayerPooling,
        max_tokens: usize,
        mut progress: impl FnMut(usize) -> bool,
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let decoder = self.decoder()?;
        let (prepared, _) = self.prepare(texts, template, max_tokens, true, None, false)?;
        let n_layers = decoder.cfg.n_layers;
        let mut reps = vec![vec![Vec::new(); prepared.len()]; n_layers];
        let fopts = ForwardOptions {
            collect_layers: Some(pooling),
            ..Default::default()
        };
        for batch in self.batches(&prepared) {
            let seqs: Vec<Vec<u32>> = batch.iter().map(|&i| prepared[i].ids.clone()).collect();
            let out = decoder.forward(&seqs, &fopts)?;
            for (l, pooled) in out.layer_pooled.iter().enumerate() {
                let rows = pooled.to_vec2::<f32>()?;
                for (bi, row) in rows.into_iter().enumerate() {
                    reps[l][batch[bi]] = row;
                }
            }
            if !progress(batch.len()) {
                return Err(EngineError::Cancelled(
                    "layer selection stopped: its client went away".into(),
                ));
            }
        }
        Ok(reps)
    }

    /// TwoNN intrinsic dimension per layer and the method's window choice.
    pub fn select_layers(&self, texts: &[String], opts: &SelectOptions) -> Result<LayerSelection> {
        self.select_layers_with_progress(texts, opts, |_| true)
    }

    /// `select_layers`, reporting the texts done to `progress` after every
    /// forward pass and asking it (with 0) before every layer's distances;
    /// once it returns false the selection stops with
    /// [`EngineError::Cancelled`].
    pub fn select_layers_with_progress(
        &self,
        texts: &[String],
        opts: &SelectOptions,
        mut progress: impl FnMut(usize) -> bool,
    ) -> Result<LayerSelection> {
        if texts.len() < 8 {
            return Err(EngineError::invalid(
                "sample",
                format!(
                    "{} texts; TwoNN needs at least 8 (a few hundred is better)",
                    texts.len()
                ),
            ));
        }
        match opts.rule.as_deref().unwrap_or("twonn") {
            "twonn" => {}
            "agreement" => return self.select_by_agreement(texts, opts, progress),
            other => {
                return Err(EngineError::invalid(
                    "rule",
                    format!("'{other}' (twonn, agreement)"),
                ))
            }
        }
        let pooling = match self.knobs.id_representation.as_deref().unwrap_or("last") {
            "last" => LayerPooling::Last,
            "mean" => LayerPooling::Mean,
            other => {
                return Err(EngineError::invalid(
                    "representation",
                    format!("'{other}' (last, mean)"),
                ))
            }
        };
        let skip = opts.skip_fraction.unwrap_or(0.2);
        if !(0.0..1.0).contains(&skip) {
            return Err(EngineError::invalid(
                "skip_fraction",
                format!("{skip} (must be in [0, 1))"),
            ));
        }
        let window = opts.window.unwrap_or(3).max(1);
        let template = Template::parse(crate::method::COMPRESS_DOC)?;
        let reps = self.layer_representations(
            texts,
            &template,
            pooling,
            opts.max_tokens.unwrap_or(kvembed_proto::DEFAULT_MAX_TOKENS),
            &mut progress,
        )?;
        let (curve, sel) = crate::twonn::select_layers(
            &reps,
            f64::from(skip),
            window,
            self.decoder()?.cfg.family,
            &mut || progress(0),
        )
        .ok_or_else(|| {
            EngineError::Cancelled("layer selection stopped: its client went away".into())
        })?;
        let points = curve
            .iter()
            .enumerate()
            .map(|(layer, &id)| LayerPoint {
                layer,
                intrinsic_dimension: id,
                selected: sel.layers.contains(&layer),
                agreement: None,
            })
            .collect();
        let space = self.fit_space(texts, opts, &sel.layers, &mut progress)?;
        Ok(LayerSelection {
            curve: points,
            selected: sel.layers,
            rule: sel.rule,
            space,
        })
    }

    /// The texts a layer selection embeds (one forward pass each), for its
    /// progress reports.
    pub fn selection_work(&self, texts: usize, opts: &SelectOptions) -> usize {
        let passes = match (opts.rule.as_deref(), self.decoder()) {
            (Some("agreement"), Ok(d)) => {
                let width = opts.window.unwrap_or(3).max(1);
                2 * crate::agreement::windows_to_score(d.cfg.n_layers, width, d.cfg.family).len()
            }
            _ => 1,
        };
        texts * (passes + usize::from(opts.space.is_some()))
    }

    /// `kv_select_layers` with the agreement rule: the window chosen by
    /// [`Embedder::choose_by_agreement`] at the bias of the options the
    /// selection is made for, each layer's point carrying the score of the
    /// window starting there, and the space fitted as with TwoNN.
    fn select_by_agreement(
        &self,
        texts: &[String],
        opts: &SelectOptions,
        mut progress: impl FnMut(usize) -> bool,
    ) -> Result<LayerSelection> {
        let mut base = opts.embed.clone().unwrap_or_default();
        if base.max_tokens.is_none() {
            base.max_tokens = opts.max_tokens;
        }
        let width = opts.window.unwrap_or(3).max(1);
        let choice = self.choose_by_agreement(texts, &base, width, false, &mut progress)?;
        let n = self.decoder()?.cfg.n_layers;
        let curve = (0..n)
            .map(|layer| LayerPoint {
                layer,
                intrinsic_dimension: f64::NAN,
                selected: choice.layers.contains(&layer),
                agreement: choice
                    .points
                    .iter()
                    .find(|p| p.layers.first() == Some(&layer) && p.bias == choice.bias)
                    .map(|p| p.score),
            })
            .collect();
        let space = self.fit_space(texts, opts, &choice.layers, &mut progress)?;
        Ok(LayerSelection {
            curve,
            selected: choice.layers,
            rule: choice.rule,
            space,
        })
    }

    /// The corpus calibration of the space a selection asked for, fitted on
    /// its sample embedded as kv_embed will embed it with `layers`.
    fn fit_space(
        &self,
        texts: &[String],
        opts: &SelectOptions,
        layers: &[usize],
        progress: &mut impl FnMut(usize) -> bool,
    ) -> Result<Option<kvembed_proto::SpaceMap>> {
        let Some(fit) = &opts.space else {
            return Ok(None);
        };
        let fit = crate::space::SpaceFit::parse(fit)?;
        let mut embed = opts.embed.clone().unwrap_or_default();
        embed.layers = Some(layers.to_vec());
        embed.truncate = Some(true);
        if embed.max_tokens.is_none() {
            embed.max_tokens = opts.max_tokens;
        }
        let mut vecs = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(64) {
            if !progress(0) {
                return Err(EngineError::Cancelled(
                    "layer selection stopped: its client went away".into(),
                ));
            }
            vecs.extend(self.embed(chunk, Role::Document, &embed)?.vectors);
            progress(chunk.len());
        }
        Ok(Some(crate::space::fit(&vecs, fit)?))
    }

    /// The re-routing window and bias chosen from unlabeled `texts` by the
    /// agreement rule ([`crate::agreement`]): the window of `width` layers
    /// (or no re-routing) that agrees best at the method's bias, then another
    /// bias of [`crate::agreement::BIASES`] at that window only where it
    /// agrees better than the method's by more than two standard errors of
    /// the per-text difference (the bias matters little, and a sample's
    /// noise should not move it), when `choose_bias`. `base` is the method and options the
    /// choice is made for (its layers and bias are replaced). `progress`
    /// gets the texts embedded after every chunk and stops the choice when
    /// it returns false.
    pub fn choose_by_agreement(
        &self,
        texts: &[String],
        base: &EmbedOptions,
        width: usize,
        choose_bias: bool,
        mut progress: impl FnMut(usize) -> bool,
    ) -> Result<AgreementChoice> {
        use crate::agreement;
        if texts.len() < 16 {
            return Err(EngineError::invalid(
                "sample",
                format!(
                    "{} texts; the agreement rule needs at least 16 (a few hundred is better)",
                    texts.len()
                ),
            ));
        }
        let decoder = self.decoder()?;
        let (n, family) = (decoder.cfg.n_layers, decoder.cfg.family);
        let width = width.clamp(1, n.max(1));
        let method = self.method(base)?;
        let Some(reroute) = &method.reroute else {
            return Err(EngineError::invalid(
                "method",
                "the agreement rule chooses re-routing layers; this method re-routes none",
            ));
        };
        let method_bias = reroute.bias;
        let copies = agreement::copies(texts);
        let mut score = |layers: &[usize], bias: f32| -> Result<AgreementPoint> {
            let mut opts = base.clone();
            opts.layers = Some(layers.to_vec());
            opts.bias = Some(bias);
            opts.truncate = Some(true);
            let mut run = |set: &[String]| -> Result<Vec<Vec<f32>>> {
                let mut out = Vec::with_capacity(set.len());
                for chunk in set.chunks(64) {
                    out.extend(self.embed(chunk, Role::Document, &opts)?.vectors);
                    if !progress(chunk.len()) {
                        return Err(EngineError::Cancelled(
                            "layer selection stopped: its client went away".into(),
                        ));
                    }
                }
                Ok(out)
            };
            let a = run(texts)?;
            let b = run(&copies)?;
            let per_text = agreement::agreement_per_text(&a, &b).unwrap_or_default();
            Ok(AgreementPoint {
                layers: layers.to_vec(),
                bias,
                score: agreement::mean(&per_text).unwrap_or(f64::NEG_INFINITY),
                stability: agreement::stability(&a, &b).unwrap_or(f64::NEG_INFINITY),
                per_text,
            })
        };
        let windows = agreement::windows_to_score(n, width, family);
        let default_window = crate::method::LayerChoice::KvDefault { width }.resolve(n, family);
        let mut points = Vec::with_capacity(windows.len() + agreement::BIASES.len());
        for w in &windows {
            points.push(score(w, method_bias)?);
        }
        let best = points
            .iter()
            .max_by(|a, b| a.score.total_cmp(&b.score))
            .cloned()
            .expect("at least one candidate");
        let default_point = points.iter().find(|p| p.layers == default_window).cloned();
        let none_score = points[0].score;
        let mut chosen = best.clone();
        let mut bias_words = String::new();
        if choose_bias && !best.layers.is_empty() {
            let mut best_bias: Option<(AgreementPoint, f64, f64)> = None;
            for &b in agreement::BIASES {
                if b == method_bias {
                    continue;
                }
                let p = score(&best.layers, b)?;
                if let Some((d, se)) = agreement::paired_difference(&p.per_text, &best.per_text) {
                    if d > 2.0 * se && best_bias.as_ref().is_none_or(|(q, _, _)| p.score > q.score) {
                        best_bias = Some((p.clone(), d, se));
                    }
                }
                points.push(p);
            }
            bias_words = match best_bias {
                Some((p, d, se)) => {
                    chosen = p;
                    format!(
                        "; bias {} agrees better than {method_bias} by {d:.3} (standard error {se:.3})",
                        chosen.bias
                    )
                }
                None => format!(
                    "; no other bias of {:?} agrees better than {method_bias} by two standard errors",
                    agreement::BIASES
                ),
            };
        }
        let versus = |other: &Option<AgreementPoint>, name: &str| match other {
            Some(o) if o.layers != best.layers => {
                match agreement::paired_difference(&best.per_text, &o.per_text) {
                    Some((d, se)) => format!(", {d:+.3} (standard error {se:.3}) over {name}"),
                    None => String::new(),
                }
            }
            _ => String::new(),
        };
        let what = match (best.layers.first(), best.layers.last()) {
            (Some(a), Some(b)) => format!("layers {a}-{b}"),
            _ => "no re-routing".to_string(),
        };
        let rule = format!(
            "agreement rule on {} texts: {what} agree best ({:.3}{}{}) of {} windows of {width} layers and no re-routing ({none_score:.3}){bias_words}",
            texts.len(),
            best.score,
            versus(&default_point, "the default window"),
            versus(&Some(points[0].clone()), "no re-routing"),
            windows.len() - 1,
        );
        Ok(AgreementChoice {
            layers: chosen.layers,
            bias: chosen.bias,
            rule,
            points,
        })
    }

    /// Final hidden states (after the final norm) of one sequence of token
    /// ids, optionally re-routing `layers` with `bias`: the golden-test hook.
    pub fn forward_hidden(
        &self,
        ids: &[u32],
        reroute: Option<(&[usize], f32)>,
    ) -> Result<Vec<Vec<f32>>> {
        let decoder = self.decoder()?;
        let n = decoder.cfg.n_layers;
        let reroute = match reroute {
            Some((layers, bias)) => Some(Reroute::new(
                layers,
                n,
                bias,
                kvembed_model::decoder::PrefixPosition::Last,
            )?),
            None => None,
        };
        let out = decoder.forward(
            &[ids.to_vec()],
            &ForwardOptions {
                reroute,
                ..Default::default()
            },
        )?;
        kvembed_model::decoder::rows_of(&out.hidden, 0, ids.len())
    }

    /// Greedy continuation, for checking that a backbone really works.
    pub fn generate(&self, prompt: &str, max_new: usize) -> Result<String> {
        let mut ids: Vec<u32> = Vec::new();
        if self.tokenizer.add_bos {
            ids.extend(self.tokenizer.bos);
        }
        ids.extend(self.tokenizer.encode(prompt)?);
        let start = ids.len();
        let decoder = self.decoder()?;
        for _ in 0..max_new {
            let out = decoder.forward(&[ids.clone()], &ForwardOptions::default())?;
            let logits = decoder.last_logits(&out, &[ids.len()])?;
            let next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
            if Some(next) == self.tokenizer.eos {
                break;
            }
            ids.push(next);
        }
        self.tokenizer.decode(&ids[start..])
    }
}

fn pool(hidden: &Tensor, b: usize, p: &Prepared, pooling: Pooling) -> Result<Vec<f32>> {
    let len = p.ids.len();
    let seq = hidden.narrow(0, b, 1)?.squeeze(0)?;
    let mean = |r: std::ops::Range<usize>| -> Result<Tensor> {
        let r = if r.is_empty() { p.mean_start..len } else { r };
        Ok(seq.narrow(0, r.start, r.end - r.start)?.mean(0)?)
    };
    let last = || -> Result<Tensor> { Ok(seq.narrow(0, len - 1, 1)?.squeeze(0)?) };
    let v = match pooling {
        Pooling::Mean => mean(p.mean_start..len)?,
        Pooling::Last => last()?,
        Pooling::Hybrid => ((mean(p.mean_start..len)? + last()?)? * 0.5)?,
        Pooling::LastCopyMean => mean(p.last_copy.clone())?,
        Pooling::First => seq.narrow(0, 0, 1)?.squeeze(0)?,
    };
    Ok(normalize(v.to_vec1::<f32>()?))
}

pub fn normalize(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
    }
    v
}

/// The largest character boundary of `s` at or before byte `i`.
/// Bytes read from each end of a weights file for its fingerprint.
const FINGERPRINT_BYTES: u64 = 4 << 20;

/// A model's fingerprint: `sha256:` and the hex digest of, for each weights
/// file (a GGUF file; a Hugging Face directory's `config.json` and
/// `*.safetensors`, by name), its name's extension, its size and its first
/// and last 4 MiB (the headers with every tensor's name, shape and offset,
/// and weights at both ends). The same weights give the same fingerprint
/// under any path; other weights of the same shape and size do not.
pub fn fingerprint(path: &std::path::Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let mut files = Vec::new();
    if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| EngineError::io(path, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "config.json" || name.ends_with(".safetensors") {
                files.push(entry.path());
            }
        }
        // How a model's own embedding is made (crate::native) is part of
        // what it gives.
        for st in [
            "modules.json",
            "config_sentence_transformers.json",
            "sentence_bert_config.json",
            "1_Pooling/config.json",
        ] {
            if path.join(st).is_file() {
                files.push(path.join(st));
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut hash = Sha256::new();
    for file in &files {
        let mut f = std::fs::File::open(file).map_err(|e| EngineError::io(file, e))?;
        let len = f.metadata().map_err(|e| EngineError::io(file, e))?.len();
        hash.update(
            file.extension()
                .map(|e| e.as_encoded_bytes())
                .unwrap_or_default(),
        );
        hash.update(len.to_le_bytes());
        let mut buf = Vec::new();
        (&mut f)
            .take(FINGERPRINT_BYTES)
            .read_to_end(&mut buf)
            .map_err(|e| EngineError::io(file, e))?;
        if len > 2 * FINGERPRINT_BYTES {
            f.seek(SeekFrom::Start(len - FINGERPRINT_BYTES))
                .map_err(|e| EngineError::io(file, e))?;
            f.read_to_end(&mut buf)
                .map_err(|e| EngineError::io(file, e))?;
        } else {
            f.read_to_end(&mut buf)
                .map_err(|e| EngineError::io(file, e))?;
        }
        hash.update(&buf);
    }
    let digest = hash.finalize();
    Ok(format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

fn floor_char_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden(arch: &str) -> Embedder {
        let dir = format!("{}/tests/golden/{arch}", env!("CARGO_MANIFEST_DIR"));
        Embedder::load(&LoadSpec::new(&dir)).unwrap()
    }

    /// Token Prepending's placeholder: right after BOS, first without BOS,
    /// or where asked; the rest of the input is the baseline's, unchanged.
    #[test]
    fn token_prepending_placeholder_position() {
        let texts = vec!["The cat sat on the mat.".to_string()];
        let tp = Method::from_name("token-prepending").unwrap();
        let asked = |pos| {
            tp.clone().with_knobs(&Knobs {
                placeholder_position: Some(pos),
                ..Default::default()
            })
        };
        for (arch, with_bos) in [("qwen2", false), ("llama", true)] {
            let e = golden(arch);
            assert_eq!(
                e.tokenizer.add_bos && e.tokenizer.bos.is_some(),
                with_bos,
                "{arch}"
            );
            let (plain, _) = e
                .prepare(&texts, tp.document.first(), 64, false, None, false)
                .unwrap();
            let plain = &plain[0].ids;
            let token = e.tokenizer.eos.or(e.tokenizer.bos).unwrap_or(0);
            let default = e.placeholder_position(tp.prepend.unwrap());
            assert_eq!(default, usize::from(with_bos), "{arch}");
            if with_bos {
                assert_eq!(plain[0], e.tokenizer.bos.unwrap(), "{arch}");
            }
            for at in [default, 0, 1] {
                let m = asked(at).unwrap();
                assert_eq!(e.placeholder_position(m.prepend.unwrap()), at, "{arch}");
                let (marked, _) = e
                    .prepare(&texts, m.document.first(), 64, false, Some(at), false)
                    .unwrap();
                let marked = &marked[0].ids;
                assert_eq!(marked.len(), plain.len() + 1, "{arch} at {at}");
                assert_eq!(marked[at], token, "{arch} at {at}");
                assert_eq!(&marked[..at], &plain[..at], "{arch} at {at}");
                assert_eq!(&marked[at + 1..], &plain[at..], "{arch} at {at}");
            }
        }
        assert!(asked(2).is_err(), "position 2 is refused");
    }

    /// A token id the weights have no row for is an engine error (the
    /// tokenizer and the weights disagree), not a failure to load the model,
    /// and it runs no forward pass.
    #[test]
    fn a_token_id_outside_the_vocabulary_is_an_internal_error() {
        let e = golden("llama");
        let Err(err) = e
            .decoder()
            .unwrap()
            .forward(&[vec![1, u32::MAX]], &ForwardOptions::default())
        else {
            panic!("a token id outside the vocabulary was accepted");
        };
        assert_eq!(err.kind(), kvembed_proto::ErrorKind::Internal, "{err}");
        assert!(
            err.to_string().contains("outside the model's vocabulary"),
            "{err}"
        );
        assert_eq!(e.forward_passes(), 0);
    }
}
