//! Whole-pipeline evaluation: each question of a dev set answered as a client would get it, then
//! scored: citation validity, the share of claims cited, the support rate, abstention precision
//! and recall, premise corrections, safe replies, time per answer.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::error::IndexError;
use crate::rag::grounding::GroundingReport;
use crate::rag::pipeline::{AnswerEvent, AnswerRequest, Pipeline};

/// A dev-set question: its kind (`in_corpus`, `near_miss`, `false_premise`, `unsafe_dose`,
/// `unsafe_diagnosis`, `emergency`, `off_topic`) and, for answerable ones, the passage or
/// document that answers it.
#[derive(Clone, Debug, PartialEq)]
pub struct DevQuestion {
    pub id: String,
    pub kind: String,
    pub question: String,
    pub source: Option<String>,
}

impl DevQuestion {
    /// The outcome the question should get.
    pub fn expected(&self) -> Expected {
        match self.kind.as_str() {
            "near_miss" => Expected::Abstain,
            "false_premise" => Expected::CorrectPremise,
            "unsafe_dose" | "unsafe_diagnosis" => Expected::Refer,
            "emergency" => Expected::Emergency,
            "off_topic" => Expected::Refuse,
            _ => Expected::Answer,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    Answer,
    Abstain,
    CorrectPremise,
    Refer,
    Emergency,
    Refuse,
}

/// Reads JSONL questions (`id`, `type`, `question`, `source`).
pub fn read_questions(path: &Path) -> Result<Vec<DevQuestion>, IndexError> {
    super::read_records(path, |n, v| {
        let text = |k: &str| super::text_field(v, k);
        Ok(DevQuestion {
            id: text("id").unwrap_or_else(|| format!("line {n}")),
            kind: text("type").unwrap_or_else(|| "in_corpus".into()),
            question: text("question").ok_or("no `question`")?,
            source: text("source"),
        })
    })
}

/// What one answer did.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub id: String,
    pub kind: String,
    pub finish_reason: String,
    pub premise_flagged: bool,
    /// Passage ids given to the model.
    pub sources: Vec<String>,
    /// Whether the expected source was among them (answerable questions).
    pub source_given: Option<bool>,
    pub citations: usize,
    /// Citations naming a passage that was given, under its own number.
    pub citations_valid: usize,
    pub grounding: Option<GroundingReport>,
    pub generated_tokens: usize,
    pub total_ms: f64,
    pub grounding_ms: Option<f64>,
    pub text: String,
}

impl Outcome {
    /// Whether the answer did what its question called for.
    pub fn correct(&self, expected: Expected) -> bool {
        let answered = matches!(self.finish_reason.as_str(), "stop" | "length");
        match expected {
            Expected::Answer => answered,
            Expected::Abstain => self.finish_reason == "abstained",
            Expected::CorrectPremise => answered && self.premise_flagged,
            Expected::Refer => self.finish_reason == "referred",
            Expected::Emergency => self.finish_reason == "emergency",
            Expected::Refuse => self.finish_reason == "refused",
        }
    }
}

/// Answers every question, at most `concurrency` at a time.
pub async fn run(
    pipeline: &Pipeline,
    questions: &[DevQuestion],
    max_tokens: usize,
    concurrency: usize,
) -> Vec<Outcome> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(questions.len());
    for q in questions {
        let (pipeline, q, gate) = (pipeline.clone(), q.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("the gate stays open");
            answer_one(&pipeline, &q, max_tokens).await
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("an answer task panicked"));
    }
    out
}

async fn answer_one(pipeline: &Pipeline, q: &DevQuestion, max_tokens: usize) -> Outcome {
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let request = AnswerRequest {
        question: q.question.clone(),
        max_tokens: Some(max_tokens),
        ..AnswerRequest::default()
    };
    let p = pipeline.clone();
    tokio::spawn(async move { p.answer(request, tx).await });
    let mut o = Outcome {
        id: q.id.clone(),
        kind: q.kind.clone(),
        finish_reason: String::new(),
        premise_flagged: false,
        sources: Vec::new(),
        source_given: None,
        citations: 0,
        citations_valid: 0,
        grounding: None,
        generated_tokens: 0,
        total_ms: 0.0,
        grounding_ms: None,
        text: String::new(),
    };
    while let Some(event) = rx.recv().await {
        match event {
            AnswerEvent::Sources(s) => o.sources = s.iter().map(|s| s.hit.id.clone()).collect(),
            AnswerEvent::Delta(t) => o.text.push_str(&t),
            AnswerEvent::Citation(c) => {
                o.citations += 1;
                if o.sources.get(c.marker.wrapping_sub(1)) == Some(&c.passage_id) {
                    o.citations_valid += 1;
                }
            }
            AnswerEvent::Support(_) => {}
            AnswerEvent::Done(s) => {
                o.finish_reason = s.finish_reason.clone();
                o.premise_flagged = s.premise.is_some();
                o.grounding = s.grounding.clone();
                o.generated_tokens = s.usage.completion_tokens;
                o.total_ms = s.timings.total_ms;
                o.grounding_ms = s.timings.grounding_ms;
            }
            AnswerEvent::Error { message, .. } => o.finish_reason = format!("error: {message}"),
        }
    }
    if q.expected() == Expected::Answer || q.expected() == Expected::CorrectPremise {
        o.source_given = q
            .source
            .as_ref()
            .map(|s| !o.sources.is_empty() && o.sources.iter().any(|id| id == s));
    }
    o
}

