//! Readers: files on disk into [`SourceDoc`]s. Markdown and plain text (optional front matter)
//! become one document per file; JSONL one document per line (`id`, `text`, other fields kept).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::IngestError;

/// One document as read, before chunking.
#[derive(Clone, Debug, PartialEq)]
pub struct SourceDoc {
    /// The id given at ingest: the JSONL `id`, or the file path as given.
    pub id: String,
    pub title: String,
    pub source: String,
    pub url: String,
    /// Version or publication date, as written.
    pub date: String,
    /// Every other field (JSONL) or front-matter key.
    pub metadata: Map<String, Value>,
    /// Whether `text` is Markdown (headings mark sections).
    pub markdown: bool,
    pub text: String,
}

/// Splits `---` front matter (one `key: value` per line) from the body.
fn front_matter(text: &str) -> (Map<String, Value>, &str) {
    let mut meta = Map::new();
    let Some(rest) = text
        .strip_prefix("---\n")
        .or_else(|| text.strip_prefix("---\r\n"))
    else {
        return (meta, text);
    };
    let Some(end) = rest.find("\n---") else {
        return (meta, text);
    };
    for line in rest[..end].lines() {
        if let Some((k, v)) = line.split_once(':') {
            let (k, v) = (k.trim(), v.trim());
            if !k.is_empty() {
                meta.insert(k.to_lowercase(), Value::String(v.to_string()));
            }
        }
    }
    let body = &rest[end + 4..];
    let body = body.strip_prefix('\r').unwrap_or(body);
    (meta, body.strip_prefix('\n').unwrap_or(body))
}

fn take_string(meta: &mut Map<String, Value>, key: &str) -> Option<String> {
    match meta.remove(key)? {
        Value::String(s) => Some(s),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

/// Builds a document from its fields (`title`, `focus`, `date` or `version`, `source`, `url`
/// taken out of `meta`, the rest kept); `fallback_title` when none is given.
pub fn from_fields(
    id: String,
    mut meta: Map<String, Value>,
    text: String,
    markdown: bool,
    fallback_title: &str,
) -> SourceDoc {
    // MedQuAD-style corpora name their topic `focus`; it serves as the title when none is given.
    let title = take_string(&mut meta, "title")
        .or_else(|| {
            meta.get("focus")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| first_heading(&text, fallback_title));
    let date = take_string(&mut meta, "date")
        .or_else(|| take_string(&mut meta, "version"))
        .unwrap_or_default();
    meta.remove("id");
    SourceDoc {
        id,
        title,
        source: take_string(&mut meta, "source").unwrap_or_default(),
        url: take_string(&mut meta, "url").unwrap_or_default(),
        date,
        metadata: meta,
        markdown,
        text,
    }
}

fn first_heading(text: &str, fallback: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("# ").map(|t| t.trim().to_string()))
        .unwrap_or_else(|| fallback.to_string())
}

/// Reads one Markdown or text file.
pub fn read_text_file(path: &Path) -> Result<SourceDoc, IngestError> {
    let raw = std::fs::read_to_string(path).map_err(|e| IngestError::io(path, e))?;
    let markdown = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("md" | "markdown")
    );
    let (meta, body) = front_matter(&raw);
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().replace(['-', '_'], " "))
        .unwrap_or_default();
    Ok(from_fields(
        path.to_string_lossy().into_owned(),
        meta,
        body.to_string(),
        markdown,
        &stem,
    ))
}

/// Reads a JSONL file: one object per line with a string `id` and `text`; a malformed line is an
/// error naming its line number.
pub fn read_jsonl(path: &Path) -> Result<Vec<SourceDoc>, IngestError> {
    let raw = std::fs::read_to_string(path).map_err(|e| IngestError::io(path, e))?;
    let mut docs = Vec::new();
    for (n, line) in raw.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad =
            |why: String| IngestError::Invalid(format!("{}:{}: {why}", path.display(), n + 1));
        let mut obj = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(o)) => o,
            Ok(_) => return Err(bad("not a JSON object".into())),
            Err(e) => return Err(bad(e.to_string())),
        };
        let id = match obj.remove("id") {
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(Value::Number(x)) => x.to_string(),
            _ => return Err(bad("missing string `id`".into())),
        };
        let text = match obj.remove("text") {
            Some(Value::String(s)) => s,
            _ => return Err(bad("missing string `text`".into())),
        };
        let fallback = id.clone();
        docs.push(from_fields(id, obj, text, false, &fallback));
    }
    Ok(docs)
}

