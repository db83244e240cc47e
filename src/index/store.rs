//! The corpus store: documents, chunks, embeddings and citation metadata in one SQLite database,
//! the single source of truth. Every change gets a sequence number in `changes`, so the derived
//! indexes (BM25, dense matrix) can catch up after a restart or while another process ingests.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::{Map, Value};

use super::filter::Filter;
use crate::error::IndexError;

type Result<T> = std::result::Result<T, IndexError>;

/// Schema migrations, in order; entry `i` takes the database from version `i` to `i + 1`.
/// Released migrations never change: later versions append.
const MIGRATIONS: &[&str] = &[
    // 1: documents, chunks with embeddings, the change log, settings.
    r#"
    CREATE TABLE documents (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        source TEXT NOT NULL,
        url TEXT NOT NULL,
        date TEXT NOT NULL,
        metadata TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE chunks (
        id INTEGER PRIMARY KEY,
        document_id TEXT NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
        ord INTEGER NOT NULL,
        section TEXT NOT NULL,
        text TEXT NOT NULL,
        indexed_text TEXT NOT NULL,
        start_byte INTEGER NOT NULL,
        end_byte INTEGER NOT NULL,
        embedding BLOB NOT NULL,
        UNIQUE (document_id, ord)
    );
    CREATE INDEX chunks_by_document ON chunks(document_id);
    CREATE TABLE changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        document_id TEXT NOT NULL,
        at TEXT NOT NULL
    );
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    "#,
    // 2: indexes for metadata filters on source and date.
    r#"
    CREATE INDEX documents_by_source ON documents(source);
    CREATE INDEX documents_by_date ON documents(date);
    "#,
    // 3: versions: a document a newer one supersedes is kept but not retrieved by default.
    r#"
    ALTER TABLE documents ADD COLUMN superseded_by TEXT;
    CREATE INDEX documents_by_superseded_by ON documents(superseded_by);
    "#,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// A document's citation metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct DocRecord {
    pub id: String,
    pub title: String,
    pub source: String,
    pub url: String,
    pub date: String,
    pub metadata: Map<String, Value>,
    /// Hash of everything that produced the chunks: unchanged content is not ingested again.
    pub content_hash: String,
}

/// Metadata key by which a document names the older versions it replaces (a string or a list).
pub const SUPERSEDES: &str = "supersedes";

impl DocRecord {
    /// The ids this document supersedes.
    pub fn supersedes(&self) -> Vec<String> {
        supersedes_of(&self.metadata)
    }
}

/// The ids named by a metadata map's `supersedes`.
pub fn supersedes_of(metadata: &Map<String, Value>) -> Vec<String> {
    match metadata.get(SUPERSEDES) {
        Some(Value::String(s)) if !s.trim().is_empty() => vec![s.trim().to_string()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        _ => Vec::new(),
    }
}

/// A document as listed: its record, chunk count and the newer version superseding it.
#[derive(Clone, Debug, PartialEq)]
pub struct DocSummary {
    pub record: DocRecord,
    pub chunks: usize,
    pub superseded_by: Option<String>,
    /// Seconds since the Unix epoch of its last write.
    pub updated_at: String,
}

/// A chunk to store.
#[derive(Clone, Debug)]
pub struct NewChunk {
    pub ord: usize,
    pub section: String,
    pub text: String,
    pub indexed_text: String,
    pub start: usize,
    pub end: usize,
    pub embedding: Vec<f32>,
}

/// A stored chunk.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredChunk {
    /// Stable integer id (the dense matrix and BM25 refer to chunks by it).
    pub id: i64,
    pub document_id: String,
    pub ord: usize,
    pub section: String,
    pub text: String,
    pub indexed_text: String,
    pub start: usize,
    pub end: usize,
    pub embedding: Vec<f32>,
}

