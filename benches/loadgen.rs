//! Load generator for any OpenAI-compatible server (cited, llama.cpp's `llama-server`, ...) and
//! for cited's `/v1/answer`. Fixed concurrency (`--concurrency N`: N clients, each sending its next
//! request when the last finishes) or open-loop Poisson arrivals (`--rate R` requests/s), bounded
//! by `--requests` and `--duration`. Per request: time to first token (TTFT), mean inter-token
//! latency (ITL), end-to-end latency, output tokens, HTTP status. Prints p50/p90/p99 and
//! aggregate throughput as a table, and everything as JSON with `--json FILE`.
//!
//!     cargo bench --bench loadgen -- --url http://127.0.0.1:8080 --concurrency 4 --requests 16
//!     cargo bench --bench loadgen -- --endpoint answer --prompts questions.txt --rate 0.5
//!
//! Prompts: a text file with one prompt per line, or JSONL with a `question` or `prompt` field
//! (`{n}` in a prompt becomes the request's number); without `--prompts`, a prompt of about
//! `--prompt-words` words that starts with the request's number, so requests share no prefix. Streaming is always on;
//! output tokens are counted from the usage the server reports when it does, else from the
//! number of content chunks.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Mutex;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Endpoint {
    /// `POST /v1/chat/completions`, streamed, `stream_options.include_usage`.
    Chat,
    /// cited's `POST /v1/answer` (server-sent `delta` events).
    Answer,
    /// `POST /v1/completions` (raw prompt, no chat template), streamed, with usage; on cited
    /// it needs `serve --completions`.
    Completions,
}

#[derive(Parser, Debug)]
#[command(about = "Load generator for OpenAI-compatible servers and cited's /v1/answer")]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, value_enum, default_value = "chat")]
    endpoint: Endpoint,
    /// Clients sending back to back (ignored with --rate).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Open-loop Poisson arrivals, requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Requests to send in all.
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// Stop sending after this many seconds (requests in flight finish).
    #[arg(long)]
    duration: Option<f64>,
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Length of the built-in prompt, in words.
    #[arg(long, default_value_t = 96)]
    prompt_words: usize,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Model name sent in chat requests.
    #[arg(long, default_value = "default")]
    model: String,
    /// Ignore the end of turn so every request generates `max_tokens` (`ignore_eos`, which
    /// llama.cpp's server and cited's /v1/completions take).
    #[arg(long)]
    ignore_eos: bool,
    /// The support check of cited's answers (`off`, `flag`, `withhold`), sent as `grounding`
    /// on chat and answer requests; left out when not given.
    #[arg(long)]
    grounding: Option<String>,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Accepted for `cargo bench` compatibility.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
struct Record {
    status: u16,
    ttft_s: Option<f64>,
    itl_s: Option<f64>,
    e2e_s: f64,
    output_tokens: usize,
    /// As the server reported it (cached prompt tokens included).
    prompt_tokens: Option<usize>,
    error: Option<String>,
}

fn load_prompts(args: &Args) -> Vec<String> {
    let Some(path) = &args.prompts else {
        let words = [
            "metastatic",
            "sarcoma",
            "treatment",
            "surgery",
            "radiation",
            "chemotherapy",
            "stage",
            "doxorubicin",
            "lungs",
            "biopsy",
            "grade",
            "trial",
        ];
        let text: Vec<&str> = (0..args.prompt_words)
            .map(|i| words[i % words.len()])
            .collect();
        // `{n}` becomes the run's and the request's number, so no two requests share a prompt
        // prefix (no server's prefix cache turns the prefill into a lookup).
        return vec![format!(
            "Case {{n}}. Explain in detail, for a patient: {}. How is metastatic sarcoma treated?",
            text.join(" ")
        )];
    };
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(v) if v.is_object() => v["question"]
                .as_str()
                .or(v["prompt"].as_str())
                .unwrap_or_else(|| panic!("a JSONL line without `question` or `prompt`: {l}"))
                .to_string(),
            _ => l.to_string(),
        })
        .collect()
}

