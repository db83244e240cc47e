//! BM25 over chunks with tantivy, derived from the store. The analyzer keeps biomedical terms
//! whole (`PD-L1`, `HER2`, `BRCA1/2`, `t(12;16)`, `2,225`) and also emits their parts, so a query
//! written either way matches; then lower case, English stop words, English stemming.

use std::path::Path;

use tantivy::collector::TopDocs;
use tantivy::query::{BooleanQuery, ConstScoreQuery, Occur, Query, TermQuery, TermSetQuery};
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, Value, FAST, INDEXED, STORED,
    STRING,
};
use tantivy::tokenizer::{
    Language, LowerCaser, Stemmer, StopWordFilter, TextAnalyzer, Token, TokenStream, Tokenizer,
};
use tantivy::{doc, Index, IndexReader, IndexWriter, ReloadPolicy, TantivyDocument, Term};

use super::store::{Store, StoredChunk};
use crate::error::IndexError;

type Result<T> = std::result::Result<T, IndexError>;

const ANALYZER: &str = "cited_bio";
const WRITER_MEMORY: usize = 50_000_000;

/// Splits text into terms: compounds joined by `-`, `/`, `.`, `,` (between digits), and
/// chromosome translocations, emitted whole and, when compound, followed by their parts.
#[derive(Clone, Default)]
pub struct BioTokenizer;

pub struct BioTokenStream {
    tokens: Vec<Token>,
    index: usize,
}

impl TokenStream for BioTokenStream {
    fn advance(&mut self) -> bool {
        if self.index < self.tokens.len() {
            self.index += 1;
            true
        } else {
            false
        }
    }

    fn token(&self) -> &Token {
        &self.tokens[self.index - 1]
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.tokens[self.index - 1]
    }
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric()
}

/// Length in bytes of a translocation such as `t(12;16)` or `t(12;16)(q13;p11)` at the start of
/// `s`, if there is one.
fn translocation(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if b.len() < 6 || !(b[0] == b't' || b[0] == b'T') || b[1] != b'(' {
        return None;
    }
    let group = |from: usize| -> Option<usize> {
        // "(" part ";" part ")" where parts are [0-9pqXY.]+
        if b.get(from) != Some(&b'(') {
            return None;
        }
        let mut i = from + 1;
        let part = |i: &mut usize| {
            let start = *i;
            while *i < b.len() && (b[*i].is_ascii_alphanumeric() || b[*i] == b'.') {
                *i += 1;
            }
            *i > start
        };
        if !part(&mut i) || b.get(i) != Some(&b';') {
            return None;
        }
        i += 1;
        if !part(&mut i) || b.get(i) != Some(&b')') {
            return None;
        }
        Some(i + 1)
    };
    let end = group(1)?;
    Some(group(end).unwrap_or(end))
}

fn bio_tokens(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut position = 0;
    let mut push = |from: usize, to: usize, position: usize| {
        out.push(Token {
            offset_from: from,
            offset_to: to,
            position,
            text: text[from..to].to_string(),
            position_length: 1,
        });
    };
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let c = rest.chars().next().expect("non-empty");
        if !is_word(c) {
            i += c.len_utf8();
            continue;
        }
        if let Some(len) = translocation(rest) {
            push(i, i + len, position);
            position += 1;
            i += len;
            continue;
        }
        // A compound: word runs joined by single connectors.
        let mut parts = vec![];
        let mut j = i;
        loop {
            let start = j;
            while let Some(ch) = text[j..].chars().next().filter(|&ch| is_word(ch)) {
                j += ch.len_utf8();
            }
            parts.push((start, j));
            let mut it = text[j..].chars();
            let (Some(sep), Some(next)) = (it.next(), it.next()) else {
                break;
            };
            let digit_comma = sep == ','
                && text[start..j].chars().all(|x| x.is_ascii_digit())
                && next.is_ascii_digit();
            let joins = matches!(sep, '-' | '/' | '.') && is_word(next);
            if !(joins || digit_comma) {
                break;
            }
            j += sep.len_utf8();
        }
        push(i, j, position);
        if parts.len() > 1 {
            for (a, b) in parts {
                push(a, b, position);
            }
        }
        position += 1;
        i = j;
    }
    out
}

