//! Corpus administration over HTTP: `POST /v1/documents` (add or update, in Markdown, text,
//! HTML, PubMed XML or PDF), `GET /v1/documents[/{id}]`, `DELETE /v1/documents/{id}`.
//!
//! The same store and rules as `cited ingest`: one transaction per document, unchanged content
//! skipped, the embedder's identity checked, and one writer at a time (HTTP ingests queue on one
//! lock; SQLite serialises them with any CLI ingest). A document may name the versions it
//! `supersedes`: they stay in the store, are listed with `superseded_by`, and are no longer
//! retrieved unless a search asks for `include_superseded`. Deleting the newer version makes the
//! older current again. Writes need the administrator token (`--admin-token`); without one
//! configured they are refused.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::{ApiError, ApiJson};
use super::AppState;
use crate::index::store::{DocSummary, Store, SUPERSEDES};
use crate::ingest::chunker::ChunkOptions;
use crate::ingest::reader::{from_fields, SourceDoc};
use crate::ingest::{check_embedder, html, pdf, pubmed, Batch, IngestReport, Pending};

/// Largest body of a document upload (a PDF travels base64-encoded, a third larger).
pub const MAX_UPLOAD_BYTES: usize = 64 << 20;
/// Documents per upload.
pub const MAX_DOCUMENTS: usize = 256;
/// Chunks embedded per call to the engine (other requests' embeddings interleave).
const EMBED_GROUP: usize = 32;
/// Listing page size, default and most.
const LIST_DEFAULT: usize = 100;
const LIST_MAX: usize = 1000;

