//! `kvembed serve`: the inference server behind the PostgreSQL extension
//! (the `kvembed` binary of this crate, `src/main.rs`).
//!
//! One server per cluster. The extension's background worker starts it as a
//! separate OS process (never a postmaster child), watches it and restarts it
//! when it dies, so an out-of-memory kill or a crash in inference fails only
//! the statements waiting on it, never the database.
//!
//! Sessions connect over a Unix socket (mode 0600, in a 0700 directory) and
//! speak [`kvembed_proto`]. Inside the process:
//!
//! * the main thread accepts connections and gives each its own thread;
//! * a loader thread loads the model while connections are already accepted:
//!   `Status` answers `loading` meanwhile, other requests wait for the load;
//!   a failed load is kept and reported to every request (the process stays
//!   up so the error reaches the user instead of a restart loop);
//! * one inference thread owns the model's compute: it takes jobs from a
//!   queue and packs `Embed` requests with identical (role, options) from
//!   different connections into one batch, up to a token budget, then splits
//!   the results back. Jobs of clients that went away are skipped;
//! * a watchdog thread exits when the parent (the supervisor) is gone.

use kvembed_core::embedder::{Embedder, LayerSelection, LoadSpec, ModelInfo};
use kvembed_core::{EngineError, Result};
use kvembed_proto::{
    self as proto, EmbedOptions, ErrorKind, Fault, Request, Response, Role, SelectOptions, Truncation,
};
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How `kvembed serve` is started (its command-line flags).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Unix socket to listen on; a stale socket file is replaced.
    pub socket: PathBuf,
    /// GGUF file, Hugging Face model directory, or repo id in the local cache.
    pub model: String,
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    /// Compute threads, 0 = all cores.
    pub threads: usize,
    /// Token budget of one batch (requests from different sessions are
    /// packed together up to this many tokens; one larger request runs alone).
    pub batch_tokens: usize,
    /// Default `max_tokens` for requests that do not set one; 0 = the model's.
    pub max_tokens: usize,
    /// The administrator's ceiling on the tokens of one text: a request
    /// asking for more gets this many (truncated, or refused where it asked
    /// for no truncation). Capped at the model's trained context; 0 = that
    /// context alone.
    pub max_tokens_limit: usize,
    /// The administrator's ceiling on the texts of one layer selection
    /// (TwoNN keeps `N^2 / 2` distances per layer); 0 = the default.
    pub max_calibration_texts: usize,
}

impl ServeOptions {
    /// The ceiling on one text's tokens for a model with `context` positions.
    fn token_limit(&self, context: usize) -> usize {
        match self.max_tokens_limit {
            0 => context,
            n => n.min(context),
        }
        .max(1)
    }

    fn calibration_limit(&self) -> usize {
        match self.max_calibration_texts {
            0 => proto::DEFAULT_MAX_CALIBRATION_TEXTS,
            n => n,
        }
    }
}