impl Tokenizer for BioTokenizer {
    type TokenStream<'a> = BioTokenStream;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> BioTokenStream {
        BioTokenStream {
            tokens: bio_tokens(text),
            index: 0,
        }
    }
}

/// The analyzer used for chunks and queries alike.
pub fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(BioTokenizer)
        .filter(LowerCaser)
        .filter(StopWordFilter::new(Language::English).expect("English stop words"))
        .filter(Stemmer::new(Language::English))
        .build()
}

/// Terms of `text` as the index sees them.
pub fn terms(text: &str) -> Vec<String> {
    thread_local! {
        // Built once per thread: the support check analyses many short texts.
        static ANALYZER: std::cell::RefCell<TextAnalyzer> = std::cell::RefCell::new(analyzer());
    }
    ANALYZER.with(|a| {
        let mut a = a.borrow_mut();
        let mut stream = a.token_stream(text);
        let mut out = Vec::new();
        while let Some(t) = stream.next() {
            out.push(t.text.clone());
        }
        out
    })
}

struct Fields {
    chunk_id: Field,
    document_id: Field,
    text: Field,
}

/// A BM25 index of the store's chunks.
pub struct Bm25Index {
    reader: IndexReader,
    writer: IndexWriter,
    fields: Fields,
    /// The store version this index reflects.
    version: u64,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let chunk_id = b.add_i64_field("chunk_id", INDEXED | STORED | FAST);
    let document_id = b.add_text_field("document_id", STRING | STORED);
    let text = b.add_text_field(
        "text",
        TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(ANALYZER)
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        ),
    );
    (
        b.build(),
        Fields {
            chunk_id,
            document_id,
            text,
        },
    )
}

