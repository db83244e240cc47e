//! The device worker: one OS thread owns the models and the device; async code talks to it
//! through a cloneable [`EngineHandle`]. Embedding jobs run as they arrive, between two steps of
//! the continuous-batching [`Scheduler`], so a question's embedding never waits for answers to
//! finish. A generation whose receiver is gone stops at its next step; beyond `max_waiting`
//! queued generations, new ones are refused at once ([`EngineError::Busy`]).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use tokio::sync::{mpsc, oneshot};

use super::generate::StopReason;
use super::scheduler::{Pending, Scheduler, SchedulerConfig};
use crate::error::{EngineError, ModelError};
use crate::models::bert::Embedder;
use crate::models::chat_template::{ChatMessage, ChatTemplate};
use crate::models::gguf::GgufFile;
use crate::models::kv_blocks::DEFAULT_BLOCK_SIZE;
use crate::models::kv_cache::KvCache;
use crate::models::llama::{Llama, QuantMode};
use crate::models::tokenizer::BpeTokenizer;
use crate::ops::sampling::{LogitsProcessor, SamplingParams};

type Result<T> = std::result::Result<T, EngineError>;

/// The generator's text side (tokenizer and chat template), shared with request handlers that
/// build prompts and count tokens.
pub struct TextSide {
    pub tokenizer: BpeTokenizer,
    pub template: ChatTemplate,
    /// Tokens the model can attend to.
    pub context_length: usize,
}

impl TextSide {
    /// A byte-level text side of `vocab` ids ([`BpeTokenizer::synthetic`]) whose template
    /// writes each message's text on its own line: for engines over seeded random weights with
    /// no model file at hand.
    pub fn synthetic(vocab: usize, context_length: usize) -> Result<Self> {
        Ok(Self {
            tokenizer: BpeTokenizer::synthetic(vocab)?,
            template: ChatTemplate::new(
                "{% for m in messages %}{{ m.content }}\n{% endfor %}",
                "",
                "<|endoftext|>",
            )?,
            context_length,
        })
    }

    /// A conversation as prompt token ids, ending with the assistant's turn opened.
    pub fn encode_chat(&self, system: &str, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        Ok(self
            .template
            .encode(&self.tokenizer, system, messages, true)?)
    }

    /// Token ids whose text contains any of `chars` (to forbid them in a generation).
    pub fn tokens_containing(&self, chars: &[char]) -> Vec<u32> {
        (0..self.tokenizer.vocab_size() as u32)
            .filter(|&id| String::from_utf8_lossy(self.tokenizer.token_bytes(id)).contains(chars))
            .collect()
    }
}

/// Loads the generator from a GGUF file: the model for the worker, the text side for everyone.
pub fn load_generator(path: &Path, device: &Device, mode: QuantMode) -> Result<(Llama, TextSide)> {
    let mut file = GgufFile::open(path)?;
    let model = Llama::from_gguf(&mut file, device, mode)?;
    let text = text_side(&file, model.config().max_position_embeddings)?;
    Ok((model, text))
}

/// Seeded random weights of the shape in `config` (a Hugging Face `config.json`, or the folder
/// holding one), with the tokenizer and chat template of the GGUF file `tokenizer`: the engine at
/// a real model's shape, for benchmarks (`--load-format dummy`). Ids beyond that tokenizer's
/// vocabulary decode to nothing.
pub fn load_dummy_generator(
    config: &Path,
    tokenizer: &Path,
    device: &Device,
    mode: QuantMode,
) -> Result<(Llama, TextSide)> {
    let config = if config.is_dir() {
        config.join("config.json")
    } else {
        config.to_path_buf()
    };
    let cfg = Llama::read_hf_config(&config)?;
    let model = Llama::dummy(&cfg, device, mode, 0)?;
    let text = text_side(&GgufFile::open(tokenizer)?, cfg.max_position_embeddings)?;
    Ok((model, text))
}

fn text_side(file: &GgufFile, context_length: usize) -> Result<TextSide> {
    let tokenizer = BpeTokenizer::from_gguf(file.content())?;
    let source = tokenizer
        .chat_template()
        .ok_or_else(|| ModelError::Gguf("the GGUF file carries no chat template".into()))?;
    let token_text = |id: Option<u32>| {
        id.and_then(|id| tokenizer.token_text(id))
            .unwrap_or("")
            .to_string()
    };
    let template = ChatTemplate::new(
        source,
        &token_text(tokenizer.bos_id()),
        &token_text(tokenizer.eos_id()),
    )?;
    Ok(TextSide {
        tokenizer,
        template,
        context_length,
    })
}

