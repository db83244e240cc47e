//! Logits processors' edits as data. A processor ([`super::LogitsProcessor`]) that can say what
//! it will do to a step's logits before seeing them returns an [`Edit`]; a sampler whose
//! processors all can ([`super::Sampler::device_plan`]) has its rows chosen on the GPU: the
//! edit kernel applies the one edit that reads the logits (an allow-list or the citation nudge)
//! in place, and the sampling kernel adds the processors' bans to the suppressed ids. Only the
//! chosen token comes back to the host. [`Edit::apply`] is the reference, and what the
//! processors' own `process` runs.

use std::sync::Arc;

use super::argmax;

/// One step's edit of a logits processor.
#[derive(Clone, Debug, PartialEq)]
pub enum Edit {
    /// Nothing this step.
    Keep,
    /// Only these ids stay; every other logit becomes -inf.
    Allow(Vec<u32>),
    /// These ids become -inf, unless that would leave no finite logit.
    Ban(Vec<u32>),
    /// The citation nudge.
    Nudge(Nudge),
}

/// When the top token ends a sentence and the best of the `open` tokens is within `margin` of
/// it, that open token is raised to one above the top logit (how
/// [`crate::rag::citations::CitationGuide`] asks for a citation where a sentence ends).
#[derive(Clone, Debug, PartialEq)]
pub struct Nudge {
    /// Bit `t % 32` of word `t / 32` is set when token `t` ends a sentence.
    pub ends: Arc<[u32]>,
    /// The tokens that open a citation marker.
    pub open: Arc<[u32]>,
    /// In logits.
    pub margin: f32,
}

/// A bit set over token ids, as [`Nudge::ends`] holds it.
pub fn token_mask(vocab: usize, set: impl Fn(u32) -> bool) -> Arc<[u32]> {
    let mut words = vec![0u32; vocab.div_ceil(32)];
    for t in 0..vocab as u32 {
        if set(t) {
            words[t as usize / 32] |= 1 << (t % 32);
        }
    }
    words.into()
}

/// Whether token `t` is in the bit set `mask`.
pub fn in_mask(mask: &[u32], t: u32) -> bool {
    mask.get(t as usize / 32)
        .is_some_and(|w| (w >> (t % 32)) & 1 == 1)
}

