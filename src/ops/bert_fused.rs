//! The fused pieces of an f16 BERT layer on the GPU (`kernels/bert.cu`), around cuBLAS's GEMMs:
//! attention over packed sequences straight from the QKV projection (bias added on load, no
//! head regrouping, no score matrix in memory), bias + residual + LayerNorm in one pass, and
//! bias + activation in one pass. [`crate::models::bert::Bert`] uses them for f16 on CUDA; its
//! unfused candle path (the CPU path) is the reference they are checked against.

use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Storage, Tensor};
use half::f16;

use super::{cuda_device, dev_err, Result};
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

fn wrap(
    dev: CudaDevice,
    out: candle_core::cuda_backend::cudarc::driver::CudaSlice<f16>,
    shape: (usize, usize),
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
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
    Ok(wrap(dev, out, (tokens, hidden)))
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
    check_f16(&[
        (a, "input"),
        (bias, "bias"),
        (residual, "residual"),
        (gamma, "gamma"),
        (beta, "beta"),
    ])?;
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
    let func = dev.get_or_load_custom_func("cited_bert_add_norm", MODULE, PTX)?;
    let stream = dev.cuda_stream();
    // SAFETY: one warp writes each whole row.
    let mut out = unsafe { stream.alloc::<f16>(rows * cols) }.map_err(dev_err)?;
    {
        let (s_a, l_a) = a.storage_and_layout();
        let (s_b, l_b) = bias.storage_and_layout();
        let (s_r, l_r) = residual.storage_and_layout();
        let (s_g, l_g) = gamma.storage_and_layout();
        let (s_e, l_e) = beta.storage_and_layout();
        let (va, vb, vr, vg, ve) = (
            view(&s_a, l_a, "input")?,
            view(&s_b, l_b, "bias")?,
            view(&s_r, l_r, "residual")?,
            view(&s_g, l_g, "gamma")?,
            view(&s_e, l_e, "beta")?,
        );
        let (rows32, cols32, eps32) = (rows as i32, cols as i32, eps as f32);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = func.builder();
        l.arg(&va)
            .arg(&vb)
            .arg(&vr)
            .arg(&vg)
            .arg(&ve)
            .arg(&mut out)
            .arg(&rows32)
            .arg(&cols32)
            .arg(&eps32);
        // SAFETY: the arguments match `cited_bert_add_norm`; shapes checked above.
        unsafe { l.launch(cfg) }.map_err(dev_err)?;
    }
    Ok(wrap(dev, out, (rows, cols)))
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
    Ok(wrap(dev, out, (rows, cols)))
}
