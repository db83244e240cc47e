//! The GPU check: parity of the CUDA paths against their CPU references, small runs for
//! compute-sanitizer, and the benches (similarity variant sweep, sampling, decode attention,
//! embeddings, the generator and the engine), one module per area. Built by
//! `scripts/gpu-build.sh`, run by `scripts/gpu-check.sh` on a GPU machine.
//!
//! Every result line starts with a tag (`PARITY`, `SWEEP`, `EMBED`, `GENERATE`, `ENGINE`, ...)
//! and is tab-separated, so the script can make its table from them.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::{Parser, Subcommand};
use half::f16;

use cited::engine::scheduler::{run_offline, SchedulerConfig};
use cited::engine::worker::{EngineStats, GenerateRequest, TextSide};
use cited::models::bert::{pooled, Bert, BertConfig};
use cited::models::decode_graph::DecodeGraphs;
use cited::models::kv_cache::KvCache;
use cited::models::llama::{Llama, LlamaConfig, QuantMode, RopeStyle};
use cited::models::{Batch, LogitsAt};
use cited::ops::paged_attention::gpu::{Decode, VARIANTS as DECODE_VARIANTS};
use cited::ops::paged_attention::{paged_attention, PagedGeometry, SeqView};
use cited::ops::rng::SplitMix64;
use cited::ops::sampling::edit::{token_mask, Edit, Nudge};
use cited::ops::sampling::gpu::{apply_edits, Row, Step, Variant as SampleVariant};
use cited::ops::sampling::NoRepeatNgram;
use cited::ops::sampling::{
    apply_penalties, argmax, draw, kept_tokens, PenaltyEntry, SamplingParams,
};
use cited::ops::similarity::gpu::{default_seed_rows, GemmSearch, Search};
use cited::ops::similarity::{compare_hits, topk_cpu, Hit};
use cited::ops::similarity_variants::{Variant, VARIANTS};
use cited::ops::{bert_fused, keep_freed_memory, track_buffer_events};
use cited::rag::citations::{CitationGuide, CitationVocab};

mod attention;
mod embed;
mod generate;
mod sampling;
mod similarity;

use attention::{attention_bench, paged_parity};
use embed::{embed_bench, embedding_parity, profile};
use generate::{decoder_parity, engine_bench, generate_check};
use sampling::{sampling_bench, sampling_parity};
use similarity::{similarity_parity, sweep};

#[derive(Parser)]
#[command(name = "gpu-check", about = "CUDA parity checks and benches of cited")]
struct Args {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    #[command(subcommand)]
    command: Cmd,
}

/// The generation workload of `generate` and `engine`.
#[derive(clap::Args)]
struct Workload {
    /// Shapes from `models/configs/` timed (building Llama-3.2-1B's random weights takes about
    /// half a minute of CPU per copy).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "smollm2-135m,llama-3.2-1b"
    )]
    models: Vec<String>,
    /// Requests (sequences) generated together.
    #[arg(long, value_delimiter = ',', default_value = "1,32,256")]
    batch: Vec<usize>,
    /// Prompt tokens of each request.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 256)]
    out: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// Similarity top-k and embeddings against the CPU references.
    Parity,
    /// Small runs of every kernel against its reference, for compute-sanitizer.
    Memcheck {
        /// Parts to run (similarity, embeddings, sampling, paged, decoder); all when empty.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Time every similarity variant over the benchmark shapes.
    Sweep {
        /// Corpus sizes.
        #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
        n: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "1,32,256")]
        nq: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "10,100")]
        k: Vec<usize>,
        #[arg(long, default_value_t = 384)]
        d: usize,
        /// HBM bandwidth in TB/s for the fraction column (H200 4.8, H100 SXM 3.35).
        #[arg(long, default_value_t = 4.8)]
        peak_tbs: f64,
    },
    /// Where the time of one f16 embedding forward goes: whole forwards with 0, 1 and 6
    /// layers, and each candle operation of a layer alone on the same shapes.
    Profile {
        #[arg(long, default_value_t = 256)]
        batch: usize,
    },
    /// The generator end to end on the GPU with seeded dummy weights of real model shapes
    /// (`models/configs/`): greedy tokens against the CPU path (f32 weights on both, equal up
    /// to the first near-tie), then output tokens per second of `--batch` prompts of
    /// `--prompt` tokens each generating `--out` tokens (prefill included), with the decode
    /// step's share of the weight-read roofline.
    Generate {
        #[command(flatten)]
        work: Workload,
        /// Shapes whose greedy tokens are checked against the CPU path (f32 weights on both).
        #[arg(long, value_delimiter = ',', default_value = "smollm2-135m")]
        parity: Vec<String>,
        /// Weight forms timed: `quantized` (Q4_1, the output projection Q8_0, as
        /// `--load-format dummy` serves them) and/or `dequantized` (f32).
        #[arg(long, value_delimiter = ',', default_value = "quantized")]
        weights: Vec<QuantMode>,
        /// Prompt tokens per prefill forward pass of the bare loop (whole prompts), and tokens
        /// per step of the engine.
        #[arg(long, default_value_t = 8192)]
        chunk: usize,
        /// HBM bandwidth in TB/s (H200 4.8, H100 SXM 3.35).
        #[arg(long, default_value_t = 4.8)]
        peak_tbs: f64,
    },
    /// The engine's scheduler end to end on the GPU (continuous batching, chunked prefill, the
    /// sampling kernel choosing each token), as the server runs it without the HTTP side:
    /// dummy Q4_1 weights of real model shapes, `--batch` requests of `--prompt` random tokens
    /// each generating `--out` tokens (no end token), all submitted at once.
    Engine {
        #[command(flatten)]
        work: Workload,
        /// Tokens per forward pass (decode tokens plus prompt chunks).
        #[arg(long, default_value_t = 8192)]
        max_batch_tokens: usize,
    },
    /// The sampling kernel against the CPU reference (f32 and bf16 logits, mixed settings,
    /// penalties and bans), then its time per step at the benchmark shapes.
    Sampling {
        /// Rows of the timed batch.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        #[arg(long, value_delimiter = ',', default_value = "32000,151936")]
        vocab: Vec<usize>,
        /// HBM bandwidth in TB/s for the one-pass floor (H200 4.8, H100 SXM 3.35).
        #[arg(long, default_value_t = 4.8)]
        peak_tbs: f64,
        /// Parity only, on small shapes (for compute-sanitizer).
        #[arg(long)]
        small: bool,
    },
    /// Decode attention over the paged cache: time per step and HBM fraction at the benchmark
    /// shapes (Llama-3-8B heads: 32 query, 8 KV, dim 128).
    Attention {
        /// HBM bandwidth in TB/s (H200 4.8, H100 SXM 3.35).
        #[arg(long, default_value_t = 4.8)]
        peak_tbs: f64,
    },
    /// Embeddings per second of MiniLM-shaped random weights in f16, 128-token texts.
    Embed {
        #[arg(long, value_delimiter = ',', default_value = "1,32,256")]
        batch: Vec<usize>,
    },
}

