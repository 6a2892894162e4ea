//! kvembed engine: training-free text embeddings from frozen decoder-only LLMs
//! with KV-Embedding (re-routing the final token's key/value as a prefix at a
//! few selected layers). Pure Rust, no PostgreSQL.
//!
//! Data flows one way: texts → prompts → tokenizer → batches by token budget →
//! decoder (with re-routing) → pooling → L2-normalised vectors.

pub mod error;
pub mod arch;
pub mod loader;
pub mod tokenizer;
pub mod cpu;
pub mod matmul;
pub mod amx;
pub mod attention;
pub mod fastmath;
pub mod decoder;
pub mod method;
pub mod embedder;
pub mod twonn;
pub mod eval;
pub mod npy;
pub mod server;

pub use error::{EngineError, Result};
pub use embedder::{Embedder, EmbedOutput, LoadSpec, ModelInfo};
pub use kvembed_proto as proto;
