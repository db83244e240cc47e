//! The support check: is each sentence of an answer backed by the passages it cites?
//!
//! The answer is cut into sentences as it streams ([`SentenceSplitter`]); a citation written right
//! after a sentence's end (`... surgery. [2]`) belongs to that sentence. Each finished sentence is
//! checked against the passages it cites ([`check`]):
//! - every number in it (counts, doses, percentages, months, stage numbers) must appear in them;
//! - every specific name in it (drugs, genes, trials and other proper names) must appear in them;
//! - it must not flip the polarity of the passage sentence it restates (a negation added or lost);
//! - a cure or a guarantee needs a source that speaks of one;
//! - it must be about what the passage says: its closest passage sentence clears a similarity
//!   bound (our embedder's cosine when the caller has one, content-word overlap otherwise).
//!
//! A factual sentence with no citation is flagged as uncited; questions, advice to talk with the
//! care team and short fragments (list numbers, headings) are not claims. The result of an answer
//! is a [`GroundingReport`].

use std::collections::HashSet;

use serde::Serialize;

use super::citations::Piece;

/// Why a sentence is not supported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A number the cited passages do not contain.
    Number,
    /// A drug, gene, trial or other name the cited passages do not contain.
    Name,
    /// The sentence states the opposite of the passage sentence it restates.
    Negation,
    /// A cure or a guarantee the cited passages do not speak of.
    Cure,
    /// Not about what the cited passages say.
    NotInSource,
    /// A factual sentence without a citation.
    Uncited,
}

/// The outcome for one sentence.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Verdict {
    /// A claim (false for questions, advice to see the care team, fragments).
    pub factual: bool,
    pub supported: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// What failed: the number or name missing from the sources, or the polarity cue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Best similarity of the sentence to a sentence of its cited passages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
}

impl Verdict {
    fn fine(factual: bool, similarity: Option<f32>) -> Self {
        Self {
            factual,
            supported: true,
            reason: None,
            detail: None,
            similarity,
        }
    }

    fn fail(reason: Reason, detail: Option<String>, similarity: Option<f32>) -> Self {
        Self {
            factual: true,
            supported: false,
            reason: Some(reason),
            detail,
            similarity,
        }
    }
}

/// Thresholds of the check (calibrated on `eval/support-pairs.jsonl`, see BENCHMARKS.md).
#[derive(Clone, Copy, Debug)]
pub struct SupportConfig {
    /// Least cosine (our embedder) between a sentence and its closest cited passage sentence.
    pub min_cosine: f32,
    /// Least share of the sentence's content words found in the cited passages, used when no
    /// embedding is at hand.
    pub min_overlap: f32,
    /// A sentence sharing at least this share of its content words with its cited passages is
    /// plainly about them: no embedding is computed for it.
    pub embed_below_overlap: f32,
}

impl Default for SupportConfig {
    fn default() -> Self {
        Self {
            min_cosine: 0.55,
            min_overlap: 0.5,
            embed_below_overlap: 0.4,
        }
    }
}

/// One finished sentence of an answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sentence {
    /// 0-based position in the answer.
    pub index: usize,
    /// As streamed: the words, its citation markers and the whitespace after it.
    pub text: String,
    /// 1-based passage numbers it cites, in order, without repeats.
    pub citations: Vec<usize>,
}

impl Sentence {
    /// The words without citation markers, trimmed.
    pub fn claim(&self) -> String {
        super::prompt::strip_reference_markers(&self.text)
            .trim()
            .to_string()
    }
}

/// Cuts the tracker's pieces into sentences as they stream.
#[derive(Debug, Default)]
pub struct SentenceSplitter {
    current: Sentence,
    /// The current sentence has ended; markers and whitespace still join it until a word starts.
    ended: bool,
    /// Inside `[digits, ...]` text that follows an ended sentence.
    in_marker: bool,
    /// Whitespace or a marker came after the end: it is confirmed.
    gap: bool,
    next_index: usize,
}

impl SentenceSplitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one piece; returns the sentences it finished.
    pub fn push(&mut self, piece: &Piece) -> Vec<Sentence> {
        let mut done = Vec::new();
        match piece {
            Piece::Citation(n) => {
                if !self.current.citations.contains(n) {
                    self.current.citations.push(*n);
                }
            }
            Piece::Text(text) => {
                let chars: Vec<char> = text.chars().collect();
                for &c in &chars {
                    // `1.` then `8`: a decimal point, not the end of a sentence.
                    if self.ended && !self.gap && !(c.is_whitespace() || c == '[') {
                        self.ended = false;
                    }
                    if self.ended {
                        let joins = c.is_whitespace()
                            || c == '['
                            || (self.in_marker && (c.is_ascii_digit() || c == ',' || c == ']'));
                        if joins {
                            self.gap = true;
                            if c == '[' {
                                self.in_marker = true;
                            } else if c == ']' {
                                self.in_marker = false;
                            }
                            self.current.text.push(c);
                            continue;
                        }
                        done.extend(self.take());
                    }
                    self.current.text.push(c);
                    // `.`, `!`, `?` (confirmed by the whitespace after it), or a line end.
                    if c == '\n' || matches!(c, '.' | '!' | '?') {
                        self.ended = true;
                        self.gap = c == '\n';
                    }
                }
            }
        }
        done
    }

    /// The sentence left at the end of the answer, if any.
    pub fn finish(&mut self) -> Option<Sentence> {
        self.take()
    }

    fn take(&mut self) -> Option<Sentence> {
        self.ended = false;
        self.in_marker = false;
        self.gap = false;
        let s = std::mem::take(&mut self.current);
        if s.text.trim().is_empty() && s.citations.is_empty() {
            self.current.text = s.text; // keep leading whitespace with what follows
            return None;
        }
        let index = self.next_index;
        self.next_index += 1;
        Some(Sentence { index, ..s })
    }
}

