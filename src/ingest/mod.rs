//! Ingestion: files -> documents -> chunks -> embeddings (in batches) -> the store, one
//! transaction per document, so an interrupted ingest leaves each document wholly there or
//! absent. Unchanged content (same hash) is skipped; changed content replaces its chunks.

pub mod chunker;
pub mod html;
pub mod pdf;
pub mod pubmed;
pub mod reader;

use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::error::{IndexError, IngestError};
use crate::index::store::{DocRecord, NewChunk, Store};
use crate::models::bert::Embedder;
use chunker::{chunk, Chunk, ChunkOptions};
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

/// Checks that the store holds vectors of this embedder (recording it on first use).
fn check_embedder(store: &mut dyn Store, embedder: &Embedder) -> Result<(), IndexError> {
    match store.setting(EMBEDDER_KEY)? {
        Some(stored) if stored != embedder.identity() => Err(IndexError::EmbedderMismatch {
            stored,
            configured: embedder.identity().to_string(),
        }),
        Some(_) => Ok(()),
        None => store.set_setting(EMBEDDER_KEY, embedder.identity()),
    }
}

/// A document waiting for its embeddings.
struct Pending {
    record: DocRecord,
    chunks: Vec<Chunk>,
    replaces: bool,
}

fn flush(
    store: &mut dyn Store,
    embedder: &Embedder,
    pending: &mut Vec<Pending>,
    batch: usize,
    report: &mut IngestReport,
    bar: &ProgressBar,
) -> Result<(), IngestError> {
    let texts: Vec<&str> = pending
        .iter()
        .flat_map(|p| p.chunks.iter().map(|c| c.indexed_text.as_str()))
        .collect();
    let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(texts.len());
    for group in texts.chunks(batch.max(1)) {
        vectors.extend(
            embedder
                .embed(group)?
                .to_vec2::<f32>()
                .map_err(crate::error::ModelError::from)?,
        );
    }
    let mut vectors = vectors.into_iter();
    for p in pending.drain(..) {
        let chunks: Vec<NewChunk> = p
            .chunks
            .into_iter()
            .map(|c| NewChunk {
                ord: c.ord,
                section: c.section,
                text: c.text,
                indexed_text: c.indexed_text,
                start: c.range.start,
                end: c.range.end,
                embedding: vectors.next().expect("one vector per chunk"),
            })
            .collect();
        store.upsert(&p.record, &chunks)?;
        report.chunks += chunks.len();
        if p.replaces {
            report.replaced += 1;
        } else {
            report.added += 1;
        }
        bar.inc(1);
    }
    Ok(())
}

/// Ingests documents into `store`.
pub fn ingest_docs(
    store: &mut dyn Store,
    embedder: &Embedder,
    docs: Vec<SourceDoc>,
    opts: &IngestOptions,
) -> Result<IngestReport, IngestError> {
    check_embedder(store, embedder)?;
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
    let mut report = IngestReport::default();
    let mut pending: Vec<Pending> = Vec::new();
    let mut pending_chunks = 0;
    let mut seen = std::collections::HashSet::new();
    for doc in docs {
        if !seen.insert(doc.id.clone()) {
            report.failed.push((
                doc.id.clone(),
                "the same id appears twice in this ingest".into(),
            ));
            bar.inc(1);
            continue;
        }
        if doc.text.trim().is_empty() {
            report.failed.push((doc.id.clone(), "no text".into()));
            bar.inc(1);
            continue;
        }
        let hash = content_hash(&doc, &opts.chunk, embedder.identity());
        let existing = store.content_hash(&doc.id)?;
        if existing.as_deref() == Some(hash.as_str()) {
            report.unchanged += 1;
            bar.inc(1);
            continue;
        }
        let chunks = chunk(&doc, opts.chunk, embedder);
        pending_chunks += chunks.len();
        pending.push(Pending {
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
        });
        if pending_chunks >= opts.batch * 4 {
            flush(store, embedder, &mut pending, opts.batch, &mut report, &bar)?;
            pending_chunks = 0;
        }
    }
    flush(store, embedder, &mut pending, opts.batch, &mut report, &bar)?;
    bar.finish_and_clear();
    Ok(report)
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
