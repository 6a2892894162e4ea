//! One thread per connection: reads requests, answers `Hello`, `Status`,
//! `Describe`, `Chunk`, `Stats`, `Fault` and `Shutdown` itself, and hands `Embed` and
//! `SelectLayers`, once admitted (`limits`), to the queue, watching for the
//! client to go away while it waits.

use kvembed_proto::{self as proto, Caller, ErrorKind, Request, Response};
use std::io::{self, BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use crate::jobs::{client_gone, Job, Outcome, Work};
use crate::limits::{admit_embed, admit_selection, refusal};
use crate::log;
use crate::state::Shared;

pub(crate) fn handle_connection(stream: UnixStream, shared: &Shared) {
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = BufWriter::new(&stream);
    loop {
        let request: Request = match proto::read_json(&mut reader) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let _ = refuse(
                    &mut writer,
                    ErrorKind::Protocol,
                    format!("bad request: {e}"),
                );
                return;
            }
            Err(_) => return, // the client closed the connection
        };
        match answer(shared, &stream, &mut writer, request) {
            Ok(Next::Read) => {}
            Ok(Next::Close) | Err(_) => return,
        }
    }
}

/// What becomes of a connection after its request was answered.
enum Next {
    Read,
    Close,
}

fn answer<W: Write>(
    shared: &Shared,
    stream: &UnixStream,
    writer: &mut W,
    request: Request,
) -> io::Result<Next> {
    let pid = std::process::id();
    match request {
        Request::Hello { version } if version == proto::PROTOCOL_VERSION => {
            proto::write_json(writer, &Response::Hello { version, pid })?;
        }
        Request::Hello { version } => {
            let message = format!(
                "protocol version {version} requested, this kvembed server speaks {}: \
                 the extension and the kvembed binary come from different builds",
                proto::PROTOCOL_VERSION
            );
            refuse(writer, ErrorKind::Protocol, message)?;
            return Ok(Next::Close);
        }
        Request::Status => proto::write_json(writer, &Response::Status(shared.status()))?,
        Request::Describe { options } => {
            let described = shared
                .wait_loaded(options.model.as_deref())
                .and_then(|(e, _)| e.describe(&options).map_err(|e| (e.kind(), e.to_string())));
            match described {
                Ok(info) => proto::write_json(writer, &Response::Described(info))?,
                Err(refused) => proto::write_json(writer, &refusal(refused))?,
            }
        }
        Request::Stats { reset } => {
            let (since, rows) = shared.stats.lock().snapshot(reset);
            proto::write_json(writer, &Response::Stats { since, rows })?;
        }
        Request::Chunk {
            text,
            max_tokens,
            overlap,
            caller,
            model,
        } => {
            // Tokenizing is this thread's work, as for admission: the
            // inference thread is not held.
            let chunked = shared
                .wait_loaded(model.as_deref())
                .and_then(|(e, _)| {
                    e.chunk(&text, max_tokens, overlap)
                        .map_err(|e| (e.kind(), e.to_string()))
                })
                .and_then(|chunks| {
                    if chunks.len().saturating_mul(proto::CHUNK_REPLY_BYTES) > proto::MAX_FRAME {
                        return Err((
                            ErrorKind::InvalidInput,
                            format!(
                                "{} chunks would exceed the {} byte reply limit: raise max_tokens or split the text",
                                chunks.len(),
                                proto::MAX_FRAME
                            ),
                        ));
                    }
                    Ok(chunks)
                });
            match chunked {
                Ok(chunks) => {
                    shared.stats.lock().served(&caller);
                    proto::write_json(writer, &Response::Chunks { chunks })?
                }
                Err(refused) => {
                    shared.stats.lock().failed(&caller, refused.0.sqlstate());
                    proto::write_json(writer, &refusal(refused))?
                }
            }
        }
        Request::Fault { fault } => match crate::faults::arm(shared, fault) {
            Ok(()) => proto::write_json(writer, &Response::FaultArmed { pid })?,
            Err(message) => refuse(writer, ErrorKind::InvalidInput, message)?,
        },
        Request::Shutdown => {
            // Unlink first: once the client has its answer, nobody can
            // reach this process any more, only its successor.
            let _ = std::fs::remove_file(&shared.opts.socket);
            let _ = proto::write_json(writer, &Response::ShuttingDown { pid });
            log("shutting down on request");
            std::process::exit(0);
        }
        Request::Embed {
            texts,
            role,
            options,
            caller,
        } => {
            return run(
                shared,
                stream,
                writer,
                &caller,
                admit_embed(shared, texts, role, options),
            );
        }
        Request::SelectLayers {
            texts,
            options,
            caller,
        } => {
            return run(
                shared,
                stream,
                writer,
                &caller,
                admit_selection(shared, texts, options),
            );
        }
    }
    Ok(Next::Read)
}

