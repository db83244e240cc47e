//! The CUDA twin: `kernels/similarity.cu`, loaded once per device.

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Storage, Tensor};
use half::f16;

use super::{Hit, Result};
use crate::error::OpsError;
use crate::ops::similarity_variants::{
    merge_smem_bytes, Variant, MERGE_KERNEL, MERGE_THREADS, VARIANTS,
};
use crate::ops::{cuda_device, dev_err, multiprocessors};

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
    let sms = multiprocessors(dev)? as usize;
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

/// What both searches hold: the inputs, the partial lists and merged results (which also
/// keep nq, k and n), and the optional seeding search.
struct Problem {
    dev: CudaDevice,
    queries: Tensor,
    corpus: Tensor,
    d: u32,
    /// The partial lists (one per part and query) and the merged results.
    lists: Lists,
    /// The search over a prefix of the corpus whose k-th best scores seed the thresholds
    /// (kernels/similarity.cu, SEEDED THRESHOLDS).
    seed: Option<Box<Search>>,
}

impl Problem {
    /// Checks what both searches need of their inputs: `queries` `(nq, d)` against `corpus`
    /// `(n, d)`, both f16, contiguous, `k` in 1..=256, 1 to `max_n` rows. Returns (nq, n, d).
    fn check(
        queries: &Tensor,
        corpus: &Tensor,
        k: usize,
        max_n: usize,
    ) -> Result<(usize, usize, usize)> {
        let (nq, d) = queries.dims2()?;
        let (n, cd) = corpus.dims2()?;
        if cd != d || d == 0 || queries.dtype() != DType::F16 || corpus.dtype() != DType::F16 {
            return Err(OpsError::Shape(format!(
                "f16 queries of width {d} against f16 rows of {cd}"
            )));
        }
        if !queries.is_contiguous() || !corpus.is_contiguous() {
            return Err(OpsError::Shape(
                "queries and corpus must be contiguous".into(),
            ));
        }
        if k == 0 || k > 256 || n == 0 || nq == 0 || n > max_n {
            return Err(OpsError::Shape(format!("k {k} (1..=256), n {n}, nq {nq}")));
        }
        Ok((nq, n, d))
    }

    /// The checked inputs on `dev`, with lists of `parts` parts.
    fn new(
        dev: CudaDevice,
        queries: &Tensor,
        corpus: &Tensor,
        k: usize,
        parts: usize,
    ) -> Result<Self> {
        let (n, d) = corpus.dims2()?;
        Ok(Self {
            lists: Lists::new(
                &dev,
                queries.dim(0)? as u32,
                parts as u32,
                k as u32,
                n as u32,
            )?,
            dev,
            queries: queries.clone(),
            corpus: corpus.clone(),
            d: d as u32,
            seed: None,
        })
    }

    /// The seeding search of [`Search::with_seed`]: the default search over the corpus's
    /// first `rows` rows (default [`default_seed_rows`]; at least k, fewer than the corpus).
    fn seed(&mut self, rows: Option<usize>) -> Result<()> {
        let (n, k) = (self.lists.n as usize, self.lists.k as usize);
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
        Ok(())
    }

    /// Enqueues the seeding search, when there is one.
    fn launch_seed(&mut self) -> Result<()> {
        match self.seed.as_mut() {
            Some(seed) => seed.launch(),
            None => Ok(()),
        }
    }
}

/// A prepared search: buffers allocated once, so the same search can be launched repeatedly
/// (benches) and read back when wanted.
pub struct Search {
    p: Problem,
    variant: &'static Variant,
    rows_per_part: u32,
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
        let (nq, n, d) = Problem::check(queries, corpus, k, u32::MAX as usize)?;
        if d % 8 != 0 || d > 2048 {
            return Err(OpsError::Shape(format!(
                "rows of width {d} (needs a multiple of 8, <= 2048)"
            )));
        }
        // The kernels read rows in 16-byte pieces.
        let aligned = |t: &Tensor| t.layout().start_offset().is_multiple_of(8);
        if !aligned(queries) || !aligned(corpus) {
            return Err(OpsError::Shape(
                "queries and corpus must start on 8 elements".into(),
            ));
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
        Ok(Self {
            p: Problem::new(dev, queries, corpus, k, n.div_ceil(rows_per_part as usize))?,
            variant,
            rows_per_part,
        })
    }