/// What the check needs of a passage, computed once per answer.
#[derive(Clone, Debug)]
pub struct PassageFacts {
    /// Lower case, for name lookups.
    lower: String,
    numbers: HashSet<String>,
    /// Numbers with the unit that follows them within a few words (`455 patients`).
    counted: Vec<(String, String)>,
    /// Every number as a value, for ratios (`35%` and `17%`: about twice).
    values: Vec<f64>,
    /// Its sentences (for polarity and similarity), with their stems.
    sentences: Vec<String>,
    sentence_stems: Vec<HashSet<String>>,
    stems: HashSet<String>,
    /// Its clauses, with the polarity of their words.
    clauses: Vec<Clause>,
    speaks_of_cure: bool,
}

impl PassageFacts {
    pub fn new(text: &str) -> Self {
        let clean = super::prompt::strip_reference_markers(text);
        let sentences: Vec<String> = super::prompt::sentences(&clean)
            .into_iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let sentence_stems: Vec<HashSet<String>> = sentences.iter().map(|s| stems(s)).collect();
        let stems_of_all: HashSet<String> = sentence_stems.iter().flatten().cloned().collect();
        let lower = clean.to_lowercase();
        let numbers = numbers(&clean, false);
        Self {
            clauses: clauses(&clean),
            values: numbers.iter().filter_map(|n| n.parse().ok()).collect(),
            numbers,
            counted: counted_within(&clean, 3),
            stems: stems_of_all,
            speaks_of_cure: CURE_WORDS.iter().any(|w| contains_word(&lower, w)),
            lower,
            sentences,
            sentence_stems,
        }
    }

    /// Whether two of the passage's numbers stand in ratio `m` (within 15%).
    fn has_ratio(&self, m: f64) -> bool {
        self.values.iter().any(|&a| {
            self.values
                .iter()
                .any(|&b| b > 0.0 && (a / b / m - 1.0).abs() <= 0.15)
        })
    }

    /// Whether the passage speaks of a cure (or a guarantee).
    pub fn speaks_of_cure(&self) -> bool {
        self.speaks_of_cure
    }

    /// The passage's sentences (what a caller embeds for the similarity bound).
    pub fn sentences(&self) -> &[String] {
        &self.sentences
    }
}

/// Checks one sentence. `cited` are the facts of the passages it cites; `cosine`, when the
/// caller embedded the sentence and the cited passages' sentences, is the best cosine between
/// them.
pub fn check(
    sentence: &str,
    cited: &[&PassageFacts],
    cosine: Option<f32>,
    cfg: &SupportConfig,
) -> Verdict {
    let claim = super::prompt::strip_reference_markers(sentence);
    let claim = strip_list_marker(claim.trim());
    if !is_factual(claim) {
        return Verdict::fine(false, None);
    }
    if cited.is_empty() {
        return Verdict::fail(Reason::Uncited, None, None);
    }
    let overlap = overlap(claim, cited);
    let similarity = cosine.or(Some(overlap));

    let lower = claim.to_lowercase();
    for n in numbers(claim, true) {
        let found = cited.iter().any(|p| p.numbers.contains(&n))
            || multiple_of(claim, &n).is_some_and(|m| cited.iter().any(|p| p.has_ratio(m)));
        if !found {
            return Verdict::fail(Reason::Number, Some(n), similarity);
        }
    }
    // A count or a duration must count the same thing: `13 years` is not backed by `13 deaths`.
    for (n, unit) in counted(claim) {
        if !cited
            .iter()
            .any(|p| p.counted.iter().any(|(m, u)| *m == n && *u == unit))
        {
            return Verdict::fail(Reason::Number, Some(format!("{n} {unit}")), similarity);
        }
    }
    for name in names(claim) {
        let l = name.to_lowercase();
        if !cited.iter().any(|p| contains_name(&p.lower, &l)) {
            return Verdict::fail(Reason::Name, Some(name), similarity);
        }
    }
    if CURE_WORDS.iter().any(|w| contains_word(&lower, w))
        && !cited.iter().any(|p| p.speaks_of_cure)
    {
        return Verdict::fail(Reason::Cure, None, similarity);
    }
    if let Some(w) = CERTAINTY
        .iter()
        .find(|w| contains_word(&lower, w) && !cited.iter().any(|p| contains_word(&p.lower, w)))
    {
        return Verdict::fail(Reason::Cure, Some(w.to_string()), similarity);
    }
    // Polarity: a word the claim asserts that the passages only deny (or the reverse), or a
    // word whose opposite the passages use instead.
    if let Some(cue) = polarity_conflict(claim, cited) {
        return Verdict::fail(Reason::Negation, Some(cue), similarity);
    }
    let close_enough = match cosine {
        Some(c) => c >= cfg.min_cosine,
        None => overlap >= cfg.min_overlap,
    };
    if !close_enough {
        return Verdict::fail(Reason::NotInSource, None, similarity);
    }
    Verdict::fine(true, similarity)
}

/// Names in `question` (drugs, genes, trials, other proper names) that none of `passages`
/// mentions.
pub fn uncovered_names(question: &str, passages: &[&str]) -> Vec<String> {
    let lower: Vec<String> = passages.iter().map(|p| p.to_lowercase()).collect();
    names(question)
        .into_iter()
        .filter(|n| {
            let l = n.to_lowercase();
            !lower.iter().any(|p| contains_name(p, &l))
        })
        .collect()
}

