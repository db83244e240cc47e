//! One sampling step for one sequence on the CPU (`ops::sampling::Sampler::sample`): random
//! logits over the SmolLM2 (49,152) and Qwen-sized (151,936) vocabularies, greedy and the
//! settings load tests send (temperature with top-p; with top-k and top-p; with min-p).
//!
//!     cargo bench --bench sampling

use cited::ops::rng::SplitMix64;
use cited::ops::sampling::{Sampler, SamplingParams};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sample_one_row");
    g.sample_size(20);
    let settings = [
        ("greedy", SamplingParams::default()),
        (
            "t0.8_top_p0.95",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                ..SamplingParams::default()
            },
        ),
        (
            "t0.8_top_k50_top_p0.9",
            SamplingParams {
                temperature: 0.8,
                top_k: 50,
                top_p: 0.9,
                ..SamplingParams::default()
            },
        ),
        (
            "t1.0_min_p0.05",
            SamplingParams {
                temperature: 1.0,
                min_p: 0.05,
                ..SamplingParams::default()
            },
        ),
    ];
    for vocab in [49_152usize, 151_936] {
        let mut rng = SplitMix64::new(vocab as u64);
        // Logits shaped like a model's: most tokens far below a few likely ones.
        let logits: Vec<f32> = (0..vocab)
            .map(|_| {
                let u = rng.unit();
                -8.0 + 6.0 * u + if u > 0.9995 { 10.0 } else { 0.0 }
            })
            .collect();
        for (name, params) in &settings {
            let mut sampler = Sampler::new(params.clone(), vec![]);
            let mut row = logits.clone();
            g.bench_with_input(BenchmarkId::new(*name, vocab), &vocab, |b, _| {
                b.iter(|| {
                    row.copy_from_slice(&logits);
                    sampler.sample(&mut row).unwrap()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
