//! Quantized matrix products on the CPU: `y = x · Wᵀ` with `W` in 4-bit (GGML Q4_1) or 8-bit
//! (GGML Q8_0) blocks of 32 and `x` quantized to 8 bits per block of 32 on the fly.
//!
//! The weights are repacked once at load into a layout made for the AVX-512 VNNI instruction
//! `vpdpbusd` (unsigned 8-bit × signed 8-bit, four products summed into each 32-bit lane):
//!
//! - every weight becomes an unsigned integer `u` with `w = d·u + m` per block of 32 (Q4_1 as it
//!   is; Q8_0 as `u = q + 128`, `m = -128·d`), so one kernel serves both types;
//! - 64 weights (two blocks) form a group; a 4-bit group is 32 bytes whose low nibbles hold
//!   weights 0..32 and high nibbles weights 32..64, so masking and shifting gives the 64 weights in
//!   order, with no shuffle;
//! - the block scales `d` and offsets `m` are f32 arrays beside the integers.
//!
//! Per block the product is `d·dx·Σ u·xq + m·(dx·Σ xq)`: the integer sum runs on `vpdpbusd`, the
//! second term is one f32 dot over the blocks of a row. A matrix product runs up to four rows of
//! `x` against each weight group read (prompts and batched decode steps read the weights once per
//! four rows instead of once per row); rows of `W` are split across the rayon pool.
//!
//! [`QMatrix::matmul_reference`] is the scalar reference (and the portable fallback): the same
//! integer arithmetic in plain loops. The AVX-512 path sums the same integers and differs only in
//! the order of the f32 additions.

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use crate::error::OpsError;

use super::{Result, SendPtr};

/// Weights per quantization block.
const BLOCK: usize = 32;
/// Weights per group (two blocks, one 512-bit register of bytes).
const GROUP: usize = 64;
/// Rows of `x` computed together against one read of a weight group.
const ROW_TILE: usize = 4;

/// Integer width of a repacked matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QKind {
    /// 4-bit unsigned integers, two per byte (from Q4_1).
    U4,
    /// 8-bit unsigned integers (from Q8_0, offset by 128).
    U8,
}

/// A weight matrix `(rows, cols)` repacked for [`QMatrix::matmul`].
#[derive(Clone)]
pub struct QMatrix {
    kind: QKind,
    rows: usize,
    cols: usize,
    /// Per row, `cols / 64` groups of 32 (`U4`) or 64 (`U8`) bytes.
    q: Vec<u8>,
    /// Per row, `cols / 32` block scales.
    d: Vec<f32>,
    /// Per row, `cols / 32` block offsets.
    m: Vec<f32>,
}

/// `x` quantized to 8 bits per block of 32, laid out for the kernels.
pub struct QActivations {
    rows: usize,
    cols: usize,
    /// `(rows, cols)` signed integers.
    q: Vec<i8>,
    /// Per row and group, 16 lanes: the scale of the group's first block in lanes 0..8, of the
    /// second in lanes 8..16 (the lanes `vpdpbusd` sums each block into).
    scale: Vec<f32>,
    /// Per row and block: `dx · Σ xq` (what the block offset `m` multiplies).
    sum: Vec<f32>,
}

/// Whether the AVX-512 VNNI kernels run on this CPU.
pub fn fast_path_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn bad(message: String) -> OpsError {
    OpsError::Shape(message)
}

