//! BM25 over chunks with tantivy, derived from the store. The tokenizer keeps biomedical terms
//! whole (`PD-L1`, `HER2`, `BRCA1/2`, `t(12;16)`, `2,225`) and also emits their parts, so a query
//! written either way matches.
//!
//! Two fields: `text`, lower-cased tokens, which BM25 scores; `stems`, the same with English stop
//! words dropped and words stemmed, which only answers "does the corpus mention this word in any
//! form" (unknown-word abstention). Scoring is ours, over tantivy's postings and field norms,
//! because tantivy fixes k1 = 1.2 and b = 0.75: on the MedQuAD dev half, unstemmed tokens with
//! k1 = 0.9, b = 0.75 ranked best (stemming and stop words each cost nDCG@10; BENCHMARKS.md).

use std::path::Path;

use tantivy::postings::Postings;
use tantivy::schema::{
    Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, INDEXED, STORED, STRING,
};
use tantivy::tokenizer::{
    Language, LowerCaser, Stemmer, StopWordFilter, TextAnalyzer, Token, TokenStream, Tokenizer,
};
use tantivy::{doc, Index, IndexReader, IndexWriter, ReloadPolicy, Term};
use tantivy::{DocSet, TERMINATED};

use super::store::{Store, StoredChunk};
use crate::error::IndexError;

type Result<T> = std::result::Result<T, IndexError>;

const TEXT_ANALYZER: &str = "cited_text";
const STEM_ANALYZER: &str = "cited_stems";
const WRITER_MEMORY: usize = 50_000_000;

/// Splits text into terms: compounds joined by `-`, `/`, `.`, `,` (between digits), and
/// chromosome translocations. A translocation is always one term; a compound is emitted as its
/// parts, and in `whole` mode first as a whole too.
#[derive(Clone, Default)]
pub struct BioTokenizer {
    /// Emit a compound whole before its parts (the stems field: a word found as typed). The
    /// scored field takes the parts alone, so `follow-up` counts as two words, as plain tokens
    /// would, and not as three.
    pub whole: bool,
}

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

fn bio_tokens(text: &str, whole: bool) -> Vec<Token> {
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
        if parts.len() == 1 {
            push(i, j, position);
            position += 1;
        } else if whole {
            push(i, j, position);
            for (a, b) in parts {
                push(a, b, position);
            }
            position += 1;
        } else {
            for (a, b) in parts {
                push(a, b, position);
                position += 1;
            }
        }
        i = j;
    }
    out
}

impl Tokenizer for BioTokenizer {
    type TokenStream<'a> = BioTokenStream;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> BioTokenStream {
        BioTokenStream {
            tokens: bio_tokens(text, self.whole),
            index: 0,
        }
    }
}

/// The analyzer BM25 scores with, for chunks and queries alike: lower-cased tokens, compounds
/// as their parts.
pub fn text_analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(BioTokenizer { whole: false })
        .filter(LowerCaser)
        .build()
}

/// The stemming analyzer: compounds whole and in parts, lower case, English stop words dropped,
/// English stemming.
pub fn stem_analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(BioTokenizer { whole: true })
        .filter(LowerCaser)
        .filter(StopWordFilter::new(Language::English).expect("English stop words"))
        .filter(Stemmer::new(Language::English))
        .build()
}

fn run(analyzer: &mut TextAnalyzer, text: &str) -> Vec<String> {
    let mut stream = analyzer.token_stream(text);
    let mut out = Vec::new();
    while let Some(t) = stream.next() {
        out.push(t.text.clone());
    }
    out
}

/// Stems of `text`, stop words dropped (word forms compared: the support check, unknown words).
pub fn terms(text: &str) -> Vec<String> {
    thread_local! {
        // Built once per thread: the support check analyses many short texts.
        static ANALYZER: std::cell::RefCell<TextAnalyzer> = std::cell::RefCell::new(stem_analyzer());
    }
    ANALYZER.with(|a| run(&mut a.borrow_mut(), text))
}

