//! PubMed/MEDLINE XML (`<PubmedArticleSet>`, as E-utilities `efetch` and the baseline files
//! give it): one document per article, id = its PMID, titled by the article title, the journal
//! as source, the year as date, `https://pubmed.ncbi.nlm.nih.gov/<PMID>/` as url; the text is
//! Markdown with one `##` section per labelled abstract part (BACKGROUND, METHODS, ...), so the
//! chunker cuts there and citations name the part. PMID, journal and publication types are kept
//! as metadata (`source_type: pubmed`).
//!
//! Only the five predefined XML entities and character references are read: a document type
//! declaring entities of its own (the "billion laughs" bomb) is refused, as is a file larger than
//! [`MAX_XML_BYTES`].

use std::path::Path;

use quick_xml::events::Event;
use quick_xml::Reader;
use serde_json::{Map, Value};

use super::reader::SourceDoc;
use crate::error::IngestError;

/// Largest PubMed XML file read (the whole file is held while parsing).
pub const MAX_XML_BYTES: u64 = 256 << 20;

/// One article being read.
#[derive(Default)]
struct Article {
    pmid: String,
    title: String,
    journal: String,
    year: String,
    medline_date: String,
    /// (label, text) of each abstract part.
    sections: Vec<(String, String)>,
    publication_types: Vec<String>,
}

/// Where text goes while inside an element.
#[derive(Clone, Copy, PartialEq)]
enum Field {
    Pmid,
    Title,
    Journal,
    Year,
    MedlineDate,
    Abstract,
    PublicationType,
}

/// Reads a PubMed XML file.
pub fn read_pubmed_xml(path: &Path) -> Result<Vec<SourceDoc>, IngestError> {
    super::reader::check_size(path, MAX_XML_BYTES, "a PubMed XML file")?;
    let raw = std::fs::read_to_string(path).map_err(|e| IngestError::io(path, e))?;
    parse_pubmed(&raw).map_err(|e| IngestError::Invalid(format!("{}: {e}", path.display())))
}

/// Parses a `<PubmedArticleSet>`.
pub fn parse_pubmed(xml: &str) -> Result<Vec<SourceDoc>, String> {
    let mut reader = Reader::from_str(xml);
    let mut docs = Vec::new();
    let mut article: Option<Article> = None;
    // Element names from the root, and the field text goes to (innermost wins).
    let mut path: Vec<String> = Vec::new();
    let mut fields: Vec<Option<Field>> = Vec::new();
    let mut saw_set = false;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| format!("malformed XML at byte {}: {e}", reader.error_position()))?;
        match event {
            Event::DocType(d) => {
                let text = String::from_utf8_lossy(&d);
                if text.contains("<!ENTITY") {
                    return Err(
                        "the document type declares its own entities (refused: entity expansion)"
                            .into(),
                    );
                }
            }
            Event::Start(e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if name == "PubmedArticleSet" {
                    saw_set = true;
                }
                if name == "PubmedArticle" {
                    article = Some(Article::default());
                }
                let field = field_of(&name, &path);
                let inherited = fields.last().copied().flatten();
                let field = field.or(inherited);
                if let (Some(a), Some(Field::Abstract), "AbstractText") =
                    (article.as_mut(), field, name.as_str())
                {
                    let label = e
                        .try_get_attribute("Label")
                        .ok()
                        .flatten()
                        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
                        .unwrap_or_default();
                    a.sections.push((label, String::new()));
                }
                if let (Some(a), Some(Field::PublicationType), "PublicationType") =
                    (article.as_mut(), field, name.as_str())
                {
                    a.publication_types.push(String::new());
                }
                path.push(name);
                fields.push(field);
            }
            Event::End(e) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                path.pop();
                fields.pop();
                if name == "PubmedArticle" {
                    if let Some(a) = article.take() {
                        if let Some(doc) = to_doc(a) {
                            docs.push(doc);
                        }
                    }
                }
            }
            Event::Empty(_) => {}
            Event::Text(t) => {
                let text = t.decode().map_err(|e| e.to_string())?;
                push_text(&mut article, fields.last().copied().flatten(), &text);
            }
            Event::CData(t) => {
                let text = t.decode().map_err(|e| e.to_string())?;
                push_text(&mut article, fields.last().copied().flatten(), &text);
            }
            Event::GeneralRef(r) => {
                let resolved = if r.is_char_ref() {
                    r.resolve_char_ref()
                        .map_err(|e| e.to_string())?
                        .map(String::from)
                } else {
                    let name = r.decode().map_err(|e| e.to_string())?;
                    quick_xml::escape::resolve_predefined_entity(&name).map(str::to_string)
                };
                let Some(text) = resolved else {
                    return Err(format!(
                        "unknown entity `&{};`",
                        String::from_utf8_lossy(&r)
                    ));
                };
                push_text(&mut article, fields.last().copied().flatten(), &text);
            }
            Event::Eof => {
                if let Some(open) = path.last() {
                    return Err(format!("the file ends inside <{open}> (truncated?)"));
                }
                break;
            }
            _ => {}
        }
    }
    if !saw_set {
        return Err("not PubMed XML: no <PubmedArticleSet>".into());
    }
    Ok(docs)
}

