//! The paged key/value history of the generator. Models are immutable; whoever drives them owns
//! one of these and names sequences by id in each [`super::Batch`].
//!
//! Storage: for each layer, K and V as `(num_blocks + 1, kv_heads, block_size, head_dim)` f16
//! (see [`crate::ops::paged_attention`]); the first `num_blocks` are handed out by a
//! [`BlockPool`], one [`BlockTable`] per live sequence; the last, the spare block, belongs to no
//! sequence: the padding rows of a decode step replayed at a larger batch than it holds
//! ([`KvCache::padded_decode_rows`]) write and read there. A sequence may start on blocks another sequence with the
//! same cache salt already computed ([`KvCache::start`]); those blocks are shared, read-only
//! (a sequence only ever writes positions after its reused prefix, into blocks of its own).
//!
//! The storage starts in host memory; the first forward pass of a model on a CUDA device moves
//! it to that device ([`KvCache::move_to_device`]), where it stays.

use std::collections::HashMap;

use half::f16;
use half::slice::HalfBitsSliceExt;

use super::kv_blocks::{BlockPool, BlockTable, PoolError, PoolUsage, DEFAULT_BLOCK_SIZE};
use super::llama::LlamaConfig;
use super::{Batch, Result};
use crate::error::ModelError;
use crate::ops::paged_attention::{write_kv, PagedGeometry, SeqView};

/// Rows of a decode step: each row's position, cache slot and block table.
pub(crate) type DecodeRowsOf<'a> = (Vec<u32>, Vec<u32>, Vec<&'a [u32]>);

/// K/V storage of every layer and the tables of every live sequence.
pub struct KvCache {
    geometry: PagedGeometry,
    pool: BlockPool,
    tables: HashMap<u64, BlockTable>,
    layers: Layers,
    /// Whether any position was ever written (an untouched host cache moves to a device as
    /// fresh zeros, without a copy).
    written: bool,
    /// The block table of a padding row: the spare block alone.
    spare_table: [u32; 1],
}

/// Where the layers' K and V live.
enum Layers {
    /// Per layer, K then V; zero-initialised `u16` so the allocation stays lazy (untouched pages
    /// cost nothing), read as f16.
    Host(HostLayers),
    /// Per layer, K then V, on a CUDA device.
    #[cfg(feature = "cuda")]
    Device(
        Vec<(
            candle_core::cuda_backend::cudarc::driver::CudaSlice<f16>,
            candle_core::cuda_backend::cudarc::driver::CudaSlice<f16>,
        )>,
    ),
}

type HostLayers = Vec<(Vec<u16>, Vec<u16>)>;

impl Layers {
    fn host(&self) -> Result<&HostLayers> {
        match self {
            Layers::Host(l) => Ok(l),
            #[cfg(feature = "cuda")]
            Layers::Device(_) => Err(on_device()),
        }
    }

    fn host_mut(&mut self) -> Result<&mut HostLayers> {
        match self {
            Layers::Host(l) => Ok(l),
            #[cfg(feature = "cuda")]
            Layers::Device(_) => Err(on_device()),
        }
    }
}

/// The error of a host-path access to a cache on a device.
#[cfg(feature = "cuda")]
fn on_device() -> ModelError {
    ModelError::Invalid("this KV cache lives on a GPU; the host path cannot use it".into())
}

impl KvCache {
    /// A cache of `num_blocks` blocks of `block_size` positions for a model of shape `cfg`.
    pub fn new(cfg: &LlamaConfig, num_blocks: usize, block_size: usize) -> Self {
        let geometry = PagedGeometry {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_kv_heads(),
            head_dim: cfg.head_dim(),
            block_size: block_size.max(1),
        };
        // The pool's blocks and the spare block.
        let elems = (num_blocks + 1) * geometry.block_elems();
        Self {
            geometry,
            pool: BlockPool::new(num_blocks, geometry.block_size),
            tables: HashMap::new(),
            layers: Layers::Host(
                (0..cfg.num_hidden_layers)
                    .map(|_| (vec![0u16; elems], vec![0u16; elems]))
                    .collect(),
            ),
            written: false,
            spare_table: [num_blocks as u32],
        }
    }

