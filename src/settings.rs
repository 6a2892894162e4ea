//! The `kvembed.*` settings.
//!
//! Two kinds:
//! * what the engine loads (model, device, threads, batch token budget,
//!   engine binary, memory limit): `PGC_SIGHUP`, so only `postgresql.conf` / `ALTER SYSTEM`
//!   (superusers, or roles granted ALTER SYSTEM on them) change them, and the
//!   supervisor restarts the engine after `pg_reload_conf()`;
//! * how a text is embedded (method, layers, bias, prompts, max tokens,
//!   overflow policy): per session, copied into one `EmbedOptions` that
//!   travels with every request.

use kvembed_proto::EmbedOptions;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use std::ffi::{CStr, CString};

pub static MODEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static MODELS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static USE_MODEL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static DEVICE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"cpu"));
pub static THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static BATCH_TOKENS: GucSetting<i32> =
    GucSetting::<i32>::new(kvembed_proto::DEFAULT_BATCH_TOKENS as i32);
pub static ENGINE_PATH: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static ENGINE_MEMORY_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static MAX_TOKENS_LIMIT: GucSetting<i32> =
    GucSetting::<i32>::new(kvembed_proto::DEFAULT_MAX_TOKENS_LIMIT as i32);
pub static DEBUG_FAULTS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static MAX_CALIBRATION_TEXTS: GucSetting<i32> =
    GucSetting::<i32>::new(kvembed_proto::DEFAULT_MAX_CALIBRATION_TEXTS as i32);

pub static METHOD: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static LAYERS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"auto"));
pub static BIAS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static SPACE_CALIBRATION: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static PROFILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
pub static DOCUMENT_PROMPT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));
pub static QUERY_PROMPT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c""));
pub static MAX_TOKENS: GucSetting<i32> =
    GucSetting::<i32>::new(kvembed_proto::DEFAULT_MAX_TOKENS as i32);
pub static ON_OVERFLOW: GucSetting<Overflow> = GucSetting::<Overflow>::new(Overflow::Truncate);
pub static START_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(120);
pub static ENGINE_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(600);

/// What to do with a text longer than `kvembed.max_tokens`.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Overflow {
    /// Keep the first `max_tokens` tokens and raise a NOTICE.
    #[name = c"truncate"]
    Truncate,
    /// Fail the statement (SQLSTATE 54000).
    #[name = c"error"]
    Error,
}

