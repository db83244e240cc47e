//! Splits a document into chunks that fit the embedder: sections at Markdown headings, then
//! paragraphs and sentences packed up to a token budget, with a configurable overlap. Each chunk
//! keeps its section path and its byte range in the document text, so a citation can point at it.

use std::ops::Range;

use super::reader::SourceDoc;

/// Counts the embedder's tokens of a text, special tokens excluded.
pub trait TokenCounter {
    fn count(&self, text: &str) -> usize;
}

/// Chunking limits.
#[derive(Clone, Copy, Debug)]
pub struct ChunkOptions {
    /// Tokens the embedder reads at most, special tokens included (256 for MiniLM).
    pub max_tokens: usize,
    /// Tokens of the previous chunk repeated at the start of the next one.
    pub overlap_tokens: usize,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            overlap_tokens: 32,
        }
    }
}

/// One chunk of a document.
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    /// Position in the document, from 0.
    pub ord: usize,
    /// Heading path, outermost first, joined with " > " (empty for unsectioned text).
    pub section: String,
    /// Byte range in the document text.
    pub range: Range<usize>,
    pub text: String,
    /// What the embedder and BM25 read: the title and section, then the text.
    pub indexed_text: String,
}

/// Title and section path put before a chunk's text when it is indexed.
pub fn context_line(title: &str, section: &str) -> String {
    match (title.is_empty(), section.is_empty()) {
        (true, _) => section.to_string(),
        (false, true) => title.to_string(),
        (false, false) if section == title || section.starts_with(&format!("{title} > ")) => {
            section.to_string()
        }
        (false, false) => format!("{title} > {section}"),
    }
}

/// Sections of a Markdown text: (heading path, body byte range), headings excluded.
fn sections(text: &str, markdown: bool) -> Vec<(String, Range<usize>)> {
    if !markdown {
        return vec![(String::new(), 0..text.len())];
    }
    let mut out = Vec::new();
    let mut path: Vec<(usize, String)> = Vec::new();
    let mut body_start = 0;
    let mut pos = 0;
    let mut current = String::new();
    let mut in_fence = false;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_end();
        if trimmed.starts_with("```") {
            in_fence = !in_fence;
        }
        let level = trimmed.chars().take_while(|&c| c == '#').count();
        let is_heading = !in_fence
            && (1..=6).contains(&level)
            && trimmed[level..].starts_with(' ')
            && !trimmed[level..].trim().is_empty();
        if is_heading {
            out.push((current.clone(), body_start..pos));
            let title = trimmed[level..].trim().to_string();
            path.retain(|(l, _)| *l < level);
            path.push((level, title));
            current = path
                .iter()
                .map(|(_, t)| t.as_str())
                .collect::<Vec<_>>()
                .join(" > ");
            body_start = pos + line.len();
        }
        pos += line.len();
    }
    out.push((current, body_start..text.len()));
    out.retain(|(path, r)| !text[r.clone()].trim().is_empty() && !is_reference_list(path));
    out
}

/// A document's own reference list is not evidence to retrieve: it stays in the stored text (a
/// citation can still show it) but is not chunked.
fn is_reference_list(path: &str) -> bool {
    let last = path
        .rsplit(" > ")
        .next()
        .unwrap_or("")
        .trim()
        .to_lowercase();
    matches!(last.as_str(), "references" | "sources" | "bibliography")
}

/// Units a chunk is packed from: sentences within paragraphs, as byte ranges, trimmed.
fn units(text: &str, range: Range<usize>) -> Vec<Range<usize>> {
    let body = &text[range.clone()];
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = body.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let end_here = match bytes[i] {
            b'.' | b'!' | b'?' => i + 1 < bytes.len() && bytes[i + 1].is_ascii_whitespace(),
            b'\n' => i + 1 < bytes.len() && bytes[i + 1] == b'\n',
            _ => false,
        };
        if end_here || i + 1 == bytes.len() {
            push_trimmed(body, range.start, start..i + 1, &mut out);
            start = i + 1;
        }
        i += 1;
    }
    out
}

fn push_trimmed(body: &str, offset: usize, r: Range<usize>, out: &mut Vec<Range<usize>>) {
    let s = &body[r.clone()];
    let lead = s.len() - s.trim_start().len();
    let trail = s.len() - s.trim_end().len();
    if lead + trail < s.len() {
        out.push(offset + r.start + lead..offset + r.end - trail);
    }
}

/// Splits one over-long unit at word boundaries into pieces of at most `budget` tokens.
fn split_long(
    text: &str,
    r: Range<usize>,
    budget: usize,
    counter: &dyn TokenCounter,
) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = r.start;
    let mut last_fit = None;
    let mut idx = r.start;
    for word in text[r.clone()].split_inclusive(char::is_whitespace) {
        idx += word.len();
        if counter.count(&text[start..idx]) <= budget {
            last_fit = Some(idx);
            continue;
        }
        match last_fit {
            Some(end) => {
                out.push(start..end);
                start = end;
                last_fit = (counter.count(&text[start..idx]) <= budget).then_some(idx);
            }
            None => {
                // A single "word" past the budget (a long URL, a table row): cut at characters.
                let mut end = start;
                for (o, ch) in text[start..idx].char_indices() {
                    if counter.count(&text[start..start + o + ch.len_utf8()]) > budget {
                        break;
                    }
                    end = start + o + ch.len_utf8();
                }
                let end = end.max(start + text[start..].chars().next().map_or(1, char::len_utf8));
                out.push(start..end);
                start = end;
                last_fit = None;
            }
        }
    }
    if start < r.end {
        out.push(start..r.end);
    }
    out.into_iter()
        .filter_map(|x| {
            let mut v = Vec::new();
            push_trimmed(text, 0, x, &mut v);
            v.pop()
        })
        .collect()
}

