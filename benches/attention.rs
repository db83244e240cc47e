//! Decode attention at the shape of SmolLM2-135M (9 query heads, 3 KV heads, head_dim 64): ours
//! over the paged f16 cache (`ops::paged_attention`, one call for the whole batch) against the
//! plain candle path the model used before (`ops::attention` per sequence, on contiguous f32
//! K/V, candle matmul and softmax), in the same run. One query token per sequence, `b` sequences
//! of `ctx` cached positions each.
//!
//!     cargo bench --bench attention

use candle_core::{Device, Tensor};
use cited::ops::attention::attention;
use cited::ops::paged_attention::{paged_attention, write_kv, PagedGeometry, SeqView};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let g = PagedGeometry {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        block_size: 16,
    };
    let (hd, w) = (g.head_dim, g.kv_heads * g.head_dim);
    let mut group = c.benchmark_group("decode_attention_9x3x64");
    group.sample_size(10);
    for (b, ctx) in [(1usize, 1024usize), (16, 256), (16, 1024)] {
        group.throughput(Throughput::Elements((b * ctx) as u64));
        let blocks_per = ctx.div_ceil(g.block_size);
        let num_blocks = b * blocks_per;
        let mut k = vec![f16::ZERO; num_blocks * g.block_elems()];
        let mut v = k.clone();
        let kf = Tensor::randn(0f32, 1.0, (b, ctx, w), &dev).unwrap();
        let vf = Tensor::randn(0f32, 1.0, (b, ctx, w), &dev).unwrap();
        let kv_rows = kf.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let vv_rows = vf.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let tables: Vec<Vec<u32>> = (0..b)
            .map(|s| ((s * blocks_per) as u32..((s + 1) * blocks_per) as u32).collect())
            .collect();
        for (s, table) in tables.iter().enumerate() {
            let rows = (0..ctx).map(|i| {
                let o = (s * ctx + i) * w;
                (i, (&kv_rows[o..o + w], &vv_rows[o..o + w]))
            });
            write_kv(&g, &mut k, &mut v, table, 0, rows);
        }
        let q = Tensor::randn(0f32, 1.0, (b, g.heads * hd), &dev).unwrap();
        let qv = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let seqs: Vec<SeqView> = tables
            .iter()
            .enumerate()
            .map(|(s, blocks)| SeqView {
                tokens: s..s + 1,
                start: ctx - 1,
                blocks,
            })
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; b * g.heads * hd];
        group.bench_with_input(
            BenchmarkId::new(format!("cited_paged_b{b}"), ctx),
            &ctx,
            |bn, _| {
                bn.iter(|| {
                    paged_attention(&g, &qv, g.heads * hd, &k, &v, &seqs, scale, &mut out).unwrap()
                })
            },
        );
        // The plain path: per sequence, (heads, 1, hd) queries over (kv_heads, ctx, hd) K/V.
        let per_seq: Vec<(Tensor, Tensor, Tensor)> = (0..b)
            .map(|s| {
                let qs = q.get(s).unwrap().reshape((g.heads, 1, hd)).unwrap();
                let ks = kf.get(s).unwrap().reshape((ctx, g.kv_heads, hd)).unwrap();
                let vs = vf.get(s).unwrap().reshape((ctx, g.kv_heads, hd)).unwrap();
                (
                    qs,
                    ks.transpose(0, 1).unwrap().contiguous().unwrap(),
                    vs.transpose(0, 1).unwrap().contiguous().unwrap(),
                )
            })
            .collect();
        group.bench_with_input(
            BenchmarkId::new(format!("candle_b{b}"), ctx),
            &ctx,
            |bn, _| {
                bn.iter(|| {
                    for (qs, ks, vs) in &per_seq {
                        attention(qs, ks, vs, true, scale as f64).unwrap();
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
