//! Wire protocol between PostgreSQL sessions and the kvembed inference server.
//!
//! The server is a separate OS process (never a postmaster child), listening on
//! a Unix-domain socket with mode 0600. Every message is a frame: a 4-byte
//! little-endian length followed by that many bytes. Requests and responses
//! are JSON frames; an `Embeddings` response is followed by one binary frame
//! holding `count * dim` little-endian `f32` values, row-major.
//!
//! One request per connection turn; a client may send several requests over
//! one connection, one after the other. A client that goes away (cancelled
//! statement) simply closes the socket: the server drops the result.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

pub mod space;
pub use space::SpaceMap;

/// Bumped on any incompatible change; `Hello` checks it.
pub const PROTOCOL_VERSION: u32 = 6;

/// A text's token budget when neither the request nor the session sets one
/// (the default of `kvembed.max_tokens`, and of a layer selection's texts).
pub const DEFAULT_MAX_TOKENS: usize = 512;
/// The administrator's ceiling on any request's `max_tokens` (the default of
/// `kvembed.max_tokens_limit`); also the engine's budget for a text where no
/// server applies one (the CLI). Always capped at the model's trained context.
pub const DEFAULT_MAX_TOKENS_LIMIT: usize = 4096;
/// Padded tokens per forward pass (the default of `kvembed.batch_tokens`).
pub const DEFAULT_BATCH_TOKENS: usize = 8192;
/// Most texts of one layer selection (the default of
/// `kvembed.max_calibration_texts`): TwoNN keeps `N^2 / 2` distances per layer.
pub const DEFAULT_MAX_CALIBRATION_TEXTS: usize = 4096;

/// Largest frame either side accepts (256 MiB): a guard against garbage lengths.
pub const MAX_FRAME: usize = 256 << 20;

/// Most texts one `Embed` request may carry; the server refuses more. The
/// extension splits a larger `kv_embed_batch` into requests of at most
/// [`REQUEST_TEXTS`] texts and [`REQUEST_BYTES`] bytes, so that neither the
/// request, nor the reply, nor the work of one request grows with the array.
pub const MAX_REQUEST_TEXTS: usize = 4096;
/// Texts per request the extension sends (see [`MAX_REQUEST_TEXTS`]).
pub const REQUEST_TEXTS: usize = 256;
/// Bytes of text per request the extension aims for (one text larger than
/// this travels alone).
pub const REQUEST_BYTES: usize = 8 << 20;

/// No token is anywhere near this many bytes long: a text longer than
/// `max_tokens * MAX_BYTES_PER_TOKEN` bytes certainly has more than
/// `max_tokens` tokens.
pub const MAX_BYTES_PER_TOKEN: usize = 64;

/// Peeks at one byte of `stream` without blocking or consuming it: `Ok(0)`
/// means the peer closed, `Ok(1)` that data is pending, `WouldBlock` that
/// nothing is. Both sides use it on a connection that should be quiet: the
/// extension on a cached idle connection (readable = the engine went away),
/// the server on a waiting client's (readable = the statement was cancelled).
pub fn peek(stream: &std::os::unix::net::UnixStream) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a non-blocking recv of at most one byte into a buffer we own,
    // on an open socket we borrow; MSG_PEEK consumes nothing.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Parses a list of layer numbers, the one grammar of `kvembed.layers` and of
/// `kvembed-lab --layers`: numbers and inclusive ranges separated by commas,
/// optionally in braces or brackets (`6,7,8`, `6-8`, `{6,7,8}`, `[2, 6-8]`).
/// Returns the layers sorted, without duplicates; never an empty list.
/// Keywords such as `auto` are the caller's to handle first.
pub fn parse_layer_list(s: &str) -> Result<Vec<usize>, String> {
    let inner = s
        .trim()
        .trim_start_matches(['{', '['])
        .trim_end_matches(['}', ']']);
    let mut layers = Vec::new();
    for part in inner.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: usize = a
                .trim()
                .parse()
                .map_err(|_| format!("'{part}' is not a layer range"))?;
            let b: usize = b
                .trim()
                .parse()
                .map_err(|_| format!("'{part}' is not a layer range"))?;
            if a > b {
                return Err(format!("'{part}' is an empty range"));
            }
            layers.extend(a..=b);
        } else {
            layers.push(
                part.parse()
                    .map_err(|_| format!("'{part}' is not a layer number"))?,
            );
        }
    }
    if layers.is_empty() {
        return Err("expected layer numbers such as 6,7,8 or 6-8".into());
    }
    layers.sort_unstable();
    layers.dedup();
    Ok(layers)
}