/// What a question takes for granted, as a statement: `Why does X help?` -> `X help`,
/// `Since X, ...` / `Given that X, ...` -> `X`. None for questions that assume nothing.
pub fn premise_of(question: &str) -> Option<String> {
    let q = question.trim().trim_end_matches(['?', '.', '!']).trim();
    let lower = q.to_lowercase();
    for lead in ["since ", "given that ", "because ", "as ", "now that "] {
        if let Some(rest) = lower.strip_prefix(lead) {
            let start = lead.len();
            let end = rest.find(',').map_or(q.len(), |c| start + c);
            return Some(q[start..end].trim().to_string()).filter(|p| !p.is_empty());
        }
    }
    // `X, so why ...?`: X is taken for granted.
    if let Some(at) = lower.find(", so ") {
        return Some(q[..at].trim().to_string()).filter(|p| !p.is_empty());
    }
    for lead in [
        "why do ",
        "why does ",
        "why did ",
        "why is ",
        "why are ",
        "why was ",
        "why were ",
        "why would ",
        "why should ",
        "why can ",
        "why will ",
        "how come ",
    ] {
        if lower.starts_with(lead) {
            return Some(q[lead.len()..].trim().to_string()).filter(|p| !p.is_empty());
        }
    }
    None
}

/// Share of the content stems of `sentence` (markers removed) found in the cited passages.
pub fn overlap(sentence: &str, cited: &[&PassageFacts]) -> f32 {
    let claim = super::prompt::strip_reference_markers(sentence);
    let claim_stems = stems(&claim);
    if claim_stems.is_empty() {
        return 1.0;
    }
    let found = claim_stems
        .iter()
        .filter(|s| cited.iter().any(|p| p.stems.contains(*s)))
        .count();
    found as f32 / claim_stems.len() as f32
}

/// Whether the similarity bound needs the embedder for this sentence, and if so the cited
/// sentences to compare it with: the `k` sharing the most content words with it.
pub fn embedding_candidates<'p>(
    sentence: &str,
    cited: &[&'p PassageFacts],
    cfg: &SupportConfig,
    k: usize,
) -> Option<Vec<&'p str>> {
    if overlap(sentence, cited) >= cfg.embed_below_overlap {
        return None;
    }
    let claim = stems(&super::prompt::strip_reference_markers(sentence));
    let mut scored: Vec<(usize, usize, &str)> = cited
        .iter()
        .flat_map(|p| p.sentences.iter().zip(&p.sentence_stems))
        .enumerate()
        .map(|(i, (s, st))| (st.intersection(&claim).count(), i, s.as_str()))
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    Some(scored.into_iter().take(k).map(|(_, _, s)| s).collect())
}

/// Cited sentences an embedding is compared with.
pub const EMBEDDING_CANDIDATES: usize = 2;

/// One sentence's line in the report.
#[derive(Clone, Debug, Serialize)]
pub struct SentenceReport {
    pub index: usize,
    pub text: String,
    pub citations: Vec<usize>,
    #[serde(flatten)]
    pub verdict: Verdict,
    /// Held back from the client (the `withhold` mode).
    pub withheld: bool,
}

/// The grounding of a whole answer, sent with its last event.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GroundingReport {
    /// `flag` (unsupported sentences are sent and reported) or `withhold` (not sent).
    pub mode: String,
    pub sentences: usize,
    /// Sentences that make a claim.
    pub factual: usize,
    /// Claims with at least one citation.
    pub cited: usize,
    /// Cited claims that passed every check.
    pub supported: usize,
    /// Claims that failed a check (uncited ones included), with the reason.
    pub unsupported: Vec<SentenceReport>,
    pub withheld: usize,
}

impl GroundingReport {
    pub fn new(mode: &str) -> Self {
        Self {
            mode: mode.to_string(),
            ..Self::default()
        }
    }

    /// Adds one checked sentence.
    pub fn add(&mut self, sentence: &Sentence, verdict: Verdict, withheld: bool) {
        self.sentences += 1;
        if verdict.factual {
            self.factual += 1;
            if !sentence.citations.is_empty() {
                self.cited += 1;
            }
            if verdict.supported {
                self.supported += 1;
            }
        }
        if withheld {
            self.withheld += 1;
        }
        if !verdict.supported {
            self.unsupported.push(SentenceReport {
                index: sentence.index,
                text: sentence.claim(),
                citations: sentence.citations.clone(),
                verdict,
                withheld,
            });
        }
    }
}

/// Words of cure and certainty: a sentence using one needs a source that does.
pub const CURE_WORDS: &[&str] = &[
    "cure",
    "cures",
    "cured",
    "curing",
    "curable",
    "curative",
    "guarantee",
    "guaranteed",
    "guarantees",
];

/// Words that turn a statement around (negations and their near kin).
const NEGATIONS: &[&str] = &[
    "not", "no", "never", "cannot", "against", "none", "neither", "nor", "nothing", "rarely",
    "seldom", "unlikely", "unable", "lack", "lacks", "lacking", "fail", "fails", "failed",
    "rather", "little",
];

/// Content words a negation cue reaches (the next ones in its clause).
const NEGATION_REACH: usize = 1;

/// One clause: its content stems, each with whether a negation reaches it.
#[derive(Clone, Debug, Default)]
struct Clause {
    terms: Vec<(String, bool)>,
    stems: HashSet<String>,
}

impl Clause {
    /// Polarity of `stem` here: Some(negated) when present (negated if any occurrence is).
    fn polarity(&self, stem: &str) -> Option<bool> {
        let mut found = None;
        for (s, n) in &self.terms {
            if s == stem {
                found = Some(found.unwrap_or(false) || *n);
            }
        }
        found
    }
}

