//! The continuous-batching engine with the real SmolLM2 weights: answers generated together
//! equal each one generated alone (greedy and seeded), a full waiting queue refuses at once, and
//! a cancelled sequence leaves the others running.

mod common;

use std::sync::atomic::Ordering;

use candle_core::Device;
use cited::engine::scheduler::SchedulerConfig;
use cited::engine::worker::{
    load_generator, EngineConfig, EngineHandle, EngineInfo, GenerateEvent, GenerateRequest,
};
use cited::error::EngineError;
use cited::models::bert::Embedder;
use cited::models::chat_template::{ChatMessage, Role};
use cited::models::llama::QuantMode;
use cited::ops::sampling::SamplingParams;

/// Quantized products on every step: our kernels compute each row's dot products in the same
/// order whatever else is in the batch, and the paged attention runs one task per token, so a
/// sequence's arithmetic does not depend on its batch, its prefill chunking, or whether its
/// prefix came from the cache. Outputs are compared exactly.
fn engine(cfg: EngineConfig) -> EngineHandle {
    let embedder = Embedder::load(&common::minilm_dir(), &Device::Cpu).unwrap();
    let (model, text) =
        load_generator(&common::smollm2_gguf(), &Device::Cpu, QuantMode::Quantized).unwrap();
    let info = EngineInfo {
        embedder: "e".into(),
        generator: "g".into(),
    };
    EngineHandle::start(embedder, model, text, info, cfg).unwrap()
}

fn prompt(engine: &EngineHandle, question: &str) -> Vec<u32> {
    engine
        .text()
        .encode_chat(
            "You are a helpful assistant.",
            &[ChatMessage::new(Role::User, question)],
        )
        .unwrap()
}

async fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<GenerateEvent>) -> (String, usize) {
    let mut text = String::new();
    while let Some(e) = rx.recv().await {
        match e {
            GenerateEvent::Text(t) => text.push_str(&t),
            GenerateEvent::Logprob(_) => {}
            GenerateEvent::Done(stats) => return (text, stats.generated_tokens),
            GenerateEvent::Error(e) => panic!("{e}"),
        }
    }
    panic!("no Done event");
}

const QUESTIONS: [&str; 3] = [
    "What is a sarcoma?",
    "Name three common treatments for cancer, with one sentence on each of them.",
    "What does the lymph system do?",
];

fn request(engine: &EngineHandle, q: &str, sampling: SamplingParams) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt(engine, q), 24);
    r.sampling = sampling;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_generated_together_equal_each_alone() {
    // A small token budget forces chunked prefill beside running decodes.
    let e = engine(EngineConfig {
        scheduler: SchedulerConfig {
            max_running: 4,
            max_batch_tokens: 16,
            ..Default::default()
        },
        max_waiting: 16,
        ..EngineConfig::default()
    });
    let seeded = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        seed: 11,
        ..SamplingParams::default()
    };
    for sampling in [SamplingParams::default(), seeded] {
        let mut alone = Vec::new();
        for q in QUESTIONS {
            alone.push(collect(e.generate(request(&e, q, sampling.clone())).unwrap()).await);
        }
        let receivers: Vec<_> = QUESTIONS
            .iter()
            .map(|q| e.generate(request(&e, q, sampling.clone())).unwrap())
            .collect();
        let mut together = Vec::new();
        for rx in receivers {
            together.push(collect(rx).await);
        }
        assert_eq!(together, alone, "temperature {}", sampling.temperature);
        assert!(alone.iter().all(|(_, n)| *n > 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_and_a_cancelled_answer_frees_its_slot() {
    let e = engine(EngineConfig {
        scheduler: SchedulerConfig {
            max_running: 1,
            max_batch_tokens: 64,
            ..Default::default()
        },
        max_waiting: 1,
        ..EngineConfig::default()
    });
    let long = |e: &EngineHandle| {
        let mut r = request(e, QUESTIONS[1], SamplingParams::default());
        r.max_tokens = 200;
        r
    };
    let running = e.generate(long(&e)).unwrap();
    // Let the worker admit the first one, then fill the one waiting place.
    while e.stats().waiting.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let waiting = e
        .generate(request(&e, QUESTIONS[0], SamplingParams::default()))
        .unwrap();
    assert!(e.is_busy());
    assert!(matches!(
        e.generate(request(&e, QUESTIONS[2], SamplingParams::default())),
        Err(EngineError::Busy)
    ));
    // The running answer's client leaves: the waiting one runs to its end.
    drop(running);
    let (text, n) = collect(waiting).await;
    assert!(n > 0 && !text.is_empty());
    assert_eq!(e.stats().generations_cancelled.load(Ordering::Relaxed), 1);
    assert_eq!(e.stats().generations_finished.load(Ordering::Relaxed), 1);
    assert!(!e.is_busy());
    // A request longer than the model's context is refused before it queues.
    let mut huge = GenerateRequest::new(vec![1; 10], 1_000_000);
    huge.sampling = SamplingParams::default();
    assert!(matches!(e.generate(huge), Err(EngineError::Invalid(_))));
}
