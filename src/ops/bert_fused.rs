//! The fused pieces of an f16 BERT layer on the GPU (`kernels/bert.cu`), around cuBLAS's GEMMs:
//! attention over packed sequences straight from the QKV projection (bias added on load, no
//! head regrouping, no score matrix in memory), bias + residual + LayerNorm in one pass, the
//! embedding lookups + LayerNorm in one pass, and bias + activation in one pass. [`crate::models::bert::Bert`] uses them for f16 on CUDA; its
//! unfused candle path (the CPU path) is the reference they are checked against.

use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::{DType, Layout, Storage, Tensor};
use half::f16;

use super::{cuda_device, dev_err, wrap_cuda, Result};
use crate::error::OpsError;

/// The PTX of `kernels/bert.cu`, compiled by build.rs.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bert.ptx"));
const MODULE: &str = "cited_bert";
/// Queries per attention block (4 warps of 16), as in the kernel.
const QUERY_TILE: usize = 64;

/// The activation of the feed-forward layer, as the kernel numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    GeluErf = 0,
    GeluTanh = 1,
    Relu = 2,
}

/// Whether the fused kernels take an encoder of this shape: head dims 32 or 64, a hidden size
/// that is a multiple of 64 up to 1,024, an intermediate size that is a multiple of 8.
pub fn supports(hidden: usize, heads: usize, intermediate: usize) -> bool {
    attention_supports(hidden, heads) && intermediate.is_multiple_of(8)
}

/// Whether the attention and norm kernels take this width: head dims 32 or 64, a hidden size
/// that is a multiple of 64 up to 1,024.
fn attention_supports(hidden: usize, heads: usize) -> bool {
    heads > 0
        && hidden.is_multiple_of(heads)
        && matches!(hidden / heads, 32 | 64)
        && hidden.is_multiple_of(64)
        && hidden <= 1024
}

/// The f16 elements of a contiguous tensor's storage.
fn view<'a>(s: &'a Storage, l: &Layout, what: &str) -> Result<CudaView<'a, f16>> {
    let Storage::Cuda(c) = s else {
        return Err(OpsError::Device(format!("{what} is not on a CUDA device")));
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        return Err(OpsError::Shape(format!("{what} is not contiguous")));
    };
    // 16-byte loads and half2 pairs need aligned rows.
    if !start.is_multiple_of(8) {
        return Err(OpsError::Shape(format!(
            "{what} starts at an unaligned offset"
        )));
    }
    Ok(c.as_cuda_slice::<f16>()?.slice(start..end))
}

