//! kvembed core: training-free text embeddings from frozen decoder-only LLMs
//! with KV-Embedding (re-routing the final token's key/value as a prefix at a
//! few selected layers). Pure Rust, no PostgreSQL.
//!
//! Data flows one way: texts → prompts ([`method`]) → tokenizer → batches by
//! token budget ([`embedder`]) → decoder with re-routing ([`kvembed_model`]) →
//! pooling → L2-normalised vectors. [`twonn`] chooses the re-routed layers
//! by intrinsic dimension; [`space`] fits the corpus calibration of the
//! embedding space.

pub mod agreement;
pub mod chunk;
pub mod embedder;
pub mod method;
pub mod native;
pub mod space;
pub mod twonn;

pub use embedder::{EmbedOutput, Embedder, LoadSpec, ModelInfo};
pub use kvembed_model as model;
pub use kvembed_model::{EngineError, Result};
pub use kvembed_proto as proto;
