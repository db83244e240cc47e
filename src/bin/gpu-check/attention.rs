//! Paged decode attention: every variant against the CPU reference, and the time per step at
//! the benchmark shapes.

use super::*;

/// Block ids `0..n` in a seeded random order (Fisher-Yates), so tables are not contiguous.
pub(crate) fn shuffled_blocks(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    order
}

/// A paged cache holding `lens` positions per sequence in shuffled blocks, random f16 K/V, and
/// one random query row per sequence (stride `width + 8`): (q, k, v, tables).
#[allow(clippy::type_complexity)]
pub(crate) fn paged_inputs(
    rng: &mut Rng,
    g: &PagedGeometry,
    lens: &[usize],
) -> (Vec<f32>, usize, Vec<f16>, Vec<f16>, Vec<Vec<u32>>) {
    let per: Vec<usize> = lens.iter().map(|l| l.div_ceil(g.block_size)).collect();
    let total: usize = per.iter().sum::<usize>() + 3;
    let order = shuffled_blocks(rng, total);
    let mut next = 0;
    let tables: Vec<Vec<u32>> = per
        .iter()
        .map(|&n| {
            let t = order[next..next + n].to_vec();
            next += n;
            t
        })
        .collect();
    let k = rng.halves(total * g.block_elems());
    let v = rng.halves(total * g.block_elems());
    let stride = g.heads * g.head_dim + 8;
    let q: Vec<f32> = (0..lens.len() * stride).map(|_| rng.normal()).collect();
    (q, stride, k, v, tables)
}

/// Decode attention on the GPU against the CPU path (itself tested against the plain candle
/// reference); prints one `PARITY` line per case.
pub(crate) fn paged_parity(dev: &Device, small: bool) -> Result<bool> {
    let mut rng = Rng(SplitMix64::new(29));
    let geo = |heads, kv_heads, head_dim, block_size| PagedGeometry {
        heads,
        kv_heads,
        head_dim,
        block_size,
    };
    // (geometry, context lengths, split length)
    let cases: Vec<(PagedGeometry, Vec<usize>, Option<u32>)> = if small {
        vec![
            (geo(9, 3, 64, 16), vec![1, 17, 40], None),
            (geo(8, 1, 128, 16), vec![33, 5], Some(16)),
        ]
    } else {
        vec![
            (geo(9, 3, 64, 16), vec![1, 17, 300, 1000], None),
            (geo(4, 4, 64, 16), vec![15, 16, 17, 513], None),
            (geo(32, 8, 128, 16), vec![5, 2049, 700], None),
            (geo(32, 8, 128, 16), vec![5, 2049, 700], Some(256)),
            (geo(24, 8, 128, 32), vec![3000, 1, 77], Some(64)),
            (geo(32, 4, 128, 16), vec![4100, 250], None),
            (geo(16, 16, 256, 16), vec![100, 9], None),
            (geo(8, 8, 32, 8), vec![31, 2], None),
        ]
    };
    let mut all_ok = true;
    for (g, lens, split) in cases {
        let (q, stride, k, v, tables) = paged_inputs(&mut rng, &g, &lens);
        let width = g.heads * g.head_dim;
        let scale = 1.0 / (g.head_dim as f32).sqrt();
        let seqs: Vec<SeqView<'_>> = lens
            .iter()
            .enumerate()
            .map(|(s, &len)| SeqView {
                tokens: s..s + 1,
                start: len - 1,
                blocks: &tables[s],
            })
            .collect();
        let mut want = vec![0f32; lens.len() * width];
        paged_attention(&g, &q, stride, &k, &v, &seqs, scale, &mut want)?;
        let qt = Tensor::from_vec(q, (lens.len(), stride), dev)?;
        let n = k.len();
        let kt = Tensor::from_vec(k, n, dev)?;
        let vt = Tensor::from_vec(v, n, dev)?;
        let table_refs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
        let lens32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        for variant in DECODE_VARIANTS {
            if !variant.supports(&g) {
                continue;
            }
            let run = || -> Result<(u32, Vec<f32>)> {
                let mut d = Decode::new(&g, &qt, &kt, &vt, &table_refs, &lens32, scale, split)?
                    .with_variant(variant)?;
                d.poison()?;
                d.launch()?;
                Ok((d.splits(), d.read()?))
            };
            let (verdict, splits) = match run() {
                Ok((splits, got)) => {
                    let diff =
                        got.iter()
                            .zip(&want)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, |m, d| {
                                if d.is_nan() || m.is_nan() {
                                    f32::NAN
                                } else {
                                    m.max(d)
                                }
                            });
                    // f16 K/V read exactly on both sides; f32 sums in another order and __expf.
                    if diff <= 2e-3 {
                        (format!("ok (max diff {diff:.2e})"), splits.to_string())
                    } else {
                        (format!("FAIL (max diff {diff:.2e})"), splits.to_string())
                    }
                }
                Err(e) => (format!("FAIL error {e}"), "?".into()),
            };
            all_ok &= verdict.starts_with("ok");
            println!(
            "PARITY\tpaged decode\theads={} kv={} dim={} block={} lens={lens:?} splits={splits} {variant:?}\t-\t{verdict}",
            g.heads, g.kv_heads, g.head_dim, g.block_size
        );
        }
    }
    Ok(all_ok)
}

