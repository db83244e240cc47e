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
use super::grounding::{
    self, GroundingReport, PassageFacts, Reason, Sentence, SentenceReport, SentenceSplitter,
    SupportConfig, Verdict,
};
use super::prompt::{strip_instructions, system_prompt, user_message, Audience, PromptPassage};
use super::safety;
use super::template::{AnswerShape, AnswerTemplate, Section};
use crate::engine::generate::StopReason;
use crate::engine::worker::{EngineHandle, GenerateEvent, GenerateRequest};
use crate::error::{EngineError, IndexError};
use crate::index::filter::Filter;
use crate::index::store::Store;
use crate::index::{Corpus, Mode, SearchHit, SearchOptions};
use crate::models::chat_template::ChatMessage;
use crate::models::reranker::CrossEncoder;
use crate::ops::sampling::{NoRepeatNgram, SamplingParams};

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
    /// Bounds of the support check.
    pub support: SupportConfig,
    /// No run of this many generated tokens may occur twice in an answer (0: off).
    pub no_repeat_ngram: usize,
    /// A question word the corpus never mentions and that the generator's tokenizer cuts into
    /// at least this many tokens (a drug, trial or gene name, a rare disease) means the corpus
    /// cannot answer: abstain (0: off).
    pub rare_word_tokens: usize,
    /// A question with no word of cancer or its care is answered only when a passage reaches
    /// this cosine (or the BM25 bound); otherwise it is off topic.
    pub off_topic_cosine: f32,
    /// The sections of a sectioned answer.
    pub template: AnswerTemplate,
    /// A retrieved passage sharing at least this share of its word 4-grams (of the smaller of the
    /// two) with a better-ranked one is left out of the context (above 1: never).
    pub near_duplicate: f32,
    /// A cross-encoder folder: when given, the first `rerank_depth` hits are reordered by it.
    pub reranker: Option<std::path::PathBuf>,
    pub rerank_depth: usize,
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
            support: SupportConfig::default(),
            no_repeat_ngram: 8,
            rare_word_tokens: 1,
            off_topic_cosine: 0.5,
            template: AnswerTemplate::default(),
            near_duplicate: 0.8,
            reranker: None,
            rerank_depth: 20,
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
    /// What the support check does with each sentence.
    pub grounding: GroundingMode,
    /// One stretch of text, or the template's sections.
    pub shape: AnswerShape,
}

/// What happens to sentences the support check does not pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroundingMode {
    /// No check (load tests of raw generation through the answer path).
    Off,
    /// Every sentence streams as written; each gets a `support` event, the report lists failures.
    #[default]
    Flag,
    /// A sentence is sent only once it passed; failures are held back and reported.
    Withhold,
}

impl GroundingMode {
    fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Flag => "flag",
            Self::Withhold => "withhold",
        }
    }
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
    /// From the last generated token to the finished grounding report.
    pub grounding_ms: Option<f64>,
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
    /// Retrieved passages left out as near-copies of better-ranked ones.
    pub near_duplicates_collapsed: usize,
    /// The support check of the answer's sentences (absent when nothing was generated or the
    /// check was off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grounding: Option<GroundingReport>,
    /// The passages contradict what the question takes for granted; the answer says so first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub premise: Option<PremiseNote>,
}

