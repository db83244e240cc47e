//! A Llama decoder's forward pass on the GPU, between the projections' GEMMs: the rotary
//! embedding with the K/V write into the paged cache, each residual add with the RMSNorm after
//! it, the gated activation (`kernels/llama.cu`), and attention of every token of the batch
//! over the paged cache (`kernels/paged_attention.cu`). [`crate::models::llama::Llama`] uses
//! them on CUDA; its host path (rope, `KvCache::write`, candle's norm and activation,
//! [`super::paged_attention::paged_attention`]) is the reference they are checked against.
//!
//! Attention treats every token as a query row of its own by default: a prompt chunk's token
//! at position `p` attends to positions `0..=p` of its sequence, a decode token to its whole
//! history, each through the sequence's block table, all in the decode kernel; a prompt token
//! then reads its sequence's K/V again rather than sharing one read across the chunk (the reads
//! of one sequence stay in L2). With the tensor-core prefill on, the tokens after the leading
//! decode rows go 16 to a tile through the prefill kernel instead, which reads each page once
//! per tile.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Storage, Tensor};
use half::f16;

use super::paged_attention::gpu::{
    check_geometry, DecodeRows, PrefillTiles, Variant, DEFAULT_VARIANT,
};
use super::paged_attention::{prefill_tiles, PagedGeometry};
use super::{cuda_device, dev_err, wrap_cuda, Result};
use crate::error::OpsError;

/// The PTX of `kernels/llama.cu`, compiled by build.rs.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/llama.ptx"));
const MODULE: &str = "cited_llama";
/// Threads of the add + norm kernel, as in the kernel.
const NORM_THREADS: u32 = 256;

/// `y = x + delta` (just `x` without a delta) and its RMSNorm `y * rsqrt(mean(y^2) + eps) * w`,
/// in one pass: `x`, `delta` (rows, cols) f32, `w` (cols) f32. Returns (y, norm).
pub fn add_norm(
    x: &Tensor,
    delta: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let (rows, cols) = x.dims2()?;
    if delta.is_some_and(|d| d.dims() != x.dims()) || w.dims() != [cols] || rows == 0 {
        return Err(OpsError::Shape(format!(
            "add + norm of {:?} and {:?} with weights {:?}",
            x.dims(),
            delta.map(|d| d.dims().to_vec()),
            w.dims()
        )));
    }
    let dev = cuda_device(x, "tensor")?;
    let func = dev.get_or_load_custom_func("cited_llama_add_norm", MODULE, PTX)?;
    let stream = dev.cuda_stream();
    // SAFETY (both): the kernel writes every element of `h`, and of `y` when there is a delta
    // (without one, `y` is `x` and the buffer is never allocated).
    let mut h = unsafe { stream.alloc::<f32>(rows * cols) }.map_err(dev_err)?;
    let mut y = match delta {
        Some(_) => Some(unsafe { stream.alloc::<f32>(rows * cols) }.map_err(dev_err)?),
        None => None,
    };
    {
        let (xs, _) = x.storage_and_layout();
        let (ws, _) = w.storage_and_layout();
        let xv = f32_view(x, &xs, "x")?;
        let wv = f32_view(w, &ws, "norm weights")?;
        let ds = delta.map(|d| d.storage_and_layout());
        let dv = match (delta, &ds) {
            (Some(d), Some((s, _))) => Some(f32_view(d, s, "residual")?),
            _ => None,
        };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (NORM_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let cols32 = cols as u32;
        // A null pointer stands for "no delta" and "no x_out".
        let null = 0u64;
        let mut b = func.builder();
        b.arg(&xv);
        match &dv {
            Some(dv) => b.arg(dv),
            None => b.arg(&null),
        };
        b.arg(&wv).arg(&cols32).arg(&eps);
        match &mut y {
            Some(y) => b.arg(y),
            None => b.arg(&null),
        };
        b.arg(&mut h);
        // SAFETY: the arguments match `cited_llama_add_norm`: x, delta and y of rows x cols
        // (delta and y both present or both null), w of cols, h of rows x cols.
        unsafe { b.launch(cfg) }.map_err(dev_err)?;
    }
    let y = match y {
        Some(y) => wrap_cuda(&dev, y, (rows, cols)),
        None => x.clone(),
    };
    Ok((y, wrap_cuda(&dev, h, (rows, cols))))
}

/// The gated activation `silu(gate) * up` of `gu` (rows, 2 ff), the gate and up projections
/// side by side; returns (rows, ff).
pub fn silu_mul(gu: &Tensor) -> Result<Tensor> {
    let (rows, width) = gu.dims2()?;
    if width % 2 != 0 || rows == 0 {
        return Err(OpsError::Shape(format!(
            "gated activation of {:?}",
            gu.dims()
        )));
    }
    let ff = width / 2;
    let dev = cuda_device(gu, "tensor")?;
    let func = dev.get_or_load_custom_func("cited_llama_silu_mul", MODULE, PTX)?;
    let stream = dev.cuda_stream();
    // SAFETY: the grid-stride loop writes every element.
    let mut act = unsafe { stream.alloc::<f32>(rows * ff) }.map_err(dev_err)?;
    {
        let (gs, _) = gu.storage_and_layout();
        let gv = f32_view(gu, &gs, "gate and up")?;
        let total = (rows * ff) as u32;
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256).min(65_535), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows32, ff32) = (rows as u32, ff as u32);
        let mut b = func.builder();
        b.arg(&gv).arg(&rows32).arg(&ff32).arg(&mut act);
        // SAFETY: the arguments match `cited_llama_silu_mul`: gu of rows x 2 ff, act of
        // rows x ff.
        unsafe { b.launch(cfg) }.map_err(dev_err)?;
    }
    Ok(wrap_cuda(&dev, act, (rows, ff)))
}