    /// Seeds the thresholds with a first search over the corpus's first `rows` rows
    /// (default [`default_seed_rows`]; at least k, fewer than the corpus), with the
    /// default variant and part size for that prefix. The results are the same; a part
    /// whose rows all score below the prefix's k-th best then offers no candidate.
    pub fn with_seed(mut self, rows: Option<usize>) -> Result<Self> {
        self.p.seed(rows)?;
        Ok(self)
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
        self.p.lists.poison(&self.p.dev)
    }

    /// Enqueues the partial and merge kernels on the device's stream (no synchronisation),
    /// after the seeding search when there is one.
    pub fn launch(&mut self) -> Result<()> {
        self.p.launch_seed()?;
        let p = &mut self.p;
        let v = self.variant;
        let partial = p.dev.get_or_load_custom_func(v.kernel, MODULE, PTX)?;
        let smem = (v.smem_bytes)(p.lists.k, p.d);
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
        let (q_storage, _) = p.queries.storage_and_layout();
        let (c_storage, _) = p.corpus.storage_and_layout();
        let q = f16_slice(&q_storage, &p.queries)?;
        let c = f16_slice(&c_storage, &p.corpus)?;
        let l = &mut p.lists;
        let cfg = LaunchConfig {
            grid_dim: (l.parts, l.nq.div_ceil(v.queries_per_block), 1),
            block_dim: (v.threads, 1, 1),
            shared_mem_bytes: smem,
        };
        // The seed: the prefix's merged scores from its k-th entry on, one per query k
        // apart; a null pointer without one.
        let null = 0u64;
        let seed_view = p.seed.as_ref().map(|s| s.p.lists.seed_view());
        let mut b = partial.builder();
        b.arg(&q)
            .arg(&c)
            .arg(&l.n)
            .arg(&p.d)
            .arg(&l.nq)
            .arg(&l.k)
            .arg(&self.rows_per_part)
            .arg(&mut l.part_scores)
            .arg(&mut l.part_ids);
        match &seed_view {
            Some(view) => b.arg(view),
            None => b.arg(&null),
        };
        b.arg(&l.k);
        // SAFETY: the argument list matches the kernel's signature (kernels/similarity.cu),
        // the buffers hold (nq, parts, k) entries, and the inputs were checked above; the
        // seed (same queries, same k) holds nq * k scores, read at q * k + k - 1.
        unsafe { b.launch(cfg) }.map_err(dev_err)?;

        l.merge(&p.dev)
    }

    /// Waits for the device and copies the results back: `nq` lists of `min(k, n)` hits.
    pub fn read(&self) -> Result<Vec<Vec<Hit>>> {
        self.p.lists.read(&self.p.dev)
    }

    /// The device's stream, for timing with events.
    pub fn stream(&self) -> std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream> {
        self.p.dev.cuda_stream()
    }
}

/// A prepared search whose products come from cuBLAS (kernels/similarity.cu, GEMM FILTER): the
/// corpus in chunks of `chunk_rows` rows, each chunk's scores (f32) into one reused buffer, then
/// filtered into per-part top-k lists and merged. For batches of queries, where the tensor-core
/// kernels of [`Search`] run far below the GEMM's throughput.
pub struct GemmSearch {
    /// Its lists hold the parts of every chunk.
    p: Problem,
    blas: candle_core::cuda_backend::cudarc::cublas::CudaBlas,
    chunk_rows: u32,
    /// Rows of each filter part (a chunk's last part may have fewer).
    rows_per_part: u32,
    scores: CudaSlice<f32>,
}

/// Threads of the filter kernel (as PARTIAL_THREADS in the kernel) and its candidate buffer.
const FILTER_THREADS: u32 = 256;
const FILTER_BUF: u32 = 512;