/// A question premise the passages do not support.
#[derive(Clone, Debug, Serialize)]
pub struct PremiseNote {
    /// The part of the question taken for granted.
    pub premise: String,
    /// What failed, as in the support check.
    pub reason: Reason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Events of one answer, in order: `Sources`, `Delta`s and `Citation`s, then `Done` or `Error`.
#[derive(Clone, Debug)]
pub enum AnswerEvent {
    Sources(Vec<Source>),
    Delta(String),
    Citation(Box<CitationEvent>),
    /// The support check of one finished sentence.
    Support(Box<SentenceReport>),
    Done(Box<AnswerSummary>),
    Error {
        kind: &'static str,
        message: String,
    },
}

/// A citation, with what a reader needs to judge its source: title, section, date.
#[derive(Clone, Debug, Serialize)]
pub struct CitationEvent {
    pub marker: usize,
    pub passage_id: String,
    pub title: String,
    pub section: String,
    pub date: String,
    pub url: String,
    /// The page the passage starts on, for paged sources (PDFs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
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
    /// Reorders retrieved passages when loaded ([`RagConfig::reranker`]).
    reranker: Option<Arc<CrossEncoder>>,
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
            reranker: None,
        }
    }

    /// Reranks retrieved passages with `reranker` from now on.
    pub fn with_reranker(mut self, reranker: Arc<CrossEncoder>) -> Self {
        self.reranker = Some(reranker);
        self
    }

    /// `hits` reordered by the reranker (the first `rerank_depth` of them; the rest keep their
    /// place after), or unchanged without one.
    async fn rerank(
        &self,
        query: &str,
        mut hits: Vec<SearchHit>,
    ) -> Result<Vec<SearchHit>, AnswerError> {
        let Some(reranker) = self.reranker.clone() else {
            return Ok(hits);
        };
        let depth = self.cfg.rerank_depth.min(hits.len());
        let rest = hits.split_off(depth);
        let query = query.to_string();
        let mut head = tokio::task::spawn_blocking(move || {
            let texts: Vec<&str> = hits.iter().map(|h| h.text.as_str()).collect();
            let scores = reranker.score(&query, &texts)?;
            let mut scored: Vec<(f32, SearchHit)> = scores.into_iter().zip(hits).collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            Ok::<_, crate::error::ModelError>(
                scored.into_iter().map(|(_, h)| h).collect::<Vec<_>>(),
            )
        })
        .await
        .map_err(|_| AnswerError::Join)?
        .map_err(|e| AnswerError::Engine(EngineError::Model(e)))?;
        head.extend(rest);
        Ok(head)
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

    /// Words of `question` the corpus never mentions that are not everyday words (the
    /// generator's tokenizer splits them: drug, trial and gene names, rare diseases): the corpus
    /// cannot answer a question about them.
    async fn unknown_terms(&self, question: &str) -> Result<Vec<String>, AnswerError> {
        let corpus = self.corpus.clone();
        let q = question.to_string();
        let words = tokio::task::spawn_blocking(move || {
            let mut corpus = corpus.lock().unwrap_or_else(|p| p.into_inner());
            corpus.unknown_words(&q)
        })
        .await
        .map_err(|_| AnswerError::Join)??;
        let tokenizer = &self.engine.text().tokenizer;
        Ok(words
            .into_iter()
            .filter(|w| !grounding::is_asking_word(&w.to_lowercase()))
            .filter(|w| {
                tokenizer
                    .encode(&format!(" {}", w.to_lowercase()), false)
                    .map(|ids| ids.len() >= self.cfg.rare_word_tokens)
                    .unwrap_or(false)
            })
            .collect())
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
        // Emergencies, personal doses and diagnoses get a fixed reply before any search.
        if let Some(t) = safety::triage(&question) {
            return self
                .fixed_reply(t.reply(), t.finish_reason(), summary, events, started)
                .await;
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
        let top_k = req.top_k.unwrap_or(self.cfg.top_k);
        // Twice as many, so passages dropped as near-duplicates leave room for others.
        let reranking = self.reranker.is_some();
        let opts = SearchOptions {
            top_k: if reranking {
                (top_k * 2).max(self.cfg.rerank_depth)
            } else {
                top_k * 2
            },
            mode: Mode::Hybrid,
            ..SearchOptions::default()
        };
        let (hits, corpus_version) = if question.is_empty() {
            (Vec::new(), 0)
        } else {
            self.search(&retrieval_query, opts, req.filter.clone())
                .await?
        };
        let hits = self.rerank(&retrieval_query, hits).await?;
        let (hits, collapsed) = crate::index::dedup::collapse(hits, self.cfg.near_duplicate, top_k);
        summary.near_duplicates_collapsed = collapsed;
        summary.corpus_version = corpus_version;
        summary.timings.retrieval_ms = ms(started.elapsed());

        let on_topic = safety::about_cancer_care(&question)
            || hits.iter().any(|h| {
                h.dense_score >= self.cfg.off_topic_cosine
                    || h.bm25_score.unwrap_or(0.0) >= self.cfg.min_bm25
            });
        let evidence = on_topic
            && hits.iter().any(|h| {
                h.dense_score >= self.cfg.min_cosine
                    || h.bm25_score.unwrap_or(0.0) >= self.cfg.min_bm25
            });
        // Names in the question (drugs, genes, trials) that no retrieved passage mentions: the
        // corpus does not speak of them, so it cannot answer.
        let mut uncovered = grounding::uncovered_names(
            &question,
            &hits.iter().map(|h| h.text.as_str()).collect::<Vec<_>>(),
        );
        if evidence && uncovered.is_empty() && self.cfg.rare_word_tokens > 0 {
            uncovered = self.unknown_terms(&question).await?;
        }
        if !evidence || !uncovered.is_empty() {
            let empty = {
                let corpus = self.corpus.lock().unwrap_or_else(|p| p.into_inner());
                corpus
                    .store()
                    .counts()
                    .map(|(docs, _)| docs == 0)
                    .unwrap_or(false)
            };
            let (text, reason) = if empty {
                (EMPTY_CORPUS, "abstained")
            } else if !on_topic {
                (safety::OFF_TOPIC, "refused")
            } else {
                (NO_EVIDENCE, "abstained")
            };
            summary.abstained = reason == "abstained";
            return self
                .fixed_reply(text, reason, summary, events, started)
                .await;
        }

        // Passages in rank order while the prompt fits the budget.
        let text_side = self.engine.text();
        let mut system = system_prompt(req.audience);
        let mut history = req.history.clone();
        let cleaned: Vec<(String, usize)> =
            hits.iter().map(|h| strip_instructions(&h.text)).collect();
        summary.instructions_removed += cleaned.iter().map(|c| c.1).sum::<usize>();
        // What the question takes for granted, checked against the passages.
        let facts: Vec<PassageFacts> = cleaned.iter().map(|(t, _)| PassageFacts::new(t)).collect();
        summary.premise = premise_check(&question, &facts, &self.cfg.support);
        if req.shape == AnswerShape::Sections {
            let headings: Vec<&str> = self
                .cfg
                .template
                .sections
                .iter()
                .map(|s| s.heading.as_str())
                .collect();
            system.push_str(&format!(
                " Answer in sections, each under its heading: {}. Write each section about its heading only, without repeating an earlier section.",
                headings.join("; ")
            ));
        }
        if summary.premise.is_some() {
            system.push_str(
                " The question assumes something the sources contradict: say first what the sources say instead.",
            );
        }
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
        let facts = &facts[..used];
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
        if let Some(note) = &summary.premise {
            let text = premise_sentence(note);
            if events.send(AnswerEvent::Delta(text)).await.is_err() {
                return Ok(());
            }
        }

        // The answer's parts: the whole answer at once, or one part per template section, each
        // continuing the text so far (its prompt is a cached prefix of the next).
        let sections: Vec<Section> = match req.shape {
            AnswerShape::Free => vec![Section {
                heading: String::new(),
                max_tokens,
            }],
            AnswerShape::Sections => self.cfg.template.fit(max_tokens),
        };
        let mut checker = Checker::new(self, req.grounding, facts, given, events);
        let mut written = String::new();
        let mut usage = Usage::default();
        let mut last = None;
        for (i, section) in sections.iter().enumerate() {
            let mut ids = prompt.clone();
            let mut history = Vec::new();
            if !section.heading.is_empty() {
                let heading = format!(
                    "{}## {}\n",
                    if i == 0 { "" } else { "\n\n" },
                    section.heading
                );
                if events
                    .send(AnswerEvent::Delta(heading.clone()))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                written.push_str(&heading);
                history = text_side
                    .tokenizer
                    .encode(&written, false)
                    .map_err(EngineError::from)?;
                ids.extend(&history);
            }
            let mut generate = GenerateRequest::new(ids, section.max_tokens);
            generate.sampling = SamplingParams {
                repetition_penalty: self.cfg.repetition_penalty,
                ..req.sampling.clone()
            };
            generate.suppress = req.suppress.clone();
            generate.suppress.extend(self.citation_vocab.source_words());
            // No cure unless a source speaks of one.
            if !facts.iter().any(PassageFacts::speaks_of_cure) {
                generate.suppress.extend(self.citation_vocab.cure_words());
            }
            generate.stop = req.stop.clone();
            if !section.heading.is_empty() {
                // A section ends where the model would start a heading of its own.
                generate.stop.push("\n#".into());
            }
            generate.cache_salt = req.cache_salt;
            generate.processors.push(Box::new(CitationGuide::new(
                used,
                self.citation_vocab.clone(),
                self.cfg.citation_margin,
            )));
            // Small models fall into loops that repeat whole sentences: no n-gram twice. After
            // the guide, so it never bans the one token a marker allows.
            // Earlier sections count as written: no section repeats another.
            generate
                .processors
                .push(Box::new(NoRepeatNgram::with_history(
                    self.cfg.no_repeat_ngram,
                    &history,
                )));
            let rx = self.engine.generate(generate)?;
            let part = stream_part(rx, &mut checker, &mut summary, started, &mut written).await;
            let Some(stats) = part else {
                return Ok(()); // the client left, or generation failed (already reported)
            };
            usage.prompt_tokens += stats.prompt_tokens;
            usage.completion_tokens += stats.generated_tokens;
            summary.timings.queue_ms += ms(stats.queued);
            summary.timings.prefill_ms += ms(stats.prefill);
            summary.timings.decode_ms += ms(stats.decode);
            let stopped = matches!(stats.stop, StopReason::Cancelled);
            last = Some(stats.stop);
            if stopped {
                break;
            }
        }
        if req.grounding != GroundingMode::Off {
            summary.grounding = Some(std::mem::take(&mut checker.report));
        }
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
        summary.usage = usage;
        summary.finish_reason = match last {
            Some(StopReason::EndOfTurn | StopReason::StopString) | None => "stop",
            Some(StopReason::Length) => "length",
            Some(StopReason::Cancelled) => "cancelled",
        }
        .into();
        summary.citations = CitationCounts {
            total: checker.citations,
            unique: checker.cited.len(),
            dropped: checker.tracker.dropped(),
        };
        let _ = events
            .send(AnswerEvent::Delta(format!("\n\n{DISCLAIMER}")))
            .await;
        summary.timings.total_ms = ms(started.elapsed());
        let _ = events.send(AnswerEvent::Done(Box::new(summary))).await;
        Ok(())
    }

    /// Sends a fixed reply (no sources, nothing generated) and the summary.
    async fn fixed_reply(
        &self,
        text: &str,
        finish_reason: &str,
        mut summary: AnswerSummary,
        events: &mpsc::Sender<AnswerEvent>,
        started: Instant,
    ) -> Result<(), AnswerError> {
        summary.finish_reason = finish_reason.into();
        let _ = events.send(AnswerEvent::Sources(Vec::new())).await;
        let _ = events
            .send(AnswerEvent::Delta(format!("{text}\n\n{DISCLAIMER}")))
            .await;
        summary.timings.total_ms = ms(started.elapsed());
        let _ = events.send(AnswerEvent::Done(Box::new(summary))).await;
        Ok(())
    }
}

/// Streams one generation through the checker until it ends; its stats, or None when the client
/// left or the generation failed (the error is sent).
async fn stream_part(
    mut rx: mpsc::UnboundedReceiver<GenerateEvent>,
    checker: &mut Checker<'_>,
    summary: &mut AnswerSummary,
    started: Instant,
    written: &mut String,
) -> Option<crate::engine::worker::GenerationStats> {
    while let Some(event) = rx.recv().await {
        match event {
            // Answers do not ask for log-probabilities.
            GenerateEvent::Logprob(_) => {}
            GenerateEvent::Text(text) => {
                if summary.timings.first_token_ms.is_none() {
                    summary.timings.first_token_ms = Some(ms(started.elapsed()));
                }
                written.push_str(&text);
                if !checker.text(&text).await {
                    return None; // client gone; dropping `rx` stops the generation
                }
            }
            GenerateEvent::Done(stats) => {
                let last_token = Instant::now();
                if !checker.end_part().await {
                    return None;
                }
                // The last part's value stands: from its last token to its last check.
                if checker.mode != GroundingMode::Off {
                    summary.timings.grounding_ms = Some(ms(last_token.elapsed()));
                }
                return Some(stats);
            }
            GenerateEvent::Error(message) => {
                tracing::error!(%message, "generation failed");
                let _ = checker
                    .events
                    .send(AnswerEvent::Error {
                        kind: "internal",
                        message: "generation failed".into(),
                    })
                    .await;
                return None;
            }
        }
    }
    let _ = checker
        .events
        .send(AnswerEvent::Error {
            kind: "internal",
            message: "the engine stopped".into(),
        })
        .await;
    None
}

/// The streaming side of one answer: turns generated text into pieces (the citation tracker),
/// cuts them into sentences, checks each as it ends, and sends, holds back or flags it; counts
/// the citations sent.
struct Checker<'a> {
    pipeline: &'a Pipeline,
    mode: GroundingMode,
    facts: &'a [PassageFacts],
    /// The passages given, by marker - 1.
    given: &'a [SearchHit],
    events: &'a mpsc::Sender<AnswerEvent>,
    tracker: CitationTracker,
    splitter: SentenceSplitter,
    /// Embeddings of passage sentences already computed for this answer.
    vectors: std::collections::HashMap<String, Vec<f32>>,
    report: GroundingReport,
    /// Passages cited, and citation events sent.
    cited: std::collections::BTreeSet<usize>,
    citations: usize,
}

