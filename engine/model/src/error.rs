use kvembed_proto::ErrorKind;
use std::path::PathBuf;

/// Errors of the engine, each carrying the context the user needs (which
/// file, which setting, which text).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file or directory not found: {path}")]
    NotFound { path: PathBuf },

    #[error("'{path}' is not a model: {reason}")]
    NotAModel { path: PathBuf, reason: String },

    #[error("corrupt or truncated model file '{path}': {reason}")]
    Corrupt { path: PathBuf, reason: String },

    #[error("unsupported architecture '{arch}' in '{path}' (supported: the decoders llama, mistral, qwen2, qwen3, gemma3 and the encoder bert)")]
    UnsupportedArch { arch: String, path: PathBuf },

    #[error("tokenizer does not match the weights: {0}")]
    TokenizerMismatch(String),

    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    #[error("Hugging Face repo '{repo}' is not in the local cache ({cache}); kvembed never downloads at run time")]
    NotCached { repo: String, cache: String },

    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },

    #[error("text {index} has {tokens} tokens, more than max_tokens = {max} (enable truncation or raise the limit)")]
    TooLong {
        index: usize,
        tokens: usize,
        max: usize,
    },

    /// The work was stopped between forward passes: everyone waiting for it
    /// went away (cancelled statements).
    #[error("cancelled: {0}")]
    Cancelled(String),

    /// Memory or threads ran out while loading.
    #[error("{0}")]
    OutOfResources(String),

    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("I/O error on '{path}': {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        EngineError::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }

    /// The protocol class of this error (mapped to a SQLSTATE by the extension).
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Invalid { .. } => ErrorKind::InvalidInput,
            EngineError::TooLong { .. } => ErrorKind::TooLong,
            EngineError::NotFound { .. }
            | EngineError::NotAModel { .. }
            | EngineError::Corrupt { .. }
            | EngineError::UnsupportedArch { .. }
            | EngineError::TokenizerMismatch(_)
            | EngineError::NotCached { .. }
            | EngineError::OutOfResources(_) => ErrorKind::ModelLoad,
            _ => ErrorKind::Internal,
        }
    }
}
