//! The SQL functions implemented in Rust. The rest of the SQL surface
//! (`kv_status`, `kv_select_layers`, `kv_backfill`) is written in SQL on top
//! of these, in `sql/finalize.sql`.

use crate::calibration::{self, StoredSpace};
use crate::client;
use crate::settings::{self, LayerChoice};
use crate::text::{DbText, DbTextOut, Encoding};
use crate::vector::{HalfVec, Vector};
use kvembed_proto::{EmbedOptions, Response, Role, SelectOptions, Truncation};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::JsonB;
use std::rc::Rc;

/// Embeds one text as a pgvector `vector` (L2-normalised). `role` is
/// 'document' (default) or 'query': queries get the query prompt.
#[pg_extern(immutable, strict, parallel_safe)]
fn kv_embed(input: DbText, role: default!(DbText, "'document'")) -> Vector {
    Vector(
        embed_texts(vec![input.into_utf8()], role, None, None)
            .pop()
            .unwrap_or_default(),
    )
}

/// Embeds one text under a named profile (`kv_create_profile`): the same
/// vector in every session, whatever its settings, and an ERROR rather
/// than a vector from another model.
#[pg_extern(immutable, strict, parallel_safe, name = "kv_embed")]
fn kv_embed_profile(input: DbText, role: DbText, profile: DbText) -> Vector {
    let profile = profile.into_utf8();
    Vector(
        embed_texts(vec![input.into_utf8()], role, None, Some(&profile))
            .pop()
            .unwrap_or_default(),
    )
}

/// `kv_embed_half` under a named profile.
#[pg_extern(immutable, strict, parallel_safe, name = "kv_embed_half")]
fn kv_embed_half_profile(input: DbText, role: DbText, profile: DbText) -> HalfVec {
    let profile = profile.into_utf8();
    HalfVec(
        embed_texts(vec![input.into_utf8()], role, None, Some(&profile))
            .pop()
            .unwrap_or_default(),
    )
}

/// `kv_embed_batch` under a named profile.
#[pg_extern(immutable, strict, parallel_safe, name = "kv_embed_batch")]
fn kv_embed_batch_profile(
    inputs: Array<'_, DbText>,
    role: DbText,
    profile: DbText,
) -> Vec<Option<Vector>> {
    embed_array(inputs, role, Some(&profile.into_utf8()))
}

/// Same as `kv_embed`, as a `halfvec`: HNSW indexes `halfvec` up to 4,000
/// dimensions (`vector` only up to 2,000).
#[pg_extern(immutable, strict, parallel_safe)]
fn kv_embed_half(input: DbText, role: default!(DbText, "'document'")) -> HalfVec {
    HalfVec(
        embed_texts(vec![input.into_utf8()], role, None, None)
            .pop()
            .unwrap_or_default(),
    )
}

/// Embeds many texts; NULL elements give NULL. The array travels to the
/// engine in requests of at most 256 texts, one after the other.
#[pg_extern(immutable, strict, parallel_safe)]
fn kv_embed_batch(
    inputs: Array<'_, DbText>,
    role: default!(DbText, "'document'"),
) -> Vec<Option<Vector>> {
    embed_array(inputs, role, None)
}

/// `kv_embed_batch`'s work: NULL elements give NULL, the others a vector.
fn embed_array(
    inputs: Array<'_, DbText>,
    role: DbText,
    profile: Option<&str>,
) -> Vec<Option<Vector>> {
    let mut texts = Vec::new();
    let present: Vec<bool> = inputs
        .iter()
        .map(|t| t.map(|t| texts.push(t.into_utf8())).is_some())
        .collect();
    // Where each text sits in the array (counting NULLs, from 1), to name it.
    let elements: Vec<usize> = present
        .iter()
        .enumerate()
        .filter(|(_, p)| **p)
        .map(|(i, _)| i + 1)
        .collect();
    let mut vectors = if texts.is_empty() {
        Vec::new()
    } else {
        embed_texts(texts, role, Some(&elements), profile)
    }
    .into_iter();
    present
        .into_iter()
        .map(|p| if p { vectors.next().map(Vector) } else { None })
        .collect()
}

