//! `POST /v1/answer`: a cited answer, streamed as server-sent events (`sources`, `delta`,
//! `citation`, `done`, `error`, with keep-alive comments while the answer waits) or, with
//! `stream: false`, returned as one JSON body holding the same information.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::error::{ApiError, ApiJson};
use super::routes::{check_text, parse_filters, salt_of};
use super::AppState;
use crate::models::chat_template::{ChatMessage, Role};
use crate::ops::sampling::SamplingParams;
use crate::rag::pipeline::{AnswerEvent, AnswerRequest, AnswerSummary};
use crate::rag::template::AnswerShape;
use crate::rag::{Audience, GroundingMode, RagConfig};

/// Most passages an answer may ask for.
pub const MAX_TOP_K: usize = 20;
/// Most earlier turns a follow-up may carry.
pub const MAX_MESSAGES: usize = 32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerBody {
    question: String,
    top_k: Option<usize>,
    filters: Option<Value>,
    audience: Option<Audience>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
    stream: Option<bool>,
    messages: Option<Vec<MessageBody>>,
    cache_salt: Option<String>,
    grounding: Option<GroundingMode>,
    shape: Option<AnswerShape>,
}

#[derive(Deserialize, Clone)]
pub struct MessageBody {
    pub role: String,
    pub content: String,
}

/// Sampling fields a request may carry.
#[derive(Default, Clone, Copy)]
pub(crate) struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<u64>,
}

/// Sampling settings from request fields, each range checked and named.
pub(crate) fn sampling(f: SamplingFields) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let p = SamplingParams {
        temperature: f.temperature.unwrap_or(d.temperature),
        top_p: f.top_p.unwrap_or(d.top_p),
        top_k: f.top_k.unwrap_or(d.top_k),
        min_p: f.min_p.unwrap_or(d.min_p),
        presence_penalty: f.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: f.frequency_penalty.unwrap_or(d.frequency_penalty),
        seed: f.seed.unwrap_or(d.seed),
        repetition_penalty: d.repetition_penalty,
    };
    p.validate()
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    Ok(p)
}

pub(crate) fn check_max_tokens(max_tokens: Option<usize>, cfg: &RagConfig) -> Result<(), ApiError> {
    match max_tokens {
        Some(n) if n == 0 || n > cfg.max_tokens => Err(ApiError::invalid(
            "max_tokens",
            format!("must be between 1 and {}", cfg.max_tokens),
        )),
        _ => Ok(()),
    }
}

/// Earlier turns: `user` and `assistant` only, each non-empty.
pub(crate) fn history(messages: &[MessageBody], field: &str) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(
            field,
            format!("at most {MAX_MESSAGES} messages"),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(ApiError::invalid(
                        &format!("{field}[{i}].role"),
                        format!("`{other}` is not `user` or `assistant`"),
                    ))
                }
            };
            check_text(&format!("{field}[{i}].content"), &m.content)?;
            Ok(ChatMessage::new(role, m.content.clone()))
        })
        .collect()
}

pub async fn answer(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<AnswerBody>,
) -> Result<Response, ApiError> {
    let services = state.services()?;
    let pipeline = services.pipeline.clone();
    check_text("question", &body.question)?;
    if let Some(k) = body.top_k {
        if !(1..=MAX_TOP_K).contains(&k) {
            return Err(ApiError::invalid(
                "top_k",
                format!("must be between 1 and {MAX_TOP_K}"),
            ));
        }
    }
    check_max_tokens(body.max_tokens, pipeline.config())?;
    let request = AnswerRequest {
        question: body.question,
        history: history(body.messages.as_deref().unwrap_or(&[]), "messages")?,
        top_k: body.top_k,
        filter: parse_filters(body.filters.as_ref())?,
        audience: body.audience.unwrap_or_default(),
        max_tokens: body.max_tokens,
        sampling: sampling(SamplingFields {
            temperature: body.temperature,
            top_p: body.top_p,
            min_p: body.min_p,
            presence_penalty: body.presence_penalty,
            frequency_penalty: body.frequency_penalty,
            seed: body.seed,
            ..SamplingFields::default()
        })?,
        suppress: Vec::new(),
        cache_salt: salt_of("cache_salt", body.cache_salt.as_deref())?,
        stop: Vec::new(),
        grounding: body.grounding.unwrap_or_default(),
        shape: body.shape.unwrap_or_default(),
    };
    if pipeline.engine().is_busy() {
        return Err(ApiError::busy());
    }
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move { pipeline.answer(request, tx).await });
    let metrics_state = state.clone();
    if body.stream.unwrap_or(true) {
        let stream = ReceiverStream::new(rx).map(move |event| {
            observe(&metrics_state, &event);
            Ok::<_, Infallible>(sse_event(&event))
        });
        let sse = Sse::new(stream).keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(10))
                .text("keep-alive"),
        );
        Ok((
            [
                (header::CACHE_CONTROL, "no-cache"),
                (header::HeaderName::from_static("x-accel-buffering"), "no"),
            ],
            sse,
        )
            .into_response())
    } else {
        collect(rx, &state).await.map(|v| Json(v).into_response())
    }
}

