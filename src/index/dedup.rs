//! Near-duplicate passages: the same paragraph copied into several documents (a guideline and
//! its patient version, a summary repeated per cancer type) would otherwise fill an answer's
//! context with one fact. Passages are compared by their word 4-grams: the share of the smaller
//! set found in the other (so a copy with a sentence added still counts); a passage too close to
//! a better-ranked one is dropped.

use std::collections::HashSet;

use super::SearchHit;

/// Word 4-grams of a text, lower case, punctuation ignored.
fn shingles(text: &str) -> HashSet<String> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    if words.len() < 4 {
        return words.into_iter().collect();
    }
    words.windows(4).map(|w| w.join(" ")).collect()
}

/// Share of the smaller set's 4-grams that the other holds.
fn overlap(a: &HashSet<String>, b: &HashSet<String>) -> f32 {
    let smaller = a.len().min(b.len());
    if smaller == 0 {
        return if a.len() == b.len() { 1.0 } else { 0.0 };
    }
    a.intersection(b).count() as f32 / smaller as f32
}

/// Keeps hits in rank order, dropping each that shares at least `threshold` of the smaller
/// 4-gram set with a hit already kept, until `k` are kept. Returns them and how many
/// were dropped. A threshold above 1 keeps everything.
pub fn collapse(hits: Vec<SearchHit>, threshold: f32, k: usize) -> (Vec<SearchHit>, usize) {
    let mut kept: Vec<(SearchHit, HashSet<String>)> = Vec::new();
    let mut dropped = 0;
    for hit in hits {
        if kept.len() == k {
            break;
        }
        let s = shingles(&hit.text);
        if kept
            .iter()
            .any(|(_, other)| overlap(&s, other) >= threshold)
        {
            dropped += 1;
            continue;
        }
        kept.push((hit, s));
    }
    (kept.into_iter().map(|(h, _)| h).collect(), dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(id: &str, text: &str) -> SearchHit {
        SearchHit {
            id: id.into(),
            chunk_id: format!("{id}#0"),
            score: 0.0,
            dense_score: 0.0,
            bm25_score: None,
            title: String::new(),
            section: String::new(),
            url: String::new(),
            date: String::new(),
            source: String::new(),
            text: text.into(),
            start: 0,
            end: 0,
            page: None,
            page_end: None,
        }
    }

    #[test]
    fn copies_give_way_to_the_better_ranked_one() {
        let para = "Testicular cancer that has spread can often still be cured with chemotherapy, \
                    and most men do well after treatment.";
        let hits = vec![
            hit("a", para),
            hit("b", &para.replace("most men", "Most men")),
            hit(
                "c",
                "Seminoma is treated with surgery, then radiation or chemotherapy.",
            ),
            hit("d", &format!("{para} Follow-up visits continue for years.")),
            hit("e", "Alpha-fetoprotein and hCG are tumour markers."),
        ];
        let (kept, dropped) = collapse(hits.clone(), 0.8, 3);
        let ids: Vec<&str> = kept.iter().map(|h| h.id.as_str()).collect();
        assert_eq!(ids, ["a", "c", "e"]);
        assert_eq!(dropped, 2);
        // Off above 1: rank order, first k.
        let (kept, dropped) = collapse(hits, 1.1, 3);
        assert_eq!(kept.len(), 3);
        assert_eq!(dropped, 0);
        assert_eq!(kept[1].id, "b");
    }
}
