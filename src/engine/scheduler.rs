//! Continuous batching on the device worker. Each step packs, under a token budget, one decode
//! token for every running sequence first, then prefill chunks of sequences still reading their
//! prompt (chunked prefill: a long RAG prompt never stalls the streams already running), runs one
//! forward pass for all of them, and samples each sequence's next token with its own sampler. A
//! sequence whose client is gone is dropped at the next step and its cache freed.
//!
//! The KV history is the model's per-sequence cache for now; the paged block pool
//! ([`super::kv_blocks`]) takes its place with the paged attention op.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::generate::StopReason;
use super::stop::StopMatcher;
use super::worker::{EngineStats, GenerateEvent, GenerateRequest, GenerationStats, TextSide};
use crate::error::EngineError;
use crate::models::kv_cache::KvCache;
use crate::models::llama::Llama;
use crate::models::tokenizer::StreamDecoder;
use crate::models::{Batch, LogitsAt};
use crate::ops::sampling::Sampler;

/// Scheduler limits.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Sequences decoded together.
    pub max_running: usize,
    /// Tokens (decode tokens plus prefill chunks) in one forward pass.
    pub max_batch_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_running: 16,
            max_batch_tokens: 256,
        }
    }
}

/// A generation waiting for a slot.
pub(crate) struct Pending {
    pub request: GenerateRequest,
    pub events: mpsc::UnboundedSender<GenerateEvent>,
    pub queued_at: Instant,
}

/// A sequence in the running set.
struct Running {
    id: u64,
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    max_tokens: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    stop_ids: Vec<u32>,
    events: mpsc::UnboundedSender<GenerateEvent>,
    /// The last sampled token, not yet in the cache (None until the prompt is read).
    next: Option<u32>,
    stats: GenerationStats,
    admitted_at: Instant,
    first_token_at: Option<Instant>,
}

/// What one sequence contributes to a step.
enum Work {
    Decode(u32),
    Prefill(usize),
}

