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

/// Embeds the pending chunks with `embedder` and stores them.
fn flush(
    store: &mut dyn Store,
    embedder: &Embedder,
    pending: &mut Vec<Pending>,
    batch_size: usize,
    batch: &mut Batch,
    bar: &ProgressBar,
) -> Result<(), IngestError> {
    let texts: Vec<&str> = pending.iter().flat_map(Pending::texts).collect();
    let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(texts.len());
    for group in texts.chunks(batch_size.max(1)) {
        vectors.extend(
            embedder
                .embed(group)?
                .to_vec2::<f32>()
                .map_err(crate::error::ModelError::from)?,
        );
    }
    let n = pending.len() as u64;
    batch.commit(store, std::mem::take(pending), vectors)?;
    bar.inc(n);
    Ok(())
}

/// Ingests documents into `store`.
pub fn ingest_docs(
    store: &mut dyn Store,
    embedder: &Embedder,
    docs: Vec<SourceDoc>,
    opts: &IngestOptions,
) -> Result<IngestReport, IngestError> {
    check_embedder(store, embedder.identity())?;
    let bar = if opts.progress {
        let b = ProgressBar::new(docs.len() as u64);
        b.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} documents ({per_sec}, eta {eta})")
                .expect("valid template"),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let mut batch = Batch::default();
    let mut pending: Vec<Pending> = Vec::new();
    let mut pending_chunks = 0;
    for doc in docs {
        match batch.prepare(store, embedder, embedder.identity(), doc, &opts.chunk)? {
            Some(p) => {
                pending_chunks += p.chunk_count();
                pending.push(p);
            }
            None => bar.inc(1),
        }
        if pending_chunks >= opts.batch * 4 {
            flush(store, embedder, &mut pending, opts.batch, &mut batch, &bar)?;
            pending_chunks = 0;
        }
    }
    flush(store, embedder, &mut pending, opts.batch, &mut batch, &bar)?;
    bar.finish_and_clear();
    Ok(batch.report)
}

/// Reads and ingests files or folders; a file that cannot be read is reported and skipped.
pub fn ingest_paths(
    store: &mut dyn Store,
    embedder: &Embedder,
    paths: &[&Path],
    opts: &IngestOptions,
) -> Result<IngestReport, IngestError> {
    let mut docs = Vec::new();
    let mut failed = Vec::new();
    for path in paths {
        for file in reader::collect_files(path)? {
            match reader::read_file(&file) {
                Ok(mut d) => docs.append(&mut d),
                Err(e) => failed.push((file.display().to_string(), e.to_string())),
            }
        }
    }
    let mut report = ingest_docs(store, embedder, docs, opts)?;
    failed.append(&mut report.failed);
    report.failed = failed;
    Ok(report)
}
