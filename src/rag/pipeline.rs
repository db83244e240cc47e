//! The answer pipeline: question -> embedding -> hybrid search -> abstain or prompt -> generation
//! -> citation tracking -> events. Every event goes to one channel; the HTTP layer turns them into
//! SSE or one JSON body, the CLI prints them.
//!
//! Abstention uses the raw scores of the best passage (dense cosine, BM25), never the fused rank
//! score, which has no absolute meaning: below both thresholds the answer says the corpus holds no
//! evidence and nothing is generated. The disclaimer is appended by code, after the model's text.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use super::citations::{CitationGuide, CitationTracker, CitationVocab, Piece};
use super::prompt::{strip_instructions, system_prompt, user_message, Audience, PromptPassage};
use crate::engine::generate::StopReason;
use crate::engine::worker::{EngineHandle, GenerateEvent, GenerateRequest};
use crate::error::{EngineError, IndexError};
use crate::index::filter::Filter;
use crate::index::store::Store;
use crate::index::{Corpus, Mode, SearchHit, SearchOptions};
use crate::models::chat_template::ChatMessage;
use crate::ops::sampling::SamplingParams;

/// Appended to every answer by code.
pub const DISCLAIMER: &str = "This is general information, not medical advice. Talk with your \
care team about your own situation.";

/// Said instead of an answer when no passage clears the thresholds.
pub const NO_EVIDENCE: &str = "The corpus holds no evidence on this question, so it cannot be \
answered from cited sources. Please ask your care team.";

/// Said instead of an answer when nothing has been ingested.
pub const EMPTY_CORPUS: &str = "The corpus is empty: no documents have been ingested, so there is \
no evidence to answer from.";

/// Pipeline settings (from the command line).
#[derive(Clone, Debug)]
pub struct RagConfig {
    /// Passages retrieved before the context budget is applied.
    pub top_k: usize,
    /// Prompt tokens allowed (system prompt, history, passages, question).
    pub context_tokens: usize,
    /// Default and upper bound of generated tokens.
    pub max_tokens: usize,
    /// Evidence needs a passage with at least this raw cosine ...
    pub min_cosine: f32,
    /// ... or at least this raw BM25 score.
    pub min_bm25: f32,
    /// Applied to every answer (small models loop without it).
    pub repetition_penalty: f32,
    /// How far (in logits) below its top choice an opening bracket may be and still be preferred
    /// where an uncited sentence would end (0 turns the steering off; markers the model opens
    /// are still limited to the passages given).
    pub citation_margin: f32,
}

impl Default for RagConfig {
    fn default() -> Self {
        Self {
            top_k: 4,
            context_tokens: 2048,
            max_tokens: 512,
            min_cosine: 0.35,
            min_bm25: 12.0,
            repetition_penalty: 1.1,
            citation_margin: 8.0,
        }
    }
}

/// One question to answer.
#[derive(Clone, Debug, Default)]
pub struct AnswerRequest {
    pub question: String,
    /// Earlier turns of the conversation (user and assistant), oldest first.
    pub history: Vec<ChatMessage>,
    pub top_k: Option<usize>,
    pub filter: Filter,
    pub audience: Audience,
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    /// Token ids the model may not emit (the logits-processor hook).
    pub suppress: Vec<u32>,
    /// Strings that end the answer (not sent).
    pub stop: Vec<String>,
    /// Prefix-cache partition (0: the shared one); see [`GenerateRequest::cache_salt`].
    pub cache_salt: u64,
}

