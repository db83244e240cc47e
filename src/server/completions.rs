//! `POST /v1/completions` (OpenAI's text-completion shape): plain generation from a prompt,
//! without retrieval and without citations. Off unless the server runs with `--completions`:
//! it exists so load testers can drive the engine with the same raw prompts they send other
//! servers (with `logprobs`, the model's log-probability of each token and its alternatives), and
//! it is no way to ask clinical questions (those go to `/v1/answer` or
//! `/v1/chat/completions`, which answer from the corpus with citations).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self as fstream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::answer::{sampling, SamplingFields};
use super::error::{ApiError, ApiJson};
use super::openai::{completion_id, stop_strings, unix_now, StreamOptions};
use super::routes::{check_model, salt_of};
use super::AppState;
use crate::engine::generate::StopReason;
use crate::engine::worker::{GenerateEvent, GenerateRequest, GenerationStats, TokenLogprob};

/// Longest prompt accepted, in characters (the token limit is the model's context).
const MAX_PROMPT_CHARS: usize = 200_000;

#[derive(Deserialize)]
pub struct CompletionRequest {
    model: Option<String>,
    prompt: Value,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<Value>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<usize>,
    /// Generate `max_tokens` tokens whatever the model's end of turn (load tests).
    #[serde(default)]
    ignore_eos: bool,
    /// Prefix-cache partition (a tenant or patient id); requests with different salts never
    /// share cached prompt blocks.
    cache_salt: Option<String>,
    /// Log-probability of each generated token and of this many alternatives (0 to 20).
    logprobs: Option<usize>,
}

/// OpenAI's legacy `logprobs` object for a run of tokens.
fn logprobs_json(entries: &[TokenLogprob]) -> Value {
    json!({
        "tokens": entries.iter().map(|e| e.text.as_str()).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "top_logprobs": entries
            .iter()
            .map(|e| {
                e.top
                    .iter()
                    .map(|(_, t, lp)| (t.clone(), json!(lp)))
                    .collect::<serde_json::Map<String, Value>>()
            })
            .collect::<Vec<_>>(),
    })
}

/// Default `max_tokens` when a request gives none (OpenAI's is 16).
const DEFAULT_MAX_TOKENS: usize = 16;

fn prompt_text(v: &Value) -> Result<String, ApiError> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Array(items) if items.len() == 1 => match &items[0] {
            Value::String(s) => s.clone(),
            _ => return Err(ApiError::invalid("prompt", "expected a string")),
        },
        Value::Array(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "exactly one prompt per request",
            ))
        }
        _ => return Err(ApiError::invalid("prompt", "expected a string")),
    };
    if text.is_empty() {
        return Err(ApiError::invalid("prompt", "must not be empty"));
    }
    if text.chars().count() > MAX_PROMPT_CHARS {
        return Err(ApiError::invalid(
            "prompt",
            format!("must be at most {MAX_PROMPT_CHARS} characters"),
        ));
    }
    Ok(text)
}

fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Length => "length",
        _ => "stop",
    }
}

fn usage(s: &GenerationStats) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.generated_tokens,
        "total_tokens": s.prompt_tokens + s.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": s.cached_prompt_tokens},
    })
}

pub async fn completions(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let services = state.services()?;
    if !services.completions {
        return Err(ApiError::disabled(
            "/v1/completions is off on this server (start it with --completions); ask \
             clinical questions through /v1/answer or /v1/chat/completions",
        ));
    }
    let engine = services.pipeline.engine().clone();
    let model = engine.info().generator.clone();
    check_model(req.model.as_deref(), &model)?;
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only one choice is generated"));
    }
    let prompt = prompt_text(&req.prompt)?;
    let max_tokens = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 {
        return Err(ApiError::invalid("max_tokens", "must be at least 1"));
    }
    let ids = engine
        .text()
        .tokenizer
        .encode(&prompt, false)
        .map_err(|e| ApiError::invalid("prompt", e))?;
    let mut request = GenerateRequest::new(ids, max_tokens);
    request.sampling = sampling(SamplingFields {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        seed: req.seed,
    })?;
    request.stop = stop_strings(req.stop.as_ref())?;
    request.ignore_eos = req.ignore_eos;
    // The engine refuses more than its limit of alternatives (422 naming `logprobs`).
    request.logprobs = req.logprobs;
    request.cache_salt = salt_of("cache_salt", req.cache_salt.as_deref())?;
    let with_logprobs = request.logprobs.is_some();
    let rx = engine.generate(request)?;
    let id = completion_id("cmpl");
    let created = unix_now();
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        Ok(stream(rx, id, created, model, include_usage).into_response())
    } else {
        collect(rx, id, created, model, with_logprobs)
            .await
            .map(|v| Json(v).into_response())
    }
}

fn stream(
    rx: mpsc::UnboundedReceiver<GenerateEvent>,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
) -> impl IntoResponse {
    let chunk = move |text: &str, finish: Option<&str>| {
        let mut c = json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let events = UnboundedReceiverStream::new(rx).flat_map(move |event| {
        let out: Vec<Value> = match event {
            GenerateEvent::Text(t) => vec![chunk(&t, None)],
            GenerateEvent::Logprob(lp) => {
                let mut c = chunk("", None);
                c["choices"][0]["logprobs"] = logprobs_json(&[lp]);
                vec![c]
            }
            GenerateEvent::Done(s) => {
                let mut v = vec![chunk("", Some(finish_reason(s.stop)))];
                if include_usage {
                    let mut u = chunk("", None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&s);
                    v.push(u);
                }
                v
            }
            GenerateEvent::Error(message) => {
                vec![json!({"error": {"type": "generation_failed", "message": message}})]
            }
        };
        fstream::iter(
            out.into_iter()
                .map(|v| Event::default().data(v.to_string())),
        )
    });
    let all = events
        .chain(fstream::once(std::future::ready(
            Event::default().data("[DONE]"),
        )))
        .map(Ok::<_, Infallible>);
    Sse::new(all).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

async fn collect(
    mut rx: mpsc::UnboundedReceiver<GenerateEvent>,
    id: String,
    created: u64,
    model: String,
    with_logprobs: bool,
) -> Result<Value, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            GenerateEvent::Text(t) => text.push_str(&t),
            GenerateEvent::Logprob(lp) => logprobs.push(lp),
            GenerateEvent::Done(s) => {
                let logprobs = if with_logprobs {
                    logprobs_json(&logprobs)
                } else {
                    Value::Null
                };
                return Ok(json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": [{
                        "index": 0, "text": text, "logprobs": logprobs,
                        "finish_reason": finish_reason(s.stop),
                    }],
                    "usage": usage(&s),
                }));
            }
            GenerateEvent::Error(message) => return Err(ApiError::internal(message)),
        }
    }
    Err(ApiError::internal("the generation ended without a result"))
}