/// With truncation on, only the first `max_tokens` tokens of a text matter:
/// drops the bytes far beyond them (on a character boundary), so 10 MB of
/// text (or one 10 MB "word", which byte-level BPE merges in quadratic time)
/// costs no more than a long paragraph, in the request and in the
/// tokenizer. The kept prefix tokenises exactly as before, because the cut
/// lies well past the last token kept. Returns whether it cut: the length in
/// tokens counted afterwards is then only a lower bound.
pub fn cut_far_beyond(text: &mut String, max_tokens: usize) -> bool {
    let limit = max_tokens.saturating_mul(MAX_BYTES_PER_TOKEN);
    if text.len() <= limit {
        return false;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    true
}

/// Splits `texts` into consecutive requests of at most [`REQUEST_TEXTS`]
/// texts and about [`REQUEST_BYTES`] bytes (at least one text each); returns
/// the end index of each request.
pub fn request_bounds(texts: &[String]) -> Vec<usize> {
    let mut bounds = Vec::new();
    let (mut count, mut bytes) = (0, 0);
    for (i, t) in texts.iter().enumerate() {
        if count > 0 && (count == REQUEST_TEXTS || bytes + t.len() > REQUEST_BYTES) {
            bounds.push(i);
            count = 0;
            bytes = 0;
        }
        count += 1;
        bytes += t.len();
    }
    if count > 0 {
        bounds.push(texts.len());
    }
    bounds
}

/// Which side of an asymmetric search a text is on: documents and queries get
/// different prompt templates.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    #[default]
    Document,
    Query,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s.trim().to_ascii_lowercase().as_str() {
            "document" | "doc" | "passage" => Some(Role::Document),
            "query" | "q" => Some(Role::Query),
            _ => None,
        }
    }
}

