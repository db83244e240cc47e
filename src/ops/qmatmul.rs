//! Quantized matrix products on the CPU: `y = x · Wᵀ` with `W` in 4-bit (GGML Q4_1) or 8-bit
//! (GGML Q8_0) blocks of 32 and `x` quantized to 8 bits per block of 32 on the fly.
//!
//! The weights are repacked once at load into a layout made for the AVX-512 VNNI instruction
//! `vpdpbusd` (unsigned 8-bit × signed 8-bit, four products summed into each 32-bit lane) with
//! one output per lane:
//!
//! - every weight becomes an unsigned integer `u` with `w = d·u + m` per block of 32 (Q4_1 as it
//!   is; Q8_0 as `u = q + 128`, `m = -128·d`), so one kernel serves both types;
//! - rows are grouped in panels of 16 (the last padded with zeros); for each panel and block,
//!   the 32 columns form 8 quads of 4, and a quad is one 64-byte vector: lane `j` holds the 4
//!   weights of row `j` of the panel. A 4-bit panel block packs quads `q` and `q + 4` into the
//!   low and high nibbles of one vector (4 vectors, 256 bytes); an 8-bit one is 8 vectors;
//! - the block scales `d` and offsets `m` are f32, 16 per panel block (one per lane).
//!
//! For a row `i` of `x`, block `b` and panel: `vpdpbusd` of each weight quad with the
//! broadcast 4 activations of that quad sums the block's integer products for 16 outputs at once;
//! then one conversion and three float operations apply `d·dx` and add `m·(dx·Σ xq)`. The float
//! work is per block and 16 outputs, not per 64 products, so the integer unit sets the pace. A
//! product runs up to 4 rows of `x` against 2 panels per read of the weights; panels are split
//! across the rayon pool.
//!
//! Every output is computed by the same sequence of operations whatever the other rows of `x`,
//! the tile they fall in or the thread: the products are batch-invariant.
//!
//! [`QMatrix::matmul_reference`] is the scalar reference (and the portable fallback): the same
//! integer sums in plain loops, the same float operations per block in the same order.

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use crate::error::OpsError;

use super::{Result, SendPtr};

/// Weights per quantization block.
const BLOCK: usize = 32;
/// Output rows per panel (lanes of a 512-bit vector of i32).
const PANEL: usize = 16;
/// Rows of `x` computed together against one read of the weights.
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
    /// Per panel and block: 256 (`U4`) or 512 (`U8`) bytes.
    q: Vec<u8>,
    /// Per panel and block, 16 lanes: block scales.
    d: Vec<f32>,
    /// Per panel and block, 16 lanes: block offsets.
    m: Vec<f32>,
}

