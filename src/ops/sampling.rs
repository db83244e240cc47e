//! Choosing the next token from a row of logits: greedy, or a seeded draw after temperature,
//! top-k, min-p and top-p, with repetition, presence and frequency penalties over the tokens the
//! sequence generated. The CPU path is the reference a CUDA twin will match. Suppressed tokens (the
//! logits-processor hook: a test that forbids citation brackets, later citation constraints) are
//! removed before anything else, so they can never be chosen.

pub use self::edit::{DevicePlan, Edit};
use super::rng::SplitMix64;
use crate::error::OpsError;

/// Per-request sampling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    pub seed: u64,
    /// Logits of tokens among the last [`PENALTY_WINDOW`] generated are divided by this when
    /// positive and multiplied when negative (1 is off). Prompt tokens are not penalised, so
    /// copying a drug name from a passage stays cheap.
    pub repetition_penalty: f32,
    /// Keep tokens whose probability is at least `min_p` times the top token's (0 keeps all).
    pub min_p: f32,
    /// Subtracted from the logit of every token generated so far (OpenAI semantics, -2..2).
    pub presence_penalty: f32,
    /// Subtracted once per earlier occurrence of the token in the generated text (-2..2).
    pub frequency_penalty: f32,
}

/// Generated tokens the repetition penalty looks back on.
pub const PENALTY_WINDOW: usize = 64;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            repetition_penalty: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Whether any penalty is on (else a sequence's own tokens change nothing and their
    /// penalty entries need not be built).
    pub fn penalizes(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }

    /// Checks the ranges; the error names the field.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let check = |ok: bool, field: &'static str, range: &str| {
            if ok {
                Ok(())
            } else {
                Err(InvalidParam {
                    field,
                    message: format!("must be {range}"),
                })
            }
        };
        check(
            (0.0..=2.0).contains(&self.temperature),
            "temperature",
            "between 0 and 2",
        )?;
        check(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p",
            "greater than 0 and at most 1",
        )?;
        check(
            self.top_k <= 1_000_000,
            "top_k",
            "at most 1000000 (0 keeps all)",
        )?;
        check(
            (0.0..=1.0).contains(&self.min_p),
            "min_p",
            "between 0 and 1",
        )?;
        check(
            (1.0..=2.0).contains(&self.repetition_penalty),
            "repetition_penalty",
            "between 1 and 2",
        )?;
        check(
            (-2.0..=2.0).contains(&self.presence_penalty),
            "presence_penalty",
            "between -2 and 2",
        )?;
        check(
            (-2.0..=2.0).contains(&self.frequency_penalty),
            "frequency_penalty",
            "between -2 and 2",
        )
    }
}

/// A sampling setting out of range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidParam {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for InvalidParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.field, self.message)
    }
}

/// A hook on one sequence's decoding: edits the logits before each draw and sees each chosen
/// token (citation constraints are one).
pub trait LogitsProcessor: Send {
    fn process(&mut self, logits: &mut [f32]);
    fn accept(&mut self, token: u32);
    /// This step's edit as data, when it can be said before the logits are seen and equals
    /// what `process` does to logits a model gives (finite); `None` (the default) keeps the
    /// sequence's draws on the host.
    fn edit(&self) -> Option<Edit> {
        None
    }
}

/// Forbids any token that would complete a run of `n` generated tokens seen before in the same
/// sequence (0 turns it off): whole repeated sentences, the loop small models fall into, become
/// impossible while short repeats (citation markers, list numbers) stay allowed.
pub struct NoRepeatNgram {
    n: usize,
    tokens: Vec<u32>,
    /// For each run of `n - 1` tokens, the tokens that followed it.
    seen: std::collections::HashMap<Vec<u32>, Vec<u32>>,
}

impl NoRepeatNgram {
    pub fn new(n: usize) -> Self {
        Self {
            n,
            tokens: Vec::new(),
            seen: std::collections::HashMap::new(),
        }
    }
}