/// Clauses of `text` (cut at punctuation and at `but`, `while`, `whereas`, `although`;
/// bracketed asides are clauses of their own) with their stems and polarity: a cue negates the
/// next [`NEGATION_REACH`] content words of its clause; `un...` and `non...` words also count as
/// their stem negated (`uncommon` = `common` denied).
fn clauses(text: &str) -> Vec<Clause> {
    let mut out = Vec::new();
    // Asides first, so `X (the main endpoint) was not different` stays one clause.
    let mut main = String::with_capacity(text.len());
    let mut aside = String::new();
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '(' => {
                depth += 1;
                aside.push('\n');
            }
            ')' if depth > 0 => depth -= 1,
            _ if depth > 0 => aside.push(c),
            _ => main.push(c),
        }
    }
    for part in [main.as_str(), aside.as_str()] {
        for piece in part.split([',', ';', ':', '.', '!', '?', '\n', '—']) {
            let mut clause = Clause::default();
            let mut reach = 0;
            let ws: Vec<String> = words(piece)
                .flat_map(|w| w.split(['-', '/']))
                .map(|w| w.to_lowercase())
                .collect();
            for (i, l) in ws.iter().enumerate() {
                let l = l.as_str();
                let also = l == "also" && i > 0 && ws[i - 1] == "and";
                if ["but", "although", "while", "whereas"].contains(&l) || also {
                    if !clause.terms.is_empty() {
                        out.push(std::mem::take(&mut clause));
                    }
                    reach = 0;
                    continue;
                }
                // `not been shown to help`: the negation passes through these.
                if TRANSPARENT.contains(&l) {
                    continue;
                }
                // `no longer X` denies X.
                if l == "longer" && i > 0 && ws[i - 1] == "no" {
                    continue;
                }
                if NEGATIONS.contains(&l) || l.ends_with("n't") || l.ends_with("n’t") {
                    reach = NEGATION_REACH;
                    continue;
                }
                // Adverbs (`significantly`) neither count nor take the negation.
                if l.len() > 5 && l.ends_with("ly") {
                    continue;
                }
                let Some(stem) = stem_of(l) else { continue };
                let negated = reach > 0;
                reach = reach.saturating_sub(1);
                for prefix in ["non", "un"] {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        if rest.len() >= 4 {
                            if let Some(r) = stem_of(rest) {
                                clause.stems.insert(r.clone());
                                clause.terms.push((r, !negated));
                            }
                        }
                        break;
                    }
                }
                clause.stems.insert(stem.clone());
                clause.terms.push((stem, negated));
            }
            if !clause.terms.is_empty() {
                out.push(clause);
            }
        }
    }
    out
}

/// The passage clauses that best match `claim` on its stems other than `except`, with the
/// share matched; none below half.
fn aligned<'c>(
    claim: &Clause,
    except: impl Fn(&str) -> bool,
    candidates: impl Iterator<Item = &'c Clause>,
    least: f32,
) -> (Vec<&'c Clause>, f32) {
    let others: Vec<&String> = claim.stems.iter().filter(|s| !except(s)).collect();
    let mut best: Vec<&Clause> = Vec::new();
    let mut best_share = least;
    for c in candidates {
        let share = if others.is_empty() {
            1.0
        } else {
            others.iter().filter(|s| c.stems.contains(**s)).count() as f32 / others.len() as f32
        };
        if share > best_share + 1e-6 {
            best = vec![c];
            best_share = share;
        } else if (share - best_share).abs() <= 1e-6 {
            best.push(c);
        }
    }
    (best, best_share)
}

/// The index's stem of one content word (None for stop words, numbers and short words).
fn stem_of(word: &str) -> Option<String> {
    if word.chars().filter(|c| c.is_alphabetic()).count() < 3 || FUNCTION_WORDS.contains(&word) {
        return None;
    }
    let stem = crate::index::bm25::terms(word)
        .into_iter()
        .next()
        .filter(|t| t.chars().all(|c| c.is_alphabetic()))?;
    // Words of the same meaning compare as one (`not suitable` against `appropriate`).
    Some(
        SYNONYMS
            .iter()
            .find(|group| group[1..].contains(&stem.as_str()))
            .map_or(stem, |group| group[0].to_string()),
    )
}

/// Stems of the same meaning in statements about care, the first standing for the group.
const SYNONYMS: &[&[&str]] = &[
    &["suit", "suitabl", "appropri", "fit"],
    &[
        "requir",
        "obligatori",
        "mandatori",
        "compulsori",
        "necessari",
    ],
    &["use", "adopt", "employ"],
    &["improv", "prolong", "lengthen", "extend"],
];

/// Words that carry grammar, not content (beyond the index's own stop words).
const FUNCTION_WORDS: &[&str] = &[
    "someone",
    "anyone",
    "everyone",
    "somebody",
    "anybody",
    "everybody",
    "something",
    "anything",
    "everything",
    "has",
    "have",
    "had",
    "having",
    "been",
    "being",
    "were",
    "was",
    "are",
    "would",
    "could",
    "should",
    "may",
    "might",
    "can",
    "must",
    "shall",
    "does",
    "did",
    "done",
    "doing",
    "between",
    "who",
    "whom",
    "which",
    "whose",
    "what",
    "when",
    "where",
    "than",
    "its",
    "our",
    "your",
    "his",
    "her",
    "hers",
    "them",
    "those",
    "one",
    "two",
    "around",
    "about",
    "from",
    "over",
    "under",
    "into",
    "onto",
    "upon",
    "via",
    "per",
    "each",
    "every",
    "any",
    "some",
    "all",
    "both",
    "more",
    "most",
    "much",
    "many",
    "other",
    "such",
    "very",
    "just",
    "only",
    "own",
    "still",
    "after",
    "before",
    "during",
    "within",
    "without",
    "while",
    "then",
    "thus",
    "so",
    "too",
    "also",
    "even",
    "ever",
    "whether",
    "because",
    "since",
    "until",
    "how",
    "why",
    "get",
    "gets",
    "got",
    "give",
    "gave",
    "given",
    "make",
    "made",
    "people",
    "person",
    "patients",
    "patient",
];

