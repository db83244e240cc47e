//! The CUDA twin for decode steps (one query token per sequence):
//! `kernels/paged_attention.cu`, loaded once per device.

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Storage, Tensor};
use half::f16;

use super::{PagedGeometry, Result, PREFILL_TILE};
use crate::error::OpsError;
use crate::ops::{cuda_device, dev_err, multiprocessors};

/// The PTX of `kernels/paged_attention.cu`, compiled by build.rs.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const MODULE: &str = "cited_paged_attention";
const THREADS: u32 = 128;
/// Pages of one split the kernel stages in shared memory.
const MAX_PAGES: usize = 1024;
/// Warps per block of the decode kernel.
const WARPS: usize = THREADS as usize / 32;

/// A variant of the decode kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Each lane scores a 16-byte piece of a position: `unroll` positions a warp reads per
    /// step (its K/V loads in flight before any arithmetic) and, above 1, `stages` deep a
    /// cp.async ring keeps the next steps' copies in flight while one is computed.
    Lanes { unroll: u32, stages: u32 },
    /// The group's query heads as the rows of a tensor-core tile, pages of 16 positions
    /// through a cp.async ring 3 pages deep (head dims 64 and 128, pages of 16).
    TensorCores,
}

impl Variant {
    /// Whether this variant takes the geometry (every variant takes what
    /// [`Decode::new`] accepts, except the tensor-core one's narrower shapes).
    pub fn supports(self, g: &PagedGeometry) -> bool {
        match self {
            Variant::Lanes { .. } => true,
            Variant::TensorCores => g.block_size == 16 && matches!(g.head_dim, 64 | 128),
        }
    }
}

/// The variant launched unless another is picked.
pub const DEFAULT_VARIANT: Variant = Variant::Lanes {
    unroll: 4,
    stages: 2,
};

/// Every variant, for sweeps; the default is [`DEFAULT_VARIANT`].
pub const VARIANTS: [Variant; 6] = [
    Variant::Lanes {
        unroll: 2,
        stages: 1,
    },
    Variant::Lanes {
        unroll: 4,
        stages: 1,
    },
    Variant::Lanes {
        unroll: 2,
        stages: 4,
    },
    Variant::Lanes {
        unroll: 4,
        stages: 2,
    },
    Variant::Lanes {
        unroll: 4,
        stages: 4,
    },
    Variant::TensorCores,
];
/// Pages the tensor-core variant keeps in flight per warp.
const TC_STAGES: usize = 3;

/// Checks that the GPU kernels take geometry `g` with query rows `q_stride` floats apart.
pub fn check_geometry(g: &PagedGeometry, q_stride: usize) -> Result<()> {
    let group = g.heads / g.kv_heads.max(1);
    if g.kv_heads == 0
        || !g.heads.is_multiple_of(g.kv_heads)
        || group > 8
        || !g.head_dim.is_power_of_two()
        || !(8..=256).contains(&g.head_dim)
        || !g.block_size.is_power_of_two()
        || q_stride < g.heads * g.head_dim
    {
        return Err(OpsError::Shape(format!(
            "decode attention on the GPU takes head_dim a power of two in 8..=256, pages of a power-of-two size and at most 8 query heads per KV head: {g:?}, q stride {q_stride}"
        )));
    }
    Ok(())
}

/// The query rows of a decode attention, uploaded: each row's block table and length, the
/// split plan, and the partial results of the splits. One set serves every layer of a
/// forward pass (the rows and their tables are the same in each).
pub struct DecodeRows {
    dev: CudaDevice,
    g: PagedGeometry,
    seqs: u32,
    /// Blocks the tables were checked against: the storage must hold at least these.
    num_blocks: usize,
    max_blocks: u32,
    split_len: u32,
    splits: u32,
    tables: CudaSlice<u32>,
    lens: CudaSlice<u32>,
    part_max: CudaSlice<f32>,
    part_sum: CudaSlice<f32>,
    part_out: CudaSlice<f32>,
}

