//! The one inference thread: it takes jobs from the queue in batches by
//! token budget (identical options from different sessions run together),
//! runs large requests in slices that go to the back of the queue between
//! them, and skips jobs whose client went away.

use kvembed_core::embedder::Embedder;
use kvembed_core::Result;
use kvembed_proto::{ErrorKind, Truncation};
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::faults::inject;
use crate::jobs::{Job, Outcome, Work};
use crate::panic_message;
use crate::state::{Shared, Slot};

pub(crate) fn inference_loop(shared: &Shared) -> ! {
    loop {
        let batch = take_batch(shared);
        if batch.is_empty() {
            continue;
        }
        // Every job of a batch names the same model.
        let model = match &batch[0].0.work {
            Work::Embed(w) => w.options.model.clone(),
            Work::SelectLayers { options, .. } => options.model.clone(),
        };
        let (slot, (embedder, info)) = match shared
            .slot(model.as_deref())
            .and_then(|slot| Ok((slot, slot.wait_loaded()?)))
        {
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
            run_embed_batch(shared, slot, &embedder, info.dim, batch);
        }
    }
}

/// Waits for work, then takes the oldest job and, if it is an `Embed`, as
/// many of its texts as fit the batch budget (at least one), and every other
/// queued `Embed` with the same role and options whose remaining texts fit
/// what is left of the budget. Returns the jobs with the number of texts of
/// each to run now. Other jobs keep their place in the queue.
pub(crate) fn take_batch(shared: &Shared) -> Vec<(Job, usize)> {
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
            (Work::Embed(w), Work::Embed(lead)) => {
                w.same_kind(lead) && total + w.remaining_cost() <= budget
            }
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
pub(crate) fn run_embed_batch(
    shared: &Shared,
    slot: &Slot,
    embedder: &Embedder,
    dim: usize,
    batch: Vec<(Job, usize)>,
) {
    let mut batch: Vec<(Job, usize)> = batch
        .into_iter()
        .filter(|(j, _)| !j.is_abandoned())
        .collect();
    if batch.is_empty() {
        return;
    }
    let (role, options) = match &batch[0].0.work {
        Work::Embed(w) => (w.role, w.options.clone()),
        Work::SelectLayers { .. } => unreachable!("select-layers jobs are never batched"),
    };
    let mut texts = Vec::new();
    let mut cost = 0;
    for (job, count) in &batch {
        if let Work::Embed(w) = &job.work {
            texts.extend(w.texts[w.next..w.next + count].iter().cloned());
            cost += w.cost[w.next..w.next + count].iter().sum::<usize>();
        }
    }
    let fill = cost as f64 / shared.opts.batch_tokens.max(1) as f64;
    let started = Instant::now();
    let fault = shared.fault.lock().take();
    // Stop between forward passes once every client of the batch has gone:
    // a cancelled request holds the engine for one more pass at most.
    let someone_waits = || batch.iter().any(|(j, _)| !j.is_abandoned());
    let outcome = guarded(|| {
        inject(fault);
        embedder.embed_cancellable(&texts, role, &options, &someone_waits)
    });
    let anyone_waits = someone_waits();
    let took = started.elapsed();
    match outcome {
        Ok(out) => {
            for counter in [&shared.tokens_served, &slot.tokens_served] {
                counter.fetch_add(out.tokens as u64, Ordering::Relaxed);
            }
            let mut vectors = out.vectors.into_iter();
            let mut offset = 0;
            let mut unfinished = Vec::new();
            for (mut job, count) in batch.drain(..) {
                let Work::Embed(w) = &mut job.work else {
                    continue;
                };
                w.vectors.extend(vectors.by_ref().take(count));
                let start = w.next;
                w.truncated.extend(
                    out.truncated
                        .iter()
                        .filter(|tr| tr.index >= offset && tr.index < offset + count)
                        .map(|tr| Truncation {
                            index: tr.index - offset + start,
                            ..tr.clone()
                        }),
                );
                w.tokens += w.cost[start..start + count].iter().sum::<usize>();
                w.next += count;
                w.busy += took;
                w.fill_sum += fill.min(1.0);
                w.slices += 1;
                offset += count;
                if w.next < w.texts.len() {
                    unfinished.push(job);
                    continue;
                }
                shared.requests_served.fetch_add(1, Ordering::Relaxed);
                for counter in [&shared.texts_served, &slot.texts_served] {
                    counter.fetch_add(w.texts.len() as u64, Ordering::Relaxed);
                }
                let _ = job.reply.send(Outcome::Embeddings {
                    vectors: std::mem::take(&mut w.vectors),
                    dim,
                    truncated: std::mem::take(&mut w.truncated),
                    tokens: w.tokens,
                    timing: w.timing(),
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
                run_embed_batch(shared, slot, embedder, dim, vec![entry]);
            }
        }
        Err((kind, msg)) => {
            for (job, _) in batch {
                let _ = job.reply.send(Outcome::Error(kind, msg.clone()));
            }
        }
    }
}

pub(crate) fn run_select_layers(embedder: &Embedder, job: Job) {
    if job.is_abandoned() {
        return;
    }
    let Work::SelectLayers { texts, options } = &job.work else {
        return;
    };
    // One pass over the sample measures the layers (two per candidate with
    // the agreement rule); a space calibration embeds it once more.
    let total = embedder.selection_work(texts.len(), options);
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

/// Runs engine code, turning both errors and panics into (kind, message): a
/// panic in one request must not take the server down for everyone else.
pub(crate) fn guarded<T>(
    f: impl FnOnce() -> Result<T>,
) -> std::result::Result<T, (ErrorKind, String)> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err((e.kind(), e.to_string())),
        Err(panic) => Err((
            ErrorKind::Internal,
            format!("the engine panicked: {}", panic_message(&panic)),
        )),
    }
}