impl NoRepeatNgram {
    /// One that also counts `history` (text already written before this generation) as
    /// generated.
    pub fn with_history(n: usize, history: &[u32]) -> Self {
        let mut p = Self::new(n);
        for &t in history {
            p.accept(t);
        }
        p
    }
}

impl LogitsProcessor for NoRepeatNgram {
    /// Bans the tokens that would complete a run seen before, unless that leaves no token.
    fn process(&mut self, logits: &mut [f32]) {
        if let Some(e) = self.edit() {
            e.apply(logits);
        }
    }

    fn edit(&self) -> Option<Edit> {
        if self.n < 2 || self.tokens.len() < self.n - 1 {
            return Some(Edit::Keep);
        }
        let prefix = &self.tokens[self.tokens.len() + 1 - self.n..];
        Some(match self.seen.get(prefix) {
            Some(banned) => Edit::Ban(banned.clone()),
            None => Edit::Keep,
        })
    }

    fn accept(&mut self, token: u32) {
        if self.n >= 2 && self.tokens.len() >= self.n - 1 {
            let prefix = self.tokens[self.tokens.len() + 1 - self.n..].to_vec();
            self.seen.entry(prefix).or_default().push(token);
        }
        self.tokens.push(token);
    }
}

/// One sequence's sampler: its settings and its own random stream, so a seeded request draws the
/// same tokens whatever else runs beside it.
pub struct Sampler {
    params: SamplingParams,
    /// Steps sampled so far: a step's draw is `SplitMix64::unit_at(seed, step)`.
    step: u64,
    suppress: Vec<u32>,
    processors: Vec<Box<dyn LogitsProcessor>>,
    /// The last generated tokens, for the repetition penalty.
    recent: std::collections::VecDeque<u32>,
    /// How often each token was generated, for presence and frequency penalties.
    counts: std::collections::HashMap<u32, u32>,
}

/// Index of the largest value; ties to the lower index. `None` when every value is -inf or NaN.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() || x == f32::NEG_INFINITY {
            continue;
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i as u32)
}

/// Most alternatives a request may ask log-probabilities for.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The model's log-probabilities at one step (its own distribution, before penalties,
/// temperature or any filter): `log_norm` is `log Σ exp(logit)`, so token `t`'s log-probability
/// is `logits[t] - log_norm`; `top` holds the `n` most likely tokens, most likely first (ties by
/// lower id).
pub fn top_logprobs(logits: &[f32], n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| ((x - max) as f64).exp())
        .sum();
    let log_norm = max + sum.ln() as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &x) in logits.iter().enumerate() {
        if n == 0 || !x.is_finite() || (top.len() == n && x <= top[n - 1].1) {
            continue;
        }
        let at = top.partition_point(|&(_, y)| y >= x);
        top.insert(at, (i as u32, x));
        top.truncate(n);
    }
    (
        log_norm,
        top.into_iter().map(|(i, x)| (i, x - log_norm)).collect(),
    )
}

impl Sampler {
    /// `suppress`: token ids never to be chosen.
    pub fn new(params: SamplingParams, suppress: Vec<u32>) -> Self {
        Self {
            params,
            step: 0,
            suppress,
            processors: Vec::new(),
            recent: std::collections::VecDeque::with_capacity(PENALTY_WINDOW),
            counts: std::collections::HashMap::new(),
        }
    }

    /// Adds a logits processor; processors run in order, before suppression.
    pub fn with_processor(mut self, p: Box<dyn LogitsProcessor>) -> Self {
        self.processors.push(p);
        self
    }