/// Whether `word` (lower case) carries grammar rather than content.
fn is_function_word(word: &str) -> bool {
    FUNCTION_WORDS.contains(&word)
}

/// Words of asking rather than of the subject (`explain in detail`, `please tell me`).
const ASKING_WORDS: &[&str] = &[
    "explain",
    "explained",
    "describe",
    "tell",
    "telling",
    "detail",
    "details",
    "detailed",
    "please",
    "thanks",
    "thank",
    "hello",
    "understand",
    "know",
    "want",
    "wondering",
    "wonder",
    "question",
    "questions",
    "answer",
    "answers",
    "information",
    "info",
    "simple",
    "simply",
    "words",
    "briefly",
    "summary",
    "summarise",
    "summarize",
    "overview",
    "mean",
    "means",
];

/// Whether `word` (lower case) belongs to the asking, not to what is asked about.
pub fn is_asking_word(word: &str) -> bool {
    is_function_word(word) || ASKING_WORDS.contains(&word)
}

/// Words a negation reaches through to the word it denies.
const TRANSPARENT: &[&str] = &[
    "shown",
    "proven",
    "known",
    "seen",
    "expected",
    "likely",
    "able",
    "seem",
    "seems",
    "appear",
    "appears",
    "necessarily",
    "always",
    "yet",
    "also",
    "reach",
    "reached",
    "statistical",
    "read",
];

/// Pairs of words with opposite meaning in claims about results and recommendations.
const OPPOSITES: &[(&str, &str)] = &[
    ("lower", "higher"),
    ("shorter", "longer"),
    ("fewer", "more"),
    ("increase", "decrease"),
    ("increase", "reduce"),
    ("better", "worse"),
    ("improve", "worsen"),
    ("rare", "common"),
    ("early", "late"),
    ("excluded", "eligible"),
    ("excluded", "included"),
    ("mandatory", "optional"),
    ("kept", "withdrawn"),
    ("approved", "withdrawn"),
    ("lower", "rise"),
    ("lower", "increase"),
    ("positive", "negative"),
    ("benign", "malignant"),
    ("above", "below"),
    ("older", "younger"),
    ("recommend", "against"),
    ("rise", "fall"),
];

/// Stems of words that claim an effect of a treatment or a test.
const EFFECTS: &[&str] = &[
    "improv",
    "benefit",
    "help",
    "prolong",
    "extend",
    "lengthen",
    "better",
    "superior",
    "prove",
    "effect",
    "work",
    "success",
    "advantag",
    "gain",
    "outperform",
    "caus",
    "proof",
];

/// Stems saying two things were alike (no effect).
const SAMENESS: &[&str] = &["similar", "ident", "comparabl", "same", "equival"];

/// Words of absolute certainty: a claim using one needs a source that uses it too.
const CERTAINTY: &[&str] = &[
    "always",
    "guarantee",
    "guarantees",
    "guaranteed",
    "certainly",
    "definitely",
    "never fails",
    "100%",
];

/// Least share of a claim clause's other words a passage clause must hold to be compared for
/// the polarity of a shared word ...
const ALIGN_SAME_WORD: f32 = 0.15;
/// ... and for an effect the claim asserts.
const ALIGN_EFFECT: f32 = 0.25;

/// The cue of a polarity conflict between a claim and its sources, if any.
fn polarity_conflict(claim: &str, cited: &[&PassageFacts]) -> Option<String> {
    let claim_clauses = clauses(claim);
    let all = || cited.iter().flat_map(|p| p.clauses.iter());
    let is_effect = |s: &str| EFFECTS.iter().any(|e| s.starts_with(e));
    for c in &claim_clauses {
        for (stem, negated) in &c.terms {
            // The same word, in the passage clause saying the same thing, with the other polarity.
            let (best, _) = aligned(
                c,
                |s| s == stem,
                all().filter(|k| k.stems.contains(stem)),
                ALIGN_SAME_WORD,
            );
            if !best.is_empty() && best.iter().all(|k| k.polarity(stem) == Some(!negated)) {
                return Some(if *negated {
                    format!("not {stem}")
                } else {
                    stem.clone()
                });
            }
            // An effect asserted where the matching passage clause denies one or finds sameness.
            if !negated && is_effect(stem) {
                let (best, _) = aligned(c, is_effect, all(), ALIGN_EFFECT);
                let denies = |k: &&Clause| {
                    k.terms.iter().any(|(s, n)| {
                        (*n && (is_effect(s) || s.starts_with("differ")))
                            || SAMENESS.iter().any(|x| s.starts_with(x))
                    }) && k.polarity(stem) != Some(false)
                };
                if !best.is_empty() && best.iter().all(denies) {
                    return Some(stem.clone());
                }
            }
        }
    }
    // A word asserted here, absent from the sources, whose opposite they use.
    for (stem, negated) in claim_clauses.iter().flat_map(|c| c.terms.iter()) {
        if *negated || cited.iter().any(|p| p.stems.contains(stem)) {
            continue;
        }
        for (a, b) in OPPOSITES {
            let (sa, sb) = (stem_of(a), stem_of(b));
            let other = if sa.as_deref() == Some(stem.as_str()) {
                sb
            } else if sb.as_deref() == Some(stem.as_str()) {
                sa
            } else {
                continue;
            };
            if other.is_some_and(|o| cited.iter().any(|p| p.stems.contains(&o))) {
                return Some(stem.clone());
            }
        }
    }
    None
}

/// Claims exclude questions, advice to see the care team and fragments.
fn is_factual(claim: &str) -> bool {
    let lower = claim.to_lowercase();
    let n_words = words(claim).count();
    if n_words < 4 || claim.ends_with('?') || claim.ends_with(':') || claim.starts_with('#') {
        return false;
    }
    const ADVICE: &[&str] = &[
        "your care team",
        "your doctor",
        "your oncologist",
        "your nurse",
        "your health care",
        "your healthcare",
        "not medical advice",
        "ask your",
        "talk with your",
        "talk to your",
        "the sources do not",
        "the corpus holds no",
    ];
    !ADVICE.iter().any(|a| lower.contains(a))
}