/// Per-request settings. `None` means "the server's default"; the session
/// fills these from its `kvembed.*` settings so one settings struct travels
/// with every request.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct EmbedOptions {
    /// Method name (`kv` is the product default; see the engine's
    /// `Method::from_name` for the list, e.g. `kv-paper`, `mean`, `echo`).
    pub method: Option<String>,
    /// Layers to re-route (0-based). `None`: the method's default window.
    pub layers: Option<Vec<usize>>,
    /// Additive bias on the re-routed column's logits.
    pub bias: Option<f32>,
    /// Prompt template for documents; must contain `{text}`.
    pub document_prompt: Option<String>,
    /// Prompt template for queries; must contain `{text}`.
    pub query_prompt: Option<String>,
    /// Maximum tokens of the *text* (the prompt is added on top).
    pub max_tokens: Option<usize>,
    /// When a text is longer than `max_tokens`: `true` truncates it and reports
    /// it in the response, `false` fails the request.
    pub truncate: Option<bool>,
    /// The `model_id` these options were prepared for (the layers of a
    /// stored calibration belong to one model): the server refuses the
    /// request with [`ErrorKind::ModelChanged`] if it now serves another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_model: Option<String>,
    /// Which of the engine's models embeds (its name, see [`ModelEntry`]):
    /// `None` is the first, `kvembed.model`. Requests for different models
    /// never share a batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SelectOptions {
    /// Which of the engine's models the selection runs on (see
    /// [`EmbedOptions::model`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Fraction of the layers skipped at the start (the method uses 0.2).
    pub skip_fraction: Option<f32>,
    /// Width of the selected window.
    pub window: Option<usize>,
    /// How the window is chosen: `twonn` (the default: the minimum of the
    /// intrinsic dimension) or `agreement` (the window whose embeddings
    /// best tell each text's perturbed copy from the others', at the bias
    /// of [`SelectOptions::embed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Tokens kept of each text (default [`DEFAULT_MAX_TOKENS`]).
    pub max_tokens: Option<usize>,
    /// Also fit a corpus calibration of the space on the same sample
    /// (`center`, `remove:K`, `whiten[:A]`; see [`space`]), embedded with
    /// [`SelectOptions::embed`] and the selected layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space: Option<String>,
    /// The embedding options the space calibration is fitted for (their
    /// layers are replaced by the selected ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed: Option<EmbedOptions>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// First message on a connection.
    Hello {
        version: u32,
    },
    Embed {
        texts: Vec<String>,
        #[serde(default)]
        role: Role,
        #[serde(default)]
        options: EmbedOptions,
        #[serde(default)]
        caller: Caller,
    },
    SelectLayers {
        texts: Vec<String>,
        #[serde(default)]
        options: SelectOptions,
        #[serde(default)]
        caller: Caller,
    },
    Status,
    /// Cut `text` into chunks of at most `max_tokens` tokens of the loaded
    /// model (`kv_chunk()`), answered with `Chunks`.
    Chunk {
        text: String,
        max_tokens: usize,
        overlap: usize,
        #[serde(default)]
        caller: Caller,
        /// Whose tokenizer cuts (see [`EmbedOptions::model`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
    },
    /// The metrics per database and role (`kvembed.stats`), answered with
    /// `Stats`; `reset` empties them afterwards.
    Stats {
        reset: bool,
    },
    /// What `options` resolve to on the loaded model (the method, its
    /// re-routed layers, bias and prompts), answered with `Described`.
    Describe {
        options: EmbedOptions,
    },
    /// Ask the server to exit after answering (`kv_restart()`): its
    /// supervisor starts a fresh one, re-reading the settings.
    Shutdown,
    /// Arm a fault for the next embedding batch (`kv_debug_fault()`, for
    /// superusers only): how the extension's fault-isolation tests make the
    /// inference code fail on demand.
    Fault {
        fault: Fault,
    },
}

/// Faults the server can be asked to inject into its next embedding batch.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Panic inside the inference code (caught: that batch fails, the
    /// process lives on).
    Panic,
    /// Abort the whole process (as a crash in native code would).
    Abort,
    /// Sleep this long before running the batch (a slow or hung forward pass).
    Stall { ms: u64 },
}

impl Fault {
    /// Parses `panic`, `abort` or `stall:<ms>`.
    pub fn parse(s: &str) -> Option<Fault> {
        match s.trim() {
            "panic" => Some(Fault::Panic),
            "abort" => Some(Fault::Abort),
            other => {
                let ms = other.strip_prefix("stall:")?.trim().parse().ok()?;
                Some(Fault::Stall { ms })
            }
        }
    }
}

/// Broad error classes, mapped to SQLSTATEs at the PostgreSQL edge.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Bad argument or setting (SQLSTATE 22023).
    InvalidInput,
    /// Text longer than allowed with truncation off (SQLSTATE 54000).
    TooLong,
    /// The model could not be loaded (SQLSTATE 58P01 / XX000).
    ModelLoad,
    /// The server is still loading the model.
    Loading,
    /// Protocol mismatch.
    Protocol,
    /// The request was prepared for another model than the one loaded now
    /// (the engine restarted with a new `kvembed.model` in between).
    ModelChanged,
    /// Anything else inside the engine.
    Internal,
}

impl ErrorKind {
    /// The SQLSTATE the extension raises for this class (its `raise`).
    pub fn sqlstate(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "22023",
            ErrorKind::TooLong => "54000",
            ErrorKind::ModelLoad => "58P01",
            ErrorKind::Loading | ErrorKind::ModelChanged => "58000",
            ErrorKind::Protocol | ErrorKind::Internal => "XX000",
        }
    }
}

/// SQLSTATE of a statement cancelled while the engine worked for it (the
/// engine sees its client go away).
pub const SQLSTATE_CANCELED: &str = "57014";

