//! Command-line arguments (clap; each flag also read from a `CITED_*` variable) validated into a
//! [`Config`] that the rest of the program takes by reference.

use std::path::{Path, PathBuf};

use candle_core::Device;
use clap::{Parser, Subcommand};

use crate::models::llama::QuantMode;

/// Errors in the command line or environment, reported before anything loads.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{what} not found at {path} (run models/fetch.sh, or pass --{flag})")]
    MissingModel {
        what: &'static str,
        path: PathBuf,
        flag: &'static str,
    },
    #[error("invalid --device `{0}` (cpu | cuda | cuda:N)")]
    BadDevice(String),
    #[error("--device {0} asks for CUDA, but this binary was built without the `cuda` feature")]
    NoCuda(String),
    #[error("CUDA device {0} is not available: {1}")]
    CudaUnavailable(usize, String),
    #[error("invalid --{0}: {1}")]
    BadValue(&'static str, String),
}

/// cited: cancer questions answered from retrieved clinical passages, with citations.
#[derive(Debug, Parser)]
#[command(name = "cited", version, about)]
pub struct Args {
    #[command(flatten)]
    pub models: ModelArgs,
    /// Folder of the corpus store (SQLite) and its indexes.
    #[arg(long, env = "CITED_DATA_DIR", default_value = "data", global = true)]
    pub data_dir: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the models are and how they run.
#[derive(Debug, clap::Args)]
pub struct ModelArgs {
    /// Sentence-embedding model folder (config.json, model.safetensors, tokenizer.json).
    #[arg(
        long,
        env = "CITED_EMBEDDER",
        default_value = "models/all-minilm-l6-v2",
        global = true
    )]
    pub embedder: PathBuf,
    /// Generator GGUF file.
    #[arg(
        long,
        env = "CITED_GENERATOR",
        default_value = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
        global = true
    )]
    pub generator: PathBuf,
    /// Device the models run on: cpu, cuda or cuda:N.
    #[arg(long, env = "CITED_DEVICE", default_value = "cpu", global = true)]
    pub device: String,
    /// How quantized GGUF matrices are computed: quantized (always on the blocks: least memory,
    /// and a request's text independent of the batch it runs in), auto (prompt chunks of 64
    /// tokens or more in f32: faster prompts, not batch-invariant) or dequantized (always f32).
    #[arg(
        long,
        env = "CITED_WEIGHTS",
        default_value = "quantized",
        global = true
    )]
    pub weights: QuantMode,
    /// gguf: --generator is a GGUF file. dummy: --generator is a Hugging Face config.json (or
    /// its folder) and the weights are seeded random numbers of that shape, quantized like a
    /// GGUF's, for benchmarks at real model shapes; the text means nothing.
    #[arg(long, env = "CITED_LOAD_FORMAT", default_value = "gguf", global = true)]
    pub load_format: LoadFormat,
    /// With --load-format dummy: the GGUF whose tokenizer and chat template the engine uses.
    #[arg(
        long,
        env = "CITED_TOKENIZER",
        default_value = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
        global = true
    )]
    pub tokenizer: PathBuf,
}

/// Where the generator's weights come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadFormat {
    #[default]
    Gguf,
    Dummy,
}

