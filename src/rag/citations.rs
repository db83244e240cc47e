//! Citation markers in streamed text. The model cites with `[n]` (or `[n, m]`); the tracker
//! watches the generated text as it streams, holds back a possible marker until it closes, and
//! turns each complete marker into citation events for the passages it names. A number that was
//! not given to the model as a passage is dropped, never passed through; a marker left with no
//! valid number disappears from the text. Only generated text goes through here, so every
//! citation is one the model wrote.

use std::sync::Arc;

use crate::ops::sampling::LogitsProcessor;

/// What the tracker releases: text for the client, or a citation right after its marker's text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// 1-based passage number.
    Citation(usize),
}

/// The longest bracketed run still considered a possible marker.
const MAX_MARKER: usize = 24;

/// Streaming marker parser for answers over `passages` numbered 1..=passages.
#[derive(Debug)]
pub struct CitationTracker {
    passages: usize,
    /// A possible marker, from its `[`.
    pending: String,
    /// Markers whose numbers were all invalid, and invalid numbers dropped from mixed markers.
    dropped: usize,
}

impl CitationTracker {
    pub fn new(passages: usize) -> Self {
        Self {
            passages,
            pending: String::new(),
            dropped: 0,
        }
    }

    /// Numbers dropped because no such passage was given.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// Feeds newly generated text; returns what can be released now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut plain = String::new();
        for ch in text.chars() {
            if self.pending.is_empty() {
                if ch == '[' {
                    self.pending.push(ch);
                } else {
                    plain.push(ch);
                }
                continue;
            }
            match ch {
                ']' => {
                    self.pending.push(ch);
                    let marker = std::mem::take(&mut self.pending);
                    match parse_marker(&marker) {
                        Some(numbers) => {
                            let valid: Vec<usize> = numbers
                                .iter()
                                .copied()
                                .filter(|n| (1..=self.passages).contains(n))
                                .collect();
                            self.dropped += numbers.len() - valid.len();
                            if !valid.is_empty() {
                                let list: Vec<String> =
                                    valid.iter().map(|n| n.to_string()).collect();
                                plain.push_str(&format!("[{}]", list.join(", ")));
                                flush(&mut out, &mut plain);
                                out.extend(valid.into_iter().map(Piece::Citation));
                            }
                        }
                        None => plain.push_str(&marker),
                    }
                }
                '0'..='9' | ',' | ' ' if self.pending.len() < MAX_MARKER => self.pending.push(ch),
                _ => {
                    // Not a marker: release it as text and look at `ch` afresh.
                    plain.push_str(&std::mem::take(&mut self.pending));
                    if ch == '[' {
                        self.pending.push(ch);
                    } else {
                        plain.push(ch);
                    }
                }
            }
        }
        flush(&mut out, &mut plain);
        out
    }

    /// Releases a marker left open at the end as plain text.
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.pending);
        if rest.is_empty() {
            Vec::new()
        } else {
            vec![Piece::Text(rest)]
        }
    }
}

/// Steers decoding toward citations and keeps them valid (a [`LogitsProcessor`]):
/// - when the model is about to end a sentence it has not cited, and an opening bracket is within
///   `margin` of its top choice, the bracket is preferred, so the model is prompted to cite where
///   a citation belongs; it writes the marker itself, and a model that cannot emit `[` never
///   cites;
/// - once a marker is open, only the numbers of the passages given and the closing bracket are
///   allowed, so the model cannot cite a passage it was not given.
pub struct CitationGuide {
    passages: usize,
    vocab: Arc<CitationVocab>,
    margin: f32,
    state: GuideState,
}

/// The tokens the guide watches, found once per tokenizer and shared by every answer.
#[derive(Debug)]
pub struct CitationVocab {
    /// Tokens that are exactly `[` or ` [`.
    open: Vec<u32>,
    close: Option<u32>,
    /// Token of each digit.
    digits: [Option<u32>; 10],
    /// Tokens that end a sentence or a line.
    ends_sentence: Vec<bool>,
    /// Tokens that are a word of cure or certainty (` cure`, ` curable`, ...).
    cure: Vec<u32>,
    /// Tokens that are the word `source(s)`: answers cite with markers, they do not talk about
    /// "source 2" (small models otherwise describe the sources instead of answering).
    source_words: Vec<u32>,
}

impl CitationVocab {
    /// From `token_text(id)` for every id below `vocab`.
    pub fn new(vocab: usize, token_text: impl Fn(u32) -> String) -> Self {
        let mut open = Vec::new();
        let mut close = None;
        let mut digits = [None; 10];
        let mut ends_sentence = vec![false; vocab];
        let mut cure = Vec::new();
        let mut source_words = Vec::new();
        for id in 0..vocab as u32 {
            let text = token_text(id);
            let word = text.trim().to_lowercase();
            if super::grounding::CURE_WORDS.contains(&word.as_str()) {
                cure.push(id);
            }
            if word == "source" || word == "sources" {
                source_words.push(id);
            }
            match text.as_str() {
                "[" | " [" => open.push(id),
                "]" => close = Some(id),
                d if d.len() == 1 && d.as_bytes()[0].is_ascii_digit() => {
                    digits[(d.as_bytes()[0] - b'0') as usize] = Some(id)
                }
                _ => {}
            }
            // A sentence or a line (list items end without a full stop).
            let t = text.trim_end_matches([' ', '\t']);
            ends_sentence[id as usize] = text.contains('\n')
                || (t.ends_with(['.', '!', '?']) && !t.chars().any(|c| c.is_ascii_digit()));
        }
        Self {
            open,
            close,
            digits,
            ends_sentence,
            cure,
            source_words,
        }
    }