/// Cuts a text into chunks of at most `max_tokens` tokens of the loaded
/// model, counted alone as `kv_embed` counts them, at paragraph, line,
/// sentence or word boundaries, with up to `overlap` tokens repeated
/// between neighbours. `start_char` and `end_char` are the chunk's first
/// and last character, counted from 1 as `substr` does.
#[pg_extern(stable, strict, parallel_safe)]
fn kv_chunk(
    input: DbText,
    max_tokens: default!(i32, 256),
    overlap: default!(i32, 32),
) -> TableIterator<
    'static,
    (
        name!(ord, i32),
        name!(chunk, DbTextOut),
        name!(start_char, i32),
        name!(end_char, i32),
        name!(tokens, i32),
    ),
> {
    let (Ok(max), Ok(over)) = (usize::try_from(max_tokens), usize::try_from(overlap)) else {
        client::raise(
            kvembed_proto::ErrorKind::InvalidInput,
            &format!("kv_chunk: max_tokens and overlap must not be negative, got {max_tokens} and {overlap}"),
        );
    };
    let raw_len = input.as_bytes().len();
    if raw_len > kvembed_proto::MAX_CHUNK_TEXT_BYTES {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "kvembed: kv_chunk takes texts of at most {} bytes, this one has {raw_len}",
                kvembed_proto::MAX_CHUNK_TEXT_BYTES
            ),
            "kvembed",
        )
        .set_hint("Split the text first, for example at paragraphs with regexp_split_to_table().")
        .report(PgLogLevel::ERROR);
    }
    let encoding = crate::text::database_encoding();
    // The original bytes are kept only where they differ from the UTF-8 text.
    let raw = (encoding == Encoding::Other).then(|| DbText::from_bytes(input.as_bytes().to_vec()));
    let (text, spans) = client::chunk(input.into_utf8(), max, over);
    // The engine answers in bytes of the UTF-8 text; SQL counts characters
    // of the database encoding (bytes in SQL_ASCII) and the chunk is cut
    // from the original bytes.
    let (starts, ends, chars) = match encoding {
        Encoding::SqlAscii => {
            let starts: Vec<usize> = spans.iter().map(|s| s.start).collect();
            let ends: Vec<usize> = spans.iter().map(|s| s.end).collect();
            let chars = starts.iter().copied().zip(ends.iter().copied()).collect();
            (starts, ends, chars)
        }
        _ => {
            let (mut at_byte, mut at_char) = (0usize, 0usize);
            let mut char_of = |byte: usize| {
                if byte < at_byte {
                    (at_byte, at_char) = (0, 0);
                }
                at_char += text[at_byte..byte].chars().count();
                at_byte = byte;
                at_char
            };
            let chars: Vec<(usize, usize)> = spans
                .iter()
                .map(|s| (char_of(s.start), char_of(s.end)))
                .collect();
            match &raw {
                None => {
                    let starts = spans.iter().map(|s| s.start).collect();
                    let ends = spans.iter().map(|s| s.end).collect();
                    (starts, ends, chars)
                }
                Some(raw) => {
                    let starts = raw.char_offsets(chars.iter().map(|c| c.0));
                    let ends = raw.char_offsets(chars.iter().map(|c| c.1));
                    (starts, ends, chars)
                }
            }
        }
    };
    let bytes = raw.as_ref().map_or(text.as_bytes(), DbText::as_bytes);
    let rows: Vec<_> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                i as i32 + 1,
                DbTextOut(bytes[starts[i]..ends[i]].to_vec()),
                chars[i].0 as i32 + 1,
                chars[i].1 as i32,
                s.tokens as i32,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// The models the engine serves: `kvembed.model` first, then those of
