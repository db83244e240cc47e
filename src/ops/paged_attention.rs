//! Causal attention over the paged KV cache, for a packed batch of variable-length sequences
//! (decode tokens and prompt chunks side by side). The CPU path is written here; the CUDA twin
//! (`kernels/paged_attention.cu`, the GPU issue) is checked against [`paged_attention_reference`].
//!
//! Storage of one layer: K and V each `(num_blocks, kv_heads, block_size, head_dim)` in f16, so
//! one block of one KV head is a contiguous `block_size x head_dim` tile. A sequence's block
//! table lists its blocks in position order; position `p` lives in slot `p % block_size` of block
//! `blocks[p / block_size]`.
//!
//! One task per (query token, KV head) reads each key and value of that head once for all query
//! heads of its group (grouped-query attention), with an online softmax rescaled once per block.
//! Dot products and accumulations convert f16 to f32 16 lanes at a time on AVX-512, with a
//! portable fallback.

use std::ops::Range;

use half::f16;
use rayon::prelude::*;

use super::{Result, SendPtr};
use crate::error::OpsError;

/// Shapes of the attention and its paged storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedGeometry {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl PagedGeometry {
    /// f16 elements of one block of one layer's K (or V).
    pub fn block_elems(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Offset of `(block, kv_head, slot)` in a layer's K or V.
    fn offset(&self, block: u32, kv_head: usize, slot: usize) -> usize {
        ((block as usize * self.kv_heads + kv_head) * self.block_size + slot) * self.head_dim
    }

    fn validate(&self) -> Result<()> {
        if self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
            || self.head_dim == 0
            || self.block_size == 0
        {
            return Err(OpsError::Shape(format!(
                "paged attention geometry {self:?}"
            )));
        }
        Ok(())
    }
}

/// One sequence of the packed batch.
#[derive(Clone, Debug)]
pub struct SeqView<'a> {
    /// Its tokens' rows in the packed batch.
    pub tokens: Range<usize>,
    /// Absolute position of its first token in this batch (the tokens cached before it).
    pub start: usize,
    /// Its blocks, covering positions `0..start + tokens.len()`.
    pub blocks: &'a [u32],
}

/// Writes the K and V rows of token positions into the paged storage: `k_rows` and `v_rows`
/// hold `kv_heads * head_dim` values per position, for positions `start..start + count` of the
/// sequence with `blocks`.
pub fn write_kv<'a>(
    g: &PagedGeometry,
    k: &mut [f16],
    v: &mut [f16],
    blocks: &[u32],
    start: usize,
    rows: impl Iterator<Item = (usize, (&'a [f32], &'a [f32]))>,
) {
    let hd = g.head_dim;
    for (i, (krow, vrow)) in rows {
        let pos = start + i;
        let (block, slot) = (blocks[pos / g.block_size], pos % g.block_size);
        for h in 0..g.kv_heads {
            let o = g.offset(block, h, slot);
            for (dst, src) in k[o..o + hd].iter_mut().zip(&krow[h * hd..(h + 1) * hd]) {
                *dst = f16::from_f32(*src);
            }
            for (dst, src) in v[o..o + hd].iter_mut().zip(&vrow[h * hd..(h + 1) * hd]) {
                *dst = f16::from_f32(*src);
            }
        }
    }
}

