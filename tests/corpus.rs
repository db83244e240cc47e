//! The corpus store, ingestion and hybrid search with the real embedder: re-ingest, replace,
//! delete, a second process ingesting while the index owner searches, and a `kill -9` in the
//! middle of an ingest.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::Device;
use cited::index::filter::Filter;
use cited::index::store::{SqliteStore, Store};
use cited::index::{Corpus, Mode, SearchOptions};
use cited::ingest::pdf;
use cited::ingest::reader::SourceDoc;
use cited::ingest::{ingest_docs, ingest_paths, IngestOptions};
use cited::models::bert::Embedder;

fn embedder() -> Embedder {
    Embedder::load(&common::minilm_dir(), &Device::Cpu).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn sample_corpus(dir: &Path) {
    write(
        dir,
        "metastatic.md",
        "---\ntitle: Metastatic sarcoma\nurl: https://example.org/metastatic\ndate: 2026-01-01\n---\n# Metastatic sarcoma\n## What it means\nThe cancer has spread from the limb to the lungs or liver.\n## Treatment\nSystemic therapy such as doxorubicin replaces surgery as the main treatment.\n",
    );
    write(
        dir,
        "her2.md",
        "---\ntitle: HER2 breast cancer\nurl: https://example.org/her2\n---\n# HER2 breast cancer\nHER2-positive tumours are treated with trastuzumab. PD-L1 testing is not used here.\n",
    );
    write(
        dir,
        "screening.md",
        "# Colorectal screening\nColonoscopy every ten years from age 45; stool tests every year are an alternative.\n",
    );
}

fn search(corpus: &mut Corpus, e: &Embedder, q: &str, mode: Mode) -> Vec<String> {
    let v = e.embed(&[q]).unwrap().to_vec2::<f32>().unwrap().remove(0);
    let opts = SearchOptions {
        mode,
        top_k: 5,
        ..SearchOptions::default()
    };
    corpus
        .search(q, &v, &opts)
        .unwrap()
        .into_iter()
        .map(|h| h.id)
        .collect()
}

fn id_of(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

#[test]
fn ingest_search_reingest_replace_delete() {
    let e = embedder();
    let src = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    sample_corpus(src.path());
    let opts = IngestOptions::default();
    let mut store = SqliteStore::open(&data.path().join("store.sqlite")).unwrap();
    let r = ingest_paths(&mut store, &e, &[src.path()], &opts).unwrap();
    assert_eq!((r.added, r.replaced, r.unchanged), (3, 0, 0));
    assert_eq!(r.chunks, 4, "two sections, one each for the others");
    let r = ingest_paths(&mut store, &e, &[src.path()], &opts).unwrap();
    assert_eq!(
        (r.added, r.unchanged, r.chunks),
        (0, 3, 0),
        "unchanged content is a no-op"
    );
    let version = store.version().unwrap();

    let mut corpus = Corpus::open(data.path()).unwrap();
    let metastatic = id_of(src.path(), "metastatic.md");
    let her2 = id_of(src.path(), "her2.md");
    // BM25 scores word forms as written (stemming cost nDCG on MedQuAD), so its question uses
    // the passage's words: in three documents, "is" and "treated" would weigh as much as any.
    for (mode, q) in [
        (Mode::Dense, "How is metastatic sarcoma treated?"),
        (Mode::Bm25, "metastatic sarcoma systemic therapy"),
        (Mode::Hybrid, "How is metastatic sarcoma treated?"),
    ] {
        let hits = search(&mut corpus, &e, q, mode);
        assert_eq!(hits[0], metastatic, "{mode:?}");
        let mut unique = hits.clone();
        unique.dedup();
        assert_eq!(unique.len(), hits.len(), "one hit per passage");
    }
    assert_eq!(search(&mut corpus, &e, "PD-L1", Mode::Bm25)[0], her2);

    // Changed content replaces its chunks.
    write(
        src.path(),
        "her2.md",
        "# HER2 breast cancer\nTucatinib combinations are options after earlier HER2 therapy.\n",
    );
    let r = ingest_paths(&mut store, &e, &[src.path()], &opts).unwrap();
    assert_eq!((r.replaced, r.unchanged), (1, 2));
    assert!(store.version().unwrap() > version);
    assert!(
        search(&mut corpus, &e, "PD-L1", Mode::Bm25).is_empty(),
        "old text gone"
    );
    assert_eq!(search(&mut corpus, &e, "tucatinib", Mode::Bm25)[0], her2);

    // Delete by id.
    assert!(store.delete(&her2).unwrap());
    assert!(!search(&mut corpus, &e, "tucatinib HER2", Mode::Hybrid).contains(&her2));
    let hit = {
        let v = e
            .embed(&["colonoscopy"])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .remove(0);
        corpus
            .search("colonoscopy", &v, &SearchOptions::default())
            .unwrap()
            .remove(0)
    };
    assert_eq!(hit.title, "Colorectal screening");
    assert!(hit.text.contains("Colonoscopy"));
    assert!(hit.bm25_score.unwrap() > 0.0 && hit.dense_score > 0.3);
}

#[test]
fn filters_restrict_every_mode_to_matching_documents() {
    let e = embedder();
    let src = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    sample_corpus(src.path());
    write(
        src.path(),
        "lung.md",
        "---
title: Metastatic lung cancer
source: Guideline B
cancer: lung
date: 2024-03-01
---
Metastatic lung cancer is treated with systemic therapy chosen by biomarkers.
",
    );
    let mut store = SqliteStore::open(&data.path().join("store.sqlite")).unwrap();
    ingest_paths(&mut store, &e, &[src.path()], &IngestOptions::default()).unwrap();
    let mut corpus = Corpus::open(data.path()).unwrap();
    let q = "How is metastatic cancer treated?";
    let v = e.embed(&[q]).unwrap().to_vec2::<f32>().unwrap().remove(0);
    let run = |corpus: &mut Corpus, mode: Mode, f: serde_json::Value| -> Vec<String> {
        let opts = SearchOptions {
            mode,
            top_k: 5,
            ..SearchOptions::default()
        };
        let filter = Filter::from_json(&f).unwrap();
        corpus
            .search_filtered(q, &v, &opts, &filter)
            .unwrap()
            .into_iter()
            .map(|h| h.id)
            .collect()
    };
    let lung = id_of(src.path(), "lung.md");
    let metastatic = id_of(src.path(), "metastatic.md");
    for mode in [Mode::Dense, Mode::Bm25, Mode::Hybrid] {
        assert!(
            run(&mut corpus, mode, serde_json::json!({})).len() >= 2,
            "{mode:?}"
        );
        assert_eq!(
            run(&mut corpus, mode, serde_json::json!({"cancer": "lung"})),
            std::slice::from_ref(&lung),
            "{mode:?}"
        );
        assert_eq!(
            run(&mut corpus, mode, serde_json::json!({"date_from": "2025"})),
            std::slice::from_ref(&metastatic),
            "{mode:?}"
        );
        assert!(run(&mut corpus, mode, serde_json::json!({"source": "nowhere"})).is_empty());
    }
}

#[test]
fn an_index_owner_sees_documents_another_process_ingests() {
    let e = embedder();
    let data = tempfile::tempdir().unwrap();
    let mut owner = Corpus::open(data.path()).unwrap();
    assert!(owner.owns_indexes());
    // A second opener (a CLI search while a server runs) does not fail on the lock.
    let other = Corpus::open(data.path()).unwrap();
    assert!(!other.owns_indexes());
    drop(other);
    assert!(search(&mut owner, &e, "trabectedin", Mode::Hybrid).is_empty());

    // `cited ingest` writes the store only, from its own connection.
    let mut writer = SqliteStore::open(&data.path().join("store.sqlite")).unwrap();
    let doc = SourceDoc {
        id: "trab".into(),
        title: "Trabectedin".into(),
        source: String::new(),
        url: String::new(),
        date: String::new(),
        metadata: Default::default(),
        markdown: false,
        text: "Trabectedin is used for liposarcoma and leiomyosarcoma after anthracyclines.".into(),
    };
    ingest_docs(&mut writer, &e, vec![doc], &IngestOptions::default()).unwrap();
    assert_eq!(
        search(&mut owner, &e, "trabectedin", Mode::Hybrid),
        vec!["trab"]
    );

    // Searches keep working while documents are added.
    let handle = std::thread::spawn(move || {
        let e = embedder();
        for i in 0..5 {
            let d = SourceDoc {
                id: format!("n{i}"),
                title: format!("Note {i}"),
                source: String::new(),
                url: String::new(),
                date: String::new(),
                metadata: Default::default(),
                markdown: false,
                text: format!("Eribulin note number {i} about liposarcoma."),
            };
            ingest_docs(&mut writer, &e, vec![d], &IngestOptions::default()).unwrap();
        }
    });
    for _ in 0..10 {
        search(&mut owner, &e, "eribulin liposarcoma", Mode::Hybrid);
    }
    handle.join().unwrap();
    assert_eq!(
        search(&mut owner, &e, "eribulin liposarcoma", Mode::Bm25).len(),
        5
    );
    // The owner's on-disk BM25 index survives a restart at the same version.
    let version = owner.version();
    drop(owner);
    let again = Corpus::open(data.path()).unwrap();
    assert_eq!(again.version(), version);
}

#[test]
fn kill_during_ingest_leaves_whole_documents_only() {
    let src = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..150)
        .map(|i| {
            format!(
                "{{\"id\": \"d{i}\", \"title\": \"Doc {i}\", \"text\": \"{}\"}}",
                format!("Sentence {i} about sarcoma care and follow-up imaging. ").repeat(8)
            )
        })
        .collect();
    let file = src.path().join("big.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let run = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cited"));
        c.arg("--data-dir")
            .arg(data.path())
            .arg("--embedder")
            .arg(common::minilm_dir())
            .args(["ingest", "--batch", "8"])
            .arg(&file)
            .env("RUST_LOG", "warn");
        c
    };
    let mut child = run().spawn().unwrap();
    // Wait until some documents are committed, then kill without warning.
    let store_path = data.path().join("store.sqlite");
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let n = SqliteStore::open(&store_path)
            .ok()
            .and_then(|s| s.counts().ok())
            .map_or(0, |c| c.0);
        if n >= 3 || started.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let store = SqliteStore::open(&store_path).unwrap();
    let (docs, _) = store.counts().unwrap();
    assert!(docs > 0 && docs < 150, "killed mid-way: {docs} documents");
    for i in 0..150 {
        let chunks = store.chunks_of(&format!("d{i}")).unwrap();
        let ords: Vec<usize> = chunks.iter().map(|c| c.ord).collect();
        assert_eq!(
            ords,
            (0..chunks.len()).collect::<Vec<_>>(),
            "d{i} whole or absent"
        );
        assert_eq!(
            store.document(&format!("d{i}")).unwrap().is_some(),
            !chunks.is_empty()
        );
    }
    drop(store);
    // Restart: the rest goes in, the committed ones are recognised as unchanged.
    let out = run().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains(&format!("unchanged {docs}")), "{report}");
    let corpus = Corpus::open(data.path()).unwrap();
    assert_eq!(corpus.store().counts().unwrap().0, 150);
}