impl DecodeRows {
    /// `tables[r]` the blocks of row `r`'s sequence, covering its `lens[r]` positions (the
    /// row's own included); `num_blocks` blocks are stored. `split_len`: positions per split
    /// (a multiple of the block size; default: 128 to 1,024, so the grid holds about four
    /// blocks per multiprocessor).
    pub fn new(
        dev: &CudaDevice,
        g: &PagedGeometry,
        tables: &[&[u32]],
        lens: &[u32],
        num_blocks: usize,
        split_len: Option<u32>,
    ) -> Result<Self> {
        let seqs = lens.len();
        if tables.len() != seqs || seqs == 0 {
            return Err(OpsError::Shape(format!(
                "{seqs} lengths, {} tables",
                tables.len()
            )));
        }
        for (t, &len) in tables.iter().zip(lens) {
            if len == 0
                || t.len() * g.block_size < len as usize
                || t.iter().any(|&b| b as usize >= num_blocks)
            {
                return Err(OpsError::Shape(format!(
                    "a block table of {} blocks for {len} positions ({num_blocks} blocks stored)",
                    t.len()
                )));
            }
        }
        let bs = g.block_size as u32;
        let longest = lens.iter().copied().max().unwrap_or(0).max(1);
        let split_len = match split_len {
            Some(s) => s.div_ceil(bs).max(1) * bs,
            None => {
                // About four blocks per multiprocessor in all (three fit at once), each
                // taking 128 to 1,024 positions: long splits amortise a block's set-up and
                // merge, short ones fill the device when the batch is small.
                let sms = multiprocessors(dev)? as u64;
                let work: u64 = lens.iter().map(|&l| l as u64).sum::<u64>() * g.kv_heads as u64;
                let per_block = work.div_ceil(4 * sms).clamp(128, 1024) as u32;
                per_block.min(longest).div_ceil(bs) * bs
            }
        }
        .min((MAX_PAGES as u32) * bs);
        let splits = longest.div_ceil(split_len);
        let max_blocks = tables.iter().map(|t| t.len()).max().unwrap_or(1).max(1);
        let mut flat = vec![0u32; seqs * max_blocks];
        for (s, t) in tables.iter().enumerate() {
            flat[s * max_blocks..s * max_blocks + t.len()].copy_from_slice(t);
        }
        let stream = dev.cuda_stream();
        // Only a split that has its own partial results writes them (one split writes the
        // output directly).
        let parts = if splits > 1 {
            seqs * g.heads * splits as usize
        } else {
            1
        };
        Ok(Self {
            tables: stream.clone_htod(&flat).map_err(dev_err)?,
            lens: stream.clone_htod(lens).map_err(dev_err)?,
            // SAFETY (the three): each split writes its partials before the merge reads them.
            part_max: unsafe { stream.alloc::<f32>(parts) }.map_err(dev_err)?,
            part_sum: unsafe { stream.alloc::<f32>(parts) }.map_err(dev_err)?,
            part_out: unsafe { stream.alloc::<f32>(parts * g.head_dim) }.map_err(dev_err)?,
            dev: dev.clone(),
            g: *g,
            seqs: seqs as u32,
            num_blocks,
            max_blocks: max_blocks as u32,
            split_len,
            splits,
        })
    }

