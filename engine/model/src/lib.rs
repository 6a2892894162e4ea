//! kvembed's decoder, everything below "token ids in, hidden states out":
//!
//! * [`arch`]: the architecture table (Llama, Mistral, Qwen2/3, Gemma 3, ...)
//!   that drives one decoder implementation;
//! * [`loader`]: safetensors / GGUF / sharded weights, offline Hugging Face cache;
//! * [`tokenizer`]: the model's tokenizer and its agreement checks;
//! * [`decoder`]: the forward pass, with KV re-routing at chosen layers;
//! * kernels chosen at run time for the CPU found ([`cpu`]): [`matmul`]
//!   (AVX-512 or AVX2 gemm), [`amx`] (bf16 tiles), [`int8`] (int8 products
//!   without AMX: AVX512-VNNI, AVX2), [`attention`], [`fastmath`];
//!   candle's CUDA backend with the `cuda` feature.
//!
//! Depends on nothing else of kvembed except the wire protocol's error kinds.

pub mod amx;
pub mod arch;
pub mod attention;
pub mod cpu;
pub mod decoder;
pub mod encoder;
pub mod error;
pub mod fastmath;
pub mod int8;
pub mod loader;
pub mod matmul;
pub mod parallel;
pub mod tokenizer;

pub use error::{EngineError, Result};
