//! The `cited` command line: parses arguments into a [`Config`] and dispatches.

use std::io::Write;

use anyhow::Result;
use clap::Parser;

use cited::config::{Args, Command, Config, EvalCommand, LoadFormat, RagArgs};
use cited::engine::generate::generate_greedy;
use cited::engine::worker::{load_dummy_generator, load_generator};
use cited::eval::retrieval::Split;
use cited::index::{Corpus, Mode, SearchOptions};
use cited::ingest::{ingest_paths, IngestOptions};
use cited::models::bert::Embedder;
use cited::models::chat_template::{ChatMessage, Role};
use cited::models::gguf::GgufFile;
use cited::models::tokenizer::BpeTokenizer;
use cited::rag::pipeline::{AnswerEvent, AnswerRequest};
use cited::rag::Audience;
use cited::server::{serve, ServiceConfig, Services};

/// What `serve` and `ask` load.
fn service_config(args: &Args, rag: &RagArgs) -> Result<ServiceConfig> {
    let cfg = Config::from_args(&args.models, true, true)?;
    Ok(ServiceConfig {
        embedder: cfg.embedder,
        generator: cfg.generator,
        device: cfg.device.open()?,
        weights: cfg.weights,
        data_dir: args.data_dir.clone(),
        rag: rag.to_config()?,
        engine: Default::default(),
        completions: false,
        dummy_tokenizer: (cfg.load_format == LoadFormat::Dummy).then_some(cfg.tokenizer),
        admin_token: None,
    })
}

/// The store an evaluation searches: `store` when given (kept and reused), else a temporary
/// folder (removed with the returned guard), with `paths` ingested into it.
fn eval_store(
    store: Option<&std::path::Path>,
    embedder: &Embedder,
    paths: &[&std::path::Path],
    progress: bool,
) -> Result<(tempfile::TempDir, std::path::PathBuf)> {
    let scratch = tempfile::tempdir()?;
    let dir = store.map_or_else(|| scratch.path().to_path_buf(), |s| s.to_path_buf());
    let mut s = cited::index::store::SqliteStore::open(&dir.join("store.sqlite"))?;
    let opts = IngestOptions {
        progress,
        ..IngestOptions::default()
    };
    let report = ingest_paths(&mut s, embedder, paths, &opts)?;
    eprintln!(
        "corpus: {} added, {} unchanged, {} chunks",
        report.added, report.unchanged, report.chunks
    );
    Ok((scratch, dir))
}

struct RetrievalEval<'a> {
    split: Split,
    tune: bool,
    by: Option<&'a str>,
    filter_by: Option<&'a str>,
    json: bool,
}

