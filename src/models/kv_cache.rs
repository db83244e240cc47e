//! Per-sequence key/value history of the generator. Models are immutable; whoever drives them
//! owns one of these and names sequences by id in each [`super::Batch`].

use std::collections::HashMap;

use candle_core::Tensor;

use super::Result;

/// Tokens of room added at a time when a sequence's history grows.
const GROW_TOKENS: usize = 256;

/// Key/value tensors of every layer for each live sequence.
pub struct KvCache {
    num_layers: usize,
    seqs: HashMap<u64, Vec<candle_nn::kv_cache::KvCache>>,
}

impl KvCache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            num_layers,
            seqs: HashMap::new(),
        }
    }

    /// Tokens cached for sequence `seq_id` (0 for an unknown sequence).
    pub fn seq_len(&self, seq_id: u64) -> usize {
        self.seqs
            .get(&seq_id)
            .map_or(0, |layers| layers[0].current_seq_len())
    }

    /// Number of sequences holding history.
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Frees a sequence's history.
    pub fn remove(&mut self, seq_id: u64) {
        self.seqs.remove(&seq_id);
    }

    pub fn clear(&mut self) {
        self.seqs.clear();
    }

    /// Appends `k`, `v` `(kv_heads, len, head_dim)` to layer `layer` of sequence `seq_id`;
    /// returns the whole history `(kv_heads, total_len, head_dim)` of that layer.
    pub(crate) fn append(
        &mut self,
        seq_id: u64,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let layers = self.seqs.entry(seq_id).or_insert_with(|| {
            (0..self.num_layers)
                .map(|_| candle_nn::kv_cache::KvCache::new(1, GROW_TOKENS))
                .collect()
        });
        Ok(layers[layer].append(&k.contiguous()?, &v.contiguous()?)?)
    }
}