    /// The next token from `logits` (one row over the vocabulary), modified in place; the token
    /// is remembered for the repetition penalty.
    pub fn sample(&mut self, logits: &mut [f32]) -> Result<u32, OpsError> {
        let token = self.choose(logits)?;
        self.accept(token);
        Ok(token)
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// How the GPU chooses this sampler's next token over a vocabulary of `vocab` (the edit
    /// kernel, then the sampling kernel with the plan's bans, this sampler's settings and
    /// penalties); `None` when a logits processor must see the logits on the host.
    pub fn device_plan(&self, vocab: usize) -> Option<DevicePlan> {
        let edits: Option<Vec<Edit>> = self.processors.iter().map(|p| p.edit()).collect();
        edit::fold(edits?, &self.suppress, vocab)
    }

    /// Records `token`, chosen for this sampler elsewhere (by the sampling kernel from this
    /// sampler's [`Sampler::params`], [`Sampler::step`], [`Sampler::penalty_entries`] and
    /// [`Sampler::suppressed`]), as [`Sampler::sample`] records its own choice.
    pub fn accept(&mut self, token: u32) {
        self.step += 1;
        for p in &mut self.processors {
            p.accept(token);
        }
        if self.recent.len() == PENALTY_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(token);
        *self.counts.entry(token).or_insert(0) += 1;
    }

    /// This sequence's penalty entries: every token it generated, how often, and whether it is
    /// among the last [`PENALTY_WINDOW`]; by id.
    pub fn penalty_entries(&self) -> Vec<PenaltyEntry> {
        let mut out: Vec<PenaltyEntry> = self
            .counts
            .iter()
            .map(|(&id, &count)| PenaltyEntry {
                id,
                count,
                recent: self.recent.contains(&id),
            })
            .collect();
        out.sort_unstable_by_key(|e| e.id);
        out
    }

    /// The step counter of the counter-based draw.
    pub fn step(&self) -> u64 {
        self.step
    }

    fn choose(&mut self, logits: &mut [f32]) -> Result<u32, OpsError> {
        for p in &mut self.processors {
            p.process(logits);
        }
        self.draw_after(logits, &self.suppress)
    }

    /// What the kernels do with `plan` (this sampler's [`Sampler::device_plan`]), on the host:
    /// the plan's edit, then the penalties and the plan's bans, then the draw. `logits` are
    /// modified in place; nothing is recorded ([`Sampler::accept`] does that).
    pub fn choose_planned(&self, plan: &DevicePlan, logits: &mut [f32]) -> Result<u32, OpsError> {
        plan.edit.apply(logits);
        self.draw_after(logits, &plan.bans)
    }

    /// Penalties, then `bans`, then the draw.
    fn draw_after(&self, logits: &mut [f32], bans: &[u32]) -> Result<u32, OpsError> {
        let entries = if self.params.penalizes() {
            self.penalty_entries()
        } else {
            Vec::new()
        };
        apply_penalties(logits, &self.params, &entries, bans);
        let greedy = argmax(logits)
            .ok_or_else(|| OpsError::Invalid("no token is allowed by the logits".into()))?;
        if self.params.temperature == 0.0 {
            return Ok(greedy);
        }
        let u = SplitMix64::unit_at(self.params.seed, self.step);
        Ok(draw(logits, &self.params, u))
    }
}

/// A token a sequence generated: how often, and whether among its last [`PENALTY_WINDOW`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PenaltyEntry {
    pub id: u32,
    pub count: u32,
    pub recent: bool,
}

/// A row's penalties (each id at most once in `entries`: the repetition penalty on recent
/// tokens, then presence and frequency) and its banned ids (set to -inf), in place: what the CUDA
/// kernel does to its work row.
pub fn apply_penalties(
    logits: &mut [f32],
    params: &SamplingParams,
    entries: &[PenaltyEntry],
    bans: &[u32],
) {
    let rp = params.repetition_penalty;
    let (presence, frequency) = (params.presence_penalty, params.frequency_penalty);
    for e in entries {
        let Some(x) = logits.get_mut(e.id as usize) else {
            continue;
        };
        if e.recent && rp != 1.0 {
            *x = if *x > 0.0 { *x / rp } else { *x * rp };
        }
        if e.count > 0 && (presence != 0.0 || frequency != 0.0) {
            *x -= presence + frequency * e.count as f32;
        }
    }
    for &id in bans {
        if let Some(x) = logits.get_mut(id as usize) {
            *x = f32::NEG_INFINITY;
        }
    }
}