/// Runs `f` on the f16 views of `ts` (each named for its error), holding their storage for the
/// call.
fn with_views<R>(
    ts: &[(&Tensor, &str)],
    f: impl FnOnce(&[CudaView<'_, f16>]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|(t, _)| t.storage_and_layout()).collect();
    let views = guards
        .iter()
        .zip(ts)
        .map(|((s, l), (_, what))| view(s, l, what))
        .collect::<Result<Vec<_>>>()?;
    f(&views)
}

fn check_f16(ts: &[(&Tensor, &str)]) -> Result<()> {
    for (t, what) in ts {
        if t.dtype() != DType::F16 {
            return Err(OpsError::Shape(format!(
                "{what} is {:?}, not f16",
                t.dtype()
            )));
        }
    }
    Ok(())
}

/// cuBLASLt on one device, for GEMMs with the bias and activation in their epilogue.
pub struct Epilogues {
    lt: candle_core::cuda_backend::cudarc::cublaslt::CudaBlasLT,
}

impl Epilogues {
    /// A cuBLASLt handle (and its workspace) on the device of `t`.
    pub fn new(t: &Tensor) -> Result<Self> {
        let dev = cuda_device(t, "tensor")?;
        let lt = candle_core::cuda_backend::cudarc::cublaslt::CudaBlasLT::new(dev.cuda_stream())
            .map_err(dev_err)?;
        Ok(Self { lt })
    }

    /// `act(x w^T + bias)` in one cuBLASLt call: `x` (rows, in), `w` (out, in), `bias` (out),
    /// all f16. cuBLASLt's GELU is the tanh form: exact for [`Act::GeluTanh`], an approximation
    /// of [`Act::GeluErf`] (within about 1e-3 of it), which callers opt into.
    pub fn linear_act(&self, x: &Tensor, w: &Tensor, bias: &Tensor, act: Act) -> Result<Tensor> {
        use candle_core::cuda_backend::cudarc::cublaslt::{Activation, Matmul, MatmulConfig};
        check_f16(&[(x, "input"), (w, "weights"), (bias, "bias")])?;
        let (rows, k) = x.dims2()?;
        let (out, wk) = w.dims2()?;
        if wk != k || bias.elem_count() != out || rows == 0 {
            return Err(OpsError::Shape(format!(
                "linear of {:?} by {:?} with bias {:?}",
                x.dims(),
                w.dims(),
                bias.dims()
            )));
        }
        let dev = cuda_device(x, "tensor")?;
        // SAFETY: the GEMM writes every element of its (rows, out) output.
        let mut y = unsafe { dev.cuda_stream().alloc::<f16>(rows * out) }.map_err(dev_err)?;
        with_views(&[(x, "input"), (w, "weights"), (bias, "bias")], |v| {
            // Column-major view: y^T (out x rows) = w (out x in, stored as in x out, hence
            // transposed) times x^T (in x rows); the bias runs along y^T's rows.
            let cfg = MatmulConfig {
                transa: true,
                transb: false,
                transc: false,
                m: out as u64,
                n: rows as u64,
                k: k as u64,
                alpha: 1.0,
                lda: k as i64,
                ldb: k as i64,
                beta: 0.0,
                ldc: out as i64,
                stride_a: None,
                stride_b: None,
                stride_c: None,
                stride_bias: None,
                batch_size: None,
            };
            let act = match act {
                Act::GeluErf | Act::GeluTanh => Activation::Gelu,
                Act::Relu => Activation::Relu,
            };
            // SAFETY: the views hold w (out x in), x (rows x in) and the bias (out), y holds
            // rows x out, as the configuration describes; all on this handle's stream.
            unsafe {
                self.lt
                    .matmul(cfg, &v[1], &v[0], &mut y, Some(&v[2]), Some(&act))
                    .map_err(dev_err)
            }
        })?;
        Ok(wrap_cuda(&dev, y, (rows, out)))
    }
}

/// Multi-head self-attention of packed sequences: `qkv` (tokens, 3 * hidden) is the QKV
/// projection without its bias, `bias` (3 * hidden), `starts` the sequences' first tokens and
/// the total (u32 on the device, `seqs + 1`), `longest` the longest sequence. Returns
/// (tokens, hidden), heads side by side as the output projection takes them.
pub fn attention(
    qkv: &Tensor,
    bias: &Tensor,
    starts: &Tensor,
    longest: usize,
    heads: usize,
) -> Result<Tensor> {
    check_f16(&[(qkv, "qkv"), (bias, "qkv bias")])?;
    let (tokens, width) = qkv.dims2()?;
    let hidden = width / 3;
    let seqs = starts.elem_count().saturating_sub(1);
    if width != 3 * hidden
        || bias.elem_count() != width
        || !attention_supports(hidden, heads)
        || starts.dtype() != DType::U32
        || seqs == 0
    {
        return Err(OpsError::Shape(format!(
            "attention of qkv {:?} with bias {:?}, {heads} heads, {seqs} sequences",
            qkv.dims(),
            bias.dims()
        )));
    }
    let hd = hidden / heads;
    let dev = cuda_device(qkv, "tensor")?;
    let name = if hd == 32 {
        "cited_bert_attention_32"
    } else {
        "cited_bert_attention_64"
    };
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let stream = dev.cuda_stream();
    // SAFETY: every output element is written by the kernel (each token of each sequence, each
    // head's dims) before the tensor is read.
    let mut out = unsafe { stream.alloc::<f16>(tokens * hidden) }.map_err(dev_err)?;
    {
        let (qs, ql) = qkv.storage_and_layout();
        let (bs, bl) = bias.storage_and_layout();
        let (ss, sl) = starts.storage_and_layout();
        let q = view(&qs, ql, "qkv")?;
        let b = view(&bs, bl, "qkv bias")?;
        let Storage::Cuda(sc) = &*ss else {
            return Err(OpsError::Device("starts are not on a CUDA device".into()));
        };
        let Some((s0, s1)) = sl.contiguous_offsets() else {
            return Err(OpsError::Shape("starts are not contiguous".into()));
        };
        let st = sc.as_cuda_slice::<u32>()?.slice(s0..s1);
        let heads32 = heads as i32;
        let scale_log2 = std::f32::consts::LOG2_E / (hd as f32).sqrt();
        let cfg = LaunchConfig {
            grid_dim: (
                longest.div_ceil(QUERY_TILE).max(1) as u32,
                heads as u32,
                seqs as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = func.builder();
        l.arg(&q)
            .arg(&b)
            .arg(&st)
            .arg(&mut out)
            .arg(&heads32)
            .arg(&scale_log2);
        // SAFETY: the arguments match `cited_bert_attention_<HD>` (kernels/bert.cu); the
        // starts are the caller's packed offsets (non-decreasing, the last one `tokens`), so
        // every row the kernel touches lies inside `qkv` and `out`.
        unsafe { l.launch(cfg) }.map_err(dev_err)?;
    }
    Ok(wrap_cuda(&dev, out, (tokens, hidden)))
}

/// `LayerNorm(a + bias + residual) * gamma + beta` row by row; all (rows, cols) or (cols).
pub fn add_norm(
    a: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let inputs = [
        (a, "input"),
        (bias, "bias"),
        (residual, "residual"),
        (gamma, "gamma"),
        (beta, "beta"),
    ];
    check_f16(&inputs)?;
    let (rows, cols) = a.dims2()?;
    if residual.dims() != a.dims()
        || [bias, gamma, beta].iter().any(|t| t.elem_count() != cols)
        || !cols.is_multiple_of(64)
        || cols > 1024
    {
        return Err(OpsError::Shape(format!(
            "add_norm of {:?} and {:?} ({cols} columns: a multiple of 64 up to 1024)",
            a.dims(),
            residual.dims()
        )));
    }
    let dev = cuda_device(a, "tensor")?;
    let stream = dev.cuda_stream();
    // SAFETY: the kernel writes each whole row (one warp, or a power-of-two group of lanes).
    let mut out = unsafe { stream.alloc::<f16>(rows * cols) }.map_err(dev_err)?;
    with_views(&inputs, |v| {
        let (rows32, cols32, eps32) = (rows as i32, cols as i32, eps as f32);
        // 16-byte loads where the width splits into a power-of-two group of lanes.
        let (name, cfg) = match norm_vec(cols) {
            Some(vec) => (
                format!("cited_bert_add_norm_v{vec}"),
                norm_launch(rows, cols, vec),
            ),
            None => (
                "cited_bert_add_norm".to_string(),
                LaunchConfig {
                    grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
            ),
        };
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut l = func.builder();
        for x in v {
            l.arg(x);
        }
        l.arg(&mut out).arg(&rows32).arg(&cols32).arg(&eps32);
        // SAFETY: the arguments match `cited_bert_add_norm` and `cited_bert_add_norm_v*`
        // (a, bias, residual, gamma, beta, out, rows, cols, eps); shapes (and, for the latter,
        // the lane grouping) checked above.
        unsafe { l.launch(cfg) }.map_err(dev_err)?;
        Ok(())
    })?;
    Ok(wrap_cuda(&dev, out, (rows, cols)))
}

/// Whether [`embed_norm`] takes this hidden size (it splits into a power-of-two group of lanes,
/// as 384 and 768 do).
pub fn embed_norm_fits(cols: usize) -> bool {
    norm_vec(cols).is_some()
}

/// The uint4 loads per lane of `cited_bert_*_norm_v*` for this width: the first VEC in 1..=4
/// that leaves a power-of-two group of at most 32 lanes per row (384 columns: 3 x 16 lanes).
fn norm_vec(cols: usize) -> Option<usize> {
    (1..=4).find(|&vec| {
        let lanes = cols / (8 * vec);
        cols == 8 * vec * lanes && lanes.is_power_of_two() && lanes <= 32
    })
}

/// Grid of the `_v*` norm kernels: one group of `cols / (8 vec)` lanes per row, 256 threads a
/// block.
fn norm_launch(rows: usize, cols: usize, vec: usize) -> LaunchConfig {
    let lanes = cols / (8 * vec);
    LaunchConfig {
        grid_dim: ((rows * lanes).div_ceil(256).max(1) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The embedding stage in one pass: `LayerNorm(word[ids] + position[pos] + type_row) * gamma +
/// beta` for token ids and positions given on the host (checked against the tables here, so
/// the kernel's gathers stay in range). `word` (vocab, cols), `position` (max positions, cols),
/// `type_row`, `gamma`, `beta` (cols), all f16; cols must split into a power-of-two group of
/// lanes (see `norm_vec`).
#[allow(clippy::too_many_arguments)]
pub fn embed_norm(
    ids: &[u32],
    positions: &[u32],
    word: &Tensor,
    position: &Tensor,
    type_row: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let tables = [
        (word, "word table"),
        (position, "position table"),
        (type_row, "token type row"),
        (gamma, "gamma"),
        (beta, "beta"),
    ];
    check_f16(&tables)?;
    let (vocab, cols) = word.dims2()?;
    let (max_pos, pcols) = position.dims2()?;
    let rows = ids.len();
    let vec = norm_vec(cols);
    if pcols != cols
        || [type_row, gamma, beta]
            .iter()
            .any(|t| t.elem_count() != cols)
        || positions.len() != rows
        || rows == 0
        || vec.is_none()
    {
        return Err(OpsError::Shape(format!(
            "embedding stage of {rows} ids, {} positions, tables {:?} and {:?}",
            positions.len(),
            word.dims(),
            position.dims()
        )));
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(OpsError::Shape(format!(
            "token id {bad} beyond the {vocab}-token table"
        )));
    }
    if let Some(&bad) = positions.iter().find(|&&p| p as usize >= max_pos) {
        return Err(OpsError::Shape(format!(
            "position {bad} beyond the {max_pos}-position table"
        )));
    }
    let vec = vec.unwrap_or(1);
    let dev = cuda_device(word, "word table")?;
    let stream = dev.cuda_stream();
    let ids_d = stream.clone_htod(ids).map_err(dev_err)?;
    let pos_d = stream.clone_htod(positions).map_err(dev_err)?;
    // SAFETY: the kernel writes each whole row.
    let mut out = unsafe { stream.alloc::<f16>(rows * cols) }.map_err(dev_err)?;
    with_views(&tables, |v| {
        let (rows32, cols32, eps32) = (rows as i32, cols as i32, eps as f32);
        let func =
            dev.get_or_load_custom_func(&format!("cited_bert_embed_norm_v{vec}"), MODULE, PTX)?;
        let mut l = func.builder();
        l.arg(&ids_d).arg(&pos_d);
        for x in v {
            l.arg(x);
        }
        l.arg(&mut out).arg(&rows32).arg(&cols32).arg(&eps32);
        // SAFETY: the arguments match `cited_bert_embed_norm_v*` (ids, pos, word, position,
        // type row, gamma, beta, out, rows, cols, eps); every id and position was checked
        // against its table above, the widths and the lane grouping too.
        unsafe { l.launch(norm_launch(rows, cols, vec)) }.map_err(dev_err)?;
        Ok(())
    })?;
    Ok(wrap_cuda(&dev, out, (rows, cols)))
}

/// Mean of each packed sequence's rows of `hidden` (tokens, cols) f16, scaled to unit L2 norm:
/// (seqs, cols) f32. `starts`: the sequences' token offsets and the total (seqs + 1, from 0,
/// non-decreasing, each sequence non-empty).
pub fn pool_normalize(hidden: &Tensor, starts: &[u32]) -> Result<Tensor> {
    check_f16(&[(hidden, "hidden states")])?;
    let (tokens, cols) = hidden.dims2()?;
    let seqs = starts.len().saturating_sub(1);
    if seqs == 0
        || starts[0] != 0
        || starts[seqs] as usize != tokens
        || starts.windows(2).any(|w| w[1] <= w[0])
        || !cols.is_multiple_of(2)
        || cols > 1024
    {
        return Err(OpsError::Shape(format!(
            "pooling {tokens} rows of {cols} columns into {seqs} sequences"
        )));
    }
    let dev = cuda_device(hidden, "hidden states")?;
    let stream = dev.cuda_stream();
    let starts_d = stream.clone_htod(starts).map_err(dev_err)?;
    // SAFETY: one block writes each sequence's whole row.
    let mut out = unsafe { stream.alloc::<f32>(seqs * cols) }.map_err(dev_err)?;
    {
        let (s_h, l_h) = hidden.storage_and_layout();
        let vh = view(&s_h, l_h, "hidden states")?;
        let cols32 = cols as i32;
        let func = dev.get_or_load_custom_func("cited_bert_pool_norm", MODULE, PTX)?;
        let mut l = func.builder();
        l.arg(&vh).arg(&starts_d).arg(&mut out).arg(&cols32);
        let cfg = LaunchConfig {
            grid_dim: (seqs as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match `cited_bert_pool_norm`; the offsets cover the rows in
        // order with no empty sequence, the width is even and at most 1,024.
        unsafe { l.launch(cfg) }.map_err(dev_err)?;
    }
    Ok(wrap_cuda(&dev, out, (seqs, cols)))
}

/// `act(x + bias)` for (rows, cols) `x` and (cols) `bias`.
pub fn bias_act(x: &Tensor, bias: &Tensor, act: Act) -> Result<Tensor> {
    check_f16(&[(x, "input"), (bias, "bias")])?;
    let (rows, cols) = x.dims2()?;
    if bias.elem_count() != cols || !cols.is_multiple_of(8) {
        return Err(OpsError::Shape(format!(
            "bias_act of {:?} with bias {:?} (columns a multiple of 8)",
            x.dims(),
            bias.dims()
        )));
    }
    let dev = cuda_device(x, "tensor")?;
    let func = dev.get_or_load_custom_func("cited_bert_bias_act", MODULE, PTX)?;
    let stream = dev.cuda_stream();
    // SAFETY: the kernel writes every element (a grid-stride loop over all of them).
    let mut out = unsafe { stream.alloc::<f16>(rows * cols) }.map_err(dev_err)?;
    {
        let (s_x, l_x) = x.storage_and_layout();
        let (s_b, l_b) = bias.storage_and_layout();
        let (vx, vb) = (view(&s_x, l_x, "input")?, view(&s_b, l_b, "bias")?);
        let (rows32, cols32, act32) = (rows as i32, cols as i32, act as i32);
        let groups = (rows * cols / 8).max(1);
        let cfg = LaunchConfig {
            grid_dim: (groups.div_ceil(256).min(132 * 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = func.builder();
        l.arg(&vx)
            .arg(&vb)
            .arg(&mut out)
            .arg(&rows32)
            .arg(&cols32)
            .arg(&act32);
        // SAFETY: the arguments match `cited_bert_bias_act`; shapes checked above.
        unsafe { l.launch(cfg) }.map_err(dev_err)?;
    }
    Ok(wrap_cuda(&dev, out, (rows, cols)))
}