/// Whether the GPU forward pass takes this geometry (else the host path runs attention).
pub fn supports(g: &PagedGeometry) -> bool {
    check_geometry(g, g.heads * g.head_dim).is_ok() && g.head_dim <= 512
}

/// The f32 elements of a contiguous f32 tensor.
fn f32_view<'a>(t: &'a Tensor, s: &'a Storage, what: &str) -> Result<CudaView<'a, f32>> {
    let Storage::Cuda(c) = s else {
        return Err(OpsError::Device(format!("{what} is not on a CUDA device")));
    };
    if t.dtype() != DType::F32 {
        return Err(OpsError::Shape(format!(
            "{what} is {:?}, not f32",
            t.dtype()
        )));
    }
    let Some((start, end)) = t.layout().contiguous_offsets() else {
        return Err(OpsError::Shape(format!("{what} is not contiguous")));
    };
    Ok(c.as_cuda_slice::<f32>()?.slice(start..end))
}

/// One forward pass's rows on the device: each token's position and cache slot, and its
/// attention row (its sequence's block table, its length), shared by every layer.
pub struct Step {
    dev: CudaDevice,
    g: PagedGeometry,
    tokens: usize,
    /// Blocks per layer the tables were checked against.
    num_blocks: usize,
    last_position: u32,
    positions: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    rows: DecodeRows,
    variant: Variant,
    /// With the tensor-core prefill: the leading rows the decode kernel takes (the one-token
    /// sequences the scheduler puts first), and the tiles of every row after them.
    decode_rows: u32,
    tiles: Option<PrefillTiles>,
}