    /// Room for `tokens` positions in blocks of [`DEFAULT_BLOCK_SIZE`] (tests, tools).
    pub fn with_tokens(cfg: &LlamaConfig, tokens: usize) -> Self {
        Self::new(
            cfg,
            tokens.div_ceil(DEFAULT_BLOCK_SIZE).max(1),
            DEFAULT_BLOCK_SIZE,
        )
    }

    /// As many blocks as `bytes` of K/V storage hold (at least one).
    pub fn with_memory(cfg: &LlamaConfig, bytes: usize, block_size: usize) -> Result<Self> {
        let per_block = Self::bytes_per_block(cfg, block_size);
        let num_blocks = bytes / per_block;
        if num_blocks == 0 {
            return Err(ModelError::Invalid(format!(
                "a KV cache of {bytes} bytes holds no block ({per_block} bytes each)"
            )));
        }
        Ok(Self::new(cfg, num_blocks, block_size))
    }

    /// Bytes of K/V storage one block takes across every layer.
    pub fn bytes_per_block(cfg: &LlamaConfig, block_size: usize) -> usize {
        2 * 2 * cfg.num_hidden_layers * cfg.num_kv_heads() * cfg.head_dim() * block_size.max(1)
    }

    pub fn block_size(&self) -> usize {
        self.geometry.block_size
    }

    /// Tokens cached for sequence `seq_id` (0 for an unknown sequence).
    pub fn seq_len(&self, seq_id: u64) -> usize {
        self.tables.get(&seq_id).map_or(0, BlockTable::len)
    }

    /// Number of sequences holding history.
    pub fn num_seqs(&self) -> usize {
        self.tables.len()
    }

    /// Frees a sequence's blocks (those holding a registered prefix stay reusable).
    pub fn remove(&mut self, seq_id: u64) {
        if let Some(t) = self.tables.remove(&seq_id) {
            self.pool.release(t);
        }
    }

    /// Frees every sequence.
    pub fn clear(&mut self) {
        for (_, t) in self.tables.drain() {
            self.pool.release(t);
        }
    }

    /// Starts sequence `seq_id` on the longest cached prefix of `prompt` under `salt`; returns
    /// how many prompt tokens are already cached (their forward pass can be skipped). Replaces
    /// any history the id had.
    pub fn start(&mut self, seq_id: u64, prompt: &[u32], salt: u64) -> usize {
        self.remove(seq_id);
        let table = self.pool.start(prompt, salt);
        let reused = table.len();
        self.tables.insert(seq_id, table);
        reused
    }

    /// Publishes the full blocks of `seq_id` written so far (`tokens`: the sequence's tokens
    /// from position 0) for reuse by later sequences with the same salt.
    pub fn register(&mut self, seq_id: u64, tokens: &[u32], salt: u64) {
        if let Some(t) = self.tables.get_mut(&seq_id) {
            self.pool.register(t, tokens, salt);
        }
    }

    /// Blocks sequence `seq_id` needs to grow by `tokens` positions.
    pub fn blocks_needed(&self, seq_id: u64, tokens: usize) -> usize {
        match self.tables.get(&seq_id) {
            Some(t) => self.pool.needed(t, tokens),
            None => self.pool.blocks_for(tokens),
        }
    }

    /// Positions sequence `seq_id` can grow by with `blocks` more blocks (the room left in its
    /// last block included).
    pub fn room_with(&self, seq_id: u64, blocks: usize) -> usize {
        let bs = self.geometry.block_size;
        let own = self
            .tables
            .get(&seq_id)
            .map_or(0, |t| t.blocks().len() * bs - t.len());
        own + blocks * bs
    }

    /// Blocks that can be handed out now.
    pub fn available_blocks(&self) -> usize {
        self.pool.available()
    }