/// `kvembed.models`, each with its state and what `kv_embed` gives with it
/// (`in_use`: this session's `kvembed.use_model` picks it).
#[pg_extern(volatile, parallel_safe)]
fn kv_models() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(source, String),
        name!(state, String),
        name!(model_id, String),
        name!(architecture, String),
        name!(dim, i32),
        name!(default_method, String),
        name!(max_tokens, i32),
        name!(texts_served, i64),
        name!(in_use, bool),
        name!(load_error, Option<String>),
    ),
> {
    let status = client::status();
    let chosen = crate::settings::use_model();
    let rows: Vec<_> = status
        .models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            (
                m.name.clone(),
                m.source.clone(),
                m.state.as_str().to_string(),
                m.model_id.clone(),
                m.architecture.clone(),
                m.dim as i32,
                m.default_method.clone(),
                m.max_tokens as i32,
                m.texts_served as i64,
                match &chosen {
                    None => i == 0,
                    Some(name) => *name == m.name,
                },
                m.load_error.clone(),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Empties the engine's metrics (`kvembed.stats`); returns how many rows
/// (database and role pairs) they had. Superusers and `kvembed_admin`.
#[pg_extern(volatile, parallel_unsafe)]
fn kv_stats_reset() -> i64 {
    client::stats(true).1.len() as i64
}

/// Internal helpers in the `kvembed` schema, wrapped by the SQL functions in
/// `sql/finalize.sql`.
#[pg_schema]
mod kvembed {
    use super::*;

    /// The engine's metrics per database and role, read by the view
    /// `kvembed.stats`.
    #[pg_extern(volatile, parallel_safe)]
    fn engine_stats() -> TableIterator<
        'static,
        (
            name!(database, DbTextOut),
            name!(role, DbTextOut),
            name!(requests, i64),
            name!(texts, i64),
            name!(tokens, i64),
            name!(errors, JsonB),
            name!(queue_wait_p50_ms, f64),
            name!(queue_wait_p99_ms, f64),
            name!(inference_p50_ms, f64),
            name!(inference_p99_ms, f64),
            name!(batch_fill, f64),
            name!(since_epoch, f64),
        ),
    > {
        let (since, rows) = client::stats(false);
        let rows: Vec<_> = rows
            .into_iter()
            .map(|r| {
                (
                    DbTextOut::from_utf8(&r.database),
                    DbTextOut::from_utf8(&r.role),
                    r.requests as i64,
                    r.texts as i64,
                    r.tokens as i64,
                    JsonB(serde_json::to_value(&r.errors).unwrap_or_default()),
                    r.queue_wait_p50_ms,
                    r.queue_wait_p99_ms,
                    r.inference_p50_ms,
                    r.inference_p99_ms,
                    r.batch_fill,
                    since,
                )
            })
            .collect();
        TableIterator::new(rows)
    }

    /// What `kv_create_profile` freezes: the loaded model, this session's
    /// settings resolved by the engine (method, layers, bias, prompts; the
    /// length limit and overflow rule), and the space calibration they
    /// would apply.
    #[pg_extern(volatile, parallel_unsafe)]
    fn session_profile() -> JsonB {
        let (options, space) = settings_options();
        let model = client::model(options.model.as_deref());
        let (model_id, fingerprint) = (model.model_id, model.fingerprint);
        let max_tokens = options.max_tokens.unwrap_or(model.max_tokens);
        let Some(info) = client::describe(options.clone()) else {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                "kvembed: the engine cannot resolve this session's settings (see kv_status())",
                "kvembed",
            )
            .report(PgLogLevel::ERROR);
            unreachable!()
        };
        let frozen = EmbedOptions {
            method: Some(info.method),
            layers: (!info.layers.is_empty()).then_some(info.layers),
            bias: info.bias,
            document_prompt: Some(info.document_prompt),
            query_prompt: Some(info.query_prompt),
            max_tokens: Some(max_tokens),
            truncate: options.truncate,
            // A profile finds its model by the fingerprint, under any name.
            expect_model: None,
            model: None,
        };
        let space = space.map(|s| {
            serde_json::json!({
                "fit": s.fit,
                "mean": s.map.mean,
                "directions": s.map.directions,
                "gains": s.map.gains,
            })
        });
        JsonB(serde_json::json!({
            "model_id": model_id,
            "fingerprint": fingerprint,
            "options": frozen,
            "space": space,
        }))
    }

    /// Everything the engine and its supervisor report, with the session's
    /// effective settings (`kv_status()` turns it into columns).
    #[pg_extern(volatile, parallel_safe)]
    fn status_json() -> JsonB {
        let s = client::status();
        // The session's model (kvembed.use_model); a name the engine does
        // not serve shows as a failed model.
        let m = match settings::use_model() {
            None => s.first(),
            Some(name) => s.model_named(Some(&name)).cloned().unwrap_or_else(|| {
                kvembed_proto::ModelStatus {
                    load_error: Some(format!(
                        "kvembed.use_model = '{name}' names no model the engine serves (it serves: {})",
                        s.model_names()
                    )),
                    state: kvembed_proto::EngineState::Failed,
                    source: name.clone(),
                    name,
                    ..Default::default()
                }
            }),
        };
        let state = match s.state {
            kvembed_proto::EngineState::Loading => s.state,
            _ => m.state,
        };
        let supervisor = crate::worker::read_state().unwrap_or_default();
        let (asked_layers, layers_source, _, space) = session_layers(|| m.model_id.clone());
        let opts = settings::embed_options(asked_layers);
        let space =
            applied_space(space, &opts).map(|s| format!("{} ({} texts)", s.fit, s.sample_size));
        let engine = settings::EngineSettings::current();
        // Under kvembed.profile, the profile's settings.
        let (opts, layers_source, space) = match settings::profile() {
            None => (opts, layers_source.to_string(), space),
            Some(name) => match crate::profile::stored(&name) {
                Some(p) => (
                    p.options,
                    format!("profile {name}"),
                    p.space.map(|s| s.fit.clone()),
                ),
                None => (opts, format!("profile {name} (missing)"), space),
            },
        };
        // What the session's settings run on the loaded model (a method's
        // own layers, bias and prompts where it is not the default one);
        // before the model is loaded, the settings as they are.
        let described = (state == kvembed_proto::EngineState::Ready)
            .then(|| client::describe(opts.clone()))
            .flatten();
        let (method, layers, bias, document_prompt, query_prompt) = match described {
            Some(d) => (
                d.method,
                d.layers,
                d.bias,
                d.document_prompt,
                d.query_prompt,
            ),
            None => (
                opts.method.clone().unwrap_or(m.default_method),
                opts.layers.clone().unwrap_or(m.default_layers),
                Some(opts.bias.unwrap_or(m.default_bias)),
                opts.document_prompt.clone().unwrap_or(m.document_prompt),
                opts.query_prompt.clone().unwrap_or(m.query_prompt),
            ),
        };
        JsonB(serde_json::json!({
            "state": state.as_str(),
            // What kvembed.model (or the entry of kvembed.models) says.
            "model": if m.source.is_empty() { s.model } else { m.source },
            "model_name": m.name,
            "model_id": m.model_id,
            "fingerprint": m.fingerprint,
            "architecture": m.architecture,
            "dim": m.dim,
            "n_layers": m.layers,
            "device": if m.device.is_empty() { s.device } else { m.device },
            "cpu": s.cpu,
            "method": method,
            "layers": layers,
            "layers_source": layers_source,
            "space": space,
            "bias": bias,
            "document_prompt": document_prompt,
            "query_prompt": query_prompt,
            "max_tokens": opts.max_tokens.unwrap_or(m.max_tokens),
            "max_tokens_limit": m.max_tokens_limit,
            "max_calibration_texts": s.max_calibration_texts,
            "forward_passes": s.forward_passes,
            "on_overflow": if opts.truncate == Some(false) { "error" } else { "truncate" },
            "batch_tokens": engine.batch_tokens,
            "threads": s.threads,
            "queue_depth": s.queue_depth,
            "requests_served": s.requests_served,
            "texts_served": s.texts_served,
            "tokens_served": s.tokens_served,
            "engine_pid": s.pid,
            "supervisor_pid": supervisor.supervisor_pid,
            "engine_restarts": supervisor.restarts,
            "last_exit": supervisor.last_exit,
            "load_error": m.load_error,
        }))
    }

    /// Chooses the re-routing layers from `texts` by `rule` (`twonn`, the
    /// default: the intrinsic dimension at every layer; `agreement`: see
    /// docs/REFERENCE.md); `kv_select_layers()` samples the texts, stores the
    /// result and returns the rows.
    #[pg_extern(volatile, parallel_unsafe)]
    fn select_layers_raw(
        texts: Array<'_, DbText>,
        window: default!(Option<i32>, "NULL"),
        skip_fraction: default!(Option<f32>, "NULL"),
        space: default!(Option<&str>, "NULL"),
        rule: default!(Option<&str>, "NULL"),
    ) -> JsonB {
        let texts: Vec<String> = texts.iter().flatten().map(DbText::into_utf8).collect();
        let n = texts.len();
        let limit = settings::EngineSettings::current().max_calibration_texts;
        if n > limit as usize {
            ErrorReport::new(
                PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!("kvembed: a layer selection over {n} texts, more than kvembed.max_calibration_texts = {limit}"),
                "kvembed",
            )
            .set_hint("Sample fewer texts, or ask an administrator to raise kvembed.max_calibration_texts.")
            .report(PgLogLevel::ERROR);
        }
        // The space is fitted for this session's method, bias and prompt.
        let embed = settings::embed_options(None);
        let space = space
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "none");
        let rule = rule.map(|r| r.trim().to_ascii_lowercase());
        // The agreement rule embeds the sample with the session's method,
        // bias and prompt, as a space calibration does.
        let agreement = rule.as_deref() == Some("agreement");
        let options = SelectOptions {
            model: embed.model.clone(),
            skip_fraction,
            window: window.map(|w| w.max(1) as usize),
            rule,
            max_tokens: embed.max_tokens,
            space: space.map(str::to_string),
            embed: (space.is_some() || agreement).then(|| embed.clone()),
        };
        match client::select_layers(texts, options) {
            // Stored under the model the engine ran the selection on, which
            // it names in its reply (it may have restarted since this
            // session last asked).
            Response::Layers {
                curve,
                selected,
                rule,
                texts,
                model_id,
                space: map,
            } => {
                calibration::invalidate();
                let space = map.map(|m| {
                    serde_json::json!({
                        "fit": space,
                        "options": calibration::options_key(&embed),
                        "mean": m.mean,
                        "directions": m.directions,
                        "gains": m.gains,
                    })
                });
                JsonB(serde_json::json!({
                    "model_id": model_id,
                    "curve": curve,
                    "selected": selected,
                    "rule": rule,
                    "texts": texts.max(n),
                    "space": space,
                }))
            }
            _ => unreachable!("client::select_layers returns Layers or raises"),
        }
    }
}