/// Serves until the process is killed, the parent goes away, or a client
/// sends `Shutdown`. Errors only when the socket cannot be set up.
pub fn serve(opts: ServeOptions) -> Result<()> {
    exit_with_parent();
    volunteer_for_oom_killer();
    let listener = bind(&opts.socket)?;
    log(&format!(
        "listening on {} (model '{}', device {}, threads {}, batch_tokens {}, cpu kernels {})",
        opts.socket.display(),
        opts.model,
        opts.device,
        opts.threads,
        opts.batch_tokens,
        kvembed_core::model::cpu::features()
    ));

    let shared = Arc::new(Shared::new(opts));
    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("kvembed-load".into())
            .spawn(move || load_model(&shared))
            .map_err(|e| EngineError::Other(format!("cannot start the loader thread: {e}")))?;
    }
    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("kvembed-infer".into())
            .spawn(move || {
                // Queued requests wait for this thread alone: if it ever
                // ends, the process must go, so that the supervisor starts
                // a fresh one instead of leaving every statement waiting.
                let end = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inference_loop(&shared)));
                let why = match end {
                    Ok(()) => "it returned".to_string(),
                    Err(panic) => panic_message(&panic),
                };
                log(&format!("the inference thread died ({why}); exiting"));
                std::process::exit(70);
            })
            .map_err(|e| EngineError::Other(format!("cannot start the inference thread: {e}")))?;
    }

    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name("kvembed-conn".into())
                    .spawn(move || handle_connection(stream, &shared));
                if let Err(e) = spawned {
                    log(&format!("cannot start a connection thread: {e}"));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log(&format!("accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Shared state

enum ModelState {
    Loading,
    Ready(Arc<Embedder>, ModelInfo),
    Failed(ErrorKind, String),
}

struct Shared {
    opts: ServeOptions,
    model: Mutex<ModelState>,
    model_changed: Condvar,
    queue: Mutex<VecDeque<Job>>,
    queue_changed: Condvar,
    requests_served: AtomicU64,
    texts_served: AtomicU64,
    tokens_served: AtomicU64,
    /// A fault armed by `Request::Fault`, taken by the next embedding batch.
    fault: Mutex<Option<Fault>>,
}

impl Shared {
    fn new(opts: ServeOptions) -> Shared {
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
        }
    }

    /// Blocks until the load has finished, one way or the other.
    fn wait_loaded(&self) -> std::result::Result<(Arc<Embedder>, ModelInfo), (ErrorKind, String)> {
        let mut state = self.model.lock();
        loop {
            match &*state {
                ModelState::Loading => self.model_changed.wait(&mut state),
                ModelState::Ready(e, info) => return Ok((e.clone(), info.clone())),
                ModelState::Failed(kind, msg) => return Err((*kind, msg.clone())),
            }
        }
    }

    fn status(&self) -> proto::Status {
        let queue_depth = self.queue.lock().len();
        let threads = match self.opts.threads {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
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
            ModelState::Loading => s.state = "loading".into(),
            ModelState::Failed(_, msg) => {
                s.state = "failed".into();
                s.load_error = Some(msg.clone());
            }
            ModelState::Ready(embedder, info) => {
                s.state = "ready".into();
                s.forward_passes = embedder.decoder.passes.load(Ordering::Relaxed);
                // `model` stays the setting as given (what kvembed.model says);
                // `model_id` identifies the weights.
                s.model_id = info.model_id.clone();
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

fn load_model(shared: &Shared) {
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
        let spec =
            LoadSpec { model: opts.model.clone(), device: opts.device.clone(), threads: opts.threads, weights: None };
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
                embedder.decoder.matmul_kernel()
            ));
            ModelState::Ready(Arc::new(embedder), info)
        }
        Err((kind, message)) => {
            log(&format!("model load failed: {message}"));
            // Whatever the engine called it, a load failure is a load failure
            // for the client; keep Internal only for panics inside candle.
            let kind = if kind == ErrorKind::InvalidInput { ErrorKind::ModelLoad } else { kind };
            ModelState::Failed(kind, message)
        }
    };
    *shared.model.lock() = new_state;
    shared.model_changed.notify_all();
}

// ---------------------------------------------------------------------------
// Jobs and the inference thread

enum Work {
    Embed(EmbedWork),
    SelectLayers { texts: Vec<String>, options: SelectOptions },
}

/// An `Embed` request, run in slices of at most one batch budget: after each
/// slice a request with texts left goes to the back of the queue, so a large
/// request shares the engine with everyone else instead of holding it.
struct EmbedWork {
    texts: Vec<String>,
    /// What each text costs a forward pass in tokens, prompt included (an
    /// estimate where the text will be cut).
    cost: Vec<usize>,
    role: Role,
    options: EmbedOptions,
    /// Texts before `next` are done; their vectors and truncations are kept.
    next: usize,
    vectors: Vec<Vec<f32>>,
    truncated: Vec<Truncation>,
    /// Tokens run so far.
    tokens: usize,
}

impl EmbedWork {
    fn new(texts: Vec<String>, cost: Vec<usize>, role: Role, options: EmbedOptions) -> EmbedWork {
        EmbedWork { texts, cost, role, options, next: 0, vectors: Vec::new(), truncated: Vec::new(), tokens: 0 }
    }

    fn remaining_cost(&self) -> usize {
        self.cost[self.next..].iter().sum()
    }

    /// How many of the remaining texts fit `budget` tokens (at least one).
    fn fitting(&self, budget: usize) -> usize {
        let mut total = 0;
        let mut n = 0;
        for &c in &self.cost[self.next..] {
            if n > 0 && total + c > budget {
                break;
            }
            total += c;
            n += 1;
        }
        n
    }

    fn same_kind(&self, other: &EmbedWork) -> bool {
        self.role == other.role && self.options == other.options
    }
}

enum Outcome {
    /// Intermediate: `done` of `total` texts processed (select-layers only).
    Progress(usize, usize),
    Embeddings { vectors: Vec<Vec<f32>>, dim: usize, truncated: Vec<Truncation>, tokens: usize },
    Layers(LayerSelection, usize, String),
    Error(ErrorKind, String),
}

struct Job {
    work: Work,
    reply: mpsc::Sender<Outcome>,
    /// Set by the connection thread when its client has gone away.
    abandoned: Arc<AtomicBool>,
    /// The client's connection: the inference thread looks at it itself
    /// before every forward pass, so a cancelled statement costs at most the
    /// pass already running (not whatever runs until its connection thread
    /// next looks).
    client: Option<Arc<UnixStream>>,
}

impl Job {
    fn is_abandoned(&self) -> bool {
        if self.abandoned.load(Ordering::Relaxed) {
            return true;
        }
        if self.client.as_deref().is_some_and(client_gone) {
            self.abandoned.store(true, Ordering::Relaxed);
            return true;
        }
        false
    }
}

fn inference_loop(shared: &Shared) -> ! {
    loop {
        let batch = take_batch(shared);
        if batch.is_empty() {
            continue;
        }
        let (embedder, info) = match shared.wait_loaded() {
            Ok(loaded) => loaded,
            Err((kind, msg)) => {
                for (job, _) in batch {
                    let _ = job.reply.send(Outcome::Error(kind, msg.clone()));
                }
                continue;
            }
        };
        if matches!(batch[0].0.work, Work::SelectLayers { .. }) {
            for (job, _) in batch {
                run_select_layers(&embedder, job);
            }
        } else {
            run_embed_batch(shared, &embedder, info.dim, batch);
        }
    }
}

/// Waits for work, then takes the oldest job and, if it is an `Embed`, as
/// many of its texts as fit the batch budget (at least one), and every other
/// queued `Embed` with the same role and options whose remaining texts fit
/// what is left of the budget. Returns the jobs with the number of texts of
/// each to run now. Other jobs keep their place in the queue.
fn take_batch(shared: &Shared) -> Vec<(Job, usize)> {
    let mut queue = shared.queue.lock();
    loop {
        while queue.front().is_some_and(Job::is_abandoned) {
            queue.pop_front();
        }
        if !queue.is_empty() {
            break;
        }
        shared.queue_changed.wait(&mut queue);
    }
    let first = queue.pop_front().expect("queue is not empty");
    let budget = shared.opts.batch_tokens.max(1);
    let (count, mut total) = match &first.work {
        Work::Embed(w) => {
            let n = w.fitting(budget);
            (n, w.cost[w.next..w.next + n].iter().sum::<usize>())
        }
        Work::SelectLayers { .. } => return vec![(first, 0)],
    };
    let mut batch = vec![(first, count)];
    let mut i = 0;
    while i < queue.len() {
        let job = &queue[i];
        if job.is_abandoned() {
            queue.remove(i);
            continue;
        }
        let fits = match (&job.work, &batch[0].0.work) {
            (Work::Embed(w), Work::Embed(lead)) => w.same_kind(lead) && total + w.remaining_cost() <= budget,
            _ => false,
        };
        if fits {
            if let Some(job) = queue.remove(i) {
                if let Work::Embed(w) = &job.work {
                    total += w.remaining_cost();
                    let n = w.texts.len() - w.next;
                    batch.push((job, n));
                }
            }
        } else {
            i += 1;
        }
    }
    batch
}

/// Runs one slice: `count` texts of each job, from where it stands. A job
/// that is done gets its reply; one with texts left goes to the back of the
/// queue.
fn run_embed_batch(shared: &Shared, embedder: &Embedder, dim: usize, batch: Vec<(Job, usize)>) {
    let mut batch: Vec<(Job, usize)> = batch.into_iter().filter(|(j, _)| !j.is_abandoned()).collect();
    if batch.is_empty() {
        return;
    }
    let (role, options) = match &batch[0].0.work {
        Work::Embed(w) => (w.role, w.options.clone()),
        Work::SelectLayers { .. } => unreachable!("select-layers jobs are never batched"),
    };
    let mut texts = Vec::new();
    for (job, count) in &batch {
        if let Work::Embed(w) = &job.work {
            texts.extend(w.texts[w.next..w.next + count].iter().cloned());
        }
    }
    let fault = shared.fault.lock().take();
    // Stop between forward passes once every client of the batch has gone:
    // a cancelled request holds the engine for one more pass at most.
    let someone_waits = || batch.iter().any(|(j, _)| !j.is_abandoned());
    let outcome = guarded(|| {
        inject(fault);
        embedder.embed_cancellable(&texts, role, &options, &someone_waits)
    });
    let anyone_waits = someone_waits();
    match outcome {
        Ok(out) => {
            shared.tokens_served.fetch_add(out.tokens as u64, Ordering::Relaxed);
            let mut vectors = out.vectors.into_iter();
            let mut offset = 0;
            let mut unfinished = Vec::new();
            for (mut job, count) in batch.drain(..) {
                let Work::Embed(w) = &mut job.work else { continue };
                w.vectors.extend(vectors.by_ref().take(count));
                let start = w.next;
                w.truncated.extend(
                    out.truncated
                        .iter()
                        .filter(|tr| tr.index >= offset && tr.index < offset + count)
                        .map(|tr| Truncation { index: tr.index - offset + start, ..tr.clone() }),
                );
                w.tokens += w.cost[start..start + count].iter().sum::<usize>();
                w.next += count;
                offset += count;
                if w.next < w.texts.len() {
                    unfinished.push(job);
                    continue;
                }
                shared.requests_served.fetch_add(1, Ordering::Relaxed);
                shared.texts_served.fetch_add(w.texts.len() as u64, Ordering::Relaxed);
                let _ = job.reply.send(Outcome::Embeddings {
                    vectors: std::mem::take(&mut w.vectors),
                    dim,
                    truncated: std::mem::take(&mut w.truncated),
                    tokens: w.tokens,
                });
            }
            if !unfinished.is_empty() {
                let mut queue = shared.queue.lock();
                queue.extend(unfinished);
                shared.queue_changed.notify_one();
            }
        }
        Err(_) if !anyone_waits => {}
        Err(_) if batch.len() > 1 => {
            // One request's bad input must not fail its batch-mates: run each
            // on its own so every error lands on the request that caused it.
            for entry in batch {
                run_embed_batch(shared, embedder, dim, vec![entry]);
            }
        }
        Err((kind, msg)) => {
            for (job, _) in batch {
                let _ = job.reply.send(Outcome::Error(kind, msg.clone()));
            }
        }
    }
}

fn run_select_layers(embedder: &Embedder, job: Job) {
    if job.is_abandoned() {
        return;
    }
    let Work::SelectLayers { texts, options } = &job.work else { return };
    let total = texts.len();
    let mut done = 0;
    // A layer selection can take minutes: stop between batches once its
    // client has gone (cancelled statement), instead of holding the engine.
    let progress = |n: usize| {
        if n > 0 {
            done += n;
            let _ = job.reply.send(Outcome::Progress(done, total));
        }
        !job.is_abandoned()
    };
    let outcome = match guarded(|| embedder.select_layers_with_progress(texts, options, progress)) {
        Ok(selection) => Outcome::Layers(selection, texts.len(), embedder.info().model_id),
        Err((kind, msg)) => Outcome::Error(kind, msg),
    };
    let _ = job.reply.send(outcome);
}

/// Carries out an armed fault inside the inference thread.
fn inject(fault: Option<Fault>) {
    match fault {
        None => {}
        Some(Fault::Stall { ms }) => {
            log(&format!("injected fault: stalling this batch for {ms} ms"));
            std::thread::sleep(Duration::from_millis(ms));
        }
        Some(Fault::Panic) => panic!("injected fault (kv_debug_fault('panic'))"),
        Some(Fault::Abort) => {
            log("injected fault: aborting the process");
            std::process::abort();
        }
    }
}

/// Runs engine code, turning both errors and panics into (kind, message): a
/// panic in one request must not take the server down for everyone else.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> std::result::Result<T, (ErrorKind, String)> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err((e.kind(), e.to_string())),
        Err(panic) => {
            Err((ErrorKind::Internal, format!("the engine panicked: {}", panic_message(&panic))))
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

// ---------------------------------------------------------------------------
// Connections

fn handle_connection(stream: UnixStream, shared: &Shared) {
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut writer = BufWriter::new(&stream);
    loop {
        let request: Request = match proto::read_json(&mut reader) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let _ = proto::write_json(
                    &mut writer,
                    &Response::Error { kind: ErrorKind::Protocol, message: format!("bad request: {e}") },
                );
                return;
            }
            Err(_) => return, // the client closed the connection
        };
        let sent = match request {
            Request::Hello { version } => {
                if version == proto::PROTOCOL_VERSION {
                    proto::write_json(
                        &mut writer,
                        &Response::Hello { version: proto::PROTOCOL_VERSION, pid: std::process::id() },
                    )
                } else {
                    let _ = proto::write_json(
                        &mut writer,
                        &Response::Error {
                            kind: ErrorKind::Protocol,
                            message: format!(
                                "protocol version {version} requested, this kvembed server speaks {}: \
                                 the extension and the kvembed binary come from different builds",
                                proto::PROTOCOL_VERSION
                            ),
                        },
                    );
                    return;
                }
            }
            Request::Status => proto::write_json(&mut writer, &Response::Status(shared.status())),
            Request::Fault { fault } => {
                log(&format!("fault armed for the next embedding batch: {fault:?}"));
                *shared.fault.lock() = Some(fault);
                proto::write_json(&mut writer, &Response::FaultArmed { pid: std::process::id() })
            }
            Request::Shutdown => {
                // Unlink first: once the client has its answer, nobody can
                // reach this process any more, only its successor.
                let _ = std::fs::remove_file(&shared.opts.socket);
                let _ = proto::write_json(&mut writer, &Response::ShuttingDown { pid: std::process::id() });
                log("shutting down on request");
                std::process::exit(0);
            }
            Request::Embed { texts, role, options } => match admit_embed(shared, texts, role, options) {
                Err((kind, message)) => proto::write_json(&mut writer, &Response::Error { kind, message }),
                Ok(work) => match submit(shared, &stream, &mut writer, work) {
                    None => return,
                    Some(outcome) => send_outcome(&mut writer, outcome),
                },
            },
            Request::SelectLayers { texts, options } => match admit_selection(shared, texts, options) {
                Err((kind, message)) => proto::write_json(&mut writer, &Response::Error { kind, message }),
                Ok(work) => match submit(shared, &stream, &mut writer, work) {
                    None => return,
                    Some(outcome) => send_outcome(&mut writer, outcome),
                },
            },
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Checks an `Embed` request against the server's limits before it is
/// queued, and applies them: every refusal happens here, before any work.
fn admit_embed(
    shared: &Shared,
    mut texts: Vec<String>,
    role: Role,
    mut options: EmbedOptions,
) -> std::result::Result<Work, (ErrorKind, String)> {
    let (embedder, info) = shared.wait_loaded()?;
    let refuse = |message: String| Err((ErrorKind::InvalidInput, message));
    if texts.len() > proto::MAX_REQUEST_TEXTS {
        return refuse(format!(
            "one request carries {} texts, more than {}: split it",
            texts.len(),
            proto::MAX_REQUEST_TEXTS
        ));
    }
    // The reply must fit one frame: refused before the work, not after it.
    if texts.len().saturating_mul(info.dim).saturating_mul(4) > proto::MAX_FRAME {
        return refuse(format!(
            "{} embeddings of dimension {} exceed the {} byte reply limit: split the request",
            texts.len(),
            info.dim,
            proto::MAX_FRAME
        ));
    }
    if let Some(expected) = options.expect_model.as_ref().filter(|m| **m != info.model_id) {
        return Err((
            ErrorKind::ModelChanged,
            format!("the request was prepared for model '{expected}', the engine now serves '{}'", info.model_id),
        ));
    }
    // The session's limit, else the server's default; never above the
    // administrator's ceiling.
    let asked = options.max_tokens.or((shared.opts.max_tokens > 0).then_some(shared.opts.max_tokens));
    let cap = asked.unwrap_or(info.max_tokens).min(shared.opts.token_limit(info.context)).max(1);
    options.max_tokens = Some(cap);
    let truncate = options.truncate != Some(false);
    if truncate {
        for t in &mut texts {
            proto::cut_far_beyond(t, cap);
        }
    }
    // What each text costs a pass (for slicing and packing), and without
    // truncation the refusal of a text over the limit, up front.
    let (fixed, slots) = embedder.prompt_cost(role, &options).map_err(|e| (e.kind(), e.to_string()))?;
    let mut cost = Vec::with_capacity(texts.len());
    for (index, t) in texts.iter().enumerate() {
        let tokens = if truncate { estimate_tokens(&embedder, t, cap) } else { exact_tokens(&embedder, t, cap) };
        if !truncate && tokens > cap {
            return Err((ErrorKind::TooLong, EngineError::TooLong { index, tokens, max: cap }.to_string()));
        }
        cost.push(fixed + slots * tokens.min(cap));
    }
    Ok(Work::Embed(EmbedWork::new(texts, cost, role, options)))
}

/// A text's exact token count, for refusing it when truncation is off; a
/// text longer than `cap` tokens can be anything above `cap` (it is refused
/// either way), so megabytes are not tokenised to say so.
fn exact_tokens(embedder: &Embedder, text: &str, cap: usize) -> usize {
    if text.len() > cap.saturating_mul(proto::MAX_BYTES_PER_TOKEN) {
        return cap + 1;
    }
    embedder.count_tokens(text)
}

/// The same for a layer selection: its sample and its texts' length.
fn admit_selection(
    shared: &Shared,
    texts: Vec<String>,
    mut options: SelectOptions,
) -> std::result::Result<Work, (ErrorKind, String)> {
    let limit = shared.opts.calibration_limit();
    if texts.len() > limit {
        return Err((
            ErrorKind::InvalidInput,
            format!("a layer selection over {} texts, more than kvembed.max_calibration_texts = {limit}", texts.len()),
        ));
    }
    let (_, info) = shared.wait_loaded()?;
    let cap = shared.opts.token_limit(info.context);
    options.max_tokens = Some(options.max_tokens.unwrap_or(proto::DEFAULT_MAX_TOKENS).min(cap));
    Ok(Work::SelectLayers { texts, options })
}

/// Tokens a text will cost in a batch, for packing only: exact for ordinary
/// texts, an estimate (never tokenising megabytes twice) for huge ones.
fn estimate_tokens(embedder: &Embedder, text: &str, cap: usize) -> usize {
    // ~4 bytes per token is generous for byte-level BPE; above that bound the
    // text will be truncated to `cap` anyway.
    if text.len() > cap.saturating_mul(16) {
        return cap;
    }
    embedder.count_tokens(text).min(cap).max(1)
}

/// Queues the work and waits for its outcome. Returns `None` when the client
/// went away meanwhile (the job is marked abandoned so the inference thread
/// skips it if it has not started it yet).
fn submit<W: Write>(shared: &Shared, stream: &UnixStream, writer: &mut W, work: Work) -> Option<Outcome> {
    let (tx, rx) = mpsc::channel();
    let abandoned = Arc::new(AtomicBool::new(false));
    let client = stream.try_clone().ok().map(Arc::new);
    shared.queue.lock().push_back(Job { work, reply: tx, abandoned: abandoned.clone(), client });
    shared.queue_changed.notify_one();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(progress @ Outcome::Progress(..)) => {
                if send_outcome(writer, progress).is_err() {
                    abandoned.store(true, Ordering::Relaxed);
                    return None;
                }
            }
            Ok(outcome) => return Some(outcome),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if client_gone(stream) {
                    abandoned.store(true, Ordering::Relaxed);
                    return None;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Some(Outcome::Error(ErrorKind::Internal, "the inference thread stopped".into()))
            }
        }
    }
}

/// A client waits silently for its answer, so a readable socket while we are
/// working means it closed the connection (cancelled statement).
fn client_gone(stream: &UnixStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: a non-blocking peek of one byte into a buffer we own, on a
    // socket we own; nothing is consumed.
    let n = unsafe {
        libc::recv(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock,
    }
}

fn send_outcome<W: Write>(w: &mut W, outcome: Outcome) -> io::Result<()> {
    match outcome {
        Outcome::Embeddings { vectors, dim, truncated, tokens } => {
            proto::write_json(
                w,
                &Response::Embeddings { count: vectors.len(), dim, truncated, tokens },
            )?;
            let flat: Vec<f32> = vectors.into_iter().flatten().collect();
            proto::write_f32s(w, &flat)
        }
        Outcome::Layers(sel, texts, model_id) => proto::write_json(
            w,
            &Response::Layers { curve: sel.curve, selected: sel.selected, rule: sel.rule, texts, model_id },
        ),
        Outcome::Progress(done, total) => proto::write_json(w, &Response::Progress { done, total }),
        Outcome::Error(kind, message) => proto::write_json(w, &Response::Error { kind, message }),
    }
}

// ---------------------------------------------------------------------------
// Process plumbing

/// Binds the socket owner-only: the directory is created 0700 and the socket
/// is created under a 077 umask, then set to 0600.
fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| EngineError::io(dir, e))?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(EngineError::Other(format!(
                "another kvembed server is already listening on {}",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| EngineError::io(path, e))?;
    }
    // SAFETY: umask only swaps the process's file-creation mask; no other
    // thread creates files yet (the watchdog only reads getppid).
    let old_mask = unsafe { libc::umask(0o077) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restores the previous mask.
    unsafe { libc::umask(old_mask) };
    let listener = bound.map_err(|e| EngineError::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| EngineError::io(path, e))?;
    Ok(listener)
}

/// The server must not outlive its supervisor: ask the kernel for SIGTERM when
/// the parent dies, and poll the parent pid as a second line of defence (the
/// signal is tied to the parent *thread*, and a parent that died before the
/// prctl would be missed).
fn exit_with_parent() {
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    if parent <= 1 {
        return; // started by init or a container runtime: nobody to follow
    }
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; no memory is involved.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) };
    let watch = move || loop {
        // SAFETY: as above.
        if unsafe { libc::getppid() } != parent {
            log("supervisor is gone; exiting");
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = std::thread::Builder::new().name("kvembed-parent".into()).spawn(watch);
}

/// The model's memory lives here, not in PostgreSQL: if the machine runs out
/// of memory, the kernel should pick this process, which the supervisor
/// restarts, rather than a backend, which would restart the whole cluster.
fn volunteer_for_oom_killer() {
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
}

fn log(msg: &str) {
    eprintln!("kvembed serve[{}]: {msg}", std::process::id());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_of(role: Role, bias: Option<f32>, cost: Vec<usize>) -> (Job, mpsc::Receiver<Outcome>) {
        let (tx, rx) = mpsc::channel();
        let options = EmbedOptions { bias, ..Default::default() };
        let work = Work::Embed(EmbedWork::new(vec!["x".into(); cost.len()], cost, role, options));
        (Job { work, reply: tx, abandoned: Arc::new(AtomicBool::new(false)), client: None }, rx)
    }

    fn job(role: Role, bias: Option<f32>, tokens: usize) -> (Job, mpsc::Receiver<Outcome>) {
        job_of(role, bias, vec![tokens])
    }

    fn shared(batch_tokens: usize) -> Shared {
        Shared::new(ServeOptions {
            socket: PathBuf::from("/nonexistent"),
            model: String::new(),
            device: "cpu".into(),
            threads: 1,
            batch_tokens,
            max_tokens: 0,
            max_tokens_limit: 0,
            max_calibration_texts: 0,
        })
    }

    /// The tokens each job of a batch runs now.
    fn tokens_of(batch: &[(Job, usize)]) -> Vec<usize> {
        batch
            .iter()
            .map(|(j, n)| match &j.work {
                Work::Embed(w) => w.cost[w.next..w.next + n].iter().sum(),
                Work::SelectLayers { .. } => 0,
            })
            .collect()
    }

    #[test]
    fn a_large_request_runs_in_slices_of_the_budget() {
        let s = shared(10);
        let (big, _rb) = job_of(Role::Document, None, vec![4; 7]);
        let (small, _rs) = job(Role::Query, None, 3);
        s.queue.lock().push_back(big);
        s.queue.lock().push_back(small);
        // Two of the big request's texts fit the budget of 10.
        let batch = take_batch(&s);
        assert_eq!(tokens_of(&batch), vec![8]);
        assert_eq!(batch[0].1, 2);
        // The other request is next in line, not behind the whole big one.
        assert_eq!(s.queue.lock().len(), 1);
        // One text larger than the budget still runs (alone).
        let (huge, _rh) = job_of(Role::Document, None, vec![50, 1]);
        let q = shared(10);
        q.queue.lock().push_back(huge);
        assert_eq!(tokens_of(&take_batch(&q)), vec![50]);
    }

    #[test]
    fn batches_group_identical_options_within_the_budget() {
        let s = shared(100);
        let mut keep = Vec::new();
        for (role, bias, tokens) in [
            (Role::Document, None, 40),
            (Role::Query, None, 10),      // other role: stays queued
            (Role::Document, Some(1.0), 10), // other options: stays queued
            (Role::Document, None, 50),
            (Role::Document, None, 20),   // over budget: next batch
        ] {
            let (j, rx) = job(role, bias, tokens);
            keep.push(rx);
            s.queue.lock().push_back(j);
        }
        assert_eq!(tokens_of(&take_batch(&s)), vec![40, 50]);
        assert_eq!(tokens_of(&take_batch(&s)), vec![10]);
        assert_eq!(tokens_of(&take_batch(&s)), vec![10]);
        assert_eq!(tokens_of(&take_batch(&s)), vec![20]);
        assert!(s.queue.lock().is_empty());
    }

    #[test]
    fn oversized_request_runs_alone_and_abandoned_jobs_are_dropped() {
        let s = shared(10);
        let (a, _ra) = job(Role::Document, None, 500);
        let (b, _rb) = job(Role::Document, None, 5);
        let (c, _rc) = job(Role::Document, None, 5);
        b.abandoned.store(true, Ordering::Relaxed);
        for j in [a, b, c] {
            s.queue.lock().push_back(j);
        }
        assert_eq!(tokens_of(&take_batch(&s)), vec![500]);
        assert_eq!(tokens_of(&take_batch(&s)), vec![5]);
        assert!(s.queue.lock().is_empty());
    }

    #[test]
    fn empty_model_setting_fails_with_a_clear_error() {
        let s = shared(10);
        load_model(&s);
        let status = s.status();
        assert_eq!(status.state, "failed");
        assert!(status.load_error.unwrap().contains("kvembed.model"));
    }

    #[test]
    fn socket_is_owner_only_and_stale_files_are_replaced() {
        let dir = std::env::temp_dir().join(format!("kvembed-server-test-{}", std::process::id()));
        let sock = dir.join("sub").join("engine.sock");
        let first = bind(&sock).unwrap();
        drop(first); // leaves a stale socket file behind
        let listener = bind(&sock).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(sock.parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        // A live server is never replaced.
        assert!(bind(&sock).is_err());
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