/// A passage given to the model, as the client sees it: the search hit with the number the model
/// cites it by, its text as the model saw it.
#[derive(Clone, Debug, Serialize)]
pub struct Source {
    pub marker: usize,
    #[serde(flatten)]
    pub hit: SearchHit,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub retrieval_ms: f64,
    pub queue_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// From the request to the first generated text.
    pub first_token_ms: Option<f64>,
    pub total_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CitationCounts {
    /// Citation events sent.
    pub total: usize,
    /// Distinct passages cited.
    pub unique: usize,
    /// Marker numbers the model wrote that name no passage it was given (removed).
    pub dropped: usize,
}

/// The closing summary of an answer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AnswerSummary {
    pub usage: Usage,
    pub timings: Timings,
    pub citations: CitationCounts,
    /// No passage cleared the evidence thresholds (or the corpus is empty): nothing was generated.
    pub abstained: bool,
    /// `stop` (the model ended), `length` (max_tokens), `abstained`.
    pub finish_reason: String,
    pub model: String,
    pub embedder: String,
    pub corpus_version: u64,
    /// Sentences removed from passages or the question because they addressed the rules.
    pub instructions_removed: usize,
}

/// Events of one answer, in order: `Sources`, `Delta`s and `Citation`s, then `Done` or `Error`.
#[derive(Clone, Debug)]
pub enum AnswerEvent {
    Sources(Vec<Source>),
    Delta(String),
    Citation { marker: usize, passage_id: String },
    Done(Box<AnswerSummary>),
    Error { kind: &'static str, message: String },
}

/// Failures before anything was streamed.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("the search task failed")]
    Join,
}

/// The answer pipeline over one engine and one corpus.
#[derive(Clone)]
pub struct Pipeline {
    engine: EngineHandle,
    corpus: Arc<Mutex<Corpus>>,
    cfg: RagConfig,
    /// The generator's bracket, digit and sentence-end tokens, found once.
    citation_vocab: Arc<CitationVocab>,
}