/// What to generate.
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids the model may not emit.
    pub suppress: Vec<u32>,
    /// Edit the logits at each step, in order (citation constraints, repeat blocking).
    pub processors: Vec<Box<dyn LogitsProcessor>>,
    /// Generation ends before any of these strings; they are not sent.
    pub stop: Vec<String>,
    /// Generation ends at any of these token ids (besides the model's own end of turn).
    pub stop_token_ids: Vec<u32>,
    /// Generate `max_tokens` tokens, ignoring the model's end-of-turn ids (load tests).
    pub ignore_eos: bool,
    /// Report each generated token's log-probability and this many most likely alternatives
    /// (at most [`crate::ops::sampling::MAX_TOP_LOGPROBS`]).
    pub logprobs: Option<usize>,
    /// Prefix-cache partition: cached prompt blocks are shared only between requests with the
    /// same salt (one per tenant or patient), so no one reuses, or times, another's prompt.
    pub cache_salt: u64,
}

impl GenerateRequest {
    /// A request with default sampling (greedy) and no stops or processors.
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling: SamplingParams::default(),
            suppress: Vec::new(),
            processors: Vec::new(),
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            cache_salt: 0,
        }
    }
}

/// Counts and timings of one generation.
#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Prompt tokens found in the prefix cache (their forward pass skipped).
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    pub stop: StopReason,
    /// From submission to the start of the prompt's forward pass.
    pub queued: Duration,
    /// The prompt's forward pass (which yields the first token).
    pub prefill: Duration,
    /// The remaining forward passes.
    pub decode: Duration,
}

/// A generated token's log-probability under the model (before penalties, temperature and
/// filters) and the most likely alternatives at that step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    /// The token's text (bytes that are not whole UTF-8 characters shown as U+FFFD).
    pub text: String,
    pub logprob: f32,
    /// `(token, text, logprob)`, most likely first.
    pub top: Vec<(u32, String, f32)>,
}

/// Streamed from the worker to the request.
#[derive(Clone, Debug)]
pub enum GenerateEvent {
    /// Newly completed text (whole UTF-8 characters).
    Text(String),
    /// Sent for each generated token when the request asked for log-probabilities, before the
    /// token's text (which may come later, held back for a stop string or a split character).
    Logprob(TokenLogprob),
    Done(GenerationStats),
    Error(String),
}

/// Embeddings of a batch of texts and the tokens they took.
#[derive(Clone, Debug)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: usize,
}

enum Job {
    Embed {
        texts: Vec<String>,
        reply: oneshot::Sender<Result<Embedded>>,
    },
    Generate {
        request: GenerateRequest,
        events: mpsc::UnboundedSender<GenerateEvent>,
        queued_at: Instant,
    },
}

/// Names and shapes the server reports.
#[derive(Clone, Debug)]
pub struct EngineInfo {
    pub embedder: String,
    pub generator: String,
}

/// Running totals kept by the worker (exported as metrics by the server).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub generated_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generations_finished: AtomicU64,
    /// Generations stopped because their client went away.
    pub generations_cancelled: AtomicU64,
    pub embedded_texts: AtomicU64,
    /// Generations submitted and not yet admitted to the running set.
    pub waiting: AtomicU64,
    /// Prompt tokens whose forward pass the prefix cache saved.
    pub cached_prompt_tokens: AtomicU64,
    /// Sequences whose blocks were taken back to let others decode (recomputed later).
    pub preemptions: AtomicU64,
    /// KV cache blocks: all, held by sequences, free but holding a reusable prefix.
    pub kv_blocks_total: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_cached: AtomicU64,
    /// Full prompt blocks looked up in the prefix cache, and found.
    pub prefix_blocks_looked_up: AtomicU64,
    pub prefix_blocks_hit: AtomicU64,
    /// Decode steps replayed from a CUDA graph, and the graphs recorded so far.
    pub graph_replays: AtomicU64,
    pub graphs_recorded: AtomicU64,
}

/// Engine limits.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Generations allowed to wait for a slot; beyond it, requests are refused at once.
    pub max_waiting: usize,
    /// Bytes of K/V storage (all layers) the paged cache takes.
    pub kv_cache_bytes: usize,
    /// Token positions per KV block.
    pub block_size: usize,
}

/// Default K/V storage: 512 MiB (about 22,800 tokens of SmolLM2-135M in f16).
pub const DEFAULT_KV_CACHE_BYTES: usize = 512 << 20;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            max_waiting: 64,
            kv_cache_bytes: DEFAULT_KV_CACHE_BYTES,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

/// A cloneable handle on the device worker.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: Sender<Job>,
    text: Arc<TextSide>,
    info: Arc<EngineInfo>,
    stats: Arc<EngineStats>,
    max_waiting: usize,
    /// Token positions the whole KV cache holds.
    cache_tokens: usize,
}