/// Seeded inputs.
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Roughly normal: the sum of four uniforms, centred and scaled.
    fn normal(&mut self) -> f32 {
        let u: f32 = (0..4).map(|_| self.0.unit()).sum();
        (u - 2.0) * 1.7
    }

    fn halves(&mut self, len: usize) -> Vec<f16> {
        (0..len).map(|_| f16::from_f32(self.normal())).collect()
    }
}

fn to_f32(v: &[f16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median milliseconds of `launch` on `stream`, timed with CUDA events, after one warm-up (module
/// load, first touch); at least 5 runs, up to 30 within `budget_s`.
fn time_launches(
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    budget_s: f64,
    mut launch: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let timing =
        Some(candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    launch()?;
    stream.synchronize()?;
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 5 || (times.len() < 30 && started.elapsed().as_secs_f64() < budget_s) {
        let a = stream.record_event(timing)?;
        launch()?;
        let b = stream.record_event(timing)?;
        times.push(a.elapsed_ms(&b)? as f64);
    }
    Ok(median(times))
}

/// Median milliseconds of `f` (device synchronised around each run).
fn time_ms(dev: &Device, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut times = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        let out = f()?;
        dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    Ok(median(times))
}

fn main() -> Result<()> {
    // Warnings (a decode graph that could not be recorded, say) go to the log.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // A stream of its own, as the server opens it (`DeviceSpec::open`).
    let dev = Device::new_cuda_with_stream(args.device).context("opening the CUDA device")?;
    keep_freed_memory(&dev, true)?;
    track_buffer_events(&dev, false);
    match args.command {
        Cmd::Parity => {
            let cases = [
                (1, 1, 8, 1),
                (1, 1000, 8, 10),
                (3, 10_007, 384, 10),
                (17, 50_021, 384, 100),
                (70, 12_345, 392, 37),
                (33, 20_011, 1024, 256),
                (1, 300, 384, 256),
                (2, 100, 16, 256),
                (130, 3_001, 384, 1),
                (33, 5_000, 72, 50),
                (65, 3_000, 200, 128),
                (40, 2_000, 512, 128),
                (33, 4_000, 1024, 256),
            ];
            let a = similarity_parity(&dev, &cases, true)?;
            let b = embedding_parity(&dev, false)?;
            let c = sampling_parity(&dev, false)?;
            let d = paged_parity(&dev, false)?;
            let e = decoder_parity(&dev, false)?;
            if !(a && b && c && d && e) {
                bail!("parity failed");
            }
        }
        Cmd::Memcheck { only } => {
            let part = |p: &str| only.is_empty() || only.iter().any(|o| o == p);
            let mut ok = true;
            if part("similarity") {
                // Small cases only: under compute-sanitizer every run is slow.
                ok &= similarity_parity(&dev, &[(3, 1000, 64, 10), (40, 3000, 128, 50)], false)?;
            }
            if part("embeddings") {
                ok &= embedding_parity(&dev, true)?;
            }
            if part("sampling") {
                ok &= sampling_parity(&dev, true)?;
            }
            if part("paged") {
                ok &= paged_parity(&dev, true)?;
            }
            if part("decoder") {
                ok &= decoder_parity(&dev, true)?;
            }
            if !ok {
                bail!("parity failed under memcheck");
            }
        }
        Cmd::Sweep {
            n,
            nq,
            k,
            d,
            peak_tbs,
        } => sweep(&dev, &n, &nq, &k, d, peak_tbs)?,
        Cmd::Embed { batch } => embed_bench(&dev, &batch)?,
        Cmd::Attention { peak_tbs } => attention_bench(&dev, peak_tbs)?,
        Cmd::Sampling {
            batch,
            vocab,
            peak_tbs,
            small,
        } => {
            let ok = sampling_parity(&dev, small)?;
            if !small {
                sampling_bench(&dev, batch, &vocab, peak_tbs)?;
            }
            if !ok {
                bail!("sampling parity failed");
            }
        }
        Cmd::Profile { batch } => profile(&dev, batch)?,
        Cmd::Engine {
            work,
            max_batch_tokens,
        } => engine_bench(&dev, &work, max_batch_tokens)?,
        Cmd::Generate {
            work,
            parity,
            weights,
            chunk,
            peak_tbs,
        } => {
            if !generate_check(&dev, &work, &parity, &weights, chunk, peak_tbs)? {
                bail!("generation parity failed");
            }
        }
    }
    Ok(())
}
