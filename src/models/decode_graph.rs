//! Decode steps replayed from CUDA graphs. A decode step of a small model at a small batch is
//! a few hundred short kernels; launched one by one from the host, their launches and candle's
//! per-op allocations, not the GPU, set its pace. A graph records one step's kernels once and
//! replays them with one launch.
//!
//! A graph's launches are fixed when it is recorded: how many rows each kernel takes and how
//! the attention splits its positions. So graphs are kept per (rows, context capacity): a
//! decode batch runs on the graph of the smallest row count that holds it ([`graph_rows`]),
//! its extra rows padding on the KV cache's spare block, and of the smallest capacity that
//! holds its longest sequence ([`graph_len`]). Each graph reads its rows, block tables and
//! token ids from buffers of its own, rewritten before each replay
//! ([`super::llama::Llama::prepare_decode`]), and leaves its logits in one buffer all graphs
//! share (one step runs at a time).
//!
//! The first batch of a shape runs its step plainly on the graph's buffers (that result is the
//! step's; every kernel and workspace is loaded by then), then records it; later batches of
//! that shape replay it. Before the first recording, candle's workspaces for quantized
//! products are grown to the largest forward pass the engine runs
//! ([`super::llama::Llama::reserve_workspaces`]): they are replaced when they grow, and a graph
//! must never point at a replaced one. A recording that fails leaves that shape running plainly on its
//! buffers, with a warning; any other batch (prompt chunks, more rows or a longer context than
//! any graph takes) goes through [`super::llama::Llama::forward`].

/// Row counts graphs are kept for: 1, 2, 4, 8, 16, then every multiple of 16.
const ROW_STEP: usize = 16;

/// The smallest context capacity a graph is made for, in positions.
const MIN_LEN: usize = 256;

/// The largest: a graph's split buffers grow with rows x capacity, and a step over contexts
/// this long is paced by reading them, not by launches.
pub const MAX_LEN: usize = 16_384;

/// The rows of the graph that runs a decode batch of `n` sequences when at most `max_rows`
/// run together: `n` rounded up to a power of two below 16, else to a multiple of 16, never
/// past `max_rows`. `None` when `n` is 0 or over `max_rows`.
pub fn graph_rows(n: usize, max_rows: usize) -> Option<usize> {
    if n == 0 || n > max_rows {
        return None;
    }
    let rows = if n < ROW_STEP {
        n.next_power_of_two()
    } else {
        n.div_ceil(ROW_STEP) * ROW_STEP
    };
    Some(rows.min(max_rows))
}

/// The context capacity (positions) of the graph for a decode batch whose longest sequence
/// reaches `longest` positions (its new token included), with the model taking at most
/// `max_positions`: the next power of two, at least [`MIN_LEN`], at most `max_positions` and
/// [`MAX_LEN`]. `None` when `longest` is 0 or over either limit.
pub fn graph_len(longest: usize, max_positions: usize) -> Option<usize> {
    let limit = max_positions.min(MAX_LEN);
    if longest == 0 || longest > limit {
        return None;
    }
    Some(longest.next_power_of_two().max(MIN_LEN).min(limit))
}

#[cfg(feature = "cuda")]
pub use gpu::DecodeGraphs;

#[cfg(feature = "cuda")]
mod gpu {
    use std::collections::HashMap;

    use candle_core::cuda_backend::cudarc::driver::sys::{
        CUgraphInstantiate_flags, CUstreamCaptureMode,
    };
    use candle_core::cuda_backend::cudarc::driver::CudaGraph;
    use candle_core::{DType, Device, Tensor};

    use super::{graph_len, graph_rows};
    use crate::error::ModelError;
    use crate::models::kv_cache::KvCache;
    use crate::models::llama::Llama;
    use crate::models::{Batch, Result};
    use crate::ops::dev_err;
    use crate::ops::llama_fused::{copy_into, supports, Step};

    /// One shape's buffers and, once recorded, its graph.
    struct Shape {
        step: Step,
        ids: Tensor,
        graph: Option<CudaGraph>,
        /// Whether its recording was tried (a failed one leaves the shape running plainly).
        tried: bool,
    }

    /// The graphs of one model and one KV cache, made as batches need them.
    pub struct DecodeGraphs {
        max_rows: usize,
        /// The most tokens any forward pass of the engine takes.
        max_tokens: usize,
        /// Whether the quantized products' workspaces were grown for `max_tokens`.
        reserved: bool,
        shapes: HashMap<(usize, usize), Shape>,
        /// (max_rows, vocab) f32: every graph copies its logits into the leading rows.
        logits: Option<Tensor>,
        replays: u64,
    }

    // SAFETY: the graph handles are the only members that are not `Send` (raw driver
    // handles); the driver's graph calls may come from any thread, and cudarc binds the
    // graph's context to the calling thread before each launch and at its drop. A
    // `DecodeGraphs` is used by one thread at a time (it is not `Sync`).
    unsafe impl Send for DecodeGraphs {}

    impl DecodeGraphs {
        /// Graphs for batches of up to `max_rows` sequences, beside forward passes of up to
        /// `max_tokens` tokens.
        pub fn new(max_rows: usize, max_tokens: usize) -> Self {
            Self {
                max_rows: max_rows.max(1),
                max_tokens: max_tokens.max(max_rows),
                reserved: false,
                shapes: HashMap::new(),
                logits: None,
                replays: 0,
            }
        }

        /// Graphs recorded so far.
        pub fn recorded(&self) -> usize {
            self.shapes.values().filter(|s| s.graph.is_some()).count()
        }

        /// Steps replayed from a graph so far.
        pub fn replays(&self) -> u64 {
            self.replays
        }