#[test]
fn pubmed_xml_and_html_ingest_and_a_bad_file_fails_alone() {
    let src = tempfile::tempdir().unwrap();
    write(
        src.path(),
        "sarcoma.xml",
        r#"<?xml version="1.0"?>
<PubmedArticleSet><PubmedArticle><MedlineCitation><PMID>24618336</PMID><Article>
<Journal><Title>The Lancet. Oncology</Title><JournalIssue><PubDate><Year>2014</Year></PubDate></JournalIssue></Journal>
<ArticleTitle>Doxorubicin alone versus doxorubicin with ifosfamide in advanced soft tissue sarcoma.</ArticleTitle>
<Abstract><AbstractText Label="METHODS">Adults with advanced high-grade sarcoma were randomly assigned to doxorubicin alone or with ifosfamide.</AbstractText>
<AbstractText Label="FINDINGS">Overall survival did not differ significantly; progression-free survival was longer with the combination.</AbstractText></Abstract>
<PublicationTypeList><PublicationType>Randomized Controlled Trial</PublicationType></PublicationTypeList>
</Article></MedlineCitation></PubmedArticle></PubmedArticleSet>"#,
    );
    write(
        src.path(),
        "bomb.xml",
        "<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY a \"aaaa\"><!ENTITY b \"&a;&a;&a;&a;\">]><PubmedArticleSet>&b;</PubmedArticleSet>",
    );
    write(
        src.path(),
        "broken.xml",
        "<PubmedArticleSet><PubmedArticle>",
    );
    write(
        src.path(),
        "gist-page.html",
        "<html><head><title>GIST care</title></head><body><nav>Menu Donate Contact</nav><main>\
         <h1>GIST care</h1><h2>Adjuvant imatinib</h2><p>Three years of imatinib after surgery \
         lowered recurrence for high-risk gastrointestinal stromal tumours.</p></main>\
         <footer>Privacy</footer></body></html>",
    );
    sample_corpus(src.path());
    let data = tempfile::tempdir().unwrap();
    let e = embedder();
    let mut store = SqliteStore::open(&data.path().join("store.sqlite")).unwrap();
    let r = ingest_paths(&mut store, &e, &[src.path()], &IngestOptions::default()).unwrap();
    assert_eq!(
        r.added, 5,
        "three Markdown files, one article, one page: {r:?}"
    );
    // Each bad file fails alone, with its reason (files are read in name order).
    assert_eq!(r.failed.len(), 2, "{:?}", r.failed);
    assert!(r.failed[0].0.ends_with("bomb.xml") && r.failed[0].1.contains("entities"));
    assert!(r.failed[1].0.ends_with("broken.xml") && r.failed[1].1.contains("ends inside"));
    let mut corpus = Corpus::open(data.path()).unwrap();
    let q = "did overall survival differ with ifosfamide";
    let v = e.embed(&[q]).unwrap().to_vec2::<f32>().unwrap().remove(0);
    let hits = corpus.search(q, &v, &SearchOptions::default()).unwrap();
    let top = &hits[0];
    assert_eq!(top.id, "24618336");
    assert_eq!(top.url, "https://pubmed.ncbi.nlm.nih.gov/24618336/");
    assert_eq!(top.date, "2014");
    assert!(top.section.ends_with("FINDINGS"), "{}", top.section);
    // The page's section, without its navigation.
    let q = "how long imatinib after surgery for high-risk GIST";
    let v = e.embed(&[q]).unwrap().to_vec2::<f32>().unwrap().remove(0);
    let hits = corpus.search(q, &v, &SearchOptions::default()).unwrap();
    assert!(hits[0].id.ends_with("gist-page.html"), "{}", hits[0].id);
    assert!(
        hits[0].section.ends_with("Adjuvant imatinib"),
        "{}",
        hits[0].section
    );
    assert!(!hits[0].text.contains("Donate") && !hits[0].text.contains("Privacy"));
}
#[test]
fn pages_headings_tables_and_no_running_header() {
    let pdf = common::pdf::write_pdf(&common::pdf::guideline_pages(), false);
    let doc = pdf::parse_pdf(&pdf, "g.pdf", "g").unwrap();
    assert!(
        !doc.text.contains("Regional Sarcoma Network"),
        "{}",
        doc.text
    );
    assert!(!doc.text.contains("Page 2"), "{}", doc.text);
    assert!(
        doc.text.contains("# Metastatic soft tissue sarcoma\n"),
        "{}",
        doc.text
    );
    assert!(
        doc.text.contains("## Oligometastatic disease\n"),
        "{}",
        doc.text
    );
    assert!(
        doc.text
            .contains("Regimen | Response rate\nDoxorubicin | 18 percent"),
        "{}",
        doc.text
    );
    assert!(doc.markdown);
    assert_eq!(doc.title, "Sarcoma care guideline");
    assert_eq!(doc.date, "2025-03-14");
    assert_eq!(doc.metadata["source_type"], "pdf");
    assert_eq!(doc.metadata["pages"], 3);
    let at = |needle: &str| doc.text.find(needle).unwrap();
    assert_eq!(pdf::page_of(&doc.metadata, at("Doxorubicin is")), Some(1));
    assert_eq!(pdf::page_of(&doc.metadata, at("Few lung")), Some(2));
    assert_eq!(pdf::page_of(&doc.metadata, at("18 percent")), Some(2));
    assert_eq!(pdf::page_of(&doc.metadata, at("Chest imaging")), Some(3));
}