/// One streamed request.
async fn one(client: &reqwest::Client, args: &Args, prompt: &str) -> Record {
    let (path, mut body) = match args.endpoint {
        Endpoint::Chat => (
            "/v1/chat/completions",
            json!({
                "model": args.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": args.max_tokens,
                "stream": true,
                "stream_options": {"include_usage": true},
                "ignore_eos": args.ignore_eos,
            }),
        ),
        Endpoint::Answer => (
            "/v1/answer",
            json!({"question": prompt, "max_tokens": args.max_tokens}),
        ),
        Endpoint::Completions => (
            "/v1/completions",
            json!({
                "model": args.model,
                "prompt": prompt,
                "max_tokens": args.max_tokens,
                "stream": true,
                "stream_options": {"include_usage": true},
                "ignore_eos": args.ignore_eos,
            }),
        ),
    };
    if let (Some(g), Endpoint::Chat | Endpoint::Answer) = (&args.grounding, args.endpoint) {
        body["grounding"] = json!(g);
    }
    let started = Instant::now();
    let mut rec = Record::default();
    let response = match client
        .post(format!("{}{path}", args.url.trim_end_matches('/')))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => {
            rec.error = Some(e.to_string());
            rec.e2e_s = started.elapsed().as_secs_f64();
            return rec;
        }
    };
    rec.status = response.status().as_u16();
    if !response.status().is_success() {
        rec.error = Some(response.text().await.unwrap_or_default());
        rec.e2e_s = started.elapsed().as_secs_f64();
        return rec;
    }
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let (mut chunks, mut usage_tokens) = (0usize, None);
    let (mut first, mut last) = (None, None);
    let mut event = String::from("message");
    while let Some(bytes) = stream.next().await {
        let Ok(bytes) = bytes else {
            rec.error = Some("stream broke".into());
            break;
        };
        buffer.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buffer.find('\n') {
            let line = buffer[..end].trim_end_matches('\r').to_string();
            buffer.replace_range(..=end, "");
            if let Some(name) = line.strip_prefix("event:") {
                event = name.trim().to_string();
                continue;
            }
            let Some(data) = line.strip_prefix("data:").map(str::trim) else {
                if line.is_empty() {
                    event = "message".into();
                }
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            let content = match args.endpoint {
                Endpoint::Chat => v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty()),
                Endpoint::Answer => event == "delta",
                Endpoint::Completions => v["choices"][0]["text"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty()),
            };
            if content {
                let now = started.elapsed().as_secs_f64();
                first.get_or_insert(now);
                last = Some(now);
                chunks += 1;
            }
            let usage = match args.endpoint {
                Endpoint::Chat | Endpoint::Completions => &v["usage"],
                Endpoint::Answer if event == "done" => &v["usage"],
                Endpoint::Answer => &Value::Null,
            };
            if let Some(n) = usage["completion_tokens"].as_u64() {
                usage_tokens = Some(n as usize);
            }
            if let Some(n) = usage["prompt_tokens"].as_u64() {
                rec.prompt_tokens = Some(n as usize);
            }
            if event == "error" || v.get("error").is_some() {
                rec.error = Some(data.to_string());
            }
        }
    }
    rec.e2e_s = started.elapsed().as_secs_f64();
    rec.ttft_s = first;
    rec.output_tokens = usage_tokens.unwrap_or(chunks);
    if let (Some(f), Some(l)) = (first, last) {
        if rec.output_tokens > 1 {
            rec.itl_s = Some((l - f) / (rec.output_tokens - 1) as f64);
        }
    }
    rec
}

fn percentile(mut v: Vec<f64>, p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[((v.len() - 1) as f64 * p).round() as usize])
}