impl Step {
    /// `positions[t]` and `slots[t]` (block * block_size + offset) of token `t`, `tables[t]`
    /// the block table of its sequence (covering position `positions[t]`); `num_blocks` blocks
    /// are stored per layer; `seqs` the token ranges of the batch's sequences (consecutive
    /// positions each). With `tensor_core_prefill` (and a geometry it takes), sequences of
    /// several tokens attend through the tensor-core prefill kernel, 16 tokens a tile; else
    /// every token is a row of the decode kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dev: &CudaDevice,
        g: &PagedGeometry,
        positions: &[u32],
        slots: &[u32],
        tables: &[&[u32]],
        num_blocks: usize,
        seqs: &[std::ops::Range<usize>],
        tensor_core_prefill: bool,
    ) -> Result<Self> {
        let tokens = positions.len();
        if slots.len() != tokens || tables.len() != tokens || tokens == 0 {
            return Err(OpsError::Shape(format!(
                "{tokens} positions, {} slots, {} tables",
                slots.len(),
                tables.len()
            )));
        }
        if !supports(g) {
            return Err(OpsError::Shape(format!(
                "the GPU decoder step does not take {g:?}"
            )));
        }
        let bs = g.block_size;
        for ((&p, &s), t) in positions.iter().zip(slots).zip(tables) {
            let block = t.get(p as usize / bs).copied();
            if block.map(|b| b as usize * bs + p as usize % bs) != Some(s as usize) {
                return Err(OpsError::Shape(format!(
                    "slot {s} is not position {p}'s row in its block table"
                )));
            }
        }
        // The sequences must tile the tokens in order, each at consecutive positions.
        let mut next = 0;
        for r in seqs {
            let consecutive = r
                .clone()
                .skip(1)
                .all(|t| positions[t] == positions[t - 1] + 1);
            if r.start != next || r.end <= r.start || r.end > tokens || !consecutive {
                return Err(OpsError::Shape(format!(
                    "sequence rows {r:?} do not continue the batch's tokens at consecutive positions"
                )));
            }
            next = r.end;
        }
        if next != tokens {
            return Err(OpsError::Shape(format!(
                "sequences cover {next} of {tokens} tokens"
            )));
        }
        let lens: Vec<u32> = positions.iter().map(|&p| p + 1).collect();
        let rows = DecodeRows::new(dev, g, tables, &lens, num_blocks, None)?;
        let (decode_rows, tiles) = if tensor_core_prefill && PrefillTiles::supports(g) {
            prefill_tiles(seqs)
        } else {
            (tokens as u32, Vec::new())
        };
        let tiles = if tiles.is_empty() {
            None
        } else {
            Some(PrefillTiles::new(dev, &tiles)?)
        };
        let stream = dev.cuda_stream();
        Ok(Self {
            positions: stream.clone_htod(positions).map_err(dev_err)?,
            slots: stream.clone_htod(slots).map_err(dev_err)?,
            dev: dev.clone(),
            g: *g,
            tokens,
            num_blocks,
            last_position: positions.iter().copied().max().unwrap_or(0),
            rows,
            variant: DEFAULT_VARIANT,
            decode_rows,
            tiles,
        })
    }

    /// Buffers for decode steps of `tokens` one-token sequences at contexts up to `max_len`
    /// positions (tables of up to `max_len / block_size` blocks, the split plan made for that
    /// length), to be filled by [`Step::update`] before each step: the rows a CUDA graph
    /// captured over them reads.
    pub fn with_capacity(
        dev: &CudaDevice,
        g: &PagedGeometry,
        tokens: usize,
        max_len: usize,
        num_blocks: usize,
    ) -> Result<Self> {
        let bs = g.block_size;
        let blocks = max_len.div_ceil(bs).max(1);
        if tokens == 0 || max_len == 0 || num_blocks == 0 {
            return Err(OpsError::Shape(format!(
                "decode buffers for {tokens} rows of {max_len} positions"
            )));
        }
        // Placeholder rows (block 0 throughout) sized for the longest context.
        let table = vec![0u32; blocks];
        let p = (max_len - 1) as u32;
        let positions = vec![p; tokens];
        let slots = vec![p % bs as u32; tokens];
        let tables = vec![table.as_slice(); tokens];
        let seqs: Vec<_> = (0..tokens).map(|t| t..t + 1).collect();
        Self::new(
            dev, g, &positions, &slots, &tables, num_blocks, &seqs, false,
        )
    }

    /// Token rows of each step.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Rewrites a decode step's rows in place (one token per sequence, as many as the buffers
    /// hold, within their capacity): each token's position, cache slot and its sequence's
    /// block table.
    pub fn update(&mut self, positions: &[u32], slots: &[u32], tables: &[&[u32]]) -> Result<()> {
        let bs = self.g.block_size;
        let fits = positions.len() == self.tokens
            && slots.len() == self.tokens
            && tables.len() == self.tokens
            && self.tiles.is_none()
            && positions
                .iter()
                .zip(slots)
                .zip(tables)
                .all(|((&p, &s), t)| {
                    t.get(p as usize / bs)
                        .map(|&b| b as usize * bs + p as usize % bs)
                        == Some(s as usize)
                });
        if !fits {
            return Err(OpsError::Shape(format!(
                "{} decode rows for buffers of {}",
                positions.len(),
                self.tokens
            )));
        }
        let lens: Vec<u32> = positions.iter().map(|&p| p + 1).collect();
        self.rows.update(tables, &lens)?;
        let stream = self.dev.cuda_stream();
        stream
            .memcpy_htod(positions, &mut self.positions)
            .map_err(dev_err)?;
        stream
            .memcpy_htod(slots, &mut self.slots)
            .map_err(dev_err)?;
        self.last_position = positions.iter().copied().max().unwrap_or(0);
        Ok(())
    }

    /// Rotates the query and key heads of `qkv` (tokens, (heads + 2 kv_heads) * head_dim) by
    /// the tables `cos`, `sin` (max_positions, head_dim / 2) at each token's position, writes
    /// the keys and values into the layer's cache `k`, `v`, and returns the rotated queries
    /// (tokens, heads * head_dim).
    pub fn rope_kv(
        &self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        interleaved: bool,
        k: &mut CudaSlice<f16>,
        v: &mut CudaSlice<f16>,
    ) -> Result<Tensor> {
        let g = self.g;
        let (tokens, stride) = qkv.dims2()?;
        let (positions, half) = cos.dims2()?;
        if tokens != self.tokens
            || stride != (g.heads + 2 * g.kv_heads) * g.head_dim
            || half * 2 != g.head_dim
            || sin.dims() != cos.dims()
            || k.len() != v.len()
            || k.len() < self.num_blocks * g.block_elems()
            || self.last_position as usize >= positions
        {
            return Err(OpsError::Shape(format!(
                "rope of qkv {:?} with tables {:?} into {} cached halves for {g:?}, {} tokens",
                qkv.dims(),
                cos.dims(),
                k.len(),
                self.tokens
            )));
        }
        let func = self
            .dev
            .get_or_load_custom_func("cited_llama_rope_kv", MODULE, PTX)?;
        let stream = self.dev.cuda_stream();
        let q_len = tokens * g.heads * g.head_dim;
        // SAFETY: the kernel writes every element: each query head of each token, each pair.
        let mut q = unsafe { stream.alloc::<f32>(q_len) }.map_err(dev_err)?;
        {
            let (qs, _) = qkv.storage_and_layout();
            let (cs, _) = cos.storage_and_layout();
            let (ss, _) = sin.storage_and_layout();
            let qkv_v = f32_view(qkv, &qs, "qkv")?;
            let cos_v = f32_view(cos, &cs, "cos table")?;
            let sin_v = f32_view(sin, &ss, "sin table")?;
            let (stride, heads, kv_heads, hd, bs, inter) = (
                stride as u32,
                g.heads as u32,
                g.kv_heads as u32,
                g.head_dim as u32,
                g.block_size as u32,
                interleaved as u32,
            );
            let cfg = LaunchConfig {
                grid_dim: (tokens as u32, heads + 2 * kv_heads, 1),
                block_dim: (hd / 2, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = func.builder();
            b.arg(&qkv_v)
                .arg(&stride)
                .arg(&cos_v)
                .arg(&sin_v)
                .arg(&self.positions)
                .arg(&self.slots)
                .arg(&heads)
                .arg(&kv_heads)
                .arg(&hd)
                .arg(&bs)
                .arg(&inter)
                .arg(&mut q)
                .arg(k)
                .arg(v);
            // SAFETY: the arguments match `cited_llama_rope_kv`; qkv holds `tokens` rows of
            // `stride` floats; each slot was checked against its table in `new`, whose blocks
            // are below the cache's block count (checked by `DecodeRows::new`; the cache holds
            // at least that many, checked above); every position is a row of the angle tables
            // (checked above).
            unsafe { b.launch(cfg) }.map_err(dev_err)?;
        }
        Ok(wrap_cuda(&self.dev, q, (tokens, g.heads * g.head_dim)))
    }

    /// Attention of every token's query heads `q` (tokens, heads * head_dim) over its
    /// sequence's positions up to its own in the layer's cache `k`, `v`; returns
    /// (tokens, heads * head_dim).
    pub fn attend(
        &mut self,
        q: &Tensor,
        k: &CudaSlice<f16>,
        v: &CudaSlice<f16>,
        scale: f32,
    ) -> Result<Tensor> {
        let g = self.g;
        let width = g.heads * g.head_dim;
        if q.dims2()? != (self.tokens, width) {
            return Err(OpsError::Shape(format!(
                "queries {:?} for {} tokens of {width}",
                q.dims(),
                self.tokens
            )));
        }
        let stream = self.dev.cuda_stream();
        // SAFETY: the decode kernel (or its merge) writes every output element.
        let mut out = unsafe { stream.alloc::<f32>(self.tokens * width) }.map_err(dev_err)?;
        {
            let (qs, _) = q.storage_and_layout();
            let qv = f32_view(q, &qs, "queries")?;
            let (kv, vv) = (k.slice(..), v.slice(..));
            if self.decode_rows > 0 {
                self.rows.launch(
                    self.decode_rows,
                    self.variant,
                    &qv,
                    width,
                    &kv,
                    &vv,
                    scale,
                    &mut out,
                )?;
            }
            if let Some(tiles) = &self.tiles {
                self.rows.launch_prefill(
                    tiles,
                    &qv,
                    width,
                    &kv,
                    &vv,
                    &self.positions,
                    scale,
                    &mut out,
                )?;
            }
        }
        Ok(wrap_cuda(&self.dev, out, (self.tokens, width)))
    }
}

/// Overwrites the u32 tensor `t` (contiguous, on a CUDA device) with `data`, in stream order:
/// the token ids a captured CUDA graph reads.
pub fn write_u32(t: &Tensor, data: &[u32]) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, DevicePtr};
    let dev = cuda_device(t, "tensor")?;
    if t.dtype() != DType::U32 || t.elem_count() != data.len() || !t.is_contiguous() {
        return Err(OpsError::Shape(format!(
            "{} ids into a {:?} tensor of {}",
            data.len(),
            t.dtype(),
            t.elem_count()
        )));
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(c) = &*storage else {
        return Err(OpsError::Device("ids are not on a CUDA device".into()));
    };
    let start = layout.start_offset();
    let view = c.as_cuda_slice::<u32>()?.slice(start..start + data.len());
    let stream = dev.cuda_stream();
    let (ptr, _guard) = view.device_ptr(&stream);
    // SAFETY: `ptr` addresses `data.len()` u32 of the tensor's own storage, alive while the
    // storage guard is held; the copy is ordered on the stream every reader of the tensor
    // uses, and the host slice outlives the call (the copy from pageable memory completes
    // before the call returns).
    unsafe {
        result::memcpy_htod_async(ptr, data, stream.cu_stream()).map_err(dev_err)?;
    }
    Ok(())
}

/// Copies the f32 tensor `src` into `dst` (same element count, both contiguous on one CUDA
/// device), in stream order: how a captured CUDA graph leaves its result in a buffer that
/// outlives the graph's own allocations.
pub fn copy_into(dst: &Tensor, src: &Tensor) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, DevicePtr};
    let dev = cuda_device(dst, "destination")?;
    if dst.elem_count() != src.elem_count() {
        return Err(OpsError::Shape(format!(
            "{:?} into {:?}",
            src.dims(),
            dst.dims()
        )));
    }
    let (ds, _) = dst.storage_and_layout();
    let (ss, _) = src.storage_and_layout();
    let d = f32_view(dst, &ds, "destination")?;
    let s = f32_view(src, &ss, "source")?;
    let stream = dev.cuda_stream();
    let (dp, _dg) = d.device_ptr(&stream);
    let (sp, _sg) = s.device_ptr(&stream);
    // SAFETY: both pointers address `len` f32 of live storage (guards held), on this stream.
    unsafe {
        result::memcpy_dtod_async(dp, sp, d.len() * 4, stream.cu_stream()).map_err(dev_err)?;
    }
    Ok(())
}