/// Terms of `text` as BM25 scores them.
pub fn text_terms(text: &str) -> Vec<String> {
    thread_local! {
        static ANALYZER: std::cell::RefCell<TextAnalyzer> = std::cell::RefCell::new(text_analyzer());
    }
    ANALYZER.with(|a| run(&mut a.borrow_mut(), text))
}

/// Words patients use (first) and the words guidelines use for the same thing: a query holding
/// the first also searches the others, each counted as a query term of its own. The list came
/// from the question wording of the MedQuAD dev half (outlook, research, symptoms, tests, risk,
/// inherited), written as general vocabulary; BENCHMARKS.md reports it on the held-out half.
const PLAIN_TO_CLINICAL: &[(&str, &[&str])] = &[
    ("outlook", &["prognosis", "survival", "recovery"]),
    ("spread", &["metastasis", "metastatic", "metastasized"]),
    ("spreads", &["metastasis", "metastatic", "metastasized"]),
    ("research", &["trials", "clinical"]),
    ("symptoms", &["signs"]),
    ("chemo", &["chemotherapy"]),
    ("radiation", &["radiotherapy"]),
    ("tests", &["diagnose", "diagnosed", "exams"]),
    ("exams", &["tests", "diagnose", "diagnosed"]),
    ("risk", &["factors"]),
    ("inherited", &["genetic", "hereditary"]),
];

/// Query terms with the clinical words for the plain ones among them.
fn expand(mut terms: Vec<String>) -> Vec<String> {
    let extra: Vec<String> = terms
        .iter()
        .filter_map(|t| PLAIN_TO_CLINICAL.iter().find(|(plain, _)| plain == t))
        .flat_map(|(_, clinical)| clinical.iter().map(|c| c.to_string()))
        .collect();
    terms.extend(extra);
    terms
}

/// BM25's saturation and length normalisation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bm25Params {
    pub k1: f32,
    pub b: f32,
}

impl Default for Bm25Params {
    /// Chosen on the dev halves of MedQuAD and PubMedQA (BENCHMARKS.md).
    fn default() -> Self {
        Self { k1: 0.9, b: 0.65 }
    }
}

struct Fields {
    chunk_id: Field,
    document_id: Field,
    text: Field,
    stems: Field,
    /// Tokens of `text` in each chunk, exact (tantivy's field norms keep a one-byte
    /// approximation past 40 tokens).
    length: Field,
}

/// A BM25 index of the store's chunks.
pub struct Bm25Index {
    reader: IndexReader,
    writer: IndexWriter,
    fields: Fields,
    /// The store version this index reflects.
    version: u64,
    params: Bm25Params,
    /// Mean `length` over the live chunks, taken at each commit.
    avg_len: f32,
}

