//! Continuous batching on the device worker. Each step packs, under a token budget, one decode
//! token for every running sequence first, then prefill chunks of sequences still reading their
//! prompt (chunked prefill: a long RAG prompt never stalls the streams already running), runs one
//! forward pass for all of them, and samples each sequence's next token with its own sampler. A
//! sequence whose client is gone is dropped at the next step and its blocks freed.
//!
//! Memory is the paged KV cache ([`KvCache`]): a sequence is admitted only when the free blocks
//! hold its tokens so far plus one; it starts on the cached blocks of the longest prefix it shares
//! with an earlier sequence of the same cache salt, skipping their prefill. When a step's decode
//! tokens need more blocks than are free, the most recently admitted sequences are preempted:
//! their blocks are freed and they wait at the head of the queue to recompute their history
//! (prompt and tokens generated so far, often from their own still-cached prefix) when blocks
//! free up; their output continues unchanged.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::mpsc;

use super::generate::StopReason;
use super::stop::StopMatcher;
use super::worker::{
    EngineStats, GenerateEvent, GenerateRequest, GenerationStats, TextSide, TokenLogprob,
};
use crate::error::EngineError;
use crate::models::kv_cache::KvCache;
use crate::models::llama::Llama;
use crate::models::tokenizer::StreamDecoder;
use crate::models::{Batch, LogitsAt};
use crate::ops::sampling::{top_logprobs, DevicePlan, Sampler};

/// A planned row's share of a step's logits.
enum Row {
    /// Its sequence is still reading its prompt: no token is drawn.
    Unused,
    /// Its logits, for the sequence's sampler on the host.
    Logits(Vec<f32>),
    /// The token the sampling kernel chose (`None`: no token was allowed).
    Chosen(Option<u32>),
}

/// Scheduler limits.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Sequences decoded together.
    pub max_running: usize,
    /// Tokens (decode tokens plus prefill chunks) in one forward pass.
    pub max_batch_tokens: usize,
    /// On a GPU, run steps that only decode through CUDA graphs
    /// ([`crate::models::decode_graph`]); no effect elsewhere.
    pub cuda_graphs: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_running: 16,
            max_batch_tokens: 256,
            cuda_graphs: false,
        }
    }
}

/// A generation waiting for a slot.
pub(crate) struct Pending {
    pub request: GenerateRequest,
    pub events: mpsc::UnboundedSender<GenerateEvent>,
    pub queued_at: Instant,
}

/// A sequence admitted at least once.
struct Running {
    id: u64,
    /// The prompt, then every sampled token: all the tokens whose K/V the sequence needs.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Leading tokens whose K/V are in the cache.
    computed: usize,
    salt: u64,
    max_tokens: usize,
    /// Alternatives to report with each token's log-probability (`None`: no log-probabilities).
    logprobs: Option<usize>,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    stop_ids: Vec<u32>,
    events: mpsc::UnboundedSender<GenerateEvent>,
    stats: GenerationStats,
    admitted_at: Instant,
    first_token_at: Option<Instant>,
}

impl Running {
    /// Tokens still to run through the model (1 for a decode step).
    fn pending(&self) -> usize {
        self.tokens.len() - self.computed
    }
}

