//! What every thread of the server shares: the options, the models (each
//! loading, loaded or failed), the job queue and the counters `Status` reports.

use kvembed_core::embedder::{Embedder, LoadSpec, ModelInfo};
use kvembed_proto::{self as proto, ErrorKind, Fault, ModelEntry};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::jobs::Job;
use crate::{log, panic_message, ServeOptions};

pub(crate) enum ModelState {
    Loading,
    Ready(Arc<Embedder>, ModelInfo),
    Failed(ErrorKind, String),
}

/// One model the server serves: `kvembed.model` first, then each entry of
/// `kvembed.models`. Each loads, fails and counts on its own.
pub(crate) struct Slot {
    pub(crate) entry: ModelEntry,
    pub(crate) state: Mutex<ModelState>,
    pub(crate) changed: Condvar,
    pub(crate) texts_served: AtomicU64,
    pub(crate) tokens_served: AtomicU64,
}

impl Slot {
    fn new(entry: ModelEntry, state: ModelState) -> Slot {
        Slot {
            entry,
            state: Mutex::new(state),
            changed: Condvar::new(),
            texts_served: AtomicU64::new(0),
            tokens_served: AtomicU64::new(0),
        }
    }

    fn set(&self, state: ModelState) {
        *self.state.lock() = state;
        self.changed.notify_all();
    }

    /// Blocks until this model's load has finished, one way or the other.
    pub(crate) fn wait_loaded(
        &self,
    ) -> std::result::Result<(Arc<Embedder>, ModelInfo), (ErrorKind, String)> {
        let mut state = self.state.lock();
        loop {
            match &*state {
                ModelState::Loading => self.changed.wait(&mut state),
                ModelState::Ready(e, info) => return Ok((e.clone(), info.clone())),
                ModelState::Failed(kind, msg) => return Err((*kind, msg.clone())),
            }
        }
    }
}

pub(crate) struct Shared {
    pub(crate) opts: ServeOptions,
    /// The models, `kvembed.model` first.
    pub(crate) models: Vec<Slot>,
    pub(crate) queue: Mutex<VecDeque<Job>>,
    pub(crate) queue_changed: Condvar,
    pub(crate) requests_served: AtomicU64,
    pub(crate) texts_served: AtomicU64,
    pub(crate) tokens_served: AtomicU64,
    /// A fault armed by `Request::Fault`, taken by the next embedding batch.
    pub(crate) fault: Mutex<Option<Fault>>,
    /// The metrics per database and role (`Request::Stats`).
    pub(crate) stats: Mutex<crate::stats::Stats>,
}

impl Shared {
    pub(crate) fn new(opts: ServeOptions) -> Shared {
        let first = ModelEntry {
            name: proto::default_model_name(&opts.model),
            source: opts.model.clone(),
        };
        let mut models = vec![Slot::new(first, ModelState::Loading)];
        match proto::parse_model_list(&opts.models, &models[0].entry.name) {
            Ok(entries) => models.extend(
                entries
                    .into_iter()
                    .map(|e| Slot::new(e, ModelState::Loading)),
            ),
            // A bad list fails only itself: kvembed.model is served, and
            // the list's error shows as a failed model.
            Err(why) => {
                log(&format!("kvembed.models: {why}"));
                models.push(Slot::new(
                    ModelEntry {
                        name: "kvembed.models".into(),
                        source: opts.models.clone(),
                    },
                    ModelState::Failed(ErrorKind::ModelLoad, format!("kvembed.models: {why}")),
                ));
            }
        }
        Shared {
            opts,
            models,
            queue: Mutex::new(VecDeque::new()),
            queue_changed: Condvar::new(),
            requests_served: AtomicU64::new(0),
            texts_served: AtomicU64::new(0),
            tokens_served: AtomicU64::new(0),
            fault: Mutex::new(None),
            stats: Mutex::new(Default::default()),
        }
    }

    /// The model requests call `name` (`None`: the first).
    pub(crate) fn slot(
        &self,
        name: Option<&str>,
    ) -> std::result::Result<&Slot, (ErrorKind, String)> {
        let found = match name {
            None => self.models.first(),
            Some(n) => self.models.iter().find(|s| s.entry.name == n),
        };
        found.ok_or_else(|| {
            let names: Vec<&str> = self.models.iter().map(|s| s.entry.name.as_str()).collect();
            (
                ErrorKind::InvalidInput,
                format!(
                    "the engine serves no model named '{}' (it serves: {}; an administrator adds models with kvembed.models)",
                    name.unwrap_or_default(),
                    names.join(", ")
                ),
            )
        })
    }

    /// Blocks until model `name` (`None`: the first) has finished loading.
    pub(crate) fn wait_loaded(
        &self,
        name: Option<&str>,
    ) -> std::result::Result<(Arc<Embedder>, ModelInfo), (ErrorKind, String)> {
        self.slot(name)?.wait_loaded()
    }

