//! The CUDA twin: `kernels/similarity.cu`, loaded once per device.

use candle_core::cuda_backend::cudarc::driver::sys::{
    CUdevice_attribute, CUfunction_attribute_enum,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Storage, Tensor};
use half::f16;

use super::{Hit, Result};
use crate::error::OpsError;
use crate::ops::similarity_variants::{
    merge_smem_bytes, Variant, MERGE_KERNEL, MERGE_THREADS, VARIANTS,
};
use crate::ops::{cuda_device, dev_err};

/// The PTX of `kernels/similarity.cu`, compiled by build.rs.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/similarity.ptx"));
const MODULE: &str = "cited_similarity";

/// The variant the search uses by default for `nq` queries, `k` and width `d`: the fastest
/// per shape in the H200 sweep of 2026-11-27 (gpu-results/, BENCHMARKS.md).
pub fn default_variant(nq: usize, k: usize, d: usize) -> &'static Variant {
    let fits = |v: &&Variant| k as u32 <= v.max_k && d as u32 <= v.max_d;
    let by_name = |name: &str| VARIANTS.iter().filter(fits).find(|v| v.name == name);
    let choice = if nq <= 4 {
        by_name("warp")
    } else if nq < 16 {
        by_name("q8")
    } else if nq >= 128 {
        by_name("mmaq64").or_else(|| by_name("mmaq32"))
    } else {
        by_name("mmaq32")
    };
    choice
        .or_else(|| by_name("mma"))
        .or_else(|| VARIANTS.iter().find(fits))
        .expect("a variant for every k <= 256 and d <= 2048")
}

/// Rows per corpus part: enough parts that the grid covers every SM a few times (twice for
/// the tensor-core variants, whose shared memory allows one block per SM and which ran
/// fastest with fewer, longer parts in the sweep; four times for the others).
pub fn default_rows_per_part(dev: &CudaDevice, n: usize, nq: usize, v: &Variant) -> Result<u32> {
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(dev_err)? as usize;
    let per_sm = if v.tensor_cores { 2 } else { 4 };
    let query_blocks = nq.div_ceil(v.queries_per_block as usize);
    let parts = (sms * per_sm)
        .div_ceil(query_blocks)
        .clamp(1, n.div_ceil(1024).max(1));
    Ok(n.div_ceil(parts) as u32)
}

fn f16_slice<'a>(
    storage: &'a Storage,
    t: &Tensor,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f16>> {
    match storage {
        Storage::Cuda(s) => {
            let slice = s.as_cuda_slice::<f16>()?;
            let start = t.layout().start_offset();
            Ok(slice.slice(start..start + t.elem_count()))
        }
        _ => Err(OpsError::Device("tensor is not on a CUDA device".into())),
    }
}

/// A prepared search: buffers allocated once, so the same search can be launched repeatedly
/// (benches) and read back when wanted.
pub struct Search {
    dev: CudaDevice,
    queries: Tensor,
    corpus: Tensor,
    n: u32,
    d: u32,
    nq: u32,
    k: u32,
    variant: &'static Variant,
    rows_per_part: u32,
    parts: u32,
    part_scores: CudaSlice<f32>,
    part_ids: CudaSlice<u32>,
    out_scores: CudaSlice<f32>,
    out_ids: CudaSlice<u32>,
    /// The search over a prefix of the corpus whose k-th best scores seed the thresholds
    /// (kernels/similarity.cu, SEEDED THRESHOLDS).
    seed: Option<Box<Search>>,
}

/// The prefix a seeded search scores first: at least 16 k rows and 1/64 of the corpus.
pub fn default_seed_rows(n: usize, k: usize) -> usize {
    (16 * k).max(n / 64).min(n)
}