/// Attention of every token of `seqs` over its own sequence's cached keys and values (itself
/// included, nothing after it).
///
/// - `q`: token `t`'s query heads at `q[t * q_stride..][..heads * head_dim]` (head-major inside
///   the row), so the rows of a fused Q/K/V product can be read in place;
/// - `k`, `v`: one layer's paged storage, already holding every position up to the last token
///   of each sequence;
/// - `out`: `(tokens, heads * head_dim)`.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    g: &PagedGeometry,
    q: &[f32],
    q_stride: usize,
    k: &[f16],
    v: &[f16],
    seqs: &[SeqView<'_>],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    check(g, q, q_stride, k, v, seqs, out)?;
    // (row, position, KV head, the row's blocks)
    let tasks: Vec<(usize, usize, usize, &[u32])> = seqs
        .iter()
        .flat_map(|s| {
            s.tokens.clone().flat_map(move |t| {
                let pos = s.start + (t - s.tokens.start);
                (0..g.kv_heads).map(move |h| (t, pos, h, s.blocks))
            })
        })
        .collect();
    let fast = avx512_available();
    let out_ptr = SendPtr(out.as_mut_ptr());
    let width = g.heads * g.head_dim;
    tasks.par_iter().for_each(|&(t, pos, h, blocks)| {
        let qrow = &q[t * q_stride..][..width];
        let group = g.group();
        // SAFETY: task (t, h) alone writes the heads of group h in row t.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(
                out_ptr.get().add(t * width + h * group * g.head_dim),
                group * g.head_dim,
            )
        };
        let qs = &qrow[h * group * g.head_dim..][..group * g.head_dim];
        if fast {
            // SAFETY: the CPU has AVX-512 F (checked above).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                task_avx512(g, qs, k, v, blocks, pos, h, scale, dst)
            }
        } else {
            task::<false>(g, qs, k, v, blocks, pos, h, scale, dst)
        }
    });
    Ok(())
}

fn check(
    g: &PagedGeometry,
    q: &[f32],
    q_stride: usize,
    k: &[f16],
    v: &[f16],
    seqs: &[SeqView<'_>],
    out: &[f32],
) -> Result<usize> {
    g.validate()?;
    let width = g.heads * g.head_dim;
    let n = out.len() / width.max(1);
    let bad = |m: String| Err(OpsError::Shape(m));
    if out.len() != n * width || q_stride < width || (n > 0 && q.len() < (n - 1) * q_stride + width)
    {
        return bad(format!(
            "paged attention: {} queries (stride {q_stride}) for {} outputs of width {width}",
            q.len(),
            out.len()
        ));
    }
    if k.len() != v.len() || !k.len().is_multiple_of(g.block_elems()) {
        return bad(format!(
            "paged attention: K {} and V {} elements",
            k.len(),
            v.len()
        ));
    }
    let num_blocks = k.len() / g.block_elems();
    let mut covered = 0;
    for s in seqs {
        if s.tokens.start != covered || s.tokens.end > n {
            return bad(format!(
                "paged attention: sequence rows {:?} do not follow {covered}",
                s.tokens
            ));
        }
        covered = s.tokens.end;
        let last = s.start + s.tokens.len();
        if s.blocks.len() * g.block_size < last
            || s.blocks.iter().any(|&b| b as usize >= num_blocks)
        {
            return bad(format!(
                "paged attention: {} blocks for {last} positions (pool of {num_blocks})",
                s.blocks.len()
            ));
        }
    }
    if covered != n {
        return bad(format!(
            "paged attention: sequences cover {covered} of {n} rows"
        ));
    }
    Ok(n)
}

fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn task_avx512(
    g: &PagedGeometry,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    blocks: &[u32],
    pos: usize,
    kv_head: usize,
    scale: f32,
    out: &mut [f32],
) {
    task::<true>(g, q, k, v, blocks, pos, kv_head, scale, out)
}

/// One query token's heads of one KV group over positions `0..=pos`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn task<const FAST: bool>(
    g: &PagedGeometry,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    blocks: &[u32],
    pos: usize,
    kv_head: usize,
    scale: f32,
    out: &mut [f32],
) {
    let (hd, bs, group) = (g.head_dim, g.block_size, g.group());
    let mut max = vec![f32::NEG_INFINITY; group];
    let mut total = vec![0f32; group];
    let mut scores = vec![0f32; group * bs];
    out.fill(0.0);
    for (bi, &block) in blocks[..=pos / bs].iter().enumerate() {
        let valid = (pos + 1 - bi * bs).min(bs);
        let base = g.offset(block, kv_head, 0);
        for s in 0..valid {
            let key = &k[base + s * hd..][..hd];
            for j in 0..group {
                scores[j * bs + s] = dot::<FAST>(&q[j * hd..][..hd], key) * scale;
            }
        }
        for j in 0..group {
            let row = &mut scores[j * bs..j * bs + valid];
            let block_max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let new_max = max[j].max(block_max);
            let acc = &mut out[j * hd..][..hd];
            if new_max > max[j] && total[j] > 0.0 {
                let c = (max[j] - new_max).exp();
                total[j] *= c;
                acc.iter_mut().for_each(|a| *a *= c);
            }
            max[j] = new_max;
            for (s, score) in row.iter().enumerate() {
                let e = (score - new_max).exp();
                total[j] += e;
                axpy::<FAST>(acc, e, &v[base + s * hd..][..hd]);
            }
        }
    }
    for j in 0..group {
        let inv = 1.0 / total[j];
        out[j * hd..][..hd].iter_mut().for_each(|a| *a *= inv);
    }
}

