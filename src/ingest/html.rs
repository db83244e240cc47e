//! HTML pages (a guideline's web version, a patient page): the main text with its headings, as
//! Markdown, so the chunker cuts at the headings and citations name the section. Navigation,
//! headers, footers, asides, forms, scripts and styles are dropped; when the page marks its main
//! content (`<main>`, `<article>`, `role="main"`), only that is read. Tables are kept as rows of
//! text (cells joined by ` | `). The title is the page's `<title>` (or its first `<h1>`); the url
//! its canonical link; the date its modification or publication meta tag.

use std::path::Path;

use ego_tree::NodeRef;
use scraper::{Html, Node};
use serde_json::{Map, Value};

use super::reader::SourceDoc;
use crate::error::IngestError;

/// Largest HTML file read.
pub const MAX_HTML_BYTES: u64 = 64 << 20;

/// Elements whose content is never part of the text.
const DROPPED: &[&str] = &[
    "nav", "header", "footer", "aside", "script", "style", "noscript", "form", "menu", "button",
    "select", "svg", "template", "iframe", "head",
];

/// Elements that end a block of text.
const BLOCKS: &[&str] = &[
    "p",
    "div",
    "section",
    "article",
    "main",
    "li",
    "ul",
    "ol",
    "table",
    "tr",
    "blockquote",
    "pre",
    "dl",
    "dt",
    "dd",
    "figure",
    "figcaption",
    "br",
    "hr",
    "caption",
    "body",
];

/// Reads an HTML file; `id` is the path as given.
pub fn read_html(path: &Path) -> Result<SourceDoc, IngestError> {
    super::reader::check_size(path, MAX_HTML_BYTES, "an HTML file")?;
    let raw = std::fs::read(path).map_err(|e| IngestError::io(path, e))?;
    let text = String::from_utf8_lossy(&raw);
    let fallback = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("page")
        .replace(['-', '_'], " ");
    let doc = parse_html(&text, &path.to_string_lossy(), &fallback);
    if doc.text.trim().is_empty() {
        return Err(IngestError::Invalid(format!(
            "{}: no text outside navigation and scripts",
            path.display()
        )));
    }
    Ok(doc)
}

/// Parses an HTML page into a document with id `id`.
pub fn parse_html(html: &str, id: &str, fallback_title: &str) -> SourceDoc {
    let page = Html::parse_document(html);
    let root = page.tree.root();
    let main = find(root, &|n| {
        matches!(n.value(), Node::Element(e)
            if e.name() == "main" || e.attr("role") == Some("main"))
    })
    .or_else(|| {
        find(
            root,
            &|n| matches!(n.value(), Node::Element(e) if e.name() == "article"),
        )
    })
    .unwrap_or(root);
    let mut out = Markdown::default();
    walk(main, &mut out);
    let text = out.finish();
    let meta = |names: &[&str]| -> Option<String> {
        find(root, &|n| {
            matches!(n.value(), Node::Element(e) if e.name() == "meta"
                && names.iter().any(|k| e.attr("name") == Some(k) || e.attr("property") == Some(k)))
        })
        .and_then(|n| match n.value() {
            Node::Element(e) => e.attr("content").map(|c| c.trim().to_string()),
            _ => None,
        })
        .filter(|c| !c.is_empty())
    };
    let title = find(
        root,
        &|n| matches!(n.value(), Node::Element(e) if e.name() == "title"),
    )
    .map(text_of)
    .filter(|t| !t.is_empty())
    .or_else(|| {
        text.lines()
            .find_map(|l| l.strip_prefix("# ").map(|t| t.trim().to_string()))
    })
    .unwrap_or_else(|| fallback_title.to_string());
    let url = find(root, &|n| {
        matches!(n.value(), Node::Element(e) if e.name() == "link" && e.attr("rel") == Some("canonical"))
    })
    .and_then(|n| match n.value() {
        Node::Element(e) => e.attr("href").map(str::to_string),
        _ => None,
    })
    .or_else(|| meta(&["og:url"]))
    .unwrap_or_default();
    let date = meta(&[
        "dcterms.modified",
        "article:modified_time",
        "last-modified",
        "dcterms.date",
        "date",
        "article:published_time",
        "citation_publication_date",
    ])
    .unwrap_or_default();
    let mut metadata = Map::new();
    metadata.insert("source_type".into(), Value::String("html".into()));
    SourceDoc {
        id: id.to_string(),
        title,
        source: meta(&["og:site_name", "citation_publisher", "dcterms.publisher"])
            .unwrap_or_default(),
        url,
        date,
        metadata,
        markdown: true,
        text,
    }
}

/// The first node (document order) matching `pred`.
fn find<'a>(
    node: NodeRef<'a, Node>,
    pred: &dyn Fn(NodeRef<'a, Node>) -> bool,
) -> Option<NodeRef<'a, Node>> {
    node.descendants().find(|n| pred(*n))
}