#[test]
fn a_line_on_one_page_only_is_kept() {
    // Two pages: the header repeats, the first page's top line does not.
    let pages = vec![
        vec![
            (9.0, 72.0, 40.0, "Running title"),
            (11.0, 72.0, 60.0, "Only here at the top."),
            (11.0, 72.0, 300.0, "Body one."),
        ],
        vec![
            (9.0, 72.0, 40.0, "Running title"),
            (11.0, 72.0, 60.0, "Something else at the top."),
        ],
    ];
    let doc = pdf::parse_pdf(&common::pdf::write_pdf(&pages, false), "a.pdf", "a").unwrap();
    assert!(!doc.text.contains("Running title"), "{}", doc.text);
    assert!(doc.text.contains("Only here at the top."), "{}", doc.text);
    assert!(
        doc.text.contains("Something else at the top."),
        "{}",
        doc.text
    );
}

#[test]
fn encrypted_malformed_and_empty_files_get_clear_errors() {
    let encrypted = common::pdf::write_pdf(&common::pdf::guideline_pages(), true);
    let err = pdf::parse_pdf(&encrypted, "e.pdf", "e").unwrap_err();
    assert!(err.contains("encrypted"), "{err}");
    let err = pdf::parse_pdf(b"hello", "x.pdf", "x").unwrap_err();
    assert!(err.contains("not a PDF"), "{err}");
    let mut truncated = common::pdf::write_pdf(&common::pdf::guideline_pages(), false);
    truncated.truncate(200);
    let err = pdf::parse_pdf(&truncated, "t.pdf", "t").unwrap_err();
    assert!(err.contains("malformed"), "{err}");
    let blank = common::pdf::write_pdf(&[vec![]], false);
    let err = pdf::parse_pdf(&blank, "b.pdf", "b").unwrap_err();
    assert!(err.contains("no text"), "{err}");
}