/// Where a filter cuts the tokens ranked by logit (higher first, equal logits by lower id): a
/// token is kept when it ranks at or before `(value, id)`. Every filter (top-k, min-p, top-p)
/// keeps such a prefix, so the kept set is the prefix of the tightest cut, and the draw can walk
/// the tokens in id order with no sort: what a kernel does in a few passes over the row.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Cut {
    value: f32,
    id: u32,
}

impl Cut {
    const ALL: Cut = Cut {
        value: f32::NEG_INFINITY,
        id: u32::MAX,
    };

    fn keeps(&self, x: f32, id: u32) -> bool {
        x > self.value || (x == self.value && id <= self.id)
    }

    fn tighter(self, other: Cut) -> Cut {
        if other.value > self.value || (other.value == self.value && other.id < self.id) {
            other
        } else {
            self
        }
    }
}

/// The weight (relative to the top token's) above which a token is "near the top".
const NEAR: f32 = 1e-3;

/// Rank order: higher logit first, equal logits (`-0.0` equal to `0.0`, as the cuts compare
/// them) by lower id. Only finite logits are ranked.
fn by_rank(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.partial_cmp(&a.0)
        .unwrap_or(std::cmp::Ordering::Equal)
        .then(a.1.cmp(&b.1))
}

/// The cut after the tokens of `cands` (logit, id) whose weights, taken in rank order, first
/// reach `need`; expected linear time (a quickselect that follows the mass). Sums run in f64.
fn mass_cut(cands: &mut [(f32, u32)], weights: &[f32], mut need: f64) -> Cut {
    let mut lo = cands;
    loop {
        if lo.len() <= 1 {
            return lo
                .first()
                .map_or(Cut::ALL, |&(value, id)| Cut { value, id });
        }
        let mid = lo.len() / 2;
        lo.select_nth_unstable_by(mid, by_rank);
        let before: f64 = lo[..mid].iter().map(|c| weights[c.1 as usize] as f64).sum();
        let at = weights[lo[mid].1 as usize] as f64;
        if before >= need {
            lo = &mut lo[..mid];
        } else if before + at >= need || mid + 1 == lo.len() {
            let (value, id) = lo[mid];
            return Cut { value, id };
        } else {
            need -= before + at;
            lo = &mut lo[mid + 1..];
        }
    }
}

/// The kept tokens' cut, their weights' sum and the weights (`exp((x - max) / temperature)`, the
/// top token's 1, each computed once; 0 where a token is cut before top-p) for a row that holds
/// a finite logit: top-k by selection, min-p as a logit floor, top-p by the mass quickselect.
/// Masses are summed in f64: in f32 a running sum near 1 drops every weight below 6e-8, and a
/// 150k-token vocabulary holds enough of those to move a draw by 1e-4 of the mass.
fn filter(logits: &[f32], params: &SamplingParams) -> (Cut, f64, Vec<f32>) {
    let t = params.temperature;
    let max = logits
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let mut cut = Cut::ALL;
    if params.min_p > 0.0 {
        // weight >= min_p, as a logit floor.
        cut = Cut {
            value: max + t * params.min_p.ln(),
            id: u32::MAX,
        };
    }
    let finite = logits.iter().filter(|x| x.is_finite()).count();
    let mut cands: Vec<(f32, u32)> = Vec::new();
    let gather = |cut: Cut, cands: &mut Vec<(f32, u32)>| {
        cands.clear();
        cands.extend(
            logits
                .iter()
                .enumerate()
                .filter(|&(i, &x)| x.is_finite() && cut.keeps(x, i as u32))
                .map(|(i, &x)| (x, i as u32)),
        );
    };
    // Most of a model's vocabulary lies far below its top token: when the tokens within a factor
    // of 1000 of the top (a logit floor) already hold what a filter needs, it searches only them.
    let near = Cut {
        value: max + t * NEAR.ln(),
        id: u32::MAX,
    };
    if params.top_k > 0 && params.top_k < finite {
        let narrow = cut.tighter(near);
        let within = logits
            .iter()
            .enumerate()
            .filter(|&(i, &x)| narrow.keeps(x, i as u32))
            .count();
        gather(
            if within >= params.top_k { narrow } else { cut },
            &mut cands,
        );
        if params.top_k < cands.len() {
            cands.select_nth_unstable_by(params.top_k - 1, by_rank);
            let (value, id) = cands[params.top_k - 1];
            cut = cut.tighter(Cut { value, id });
        }
    }
    let mut weights = vec![0f32; logits.len()];
    let mut mass = 0f64;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_finite() && cut.keeps(x, i as u32) {
            weights[i] = ((x - max) / t).exp();
            mass += weights[i] as f64;
        }
    }
    if params.top_p < 1.0 {
        let need = params.top_p as f64 * mass;
        let narrow = cut.tighter(near);
        let within: f64 = logits
            .iter()
            .enumerate()
            .filter(|&(i, &x)| narrow.keeps(x, i as u32))
            .map(|(i, _)| weights[i] as f64)
            .sum();
        gather(if within >= need { narrow } else { cut }, &mut cands);
        cut = cut.tighter(mass_cut(&mut cands, &weights, need));
        mass = cands
            .iter()
            .filter(|&&(x, id)| cut.keeps(x, id))
            .map(|&(_, id)| weights[id as usize] as f64)
            .sum();
    }
    (cut, mass, weights)
}

