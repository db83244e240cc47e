//! Retrieval evaluation: queries with their one relevant passage, searched in every mode, scored
//! by nDCG@10, Recall@10 and MRR@10; the support check on labelled pairs; whole answers
//! ([`answers`]).

pub mod answers;
pub mod retrieval;

use std::path::Path;

use serde_json::Value;

use crate::error::IndexError;
use crate::index::{Corpus, Mode, SearchOptions};
use crate::models::bert::Embedder;

/// A query and the id of the passage that answers it.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub text: String,
    pub relevant: String,
    /// Every field of its record (`doc_id`, `qtype`, `focus`...): for the split, per-field
    /// reports and per-query filters.
    pub fields: serde_json::Map<String, Value>,
}

/// Reads JSONL queries: the text from `question` (or `query`), the relevant passage id from
/// `answer_passage_id`, `relevant_id` or `pmid` (PubMedQA, whose passage id is its PMID).
pub fn read_queries(path: &Path) -> Result<Vec<Query>, IndexError> {
    read_records(path, |_, v| {
        let field = |names: &[&str]| {
            names.iter().find_map(|k| match v.get(*k) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Number(x)) => Some(x.to_string()),
                _ => None,
            })
        };
        Ok(Query {
            text: field(&["question", "query"]).ok_or("no `question`")?,
            relevant: field(&["answer_passage_id", "relevant_id", "pmid"])
                .ok_or("no `answer_passage_id`")?,
            fields: v.as_object().cloned().unwrap_or_default(),
        })
    })
}

/// Each non-empty line of a JSONL file made into a record by `make` (given the 1-based line
/// number and the parsed object); a line that does not parse, or that `make` refuses, is an
/// error naming the file and the line.
pub(crate) fn read_records<T>(
    path: &Path,
    mut make: impl FnMut(usize, &Value) -> Result<T, &'static str>,
) -> Result<Vec<T>, IndexError> {
    let raw = std::fs::read_to_string(path).map_err(|source| IndexError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (n, line) in raw.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |w: &str| IndexError::Invalid(format!("{}:{}: {w}", path.display(), n + 1));
        let v: Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        out.push(make(n + 1, &v).map_err(bad)?);
    }
    Ok(out)
}

/// A string field of a JSON object.
pub(crate) fn text_field(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// Scores of one mode over a query set.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Metrics {
    pub ndcg_at_10: f64,
    pub recall_at_10: f64,
    pub mrr_at_10: f64,
    pub queries: usize,
}

/// Adds one query's outcome: the 1-based rank of its relevant passage, if in the top 10.
fn add(m: &mut Metrics, rank: Option<usize>) {
    m.queries += 1;
    if let Some(r) = rank.filter(|&r| r <= 10) {
        m.ndcg_at_10 += 1.0 / ((r + 1) as f64).log2();
        m.recall_at_10 += 1.0;
        m.mrr_at_10 += 1.0 / r as f64;
    }
}

fn finish(mut m: Metrics) -> Metrics {
    let n = m.queries.max(1) as f64;
    m.ndcg_at_10 /= n;
    m.recall_at_10 /= n;
    m.mrr_at_10 /= n;
    m
}

/// Searches every query and scores the rankings of each mode.
pub fn evaluate(
    corpus: &mut Corpus,
    embedder: &Embedder,
    queries: &[Query],
    base: &SearchOptions,
    modes: &[Mode],
) -> Result<Vec<(Mode, Metrics)>, IndexError> {
    let legs = retrieval::collect_legs(corpus, embedder, queries, base.depth, None)?;
    Ok(modes
        .iter()
        .map(|&mode| {
            let opts = SearchOptions { mode, ..*base };
            (mode, retrieval::score(&legs, queries, &opts))
        })
        .collect())
}

/// A labelled sentence-passage pair of the support-check calibration set.
#[derive(Clone, Debug, PartialEq)]
pub struct SupportPair {
    pub id: String,
    pub sentence: String,
    pub passage: String,
    /// The sentence states only what the passage says.
    pub faithful: bool,
    /// For perturbed pairs: what was changed (`number`, `drug`, `negation`, ...).
    pub perturbation: Option<String>,
}

/// Reads the calibration pairs (JSONL: `id`, `sentence`, `passage`, `label` = `faithful` |
/// `perturbed`, `perturbation`).
pub fn read_support_pairs(path: &Path) -> Result<Vec<SupportPair>, IndexError> {
    read_records(path, |n, v| {
        let text = |k: &str| text_field(v, k);
        let faithful = match text("label").as_deref() {
            Some("faithful") => true,
            Some("perturbed") => false,
            _ => return Err("`label` must be `faithful` or `perturbed`"),
        };
        Ok(SupportPair {
            id: text("id").unwrap_or_else(|| format!("line {n}")),
            sentence: text("sentence").ok_or("no `sentence`")?,
            passage: text("passage").ok_or("no `passage`")?,
            faithful,
            perturbation: text("perturbation"),
        })
    })
}