pub fn define() {
    use GucContext::{Sighup, Userset};
    let none = GucFlags::default();

    GucRegistry::define_string_guc(
        c"kvembed.model",
        c"Model the engine loads: a GGUF file, a Hugging Face model directory, or a repo id in the local Hugging Face cache.",
        c"One engine per cluster serves it (and kvembed.models). Changing it (ALTER SYSTEM + pg_reload_conf()) restarts the engine.",
        &MODEL,
        Sighup,
        none,
    );
    GucRegistry::define_string_guc(
        c"kvembed.models",
        c"More models the engine serves beside kvembed.model: a comma-separated list of name=model (or model, named after its file or directory).",
        c"Sessions choose one with kvembed.use_model, profiles by the model they were made with. Each model takes its own memory; one that fails to load fails alone. Changing the list restarts the engine.",
        &MODELS,
        Sighup,
        none,
    );
    GucRegistry::define_string_guc(
        c"kvembed.device",
        c"Device the engine runs on: cpu, cuda, cuda:N or auto.",
        c"",
        &DEVICE,
        Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"kvembed.threads",
        c"Compute threads of the engine (0 = all cores).",
        c"",
        &THREADS,
        0,
        4096,
        Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"kvembed.batch_tokens",
        c"Token budget of one engine batch; requests from concurrent sessions are packed together up to it.",
        c"",
        &BATCH_TOKENS,
        16,
        1 << 24,
        Sighup,
        none,
    );
    GucRegistry::define_string_guc(
        c"kvembed.engine_path",
        c"The kvembed engine binary (empty = the kvembed binary next to the postgres executable).",
        c"",
        &ENGINE_PATH,
        Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"kvembed.engine_memory_limit",
        c"Address-space limit of the engine process (0 = none).",
        c"Applied with setrlimit(RLIMIT_AS) when the engine starts: a model that does not fit fails to load \
          with an error instead of pushing the host into the out-of-memory killer.",
        &ENGINE_MEMORY_LIMIT,
        0,
        i32::MAX,
        Sighup,
        GucFlags::UNIT_MB,
    );

    GucRegistry::define_int_guc(
        c"kvembed.max_tokens_limit",
        c"Ceiling on the tokens of one text for every session: kvembed.max_tokens above it counts as this (also capped at the model's trained context).",
        c"What one text may cost the shared engine is the administrator's choice, not the session's: \
          a longer text is truncated to this many tokens with a NOTICE (or refused where kvembed.on_overflow = 'error').",
        &MAX_TOKENS_LIMIT,
        1,
        1 << 20,
        Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"kvembed.max_calibration_texts",
        c"Ceiling on the sample of one kv_select_layers() call (TwoNN keeps N^2/2 distances per layer in the engine).",
        c"",
        &MAX_CALIBRATION_TEXTS,
        8,
        1 << 20,
        Sighup,
        none,
    );

    GucRegistry::define_bool_guc(
        c"kvembed.debug_faults",
        c"Lets superusers inject faults into the engine with kv_debug_fault() (for reliability tests; off in production).",
        c"The engine is started with --allow-faults only while this is on; otherwise it refuses fault requests.",
        &DEBUG_FAULTS,
        Sighup,
        GucFlags::SUPERUSER_ONLY,
    );

    GucRegistry::define_string_guc(
        c"kvembed.method",
        c"Embedding method (empty = the engine's default, kv).",
        c"",
        &METHOD,
        Userset,
        none,
    );
    GucRegistry::define_string_guc(
        c"kvembed.layers",
        c"Layers to re-route: auto (the stored calibration, else the method's default), default, or a list such as 6,7,8.",
        c"",
        &LAYERS,
        Userset,
        none,
    );
    GucRegistry::define_string_guc(
        c"kvembed.use_model",
        c"Which of the engine's models this session embeds with, by name (kv_models() lists them; empty = kvembed.model).",
        c"",
        &USE_MODEL,
        Userset,
        none,
    );
    GucRegistry::define_string_guc(
        c"kvembed.profile",
        c"The embedding profile (kv_create_profile) kv_embed uses when none is named (empty = this session's kvembed.* settings).",
        c"",
        &PROFILE,
        Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"kvembed.space_calibration",
        c"Apply the stored corpus calibration of the space (kv_select_layers) while kvembed.layers = auto and the session's method, bias and document prompt are the ones it was fitted for.",
        c"",
        &SPACE_CALIBRATION,
        Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"kvembed.bias",
        c"Additive logit bias on the re-routed key/value (empty = the model's default).",
        c"",
        &BIAS,
        Userset,
        none,
    );
    GucRegistry::define_string_guc(
        c"kvembed.document_prompt",
        c"Prompt template for documents; must contain {text} (empty = the model's default).",
        c"",
        &DOCUMENT_PROMPT,
        Userset,
        none,
    );
    GucRegistry::define_string_guc(
        c"kvembed.query_prompt",
        c"Prompt template for queries; must contain {text} (empty = the model's default).",
        c"",
        &QUERY_PROMPT,
        Userset,
        none,
    );
    GucRegistry::define_int_guc(
        c"kvembed.max_tokens",
        c"Maximum tokens of one text, prompt excluded (0 = the model's limit).",
        c"",
        &MAX_TOKENS,
        0,
        1 << 20,
        Userset,
        none,
    );
    GucRegistry::define_enum_guc(
        c"kvembed.on_overflow",
        c"Texts longer than kvembed.max_tokens: truncate (with a NOTICE) or error.",
        c"",
        &ON_OVERFLOW,
        Userset,
        none,
    );
    GucRegistry::define_int_guc(
        c"kvembed.start_timeout",
        c"How long a statement waits for the engine to start or load its model.",
        c"",
        &START_TIMEOUT,
        1,
        24 * 3600,
        Userset,
        GucFlags::UNIT_S,
    );

    GucRegistry::define_int_guc(
        c"kvembed.engine_timeout",
        c"How long a statement waits without a word from the engine before it fails (0 = no limit).",
        c"A wedged engine (stopped, deadlocked, swapping) would otherwise hold the statement, and the row locks \
          of a generated-column INSERT, until statement_timeout, which is off by default. The engine answers \
          each request of at most 256 texts, and reports a layer selection's progress after every batch.",
        &ENGINE_TIMEOUT,
        0,
        24 * 3600,
        Userset,
        GucFlags::UNIT_S,
    );

    // SAFETY: plain call into PostgreSQL with a static C string; from now on
    // an unknown `kvembed.*` name is an error instead of a silent placeholder.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"kvembed".as_ptr()) };
}

fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn non_empty(setting: &GucSetting<Option<CString>>) -> Option<String> {
    let s = string(setting);
    (!s.trim().is_empty()).then_some(s)
}

pub fn model() -> String {
    string(&MODEL)
}

/// The model `kvembed.use_model` names, `None` for the first (kvembed.model).
pub fn use_model() -> Option<String> {
    non_empty(&USE_MODEL).map(|m| m.trim().to_string())
}

/// What the supervisor passes to `kvembed serve`; a change restarts the engine.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EngineSettings {
    pub engine_path: String,
    pub model: String,
    /// `kvembed.models`, as written.
    pub models: String,
    pub device: String,
    pub threads: i32,
    pub batch_tokens: i32,
    /// Address-space limit of the engine in MB (0 = none).
    pub memory_limit_mb: i32,
    /// Ceiling on the tokens of one text (`kvembed.max_tokens_limit`).
    pub max_tokens_limit: i32,
    /// Ceiling on the texts of one layer selection.
    pub max_calibration_texts: i32,
    /// Whether the engine honours fault injection (`kvembed.debug_faults`).
    pub allow_faults: bool,
}

impl EngineSettings {
    pub fn current() -> EngineSettings {
        EngineSettings {
            engine_path: non_empty(&ENGINE_PATH).unwrap_or_else(default_engine_path),
            model: string(&MODEL),
            models: string(&MODELS),
            device: non_empty(&DEVICE).unwrap_or_else(|| "cpu".into()),
            threads: THREADS.get(),
            batch_tokens: BATCH_TOKENS.get(),
            memory_limit_mb: ENGINE_MEMORY_LIMIT.get(),
            max_tokens_limit: MAX_TOKENS_LIMIT.get(),
            max_calibration_texts: MAX_CALIBRATION_TEXTS.get(),
            allow_faults: DEBUG_FAULTS.get(),
        }
    }
}

/// `kvembed` next to the `postgres` executable (where the install scripts put it).
fn default_engine_path() -> String {
    // SAFETY: my_exec_path is a NUL-terminated buffer PostgreSQL fills at startup.
    let exec =
        unsafe { CStr::from_ptr((&raw const pg_sys::my_exec_path).cast::<std::ffi::c_char>()) };
    let exec = std::path::PathBuf::from(exec.to_string_lossy().into_owned());
    exec.with_file_name("kvembed")
        .to_string_lossy()
        .into_owned()
}

/// How `kvembed.layers` resolves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerChoice {
    /// The stored calibration for the loaded model, else the method's default.
    Auto,
    /// The method's default window, ignoring any calibration.
    Default,
    Explicit(Vec<usize>),
}

