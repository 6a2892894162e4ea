//! The work a request becomes once admitted, and the job that carries it
//! through the queue to the inference thread and its reply back.

use kvembed_core::embedder::LayerSelection;
use kvembed_proto::{self as proto, EmbedOptions, ErrorKind, Role, SelectOptions, Truncation};
use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::stats::Timing;

pub(crate) enum Work {
    Embed(EmbedWork),
    SelectLayers {
        texts: Vec<String>,
        options: SelectOptions,
    },
}

/// An `Embed` request, run in slices of at most one batch budget: after each
/// slice a request with texts left goes to the back of the queue, so a large
/// request shares the engine with everyone else instead of holding it.
pub(crate) struct EmbedWork {
    pub(crate) texts: Vec<String>,
    /// What each text costs a forward pass in tokens, prompt included (an
    /// estimate where the text will be cut).
    pub(crate) cost: Vec<usize>,
    pub(crate) role: Role,
    pub(crate) options: EmbedOptions,
    /// Texts before `next` are done; their vectors and truncations are kept.
    pub(crate) next: usize,
    pub(crate) vectors: Vec<Vec<f32>>,
    pub(crate) truncated: Vec<Truncation>,
    /// Tokens run so far.
    pub(crate) tokens: usize,
    /// When it was queued, its time in forward passes so far, and the
    /// fill of each batch it ran in (summed, with their number): its metrics.
    pub(crate) queued: Instant,
    pub(crate) busy: Duration,
    pub(crate) fill_sum: f64,
    pub(crate) slices: u32,
}

impl EmbedWork {
    pub(crate) fn new(
        texts: Vec<String>,
        cost: Vec<usize>,
        role: Role,
        options: EmbedOptions,
    ) -> EmbedWork {
        EmbedWork {
            texts,
            cost,
            role,
            options,
            next: 0,
            vectors: Vec::new(),
            truncated: Vec::new(),
            tokens: 0,
            queued: Instant::now(),
            busy: Duration::ZERO,
            fill_sum: 0.0,
            slices: 0,
        }
    }

    /// How the request went through the engine, once it is done.
    pub(crate) fn timing(&self) -> Timing {
        Timing {
            queue_wait: self.queued.elapsed().saturating_sub(self.busy),
            inference: self.busy,
            fill: self.fill_sum / f64::from(self.slices.max(1)),
        }
    }

    pub(crate) fn remaining_cost(&self) -> usize {
        self.cost[self.next..].iter().sum()
    }

    /// How many of the remaining texts fit `budget` tokens (at least one).
    pub(crate) fn fitting(&self, budget: usize) -> usize {
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

    pub(crate) fn same_kind(&self, other: &EmbedWork) -> bool {
        self.role == other.role && self.options == other.options
    }
}

pub(crate) enum Outcome {
    /// Intermediate: `done` of `total` texts processed (select-layers only).
    Progress(usize, usize),
    Embeddings {
        vectors: Vec<Vec<f32>>,
        dim: usize,
        truncated: Vec<Truncation>,
        tokens: usize,
        timing: Timing,
    },
    Layers(LayerSelection, usize, String),
    Error(ErrorKind, String),
}

pub(crate) struct Job {
    pub(crate) work: Work,
    pub(crate) reply: mpsc::Sender<Outcome>,
    /// Set by the connection thread when its client has gone away.
    pub(crate) abandoned: Arc<AtomicBool>,
    /// The client's connection: the inference thread looks at it itself
    /// before every forward pass, so a cancelled statement costs at most the
    /// pass already running (not whatever runs until its connection thread
    /// next looks).
    pub(crate) client: Option<Arc<UnixStream>>,
}

impl Job {
    pub(crate) fn is_abandoned(&self) -> bool {
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

/// A client waits silently for its answer, so a readable socket while we are
/// working means it closed the connection (cancelled statement).
pub(crate) fn client_gone(stream: &UnixStream) -> bool {
    match proto::peek(stream) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}