/// `x` quantized to 8 bits per block of 32.
pub struct QActivations {
    rows: usize,
    /// `(rows, cols)` signed integers.
    q: Vec<i8>,
    /// Per row and block: the scale `dx`.
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
        matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0) && cols > 0 && cols.is_multiple_of(BLOCK)
    }

    /// Repacks GGML blocks (`rows * cols / 32` blocks, row-major, as in a GGUF file).
    pub fn from_ggml(dtype: GgmlDType, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        if !Self::supports(dtype, cols) {
            return Err(bad(format!(
                "quantized product of {dtype:?} with {cols} columns (Q4_1 or Q8_0, multiple of 32)"
            )));
        }
        let blocks = cols / BLOCK;
        let block_bytes = dtype.type_size();
        if data.len() != rows * blocks * block_bytes {
            return Err(bad(format!(
                "{} bytes for {rows}x{cols} {dtype:?} (expected {})",
                data.len(),
                rows * blocks * block_bytes
            )));
        }
        let kind = match dtype {
            GgmlDType::Q4_1 => QKind::U4,
            _ => QKind::U8,
        };
        let panels = rows.div_ceil(PANEL);
        let mut m = Self {
            kind,
            rows,
            cols,
            q: vec![0u8; panels * blocks * Self::panel_block_bytes(kind)],
            d: vec![0f32; panels * blocks * PANEL],
            m: vec![0f32; panels * blocks * PANEL],
        };
        let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        for r in 0..rows {
            for b in 0..blocks {
                let src = &data[(r * blocks + b) * block_bytes..][..block_bytes];
                let (scale, offset) = match kind {
                    QKind::U4 => (f16_at(src, 0), f16_at(src, 2)),
                    QKind::U8 => (f16_at(src, 0), -128.0 * f16_at(src, 0)),
                };
                let lane = m.lane(r, b);
                m.d[lane] = scale;
                m.m[lane] = offset;
                for t in 0..BLOCK {
                    // Q4_1: weight t < 16 in the low nibble of byte t, t >= 16 in the high
                    // nibble of byte t - 16. Q8_0: signed byte t, offset by 128.
                    let u = match kind {
                        QKind::U4 if t < 16 => src[4 + t] & 0x0F,
                        QKind::U4 => src[4 + t - 16] >> 4,
                        QKind::U8 => src[2 + t] ^ 0x80,
                    };
                    let (byte, high) = m.byte_of(r, b * BLOCK + t);
                    m.q[byte] |= if high { u << 4 } else { u };
                }
            }
        }
        Ok(m)
    }

    fn panel_block_bytes(kind: QKind) -> usize {
        match kind {
            QKind::U4 => 4 * 64,
            QKind::U8 => 8 * 64,
        }
    }

    /// Index of the scale (and offset) of row `r`, block `b`.
    fn lane(&self, r: usize, b: usize) -> usize {
        ((r / PANEL) * (self.cols / BLOCK) + b) * PANEL + r % PANEL
    }

    /// The byte holding weight `(r, c)`, and whether it is the high nibble.
    fn byte_of(&self, r: usize, c: usize) -> (usize, bool) {
        let blocks = self.cols / BLOCK;
        let (p, j) = (r / PANEL, r % PANEL);
        let (b, t) = (c / BLOCK, c % BLOCK);
        let (quad, e) = (t / 4, t % 4);
        let base = (p * blocks + b) * Self::panel_block_bytes(self.kind);
        match self.kind {
            QKind::U4 => (base + (quad % 4) * 64 + j * 4 + e, quad >= 4),
            QKind::U8 => (base + quad * 64 + j * 4 + e, false),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes a product reads: the integers, scales and offsets.
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * (self.d.len() + self.m.len())
    }

    /// The unsigned integer of weight `(r, c)`.
    fn int_at(&self, r: usize, c: usize) -> u8 {
        let (byte, high) = self.byte_of(r, c);
        match (self.kind, high) {
            (QKind::U4, false) => self.q[byte] & 0x0F,
            (QKind::U4, true) => self.q[byte] >> 4,
            (QKind::U8, _) => self.q[byte],
        }
    }

    /// The matrix in f32 `(rows, cols)`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                let l = self.lane(r, c / BLOCK);
                out.push(self.d[l] * self.int_at(r, c) as f32 + self.m[l]);
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
    /// `acc = fma(sum·d, dx, acc)` and `acc = fma(m, dx·Σ xq, acc)`, blocks in order.
    pub fn matmul_reference(&self, x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
        self.check_x(x, n, out)?;
        let xq = QActivations::quantize(x, n, self.cols);
        self.matmul_reference_q(&xq, out);
        Ok(())
    }

    fn matmul_reference_q(&self, xq: &QActivations, out: &mut [f32]) {
        let blocks = self.cols / BLOCK;
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
                    let l = self.lane(r, b);
                    acc = (isum as f32 * self.d[l]).mul_add(xq.scale[i * blocks + b], acc);
                    acc = self.m[l].mul_add(xq.sum[i * blocks + b], acc);
                }
                out[i * self.rows + r] = acc;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn matmul_avx512(&self, xq: &QActivations, out: &mut [f32]) {
        let panels = self.rows.div_ceil(PANEL);
        let threads = rayon::current_num_threads().max(1);
        // Pairs of panels per task: a few tasks per thread for balance.
        let pairs = panels.div_ceil(2);
        let per_task = pairs.div_ceil(threads * 2).max(1);
        let n = xq.rows;
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..pairs.div_ceil(per_task))
            .into_par_iter()
            .for_each(|task| {
                let first = task * per_task * 2;
                let last = ((task + 1) * per_task * 2).min(panels);
                for i0 in (0..n).step_by(ROW_TILE) {
                    let count = (n - i0).min(ROW_TILE);
                    let mut p = first;
                    while p < last {
                        let two = p + 1 < last;
                        // SAFETY: the CPU has AVX-512 F/BW/VNNI (checked by the caller); the
                        // panels and rows are inside the matrices; this task alone writes the
                        // outputs of its panels.
                        unsafe {
                            match (count, two) {
                                (4, true) => self.tile::<4, 2>(xq, i0, p, out_ptr),
                                (3, true) => self.tile::<3, 2>(xq, i0, p, out_ptr),
                                (2, true) => self.tile::<2, 2>(xq, i0, p, out_ptr),
                                (_, true) => self.tile::<1, 2>(xq, i0, p, out_ptr),
                                (4, false) => self.tile::<4, 1>(xq, i0, p, out_ptr),
                                (3, false) => self.tile::<3, 1>(xq, i0, p, out_ptr),
                                (2, false) => self.tile::<2, 1>(xq, i0, p, out_ptr),
                                (_, false) => self.tile::<1, 1>(xq, i0, p, out_ptr),
                            }
                        }
                        p += if two { 2 } else { 1 };
                    }
                }
            });
    }

    /// Outputs of panels `p0..p0 + P` for rows `i0..i0 + R` of `xq`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile<const R: usize, const P: usize>(
        &self,
        xq: &QActivations,
        i0: usize,
        p0: usize,
        out: SendPtr,
    ) {
        use std::arch::x86_64::*;
        let blocks = self.cols / BLOCK;
        let pbb = Self::panel_block_bytes(self.kind);
        let low = _mm512_set1_epi8(0x0F);
        let mut facc = [[_mm512_setzero_ps(); R]; P];
        for b in 0..blocks {
            let mut iacc = [[_mm512_setzero_si512(); R]; P];
            let xb: [*const u8; R] = std::array::from_fn(|k| {
                xq.q.as_ptr().add((i0 + k) * self.cols + b * BLOCK) as *const u8
            });
            let quad = |k: usize, qd: usize| -> __m512i {
                _mm512_set1_epi32(std::ptr::read_unaligned(xb[k].add(4 * qd) as *const i32))
            };
            match self.kind {
                QKind::U4 => {
                    for v in 0..4 {
                        let xs_lo: [__m512i; R] = std::array::from_fn(|k| quad(k, v));
                        let xs_hi: [__m512i; R] = std::array::from_fn(|k| quad(k, v + 4));
                        for (p, acc) in iacc.iter_mut().enumerate() {
                            let base = ((p0 + p) * blocks + b) * pbb + v * 64;
                            let raw = _mm512_loadu_si512(self.q.as_ptr().add(base) as *const _);
                            let wl = _mm512_and_si512(raw, low);
                            let wh = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
                            for k in 0..R {
                                acc[k] = _mm512_dpbusd_epi32(acc[k], wl, xs_lo[k]);
                                acc[k] = _mm512_dpbusd_epi32(acc[k], wh, xs_hi[k]);
                            }
                        }
                    }
                }
                QKind::U8 => {
                    for qd in 0..8 {
                        let xs: [__m512i; R] = std::array::from_fn(|k| quad(k, qd));
                        for (p, acc) in iacc.iter_mut().enumerate() {
                            let base = ((p0 + p) * blocks + b) * pbb + qd * 64;
                            let w = _mm512_loadu_si512(self.q.as_ptr().add(base) as *const _);
                            for k in 0..R {
                                acc[k] = _mm512_dpbusd_epi32(acc[k], w, xs[k]);
                            }
                        }
                    }
                }
            }
            for (p, (accs, sums)) in facc.iter_mut().zip(&iacc).enumerate() {
                let lane = ((p0 + p) * blocks + b) * PANEL;
                let d = _mm512_loadu_ps(self.d.as_ptr().add(lane));
                let m = _mm512_loadu_ps(self.m.as_ptr().add(lane));
                for (k, (acc, sum)) in accs.iter_mut().zip(sums).enumerate() {
                    let xi = (i0 + k) * blocks + b;
                    let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(*sum), d);
                    *acc =
                        _mm512_fmadd_ps(scaled, _mm512_set1_ps(*xq.scale.get_unchecked(xi)), *acc);
                    *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(*xq.sum.get_unchecked(xi)), *acc);
                }
            }
        }
        for (p, accs) in facc.iter().enumerate() {
            let r0 = (p0 + p) * PANEL;
            let valid = (self.rows - r0).min(PANEL);
            let mask: __mmask16 = if valid == PANEL {
                0xFFFF
            } else {
                (1u16 << valid) - 1
            };
            for (k, acc) in accs.iter().enumerate() {
                let dst = out.get().add((i0 + k) * self.rows + r0);
                _mm512_mask_storeu_ps(dst, mask, *acc);
            }
        }
    }
}

