//! Scaled dot-product attention of one sequence, with grouped-query heads and an optional causal
//! mask. This is the CPU reference the paged and CUDA kernels are checked against.

use candle_core::{DType, Result, Tensor};

/// Attention of one sequence's queries over its keys and values.
///
/// - `q`: `(heads, q_len, head_dim)`
/// - `k`, `v`: `(kv_heads, kv_len, head_dim)`, `heads` a multiple of `kv_heads`; query head `h`
///   reads key/value head `h / (heads / kv_heads)`.
///
/// With `causal`, the queries are the last `q_len` positions of the sequence: query `i` sits at
/// position `kv_len - q_len + i` and sees keys `0..=` that position. Without it every query sees
/// every key (encoders). Returns `(heads, q_len, head_dim)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, scale: f64) -> Result<Tensor> {
    let (heads, q_len, head_dim) = q.dims3()?;
    let (kv_heads, kv_len, k_dim) = k.dims3()?;
    if k_dim != head_dim || v.dims3()? != (kv_heads, kv_len, head_dim) {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    if kv_heads == 0 || heads % kv_heads != 0 || kv_len < q_len {
        candle_core::bail!(
            "attention: {heads} heads over {kv_heads} kv heads, q_len {q_len} > kv_len {kv_len}"
        );
    }
    let group = heads / kv_heads;
    // The query heads sharing a kv head become rows of one matrix product: no copy of K or V.
    let q = q.reshape((kv_heads, group * q_len, head_dim))?;
    // (kv_heads, group * q_len, kv_len)
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = if causal && q_len > 1 {
        let mask = causal_mask(q_len, kv_len, scores.device())?; // (q_len, kv_len)
        scores
            .reshape((kv_heads, group, q_len, kv_len))?
            .broadcast_add(&mask)?
            .reshape((kv_heads, group * q_len, kv_len))?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    // (kv_heads, group * q_len, head_dim)
    probs.matmul(v)?.reshape((heads, q_len, head_dim))
}

/// Additive mask `(q_len, kv_len)`: 0 where query `i` may see key `j`, -inf elsewhere.
fn causal_mask(q_len: usize, kv_len: usize, device: &candle_core::Device) -> Result<Tensor> {
    let offset = kv_len - q_len;
    let mask: Vec<f32> = (0..q_len)
        .flat_map(|i| {
            (0..kv_len).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (q_len, kv_len), device)
}

/// The same function written as plain loops over `f32` slices: the oracle for [`attention`].
pub fn attention_naive(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    scale: f64,
) -> Result<Tensor> {
    let (heads, q_len, d) = q.dims3()?;
    let (kv_heads, kv_len, _) = k.dims3()?;
    let group = heads / kv_heads;
    let qv = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let kv = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let vv = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; heads * q_len * d];
    for h in 0..heads {
        let kh = h / group;
        for i in 0..q_len {
            let visible = if causal {
                kv_len - q_len + i + 1
            } else {
                kv_len
            };
            let qrow = &qv[(h * q_len + i) * d..][..d];
            let scores: Vec<f64> = (0..visible)
                .map(|j| {
                    let krow = &kv[(kh * kv_len + j) * d..][..d];
                    qrow.iter()
                        .zip(krow)
                        .map(|(a, b)| (a * b) as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            let orow = &mut out[(h * q_len + i) * d..][..d];
            for (j, e) in exps.iter().enumerate() {
                let vrow = &vv[(kh * kv_len + j) * d..][..d];
                for (o, x) in orow.iter_mut().zip(vrow) {
                    *o += (e / total * *x as f64) as f32;
                }
            }
        }
    }
    Tensor::from_vec(out, (heads, q_len, d), q.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(D::Minus1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn matches_naive_loops_for_gqa_ratios_and_offsets() {
        let dev = Device::Cpu;
        for (heads, kv_heads) in [(4, 4), (9, 3), (8, 2), (8, 1)] {
            for (q_len, kv_len) in [(1, 1), (1, 17), (5, 5), (3, 11), (13, 13)] {
                for causal in [true, false] {
                    let q = Tensor::randn(0f32, 1.0, (heads, q_len, 16), &dev).unwrap();
                    let k = Tensor::randn(0f32, 1.0, (kv_heads, kv_len, 16), &dev).unwrap();
                    let v = Tensor::randn(0f32, 1.0, (kv_heads, kv_len, 16), &dev).unwrap();
                    let got = attention(&q, &k, &v, causal, 0.25).unwrap();
                    let want = attention_naive(&q, &k, &v, causal, 0.25).unwrap();
                    let diff = max_abs_diff(&got, &want);
                    assert!(
                        diff < 1e-5,
                        "heads {heads}/{kv_heads} q {q_len} kv {kv_len} causal {causal}: {diff}"
                    );
                }
            }
        }
    }

    #[test]
    fn first_causal_query_sees_only_the_first_key() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 4, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 4, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 4, 8), &dev).unwrap();
        let out = attention(&q, &k, &v, true, 0.3).unwrap();
        let first = out.narrow(1, 0, 1).unwrap();
        let v0 = v.narrow(1, 0, 1).unwrap();
        assert!(max_abs_diff(&first, &v0) < 1e-6);
    }

    #[test]
    fn rejects_shapes_that_do_not_fit() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((5, 2, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((2, 2, 8), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &k, true, 1.0).is_err());
    }
}