impl QMatrix {
    /// Whether [`QMatrix::from_ggml`] takes a matrix of this type and width.
    pub fn supports(dtype: GgmlDType, cols: usize) -> bool {
        matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0) && cols > 0 && cols.is_multiple_of(GROUP)
    }

    /// Repacks GGML blocks (`rows * cols / 32` blocks, row-major, as in a GGUF file).
    pub fn from_ggml(dtype: GgmlDType, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        if !Self::supports(dtype, cols) {
            return Err(bad(format!(
                "quantized product of {dtype:?} with {cols} columns (Q4_1 or Q8_0, multiple of 64)"
            )));
        }
        let blocks = rows * cols / BLOCK;
        let block_bytes = dtype.type_size();
        if data.len() != blocks * block_bytes {
            return Err(bad(format!(
                "{} bytes for {rows}x{cols} {dtype:?} (expected {})",
                data.len(),
                blocks * block_bytes
            )));
        }
        let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        let mut d = Vec::with_capacity(blocks);
        let mut m = Vec::with_capacity(blocks);
        let (kind, q) = match dtype {
            GgmlDType::Q4_1 => {
                // Block: d f16, m f16, 16 bytes; weight t < 16 in the low nibble of byte t,
                // weight t >= 16 in the high nibble of byte t - 16.
                let mut q = vec![0u8; blocks * BLOCK / 2];
                let nib = |b: &[u8], t: usize| -> u8 {
                    if t < 16 {
                        b[4 + t] & 0x0F
                    } else {
                        b[4 + t - 16] >> 4
                    }
                };
                for (g, out) in q.chunks_exact_mut(GROUP / 2).enumerate() {
                    let b0 = &data[2 * g * block_bytes..][..block_bytes];
                    let b1 = &data[(2 * g + 1) * block_bytes..][..block_bytes];
                    for (j, o) in out.iter_mut().enumerate() {
                        // Group weight j is weight j of block 0; weight j + 32 is weight j of
                        // block 1.
                        *o = nib(b0, j) | (nib(b1, j) << 4);
                    }
                    for b in [b0, b1] {
                        d.push(f16_at(b, 0));
                        m.push(f16_at(b, 2));
                    }
                }
                (QKind::U4, q)
            }
            _ => {
                // Q8_0 block: d f16, 32 signed bytes.
                let mut q = Vec::with_capacity(blocks * BLOCK);
                for b in data.chunks_exact(block_bytes) {
                    let scale = f16_at(b, 0);
                    d.push(scale);
                    m.push(-128.0 * scale);
                    q.extend(b[2..].iter().map(|&v| v ^ 0x80));
                }
                (QKind::U8, q)
            }
        };
        Ok(Self {
            kind,
            rows,
            cols,
            q,
            d,
            m,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn kind(&self) -> QKind {
        self.kind
    }

    /// Bytes held (integers, scales and offsets).
    pub fn size_bytes(&self) -> usize {
        self.q.len() + 4 * (self.d.len() + self.m.len())
    }

    fn group_bytes(&self) -> usize {
        match self.kind {
            QKind::U4 => GROUP / 2,
            QKind::U8 => GROUP,
        }
    }

    /// The unsigned integer of weight `(r, c)`.
    fn int_at(&self, r: usize, c: usize) -> u8 {
        let groups = self.cols / GROUP;
        let (g, j) = (c / GROUP, c % GROUP);
        let base = (r * groups + g) * self.group_bytes();
        match self.kind {
            QKind::U4 => {
                let byte = self.q[base + j % 32];
                if j < 32 {
                    byte & 0x0F
                } else {
                    byte >> 4
                }
            }
            QKind::U8 => self.q[base + j],
        }
    }

    /// The matrix in f32 `(rows, cols)`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let blocks = self.cols / BLOCK;
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                let b = r * blocks + c / BLOCK;
                out.push(self.d[b] * self.int_at(r, c) as f32 + self.m[b]);
            }
        }
        out
    }

    fn check_x(&self, x: &[f32], n: usize, out: &[f32]) -> Result<()> {
        if x.len() != n * self.cols || out.len() != n * self.rows {
            return Err(bad(format!(
                "product of {}x{} weights with {} inputs into {} outputs ({n} rows)",
                self.rows,
                self.cols,
                x.len(),
                out.len()
            )));
        }
        Ok(())
    }

    /// `out (n, rows) = x (n, cols) · Wᵀ`, on the AVX-512 VNNI kernels where the CPU has them,
    /// otherwise on [`QMatrix::matmul_reference`].
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
        self.check_x(x, n, out)?;
        let xq = QActivations::quantize(x, n, self.cols);
        #[cfg(target_arch = "x86_64")]
        if fast_path_available() {
            self.matmul_avx512(&xq, out);
            return Ok(());
        }
        self.matmul_reference_q(&xq, out);
        Ok(())
    }

    /// The scalar reference: per block, the exact integer sum `Σ u·xq`, then
    /// `d·dx·sum + m·(dx·Σ xq)`, blocks added in order.
    pub fn matmul_reference(&self, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
        self.check_x(x, n, out)?;
        let xq = QActivations::quantize(x, n, self.cols);
        self.matmul_reference_q(&xq, out);
        Ok(())
    }

    fn matmul_reference_q(&self, xq: &QActivations, out: &mut [f32]) {
        let blocks = self.cols / BLOCK;
        let groups = self.cols / GROUP;
        for i in 0..xq.rows {
            let xrow = &xq.q[i * self.cols..][..self.cols];
            for r in 0..self.rows {
                let mut acc = 0f32;
                for b in 0..blocks {
                    let mut isum = 0i32;
                    for t in 0..BLOCK {
                        let c = b * BLOCK + t;
                        isum += self.int_at(r, c) as i32 * xrow[c] as i32;
                    }
                    let g = b / 2;
                    let dx = xq.scale[(i * groups + g) * 16 + (b % 2) * 8];
                    let wb = r * blocks + b;
                    acc += self.d[wb] * dx * isum as f32 + self.m[wb] * xq.sum[i * blocks + b];
                }
                out[i * self.rows + r] = acc;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn matmul_avx512(&self, xq: &QActivations, out: &mut [f32]) {
        let threads = rayon::current_num_threads().max(1);
        // A few chunks per thread for balance, but not so small that scheduling dominates.
        let chunk = self.rows.div_ceil(threads * 2).max(16);
        let n = xq.rows;
        let rows = self.rows;
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let first = c * chunk;
            let last = (first + chunk).min(rows);
            let mut tile = [0f32; ROW_TILE];
            for i0 in (0..n).step_by(ROW_TILE) {
                let count = (n - i0).min(ROW_TILE);
                for r in first..last {
                    // SAFETY: the CPU has AVX-512 F/BW/DQ/VNNI (checked by the caller), and every
                    // index stays inside the matrices (checked shapes, whole groups).
                    unsafe {
                        match count {
                            4 => self.row_dot::<4>(xq, i0, r, &mut tile),
                            3 => self.row_dot::<3>(xq, i0, r, &mut tile),
                            2 => self.row_dot::<2>(xq, i0, r, &mut tile),
                            _ => self.row_dot::<1>(xq, i0, r, &mut tile),
                        }
                    }
                    for (k, v) in tile[..count].iter().enumerate() {
                        // SAFETY: row r belongs to this chunk alone, so no two tasks write the
                        // same element; (i0 + k, r) is inside the (n, rows) output.
                        unsafe { *out_ptr.get().add((i0 + k) * rows + r) = *v };
                    }
                }
            }
        });
    }

    /// Dot products of weight row `r` with rows `i0..i0 + R` of `xq`, into `tile[..R]`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
    unsafe fn row_dot<const R: usize>(
        &self,
        xq: &QActivations,
        i0: usize,
        r: usize,
        tile: &mut [f32; ROW_TILE],
    ) {
        use std::arch::x86_64::*;
        let groups = self.cols / GROUP;
        let blocks = self.cols / BLOCK;
        let gb = self.group_bytes();
        let wq = self.q.as_ptr().add(r * groups * gb);
        let wd = self.d.as_ptr().add(r * blocks);
        let mut acc = [_mm512_setzero_ps(); R];
        let low = _mm256_set1_epi8(0x0F);
        for g in 0..groups {
            let w = match self.kind {
                QKind::U4 => {
                    let v = _mm256_loadu_si256(wq.add(g * gb) as *const __m256i);
                    let lo = _mm256_and_si256(v, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
                }
                QKind::U8 => _mm512_loadu_si512(wq.add(g * gb) as *const __m512i),
            };
            let dw = _mm512_insertf32x8(
                _mm512_castps256_ps512(_mm256_set1_ps(*wd.add(2 * g))),
                _mm256_set1_ps(*wd.add(2 * g + 1)),
                1,
            );
            for (k, a) in acc.iter_mut().enumerate() {
                let i = i0 + k;
                let x =
                    _mm512_loadu_si512(xq.q.as_ptr().add(i * self.cols + g * GROUP) as *const _);
                let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
                let sc = _mm512_mul_ps(
                    dw,
                    _mm512_loadu_ps(xq.scale.as_ptr().add((i * groups + g) * 16)),
                );
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, *a);
            }
        }
        let wm = self.m.as_ptr().add(r * blocks);
        for (k, a) in acc.iter().enumerate() {
            let i = i0 + k;
            let offsets = dot_f32(wm, xq.sum.as_ptr().add(i * blocks), blocks);
            tile[k] = _mm512_reduce_add_ps(*a) + offsets;
        }
    }
}