        /// The logits (one row per sequence) of `batch`'s decode step through a graph, the
        /// step's positions reserved in `cache` as [`Llama::forward`] would; `Ok(None)` (and
        /// nothing reserved) when no graph takes the batch: not on a CUDA device, a sequence
        /// with more than one token, more rows or a longer context than any graph holds. The
        /// logits are a view of a buffer the next step overwrites.
        pub fn forward(
            &mut self,
            model: &Llama,
            batch: &Batch,
            cache: &mut KvCache,
        ) -> Result<Option<Tensor>> {
            let Device::Cuda(cuda) = model.device() else {
                return Ok(None);
            };
            let n = batch.num_seqs();
            if n == 0 || batch.num_tokens() != n || !supports(cache.geometry()) {
                return Ok(None);
            }
            let longest = batch.positions().iter().map(|&p| p as usize + 1).max();
            let max_positions = model.config().max_position_embeddings;
            let (Some(rows), Some(len)) = (
                graph_rows(n, self.max_rows),
                longest.and_then(|l| graph_len(l, max_positions)),
            ) else {
                return Ok(None);
            };
            let vocab = model.config().vocab_size;
            if self.logits.is_none() {
                self.logits = Some(Tensor::zeros(
                    (self.max_rows, vocab),
                    DType::F32,
                    model.device(),
                )?);
            }
            let logits = self.logits.as_ref().expect("made above");
            let out = logits.narrow(0, 0, rows)?;
            let shape = match self.shapes.entry((rows, len)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let (step, ids) = model.decode_buffers(cache, rows, len)?;
                    e.insert(Shape {
                        step,
                        ids,
                        graph: None,
                        tried: false,
                    })
                }
            };
            model.prepare_decode(batch, cache, &mut shape.step, &shape.ids)?;
            if let Some(graph) = &shape.graph {
                graph.launch().map_err(dev_err)?;
                self.replays += 1;
            } else if shape.tried {
                let plain = model.forward_decode_on_device(&mut shape.step, &shape.ids, cache)?;
                copy_into(&out, &plain)?;
            } else {
                if !self.reserved {
                    model.reserve_workspaces(self.max_tokens)?;
                    self.reserved = true;
                }
                // candle uploads small kernel parameters from the host; cached by content
                // while this guard lives, the plain step's uploads serve the recording.
                let _params = cuda.enable_cuda_graph_htod_cache();
                let plain = model.forward_decode_on_device(&mut shape.step, &shape.ids, cache)?;
                copy_into(&out, &plain)?;
                drop(plain);
                shape.tried = true;
                match record(cuda, model, shape, cache, &out) {
                    Ok(graph) => shape.graph = Some(graph),
                    Err(e) => tracing::warn!(
                        rows,
                        len,
                        error = %e,
                        "decode steps of this shape run without a CUDA graph"
                    ),
                }
            }
            Ok(Some(out.narrow(0, 0, n)?))
        }
    }

    /// Records `shape`'s step (its buffers as the plain step just left them) into a graph
    /// whose logits land in `out`; the recording runs nothing.
    fn record(
        cuda: &candle_core::cuda_backend::CudaDevice,
        model: &Llama,
        shape: &mut Shape,
        cache: &mut KvCache,
        out: &Tensor,
    ) -> Result<CudaGraph> {
        let stream = cuda.cuda_stream();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(dev_err)?;
        // Every buffer the step makes is dropped inside the recording, so the graph frees
        // all it allocates.
        let captured = model
            .forward_decode_on_device(&mut shape.step, &shape.ids, cache)
            .and_then(|logits| Ok(copy_into(out, &logits)?));
        let graph = stream.end_capture(CUgraphInstantiate_flags(0));
        captured?;
        graph
            .map_err(dev_err)?
            .ok_or_else(|| ModelError::Invalid("the recording holds no step".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every batch size up to the limit gets a graph that holds it, the padding stays below
    /// half the rows past 2, and no graph is bigger than the limit.
    #[test]
    fn graph_rows_hold_the_batch_within_the_limit() {
        for max in [1, 3, 16, 20, 256] {
            for n in 1..=max {
                let rows = graph_rows(n, max).unwrap();
                assert!(rows >= n && rows <= max, "n {n} max {max}: {rows}");
                if n > 2 {
                    assert!(rows - n < n, "n {n} max {max}: {rows}");
                }
            }
            assert_eq!(graph_rows(0, max), None);
            assert_eq!(graph_rows(max + 1, max), None);
        }
        // Few shapes: 1, 2, 4, 8, then multiples of 16.
        let shapes: std::collections::BTreeSet<_> =
            (1..=256).map(|n| graph_rows(n, 256).unwrap()).collect();
        assert_eq!(shapes.len(), 4 + 16);
        assert_eq!(graph_rows(9, 256), Some(16));
        assert_eq!(graph_rows(17, 256), Some(32));
        assert_eq!(graph_rows(17, 20), Some(20));
    }

    #[test]
    fn graph_len_holds_the_longest_sequence() {
        assert_eq!(graph_len(1, 8192), Some(256));
        assert_eq!(graph_len(257, 8192), Some(512));
        assert_eq!(graph_len(512, 8192), Some(512));
        assert_eq!(graph_len(8000, 8192), Some(8192));
        // A model of odd length: the capacity stops at its end.
        assert_eq!(graph_len(3000, 3000), Some(3000));
        assert_eq!(graph_len(100, 200), Some(200));
        assert_eq!(graph_len(0, 8192), None);
        assert_eq!(graph_len(8193, 8192), None);
        // Long contexts run without graphs.
        assert_eq!(graph_len(MAX_LEN, 131_072), Some(MAX_LEN));
        assert_eq!(graph_len(MAX_LEN + 1, 131_072), None);
    }
}