impl Edit {
    /// Applies the edit to one row of logits, in place.
    pub fn apply(&self, logits: &mut [f32]) {
        match self {
            Edit::Keep => {}
            Edit::Allow(ids) => {
                for (t, x) in logits.iter_mut().enumerate() {
                    if !ids.contains(&(t as u32)) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            Edit::Ban(ids) => {
                // Never leave the step without a token to choose (an earlier edit may have
                // narrowed the choice to exactly these).
                let open = logits
                    .iter()
                    .enumerate()
                    .any(|(t, x)| x.is_finite() && !ids.contains(&(t as u32)));
                if open {
                    for &t in ids {
                        if let Some(x) = logits.get_mut(t as usize) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            Edit::Nudge(n) => n.apply(logits),
        }
    }

    /// Whether it reads the logits (so the edit kernel applies it; a ban is the sampling
    /// kernel's).
    pub fn reads_logits(&self) -> bool {
        matches!(self, Edit::Allow(_) | Edit::Nudge(_))
    }
}

impl Nudge {
    fn apply(&self, logits: &mut [f32]) {
        let Some(top) = argmax(logits) else { return };
        if !in_mask(&self.ends, top) {
            return;
        }
        // The last of equal best (as `max_by` picks), in IEEE total order.
        let best_open = self
            .open
            .iter()
            .copied()
            .filter(|&o| (o as usize) < logits.len())
            .max_by(|&a, &b| logits[a as usize].total_cmp(&logits[b as usize]));
        if let Some(o) = best_open {
            let (top_logit, open_logit) = (logits[top as usize], logits[o as usize]);
            if open_logit.is_finite() && open_logit > top_logit - self.margin {
                logits[o as usize] = top_logit + 1.0;
            }
        }
    }
}

/// Words per edit in the edit kernel's table (`kernels/logits_edit.cu`).
pub const META_WORDS: usize = 7;
const KIND_ALLOW: u32 = 1;
const KIND_NUDGE: u32 = 2;

/// The edit kernel's table for `edits` (row, edit) whose edit reads the logits (others are
/// skipped): per edit its row, kind, margin (f32 bits), id list (start, length) and mask
/// (start, words), then the lists and the masks, positions counted from the table's start.
/// Allow-lists go in ascending order (the kernel searches them); open ids keep theirs (ties
/// go to the last); a mask shared by several rows is stored once. Returns the table and the
/// number of edits in it.
pub fn edit_table(edits: &[(usize, &Edit)]) -> (Vec<u32>, u32) {
    let kept: Vec<(usize, &Edit)> = edits
        .iter()
        .copied()
        .filter(|(_, e)| e.reads_logits())
        .collect();
    let mut head = Vec::with_capacity(kept.len() * META_WORDS);
    let mut tail: Vec<u32> = Vec::new();
    let base = kept.len() * META_WORDS;
    let mut masks: Vec<(*const u32, u32)> = Vec::new();
    for (row, e) in &kept {
        let at = (base + tail.len()) as u32;
        match e {
            Edit::Allow(ids) => {
                let mut sorted = ids.clone();
                sorted.sort_unstable();
                sorted.dedup();
                head.extend([*row as u32, KIND_ALLOW, 0, at, sorted.len() as u32, 0, 0]);
                tail.extend(sorted);
            }
            Edit::Nudge(n) => {
                tail.extend(n.open.iter());
                let ptr = n.ends.as_ptr();
                let mask_at = match masks.iter().find(|(p, _)| *p == ptr) {
                    Some(&(_, m)) => m,
                    None => {
                        let m = (base + tail.len()) as u32;
                        tail.extend(n.ends.iter());
                        masks.push((ptr, m));
                        m
                    }
                };
                head.extend([
                    *row as u32,
                    KIND_NUDGE,
                    n.margin.to_bits(),
                    at,
                    n.open.len() as u32,
                    mask_at,
                    n.ends.len() as u32,
                ]);
            }
            Edit::Keep | Edit::Ban(_) => unreachable!("filtered above"),
        }
    }
    head.extend(tail);
    (head, kept.len() as u32)
}

/// What the GPU does for one sampler's step: `edit` (an allow-list, the nudge, or nothing)
/// applied to the row in place, then the sampling kernel with `bans` (the sampler's suppressed
/// ids and the processors' bans) as its banned ids.
#[derive(Clone, Debug, PartialEq)]
pub struct DevicePlan {
    pub edit: Edit,
    pub bans: Vec<u32>,
}

/// Folds the processors' edits of one step, in their order, into a [`DevicePlan`] for a
/// vocabulary of `vocab` whose logits the model gives finite; `suppress` are the sampler's own
/// banned ids. `None` when the order matters in a way the plan cannot keep: an edit that reads
/// the logits after a ban or after another such edit (the host then runs the processors).
pub fn fold(
    edits: impl IntoIterator<Item = Edit>,
    suppress: &[u32],
    vocab: usize,
) -> Option<DevicePlan> {
    let mut first = Edit::Keep;
    let mut banned: Vec<u32> = Vec::new();
    for e in edits {
        match e {
            Edit::Keep => {}
            Edit::Allow(_) | Edit::Nudge(_) => {
                if first != Edit::Keep || !banned.is_empty() {
                    return None;
                }
                first = e;
            }
            Edit::Ban(ids) => {
                let gone = |t: u32| ids.contains(&t) || banned.contains(&t);
                // Whether a finite logit would remain: of the allowed ids, or of the vocabulary
                // (every logit finite, the nudge keeping them so).
                let remains = match &first {
                    Edit::Allow(allowed) => {
                        allowed.iter().any(|&t| (t as usize) < vocab && !gone(t))
                    }
                    _ => {
                        let mut out: Vec<u32> = ids
                            .iter()
                            .chain(&banned)
                            .copied()
                            .filter(|&t| (t as usize) < vocab)
                            .collect();
                        out.sort_unstable();
                        out.dedup();
                        out.len() < vocab
                    }
                };
                if remains {
                    banned.extend(ids);
                }
            }
        }
    }
    let mut bans = suppress.to_vec();
    bans.extend(banned);
    Some(DevicePlan { edit: first, bans })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_hold_exactly_their_tokens() {
        let mask = token_mask(70, |t| t % 7 == 3);
        assert_eq!(mask.len(), 3);
        for t in 0..80 {
            assert_eq!(in_mask(&mask, t), t < 70 && t % 7 == 3, "{t}");
        }
    }

    #[test]
    fn each_edit_does_what_it_says() {
        let row = vec![0.5f32, 2.0, -1.0, 2.0, 1.5];
        let mut allow = row.clone();
        Edit::Allow(vec![2, 4, 9]).apply(&mut allow);
        let inf = f32::NEG_INFINITY;
        assert_eq!(allow, vec![inf, inf, -1.0, inf, 1.5]);
        let mut ban = row.clone();
        Edit::Ban(vec![1, 3]).apply(&mut ban);
        assert_eq!(ban, vec![0.5, inf, -1.0, inf, 1.5]);
        // A ban that would leave nothing bans nothing.
        let mut only = allow.clone();
        Edit::Ban(vec![2, 4]).apply(&mut only);
        assert_eq!(only, allow);
        // The nudge: the top (1, the first of the two 2.0s) ends a sentence; the better open
        // token within the margin rises above it.
        let nudge = |margin| Nudge {
            ends: token_mask(5, |t| t == 1),
            open: vec![0u32, 4].into(),
            margin,
        };
        let mut nudged = row.clone();
        Edit::Nudge(nudge(1.0)).apply(&mut nudged);
        assert_eq!(nudged, vec![0.5, 2.0, -1.0, 2.0, 3.0]);
        let mut far = row.clone();
        Edit::Nudge(nudge(0.4)).apply(&mut far);
        assert_eq!(far, row);
        // A top token that ends nothing: no nudge.
        let mut plain = row.clone();
        Edit::Nudge(Nudge {
            ends: token_mask(5, |t| t == 3),
            ..nudge(1.0)
        })
        .apply(&mut plain);
        assert_eq!(plain, row);
    }

    /// The table holds what the kernel reads: each edit's row and kind, its ids where its
    /// header says (allow-lists sorted), one copy of a shared mask.
    #[test]
    fn the_edit_table_points_at_each_edits_data() {
        let ends = token_mask(40, |t| t % 2 == 0);
        let nudge = |margin| {
            Edit::Nudge(Nudge {
                ends: ends.clone(),
                open: vec![9u32, 3].into(),
                margin,
            })
        };
        let (allow, n1, n2) = (Edit::Allow(vec![7, 2, 7]), nudge(1.5), nudge(0.25));
        let ban = Edit::Ban(vec![1]);
        let edits = [(0, &n1), (1, &ban), (2, &allow), (4, &Edit::Keep), (5, &n2)];
        let (table, n) = edit_table(&edits);
        assert_eq!(n, 3);
        let head = |i: usize| &table[i * META_WORDS..(i + 1) * META_WORDS];
        let ids = |h: &[u32]| table[h[3] as usize..(h[3] + h[4]) as usize].to_vec();
        let mask = |h: &[u32]| table[h[5] as usize..(h[5] + h[6]) as usize].to_vec();
        let (a, b, c) = (head(0), head(1), head(2));
        assert_eq!((a[0], a[1], f32::from_bits(a[2])), (0, KIND_NUDGE, 1.5));
        assert_eq!(ids(a), vec![9, 3]);
        assert_eq!(mask(a), ends.to_vec());
        assert_eq!((b[0], b[1]), (2, KIND_ALLOW));
        assert_eq!(ids(b), vec![2, 7]);
        assert_eq!((c[0], c[1], f32::from_bits(c[2])), (5, KIND_NUDGE, 0.25));
        assert_eq!(c[5], a[5], "one copy of the shared mask");
        assert_eq!(table.len(), 3 * META_WORDS + 2 + ends.len() + 2 + 2);
    }

    #[test]
    fn folding_keeps_the_order_that_matters() {
        let nudge = Edit::Nudge(Nudge {
            ends: token_mask(8, |_| true),
            open: vec![1u32].into(),
            margin: 1.0,
        });
        // Nudge, then bans: the bans join the suppressed ids.
        let plan = fold([nudge.clone(), Edit::Ban(vec![5])], &[7], 8).unwrap();
        assert_eq!(plan.edit, nudge);
        assert_eq!(plan.bans, vec![7, 5]);
        // An allow-list whose every id a later ban takes: the ban is dropped, as the host
        // would drop it.
        let plan = fold([Edit::Allow(vec![2, 3]), Edit::Ban(vec![2, 3])], &[], 8).unwrap();
        assert_eq!(plan.bans, Vec::<u32>::new());
        let plan = fold([Edit::Allow(vec![2, 3]), Edit::Ban(vec![3])], &[], 8).unwrap();
        assert_eq!(plan.bans, vec![3]);
        // Bans over the whole vocabulary are dropped; a second one counts the first.
        let all: Vec<u32> = (0..8).collect();
        assert_eq!(
            fold([Edit::Ban(all)], &[], 8).unwrap().bans,
            Vec::<u32>::new()
        );
        let plan = fold(
            [Edit::Ban((0..4).collect()), Edit::Ban((4..8).collect())],
            &[],
            8,
        );
        assert_eq!(plan.unwrap().bans, vec![0, 1, 2, 3]);
        // Edits that read the logits after a ban, or two of them: the host's work.
        assert!(fold([Edit::Ban(vec![1]), nudge.clone()], &[], 8).is_none());
        assert!(fold([nudge.clone(), Edit::Allow(vec![1])], &[], 8).is_none());
        assert_eq!(
            fold([Edit::Keep, Edit::Keep], &[3], 8).unwrap().edit,
            Edit::Keep
        );
    }
}