/// `Σ a[i]·b[i]` over `n` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_f32(a: *const f32, b: *const f32, n: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        let left = n - i;
        let mask: __mmask16 = if left >= 16 {
            0xFFFF
        } else {
            (1u16 << left) - 1
        };
        let x = _mm512_maskz_loadu_ps(mask, a.add(i));
        let y = _mm512_maskz_loadu_ps(mask, b.add(i));
        acc = _mm512_fmadd_ps(x, y, acc);
        i += 16;
    }
    _mm512_reduce_add_ps(acc)
}

impl QActivations {
    /// Quantizes `x (rows, cols)`: per block of 32, `dx = max|x| / 127`, `xq = round(x / dx)`.
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(x.len(), rows * cols);
        let blocks = cols / BLOCK;
        let groups = cols / GROUP;
        let mut q = vec![0i8; rows * cols];
        let mut scale = vec![0f32; rows * groups * 16];
        let mut sum = vec![0f32; rows * blocks];
        for i in 0..rows {
            for b in 0..blocks {
                let src = &x[i * cols + b * BLOCK..][..BLOCK];
                let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
                let dx = amax / 127.0;
                let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
                let dst = &mut q[i * cols + b * BLOCK..][..BLOCK];
                let mut isum = 0i32;
                for (o, v) in dst.iter_mut().zip(src) {
                    let r = (v * inv).round() as i32;
                    *o = r as i8;
                    isum += r;
                }
                sum[i * blocks + b] = dx * isum as f32;
                let lanes = &mut scale[(i * groups + b / 2) * 16 + (b % 2) * 8..][..8];
                lanes.fill(dx);
            }
        }
        Self {
            rows,
            cols,
            q,
            scale,
            sum,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rng::SplitMix64;
    use candle_core::quantized::{QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..n).map(|_| rng.unit() * 2.0 - 1.0).collect()
    }

