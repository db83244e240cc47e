//! The corpus: the SQLite store (the one source of truth) and the indexes derived from it, dense
//! and BM25, fused into hybrid search with hits collapsed to one per passage.
//!
//! Who writes: any process may add or delete documents in the store (SQLite serialises writers,
//! WAL lets readers go on). The derived indexes belong to the process that holds
//! `<data-dir>/index.lock`, normally the server: it keeps the BM25 index on disk and, before each
//! search, catches up with the store's change log, so documents ingested by `cited ingest` while
//! it runs are searchable at its next query. A process that cannot take the lock (a CLI search
//! while a server runs) builds its BM25 index in memory from the store instead of waiting.

pub mod bm25;
pub mod dedup;
pub mod dense;
pub mod filter;
pub mod fusion;
pub mod store;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use bm25::Bm25Index;
use dense::DenseIndex;
use filter::Filter;
use store::{SqliteStore, Store};

use crate::error::IndexError;

type Result<T> = std::result::Result<T, IndexError>;

/// The owner's BM25 index folder in the data directory (named by its format).
pub const BM25_DIR: &str = "bm25-v3";
/// The owner's dense matrix folder.
pub const DENSE_DIR: &str = "dense-v1";

/// Which retrievers a search uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Dense,
    Bm25,
    #[default]
    Hybrid,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "dense" => Ok(Self::Dense),
            "bm25" => Ok(Self::Bm25),
            "hybrid" => Ok(Self::Hybrid),
            other => Err(format!("unknown mode `{other}` (dense | bm25 | hybrid)")),
        }
    }
}

/// Search settings. The default fusion (convex, dense share 0.8) had the best mean nDCG@10 over
/// the dev halves of MedQuAD and PubMedQA among the settings `cited eval retrieval --tune`
/// searches, and is reported on their held-out halves (BENCHMARKS.md): dense is the stronger
/// retriever, BM25 adds exact terms.
#[derive(Clone, Copy, Debug)]
pub struct SearchOptions {
    pub top_k: usize,
    pub mode: Mode,
    /// Chunks each retriever contributes before passages are collapsed and fused.
    pub depth: usize,
    /// How hybrid mode fuses the two rankings.
    pub fusion: Fusion,
    /// The k of reciprocal-rank fusion.
    pub rrf_k: f32,
    pub dense_weight: f32,
    pub bm25_weight: f32,
    /// Convex fusion: the dense score's share (BM25's is the rest).
    pub dense_share: f32,
}

/// Fusion of the dense and BM25 rankings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Fusion {
    /// Reciprocal rank: `weight / (k + rank)` summed over the retrievers.
    #[default]
    Rrf,
    /// A convex combination of the scores, each divided by its retriever's best (a passage one
    /// retriever did not return counts 0 there).
    Convex,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self {
            top_k: 10,
            mode: Mode::Hybrid,
            depth: 100,
            fusion: Fusion::Convex,
            rrf_k: 60.0,
            dense_weight: 1.5,
            bm25_weight: 1.0,
            dense_share: 0.8,
        }
    }
}

/// One passage found, with the chunk that matched best and everything needed to cite it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SearchHit {
    /// The passage (document) id given at ingest.
    pub id: String,
    /// `<id>#<chunk position>`.
    pub chunk_id: String,
    /// The fused score (hybrid) or the retriever's own score.
    pub score: f32,
    /// Raw cosine of the query with this chunk.
    pub dense_score: f32,
    /// Raw BM25 score of this chunk, when BM25 retrieved it.
    pub bm25_score: Option<f32>,
    pub title: String,
    pub section: String,
    pub url: String,
    pub date: String,
    pub source: String,
    pub text: String,
    /// Byte range of the chunk in the document text.
    pub start: usize,
    pub end: usize,
    /// The page the chunk starts on (paged documents: PDFs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<u32>,
    /// The page it ends on, when it runs onto a later page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page_end: Option<u32>,
}

/// Each retriever's ranking of passages for one query: (passage, its best chunk, the
/// retriever's score), best first.
#[derive(Clone, Debug, Default)]
pub struct Legs {
    pub dense: Vec<(String, i64, f32)>,
    pub bm25: Vec<(String, i64, f32)>,
    /// BM25's chunks before collapsing, for the raw score of a hit's chunk.
    pub bm25_chunks: Vec<(i64, f32)>,
}