/// Who sent a request: the engine's metrics are kept per database and role.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Caller {
    pub database: String,
    pub role: String,
}

/// The engine's metrics for one database and role since `Stats` was last
/// reset (or the engine started): `kvembed.stats`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct StatsRow {
    pub database: String,
    pub role: String,
    /// Requests answered, of every kind (embed, chunk, layer selection),
    /// with or without an error.
    pub requests: u64,
    /// Texts embedded and tokens run (prompts included) by `Embed` requests.
    pub texts: u64,
    pub tokens: u64,
    /// Failed requests by SQLSTATE (57014: cancelled while the engine
    /// worked on it).
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Of embedding requests that succeeded: time queued (waiting for the
    /// inference thread, between slices included) and time in forward
    /// passes, in milliseconds, median and 99th percentile (log-scale
    /// buckets: within 10 %).
    pub queue_wait_p50_ms: f64,
    pub queue_wait_p99_ms: f64,
    pub inference_p50_ms: f64,
    pub inference_p99_ms: f64,
    /// How full the batches these requests ran in were, on average: tokens
    /// of the batch over `kvembed.batch_tokens`.
    pub batch_fill: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Truncation {
    /// Index of the text in the request.
    pub index: usize,
    /// Tokens the text had.
    pub tokens: usize,
    /// Tokens kept.
    pub kept: usize,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LayerPoint {
    pub layer: usize,
    /// TwoNN's estimate at this layer (NaN, null on the wire, where there is
    /// none: too few distinct points, or the agreement rule, which does not
    /// measure it).
    #[serde(with = "nan_as_null")]
    pub intrinsic_dimension: f64,
    pub selected: bool,
    /// The agreement rule's score of the window starting at this layer, at
    /// the method's bias (`None` where no window starting here was scored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
}

/// A number that may be NaN, as JSON: `null` for NaN (JSON has no NaN, and
/// `serde_json` writes it as `null`, which a plain `f64` cannot read back).
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Where the engine's model is: on the wire and in `kv_status()` as
/// `loading`, `ready` or `failed`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum EngineState {
    /// Loading the model; requests wait for it.
    #[default]
    Loading,
    /// Serving.
    Ready,
    /// The load failed; `Status::load_error` says why, and every request
    /// gets that error.
    Failed,
}

impl EngineState {
    pub fn as_str(self) -> &'static str {
        match self {
            EngineState::Loading => "loading",
            EngineState::Ready => "ready",
            EngineState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for EngineState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The effective configuration of a method on the loaded model: what a
/// request with given options runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct MethodInfo {
    pub method: String,
    /// The re-routed layers; empty for a method without re-routing.
    pub layers: Vec<usize>,
    /// The bias on the re-routed column; `None` without re-routing.
    pub bias: Option<f32>,
    pub document_prompt: String,
    pub query_prompt: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Status {
    /// `ready` or `failed` as the first model (`kvembed.model`) is, once
    /// every model has finished loading; `loading` until then.
    pub state: EngineState,
    /// `kvembed.model` as given.
    pub model: String,
    /// The device asked for (`cpu`, `cuda:N`, `auto`); each model's
    /// [`ModelStatus::device`] says where it runs.
    pub device: String,
    pub threads: usize,
    pub queue_depth: usize,
    pub requests_served: u64,
    pub texts_served: u64,
    pub tokens_served: u64,
    pub pid: u32,
    /// The instruction-set level the engine's CPU kernels run at, e.g.
    /// `x86-64-v3 (avx2+fma)` (the engine's `cpu` module; `KVEMBED_CPU`
    /// caps it).
    pub cpu: String,
    /// Forward passes run since the engine started, all models together:
    /// work counted in units that do not depend on the CPU's speed.
    pub forward_passes: u64,
    /// The administrator's ceiling on the texts of one layer selection
    /// (`kvembed.max_calibration_texts`).
    pub max_calibration_texts: usize,
    /// Every model the engine serves, `kvembed.model` first, then those of
    /// `kvembed.models`: what each is, its state and its limits.
    pub models: Vec<ModelStatus>,
}

impl Status {
    /// The first model, `kvembed.model` (a default before the engine
    /// answered).
    pub fn first(&self) -> ModelStatus {
        self.models.first().cloned().unwrap_or_default()
    }

    /// The model requests name `name` (`None`: the first), if it is served.
    pub fn model_named(&self, name: Option<&str>) -> Option<&ModelStatus> {
        match name {
            None => self.models.first(),
            Some(n) => self.models.iter().find(|m| m.name == n),
        }
    }

    /// The names of the served models, for messages.
    pub fn model_names(&self) -> String {
        let names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
        names.join(", ")
    }
}

/// One model the engine serves (an entry of [`Status::models`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ModelStatus {
    /// What requests name it by ([`EmbedOptions::model`]).
    pub name: String,
    /// Where it is loaded from, as configured.
    pub source: String,
    pub state: EngineState,
    /// Stable identity of the loaded weights (path + architecture + shape).
    pub model_id: String,
    /// The weights' content (`sha256:...` of the files' sizes and ends),
    /// the same under any path: what an embedding profile is checked against.
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
    /// A text's default token budget on this model (`kvembed.max_tokens`'s
    /// default where the server sets none).
    pub max_tokens: usize,
    /// The administrator's ceiling on the tokens of one text
    /// (`kvembed.max_tokens_limit`, capped at the model's context); no
    /// request's `max_tokens` goes above it.
    pub max_tokens_limit: usize,
    pub forward_passes: u64,
    pub texts_served: u64,
    pub tokens_served: u64,
    /// Why the load failed, for a `failed` model.
    pub load_error: Option<String>,
}

/// One model of `kvembed.model` / `kvembed.models`: the name requests use
/// and where its weights are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelEntry {
    pub name: String,
    pub source: String,
}

/// The name a model is known by when its entry gives none: the file or
/// directory name without `.gguf` (`/m/all-MiniLM-L6-v2` and the repo id
/// `sentence-transformers/all-MiniLM-L6-v2@main` are both `all-MiniLM-L6-v2`).
pub fn default_model_name(source: &str) -> String {
    let trimmed = source.trim().trim_end_matches('/');
    let base = trimmed.rsplit('/').next().unwrap_or(trimmed);
    // A repo id's revision is not part of the name.
    let base = base.split('@').next().unwrap_or(base);
    let base = base
        .strip_suffix(".gguf")
        .or_else(|| base.strip_suffix(".GGUF"))
        .unwrap_or(base);
    base.to_string()
}

fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Parses `kvembed.models`: a comma-separated list of `name=source` or
/// `source` entries (the name then from [`default_model_name`]). Names are
/// letters, digits, `_`, `-` and `.`, at most 63 of them, and unique, also
/// against `taken` (the name of `kvembed.model`).
pub fn parse_model_list(list: &str, taken: &str) -> Result<Vec<ModelEntry>, String> {
    let mut out: Vec<ModelEntry> = Vec::new();
    for raw in list.split(',') {
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        // `name=source`, unless what precedes '=' cannot be a name (a
        // path with '=' in it).
        let (name, source) = match raw.split_once('=') {
            Some((n, s)) if !n.contains('/') => (n.trim().to_string(), s.trim().to_string()),
            _ => (default_model_name(raw), raw.to_string()),
        };
        if source.is_empty() {
            return Err(format!("the entry '{raw}' names no model"));
        }
        if !valid_model_name(&name) {
            return Err(format!(
                "'{name}' is not a model name (letters, digits, '_', '-' and '.', at most 63): write name=source"
            ));
        }
        if name == taken || out.iter().any(|e| e.name == name) {
            return Err(format!(
                "two models are named '{name}': give one another name (name=source)"
            ));
        }
        out.push(ModelEntry { name, source });
    }
    Ok(out)
}

// `Status` makes this enum large; responses are built once per request and
// never stored in bulk, so boxing it would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        version: u32,
        pid: u32,
    },
    /// Followed by one binary frame of `count * dim` f32 values.
    Embeddings {
        count: usize,
        dim: usize,
        #[serde(default)]
        truncated: Vec<Truncation>,
        tokens: usize,
    },
    /// Sent while a long `SelectLayers` runs, zero or more times before its
    /// `Layers` (or `Error`) response: `done` of `total` texts processed.
    Progress {
        done: usize,
        total: usize,
    },
    Layers {
        curve: Vec<LayerPoint>,
        selected: Vec<usize>,
        /// How the selection was made (e.g. "minimum at layer 9").
        rule: String,
        texts: usize,
        /// The model the selection was made on: the calibration is stored
        /// under it (not under what the client believed was loaded).
        #[serde(default)]
        model_id: String,
        /// The corpus calibration of the space, when one was asked for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        space: Option<SpaceMap>,
    },
    Status(Status),
    Described(MethodInfo),
    /// Answer to `Stats`: the rows, and since when they count (seconds
    /// since the Unix epoch: the engine's start or the last reset).
    Stats {
        since: f64,
        rows: Vec<StatsRow>,
    },
    /// Answer to `Chunk`: the chunks in order.
    Chunks {
        chunks: Vec<ChunkSpan>,
    },
    /// Answer to `Shutdown`; the server exits right after sending it.
    ShuttingDown {
        pid: u32,
    },
    /// Answer to `Fault`: armed for the next embedding batch.
    FaultArmed {
        pid: u32,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
    /// An `Embed` without truncation refused up front: text `index` of the
    /// request has more than `max` tokens. The client names the text in its
    /// own terms (an array element, a row).
    TooLong {
        index: usize,
        /// Its exact length; `None` where it was not counted (a text of more
        /// than `max * MAX_BYTES_PER_TOKEN` bytes certainly has more than
        /// `max` tokens, and megabytes are not tokenised to say how many).
        tokens: Option<usize>,
        max: usize,
    },
}