impl GemmSearch {
    /// Prepares a search of `queries` `(nq, d)` against `corpus` `(n, d)`, both f16, contiguous,
    /// on one CUDA device, in chunks of `chunk_rows` rows (default: a 32 MB score buffer,
    /// 4,096 rows at least).
    pub fn new(
        queries: &Tensor,
        corpus: &Tensor,
        k: usize,
        chunk_rows: Option<u32>,
    ) -> Result<Self> {
        let (nq, n, _) = Problem::check(queries, corpus, k, i32::MAX as usize)?;
        let dev = cuda_device(corpus, "corpus")?;
        let chunk_rows = chunk_rows
            .map(|c| c.max(1) as usize)
            .unwrap_or_else(|| ((32 << 20) / (4 * nq)).max(4096))
            .min(n) as u32;
        let sms = multiprocessors(&dev)?;
        // About four blocks per multiprocessor over the chunk's (part, query) grid.
        let chunk_parts = (4 * sms)
            .div_ceil(nq as u32)
            .clamp(1, chunk_rows.div_ceil(FILTER_THREADS));
        let rows_per_part = chunk_rows.div_ceil(chunk_parts);
        let chunks = (n as u32).div_ceil(chunk_rows);
        let last_rows = n as u32 - (chunks - 1) * chunk_rows;
        // As `launch` counts them: each chunk's rows in parts of `rows_per_part`.
        let parts =
            (chunks - 1) * chunk_rows.div_ceil(rows_per_part) + last_rows.div_ceil(rows_per_part);
        let stream = dev.cuda_stream();
        Ok(Self {
            blas: candle_core::cuda_backend::cudarc::cublas::CudaBlas::new(stream.clone())
                .map_err(dev_err)?,
            // SAFETY: each chunk's GEMM writes the scores before its filter reads them.
            scores: unsafe { stream.alloc::<f32>(nq * chunk_rows as usize) }.map_err(dev_err)?,
            p: Problem::new(dev, queries, corpus, k, parts as usize)?,
            chunk_rows,
            rows_per_part,
        })
    }

    /// Seeds the filter's thresholds as [`Search::with_seed`] does.
    pub fn with_seed(mut self, rows: Option<usize>) -> Result<Self> {
        self.p.seed(rows)?;
        Ok(self)
    }

    pub fn chunk_rows(&self) -> u32 {
        self.chunk_rows
    }

    /// Fills the outputs with NaN scores and 0xFFFFFFFF ids, so a slot nothing writes cannot
    /// pass for a result.
    pub fn poison(&mut self) -> Result<()> {
        self.p.lists.poison(&self.p.dev)
    }

    /// Enqueues every chunk's GEMM and filter, then the merge (no synchronisation).
    pub fn launch(&mut self) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys as blas_sys};
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        self.p.launch_seed()?;
        let p = &mut self.p;
        let stream = p.dev.cuda_stream();
        let filter = p
            .dev
            .get_or_load_custom_func("similarity_filter_scores", MODULE, PTX)?;
        let l = &mut p.lists;
        let (n, nq, k, d) = (l.n, l.nq, l.k, p.d);
        let k2 = k.next_power_of_two();
        let smem = (k2 + FILTER_BUF) * 8;
        let (q_storage, _) = p.queries.storage_and_layout();
        let (c_storage, _) = p.corpus.storage_and_layout();
        let q = f16_slice(&q_storage, &p.queries)?;
        let c = f16_slice(&c_storage, &p.corpus)?;
        let null = 0u64;
        let seed_view = p.seed.as_ref().map(|s| s.p.lists.seed_view());
        let (alpha, beta) = (1f32, 0f32);
        let mut row0 = 0u32;
        let mut part0 = 0u32;
        while row0 < n {
            let rows = self.chunk_rows.min(n - row0);
            {
                let chunk = c.slice((row0 * d) as usize..((row0 + rows) * d) as usize);
                let (a_ptr, _a) = chunk.device_ptr(&stream);
                let (b_ptr, _b) = q.device_ptr(&stream);
                let (c_ptr, _c) = self.scores.device_ptr(&stream);
                // Column-major: scores^T (rows x nq, ld rows) = chunk (d x rows stored, used
                // transposed) times queries^T (d x nq); row-major that is (nq, rows).
                // SAFETY: the pointers are live device buffers of this stream: the chunk holds
                // rows x d halves, the queries nq x d, the scores at least nq x rows floats;
                // alpha and beta are f32 as the compute type wants.
                unsafe {
                    blas::gemm_ex(
                        *self.blas.handle(),
                        blas_sys::cublasOperation_t::CUBLAS_OP_T,
                        blas_sys::cublasOperation_t::CUBLAS_OP_N,
                        rows as i32,
                        nq as i32,
                        d as i32,
                        (&alpha as *const f32).cast(),
                        a_ptr as *const _,
                        blas_sys::cudaDataType::CUDA_R_16F,
                        d as i32,
                        b_ptr as *const _,
                        blas_sys::cudaDataType::CUDA_R_16F,
                        d as i32,
                        (&beta as *const f32).cast(),
                        c_ptr as *mut _,
                        blas_sys::cudaDataType::CUDA_R_32F,
                        rows as i32,
                        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                    )
                }
                .map_err(dev_err)?;
            }
            let chunk_parts = rows.div_ceil(self.rows_per_part);
            let cfg = LaunchConfig {
                grid_dim: (chunk_parts, nq, 1),
                block_dim: (FILTER_THREADS, 1, 1),
                shared_mem_bytes: smem,
            };
            let mut b = filter.builder();
            b.arg(&self.scores)
                .arg(&rows)
                .arg(&row0)
                .arg(&nq)
                .arg(&k)
                .arg(&self.rows_per_part)
                .arg(&part0)
                .arg(&l.parts)
                .arg(&mut l.part_scores)
                .arg(&mut l.part_ids);
            match &seed_view {
                Some(view) => b.arg(view),
                None => b.arg(&null),
            };
            b.arg(&k);
            // SAFETY: the arguments match `similarity_filter_scores`: the scores hold nq rows
            // of `rows` floats (this chunk's GEMM, earlier on the stream); parts part0 ..
            // part0 + chunk_parts are below `parts`, so the partial lists hold their entries;
            // the seed, when there is one, holds nq * k scores read at q * k + k - 1; the
            // shared memory holds k2 + 512 keys.
            unsafe { b.launch(cfg) }.map_err(dev_err)?;
            row0 += rows;
            part0 += chunk_parts;
        }
        if part0 != l.parts {
            return Err(OpsError::Shape(format!(
                "{part0} filter parts launched for {} planned",
                l.parts
            )));
        }
        l.merge(&p.dev)
    }

    /// Waits for the device and copies the results back: `nq` lists of `min(k, n)` hits.
    pub fn read(&self) -> Result<Vec<Vec<Hit>>> {
        self.p.lists.read(&self.p.dev)
    }

    /// The device's stream, for timing with events.
    pub fn stream(&self) -> std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream> {
        self.p.dev.cuda_stream()
    }
}