impl QActivations {
    /// Quantizes `x (rows, cols)`: per block of 32, `dx = max|x| / 127`, `xq = round(x / dx)`.
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Self {
        debug_assert_eq!(x.len(), rows * cols);
        let blocks = cols / BLOCK;
        let mut q = vec![0i8; rows * cols];
        let mut scale = vec![0f32; rows * blocks];
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
                scale[i * blocks + b] = dx;
                sum[i * blocks + b] = dx * isum as f32;
            }
        }
        Self {
            rows,
            q,
            scale,
            sum,
        }
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
            for (rows, cols) in [(1, 64), (37, 64), (53, 576), (19, 1536), (21, 96)] {
                let (q, bytes) = ggml(dtype, rows, cols, rows as u64 * 7 + cols as u64);
                let m = QMatrix::from_ggml(dtype, rows, cols, &bytes).unwrap();
                let candle = QMatMul::from_qtensor(q).unwrap();
                for n in [1, 2, 3, 4, 7] {
                    let x = random(n * cols, 11 + n as u64);
                    let mut want = vec![f32::NAN; n * rows];
                    m.matmul_reference(&x, n, &mut want).unwrap();
                    let mut got = vec![f32::NAN; n * rows];
                    m.matmul(&x, n, &mut got).unwrap();
                    // candle's Q4_1 product takes blocks in pairs.
                    let with_candle = dtype == GgmlDType::Q8_0 || cols % 64 == 0;
                    let xt = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap();
                    let theirs = if with_candle {
                        candle
                            .forward(&xt)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                    } else {
                        want.clone()
                    };
                    // Exact f32 product with the dequantized weights: the bound of the 8-bit
                    // activation rounding (half a step of each block, times the weights).
                    let wf = m.dequantize();
                    for i in 0..n {
                        for r in 0..rows {
                            let k = i * rows + r;
                            let exact: f64 = (0..cols)
                                .map(|c| wf[r * cols + c] as f64 * x[i * cols + c] as f64)
                                .sum();
                            // The kernel performs the reference's operations in the same order.
                            assert!(
                                got[k] == want[k],
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
        assert!(!QMatrix::supports(GgmlDType::Q4_1, 80));
        assert!(QMatrix::supports(GgmlDType::Q4_1, 96));
        assert!(!QMatrix::supports(GgmlDType::Q4_0, 64));
        assert!(QMatrix::from_ggml(GgmlDType::Q8_0, 2, 64, &[0u8; 10]).is_err());
        let (_, bytes) = ggml(GgmlDType::Q8_0, 2, 64, 1);
        let m = QMatrix::from_ggml(GgmlDType::Q8_0, 2, 64, &bytes).unwrap();
        let mut out = vec![0f32; 3];
        assert!(m.matmul(&[0f32; 64], 1, &mut out).is_err());
    }
}