/// One chunk of a `Chunk` request's text: bytes `start..end` of it (no
/// leading or trailing whitespace), `tokens` long counted alone.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkSpan {
    pub start: usize,
    pub end: usize,
    pub tokens: usize,
}

/// Largest text one `Chunk` request carries (32 MiB): escaped as JSON it
/// still fits a frame. The extension refuses larger texts up front.
pub const MAX_CHUNK_TEXT_BYTES: usize = 32 << 20;

/// Bytes of JSON one [`ChunkSpan`] may take at most in a reply: a `Chunk`
/// whose answer could pass [`MAX_FRAME`] is refused.
pub const CHUNK_REPLY_BYTES: usize = 80;

pub fn write_frame<W: Write>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    if bytes.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "frame of {} bytes exceeds the {} byte limit",
                bytes.len(),
                MAX_FRAME
            ),
        ));
    }
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(bytes)?;
    w.flush()
}

pub fn read_frame<R: Read>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {len} exceeds the {MAX_FRAME} byte limit"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

pub fn write_json<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    write_frame(w, &bytes)
}

pub fn read_json<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> io::Result<T> {
    let bytes = read_frame(r)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub fn write_f32s<W: Write>(w: &mut W, values: &[f32]) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    write_frame(w, &bytes)
}

/// Reads an f32 frame that must hold exactly `expected` values: the length
/// is checked before anything is allocated, and the allocation itself may
/// fail with an error instead of aborting the process.
pub fn read_f32s_exact<R: Read>(r: &mut R, expected: usize) -> io::Result<Vec<f32>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if Some(len) != expected.checked_mul(4) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("an f32 frame of {len} bytes where {expected} values were announced"),
        ));
    }
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(len)
        .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e))?;
    bytes.resize(len, 0);
    r.read_exact(&mut bytes)?;
    let mut out = Vec::new();
    out.try_reserve_exact(expected)
        .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e))?;
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
    Ok(out)
}