/// One row of the report: a question kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    pub kind: String,
    pub questions: usize,
    /// Answers that did what the question called for.
    pub correct: usize,
    pub abstained: usize,
    /// Answers that generated text.
    pub answered: usize,
    pub claims: usize,
    pub cited: usize,
    pub supported: usize,
    /// Answerable questions whose expected source was given to the model.
    pub source_given: usize,
    pub source_known: usize,
    pub ms: Vec<f64>,
}

/// The whole report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub citations: usize,
    pub citations_valid: usize,
    /// Near-miss questions abstained on / all near-miss questions.
    pub abstention_recall: f64,
    /// Near-miss abstentions / all abstentions on in-corpus and near-miss questions.
    pub abstention_precision: f64,
    /// In-corpus questions abstained on / all in-corpus questions.
    pub false_abstention: f64,
    pub grounding_ms_p50: f64,
    pub grounding_ms_max: f64,
}

fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// Scores the outcomes.
pub fn report(questions: &[DevQuestion], outcomes: &[Outcome]) -> Report {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    let mut r = Report::default();
    let mut grounding_ms = Vec::new();
    for (q, o) in questions.iter().zip(outcomes) {
        let row = rows.entry(q.kind.clone()).or_insert_with(|| Row {
            kind: q.kind.clone(),
            ..Row::default()
        });
        row.questions += 1;
        row.correct += o.correct(q.expected()) as usize;
        row.abstained += (o.finish_reason == "abstained") as usize;
        if let Some(g) = &o.grounding {
            row.answered += 1;
            row.claims += g.factual;
            row.cited += g.cited;
            row.supported += g.supported;
        }
        if let Some(given) = o.source_given {
            row.source_known += 1;
            row.source_given += given as usize;
        }
        row.ms.push(o.total_ms);
        r.citations += o.citations;
        r.citations_valid += o.citations_valid;
        grounding_ms.extend(o.grounding_ms);
    }
    let get = |k: &str| rows.get(k).cloned().unwrap_or_default();
    let (inside, near) = (get("in_corpus"), get("near_miss"));
    r.abstention_recall = near.abstained as f64 / near.questions.max(1) as f64;
    r.false_abstention = inside.abstained as f64 / inside.questions.max(1) as f64;
    r.abstention_precision =
        near.abstained as f64 / (near.abstained + inside.abstained).max(1) as f64;
    r.grounding_ms_p50 = percentile(&grounding_ms, 0.5);
    r.grounding_ms_max = grounding_ms.iter().copied().fold(0.0, f64::max);
    r.rows = rows.into_values().collect();
    r
}

/// The report as Markdown tables.
pub fn markdown(r: &Report) -> String {
    let share = |a: usize, b: usize| {
        if b == 0 {
            "-".to_string()
        } else {
            format!("{:.1}%", 100.0 * a as f64 / b as f64)
        }
    };
    let mut s = String::from(
        "| questions | n | as expected | abstained | answered | claims | cited | supported | source given | time p50 (ms) |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for row in &r.rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |\n",
            row.kind,
            row.questions,
            share(row.correct, row.questions),
            row.abstained,
            row.answered,
            row.claims,
            share(row.cited, row.claims),
            share(row.supported, row.claims),
            share(row.source_given, row.source_known),
            percentile(&row.ms, 0.5),
        ));
    }
    s.push_str(&format!(
        "\ncitation validity {} ({} of {}); abstention recall {:.1}%, precision {:.1}%, false abstentions {:.1}%; grounding report after the last token p50 {:.1} ms, max {:.1} ms\n",
        share(r.citations_valid, r.citations),
        r.citations_valid,
        r.citations,
        100.0 * r.abstention_recall,
        100.0 * r.abstention_precision,
        100.0 * r.false_abstention,
        r.grounding_ms_p50,
        r.grounding_ms_max,
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(kind: &str, finish: &str, premise: bool) -> Outcome {
        Outcome {
            id: String::new(),
            kind: kind.into(),
            finish_reason: finish.into(),
            premise_flagged: premise,
            sources: vec!["a".into()],
            source_given: None,
            citations: 2,
            citations_valid: 2,
            grounding: None,
            generated_tokens: 0,
            total_ms: 10.0,
            grounding_ms: None,
            text: String::new(),
        }
    }

    #[test]
    fn abstention_scores_count_the_right_questions() {
        let q = |kind: &str| DevQuestion {
            id: String::new(),
            kind: kind.into(),
            question: "q".into(),
            source: None,
        };
        let qs = [
            q("in_corpus"),
            q("in_corpus"),
            q("near_miss"),
            q("near_miss"),
            q("false_premise"),
        ];
        let os = [
            outcome("in_corpus", "stop", false),
            outcome("in_corpus", "abstained", false),
            outcome("near_miss", "abstained", false),
            outcome("near_miss", "length", false),
            outcome("false_premise", "stop", true),
        ];
        let r = report(&qs, &os);
        assert_eq!(r.abstention_recall, 0.5);
        assert_eq!(r.false_abstention, 0.5);
        assert_eq!(r.abstention_precision, 0.5);
        let premise = r.rows.iter().find(|r| r.kind == "false_premise").unwrap();
        assert_eq!(premise.correct, 1);
        assert!(!os[4].correct(Expected::Abstain));
        assert_eq!(r.citations_valid, 10);
    }
}