/// `cited eval retrieval`: dense, BM25 (ours and the plain reference) and hybrid on the chosen
/// half of the queries; with `tune`, the fusion grid searched on the dev half and its best
/// setting reported on the held-out half; per value of a query field with `by`.
fn eval_retrieval(
    corpus: &mut Corpus,
    embedder: &Embedder,
    all: &[cited::eval::Query],
    base: &SearchOptions,
    s: &RetrievalEval<'_>,
) -> Result<()> {
    use cited::eval::retrieval::{
        collect_legs, describe, groups_by, metrics, paired_bootstrap, ranks, reference_ranks,
        score, select, tune, ReferenceBm25, REFERENCE_B, REFERENCE_K1,
    };
    let split = if s.tune && s.split == Split::All {
        Split::Test
    } else {
        s.split
    };
    let qs = select(all, split);
    let legs = collect_legs(corpus, embedder, &qs, base.depth, s.filter_by)?;
    let with_mode = |mode| SearchOptions { mode, ..*base };
    let bm25 = ranks(&legs, &qs, &with_mode(Mode::Bm25));
    let mut rows: Vec<(String, cited::eval::Metrics)> = vec![
        ("dense".into(), score(&legs, &qs, &with_mode(Mode::Dense))),
        ("bm25".into(), metrics(&bm25)),
    ];
    // Our BM25 leg against the reference, query by query: (difference, 95% interval).
    let mut against_reference = None;
    if s.filter_by.is_none() {
        let reference = reference_ranks(&ReferenceBm25::build(corpus.store())?, &qs);
        rows.push((
            format!("bm25 reference (k1 {REFERENCE_K1}, b {REFERENCE_B})"),
            metrics(&reference),
        ));
        against_reference = Some(paired_bootstrap(&bm25, &reference, 10_000));
    }
    rows.push((
        format!("hybrid ({})", describe(base)),
        score(&legs, &qs, &with_mode(Mode::Hybrid)),
    ));
    if s.tune {
        let dev = select(all, Split::Dev);
        let dev_legs = collect_legs(corpus, embedder, &dev, base.depth, s.filter_by)?;
        let (best, on_dev) = tune(&dev_legs, &dev, base);

        eprintln!(
            "tuned on dev ({} queries): {}: nDCG@10 {:.3} there",
            dev.len(),
            describe(&best),
            on_dev.ndcg_at_10
        );
        rows.push((
            format!("hybrid tuned on dev ({})", describe(&best)),
            score(&legs, &qs, &best),
        ));
    }
    let title = format!(
        "split {split:?}: {} of {} queries{}",
        qs.len(),
        all.len(),
        s.filter_by
            .map(|f| format!(", each searched among documents of its own `{f}`"))
            .unwrap_or_default()
    );
    if s.json {
        let obj: serde_json::Map<String, serde_json::Value> = rows
            .iter()
            .map(|(name, m)| (name.clone(), serde_json::to_value(m).unwrap()))
            .collect();
        let diff = against_reference
            .map(|(d, lo, hi)| serde_json::json!({"ndcg_at_10": d, "ci95": [lo, hi]}));
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"split": title, "rows": obj, "bm25_minus_reference": diff})
            )?
        );
    } else {
        println!("{title}\n");
        println!("| retriever | nDCG@10 | Recall@10 | MRR@10 | queries |");
        println!("| --- | --- | --- | --- | --- |");
        for (name, m) in &rows {
            println!(
                "| {name} | {:.3} | {:.3} | {:.3} | {} |",
                m.ndcg_at_10, m.recall_at_10, m.mrr_at_10, m.queries
            );
        }
        if let Some((d, lo, hi)) = against_reference {
            println!(
                "\nbm25 minus the reference, nDCG@10: {d:+.4} (95% interval {lo:+.4} to {hi:+.4}, paired bootstrap over the queries, 10,000 resamples)"
            );
        }
    }
    if let Some(field) = s.by {
        println!("\nnDCG@10 by `{field}` (hybrid: {})\n", describe(base));
        println!("| {field} | queries | dense | bm25 | hybrid |");
        println!("| --- | --- | --- | --- | --- |");
        for (value, idx) in groups_by(&qs, field) {
            let gq: Vec<_> = idx.iter().map(|&i| qs[i].clone()).collect();
            let gl: Vec<_> = idx.iter().map(|&i| legs[i].clone()).collect();
            let n = |mode| score(&gl, &gq, &with_mode(mode)).ndcg_at_10;
            println!(
                "| {value} | {} | {:.3} | {:.3} | {:.3} |",
                gq.len(),
                n(Mode::Dense),
                n(Mode::Bm25),
                n(Mode::Hybrid)
            );
        }
    }
    Ok(())
}

