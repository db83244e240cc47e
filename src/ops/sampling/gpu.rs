//! The CUDA twin: `kernels/sampling.cu`, one block per row, loaded once per device.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Storage, Tensor};

use super::{PenaltyEntry, SamplingParams};
use crate::error::OpsError;
use crate::ops::{cuda_device, dev_err};

/// The PTX of `kernels/sampling.cu`, compiled by build.rs.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));
const MODULE: &str = "cited_sampling";
const THREADS: u32 = 1024;
/// `RowParams` in the kernel: 18 words.
const ROW_WORDS: usize = 18;
/// `info` of a merged entry: banned, recently generated, then the count in the low bits.
const BANNED: u32 = 1 << 31;
const RECENT: u32 = 1 << 30;

/// Which kernel a step launches: both give the reference's tokens; `Fast` reads the logits
/// two or three times and works on at most 1,024 candidates in shared memory (falling back
/// to the general path, row by row, where they cannot hold the answer); `General` applies
/// every cut with radix selects over a work copy of the row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    General,
    Fast,
}

/// One row's request: its settings, the step of its counter-based draw, its penalty
/// entries and banned ids.
pub struct Row<'a> {
    pub params: &'a SamplingParams,
    pub step: u64,
    pub penalties: &'a [PenaltyEntry],
    pub bans: &'a [u32],
}

/// A prepared step for a batch of rows: inputs uploaded once, so it can be launched
/// repeatedly (benches) and read back when wanted.
pub struct Step {
    dev: CudaDevice,
    logits: Tensor,
    rows: u32,
    vocab: u32,
    params: CudaSlice<u32>,
    penalty_ids: CudaSlice<u32>,
    penalty_counts: CudaSlice<u32>,
    penalty_recent: CudaSlice<u32>,
    bans: CudaSlice<u32>,
    special_ids: CudaSlice<u32>,
    special_info: CudaSlice<u32>,
    work: CudaSlice<f32>,
    out: CudaSlice<u32>,
    variant: Variant,
}