/// Restarts the engine (superusers and members of kvembed_admin): it exits
/// and its supervisor starts a fresh one with the current settings.
/// Statements waiting on it fail. Returns false when no engine was running
/// (one is started).
#[pg_extern(volatile, parallel_unsafe)]
fn kv_restart() -> bool {
    match client::shutdown() {
        Some(pid) => {
            notice!("kvembed: engine pid {pid} is restarting");
            true
        }
        None => {
            crate::worker::ensure_supervisor();
            false
        }
    }
}

/// Fault injection for testing fault isolation (superusers only, and only
/// while `kvembed.debug_faults` is on, which starts the engine with
/// `--allow-faults`): arms
/// `kind` in the engine for its next embedding batch and returns the
/// engine's pid. Kinds: 'panic' (the inference code panics: that batch
/// fails, the engine lives on), 'abort' (the engine process aborts, as a
/// crash in native code would; its supervisor restarts it), 'stall:<ms>'
/// (the batch sleeps first, as a slow or hung forward pass would).
#[pg_extern(volatile, parallel_unsafe)]
fn kv_debug_fault(kind: &str) -> i32 {
    // SAFETY: plain catalog lookup of the current user.
    if !unsafe { pg_sys::superuser() } {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "kvembed: only superusers may inject faults",
            "kvembed",
        )
        .report(PgLogLevel::ERROR);
    }
    if !crate::settings::DEBUG_FAULTS.get() {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "kvembed: fault injection is off",
            "kvembed",
        )
        .set_hint("It is for reliability tests: set kvembed.debug_faults = on (postgresql.conf or ALTER SYSTEM, then reload).")
        .report(PgLogLevel::ERROR);
    }
    let Some(fault) = kvembed_proto::Fault::parse(kind) else {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("kvembed: unknown fault '{kind}'"),
            "kvembed",
        )
        .set_hint("Use 'panic', 'abort' or 'stall:<milliseconds>'.")
        .report(PgLogLevel::ERROR);
        unreachable!()
    };
    client::fault(fault) as i32
}

