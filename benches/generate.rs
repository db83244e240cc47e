//! Generation speed of SmolLM2-135M-Instruct (Q4_1 GGUF). One stream: prefill of a 128-token
//! prompt and decode after a 98-token prompt, ours (auto, quantized and dequantized weights)
//! against plain candle-transformers `quantized_llama` in the same run. Batched decode: B
//! sequences with 128-token prompts decoding 128 tokens together, one forward per step (the
//! shape of llama.cpp's `llama-batched-bench -npp 128 -ntg 128 -npl B`), aggregate tokens/s.
//! llama.cpp is measured beside it by scripts/bench-cpu.sh.
//!
//!     cargo bench --bench generate

mod common;

use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use cited::engine::generate::argmax_rows;
use cited::models::gguf::GgufFile;
use cited::models::kv_cache::KvCache;
use cited::models::llama::{Llama, QuantMode};
use cited::models::tokenizer::BpeTokenizer;
use cited::models::{Batch, LogitsAt};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const PREFILL: usize = 128;
const DECODE_PROMPT: usize = 98;
/// Decode steps timed per fresh prompt, so the context stays near 98-162 tokens.
const DECODE_RUN: u64 = 64;

/// A forward over `tokens` starting at `pos`; returns the next greedy token.
trait Stream {
    fn reset(&mut self);
    fn step(&mut self, tokens: &[u32], pos: usize) -> u32;
}

struct Ours<'a> {
    model: &'a Llama,
    cache: KvCache,
}

impl Stream for Ours<'_> {
    fn reset(&mut self) {
        self.cache.clear();
    }
    fn step(&mut self, tokens: &[u32], pos: usize) -> u32 {
        let mut b = Batch::new();
        b.push(0, tokens, pos);
        argmax_rows(
            &self
                .model
                .forward(&b, &mut self.cache, LogitsAt::LastOfEach)
                .unwrap(),
        )
        .unwrap()[0]
    }
}

struct Plain(ModelWeights);

impl Stream for Plain {
    fn reset(&mut self) {
        // The model drops its cache when a forward starts at position 0.
    }
    fn step(&mut self, tokens: &[u32], pos: usize) -> u32 {
        let x = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        argmax_rows(&self.0.forward(&x, pos).unwrap()).unwrap()[0]
    }
}

/// Time of `iters` decode steps, each run of at most `DECODE_RUN` after a fresh untimed prompt.
fn decode_time(s: &mut dyn Stream, prompt: &[u32], iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        s.reset();
        let mut next = s.step(prompt, 0);
        let run = left.min(DECODE_RUN);
        let start = Instant::now();
        for i in 0..run as usize {
            next = s.step(&[next], prompt.len() + i);
        }
        total += start.elapsed();
        left -= run;
    }
    total
}

fn bench(c: &mut Criterion) {
    let path = common::smollm2();
    let mut file = GgufFile::open(&path).unwrap();
    let tok = BpeTokenizer::from_gguf(file.content()).unwrap();
    let ids = tok.encode(&common::TEXT.repeat(2), false).unwrap();
    let auto = Llama::from_gguf(&mut file, &Device::Cpu, QuantMode::Auto).unwrap();
    let quantized = Llama::from_gguf(&mut file, &Device::Cpu, QuantMode::Quantized).unwrap();
    let dequantized = Llama::from_gguf(&mut file, &Device::Cpu, QuantMode::Dequantized).unwrap();
    let mut reader = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let plain = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap();

    let mut streams: Vec<(&str, Box<dyn Stream>)> = vec![
        (
            "cited_auto",
            Box::new(Ours {
                model: &auto,
                cache: KvCache::with_tokens(auto.config(), 1024),
            }),
        ),
        (
            "cited_quantized",
            Box::new(Ours {
                model: &quantized,
                cache: KvCache::with_tokens(auto.config(), 1024),
            }),
        ),
        (
            "cited_dequantized",
            Box::new(Ours {
                model: &dequantized,
                cache: KvCache::with_tokens(auto.config(), 1024),
            }),
        ),
        ("candle_quantized_llama", Box::new(Plain(plain))),
    ];

    let mut g = c.benchmark_group("smollm2_prefill_128");
    g.sample_size(10);
    g.throughput(Throughput::Elements(PREFILL as u64));
    for (name, s) in streams.iter_mut() {
        g.bench_function(BenchmarkId::from_parameter(*name), |b| {
            b.iter(|| {
                s.reset();
                s.step(&ids[..PREFILL], 0)
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("smollm2_decode_after_98");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    for (name, s) in streams.iter_mut() {
        g.bench_function(BenchmarkId::from_parameter(*name), |b| {
            b.iter_custom(|iters| decode_time(s.as_mut(), &ids[..DECODE_PROMPT], iters))
        });
    }
    g.finish();
}

/// Decode steps of `b` sequences together after 128-token prompts, context 128..256.
fn batched_decode(model: &Llama, ids: &[u32], b: usize, iters: u64) -> Duration {
    let mut cache = KvCache::with_tokens(model.config(), b * 2 * PREFILL + 64);
    let mut next: Vec<u32> = Vec::new();
    let mut step = PREFILL; // forces a prefill first
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        if step == PREFILL {
            // Fresh prompts (untimed): each sequence its own rotation of the text.
            cache.clear();
            let prompts: Vec<Vec<u32>> = (0..b)
                .map(|s| (0..PREFILL).map(|i| ids[(i + 7 * s) % ids.len()]).collect())
                .collect();
            let mut batch = Batch::new();
            for (s, p) in prompts.iter().enumerate() {
                batch.push(s as u64, p, 0);
            }
            let logits = model
                .forward(&batch, &mut cache, LogitsAt::LastOfEach)
                .unwrap();
            next = argmax_rows(&logits).unwrap();
            step = 0;
        }
        let mut batch = Batch::new();
        for (s, &t) in next.iter().enumerate() {
            batch.push(s as u64, &[t], PREFILL + step);
        }
        let started = Instant::now();
        let logits = model
            .forward(&batch, &mut cache, LogitsAt::LastOfEach)
            .unwrap();
        next = argmax_rows(&logits).unwrap();
        total += started.elapsed();
        step += 1;
    }
    total
}

fn bench_batched(c: &mut Criterion) {
    let path = common::smollm2();
    let mut file = GgufFile::open(&path).unwrap();
    let tok = BpeTokenizer::from_gguf(file.content()).unwrap();
    let ids = tok.encode(&common::TEXT.repeat(4), false).unwrap();
    let auto = Llama::from_gguf(&mut file, &Device::Cpu, QuantMode::Auto).unwrap();
    let mut g = c.benchmark_group("smollm2_batched_decode_128_128");
    g.sample_size(10);
    for b in [1usize, 4, 16, 64] {
        g.throughput(Throughput::Elements(b as u64));
        g.bench_function(BenchmarkId::new("cited_auto", b), |bn| {
            bn.iter_custom(|iters| batched_decode(&auto, &ids, b, iters))
        });
    }
    g.finish();
}

criterion_group!(benches, bench, bench_batched);
criterion_main!(benches);
