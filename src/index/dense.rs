//! The dense matrix: every chunk's embedding, derived from the store, kept up to date by the
//! store's change log without a rebuild, and searched by an 8-bit scan with an exact re-score.
//!
//! Storage: rows are appended in f16 to `vectors.f16` (memory-mapped; a deleted or replaced
//! document's rows are only marked dead), with the chunk id and document of each row beside it
//! and `meta.json` saying how many rows and which store version the files hold. Files longer than
//! `meta.json` says (a crash mid-append) are cut back at open and the change log replayed. A
//! process that does not own the data folder keeps the same structures in memory.
//!
//! Search: the rows are quantized to 8 bits per block of 32 ([`QMatrix`], the generator's VNNI
//! product kernels) in shards of 65,536 rows, the tail shard re-quantized when rows are appended;
//! each query is scored against every live row in 8 bits, the best `4k + 32` are re-scored
//! exactly from the f16 rows, and the best `k` of those returned. When a filter leaves few rows,
//! they are scored exactly instead. When a quarter of the rows are dead, the files are rewritten
//! with the live rows only.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::store::Store;
use crate::error::IndexError;
use crate::ops::qmatmul::QMatrix;
use crate::ops::similarity::Hit;

type Result<T> = std::result::Result<T, IndexError>;

/// Rows per 8-bit shard.
pub const SHARD_ROWS: usize = 1 << 16;
/// A filter leaving at most this many rows is scored exactly, row by row.
const EXACT_BELOW: usize = 20_000;
/// A chunk id marking a dead row.
const DEAD: i64 = -1;