    pub(crate) fn status(&self) -> proto::Status {
        let queue_depth = self.queue.lock().len();
        let threads = match self.opts.threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        };
        let models: Vec<proto::ModelStatus> = self
            .models
            .iter()
            .map(|slot| self.model_status(slot))
            .collect();
        let all_loaded = models
            .iter()
            .all(|m| m.state != proto::EngineState::Loading);
        proto::Status {
            state: if all_loaded {
                models[0].state
            } else {
                proto::EngineState::Loading
            },
            model: self.opts.model.clone(),
            device: self.opts.device.clone(),
            forward_passes: models.iter().map(|m| m.forward_passes).sum(),
            threads,
            queue_depth,
            requests_served: self.requests_served.load(Ordering::Relaxed),
            texts_served: self.texts_served.load(Ordering::Relaxed),
            tokens_served: self.tokens_served.load(Ordering::Relaxed),
            pid: std::process::id(),
            cpu: kvembed_core::model::cpu::features().to_string(),
            max_calibration_texts: self.opts.calibration_limit(),
            models,
        }
    }

    fn model_status(&self, slot: &Slot) -> proto::ModelStatus {
        let mut m = proto::ModelStatus {
            name: slot.entry.name.clone(),
            source: slot.entry.source.clone(),
            texts_served: slot.texts_served.load(Ordering::Relaxed),
            tokens_served: slot.tokens_served.load(Ordering::Relaxed),
            ..Default::default()
        };
        match &*slot.state.lock() {
            ModelState::Loading => m.state = proto::EngineState::Loading,
            ModelState::Failed(_, msg) => {
                m.state = proto::EngineState::Failed;
                m.load_error = Some(msg.clone());
            }
            ModelState::Ready(embedder, info) => {
                m.state = proto::EngineState::Ready;
                m.forward_passes = embedder.forward_passes();
                m.model_id = info.model_id.clone();
                m.fingerprint = info.fingerprint.clone();
                m.architecture = info.architecture.clone();
                m.dim = info.dim;
                m.layers = info.layers;
                m.device = info.device.clone();
                m.default_method = info.default_method.clone();
                m.default_layers = info.default_layers.clone();
                m.default_bias = info.default_bias;
                m.document_prompt = info.document_prompt.clone();
                m.query_prompt = info.query_prompt.clone();
                m.max_tokens_limit = self.opts.token_limit(info.context);
                m.max_tokens = match self.opts.max_tokens {
                    0 => info.max_tokens,
                    n => n,
                }
                .min(m.max_tokens_limit);
            }
        }
        m
    }
}

/// Loads every model, `kvembed.model` first, one after the other: a model
/// that fails (a bad path, an unsupported architecture, a corrupt file,
/// weights larger than the memory left under kvembed.engine_memory_limit)
/// fails alone; the others serve.
pub(crate) fn load_model(shared: &Shared) {
    for slot in &shared.models {
        if matches!(*slot.state.lock(), ModelState::Loading) {
            slot.set(load_one(shared, &slot.entry));
        }
    }
}

fn load_one(shared: &Shared, entry: &ModelEntry) -> ModelState {
    let opts = &shared.opts;
    let started = Instant::now();
    let outcome = if entry.source.trim().is_empty() {
        Err((
            ErrorKind::ModelLoad,
            "no model configured: set kvembed.model (the --model flag) to a GGUF file, a Hugging Face \
             model directory, or a repo id in the local Hugging Face cache"
                .to_string(),
        ))
    } else {
        let spec = LoadSpec {
            model: entry.source.clone(),
            device: opts.device.clone(),
            threads: opts.threads,
            weights: None,
        };
        match std::panic::catch_unwind(|| Embedder::load(&spec)) {
            Ok(Ok(mut embedder)) => {
                // One budget for both: the queue packs requests up to it and
                // the decoder runs passes of at most that many padded tokens.
                embedder.batch_tokens = opts.batch_tokens.max(1);
                Ok(embedder)
            }
            Ok(Err(e)) => Err((e.kind(), e.to_string())),
            Err(panic) => Err((
                ErrorKind::ModelLoad,
                format!(
                    "loading '{}' failed: {}",
                    entry.source,
                    panic_message(&panic)
                ),
            )),
        }
    };
    match outcome {
        Ok(embedder) => {
            let info = embedder.info();
            log(&format!(
                "model '{}' ready in {:.1}s: {} ({}, {} layers, dim {}, device {}, matmuls {})",
                entry.name,
                started.elapsed().as_secs_f64(),
                info.model,
                info.architecture,
                info.layers,
                info.dim,
                info.device,
                embedder.matmul_kernel()
            ));
            ModelState::Ready(Arc::new(embedder), info)
        }
        Err((kind, message)) => {
            log(&format!("model '{}' failed to load: {message}", entry.name));
            // Whatever the engine called it, a load failure is a load failure
            // for the client; keep Internal only for panics inside candle.
            let kind = if kind == ErrorKind::InvalidInput {
                ErrorKind::ModelLoad
            } else {
                kind
            };
            ModelState::Failed(kind, message)
        }
    }
}