    /// Tokens that are the word `source` or `sources`.
    pub fn source_words(&self) -> impl Iterator<Item = u32> + '_ {
        self.source_words.iter().copied()
    }

    /// Tokens that are a whole word of cure or certainty, suppressed when no passage given
    /// speaks of one.
    pub fn cure_words(&self) -> impl Iterator<Item = u32> + '_ {
        self.cure.iter().copied()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum GuideState {
    /// Outside a marker: tokens in the current sentence, and whether it was cited.
    Text { tokens: usize, cited: bool },
    /// Inside a marker: the number so far.
    Number(usize),
}

/// Sentences shorter than this (list numbers such as `1.`) are not steered toward a citation.
const MIN_SENTENCE_TOKENS: usize = 5;

impl CitationGuide {
    /// A guide for an answer over `passages` passages; `margin` in logits.
    pub fn new(passages: usize, vocab: Arc<CitationVocab>, margin: f32) -> Self {
        Self {
            passages,
            vocab,
            margin,
            state: GuideState::Text {
                tokens: 0,
                cited: false,
            },
        }
    }

    fn top(logits: &[f32]) -> Option<usize> {
        crate::ops::sampling::argmax(logits).map(|t| t as usize)
    }
}

impl LogitsProcessor for CitationGuide {
    fn process(&mut self, logits: &mut [f32]) {
        match self.state {
            GuideState::Text { tokens, cited } => {
                if cited || tokens < MIN_SENTENCE_TOKENS || self.passages == 0 {
                    return;
                }
                let Some(top) = Self::top(logits) else { return };
                if !self.vocab.ends_sentence.get(top).copied().unwrap_or(false) {
                    return;
                }
                let best_open = self
                    .vocab
                    .open
                    .iter()
                    .copied()
                    .filter(|&o| (o as usize) < logits.len())
                    .max_by(|&a, &b| logits[a as usize].total_cmp(&logits[b as usize]));
                if let Some(o) = best_open {
                    let (top_logit, open_logit) = (logits[top], logits[o as usize]);
                    if open_logit.is_finite() && open_logit > top_logit - self.margin {
                        logits[o as usize] = top_logit + 1.0;
                    }
                }
            }
            GuideState::Number(value) => {
                let mut allowed: Vec<u32> = Vec::new();
                for (d, id) in self.vocab.digits.iter().enumerate() {
                    let next = value * 10 + d;
                    if let Some(id) = id {
                        if next >= 1 && next <= self.passages && !(value == 0 && d == 0) {
                            allowed.push(*id);
                        }
                    }
                }
                if value >= 1 {
                    allowed.extend(self.vocab.close);
                }
                if allowed.is_empty() {
                    return;
                }
                for (id, x) in logits.iter_mut().enumerate() {
                    if !allowed.contains(&(id as u32)) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }

    fn accept(&mut self, token: u32) {
        self.state = match self.state {
            GuideState::Text { tokens, cited } => {
                if self.vocab.open.contains(&token) {
                    GuideState::Number(0)
                } else if self
                    .vocab
                    .ends_sentence
                    .get(token as usize)
                    .copied()
                    .unwrap_or(false)
                {
                    GuideState::Text {
                        tokens: 0,
                        cited: false,
                    }
                } else {
                    GuideState::Text {
                        tokens: tokens + 1,
                        cited,
                    }
                }
            }
            GuideState::Number(value) => {
                match self.vocab.digits.iter().position(|&d| d == Some(token)) {
                    Some(d) => GuideState::Number(value * 10 + d),
                    None => GuideState::Text {
                        tokens: 0,
                        cited: Some(token) == self.vocab.close,
                    },
                }
            }
        };
    }
}

fn flush(out: &mut Vec<Piece>, plain: &mut String) {
    if !plain.is_empty() {
        out.push(Piece::Text(std::mem::take(plain)));
    }
}

/// `[1]`, `[2, 3]`, `[ 4 ]` -> the numbers; anything else -> None.
fn parse_marker(marker: &str) -> Option<Vec<usize>> {
    let inner = marker.strip_prefix('[')?.strip_suffix(']')?;
    let numbers: Option<Vec<usize>> = inner
        .split(',')
        .map(|part| {
            let part = part.trim();
            if part.is_empty() || part.len() > 4 {
                None
            } else {
                part.parse().ok()
            }
        })
        .collect();
    numbers.filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(passages: usize, chunks: &[&str]) -> (String, Vec<usize>, usize) {
        let mut t = CitationTracker::new(passages);
        let mut text = String::new();
        let mut cites = Vec::new();
        let mut pieces: Vec<Piece> = chunks.iter().flat_map(|c| t.push(c)).collect();
        pieces.extend(t.finish());
        for piece in pieces {
            match piece {
                Piece::Text(s) => text.push_str(&s),
                Piece::Citation(n) => cites.push(n),
            }
        }
        (text, cites, t.dropped())
    }

    #[test]
    fn markers_split_across_tokens_become_citations() {
        let (text, cites, dropped) = run(
            3,
            &["Surgery is first [", "1", "]. Then [2,", " 3] and [1]."],
        );
        assert_eq!(text, "Surgery is first [1]. Then [2, 3] and [1].");
        assert_eq!(cites, vec![1, 2, 3, 1]);
        assert_eq!(dropped, 0);
    }

    #[test]
    fn numbers_not_provided_are_dropped() {
        let (text, cites, dropped) = run(2, &["A [7]. B [2, 9]. C [0]."]);
        assert_eq!(text, "A . B [2]. C .");
        assert_eq!(cites, vec![2]);
        assert_eq!(dropped, 3);
    }

    #[test]
    fn brackets_that_are_not_markers_stay_text() {
        let (text, cites, _) = run(5, &["t(12;16) [see below] [", "] [[1]] [1", "2345] end ["]);
        assert_eq!(text, "t(12;16) [see below] [] [[1]] [12345] end [");
        assert_eq!(cites, vec![1]);
    }

    /// A toy vocabulary: words, `.`, ` [`, `]`, digits.
    fn toy_guide(passages: usize) -> (CitationGuide, Vec<&'static str>) {
        let vocab = vec![
            "word", " more", ".", " [", "]", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
        ];
        let v = vocab.clone();
        (
            CitationGuide::new(
                passages,
                Arc::new(CitationVocab::new(vocab.len(), move |id| {
                    v[id as usize].to_string()
                })),
                4.0,
            ),
            vocab,
        )
    }

    fn index(vocab: &[&str], t: &str) -> usize {
        vocab.iter().position(|&v| v == t).unwrap()
    }

    #[test]
    fn guide_prefers_a_citation_before_an_uncited_sentence_ends() {
        let (mut g, vocab) = toy_guide(3);
        for _ in 0..MIN_SENTENCE_TOKENS {
            g.accept(index(&vocab, " more") as u32);
        }
        let mut logits = vec![0.0f32; vocab.len()];
        logits[index(&vocab, ".")] = 5.0;
        logits[index(&vocab, " [")] = 2.0; // within the margin of 4
        g.process(&mut logits);
        assert_eq!(
            crate::ops::sampling::argmax(&logits),
            Some(index(&vocab, " [") as u32)
        );
        // Far below the top choice: left alone.
        let mut logits = vec![0.0f32; vocab.len()];
        logits[index(&vocab, ".")] = 9.0;
        logits[index(&vocab, " [")] = 2.0;
        g.process(&mut logits);
        assert_eq!(
            crate::ops::sampling::argmax(&logits),
            Some(index(&vocab, ".") as u32)
        );
        // A bracket the model cannot emit stays impossible.
        let mut logits = vec![0.0f32; vocab.len()];
        logits[index(&vocab, ".")] = 5.0;
        logits[index(&vocab, " [")] = f32::NEG_INFINITY;
        g.process(&mut logits);
        assert_eq!(logits[index(&vocab, " [")], f32::NEG_INFINITY);
    }

    #[test]
    fn guide_allows_only_provided_passage_numbers_inside_a_marker() {
        let (mut g, vocab) = toy_guide(12);
        g.accept(index(&vocab, " [") as u32);
        let mut logits = vec![1.0f32; vocab.len()];
        logits[index(&vocab, "0")] = 9.0;
        g.process(&mut logits);
        let allowed: Vec<&str> = (0..vocab.len())
            .filter(|&i| logits[i].is_finite())
            .map(|i| vocab[i])
            .collect();
        assert_eq!(allowed, ["1", "2", "3", "4", "5", "6", "7", "8", "9"]);
        g.accept(index(&vocab, "1") as u32);
        let mut logits = vec![1.0f32; vocab.len()];
        g.process(&mut logits);
        let allowed: Vec<&str> = (0..vocab.len())
            .filter(|&i| logits[i].is_finite())
            .map(|i| vocab[i])
            .collect();
        assert_eq!(allowed, ["]", "0", "1", "2"], "10, 11, 12 or close after 1");
        g.accept(index(&vocab, "]") as u32);
        // The sentence is cited now: no more steering until it ends.
        let mut logits = vec![0.0f32; vocab.len()];
        logits[index(&vocab, ".")] = 5.0;
        logits[index(&vocab, " [")] = 4.0;
        g.process(&mut logits);
        assert_eq!(
            crate::ops::sampling::argmax(&logits),
            Some(index(&vocab, ".") as u32)
        );
    }

    #[test]
    fn text_without_markers_passes_through_unchanged() {
        let s = "Plain text, with commas, numbers 2,225 and no brackets.";
        assert_eq!(run(3, &[s]).0, s);
    }
}