fn parse_role(role: &str) -> Role {
    Role::parse(role).unwrap_or_else(|| {
        ErrorReport::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("kvembed: unknown role '{}'", crate::text::for_message(role)),
            "kvembed",
        )
        .set_hint("Use 'document' (the default) or 'query'.")
        .report(PgLogLevel::ERROR);
        unreachable!()
    })
}

/// The request options for this session: its settings, with `layers = auto`
/// resolved against the stored calibration of the loaded model; and the
/// stored space calibration, where it applies to them.
///
/// With `layers = auto` the layers depend on the model: the request names
/// the model they were looked up for, and the engine refuses it if it has
/// restarted with another model in between.
fn request_options() -> (EmbedOptions, Option<Rc<StoredSpace>>) {
    if let Some(profile) = settings::profile() {
        return crate::profile::options_for(&profile);
    }
    settings_options()
}

/// The request options from the session's `kvembed.*` settings (no profile).
fn settings_options() -> (EmbedOptions, Option<Rc<StoredSpace>>) {
    let (layers, _, expect_model, space) = session_layers(|| client::session_model().model_id);
    let options = EmbedOptions {
        expect_model,
        ..settings::embed_options(layers)
    };
    let space = applied_space(space, &options);
    (options, space)
}

/// The layers the session's settings ask for; where they come from
/// (`setting`, `calibration`, or `default`: the method's own, `None`); with
/// `kvembed.layers = 'auto'`, the model (`model_id()`) whose stored
/// calibration was looked up, which a request then names; and that
/// calibration's space map, if it has one.
fn session_layers(
    model_id: impl FnOnce() -> String,
) -> (
    Option<Vec<usize>>,
    &'static str,
    Option<String>,
    Option<Rc<StoredSpace>>,
) {
    match settings::layers() {
        LayerChoice::Explicit(l) => (Some(l), "setting", None, None),
        LayerChoice::Default => (None, "default", None, None),
        LayerChoice::Auto => {
            let model_id = model_id();
            match calibration::stored_for(&model_id) {
                Some(calibration::Stored {
                    layers: Some(l),
                    space,
                }) => (Some(l), "calibration", Some(model_id), space),
                _ => (None, "default", Some(model_id), None),
            }
        }
    }
}

