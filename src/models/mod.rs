//! The networks cited runs, one file per architecture, plus what turns text into their input.
//!
//! Every model takes a flat [`Batch`]: packed token ids, positions and sequence boundaries, no
//! padding. Models are immutable after loading; per-sequence state (the KV cache) is owned by the
//! caller.

pub mod batch;
pub mod bert;
pub mod chat_template;
pub mod decode_graph;
pub mod gguf;
pub mod kv_blocks;
pub mod kv_cache;
pub mod llama;
pub mod reranker;
pub mod tokenizer;

pub use batch::{Batch, LogitsAt};

/// Result type of the models layer.
pub type Result<T> = std::result::Result<T, crate::error::ModelError>;