#[cfg(test)]
mod tests {

    #[test]
    fn model_lists_name_each_model_once() {
        let list = parse_model_list(
            " minilm = /m/all-MiniLM-L6-v2 ,/m/SmolLM2-135M.Q4_1.gguf,, sentence-transformers/all-mpnet-base-v2@main ,/a=b/x",
            "first",
        )
        .unwrap();
        let pairs: Vec<(&str, &str)> = list
            .iter()
            .map(|e| (e.name.as_str(), e.source.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("minilm", "/m/all-MiniLM-L6-v2"),
                ("SmolLM2-135M.Q4_1", "/m/SmolLM2-135M.Q4_1.gguf"),
                (
                    "all-mpnet-base-v2",
                    "sentence-transformers/all-mpnet-base-v2@main"
                ),
                ("x", "/a=b/x"),
            ]
        );
        assert_eq!(parse_model_list("", "first"), Ok(vec![]));
        for (bad, why) in [
            ("a=/x, a=/y", "two models are named 'a'"),
            ("/m/first.gguf", "two models are named 'first'"),
            ("bad name=/x", "not a model name"),
            ("m=", "names no model"),
        ] {
            let err = parse_model_list(bad, "first").unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn layer_lists_in_every_accepted_spelling() {
        assert_eq!(parse_layer_list("6,7,8"), Ok(vec![6, 7, 8]));
        assert_eq!(parse_layer_list(" 6-8 "), Ok(vec![6, 7, 8]));
        assert_eq!(parse_layer_list("{8, 6-7}"), Ok(vec![6, 7, 8]));
        assert_eq!(parse_layer_list("[2,2,1]"), Ok(vec![1, 2]));
        assert_eq!(
            parse_layer_list("8-6"),
            Err("'8-6' is an empty range".into())
        );
        assert_eq!(
            parse_layer_list("6,x"),
            Err("'x' is not a layer number".into())
        );
        assert_eq!(
            parse_layer_list("1-"),
            Err("'1-' is not a layer range".into())
        );
        assert!(parse_layer_list("{}").is_err());
        assert!(parse_layer_list("-1").is_err());
    }
    use super::*;

    #[test]
    fn request_round_trip() {
        let req = Request::Embed {
            texts: vec!["a".into(), "ünïcode 😀".into()],
            role: Role::Query,
            options: EmbedOptions {
                bias: Some(2.0),
                layers: Some(vec![3, 4]),
                ..Default::default()
            },
            caller: Default::default(),
        };
        let mut buf = Vec::new();
        write_json(&mut buf, &req).unwrap();
        let back: Request = read_json(&mut &buf[..]).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn a_layer_without_an_estimate_travels() {
        // TwoNN has no estimate at a layer whose points coincide, and the
        // agreement rule measures none: NaN must survive the JSON frame.
        let reply = Response::Layers {
            curve: vec![
                LayerPoint {
                    layer: 0,
                    intrinsic_dimension: f64::NAN,
                    selected: false,
                    agreement: None,
                },
                LayerPoint {
                    layer: 1,
                    intrinsic_dimension: 7.5,
                    selected: true,
                    agreement: Some(4.25),
                },
            ],
            selected: vec![1],
            rule: "r".into(),
            texts: 3,
            model_id: "m".into(),
            space: None,
        };
        let mut buf = Vec::new();
        write_json(&mut buf, &reply).unwrap();
        let Response::Layers { curve, .. } = read_json(&mut &buf[..]).unwrap() else {
            panic!("not a Layers reply");
        };
        assert!(curve[0].intrinsic_dimension.is_nan());
        assert_eq!(curve[0].agreement, None);
        assert_eq!(curve[1].intrinsic_dimension, 7.5);
        assert_eq!(curve[1].agreement, Some(4.25));
    }

    #[test]
    fn faults_parse_and_round_trip() {
        assert_eq!(Fault::parse("panic"), Some(Fault::Panic));
        assert_eq!(Fault::parse(" abort "), Some(Fault::Abort));
        assert_eq!(Fault::parse("stall:250"), Some(Fault::Stall { ms: 250 }));
        assert_eq!(Fault::parse("stall:"), None);
        assert_eq!(Fault::parse("segfault"), None);
        let req = Request::Fault {
            fault: Fault::Stall { ms: 7 },
        };
        let mut buf = Vec::new();
        write_json(&mut buf, &req).unwrap();
        assert_eq!(read_json::<_, Request>(&mut &buf[..]).unwrap(), req);
    }

    #[test]
    fn f32_frames_round_trip() {
        let v = vec![1.5f32, -0.0, f32::MIN_POSITIVE, 3.25];
        let mut buf = Vec::new();
        write_f32s(&mut buf, &v).unwrap();
        assert_eq!(buf.len(), 4 + 16);
        assert_eq!(read_f32s_exact(&mut &buf[..], v.len()).unwrap(), v);
    }

    #[test]
    fn oversized_length_is_rejected() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&(u32::MAX).to_le_bytes());
        let err = read_frame(&mut &buf[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&10u32.to_le_bytes());
        buf.extend_from_slice(b"abc");
        assert!(read_frame(&mut &buf[..]).is_err());
    }

    #[test]
    fn shutdown_round_trip() {
        let mut buf = Vec::new();
        write_json(&mut buf, &Request::Shutdown).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[4..]).unwrap(),
            r#"{"op":"shutdown"}"#
        );
        assert_eq!(
            read_json::<_, Request>(&mut &buf[..]).unwrap(),
            Request::Shutdown
        );
        let mut buf = Vec::new();
        write_json(&mut buf, &Response::ShuttingDown { pid: 7 }).unwrap();
        assert_eq!(
            read_json::<_, Response>(&mut &buf[..]).unwrap(),
            Response::ShuttingDown { pid: 7 }
        );
        let mut buf = Vec::new();
        write_json(&mut buf, &Response::Progress { done: 3, total: 9 }).unwrap();
        assert_eq!(
            read_json::<_, Response>(&mut &buf[..]).unwrap(),
            Response::Progress { done: 3, total: 9 }
        );
    }