impl EngineHandle {
    /// Starts the worker thread, which owns `embedder` and `model` from now on. Fails when the
    /// KV cache budget holds no block.
    pub fn start(
        embedder: Embedder,
        model: Llama,
        text: TextSide,
        info: EngineInfo,
        cfg: EngineConfig,
    ) -> Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel();
        let text = Arc::new(text);
        let stats = Arc::new(EngineStats::default());
        let cache = KvCache::with_memory(model.config(), cfg.kv_cache_bytes, cfg.block_size)?;
        let cache_tokens = cache.usage().total * cache.block_size();
        let worker = Worker {
            embedder,
            model,
            text: text.clone(),
            stats: stats.clone(),
            jobs: rx,
            scheduler: Scheduler::new(cfg.scheduler, cache),
        };
        std::thread::Builder::new()
            .name("cited-device".into())
            .spawn(move || worker.run())
            .expect("spawning the device worker thread");
        Ok(Self {
            jobs,
            text,
            info: Arc::new(info),
            stats,
            max_waiting: cfg.max_waiting,
            cache_tokens,
        })
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Whether a new generation would be refused now (the waiting queue is full).
    pub fn is_busy(&self) -> bool {
        self.stats.waiting.load(Ordering::Relaxed) as usize >= self.max_waiting
    }

    pub fn text(&self) -> &TextSide {
        &self.text
    }

    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Embeds `texts` (unit vectors), in one batch on the worker.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Embedded> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Embed { texts, reply })
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Queues a generation; events arrive on the returned receiver. Dropping the receiver stops
    /// the generation at its next step.
    pub fn generate(
        &self,
        request: GenerateRequest,
    ) -> Result<mpsc::UnboundedReceiver<GenerateEvent>> {
        request
            .sampling
            .validate()
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        if request.prompt.is_empty() {
            return Err(EngineError::Invalid("empty prompt".into()));
        }
        if request
            .logprobs
            .is_some_and(|n| n > crate::ops::sampling::MAX_TOP_LOGPROBS)
        {
            return Err(EngineError::Invalid(format!(
                "logprobs: at most {} alternatives",
                crate::ops::sampling::MAX_TOP_LOGPROBS
            )));
        }
        if request.prompt.len() + request.max_tokens > self.text.context_length {
            return Err(EngineError::Invalid(format!(
                "prompt of {} tokens plus max_tokens {} exceeds the model's context of {}",
                request.prompt.len(),
                request.max_tokens,
                self.text.context_length
            )));
        }
        let total = request.prompt.len() + request.max_tokens;
        if total > self.cache_tokens {
            return Err(EngineError::Invalid(format!(
                "prompt of {} tokens plus max_tokens {} needs {total} positions; the whole KV \
                 cache holds {} (raise --kv-cache-memory or lower max_tokens)",
                request.prompt.len(),
                request.max_tokens,
                self.cache_tokens
            )));
        }
        if self.is_busy() {
            return Err(EngineError::Busy);
        }
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        // Unbounded, so a slow client never stalls the worker: a generation sends at most
        // max_tokens + 2 events.
        let (events, rx) = mpsc::unbounded_channel();
        self.jobs
            .send(Job::Generate {
                request,
                events,
                queued_at: Instant::now(),
            })
            .map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }
}

struct Worker {
    embedder: Embedder,
    model: Llama,
    text: Arc<TextSide>,
    stats: Arc<EngineStats>,
    jobs: Receiver<Job>,
    scheduler: Scheduler,
}

impl Worker {
    fn run(mut self) {
        loop {
            // Block for work only when no generation runs or waits.
            if !self.scheduler.has_work() {
                match self.jobs.recv() {
                    Ok(job) => self.accept(job),
                    Err(_) => return, // every handle dropped
                }
            }
            // Embeddings that arrived meanwhile go first, then one batched step.
            self.serve_pending_jobs();
            self.scheduler.step(&self.model, &self.text, &self.stats);
        }
    }

    /// Takes every job already sent: embeddings now, generations into the queue.
    fn serve_pending_jobs(&mut self) {
        loop {
            match self.jobs.try_recv() {
                Ok(job) => self.accept(job),
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return,
            }
        }
    }

    fn accept(&mut self, job: Job) {
        match job {
            Job::Embed { texts, reply } => {
                let result = self.embed(&texts);
                let _ = reply.send(result);
            }
            Job::Generate {
                request,
                events,
                queued_at,
            } => self.scheduler.waiting.push_back(Pending {
                request,
                events,
                queued_at,
            }),
        }
    }

    fn embed(&self, texts: &[String]) -> Result<Embedded> {
        if texts.is_empty() {
            return Ok(Embedded {
                vectors: Vec::new(),
                tokens: 0,
            });
        }
        let tokens = self.embedder.tokenize(texts)?.iter().map(|t| t.len()).sum();
        let vectors = self.embedder.embed(texts)?.to_vec2::<f32>()?;
        self.stats
            .embedded_texts
            .fetch_add(texts.len() as u64, Ordering::Relaxed);
        Ok(Embedded { vectors, tokens })
    }
}