/// One row of the calibration table: pairs of one kind and how many the check flagged.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct SupportRow {
    /// `faithful`, or the perturbation.
    pub kind: String,
    pub pairs: usize,
    pub flagged: usize,
}

impl SupportRow {
    pub fn rate(&self) -> f64 {
        self.flagged as f64 / self.pairs.max(1) as f64
    }
}

/// Each pair's cosine as the answer pipeline computes it: 1 when the sentence shares enough
/// words with its passage to need no embedding, else the best cosine (our embedder) with the
/// passage sentences that share the most words with it.
pub fn support_cosines(
    pairs: &[SupportPair],
    embedder: &Embedder,
    cfg: &crate::rag::grounding::SupportConfig,
) -> Result<Vec<f32>, IndexError> {
    use crate::rag::grounding::{embedding_candidates, EMBEDDING_CANDIDATES};
    let mut out = Vec::with_capacity(pairs.len());
    for p in pairs {
        let facts = crate::rag::grounding::PassageFacts::new(&p.passage);
        let Some(candidates) =
            embedding_candidates(&p.sentence, &[&facts], cfg, EMBEDDING_CANDIDATES)
        else {
            out.push(1.0);
            continue;
        };
        let mut texts = vec![p.sentence.clone()];
        texts.extend(candidates.iter().map(|s| s.to_string()));
        let v = embedder
            .embed(&texts)?
            .to_vec2::<f32>()
            .map_err(crate::error::ModelError::from)?;
        out.push(crate::rag::grounding::best_cosine(&v[0], &v[1..]));
    }
    Ok(out)
}

/// Checks every pair (with its cosine when given) and counts the flags per kind: `faithful`
/// first, then each perturbation, then `perturbed` (all perturbations together).
pub fn evaluate_support(
    pairs: &[SupportPair],
    cosines: Option<&[f32]>,
    cfg: &crate::rag::grounding::SupportConfig,
) -> (
    Vec<SupportRow>,
    Vec<(String, crate::rag::grounding::Verdict)>,
) {
    use crate::rag::grounding::{check, PassageFacts};
    let mut rows: Vec<SupportRow> = vec![SupportRow {
        kind: "faithful".into(),
        ..SupportRow::default()
    }];
    let mut all = SupportRow {
        kind: "perturbed".into(),
        ..SupportRow::default()
    };
    let mut verdicts = Vec::with_capacity(pairs.len());
    for (i, p) in pairs.iter().enumerate() {
        let facts = PassageFacts::new(&p.passage);
        let v = check(&p.sentence, &[&facts], cosines.map(|c| c[i]), cfg);
        let flagged = !v.supported;
        let kind = if p.faithful {
            "faithful".to_string()
        } else {
            all.pairs += 1;
            all.flagged += flagged as usize;
            p.perturbation.clone().unwrap_or_else(|| "other".into())
        };
        let row = match rows.iter().position(|r| r.kind == kind) {
            Some(r) => r,
            None => {
                rows.push(SupportRow {
                    kind,
                    ..SupportRow::default()
                });
                rows.len() - 1
            }
        };
        rows[row].pairs += 1;
        rows[row].flagged += flagged as usize;
        verdicts.push((p.id.clone(), v));
    }
    rows.push(all);
    (rows, verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_known_ranks() {
        let mut m = Metrics::default();
        add(&mut m, Some(1));
        add(&mut m, Some(3));
        add(&mut m, None);
        add(&mut m, Some(11));
        let m = finish(m);
        assert_eq!(m.queries, 4);
        assert!((m.recall_at_10 - 0.5).abs() < 1e-12);
        assert!((m.mrr_at_10 - (1.0 + 1.0 / 3.0) / 4.0).abs() < 1e-12);
        assert!((m.ndcg_at_10 - (1.0 + 0.5) / 4.0).abs() < 1e-12);
    }

    #[test]
    fn reads_medquad_and_pubmedqa_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.jsonl");
        std::fs::write(
            &p,
            "{\"question\": \"What is X ?\", \"answer_passage_id\": \"1-1\"}\n{\"pmid\": \"21645374\", \"question\": \"Do Y?\"}\n",
        )
        .unwrap();
        let q = read_queries(&p).unwrap();
        assert_eq!(q[0].relevant, "1-1");
        assert_eq!(q[1].relevant, "21645374");
    }
}
