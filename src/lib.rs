//! `cited`: cancer questions answered from retrieved clinical passages, streamed with citations.
//!
//! Layers, each unaware of the ones above it:
//! - [`models`]: the networks (BERT-family embedder, Llama-family generator), their tokenizers and
//!   chat template; pure functions of a [`models::Batch`] and, for generation, a KV cache.
//! - [`ops`]: numerical operations with a CPU reference path (and CUDA twins under `cuda`).
//! - [`ingest`]: readers and the chunker, turning files into embedded chunks.
//! - [`index`]: the SQLite store and the dense and BM25 indexes derived from it; hybrid search.
//! - [`engine`]: drives the models (generation loop; later the batching scheduler).
//! - [`config`]: command-line arguments validated into a [`config::Config`].

pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
pub mod index;
pub mod ingest;
pub mod models;
pub mod ops;
pub mod rag;
pub mod server;
