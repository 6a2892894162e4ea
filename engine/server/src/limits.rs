//! Admission: every request is checked against the server's limits (texts
//! per request, tokens per text, the reply's size, calibration texts)
//! before it is queued, so every refusal happens before any work.

use kvembed_core::embedder::Embedder;
use kvembed_proto::{self as proto, EmbedOptions, ErrorKind, Response, Role, SelectOptions};

use crate::jobs::{EmbedWork, Work};
use crate::state::Shared;

/// Checks an `Embed` request against the server's limits before it is
/// queued, and applies them: every refusal happens here, before any work.
pub(crate) fn admit_embed(
    shared: &Shared,
    mut texts: Vec<String>,
    role: Role,
    mut options: EmbedOptions,
) -> std::result::Result<Work, Response> {
    let slot = shared.slot(options.model.as_deref()).map_err(refusal)?;
    // Named in full, so that requests for the first model batch together
    // whether they named it or not.
    options.model = Some(slot.entry.name.clone());
    let (embedder, info) = slot.wait_loaded().map_err(refusal)?;
    let refuse = |message: String| Err(refusal((ErrorKind::InvalidInput, message)));
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
    if let Some(expected) = options
        .expect_model
        .as_ref()
        .filter(|m| **m != info.model_id)
    {
        return Err(refusal((
            ErrorKind::ModelChanged,
            format!(
                "the request was prepared for model '{expected}', the engine now serves '{}'",
                info.model_id
            ),
        )));
    }
    // The session's limit, else the server's default; never above the
    // administrator's ceiling.
    let asked = options
        .max_tokens
        .or((shared.opts.max_tokens > 0).then_some(shared.opts.max_tokens));
    let cap = asked
        .unwrap_or(info.max_tokens)
        .min(shared.opts.token_limit(info.context))
        .max(1);
    options.max_tokens = Some(cap);
    let truncate = options.truncate != Some(false);
    if truncate {
        for t in &mut texts {
            proto::cut_far_beyond(t, cap);
        }
    }
    // What each text costs a pass (for slicing and packing), and without
    // truncation the refusal of a text over the limit, up front.
    let (fixed, slots) = embedder
        .prompt_cost(role, &options)
        .map_err(|e| refusal((e.kind(), e.to_string())))?;
    let mut cost = Vec::with_capacity(texts.len());
    for (index, t) in texts.iter().enumerate() {
        let tokens = if truncate {
            estimate_tokens(&embedder, t, cap)
        } else {
            match exact_tokens(&embedder, t, cap) {
                Some(n) if n <= cap => n,
                tokens => {
                    return Err(Response::TooLong {
                        index,
                        tokens,
                        max: cap,
                    })
                }
            }
        };
        cost.push(fixed + slots * tokens.min(cap));
    }
    Ok(Work::Embed(EmbedWork::new(texts, cost, role, options)))
}

/// A text's exact token count, for refusing it when truncation is off;
/// `None` for a text so long in bytes that it certainly has more than `cap`
/// tokens (it is refused either way, so megabytes are not tokenised).
pub(crate) fn exact_tokens(embedder: &Embedder, text: &str, cap: usize) -> Option<usize> {
    if text.len() > cap.saturating_mul(proto::MAX_BYTES_PER_TOKEN) {
        return None;
    }
    Some(embedder.count_tokens(text))
}

/// The reply that refuses a request: an error of `kind`.
pub(crate) fn refusal((kind, message): (ErrorKind, String)) -> Response {
    Response::Error { kind, message }
}

/// The same for a layer selection: its sample and its texts' length.
pub(crate) fn admit_selection(
    shared: &Shared,
    texts: Vec<String>,
    mut options: SelectOptions,
) -> std::result::Result<Work, Response> {
    let limit = shared.opts.calibration_limit();
    if texts.len() > limit {
        return Err(refusal((
            ErrorKind::InvalidInput,
            format!("a layer selection over {} texts, more than kvembed.max_calibration_texts = {limit}", texts.len()),
        )));
    }
    let (_, info) = shared
        .wait_loaded(options.model.as_deref())
        .map_err(refusal)?;
    let cap = shared.opts.token_limit(info.context);
    options.max_tokens = Some(
        options
            .max_tokens
            .unwrap_or(proto::DEFAULT_MAX_TOKENS)
            .min(cap),
    );
    if let Some(fit) = &options.space {
        kvembed_core::space::SpaceFit::parse(fit)
            .map_err(|e| refusal((e.kind(), e.to_string())))?;
    }
    if let Some(embed) = &mut options.embed {
        // The space is fitted on the model the layers are selected on.
        embed.model = options.model.clone();
        embed.max_tokens = Some(
            embed
                .max_tokens
                .unwrap_or(proto::DEFAULT_MAX_TOKENS)
                .min(cap),
        );
    }
    Ok(Work::SelectLayers { texts, options })
}

/// Tokens a text will cost in a batch, for packing only: exact for ordinary
/// texts, an estimate (never tokenising megabytes twice) for huge ones.
pub(crate) fn estimate_tokens(embedder: &Embedder, text: &str, cap: usize) -> usize {
    // ~4 bytes per token is generous for byte-level BPE; above that bound the
    // text will be truncated to `cap` anyway.
    if text.len() > cap.saturating_mul(16) {
        return cap;
    }
    embedder.count_tokens(text).min(cap).max(1)
}