/// `1. `, `- `, `* ` at the start of a list item.
fn strip_list_marker(s: &str) -> &str {
    let t = s.trim_start_matches(['-', '*', '•']).trim_start();
    let digits = t.chars().take_while(|c| c.is_ascii_digit()).count();
    if digits > 0 && digits < 3 {
        if let Some(rest) = t[digits..]
            .strip_prefix(". ")
            .or(t[digits..].strip_prefix(") "))
        {
            return rest.trim_start();
        }
    }
    t
}

/// Words: runs of letters and digits, joined by an inner `-`, `.`, `,`, `/` or `'`.
fn words(text: &str) -> impl Iterator<Item = &str> {
    let mut out = Vec::new();
    let bytes: Vec<(usize, char)> = text.char_indices().collect();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].1.is_alphanumeric() {
            i += 1;
            continue;
        }
        let start = bytes[i].0;
        let mut j = i + 1;
        loop {
            while j < bytes.len() && bytes[j].1.is_alphanumeric() {
                j += 1;
            }
            let joins = j + 1 < bytes.len()
                && matches!(bytes[j].1, '-' | '.' | ',' | '/' | '\'' | '’')
                && bytes[j + 1].1.is_alphanumeric()
                // `2,225` joins; `word,word` does not.
                && (bytes[j].1 != ',' || (bytes[j - 1].1.is_ascii_digit() && bytes[j + 1].1.is_ascii_digit()));
            if joins {
                j += 2;
            } else {
                break;
            }
        }
        let end = bytes.get(j).map_or(text.len(), |&(b, _)| b);
        out.push(&text[start..end]);
        i = j;
    }
    out.into_iter()
}

/// Numbers, normalised: `2,225` -> `2225`, `12.8`, stage numerals `IV` -> `4`, number words ->
/// digits (`twice`, `triples` too). Parts of names (`HER2`, `BRCA1/2`, `t(12;16)`) are names,
/// not numbers. In a `claim`, `one` and `two` are not read as numbers (`one person`, `the two
/// groups`); in a source they are, so a claim's `1` or `2` can match them.
fn numbers(text: &str, claim: bool) -> HashSet<String> {
    let mut out = HashSet::new();
    let ws: Vec<&str> = words(text).collect();
    for (i, w) in ws.iter().enumerate() {
        let prev = i
            .checked_sub(1)
            .map(|p| ws[p].to_lowercase())
            .unwrap_or_default();
        let chars: Vec<char> = w.chars().collect();
        let coded = chars.windows(2).any(|p| {
            (p[0].is_alphabetic() && p[1].is_ascii_digit())
                || (p[0].is_ascii_digit() && p[1].is_alphabetic())
        });
        // `HER2`, `BRCA1/2`, `PD-L1` are names; `18-60` and `1.5-fold` hold numbers.
        for part in w.split(['-', '/']).filter(|_| !coded) {
            if !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == ',' || c == '.')
            {
                // Only whole numeric words or numeric parts of ranges (`18-60`), not `HER2`.
                let n = part.replace(',', "");
                let n = n.trim_end_matches('.');
                if !n.is_empty() {
                    out.insert(canonical_number(n));
                }
            }
        }
        if let Some(n) = roman(w) {
            let staged =
                ["stage", "stages", "grade", "phase", "type", "class"].contains(&prev.as_str());
            if staged || w.len() > 1 {
                out.insert(n.to_string());
            }
        }
        for part in w.to_lowercase().split('-') {
            if let Some(n) = number_word(part).filter(|&n| !claim || n > 2 || part == "twice") {
                out.insert(n.to_string());
            }
        }
    }
    out
}

/// Units that say what a number counts or measures.
const UNITS: &[&str] = &[
    "month", "year", "week", "day", "hour", "gy", "mg", "patient", "peopl", "person", "particip",
    "men", "women", "children", "adult", "death", "case", "session", "fraction", "centr", "center",
    "hospit", "countri", "site", "trial", "studi", "dose", "cycl",
];

/// Units that count the same thing, by the first of each group.
fn unit_class(stem: &str) -> &str {
    const SAME: &[&[&str]] = &[
        &["patient", "peopl", "person", "particip", "adult"],
        &["session", "fraction"],
        &["centr", "center", "hospit", "site"],
    ];
    SAME.iter()
        .find(|group| group.iter().any(|u| stem.starts_with(u)))
        .map_or(stem, |group| group[0])
}

/// Numbers immediately followed by a unit word, as (number, unit stem).
fn counted(text: &str) -> Vec<(String, String)> {
    counted_within(text, 1)
}

/// Numbers with a unit word among the next `reach` words, as (number, unit stem).
fn counted_within(text: &str, reach: usize) -> Vec<(String, String)> {
    let ws: Vec<&str> = text
        .split(|c: char| {
            c.is_whitespace() || matches!(c, '–' | '—' | '-' | '/' | '(' | ')' | ';' | ':')
        })
        .filter(|w| !w.is_empty())
        .collect();
    let mut out = Vec::new();
    for (i, w) in ws.iter().enumerate() {
        let w = w.trim_end_matches([',', '.', '%']);
        if w.is_empty()
            || !w
                .chars()
                .all(|c| c.is_ascii_digit() || c == ',' || c == '.')
        {
            continue;
        }
        let n = canonical_number(&w.replace(',', ""));
        for next in ws.iter().skip(i + 1).take(reach) {
            let next = next
                .trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase();
            let Some(stem) = crate::index::bm25::terms(&next).into_iter().next() else {
                continue;
            };
            if UNITS.iter().any(|u| stem.starts_with(u)) {
                out.push((n.clone(), unit_class(&stem).to_string()));
                break;
            }
        }
    }
    out
}