/// The stored space calibration if `kvembed.space_calibration` is on and
/// it was fitted for these options (method, bias, document prompt).
fn applied_space(
    space: Option<Rc<StoredSpace>>,
    options: &EmbedOptions,
) -> Option<Rc<StoredSpace>> {
    space
        .filter(|s| settings::space_calibration() && s.options == calibration::options_key(options))
}

/// Embeds `texts` in requests of a bounded size
/// (`kvembed_proto::request_bounds`): a large `kv_embed_batch` neither
/// builds one huge request and reply nor holds the engine for the whole
/// array at once, and a cancel stops it within one forward pass of the
/// engine. `elements`: each text's place in the caller's array (from 1), to
/// name a text in errors; `None` for a single text. `profile`: a named
/// profile's settings instead of the session's.
fn embed_texts(
    texts: Vec<String>,
    role: DbText,
    elements: Option<&[usize]>,
    profile: Option<&str>,
) -> Vec<Vec<f32>> {
    let role = parse_role(&role.into_utf8());
    let (options, space) = match profile {
        Some(p) => crate::profile::options_for(p),
        None => request_options(),
    };
    let mut texts = texts;
    // Which texts were cut before tokenizing: their length in tokens is
    // then a lower bound.
    let mut cut = vec![false; texts.len()];
    if options.truncate != Some(false) {
        // Only the first max_tokens tokens of a text are kept: the bytes far
        // beyond them need not travel (the engine cuts at the same place).
        let cap = options
            .max_tokens
            .unwrap_or_else(|| client::model(options.model.as_deref()).max_tokens);
        if cap > 0 {
            for (t, cut) in texts.iter_mut().zip(&mut cut) {
                *cut = kvembed_proto::cut_far_beyond(t, cap);
            }
        }
    }
    let count = texts.len();
    let mut vectors = Vec::new();
    if vectors.try_reserve_exact(count).is_err() {
        client::out_of_memory(&format!("room for {count} embeddings"));
    }
    let mut truncated = Vec::new();
    let bounds = kvembed_proto::request_bounds(&texts);
    let mut texts = texts.into_iter();
    let mut start = 0;
    for end in bounds {
        let chunk: Vec<String> = texts.by_ref().take(end - start).collect();
        let name = |i: usize| match elements {
            Some(elements) => format!("element {} of the array", elements[start + i]),
            None => "the text".to_string(),
        };
        let out = client::embed(chunk, role, options.clone(), &name);
        truncated.extend(out.truncated.into_iter().map(|t| Truncation {
            index: t.index + start,
            ..t
        }));
        vectors.extend(out.vectors);
        start = end;
    }
    report_truncations(&truncated, &cut, count);
    if let Some(space) = space {
        for v in &mut vectors {
            if v.len() != space.map.dim() {
                ErrorReport::new(
                    PgSqlErrorCode::ERRCODE_DATA_EXCEPTION,
                    format!(
                        "kvembed: the stored space calibration has dimension {}, the model's embeddings {}",
                        space.map.dim(),
                        v.len()
                    ),
                    "kvembed",
                )
                .set_hint("Run kv_select_layers() again, or SET kvembed.space_calibration = off.")
                .report(PgLogLevel::ERROR);
            }
            space.map.apply(v);
        }
    }
    vectors
}

