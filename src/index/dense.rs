//! The dense matrix: every chunk's embedding in memory, derived from the store, searched exactly
//! with the similarity top-k op.

use std::collections::HashMap;

use super::store::Store;
use crate::error::IndexError;
use std::collections::HashSet;

use crate::ops::similarity::topk_cpu;

type Result<T> = std::result::Result<T, IndexError>;

/// Chunk embeddings as one row-major matrix.
#[derive(Default)]
pub struct DenseIndex {
    dim: usize,
    /// Chunk id of each row.
    ids: Vec<i64>,
    rows: Vec<f32>,
    row_of: HashMap<i64, usize>,
    version: u64,
}

impl DenseIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuilds the matrix when the store changed since it was built.
    pub fn catch_up(&mut self, store: &dyn Store) -> Result<bool> {
        let target = store.version()?;
        if target == self.version {
            return Ok(false);
        }
        let mut ids = Vec::new();
        let mut rows = Vec::new();
        let mut dim = 0;
        store.for_each_chunk(&mut |c| {
            if dim == 0 {
                dim = c.embedding.len();
            }
            if c.embedding.len() != dim {
                return Err(IndexError::Invalid(format!(
                    "chunk {} has {} dimensions, others {dim}",
                    c.id,
                    c.embedding.len()
                )));
            }
            ids.push(c.id);
            rows.extend_from_slice(&c.embedding);
            Ok(())
        })?;
        self.row_of = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
        self.dim = dim;
        self.ids = ids;
        self.rows = rows;
        self.version = target;
        Ok(true)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The `k` chunks most similar to `query` (unit vectors: inner product = cosine), among
    /// `allowed` chunks when given.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        allowed: Option<&HashSet<i64>>,
    ) -> Result<Vec<(i64, f32)>> {
        if self.ids.is_empty() {
            return Ok(Vec::new());
        }
        if query.len() != self.dim {
            return Err(IndexError::Invalid(format!(
                "query of {} dimensions against chunks of {}",
                query.len(),
                self.dim
            )));
        }
        let Some(allowed) = allowed else {
            let hits = topk_cpu(query, &self.rows, self.dim, k)?;
            return Ok(hits[0]
                .iter()
                .map(|h| (self.ids[h.id as usize], h.score))
                .collect());
        };
        // Exact search over the allowed rows only, gathered into one matrix.
        let mut ids = Vec::with_capacity(allowed.len());
        let mut rows = Vec::with_capacity(allowed.len() * self.dim);
        for (r, id) in self.ids.iter().enumerate() {
            if allowed.contains(id) {
                ids.push(*id);
                rows.extend_from_slice(&self.rows[r * self.dim..(r + 1) * self.dim]);
            }
        }
        let hits = topk_cpu(query, &rows, self.dim, k)?;
        Ok(hits[0]
            .iter()
            .map(|h| (ids[h.id as usize], h.score))
            .collect())
    }

    /// Cosine of `query` with one chunk.
    pub fn score(&self, chunk_id: i64, query: &[f32]) -> Option<f32> {
        let r = *self.row_of.get(&chunk_id)?;
        let row = &self.rows[r * self.dim..(r + 1) * self.dim];
        Some(row.iter().zip(query).map(|(a, b)| a * b).sum())
    }
}