impl Legs {
    /// Passages by the mode's score, best first: one retriever's own, or fused by reciprocal
    /// rank with `opts`' k and weights.
    pub fn fuse(&self, opts: &SearchOptions) -> Vec<(String, f32)> {
        let own =
            |leg: &[(String, i64, f32)]| leg.iter().map(|(p, _, s)| (p.clone(), *s)).collect();
        match opts.mode {
            Mode::Dense => own(&self.dense),
            Mode::Bm25 => own(&self.bm25),
            Mode::Hybrid if opts.fusion == Fusion::Convex => {
                let scored = |leg: &[(String, i64, f32)]| -> Vec<(String, f32)> {
                    leg.iter().map(|(p, _, s)| (p.clone(), *s)).collect()
                };
                fusion::convex(&[
                    (&scored(&self.dense), opts.dense_share),
                    (&scored(&self.bm25), 1.0 - opts.dense_share),
                ])
            }
            Mode::Hybrid => {
                let ids = |leg: &[(String, i64, f32)]| -> Vec<String> {
                    leg.iter().map(|(p, _, _)| p.clone()).collect()
                };
                fusion::rrf(
                    &[
                        (&ids(&self.dense), opts.dense_weight),
                        (&ids(&self.bm25), opts.bm25_weight),
                    ],
                    opts.rrf_k,
                )
            }
        }
    }
}

/// The store with its derived indexes.
pub struct Corpus {
    store: SqliteStore,
    bm25: Bm25Index,
    dense: DenseIndex,
    /// Documents a newer version supersedes, as of store version `superseded_at`.
    superseded: std::collections::HashSet<String>,
    superseded_at: Option<u64>,
    /// Held while this process owns the on-disk indexes.
    _lock: Option<File>,
    data_dir: PathBuf,
}