impl Search {
    /// Prepares a search of `queries` `(nq, d)` against `corpus` `(n, d)`, both f16,
    /// contiguous, on the same CUDA device; `variant` and `rows_per_part` default to the
    /// tuned choice.
    pub fn new(
        queries: &Tensor,
        corpus: &Tensor,
        k: usize,
        variant: Option<&'static Variant>,
        rows_per_part: Option<u32>,
    ) -> Result<Self> {
        let (nq, d) = queries.dims2()?;
        let (n, cd) = corpus.dims2()?;
        if cd != d || d % 8 != 0 || d > 2048 {
            return Err(OpsError::Shape(format!(
                "queries of width {d} against rows of {cd} (needs equal widths, a multiple of 8, <= 2048)"
            )));
        }
        if queries.dtype() != DType::F16 || corpus.dtype() != DType::F16 {
            return Err(OpsError::Shape("queries and corpus must be f16".into()));
        }
        let aligned = |t: &Tensor| t.is_contiguous() && t.layout().start_offset().is_multiple_of(8);
        if !aligned(queries) || !aligned(corpus) {
            // The kernels read rows in 16-byte pieces.
            return Err(OpsError::Shape(
                "queries and corpus must be contiguous and start on 8 elements".into(),
            ));
        }
        if k == 0 || k > 256 || n == 0 || nq == 0 || n > u32::MAX as usize {
            return Err(OpsError::Shape(format!("k {k} (1..=256), n {n}, nq {nq}")));
        }
        let dev = cuda_device(corpus, "corpus")?;
        let variant = variant.unwrap_or_else(|| default_variant(nq, k, d));
        if k as u32 > variant.max_k || d as u32 > variant.max_d {
            return Err(OpsError::Shape(format!(
                "variant {} takes k <= {} and d <= {}",
                variant.name, variant.max_k, variant.max_d
            )));
        }
        let rows_per_part = match rows_per_part {
            Some(r) => r.max(1),
            None => default_rows_per_part(&dev, n, nq, variant)?,
        };
        let parts = n.div_ceil(rows_per_part as usize);
        let stream = dev.cuda_stream();
        let part_len = nq * parts * k;
        Ok(Self {
            part_scores: stream.alloc_zeros::<f32>(part_len).map_err(dev_err)?,
            part_ids: stream.alloc_zeros::<u32>(part_len).map_err(dev_err)?,
            out_scores: stream.alloc_zeros::<f32>(nq * k).map_err(dev_err)?,
            out_ids: stream.alloc_zeros::<u32>(nq * k).map_err(dev_err)?,
            dev,
            queries: queries.clone(),
            corpus: corpus.clone(),
            n: n as u32,
            d: d as u32,
            nq: nq as u32,
            k: k as u32,
            variant,
            rows_per_part,
            parts: parts as u32,
            seed: None,
        })
    }

    /// Seeds the thresholds with a first search over the corpus's first `rows` rows
    /// (default [`default_seed_rows`]; at least k, fewer than the corpus), with the
    /// default variant and part size for that prefix. The results are the same; a part
    /// whose rows all score below the prefix's k-th best then offers no candidate.
    pub fn with_seed(mut self, rows: Option<usize>) -> Result<Self> {
        let (n, k) = (self.n as usize, self.k as usize);
        let rows = rows.unwrap_or_else(|| default_seed_rows(n, k));
        if rows < k || rows >= n {
            return Err(OpsError::Shape(format!(
                "a seed prefix of {rows} rows for k {k} and {n} rows (needs k <= rows < n)"
            )));
        }
        let prefix = self.corpus.narrow(0, 0, rows)?;
        self.seed = Some(Box::new(Search::new(
            &self.queries,
            &prefix,
            k,
            None,
            None,
        )?));
        Ok(self)
    }

    /// Rows of the seeding prefix, if seeded.
    pub fn seed_rows(&self) -> Option<usize> {
        self.seed.as_ref().map(|s| s.n as usize)
    }