/// Answers one question in this process, printing the text as it streams and the cited
/// sources at the end.
async fn ask(service: &ServiceConfig, question: &str, audience: Audience) -> Result<()> {
    let services = tokio::task::block_in_place(|| Services::load(service))?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let request = AnswerRequest {
        question: question.to_string(),
        audience,
        ..AnswerRequest::default()
    };
    let pipeline = services.pipeline.clone();
    tokio::spawn(async move { pipeline.answer(request, tx).await });
    let mut sources = Vec::new();
    let mut cited = std::collections::BTreeSet::new();
    let mut stdout = std::io::stdout();
    while let Some(event) = rx.recv().await {
        match event {
            AnswerEvent::Sources(s) => sources = s,
            AnswerEvent::Delta(text) => {
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
            AnswerEvent::Citation(c) => {
                cited.insert(c.marker);
            }
            AnswerEvent::Support(_) => {}
            AnswerEvent::Done(summary) => {
                println!("\n");
                for source in sources.iter().filter(|s| cited.contains(&s.marker)) {
                    let s = &source.hit;
                    let section = s.section.rsplit(" > ").next().unwrap_or("");
                    let mut line = format!("[{}] {}", source.marker, s.title);
                    if !section.is_empty() && section != s.title {
                        line.push_str(&format!(", {section}"));
                    }
                    if !s.date.is_empty() {
                        line.push_str(&format!(" ({})", s.date));
                    }
                    if !s.url.is_empty() {
                        line.push_str(&format!(" <{}>", s.url));
                    }
                    println!("{line}");
                }
                if let Some(g) = &summary.grounding {
                    println!(
                        "\ngrounding: {} sentences, {} claims, {} cited, {} supported",
                        g.sentences, g.factual, g.cited, g.supported
                    );
                    for u in &g.unsupported {
                        println!(
                            "  unsupported ({:?}{}): {}",
                            u.verdict
                                .reason
                                .as_ref()
                                .expect("a failed check has a reason"),
                            u.verdict
                                .detail
                                .as_ref()
                                .map(|d| format!(" {d}"))
                                .unwrap_or_default(),
                            u.text
                        );
                    }
                }
                tracing::info!(
                    finish = %summary.finish_reason,
                    citations = summary.citations.total,
                    prompt_tokens = summary.usage.prompt_tokens,
                    generated_tokens = summary.usage.completion_tokens,
                    first_token_ms = summary.timings.first_token_ms,
                    total_ms = summary.timings.total_ms,
                    "answer finished"
                );
            }
            AnswerEvent::Error { message, .. } => anyhow::bail!("{message}"),
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tantivy=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match &args.command {
        Command::Serve {
            host,
            port,
            rag,
            engine,
            completions,
            admin_token,
        } => {
            let mut service = service_config(&args, rag)?;
            service.engine = engine.to_config(service.device.is_cuda())?;
            service.completions = *completions;
            service.admin_token = admin_token.clone();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(serve(std::net::SocketAddr::new(*host, *port), service))?;
        }
        Command::Ask {
            question,
            audience,
            rag,
        } => {
            let service = service_config(&args, rag)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(ask(&service, question, *audience))?;
        }
        Command::Embed { texts } => {
            let cfg = Config::from_args(&args.models, true, false)?;
            let device = cfg.device.open()?;
            let embedder = Embedder::load(&cfg.embedder, &device)?;
            let vectors = embedder.embed(texts)?.to_vec2::<f32>()?;
            println!("{}", serde_json::to_string(&vectors)?);
        }
        Command::Generate {
            prompt,
            system,
            max_tokens,
        } => {
            let cfg = Config::from_args(&args.models, false, true)?;
            let device = cfg.device.open()?;
            let (model, text) = match cfg.load_format {
                LoadFormat::Gguf => load_generator(&cfg.generator, &device, cfg.weights)?,
                LoadFormat::Dummy => {
                    load_dummy_generator(&cfg.generator, &cfg.tokenizer, &device, cfg.weights)?
                }
            };
            let ids = text.encode_chat(system, &[ChatMessage::new(Role::User, prompt)])?;
            let mut stdout = std::io::stdout();
            let out = generate_greedy(&model, &text.tokenizer, &ids, *max_tokens, |piece| {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            })?;
            println!();
            let decode_rate = if out.tokens.len() > 1 {
                (out.tokens.len() - 1) as f64 / out.decode.as_secs_f64()
            } else {
                0.0
            };
            tracing::info!(
                prompt_tokens = out.prompt_tokens,
                generated = out.tokens.len(),
                stop = ?out.stop,
                prefill_tok_s = format!("{:.1}", out.prompt_tokens as f64 / out.prefill.as_secs_f64()),
                decode_tok_s = format!("{decode_rate:.1}"),
                "generation finished"
            );
        }
        Command::Ingest {
            paths,
            overlap,
            batch,
        } => {
            let cfg = Config::from_args(&args.models, true, false)?;
            let embedder = Embedder::load(&cfg.embedder, &cfg.device.open()?)?;
            // The store alone: ingesting never touches the indexes a running server owns.
            let mut store =
                cited::index::store::SqliteStore::open(&args.data_dir.join("store.sqlite"))?;
            let opts = IngestOptions {
                chunk: cited::ingest::chunker::ChunkOptions {
                    max_tokens: embedder.max_tokens(),
                    overlap_tokens: *overlap,
                },
                batch: *batch,
                progress: true,
            };
            let paths: Vec<&std::path::Path> = paths.iter().map(|p| p.as_path()).collect();
            let started = std::time::Instant::now();
            let report = ingest_paths(&mut store, &embedder, &paths, &opts)?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "added {}, replaced {}, unchanged {}, {} chunks in {secs:.1} s ({:.1} chunks/s)",
                report.added,
                report.replaced,
                report.unchanged,
                report.chunks,
                report.chunks as f64 / secs.max(1e-9)
            );
            for (what, why) in &report.failed {
                eprintln!("not ingested: {what}: {why}");
            }
        }
        Command::Delete { ids } => {
            let mut store =
                cited::index::store::SqliteStore::open(&args.data_dir.join("store.sqlite"))?;
            for id in ids {
                use cited::index::store::Store;
                let gone = store.delete(id)?;
                println!("{id}: {}", if gone { "deleted" } else { "not found" });
            }
        }
        Command::Search {
            query,
            top_k,
            mode,
            filters,
            json,
        } => {
            let filter = cited::index::filter::Filter::from_pairs(filters)?;
            let cfg = Config::from_args(&args.models, true, false)?;
            let embedder = Embedder::load(&cfg.embedder, &cfg.device.open()?)?;
            let mut corpus = Corpus::open(&args.data_dir)?;
            let v = embedder.embed(&[query])?.to_vec2::<f32>()?.remove(0);
            let opts = SearchOptions {
                top_k: *top_k,
                mode: *mode,
                ..SearchOptions::default()
            };
            let hits = corpus.search_filtered(query, &v, &opts, &filter)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&hits)?);
            } else {
                for (i, h) in hits.iter().enumerate() {
                    println!(
                        "{}. {} [{}] score {:.4} cosine {:.3} bm25 {}\n   {}\n   {}\n",
                        i + 1,
                        h.id,
                        h.chunk_id,
                        h.score,
                        h.dense_score,
                        h.bm25_score.map_or("-".into(), |s| format!("{s:.2}")),
                        cited::ingest::chunker::context_line(&h.title, &h.section),
                        h.text
                            .chars()
                            .take(200)
                            .collect::<String>()
                            .replace('\n', " ")
                    );
                }
            }
        }
        Command::Eval {
            what:
                EvalCommand::Retrieval {
                    corpus: corpus_path,
                    queries,
                    limit,
                    rrf_k,
                    fusion,
                    dense_share,
                    dense_weight,
                    bm25_weight,
                    store,
                    json,
                    split,
                    tune,
                    by,
                    filter_by,
                },
        } => {
            let cfg = Config::from_args(&args.models, true, false)?;
            let embedder = Embedder::load(&cfg.embedder, &cfg.device.open()?)?;
            let (_scratch, dir) =
                eval_store(store.as_deref(), &embedder, &[corpus_path.as_path()], true)?;
            let mut corpus = Corpus::open(&dir)?;
            let mut qs = cited::eval::read_queries(queries)?;
            if let Some(n) = limit {
                qs.truncate(*n);
            }
            let defaults = SearchOptions::default();
            let base = SearchOptions {
                fusion: fusion.unwrap_or(defaults.fusion),
                dense_share: dense_share.unwrap_or(defaults.dense_share),
                rrf_k: rrf_k.unwrap_or(defaults.rrf_k),
                dense_weight: dense_weight.unwrap_or(defaults.dense_weight),
                bm25_weight: bm25_weight.unwrap_or(defaults.bm25_weight),
                ..defaults
            };
            let settings = RetrievalEval {
                split: *split,
                tune: *tune,
                by: by.as_deref(),
                filter_by: filter_by.as_deref(),
                json: *json,
            };
            eval_retrieval(&mut corpus, &embedder, &qs, &base, &settings)?;
        }
        Command::Eval {
            what:
                EvalCommand::Support {
                    pairs,
                    min_cosine,
                    sweep,
                    misses,
                },
        } => {
            let cfg = Config::from_args(&args.models, true, false)?;
            let embedder = Embedder::load(&cfg.embedder, &cfg.device.open()?)?;
            let pairs = cited::eval::read_support_pairs(pairs)?;
            let mut support = cited::rag::grounding::SupportConfig::default();
            if let Some(c) = min_cosine {
                support.min_cosine = *c;
            }
            let cosines = cited::eval::support_cosines(&pairs, &embedder, &support)?;
            let (rows, verdicts) = cited::eval::evaluate_support(&pairs, Some(&cosines), &support);
            println!("| pairs | n | flagged | flagged share |");
            println!("| --- | --- | --- | --- |");
            for r in &rows {
                println!(
                    "| {} | {} | {} | {:.1}% |",
                    r.kind,
                    r.pairs,
                    r.flagged,
                    100.0 * r.rate()
                );
            }
            println!("(min cosine {})", support.min_cosine);
            if *sweep {
                println!("\n| min cosine | faithful flagged | perturbed flagged |");
                println!("| --- | --- | --- |");
                for step in 0..=10 {
                    let c = 0.3 + 0.05 * step as f32;
                    let cfg = cited::rag::grounding::SupportConfig {
                        min_cosine: c,
                        ..support
                    };
                    let (rows, _) = cited::eval::evaluate_support(&pairs, Some(&cosines), &cfg);
                    let faithful = &rows[0];
                    let perturbed = &rows[rows.len() - 1];
                    println!(
                        "| {c:.2} | {:.1}% | {:.1}% |",
                        100.0 * faithful.rate(),
                        100.0 * perturbed.rate()
                    );
                }
            }
            if *misses {
                for (p, (id, v)) in pairs.iter().zip(&verdicts) {
                    if p.faithful == v.supported {
                        continue;
                    }
                    println!(
                        "\n{id} [{}] {:?} {:?} sim {:?}\n  S: {}\n  P: {}",
                        p.perturbation.as_deref().unwrap_or("faithful"),
                        v.reason,
                        v.detail,
                        v.similarity,
                        p.sentence,
                        p.passage
                    );
                }
            }
        }
        Command::Eval {
            what:
                EvalCommand::Answers {
                    questions,
                    corpus: corpus_paths,
                    store,
                    limit,
                    concurrency,
                    out,
                    rag,
                },
        } => {
            let mut service = service_config(&args, rag)?;
            let paths: Vec<&std::path::Path> = corpus_paths.iter().map(|p| p.as_path()).collect();
            let embedder = Embedder::load(&service.embedder, &service.device)?;
            let (_scratch, dir) = eval_store(store.as_deref(), &embedder, &paths, false)?;
            drop(embedder);
            service.data_dir = dir;
            let mut qs = cited::eval::answers::read_questions(questions)?;
            if let Some(n) = limit {
                qs.truncate(*n);
            }
            let services = Services::load(&service)?;
            let max_tokens = service.rag.max_tokens;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let started = std::time::Instant::now();
            let outcomes = runtime.block_on(cited::eval::answers::run(
                &services.pipeline,
                &qs,
                max_tokens,
                *concurrency,
            ));
            eprintln!(
                "{} questions in {:.1} s",
                qs.len(),
                started.elapsed().as_secs_f64()
            );
            if let Some(path) = out {
                let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
                for (q, o) in qs.iter().zip(&outcomes) {
                    let mut v = serde_json::to_value(o)?;
                    v["question"] = serde_json::json!(q.question);
                    v["as_expected"] = serde_json::json!(o.correct(q.expected()));
                    writeln!(w, "{v}")?;
                }
            }
            let report = cited::eval::answers::report(&qs, &outcomes);
            print!("{}", cited::eval::answers::markdown(&report));
        }
        Command::Tokenize { text, special } => {
            let cfg = Config::from_args(&args.models, false, true)?;
            let file = GgufFile::open(&cfg.generator)?;
            let tokenizer = BpeTokenizer::from_gguf(file.content())?;
            println!("{:?}", tokenizer.encode(text, *special)?);
        }
    }
    Ok(())
}