fn main() {
    let args = Arc::new(Args::parse());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let prompts = Arc::new(load_prompts(&args));
    // Numbers differ from run to run too, so a second run finds nothing cached from the first.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() % 1_000_000);
    // A fresh connection per request: a pooled connection that the server has just closed
    // (llama-server does) would fail a request that never reached it.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let records = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    runtime.block_on(async {
        let deadline = args.duration.map(|d| started + Duration::from_secs_f64(d));
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let take = {
            let args = args.clone();
            let next = next.clone();
            move || {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let open = deadline.is_none_or(|d| Instant::now() < d);
                (i < args.requests && open).then_some(i)
            }
        };
        let mut tasks = Vec::new();
        if let Some(rate) = args.rate {
            // Open loop: exponential gaps from a seeded generator.
            let mut rng = cited::ops::rng::SplitMix64::new(args.seed);
            while let Some(i) = take() {
                let (client, args, prompts, records) = (
                    client.clone(),
                    args.clone(),
                    prompts.clone(),
                    records.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let prompt = prompts[i % prompts.len()].replace("{n}", &format!("{run}-{i}"));
                    let r = one(&client, &args, &prompt).await;
                    records.lock().await.push(r);
                }));
                let gap = -(1.0 - rng.unit() as f64).ln() / rate;
                tokio::time::sleep(Duration::from_secs_f64(gap)).await;
            }
        } else {
            for _ in 0..args.concurrency.max(1) {
                let (client, args, prompts, records, take) = (
                    client.clone(),
                    args.clone(),
                    prompts.clone(),
                    records.clone(),
                    take.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    while let Some(i) = take() {
                        let prompt =
                            prompts[i % prompts.len()].replace("{n}", &format!("{run}-{i}"));
                        let r = one(&client, &args, &prompt).await;
                        records.lock().await.push(r);
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let wall = started.elapsed().as_secs_f64();
    let records = runtime.block_on(async { records.lock().await.clone() });
    let ok: Vec<&Record> = records.iter().filter(|r| r.error.is_none()).collect();
    let tokens: usize = ok.iter().map(|r| r.output_tokens).sum();
    let col =
        |f: &dyn Fn(&Record) -> Option<f64>| ok.iter().filter_map(|r| f(r)).collect::<Vec<_>>();
    let ttft = col(&|r| r.ttft_s);
    let itl = col(&|r| r.itl_s);
    let e2e = col(&|r| Some(r.e2e_s));
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{:.1}", x * 1e3));
    let mode = match args.rate {
        Some(r) => format!("Poisson {r} req/s"),
        None => format!("concurrency {}", args.concurrency),
    };
    let prompt_tokens = col(&|r| r.prompt_tokens.map(|n| n as f64));
    let mean_prompt = if prompt_tokens.is_empty() {
        "-".to_string()
    } else {
        format!(
            "{:.0}",
            prompt_tokens.iter().sum::<f64>() / prompt_tokens.len() as f64
        )
    };
    println!(
        "{:?} {} | {} requests, {} failed | {:.1} s | output {:.1} tok/s | {:.2} req/s | \
         prompt {} tok",
        args.endpoint,
        mode,
        records.len(),
        records.len() - ok.len(),
        wall,
        tokens as f64 / wall,
        ok.len() as f64 / wall,
        mean_prompt
    );
    println!("metric      p50 ms    p90 ms    p99 ms");
    for (name, v) in [("TTFT", &ttft), ("ITL", &itl), ("end-to-end", &e2e)] {
        println!(
            "{name:<10} {:>8} {:>9} {:>9}",
            fmt(percentile(v.clone(), 0.5)),
            fmt(percentile(v.clone(), 0.9)),
            fmt(percentile(v.clone(), 0.99))
        );
    }
    for r in records.iter().filter(|r| r.error.is_some()).take(3) {
        println!(
            "error (status {}): {}",
            r.status,
            r.error.as_deref().unwrap_or("")
        );
    }
    if let Some(path) = &args.json {
        let summary = json!({
            "endpoint": format!("{:?}", args.endpoint), "mode": mode, "wall_s": wall,
            "requests": records.len(), "failed": records.len() - ok.len(),
            "output_tokens": tokens, "output_tok_s": tokens as f64 / wall,
            "ttft_s": {"p50": percentile(ttft.clone(), 0.5), "p90": percentile(ttft.clone(), 0.9), "p99": percentile(ttft, 0.99)},
            "itl_s": {"p50": percentile(itl.clone(), 0.5), "p90": percentile(itl.clone(), 0.9), "p99": percentile(itl, 0.99)},
            "e2e_s": {"p50": percentile(e2e.clone(), 0.5), "p90": percentile(e2e.clone(), 0.9), "p99": percentile(e2e, 0.99)},
            "records": records,
        });
        std::fs::write(path, serde_json::to_string_pretty(&summary).unwrap()).unwrap();
    }
}