/// Every ingestible file under `path` (itself, or a folder walked recursively, sorted).
pub fn collect_files(path: &Path) -> Result<Vec<PathBuf>, IngestError> {
    let meta = std::fs::metadata(path).map_err(|e| IngestError::io(path, e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| IngestError::io(&dir, e))? {
            let p = entry.map_err(|e| IngestError::io(&dir, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if is_ingestible(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn is_ingestible(p: &Path) -> bool {
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
    // Folder READMEs describe the corpus; they are not part of it.
    if name.eq_ignore_ascii_case("README.md") {
        return false;
    }
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("md" | "markdown" | "txt" | "jsonl" | "xml" | "html" | "htm" | "pdf")
    )
}

/// Refuses a file larger than `max` bytes before reading it (`what` names the kind of file).
pub(crate) fn check_size(path: &Path, max: u64, what: &str) -> Result<(), IngestError> {
    let size = std::fs::metadata(path)
        .map_err(|e| IngestError::io(path, e))?
        .len();
    if size > max {
        return Err(IngestError::Invalid(format!(
            "{}: {size} bytes, more than the {max} {what} may hold",
            path.display()
        )));
    }
    Ok(())
}

/// Text and Markdown files larger than this are read as a stream, in parts of about this size
/// cut at a paragraph break, each ingested as a document of its own (`<path>#part-<n>`, titled
/// "<title> (part <n>)", front matter applied to all): memory stays bounded whatever the size.
pub const PART_BYTES: usize = 1 << 20;

/// Calls `f` on every document of a file: [`read_file`]'s, or the parts of a large text file
/// as they are read.
pub fn for_each_doc(
    path: &Path,
    f: &mut dyn FnMut(SourceDoc) -> Result<(), IngestError>,
) -> Result<(), IngestError> {
    let ext = path.extension().and_then(|e| e.to_str());
    let size = std::fs::metadata(path)
        .map_err(|e| IngestError::io(path, e))?
        .len();
    if !matches!(ext, Some("md" | "markdown" | "txt")) || size <= PART_BYTES as u64 {
        for d in read_file(path)? {
            f(d)?;
        }
        return Ok(());
    }
    use std::io::BufRead;
    let markdown = matches!(ext, Some("md" | "markdown"));
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().replace(['-', '_'], " "))
        .unwrap_or_default();
    let file = std::fs::File::open(path).map_err(|e| IngestError::io(path, e))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let mut part = String::new();
    let mut line = String::new();
    let mut n = 0;
    // From the first part: its front matter and title serve every part.
    let mut meta: Option<(Map<String, Value>, String)> = None;
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .map_err(|e| IngestError::io(path, e))?;
        part.push_str(&line);
        let at_end = read == 0;
        let cut =
            (line.trim().is_empty() && part.len() >= PART_BYTES) || part.len() >= 2 * PART_BYTES;
        if (cut || at_end) && !part.trim().is_empty() {
            n += 1;
            let text = std::mem::take(&mut part);
            let (fields, body) = match &meta {
                Some((fields, _)) => (fields.clone(), text),
                None => {
                    let (fields, body) = front_matter(&text);
                    (fields, body.to_string())
                }
            };
            let mut doc = from_fields(
                format!("{}#part-{n}", path.display()),
                fields.clone(),
                body,
                markdown,
                &stem,
            );
            let title = meta
                .get_or_insert_with(|| (fields, doc.title.clone()))
                .1
                .clone();
            doc.title = format!("{title} (part {n})");
            doc.metadata.insert("part".into(), Value::from(n));
            f(doc)?;
        }
        if at_end {
            return Ok(());
        }
    }
}

/// Reads every document of a file, by its extension.
pub fn read_file(path: &Path) -> Result<Vec<SourceDoc>, IngestError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => read_jsonl(path),
        Some("md" | "markdown" | "txt") => Ok(vec![read_text_file(path)?]),
        Some("xml") => super::pubmed::read_pubmed_xml(path),
        Some("html" | "htm") => Ok(vec![super::html::read_html(path)?]),
        Some("pdf") => Ok(vec![super::pdf::read_pdf(path)?]),
        _ => Err(IngestError::Invalid(format!(
            "{}: unsupported file type (md, txt, jsonl, PubMed xml, html, pdf)",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter_fields_and_body() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metastatic-sarcoma.md");
        std::fs::write(
            &p,
            "---\ntitle: Metastatic sarcoma\nsource: cited\nurl: https://example.org/a\ndate: 2026-11-27\ntags: sarcoma, metastatic\n---\n# Metastatic sarcoma\n\nText.\n",
        )
        .unwrap();
        let d = read_text_file(&p).unwrap();
        assert_eq!(d.title, "Metastatic sarcoma");
        assert_eq!(d.url, "https://example.org/a");
        assert_eq!(d.date, "2026-11-27");
        assert_eq!(d.metadata["tags"], "sarcoma, metastatic");
        assert!(d.text.starts_with("# Metastatic sarcoma"));
        assert!(d.markdown);
    }

    #[test]
    fn a_large_text_file_streams_in_parts_cut_at_paragraphs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big-guideline.md");
        let para = "Sarcoma follow-up uses chest imaging. ".repeat(50) + "\n\n";
        let mut text = String::from("---\ntitle: Big guideline\nsource: cited\n---\n# Big\n\n");
        while text.len() < 2 * PART_BYTES + PART_BYTES / 2 {
            text.push_str(&para);
        }
        std::fs::write(&p, &text).unwrap();
        let mut parts = Vec::new();
        for_each_doc(&p, &mut |d| {
            parts.push((
                d.id,
                d.title,
                d.source,
                d.text.len(),
                d.metadata["part"].clone(),
            ));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            parts.len(),
            3,
            "{:?}",
            parts.iter().map(|p| p.3).collect::<Vec<_>>()
        );
        assert!(parts[1].0.ends_with("big-guideline.md#part-2"));
        assert_eq!(parts[2].1, "Big guideline (part 3)");
        assert!(parts.iter().all(|p| p.2 == "cited"));
        assert!(parts[..2]
            .iter()
            .all(|p| p.3 >= PART_BYTES && p.3 < PART_BYTES + para.len()));
        assert_eq!(parts[2].4, 3);
        // A small file is one document, as before.
        std::fs::write(&p, "# Small\n\nText.\n").unwrap();
        let mut n = 0;
        for_each_doc(&p, &mut |d| {
            assert_eq!(d.title, "Small");
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn plain_text_without_front_matter_takes_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lung_screening.txt");
        std::fs::write(&p, "Low-dose CT.").unwrap();
        let d = read_text_file(&p).unwrap();
        assert_eq!(d.title, "lung screening");
        assert_eq!(d.text, "Low-dose CT.");
        assert!(!d.markdown);
    }

    #[test]
    fn jsonl_keeps_other_fields_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.jsonl");
        std::fs::write(
            &p,
            "{\"id\": \"a1\", \"text\": \"T\", \"focus\": \"Sarcoma\", \"url\": \"u\"}\n\n{\"id\": 7, \"text\": \"U\"}\n",
        )
        .unwrap();
        let docs = read_jsonl(&p).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].metadata["focus"], "Sarcoma");
        assert_eq!(docs[0].url, "u");
        assert_eq!(docs[1].id, "7");
        std::fs::write(&p, "{\"id\": \"a\"}\n").unwrap();
        let err = read_jsonl(&p).unwrap_err().to_string();
        assert!(err.contains(":1:") && err.contains("text"), "{err}");
        std::fs::write(&p, "{\"id\": \"a\", \"text\": \"x\"}\nnot json\n").unwrap();
        assert!(read_jsonl(&p).unwrap_err().to_string().contains(":2:"));
    }
}