fn io_err(path: &Path, source: std::io::Error) -> IndexError {
    IndexError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The f16 rows: a memory map of the owner's file plus rows appended since it was mapped, or
/// memory alone.
#[derive(Default)]
struct Rows {
    map: Option<memmap2::Mmap>,
    /// Values (not rows) in the map.
    mapped: usize,
    extra: Vec<f16>,
}

impl Rows {
    fn mapped_values(&self) -> &[f16] {
        match &self.map {
            // SAFETY: the map is page-aligned (f16 needs 2), holds `mapped` f16 values written by
            // this index, and is read-only while mapped: the file is only appended to.
            Some(m) => unsafe { std::slice::from_raw_parts(m.as_ptr().cast::<f16>(), self.mapped) },
            None => &[],
        }
    }

    fn row(&self, r: usize, dim: usize) -> &[f16] {
        let mapped = self.mapped_values();
        let start = r * dim;
        if start < mapped.len() {
            &mapped[start..start + dim]
        } else {
            let s = start - mapped.len();
            &self.extra[s..s + dim]
        }
    }
}

/// One 8-bit shard: rows `start..start + q.rows()`.
struct Shard {
    start: usize,
    q: QMatrix,
}

/// The dense index of the store's chunks.
#[derive(Default)]
pub struct DenseIndex {
    dim: usize,
    /// The owner's files; `None` in memory.
    dir: Option<PathBuf>,
    rows: Rows,
    /// Chunk id per row ([`DEAD`] when removed).
    ids: Vec<i64>,
    /// Document (index into `docs`) per row.
    row_doc: Vec<u32>,
    docs: Vec<String>,
    doc_index: HashMap<String, u32>,
    /// Live rows of each document.
    doc_rows: HashMap<u32, Vec<u32>>,
    /// Live row of each chunk id.
    row_of: HashMap<i64, usize>,
    shards: Vec<Shard>,
    /// The store version this index reflects.
    version: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    dim: usize,
    rows: usize,
    version: u64,
}

const META: &str = "meta.json";
const VECTORS: &str = "vectors.f16";
const IDS: &str = "ids.i64";
const ROW_DOCS: &str = "row_docs.u32";
const DOCS: &str = "docs.jsonl";

impl DenseIndex {
    /// An empty index in memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// The owner's index in `dir`: what the files hold (cut back to `meta.json`), or empty when
    /// they are missing or unreadable (the next catch-up rebuilds them).
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        Ok(Self::load(dir)?.unwrap_or_else(|| Self {
            dir: Some(dir.to_path_buf()),
            ..Self::default()
        }))
    }

    /// What the files in `dir` hold, or `None` when they are missing or do not agree.
    fn load(dir: &Path) -> Result<Option<Self>> {
        let Ok(meta) = std::fs::read(dir.join(META)) else {
            return Ok(None);
        };
        let Ok(meta) = serde_json::from_slice::<Meta>(&meta) else {
            return Ok(None);
        };
        let read = |name: &str| std::fs::read(dir.join(name)).ok();
        let (Some(ids), Some(row_docs), Some(docs)) = (read(IDS), read(ROW_DOCS), read(DOCS))
        else {
            return Ok(None);
        };
        if ids.len() < meta.rows * 8 || row_docs.len() < meta.rows * 4 {
            return Ok(None);
        }
        let vectors_path = dir.join(VECTORS);
        let file = File::options()
            .read(true)
            .write(true)
            .open(&vectors_path)
            .map_err(|e| io_err(&vectors_path, e))?;
        let need = (meta.rows * meta.dim * 2) as u64;
        let have = file.metadata().map_err(|e| io_err(&vectors_path, e))?.len();
        if have < need {
            return Ok(None);
        }
        if have > need {
            file.set_len(need).map_err(|e| io_err(&vectors_path, e))?;
        }
        let docs: Vec<String> = match std::str::from_utf8(&docs).ok().map(|t| {
            t.lines()
                .map(serde_json::from_str::<String>)
                .collect::<std::result::Result<Vec<_>, _>>()
        }) {
            Some(Ok(d)) => d,
            _ => return Ok(None),
        };
        let mut index = Self {
            dim: meta.dim,
            dir: Some(dir.to_path_buf()),
            ids: ids[..meta.rows * 8]
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            row_doc: row_docs[..meta.rows * 4]
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
            version: meta.version,
            ..Self::default()
        };
        if index.row_doc.iter().any(|&d| d as usize >= docs.len()) {
            return Ok(None);
        }
        index.doc_index = docs
            .iter()
            .enumerate()
            .map(|(i, d)| (d.clone(), i as u32))
            .collect();
        index.docs = docs;
        index.map_vectors(meta.rows)?;
        index.reindex();
        index.requantize_from(0);
        Ok(Some(index))
    }

    /// Maps the first `rows` rows of the vectors file.
    fn map_vectors(&mut self, rows: usize) -> Result<()> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let path = dir.join(VECTORS);
        self.rows = Rows::default();
        if rows == 0 {
            return Ok(());
        }
        let file = File::open(&path).map_err(|e| io_err(&path, e))?;
        // SAFETY: only this index writes the file, by appending past the mapped length.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .len(rows * self.dim * 2)
                .map(&file)
        }
        .map_err(|e| io_err(&path, e))?;
        self.rows = Rows {
            map: Some(map),
            mapped: rows * self.dim,
            extra: Vec::new(),
        };
        Ok(())
    }

    /// Rebuilds the lookups (live rows per chunk and per document) from `ids` and `row_doc`.
    fn reindex(&mut self) {
        self.row_of.clear();
        self.doc_rows.clear();
        for (r, (&id, &doc)) in self.ids.iter().zip(&self.row_doc).enumerate() {
            if id != DEAD {
                self.row_of.insert(id, r);
                self.doc_rows.entry(doc).or_default().push(r as u32);
            }
        }
    }

    /// Quantizes the rows pushed since the last catch-up (an index filled by [`DenseIndex::push`]
    /// outside a store).
    pub fn seal(&mut self) {
        let from = self.shards.last().map_or(0, |s| s.start);
        self.requantize_from(from);
    }

    /// Re-quantizes the shards holding rows from `from` on (none when the width is not a
    /// multiple of 32: every search is then exact).
    fn requantize_from(&mut self, from: usize) {
        let first = from / SHARD_ROWS;
        self.shards.truncate(first);
        if !self.dim.is_multiple_of(32) {
            self.shards.clear();
            return;
        }
        let n = self.ids.len();
        let starts: Vec<usize> = (first * SHARD_ROWS..n).step_by(SHARD_ROWS).collect();
        let dim = self.dim;
        let rows = &self.rows;
        let built: Vec<Shard> = starts
            .par_iter()
            .map(|&start| {
                let len = SHARD_ROWS.min(n - start);
                let mut values = vec![0f32; len * dim];
                for r in 0..len {
                    rows.row(start + r, dim)
                        .convert_to_f32_slice(&mut values[r * dim..(r + 1) * dim]);
                }
                Shard {
                    start,
                    q: quantize_rows(&values, len, dim),
                }
            })
            .collect();
        self.shards.extend(built);
    }

    pub fn len(&self) -> usize {
        self.row_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.row_of.is_empty()
    }

    /// Rows held, dead ones included.
    pub fn rows(&self) -> usize {
        self.ids.len()
    }

    /// The store version this index reflects.
    pub fn version(&self) -> u64 {
        self.version
    }

    fn doc_number(&mut self, doc: &str) -> u32 {
        if let Some(&i) = self.doc_index.get(doc) {
            return i;
        }
        let i = self.docs.len() as u32;
        self.docs.push(doc.to_string());
        self.doc_index.insert(doc.to_string(), i);
        i
    }

    /// Appends one chunk's row.
    pub fn push(&mut self, chunk_id: i64, doc: &str, embedding: &[f32]) -> Result<()> {
        if self.ids.is_empty() && self.dim == 0 {
            self.dim = embedding.len();
        }
        if embedding.len() != self.dim || self.dim == 0 {
            return Err(IndexError::Invalid(format!(
                "chunk {chunk_id} has {} dimensions, others {}",
                embedding.len(),
                self.dim
            )));
        }
        let d = self.doc_number(doc);
        let r = self.ids.len();
        let start = self.rows.extra.len();
        self.rows.extra.resize(start + self.dim, f16::ZERO);
        self.rows.extra[start..].convert_from_f32_slice(embedding);
        self.ids.push(chunk_id);
        self.row_doc.push(d);
        if let Some(old) = self.row_of.insert(chunk_id, r) {
            self.ids[old] = DEAD;
        }
        self.doc_rows.entry(d).or_default().push(r as u32);
        Ok(())
    }

    /// Marks every row of `doc` dead.
    pub fn remove_document(&mut self, doc: &str) {
        let Some(&d) = self.doc_index.get(doc) else {
            return;
        };
        for r in self.doc_rows.remove(&d).unwrap_or_default() {
            let id = self.ids[r as usize];
            if id != DEAD {
                self.row_of.remove(&id);
                self.ids[r as usize] = DEAD;
            }
        }
    }

    fn clear(&mut self) {
        *self = Self {
            dir: self.dir.take(),
            ..Self::default()
        };
    }

    /// Brings the index up to the store's version: the changed documents' rows marked dead and
    /// their current chunks appended; from nothing (or a store older than the index) everything
    /// is read.
    pub fn catch_up(&mut self, store: &dyn Store) -> Result<bool> {
        let target = store.version()?;
        if target == self.version {
            return Ok(false);
        }
        let appended_from;
        if self.version == 0 || self.version > target {
            self.clear();
            appended_from = 0;
            store.for_each_chunk(&mut |c| self.push(c.id, &c.document_id, &c.embedding))?;
        } else {
            appended_from = self.ids.len();
            let (docs, _) = store.changes_since(self.version)?;
            for doc in docs {
                self.remove_document(&doc);
                for c in store.chunks_of(&doc)? {
                    self.push(c.id, &c.document_id, &c.embedding)?;
                }
            }
        }
        self.version = target;
        let dead = self.ids.len() - self.row_of.len();
        if dead > 0 && dead * 4 >= self.ids.len() {
            self.compact();
            self.save(0)?;
            self.requantize_from(0);
        } else {
            self.save(appended_from)?;
            self.requantize_from(appended_from);
        }
        Ok(true)
    }

    /// Keeps the live rows only.
    fn compact(&mut self) {
        let dim = self.dim;
        let mut extra = Vec::with_capacity(self.row_of.len() * dim);
        let mut ids = Vec::with_capacity(self.row_of.len());
        let mut row_doc = Vec::with_capacity(self.row_of.len());
        for (r, &id) in self.ids.iter().enumerate() {
            if id != DEAD {
                extra.extend_from_slice(self.rows.row(r, dim));
                ids.push(id);
                row_doc.push(self.row_doc[r]);
            }
        }
        self.rows = Rows {
            map: None,
            mapped: 0,
            extra,
        };
        self.ids = ids;
        self.row_doc = row_doc;
        self.reindex();
    }

    /// Writes what changed to the owner's files: rows from `appended_from` appended (from 0: the
    /// file rewritten), ids and documents replaced whole, then `meta.json`; then maps the rows.
    fn save(&mut self, appended_from: usize) -> Result<()> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        let vectors_path = dir.join(VECTORS);
        let mut file = if appended_from == 0 {
            File::create(&vectors_path)
        } else {
            File::options().append(true).open(&vectors_path)
        }
        .map_err(|e| io_err(&vectors_path, e))?;
        let dim = self.dim;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, &mut file);
        for r in appended_from..self.ids.len() {
            for v in self.rows.row(r, dim) {
                out.write_all(&v.to_bits().to_le_bytes())
                    .map_err(|e| io_err(&vectors_path, e))?;
            }
        }
        out.flush().map_err(|e| io_err(&vectors_path, e))?;
        drop(out);
        file.sync_data().map_err(|e| io_err(&vectors_path, e))?;
        let write_atomic = |name: &str, data: &[u8]| -> Result<()> {
            let tmp = dir.join(format!("{name}.tmp"));
            let path = dir.join(name);
            std::fs::write(&tmp, data)
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| io_err(&path, e))
        };
        let ids: Vec<u8> = self.ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        write_atomic(IDS, &ids)?;
        let row_docs: Vec<u8> = self.row_doc.iter().flat_map(|i| i.to_le_bytes()).collect();
        write_atomic(ROW_DOCS, &row_docs)?;
        let mut docs = String::new();
        for d in &self.docs {
            docs.push_str(&serde_json::to_string(d).expect("a string serialises"));
            docs.push('\n');
        }
        write_atomic(DOCS, docs.as_bytes())?;
        let meta = Meta {
            dim: self.dim,
            rows: self.ids.len(),
            version: self.version,
        };
        write_atomic(META, &serde_json::to_vec(&meta).expect("meta serialises"))?;
        self.map_vectors(self.ids.len())
    }

    /// Exact cosine of `query` with one row (unit vectors).
    fn exact(&self, r: usize, query: &[f32]) -> f32 {
        let mut row = [0f32; 1024];
        let mut heap;
        let row: &mut [f32] = if self.dim <= row.len() {
            &mut row[..self.dim]
        } else {
            heap = vec![0f32; self.dim];
            &mut heap
        };
        self.rows.row(r, self.dim).convert_to_f32_slice(row);
        row.iter().zip(query).map(|(a, b)| a * b).sum()
    }

    /// The `k` chunks most similar to `query` (unit vectors: inner product = cosine), among
    /// `allowed` chunks when given.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        allowed: Option<&HashSet<i64>>,
    ) -> Result<Vec<(i64, f32)>> {
        Ok(self
            .search_batch(query, 1, k, allowed)?
            .pop()
            .unwrap_or_default())
    }

    /// [`DenseIndex::search`] for `nq` queries at once (`queries` row-major, `(nq, dim)`): each
    /// shard is read once for all of them.
    pub fn search_batch(
        &self,
        queries: &[f32],
        nq: usize,
        k: usize,
        allowed: Option<&HashSet<i64>>,
    ) -> Result<Vec<Vec<(i64, f32)>>> {
        if self.row_of.is_empty() || k == 0 || nq == 0 {
            return Ok(vec![Vec::new(); nq]);
        }
        if queries.len() != nq * self.dim {
            return Err(IndexError::Invalid(format!(
                "queries of {} values are not {nq} rows of {} dimensions",
                queries.len(),
                self.dim
            )));
        }
        let query = |q: usize| &queries[q * self.dim..(q + 1) * self.dim];
        let rank = |mut hits: Vec<Hit>, k: usize| {
            hits.sort_by(Hit::rank_cmp);
            hits.truncate(k);
            hits
        };
        // Few rows allowed, or no 8-bit shards: score them exactly.
        let exact_rows: Option<Vec<usize>> = match allowed {
            Some(a) if a.len() <= EXACT_BELOW => Some(
                a.iter()
                    .filter_map(|id| self.row_of.get(id).copied())
                    .collect(),
            ),
            _ if self.shards.is_empty() => Some(
                (0..self.ids.len())
                    .filter(|&r| {
                        self.ids[r] != DEAD && allowed.is_none_or(|a| a.contains(&self.ids[r]))
                    })
                    .collect(),
            ),
            _ => None,
        };
        if let Some(rows) = exact_rows {
            return Ok((0..nq)
                .map(|q| {
                    let hits = rows
                        .iter()
                        .map(|&r| Hit {
                            id: r as u32,
                            score: self.exact(r, query(q)),
                        })
                        .collect();
                    self.to_chunks(rank(hits, k))
                })
                .collect());
        }
        let candidates = 4 * k + 32;
        let live = |r: usize| {
            let id = self.ids[r];
            id != DEAD && allowed.is_none_or(|a| a.contains(&id))
        };
        // Per shard (shards in parallel): 8-bit scores, the best candidates of each query.
        let per_shard: Vec<Vec<Vec<Hit>>> = self
            .shards
            .par_iter()
            .map(|shard| {
                let n = shard.q.rows();
                let mut scores = vec![0f32; nq * n];
                shard
                    .q
                    .matmul(queries, nq, &mut scores)
                    .map_err(|e| IndexError::Invalid(e.to_string()))?;
                Ok((0..nq)
                    .map(|q| {
                        let mut top = Candidates::new(candidates);
                        for (i, &score) in scores[q * n..(q + 1) * n].iter().enumerate() {
                            if score >= top.threshold && live(shard.start + i) {
                                top.push(Hit {
                                    id: (shard.start + i) as u32,
                                    score,
                                });
                            }
                        }
                        top.into_hits()
                    })
                    .collect())
            })
            .collect::<Result<_>>()?;
        // Merge, re-score exactly, keep the best k.
        Ok((0..nq)
            .map(|q| {
                let merged: Vec<Hit> = per_shard.iter().flat_map(|s| s[q].clone()).collect();
                let exact = best(merged, candidates)
                    .into_iter()
                    .map(|h| Hit {
                        id: h.id,
                        score: self.exact(h.id as usize, query(q)),
                    })
                    .collect();
                self.to_chunks(rank(exact, k))
            })
            .collect())
    }

    fn to_chunks(&self, hits: Vec<Hit>) -> Vec<(i64, f32)> {
        hits.into_iter()
            .map(|h| (self.ids[h.id as usize], h.score))
            .collect()
    }

    /// The document of a live chunk.
    pub fn document_of(&self, chunk_id: i64) -> Option<&str> {
        let r = *self.row_of.get(&chunk_id)?;
        Some(&self.docs[self.row_doc[r] as usize])
    }

    /// Cosine of `query` with one chunk.
    pub fn score(&self, chunk_id: i64, query: &[f32]) -> Option<f32> {
        let r = *self.row_of.get(&chunk_id)?;
        (query.len() == self.dim).then(|| self.exact(r, query))
    }
}