pub(crate) struct Scheduler {
    cfg: SchedulerConfig,
    cache: KvCache,
    /// In admission order (the newest last: the first to be preempted).
    running: Vec<Running>,
    /// Preempted sequences, resumed before any new admission.
    preempted: VecDeque<Running>,
    pub waiting: VecDeque<Pending>,
    next_id: u64,
    /// The decode steps' graphs, with `cfg.cuda_graphs`.
    #[cfg(feature = "cuda")]
    graphs: Option<crate::models::decode_graph::DecodeGraphs>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, cache: KvCache) -> Self {
        Self {
            cfg,
            cache,
            running: Vec::new(),
            preempted: VecDeque::new(),
            waiting: VecDeque::new(),
            next_id: 0,
            #[cfg(feature = "cuda")]
            graphs: cfg.cuda_graphs.then(|| {
                crate::models::decode_graph::DecodeGraphs::new(
                    cfg.max_running,
                    cfg.max_batch_tokens,
                )
            }),
        }
    }

    /// Queues a generation directly, for tools and benches that drive a scheduler on their own
    /// thread ([`run_offline`]); the server goes through [`super::worker::EngineHandle`]. Its
    /// events arrive on the receiver.
    pub fn submit(
        &mut self,
        request: GenerateRequest,
        stats: &EngineStats,
    ) -> mpsc::UnboundedReceiver<GenerateEvent> {
        let (events, rx) = mpsc::unbounded_channel();
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        self.waiting.push_back(Pending {
            request,
            events,
            queued_at: Instant::now(),
        });
        rx
    }

    /// Whether a step has anything to do.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.preempted.is_empty() || !self.waiting.is_empty()
    }

    /// Starts `r` on its cached prefix if the cache holds the rest of its tokens plus one; on
    /// success it joins the running set, otherwise it comes back.
    fn try_start(&mut self, mut r: Running) -> Result<(), Box<Running>> {
        let reused = self.cache.start(r.id, &r.tokens, r.salt);
        let needed = self.cache.blocks_needed(r.id, r.tokens.len() - reused + 1);
        if needed > self.cache.available_blocks() {
            self.cache.remove(r.id);
            return Err(Box::new(r));
        }
        r.computed = reused;
        self.running.push(r);
        Ok(())
    }

    /// Resumes preempted sequences, then admits waiting ones, while slots and blocks allow.
    fn admit(&mut self, text: &TextSide, stats: &EngineStats) {
        while self.running.len() < self.cfg.max_running {
            let Some(r) = self.preempted.pop_front() else {
                break;
            };
            if let Err(r) = self.try_start(r) {
                self.preempted.push_front(*r);
                return;
            }
        }
        while self.running.len() < self.cfg.max_running {
            let Some(mut p) = self.waiting.pop_front() else {
                break;
            };
            stats.waiting.fetch_sub(1, Ordering::Relaxed);
            if p.events.is_closed() {
                // Left while it waited.
                stats.generations_cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let total = p.request.prompt.len() + p.request.max_tokens;
            if let Err(e) = self.cache.check_fits(total) {
                // The handle refuses these before they queue; kept for any other caller.
                let _ = p.events.send(GenerateEvent::Error(e.to_string()));
                continue;
            }
            let now = Instant::now();
            let mut stop_ids = if p.request.ignore_eos {
                Vec::new()
            } else {
                text.tokenizer.stop_ids()
            };
            stop_ids.extend(&p.request.stop_token_ids);
            let mut sampler = Sampler::new(
                p.request.sampling.clone(),
                std::mem::take(&mut p.request.suppress),
            );
            for proc in std::mem::take(&mut p.request.processors) {
                sampler = sampler.with_processor(proc);
            }
            self.next_id += 1;
            let r = Running {
                id: self.next_id,
                prompt_len: p.request.prompt.len(),
                computed: 0,
                salt: p.request.cache_salt,
                max_tokens: p.request.max_tokens,
                logprobs: p.request.logprobs,
                sampler,
                decoder: StreamDecoder::new(),
                stops: StopMatcher::new(std::mem::take(&mut p.request.stop)),
                stop_ids,
                stats: GenerationStats {
                    prompt_tokens: p.request.prompt.len(),
                    cached_prompt_tokens: 0,
                    generated_tokens: 0,
                    stop: StopReason::Length,
                    queued: now - p.queued_at,
                    prefill: Duration::ZERO,
                    decode: Duration::ZERO,
                },
                tokens: std::mem::take(&mut p.request.prompt),
                events: p.events,
                admitted_at: now,
                first_token_at: None,
            };
            match self.try_start(r) {
                Ok(()) => {
                    let r = self.running.last_mut().expect("just started");
                    r.stats.cached_prompt_tokens = r.computed;
                    stats
                        .cached_prompt_tokens
                        .fetch_add(r.computed as u64, Ordering::Relaxed);
                }
                Err(r) => {
                    // Not enough free blocks yet: first in line once running sequences end.
                    self.preempted.push_back(*r);
                    return;
                }
            }
        }
    }

    /// Frees the newest running sequence's blocks and queues it to recompute its history.
    fn preempt_newest(&mut self, stats: &EngineStats) {
        if let Some(mut r) = self.running.pop() {
            self.cache.remove(r.id);
            r.computed = 0;
            stats.preemptions.fetch_add(1, Ordering::Relaxed);
            self.preempted.push_front(r);
        }
    }

    /// Decode tokens first, then prefill chunks, under the token budget and the free blocks.
    /// Preempts the newest sequences while the decode tokens do not fit.
    fn plan(&mut self, stats: &EngineStats) -> Vec<(usize, usize)> {
        loop {
            let decode_blocks: usize = self
                .running
                .iter()
                .filter(|r| r.pending() == 1)
                .map(|r| self.cache.blocks_needed(r.id, 1))
                .sum();
            if decode_blocks <= self.cache.available_blocks() || self.running.len() <= 1 {
                break;
            }
            self.preempt_newest(stats);
        }
        let mut budget = self.cfg.max_batch_tokens.max(1);
        let mut free = self.cache.available_blocks();
        let mut plan: Vec<(usize, usize)> = Vec::new();
        for (i, r) in self.running.iter().enumerate() {
            if r.pending() == 1 && budget > 0 {
                let need = self.cache.blocks_needed(r.id, 1);
                if need <= free {
                    free -= need;
                    budget -= 1;
                    plan.push((i, 1));
                }
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            if r.pending() > 1 && budget > 0 {
                let n = r
                    .pending()
                    .min(budget)
                    .min(self.cache.room_with(r.id, free));
                if n > 0 {
                    free -= self.cache.blocks_needed(r.id, n);
                    budget -= n;
                    plan.push((i, n));
                }
            }
        }
        plan
    }

    /// One forward pass over the running set. Returns false when there was nothing to run.
    pub fn step(&mut self, model: &Llama, text: &TextSide, stats: &EngineStats) -> bool {
        // Drop sequences whose client left; finish those asking for no tokens.
        let mut i = 0;
        while i < self.running.len() {
            let r = &self.running[i];
            if r.events.is_closed() {
                let r = self.running.remove(i);
                self.finish(r, StopReason::Cancelled, stats);
            } else if r.max_tokens == 0 {
                let r = self.running.remove(i);
                self.finish(r, StopReason::Length, stats);
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.preempted.len() {
            if self.preempted[i].events.is_closed() {
                let r = self.preempted.remove(i).expect("in range");
                self.finish(r, StopReason::Cancelled, stats);
            } else {
                i += 1;
            }
        }
        self.admit(text, stats);
        let mut plan = self.plan(stats);
        while plan.is_empty() && self.running.len() > 1 {
            // Prompts half-read hold every block: the newest gives way to the others.
            self.preempt_newest(stats);
            plan = self.plan(stats);
        }
        if plan.is_empty() {
            self.publish(stats);
            return false;
        }
        let mut batch = Batch::new();
        for &(i, n) in &plan {
            let r = &self.running[i];
            batch.push(r.id, &r.tokens[r.computed..r.computed + n], r.computed);
        }
        let rows = self
            .forward(model, &batch, stats)
            .and_then(|l| self.pick(&plan, &l));
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                // Fail every sequence in the batch; the others keep running.
                tracing::error!(error = %e, "forward pass failed");
                let mut failed: Vec<usize> = plan.iter().map(|(i, _)| *i).collect();
                failed.sort_unstable_by(|a, b| b.cmp(a));
                for i in failed {
                    let r = self.running.remove(i);
                    self.cache.remove(r.id);
                    let _ = r.events.send(GenerateEvent::Error(e.to_string()));
                }
                self.publish(stats);
                return true;
            }
        };
        let mut done: Vec<(usize, StopReason)> = Vec::new();
        for ((i, n), row) in plan.into_iter().zip(rows) {
            let r = &mut self.running[i];
            let was_prompt = r.computed < r.prompt_len;
            r.computed += n;
            self.cache.register(r.id, &r.tokens[..r.computed], r.salt);
            if was_prompt {
                let read = r.computed.min(r.prompt_len) - (r.computed - n).min(r.prompt_len);
                stats
                    .prompt_tokens
                    .fetch_add(read as u64, Ordering::Relaxed);
            }
            if r.computed < r.tokens.len() {
                continue; // more history to read; these logits are not needed
            }
            let mut before = None;
            let chosen = match row {
                // Chosen by the sampling kernel from the sampler's own settings.
                Row::Chosen(Some(t)) => {
                    r.sampler.accept(t);
                    Ok(t)
                }
                Row::Chosen(None) => Err(crate::error::OpsError::Invalid(
                    "no token is allowed by the logits".into(),
                )),
                Row::Logits(mut logits) => {
                    // The model's own distribution, before the sampler edits the logits.
                    before = r.logprobs.map(|n| {
                        let (log_norm, top) = top_logprobs(&logits, n);
                        (log_norm, top, logits.clone())
                    });
                    r.sampler.sample(&mut logits)
                }
                Row::Unused => unreachable!("a row that needs a token is picked"),
            };
            let token = match chosen {
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
            let logprob = before.map(|(log_norm, top, raw)| {
                let name =
                    |t: u32| String::from_utf8_lossy(text.tokenizer.token_bytes(t)).into_owned();
                TokenLogprob {
                    token,
                    text: name(token),
                    logprob: raw[token as usize] - log_norm,
                    top: top.into_iter().map(|(t, lp)| (t, name(t), lp)).collect(),
                }
            });
            if let Some(stop) = r.accept(token, logprob, text, stats) {
                done.push((i, stop));
            }
        }
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (i, stop) in done {
            let r = self.running.remove(i);
            self.finish(r, stop, stats);
        }
        self.publish(stats);
        true
    }

    /// The logits of the last token of each sequence in `batch`: through a decode graph when
    /// one takes the batch, else the model's forward pass.
    fn forward(
        &mut self,
        model: &Llama,
        batch: &Batch,
        stats: &EngineStats,
    ) -> Result<Tensor, EngineError> {
        #[cfg(feature = "cuda")]
        if let Some(graphs) = self.graphs.as_mut() {
            let logits = graphs.forward(model, batch, &mut self.cache);
            stats
                .graph_replays
                .store(graphs.replays(), Ordering::Relaxed);
            stats
                .graphs_recorded
                .store(graphs.recorded() as u64, Ordering::Relaxed);
            if let Some(logits) = logits? {
                return Ok(logits);
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = stats;
        Ok(model.forward(batch, &mut self.cache, LogitsAt::LastOfEach)?)
    }

    /// What each planned row's logits become: the rows whose sequences need no token yet are
    /// left on the device; on a GPU, the kernels choose the tokens of the rows whose samplers
    /// they can serve (no log-probabilities asked, every logits processor's edit known before
    /// the logits: [`Sampler::device_plan`]); every other row comes to the host for its
    /// sampler.
    fn pick(&self, plan: &[(usize, usize)], logits: &Tensor) -> Result<Vec<Row>, EngineError> {
        let mut rows: Vec<Row> = Vec::with_capacity(plan.len());
        let (mut host, mut kernel, mut plans) = (Vec::new(), Vec::new(), Vec::new());
        let vocab = logits.dim(1)?;
        for (j, &(i, n)) in plan.iter().enumerate() {
            let r = &self.running[i];
            rows.push(Row::Unused);
            if r.computed + n < r.tokens.len() {
                continue;
            }
            let on_device = (logits.device().is_cuda() && r.logprobs.is_none())
                .then(|| r.sampler.device_plan(vocab))
                .flatten();
            match on_device {
                Some(p) => {
                    kernel.push(j);
                    plans.push(p);
                }
                None => host.push(j),
            }
        }
        let select = |at: &[usize]| -> Result<Tensor, EngineError> {
            if at.len() == plan.len() {
                return Ok(logits.clone());
            }
            let idx: Vec<u32> = at.iter().map(|&j| j as u32).collect();
            Ok(logits.index_select(&Tensor::new(idx, logits.device())?, 0)?)
        };
        if !host.is_empty() {
            for (&j, row) in host.iter().zip(select(&host)?.to_vec2::<f32>()?) {
                rows[j] = Row::Logits(row);
            }
        }
        if !kernel.is_empty() {
            let tokens = self.choose_on_device(plan, &kernel, &plans, &select(&kernel)?)?;
            for (&j, t) in kernel.iter().zip(tokens) {
                rows[j] = Row::Chosen(t);
            }
        }
        Ok(rows)
    }

    /// The kernels' tokens for the rows `at` of the plan, whose logits are `logits` (edited
    /// in place) and whose samplers' steps are `device`.
    #[cfg(feature = "cuda")]
    fn choose_on_device(
        &self,
        plan: &[(usize, usize)],
        at: &[usize],
        device: &[DevicePlan],
        logits: &Tensor,
    ) -> Result<Vec<Option<u32>>, EngineError> {
        use crate::ops::sampling::{gpu, Edit};
        let logits = logits.contiguous()?;
        let edits: Vec<(usize, &Edit)> = device.iter().map(|d| &d.edit).enumerate().collect();
        gpu::apply_edits(&logits, &edits)?;
        let samplers: Vec<&Sampler> = at
            .iter()
            .map(|&j| &self.running[plan[j].0].sampler)
            .collect();
        // A sampler without penalties needs no entries (the kernel would change nothing).
        let entries: Vec<_> = samplers
            .iter()
            .map(|s| {
                if s.params().penalizes() {
                    s.penalty_entries()
                } else {
                    Vec::new()
                }
            })
            .collect();
        let reqs: Vec<gpu::Row<'_>> = samplers
            .iter()
            .zip(&entries)
            .zip(device)
            .map(|((s, e), d)| gpu::Row {
                params: s.params(),
                step: s.step(),
                penalties: e,
                bans: &d.bans,
            })
            .collect();
        let mut step = gpu::Step::new(&logits, &reqs)?;
        step.launch()?;
        Ok(step.read()?)
    }

    #[cfg(not(feature = "cuda"))]
    fn choose_on_device(
        &self,
        _plan: &[(usize, usize)],
        _at: &[usize],
        _device: &[DevicePlan],
        _logits: &Tensor,
    ) -> Result<Vec<Option<u32>>, EngineError> {
        Err(EngineError::Ops(crate::error::OpsError::Device(
            "logits on a GPU in a build without CUDA".into(),
        )))
    }

    /// Copies the cache's counts into the shared stats.
    fn publish(&self, stats: &EngineStats) {
        let u = self.cache.usage();
        stats
            .kv_blocks_total
            .store(u.total as u64, Ordering::Relaxed);
        stats.kv_blocks_used.store(u.used as u64, Ordering::Relaxed);
        stats
            .kv_blocks_cached
            .store(u.cached as u64, Ordering::Relaxed);
        stats
            .prefix_blocks_looked_up
            .store(u.prefix_lookups, Ordering::Relaxed);
        stats
            .prefix_blocks_hit
            .store(u.prefix_hits, Ordering::Relaxed);
    }

    /// Ends a sequence: frees its blocks and sends its closing stats.
    fn finish(&mut self, mut r: Running, stop: StopReason, stats: &EngineStats) {
        self.cache.remove(r.id);
        // Before the client hears of the end: the metrics it reads next count the freed blocks.
        self.publish(stats);
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
    fn accept(
        &mut self,
        token: u32,
        logprob: Option<TokenLogprob>,
        text: &TextSide,
        stats: &EngineStats,
    ) -> Option<StopReason> {
        if self.stop_ids.contains(&token) {
            return Some(self.flush(StopReason::EndOfTurn));
        }
        if let Some(lp) = logprob {
            if self.events.send(GenerateEvent::Logprob(lp)).is_err() {
                return Some(StopReason::Cancelled);
            }
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
        self.tokens.push(token);
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

/// What one request of [`run_offline`] produced.
#[derive(Debug)]
pub struct OfflineResult {
    pub text: String,
    pub stats: GenerationStats,
}

/// Runs `requests` through a scheduler on this thread until every one finishes: continuous
/// batching exactly as the server's worker runs it, without the HTTP side (benches, the GPU
/// check), counting into `stats`. Results come in submission order; a request that failed
/// gives its error.
pub fn run_offline(
    model: &Llama,
    text: &TextSide,
    cfg: SchedulerConfig,
    cache: KvCache,
    requests: Vec<GenerateRequest>,
    stats: &EngineStats,
) -> Result<Vec<OfflineResult>, EngineError> {
    let mut scheduler = Scheduler::new(cfg, cache);
    let mut receivers: Vec<_> = requests
        .into_iter()
        .map(|r| scheduler.submit(r, stats))
        .collect();
    while scheduler.step(model, text, stats) {}
    if scheduler.has_work() {
        return Err(EngineError::Invalid(
            "requests left that the KV cache cannot hold".into(),
        ));
    }
    receivers
        .iter_mut()
        .map(|rx| {
            let mut out = String::new();
            while let Ok(event) = rx.try_recv() {
                match event {
                    GenerateEvent::Text(t) => out.push_str(&t),
                    GenerateEvent::Logprob(_) => {}
                    GenerateEvent::Done(stats) => {
                        return Ok(OfflineResult { text: out, stats });
                    }
                    GenerateEvent::Error(e) => return Err(EngineError::Invalid(e)),
                }
            }
            Err(EngineError::Invalid(
                "a request ended without a result".into(),
            ))
        })
        .collect()
}