impl Pipeline {
    pub fn new(engine: EngineHandle, corpus: Arc<Mutex<Corpus>>, cfg: RagConfig) -> Self {
        let tokenizer = &engine.text().tokenizer;
        let citation_vocab = Arc::new(CitationVocab::new(tokenizer.vocab_size(), |id| {
            String::from_utf8_lossy(tokenizer.token_bytes(id)).into_owned()
        }));
        Self {
            engine,
            corpus,
            cfg,
            citation_vocab,
        }
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    pub fn config(&self) -> &RagConfig {
        &self.cfg
    }

    /// Embeds `query` and searches the corpus on a blocking thread.
    pub async fn search(
        &self,
        query: &str,
        opts: SearchOptions,
        filter: Filter,
    ) -> Result<(Vec<SearchHit>, u64), AnswerError> {
        let embedding = self
            .engine
            .embed(vec![query.to_string()])
            .await?
            .vectors
            .remove(0);
        let corpus = self.corpus.clone();
        let query = query.to_string();
        tokio::task::spawn_blocking(move || {
            let mut corpus = corpus.lock().unwrap_or_else(|p| p.into_inner());
            let hits = corpus.search_filtered(&query, &embedding, &opts, &filter)?;
            Ok((hits, corpus.version()))
        })
        .await
        .map_err(|_| AnswerError::Join)?
    }

    /// Answers `req`, sending every event to `events`. Returns when the answer is complete or the
    /// receiver is gone (the client left: generation stops at its next step).
    pub async fn answer(&self, req: AnswerRequest, events: mpsc::Sender<AnswerEvent>) {
        let started = Instant::now();
        if let Err(e) = self.run(req, &events, started).await {
            let kind = match e {
                AnswerError::Invalid(_) | AnswerError::Engine(EngineError::Invalid(_)) => {
                    "invalid_request"
                }
                AnswerError::Engine(EngineError::Busy) => "overloaded",
                _ => "internal",
            };
            if kind == "internal" {
                tracing::error!(error = %e, "answer failed");
            }
            let message = if kind == "internal" {
                "the answer could not be completed".to_string()
            } else {
                e.to_string()
            };
            let _ = events.send(AnswerEvent::Error { kind, message }).await;
        }
    }

    async fn run(
        &self,
        req: AnswerRequest,
        events: &mpsc::Sender<AnswerEvent>,
        started: Instant,
    ) -> Result<(), AnswerError> {
        let info = self.engine.info();
        let mut summary = AnswerSummary {
            model: info.generator.clone(),
            embedder: info.embedder.clone(),
            ..AnswerSummary::default()
        };
        let (question, removed) = strip_instructions(&req.question);
        summary.instructions_removed += removed;
        let max_tokens = req.max_tokens.unwrap_or(self.cfg.max_tokens);
        if max_tokens == 0 || max_tokens > self.cfg.max_tokens {
            return Err(AnswerError::Invalid(format!(
                "max_tokens must be between 1 and {}",
                self.cfg.max_tokens
            )));
        }
        // Follow-ups retrieve with the previous question as context.
        let retrieval_query = match req
            .history
            .iter()
            .rev()
            .find(|m| m.role == crate::models::chat_template::Role::User)
        {
            Some(prev) => format!("{} {}", prev.content, question),
            None => question.clone(),
        };
        let opts = SearchOptions {
            top_k: req.top_k.unwrap_or(self.cfg.top_k),
            mode: Mode::Hybrid,
            ..SearchOptions::default()
        };
        let (hits, corpus_version) = if question.is_empty() {
            (Vec::new(), 0)
        } else {
            self.search(&retrieval_query, opts, req.filter.clone())
                .await?
        };
        summary.corpus_version = corpus_version;
        summary.timings.retrieval_ms = ms(started.elapsed());

        let evidence = hits.iter().any(|h| {
            h.dense_score >= self.cfg.min_cosine || h.bm25_score.unwrap_or(0.0) >= self.cfg.min_bm25
        });
        if !evidence {
            let empty = {
                let corpus = self.corpus.lock().unwrap_or_else(|p| p.into_inner());
                corpus
                    .store()
                    .counts()
                    .map(|(docs, _)| docs == 0)
                    .unwrap_or(false)
            };
            let text = if empty { EMPTY_CORPUS } else { NO_EVIDENCE };
            summary.abstained = true;
            summary.finish_reason = "abstained".into();
            let _ = events.send(AnswerEvent::Sources(Vec::new())).await;
            let _ = events
                .send(AnswerEvent::Delta(format!("{text}\n\n{DISCLAIMER}")))
                .await;
            summary.timings.total_ms = ms(started.elapsed());
            let _ = events.send(AnswerEvent::Done(Box::new(summary))).await;
            return Ok(());
        }

        // Passages in rank order while the prompt fits the budget.
        let text_side = self.engine.text();
        let system = system_prompt(req.audience);
        let mut history = req.history.clone();
        let cleaned: Vec<(String, usize)> =
            hits.iter().map(|h| strip_instructions(&h.text)).collect();
        summary.instructions_removed += cleaned.iter().map(|c| c.1).sum::<usize>();
        let budget = self
            .cfg
            .context_tokens
            .min(text_side.context_length.saturating_sub(max_tokens));
        let mut used = 0;
        let mut prompt = Vec::new();
        for n in 0..=hits.len() {
            let passages: Vec<PromptPassage<'_>> = hits[..n]
                .iter()
                .zip(&cleaned)
                .map(|(h, (text, _))| PromptPassage {
                    title: &h.title,
                    section: &h.section,
                    text,
                })
                .collect();
            history.push(ChatMessage::new(
                crate::models::chat_template::Role::User,
                user_message(&passages, &question),
            ));
            let ids = text_side.encode_chat(&system, &history)?;
            history.pop();
            if ids.len() > budget {
                break;
            }
            used = n;
            prompt = ids;
        }
        if prompt.is_empty() || used == 0 {
            return Err(AnswerError::Invalid(format!(
                "the question and conversation do not fit the context budget of {budget} tokens"
            )));
        }
        let given = &hits[..used];
        let sources: Vec<Source> = given
            .iter()
            .zip(&cleaned)
            .enumerate()
            .map(|(i, (h, (text, _)))| Source {
                marker: i + 1,
                hit: SearchHit {
                    text: text.clone(),
                    ..h.clone()
                },
            })
            .collect();
        if events.send(AnswerEvent::Sources(sources)).await.is_err() {
            return Ok(());
        }

        let mut generate = GenerateRequest::new(prompt, max_tokens);
        generate.sampling = SamplingParams {
            repetition_penalty: self.cfg.repetition_penalty,
            ..req.sampling.clone()
        };
        generate.suppress = req.suppress.clone();
        generate.stop = req.stop.clone();
        generate.cache_salt = req.cache_salt;
        generate.processor = Some(Box::new(CitationGuide::new(
            used,
            self.citation_vocab.clone(),
            self.cfg.citation_margin,
        )));
        let mut rx = self.engine.generate(generate)?;
        let mut tracker = CitationTracker::new(used);
        let mut cited = std::collections::BTreeSet::new();
        while let Some(event) = rx.recv().await {
            match event {
                // Answers do not ask for log-probabilities.
                GenerateEvent::Logprob(_) => {}
                GenerateEvent::Text(text) => {
                    if summary.timings.first_token_ms.is_none() {
                        summary.timings.first_token_ms = Some(ms(started.elapsed()));
                    }
                    for piece in tracker.push(&text) {
                        if !self
                            .emit(piece, given, &mut cited, &mut summary, events)
                            .await
                        {
                            return Ok(()); // client gone; dropping `rx` stops the generation
                        }
                    }
                }
                GenerateEvent::Done(stats) => {
                    for piece in tracker.finish() {
                        if !self
                            .emit(piece, given, &mut cited, &mut summary, events)
                            .await
                        {
                            return Ok(());
                        }
                    }
                    summary.usage = Usage {
                        prompt_tokens: stats.prompt_tokens,
                        completion_tokens: stats.generated_tokens,
                        total_tokens: stats.prompt_tokens + stats.generated_tokens,
                    };
                    summary.timings.queue_ms = ms(stats.queued);
                    summary.timings.prefill_ms = ms(stats.prefill);
                    summary.timings.decode_ms = ms(stats.decode);
                    summary.finish_reason = match stats.stop {
                        StopReason::EndOfTurn | StopReason::StopString => "stop",
                        StopReason::Length => "length",
                        StopReason::Cancelled => "cancelled",
                    }
                    .into();
                    summary.citations.unique = cited.len();
                    summary.citations.dropped = tracker.dropped();
                    let _ = events
                        .send(AnswerEvent::Delta(format!("\n\n{DISCLAIMER}")))
                        .await;
                    summary.timings.total_ms = ms(started.elapsed());
                    let _ = events.send(AnswerEvent::Done(Box::new(summary))).await;
                    return Ok(());
                }
                GenerateEvent::Error(message) => {
                    tracing::error!(%message, "generation failed");
                    let _ = events
                        .send(AnswerEvent::Error {
                            kind: "internal",
                            message: "generation failed".into(),
                        })
                        .await;
                    return Ok(());
                }
            }
        }
        Err(EngineError::Stopped.into())
    }

    /// Sends one tracked piece; false when the client is gone.
    async fn emit(
        &self,
        piece: Piece,
        given: &[SearchHit],
        cited: &mut std::collections::BTreeSet<usize>,
        summary: &mut AnswerSummary,
        events: &mpsc::Sender<AnswerEvent>,
    ) -> bool {
        let event = match piece {
            Piece::Text(text) => AnswerEvent::Delta(text),
            Piece::Citation(marker) => {
                cited.insert(marker);
                summary.citations.total += 1;
                AnswerEvent::Citation {
                    marker,
                    passage_id: given[marker - 1].id.clone(),
                }
            }
        };
        events.send(event).await.is_ok()
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}