/// How answers are built (serve and ask).
#[derive(Debug, Clone, clap::Args)]
pub struct RagArgs {
    /// Passages retrieved per question, before the context budget.
    #[arg(long, env = "CITED_TOP_K", default_value_t = 4)]
    pub top_k: usize,
    /// Prompt tokens allowed: system prompt, conversation, passages and question.
    #[arg(long, env = "CITED_CONTEXT_TOKENS", default_value_t = 2048)]
    pub context_tokens: usize,
    /// Default and largest number of generated tokens per answer.
    #[arg(long, env = "CITED_MAX_TOKENS", default_value_t = 512)]
    pub max_tokens: usize,
    /// Evidence threshold: the best passage's raw cosine with the question ...
    #[arg(long, env = "CITED_MIN_COSINE", default_value_t = 0.35)]
    pub min_cosine: f32,
    /// ... or its raw BM25 score; below both, the answer abstains.
    #[arg(long, env = "CITED_MIN_BM25", default_value_t = 12.0)]
    pub min_bm25: f32,
    /// Penalty on tokens the answer generated in its last 64 (1 is off).
    #[arg(long, env = "CITED_REPETITION_PENALTY", default_value_t = 1.1)]
    pub repetition_penalty: f32,
    /// How far (logits) below the top choice an opening bracket may be and still be preferred
    /// where an uncited sentence would end; 0 leaves citing entirely to the model.
    #[arg(long, env = "CITED_CITATION_MARGIN", default_value_t = 8.0)]
    pub citation_margin: f32,
    /// Support check: least cosine (embedder) between an answer sentence and the closest
    /// sentence of the passages it cites.
    #[arg(long, env = "CITED_SUPPORT_MIN_COSINE", default_value_t = crate::rag::grounding::SupportConfig::default().min_cosine)]
    pub support_min_cosine: f32,
    /// No run of this many generated tokens may occur twice in an answer (0: off).
    #[arg(long, env = "CITED_NO_REPEAT_NGRAM", default_value_t = 8)]
    pub no_repeat_ngram: usize,
    /// Abstain when the question holds a word the corpus never mentions that the generator's
    /// tokenizer cuts into at least this many tokens (a drug, trial or gene name); 0 turns it off.
    #[arg(long, env = "CITED_RARE_WORD_TOKENS", default_value_t = 1)]
    pub rare_word_tokens: usize,
    /// Sections of answers asked for with `"shape": "sections"` (JSON: `{"sections":
    /// [{"heading": "...", "max_tokens": N}]}`); default: what it means, how care differs,
    /// options and their evidence, questions to ask your care team, bottom line.
    #[arg(long, env = "CITED_ANSWER_TEMPLATE")]
    pub answer_template: Option<PathBuf>,
    /// A cross-encoder reranker (BERT-family classification head: config.json,
    /// model.safetensors, tokenizer.json): retrieved passages are reordered by it.
    #[arg(long, env = "CITED_RERANKER")]
    pub reranker: Option<PathBuf>,
    /// How many retrieved passages the reranker reorders.
    #[arg(long, env = "CITED_RERANK_DEPTH", default_value_t = 20)]
    pub rerank_depth: usize,
}

impl RagArgs {
    pub fn to_config(&self) -> Result<crate::rag::RagConfig, ConfigError> {
        if !(1..=20).contains(&self.top_k) {
            return Err(ConfigError::BadValue("top-k", "between 1 and 20".into()));
        }
        if self.context_tokens < 256 {
            return Err(ConfigError::BadValue(
                "context-tokens",
                "at least 256".into(),
            ));
        }
        if self.max_tokens == 0 {
            return Err(ConfigError::BadValue("max-tokens", "at least 1".into()));
        }
        if !(-1.0..=1.0).contains(&self.min_cosine) {
            return Err(ConfigError::BadValue(
                "min-cosine",
                "between -1 and 1".into(),
            ));
        }
        if !(1.0..=2.0).contains(&self.repetition_penalty) {
            return Err(ConfigError::BadValue(
                "repetition-penalty",
                "between 1 and 2".into(),
            ));
        }
        if !(0.0..=50.0).contains(&self.citation_margin) {
            return Err(ConfigError::BadValue(
                "citation-margin",
                "between 0 and 50".into(),
            ));
        }
        if !(-1.0..=1.0).contains(&self.support_min_cosine) {
            return Err(ConfigError::BadValue(
                "support-min-cosine",
                "between -1 and 1".into(),
            ));
        }
        if self.min_bm25.is_nan() || self.min_bm25 < 0.0 {
            return Err(ConfigError::BadValue("min-bm25", "0 or more".into()));
        }
        Ok(crate::rag::RagConfig {
            top_k: self.top_k,
            context_tokens: self.context_tokens,
            max_tokens: self.max_tokens,
            min_cosine: self.min_cosine,
            min_bm25: self.min_bm25,
            repetition_penalty: self.repetition_penalty,
            citation_margin: self.citation_margin,
            no_repeat_ngram: self.no_repeat_ngram,
            rare_word_tokens: self.rare_word_tokens,
            off_topic_cosine: crate::rag::RagConfig::default().off_topic_cosine,
            near_duplicate: crate::rag::RagConfig::default().near_duplicate,
            reranker: self.reranker.clone(),
            rerank_depth: self.rerank_depth.max(1),
            template: match &self.answer_template {
                Some(path) => crate::rag::template::AnswerTemplate::load(path)
                    .map_err(|e| ConfigError::BadValue("answer-template", e))?,
                None => Default::default(),
            },
            support: crate::rag::grounding::SupportConfig {
                min_cosine: self.support_min_cosine,
                ..Default::default()
            },
        })
    }
}

