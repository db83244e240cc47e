//! The paged key/value history of the generator. Models are immutable; whoever drives them owns
//! one of these and names sequences by id in each [`super::Batch`].
//!
//! Storage: for each layer, K and V as `(num_blocks, kv_heads, block_size, head_dim)` f16
//! (see [`crate::ops::paged_attention`]); the blocks are handed out by a [`BlockPool`], one
//! [`BlockTable`] per live sequence. A sequence may start on blocks another sequence with the
//! same cache salt already computed ([`KvCache::start`]); those blocks are shared, read-only
//! (a sequence only ever writes positions after its reused prefix, into blocks of its own).

use std::collections::HashMap;

use half::f16;
use half::slice::HalfBitsSliceExt;

use super::kv_blocks::{BlockPool, BlockTable, PoolError, PoolUsage, DEFAULT_BLOCK_SIZE};
use super::llama::LlamaConfig;
use super::{Batch, Result};
use crate::error::ModelError;
use crate::ops::paged_attention::{write_kv, PagedGeometry, SeqView};

/// K/V storage of every layer and the tables of every live sequence.
pub struct KvCache {
    geometry: PagedGeometry,
    pool: BlockPool,
    tables: HashMap<u64, BlockTable>,
    /// Per layer, K then V; zero-initialised `u16` so the allocation stays lazy (untouched pages
    /// cost nothing), read as f16.
    layers: Vec<(Vec<u16>, Vec<u16>)>,
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
        let elems = num_blocks * geometry.block_elems();
        Self {
            geometry,
            pool: BlockPool::new(num_blocks, geometry.block_size),
            tables: HashMap::new(),
            layers: (0..cfg.num_hidden_layers)
                .map(|_| (vec![0u16; elems], vec![0u16; elems]))
                .collect(),
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
    ) {
        let g = self.geometry;
        let width = g.kv_heads * g.head_dim;
        let (k, v) = &mut self.layers[layer];
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
    }

    /// Layer `layer`'s K and V and the views of `batch`'s sequences for the attention op.
    pub(crate) fn views<'a>(
        &'a self,
        layer: usize,
        batch: &Batch,
    ) -> (&'a [f16], &'a [f16], Vec<SeqView<'a>>) {
        let (k, v) = &self.layers[layer];
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
        (k.reinterpret_cast(), v.reinterpret_cast(), seqs)
    }
}