    /// Rewrites the rows' tables and lengths in place, for a replayed CUDA graph that reads
    /// these buffers: as many rows as before, tables of at most the first `new`'s longest,
    /// lengths within the split plan made then, blocks below the count checked then.
    pub fn update(&mut self, tables: &[&[u32]], lens: &[u32]) -> Result<()> {
        let (seqs, max_blocks) = (self.seqs as usize, self.max_blocks as usize);
        let capacity = self.splits as usize * self.split_len as usize;
        let fits = tables.len() == seqs
            && lens.len() == seqs
            && tables.iter().zip(lens).all(|(t, &len)| {
                len > 0
                    && len as usize <= capacity
                    && t.len() <= max_blocks
                    && t.len() * self.g.block_size >= len as usize
                    && t.iter().all(|&b| (b as usize) < self.num_blocks)
            });
        if !fits {
            return Err(OpsError::Shape(format!(
                "{} rows for {seqs} rows of at most {max_blocks} blocks and {capacity} positions",
                lens.len()
            )));
        }
        let mut flat = vec![0u32; seqs * max_blocks];
        for (s, t) in tables.iter().enumerate() {
            flat[s * max_blocks..s * max_blocks + t.len()].copy_from_slice(t);
        }
        let stream = self.dev.cuda_stream();
        stream
            .memcpy_htod(&flat, &mut self.tables)
            .map_err(dev_err)?;
        stream.memcpy_htod(lens, &mut self.lens).map_err(dev_err)
    }

    pub fn splits(&self) -> u32 {
        self.splits
    }

    /// Rows (query tokens).
    pub fn len(&self) -> usize {
        self.seqs as usize
    }

    pub fn is_empty(&self) -> bool {
        self.seqs == 0
    }

    /// Checks that the buffers of a launch hold what the kernels read and write: every row's
    /// query heads, whole blocks of K and V (as many as the tables were checked against), every
    /// row's output.
    fn check_buffers(
        &self,
        q: &CudaView<'_, f32>,
        q_stride: usize,
        k: &CudaView<'_, f16>,
        v: &CudaView<'_, f16>,
        out: &CudaSlice<f32>,
    ) -> Result<()> {
        let g = self.g;
        let n = self.seqs as usize;
        if q.len() < (n - 1) * q_stride + g.heads * g.head_dim
            || k.len() != v.len()
            || !k.len().is_multiple_of(g.block_elems())
            || k.len() / g.block_elems() < self.num_blocks
            || out.len() < n * g.heads * g.head_dim
        {
            return Err(OpsError::Shape(format!(
                "{n} rows of stride {q_stride} in {} floats, K {} and V {} halves, {} outputs for {g:?}",
                q.len(),
                k.len(),
                v.len(),
                out.len()
            )));
        }
        Ok(())
    }