/// The partial top-k lists of a search and its merged results: `parts` lists of k per query,
/// then the k best of each query's lists.
struct Lists {
    part_scores: CudaSlice<f32>,
    part_ids: CudaSlice<u32>,
    out_scores: CudaSlice<f32>,
    out_ids: CudaSlice<u32>,
    nq: u32,
    parts: u32,
    k: u32,
    /// Corpus rows (a query gets min(k, n) hits).
    n: u32,
}

impl Lists {
    fn new(dev: &CudaDevice, nq: u32, parts: u32, k: u32, n: u32) -> Result<Self> {
        let stream = dev.cuda_stream();
        let part_len = nq as usize * parts as usize * k as usize;
        let out_len = nq as usize * k as usize;
        Ok(Self {
            part_scores: stream.alloc_zeros::<f32>(part_len).map_err(dev_err)?,
            part_ids: stream.alloc_zeros::<u32>(part_len).map_err(dev_err)?,
            out_scores: stream.alloc_zeros::<f32>(out_len).map_err(dev_err)?,
            out_ids: stream.alloc_zeros::<u32>(out_len).map_err(dev_err)?,
            nq,
            parts,
            k,
            n,
        })
    }

    /// Fills every buffer with NaN scores and 0xFFFFFFFF ids, so a slot a kernel forgets to
    /// write cannot pass for a result.
    fn poison(&mut self, dev: &CudaDevice) -> Result<()> {
        let stream = dev.cuda_stream();
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
            .map_err(dev_err)
    }

    /// The merged k-th best score of each query, k apart: a seed for another search of the
    /// same queries and k.
    fn seed_view(&self) -> CudaView<'_, f32> {
        self.out_scores.slice(self.k as usize - 1..)
    }

    /// Enqueues the merge.
    fn merge(&mut self, dev: &CudaDevice) -> Result<()> {
        let merge = dev.get_or_load_custom_func(MERGE_KERNEL, MODULE, PTX)?;
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
        // SAFETY: the arguments match `similarity_merge`; the partial buffers hold (nq, parts,
        // k) entries and the outputs (nq, k), as allocated in `new`.
        unsafe { b.launch(cfg) }.map_err(dev_err)?;
        Ok(())
    }

    /// Waits for the device and reads the merged results: `nq` lists of `min(k, n)` hits.
    fn read(&self, dev: &CudaDevice) -> Result<Vec<Vec<Hit>>> {
        let stream = dev.cuda_stream();
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
}

/// One search, launched and read back.
pub fn topk_cuda(queries: &Tensor, corpus: &Tensor, k: usize) -> Result<Vec<Vec<Hit>>> {
    let mut s = Search::new(queries, corpus, k, None, None)?;
    s.launch()?;
    s.read()
}