#[inline(always)]
fn dot<const FAST: bool>(a: &[f32], b: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if FAST {
        // SAFETY: FAST is only set inside `task_avx512`, which runs on AVX-512 F.
        return unsafe { dot_avx512(a, b) };
    }
    a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
}

#[inline(always)]
fn axpy<const FAST: bool>(acc: &mut [f32], w: f32, x: &[f16]) {
    #[cfg(target_arch = "x86_64")]
    if FAST {
        // SAFETY: as in `dot`.
        return unsafe { axpy_avx512(acc, w, x) };
    }
    for (a, b) in acc.iter_mut().zip(x) {
        *a += w * b.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dot_avx512(a: &[f32], b: &[f16]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        let x = _mm512_loadu_ps(a.as_ptr().add(i));
        let y = _mm512_cvtph_ps(_mm256_loadu_si256(b.as_ptr().add(i) as *const __m256i));
        acc = _mm512_fmadd_ps(x, y, acc);
        i += 16;
    }
    let mut sum = _mm512_reduce_add_ps(acc);
    while i < n {
        sum += a[i] * b[i].to_f32();
        i += 1;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn axpy_avx512(acc: &mut [f32], w: f32, x: &[f16]) {
    use std::arch::x86_64::*;
    let n = acc.len().min(x.len());
    let wv = _mm512_set1_ps(w);
    let mut i = 0;
    while i + 16 <= n {
        let y = _mm512_cvtph_ps(_mm256_loadu_si256(x.as_ptr().add(i) as *const __m256i));
        let p = acc.as_mut_ptr().add(i);
        _mm512_storeu_ps(p, _mm512_fmadd_ps(wv, y, _mm512_loadu_ps(p)));
        i += 16;
    }
    while i < n {
        acc[i] += w * x[i].to_f32();
        i += 1;
    }
}

/// The reference: each sequence's keys and values gathered from its blocks into contiguous
/// tensors, then [`super::attention::attention_naive`] (plain loops, f64 sums).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_reference(
    g: &PagedGeometry,
    q: &[f32],
    q_stride: usize,
    k: &[f16],
    v: &[f16],
    seqs: &[SeqView<'_>],
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    use candle_core::{Device, Tensor};
    check(g, q, q_stride, k, v, seqs, out)?;
    let (hd, width) = (g.head_dim, g.heads * g.head_dim);
    for s in seqs {
        let len = s.start + s.tokens.len();
        let gather = |src: &[f16]| -> Vec<f32> {
            let mut outv = Vec::with_capacity(g.kv_heads * len * hd);
            for h in 0..g.kv_heads {
                for p in 0..len {
                    let o = g.offset(s.blocks[p / g.block_size], h, p % g.block_size);
                    outv.extend(src[o..o + hd].iter().map(|x| x.to_f32()));
                }
            }
            outv
        };
        let kt = Tensor::from_vec(gather(k), (g.kv_heads, len, hd), &Device::Cpu)?;
        let vt = Tensor::from_vec(gather(v), (g.kv_heads, len, hd), &Device::Cpu)?;
        let ql = s.tokens.len();
        let mut qv = vec![0f32; g.heads * ql * hd];
        for (i, t) in s.tokens.clone().enumerate() {
            for h in 0..g.heads {
                qv[(h * ql + i) * hd..][..hd].copy_from_slice(&q[t * q_stride + h * hd..][..hd]);
            }
        }
        let qt = Tensor::from_vec(qv, (g.heads, ql, hd), &Device::Cpu)?;
        let o = super::attention::attention_naive(&qt, &kt, &vt, true, scale as f64)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (i, t) in s.tokens.clone().enumerate() {
            for h in 0..g.heads {
                out[t * width + h * hd..][..hd].copy_from_slice(&o[(h * ql + i) * hd..][..hd]);
            }
        }
    }
    Ok(())
}

/// Rows of a tile of the tensor-core prefill kernel: the 16 rows of one mma tile.
pub const PREFILL_TILE: usize = 16;

/// How the rows of a batch split between the two attention kernels: the leading one-token
/// sequences (decode steps, which the scheduler puts first) go to the decode kernel; every
/// token after them, in tiles of up to 16 consecutive tokens of one sequence, to the prefill
/// kernel (a one-token sequence after the first prompt chunk becomes a tile of one).
/// Returns (decode rows, tiles as (first row, rows)).
pub fn prefill_tiles(seqs: &[std::ops::Range<usize>]) -> (u32, Vec<(u32, u32)>) {
    let decode = seqs.iter().take_while(|r| r.len() == 1).count();
    let decode_rows = seqs[..decode].iter().map(|r| r.len()).sum::<usize>() as u32;
    let mut tiles = Vec::new();
    for r in &seqs[decode..] {
        let mut t = r.start;
        while t < r.end {
            let n = (r.end - t).min(PREFILL_TILE);
            tiles.push((t as u32, n as u32));
            t += n;
        }
    }
    (decode_rows, tiles)
}

#[cfg(feature = "cuda")]
pub mod gpu;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rng::SplitMix64;

    fn random(n: usize, rng: &mut SplitMix64) -> Vec<f32> {
        (0..n).map(|_| rng.unit() * 2.0 - 1.0).collect()
    }

    /// Sequences of mixed lengths (decode rows and prompt chunks, lengths not multiples of the
    /// block) over shuffled blocks; the fast and the portable paths against the reference.
    #[test]
    fn prefill_tiles_cover_every_row_after_the_decode_rows() {
        // Two decode steps first, then a 40-token chunk, a one-token sequence, a 16-token one.
        let seqs = [0..1, 1..2, 2..42, 42..43, 43..59];
        let (decode, tiles) = prefill_tiles(&seqs);
        assert_eq!(decode, 2);
        assert_eq!(
            tiles,
            vec![(2, 16), (18, 16), (34, 8), (42, 1), (43, 16)],
            "tiles of at most 16 rows, never across sequences"
        );
        let covered: usize = tiles.iter().map(|t| t.1 as usize).sum();
        assert_eq!(decode as usize + covered, 59);
        // Only decode steps: no tiles; only prompts: no decode rows.
        assert_eq!(prefill_tiles(&[0..1, 1..2]), (2, vec![]));
        assert_eq!(
            prefill_tiles(std::slice::from_ref(&(0..5))),
            (0, vec![(0, 5)])
        );
    }

    #[test]
    fn matches_reference_for_gqa_ratios_and_mixed_lengths() {
        let mut rng = SplitMix64::new(42);
        for (heads, kv_heads, head_dim) in [(4, 4, 16), (9, 3, 64), (8, 2, 32), (8, 1, 24)] {
            let g = PagedGeometry {
                heads,
                kv_heads,
                head_dim,
                block_size: 16,
            };
            // (cached before, new tokens)
            let shapes: [(usize, usize); 6] =
                [(0, 1), (40, 1), (0, 37), (15, 18), (100, 1), (3, 29)];
            let total_blocks: usize = shapes.iter().map(|(a, b)| (a + b).div_ceil(16)).sum();
            let num_blocks = total_blocks + 5;
            let mut order: Vec<u32> = (0..num_blocks as u32).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.next_u64() as usize % (i + 1));
            }
            let mut k = vec![f16::ZERO; num_blocks * g.block_elems()];
            let mut v = k.clone();
            let mut tables = Vec::new();
            let mut next = 0;
            for &(before, new) in &shapes {
                let nb = (before + new).div_ceil(16);
                let blocks = order[next..next + nb].to_vec();
                next += nb;
                let kr = random((before + new) * kv_heads * head_dim, &mut rng);
                let vr = random((before + new) * kv_heads * head_dim, &mut rng);
                let w = kv_heads * head_dim;
                write_kv(
                    &g,
                    &mut k,
                    &mut v,
                    &blocks,
                    0,
                    (0..before + new).map(|i| (i, (&kr[i * w..][..w], &vr[i * w..][..w]))),
                );
                tables.push(blocks);
            }
            let n: usize = shapes.iter().map(|s| s.1).sum();
            let stride = heads * head_dim + 7; // rows wider than the queries, as in a fused QKV
            let q = random(n * stride, &mut rng);
            let mut row = 0;
            let seqs: Vec<SeqView> = shapes
                .iter()
                .zip(&tables)
                .map(|(&(before, new), blocks)| {
                    let s = SeqView {
                        tokens: row..row + new,
                        start: before,
                        blocks,
                    };
                    row += new;
                    s
                })
                .collect();
            let scale = 1.0 / (head_dim as f32).sqrt();
            let mut want = vec![f32::NAN; n * heads * head_dim];
            paged_attention_reference(&g, &q, stride, &k, &v, &seqs, scale, &mut want).unwrap();
            let mut got = vec![f32::NAN; want.len()];
            paged_attention(&g, &q, stride, &k, &v, &seqs, scale, &mut got).unwrap();
            let mut portable = vec![f32::NAN; want.len()];
            for s in &seqs {
                for t in s.tokens.clone() {
                    for h in 0..kv_heads {
                        let w = heads * head_dim;
                        let gs = heads / kv_heads * head_dim;
                        task::<false>(
                            &g,
                            &q[t * stride + h * gs..][..gs],
                            &k,
                            &v,
                            s.blocks,
                            s.start + t - s.tokens.start,
                            h,
                            scale,
                            &mut portable[t * w + h * gs..][..gs],
                        );
                    }
                }
            }
            for (i, w) in want.iter().enumerate() {
                assert!(
                    (got[i] - w).abs() < 1e-5 && (portable[i] - w).abs() < 1e-5,
                    "heads {heads}/{kv_heads} dim {head_dim} at {i}: {} / {} vs {w}",
                    got[i],
                    portable[i]
                );
            }
        }
    }

    #[test]
    fn rejects_tables_too_short_and_rows_not_covered() {
        let g = PagedGeometry {
            heads: 2,
            kv_heads: 1,
            head_dim: 16,
            block_size: 16,
        };
        let k = vec![f16::ZERO; 2 * g.block_elems()];
        let q = vec![0f32; 32];
        let mut out = vec![0f32; 32];
        let blocks = [0u32];
        let short = [SeqView {
            tokens: 0..1,
            start: 16,
            blocks: &blocks,
        }];
        assert!(paged_attention(&g, &q, 32, &k, &k, &short, 1.0, &mut out).is_err());
        let none: [SeqView; 0] = [];
        assert!(paged_attention(&g, &q, 32, &k, &k, &none, 1.0, &mut out).is_err());
        let outside = [5u32];
        let bad_block = [SeqView {
            tokens: 0..1,
            start: 0,
            blocks: &outside,
        }];
        assert!(paged_attention(&g, &q, 32, &k, &k, &bad_block, 1.0, &mut out).is_err());
    }
}
