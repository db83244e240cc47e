//! PDF files (a guideline as published): the text of each page, placed by the glyph positions
//! the PDF gives, as Markdown with page anchors.
//!
//! Why `pdf-extract` (on `lopdf`) and not poppler's `pdftotext`: it runs in the process, so a
//! hospital's deployment needs no system package and a batch needs no subprocess per file, and it
//! hands us every glyph with its position and font size, which is what finding headings (larger
//! type), table rows (wide gaps between cells) and running headers needs. Its text decoding covers
//! the font encodings and ToUnicode maps that guideline PDFs use. Its parser can panic on a broken
//! file; that panic is caught and becomes this file's error.
//!
//! What is produced:
//! - lines from glyphs sharing a baseline, left to right; a gap wider than two em between cells
//!   becomes ` | `, so a table row stays one line of text;
//! - lines in type clearly larger than the body's become Markdown headings (largest `#`), so the
//!   chunker cuts sections there and citations name them;
//! - running headers and footers (a line among the first or last two of a page, page numbers
//!   read as any number, repeated on at least half of the pages) removed, since repeated on every
//!   page they would dominate BM25;
//! - `page_starts` in the metadata: the byte offset in the text where each page begins, so a
//!   chunk's page is found from its offset.

use std::collections::HashMap;
use std::path::Path;

use pdf_extract::{Document, MediaBox, Object, OutputDev, OutputError, Transform};
use serde_json::{Map, Value};

use super::reader::SourceDoc;
use crate::error::IngestError;

/// Largest PDF file read (it is held in memory while parsed).
pub const MAX_PDF_BYTES: u64 = 256 << 20;

/// Metadata key of the page offsets.
pub const PAGE_STARTS: &str = "page_starts";

/// Reads a PDF file; `id` is the path as given.
pub fn read_pdf(path: &Path) -> Result<SourceDoc, IngestError> {
    super::reader::check_size(path, MAX_PDF_BYTES, "a PDF file")?;
    let raw = std::fs::read(path).map_err(|e| IngestError::io(path, e))?;
    let fallback = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("document")
        .replace(['-', '_'], " ");
    parse_pdf(&raw, &path.to_string_lossy(), &fallback)
        .map_err(|e| IngestError::Invalid(format!("{}: {e}", path.display())))
}

/// Parses a PDF held in memory into one document with id `id`.
pub fn parse_pdf(bytes: &[u8], id: &str, fallback_title: &str) -> Result<SourceDoc, String> {
    if !bytes.starts_with(b"%PDF-") {
        return Err("not a PDF (no %PDF- header)".into());
    }
    // The parser can panic on a malformed file: that is this file's error, not the server's.
    let pages = match std::panic::catch_unwind(|| read_pages(bytes)) {
        Ok(result) => result?,
        Err(_) => return Err("malformed PDF (the parser gave up)".into()),
    };
    let (info_title, info_date) = pages.info;
    let mut doc = assemble(&pages.pages);
    if doc.text.trim().is_empty() {
        return Err("no text (a scanned PDF needs OCR first)".into());
    }
    let mut meta = Map::new();
    meta.insert("source_type".into(), Value::String("pdf".into()));
    meta.insert("pages".into(), Value::from(pages.pages.len()));
    meta.insert(
        PAGE_STARTS.into(),
        Value::Array(doc.page_starts.drain(..).map(Value::from).collect()),
    );
    let title = info_title
        .filter(|t| !t.trim().is_empty())
        .or(doc.first_heading.take())
        .unwrap_or_else(|| fallback_title.to_string());
    Ok(SourceDoc {
        id: id.to_string(),
        title,
        source: String::new(),
        url: String::new(),
        date: info_date.unwrap_or_default(),
        metadata: meta,
        markdown: true,
        text: doc.text,
    })
}

/// The 1-based page holding byte `offset` of a document's text, from its `page_starts`.
pub fn page_of(metadata: &Map<String, Value>, offset: usize) -> Option<u32> {
    let starts = metadata.get(PAGE_STARTS)?.as_array()?;
    let n = starts
        .iter()
        .filter_map(Value::as_u64)
        .take_while(|&s| s as usize <= offset)
        .count();
    (n > 0).then_some(n as u32)
}

