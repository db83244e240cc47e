//! Ingestion: files -> documents -> chunks -> embeddings (in batches) -> the store, one
//! transaction per document, so an interrupted ingest leaves each document wholly there or
//! absent. Unchanged content (same hash) is skipped; changed content replaces its chunks.

pub mod chunker;
pub mod html;
pub mod pdf;
pub mod pubmed;
pub mod reader;

use std::collections::HashSet;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::error::{IndexError, IngestError};
use crate::index::store::{supersedes_of, DocRecord, NewChunk, Store};
use crate::models::bert::Embedder;
use chunker::{chunk, Chunk, ChunkOptions, TokenCounter};
use reader::SourceDoc;

/// Ingestion settings.
#[derive(Clone, Copy, Debug)]
pub struct IngestOptions {
    pub chunk: ChunkOptions,
    /// Chunks embedded per forward pass.
    pub batch: usize,
    /// Show a progress bar on a terminal.
    pub progress: bool,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            chunk: ChunkOptions::default(),
            batch: 32,
            progress: false,
        }
    }
}

/// What an ingest did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IngestReport {
    pub added: usize,
    pub replaced: usize,
    pub unchanged: usize,
    pub chunks: usize,
    /// Files or documents that could not be ingested, with the reason; the rest still were.
    pub failed: Vec<(String, String)>,
}

/// Settings key of the embedder identity.
const EMBEDDER_KEY: &str = "embedder";