    /// Whether a sequence of `tokens` positions could fit even in an empty cache.
    pub fn check_fits(&self, tokens: usize) -> std::result::Result<(), PoolError> {
        self.pool.check_fits(tokens)
    }

    pub fn usage(&self) -> PoolUsage {
        self.pool.usage()
    }

    pub(crate) fn geometry(&self) -> &PagedGeometry {
        &self.geometry
    }

    /// Reserves the positions of every sequence of `batch`, all or nothing.
    pub(crate) fn reserve(&mut self, batch: &Batch) -> Result<()> {
        let needed: usize = (0..batch.num_seqs())
            .map(|s| self.blocks_needed(batch.seq_id(s), batch.seq_range(s).len()))
            .sum();
        if needed > self.pool.available() {
            return Err(ModelError::Invalid(
                PoolError::OutOfBlocks {
                    needed,
                    available: self.pool.available(),
                }
                .to_string(),
            ));
        }
        for s in 0..batch.num_seqs() {
            let table = self.tables.entry(batch.seq_id(s)).or_default();
            self.pool
                .grow(table, batch.seq_range(s).len())
                .expect("counted as available");
        }
        Ok(())
    }

    /// Writes layer `layer`'s K and V rows for every token of `batch` (reserved already):
    /// token `t`'s K heads at `rows[t * stride + k_at..]`, V heads at `rows[t * stride + v_at..]`.
    pub(crate) fn write(
        &mut self,
        layer: usize,
        batch: &Batch,
        rows: &[f32],
        stride: usize,
        k_at: usize,
        v_at: usize,
    ) -> Result<()> {
        let g = self.geometry;
        let width = g.kv_heads * g.head_dim;
        let (k, v) = &mut self.layers.host_mut()?[layer];
        self.written = true;
        let (k, v): (&mut [f16], &mut [f16]) = (k.reinterpret_cast_mut(), v.reinterpret_cast_mut());
        for s in 0..batch.num_seqs() {
            let r = batch.seq_range(s);
            let start = batch.positions()[r.start] as usize;
            let blocks = self.tables[&batch.seq_id(s)].blocks();
            let tokens = r.clone().enumerate().map(|(i, t)| {
                let row = &rows[t * stride..];
                (i, (&row[k_at..k_at + width], &row[v_at..v_at + width]))
            });
            write_kv(&g, k, v, blocks, start, tokens);
        }
        Ok(())
    }