/// Engine limits (serve and ask). Unset, each takes the default of the device it runs on:
/// the CPU's, sized for a few answers at a time, or a GPU's, sized to keep one busy.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EngineArgs {
    /// Tokens in one forward pass: a decode token per running answer, then prompt chunks
    /// [default: 256 on the CPU, 8192 on a GPU].
    #[arg(long, env = "CITED_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Answers generated together [default: 16 on the CPU, 256 on a GPU].
    #[arg(long, env = "CITED_MAX_RUNNING")]
    pub max_running: Option<usize>,
    /// Answers allowed to wait for a slot; beyond it the API answers 429 with Retry-After
    /// [default: 64 on the CPU, 1024 on a GPU].
    #[arg(long, env = "CITED_MAX_WAITING")]
    pub max_waiting: Option<usize>,
    /// Memory for the paged KV cache (all layers, f16), in MiB. It bounds how many answer
    /// tokens are held at once; a request that needs more than all of it is refused
    /// [default: 512 on the CPU, 8192 on a GPU].
    #[arg(long, env = "CITED_KV_CACHE_MEMORY")]
    pub kv_cache_memory: Option<usize>,
    /// Token positions per KV cache block (the unit of allocation and of prefix reuse; a power
    /// of two on a GPU, whose attention kernel finds pages by shift and mask).
    #[arg(long, env = "CITED_KV_BLOCK_SIZE", default_value_t = 16)]
    pub kv_block_size: usize,
    /// Replay steps that only decode from CUDA graphs, recorded per batch shape as they first
    /// occur (GPU only).
    #[arg(long, env = "CITED_CUDA_GRAPHS")]
    pub cuda_graphs: bool,
}

/// The engine limits a device gets where the flags leave them unset.
struct EngineDefaults {
    max_batch_tokens: usize,
    max_running: usize,
    max_waiting: usize,
    kv_cache_memory: usize,
}

const CPU_ENGINE: EngineDefaults = EngineDefaults {
    max_batch_tokens: 256,
    max_running: 16,
    max_waiting: 64,
    kv_cache_memory: 512,
};

/// A GPU runs hundreds of answers in one step at little more cost than one; 8 GiB of K/V holds
/// 256 answers of 1,400 tokens even for Llama-3.2-1B (32 KiB a position).
const GPU_ENGINE: EngineDefaults = EngineDefaults {
    max_batch_tokens: 8192,
    max_running: 256,
    max_waiting: 1024,
    kv_cache_memory: 8192,
};