/// What a store must offer; SQLite is the one implementation, a shared database may follow.
pub trait Store: Send {
    /// The latest change's sequence number (0 for an empty store).
    fn version(&self) -> Result<u64>;
    /// Ids of documents changed (added, replaced or deleted) after `seq`, with the latest seq.
    fn changes_since(&self, seq: u64) -> Result<(Vec<String>, u64)>;
    fn content_hash(&self, id: &str) -> Result<Option<String>>;
    /// Stores a document and its chunks, replacing any earlier version, in one transaction.
    fn upsert(&mut self, doc: &DocRecord, chunks: &[NewChunk]) -> Result<u64>;
    /// Stores many documents in one transaction (bulk loads): all of them or none.
    fn upsert_many(&mut self, docs: &[(DocRecord, Vec<NewChunk>)]) -> Result<u64>;
    /// Removes a document and its chunks (what it superseded is current again); false when
    /// there was none.
    fn delete(&mut self, id: &str) -> Result<bool>;
    fn document(&self, id: &str) -> Result<Option<DocRecord>>;
    /// Documents in id order (`id`: that one only), `limit` of them from `offset`.
    fn documents(&self, id: Option<&str>, offset: usize, limit: usize) -> Result<Vec<DocSummary>>;
    /// Ids of the documents a newer version supersedes.
    fn superseded(&self) -> Result<HashSet<String>>;
    fn chunks_of(&self, id: &str) -> Result<Vec<StoredChunk>>;
    fn chunk(&self, chunk_id: i64) -> Result<Option<StoredChunk>>;
    /// Calls `f` on every chunk, in id order.
    fn for_each_chunk(&self, f: &mut dyn FnMut(StoredChunk) -> Result<()>) -> Result<()>;
    /// Ids of the chunks whose documents pass `filter`.
    fn chunks_matching(&self, filter: &Filter) -> Result<HashSet<i64>>;
    /// (documents, chunks)
    fn counts(&self) -> Result<(usize, usize)>;
    fn setting(&self, key: &str) -> Result<Option<String>>;
    fn set_setting(&mut self, key: &str, value: &str) -> Result<()>;
}

/// The SQLite store.
pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    secs.to_string()
}