    /// Layer `layer`'s K and V and the views of `batch`'s sequences for the attention op.
    pub(crate) fn views<'a>(
        &'a self,
        layer: usize,
        batch: &Batch,
    ) -> Result<(&'a [f16], &'a [f16], Vec<SeqView<'a>>)> {
        let (k, v) = &self.layers.host()?[layer];
        let seqs = (0..batch.num_seqs())
            .map(|s| {
                let r = batch.seq_range(s);
                SeqView {
                    start: batch.positions()[r.start] as usize,
                    tokens: r,
                    blocks: self.tables[&batch.seq_id(s)].blocks(),
                }
            })
            .collect();
        Ok((k.reinterpret_cast(), v.reinterpret_cast(), seqs))
    }

    /// Each token of `batch` (reserved already): its cache slot (block * block_size + offset)
    /// and its sequence's block table (the GPU path's view of what [`KvCache::write`] does).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn token_rows<'a>(&'a self, batch: &Batch) -> (Vec<u32>, Vec<&'a [u32]>) {
        let bs = self.geometry.block_size;
        let n = batch.num_tokens();
        let (mut slots, mut tables) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for s in 0..batch.num_seqs() {
            let blocks = self.tables[&batch.seq_id(s)].blocks();
            for t in batch.seq_range(s) {
                let p = batch.positions()[t] as usize;
                slots.push((blocks[p / bs] as usize * bs + p % bs) as u32);
                tables.push(blocks);
            }
        }
        (slots, tables)
    }

    /// Blocks the pool hands out.
    pub fn num_blocks(&self) -> usize {
        self.pool.total()
    }

    /// Blocks each layer stores: the pool's, then the spare block.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn storage_blocks(&self) -> usize {
        self.pool.total() + 1
    }

    /// The rows of a decode step (one token per sequence of `batch`, reserved already) padded
    /// to `rows`: each token's position, cache slot and its sequence's block table as
    /// [`KvCache::token_rows`] gives them, then rows at position 0 of the spare block, which
    /// no sequence's table holds: what they write there and read back changes nothing any
    /// sequence sees.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn padded_decode_rows(
        &self,
        batch: &Batch,
        rows: usize,
    ) -> Result<DecodeRowsOf<'_>> {
        let n = batch.num_seqs();
        if batch.num_tokens() != n || n > rows {
            return Err(ModelError::Invalid(format!(
                "{} tokens of {n} sequences for {rows} one-token decode rows",
                batch.num_tokens()
            )));
        }
        let (mut slots, mut tables) = self.token_rows(batch);
        let mut positions = batch.positions().to_vec();
        let spare = self.pool.total() as u32;
        positions.resize(rows, 0);
        slots.resize(rows, spare * self.geometry.block_size as u32);
        tables.resize(rows, std::slice::from_ref(&self.spare_table[0]));
        debug_assert_eq!(self.spare_table[0], spare);
        Ok((positions, slots, tables))
    }

    /// Whether the storage lives on a GPU.
    pub fn on_gpu(&self) -> bool {
        !matches!(self.layers, Layers::Host(_))
    }

    /// Moves the storage to the CUDA device `dev` (once; a cache already there stays): fresh
    /// zeros when nothing was written yet, else a copy of what the host holds.
    #[cfg(feature = "cuda")]
    pub(crate) fn move_to_device(
        &mut self,
        dev: &candle_core::cuda_backend::CudaDevice,
    ) -> Result<()> {
        use crate::ops::dev_err;
        let Layers::Host(layers) = &self.layers else {
            return Ok(());
        };
        let stream = dev.cuda_stream();
        let mut moved = Vec::with_capacity(layers.len());
        for (k, v) in layers {
            let (k, v): (&[f16], &[f16]) = (k.reinterpret_cast(), v.reinterpret_cast());
            let pair = if self.written {
                (stream.clone_htod(k), stream.clone_htod(v))
            } else {
                (stream.alloc_zeros(k.len()), stream.alloc_zeros(v.len()))
            };
            moved.push((pair.0.map_err(dev_err)?, pair.1.map_err(dev_err)?));
        }
        self.layers = Layers::Device(moved);
        Ok(())
    }

    /// Layer `layer`'s K and V on the device (after [`KvCache::move_to_device`]).
    #[cfg(feature = "cuda")]
    #[allow(clippy::type_complexity)]
    pub(crate) fn device_layer(
        &mut self,
        layer: usize,
    ) -> Result<(
        &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f16>,
        &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f16>,
    )> {
        match &mut self.layers {
            Layers::Device(layers) => {
                self.written = true;
                let (k, v) = &mut layers[layer];
                Ok((k, v))
            }
            Layers::Host(_) => Err(ModelError::Invalid(
                "this KV cache is still in host memory".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::llama::LlamaConfig;

    fn config() -> LlamaConfig {
        serde_json::from_value(serde_json::json!({
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 50,
        }))
        .unwrap()
    }

    /// The slots the GPU path writes each token's K/V to are the rows the host path writes:
    /// two sequences over shuffled blocks, one resuming mid-block.
    #[test]
    fn token_rows_name_the_rows_the_host_writes() {
        let cfg = config();
        let mut cache = KvCache::new(&cfg, 12, 4);
        let g = *cache.geometry();
        let width = g.kv_heads * g.head_dim;
        // Sequence 7 takes blocks first, then 3 takes some, then 7 grows past them.
        let step = |batch: &Batch, cache: &mut KvCache| {
            cache.reserve(batch).unwrap();
            // Each token's K row holds its index + 1 in every element, V its negation.
            let stride = 2 * width;
            let rows: Vec<f32> = (0..batch.num_tokens())
                .flat_map(|t| {
                    let x = t as f32 + 1.0;
                    std::iter::repeat_n(x, width).chain(std::iter::repeat_n(-x, width))
                })
                .collect();
            cache.write(0, batch, &rows, stride, 0, width).unwrap();
            let (slots, tables) = cache.token_rows(batch);
            let (k, v, _) = cache.views(0, batch).unwrap();
            for t in 0..batch.num_tokens() {
                let (block, off) = (slots[t] as usize / 4, slots[t] as usize % 4);
                assert!(tables[t].contains(&(block as u32)));
                for h in 0..g.kv_heads {
                    let at = ((block * g.kv_heads + h) * 4 + off) * g.head_dim;
                    assert_eq!(k[at].to_f32(), t as f32 + 1.0);
                    assert_eq!(v[at + g.head_dim - 1].to_f32(), -(t as f32 + 1.0));
                }
            }
        };
        let mut b = Batch::new();
        b.push(7, &[1, 2, 3, 4, 5, 6], 0);
        step(&b, &mut cache);
        let mut b = Batch::new();
        b.push(3, &[1, 2, 3, 4, 5], 0);
        b.push(7, &[9], 6);
        step(&b, &mut cache);
        let mut b = Batch::new();
        b.push(7, &[1, 2, 3, 4, 5, 6, 7], 7);
        b.push(3, &[8], 5);
        step(&b, &mut cache);
        assert_eq!(cache.seq_len(7), 14);
        assert_eq!(cache.num_blocks(), 12);
    }

    /// A decode step padded past its sequences: the real rows are the ones `token_rows`
    /// names, the padding rows sit at position 0 of the spare block, which is stored past the
    /// pool's blocks and never handed out, even with every pool block taken.
    #[test]
    fn padding_rows_use_only_the_spare_block() {
        let cfg = config();
        let mut cache = KvCache::new(&cfg, 3, 4);
        assert_eq!((cache.num_blocks(), cache.storage_blocks()), (3, 4));
        let g = *cache.geometry();
        let (k, _, _) = cache.views(0, &Batch::new()).unwrap();
        assert_eq!(k.len(), 4 * g.block_elems());
        // Two sequences take all three blocks.
        let mut b = Batch::new();
        b.push(1, &[1, 2, 3, 4, 5, 6, 7, 8], 0);
        b.push(2, &[6, 7, 8], 0);
        cache.reserve(&b).unwrap();
        assert_eq!(cache.available_blocks(), 0);
        let mut step = Batch::new();
        step.push(2, &[9], 3);
        step.push(1, &[9], 8);
        // Sequence 1 needs a third block of its own for position 8: the pool has none left,
        // and the spare is not the pool's.
        assert!(cache.reserve(&step).is_err());
        let mut step = Batch::new();
        step.push(2, &[9], 3);
        cache.reserve(&step).unwrap();
        let (slots, tables) = cache.token_rows(&step);
        let (positions, padded_slots, padded_tables) = cache.padded_decode_rows(&step, 4).unwrap();
        assert_eq!(positions, vec![3, 0, 0, 0]);
        assert_eq!(padded_slots[0], slots[0]);
        assert_eq!(padded_tables[0], tables[0]);
        for r in 1..4 {
            assert_eq!(padded_tables[r], &[3]);
            assert_eq!(padded_slots[r], 3 * 4);
        }
        for id in [1, 2] {
            assert!(!cache.tables[&id].blocks().contains(&3));
        }
        // Exactly full needs no padding; more sequences than rows, or a prompt chunk, is an
        // error.
        assert_eq!(cache.padded_decode_rows(&step, 1).unwrap().0, vec![3]);
        assert!(cache.padded_decode_rows(&step, 0).is_err());
        let mut chunk = Batch::new();
        chunk.push(2, &[1, 2], 4);
        assert!(cache.padded_decode_rows(&chunk, 4).is_err());
    }
}