impl EngineArgs {
    /// The engine's limits on a GPU (`gpu`) or the CPU.
    pub fn to_config(&self, gpu: bool) -> Result<crate::engine::worker::EngineConfig, ConfigError> {
        let d = if gpu { &GPU_ENGINE } else { &CPU_ENGINE };
        let max_batch_tokens = self.max_batch_tokens.unwrap_or(d.max_batch_tokens);
        let max_running = self.max_running.unwrap_or(d.max_running);
        let max_waiting = self.max_waiting.unwrap_or(d.max_waiting);
        let kv_cache_memory = self.kv_cache_memory.unwrap_or(d.kv_cache_memory);
        if max_batch_tokens == 0 {
            return Err(ConfigError::BadValue(
                "max-batch-tokens",
                "at least 1".into(),
            ));
        }
        if max_running == 0 {
            return Err(ConfigError::BadValue("max-running", "at least 1".into()));
        }
        if max_waiting == 0 {
            return Err(ConfigError::BadValue("max-waiting", "at least 1".into()));
        }
        if kv_cache_memory == 0 {
            return Err(ConfigError::BadValue(
                "kv-cache-memory",
                "at least 1 (MiB)".into(),
            ));
        }
        if !(1..=1024).contains(&self.kv_block_size) {
            return Err(ConfigError::BadValue("kv-block-size", "1 to 1024".into()));
        }
        if gpu && !self.kv_block_size.is_power_of_two() {
            return Err(ConfigError::BadValue(
                "kv-block-size",
                "a power of two on a GPU (1, 2, 4, ..., 1024)".into(),
            ));
        }
        if self.cuda_graphs && !gpu {
            return Err(ConfigError::BadValue(
                "cuda-graphs",
                "only with --device cuda".into(),
            ));
        }
        Ok(crate::engine::worker::EngineConfig {
            scheduler: crate::engine::scheduler::SchedulerConfig {
                max_running,
                max_batch_tokens,
                cuda_graphs: self.cuda_graphs,
            },
            max_waiting,
            kv_cache_bytes: kv_cache_memory << 20,
            block_size: self.kv_block_size,
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (cited answers, search, embeddings, OpenAI-compatible chat).
    Serve {
        /// Address to listen on.
        #[arg(long, env = "CITED_HOST", default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        #[arg(long, env = "CITED_PORT", default_value_t = 8080)]
        port: u16,
        #[command(flatten)]
        rag: RagArgs,
        #[command(flatten)]
        engine: EngineArgs,
        /// Also serve /v1/completions: plain generation from a raw prompt, with no retrieval and
        /// no citations, for load tests that send other servers the same prompts. Not for
        /// clinical questions.
        #[arg(long, env = "CITED_COMPLETIONS")]
        completions: bool,
        /// Bearer token that POST and DELETE /v1/documents require (corpus administration);
        /// without one, the corpus can be changed only by `cited ingest` on this machine.
        #[arg(long, env = "CITED_ADMIN_TOKEN", hide_env_values = true)]
        admin_token: Option<String>,
    },
    /// Answer one question from the corpus, streamed to the terminal with its citations.
    Ask {
        question: String,
        /// patient or clinician.
        #[arg(long, default_value = "patient")]
        audience: crate::rag::Audience,
        #[command(flatten)]
        rag: RagArgs,
    },
    /// Print the embedding of each text as a JSON array.
    Embed {
        /// Texts to embed (one forward pass for all).
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Generate a reply to a prompt with the chat template, streamed to stdout (greedy).
    Generate {
        /// The user's message.
        prompt: String,
        /// System prompt (the model's template default is never used).
        #[arg(long, default_value = DEFAULT_SYSTEM)]
        system: String,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 256)]
        max_tokens: usize,
    },
    /// Add or update documents: Markdown, text or JSONL files, or folders of them.
    Ingest {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Embedder tokens repeated between consecutive chunks.
        #[arg(long, default_value_t = 32)]
        overlap: usize,
        /// Chunks per embedding forward pass.
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
    /// Remove documents by id.
    Delete {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Search the corpus.
    Search {
        query: String,
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// dense, bm25 or hybrid.
        #[arg(long, default_value = "hybrid")]
        mode: crate::index::Mode,
        /// Keep only documents matching KEY=VALUE: `source`, `id`, `date_from`, `date_to`, or any
        /// metadata field; repeat a key for any of several values, other keys must all match.
        #[arg(long = "filter", value_name = "KEY=VALUE")]
        filters: Vec<String>,
        /// Print the hits as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate the system on a labelled set.
    Eval {
        #[command(subcommand)]
        what: EvalCommand,
    },
    /// Print the generator's token ids for a text.
    Tokenize {
        text: String,
        /// Match control tokens such as <|im_start|> written in the text.
        #[arg(long)]
        special: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Ingest a corpus into a scratch store and score dense, BM25 and hybrid retrieval.
    Retrieval {
        /// Corpus file or folder (JSONL with `id` and `text`, or Markdown/text).
        #[arg(long)]
        corpus: PathBuf,
        /// Queries (JSONL: `question` and `answer_passage_id`, or PubMedQA's `pmid`).
        #[arg(long)]
        queries: PathBuf,
        /// Only the first N queries.
        #[arg(long)]
        limit: Option<usize>,
        /// Reciprocal-rank fusion k.
        #[arg(long)]
        rrf_k: Option<f32>,
        /// Hybrid fusion: convex (scores, the default) or rrf (ranks).
        #[arg(long, value_enum)]
        fusion: Option<crate::index::Fusion>,
        /// Convex fusion: the dense score's share, 0 to 1.
        #[arg(long)]
        dense_share: Option<f32>,
        #[arg(long)]
        dense_weight: Option<f32>,
        #[arg(long)]
        bm25_weight: Option<f32>,
        /// Keep the scratch store here (and reuse it) instead of a temporary folder.
        #[arg(long)]
        store: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Which half of the queries (fixed by each query's source document): dev, test, all.
        #[arg(long, value_enum, default_value = "all")]
        split: crate::eval::retrieval::Split,
        /// Search the fusion grid on the dev half and report its best setting on the other
        /// (test unless --split says otherwise).
        #[arg(long)]
        tune: bool,
        /// Also report nDCG@10 per value of this query field (e.g. qtype).
        #[arg(long)]
        by: Option<String>,
        /// Search each query among the documents whose metadata field of this name equals the
        /// query's own value (e.g. focus: the cancer type).
        #[arg(long)]
        filter_by: Option<String>,
    },
    /// Answer every question of a dev set through the whole pipeline (over a scratch store of the
    /// given corpus) and score citation validity, citing, support, abstention and safe replies.
    Answers {
        /// Questions (JSONL: `id`, `type`, `question`, `source`).
        #[arg(long, default_value = "eval/answers-dev.jsonl")]
        questions: PathBuf,
        /// Corpus files or folders ingested into the scratch store.
        #[arg(long, default_values = ["corpus"])]
        corpus: Vec<PathBuf>,
        /// Keep the scratch store here (and reuse it).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Only the first N questions.
        #[arg(long)]
        limit: Option<usize>,
        /// Answers generated at once.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Write every answer with its scores here (JSONL).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        rag: RagArgs,
    },
    /// Score the support check on labelled sentence-passage pairs: how many faithful and how
    /// many perturbed sentences it flags.
    Support {
        /// Pairs (JSONL: `sentence`, `passage`, `label`, `perturbation`).
        #[arg(long, default_value = "eval/support-pairs.jsonl")]
        pairs: PathBuf,
        /// Least cosine between a sentence and its closest passage sentence.
        #[arg(long)]
        min_cosine: Option<f32>,
        /// Also print the flag rates over a range of cosine bounds.
        #[arg(long)]
        sweep: bool,
        /// Print each pair the check got wrong.
        #[arg(long)]
        misses: bool,
    },
}

/// The system prompt of `cited generate`.
pub const DEFAULT_SYSTEM: &str =
    "You are cited, an assistant that explains cancer care in plain language. You are not a \
     substitute for the patient's care team.";

/// Which device to run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| ConfigError::BadDevice(s.to_string())),
        }
    }

    /// Opens the device; a clear error when CUDA is asked for and not there.
    pub fn open(self) -> Result<Device, ConfigError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) if !cfg!(feature = "cuda") => {
                Err(ConfigError::NoCuda(format!("cuda:{n}")))
            }
            Self::Cuda(n) => {
                // A stream of its own rather than each thread's default stream: the weights
                // loaded here and the steps the worker thread runs are ordered on one stream
                // (buffers carry no events), and a stream made for the purpose can be
                // captured into CUDA graphs.
                let dev = Device::new_cuda_with_stream(n)
                    .map_err(|e| ConfigError::CudaUnavailable(n, e.to_string()))?;
                // Steps of the same shapes reuse the last step's buffers, made without events.
                #[cfg(feature = "cuda")]
                {
                    crate::ops::keep_freed_memory(&dev, true)
                        .map_err(|e| ConfigError::CudaUnavailable(n, e.to_string()))?;
                    crate::ops::track_buffer_events(&dev, false);
                }
                Ok(dev)
            }
        }
    }
}

/// Validated configuration.
#[derive(Debug)]
pub struct Config {
    pub embedder: PathBuf,
    pub generator: PathBuf,
    pub device: DeviceSpec,
    pub weights: QuantMode,
    pub load_format: LoadFormat,
    pub tokenizer: PathBuf,
}

fn existing(path: &Path, what: &'static str, flag: &'static str) -> Result<PathBuf, ConfigError> {
    if path.exists() {
        Ok(path.to_path_buf())
    } else {
        Err(ConfigError::MissingModel {
            what,
            path: path.to_path_buf(),
            flag,
        })
    }
}

impl Config {
    /// Checks the arguments; `needs_embedder` / `needs_generator` say which model the command
    /// loads, so a command is not refused for a model it never touches.
    pub fn from_args(
        args: &ModelArgs,
        needs_embedder: bool,
        needs_generator: bool,
    ) -> Result<Self, ConfigError> {
        let device = DeviceSpec::parse(&args.device)?;
        let embedder = if needs_embedder {
            existing(&args.embedder, "embedding model", "embedder")?
        } else {
            args.embedder.clone()
        };
        let (generator, tokenizer) = match (needs_generator, args.load_format) {
            (false, _) => (args.generator.clone(), args.tokenizer.clone()),
            (true, LoadFormat::Gguf) => (
                existing(&args.generator, "generator GGUF", "generator")?,
                args.tokenizer.clone(),
            ),
            (true, LoadFormat::Dummy) => (
                existing(&args.generator, "generator config.json", "generator")?,
                existing(&args.tokenizer, "tokenizer GGUF", "tokenizer")?,
            ),
        };
        Ok(Self {
            embedder,
            generator,
            device,
            weights: args.weights,
            load_format: args.load_format,
            tokenizer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        assert!(DeviceSpec::parse("gpu").is_err());
        assert!(DeviceSpec::parse("cuda:x").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err();
        assert!(err.to_string().contains("without the `cuda` feature"));
    }

    #[test]
    fn engine_defaults_follow_the_device_and_flags_override_them() {
        let unset = EngineArgs {
            kv_block_size: 16,
            ..Default::default()
        };
        let cpu = unset.to_config(false).unwrap();
        assert_eq!(cpu.scheduler.max_running, 16);
        assert_eq!(cpu.scheduler.max_batch_tokens, 256);
        assert_eq!(cpu.kv_cache_bytes, 512 << 20);
        let gpu = unset.to_config(true).unwrap();
        assert_eq!(gpu.scheduler.max_running, 256);
        assert_eq!(gpu.scheduler.max_batch_tokens, 8192);
        assert_eq!(gpu.max_waiting, 1024);
        assert_eq!(gpu.kv_cache_bytes, 8192 << 20);
        let set = EngineArgs {
            max_running: Some(3),
            kv_cache_memory: Some(64),
            ..unset.clone()
        };
        for gpu in [false, true] {
            let c = set.to_config(gpu).unwrap();
            assert_eq!(c.scheduler.max_running, 3);
            assert_eq!(c.kv_cache_bytes, 64 << 20);
        }
        // Pages of 24 positions work on the CPU; the GPU kernel needs a power of two.
        let odd = EngineArgs {
            kv_block_size: 24,
            ..unset.clone()
        };
        assert!(odd.to_config(false).is_ok());
        let err = odd.to_config(true).unwrap_err();
        assert!(err.to_string().contains("power of two"), "{err}");
        // CUDA graphs: off unless asked for, and only on a GPU.
        assert!(!gpu.scheduler.cuda_graphs);
        let graphs = EngineArgs {
            cuda_graphs: true,
            ..unset.clone()
        };
        assert!(graphs.to_config(true).unwrap().scheduler.cuda_graphs);
        let err = graphs.to_config(false).unwrap_err();
        assert!(err.to_string().contains("--device cuda"), "{err}");
        let zero = EngineArgs {
            max_running: Some(0),
            ..unset
        };
        assert!(zero.to_config(true).is_err());
    }

    #[test]
    fn missing_model_names_the_fetch_script() {
        let args = ModelArgs {
            embedder: "/nonexistent/embedder".into(),
            generator: "/nonexistent/g.gguf".into(),
            device: "cpu".into(),
            weights: QuantMode::Quantized,
            load_format: LoadFormat::Gguf,
            tokenizer: "/nonexistent/t.gguf".into(),
        };
        let err = Config::from_args(&args, true, false).unwrap_err();
        assert!(err.to_string().contains("models/fetch.sh"));
        assert!(Config::from_args(&args, false, false).is_ok());
        // A dummy generator needs its config.json and the tokenizer's GGUF.
        let dummy = ModelArgs {
            load_format: LoadFormat::Dummy,
            generator: "models/configs/smollm2-135m.json".into(),
            ..args
        };
        let err = Config::from_args(&dummy, false, true).unwrap_err();
        assert!(err.to_string().contains("tokenizer"), "{err}");
    }
}
