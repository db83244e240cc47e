//! The HTTP front end (axum): cited answers as server-sent events, search, embeddings, the
//! OpenAI-compatible endpoints, health, readiness and metrics. No tensors here: requests become
//! typed values at the edge and go to the [`Pipeline`] and the engine handle.
//!
//! The port opens at once; models and store load in the background, and `/ready` says when they
//! are in. Every error has the body `{"error": {"type", "message"}}` ([`error`]).

pub mod answer;
pub mod completions;
pub mod documents;
pub mod error;
pub mod metrics;
pub mod openai;
pub mod routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use candle_core::Device;

use crate::engine::worker::{
    load_dummy_generator, load_generator, EngineConfig, EngineHandle, EngineInfo,
};
use crate::error::{EngineError, IndexError, ModelError};
use crate::index::store::Store;
use crate::index::Corpus;
use crate::models::bert::Embedder;
use crate::models::llama::QuantMode;
use crate::models::reranker::CrossEncoder;
use crate::rag::{Pipeline, RagConfig};
use error::ApiError;
use metrics::Metrics;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What the server loads.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub embedder: PathBuf,
    pub generator: PathBuf,
    pub device: Device,
    pub weights: QuantMode,
    pub data_dir: PathBuf,
    pub rag: RagConfig,
    pub engine: EngineConfig,
    /// Serve `/v1/completions` (plain generation, no retrieval, no citations) for load tests.
    pub completions: bool,
    /// With `Some(tokenizer GGUF)`, `generator` is a `config.json` and the weights are dummy
    /// (seeded random, for benchmarks at real shapes).
    pub dummy_tokenizer: Option<PathBuf>,
    /// The bearer token `POST`/`DELETE /v1/documents` need; without one they are refused.
    pub admin_token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// The loaded models and corpus.
pub struct Services {
    pub pipeline: Pipeline,
    pub corpus: Arc<Mutex<Corpus>>,
    /// Whether `/v1/completions` is on.
    pub completions: bool,
    /// The embedder's tokenizer and identity, for chunking documents uploaded over HTTP.
    pub embedder_text: crate::models::bert::EmbedderText,
    /// Held by an HTTP ingest or delete from start to finish: one writer at a time.
    pub ingest_lock: tokio::sync::Mutex<()>,
    pub admin_token: Option<String>,
}

impl Services {
    /// Loads the embedder, the generator and the corpus, and starts the device worker.
    pub fn load(cfg: &ServiceConfig) -> Result<Self, LoadError> {
        let embedder = Embedder::load(&cfg.embedder, &cfg.device)?;
        let (model, text) = match &cfg.dummy_tokenizer {
            None => load_generator(&cfg.generator, &cfg.device, cfg.weights)?,
            Some(t) => load_dummy_generator(&cfg.generator, t, &cfg.device, cfg.weights)?,
        };
        let corpus = Corpus::open(&cfg.data_dir)?;
        let info = EngineInfo {
            embedder: model_name(&cfg.embedder),
            generator: model_name(&cfg.generator),
        };
        let embedder_text = embedder.text_side();
        let engine = EngineHandle::start(embedder, model, text, info, cfg.engine)?;
        let corpus = Arc::new(Mutex::new(corpus));
        let mut pipeline = Pipeline::new(engine, corpus.clone(), cfg.rag.clone());
        if let Some(dir) = &cfg.rag.reranker {
            // On the CPU in f32: a few dozen pairs per question.
            let reranker = CrossEncoder::load(dir, &Device::Cpu)?;
            pipeline = pipeline.with_reranker(Arc::new(reranker));
        }
        Ok(Self {
            pipeline,
            corpus,
            completions: cfg.completions,
            embedder_text,
            ingest_lock: tokio::sync::Mutex::new(()),
            admin_token: cfg.admin_token.clone().filter(|t| !t.is_empty()),
        })
    }
}