/// Chunks a document. Every chunk's indexed text fits `opts.max_tokens` with the special tokens.
pub fn chunk(doc: &SourceDoc, opts: ChunkOptions, counter: &dyn TokenCounter) -> Vec<Chunk> {
    let text = doc.text.as_str();
    let mut chunks = Vec::new();
    for (section, range) in sections(text, doc.markdown) {
        let context = context_line(&doc.title, &section);
        // Special tokens ([CLS], [SEP]), the context line and a little slack for tokens that
        // merge differently where pieces are joined.
        let budget = opts
            .max_tokens
            .saturating_sub(2 + counter.count(&context) + 4)
            .max(16);
        let mut pieces = Vec::new();
        for u in units(text, range) {
            if counter.count(&text[u.clone()]) > budget {
                pieces.extend(split_long(text, u, budget, counter));
            } else {
                pieces.push(u);
            }
        }
        let counts: Vec<usize> = pieces
            .iter()
            .map(|p| counter.count(&text[p.clone()]))
            .collect();
        let mut first = 0;
        while first < pieces.len() {
            // Greedy: as many pieces as fit.
            let mut last = first;
            while last + 1 < pieces.len()
                && counter.count(&text[pieces[first].start..pieces[last + 1].end]) <= budget
            {
                last += 1;
            }
            let r = pieces[first].start..pieces[last].end;
            let body = text[r.clone()].to_string();
            chunks.push(Chunk {
                ord: chunks.len(),
                section: section.clone(),
                indexed_text: if context.is_empty() {
                    body.clone()
                } else {
                    format!("{context}\n{body}")
                },
                text: body,
                range: r,
            });
            if last + 1 >= pieces.len() {
                break;
            }
            // Overlap: start the next chunk at trailing pieces worth at most overlap_tokens,
            // always moving forward by at least one piece.
            let mut next = last + 1;
            let mut carried = 0;
            while next > first + 1 && carried + counts[next - 1] <= opts.overlap_tokens {
                carried += counts[next - 1];
                next -= 1;
            }
            first = next;
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per whitespace-separated word: enough to test the packing.
    struct Words;
    impl TokenCounter for Words {
        fn count(&self, text: &str) -> usize {
            text.split_whitespace().count()
        }
    }

    fn doc(text: &str, markdown: bool) -> SourceDoc {
        SourceDoc {
            id: "d".into(),
            title: "Sarcoma".into(),
            source: String::new(),
            url: String::new(),
            date: String::new(),
            metadata: Default::default(),
            markdown,
            text: text.into(),
        }
    }

    #[test]
    fn splits_at_headings_with_paths_and_offsets() {
        let text = "# Sarcoma\nIntro line.\n## Treatment\nSurgery first.\n### Radiation\nBefore or after.\n## Outlook\nVaries.\n";
        let d = doc(text, true);
        let cs = chunk(&d, ChunkOptions::default(), &Words);
        let got: Vec<(&str, &str)> = cs
            .iter()
            .map(|c| (c.section.as_str(), c.text.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("Sarcoma", "Intro line."),
                ("Sarcoma > Treatment", "Surgery first."),
                ("Sarcoma > Treatment > Radiation", "Before or after."),
                ("Sarcoma > Outlook", "Varies."),
            ]
        );
        for c in &cs {
            assert_eq!(&text[c.range.clone()], c.text);
        }
        assert_eq!(
            cs[2].indexed_text,
            "Sarcoma > Treatment > Radiation\nBefore or after."
        );
    }

    #[test]
    fn packs_sentences_under_the_budget_with_overlap() {
        let sentences: Vec<String> = (0..40)
            .map(|i| format!("Sentence {i} has five words."))
            .collect();
        let text = sentences.join(" ");
        let d = doc(&text, false);
        let opts = ChunkOptions {
            max_tokens: 40,
            overlap_tokens: 10,
        };
        let cs = chunk(&d, opts, &Words);
        assert!(cs.len() > 5);
        for c in &cs {
            assert!(Words.count(&c.indexed_text) + 2 <= 40, "{}", c.indexed_text);
            assert_eq!(&text[c.range.clone()], c.text);
        }
        // Consecutive chunks overlap by the carried sentences and cover everything.
        for w in cs.windows(2) {
            assert!(w[1].range.start < w[0].range.end, "overlap");
            assert!(w[1].range.start > w[0].range.start, "progress");
        }
        assert_eq!(cs[0].range.start, 0);
        assert_eq!(cs.last().unwrap().range.end, text.len());
    }

    #[test]
    fn a_sentence_longer_than_the_budget_is_cut_at_words() {
        let long: String = (0..100).map(|i| format!("w{i} ")).collect();
        let d = doc(long.trim(), false);
        let opts = ChunkOptions {
            max_tokens: 30,
            overlap_tokens: 0,
        };
        let cs = chunk(&d, opts, &Words);
        assert!(cs.len() >= 4);
        let words: usize = cs.iter().map(|c| Words.count(&c.text)).sum();
        assert_eq!(words, 100, "nothing lost, nothing repeated without overlap");
    }

    #[test]
    fn reference_lists_are_not_chunked() {
        let d = doc("# T\nClaim [1].\n## References\n1. A paper.\n", true);
        let cs = chunk(&d, ChunkOptions::default(), &Words);
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].text, "Claim [1].");
    }

    #[test]
    fn headings_inside_code_fences_are_text() {
        let d = doc("# T\n```\n# not a heading\n```\n", true);
        let cs = chunk(&d, ChunkOptions::default(), &Words);
        assert_eq!(cs.len(), 1);
        assert!(cs[0].text.contains("# not a heading"));
    }
}