/// All text under a node, whitespace squashed.
fn text_of(node: NodeRef<'_, Node>) -> String {
    let mut s = String::new();
    for n in node.descendants() {
        if let Node::Text(t) = n.value() {
            s.push_str(t);
            s.push(' ');
        }
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Markdown being written: finished blocks and the current line.
#[derive(Default)]
struct Markdown {
    blocks: Vec<String>,
    line: String,
}

impl Markdown {
    fn text(&mut self, t: &str) {
        for w in t.split_whitespace() {
            if !self.line.is_empty() {
                self.line.push(' ');
            }
            self.line.push_str(w);
        }
    }

    fn end_block(&mut self) {
        let line = std::mem::take(&mut self.line);
        if !line.trim().is_empty() {
            self.blocks.push(line);
        }
    }

    fn finish(mut self) -> String {
        self.end_block();
        let mut s = self.blocks.join("\n\n");
        s.push('\n');
        s
    }
}

fn walk(node: NodeRef<'_, Node>, out: &mut Markdown) {
    match node.value() {
        Node::Text(t) => out.text(t),
        Node::Element(e) => {
            let name = e.name();
            if DROPPED.contains(&name) || e.attr("role") == Some("navigation") {
                return;
            }
            if let Some(level) = name
                .strip_prefix('h')
                .and_then(|d| d.parse::<usize>().ok())
                .filter(|l| (1..=6).contains(l))
            {
                out.end_block();
                let heading = text_of(node);
                if !heading.is_empty() {
                    out.blocks.push(format!("{} {heading}", "#".repeat(level)));
                }
                return;
            }
            if name == "tr" {
                out.end_block();
                let cells: Vec<String> = node
                    .children()
                    .filter(|c| {
                        matches!(c.value(), Node::Element(e) if e.name() == "td" || e.name() == "th")
                    })
                    .map(text_of)
                    .collect();
                if cells.iter().any(|c| !c.is_empty()) {
                    out.blocks.push(cells.join(" | "));
                }
                return;
            }
            let block = BLOCKS.contains(&name);
            if block {
                out.end_block();
            }
            if name == "li" {
                out.text("-");
            }
            for child in node.children() {
                walk(child, out);
            }
            if block {
                out.end_block();
            }
        }
        _ => {
            for child in node.children() {
                walk(child, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"<!doctype html>
<html><head><title>Soft tissue sarcoma treatment</title>
<link rel="canonical" href="https://example.org/sarcoma">
<meta name="dcterms.modified" content="2024-05-01">
<meta property="og:site_name" content="Example Cancer Centre">
<script>var tracking = "do not index";</script><style>.nav{}</style></head>
<body>
<header><a href="/">Home</a> | Search the site</header>
<nav><ul><li>Types of cancer</li><li>Research</li></ul></nav>
<main>
<h1>Soft tissue sarcoma treatment</h1>
<p>Surgery with clear margins is the main treatment for localized disease.</p>
<h2>Metastatic disease</h2>
<p>Doxorubicin is the usual first <b>systemic</b> treatment.</p>
<ul><li>Ask about clinical trials.</li><li>Ask about palliative care.</li></ul>
<table><tr><th>Regimen</th><th>Median OS</th></tr><tr><td>Doxorubicin</td><td>12.8 months</td></tr></table>
<aside>Related: donate now</aside>
</main>
<footer>Copyright and privacy policy</footer>
</body></html>"#;

    #[test]
    fn main_text_and_headings_without_navigation() {
        let d = parse_html(PAGE, "page.html", "page");
        assert_eq!(d.title, "Soft tissue sarcoma treatment");
        assert_eq!(d.url, "https://example.org/sarcoma");
        assert_eq!(d.date, "2024-05-01");
        assert_eq!(d.source, "Example Cancer Centre");
        assert!(d.markdown);
        for kept in [
            "# Soft tissue sarcoma treatment",
            "Surgery with clear margins is the main treatment for localized disease.",
            "## Metastatic disease",
            "Doxorubicin is the usual first systemic treatment.",
            "- Ask about clinical trials.",
            "Regimen | Median OS",
            "Doxorubicin | 12.8 months",
        ] {
            assert!(d.text.contains(kept), "`{kept}` missing from:\n{}", d.text);
        }
        for dropped in [
            "Home",
            "Types of cancer",
            "tracking",
            "donate",
            "Copyright",
            ".nav",
        ] {
            assert!(
                !d.text.contains(dropped),
                "`{dropped}` kept in:\n{}",
                d.text
            );
        }
        // Headings open their own block, so the chunker cuts there.
        assert!(d.text.contains("\n\n## Metastatic disease\n\n"));
    }

    #[test]
    fn pages_without_a_main_element_read_the_body() {
        let d = parse_html(
            "<html><body><nav>Menu</nav><h2>Staging</h2><p>Stage IV means spread.</p></body></html>",
            "x.html",
            "staging page",
        );
        assert_eq!(d.title, "staging page");
        assert_eq!(d.text, "## Staging\n\nStage IV means spread.\n");
    }
}
