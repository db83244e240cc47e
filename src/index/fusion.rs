//! Reciprocal-rank fusion of ranked lists of passages.

use std::collections::HashMap;

/// Fuses ranked lists (best first) with weights: a passage's score is the sum over lists of
/// `weight / (k + rank)`, ranks from 1. Returns passages by fused score, best first; ties keep
/// the order in which passages were first seen.
pub fn rrf(lists: &[(&[String], f32)], k: f32) -> Vec<(String, f32)> {
    let mut scores: HashMap<&str, (f32, usize)> = HashMap::new();
    let mut order = 0;
    for (list, weight) in lists {
        for (rank, id) in list.iter().enumerate() {
            let e = scores.entry(id.as_str()).or_insert_with(|| {
                order += 1;
                (0.0, order)
            });
            e.0 += weight / (k + rank as f32 + 1.0);
        }
    }
    let mut out: Vec<(&str, (f32, usize))> = scores.into_iter().collect();
    out.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0).then(a.1 .1.cmp(&b.1 .1)));
    out.into_iter()
        .map(|(id, (s, _))| (id.to_string(), s))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn agreement_beats_a_single_first_place() {
        let dense = ids(&["a", "b", "c"]);
        let bm25 = ids(&["d", "b", "a"]);
        let fused = rrf(&[(&dense, 1.0), (&bm25, 1.0)], 60.0);
        let order: Vec<&str> = fused.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(order, ["a", "b", "d", "c"]);
    }

    #[test]
    fn weights_shift_the_balance() {
        let dense = ids(&["a", "b"]);
        let bm25 = ids(&["b", "a"]);
        let fused = rrf(&[(&dense, 2.0), (&bm25, 1.0)], 10.0);
        assert_eq!(fused[0].0, "a");
        let fused = rrf(&[(&dense, 1.0), (&bm25, 2.0)], 10.0);
        assert_eq!(fused[0].0, "b");
    }
}
