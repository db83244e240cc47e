//! Health, readiness, metrics, the model list, embeddings and search.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, ApiJson};
use super::AppState;
use crate::index::filter::Filter;
use crate::index::{Mode, SearchOptions};

/// Liveness: the process answers.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: models and store loaded (an empty store is ready).
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    match state.services() {
        Ok(_) => (StatusCode::OK, Json(json!({"ready": true}))),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false})),
        ),
    }
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    state.update_gauges();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics().render(),
    )
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// The generator and the embedder, OpenAI style.
pub async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let info = state.services()?.pipeline.engine().info();
    let entry = |id: &str, kind: &str| json!({"id": id, "object": "model", "created": 0, "owned_by": "cited", "kind": kind});
    Ok(Json(json!({
        "object": "list",
        "data": [entry(&info.generator, "generation"), entry(&info.embedder, "embedding")],
    })))
}

/// Resolves a requested model name: absent, `default`, or the exact name.
pub(crate) fn check_model(requested: Option<&str>, actual: &str) -> Result<(), ApiError> {
    match requested {
        None | Some("default") => Ok(()),
        Some(m) if m == actual => Ok(()),
        Some(m) => Err(ApiError::model_not_found(m)),
    }
}

/// Texts per embeddings request.
const MAX_INPUTS: usize = 256;

#[derive(Deserialize)]
pub struct EmbeddingsRequest {
    input: Value,
    model: Option<String>,
    encoding_format: Option<String>,
    #[allow(dead_code)]
    user: Option<String>,
}

/// `POST /v1/embeddings` in the OpenAI shape (`float` or `base64` encoding).
pub async fn embeddings(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<EmbeddingsRequest>,
) -> Result<Json<Value>, ApiError> {
    let services = state.services()?;
    let engine = services.pipeline.engine();
    check_model(req.model.as_deref(), &engine.info().embedder)?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`{other}` is not `float` or `base64`"),
            ))
        }
    };
    let texts: Vec<String> = match req.input {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::invalid(
                    "input",
                    "expected a string or a list of strings (token arrays are not accepted)",
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::invalid(
                "input",
                "expected a string or a list of strings",
            ))
        }
    };
    if texts.is_empty() || texts.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!("between 1 and {MAX_INPUTS} texts are accepted"),
        ));
    }
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        return Err(ApiError::invalid(&format!("input[{i}]"), "empty text"));
    }
    let out = engine.embed(texts).await?;
    let data: Vec<Value> = out
        .vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": engine.info().embedder,
        "usage": {"prompt_tokens": out.tokens, "total_tokens": out.tokens},
    })))
}

/// Largest `top_k` of a search.
pub const MAX_TOP_K: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    query: String,
    top_k: Option<usize>,
    mode: Option<Mode>,
    filters: Option<Value>,
    /// Drop a passage that mostly repeats a better-ranked one (default true), as answers do.
    collapse_near_duplicates: Option<bool>,
}

/// Parses `filters`, naming the offending key.
pub(crate) fn parse_filters(v: Option<&Value>) -> Result<Filter, ApiError> {
    match v {
        None => Ok(Filter::default()),
        Some(v) => Filter::from_json(v).map_err(|e| {
            let field = if e.key == "filters" {
                "filters".to_string()
            } else {
                format!("filters.{}", e.key)
            };
            ApiError::invalid(&field, e.message)
        }),
    }
}

/// A cache salt string as the engine's number (0 is the shared partition of unsalted requests).
pub(crate) fn salt_of(field: &str, salt: Option<&str>) -> Result<u64, ApiError> {
    match salt {
        None => Ok(0),
        Some(s) if s.is_empty() || s.len() > 256 => {
            Err(ApiError::invalid(field, "must be 1 to 256 characters"))
        }
        Some(s) => {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(s, &mut h);
            Ok(std::hash::Hasher::finish(&h) | 1)
        }
    }
}

/// Checks a question or query: 1..=4,000 characters after trimming.
pub(crate) fn check_text(field: &str, text: &str) -> Result<(), ApiError> {
    let n = text.trim().chars().count();
    if n == 0 {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if text.chars().count() > 4000 {
        return Err(ApiError::invalid(field, "must be at most 4,000 characters"));
    }
    Ok(())
}

/// `POST /v1/search`: passages for a query, with their raw scores and citation metadata.
pub async fn search(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<SearchRequest>,
) -> Result<Json<Value>, ApiError> {
    let services = state.services()?;
    check_text("query", &req.query)?;
    let top_k = req.top_k.unwrap_or(10);
    if !(1..=MAX_TOP_K).contains(&top_k) {
        return Err(ApiError::invalid(
            "top_k",
            format!("must be between 1 and {MAX_TOP_K}"),
        ));
    }
    let filter = parse_filters(req.filters.as_ref())?;
    let mode = req.mode.unwrap_or_default();
    let collapse = req.collapse_near_duplicates.unwrap_or(true);
    let opts = SearchOptions {
        // Twice as deep when collapsing, so dropped copies leave room for other passages.
        top_k: if collapse { top_k * 2 } else { top_k },
        mode,
        ..SearchOptions::default()
    };
    let (hits, version) = services.pipeline.search(&req.query, opts, filter).await?;
    let (hits, collapsed) = if collapse {
        let threshold = services.pipeline.config().near_duplicate;
        crate::index::dedup::collapse(hits, threshold, top_k)
    } else {
        (hits, 0)
    };
    Ok(Json(json!({
        "mode": mode,
        "corpus_version": version,
        "hits": hits,
        "near_duplicates_collapsed": collapsed,
    })))
}
