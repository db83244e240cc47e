//! Invariants of the batched engine's memory, on a tiny seeded model small enough to run
//! thousands of requests: every KV block comes back after a storm of random cancellations; a
//! request larger than the whole cache is refused at once; preemption (recompute) and prefix
//! reuse change no output; different cache salts never share blocks.
//!
//! The model is quantized (Q8_0, every width a multiple of 64), so every product runs on the
//! row-independent quantized kernels and attention runs one task per token: a sequence computes
//! the same numbers whatever its batch, its chunking or its cached prefix, and outputs are
//! compared exactly.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use cited::engine::scheduler::SchedulerConfig;
use cited::engine::worker::{
    EngineConfig, EngineHandle, EngineInfo, EngineStats, GenerateEvent, GenerateRequest,
    GenerationStats, TextSide, TokenLogprob,
};
use cited::error::EngineError;
use cited::models::bert::Embedder;
use cited::models::chat_template::ChatTemplate;
use cited::models::gguf::GgufFile;
use cited::models::kv_cache::KvCache;
use cited::models::llama::{Llama, QuantMode};
use cited::models::tokenizer::BpeTokenizer;
use common::{Rng, TinyLlama};

const SHAPE: TinyLlama = TinyLlama {
    vocab: 97,
    hidden: 64,
    ff: 128,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    tie: false,
};

/// The tiny model and its text side.
fn tiny_model() -> (Llama, TextSide) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    SHAPE.write_gguf_with_tokenizer(&path, 7, GgmlDType::Q8_0);
    let mut file = GgufFile::open(&path).unwrap();
    let tokenizer = BpeTokenizer::from_gguf(file.content()).unwrap();
    let model = Llama::from_gguf(&mut file, &Device::Cpu, QuantMode::Quantized).unwrap();
    let text = TextSide {
        tokenizer,
        template: ChatTemplate::new("{{ messages[0].content }}", "", "").unwrap(),
        context_length: model.config().max_position_embeddings,
    };
    (model, text)
}

/// An engine over the tiny model with `blocks` KV blocks of 16 positions.
fn engine(blocks: usize, max_running: usize, max_batch_tokens: usize) -> EngineHandle {
    let (model, text) = tiny_model();
    let embedder = Embedder::load(&common::minilm_dir(), &Device::Cpu).unwrap();
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_running,
            max_batch_tokens,
            ..Default::default()
        },
        max_waiting: 2_000,
        kv_cache_bytes: blocks * KvCache::bytes_per_block(model.config(), 16),
        block_size: 16,
    };
    let info = EngineInfo {
        embedder: "e".into(),
        generator: "tiny".into(),
    };
    EngineHandle::start(embedder, model, text, info, cfg).unwrap()
}

/// Prompt token ids: printable characters only (ids 0..94).
fn prompt(rng: &mut Rng, len: usize) -> Vec<u32> {
    rng.tokens(len, 94)
}

async fn collect(
    rx: tokio::sync::mpsc::UnboundedReceiver<GenerateEvent>,
) -> (String, GenerationStats) {
    let (text, _, stats) = collect_all(rx).await;
    (text, stats)
}

async fn collect_all(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<GenerateEvent>,
) -> (String, Vec<TokenLogprob>, GenerationStats) {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(e) = rx.recv().await {
        match e {
            GenerateEvent::Text(t) => text.push_str(&t),
            GenerateEvent::Logprob(lp) => logprobs.push(lp),
            GenerateEvent::Done(stats) => return (text, logprobs, stats),
            GenerateEvent::Error(e) => panic!("{e}"),
        }
    }
    panic!("no Done event");
}

fn request(prompt: Vec<u32>, max_tokens: usize, salt: u64) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt, max_tokens);
    r.ignore_eos = true;
    r.cache_salt = salt;
    r
}