fn content_hash(doc: &SourceDoc, opts: &ChunkOptions, embedder: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        doc.title.as_str(),
        doc.source.as_str(),
        doc.url.as_str(),
        doc.date.as_str(),
        &serde_json::Value::Object(doc.metadata.clone()).to_string(),
        &format!(
            "{} {} {}",
            opts.max_tokens, opts.overlap_tokens, doc.markdown
        ),
        embedder,
        doc.text.as_str(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that the store holds vectors of the embedder named `identity` (recording it on first
/// use).
pub fn check_embedder(store: &mut dyn Store, identity: &str) -> Result<(), IndexError> {
    match store.setting(EMBEDDER_KEY)? {
        Some(stored) if stored != identity => Err(IndexError::EmbedderMismatch {
            stored,
            configured: identity.to_string(),
        }),
        Some(_) => Ok(()),
        None => store.set_setting(EMBEDDER_KEY, identity),
    }
}

/// A document checked and chunked, waiting for its embeddings.
pub struct Pending {
    record: DocRecord,
    chunks: Vec<Chunk>,
    replaces: bool,
}

impl Pending {
    /// What the embedder reads, one text per chunk.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.chunks.iter().map(|c| c.indexed_text.as_str())
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}

/// One ingest's bookkeeping: the report so far and the ids already taken.
#[derive(Default)]
pub struct Batch {
    pub report: IngestReport,
    seen: HashSet<String>,
}

impl Batch {
    /// Checks one document against the store and chunks it. `None` when it needs no write
    /// (unchanged) or cannot be taken (reported in `failed`: no text, an id given twice, a
    /// version it supersedes that is not there).
    pub fn prepare(
        &mut self,
        store: &dyn Store,
        counter: &dyn TokenCounter,
        identity: &str,
        doc: SourceDoc,
        opts: &ChunkOptions,
    ) -> Result<Option<Pending>, IngestError> {
        let fail = |report: &mut IngestReport, why: String| {
            report.failed.push((doc.id.clone(), why));
            Ok(None)
        };
        if self.seen.contains(&doc.id) {
            return fail(
                &mut self.report,
                "the same id appears twice in this ingest".into(),
            );
        }
        if doc.text.trim().is_empty() {
            return fail(&mut self.report, "no text".into());
        }
        for old in supersedes_of(&doc.metadata) {
            if old == doc.id {
                return fail(
                    &mut self.report,
                    "a document cannot supersede itself".into(),
                );
            }
            if !self.seen.contains(&old) && store.document(&old)?.is_none() {
                return fail(
                    &mut self.report,
                    format!("supersedes `{old}`, which is not in the store"),
                );
            }
        }
        self.seen.insert(doc.id.clone());
        let hash = content_hash(&doc, opts, identity);
        let existing = store.content_hash(&doc.id)?;
        if existing.as_deref() == Some(hash.as_str()) {
            self.report.unchanged += 1;
            return Ok(None);
        }
        let chunks = chunk(&doc, *opts, counter);
        Ok(Some(Pending {
            record: DocRecord {
                id: doc.id,
                title: doc.title,
                source: doc.source,
                url: doc.url,
                date: doc.date,
                metadata: doc.metadata,
                content_hash: hash,
            },
            chunks,
            replaces: existing.is_some(),
        }))
    }

    /// Stores prepared documents, each in its own transaction, with their vectors: one per
    /// chunk, in the order of [`Pending::texts`].
    pub fn commit(
        &mut self,
        store: &mut dyn Store,
        pending: Vec<Pending>,
        vectors: Vec<Vec<f32>>,
    ) -> Result<(), IngestError> {
        let needed: usize = pending.iter().map(Pending::chunk_count).sum();
        if vectors.len() != needed {
            return Err(IngestError::Invalid(format!(
                "{} vectors for {needed} chunks",
                vectors.len()
            )));
        }
        let mut vectors = vectors.into_iter();
        for p in pending {
            let chunks: Vec<NewChunk> = p
                .chunks
                .into_iter()
                .zip(vectors.by_ref())
                .map(|(c, embedding)| NewChunk {
                    ord: c.ord,
                    section: c.section,
                    text: c.text,
                    indexed_text: c.indexed_text,
                    start: c.range.start,
                    end: c.range.end,
                    embedding,
                })
                .collect();
            store.upsert(&p.record, &chunks)?;
            self.report.chunks += chunks.len();
            if p.replaces {
                self.report.replaced += 1;
            } else {
                self.report.added += 1;
            }
        }
        Ok(())
    }
}

/// An ingest in progress: documents checked and chunked as they come, embedded and stored in
/// batches, so memory holds one batch, not the corpus.
struct Ingest<'a> {
    store: &'a mut dyn Store,
    embedder: &'a Embedder,
    opts: &'a IngestOptions,
    batch: Batch,
    pending: Vec<Pending>,
    pending_chunks: usize,
    bar: ProgressBar,
}

impl<'a> Ingest<'a> {
    fn new(
        store: &'a mut dyn Store,
        embedder: &'a Embedder,
        opts: &'a IngestOptions,
        total: Option<usize>,
    ) -> Result<Self, IngestError> {
        check_embedder(store, embedder.identity())?;
        let bar = match (opts.progress, total) {
            (false, _) => ProgressBar::hidden(),
            (true, Some(n)) => ProgressBar::new(n as u64).with_style(
                ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} documents ({per_sec}, eta {eta})",
                )
                .expect("valid template"),
            ),
            (true, None) => ProgressBar::no_length().with_style(
                ProgressStyle::with_template("{pos} documents ({per_sec})")
                    .expect("valid template"),
            ),
        };
        Ok(Self {
            store,
            embedder,
            opts,
            batch: Batch::default(),
            pending: Vec::new(),
            pending_chunks: 0,
            bar,
        })
    }

    fn add(&mut self, doc: SourceDoc) -> Result<(), IngestError> {
        let identity = self.embedder.identity();
        match self
            .batch
            .prepare(&*self.store, self.embedder, identity, doc, &self.opts.chunk)?
        {
            Some(p) => {
                self.pending_chunks += p.chunk_count();
                self.pending.push(p);
            }
            None => self.bar.inc(1),
        }
        if self.pending_chunks >= self.opts.batch * 4 {
            self.flush()?;
        }
        Ok(())
    }

    /// Embeds the pending chunks and stores their documents.
    fn flush(&mut self) -> Result<(), IngestError> {
        let texts: Vec<&str> = self.pending.iter().flat_map(Pending::texts).collect();
        let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(texts.len());
        for group in texts.chunks(self.opts.batch.max(1)) {
            vectors.extend(
                self.embedder
                    .embed(group)?
                    .to_vec2::<f32>()
                    .map_err(crate::error::ModelError::from)?,
            );
        }
        let n = self.pending.len() as u64;
        self.batch
            .commit(self.store, std::mem::take(&mut self.pending), vectors)?;
        self.bar.inc(n);
        self.pending_chunks = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<IngestReport, IngestError> {
        self.flush()?;
        self.bar.finish_and_clear();
        Ok(self.batch.report)
    }
}

/// Ingests documents into `store`.
pub fn ingest_docs(
    store: &mut dyn Store,
    embedder: &Embedder,
    docs: Vec<SourceDoc>,
    opts: &IngestOptions,
) -> Result<IngestReport, IngestError> {
    let mut ingest = Ingest::new(store, embedder, opts, Some(docs.len()))?;
    for doc in docs {
        ingest.add(doc)?;
    }
    ingest.finish()
}

/// Reads and ingests files or folders, file by file (a large text file part by part); a file
/// that cannot be read is reported and skipped.
pub fn ingest_paths(
    store: &mut dyn Store,
    embedder: &Embedder,
    paths: &[&Path],
    opts: &IngestOptions,
) -> Result<IngestReport, IngestError> {
    let mut failed = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        files.extend(reader::collect_files(path)?);
    }
    let mut ingest = Ingest::new(store, embedder, opts, None)?;
    for file in files {
        // A read failure is this file's; a store or model failure ends the ingest.
        let mut fatal = None;
        let read = reader::for_each_doc(&file, &mut |doc| {
            ingest.add(doc).map_err(|e| {
                let why = e.to_string();
                fatal = Some(e);
                IngestError::Invalid(why)
            })
        });
        if let Some(e) = fatal {
            return Err(e);
        }
        if let Err(e) = read {
            failed.push((file.display().to_string(), e.to_string()));
        }
    }
    let mut report = ingest.finish()?;
    failed.append(&mut report.failed);
    report.failed = failed;
    Ok(report)
}
