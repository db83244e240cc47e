//! Exact top-k by inner product: each query row against every corpus row, the k best kept, the
//! score matrix never materialised. The CPU path here is the reference; `kernels/similarity.cu`
//! is its CUDA twin (module [`gpu`], under the `cuda` feature).
//!
//! Order everywhere: higher score first, equal scores by lower row id.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::Result;
use crate::error::OpsError;

/// A corpus row and its score against a query.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub id: u32,
    pub score: f32,
}

impl Hit {
    /// The ranking order: `Less` when `self` ranks before `other`.
    pub fn rank_cmp(&self, other: &Self) -> Ordering {
        other
            .score
            .total_cmp(&self.score)
            .then(self.id.cmp(&other.id))
    }
}

/// Heap entry whose greatest element is the worst hit, so the heap's top is the one to evict.
struct Worst(Hit);

impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.rank_cmp(&other.0)
    }
}

/// The `k` best hits seen so far.
struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    fn push(&mut self, hit: Hit) {
        if self.heap.len() < self.k {
            self.heap.push(Worst(hit));
        } else if let Some(worst) = self.heap.peek() {
            if hit.rank_cmp(&worst.0) == Ordering::Less {
                self.heap.pop();
                self.heap.push(Worst(hit));
            }
        }
    }

    fn merge(mut self, other: Self) -> Self {
        for w in other.heap {
            self.push(w.0);
        }
        self
    }

    fn into_sorted(self) -> Vec<Hit> {
        let mut v: Vec<Hit> = self.heap.into_iter().map(|w| w.0).collect();
        v.sort_by(Hit::rank_cmp);
        v
    }
}

/// Element types a corpus may be stored in.
pub trait Element: Copy + Send + Sync {
    /// The row as f32, converted into `scratch` when it is not f32 already.
    fn as_f32<'a>(row: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32];
}

/// Dot product of two rows of equal length, on the widest vector unit this CPU has.
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features the function is compiled for were detected on this CPU.
        return unsafe { dot_f32_avx2(a, b) };
    }
    dot_f32_portable(a, b)
}

/// The portable path and the reference for the vector one.
fn dot_f32_portable(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums so the compiler can keep a vector register per lane group.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut tail = 0f32;
    for i in chunks * 8..a.len() {
        tail += a[i] * b[i];
    }
    acc.iter().sum::<f32>() + tail
}

/// Four 8-lane fused multiply-add chains, 32 values a step; the rest in scalar code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY (all loads): i + 32 <= n (or i + 8 <= n below), within both slices.
    while i + 32 <= n {
        for (l, acc) in acc.iter_mut().enumerate() {
            let x = unsafe { _mm256_loadu_ps(pa.add(i + l * 8)) };
            let y = unsafe { _mm256_loadu_ps(pb.add(i + l * 8)) };
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        let x = unsafe { _mm256_loadu_ps(pa.add(i)) };
        let y = unsafe { _mm256_loadu_ps(pb.add(i)) };
        acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
        i += 8;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    let mut total = lanes.iter().sum::<f32>();
    while i < n {
        total += a[i] * b[i];
        i += 1;
    }
    total
}

impl Element for f32 {
    fn as_f32<'a>(row: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        row
    }
}

impl Element for f16 {
    fn as_f32<'a>(row: &'a [f16], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.resize(row.len(), 0.0);
        row.convert_to_f32_slice(scratch);
        scratch
    }
}

/// Exact top-`k` of each query of `queries` `(nq, d)` against `corpus` `(n, d)`, both row-major;
/// each list holds `min(k, n)` hits, best first.
pub fn topk_cpu<T: Element>(
    queries: &[f32],
    corpus: &[T],
    d: usize,
    k: usize,
) -> Result<Vec<Vec<Hit>>> {
    if d == 0 || !queries.len().is_multiple_of(d) || !corpus.len().is_multiple_of(d) {
        return Err(OpsError::Shape(format!(
            "queries of {} and corpus of {} values are not rows of {d}",
            queries.len(),
            corpus.len()
        )));
    }
    let nq = queries.len() / d;
    let n = corpus.len() / d;
    if n > u32::MAX as usize {
        return Err(OpsError::Shape(format!("{n} rows exceed u32 ids")));
    }
    if nq == 0 || k == 0 || n == 0 {
        return Ok(vec![Vec::new(); nq]);
    }
    // Rows in chunks across threads; each chunk keeps its own top-k per query, merged at the end.
    let chunk_rows = n.div_ceil(rayon::current_num_threads() * 4).max(256);
    let partial: Vec<Vec<TopK>> = corpus
        .par_chunks(chunk_rows * d)
        .enumerate()
        .map(|(c, rows)| {
            let mut tops: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
            let mut scratch = Vec::new();
            for (r, row) in rows.chunks_exact(d).enumerate() {
                let id = (c * chunk_rows + r) as u32;
                let row = T::as_f32(row, &mut scratch);
                for (q, top) in tops.iter_mut().enumerate() {
                    let score = dot_f32(&queries[q * d..(q + 1) * d], row);
                    top.push(Hit { id, score });
                }
            }
            tops
        })
        .collect();
    let mut merged: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
    for tops in partial {
        merged = merged
            .into_iter()
            .zip(tops)
            .map(|(a, b)| a.merge(b))
            .collect();
    }
    Ok(merged.into_iter().map(TopK::into_sorted).collect())
}