/// The format of an uploaded document.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Markdown,
    Text,
    Html,
    Pubmed,
    Pdf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadBody {
    documents: Vec<DocumentBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentBody {
    /// Required except for PubMed XML (each article's PMID is its id).
    id: Option<String>,
    format: Option<Format>,
    /// The content, for every format but PDF.
    text: Option<String>,
    /// The content as base64 (PDF; any other format may use it too).
    content_base64: Option<String>,
    title: Option<String>,
    source: Option<String>,
    url: Option<String>,
    date: Option<String>,
    metadata: Option<Map<String, Value>>,
    /// The id (or ids) of the older versions this document replaces.
    supersedes: Option<Value>,
}

/// Checks the administrator token of a write.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let services = state.services()?;
    let Some(token) = services.admin_token.as_deref() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_disabled",
            "document administration is off on this server (start it with --admin-token)",
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the administrator token does not match",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "document writes need `Authorization: Bearer <administrator token>`",
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The documents one upload entry yields, or why it cannot be read.
fn read_entry(i: usize, d: DocumentBody) -> Result<Vec<SourceDoc>, (String, String)> {
    let name = d.id.clone().unwrap_or_else(|| format!("documents[{i}]"));
    let fail = |why: String| (name.clone(), why);
    let format = d.format.unwrap_or(Format::Markdown);
    let bytes = match (&d.text, &d.content_base64) {
        (Some(_), Some(_)) => return Err(fail("give `text` or `content_base64`, not both".into())),
        (None, None) => return Err(fail("`text` or `content_base64` is required".into())),
        (Some(t), None) => t.clone().into_bytes(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .map_err(|e| fail(format!("`content_base64` is not base64: {e}")))?,
    };
    let id = match (&d.id, format) {
        (Some(id), _) if id.trim().is_empty() || id.len() > 512 => {
            return Err(fail("`id` must be 1 to 512 characters".into()))
        }
        (Some(id), _) => id.clone(),
        (None, Format::Pubmed) => String::new(),
        (None, _) => return Err(fail("`id` is required".into())),
    };
    let text = || {
        String::from_utf8(bytes.clone()).map_err(|_| fail("the content is not UTF-8 text".into()))
    };
    let mut docs = match format {
        Format::Markdown | Format::Text => vec![from_fields(
            id.clone(),
            Map::new(),
            text()?,
            format == Format::Markdown,
            &id,
        )],
        Format::Html => vec![html::parse_html(&text()?, &id, &id)],
        Format::Pubmed => pubmed::parse_pubmed(&text()?).map_err(fail)?,
        Format::Pdf => vec![pdf::parse_pdf(&bytes, &id, &id).map_err(fail)?],
    };
    if docs.is_empty() {
        return Err(fail("no document in the content".into()));
    }
    let supersedes = match d.supersedes {
        None | Some(Value::Null) => None,
        Some(v @ Value::String(_)) => Some(v),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => {
            Some(Value::Array(items))
        }
        Some(_) => return Err(fail("`supersedes` must be an id or a list of ids".into())),
    };
    if supersedes.is_some() && docs.len() > 1 {
        return Err(fail(
            "`supersedes` names one document's older versions; this content holds several".into(),
        ));
    }
    for doc in &mut docs {
        if let Some(meta) = &d.metadata {
            for (k, v) in meta {
                doc.metadata.insert(k.clone(), v.clone());
            }
        }
        if let Some(s) = &supersedes {
            doc.metadata.insert(SUPERSEDES.into(), s.clone());
        }
        let set = |field: &mut String, value: &Option<String>| {
            if let Some(v) = value {
                *field = v.clone();
            }
        };
        set(&mut doc.title, &d.title);
        set(&mut doc.source, &d.source);
        set(&mut doc.url, &d.url);
        set(&mut doc.date, &d.date);
    }
    Ok(docs)
}

/// `POST /v1/documents`: adds or updates documents; 200 with the ingest report when any was
/// stored or already there, 422 when none could be.
pub async fn upload(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<UploadBody>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let services = state.services()?;
    if body.documents.is_empty() || body.documents.len() > MAX_DOCUMENTS {
        return Err(ApiError::invalid(
            "documents",
            format!("between 1 and {MAX_DOCUMENTS} documents are accepted"),
        ));
    }
    let mut unreadable = Vec::new();
    let mut docs = Vec::new();
    for (i, d) in body.documents.into_iter().enumerate() {
        match read_entry(i, d) {
            Ok(mut read) => docs.append(&mut read),
            Err(failed) => unreadable.push(failed),
        }
    }
    // One HTTP writer at a time, from the first read of the store to the last write.
    let _writer = services.ingest_lock.lock().await;
    let text = services.embedder_text.clone();
    let opts = ChunkOptions {
        max_tokens: text.max_tokens(),
        ..ChunkOptions::default()
    };
    let corpus = services.corpus.clone();
    let (mut batch, pending) = tokio::task::spawn_blocking(move || {
        let mut corpus = corpus.lock().unwrap_or_else(|p| p.into_inner());
        check_embedder(corpus.store_mut(), text.identity())?;
        let mut batch = Batch::default();
        let mut pending = Vec::new();
        for doc in docs {
            if let Some(p) = batch.prepare(corpus.store(), &text, text.identity(), doc, &opts)? {
                pending.push(p);
            }
        }
        Ok::<_, crate::error::IngestError>((batch, pending))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ingest_error)?;
    let texts: Vec<String> = pending
        .iter()
        .flat_map(Pending::texts)
        .map(str::to_string)
        .collect();
    let mut vectors = Vec::with_capacity(texts.len());
    for group in texts.chunks(EMBED_GROUP) {
        vectors.extend(
            services
                .pipeline
                .engine()
                .embed(group.to_vec())
                .await?
                .vectors,
        );
    }
    let corpus = services.corpus.clone();
    let (mut report, version) = tokio::task::spawn_blocking(move || {
        let mut corpus = corpus.lock().unwrap_or_else(|p| p.into_inner());
        batch.commit(corpus.store_mut(), pending, vectors)?;
        let version = corpus.store().version()?;
        Ok::<_, crate::error::IngestError>((batch.report, version))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ingest_error)?;
    // Unreadable entries first, in upload order, then what the ingest refused.
    unreadable.append(&mut report.failed);
    report.failed = unreadable;
    if report.added + report.replaced + report.unchanged == 0 {
        let reasons: Vec<String> = report
            .failed
            .iter()
            .map(|(id, why)| format!("{id}: {why}"))
            .collect();
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_documents",
            format!("no document was stored: {}", reasons.join("; ")),
        ));
    }
    Ok(Json(report_json(&report, version)))
}

fn report_json(r: &IngestReport, version: u64) -> Value {
    json!({
        "added": r.added,
        "replaced": r.replaced,
        "unchanged": r.unchanged,
        "chunks": r.chunks,
        "failed": r.failed.iter().map(|(id, why)| json!({"id": id, "error": why})).collect::<Vec<_>>(),
        "corpus_version": version,
    })
}

fn ingest_error(e: crate::error::IngestError) -> ApiError {
    match e {
        crate::error::IngestError::Index(crate::error::IndexError::EmbedderMismatch { .. }) => {
            ApiError::new(StatusCode::CONFLICT, "embedder_mismatch", e.to_string())
        }
        other => ApiError::internal(other),
    }
}

fn summary_json(d: &DocSummary) -> Value {
    let mut metadata = d.record.metadata.clone();
    // Page offsets are for citing; the count says enough here.
    metadata.remove(pdf::PAGE_STARTS);
    json!({
        "id": d.record.id,
        "title": d.record.title,
        "source": d.record.source,
        "url": d.record.url,
        "date": d.record.date,
        "metadata": metadata,
        "chunks": d.chunks,
        "superseded_by": d.superseded_by,
        "updated_at": d.updated_at.parse::<u64>().ok(),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    offset: Option<usize>,
    limit: Option<usize>,
}

/// `GET /v1/documents?offset=&limit=`: documents in id order.
pub async fn list(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let services = state.services()?;
    let Query(q) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let limit = q.limit.unwrap_or(LIST_DEFAULT);
    if !(1..=LIST_MAX).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be between 1 and {LIST_MAX}"),
        ));
    }
    let offset = q.offset.unwrap_or(0);
    let corpus = services.corpus.clone();
    let (docs, total) = tokio::task::spawn_blocking(move || {
        let corpus = corpus.lock().unwrap_or_else(|p| p.into_inner());
        let docs = corpus.store().documents(None, offset, limit)?;
        let (total, _) = corpus.store().counts()?;
        Ok::<_, crate::error::IndexError>((docs, total))
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(json!({
        "total": total,
        "offset": offset,
        "documents": docs.iter().map(summary_json).collect::<Vec<_>>(),
    })))
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "document_not_found",
        format!("no document with id `{id}`"),
    )
}

/// `GET /v1/documents/{id}`: one document's record, with its chunks' sections and pages.
pub async fn get_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let services = state.services()?;
    let corpus = services.corpus.clone();
    let key = id.clone();
    let found = tokio::task::spawn_blocking(move || {
        let corpus = corpus.lock().unwrap_or_else(|p| p.into_inner());
        let Some(doc) = corpus.store().documents(Some(&key), 0, 1)?.pop() else {
            return Ok(None);
        };
        let chunks = corpus.store().chunks_of(&key)?;
        Ok::<_, crate::error::IndexError>(Some((doc, chunks)))
    })
    .await
    .map_err(ApiError::internal)??;
    let Some((doc, chunks)) = found else {
        return Err(not_found(&id));
    };
    let mut out = summary_json(&doc);
    out["passages"] = chunks
        .iter()
        .map(|c| {
            json!({
                "chunk_id": format!("{}#{}", c.document_id, c.ord),
                "section": c.section,
                "page": pdf::page_of(&doc.record.metadata, c.start),
                "start": c.start,
                "end": c.end,
                "text": c.text,
            })
        })
        .collect();
    Ok(Json(out))
}

/// `DELETE /v1/documents/{id}`: removes a document and its chunks; what it superseded is
/// current again.
pub async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let services = state.services()?;
    let _writer = services.ingest_lock.lock().await;
    let corpus = services.corpus.clone();
    let key = id.clone();
    let (deleted, version) = tokio::task::spawn_blocking(move || {
        let mut corpus = corpus.lock().unwrap_or_else(|p| p.into_inner());
        let deleted = corpus.store_mut().delete(&key)?;
        Ok::<_, crate::error::IndexError>((deleted, corpus.store().version()?))
    })
    .await
    .map_err(ApiError::internal)??;
    if !deleted {
        return Err(not_found(&id));
    }
    Ok(Json(
        json!({"id": id, "deleted": true, "corpus_version": version}),
    ))
}
