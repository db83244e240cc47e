//! `POST /v1/chat/completions`, the OpenAI shape that existing clients and load testers speak.
//! Every completion is a cited answer: the last user message is the question, earlier user and
//! assistant turns are the conversation, and client system messages are ignored (the rules of a
//! cited answer are ours). The text carries the `[n]` markers; `sources` and `citations` are added
//! to the non-streamed body. `n` > 1, tools and logprobs are not offered.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self as fstream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::answer::{
    check_max_tokens, gather, history, observe, sampling, MessageBody, SamplingFields,
};
use super::error::{ApiError, ApiJson};
use super::routes::{check_model, check_text, salt_of};
use super::AppState;
use crate::rag::pipeline::{AnswerEvent, AnswerRequest, GroundingMode};

#[derive(Deserialize)]
pub struct ChatRequest {
    model: Option<String>,
    messages: Vec<ChatMessageBody>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
    n: Option<usize>,
    stop: Option<Value>,
    cache_salt: Option<String>,
    /// Our extension: the support check (`off`, `flag`, `withhold`).
    grounding: Option<GroundingMode>,
}

/// Most stop strings a request may give, and their longest length.
const MAX_STOPS: usize = 4;
const MAX_STOP_CHARS: usize = 64;

/// `stop`: a string or a list of up to four non-empty strings.
pub(crate) fn stop_strings(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::invalid("stop", "expected a string or a list of strings"))?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "expected a string or a list of strings",
            ))
        }
    };
    if list.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOPS} strings"),
        ));
    }
    if list
        .iter()
        .any(|s| s.is_empty() || s.chars().count() > MAX_STOP_CHARS)
    {
        return Err(ApiError::invalid(
            "stop",
            format!("each string must have 1 to {MAX_STOP_CHARS} characters"),
        ));
    }
    Ok(list)
}

#[derive(Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub(crate) include_usage: bool,
}

#[derive(Deserialize)]
pub struct ChatMessageBody {
    role: String,
    content: Option<Value>,
}

/// A message's text: a string, or the text parts of a content list.
fn content_text(i: usize, content: Option<&Value>) -> Result<String, ApiError> {
    let field = format!("messages[{i}].content");
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(
                |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                    _ => Err(ApiError::invalid(&field, "only text parts are accepted")),
                },
            )
            .collect::<Result<Vec<_>, _>>()
            .map(|parts| parts.join("\n")),
        _ => Err(ApiError::invalid(
            &field,
            "expected a string or a list of text parts",
        )),
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A unique completion id: `prefix` (`chatcmpl`, `cmpl`), the time and a counter.
pub(crate) fn completion_id(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{prefix}-{nanos:x}{:04x}",
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_reason(reason: &str) -> &'static str {
    if reason == "length" {
        "length"
    } else {
        "stop"
    }
}

pub async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let services = state.services()?;
    let pipeline = services.pipeline.clone();
    let model = pipeline.engine().info().generator.clone();
    check_model(req.model.as_deref(), &model)?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only one choice is generated"));
    }
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let field = if req.max_completion_tokens.is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    check_max_tokens(max_tokens, pipeline.config())
        .map_err(|e| ApiError::invalid(field, e.message))?;
    // System messages are dropped; the rest must end with the user's question.
    let mut turns = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let text = content_text(i, m.content.as_ref())?;
        match m.role.as_str() {
            "system" | "developer" => {}
            "user" | "assistant" => turns.push(MessageBody {
                role: m.role.clone(),
                content: text,
            }),
            other => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("`{other}` is not accepted (system, user or assistant)"),
                ))
            }
        }
    }
    let question = match turns.pop() {
        Some(last) if last.role == "user" => last.content,
        _ => {
            return Err(ApiError::invalid(
                "messages",
                "the last non-system message must be the user's question",
            ))
        }
    };
    check_text("messages", &question)?;
    let request = AnswerRequest {
        question,
        history: history(&turns, "messages")?,
        max_tokens,
        sampling: sampling(SamplingFields {
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            min_p: req.min_p,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            seed: req.seed,
        })?,
        stop: stop_strings(req.stop.as_ref())?,
        cache_salt: salt_of("cache_salt", req.cache_salt.as_deref())?,
        grounding: req.grounding.unwrap_or_default(),
        ..AnswerRequest::default()
    };
    if pipeline.engine().is_busy() {
        return Err(ApiError::busy());
    }
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move { pipeline.answer(request, tx).await });
    let id = completion_id("chatcmpl");
    let created = unix_now();
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        Ok(stream(state.clone(), rx, id, created, model, include_usage).into_response())
    } else {
        collect(&state, rx, id, created, model)
            .await
            .map(|v| Json(v).into_response())
    }
}

fn stream(
    state: AppState,
    rx: mpsc::Receiver<AnswerEvent>,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
) -> impl IntoResponse {
    let chunk = move |delta: Value, finish: Option<&str>| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), None);
    let events = ReceiverStream::new(rx).flat_map(move |event| {
        observe(&state, &event);
        let out: Vec<Value> = match event {
            AnswerEvent::Delta(text) => vec![chunk(json!({"content": text}), None)],
            AnswerEvent::Done(s) => {
                let mut last = chunk(json!({}), Some(finish_reason(&s.finish_reason)));
                if let Some(g) = &s.grounding {
                    last["grounding"] = json!(g);
                }
                let mut v = vec![last];
                if include_usage {
                    let mut u = chunk(json!({}), None);
                    u["choices"] = json!([]);
                    u["usage"] = json!(s.usage);
                    v.push(u);
                }
                v
            }
            AnswerEvent::Error { kind, message } => {
                vec![json!({"error": {"type": kind, "message": message}})]
            }
            AnswerEvent::Sources(_) | AnswerEvent::Citation(_) | AnswerEvent::Support(_) => {
                Vec::new()
            }
        };
        fstream::iter(
            out.into_iter()
                .map(|v| Event::default().data(v.to_string())),
        )
    });
    let all = fstream::once(std::future::ready(Event::default().data(first.to_string())))
        .chain(events)
        .chain(fstream::once(std::future::ready(
            Event::default().data("[DONE]"),
        )))
        .map(Ok::<_, Infallible>);
    Sse::new(all).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

async fn collect(
    state: &AppState,
    rx: mpsc::Receiver<AnswerEvent>,
    id: String,
    created: u64,
    model: String,
) -> Result<Value, ApiError> {
    let c = gather(rx, state).await?;
    Ok(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": finish_reason(&c.summary.finish_reason),
        }],
        "usage": c.summary.usage,
        "sources": c.sources,
        "citations": c.citations,
        "grounding": c.summary.grounding,
    }))
}