/// The field an element's text belongs to, from its name and its parents.
fn field_of(name: &str, path: &[String]) -> Option<Field> {
    let parent = path.last().map(String::as_str).unwrap_or("");
    let inside = |p: &str| path.iter().any(|x| x == p);
    match name {
        "PMID" if parent == "MedlineCitation" => Some(Field::Pmid),
        "ArticleTitle" => Some(Field::Title),
        "Title" if parent == "Journal" => Some(Field::Journal),
        "Year" if parent == "PubDate" => Some(Field::Year),
        "MedlineDate" if parent == "PubDate" => Some(Field::MedlineDate),
        "AbstractText" if parent == "Abstract" && inside("Article") => Some(Field::Abstract),
        "PublicationType" => Some(Field::PublicationType),
        _ => None,
    }
}

fn push_text(article: &mut Option<Article>, field: Option<Field>, text: &str) {
    let (Some(a), Some(field)) = (article.as_mut(), field) else {
        return;
    };
    let target = match field {
        Field::Pmid => &mut a.pmid,
        Field::Title => &mut a.title,
        Field::Journal => &mut a.journal,
        Field::Year => &mut a.year,
        Field::MedlineDate => &mut a.medline_date,
        Field::Abstract => match a.sections.last_mut() {
            Some(s) => &mut s.1,
            None => return,
        },
        Field::PublicationType => match a.publication_types.last_mut() {
            Some(t) => t,
            None => return,
        },
    };
    target.push_str(text);
}

/// The article as a document; None without a PMID or any text.
fn to_doc(a: Article) -> Option<SourceDoc> {
    let pmid = a.pmid.trim().to_string();
    let title = squash(&a.title);
    if pmid.is_empty() || (title.is_empty() && a.sections.is_empty()) {
        return None;
    }
    let mut text = format!("# {}\n", if title.is_empty() { &pmid } else { &title });
    for (label, body) in &a.sections {
        let body = squash(body);
        if body.is_empty() {
            continue;
        }
        let heading = if label.trim().is_empty() {
            "Abstract".to_string()
        } else {
            label.trim().to_string()
        };
        text.push_str(&format!("\n## {heading}\n\n{body}\n"));
    }
    let year = if a.year.trim().is_empty() {
        a.medline_date.trim().chars().take(4).collect()
    } else {
        a.year.trim().to_string()
    };
    let journal = squash(&a.journal);
    let mut metadata = Map::new();
    metadata.insert("pmid".into(), Value::String(pmid.clone()));
    metadata.insert("journal".into(), Value::String(journal.clone()));
    metadata.insert("source_type".into(), Value::String("pubmed".into()));
    metadata.insert(
        "publication_types".into(),
        Value::Array(
            a.publication_types
                .iter()
                .map(|t| Value::String(squash(t)))
                .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
                .collect(),
        ),
    );
    Some(SourceDoc {
        url: format!("https://pubmed.ncbi.nlm.nih.gov/{pmid}/"),
        id: pmid,
        title: if title.is_empty() {
            "PubMed article".into()
        } else {
            title
        },
        source: journal,
        date: year,
        metadata,
        markdown: true,
        text,
    })
}

