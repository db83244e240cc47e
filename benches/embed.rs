//! Embedding throughput: texts of 128 tokens at batch 1 and 64, ours (packed, no padding) against
//! plain candle-transformers BERT (padded batch with a mask) in the same run.
//!
//!     cargo bench --bench embed

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use cited::models::bert::{l2_normalize, Embedder};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const TOKENS: usize = 128;

fn bench(c: &mut Criterion) {
    let dir = common::minilm();
    let dev = Device::Cpu;
    let ours = Embedder::load(&dir, &dev).unwrap();
    // 128 tokens: [CLS], 126 text tokens, [SEP].
    let ids = ours.tokenize(&[common::TEXT]).unwrap().remove(0);
    assert!(ids.len() > TOKENS);
    let mut seq = ids[..TOKENS - 1].to_vec();
    seq.push(*ids.last().unwrap());

    let cfg: candle_transformers::models::bert::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    // SAFETY: the weights file is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)
            .unwrap()
    };
    let plain = candle_transformers::models::bert::BertModel::load(vb, &cfg).unwrap();

    let mut g = c.benchmark_group("embed_128_tokens");
    g.sample_size(10);
    for batch in [1usize, 64] {
        g.throughput(Throughput::Elements(batch as u64));
        let seqs = vec![seq.clone(); batch];
        g.bench_with_input(BenchmarkId::new("cited", batch), &seqs, |b, seqs| {
            b.iter(|| ours.embed_tokens(seqs).unwrap())
        });
        let input = Tensor::new(seqs.clone(), &dev).unwrap();
        let mask = input.ones_like().unwrap();
        let types = input.zeros_like().unwrap();
        g.bench_with_input(
            BenchmarkId::new("candle_transformers_bert", batch),
            &batch,
            |b, _| {
                b.iter(|| {
                    let h = plain.forward(&input, &types, Some(&mask)).unwrap();
                    l2_normalize(&h.mean(1).unwrap()).unwrap()
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