fn schema() -> (Schema, Fields) {
    let mut b = Schema::builder();
    let chunk_id = b.add_i64_field("chunk_id", INDEXED | STORED | FAST);
    let document_id = b.add_text_field("document_id", STRING | STORED);
    let text = b.add_text_field(
        "text",
        TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(TEXT_ANALYZER)
                .set_index_option(IndexRecordOption::WithFreqs)
                .set_fieldnorms(false),
        ),
    );
    let stems = b.add_text_field(
        "stems",
        TextOptions::default().set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(STEM_ANALYZER)
                .set_index_option(IndexRecordOption::Basic)
                .set_fieldnorms(false),
        ),
    );
    let length = b.add_u64_field("length", FAST);
    (
        b.build(),
        Fields {
            chunk_id,
            document_id,
            text,
            stems,
            length,
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
        index.tokenizers().register(TEXT_ANALYZER, text_analyzer());
        index.tokenizers().register(STEM_ANALYZER, stem_analyzer());
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
        let avg_len = mean_length(&reader)?;
        Ok(Self {
            reader,
            writer,
            fields,
            version,
            params: Bm25Params::default(),
            avg_len,
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
            self.fields.stems => c.indexed_text.as_str(),
            self.fields.length => bio_tokens(&c.indexed_text, false).len() as u64,
        ))?;
        Ok(())
    }

    fn commit(&mut self, version: u64) -> Result<()> {
        let mut prepared = self.writer.prepare_commit()?;
        prepared.set_payload(&version.to_string());
        prepared.commit()?;
        self.reader.reload()?;
        self.avg_len = mean_length(&self.reader)?;
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

    /// In how many chunks the stem `term` (from [`terms`]) occurs.
    pub fn doc_freq(&self, term: &str) -> Result<u64> {
        Ok(self
            .reader
            .searcher()
            .doc_freq(&Term::from_field_text(self.fields.stems, term))?)
    }

    pub fn set_params(&mut self, params: Bm25Params) {
        self.params = params;
    }

    /// The `k` best chunks for `query`: (chunk id, BM25 score), best first, equal scores by
    /// lower chunk id; among `allowed` chunks when given (the filter adds nothing to the
    /// scores). Okapi BM25 with Lucene's idf, `ln(1 + (N - df + 0.5) / (df + 0.5))`, over the
    /// tantivy postings, each query term counted once.
    pub fn search(
        &self,
        query: &str,
        k: usize,
        allowed: Option<&std::collections::HashSet<i64>>,
    ) -> Result<Vec<(i64, f32)>> {
        let mut terms = expand(text_terms(query));
        terms.sort();
        terms.dedup();
        let searcher = self.reader.searcher();
        let n = searcher.num_docs() as f32;
        if terms.is_empty() || k == 0 || n == 0.0 {
            return Ok(Vec::new());
        }
        let avg_len = self.avg_len;
        let weighted: Vec<(Term, f32)> = terms
            .iter()
            .map(|t| {
                let term = Term::from_field_text(self.fields.text, t);
                let df = searcher.doc_freq(&term)? as f32;
                Ok((term, (1.0 + (n - df + 0.5) / (df + 0.5)).ln()))
            })
            .collect::<Result<_>>()?;
        let Bm25Params { k1, b } = self.params;
        let mut hits: Vec<(i64, f32)> = Vec::new();
        for seg in searcher.segment_readers() {
            let inverted = seg.inverted_index(self.fields.text)?;
            let lengths = seg.fast_fields().u64("length")?;
            let mut scores = vec![0f32; seg.max_doc() as usize];
            for (term, idf) in &weighted {
                let Some(mut postings) = inverted
                    .read_postings(term, IndexRecordOption::WithFreqs)
                    .map_err(tantivy::TantivyError::from)?
                else {
                    continue;
                };
                let mut doc = postings.doc();
                while doc != TERMINATED {
                    let tf = postings.term_freq() as f32;
                    let len = lengths.first(doc).unwrap_or(0) as f32;
                    scores[doc as usize] +=
                        idf * tf * (k1 + 1.0) / (tf + k1 * (1.0 - b + b * len / avg_len));
                    doc = postings.advance();
                }
            }
            let ids = seg.fast_fields().i64("chunk_id")?;
            let alive = seg.alive_bitset();
            for (doc, &score) in scores.iter().enumerate() {
                if score <= 0.0 || alive.is_some_and(|a| !a.is_alive(doc as u32)) {
                    continue;
                }
                let Some(id) = ids.first(doc as u32) else {
                    continue;
                };
                if allowed.is_none_or(|a| a.contains(&id)) {
                    hits.push((id, score));
                }
            }
        }
        let by_rank = |a: &(i64, f32), b: &(i64, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if hits.len() > k {
            hits.select_nth_unstable_by(k - 1, by_rank);
            hits.truncate(k);
        }
        hits.sort_by(by_rank);
        Ok(hits)
    }
}

/// The mean token count of the live chunks behind `reader` (at least 1).
fn mean_length(reader: &IndexReader) -> Result<f32> {
    let searcher = reader.searcher();
    let (mut tokens, mut chunks) = (0u64, 0u64);
    for seg in searcher.segment_readers() {
        let lengths = seg.fast_fields().u64("length")?;
        let alive = seg.alive_bitset();
        for doc in 0..seg.max_doc() {
            if alive.is_none_or(|a| a.is_alive(doc)) {
                tokens += lengths.first(doc).unwrap_or(0);
                chunks += 1;
            }
        }
    }
    Ok((tokens as f32 / chunks.max(1) as f32).max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Vec<String> {
        bio_tokens(text, true).into_iter().map(|t| t.text).collect()
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
        // The scored field: compounds as their parts alone; translocations stay whole.
        assert_eq!(
            text_terms("PD-L1 and t(12;16) in 2,225"),
            ["pd", "l1", "and", "t(12;16)", "in", "2", "225"]
        );
    }

    #[test]
    fn analyzers_lowercase_and_the_stem_one_stems_and_drops_stop_words() {
        assert_eq!(
            terms("The treatments for PD-L1 are"),
            ["treatment", "pd-l1", "pd", "l1"]
        );
        assert_eq!(
            text_terms("The treatments for PD-L1"),
            ["the", "treatments", "for", "pd", "l1"]
        );
    }

    fn chunk(id: i64, doc: &str, text: &str) -> StoredChunk {
        StoredChunk {
            id,
            document_id: doc.into(),
            ord: 0,
            section: String::new(),
            text: text.into(),
            indexed_text: text.into(),
            start: 0,
            end: text.len(),
            embedding: Vec::new(),
        }
    }

    #[test]
    fn scores_are_okapi_bm25_with_the_configured_parameters() {
        let mut index = Bm25Index::open(None).unwrap();
        let texts = [
            "doxorubicin for sarcoma",
            "sarcoma follow-up imaging of the chest",
            "breast screening",
        ];
        for (i, t) in texts.iter().enumerate() {
            index
                .add(&chunk(i as i64 + 1, &format!("d{i}"), t))
                .unwrap();
        }
        index.commit(1).unwrap();
        index.set_params(Bm25Params { k1: 0.9, b: 0.4 });
        let hits = index.search("Sarcoma doxorubicin", 10, None).unwrap();
        assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), [1, 2]);
        // By hand: N = 3, lengths 3, 7 (`follow-up` is its two parts), 2: average 4;
        // doxorubicin df 1, sarcoma df 2.
        let idf = |df: f32| (1.0f32 + (3.0 - df + 0.5) / (df + 0.5)).ln();
        let part = |len: f32| 1.9 / (1.0 + 0.9 * (0.6 + 0.4 * len / 4.0));
        let expected = (idf(1.0) + idf(2.0)) * part(3.0);
        assert!(
            (hits[0].1 - expected).abs() < 1e-5,
            "{} {expected}",
            hits[0].1
        );
        assert!((hits[1].1 - idf(2.0) * part(7.0)).abs() < 1e-5);
        // A compound scores through its parts, once each: `follow-up` matches `follow up`.
        let compound = index.search("follow-up", 10, None).unwrap();
        let spaced = index.search("follow up", 10, None).unwrap();
        assert_eq!(compound, spaced);
        assert_eq!(compound[0].0, 2);
        // The filter keeps only allowed chunks; no term, no hit.
        let allowed = std::collections::HashSet::from([2i64]);
        let hits = index
            .search("sarcoma doxorubicin", 10, Some(&allowed))
            .unwrap();
        assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), [2]);
        assert!(index.search("melanoma", 10, None).unwrap().is_empty());
        // A patient's word also searches the clinical one.
        assert_eq!(
            expand(vec!["outlook".into(), "sarcoma".into()]),
            ["outlook", "sarcoma", "prognosis", "survival", "recovery"]
        );
        // Stems answer "mentioned in any form"; the scored field keeps word forms.
        assert_eq!(index.doc_freq("imag").unwrap(), 1);
        assert_eq!(index.search("images", 10, None).unwrap().len(), 0);
        // Deleting a chunk (d1: 7 tokens) takes it out of the mean length at the next commit.
        index
            .writer
            .delete_term(Term::from_field_text(index.fields.document_id, "d1"));
        index.commit(2).unwrap();
        assert!((index.avg_len - 2.5).abs() < 1e-6, "{}", index.avg_len);
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
