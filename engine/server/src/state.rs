//! What every thread of the server shares: the options, the model (loading,
//! loaded or failed), the job queue and the counters `Status` reports.

use kvembed_core::embedder::{Embedder, LoadSpec, ModelInfo};
use kvembed_proto::{self as proto, ErrorKind, Fault};
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

pub(crate) struct Shared {
    pub(crate) opts: ServeOptions,
    pub(crate) model: Mutex<ModelState>,
    pub(crate) model_changed: Condvar,
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
        Shared {
            opts,
            model: Mutex::new(ModelState::Loading),
            model_changed: Condvar::new(),
            queue: Mutex::new(VecDeque::new()),
            queue_changed: Condvar::new(),
            requests_served: AtomicU64::new(0),
            texts_served: AtomicU64::new(0),
            tokens_served: AtomicU64::new(0),
            fault: Mutex::new(None),
            stats: Mutex::new(Default::default()),
        }
    }

    /// Blocks until the load has finished, one way or the other.
    pub(crate) fn wait_loaded(
        &self,
    ) -> std::result::Result<(Arc<Embedder>, ModelInfo), (ErrorKind, String)> {
        let mut state = self.model.lock();
        loop {
            match &*state {
                ModelState::Loading => self.model_changed.wait(&mut state),
                ModelState::Ready(e, info) => return Ok((e.clone(), info.clone())),
                ModelState::Failed(kind, msg) => return Err((*kind, msg.clone())),
            }
        }
    }

    pub(crate) fn status(&self) -> proto::Status {
        let queue_depth = self.queue.lock().len();
        let threads = match self.opts.threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        };
        let mut s = proto::Status {
            model: self.opts.model.clone(),
            device: self.opts.device.clone(),
            threads,
            queue_depth,
            requests_served: self.requests_served.load(Ordering::Relaxed),
            texts_served: self.texts_served.load(Ordering::Relaxed),
            tokens_served: self.tokens_served.load(Ordering::Relaxed),
            pid: std::process::id(),
            cpu: kvembed_core::model::cpu::features().to_string(),
            max_calibration_texts: self.opts.calibration_limit(),
            ..Default::default()
        };
        match &*self.model.lock() {
            ModelState::Loading => s.state = proto::EngineState::Loading,
            ModelState::Failed(_, msg) => {
                s.state = proto::EngineState::Failed;
                s.load_error = Some(msg.clone());
            }
            ModelState::Ready(embedder, info) => {
                s.state = proto::EngineState::Ready;
                s.forward_passes = embedder.forward_passes();
                // `model` stays the setting as given (what kvembed.model says);
                // `model_id` identifies the weights.
                s.model_id = info.model_id.clone();
                s.fingerprint = info.fingerprint.clone();
                s.architecture = info.architecture.clone();
                s.dim = info.dim;
                s.layers = info.layers;
                s.device = info.device.clone();
                s.default_method = info.default_method.clone();
                s.default_layers = info.default_layers.clone();
                s.default_bias = info.default_bias;
                s.document_prompt = info.document_prompt.clone();
                s.query_prompt = info.query_prompt.clone();
                s.max_tokens_limit = self.opts.token_limit(info.context);
                s.max_tokens = match self.opts.max_tokens {
                    0 => info.max_tokens,
                    n => n,
                }
                .min(s.max_tokens_limit);
            }
        }
        s
    }
}

pub(crate) fn load_model(shared: &Shared) {
    let opts = &shared.opts;
    let started = Instant::now();
    let outcome = if opts.model.trim().is_empty() {
        Err((
            ErrorKind::ModelLoad,
            "no model configured: set kvembed.model (the --model flag) to a GGUF file, a Hugging Face \
             model directory, or a repo id in the local Hugging Face cache"
                .to_string(),
        ))
    } else {
        let spec = LoadSpec {
            model: opts.model.clone(),
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
                format!("loading '{}' failed: {}", opts.model, panic_message(&panic)),
            )),
        }
    };
    let new_state = match outcome {
        Ok(embedder) => {
            let info = embedder.info();
            log(&format!(
                "model ready in {:.1}s: {} ({}, {} layers, dim {}, device {}, matmuls {})",
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
            log(&format!("model load failed: {message}"));
            // Whatever the engine called it, a load failure is a load failure
            // for the client; keep Internal only for panics inside candle.
            let kind = if kind == ErrorKind::InvalidInput {
                ErrorKind::ModelLoad
            } else {
                kind
            };
            ModelState::Failed(kind, message)
        }
    };
    *shared.model.lock() = new_state;
    shared.model_changed.notify_all();
}