fn encode(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn decode(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

const CHUNK_COLUMNS: &str =
    "id, document_id, ord, section, text, indexed_text, start_byte, end_byte, embedding";

fn chunk_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredChunk> {
    Ok(StoredChunk {
        id: r.get(0)?,
        document_id: r.get(1)?,
        ord: r.get::<_, i64>(2)? as usize,
        section: r.get(3)?,
        text: r.get(4)?,
        indexed_text: r.get(5)?,
        start: r.get::<_, i64>(6)? as usize,
        end: r.get::<_, i64>(7)? as usize,
        embedding: decode(&r.get::<_, Vec<u8>>(8)?),
    })
}

impl SqliteStore {
    /// Opens (creating and migrating as needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| IndexError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(30))?;
        // WAL lets searches read while another process ingests; FULL sync keeps every
        // committed document through a power loss.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&mut conn, path)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Applies the migrations the database lacks, each in its own transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(IndexError::NewerSchema {
            path: path.to_path_buf(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

fn log_change(tx: &Transaction<'_>, id: &str) -> Result<u64> {
    tx.execute(
        "INSERT INTO changes (document_id, at) VALUES (?1, ?2)",
        params![id, now()],
    )?;
    Ok(tx.last_insert_rowid() as u64)
}

fn write_doc(tx: &Transaction<'_>, doc: &DocRecord, chunks: &[NewChunk]) -> Result<u64> {
    tx.execute("DELETE FROM chunks WHERE document_id = ?1", [&doc.id])?;
    tx.execute(
        "INSERT INTO documents (id, title, source, url, date, metadata, content_hash, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT(id) DO UPDATE SET title = excluded.title, source = excluded.source,
           url = excluded.url, date = excluded.date, metadata = excluded.metadata,
           content_hash = excluded.content_hash, updated_at = excluded.updated_at",
        params![
            doc.id,
            doc.title,
            doc.source,
            doc.url,
            doc.date,
            Value::Object(doc.metadata.clone()).to_string(),
            doc.content_hash,
            now()
        ],
    )?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT INTO chunks (document_id, ord, section, text, indexed_text, start_byte, end_byte, embedding)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for c in chunks {
            stmt.execute(params![
                doc.id,
                c.ord as i64,
                c.section,
                c.text,
                c.indexed_text,
                c.start as i64,
                c.end as i64,
                encode(&c.embedding)
            ])?;
        }
    }
    // The versions this one replaces stay (a citation of them can still be shown) but are no
    // longer retrieved; their change makes index owners reload which documents are current.
    for old in doc.supersedes() {
        if old != doc.id
            && tx.execute(
                "UPDATE documents SET superseded_by = ?1 WHERE id = ?2",
                params![doc.id, old],
            )? > 0
        {
            log_change(tx, &old)?;
        }
    }
    log_change(tx, &doc.id)
}

fn doc_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DocRecord> {
    let meta: String = r.get(5)?;
    Ok(DocRecord {
        id: r.get(0)?,
        title: r.get(1)?,
        source: r.get(2)?,
        url: r.get(3)?,
        date: r.get(4)?,
        metadata: match serde_json::from_str(&meta) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        },
        content_hash: r.get(6)?,
    })
}

const DOC_COLUMNS: &str = "id, title, source, url, date, metadata, content_hash";

impl Store for SqliteStore {
    fn version(&self) -> Result<u64> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT MAX(seq) FROM changes", [], |r| r.get(0))?;
        Ok(v.unwrap_or(0) as u64)
    }

    fn changes_since(&self, seq: u64) -> Result<(Vec<String>, u64)> {
        let mut stmt = self.conn.prepare(
            "SELECT document_id, MAX(seq) FROM changes WHERE seq > ?1 GROUP BY document_id ORDER BY 2",
        )?;
        let rows = stmt.query_map([seq as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut ids = Vec::new();
        let mut latest = seq;
        for row in rows {
            let (id, s) = row?;
            latest = latest.max(s as u64);
            ids.push(id);
        }
        Ok((ids, latest))
    }

    fn content_hash(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT content_hash FROM documents WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn upsert(&mut self, doc: &DocRecord, chunks: &[NewChunk]) -> Result<u64> {
        let tx = self.conn.transaction()?;
        let seq = write_doc(&tx, doc, chunks)?;
        tx.commit()?;
        Ok(seq)
    }

    fn upsert_many(&mut self, docs: &[(DocRecord, Vec<NewChunk>)]) -> Result<u64> {
        let tx = self.conn.transaction()?;
        let mut seq = 0;
        for (doc, chunks) in docs {
            seq = write_doc(&tx, doc, chunks)?;
        }
        tx.commit()?;
        Ok(seq)
    }

    fn delete(&mut self, id: &str) -> Result<bool> {
        let tx = self.conn.transaction()?;
        let n = tx.execute("DELETE FROM documents WHERE id = ?1", [id])?;
        if n > 0 {
            // What it superseded is current again.
            let restored: Vec<String> = {
                let mut stmt = tx.prepare("SELECT id FROM documents WHERE superseded_by = ?1")?;
                let rows = stmt.query_map([id], |r| r.get(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            tx.execute(
                "UPDATE documents SET superseded_by = NULL WHERE superseded_by = ?1",
                [id],
            )?;
            for old in &restored {
                log_change(&tx, old)?;
            }
            log_change(&tx, id)?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    fn document(&self, id: &str) -> Result<Option<DocRecord>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {DOC_COLUMNS} FROM documents WHERE id = ?1"),
                [id],
                doc_row,
            )
            .optional()?)
    }

    fn documents(&self, id: Option<&str>, offset: usize, limit: usize) -> Result<Vec<DocSummary>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {DOC_COLUMNS}, superseded_by, updated_at,
               (SELECT COUNT(*) FROM chunks c WHERE c.document_id = d.id)
             FROM documents d WHERE ?1 IS NULL OR d.id = ?1 ORDER BY id LIMIT ?2 OFFSET ?3"
        ))?;
        let rows = stmt.query_map(params![id, limit as i64, offset as i64], |r| {
            Ok(DocSummary {
                record: doc_row(r)?,
                superseded_by: r.get(7)?,
                updated_at: r.get(8)?,
                chunks: r.get::<_, i64>(9)? as usize,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn superseded(&self) -> Result<HashSet<String>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id FROM documents WHERE superseded_by IS NOT NULL")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn chunks_of(&self, id: &str) -> Result<Vec<StoredChunk>> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {CHUNK_COLUMNS} FROM chunks WHERE document_id = ?1 ORDER BY ord"
        ))?;
        let rows = stmt.query_map([id], chunk_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn chunk(&self, chunk_id: i64) -> Result<Option<StoredChunk>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {CHUNK_COLUMNS} FROM chunks WHERE id = ?1"),
                [chunk_id],
                chunk_row,
            )
            .optional()?)
    }

    fn for_each_chunk(&self, f: &mut dyn FnMut(StoredChunk) -> Result<()>) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {CHUNK_COLUMNS} FROM chunks ORDER BY id"))?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            f(chunk_row(r)?)?;
        }
        Ok(())
    }

    fn chunks_matching(&self, filter: &Filter) -> Result<HashSet<i64>> {
        let (cond, params) = filter.to_sql();
        let mut stmt = self.conn.prepare(&format!(
            "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id WHERE {cond}"
        ))?;
        let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| r.get::<_, i64>(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn counts(&self) -> Result<(usize, usize)> {
        let docs: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM documents", [], |r| r.get(0))?;
        let chunks: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM chunks", [], |r| r.get(0))?;
        Ok((docs as usize, chunks as usize))
    }

    fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    fn set_setting(&mut self, key: &str, value: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }
}

#[cfg(test)]
impl DocRecord {
    /// A record with an id and a content hash, every other field empty (tests).
    pub(crate) fn bare(id: &str, hash: &str) -> Self {
        Self {
            id: id.into(),
            title: String::new(),
            source: String::new(),
            url: String::new(),
            date: String::new(),
            metadata: Map::new(),
            content_hash: hash.into(),
        }
    }
}

#[cfg(test)]
impl NewChunk {
    /// A chunk whose shown and indexed text are `text`, without a section (tests).
    pub(crate) fn bare(ord: usize, text: &str, embedding: Vec<f32>) -> Self {
        Self {
            ord,
            section: String::new(),
            text: text.into(),
            indexed_text: text.into(),
            start: 0,
            end: text.len(),
            embedding,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, hash: &str) -> DocRecord {
        DocRecord {
            title: format!("Title {id}"),
            source: "s".into(),
            url: "u".into(),
            date: "2026".into(),
            ..DocRecord::bare(id, hash)
        }
    }

    fn chunk(ord: usize, text: &str) -> NewChunk {
        NewChunk {
            section: "S".into(),
            ..NewChunk::bare(ord, text, vec![ord as f32, 0.5, -1.0])
        }
    }

    #[test]
    fn upsert_replace_delete_and_change_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("store.sqlite")).unwrap();
        assert_eq!(s.version().unwrap(), 0);
        let v1 = s
            .upsert(&doc("a", "h1"), &[chunk(0, "x"), chunk(1, "y")])
            .unwrap();
        s.upsert(&doc("b", "h2"), &[chunk(0, "z")]).unwrap();
        assert_eq!(s.counts().unwrap(), (2, 3));
        let v3 = s.upsert(&doc("a", "h3"), &[chunk(0, "x2")]).unwrap();
        assert_eq!(s.counts().unwrap(), (2, 2));
        assert_eq!(s.content_hash("a").unwrap().as_deref(), Some("h3"));
        let cs = s.chunks_of("a").unwrap();
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].text, "x2");
        assert_eq!(cs[0].embedding, vec![0.0, 0.5, -1.0]);
        let (ids, latest) = s.changes_since(v1).unwrap();
        assert_eq!(ids, vec!["b".to_string(), "a".to_string()]);
        assert_eq!(latest, v3);
        assert!(s.delete("a").unwrap());
        assert!(!s.delete("a").unwrap());
        assert_eq!(s.counts().unwrap(), (1, 1));
        assert!(s.chunks_of("a").unwrap().is_empty());
        assert_eq!(s.changes_since(v3).unwrap().0, vec!["a".to_string()]);
    }

    #[test]
    fn a_superseded_version_stays_until_its_successor_goes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("store.sqlite")).unwrap();
        s.upsert(&doc("v1", "h1"), &[chunk(0, "old")]).unwrap();
        let mut v2 = doc("v2", "h2");
        v2.metadata
            .insert(SUPERSEDES.into(), Value::String("v1".into()));
        let before = s.version().unwrap();
        s.upsert(&v2, &[chunk(0, "new")]).unwrap();
        assert_eq!(s.superseded().unwrap(), HashSet::from(["v1".to_string()]));
        // Index owners hear of both documents.
        let (ids, _) = s.changes_since(before).unwrap();
        assert!(ids.contains(&"v1".to_string()) && ids.contains(&"v2".to_string()));
        // Re-ingesting the old version keeps it superseded; it is listed with its successor.
        s.upsert(&doc("v1", "h1b"), &[chunk(0, "old again")])
            .unwrap();
        let listed = s.documents(Some("v1"), 0, 10).unwrap();
        assert_eq!(listed[0].superseded_by.as_deref(), Some("v2"));
        assert_eq!(listed[0].chunks, 1);
        assert_eq!(s.documents(None, 0, 10).unwrap().len(), 2);
        assert_eq!(s.documents(None, 1, 10).unwrap()[0].record.id, "v2");
        // The filter query leaves it out unless asked.
        let all = Filter::from_json(&serde_json::json!({"source": "s"})).unwrap();
        assert_eq!(s.chunks_matching(&all).unwrap().len(), 1);
        assert!(s.delete("v2").unwrap());
        assert!(s.superseded().unwrap().is_empty());
        assert_eq!(s.chunks_matching(&all).unwrap().len(), 1);
        assert_eq!(s.chunks_of("v1").unwrap()[0].text, "old again");
    }

    #[test]
    fn reopening_keeps_everything_and_refuses_newer_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite");
        {
            let mut s = SqliteStore::open(&path).unwrap();
            s.upsert(&doc("a", "h"), &[chunk(0, "x")]).unwrap();
            s.set_setting("embedder", "m").unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.counts().unwrap(), (1, 1));
        assert_eq!(s.setting("embedder").unwrap().as_deref(), Some("m"));
        drop(s);
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let err = SqliteStore::open(&path).err().unwrap();
        assert!(matches!(err, IndexError::NewerSchema { .. }), "{err}");
    }

    fn schema_version(s: &SqliteStore) -> i64 {
        s.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn migrates_an_empty_database_from_version_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite");
        Connection::open(&path).unwrap();
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(schema_version(&s), SCHEMA_VERSION);
    }

    #[test]
    fn migrates_a_version_one_store_keeping_its_documents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite");
        {
            // A store as the first release wrote it.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO documents VALUES ('a', 'T', 'NCI', 'u', '2024-01-02', '{\"tag\":\"x\"}', 'h', 'now')",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO chunks (document_id, ord, section, text, indexed_text, start_byte, end_byte, embedding)
                 VALUES ('a', 0, 'S', 'text', 'text', 0, 4, ?1)",
                [encode(&[1.0, 2.0])],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO changes (document_id, at) VALUES ('a', 'now')",
                [],
            )
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(schema_version(&s), SCHEMA_VERSION);
        assert_eq!(s.counts().unwrap(), (1, 1));
        assert_eq!(s.version().unwrap(), 1);
        assert_eq!(s.chunks_of("a").unwrap()[0].embedding, vec![1.0, 2.0]);
        let by_tag = Filter::from_json(&serde_json::json!({"tag": "x"})).unwrap();
        assert_eq!(s.chunks_matching(&by_tag).unwrap().len(), 1);
    }

    #[test]
    fn filters_select_chunks_by_source_date_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SqliteStore::open(&dir.path().join("store.sqlite")).unwrap();
        let mut add = |id: &str, source: &str, date: &str, meta: serde_json::Value| {
            let mut d = doc(id, "h");
            d.source = source.into();
            d.date = date.into();
            d.metadata = meta.as_object().unwrap().clone();
            s.upsert(&d, &[chunk(0, id), chunk(1, id)]).unwrap();
        };
        add(
            "a",
            "NCI",
            "2019-06-01",
            serde_json::json!({"cancer": "sarcoma", "level": 1}),
        );
        add(
            "b",
            "ESMO",
            "2021-09-15",
            serde_json::json!({"cancer": ["sarcoma", "gist"]}),
        );
        add(
            "c",
            "NCI",
            "",
            serde_json::json!({"cancer": "breast", "peer_reviewed": true}),
        );
        let docs = |f: serde_json::Value| -> Vec<String> {
            let ids = s.chunks_matching(&Filter::from_json(&f).unwrap()).unwrap();
            let mut docs: Vec<String> = ids
                .into_iter()
                .map(|c| s.chunk(c).unwrap().unwrap().document_id)
                .collect();
            docs.sort();
            docs.dedup();
            docs
        };
        assert_eq!(docs(serde_json::json!({})), ["a", "b", "c"]);
        assert_eq!(docs(serde_json::json!({"source": "NCI"})), ["a", "c"]);
        assert_eq!(docs(serde_json::json!({"cancer": "gist"})), ["b"]);
        assert_eq!(docs(serde_json::json!({"cancer": ["sarcoma"]})), ["a", "b"]);
        assert_eq!(docs(serde_json::json!({"level": 1})), ["a"]);
        assert_eq!(docs(serde_json::json!({"peer_reviewed": true})), ["c"]);
        assert_eq!(docs(serde_json::json!({"date_from": "2020"})), ["b"]);
        assert_eq!(docs(serde_json::json!({"date_to": "2019"})), ["a"]);
        assert_eq!(
            docs(serde_json::json!({"date_from": "2019-01-01", "date_to": "2021-09-15"})),
            ["a", "b"]
        );
        assert!(docs(serde_json::json!({"source": "NCI", "cancer": "gist"})).is_empty());
        assert!(docs(serde_json::json!({"missing": "x"})).is_empty());
    }
}