/// Queues admitted work and sends its outcome, or sends the refusal; counts
/// either in the caller's metrics.
fn run<W: Write>(
    shared: &Shared,
    stream: &UnixStream,
    writer: &mut W,
    caller: &Caller,
    admitted: std::result::Result<Work, Response>,
) -> io::Result<Next> {
    match admitted {
        Err(refusal) => {
            let sqlstate = match &refusal {
                Response::Error { kind, .. } => kind.sqlstate(),
                _ => ErrorKind::TooLong.sqlstate(),
            };
            shared.stats.lock().failed(caller, sqlstate);
            proto::write_json(writer, &refusal)?
        }
        Ok(work) => match submit(shared, stream, writer, work) {
            None => {
                shared.stats.lock().failed(caller, proto::SQLSTATE_CANCELED);
                return Ok(Next::Close);
            }
            Some(outcome) => {
                {
                    let mut stats = shared.stats.lock();
                    match &outcome {
                        Outcome::Embeddings {
                            vectors,
                            tokens,
                            timing,
                            ..
                        } => stats.embedded(caller, vectors.len(), *tokens, *timing),
                        Outcome::Layers(..) => stats.served(caller),
                        Outcome::Error(kind, _) => stats.failed(caller, kind.sqlstate()),
                        Outcome::Progress(..) => {}
                    }
                }
                send_outcome(writer, outcome)?
            }
        },
    }
    Ok(Next::Read)
}

fn refuse<W: Write>(writer: &mut W, kind: ErrorKind, message: String) -> io::Result<()> {
    proto::write_json(writer, &refusal((kind, message)))
}

/// Queues the work and waits for its outcome. Returns `None` when the client
/// went away meanwhile (the job is marked abandoned so the inference thread
/// skips it if it has not started it yet).
pub(crate) fn submit<W: Write>(
    shared: &Shared,
    stream: &UnixStream,
    writer: &mut W,
    work: Work,
) -> Option<Outcome> {
    let (tx, rx) = mpsc::channel();
    let abandoned = Arc::new(AtomicBool::new(false));
    let client = stream.try_clone().ok().map(Arc::new);
    shared.queue.lock().push_back(Job {
        work,
        reply: tx,
        abandoned: abandoned.clone(),
        client,
    });
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
                return Some(Outcome::Error(
                    ErrorKind::Internal,
                    "the inference thread stopped".into(),
                ))
            }
        }
    }
}

pub(crate) fn send_outcome<W: Write>(w: &mut W, outcome: Outcome) -> io::Result<()> {
    match outcome {
        Outcome::Embeddings {
            vectors,
            dim,
            truncated,
            tokens,
            timing: _,
        } => {
            proto::write_json(
                w,
                &Response::Embeddings {
                    count: vectors.len(),
                    dim,
                    truncated,
                    tokens,
                },
            )?;
            let flat: Vec<f32> = vectors.into_iter().flatten().collect();
            proto::write_f32s(w, &flat)
        }
        Outcome::Layers(sel, texts, model_id) => proto::write_json(
            w,
            &Response::Layers {
                curve: sel.curve,
                selected: sel.selected,
                rule: sel.rule,
                texts,
                model_id,
                space: sel.space,
            },
        ),
        Outcome::Progress(done, total) => proto::write_json(w, &Response::Progress { done, total }),
        Outcome::Error(kind, message) => proto::write_json(w, &Response::Error { kind, message }),
    }
}