/// A model's public name: its file or folder name without the extension.
pub fn model_name(path: &std::path::Path) -> String {
    let name = if path.extension().is_some_and(|e| e == "gguf") {
        path.file_stem()
    } else {
        path.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    services: OnceLock<Services>,
    metrics: Metrics,
}

impl Default for AppState {
    fn default() -> Self {
        Self::new()
    }
}

impl AppState {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                services: OnceLock::new(),
                metrics: Metrics::new(),
            }),
        }
    }

    /// Installs the loaded services; the server is ready from now on.
    pub fn set_services(&self, services: Services) {
        if self.inner.services.set(services).is_ok() {
            self.inner.metrics.ready.set(1);
        }
    }

    pub fn services(&self) -> Result<&Services, ApiError> {
        self.inner.services.get().ok_or_else(ApiError::not_ready)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Refreshes the corpus gauges (called when metrics are scraped).
    fn update_gauges(&self) {
        if let Some(s) = self.inner.services.get() {
            self.inner.metrics.sync_engine(s.pipeline.engine().stats());
            if let Ok(corpus) = s.corpus.try_lock() {
                if let Ok((docs, chunks)) = corpus.store().counts() {
                    self.inner.metrics.corpus_documents.set(docs as i64);
                    self.inner.metrics.corpus_chunks.set(chunks as i64);
                }
            }
        }
    }
}

/// The router with every route, the body limit and request metrics.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .route("/v1/models", get(routes::models))
        .route("/v1/embeddings", post(routes::embeddings))
        .route("/v1/search", post(routes::search))
        .route(
            "/v1/documents",
            get(documents::list)
                .post(documents::upload)
                .layer(DefaultBodyLimit::max(documents::MAX_UPLOAD_BYTES)),
        )
        .route(
            "/v1/documents/{*id}",
            get(documents::get_one).delete(documents::delete),
        )
        .route("/v1/answer", post(answer::answer))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(axum::middleware::from_fn(refuse_oversized))
        .layer(axum::middleware::from_fn_with_state(state.clone(), record))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// How much of an oversized body is read and dropped before the 413 goes out. A server that
/// answers and closes while the client is still sending resets the connection, and the client
/// then sees a broken connection instead of the error; past this much it does anyway.
const DRAIN_BYTES: usize = 16 << 20;

/// Answers 413 to a body whose declared length is over its route's limit, after reading and
/// dropping what was sent (up to `DRAIN_BYTES`), so the client receives the error. Bodies
/// without a length are held to the limit while they are read.
async fn refuse_oversized(req: Request, next: Next) -> Response {
    let limit = if req.method() == axum::http::Method::POST && req.uri().path() == "/v1/documents" {
        documents::MAX_UPLOAD_BYTES
    } else {
        MAX_BODY_BYTES
    };
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => {
            if n <= DRAIN_BYTES as u64 {
                // The result does not matter: the answer is 413 whatever arrives.
                let _ = axum::body::to_bytes(req.into_body(), DRAIN_BYTES).await;
            }
            axum::response::IntoResponse::into_response(ApiError::too_large())
        }
        _ => next.run(req).await,
    }
}

/// Counts each request by route and status and times it to the response head.
async fn record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(req).await;
    let m = state.metrics();
    m.http_requests_total
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    m.http_request_duration_seconds
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Binds `addr`, loads the services in the background and serves until SIGTERM or Ctrl-C, then
/// lets open streams finish.
pub async fn serve(addr: SocketAddr, cfg: ServiceConfig) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let state = AppState::new();
    let loading = state.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        match Services::load(&cfg) {
            Ok(services) => {
                loading.set_services(services);
                tracing::info!(
                    seconds = started.elapsed().as_secs_f64(),
                    "models and corpus loaded; ready"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "loading failed; the server stays not ready");
            }
        }
    });
    tracing::info!("listening on http://{local}");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down; finishing open streams");
}