impl Corpus {
    /// Opens the corpus in `data_dir` (created if needed) and brings the indexes up to date.
    pub fn open(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir).map_err(|source| IndexError::Io {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let store = SqliteStore::open(&data_dir.join("store.sqlite"))?;
        let lock_path = data_dir.join("index.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| IndexError::Io {
                path: lock_path.clone(),
                source,
            })?;
        let owner = lock.try_lock().is_ok();
        let bm25 = if owner {
            // The first format (stemmed terms, tantivy's scoring) is rebuilt under a new name.
            let _ = std::fs::remove_dir_all(data_dir.join("bm25"));
            Bm25Index::open(Some(&data_dir.join(BM25_DIR)))?
        } else {
            Bm25Index::open(None)?
        };
        let mut corpus = Self {
            store,
            bm25,
            dense: if owner {
                DenseIndex::open(&data_dir.join(DENSE_DIR))?
            } else {
                DenseIndex::new()
            },
            superseded: Default::default(),
            superseded_at: None,
            _lock: owner.then_some(lock),
            data_dir: data_dir.to_path_buf(),
        };
        corpus.refresh()?;
        Ok(corpus)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether this process owns the on-disk indexes.
    pub fn owns_indexes(&self) -> bool {
        self._lock.is_some()
    }

    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut SqliteStore {
        &mut self.store
    }

    /// The store version the indexes reflect (the corpus version reported with answers).
    pub fn version(&self) -> u64 {
        self.bm25.version()
    }

    /// Catches the indexes up with the store (documents another process added or deleted).
    pub fn refresh(&mut self) -> Result<()> {
        self.bm25.catch_up(&self.store)?;
        self.dense.catch_up(&self.store)?;
        let version = self.bm25.version();
        if self.superseded_at != Some(version) {
            self.superseded = self.store.superseded()?;
            self.superseded_at = Some(version);
        }
        Ok(())
    }

    /// Words of `text` (four or more letters) that no chunk contains in any form: what the
    /// corpus has never mentioned.
    pub fn unknown_words(&mut self, text: &str) -> Result<Vec<String>> {
        self.refresh()?;
        let mut out = Vec::new();
        for word in text.split(|c: char| !c.is_alphanumeric() && c != '-') {
            let word = word.trim_matches('-');
            if word.chars().filter(|c| c.is_alphabetic()).count() < 4 {
                continue;
            }
            let terms = bm25::terms(word);
            if terms.is_empty() {
                continue;
            }
            let mut seen = false;
            for t in &terms {
                if self.bm25.doc_freq(t)? > 0 {
                    seen = true;
                    break;
                }
            }
            if !seen && !out.iter().any(|w: &String| w.eq_ignore_ascii_case(word)) {
                out.push(word.to_string());
            }
        }
        Ok(out)
    }

    /// Searches with `query` (its text for BM25, `embedding` for dense): passages best first,
    /// one hit per passage.
    pub fn search(
        &mut self,
        query: &str,
        embedding: &[f32],
        opts: &SearchOptions,
    ) -> Result<Vec<SearchHit>> {
        self.search_filtered(query, embedding, opts, &Filter::default())
    }

    /// Each retriever's passages for a query (the dense leg unless `mode` is BM25, the BM25 leg
    /// unless it is dense), `depth` chunks deep, among the documents that pass `filter`.
    pub fn legs(
        &mut self,
        query: &str,
        embedding: &[f32],
        depth: usize,
        mode: Mode,
        filter: &Filter,
    ) -> Result<Legs> {
        self.refresh()?;
        let allowed = if filter.is_empty() {
            None
        } else {
            let chunks = self.store.chunks_matching(filter)?;
            if chunks.is_empty() {
                return Ok(Legs::default());
            }
            Some(chunks)
        };
        let dense = if mode == Mode::Bm25 {
            Vec::new()
        } else {
            self.dense.search(embedding, depth, allowed.as_ref())?
        };
        let bm25 = if mode == Mode::Dense {
            Vec::new()
        } else {
            self.bm25.search(query, depth, allowed.as_ref())?
        };
        // Chunk -> passage (the dense index holds every chunk's document; the store only for a
        // chunk it lacks), keeping each passage's best chunk per retriever.
        let mut passage_of: HashMap<i64, String> = HashMap::new();
        for &(c, _) in dense.iter().chain(&bm25) {
            if let std::collections::hash_map::Entry::Vacant(e) = passage_of.entry(c) {
                if let Some(doc) = self.dense.document_of(c) {
                    e.insert(doc.to_string());
                } else if let Some(chunk) = self.store.chunk(c)? {
                    e.insert(chunk.document_id);
                }
            }
        }
        // Superseded versions drop out here too when no filter query ran.
        let current = |p: &String| filter.include_superseded || !self.superseded.contains(p);
        let collapse = |hits: &[(i64, f32)]| -> Vec<(String, i64, f32)> {
            let mut seen = std::collections::HashSet::new();
            let mut out = Vec::new();
            for &(c, s) in hits {
                if let Some(p) = passage_of.get(&c).filter(|p| current(p)) {
                    if seen.insert(p.clone()) {
                        out.push((p.clone(), c, s));
                    }
                }
            }
            out
        };
        Ok(Legs {
            dense: collapse(&dense),
            bm25: collapse(&bm25),
            bm25_chunks: bm25,
        })
    }

    /// [`Corpus::search`] among the documents that pass `filter`.
    pub fn search_filtered(
        &mut self,
        query: &str,
        embedding: &[f32],
        opts: &SearchOptions,
        filter: &Filter,
    ) -> Result<Vec<SearchHit>> {
        let depth = opts.depth.max(opts.top_k);
        let legs = self.legs(query, embedding, depth, opts.mode, filter)?;
        let ranked = legs.fuse(opts);
        let best_chunk = |passage: &str| {
            legs.dense
                .iter()
                .chain(&legs.bm25)
                .find(|(p, _, _)| p == passage)
                .map(|&(_, c, _)| c)
        };
        let mut hits = Vec::with_capacity(opts.top_k);
        for (passage, score) in ranked.into_iter().take(opts.top_k) {
            // The chunk shown: the dense retriever's best, else BM25's.
            let chunk_id = best_chunk(&passage).expect("a ranked passage came from a retriever");
            let (Some(chunk), Some(doc)) =
                (self.store.chunk(chunk_id)?, self.store.document(&passage)?)
            else {
                continue;
            };
            let bm25_score = legs
                .bm25_chunks
                .iter()
                .find(|(c, _)| *c == chunk_id)
                .map(|&(_, s)| s);
            let page = crate::ingest::pdf::page_of(&doc.metadata, chunk.start);
            let page_end = crate::ingest::pdf::page_of(&doc.metadata, chunk.end.saturating_sub(1))
                .filter(|&last| Some(last) != page);
            hits.push(SearchHit {
                chunk_id: format!("{}#{}", doc.id, chunk.ord),
                id: doc.id,
                score,
                dense_score: self.dense.score(chunk_id, embedding).unwrap_or(0.0),
                bm25_score,
                title: doc.title,
                section: chunk.section,
                url: doc.url,
                date: doc.date,
                source: doc.source,
                text: chunk.text,
                start: chunk.start,
                end: chunk.end,
                page,
                page_end,
            });
        }
        Ok(hits)
    }
}