/// Time per decode attention step at the shapes, with the HBM fraction of the K/V read.
pub(crate) fn attention_bench(dev: &Device, peak_tbs: f64) -> Result<()> {
    let mut rng = Rng(SplitMix64::new(31));
    let llama8b = PagedGeometry {
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        block_size: 16,
    };
    let smol = PagedGeometry {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        block_size: 16,
    };
    for (name, g, batch, ctx) in [
        ("llama3-8b heads", llama8b, 64usize, 2048usize),
        ("llama3-8b heads", llama8b, 8, 32768),
        ("smollm2 heads", smol, 64, 2048),
    ] {
        // Blocks in a shuffled order; K, V and queries drawn on the device (their values do
        // not change the time).
        let per = ctx.div_ceil(g.block_size);
        let order = shuffled_blocks(&mut rng, batch * per);
        let tables: Vec<Vec<u32>> = order.chunks(per).map(|c| c.to_vec()).collect();
        let lens = vec![ctx; batch];
        let n = batch * per * g.block_elems();
        let kt = Tensor::randn(0f32, 1.0, n, dev)?.to_dtype(DType::F16)?;
        let vt = Tensor::randn(0f32, 1.0, n, dev)?.to_dtype(DType::F16)?;
        let qt = Tensor::randn(0f32, 1.0, (batch, g.heads * g.head_dim), dev)?;
        let table_refs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
        let lens32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        let scale = 1.0 / (g.head_dim as f32).sqrt();
        // Every variant at the default split length and at 256 and 1,024 positions per split.
        for variant in DECODE_VARIANTS.into_iter().filter(|v| v.supports(&g)) {
            for split in [None, Some(256), Some(1024)] {
                let mut d = Decode::new(&g, &qt, &kt, &vt, &table_refs, &lens32, scale, split)?
                    .with_variant(variant)?;
                let stream = d.stream();
                let ms = time_launches(&stream, 1.0, || Ok(d.launch()?))?;
                let bytes = (batch * ctx * g.kv_heads * g.head_dim * 2 * 2) as f64;
                let tbs = bytes / (ms * 1e-3) / 1e12;
                let label = if split.is_none() { " (default)" } else { "" };
                println!(
                    "ATTN\t{name}\tbatch={batch} ctx={ctx} splits={}{label} {variant:?}\t{ms:.3} ms\t{tbs:.2} TB/s\t{:.0}% of {peak_tbs} TB/s",
                    d.splits(),
                    100.0 * tbs / peak_tbs
                );
            }
        }
    }
    Ok(())
}