/// The multiple a number word in `claim` states (`twice` -> 2), when `n` came from one.
fn multiple_of(claim: &str, n: &str) -> Option<f64> {
    words(claim)
        .map(|w| w.to_lowercase())
        .filter(|w| WORDS_OF_MULTIPLES.contains(&w.as_str()))
        .find_map(|w| number_word(&w).filter(|m| m.to_string() == n))
        .map(f64::from)
}

const WORDS_OF_MULTIPLES: &[&str] = &[
    "twice",
    "double",
    "doubles",
    "doubled",
    "twofold",
    "triple",
    "triples",
    "tripled",
    "threefold",
    "quadruple",
    "quadruples",
    "quadrupled",
    "fourfold",
];

/// `12.80` -> `12.8`, `05` -> `5`.
fn canonical_number(n: &str) -> String {
    match n.parse::<f64>() {
        Ok(x) if n.contains('.') => format!("{x}"),
        Ok(_) => n.trim_start_matches('0').to_string().max("0".to_string()),
        Err(_) => n.to_string(),
    }
}

fn roman(w: &str) -> Option<u32> {
    Some(match w {
        "I" => 1,
        "II" => 2,
        "III" => 3,
        "IV" => 4,
        "V" => 5,
        "VI" => 6,
        _ => return None,
    })
}

fn number_word(w: &str) -> Option<u32> {
    const WORDS: &[&str] = &[
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve",
    ];
    if let Some(p) = WORDS.iter().position(|&x| x == w) {
        return Some(p as u32);
    }
    Some(match w {
        "twice" | "double" | "doubles" | "doubled" | "twofold" => 2,
        "triple" | "triples" | "tripled" | "threefold" => 3,
        "quadruple" | "quadruples" | "quadrupled" | "fourfold" => 4,
        _ => return None,
    })
}

/// Names the sources must contain: drugs (by the stems of their international names), genes
/// and trials (capitals or letter-digit mixes: `HER2`, `EORTC`, `GeDDiS`), and capitalised
/// words inside a sentence.
fn names(claim: &str) -> Vec<String> {
    super::prompt::sentences(claim)
        .into_iter()
        .flat_map(|s| s.split(':'))
        .flat_map(names_in_sentence)
        .collect()
}

/// [`names`] of one sentence: its first word's capital is the sentence's, not a name's.
fn names_in_sentence(claim: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, w) in words(claim).enumerate() {
        let w = w.trim_end_matches("'s").trim_end_matches("’s");
        let letters = w.chars().filter(|c| c.is_alphabetic()).count();
        if letters == 0 || roman(w).is_some() {
            continue;
        }
        let upper = w.chars().filter(|c| c.is_uppercase()).count();
        let digits = w.chars().any(|c| c.is_ascii_digit());
        let lower = w.to_lowercase();
        let drug = letters >= 6 && DRUG_STEMS.iter().any(|s| lower.ends_with(s));
        let coded = upper >= 2 || (digits && letters >= 1);
        let proper = i > 0
            && w.chars().next().is_some_and(|c| c.is_uppercase())
            && letters >= 4
            && !COMMON_CAPITALISED.contains(&lower.as_str());
        if drug || coded || proper {
            out.push(w.to_string());
        }
    }
    out
}

/// Endings of international nonproprietary drug names common in oncology.
const DRUG_STEMS: &[&str] = &[
    "mab",
    "nib",
    "lib",
    "parib",
    "platin",
    "rubicin",
    "taxel",
    "fosfamide",
    "tecan",
    "mycin",
    "citabine",
    "trexate",
    "cristine",
    "blastine",
    "vinorelbine",
    "poside",
    "zomib",
    "lidomide",
    "trozole",
    "xifene",
    "lutamide",
    "relin",
    "rafenib",
    "ciclib",
    "tinib",
    "dacarbazine",
    "trabectedin",
    "eribulin",
    "temozolomide",
    "fluorouracil",
    "leucovorin",
    "mustine",
    "cyclophosphamide",
    "imatinib",
    "cept",
    "olimus",
    "statin",
    "sertib",
    "degib",
    "lisib",
    "abiraterone",
    "mesna",
    "anthracycline",
];

/// Capitalised words that are not names.
const COMMON_CAPITALISED: &[&str] = &[
    "stage",
    "stages",
    "grade",
    "phase",
    "type",
    "this",
    "these",
    "that",
    "those",
    "there",
    "they",
    "their",
    "when",
    "with",
    "while",
    "after",
    "before",
    "about",
    "some",
    "most",
    "many",
    "people",
    "patients",
    "your",
    "also",
    "however",
    "because",
    "overall",
    "median",
    "treatment",
    "surgery",
    "cancer",
    "sarcoma",
    "doctors",
    "source",
    "sources",
];

/// True when `word` occurs in `lower` on word boundaries.
fn contains_word(lower: &str, word: &str) -> bool {
    lower.match_indices(word).any(|(at, _)| {
        let before = lower[..at].chars().next_back();
        let after = lower[at + word.len()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric()) && !after.is_some_and(|c| c.is_alphanumeric())
    })
}

/// A name is found when it occurs at a word start (plural and possessive endings allowed).
fn contains_name(lower: &str, name: &str) -> bool {
    // `GISTs` is found as `GIST`.
    if let Some(singular) = name.strip_suffix('s').filter(|s| s.len() >= 3) {
        if contains_name(lower, singular) {
            return true;
        }
    }
    lower.match_indices(name).any(|(at, _)| {
        let before = lower[..at].chars().next_back();
        let rest = &lower[at + name.len()..];
        let ending = rest
            .chars()
            .take_while(|c| c.is_alphanumeric())
            .collect::<String>();
        !before.is_some_and(|c| c.is_alphanumeric())
            && ["", "s", "es", "an", "n", "'s"].contains(&ending.as_str())
    })
}