/// One glyph placed on its page (y grows downwards).
#[derive(Clone, Debug)]
struct Glyph {
    x: f64,
    y: f64,
    end: f64,
    size: f64,
    text: String,
}

/// One line of a page.
#[derive(Clone, Debug, PartialEq)]
struct Line {
    text: String,
    /// Font size of most of its characters.
    size: f64,
    /// Baseline, from the top of the page.
    y: f64,
}

struct Pages {
    pages: Vec<Vec<Line>>,
    info: (Option<String>, Option<String>),
}

/// Collects the glyphs of one page.
#[derive(Default)]
struct Collector {
    height: f64,
    glyphs: Vec<Glyph>,
}

impl OutputDev for Collector {
    fn begin_page(
        &mut self,
        _page: u32,
        media_box: &MediaBox,
        _art_box: Option<(f64, f64, f64, f64)>,
    ) -> Result<(), OutputError> {
        self.height = media_box.ury - media_box.lly;
        Ok(())
    }

    fn end_page(&mut self) -> Result<(), OutputError> {
        Ok(())
    }

    fn output_character(
        &mut self,
        trm: &Transform,
        width: f64,
        _spacing: f64,
        font_size: f64,
        text: &str,
    ) -> Result<(), OutputError> {
        let scale = (trm.m11 * trm.m22 - trm.m12 * trm.m21).abs().sqrt();
        let size = font_size * scale;
        if !size.is_finite() || size <= 0.0 || text.is_empty() {
            return Ok(());
        }
        self.glyphs.push(Glyph {
            x: trm.m31,
            y: self.height - trm.m32,
            end: trm.m31 + width * size,
            size,
            text: text.to_string(),
        });
        Ok(())
    }

    fn begin_word(&mut self) -> Result<(), OutputError> {
        Ok(())
    }

    fn end_word(&mut self) -> Result<(), OutputError> {
        Ok(())
    }

    fn end_line(&mut self) -> Result<(), OutputError> {
        Ok(())
    }
}

fn read_pages(bytes: &[u8]) -> Result<Pages, String> {
    let mut doc = Document::load_mem(bytes).map_err(|e| {
        let e = e.to_string();
        if e.to_lowercase().contains("password") || e.to_lowercase().contains("decrypt") {
            format!("encrypted PDF that needs a password ({e})")
        } else {
            format!("malformed PDF: {e}")
        }
    })?;
    if doc.is_encrypted() && doc.decrypt("").is_err() {
        return Err("encrypted PDF that needs a password".into());
    }
    let info = info(&doc);
    let mut pages = Vec::new();
    for (number, _) in doc.get_pages() {
        let mut collector = Collector::default();
        pdf_extract::output_doc_page(&doc, &mut collector, number)
            .map_err(|e| format!("page {number}: {e:?}"))?;
        pages.push(lines_of(collector.glyphs));
    }
    if pages.is_empty() {
        return Err("no pages".into());
    }
    Ok(Pages { pages, info })
}

/// The title and date (`YYYY-MM-DD`) of the document information dictionary.
fn info(doc: &Document) -> (Option<String>, Option<String>) {
    let Some(dict) = doc
        .trailer
        .get(b"Info")
        .ok()
        .and_then(|o| o.as_reference().ok())
        .and_then(|id| doc.get_dictionary(id).ok())
    else {
        return (None, None);
    };
    let text = |key: &[u8]| match dict.get(key) {
        Ok(Object::String(bytes, _)) => Some(decode_text_string(bytes)),
        _ => None,
    };
    let date = text(b"ModDate")
        .or_else(|| text(b"CreationDate"))
        .and_then(|d| pdf_date(&d));
    (text(b"Title").map(|t| t.trim().to_string()), date)
}

/// A PDF text string: UTF-16 with a byte-order mark, else (close enough) Latin-1.
fn decode_text_string(bytes: &[u8]) -> String {
    if let Some(rest) = bytes.strip_prefix(&[0xfe, 0xff]) {
        let units: Vec<u16> = rest
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16_lossy(&units)
    } else {
        bytes.iter().map(|&b| b as char).collect()
    }
}

