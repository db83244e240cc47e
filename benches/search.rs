//! Search latency, p50 and p99, at 10^4, 10^5 and 10^6 passages of d = 384 (query embedding
//! excluded):
//! - the dense index (f16 rows, 8-bit scan, exact re-score), 200 single queries and 20 batches of
//!   32, at all three sizes, built directly from synthetic rows;
//! - at 10^4 and 10^5, through a real store: BM25 alone, the whole hybrid query, the store and
//!   index sizes, the time to build the indexes from the store and to take in one changed
//!   document; and the exact f32 op the index replaced.
//!
//! Vectors are synthetic (random unit vectors) and texts are drawn from a fixed vocabulary:
//! embedding 10^5 real passages takes hours on this CPU. faiss-cpu `IndexFlatIP` on the same
//! shapes is measured by `scripts/bench_faiss.py`, run beside it by `scripts/bench-search.sh`.
//!
//!     cargo bench --bench search

use std::time::Instant;

use cited::index::dense::DenseIndex;
use cited::index::store::{DocRecord, NewChunk, SqliteStore, Store};
use cited::index::{Corpus, Mode, SearchOptions, BM25_DIR, DENSE_DIR};
use cited::ops::rng::SplitMix64;
use cited::ops::similarity::topk_cpu;

const D: usize = 384;
const QUERIES: usize = 200;

struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn unit(&mut self) -> Vec<f32> {
        let v: Vec<f32> = (0..D).map(|_| self.0.unit() - 0.5).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    fn words(&mut self, vocab: &[String], n: usize) -> String {
        (0..n)
            .map(|_| vocab[(self.next() % vocab.len() as u64) as usize].as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn percentiles(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    (at(0.5), at(0.99))
}

fn report(what: &str, n: usize, ms: Vec<f64>) {
    let (p50, p99) = percentiles(ms);
    println!("{what}\tn={n}\tp50 {p50:.3} ms\tp99 {p99:.3} ms");
}

fn dir_size(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The dense index alone at `n` rows: single queries and batches of 32.
fn dense_only(n: usize) {
    let mut rng = Rng(SplitMix64::new(42 + n as u64));
    let started = Instant::now();
    let mut index = DenseIndex::new();
    for i in 0..n {
        index
            .push(i as i64 + 1, &format!("p{i}"), &rng.unit())
            .unwrap();
    }
    index.seal();
    println!(
        "dense build\tn={n}\t{:.1} s (f16 rows and 8-bit shards)",
        started.elapsed().as_secs_f64()
    );
    let queries: Vec<Vec<f32>> = (0..QUERIES).map(|_| rng.unit()).collect();
    let mut ms = Vec::new();
    for q in &queries {
        let t = Instant::now();
        std::hint::black_box(index.search(q, 10, None).unwrap());
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report("dense index top-10, 1 query", n, ms);
    let mut ms = Vec::new();
    for batch in queries.chunks_exact(32).cycle().take(20) {
        let flat: Vec<f32> = batch.concat();
        let t = Instant::now();
        std::hint::black_box(index.search_batch(&flat, 32, 10, None).unwrap());
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    report("dense index top-10, 32 queries", n, ms);
}

/// A one-chunk passage `id` (its content hash `hash`).
fn passage(id: &str, hash: &str, text: String, embedding: Vec<f32>) -> (DocRecord, NewChunk) {
    let doc = DocRecord {
        id: id.into(),
        title: format!("Passage {id}"),
        source: String::new(),
        url: String::new(),
        date: String::new(),
        metadata: Default::default(),
        content_hash: hash.into(),
    };
    let chunk = NewChunk {
        ord: 0,
        section: String::new(),
        indexed_text: text.clone(),
        text,
        start: 0,
        end: 0,
        embedding,
    };
    (doc, chunk)
}

fn main() {
    let sizes: Vec<usize> = std::env::var("SEARCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000, 1_000_000]);
    for &n in &sizes {
        dense_only(n);
    }
    // Vocabulary with a Zipf-like mix: frequent and rare terms.
    let vocab: Vec<String> = (0..20_000).map(|i| format!("term{i}")).collect();
    for n in sizes.into_iter().filter(|&n| n <= 100_000) {
        let mut rng = Rng(SplitMix64::new(n as u64));
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = SqliteStore::open(&dir.path().join("store.sqlite")).unwrap();
            let started = Instant::now();
            let mut batch = Vec::new();
            for i in 0..n {
                let text = rng.words(&vocab[..(200 + i % 19_800)], 60);
                let (doc, chunk) = passage(&format!("p{i}"), "", text, rng.unit());
                batch.push((doc, vec![chunk]));
                if batch.len() == 5_000 {
                    store.upsert_many(&batch).unwrap();
                    batch.clear();
                }
            }
            if !batch.is_empty() {
                store.upsert_many(&batch).unwrap();
            }
            let (_, chunks) = store.counts().unwrap();
            println!(
                "store\tn={n}\t{chunks} chunks written in {:.1} s; {:.1} MB on disk",
                started.elapsed().as_secs_f64(),
                std::fs::metadata(dir.path().join("store.sqlite"))
                    .unwrap()
                    .len() as f64
                    / 1e6
            );
        }
        let started = Instant::now();
        let mut corpus = Corpus::open(dir.path()).unwrap();
        println!(
            "open\tn={n}\tindexes built from the store in {:.1} s; dense files {:.1} MB, BM25 {:.1} MB",
            started.elapsed().as_secs_f64(),
            dir_size(&dir.path().join(DENSE_DIR)) as f64 / 1e6,
            dir_size(&dir.path().join(BM25_DIR)) as f64 / 1e6,
        );
        let queries: Vec<(Vec<f32>, String)> = (0..QUERIES)
            .map(|_| (rng.unit(), rng.words(&vocab[..2_000], 8)))
            .collect();

        // The dense op alone, on the same matrix layout the index holds.
        let mut matrix = Vec::with_capacity(n * D);
        corpus
            .store()
            .for_each_chunk(&mut |c| {
                matrix.extend_from_slice(&c.embedding);
                Ok(())
            })
            .unwrap();
        let mut ms = Vec::new();
        for (q, _) in &queries {
            let t = Instant::now();
            std::hint::black_box(topk_cpu(q, &matrix, D, 10).unwrap());
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        report("dense op top-10", n, ms);

        for (mode, what) in [
            (Mode::Bm25, "bm25 query top-10"),
            (Mode::Hybrid, "hybrid query top-10"),
        ] {
            let opts = SearchOptions {
                mode,
                top_k: 10,
                ..SearchOptions::default()
            };
            let mut ms = Vec::new();
            for (q, text) in &queries {
                let t = Instant::now();
                std::hint::black_box(corpus.search(text, q, &opts).unwrap());
                ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            report(what, n, ms);
        }

        // One changed document: taken in from the change log, not rebuilt.
        let text = rng.words(&vocab[..2_000], 60);
        let (doc, chunk) = passage("p7", "revised", text, rng.unit());
        corpus.store_mut().upsert(&doc, &[chunk]).unwrap();
        let t = Instant::now();
        corpus.refresh().unwrap();
        println!(
            "update\tn={n}\tone changed document taken in by both indexes in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        // Reopened (a restart): the dense files are read back, BM25 is on disk.
        drop(corpus);
        let t = Instant::now();
        let corpus = Corpus::open(dir.path()).unwrap();
        println!(
            "reopen\tn={n}\t{:.2} s, version {}",
            t.elapsed().as_secs_f64(),
            corpus.version()
        );
    }
}