/// The kept tokens of a row (one holding a finite logit) in id order with their weights, and
/// the weights' sum: what [`draw`] walks. The GPU check uses it to tell a rounding difference
/// at a boundary from a wrong token.
pub fn kept_tokens(logits: &[f32], params: &SamplingParams) -> (Vec<(u32, f32)>, f64) {
    let (cut, mass, weights) = filter(logits, params);
    let kept = logits
        .iter()
        .enumerate()
        .filter(|&(i, &x)| x.is_finite() && cut.keeps(x, i as u32))
        .map(|(i, _)| (i as u32, weights[i]))
        .collect();
    (kept, mass)
}

/// A token drawn with `u` in [0, 1) from the filtered, tempered distribution of `logits` (one
/// row holding a finite logit; temperature above 0), walking the kept tokens in id order: the
/// reference of `kernels/sampling.cu`.
pub fn draw(logits: &[f32], params: &SamplingParams, u: f32) -> u32 {
    let (cut, mass, weights) = filter(logits, params);
    let mut left = u as f64 * mass;
    let mut last = None;
    for (i, &x) in logits.iter().enumerate() {
        if !x.is_finite() || !cut.keeps(x, i as u32) {
            continue;
        }
        let w = weights[i] as f64;
        if left < w {
            return i as u32;
        }
        left -= w;
        last = Some(i as u32);
    }
    // Rounding left a sliver past the last kept token.
    last.expect("a finite logit is kept")
}