    #[test]
    fn f32_frames_are_checked_against_the_announced_shape_before_allocating() {
        let mut buf = Vec::new();
        write_f32s(&mut buf, &[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(
            read_f32s_exact(&mut &buf[..], 3).unwrap(),
            vec![1.0, 2.0, 3.0]
        );
        let err = read_f32s_exact(&mut &buf[..], 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A header claiming more than announced is refused without reading on.
        let mut lying = (4000u32).to_le_bytes().to_vec();
        lying.extend_from_slice(&[0; 8]);
        assert_eq!(
            read_f32s_exact(&mut &lying[..], 2).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        // A count whose byte size overflows is refused too.
        assert!(read_f32s_exact(&mut &buf[..], usize::MAX / 2).is_err());
    }

    #[test]
    fn requests_are_split_by_texts_and_bytes() {
        let small: Vec<String> = (0..REQUEST_TEXTS * 2 + 3).map(|i| i.to_string()).collect();
        assert_eq!(
            request_bounds(&small),
            vec![REQUEST_TEXTS, REQUEST_TEXTS * 2, REQUEST_TEXTS * 2 + 3]
        );
        let big = "x".repeat(REQUEST_BYTES / 2 + 1);
        let texts = vec![
            big.clone(),
            big.clone(),
            "y".into(),
            "x".repeat(REQUEST_BYTES * 2),
        ];
        // Two halves do not fit together; a text over the limit travels alone.
        assert_eq!(request_bounds(&texts), vec![1, 3, 4]);
        assert!(request_bounds(&[]).is_empty());
    }

    #[test]
    fn huge_texts_are_cut_on_a_char_boundary_far_beyond_the_cap() {
        let mut t = "é".repeat(10_000); // 2 bytes per char
        assert!(cut_far_beyond(&mut t, 10), "a cut is reported");
        assert!(t.len() <= 10 * MAX_BYTES_PER_TOKEN && t.len() >= 10 * MAX_BYTES_PER_TOKEN - 1);
        assert!(t.chars().all(|c| c == 'é'));
        let mut short = "short".to_string();
        assert!(!cut_far_beyond(&mut short, 10));
        assert_eq!(short, "short");
    }

    #[test]
    fn role_parse() {
        assert_eq!(Role::parse("Query"), Some(Role::Query));
        assert_eq!(Role::parse("document"), Some(Role::Document));
        assert_eq!(Role::parse("banana"), None);
    }
}