impl Step {
    /// `logits`: (rows, vocab), f32 or bf16, contiguous, on a CUDA device.
    pub fn new(logits: &Tensor, rows: &[Row<'_>]) -> Result<Self, OpsError> {
        let (n, vocab) = logits.dims2()?;
        if n != rows.len() || n == 0 || vocab == 0 || vocab >= u32::MAX as usize {
            return Err(OpsError::Shape(format!(
                "{n} rows of {vocab} logits for {} requests",
                rows.len()
            )));
        }
        if !matches!(logits.dtype(), DType::F32 | DType::BF16) || !logits.is_contiguous() {
            return Err(OpsError::Shape(
                "logits must be contiguous f32 or bf16".into(),
            ));
        }
        let dev = cuda_device(logits, "logits")?;
        let mut words = Vec::with_capacity(n * ROW_WORDS);
        let (mut ids, mut counts, mut recent, mut bans) = (vec![], vec![], vec![], vec![]);
        let (mut special_ids, mut special_info) = (vec![], vec![]);
        for r in rows {
            let p = r.params;
            let start = ids.len() as u32;
            for e in r.penalties {
                ids.push(e.id);
                counts.push(e.count);
                recent.push(u32::from(e.recent));
            }
            let ban_start = bans.len() as u32;
            bans.extend_from_slice(r.bans);
            // The fast variant's list: each penalised or banned id once, sorted.
            let mut merged: Vec<(u32, u32)> = r
                .penalties
                .iter()
                .map(|e| {
                    let recent = if e.recent { RECENT } else { 0 };
                    (e.id, recent | e.count.min(RECENT - 1))
                })
                .chain(r.bans.iter().map(|&id| (id, BANNED)))
                .collect();
            merged.sort_unstable_by_key(|&(id, _)| id);
            let special_start = special_ids.len() as u32;
            for (id, info) in merged {
                if special_ids.len() > special_start as usize && special_ids.last() == Some(&id) {
                    *special_info.last_mut().expect("an entry") |= info;
                } else {
                    special_ids.push(id);
                    special_info.push(info);
                }
            }
            let special_len = special_ids.len() as u32 - special_start;
            words.extend_from_slice(&[
                p.temperature.to_bits(),
                p.top_p.to_bits(),
                p.min_p.to_bits(),
                p.repetition_penalty.to_bits(),
                p.presence_penalty.to_bits(),
                p.frequency_penalty.to_bits(),
                p.top_k.min(u32::MAX as usize) as u32,
                start,
                r.penalties.len() as u32,
                ban_start,
                r.bans.len() as u32,
                special_start,
                special_len,
                0,
                p.seed as u32,
                (p.seed >> 32) as u32,
                r.step as u32,
                (r.step >> 32) as u32,
            ]);
        }
        // Empty lists still need a valid pointer.
        for v in [
            &mut ids,
            &mut counts,
            &mut recent,
            &mut bans,
            &mut special_ids,
            &mut special_info,
        ] {
            if v.is_empty() {
                v.push(0);
            }
        }
        let stream = dev.cuda_stream();
        Ok(Self {
            params: stream.clone_htod(&words).map_err(dev_err)?,
            penalty_ids: stream.clone_htod(&ids).map_err(dev_err)?,
            penalty_counts: stream.clone_htod(&counts).map_err(dev_err)?,
            penalty_recent: stream.clone_htod(&recent).map_err(dev_err)?,
            bans: stream.clone_htod(&bans).map_err(dev_err)?,
            special_ids: stream.clone_htod(&special_ids).map_err(dev_err)?,
            special_info: stream.clone_htod(&special_info).map_err(dev_err)?,
            variant: Variant::Fast,
            work: stream.alloc_zeros::<f32>(n * vocab).map_err(dev_err)?,
            out: stream.alloc_zeros::<u32>(n).map_err(dev_err)?,
            dev,
            logits: logits.clone(),
            rows: n as u32,
            vocab: vocab as u32,
        })
    }

    /// Chooses the kernel (`Fast` unless set).
    pub fn with_variant(mut self, variant: Variant) -> Self {
        self.variant = variant;
        self
    }

    /// Fills the output with 0xFFFFFFFE, which no step writes, so a row the kernel forgets
    /// cannot pass for a token.
    pub fn poison(&mut self) -> Result<(), OpsError> {
        let bad = vec![u32::MAX - 1; self.rows as usize];
        self.dev
            .cuda_stream()
            .memcpy_htod(&bad, &mut self.out)
            .map_err(dev_err)
    }

    /// Enqueues the kernel on the device's stream (no synchronisation).
    pub fn launch(&mut self) -> Result<(), OpsError> {
        let name = match (self.variant, self.logits.dtype()) {
            (Variant::General, DType::BF16) => "cited_sample_bf16",
            (Variant::General, _) => "cited_sample_f32",
            (Variant::Fast, DType::BF16) => "cited_sample_fast_bf16",
            (Variant::Fast, _) => "cited_sample_fast_f32",
        };
        let func = self.dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (self.rows, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (storage, layout) = self.logits.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            return Err(OpsError::Device("logits are not on a CUDA device".into()));
        };
        let start = layout.start_offset();
        let len = self.logits.elem_count();
        let mut b = func.builder();
        let f32_view;
        let bf16_view;
        match self.logits.dtype() {
            DType::BF16 => {
                bf16_view = cs.as_cuda_slice::<half::bf16>()?.slice(start..start + len);
                b.arg(&bf16_view);
            }
            _ => {
                f32_view = cs.as_cuda_slice::<f32>()?.slice(start..start + len);
                b.arg(&f32_view);
            }
        }
        b.arg(&self.vocab)
            .arg(&self.params)
            .arg(&self.penalty_ids)
            .arg(&self.penalty_counts)
            .arg(&self.penalty_recent)
            .arg(&self.bans);
        if self.variant == Variant::Fast {
            b.arg(&self.special_ids).arg(&self.special_info);
        }
        b.arg(&mut self.work).arg(&mut self.out);
        // SAFETY: the arguments match the kernel's signature (kernels/sampling.cu): logits
        // of rows x vocab, 18 words of parameters per row, penalty and ban lists (and for
        // the fast variant the merged list) that the row ranges index, a work row and one
        // output per row.
        unsafe { b.launch(cfg) }.map_err(dev_err)?;
        Ok(())
    }

    /// Waits and reads the tokens back; `None` where a row allows no token.
    pub fn read(&self) -> Result<Vec<Option<u32>>, OpsError> {
        let out = self
            .dev
            .cuda_stream()
            .clone_dtoh(&self.out)
            .map_err(dev_err)?;
        Ok(out
            .into_iter()
            .map(|t| (t != u32::MAX).then_some(t))
            .collect())
    }

    /// The device's stream, for timing with events.
    pub fn stream(&self) -> std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream> {
        self.dev.cuda_stream()
    }
}

/// The PTX of `kernels/logits_edit.cu`, compiled by build.rs.
pub const EDIT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/logits_edit.ptx"));
const EDIT_MODULE: &str = "cited_logits_edit";

/// Applies the edits that read the logits (allow-lists, the citation nudge) of `edits`
/// (row, edit) to `logits` (rows, vocab; f32, contiguous, on a CUDA device) in place, on the
/// device's stream: what [`super::Edit::apply`] does to each row. Bans are left to the
/// sampling kernel's banned ids ([`super::DevicePlan`]).
pub fn apply_edits(logits: &Tensor, edits: &[(usize, &super::Edit)]) -> Result<(), OpsError> {
    let (table, n) = super::edit::edit_table(edits);
    if n == 0 {
        return Ok(());
    }
    let dev = cuda_device(logits, "logits")?;
    let (rows, vocab) = logits.dims2()?;
    if logits.dtype() != DType::F32 || edits.iter().any(|&(r, _)| r >= rows) {
        return Err(OpsError::Shape(format!(
            "edits of rows {:?} on {:?} logits of {rows} rows",
            edits.iter().map(|e| e.0).collect::<Vec<_>>(),
            logits.dtype()
        )));
    }
    let (storage, layout) = logits.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(OpsError::Device("logits are not on a CUDA device".into()));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(OpsError::Shape("logits are not contiguous".into()));
    };
    // The kernel writes the tensor's own storage: its other views see the edit, as they
    // would see the host reference's edit of the same rows.
    let view = cs.as_cuda_slice::<f32>()?.slice(start..end);
    let stream = dev.cuda_stream();
    let meta = stream.clone_htod(&table).map_err(dev_err)?;
    let func = dev.get_or_load_custom_func("cited_logits_edit", EDIT_MODULE, EDIT_PTX)?;
    let cfg = LaunchConfig {
        grid_dim: (n, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let vocab = vocab as u32;
    let mut b = func.builder();
    b.arg(&view).arg(&vocab).arg(&meta);
    // SAFETY: the arguments match `cited_logits_edit`: `rows` rows of `vocab` f32 (each
    // edit's row checked against `rows` above), and a table whose headers point inside itself
    // (`edit_table`).
    unsafe { b.launch(cfg) }.map_err(dev_err)?;
    Ok(())
}
