//! Retrieval evaluation beyond one table: a fixed split of the queries (tune on one half, report
//! on the other), a grid over the fusion settings, a plain reference BM25, and reports per value
//! of a query field or with each query filtered to its own value of a field.
//!
//! Each query's two rankings (dense, BM25; passages, best chunk first) are taken once, `depth`
//! chunks deep, and every fusion setting is scored on them in memory: fusion reads only ranks.

use std::collections::HashMap;

use serde_json::Value;

use super::{add, finish, Metrics, Query};
use crate::error::IndexError;
use crate::index::filter::Filter;
use crate::index::store::Store;
use crate::index::{Corpus, Fusion, Legs, Mode, SearchOptions};
use crate::models::bert::Embedder;

/// Which queries: half of them, or all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// Tuning half.
    Dev,
    /// Held-out half.
    Test,
    All,
}

/// FNV-1a: a split that is the same on every machine and every run.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The half a query falls in: by its source document (`doc_id`, else its relevant passage), so
/// questions about one document never straddle the split.
pub fn split_of(q: &Query) -> Split {
    let key = q
        .fields
        .get("doc_id")
        .and_then(Value::as_str)
        .unwrap_or(&q.relevant);
    if fnv1a(key).is_multiple_of(2) {
        Split::Dev
    } else {
        Split::Test
    }
}

/// The queries of `split`.
pub fn select(queries: &[Query], split: Split) -> Vec<Query> {
    queries
        .iter()
        .filter(|q| split == Split::All || split_of(q) == split)
        .cloned()
        .collect()
}

