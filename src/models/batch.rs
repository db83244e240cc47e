//! [`Batch`]: the one input shape of every model.

use std::ops::Range;

/// Which positions a generation forward returns logits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsAt {
    /// One row per sequence: its last token (what decoding needs).
    LastOfEach,
    /// One row per token of the batch, in packed order (scoring and parity checks).
    All,
}

/// Several sequences packed end to end, without padding.
///
/// Sequence `i` owns tokens `cu_seqlens[i]..cu_seqlens[i + 1]`; `positions` holds each token's
/// absolute position in its own sequence (a decode step continues where the KV cache ends);
/// `seq_ids` names the sequence whose KV cache the tokens extend.
#[derive(Clone, Debug)]
pub struct Batch {
    input_ids: Vec<u32>,
    positions: Vec<u32>,
    cu_seqlens: Vec<usize>,
    seq_ids: Vec<u64>,
}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self {
            input_ids: Vec::new(),
            positions: Vec::new(),
            cu_seqlens: vec![0],
            seq_ids: Vec::new(),
        }
    }

    /// Packs whole sequences, each starting at position 0, with ids 0, 1, 2, ...
    pub fn from_sequences<T: AsRef<[u32]>>(sequences: &[T]) -> Self {
        let mut batch = Self::new();
        for (i, seq) in sequences.iter().enumerate() {
            batch.push(i as u64, seq.as_ref(), 0);
        }
        batch
    }

    /// Appends `tokens` of sequence `seq_id`, the first at absolute position `start_pos`.
    ///
    /// # Panics
    /// When `tokens` is empty: a sequence with nothing to compute has no place in a batch.
    pub fn push(&mut self, seq_id: u64, tokens: &[u32], start_pos: usize) {
        assert!(
            !tokens.is_empty(),
            "a batch sequence needs at least one token"
        );
        self.input_ids.extend_from_slice(tokens);
        self.positions
            .extend((start_pos..start_pos + tokens.len()).map(|p| p as u32));
        self.cu_seqlens.push(self.input_ids.len());
        self.seq_ids.push(seq_id);
    }

    /// Number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.seq_ids.len()
    }

    /// Number of tokens over all sequences.
    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seq_ids.is_empty()
    }

    /// Packed token ids, `(num_tokens,)`.
    pub fn input_ids(&self) -> &[u32] {
        &self.input_ids
    }

    /// Absolute position of each packed token, `(num_tokens,)`.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// Cumulative sequence lengths, `(num_seqs + 1,)`, starting at 0.
    pub fn cu_seqlens(&self) -> &[usize] {
        &self.cu_seqlens
    }

    /// The packed token range of sequence `i`.
    pub fn seq_range(&self, i: usize) -> Range<usize> {
        self.cu_seqlens[i]..self.cu_seqlens[i + 1]
    }

    /// The cache id of sequence `i`.
    pub fn seq_id(&self, i: usize) -> u64 {
        self.seq_ids[i]
    }

    /// Packed index of each sequence's last token, `(num_seqs,)`.
    pub fn last_token_indices(&self) -> Vec<u32> {
        self.cu_seqlens[1..]
            .iter()
            .map(|&end| end as u32 - 1)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_sequences_end_to_end() {
        let mut b = Batch::new();
        b.push(7, &[1, 2, 3], 0);
        b.push(9, &[4], 5);
        assert_eq!(b.input_ids(), &[1, 2, 3, 4]);
        assert_eq!(b.positions(), &[0, 1, 2, 5]);
        assert_eq!(b.cu_seqlens(), &[0, 3, 4]);
        assert_eq!(b.seq_range(1), 3..4);
        assert_eq!(b.seq_id(1), 9);
        assert_eq!(b.last_token_indices(), vec![2, 3]);
    }

    #[test]
    #[should_panic(expected = "at least one token")]
    fn refuses_empty_sequences() {
        Batch::new().push(0, &[], 0);
    }
}