/// The profile `kvembed.profile` names, if any.
pub fn profile() -> Option<String> {
    non_empty(&PROFILE).map(|p| p.trim().to_string())
}

/// Whether `kvembed.space_calibration` is on.
pub fn space_calibration() -> bool {
    SPACE_CALIBRATION.get()
}

pub fn layers() -> LayerChoice {
    parse_layers(&string(&LAYERS))
        .unwrap_or_else(|reason| invalid_setting("kvembed.layers", &string(&LAYERS), &reason))
}

fn parse_layers(s: &str) -> Result<LayerChoice, String> {
    let s = s.trim();
    match s.to_ascii_lowercase().as_str() {
        "" | "auto" => return Ok(LayerChoice::Auto),
        "default" => return Ok(LayerChoice::Default),
        _ => {}
    }
    // The one grammar of layer lists (kvembed_proto::parse_layer_list); an
    // empty list names the keywords too.
    kvembed_proto::parse_layer_list(s)
        .map(LayerChoice::Explicit)
        .map_err(|e| match e.strip_prefix("expected ") {
            Some(rest) => format!("expected auto, default, or {rest}"),
            None => e,
        })
}

fn bias() -> Option<f32> {
    let s = non_empty(&BIAS)?;
    if s.trim().eq_ignore_ascii_case("default") {
        return None;
    }
    match s.trim().parse::<f32>() {
        Ok(v) if v.is_finite() => Some(v),
        _ => invalid_setting(
            "kvembed.bias",
            &s,
            "expected a finite number, or empty for the model's default",
        ),
    }
}

fn prompt(setting: &GucSetting<Option<CString>>, name: &str) -> Option<String> {
    let p = non_empty(setting)?;
    // A prompt ensemble: every template of the set needs the placeholder.
    if !p.split("{+}").all(|t| t.contains("{text}")) {
        invalid_setting(name, &p, "a prompt template must contain {text}");
    }
    Some(p)
}

/// Whether the session asked for more tokens per text than the
/// administrator allows (its texts are cut at the limit instead).
pub fn max_tokens_over_limit() -> Option<(i32, i32)> {
    let (asked, limit) = (MAX_TOKENS.get(), MAX_TOKENS_LIMIT.get());
    (asked > limit).then_some((asked, limit))
}

pub fn overflow() -> Overflow {
    ON_OVERFLOW.get()
}

/// `None`: wait for the engine as long as it takes.
pub fn engine_timeout() -> Option<std::time::Duration> {
    match ENGINE_TIMEOUT.get() {
        n if n > 0 => Some(std::time::Duration::from_secs(n as u64)),
        _ => None,
    }
}

pub fn start_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(START_TIMEOUT.get().max(1) as u64)
}

/// The session's settings as one request options struct. `layers` is
/// resolved by the caller (it may need the stored calibration).
pub fn embed_options(layers: Option<Vec<usize>>) -> EmbedOptions {
    EmbedOptions {
        method: non_empty(&METHOD).map(|m| m.trim().to_string()),
        layers,
        bias: bias(),
        document_prompt: prompt(&DOCUMENT_PROMPT, "kvembed.document_prompt"),
        query_prompt: prompt(&QUERY_PROMPT, "kvembed.query_prompt"),
        // The session's choice, never above the administrator's ceiling
        // (the engine applies the same ceiling to whatever it is sent).
        max_tokens: match MAX_TOKENS.get() {
            n if n > 0 => Some(n.min(MAX_TOKENS_LIMIT.get()) as usize),
            _ => None,
        },
        truncate: Some(overflow() == Overflow::Truncate),
        model: use_model(),
        ..Default::default()
    }
}

fn invalid_setting(name: &str, value: &str, reason: &str) -> ! {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("invalid value for {name}: '{value}'"),
        "kvembed",
    )
    .set_detail(reason.to_string())
    .report(PgLogLevel::ERROR);
    unreachable!()
}