/// Compares two ranked lists of the same queries: the same ids in the same order, except where
/// neighbouring scores are within `tol` (a swap among near-ties is not an error), and scores within
/// `tol`. Returns a description of the first disagreement.
pub fn compare_hits(
    got: &[Vec<Hit>],
    want: &[Vec<Hit>],
    tol: f32,
) -> std::result::Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{} result lists, expected {}",
            got.len(),
            want.len()
        ));
    }
    for (q, (g, w)) in got.iter().zip(want).enumerate() {
        if g.len() != w.len() {
            return Err(format!("query {q}: {} hits, expected {}", g.len(), w.len()));
        }
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            if (a.score - b.score).abs() > tol || !a.score.is_finite() {
                return Err(format!(
                    "query {q} rank {i}: score {} (id {}), expected {} (id {})",
                    a.score, a.id, b.score, b.id
                ));
            }
            if a.id != b.id {
                // A different id is a near-tie only if the reference scores it (or, past the
                // end of its list, its last hit) within `tol` of the score reported for it.
                let tie = match w.iter().find(|x| x.id == a.id) {
                    Some(x) => (x.score - a.score).abs() <= tol,
                    None => w.last().is_some_and(|l| (l.score - a.score).abs() <= tol),
                };
                if !tie {
                    return Err(format!(
                        "query {q} rank {i}: id {} (score {}), expected id {} (score {})",
                        a.id, a.score, b.id, b.score
                    ));
                }
            }
        }
        let mut ids: Vec<u32> = g.iter().map(|h| h.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != g.len() {
            return Err(format!("query {q}: an id is reported twice"));
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
pub mod gpu;

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(queries: &[f32], corpus: &[f32], d: usize, k: usize) -> Vec<Vec<Hit>> {
        queries
            .chunks(d)
            .map(|q| {
                let mut all: Vec<Hit> = corpus
                    .chunks(d)
                    .enumerate()
                    .map(|(i, r)| Hit {
                        id: i as u32,
                        score: q.iter().zip(r).map(|(a, b)| (a * b) as f64).sum::<f64>() as f32,
                    })
                    .collect();
                all.sort_by(Hit::rank_cmp);
                all.truncate(k);
                all
            })
            .collect()
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn matches_a_full_sort_for_odd_sizes() {
        let mut seed = 7;
        for (nq, n, d, k) in [
            (1, 1, 8, 1),
            (3, 1000, 24, 10),
            (5, 4097, 16, 100),
            (2, 50, 8, 80),
        ] {
            let q: Vec<f32> = (0..nq * d).map(|_| lcg(&mut seed)).collect();
            let c: Vec<f32> = (0..n * d).map(|_| lcg(&mut seed)).collect();
            let got = topk_cpu(&q, &c, d, k).unwrap();
            let want = brute(&q, &c, d, k);
            compare_hits(&got, &want, 1e-5).unwrap();
            assert_eq!(got[0].len(), k.min(n));
        }
    }

    #[test]
    fn dot_products_agree_with_the_portable_path_at_every_length() {
        let mut seed = 11;
        for n in [0usize, 1, 7, 8, 9, 31, 32, 33, 63, 384, 385, 1024] {
            let a: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| (x * y) as f64).sum();
            for got in [dot_f32(&a, &b), dot_f32_portable(&a, &b)] {
                assert!(
                    (got as f64 - exact).abs() < 1e-5,
                    "n = {n}: {got} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_id() {
        let corpus = [1.0f32, 0.0, 1.0, 0.0, 0.5, 0.0, 1.0, 0.0];
        let got = topk_cpu(&[1.0, 0.0], &corpus, 2, 3).unwrap();
        let ids: Vec<u32> = got[0].iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![0, 1, 3]);
    }

    #[test]
    fn f16_corpus_scores_like_its_f32_values() {
        let mut seed = 3;
        let d = 32;
        let c32: Vec<f32> = (0..300 * d).map(|_| lcg(&mut seed)).collect();
        let c16: Vec<f16> = c32.iter().map(|&x| f16::from_f32(x)).collect();
        let back: Vec<f32> = c16.iter().map(|x| x.to_f32()).collect();
        let q: Vec<f32> = (0..2 * d).map(|_| lcg(&mut seed)).collect();
        compare_hits(
            &topk_cpu(&q, &c16, d, 20).unwrap(),
            &topk_cpu(&q, &back, d, 20).unwrap(),
            1e-6,
        )
        .unwrap();
    }

    #[test]
    fn rejects_ragged_input() {
        assert!(topk_cpu(&[1.0; 5], &[1.0f32; 8], 4, 1).is_err());
        assert!(topk_cpu(&[1.0; 4], &[1.0f32; 8], 4, 0).unwrap()[0].is_empty());
    }

    #[test]
    fn comparison_catches_a_wrong_id() {
        let a = vec![vec![Hit { id: 1, score: 0.9 }, Hit { id: 2, score: 0.5 }]];
        let b = vec![vec![Hit { id: 3, score: 0.9 }, Hit { id: 2, score: 0.5 }]];
        assert!(compare_hits(&a, &b, 1e-3).is_err());
        let c = vec![vec![Hit { id: 2, score: 0.5 }, Hit { id: 1, score: 0.5 }]];
        let d = vec![vec![Hit { id: 1, score: 0.5 }, Hit { id: 2, score: 0.5 }]];
        assert!(compare_hits(&c, &d, 1e-3).is_ok());
    }
}
