//! One-stream generation speed of SmolLM2-135M-Instruct (Q4_1 GGUF): prefill of a 128-token
//! prompt and decode after a 98-token prompt, ours (auto, quantized and dequantized weights) against
//! plain candle-transformers `quantized_llama` in the same run. llama.cpp is measured beside it
//! by scripts/bench-cpu.sh.
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

criterion_group!(benches, bench);
criterion_main!(benches);
