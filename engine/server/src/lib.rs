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
//! * a loader thread loads the models (`--model`, then each of `--models`)
//!   while connections are already accepted: `Status` answers `loading`
//!   meanwhile, other requests wait for the load of the model they name; a
//!   failed load is kept and reported to every request for that model (the
//!   process stays up so the error reaches the user instead of a restart
//!   loop), and the other models serve;
//! * one inference thread owns the compute: it takes jobs from a queue and
//!   packs `Embed` requests with identical (model, role, options) from
//!   different connections into one batch, up to a token budget, then splits
//!   the results back. Jobs of clients that went away are skipped;
//! * a watchdog thread exits when the parent (the supervisor) is gone.
//!
//! Modules, each depending only on those listed before it: `jobs` (what an
//! admitted request becomes), `state` (what the threads share), `faults`
//! (test-only fault injection, `--allow-faults`), `queue` (the inference
//! thread), `limits` (admission), `connection` (one thread per client),
//! `process` (socket, parent, OOM killer).

use kvembed_core::{EngineError, Result};
use kvembed_proto as proto;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

mod connection;
mod faults;
mod jobs;
mod limits;
mod process;
mod queue;
mod state;
mod stats;

use connection::handle_connection;
use process::{bind, exit_with_parent, volunteer_for_oom_killer};
use queue::inference_loop;
use state::{load_model, Shared};

/// How `kvembed serve` is started (its command-line flags).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Unix socket to listen on; a stale socket file is replaced.
    pub socket: PathBuf,
    /// GGUF file, Hugging Face model directory, or repo id in the local cache.
    pub model: String,
    /// More models served beside it (`kvembed.models`, see
    /// [`kvembed_proto::parse_model_list`]); empty for none.
    pub models: String,
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
    /// Whether `Request::Fault` is honoured (`--allow-faults`, for the
    /// reliability tests); otherwise it is refused.
    pub allow_faults: bool,
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
        "listening on {} (model '{}'{}, device {}, threads {}, batch_tokens {}, cpu kernels {})",
        opts.socket.display(),
        opts.model,
        if opts.models.trim().is_empty() {
            String::new()
        } else {
            format!(", models '{}'", opts.models)
        },
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
                let end = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    inference_loop(&shared)
                }));
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

pub(crate) fn log(msg: &str) {
    eprintln!("kvembed serve[{}]: {msg}", std::process::id());
}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{EmbedWork, Job, Outcome, Work};
    use crate::queue::take_batch;
    use kvembed_proto::{EmbedOptions, Role};
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    fn job_of(role: Role, bias: Option<f32>, cost: Vec<usize>) -> (Job, mpsc::Receiver<Outcome>) {
        let (tx, rx) = mpsc::channel();
        let options = EmbedOptions {
            bias,
            ..Default::default()
        };
        let work = Work::Embed(EmbedWork::new(
            vec!["x".into(); cost.len()],
            cost,
            role,
            options,
        ));
        (
            Job {
                work,
                reply: tx,
                abandoned: Arc::new(AtomicBool::new(false)),
                client: None,
            },
            rx,
        )
    }

    fn job(role: Role, bias: Option<f32>, tokens: usize) -> (Job, mpsc::Receiver<Outcome>) {
        job_of(role, bias, vec![tokens])
    }

    fn shared(batch_tokens: usize) -> Shared {
        Shared::new(ServeOptions {
            socket: PathBuf::from("/nonexistent"),
            model: String::new(),
            models: String::new(),
            device: "cpu".into(),
            threads: 1,
            batch_tokens,
            max_tokens: 0,
            max_tokens_limit: 0,
            max_calibration_texts: 0,
            allow_faults: false,
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
            (Role::Query, None, 10),         // other role: stays queued
            (Role::Document, Some(1.0), 10), // other options: stays queued
            (Role::Document, None, 50),
            (Role::Document, None, 20), // over budget: next batch
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
    fn requests_for_different_models_never_share_a_batch() {
        let s = shared(100);
        let mut keep = Vec::new();
        for model in [None, Some("minilm"), None, Some("minilm")] {
            let (mut j, rx) = job(Role::Document, None, 10);
            if let Work::Embed(w) = &mut j.work {
                w.options.model = model.map(str::to_string);
            }
            keep.push(rx);
            s.queue.lock().push_back(j);
        }
        assert_eq!(tokens_of(&take_batch(&s)), vec![10, 10]);
        assert_eq!(tokens_of(&take_batch(&s)), vec![10, 10]);
        assert!(s.queue.lock().is_empty());
    }

    #[test]
    fn each_listed_model_loads_and_fails_on_its_own() {
        let mut opts = shared(10).opts;
        opts.model = "/nonexistent/first.gguf".into();
        opts.models = "second=/nonexistent/other, /nonexistent/third.gguf".into();
        let s = Shared::new(opts.clone());
        let names: Vec<&str> = s.models.iter().map(|m| m.entry.name.as_str()).collect();
        assert_eq!(names, ["first", "second", "third"]);
        load_model(&s);
        let status = s.status();
        assert_eq!(status.models.len(), 3);
        assert_eq!(status.state, proto::EngineState::Failed);
        for m in &status.models {
            assert_eq!(m.state, proto::EngineState::Failed, "{}", m.name);
            assert!(
                m.load_error.as_ref().unwrap().contains("nonexistent"),
                "{m:?}"
            );
        }
        assert_eq!(status.models[1].source, "/nonexistent/other");
        // A request names a served model or gets an error listing them.
        let Err((kind, msg)) = s.wait_loaded(Some("fourth")) else {
            panic!("an unknown model resolved")
        };
        assert_eq!(kind, proto::ErrorKind::InvalidInput);
        assert!(msg.contains("first, second, third"), "{msg}");
        let Err((kind, msg)) = s.wait_loaded(Some("second")) else {
            panic!("a failed model resolved")
        };
        assert_eq!(kind, proto::ErrorKind::ModelLoad);
        assert!(msg.contains("/nonexistent/other"), "{msg}");
        // A bad list fails alone, visibly, and the first model is still
        // the one requests without a name get.
        opts.models = "first=/x".into();
        let s = Shared::new(opts);
        assert_eq!(s.models.len(), 2);
        assert_eq!(s.slot(None).unwrap().entry.name, "first");
        let Err((_, msg)) = s.wait_loaded(Some("kvembed.models")) else {
            panic!("a bad list resolved")
        };
        assert!(msg.contains("two models are named 'first'"), "{msg}");
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
        assert_eq!(status.state, proto::EngineState::Failed);
        assert!(status.first().load_error.unwrap().contains("kvembed.model"));
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
        let dir_mode = std::fs::metadata(sock.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        // A live server is never replaced.
        assert!(bind(&sock).is_err());
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