/// `D:20240501120000Z` -> `2024-05-01` (or `2024-05`, `2024` when that is all it says).
fn pdf_date(d: &str) -> Option<String> {
    let digits: String = d
        .trim_start_matches("D:")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    match digits.len() {
        0..=3 => None,
        4..=5 => Some(digits[..4].to_string()),
        6..=7 => Some(format!("{}-{}", &digits[..4], &digits[4..6])),
        _ => Some(format!(
            "{}-{}-{}",
            &digits[..4],
            &digits[4..6],
            &digits[6..8]
        )),
    }
}

/// Groups a page's glyphs into lines, top to bottom, each read left to right.
fn lines_of(mut glyphs: Vec<Glyph>) -> Vec<Line> {
    glyphs.retain(|g| g.x.is_finite() && g.y.is_finite());
    glyphs.sort_by(|a, b| a.y.total_cmp(&b.y).then(a.x.total_cmp(&b.x)));
    let mut rows: Vec<Vec<Glyph>> = Vec::new();
    for g in glyphs {
        match rows.last_mut() {
            Some(row) if (g.y - row[0].y).abs() <= 0.4 * g.size.max(row[0].size) => row.push(g),
            _ => rows.push(vec![g]),
        }
    }
    rows.into_iter()
        .filter_map(|mut row| {
            row.sort_by(|a, b| a.x.total_cmp(&b.x));
            let line = join_row(&row);
            (!line.text.is_empty()).then_some(line)
        })
        .collect()
}

fn join_row(row: &[Glyph]) -> Line {
    let mut text = String::new();
    let mut last_end: Option<f64> = None;
    let mut sizes: HashMap<i64, usize> = HashMap::new();
    for g in row {
        if let Some(end) = last_end {
            let gap = g.x - end;
            if gap > 2.0 * g.size {
                text.truncate(text.trim_end().len());
                text.push_str(" | ");
            } else if gap > 0.15 * g.size && !text.ends_with(' ') {
                text.push(' ');
            }
        }
        for c in g.text.chars() {
            let c = if c.is_whitespace() { ' ' } else { c };
            if !(c == ' ' && (text.is_empty() || text.ends_with(' '))) && !c.is_control() {
                text.push(c);
            }
        }
        if !g.text.trim().is_empty() {
            *sizes.entry((g.size * 10.0).round() as i64).or_default() += 1;
        }
        last_end = Some(g.end.max(last_end.unwrap_or(f64::MIN)));
    }
    let size = sizes
        .into_iter()
        .max_by_key(|&(s, n)| (n, s))
        .map(|(s, _)| s as f64 / 10.0)
        .unwrap_or(0.0);
    Line {
        text: text.trim().trim_matches('|').trim().to_string(),
        size,
        y: row.first().map(|g| g.y).unwrap_or(0.0),
    }
}

/// A line as compared across pages: lower case, every number read as `#`.
fn running_key(text: &str) -> String {
    let mut key = String::new();
    let mut in_number = false;
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_digit() {
            if !in_number {
                key.push('#');
            }
            in_number = true;
            continue;
        }
        in_number = false;
        if !c.is_whitespace() || !key.ends_with(' ') {
            key.push(c);
        }
    }
    key.trim().to_string()
}

/// Lines near the top or bottom of a page.
const BAND: usize = 2;

/// Indices of the running header and footer lines on each page.
fn running_lines(pages: &[Vec<Line>]) -> Vec<Vec<usize>> {
    let band = |page: &[Line]| -> Vec<usize> {
        let n = page.len();
        let mut idx: Vec<usize> = (0..n.min(BAND)).collect();
        idx.extend(n.saturating_sub(BAND).max(BAND.min(n))..n);
        idx
    };
    // On how many pages each key shows in the band.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for page in pages {
        let mut keys: Vec<String> = band(page)
            .into_iter()
            .map(|i| running_key(&page[i].text))
            .collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            *seen.entry(k).or_default() += 1;
        }
    }
    let needed = pages.len().div_ceil(2).max(2);
    pages
        .iter()
        .map(|page| {
            band(page)
                .into_iter()
                .filter(|&i| {
                    let key = running_key(&page[i].text);
                    pages.len() >= 2 && seen.get(&key).copied().unwrap_or(0) >= needed
                })
                .collect()
        })
        .collect()
}