impl<'a> Checker<'a> {
    fn new(
        pipeline: &'a Pipeline,
        mode: GroundingMode,
        facts: &'a [PassageFacts],
        given: &'a [SearchHit],
        events: &'a mpsc::Sender<AnswerEvent>,
    ) -> Self {
        Self {
            pipeline,
            mode,
            facts,
            given,
            events,
            tracker: CitationTracker::new(given.len()),
            splitter: SentenceSplitter::new(),
            vectors: std::collections::HashMap::new(),
            report: GroundingReport::new(mode.name()),
            cited: std::collections::BTreeSet::new(),
            citations: 0,
        }
    }

    /// Takes newly generated text; false when the client is gone.
    async fn text(&mut self, text: &str) -> bool {
        for piece in self.tracker.push(text) {
            if !self.piece(piece).await {
                return false;
            }
        }
        true
    }

    /// Ends a generation: a marker left open, then the last sentence.
    async fn end_part(&mut self) -> bool {
        for piece in self.tracker.finish() {
            if !self.piece(piece).await {
                return false;
            }
        }
        if self.mode == GroundingMode::Off {
            return true;
        }
        match self.splitter.finish() {
            Some(s) => self.sentence(s).await,
            None => true,
        }
    }

    /// Takes one tracked piece; false when the client is gone.
    async fn piece(&mut self, piece: Piece) -> bool {
        if self.mode == GroundingMode::Off {
            return self.send(piece).await;
        }
        if self.mode == GroundingMode::Flag && !self.send(piece.clone()).await {
            return false;
        }
        for sentence in self.splitter.push(&piece) {
            if !self.sentence(sentence).await {
                return false;
            }
        }
        true
    }