/// Content stems (the lexical index's analyzer: lower case, no stop words, English stems).
fn stems(text: &str) -> HashSet<String> {
    crate::index::bm25::terms(text)
        .into_iter()
        .filter(|t| t.chars().any(|c| c.is_alphabetic()))
        .collect()
}

/// The largest dot product of `v` with any of `others` (cosines of normalised embeddings);
/// 0 when there are none.
pub fn best_cosine(v: &[f32], others: &[Vec<f32>]) -> f32 {
    others
        .iter()
        .map(|o| o.iter().zip(v).map(|(a, b)| a * b).sum::<f32>())
        .fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSAGE: &str = "The EORTC 62012 trial randomised 455 patients aged 18 to 60. \
        Overall survival was not significantly different: median 12.8 months with doxorubicin \
        alone and 14.3 months with the combination [3]. Tumour shrinkage was about twice as \
        frequent with the combination (26% vs 14%).";

    fn verdict(sentence: &str) -> Verdict {
        let facts = PassageFacts::new(PASSAGE);
        check(sentence, &[&facts], None, &SupportConfig::default())
    }

    #[test]
    fn faithful_restatements_pass() {
        for s in [
            "The EORTC 62012 trial included 455 patients aged 18 to 60 [1].",
            "Median overall survival was 12.8 months with doxorubicin alone and 14.3 months with the combination, not significantly different [1].",
            "Tumours shrank about twice as often with the combination, 26% versus 14% [1].",
        ] {
            let v = verdict(s);
            assert!(v.supported, "{s}: {v:?}");
            assert!(v.factual);
        }
    }

    #[test]
    fn changed_numbers_names_and_polarity_fail() {
        let cases = [
            (
                "The EORTC 62012 trial included 545 patients aged 18 to 60 [1].",
                Reason::Number,
                "545",
            ),
            (
                "Median overall survival was 12.8 months with gemcitabine alone [1].",
                Reason::Name,
                "gemcitabine",
            ),
            (
                "The EORTC 62931 trial randomised 455 patients [1].",
                Reason::Number,
                "62931",
            ),
            (
                "Overall survival was significantly different with doxorubicin alone and with the combination [1].",
                Reason::Negation,
                "differ",
            ),
        ];
        for (s, reason, detail) in cases {
            let v = verdict(s);
            assert!(!v.supported, "{s}");
            assert_eq!(v.reason, Some(reason), "{s}");
            assert_eq!(v.detail.as_deref(), Some(detail), "{s}");
        }
        let v = verdict("The combination cures sarcoma in most patients with the trial [1].");
        assert_eq!(v.reason, Some(Reason::Cure));
        let v = verdict(
            "Lymphedema after radiotherapy of the armpit can be eased by compression sleeves [1].",
        );
        assert_eq!(v.reason, Some(Reason::NotInSource));
    }

    #[test]
    fn claims_need_citations_and_advice_does_not() {
        let facts = PassageFacts::new(PASSAGE);
        let cfg = SupportConfig::default();
        let v = check(
            "Doxorubicin alone gave a median survival of 12.8 months.",
            &[],
            None,
            &cfg,
        );
        assert_eq!(v.reason, Some(Reason::Uncited));
        for s in [
            "What does this mean for me?",
            "Ask your care team whether the combination fits your goals.",
            "1.",
            "Bottom line:",
        ] {
            let v = check(s, &[&facts], None, &cfg);
            assert!(!v.factual && v.supported, "{s}");
        }
    }

    #[test]
    fn capitals_that_start_a_sentence_are_not_names() {
        assert_eq!(
            names("Case 3. Explain in detail: Surgery first. Then ask about Trabectedin and HER2."),
            ["Trabectedin", "HER2"]
        );
    }

    #[test]
    fn numbers_are_normalised() {
        let n = numbers("A study of 2,225 patients; stage IV; 12.80 months; one year; HER2 and BRCA1/2; ages 18-60.", false);
        for x in ["2225", "4", "12.8", "1", "18", "60"] {
            assert!(n.contains(x), "{x} in {n:?}");
        }
        assert!(!n.contains("2"), "HER2 and BRCA1/2 are names: {n:?}");
    }

    fn split(pieces: &[Piece]) -> Vec<(String, Vec<usize>)> {
        let mut s = SentenceSplitter::new();
        let mut out: Vec<Sentence> = pieces.iter().flat_map(|p| s.push(p)).collect();
        out.extend(s.finish());
        out.into_iter().map(|s| (s.text, s.citations)).collect()
    }

    #[test]
    fn splitter_attaches_markers_after_the_full_stop() {
        let t = |s: &str| Piece::Text(s.to_string());
        let got = split(&[
            t("Surgery comes first [1]"),
            Piece::Citation(1),
            t(". Doses of 2.5 mg"),
            t(" are used. [2]"),
            Piece::Citation(2),
            t(" Then\n- a list item"),
            t(" [3, 1]"),
            Piece::Citation(3),
            Piece::Citation(1),
            t("\nRates are 1."),
            t("8 per 100,000. End"),
        ]);
        assert_eq!(
            got,
            vec![
                ("Surgery comes first [1]. ".to_string(), vec![1]),
                ("Doses of 2.5 mg are used. [2] ".to_string(), vec![2]),
                ("Then\n".to_string(), vec![]),
                ("- a list item [3, 1]\n".to_string(), vec![3, 1]),
                ("Rates are 1.8 per 100,000. ".to_string(), vec![]),
                ("End".to_string(), vec![]),
            ]
        );
    }
}