/// Metrics from the events as they pass (counts and timings only).
pub(crate) fn observe(state: &AppState, event: &AnswerEvent) {
    let m = state.metrics();
    match event {
        AnswerEvent::Done(s) => {
            m.answers_total
                .with_label_values(&[s.finish_reason.as_str()])
                .inc();
            if let Some(t) = s.timings.first_token_ms {
                m.answer_first_token_seconds.observe(t / 1e3);
            }
            m.answer_duration_seconds.observe(s.timings.total_ms / 1e3);
            m.citations_total.inc_by(s.citations.total as u64);
            m.citations_dropped_total.inc_by(s.citations.dropped as u64);
        }
        AnswerEvent::Error { .. } => m.answers_total.with_label_values(&["error"]).inc(),
        _ => {}
    }
}

fn sse_event(event: &AnswerEvent) -> Event {
    let (name, data) = match event {
        AnswerEvent::Sources(sources) => ("sources", json!({"sources": sources})),
        AnswerEvent::Delta(text) => ("delta", json!({"text": text})),
        AnswerEvent::Citation(c) => ("citation", json!(c)),
        AnswerEvent::Support(s) => ("support", json!(s)),
        AnswerEvent::Done(summary) => ("done", json!(summary)),
        AnswerEvent::Error { kind, message } => (
            "error",
            json!({"error": {"type": kind, "message": message}}),
        ),
    };
    Event::default().event(name).data(data.to_string())
}

/// An answer gathered from its events.
pub(crate) struct Collected {
    pub text: String,
    pub sources: Value,
    pub citations: Vec<Value>,
    pub summary: Box<AnswerSummary>,
}

/// Gathers every event of an answer; an `error` event becomes the matching error response.
pub(crate) async fn gather(
    mut rx: mpsc::Receiver<AnswerEvent>,
    state: &AppState,
) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut sources = Value::Array(Vec::new());
    let mut citations = Vec::new();
    while let Some(event) = rx.recv().await {
        observe(state, &event);
        match event {
            AnswerEvent::Sources(s) => sources = json!(s),
            AnswerEvent::Delta(t) => text.push_str(&t),
            AnswerEvent::Citation(c) => citations.push(json!(c)),
            AnswerEvent::Support(_) => {}
            AnswerEvent::Done(summary) => {
                return Ok(Collected {
                    text,
                    sources,
                    citations,
                    summary,
                })
            }
            AnswerEvent::Error { kind, message } => {
                return Err(match kind {
                    "invalid_request" => {
                        ApiError::new(axum::http::StatusCode::UNPROCESSABLE_ENTITY, kind, message)
                    }
                    "overloaded" => ApiError::busy(),
                    _ => {
                        ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, kind, message)
                    }
                })
            }
        }
    }
    Err(ApiError::internal("the answer ended without a summary"))
}

/// The whole answer as one JSON body.
async fn collect(rx: mpsc::Receiver<AnswerEvent>, state: &AppState) -> Result<Value, ApiError> {
    let c = gather(rx, state).await?;
    let mut body = json!(c.summary);
    body["answer"] = json!(c.text);
    body["sources"] = c.sources;
    body["citations"] = json!(c.citations);
    Ok(body)
}