    async fn sentence(&mut self, sentence: Sentence) -> bool {
        let verdict = self.verdict(&sentence).await;
        let withheld = self.mode == GroundingMode::Withhold && !verdict.supported;
        if self.mode == GroundingMode::Withhold && !withheld {
            let mut pieces = vec![Piece::Text(sentence.text.clone())];
            pieces.extend(sentence.citations.iter().map(|&c| Piece::Citation(c)));
            for p in pieces {
                if !self.send(p).await {
                    return false;
                }
            }
        }
        let line = SentenceReport {
            index: sentence.index,
            text: sentence.claim(),
            citations: sentence.citations.clone(),
            verdict: verdict.clone(),
            withheld,
        };
        self.report.add(&sentence, verdict, withheld);
        self.events
            .send(AnswerEvent::Support(Box::new(line)))
            .await
            .is_ok()
    }

    /// Sends one piece to the client; false when it is gone.
    async fn send(&mut self, piece: Piece) -> bool {
        let event = match piece {
            Piece::Text(text) => AnswerEvent::Delta(text),
            Piece::Citation(marker) => {
                self.cited.insert(marker);
                self.citations += 1;
                let h = &self.given[marker - 1];
                AnswerEvent::Citation(Box::new(CitationEvent {
                    marker,
                    passage_id: h.id.clone(),
                    title: h.title.clone(),
                    section: h.section.clone(),
                    date: h.date.clone(),
                    url: h.url.clone(),
                    page: h.page,
                }))
            }
        };
        self.events.send(event).await.is_ok()
    }