    /// Enqueues the decode kernel `variant` (and the merge when split) on the device's stream
    /// for the first `rows` rows (all of them, or those before the rows left to the prefill
    /// kernel, [`DecodeRows::launch_prefill`]): `q` holds the rows' query heads first in rows
    /// `q_stride` floats apart, `k` and `v` the layer's paged storage, `out` gets
    /// `(rows, heads * head_dim)`.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &mut self,
        rows: u32,
        variant: Variant,
        q: &CudaView<'_, f32>,
        q_stride: usize,
        k: &CudaView<'_, f16>,
        v: &CudaView<'_, f16>,
        scale: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if rows == 0 || rows > self.seqs {
            return Err(OpsError::Shape(format!(
                "the first {rows} of {} rows",
                self.seqs
            )));
        }
        let g = self.g;
        check_geometry(&g, q_stride)?;
        if !VARIANTS.contains(&variant) || !variant.supports(&g) {
            return Err(OpsError::Shape(format!(
                "decode attention variant {variant:?} for {g:?}: one of {VARIANTS:?} that takes it"
            )));
        }
        self.check_buffers(q, q_stride, k, v, out)?;
        let group = g.heads / g.kv_heads;
        let (name, ring) = match variant {
            Variant::Lanes { unroll, stages } => (
                format!("cited_paged_decode_g{group}_u{unroll}_s{stages}"),
                // 16 bytes per lane, K and V, per position step in flight.
                if stages > 1 {
                    WARPS * 32 * 16 * 2 * (unroll * stages) as usize
                } else {
                    0
                },
            ),
            Variant::TensorCores => (
                format!("cited_paged_decode_tc_g{group}_h{}", g.head_dim),
                // Per warp and stage a page of K and one of V, rows padded by 8 halves.
                WARPS * TC_STAGES * 2 * 16 * (g.head_dim + 8) * 2,
            ),
        };
        let func = self.dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let (heads, kv_heads, hd, bs) = (
            g.heads as u32,
            g.kv_heads as u32,
            g.head_dim as u32,
            g.block_size as u32,
        );
        let q_stride = q_stride as u32;
        // The split's page indices (16-byte aligned), then the larger of the copy ring and
        // the warps' partials (output share, max, sum per head), which share those bytes.
        let pages = (self.split_len as usize / g.block_size * 4).div_ceil(16) * 16;
        let merge = WARPS * group * (g.head_dim + 2) * 4;
        let smem = pages + ring.max(merge);
        if smem > 48 * 1024 {
            // Past the default: the kernel must be allowed this much dynamic shared memory.
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(dev_err)?;
        }
        let cfg = LaunchConfig {
            grid_dim: (rows, kv_heads, self.splits),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut b = func.builder();
        b.arg(q)
            .arg(&q_stride)
            .arg(k)
            .arg(v)
            .arg(&self.tables)
            .arg(&self.max_blocks)
            .arg(&self.lens)
            .arg(&kv_heads)
            .arg(&hd)
            .arg(&bs)
            .arg(&self.split_len)
            .arg(&scale)
            .arg(&mut *out)
            .arg(&mut self.part_max)
            .arg(&mut self.part_sum)
            .arg(&mut self.part_out);
        // SAFETY: the arguments match `cited_paged_decode_g*_u*_s*` and
        // `cited_paged_decode_tc_g*_h*` (kernels/paged_attention.cu) for this group size;
        // shapes, block tables (in range, covering every position), the split length (whole
        // pages, at most 1,024 of them) and the variant (for this geometry) were checked in
        // `new` and above; the partials hold (rows, heads, splits[, head_dim]) entries when
        // split; the shared memory holds what the kernel lays out (at most 4 KiB of pages +
        // max(ring: 64 KiB, or 102 KiB for tensor cores at head dim 128; 4 x 8 x 258
        // words)), allowed above when past the 48 KiB default (Hopper allows 227 KiB).
        unsafe { b.launch(cfg) }.map_err(dev_err)?;
        if self.splits > 1 {
            let merge = self
                .dev
                .get_or_load_custom_func("cited_paged_merge", MODULE, PTX)?;
            let cfg = LaunchConfig {
                grid_dim: (rows, heads, 1),
                block_dim: (hd.min(256), 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = merge.builder();
            b.arg(&self.part_max)
                .arg(&self.part_sum)
                .arg(&self.part_out)
                .arg(&heads)
                .arg(&self.splits)
                .arg(&hd)
                .arg(&mut *out);
            // SAFETY: the partial buffers hold (rows, heads, splits[, head_dim]) entries.
            unsafe { b.launch(cfg) }.map_err(dev_err)?;
        }
        Ok(())
    }
}

/// Tiles of the tensor-core prefill kernel: each up to [`PREFILL_TILE`] consecutive tokens of
/// one sequence (rows `first..first + rows`), uploaded.
pub struct PrefillTiles {
    first: CudaSlice<u32>,
    rows: CudaSlice<u32>,
    count: u32,
    /// One past the last row any tile covers.
    end: u32,
}

impl PrefillTiles {
    /// `tiles`: `(first row, rows)`, rows 1 to [`PREFILL_TILE`] consecutive positions of one
    /// sequence (the caller's promise: the kernel reads the first row's block table and
    /// position for the whole tile).
    pub fn new(dev: &CudaDevice, tiles: &[(u32, u32)]) -> Result<Self> {
        if tiles.is_empty()
            || tiles
                .iter()
                .any(|&(_, r)| r == 0 || r as usize > PREFILL_TILE)
        {
            return Err(OpsError::Shape(format!(
                "{} prefill tiles of 1 to {PREFILL_TILE} rows",
                tiles.len()
            )));
        }
        let first: Vec<u32> = tiles.iter().map(|t| t.0).collect();
        let rows: Vec<u32> = tiles.iter().map(|t| t.1).collect();
        let stream = dev.cuda_stream();
        Ok(Self {
            first: stream.clone_htod(&first).map_err(dev_err)?,
            rows: stream.clone_htod(&rows).map_err(dev_err)?,
            count: tiles.len() as u32,
            end: tiles.iter().map(|&(f, r)| f + r).max().unwrap_or(0),
        })
    }

    /// Whether the tensor-core prefill kernel takes geometry `g` (pages of 16, head dims 64
    /// and 128).
    pub fn supports(g: &PagedGeometry) -> bool {
        Variant::TensorCores.supports(g)
    }
}

impl DecodeRows {
    /// Enqueues the tensor-core prefill kernel over `tiles` of these rows: causal attention of
    /// each tile's tokens (at `positions`, u32 per row on the device) over their sequence's
    /// pages; `q`, `k`, `v`, `out` as for [`DecodeRows::launch`].
    #[allow(clippy::too_many_arguments)]
    pub fn launch_prefill(
        &self,
        tiles: &PrefillTiles,
        q: &CudaView<'_, f32>,
        q_stride: usize,
        k: &CudaView<'_, f16>,
        v: &CudaView<'_, f16>,
        positions: &CudaSlice<u32>,
        scale: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let g = self.g;
        check_geometry(&g, q_stride)?;
        self.check_buffers(q, q_stride, k, v, out)?;
        if !PrefillTiles::supports(&g) || tiles.end > self.seqs || positions.len() < self.len() {
            return Err(OpsError::Shape(format!(
                "prefill of {} tiles over {} rows for {g:?}",
                tiles.count, self.seqs
            )));
        }
        let name = format!("cited_paged_prefill_tc_h{}", g.head_dim);
        let func = self.dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        // The copy ring: TC_STAGES pages of K and of V, rows padded by 8 halves.
        let smem = TC_STAGES * 2 * 16 * (g.head_dim + 8) * 2;
        let cfg = LaunchConfig {
            grid_dim: (tiles.count, g.heads as u32, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (q_stride, kv_heads, group) = (
            q_stride as u32,
            g.kv_heads as u32,
            (g.heads / g.kv_heads) as u32,
        );
        let mut b = func.builder();
        b.arg(q)
            .arg(&q_stride)
            .arg(k)
            .arg(v)
            .arg(&self.tables)
            .arg(&self.max_blocks)
            .arg(positions)
            .arg(&tiles.first)
            .arg(&tiles.rows)
            .arg(&kv_heads)
            .arg(&group)
            .arg(&scale)
            .arg(&mut *out);
        // SAFETY: the arguments match `cited_paged_prefill_tc_h*` (kernels/paged_attention.cu)
        // for this head dim; every tile's rows are below the row count (checked above), each
        // row's table covers its position (checked in `new`, whose lengths are the positions
        // plus one); the shared memory is the kernel's ring (at most 26 KiB).
        unsafe { b.launch(cfg) }.map_err(dev_err)?;
        Ok(())
    }
}

/// A prepared decode attention over tensors: rows uploaded, outputs allocated, so it can be
/// launched repeatedly (benches) and read back when wanted.
pub struct Decode {
    dev: CudaDevice,
    g: PagedGeometry,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_stride: usize,
    variant: Variant,
    scale: f32,
    rows: DecodeRows,
    out: CudaSlice<f32>,
}

impl Decode {
    /// `q`: (seqs, q_stride) f32 with each sequence's query heads first in its row; `k`,
    /// `v`: one layer's paged f16 storage (flat); `tables[s]` the blocks of sequence `s`,
    /// covering its `lens[s]` positions (the current token included); `split_len` as for
    /// [`DecodeRows::new`]. The kernel variant is `(4, 2)` unless [`Decode::with_variant`]
    /// picks another.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        g: &PagedGeometry,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        tables: &[&[u32]],
        lens: &[u32],
        scale: f32,
        split_len: Option<u32>,
    ) -> Result<Self> {
        let (seqs, q_stride) = q.dims2()?;
        check_geometry(g, q_stride)?;
        if q.dtype() != DType::F32
            || k.dtype() != DType::F16
            || v.dtype() != DType::F16
            || !q.is_contiguous()
            || !k.is_contiguous()
            || !v.is_contiguous()
            || k.elem_count() != v.elem_count()
            || !k.elem_count().is_multiple_of(g.block_elems())
        {
            return Err(OpsError::Shape(
                "q f32, K and V f16 of whole blocks, all contiguous".into(),
            ));
        }
        if lens.len() != seqs {
            return Err(OpsError::Shape(format!(
                "{seqs} queries, {} lengths",
                lens.len()
            )));
        }
        let dev = cuda_device(q, "tensor")?;
        let num_blocks = k.elem_count() / g.block_elems();
        let rows = DecodeRows::new(&dev, g, tables, lens, num_blocks, split_len)?;
        let out = dev
            .cuda_stream()
            .alloc_zeros::<f32>(seqs * g.heads * g.head_dim)
            .map_err(dev_err)?;
        Ok(Self {
            dev,
            g: *g,
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            q_stride,
            variant: DEFAULT_VARIANT,
            scale,
            rows,
            out,
        })
    }

    pub fn splits(&self) -> u32 {
        self.rows.splits()
    }

    /// The kernel variant this decode launches.
    pub fn variant(&self) -> Variant {
        self.variant
    }

    /// Picks the kernel variant, one of [`VARIANTS`] that takes this geometry.
    pub fn with_variant(mut self, variant: Variant) -> Result<Self> {
        if !VARIANTS.contains(&variant) || !variant.supports(&self.g) {
            return Err(OpsError::Shape(format!(
                "decode attention variant {variant:?} for {:?}: one of {VARIANTS:?} that takes it",
                self.g
            )));
        }
        self.variant = variant;
        Ok(self)
    }

    /// Fills the output with NaN, so a value the kernels forget cannot pass for a result.
    pub fn poison(&mut self) -> Result<()> {
        let nan = vec![f32::NAN; self.out.len()];
        self.dev
            .cuda_stream()
            .memcpy_htod(&nan, &mut self.out)
            .map_err(dev_err)
    }

    /// Enqueues the decode kernel (and the merge when split) on the device's stream.
    pub fn launch(&mut self) -> Result<()> {
        let (qs, ql) = self.q.storage_and_layout();
        let (ks, kl) = self.k.storage_and_layout();
        let (vs, vl) = self.v.storage_and_layout();
        let (Storage::Cuda(qc), Storage::Cuda(kc), Storage::Cuda(vc)) = (&*qs, &*ks, &*vs) else {
            return Err(OpsError::Device("inputs are not on a CUDA device".into()));
        };
        let qv = qc
            .as_cuda_slice::<f32>()?
            .slice(ql.start_offset()..ql.start_offset() + self.q.elem_count());
        let kv = kc
            .as_cuda_slice::<f16>()?
            .slice(kl.start_offset()..kl.start_offset() + self.k.elem_count());
        let vv = vc
            .as_cuda_slice::<f16>()?
            .slice(vl.start_offset()..vl.start_offset() + self.v.elem_count());
        let rows = self.rows.len() as u32;
        self.rows.launch(
            rows,
            self.variant,
            &qv,
            self.q_stride,
            &kv,
            &vv,
            self.scale,
            &mut self.out,
        )
    }

    /// Waits and reads `(seqs, heads * head_dim)` back.
    pub fn read(&self) -> Result<Vec<f32>> {
        self.dev
            .cuda_stream()
            .clone_dtoh(&self.out)
            .map_err(dev_err)
    }

    /// The device's stream, for timing with events.
    pub fn stream(&self) -> std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream> {
        self.dev.cuda_stream()
    }
}