/// A query field's value as text (strings as they are, other scalars printed).
pub fn field_value(q: &Query, field: &str) -> Option<String> {
    match q.fields.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// Each query's two rankings; with `filter_by`, each query is searched among the documents whose
/// metadata field of that name equals the query's own value.
pub fn collect_legs(
    corpus: &mut Corpus,
    embedder: &Embedder,
    queries: &[Query],
    depth: usize,
    filter_by: Option<&str>,
) -> Result<Vec<Legs>, IndexError> {
    let mut out = Vec::with_capacity(queries.len());
    for group in queries.chunks(64) {
        let texts: Vec<&str> = group.iter().map(|q| q.text.as_str()).collect();
        let vectors = embedder
            .embed(&texts)?
            .to_vec2::<f32>()
            .map_err(crate::error::ModelError::from)?;
        for (q, v) in group.iter().zip(&vectors) {
            let filter = match filter_by {
                None => Filter::default(),
                Some(field) => {
                    let value = q.fields.get(field).cloned().unwrap_or(Value::Null);
                    let mut map = serde_json::Map::new();
                    map.insert(field.to_string(), value);
                    Filter::from_json(&Value::Object(map))
                        .map_err(|e| IndexError::Invalid(e.to_string()))?
                }
            };
            out.push(corpus.legs(&q.text, v, depth, Mode::Hybrid, &filter)?);
        }
    }
    Ok(out)
}

/// Each query's rank (1-based, in the top 10) of its relevant passage under one mode and setting.
pub fn ranks(legs: &[Legs], queries: &[Query], opts: &SearchOptions) -> Vec<Option<usize>> {
    legs.iter()
        .zip(queries)
        .map(|(l, q)| {
            l.fuse(opts)
                .iter()
                .take(10)
                .position(|(p, _)| *p == q.relevant)
                .map(|i| i + 1)
        })
        .collect()
}

/// The metrics of per-query ranks.
pub fn metrics(ranks: &[Option<usize>]) -> Metrics {
    let mut m = Metrics::default();
    for &r in ranks {
        add(&mut m, r);
    }
    finish(m)
}

/// Scores one mode and setting over precomputed rankings.
pub fn score(legs: &[Legs], queries: &[Query], opts: &SearchOptions) -> Metrics {
    metrics(&ranks(legs, queries, opts))
}

/// nDCG@10 of one query whose single relevant passage is at `rank`.
fn ndcg(rank: Option<usize>) -> f64 {
    rank.filter(|&r| r <= 10)
        .map_or(0.0, |r| 1.0 / ((r + 1) as f64).log2())
}

/// The nDCG@10 difference `a - b` of two retrievers over the same queries, with a 95%
/// confidence interval from a paired bootstrap (`resamples` resamplings of the queries, drawn
/// with a fixed seed): `(difference, low, high)`. An interval holding 0 means the queries
/// cannot tell the two apart.
pub fn paired_bootstrap(
    a: &[Option<usize>],
    b: &[Option<usize>],
    resamples: usize,
) -> (f64, f64, f64) {
    let d: Vec<f64> = a.iter().zip(b).map(|(&x, &y)| ndcg(x) - ndcg(y)).collect();
    if d.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let n = d.len();
    let mean = d.iter().sum::<f64>() / n as f64;
    let mut rng = crate::ops::rng::SplitMix64::new(0x5EED);
    let mut means: Vec<f64> = (0..resamples.max(1))
        .map(|_| {
            (0..n)
                .map(|_| d[(rng.next_u64() % n as u64) as usize])
                .sum::<f64>()
                / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((means.len() - 1) as f64 * q).round() as usize];
    (mean, at(0.025), at(0.975))
}

/// The fusion grid searched by [`tune`]: RRF k and the dense weight (BM25's weight stays 1),
/// and the dense share of convex fusion.
pub const RRF_KS: &[f32] = &[5.0, 10.0, 20.0, 40.0, 60.0, 100.0];
pub const DENSE_WEIGHTS: &[f32] = &[0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
pub const DENSE_SHARES: &[f32] = &[0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9];

/// Every hybrid setting of the grid.
pub fn grid(base: &SearchOptions) -> Vec<SearchOptions> {
    let hybrid = SearchOptions {
        mode: Mode::Hybrid,
        bm25_weight: 1.0,
        ..*base
    };
    let mut out = Vec::new();
    for &rrf_k in RRF_KS {
        for &dense_weight in DENSE_WEIGHTS {
            out.push(SearchOptions {
                fusion: Fusion::Rrf,
                rrf_k,
                dense_weight,
                ..hybrid
            });
        }
    }
    for &dense_share in DENSE_SHARES {
        out.push(SearchOptions {
            fusion: Fusion::Convex,
            dense_share,
            ..hybrid
        });
    }
    out
}

/// The hybrid setting with the best nDCG@10 on `legs` (ties: the earlier grid point).
pub fn tune(legs: &[Legs], queries: &[Query], base: &SearchOptions) -> (SearchOptions, Metrics) {
    let mut best: Option<(SearchOptions, Metrics)> = None;
    for opts in grid(base) {
        let m = score(legs, queries, &opts);
        if best
            .as_ref()
            .is_none_or(|(_, b)| m.ndcg_at_10 > b.ndcg_at_10)
        {
            best = Some((opts, m));
        }
    }
    best.expect("the grid is not empty")
}

/// How a setting is written in reports.
pub fn describe(o: &SearchOptions) -> String {
    match o.fusion {
        Fusion::Rrf => format!(
            "RRF k {}, dense {}, bm25 {}",
            o.rrf_k, o.dense_weight, o.bm25_weight
        ),
        Fusion::Convex => format!("convex, dense share {}", o.dense_share),
    }
}

/// The reference BM25 of the targets: lower-cased alphanumeric tokens, k1 = 0.9, b = 0.4, over
/// the same chunks (title and section line included) as ours, a passage ranked by its best chunk.
pub struct ReferenceBm25 {
    /// term -> (chunk index, term frequency)
    postings: HashMap<String, Vec<(u32, u32)>>,
    lengths: Vec<u32>,
    passage: Vec<String>,
    avg_len: f64,
}

pub const REFERENCE_K1: f64 = 0.9;
pub const REFERENCE_B: f64 = 0.4;

fn plain_tokens(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_lowercase)
}

impl ReferenceBm25 {
    pub fn build(store: &dyn Store) -> Result<Self, IndexError> {
        let mut postings: HashMap<String, Vec<(u32, u32)>> = HashMap::new();
        let mut lengths = Vec::new();
        let mut passage = Vec::new();
        let superseded = store.superseded()?;
        store.for_each_chunk(&mut |c| {
            if superseded.contains(&c.document_id) {
                return Ok(());
            }
            let i = lengths.len() as u32;
            let mut tf: HashMap<String, u32> = HashMap::new();
            let mut n = 0;
            for t in plain_tokens(&c.indexed_text) {
                *tf.entry(t).or_default() += 1;
                n += 1;
            }
            for (t, f) in tf {
                postings.entry(t).or_default().push((i, f));
            }
            lengths.push(n);
            passage.push(c.document_id);
            Ok(())
        })?;
        let avg_len = lengths.iter().map(|&l| l as f64).sum::<f64>() / lengths.len().max(1) as f64;
        Ok(Self {
            postings,
            lengths,
            passage,
            avg_len,
        })
    }

    /// Passages by their best chunk's score, best first (equal scores: lower chunk first).
    pub fn search(&self, query: &str, k: usize) -> Vec<(String, f32)> {
        let n = self.lengths.len() as f64;
        let mut scores: HashMap<u32, f64> = HashMap::new();
        let mut terms: Vec<String> = plain_tokens(query).collect();
        terms.sort();
        terms.dedup();
        for t in &terms {
            let Some(list) = self.postings.get(t) else {
                continue;
            };
            let df = list.len() as f64;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for &(doc, tf) in list {
                let tf = tf as f64;
                let norm = REFERENCE_K1
                    * (1.0 - REFERENCE_B
                        + REFERENCE_B * self.lengths[doc as usize] as f64 / self.avg_len);
                *scores.entry(doc).or_default() += idf * tf * (REFERENCE_K1 + 1.0) / (tf + norm);
            }
        }
        let mut ranked: Vec<(u32, f64)> = scores.into_iter().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut seen = std::collections::HashSet::new();
        ranked
            .into_iter()
            .filter(|(c, _)| seen.insert(self.passage[*c as usize].clone()))
            .take(k)
            .map(|(c, s)| (self.passage[c as usize].clone(), s as f32))
            .collect()
    }
}

/// Each query's rank of its relevant passage under the reference BM25.
pub fn reference_ranks(reference: &ReferenceBm25, queries: &[Query]) -> Vec<Option<usize>> {
    queries
        .iter()
        .map(|q| {
            reference
                .search(&q.text, 10)
                .iter()
                .position(|(p, _)| *p == q.relevant)
                .map(|i| i + 1)
        })
        .collect()
}

/// The reference BM25's metrics over `queries`.
pub fn score_reference(reference: &ReferenceBm25, queries: &[Query]) -> Metrics {
    metrics(&reference_ranks(reference, queries))
}

/// Queries grouped by their value of `field` (missing: `-`), groups by size, largest first.
pub fn groups_by(queries: &[Query], field: &str) -> Vec<(String, Vec<usize>)> {
    let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, q) in queries.iter().enumerate() {
        groups
            .entry(field_value(q, field).unwrap_or_else(|| "-".into()))
            .or_default()
            .push(i);
    }
    let mut out: Vec<(String, Vec<usize>)> = groups.into_iter().collect();
    out.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(text: &str, relevant: &str, doc: &str) -> Query {
        let mut fields = serde_json::Map::new();
        fields.insert("doc_id".into(), Value::String(doc.into()));
        fields.insert("qtype".into(), Value::String("treatment".into()));
        Query {
            text: text.into(),
            relevant: relevant.into(),
            fields,
        }
    }

    #[test]
    fn paired_bootstrap_brackets_the_difference() {
        // Equal rankings: no difference, and an interval of zero width.
        let a: Vec<Option<usize>> = (0..200).map(|i| Some(1 + i % 12)).collect();
        assert_eq!(paired_bootstrap(&a, &a, 1000), (0.0, 0.0, 0.0));
        // One retriever a place better on every query: a positive interval around the mean.
        let better: Vec<Option<usize>> = (0..200).map(|i| Some(1 + i % 9)).collect();
        let worse: Vec<Option<usize>> = (0..200).map(|i| Some(2 + i % 9)).collect();
        let (d, lo, hi) = paired_bootstrap(&better, &worse, 2000);
        assert!(
            d > 0.0 && lo > 0.0 && lo <= d && d <= hi,
            "{d} [{lo}, {hi}]"
        );
        // Two queries of 200 differing: an interval that holds 0.
        let mut close = a.clone();
        close[3] = Some(2);
        close[7] = None;
        let (d, lo, hi) = paired_bootstrap(&close, &a, 2000);
        assert!(d < 0.0 && lo < 0.0 && hi >= 0.0, "{d} [{lo}, {hi}]");
        assert_eq!(metrics(&a).queries, 200);
    }

    #[test]
    fn the_split_keeps_a_document_on_one_side_and_halves_the_set() {
        let qs: Vec<Query> = (0..400)
            .map(|i| query("q", &format!("{i}-1"), &format!("doc{}", i / 4)))
            .collect();
        let dev = select(&qs, Split::Dev);
        let test = select(&qs, Split::Test);
        assert_eq!(dev.len() + test.len(), 400);
        assert!((150..=250).contains(&dev.len()), "{}", dev.len());
        for d in &dev {
            assert!(test
                .iter()
                .all(|t| t.fields["doc_id"] != d.fields["doc_id"]));
        }
        assert_eq!(select(&qs, Split::All).len(), 400);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }

    fn legs(dense: &[&str], bm25: &[&str]) -> Legs {
        let leg = |ids: &[&str]| {
            ids.iter()
                .enumerate()
                .map(|(i, p)| (p.to_string(), i as i64, 1.0 - i as f32 * 0.1))
                .collect()
        };
        Legs {
            dense: leg(dense),
            bm25: leg(bm25),
            ..Legs::default()
        }
    }

    #[test]
    fn tuning_finds_the_weight_that_ranks_the_answers_first() {
        // Dense puts the answer second, BM25 first: fusion must lean on BM25 to win.
        let qs = vec![query("q1", "a", "d1"), query("q2", "c", "d2")];
        let l = vec![
            legs(&["b", "a"], &["a", "b"]),
            legs(&["d", "c"], &["c", "d"]),
        ];
        let base = SearchOptions::default();
        let dense_only = score(
            &l,
            &qs,
            &SearchOptions {
                mode: Mode::Dense,
                ..base
            },
        );
        assert!((dense_only.mrr_at_10 - 0.5).abs() < 1e-9);
        let (best, m) = tune(&l, &qs, &base);
        assert!(best.dense_weight < 1.0, "{best:?}");
        assert!((m.mrr_at_10 - 1.0).abs() < 1e-9);
    }

    #[test]
    fn groups_by_a_field_largest_first() {
        let mut qs = vec![
            query("a", "1", "d"),
            query("b", "2", "d"),
            query("c", "3", "e"),
        ];
        qs[2]
            .fields
            .insert("qtype".into(), Value::String("symptoms".into()));
        let g = groups_by(&qs, "qtype");
        assert_eq!(g[0], ("treatment".to_string(), vec![0, 1]));
        assert_eq!(g[1], ("symptoms".to_string(), vec![2]));
        assert_eq!(groups_by(&qs, "missing")[0].0, "-");
    }

    #[test]
    fn reference_bm25_prefers_rare_matching_terms() {
        let dir = tempfile::tempdir().unwrap();
        let mut store =
            crate::index::store::SqliteStore::open(&dir.path().join("s.sqlite")).unwrap();
        let doc = |id: &str, text: &str| {
            (
                crate::index::store::DocRecord::bare(id, id),
                vec![crate::index::store::NewChunk::bare(0, text, vec![1.0])],
            )
        };
        store
            .upsert_many(&[
                doc("a", "Sarcoma treatment with doxorubicin."),
                doc("b", "Sarcoma sarcoma sarcoma follow-up."),
                doc("c", "Breast cancer screening."),
            ])
            .unwrap();
        let r = ReferenceBm25::build(&store).unwrap();
        let hits = r.search("DOXORUBICIN for sarcoma?", 10);
        assert_eq!(hits[0].0, "a");
        assert_eq!(hits.len(), 2);
        assert!(r.search("nothing matches", 10).is_empty());
    }
}
