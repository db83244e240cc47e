//! Citation markers in streamed text. The model cites with `[n]` (or `[n, m]`); the tracker
//! watches the generated text as it streams, holds back a possible marker until it closes, and
//! turns each complete marker into citation events for the passages it names. A number that was
//! not given to the model as a passage is dropped, never passed through; a marker left with no
//! valid number disappears from the text. Only generated text goes through here, so every
//! citation is one the model wrote.

use std::sync::Arc;

use crate::ops::sampling::edit::{in_mask, token_mask, Edit, Nudge};
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
    open: Arc<[u32]>,
    close: Option<u32>,
    /// Token of each digit.
    digits: [Option<u32>; 10],
    /// Tokens that end a sentence or a line, as a bit set ([`token_mask`]).
    ends_sentence: Arc<[u32]>,
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
            open: open.into(),
            close,
            digits,
            ends_sentence: token_mask(vocab, |t| ends_sentence[t as usize]),
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
}

impl LogitsProcessor for CitationGuide {
    fn process(&mut self, logits: &mut [f32]) {
        if let Some(e) = self.edit() {
            e.apply(logits);
        }
    }

    /// Outside a marker, at a sentence of at least [`MIN_SENTENCE_TOKENS`] not yet cited: the
    /// nudge toward an opening bracket. Inside one: only the digits that keep the number
    /// within the passages given, and the closing bracket once there is a number.
    fn edit(&self) -> Option<Edit> {
        Some(match self.state {
            GuideState::Text { tokens, cited } => {
                if cited || tokens < MIN_SENTENCE_TOKENS || self.passages == 0 {
                    Edit::Keep
                } else {
                    Edit::Nudge(Nudge {
                        ends: self.vocab.ends_sentence.clone(),
                        open: self.vocab.open.clone(),
                        margin: self.margin,
                    })
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
                    Edit::Keep
                } else {
                    Edit::Allow(allowed)
                }
            }
        })
    }

    fn accept(&mut self, token: u32) {
        self.state = match self.state {
            GuideState::Text { tokens, cited } => {
                if self.vocab.open.contains(&token) {
                    GuideState::Number(0)
                } else if in_mask(&self.vocab.ends_sentence, token) {
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

    /// The GPU path's plan, run on the host ([`Sampler::choose_planned`]: the one edit that
    /// reads the logits, then penalties with the sampler's and the processors' bans together),
    /// draws what the host path draws with the guide and the n-gram ban as processors, step by
    /// step over random logits that open and close markers, end sentences and repeat runs;
    /// greedy and sampled, with and without penalties.
    #[test]
    fn the_device_plan_draws_what_the_processors_draw() {
        use crate::ops::rng::SplitMix64;
        use crate::ops::sampling::{NoRepeatNgram, Sampler, SamplingParams};
        // Specials, then filler words; id 19 is suppressed.
        let mut words: Vec<String> = [
            "word", " more", ".", " [", "[", "]", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
            "\n", " and", " the", "x",
        ]
        .map(String::from)
        .to_vec();
        words.extend((0..40).map(|i| format!(" w{i}")));
        let names = words.clone();
        let vocab = Arc::new(CitationVocab::new(words.len(), move |id| {
            names[id as usize].clone()
        }));
        let settings = [
            SamplingParams::default(),
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                seed: 11,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                repetition_penalty: 1.3,
                presence_penalty: 0.4,
                seed: 12,
                ..Default::default()
            },
        ];
        let (mut nudged, mut allowed, mut banned, mut failed) = (0, 0, 0, 0);
        for (k, params) in settings.iter().enumerate() {
            for passages in [1, 3, 12] {
                let sampler = || {
                    Sampler::new(params.clone(), vec![19])
                        .with_processor(Box::new(CitationGuide::new(passages, vocab.clone(), 3.0)))
                        .with_processor(Box::new(NoRepeatNgram::new(3)))
                };
                let (mut host, mut device) = (sampler(), sampler());
                let mut rng = SplitMix64::new(100 + k as u64 * 7 + passages as u64);
                for step in 0..400 {
                    // A few ids get a lift so markers, sentence ends and repeats all happen.
                    let logits: Vec<f32> = (0..words.len())
                        .map(|t| {
                            let lift = if matches!(t, 2 | 3 | 5 | 7 | 16) {
                                3.0
                            } else {
                                0.0
                            };
                            (rng.unit() - 0.5) * 6.0 + lift
                        })
                        .collect();
                    let plan = device
                        .device_plan(words.len())
                        .expect("both processors plan");
                    match &plan.edit {
                        Edit::Nudge(_) => nudged += 1,
                        Edit::Allow(_) => allowed += 1,
                        _ => {}
                    }
                    banned += (plan.bans.len() > 1) as usize;
                    // Both fail alike when the n-gram ban leaves only a suppressed id (a tiny
                    // vocabulary's corner).
                    let want = host.sample(&mut logits.clone()).ok();
                    let got = device.choose_planned(&plan, &mut logits.clone()).ok();
                    assert_eq!(got, want, "settings {k}, {passages} passages, step {step}");
                    match got {
                        Some(t) => device.accept(t),
                        None => failed += 1,
                    }
                }
            }
        }
        assert!(
            nudged > 30 && allowed > 100 && banned > 100 && failed < 100,
            "{nudged} {allowed} {banned} {failed}"
        );
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