/// One NOTICE for the texts that were cut (`cut[i]`: text `i` was cut far
/// beyond the limit before tokenizing, so its count is a lower bound).
fn report_truncations(truncated: &[Truncation], cut: &[bool], count: usize) {
    if let (false, Some((asked, limit))) = (truncated.is_empty(), settings::max_tokens_over_limit())
    {
        notice!(
            "kvembed: kvembed.max_tokens = {asked} is above the administrator's kvembed.max_tokens_limit = {limit}; texts are cut at {limit} tokens"
        );
    }
    match truncated {
        [] => {}
        [t] if count == 1 => notice!(
            "kvembed: text truncated from {}{} to {} tokens (kvembed.max_tokens; set kvembed.on_overflow = 'error' to refuse instead)",
            at_least(cut.get(t.index).copied().unwrap_or(false)),
            t.tokens,
            t.kept
        ),
        many => {
            let longest = many.iter().map(|t| t.tokens).max().unwrap_or(0);
            let kept = many.iter().map(|t| t.kept).max().unwrap_or(0);
            let any_cut = many.iter().any(|t| cut.get(t.index).copied().unwrap_or(false));
            notice!(
                "kvembed: {} of {count} texts truncated to {kept} tokens (the longest had {}{longest}; kvembed.max_tokens)",
                many.len(),
                at_least(any_cut)
            );
        }
    }
}

fn at_least(lower_bound: bool) -> &'static str {
    if lower_bound {
        "at least "
    } else {
        ""
    }
}
