//! Fusion of ranked lists of passages: by reciprocal rank, or by a convex combination of their
//! normalised scores.

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

/// Fuses scored lists (best first) with weights: each list's scores divided by its best (the
/// lower bound taken as 0, not the list's minimum, so the last of a short list is not pushed to
/// 0; negative scores count 0), a passage absent from a list counting 0 there; a passage's score
/// is the weighted sum. Best first; ties keep the order in which passages were first seen.
pub fn convex(lists: &[(&[(String, f32)], f32)]) -> Vec<(String, f32)> {
    let mut scores: HashMap<&str, (f32, usize)> = HashMap::new();
    let mut order = 0;
    for (list, weight) in lists {
        let hi = list.iter().fold(0f32, |hi, (_, s)| hi.max(*s));
        for (id, s) in list.iter() {
            let norm = if hi > 0.0 { s.max(0.0) / hi } else { 0.0 };
            let e = scores.entry(id.as_str()).or_insert_with(|| {
                order += 1;
                (0.0, order)
            });
            e.0 += weight * norm;
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

    #[test]
    fn convex_divides_each_list_by_its_best_and_weighs_them() {
        let dense = vec![
            ("a".to_string(), 0.8),
            ("c".to_string(), 0.6),
            ("b".to_string(), 0.4),
        ];
        let bm25 = vec![("b".to_string(), 30.0), ("d".to_string(), 15.0)];
        let fused = convex(&[(&dense, 0.6), (&bm25, 0.4)]);
        let score = |id: &str| fused.iter().find(|(p, _)| p == id).unwrap().1;
        assert!((score("a") - 0.6).abs() < 1e-6);
        assert!((score("b") - (0.3 + 0.4)).abs() < 1e-6);
        assert!((score("c") - 0.45).abs() < 1e-6);
        assert!((score("d") - 0.2).abs() < 1e-6);
        assert_eq!(fused[0].0, "b");
        assert_eq!(fused.len(), 4);
        // The last of a short list keeps its share: it is not pushed to 0.
        let two = vec![("x".to_string(), 0.5), ("y".to_string(), 0.45)];
        let fused = convex(&[(&two, 1.0)]);
        assert!((fused[1].1 - 0.9).abs() < 1e-6);
    }

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