    /// Lexical checks first; the embedding bound only for sentences that passed them and share
    /// few words with their passages, against the cited sentences closest in words (embedded
    /// once per answer).
    async fn verdict(&mut self, sentence: &Sentence) -> Verdict {
        let cited: Vec<&PassageFacts> = sentence
            .citations
            .iter()
            .filter_map(|&m| self.facts.get(m - 1))
            .collect();
        let cfg = self.pipeline.cfg.support;
        let lexical = grounding::check(&sentence.text, &cited, Some(1.0), &cfg);
        if !lexical.supported || !lexical.factual {
            return lexical;
        }
        let Some(candidates) = grounding::embedding_candidates(
            &sentence.text,
            &cited,
            &cfg,
            grounding::EMBEDDING_CANDIDATES,
        ) else {
            return lexical;
        };
        let mut texts = vec![sentence.claim()];
        texts.extend(
            candidates
                .iter()
                .filter(|c| !self.vectors.contains_key(**c))
                .map(|c| c.to_string()),
        );
        // The report is promised soon after the last token: a sentence whose embedding waits
        // longer (behind another answer's prompt chunk) is judged on shared words instead.
        let embedded =
            tokio::time::timeout(EMBED_WAIT, self.pipeline.engine.embed(texts.clone())).await;
        let mut vectors = match embedded {
            Ok(Ok(e)) => e.vectors,
            _ => return grounding::check(&sentence.text, &cited, None, &cfg),
        };
        let claim = vectors.remove(0);
        for (text, v) in texts.into_iter().skip(1).zip(vectors) {
            self.vectors.insert(text, v);
        }
        let others: Vec<Vec<f32>> = candidates
            .iter()
            .filter_map(|c| self.vectors.get(*c).cloned())
            .collect();
        let cosine = grounding::best_cosine(&claim, &others);
        grounding::check(&sentence.text, &cited, Some(cosine), &cfg)
    }
}