#[test]
fn a_pdf_guideline_is_cited_by_page_without_its_running_header() {
    let src = tempfile::tempdir().unwrap();
    let pages = common::pdf::guideline_pages();
    std::fs::write(
        src.path().join("guideline.pdf"),
        common::pdf::write_pdf(&pages, false),
    )
    .unwrap();
    std::fs::write(
        src.path().join("locked.pdf"),
        common::pdf::write_pdf(&pages, true),
    )
    .unwrap();
    sample_corpus(src.path());
    let data = tempfile::tempdir().unwrap();
    let e = embedder();
    let mut store = SqliteStore::open(&data.path().join("store.sqlite")).unwrap();
    let r = ingest_paths(&mut store, &e, &[src.path()], &IngestOptions::default()).unwrap();
    assert_eq!(r.added, 4, "{r:?}");
    assert_eq!(r.failed.len(), 1, "{:?}", r.failed);
    assert!(r.failed[0].0.ends_with("locked.pdf") && r.failed[0].1.contains("encrypted"));
    // The running header is in no chunk, shown or indexed.
    store
        .for_each_chunk(&mut |c| {
            assert!(
                !c.indexed_text.contains("Regional Sarcoma Network"),
                "{c:?}"
            );
            assert!(!c.text.contains("Page 1 of 3"), "{c:?}");
            Ok(())
        })
        .unwrap();
    let mut corpus = Corpus::open(data.path()).unwrap();
    for (q, page, section) in [
        (
            "can a few lung metastases be removed",
            2,
            "Metastatic soft tissue sarcoma > Oligometastatic disease",
        ),
        (
            "how often is chest imaging done in follow-up",
            3,
            "Metastatic soft tissue sarcoma > Follow-up",
        ),
    ] {
        let v = e.embed(&[q]).unwrap().to_vec2::<f32>().unwrap().remove(0);
        let hits = corpus.search(q, &v, &SearchOptions::default()).unwrap();
        let top = &hits[0];
        assert!(top.id.ends_with("guideline.pdf"), "{q}: {}", top.id);
        assert_eq!(top.page, Some(page), "{q}");
        assert_eq!(top.page_end, None, "{q}");
        assert_eq!(top.section, section, "{q}");
        assert_eq!(top.title, "Sarcoma care guideline");
    }
}