/// Whitespace runs (line breaks of the XML) as single spaces.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"<?xml version="1.0" ?>
<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, 1st January 2025//EN" "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_250101.dtd">
<PubmedArticleSet>
 <PubmedArticle>
  <MedlineCitation Status="MEDLINE" Owner="NLM">
   <PMID Version="1">11111111</PMID>
   <Article PubModel="Print">
    <Journal>
     <Title>The Lancet. Oncology</Title>
     <JournalIssue><PubDate><Year>2014</Year><Month>Apr</Month></PubDate></JournalIssue>
    </Journal>
    <ArticleTitle>Doxorubicin alone versus intensified doxorubicin plus ifosfamide &amp; <i>growth factor</i> support.</ArticleTitle>
    <Abstract>
     <AbstractText Label="BACKGROUND" NlmCategory="BACKGROUND">Whether the combination helps was
      unclear.</AbstractText>
     <AbstractText Label="METHODS">455 patients aged 18&#8211;60 were randomised.</AbstractText>
     <AbstractText Label="FINDINGS">Median overall survival was 12.8 vs 14.3 months (p&lt;0.1).</AbstractText>
    </Abstract>
    <PublicationTypeList>
     <PublicationType UI="D016449">Randomized Controlled Trial</PublicationType>
     <PublicationType UI="D016428">Journal Article</PublicationType>
    </PublicationTypeList>
   </Article>
   <CommentsCorrectionsList><CommentsCorrections><PMID>99999999</PMID></CommentsCorrections></CommentsCorrectionsList>
  </MedlineCitation>
 </PubmedArticle>
 <PubmedArticle>
  <MedlineCitation>
   <PMID>22222222</PMID>
   <Article>
    <Journal><Title>BMC Medicine</Title><JournalIssue><PubDate><MedlineDate>2017 Apr-May</MedlineDate></PubDate></JournalIssue></Journal>
    <ArticleTitle>Real-world care of metastatic sarcoma.</ArticleTitle>
    <Abstract><AbstractText>An unlabelled abstract.</AbstractText></Abstract>
   </Article>
  </MedlineCitation>
 </PubmedArticle>
</PubmedArticleSet>"#;

    #[test]
    fn articles_become_sectioned_documents() {
        let docs = parse_pubmed(TWO).unwrap();
        assert_eq!(docs.len(), 2);
        let d = &docs[0];
        assert_eq!(d.id, "11111111", "the citation's own PMID, not a cited one");
        assert_eq!(
            d.title,
            "Doxorubicin alone versus intensified doxorubicin plus ifosfamide & growth factor support."
        );
        assert_eq!(d.source, "The Lancet. Oncology");
        assert_eq!(d.date, "2014");
        assert_eq!(d.url, "https://pubmed.ncbi.nlm.nih.gov/11111111/");
        assert_eq!(
            d.metadata["publication_types"],
            serde_json::json!(["Randomized Controlled Trial", "Journal Article"])
        );
        assert_eq!(d.metadata["source_type"], "pubmed");
        assert!(d
            .text
            .contains("## BACKGROUND\n\nWhether the combination helps was unclear.\n"));
        assert!(d
            .text
            .contains("## METHODS\n\n455 patients aged 18\u{2013}60 were randomised."));
        assert!(d.text.contains("12.8 vs 14.3 months (p<0.1)."));
        assert!(d.markdown);
        assert_eq!(docs[1].date, "2017");
        assert!(docs[1]
            .text
            .contains("## Abstract\n\nAn unlabelled abstract."));
    }

    #[test]
    fn bombs_malformed_and_foreign_xml_are_refused() {
        let bomb = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<PubmedArticleSet><PubmedArticle><MedlineCitation><PMID>1</PMID><Article><ArticleTitle>&lol2;</ArticleTitle></Article></MedlineCitation></PubmedArticle></PubmedArticleSet>"#;
        assert!(parse_pubmed(bomb).unwrap_err().contains("entities"));
        let undeclared = "<PubmedArticleSet><PubmedArticle><MedlineCitation><PMID>1</PMID><Article><ArticleTitle>&lol;</ArticleTitle></Article></MedlineCitation></PubmedArticle></PubmedArticleSet>";
        assert!(parse_pubmed(undeclared)
            .unwrap_err()
            .contains("unknown entity"));
        let cut = &TWO[..TWO.len() / 2];
        assert!(parse_pubmed(cut).unwrap_err().contains("ends inside"));
        assert!(parse_pubmed("<html><body>x</body></html>")
            .unwrap_err()
            .contains("not PubMed"));
        assert!(parse_pubmed("<PubmedArticleSet><a></b></PubmedArticleSet>")
            .unwrap_err()
            .contains("malformed"));
    }
}