    /// GGML blocks of a random matrix, quantized by candle.
    fn ggml(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> (QTensor, Vec<u8>) {
        let w = Tensor::from_vec(random(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let bytes = q.data().unwrap().to_vec();
        (q, bytes)
    }

    #[test]
    fn repacked_weights_dequantize_like_candle() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (q, bytes) = ggml(dtype, 5, 192, 3);
            let ours = QMatrix::from_ggml(dtype, 5, 192, &bytes).unwrap();
            let theirs = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = ours.dequantize();
            for (a, b) in got.iter().zip(&theirs) {
                assert!((a - b).abs() < 1e-6, "{dtype:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn kernel_matches_scalar_reference_and_candle() {
        // Odd row counts and row tiles (1..4 and a remainder), widths of 1 and several groups.
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (rows, cols) in [(1, 64), (37, 64), (53, 576), (19, 1536)] {
                let (q, bytes) = ggml(dtype, rows, cols, rows as u64 * 7 + cols as u64);
                let m = QMatrix::from_ggml(dtype, rows, cols, &bytes).unwrap();
                let candle = QMatMul::from_qtensor(q).unwrap();
                for n in [1, 2, 3, 4, 7] {
                    let x = random(n * cols, 11 + n as u64);
                    let mut want = vec![f32::NAN; n * rows];
                    m.matmul_reference(&x, n, &mut want).unwrap();
                    let mut got = vec![f32::NAN; n * rows];
                    m.matmul(&x, n, &mut got).unwrap();
                    let xt = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap();
                    let theirs = candle
                        .forward(&xt)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap();
                    // Exact f32 product with the dequantized weights: the bound of the 8-bit
                    // activation rounding (half a step of each block, times the weights).
                    let wf = m.dequantize();
                    for i in 0..n {
                        for r in 0..rows {
                            let k = i * rows + r;
                            let exact: f64 = (0..cols)
                                .map(|c| wf[r * cols + c] as f64 * x[i * cols + c] as f64)
                                .sum();
                            let scale = 1e-5 * (1.0 + want[k].abs());
                            assert!(
                                (got[k] - want[k]).abs() <= scale,
                                "{dtype:?} {rows}x{cols} n {n} ({i},{r}): {} vs {}",
                                got[k],
                                want[k]
                            );
                            let bound: f64 = (0..cols)
                                .map(|c| wf[r * cols + c].abs() as f64)
                                .sum::<f64>()
                                / 127.0;
                            assert!((want[k] as f64 - exact).abs() <= bound + 1e-4);
                            // candle rounds x the same way but keeps its block scale and sum
                            // in f16, so it meets the same bound, not our exact figures.
                            assert!(
                                (theirs[k] as f64 - exact).abs() <= 1.5 * bound + 1e-3,
                                "{dtype:?} candle {} vs exact {exact}",
                                theirs[k]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_unsupported_widths_and_shapes() {
        assert!(!QMatrix::supports(GgmlDType::Q4_1, 96));
        assert!(!QMatrix::supports(GgmlDType::Q4_0, 64));
        assert!(QMatrix::from_ggml(GgmlDType::Q8_0, 2, 64, &[0u8; 10]).is_err());
        let (_, bytes) = ggml(GgmlDType::Q8_0, 2, 64, 1);
        let m = QMatrix::from_ggml(GgmlDType::Q8_0, 2, 64, &bytes).unwrap();
        let mut out = vec![0f32; 3];
        assert!(m.matmul(&[0f32; 64], 1, &mut out).is_err());
    }
}