/// Waits until the engine has ended `n` generations, then for its block counts to settle.
async fn wait_idle(e: &EngineHandle, n: u64) {
    let started = Instant::now();
    let s = e.stats();
    while s.generations_finished.load(Ordering::Relaxed)
        + s.generations_cancelled.load(Ordering::Relaxed)
        < n
    {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the engine never ended its {n} generations"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The counts are published at the end of the step that ended the last generation.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_with_random_cancellations_free_every_block() {
    // 24 blocks (384 positions) for up to 8 sequences of up to 100: preemptions happen too.
    // Half the prompts start with one of three 32-token prefixes, under one of two salts.
    let e = engine(24, 8, 64);
    let mut rng = Rng::new(2024);
    let prefixes: Vec<Vec<u32>> = (0..3).map(|_| prompt(&mut rng, 32)).collect();
    let mut kept = Vec::new();
    let mut cancelled_early = 0;
    for i in 0..1000u64 {
        let mut p = if rng.below(2) == 0 {
            prefixes[rng.below(3) as usize].clone()
        } else {
            Vec::new()
        };
        let len = 1 + rng.below(60 - p.len() as u32) as usize;
        p.extend(prompt(&mut rng, len));
        let max_tokens = 1 + rng.below(40) as usize;
        let mut rx = e.generate(request(p, max_tokens, i % 2)).unwrap();
        match rng.below(4) {
            // Gone before it is admitted (or right after).
            0 => {
                drop(rx);
                cancelled_early += 1;
            }
            // Gone after some text.
            1 => {
                let after = rng.below(5);
                kept.push(tokio::spawn(async move {
                    for _ in 0..after {
                        if rx.recv().await.is_none() {
                            break;
                        }
                    }
                }));
            }
            // Read to the end.
            _ => kept.push(tokio::spawn(
                async move { while rx.recv().await.is_some() {} },
            )),
        }
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    for k in kept {
        k.await.unwrap();
    }
    wait_idle(&e, 1000).await;
    let s = e.stats();
    assert_eq!(
        s.generations_finished.load(Ordering::Relaxed)
            + s.generations_cancelled.load(Ordering::Relaxed),
        1000
    );
    assert!(s.generations_cancelled.load(Ordering::Relaxed) >= cancelled_early);
    assert_eq!(s.waiting.load(Ordering::Relaxed), 0);
    assert_eq!(s.kv_blocks_total.load(Ordering::Relaxed), 24);
    assert_eq!(
        s.kv_blocks_used.load(Ordering::Relaxed),
        0,
        "every KV block is free once no sequence runs"
    );
    let (preempted, hits) = (
        s.preemptions.load(Ordering::Relaxed),
        s.prefix_blocks_hit.load(Ordering::Relaxed),
    );
    eprintln!(
        "preemptions {preempted}, prefix blocks hit {hits} of {}",
        s.prefix_blocks_looked_up.load(Ordering::Relaxed)
    );
    assert!(
        preempted > 0 && hits > 0,
        "the storm must exercise preemption and reuse"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_the_whole_cache_fails_at_once() {
    let e = engine(4, 4, 64); // 64 positions in all
    let mut rng = Rng::new(5);
    let err = e
        .generate(request(prompt(&mut rng, 50), 20, 0))
        .unwrap_err();
    match err {
        EngineError::Invalid(m) => assert!(m.contains("KV cache holds 64"), "{m}"),
        other => panic!("{other}"),
    }
    // One that fits the whole cache runs.
    let (_, stats) = collect(e.generate(request(prompt(&mut rng, 40), 24, 0)).unwrap()).await;
    assert_eq!(stats.generated_tokens, 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_and_prefix_reuse_change_no_output() {
    let mut rng = Rng::new(9);
    let shared = prompt(&mut rng, 40);
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            let mut p = if i % 2 == 0 {
                shared.clone()
            } else {
                Vec::new()
            };
            p.extend(prompt(&mut rng, 5 + 7 * i));
            p
        })
        .collect();
    // Alone: one at a time, each on a fresh engine (nothing cached, nothing preempted).
    let mut alone = Vec::new();
    for p in &prompts {
        let e = engine(64, 1, 64);
        alone.push(
            collect(e.generate(request(p.clone(), 40, 1)).unwrap())
                .await
                .0,
        );
    }
    // Together on 12 blocks (192 positions) with a 24-token step budget: the six need up to
    // 6 x 113 positions, so sequences are preempted and recomputed, prompts are read in chunks
    // beside running decodes, and the ones sharing the 40-token prefix (salt 1) reuse its
    // blocks.
    let e = engine(12, 6, 24);
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| e.generate(request(p.clone(), 40, 1)).unwrap())
        .collect();
    let mut together = Vec::new();
    for rx in receivers {
        together.push(collect(rx).await.0);
    }
    assert_eq!(together, alone);
    let s = e.stats();
    assert!(
        s.preemptions.load(Ordering::Relaxed) > 0,
        "the test must exercise preemption"
    );

    // Prefix reuse: the shared prompt again under the same salt skips its two full blocks;
    // under another salt nothing is reused. The output is the same either way.
    let e = engine(64, 4, 64);
    let (first, _) = collect(e.generate(request(prompts[0].clone(), 40, 1)).unwrap()).await;
    let (same_salt, hit) = collect(e.generate(request(prompts[2].clone(), 40, 1)).unwrap()).await;
    let (other_salt, miss) = collect(e.generate(request(prompts[2].clone(), 40, 2)).unwrap()).await;
    assert_eq!(first, alone[0]);
    assert_eq!(
        hit.cached_prompt_tokens, 32,
        "two full blocks of the shared prefix"
    );
    assert_eq!(miss.cached_prompt_tokens, 0, "another salt shares nothing");
    assert_eq!(same_salt, alone[2]);
    assert_eq!(other_salt, alone[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_describe_the_models_choice_alone_and_in_a_batch() {
    let mut rng = Rng::new(31);
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| prompt(&mut rng, 10 + 9 * i)).collect();
    let ask = |p: &Vec<u32>, temperature: f32| {
        let mut r = request(p.clone(), 12, 0);
        r.logprobs = Some(5);
        r.sampling.temperature = temperature;
        r.sampling.seed = 4;
        r
    };
    let e = engine(64, 4, 64);
    for temperature in [0.0, 1.0] {
        let mut alone = Vec::new();
        for p in &prompts {
            alone.push(collect_all(e.generate(ask(p, temperature)).unwrap()).await);
        }
        let rxs: Vec<_> = prompts
            .iter()
            .map(|p| e.generate(ask(p, temperature)).unwrap())
            .collect();
        for (rx, (text, lps, stats)) in rxs.into_iter().zip(&alone) {
            let (t2, lp2, _) = collect_all(rx).await;
            assert_eq!(
                (&t2, &lp2),
                (text, lps),
                "batched == alone, log-probabilities too"
            );
            assert_eq!(lps.len(), stats.generated_tokens);
            for lp in lps {
                assert_eq!(lp.top.len(), 5);
                assert!(lp.logprob <= 0.0);
                assert!(lp.top.windows(2).all(|w| w[0].2 >= w[1].2));
                let mass: f32 = lp.top.iter().map(|t| t.2.exp()).sum();
                assert!(mass <= 1.0 + 1e-5);
                if temperature == 0.0 {
                    // Greedy picks the most likely token.
                    assert_eq!(lp.token, lp.top[0].0);
                    assert!((lp.logprob - lp.top[0].2).abs() < 1e-6);
                } else if let Some(t) = lp.top.iter().find(|t| t.0 == lp.token) {
                    assert!((lp.logprob - t.2).abs() < 1e-6);
                }
            }
        }
    }
    let mut too_many = request(prompts[0].clone(), 4, 0);
    too_many.logprobs = Some(21);
    assert!(matches!(e.generate(too_many), Err(EngineError::Invalid(_))));
}

/// The offline driver (what the GPU check times) is the server's scheduler: every request
/// gets its tokens, and each one's text is the same run alone or in a crowd that waits for
/// blocks and reads its prompts in chunks.
#[test]
fn offline_runs_batch_without_changing_any_output() {
    use cited::engine::scheduler::run_offline;
    let (model, text) = tiny_model();
    let mut rng = Rng::new(77);
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(&mut rng, 20 + 9 * i)).collect();
    let max_tokens = |i: usize| 10 + 3 * i;
    let requests = || {
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| request(p.clone(), max_tokens(i), 0))
            .collect::<Vec<_>>()
    };
    let cfg = |max_running, max_batch_tokens| SchedulerConfig {
        max_running,
        max_batch_tokens,
        ..Default::default()
    };
    let cache = |blocks| KvCache::new(model.config(), blocks, 16);
    let stats = EngineStats::default();
    // 12 blocks hold 192 positions: six sequences of up to 100 cannot all stay.
    let together = run_offline(&model, &text, cfg(6, 48), cache(12), requests(), &stats).unwrap();
    assert_eq!(together.len(), prompts.len());
    for (i, r) in together.iter().enumerate() {
        assert_eq!(r.stats.generated_tokens, max_tokens(i));
        let alone = run_offline(
            &model,
            &text,
            cfg(1, 256),
            cache(12),
            vec![request(prompts[i].clone(), max_tokens(i), 0)],
            &EngineStats::default(),
        )
        .unwrap();
        assert_eq!(alone[0].text, r.text, "request {i}");
    }
    // A request the cache can never hold is an error, not a hang.
    let too_big = vec![request(prompt(&mut rng, 300), 10, 0)];
    assert!(run_offline(&model, &text, cfg(1, 64), cache(4), too_big, &stats).is_err());
}

/// The GPU check's engine set-up on the CPU: seeded dummy weights with the synthetic byte-level
/// text side, every request generating exactly its tokens (ids past the bytes decode as text
/// of their own), in a batch that prefills in chunks.
#[test]
fn dummy_weights_with_the_synthetic_text_side_run_through_the_scheduler() {
    use cited::engine::scheduler::run_offline;
    let cfg: cited::models::llama::LlamaConfig = serde_json::from_value(serde_json::json!({
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "max_position_embeddings": 512,
    }))
    .unwrap();
    let model = Llama::dummy(&cfg, &Device::Cpu, QuantMode::Dequantized, 3).unwrap();
    let text = TextSide::synthetic(cfg.vocab_size, cfg.max_position_embeddings).unwrap();
    let mut rng = Rng::new(5);
    let requests: Vec<GenerateRequest> = (0..4)
        .map(|i| request(rng.tokens(40 + 13 * i, 300), 9, 0))
        .collect();
    let cache = KvCache::with_tokens(&cfg, 4 * 128);
    let sched = SchedulerConfig {
        max_running: 4,
        max_batch_tokens: 32,
        ..Default::default()
    };
    let results = run_offline(
        &model,
        &text,
        sched,
        cache,
        requests,
        &EngineStats::default(),
    )
    .unwrap();
    assert_eq!(results.len(), 4);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.stats.generated_tokens, 9);
        assert_eq!(
            r.stats.prompt_tokens,
            40 + 13 * i,
            "results in submission order"
        );
    }
}