struct Assembled {
    text: String,
    page_starts: Vec<usize>,
    first_heading: Option<String>,
}

/// The body's font size: the size of most characters.
fn body_size(pages: &[Vec<Line>]) -> f64 {
    let mut by_size: HashMap<i64, usize> = HashMap::new();
    for line in pages.iter().flatten() {
        *by_size
            .entry((line.size * 10.0).round() as i64)
            .or_default() += line.text.len();
    }
    by_size
        .into_iter()
        .max_by_key(|&(s, n)| (n, -s))
        .map(|(s, _)| s as f64 / 10.0)
        .unwrap_or(0.0)
}

fn assemble(pages: &[Vec<Line>]) -> Assembled {
    let running = running_lines(pages);
    let body = body_size(pages);
    // Heading sizes, largest first: `#`, `##`, then `###` for the rest.
    let mut heading_sizes: Vec<i64> = pages
        .iter()
        .flatten()
        .filter(|l| is_heading(l, body))
        .map(|l| (l.size * 10.0).round() as i64)
        .collect();
    heading_sizes.sort_unstable_by(|a, b| b.cmp(a));
    heading_sizes.dedup();
    let mut text = String::new();
    let mut page_starts = Vec::with_capacity(pages.len());
    let mut first_heading = None;
    for (page, drop) in pages.iter().zip(&running) {
        if !text.is_empty() && !text.ends_with("\n\n") {
            text.push('\n');
        }
        page_starts.push(text.len());
        let mut last: Option<&Line> = None;
        for (i, line) in page.iter().enumerate() {
            if drop.contains(&i) {
                continue;
            }
            if is_heading(line, body) {
                let rank = heading_sizes
                    .iter()
                    .position(|&s| s == (line.size * 10.0).round() as i64)
                    .unwrap_or(2)
                    .min(2);
                if !text.is_empty() && !text.ends_with("\n\n") {
                    text.push('\n');
                }
                text.push_str(&"#".repeat(rank + 1));
                text.push(' ');
                text.push_str(&line.text);
                text.push_str("\n\n");
                first_heading.get_or_insert_with(|| line.text.clone());
                last = None;
                continue;
            }
            // A gap of more than half a line between lines ends a paragraph.
            if let Some(prev) = last {
                if line.y - prev.y > 1.8 * prev.size.max(line.size) && !text.ends_with("\n\n") {
                    text.push('\n');
                }
            }
            text.push_str(&line.text);
            text.push('\n');
            last = Some(line);
        }
    }
    Assembled {
        text,
        page_starts,
        first_heading,
    }
}

fn is_heading(line: &Line, body: f64) -> bool {
    body > 0.0
        && line.size >= body * 1.15
        && line.text.chars().count() <= 150
        && line.text.chars().any(char::is_alphabetic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_keys_read_numbers_alike() {
        assert_eq!(running_key("Page 12 of  40"), running_key("page 3 of 40"));
        assert_ne!(running_key("Chapter one"), running_key("Chapter two"));
        assert_eq!(pdf_date("D:2024"), Some("2024".into()));
        assert_eq!(pdf_date("D:202405"), Some("2024-05".into()));
        assert_eq!(pdf_date("x"), None);
    }

    #[test]
    fn page_of_counts_the_starts_at_or_before() {
        let meta: Map<String, Value> =
            serde_json::from_str(r#"{"page_starts": [0, 100, 250]}"#).unwrap();
        assert_eq!(page_of(&meta, 0), Some(1));
        assert_eq!(page_of(&meta, 99), Some(1));
        assert_eq!(page_of(&meta, 100), Some(2));
        assert_eq!(page_of(&meta, 9999), Some(3));
        assert_eq!(page_of(&Map::new(), 5), None);
    }
}