pub mod edit;
#[cfg(feature = "cuda")]
pub mod gpu;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_penalties_a_sequences_own_tokens_change_nothing() {
        let plain = SamplingParams::default();
        assert!(!plain.penalizes());
        for p in [
            SamplingParams {
                repetition_penalty: 1.3,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: -0.5,
                ..Default::default()
            },
            SamplingParams {
                frequency_penalty: 0.2,
                ..Default::default()
            },
        ] {
            assert!(p.penalizes(), "{p:?}");
        }
        // What skipping the entries relies on: with no penalty on, they edit no logit.
        let entries = [
            PenaltyEntry {
                id: 1,
                count: 3,
                recent: true,
            },
            PenaltyEntry {
                id: 4,
                count: 1,
                recent: false,
            },
        ];
        let before = vec![0.5f32, -1.0, 2.0, 0.0, 3.5];
        let mut after = before.clone();
        apply_penalties(&mut after, &plain, &entries, &[]);
        assert_eq!(after, before);
    }

    #[test]
    fn no_repeat_ngram_blocks_only_a_repeated_run() {
        let mut p = NoRepeatNgram::new(3);
        for t in [1, 2, 3, 1, 2] {
            p.accept(t);
        }
        // After `1 2`, `3` would repeat `1 2 3`.
        let mut logits = vec![0.0f32; 5];
        p.process(&mut logits);
        assert_eq!(logits[3], f32::NEG_INFINITY);
        assert!(logits.iter().enumerate().all(|(t, x)| t == 3 || *x == 0.0));
        // When the repeat is the only choice left, it stays.
        let mut only = vec![f32::NEG_INFINITY; 5];
        only[3] = 1.0;
        p.process(&mut only);
        assert_eq!(only[3], 1.0);
        // Off at 0.
        let mut off = NoRepeatNgram::new(0);
        for t in [1, 1, 1, 1] {
            off.accept(t);
        }
        let mut logits = vec![0.0f32; 2];
        off.process(&mut logits);
        assert!(logits.iter().all(|x| *x == 0.0));
    }

    #[test]
    fn top_logprobs_are_the_log_softmax_in_order() {
        let logits = [1.0f32, 3.0, f32::NEG_INFINITY, 3.0, -2.0, 0.5];
        let (log_norm, top) = top_logprobs(&logits, 3);
        let z: f64 = logits
            .iter()
            .filter(|x| x.is_finite())
            .map(|&x| (x as f64).exp())
            .sum();
        assert!((log_norm as f64 - z.ln()).abs() < 1e-5);
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 0], "most likely first, ties by lower id");
        assert!((top[2].1 - (1.0 - log_norm)).abs() < 1e-6);
        let total: f32 = top_logprobs(&logits, 10).1.iter().map(|t| t.1.exp()).sum();
        assert!(
            (total - 1.0).abs() < 1e-5,
            "every finite token, probabilities sum to 1"
        );
        assert!(top_logprobs(&logits, 0).1.is_empty());
    }

    #[test]
    fn greedy_is_argmax_and_skips_suppressed_tokens() {
        let mut s = Sampler::new(SamplingParams::default(), vec![]);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0, 3.0]).unwrap(), 1);
        let mut s = Sampler::new(SamplingParams::default(), vec![1, 3]);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0, 3.0]).unwrap(), 2);
        let mut s = Sampler::new(SamplingParams::default(), vec![0]);
        assert!(s.sample(&mut [1.0]).is_err());
    }

    #[test]
    fn seeded_draws_repeat_and_follow_the_distribution() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..SamplingParams::default()
        };
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln(), f32::NEG_INFINITY];
        let draw = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone(), vec![]);
            (0..6000)
                .map(|_| s.sample(&mut logits.clone()).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params), "same seed, same tokens");
        let mut counts = [0usize; 4];
        a.iter().for_each(|&t| counts[t as usize] += 1);
        assert_eq!(counts[3], 0);
        // Expected 1000 / 2000 / 3000; a 5% band is many standard deviations wide.
        for (c, want) in counts.iter().zip([1000.0, 2000.0, 3000.0]) {
            assert!((*c as f64 - want).abs() < want * 0.1, "{counts:?}");
        }
    }

    /// The filtered distribution by the sorted definition, in f64: (id, probability).
    fn sorted_oracle(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize].is_finite())
            .collect();
        order.sort_by(|&a, &b| by_rank(&(logits[a as usize], a), &(logits[b as usize], b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let max = logits[order[0] as usize] as f64;
        let mut probs: Vec<(u32, f64)> = order
            .iter()
            .map(|&i| {
                (
                    i,
                    ((logits[i as usize] as f64 - max) / p.temperature as f64).exp(),
                )
            })
            .collect();
        if p.min_p > 0.0 {
            probs.retain(|&(_, w)| w >= p.min_p as f64);
        }
        let total: f64 = probs.iter().map(|x| x.1).sum();
        if p.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|&(_, w)| {
                    mass += w;
                    mass >= p.top_p as f64 * total
                })
                .unwrap_or(probs.len() - 1);
            probs.truncate(keep + 1);
        }
        let total: f64 = probs.iter().map(|x| x.1).sum();
        probs.into_iter().map(|(i, w)| (i, w / total)).collect()
    }

    /// Whether the top-p cut falls within a rounding error of a token boundary (where f32 and
    /// f64 sums may cut differently).
    fn borderline(logits: &[f32], p: &SamplingParams) -> bool {
        if p.top_p >= 1.0 {
            return false;
        }
        let mut q = p.clone();
        q.top_p = 1.0;
        let probs = sorted_oracle(logits, &q);
        let mut before = 0.0;
        for &(_, w) in &probs {
            let after = before + w;
            if after >= p.top_p as f64 {
                return after - (p.top_p as f64) < 1e-5 || (p.top_p as f64) - before < 1e-5;
            }
            before = after;
        }
        true
    }

    #[test]
    fn sort_free_filter_keeps_what_the_sorted_definition_keeps() {
        let mut rng = SplitMix64::new(11);
        let mut checked = 0;
        for case in 0..300 {
            let vocab = [5, 64, 1000, 49_152][case % 4];
            // Logits on a coarse grid, so ties are common; a few tokens forbidden.
            let logits: Vec<f32> = (0..vocab)
                .map(|_| {
                    if rng.unit() < 0.05 {
                        f32::NEG_INFINITY
                    } else {
                        (rng.unit() * 40.0).round() / 4.0 - 5.0
                    }
                })
                .collect();
            if logits.iter().all(|x| !x.is_finite()) {
                continue;
            }
            let params = SamplingParams {
                temperature: 0.3 + rng.unit() * 1.5,
                top_k: [0, 1, 3, 40, 2000][(rng.next_u64() % 5) as usize],
                top_p: [1.0, 0.5, 0.9, 0.99][(rng.next_u64() % 4) as usize],
                min_p: [0.0, 0.05, 0.3][(rng.next_u64() % 3) as usize],
                ..SamplingParams::default()
            };
            if borderline(&logits, &params) {
                continue;
            }
            let want = sorted_oracle(&logits, &params);
            let (cut, mass, weights) = filter(&logits, &params);
            let kept: Vec<u32> = (0..vocab as u32)
                .filter(|&i| logits[i as usize].is_finite() && cut.keeps(logits[i as usize], i))
                .collect();
            let mut want_ids: Vec<u32> = want.iter().map(|w| w.0).collect();
            want_ids.sort_unstable();
            assert_eq!(kept, want_ids, "case {case}: {params:?}");
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = kept
                .iter()
                .map(|&i| ((logits[i as usize] - max) / params.temperature).exp() as f64)
                .sum();
            assert!(kept
                .iter()
                .all(|&i| weights[i as usize] > 0.0 || logits[i as usize] < max - 80.0));
            assert!((sum - mass).abs() <= 1e-4 * mass, "case {case}");
            checked += 1;
        }
        assert!(checked > 270, "{checked}");
    }

    #[test]
    fn draws_follow_the_filtered_distribution() {
        // 10^5 counter-based draws against the sorted definition's probabilities, for eleven
        // settings and seeds: chi-square below the 0.1% critical value each time.
        let mut rng = SplitMix64::new(5);
        let logits: Vec<f32> = (0..200).map(|_| rng.unit() * 6.0).collect();
        for params in [SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            top_k: 60,
            seed: 3,
            ..SamplingParams::default()
        }]
        .into_iter()
        .chain((10..20).map(|seed| SamplingParams {
            temperature: 1.3,
            min_p: 0.1,
            seed,
            ..SamplingParams::default()
        })) {
            let want = sorted_oracle(&logits, &params);
            let mut counts = std::collections::HashMap::new();
            let n = 100_000;
            for step in 0..n {
                let t = draw(&logits, &params, SplitMix64::unit_at(params.seed, step));
                *counts.entry(t).or_insert(0u64) += 1;
            }
            assert!(
                counts.keys().all(|t| want.iter().any(|w| w.0 == *t)),
                "a filtered-out token was drawn"
            );
            let chi2: f64 = want
                .iter()
                .map(|&(t, p)| {
                    let e = p * n as f64;
                    let o = *counts.get(&t).unwrap_or(&0) as f64;
                    (o - e) * (o - e) / e
                })
                .sum();
            let df = want.len() as f64 - 1.0;
            // Wilson-Hilferty: the 99.9% quantile of chi-square with df degrees of freedom.
            let z = 3.09;
            let crit = df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3);
            assert!(
                chi2 < crit,
                "chi2 {chi2:.1} >= {crit:.1} (df {df}) for {params:?}"
            );
        }
    }

    #[test]
    fn top_p_and_top_k_cut_the_tail() {
        let logits = [(0.6f32).ln(), (0.3f32).ln(), (0.1f32).ln()];
        for (top_p, top_k, allowed) in [(0.5, 0, 1), (0.85, 0, 2), (1.0, 2, 2), (1.0, 0, 3)] {
            let mut s = Sampler::new(
                SamplingParams {
                    temperature: 1.0,
                    top_p,
                    top_k,
                    seed: 1,
                    ..SamplingParams::default()
                },
                vec![],
            );
            let max = (0..2000)
                .map(|_| s.sample(&mut logits.clone()).unwrap())
                .max()
                .unwrap();
            assert_eq!(max as usize + 1, allowed, "top_p {top_p} top_k {top_k}");
        }
    }

    #[test]
    fn repetition_penalty_steers_greedy_away_from_recent_tokens() {
        let params = SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params, vec![]);
        // Token 0 leads by a little: chosen once, then penalised below token 1.
        assert_eq!(s.sample(&mut [2.0, 1.8, 0.5]).unwrap(), 0);
        assert_eq!(s.sample(&mut [2.0, 1.8, 0.5]).unwrap(), 1);
        // Negative logits are pushed further down, not up.
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 1.5,
                ..SamplingParams::default()
            },
            vec![],
        );
        assert_eq!(s.sample(&mut [-1.0, -1.2, -5.0]).unwrap(), 0);
        assert_eq!(s.sample(&mut [-1.0, -1.2, -5.0]).unwrap(), 1);
        // Without the penalty greedy repeats.
        let mut s = Sampler::new(SamplingParams::default(), vec![]);
        assert_eq!(s.sample(&mut [2.0, 1.8, 0.5]).unwrap(), 0);
        assert_eq!(s.sample(&mut [2.0, 1.8, 0.5]).unwrap(), 0);
    }

    #[test]
    fn min_p_drops_tokens_far_below_the_top() {
        // p = 0.5, 0.3, 0.15, 0.05: min_p 0.25 keeps p >= 0.125, the first three.
        let logits = [0.5f32.ln(), 0.3f32.ln(), 0.15f32.ln(), 0.05f32.ln()];
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                min_p: 0.25,
                seed: 9,
                ..SamplingParams::default()
            },
            vec![],
        );
        let drawn: std::collections::BTreeSet<u32> = (0..3000)
            .map(|_| s.sample(&mut logits.clone()).unwrap())
            .collect();
        assert_eq!(drawn.into_iter().collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens() {
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params, vec![]);
        // Token 0 wins, then carries -0.8, then -1.1.
        assert_eq!(s.sample(&mut [1.0, 0.5]).unwrap(), 0);
        let mut l = [1.0f32, 0.1];
        assert_eq!(s.sample(&mut l).unwrap(), 0);
        assert!((l[0] - 0.2).abs() < 1e-6, "{l:?}");
        let mut l = [1.0f32, 0.1];
        assert_eq!(s.sample(&mut l).unwrap(), 1);
        assert!((l[0] - (1.0 - 0.5 - 0.6)).abs() < 1e-6, "{l:?}");
    }

    #[test]
    fn validation_names_the_field() {
        let bad = SamplingParams {
            temperature: 3.0,
            ..SamplingParams::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
        let bad = SamplingParams {
            top_p: 0.0,
            ..SamplingParams::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("top_p"));
        for (bad, field) in [
            (
                SamplingParams {
                    min_p: 1.5,
                    ..SamplingParams::default()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    presence_penalty: 3.0,
                    ..SamplingParams::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -2.5,
                    ..SamplingParams::default()
                },
                "frequency_penalty",
            ),
        ] {
            assert!(bad.validate().unwrap_err().to_string().contains(field));
        }
    }
}