impl Bm25Index {
    /// Opens (or creates) the index in `dir`, or in memory when `dir` is `None`.
    pub fn open(dir: Option<&Path>) -> Result<Self> {
        let (schema, fields) = schema();
        let index = match dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| IndexError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
                let mmap = tantivy::directory::MmapDirectory::open(dir)
                    .map_err(|e| IndexError::Invalid(format!("{}: {e}", dir.display())))?;
                Index::open_or_create(mmap, schema)?
            }
            None => Index::create_in_ram(schema),
        };
        index.tokenizers().register(ANALYZER, analyzer());
        let writer = index.writer(WRITER_MEMORY)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let version = index
            .load_metas()?
            .payload
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        Ok(Self {
            reader,
            writer,
            fields,
            version,
        })
    }

    /// The store version this index reflects.
    pub fn version(&self) -> u64 {
        self.version
    }

    fn add(&mut self, c: &StoredChunk) -> Result<()> {
        self.writer.add_document(doc!(
            self.fields.chunk_id => c.id,
            self.fields.document_id => c.document_id.as_str(),
            self.fields.text => c.indexed_text.as_str(),
        ))?;
        Ok(())
    }

    fn commit(&mut self, version: u64) -> Result<()> {
        let mut prepared = self.writer.prepare_commit()?;
        prepared.set_payload(&version.to_string());
        prepared.commit()?;
        self.reader.reload()?;
        self.version = version;
        Ok(())
    }

    /// Brings the index up to the store's version: the changed documents are replaced, or, when
    /// the index is older than the change log can tell (new index), everything is rebuilt.
    pub fn catch_up(&mut self, store: &dyn Store) -> Result<bool> {
        let target = store.version()?;
        if target == self.version {
            return Ok(false);
        }
        if self.version == 0 || self.version > target {
            self.writer.delete_all_documents()?;
            store.for_each_chunk(&mut |c| self.add(&c))?;
        } else {
            let (ids, _) = store.changes_since(self.version)?;
            for id in ids {
                self.writer
                    .delete_term(Term::from_field_text(self.fields.document_id, &id));
                for c in store.chunks_of(&id)? {
                    self.add(&c)?;
                }
            }
        }
        self.commit(target)?;
        Ok(true)
    }

    /// In how many chunks `term` (an analyzed term) occurs.
    pub fn doc_freq(&self, term: &str) -> Result<u64> {
        Ok(self
            .reader
            .searcher()
            .doc_freq(&Term::from_field_text(self.fields.text, term))?)
    }

    /// The `k` best chunks for `query`: (chunk id, BM25 score), best first; among `allowed`
    /// chunks when given (the filter adds nothing to the scores).
    pub fn search(
        &self,
        query: &str,
        k: usize,
        allowed: Option<&std::collections::HashSet<i64>>,
    ) -> Result<Vec<(i64, f32)>> {
        let mut seen = std::collections::HashSet::new();
        let clauses: Vec<(Occur, Box<dyn Query>)> = terms(query)
            .into_iter()
            .filter(|t| seen.insert(t.clone()))
            .map(|t| {
                let q: Box<dyn Query> = Box::new(TermQuery::new(
                    Term::from_field_text(self.fields.text, &t),
                    IndexRecordOption::WithFreqs,
                ));
                (Occur::Should, q)
            })
            .collect();
        if clauses.is_empty() || k == 0 {
            return Ok(Vec::new());
        }
        let searcher = self.reader.searcher();
        let text_query = BooleanQuery::new(clauses);
        let top = match allowed {
            None => searcher.search(&text_query, &TopDocs::with_limit(k))?,
            Some(allowed) => {
                let ids = TermSetQuery::new(
                    allowed
                        .iter()
                        .map(|&c| Term::from_field_i64(self.fields.chunk_id, c)),
                );
                let both = BooleanQuery::new(vec![
                    (Occur::Must, Box::new(text_query) as Box<dyn Query>),
                    (
                        Occur::Must,
                        Box::new(ConstScoreQuery::new(Box::new(ids), 0.0)),
                    ),
                ]);
                searcher.search(&both, &TopDocs::with_limit(k))?
            }
        };
        top.into_iter()
            .map(|(score, addr)| {
                let d: TantivyDocument = searcher.doc(addr)?;
                let id = d
                    .get_first(self.fields.chunk_id)
                    .and_then(|v| v.as_i64())
                    .ok_or_else(|| IndexError::Invalid("BM25 hit without a chunk id".into()))?;
                Ok((id, score))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Vec<String> {
        bio_tokens(text).into_iter().map(|t| t.text).collect()
    }

    #[test]
    fn keeps_biomedical_terms_whole_and_adds_their_parts() {
        assert_eq!(raw("PD-L1 and HER2"), ["PD-L1", "PD", "L1", "and", "HER2"]);
        assert_eq!(
            raw("BRCA1/2 carriers"),
            ["BRCA1/2", "BRCA1", "2", "carriers"]
        );
        assert_eq!(raw("t(12;16) in myxoid"), ["t(12;16)", "in", "myxoid"]);
        assert_eq!(raw("t(12;16)(q13;p11)."), ["t(12;16)(q13;p11)"]);
        assert_eq!(
            raw("2,225 patients, then"),
            ["2,225", "2", "225", "patients", "then"]
        );
        assert_eq!(raw("3.5 mg/m2"), ["3.5", "3", "5", "mg/m2", "mg", "m2"]);
        assert_eq!(raw("end. Next"), ["end", "Next"]);
    }

    #[test]
    fn analyzer_lowercases_stems_and_drops_stop_words() {
        assert_eq!(
            terms("The treatments for PD-L1 are"),
            ["treatment", "pd-l1", "pd", "l1"]
        );
    }

    #[test]
    fn query_forms_match_each_other() {
        let whole = terms("PD-L1 expression");
        let spaced = terms("pd l1 expression");
        assert!(
            spaced.iter().all(|t| whole.contains(t)),
            "{whole:?} {spaced:?}"
        );
    }
}