pub(crate) struct Scheduler {
    cfg: SchedulerConfig,
    cache: KvCache,
    running: Vec<Running>,
    pub waiting: VecDeque<Pending>,
    next_id: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, num_layers: usize) -> Self {
        Self {
            cfg,
            cache: KvCache::new(num_layers),
            running: Vec::new(),
            waiting: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Whether a step has anything to do.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    /// Admits waiting sequences into free slots.
    fn admit(&mut self, text: &TextSide, stats: &EngineStats) {
        while self.running.len() < self.cfg.max_running {
            let Some(mut p) = self.waiting.pop_front() else {
                break;
            };
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if p.events.is_closed() {
                continue; // left while it waited
            }
            let now = Instant::now();
            let mut stop_ids = text.tokenizer.stop_ids();
            stop_ids.extend(&p.request.stop_token_ids);
            let mut sampler = Sampler::new(
                p.request.sampling.clone(),
                std::mem::take(&mut p.request.suppress),
            );
            if let Some(proc) = p.request.processor.take() {
                sampler = sampler.with_processor(proc);
            }
            self.next_id += 1;
            self.running.push(Running {
                id: self.next_id,
                prefilled: 0,
                max_tokens: p.request.max_tokens,
                sampler,
                decoder: StreamDecoder::new(),
                stops: StopMatcher::new(std::mem::take(&mut p.request.stop)),
                stop_ids,
                next: None,
                stats: GenerationStats {
                    prompt_tokens: p.request.prompt.len(),
                    generated_tokens: 0,
                    stop: StopReason::Length,
                    queued: now - p.queued_at,
                    prefill: Duration::ZERO,
                    decode: Duration::ZERO,
                },
                prompt: std::mem::take(&mut p.request.prompt),
                events: p.events,
                admitted_at: now,
                first_token_at: None,
            });
        }
    }

    /// One forward pass over the running set. Returns false when there was nothing to run.
    pub fn step(&mut self, model: &Llama, text: &TextSide, stats: &EngineStats) -> bool {
        // Drop sequences whose client left; finish those asking for no tokens.
        let mut i = 0;
        while i < self.running.len() {
            let r = &self.running[i];
            if r.events.is_closed() {
                let r = self.running.swap_remove(i);
                self.finish(r, StopReason::Cancelled, stats);
            } else if r.max_tokens == 0 {
                let r = self.running.swap_remove(i);
                self.finish(r, StopReason::Length, stats);
            } else {
                i += 1;
            }
        }
        self.admit(text, stats);
        if self.running.is_empty() {
            return false;
        }
        // Decode tokens first, then prefill chunks under the budget.
        let mut budget = self.cfg.max_batch_tokens.max(1);
        let mut plan: Vec<(usize, Work)> = Vec::new();
        for (i, r) in self.running.iter().enumerate() {
            if let Some(t) = r.next {
                if budget == 0 {
                    break;
                }
                plan.push((i, Work::Decode(t)));
                budget -= 1;
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            if r.next.is_none() && budget > 0 {
                let n = (r.prompt.len() - r.prefilled).min(budget);
                plan.push((i, Work::Prefill(n)));
                budget -= n;
            }
        }
        let mut batch = Batch::new();
        for (i, work) in &plan {
            let r = &self.running[*i];
            match work {
                Work::Decode(t) => {
                    batch.push(r.id, &[*t], r.prompt.len() + r.stats.generated_tokens - 1)
                }
                Work::Prefill(n) => {
                    batch.push(r.id, &r.prompt[r.prefilled..r.prefilled + n], r.prefilled)
                }
            }
        }
        let rows = model
            .forward(&batch, &mut self.cache, LogitsAt::LastOfEach)
            .and_then(|l| Ok(l.to_vec2::<f32>()?));
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                // Fail every sequence in the batch; the others keep running.
                tracing::error!(error = %e, "forward pass failed");
                let mut failed: Vec<usize> = plan.iter().map(|(i, _)| *i).collect();
                failed.sort_unstable_by(|a, b| b.cmp(a));
                for i in failed {
                    let r = self.running.swap_remove(i);
                    self.cache.remove(r.id);
                    let _ = r.events.send(GenerateEvent::Error(e.to_string()));
                }
                return true;
            }
        };
        let mut done: Vec<(usize, StopReason)> = Vec::new();
        for ((i, work), mut logits) in plan.into_iter().zip(rows) {
            let r = &mut self.running[i];
            if let Work::Prefill(n) = work {
                r.prefilled += n;
                stats.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
                if r.prefilled < r.prompt.len() {
                    continue; // more prompt to read; these logits are not needed
                }
            }
            let token = match r.sampler.sample(&mut logits) {
                Ok(t) => t,
                Err(e) => {
                    let _ = r
                        .events
                        .send(GenerateEvent::Error(EngineError::Ops(e).to_string()));
                    done.push((i, StopReason::Cancelled));
                    continue;
                }
            };
            if r.first_token_at.is_none() {
                let now = Instant::now();
                r.stats.prefill = now - r.admitted_at;
                r.first_token_at = Some(now);
            }
            if let Some(stop) = r.accept(token, text, stats) {
                done.push((i, stop));
            }
        }
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (i, stop) in done {
            let r = self.running.swap_remove(i);
            self.finish(r, stop, stats);
        }
        true
    }

    /// Ends a sequence: frees its cache and sends its closing stats.
    fn finish(&mut self, mut r: Running, stop: StopReason, stats: &EngineStats) {
        self.cache.remove(r.id);
        r.stats.stop = stop;
        if let Some(first) = r.first_token_at {
            r.stats.decode = first.elapsed();
        }
        let counter = if stop == StopReason::Cancelled {
            &stats.generations_cancelled
        } else {
            &stats.generations_finished
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let _ = r.events.send(GenerateEvent::Done(r.stats.clone()));
    }
}

impl Running {
    /// Takes a sampled token: streams its text, and says whether the sequence ends here.
    fn accept(&mut self, token: u32, text: &TextSide, stats: &EngineStats) -> Option<StopReason> {
        if self.stop_ids.contains(&token) {
            return Some(self.flush(StopReason::EndOfTurn));
        }
        self.stats.generated_tokens += 1;
        stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        let piece = self.stops.push(&self.decoder.push(&text.tokenizer, token));
        if !piece.text.is_empty() && self.events.send(GenerateEvent::Text(piece.text)).is_err() {
            return Some(StopReason::Cancelled);
        }
        if piece.stopped {
            return Some(StopReason::StopString);
        }
        if self.stats.generated_tokens == self.max_tokens {
            return Some(self.flush(StopReason::Length));
        }
        self.next = Some(token);
        None
    }

    /// Sends the text held back (an incomplete character, a possible stop string) at the end.
    fn flush(&mut self, reason: StopReason) -> StopReason {
        let tail = self.stops.push(&self.decoder.finish());
        let (text, reason) = if tail.stopped {
            (tail.text, StopReason::StopString)
        } else {
            (tail.text + &self.stops.finish(), reason)
        };
        if !text.is_empty() {
            let _ = self.events.send(GenerateEvent::Text(text));
        }
        reason
    }
}