/// The best `n` hits of a stream: hits below the `n`-th best so far are turned away with one
/// comparison; the buffer is cut back to the best `n` whenever it holds `2n`.
struct Candidates {
    n: usize,
    hits: Vec<Hit>,
    /// Scores below this cannot be among the best `n`.
    threshold: f32,
}

impl Candidates {
    fn new(n: usize) -> Self {
        Self {
            n,
            hits: Vec::with_capacity(2 * n),
            threshold: f32::NEG_INFINITY,
        }
    }

    fn push(&mut self, hit: Hit) {
        self.hits.push(hit);
        if self.hits.len() == 2 * self.n {
            self.hits = best(std::mem::take(&mut self.hits), self.n);
            self.threshold = self
                .hits
                .iter()
                .map(|h| h.score)
                .fold(f32::INFINITY, f32::min);
            self.hits.reserve(self.n);
        }
    }

    fn into_hits(self) -> Vec<Hit> {
        best(self.hits, self.n)
    }
}

/// The `n` best hits, in no particular order.
fn best(mut hits: Vec<Hit>, n: usize) -> Vec<Hit> {
    if hits.len() > n {
        hits.select_nth_unstable_by(n - 1, Hit::rank_cmp);
        hits.truncate(n);
    }
    hits
}

/// Rows `(n, dim)` as GGML Q8_0 blocks (per 32 values: an f16 scale `max|x| / 127`, then the
/// values rounded to 8 bits), repacked for the VNNI product.
fn quantize_rows(values: &[f32], n: usize, dim: usize) -> QMatrix {
    const BLOCK: usize = 32;
    let mut bytes = Vec::with_capacity(n * dim / BLOCK * 34);
    for block in values.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = f16::from_f32(amax / 127.0);
        let inv = if d.to_f32() > 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        bytes.extend_from_slice(&d.to_bits().to_le_bytes());
        bytes.extend(
            block
                .iter()
                .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
        );
    }
    QMatrix::from_ggml(candle_core::quantized::GgmlDType::Q8_0, n, dim, &bytes)
        .expect("rows of a multiple of 32 values")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::store::{DocRecord, NewChunk, SqliteStore};
    use crate::ops::rng::SplitMix64;
    use crate::ops::similarity::{compare_hits, topk_cpu};

    fn unit_rows(rng: &mut SplitMix64, n: usize, dim: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n * dim).map(|_| rng.unit() * 2.0 - 1.0).collect();
        for row in v.chunks_exact_mut(dim) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }

    #[test]
    fn the_8_bit_scan_with_re_score_finds_the_exact_top_k_across_shards() {
        let (n, dim, nq, k) = (SHARD_ROWS + 4_321, 384, 5, 10);
        let mut rng = SplitMix64::new(7);
        let corpus = unit_rows(&mut rng, n, dim);
        let queries = unit_rows(&mut rng, nq, dim);
        let mut index = DenseIndex::new();
        for (r, row) in corpus.chunks_exact(dim).enumerate() {
            index
                .push(1000 + r as i64, &format!("d{}", r / 3), row)
                .unwrap();
        }
        index.requantize_from(0);
        assert_eq!(index.shards.len(), 2);
        // The reference: exact top-k over the same f16 values.
        let stored: Vec<f16> = corpus.iter().map(|&x| f16::from_f32(x)).collect();
        let want = topk_cpu(&queries, &stored, dim, k).unwrap();
        let got = index.search_batch(&queries, nq, k, None).unwrap();
        let got: Vec<Vec<Hit>> = got
            .iter()
            .map(|hits| {
                hits.iter()
                    .map(|&(id, score)| Hit {
                        id: (id - 1000) as u32,
                        score,
                    })
                    .collect()
            })
            .collect();
        compare_hits(&got, &want, 1e-5).unwrap();
        // One query alone gives the same as in the batch.
        let one = index.search(&queries[dim..2 * dim], k, None).unwrap();
        assert_eq!(one[0].0 - 1000, want[1][0].id as i64);
        // A filter: only even chunk ids, scored exactly (few) or in the scan (many).
        for size in [500, 30_000] {
            let allowed: HashSet<i64> = (0..size).map(|i| 1000 + 2 * i).collect();
            let hits = index.search(&queries[..dim], k, Some(&allowed)).unwrap();
            assert_eq!(hits.len(), k);
            assert!(hits.iter().all(|(id, _)| allowed.contains(id)));
            let best_allowed = allowed
                .iter()
                .map(|&id| (id, index.score(id, &queries[..dim]).unwrap()))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap();
            assert_eq!(hits[0], best_allowed, "{size}");
        }
    }

    fn record(id: &str) -> DocRecord {
        let hash = format!("{id}-{}", SplitMix64::new(id.len() as u64).next_u64());
        DocRecord::bare(id, &hash)
    }

    fn chunks(rng: &mut SplitMix64, n: usize, dim: usize) -> Vec<NewChunk> {
        unit_rows(rng, n, dim)
            .chunks_exact(dim)
            .enumerate()
            .map(|(ord, v)| NewChunk::bare(ord, &format!("chunk {ord}"), v.to_vec()))
            .collect()
    }

    #[test]
    fn changes_apply_without_a_rebuild_persist_and_survive_a_torn_append() {
        let dim = 64;
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(&dir.path().join("store.sqlite")).unwrap();
        let mut rng = SplitMix64::new(3);
        for d in 0..20 {
            store
                .upsert(&record(&format!("doc{d}")), &chunks(&mut rng, 3, dim))
                .unwrap();
        }
        let folder = dir.path().join("dense");
        let mut index = DenseIndex::open(&folder).unwrap();
        assert!(index.catch_up(&store).unwrap());
        assert_eq!((index.len(), index.rows()), (60, 60));
        // Replace one document and delete another: rows marked dead, new ones appended.
        let new_chunks = chunks(&mut rng, 2, dim);
        let probe = new_chunks[1].embedding.clone();
        store.upsert(&record("doc3"), &new_chunks).unwrap();
        store.delete("doc7").unwrap();
        assert!(index.catch_up(&store).unwrap());
        assert_eq!((index.len(), index.rows()), (56, 62));
        let top = index.search(&probe, 1, None).unwrap();
        let doc3 = store.chunks_of("doc3").unwrap();
        assert_eq!(top[0].0, doc3[1].id);
        assert!((top[0].1 - 1.0).abs() < 1e-3);
        // No dead row is returned.
        for hit in index.search(&probe, 56, None).unwrap() {
            assert!(store.chunk(hit.0).unwrap().is_some(), "{hit:?}");
        }
        // Reopened: the same rows and version, no catch-up needed.
        drop(index);
        let mut index = DenseIndex::open(&folder).unwrap();
        assert_eq!((index.len(), index.rows()), (56, 62));
        assert!(!index.catch_up(&store).unwrap());
        assert_eq!(index.search(&probe, 1, None).unwrap()[0].0, doc3[1].id);
        // A torn append (rows past meta.json) is cut back at open; the change replays.
        drop(index);
        let mut f = File::options()
            .append(true)
            .open(folder.join(VECTORS))
            .unwrap();
        f.write_all(&[7u8; 100]).unwrap();
        drop(f);
        store
            .upsert(&record("doc4"), &chunks(&mut rng, 1, dim))
            .unwrap();
        let mut index = DenseIndex::open(&folder).unwrap();
        assert_eq!(index.rows(), 62);
        assert!(index.catch_up(&store).unwrap());
        assert_eq!((index.len(), index.rows()), (54, 63));
        // A quarter of the rows dead: rewritten with the live ones only.
        for d in 10..16 {
            store.delete(&format!("doc{d}")).unwrap();
        }
        index.catch_up(&store).unwrap();
        assert_eq!((index.len(), index.rows()), (36, 36));
        drop(index);
        let index = DenseIndex::open(&folder).unwrap();
        assert_eq!((index.len(), index.rows()), (36, 36));
        assert_eq!(index.search(&probe, 1, None).unwrap()[0].0, doc3[1].id);
    }

    #[test]
    fn a_width_that_is_not_a_multiple_of_32_is_searched_exactly() {
        let mut index = DenseIndex::new();
        index.push(1, "a", &[1.0, 0.0, 0.0]).unwrap();
        index.push(2, "b", &[0.0, 1.0, 0.0]).unwrap();
        index.push(3, "b", &[0.5, 0.75, 0.0]).unwrap();
        index.requantize_from(0);
        let hits = index.search(&[0.0, 1.0, 0.0], 2, None).unwrap();
        assert_eq!(hits, [(2, 1.0), (3, 0.75)]);
        index.remove_document("b");
        assert_eq!(index.search(&[0.0, 1.0, 0.0], 2, None).unwrap(), [(1, 0.0)]);
        assert!(index.push(4, "c", &[1.0]).is_err());
    }
}