/// The longest a sentence's check waits for the embedder.
const EMBED_WAIT: Duration = Duration::from_millis(200);

/// Questions that take something for granted (`why does ...`, `since ...`, `given that ...`):
/// the assumed part is checked like a cited sentence against every passage; a number, name,
/// polarity or cure the passages do not bear out is a premise to correct first.
fn premise_check(
    question: &str,
    facts: &[PassageFacts],
    cfg: &SupportConfig,
) -> Option<PremiseNote> {
    let premise = grounding::premise_of(question)?;
    let all: Vec<&PassageFacts> = facts.iter().collect();
    let v = grounding::check(&premise, &all, Some(1.0), cfg);
    match v.reason {
        Some(reason @ (Reason::Number | Reason::Negation | Reason::Cure)) => Some(PremiseNote {
            premise,
            reason,
            detail: v.detail,
        }),
        _ => None,
    }
}

/// The sentence that opens an answer to a question with a contradicted premise.
fn premise_sentence(note: &PremiseNote) -> String {
    let why = match (&note.reason, note.detail.as_deref()) {
        (Reason::Number, Some(n)) => format!("the figure {n} does not appear in them"),
        (Reason::Cure, _) => "they do not speak of a cure".to_string(),
        _ => "they state otherwise".to_string(),
    };
    format!(
        "The sources do not support what the question assumes ({why}). Here is what they say:\n\n"
    )
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}