    pub fn variant(&self) -> &'static Variant {
        self.variant
    }

    pub fn rows_per_part(&self) -> u32 {
        self.rows_per_part
    }

    /// Fills every output buffer with NaN scores and 0xFFFFFFFF ids, so a slot a kernel
    /// forgets to write cannot pass for a result.
    pub fn poison(&mut self) -> Result<()> {
        let stream = self.dev.cuda_stream();
        let nan = vec![f32::NAN; self.part_scores.len()];
        let bad = vec![u32::MAX; self.part_ids.len()];
        stream
            .memcpy_htod(&nan, &mut self.part_scores)
            .map_err(dev_err)?;
        stream
            .memcpy_htod(&bad, &mut self.part_ids)
            .map_err(dev_err)?;
        stream
            .memcpy_htod(&nan[..self.out_scores.len()], &mut self.out_scores)
            .map_err(dev_err)?;
        stream
            .memcpy_htod(&bad[..self.out_ids.len()], &mut self.out_ids)
            .map_err(dev_err)?;
        Ok(())
    }

    /// Enqueues the partial and merge kernels on the device's stream (no synchronisation),
    /// after the seeding search when there is one.
    pub fn launch(&mut self) -> Result<()> {
        if let Some(seed) = self.seed.as_mut() {
            seed.launch()?;
        }
        let v = self.variant;
        let partial = self.dev.get_or_load_custom_func(v.kernel, MODULE, PTX)?;
        let smem = (v.smem_bytes)(self.k, self.d);
        // Static plus dynamic shared memory over 48 KB needs the limit raised, whatever the
        // dynamic part alone is; raising it when not needed costs nothing.
        if smem > 0 {
            partial
                .set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .map_err(dev_err)?;
        }
        let (q_storage, _) = self.queries.storage_and_layout();
        let (c_storage, _) = self.corpus.storage_and_layout();
        let q = f16_slice(&q_storage, &self.queries)?;
        let c = f16_slice(&c_storage, &self.corpus)?;
        let cfg = LaunchConfig {
            grid_dim: (self.parts, self.nq.div_ceil(v.queries_per_block), 1),
            block_dim: (v.threads, 1, 1),
            shared_mem_bytes: smem,
        };
        // The seed: the prefix's merged scores from its k-th entry on, one per query k
        // apart; a null pointer without one.
        let null = 0u64;
        let seed_view = self
            .seed
            .as_ref()
            .map(|s| s.out_scores.slice(self.k as usize - 1..));
        let mut b = partial.builder();
        b.arg(&q)
            .arg(&c)
            .arg(&self.n)
            .arg(&self.d)
            .arg(&self.nq)
            .arg(&self.k)
            .arg(&self.rows_per_part)
            .arg(&mut self.part_scores)
            .arg(&mut self.part_ids);
        match &seed_view {
            Some(view) => b.arg(view),
            None => b.arg(&null),
        };
        b.arg(&self.k);
        // SAFETY: the argument list matches the kernel's signature (kernels/similarity.cu),
        // the buffers hold (nq, parts, k) entries, and the inputs were checked above; the
        // seed (same queries, same k) holds nq * k scores, read at q * k + k - 1.
        unsafe { b.launch(cfg) }.map_err(dev_err)?;

        let merge = self
            .dev
            .get_or_load_custom_func(MERGE_KERNEL, MODULE, PTX)?;
        let msmem = merge_smem_bytes(self.k);
        if msmem > 0 {
            merge
                .set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    msmem as i32,
                )
                .map_err(dev_err)?;
        }
        let cfg = LaunchConfig {
            grid_dim: (self.nq, 1, 1),
            block_dim: (MERGE_THREADS, 1, 1),
            shared_mem_bytes: msmem,
        };
        let mut b = merge.builder();
        b.arg(&self.part_scores)
            .arg(&self.part_ids)
            .arg(&self.nq)
            .arg(&self.parts)
            .arg(&self.k)
            .arg(&mut self.out_scores)
            .arg(&mut self.out_ids);
        // SAFETY: as above; the outputs hold (nq, k) entries.
        unsafe { b.launch(cfg) }.map_err(dev_err)?;
        Ok(())
    }

    /// Waits for the device and copies the results back: `nq` lists of `min(k, n)` hits.
    pub fn read(&self) -> Result<Vec<Vec<Hit>>> {
        let stream = self.dev.cuda_stream();
        let scores = stream.clone_dtoh(&self.out_scores).map_err(dev_err)?;
        let ids = stream.clone_dtoh(&self.out_ids).map_err(dev_err)?;
        let k = self.k as usize;
        let keep = k.min(self.n as usize);
        Ok((0..self.nq as usize)
            .map(|q| {
                (0..keep)
                    .map(|i| Hit {
                        id: ids[q * k + i],
                        score: scores[q * k + i],
                    })
                    .collect()
            })
            .collect())
    }

    /// The device's stream, for timing with events.
    pub fn stream(&self) -> std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream> {
        self.dev.cuda_stream()
    }
}

/// One search, launched and read back.
pub fn topk_cuda(queries: &Tensor, corpus: &Tensor, k: usize) -> Result<Vec<Vec<Hit>>> {
    let mut s = Search::new(queries, corpus, k, None, None)?;
    s.launch()?;
    s.read()
}
