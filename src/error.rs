//! Error types, one per layer, linked with `#[from]`.

use std::path::PathBuf;

/// Failures while loading or running a model, its tokenizer or its chat template.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid JSON in {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("GGUF file: {0}")]
    Gguf(String),
    #[error("chat template: {0}")]
    Template(#[from] minijinja::Error),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error(transparent)]
    Ops(#[from] OpsError),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tokenizer(err: impl std::fmt::Display) -> Self {
        Self::Tokenizer(err.to_string())
    }
}

/// Reads and parses a JSON file into `T`, naming the file in any error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Failures of an operation in `ops`: inputs of the wrong shape or on the wrong device, or a
/// failing device.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("shape: {0}")]
    Shape(String),
    #[error("{0}")]
    Invalid(String),
    #[error("device: {0}")]
    Device(String),
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Failures reading or chunking documents.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

impl IngestError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Failures of the corpus store and its derived indexes.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("store database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("BM25 index: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the store at {path} has schema version {found}; this cited knows up to {known}")]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("the store was embedded with {stored}; the configured embedder is {configured} (use another --data-dir, or re-ingest)")]
    EmbedderMismatch { stored: String, configured: String },
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Invalid(String),
}

/// Failures of the engine (the device worker and what it runs).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the engine has stopped")]
    Stopped,
    #[error("too many requests are waiting; retry shortly")]
    Busy,
}
