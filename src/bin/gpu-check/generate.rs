//! The generator on the GPU: the forward pass against the host path on small shapes, greedy
//! parity at real shapes, generation and engine rates.

use super::*;

/// Greedy tokens of one sequence: `steps` tokens after `prompt` (prefilled in one batch), with
/// each step's top-2 logit margin.
pub(crate) fn greedy_run(
    model: &Llama,
    prompt: &[u32],
    steps: usize,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let mut cache = KvCache::with_tokens(model.config(), prompt.len() + steps + 16);
    let mut batch = Batch::new();
    batch.push(0, prompt, 0);
    let mut logits = model.forward(&batch, &mut cache, LogitsAt::LastOfEach)?;
    let (mut tokens, mut margins) = (Vec::new(), Vec::new());
    for i in 0..steps {
        let row = logits
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (best, margin) = top2(&row);
        tokens.push(best);
        margins.push(margin);
        let mut b = Batch::new();
        b.push(0, &[best], prompt.len() + i);
        logits = model.forward(&b, &mut cache, LogitsAt::LastOfEach)?;
    }
    Ok((tokens, margins))
}

/// The largest logit's id (lower id on ties) and its margin over the second largest.
pub(crate) fn top2(row: &[f32]) -> (u32, f32) {
    let (mut best, mut first, mut second) = (0usize, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        if x > first {
            second = first;
            first = x;
            best = i;
        } else if x > second {
            second = x;
        }
    }
    (best as u32, first - second)
}

/// A small decoder shape for the GPU forward pass's parity and memcheck runs: `heads` query
/// heads over `kv_heads` KV heads of `head_dim` dims, two layers; `qwen2` adds the Q, K, V
/// biases; `interleaved` pairs rotary dimensions as GGUF files do.
pub(crate) fn small_decoder(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    qwen2: bool,
    interleaved: bool,
) -> Result<LlamaConfig> {
    let mut cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "model_type": if qwen2 { "qwen2" } else { "llama" },
        "hidden_size": heads * head_dim,
        "intermediate_size": 2 * heads * head_dim + 32,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": 1000,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
    }))?;
    if interleaved {
        cfg.rope_style = RopeStyle::Interleaved;
    }
    Ok(cfg)
}

/// Every logit of two forward passes, `(rows, vocab)` each, on `model`: prompts of `lens[0]`
/// and `lens[1]` tokens prefilled together (one long enough for split attention), then one
/// batch of a decode token for the first, the rest of the second prompt (`lens[2]` tokens) and
/// a new prompt of `lens[3]` tokens; pages of `block_size` positions.
pub(crate) fn mixed_batches(
    model: &Llama,
    tokens: &[Vec<u32>; 4],
    block_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let cfg = model.config();
    let mut cache = KvCache::new(cfg, 2048usize.div_ceil(block_size), block_size);
    let (a, b1, b2, c) = (&tokens[0], &tokens[1], &tokens[2], &tokens[3]);
    let mut first = Batch::new();
    first.push(0, a, 0);
    first.push(1, b1, 0);
    let mut second = Batch::new();
    second.push(0, &[a[0]], a.len());
    second.push(1, b2, b1.len());
    second.push(2, c, 0);
    let mut out = Vec::new();
    for batch in [&first, &second] {
        let logits = model.forward(batch, &mut cache, LogitsAt::All)?;
        out.push(
            logits
                .to_device(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    Ok(out)
}

/// The generator's forward pass on the GPU (rotary embedding, K/V write into the paged cache,
/// attention of prompt chunks and decode tokens in one batch) against the host path, same f32
/// weights: every logit of two mixed batches within 1e-3 of the largest, every row's largest
/// logit the same where the host's top two are not within that.
pub(crate) fn decoder_parity(dev: &Device, small: bool) -> Result<bool> {
    let mut cases: Vec<(&str, LlamaConfig, usize)> = vec![
        (
            "gqa 1, dim 64, qwen2 biases",
            small_decoder(4, 4, 64, true, false)?,
            16,
        ),
        (
            "gqa 3, dim 64, interleaved",
            small_decoder(9, 3, 64, false, true)?,
            16,
        ),
        (
            "gqa 4, dim 128, pages of 32",
            small_decoder(8, 2, 128, false, false)?,
            32,
        ),
        (
            "gqa 8, dim 32, pages of 8",
            small_decoder(8, 1, 32, false, false)?,
            8,
        ),
    ];
    if small {
        cases.truncate(2);
    }
    let lens = if small {
        [40, 9, 7, 5]
    } else {
        [300, 21, 19, 5]
    };
    let mut rng = Rng(SplitMix64::new(47));
    let mut ok = true;
    for (name, cfg, block_size) in cases {
        let tokens = lens.map(|n| {
            (0..n)
                .map(|_| (rng.next() % cfg.vocab_size as u64) as u32)
                .collect::<Vec<u32>>()
        });
        let cpu = Llama::dummy(&cfg, &Device::Cpu, QuantMode::Dequantized, 11)?;
        let want = mixed_batches(&cpu, &tokens, block_size)?;
        let mut gpu = Llama::dummy(&cfg, dev, QuantMode::Dequantized, 11)?;
        // Prompt chunks through the decode kernel, then (where the geometry allows: pages of
        // 16, head dims 64 and 128) through the tensor-core prefill kernel.
        let prefills: &[bool] = if block_size == 16 && matches!(cfg.head_dim(), 64 | 128) {
            &[false, true]
        } else {
            &[false]
        };
        for &tc in prefills {
            gpu.set_tensor_core_prefill(tc);
            let got = mixed_batches(&gpu, &tokens, block_size)?;
            ok &= decoder_rows_match(name, tc, &lens, &cfg, &want, &got);
        }
    }
    if !small {
        ok &= graph_parity(dev).unwrap_or_else(|e| {
            println!("PARITY\tdecode graphs\tERROR {e:#}\tFAIL");
            false
        });
    }
    Ok(ok)
}

/// Rows of logits compared: the largest difference over the largest logit of `want`, rows
/// with the same top token, rows, and whether every row is within 1e-3 with the same top token
/// (or a top-2 margin within that).
#[derive(Default)]
struct RowsMatch {
    worst: f32,
    same: usize,
    rows: usize,
    fail: bool,
}

impl RowsMatch {
    /// Adds the rows of one forward pass, `vocab` logits each; returns each row's top token
    /// in `want`.
    fn add(&mut self, want: &[f32], got: &[f32], vocab: usize) -> Vec<u32> {
        let top = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let mut best = Vec::new();
        for (wr, gr) in want.chunks(vocab).zip(got.chunks(vocab)) {
            let err = wr
                .iter()
                .zip(gr)
                .map(|(a, b)| (a - b).abs())
                .fold(
                    0f32,
                    |m, e| if e.is_nan() { f32::INFINITY } else { m.max(e) },
                )
                / top;
            self.worst = self.worst.max(err);
            let ((wbest, margin), (gbest, _)) = (top2(wr), top2(gr));
            self.rows += 1;
            self.same += (wbest == gbest) as usize;
            self.fail |= err > 1e-3 || (wbest != gbest && margin > 1e-3 * top);
            best.push(wbest);
        }
        best
    }
}

/// The engine's decode graphs ([`DecodeGraphs`]) against plain forward passes on the GPU,
/// same weights, two caches fed the same tokens: three sequences prefilled, decode steps of
/// all three (graph rows 4: one padding row on the spare block; the first step runs plainly
/// on the graph's buffers and records it, the rest replay), then sequence 1 dropped and steps
/// of two (a second shape). Every step's logits within 1e-3 of the largest, the same top
/// tokens but for near-ties; prints one `PARITY` line.
pub(crate) fn graph_parity(dev: &Device) -> Result<bool> {
    let cfg = small_decoder(8, 2, 64, false, false)?;
    let model = Llama::dummy(&cfg, dev, QuantMode::Dequantized, 13)?;
    let mut rng = Rng(SplitMix64::new(61));
    let (mut plain, mut graphed) = (KvCache::new(&cfg, 64, 16), KvCache::new(&cfg, 64, 16));
    let mut pos = Vec::new();
    let mut last = Vec::new();
    for (s, n) in [37usize, 5, 90].into_iter().enumerate() {
        let toks: Vec<u32> = (0..n)
            .map(|_| (rng.next() % cfg.vocab_size as u64) as u32)
            .collect();
        let mut b = Batch::new();
        b.push(s as u64, &toks, 0);
        let logits = model.forward(&b, &mut plain, LogitsAt::LastOfEach)?;
        model.forward(&b, &mut graphed, LogitsAt::LastOfEach)?;
        last.push(top2(&logits.flatten_all()?.to_vec1::<f32>()?).0);
        pos.push(n);
    }
    let mut graphs = DecodeGraphs::new(8, 512);
    let mut live: Vec<usize> = vec![0, 1, 2];
    let mut m = RowsMatch::default();
    for step in 0..8 {
        if step == 4 {
            live.retain(|&s| s != 1);
            plain.remove(1);
            graphed.remove(1);
        }
        let mut b = Batch::new();
        for &s in &live {
            b.push(s as u64, &[last[s]], pos[s]);
        }
        let want = model
            .forward(&b, &mut plain, LogitsAt::LastOfEach)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let got = graphs
            .forward(&model, &b, &mut graphed)?
            .context("no decode graph took the batch")?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (&s, best) in live.iter().zip(m.add(&want, &got, cfg.vocab_size)) {
            last[s] = best;
            pos[s] += 1;
        }
    }
    // Two shapes (4 rows, then 2), each recorded once; the other six steps replayed.
    let pass = !m.fail && graphs.recorded() == 2 && graphs.replays() == 6;
    println!(
        "PARITY\tdecode graphs\tgqa 4, dim 64: 3 sequences (one padding row), then 2; 8 steps\tmax error {:.2e} of the largest logit, {}/{} rows with the same top token, {} graphs recorded, {} steps replayed\t{}",
        m.worst,
        m.same,
        m.rows,
        graphs.recorded(),
        graphs.replays(),
        if pass { "ok" } else { "FAIL" }
    );
    Ok(pass)
}

/// Compares the logits of [`mixed_batches`] on the GPU with the host path's and prints the
/// verdict line.
fn decoder_rows_match(
    name: &str,
    tensor_cores: bool,
    lens: &[usize; 4],
    cfg: &LlamaConfig,
    want: &[Vec<f32>],
    got: &[Vec<f32>],
) -> bool {
    let mut m = RowsMatch::default();
    for (w, g) in want.iter().zip(got) {
        m.add(w, g, cfg.vocab_size);
    }
    let pass = !m.fail;
    println!(
        "PARITY\tdecoder {name}{}\tprompts {} + {} together, then a decode token, a chunk of {}, a new prompt of {}\tmax error {:.2e} of the largest logit, {}/{} rows with the same top token\t{}",
        if tensor_cores { ", tensor-core prefill" } else { "" },
        lens[0],
        lens[1],
        lens[2],
        lens[3],
        m.worst,
        m.same,
        m.rows,
        if pass { "ok" } else { "FAIL" }
    );
    pass
}

/// Time of generating `steps` greedy tokens (no end token) after each of `batch` prompts of
/// `prompt` random tokens: the prompts prefilled in forward passes of up to `chunk` tokens
/// (whole prompts), then the batch decoded together, each step's next tokens picked on the
/// device. Returns (prefill seconds, decode seconds, seconds of the decode steps' forward calls
/// on the host: when these are most of the decode time, launches and host work set the pace,
/// not the GPU).
pub(crate) fn generation_time(
    model: &Llama,
    dev: &Device,
    batch: usize,
    prompt: usize,
    steps: usize,
    chunk: usize,
) -> Result<(f64, f64, f64)> {
    let cfg = model.config();
    let mut cache = KvCache::with_tokens(cfg, batch * (prompt + steps + 16));
    let mut rng = Rng(SplitMix64::new(41));
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..prompt)
                .map(|_| (rng.next() % cfg.vocab_size as u64) as u32)
                .collect()
        })
        .collect();
    dev.synchronize()?;
    let started = Instant::now();
    let per_pass = (chunk / prompt.max(1)).max(1);
    let mut last = Vec::with_capacity(batch);
    for (g, group) in prompts.chunks(per_pass).enumerate() {
        let mut b = Batch::new();
        for (i, p) in group.iter().enumerate() {
            b.push((g * per_pass + i) as u64, p, 0);
        }
        let logits = model.forward(&b, &mut cache, LogitsAt::LastOfEach)?;
        last.extend(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?);
    }
    let prefill = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut host = 0f64;
    for i in 0..steps.saturating_sub(1) {
        let mut b = Batch::new();
        for (s, &t) in last.iter().enumerate() {
            b.push(s as u64, &[t], prompt + i);
        }
        let called = Instant::now();
        let logits = model.forward(&b, &mut cache, LogitsAt::LastOfEach)?;
        host += called.elapsed().as_secs_f64();
        last = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
    }
    dev.synchronize()?;
    Ok((prefill, started.elapsed().as_secs_f64(), host))
}

/// The generator on the GPU at real model shapes: greedy parity with the CPU path, then
/// generation rates with each weight form.
#[allow(clippy::too_many_arguments)]
pub(crate) fn generate_check(
    dev: &Device,
    work: &Workload,
    parity: &[String],
    weights: &[QuantMode],
    chunk: usize,
    peak_tbs: f64,
) -> Result<bool> {
    let (batches, prompt, steps) = (&work.batch, work.prompt, work.out);
    let config =
        |name: &str| Llama::read_hf_config(Path::new(&format!("models/configs/{name}.json")));
    let mut ok = true;
    for name in parity {
        let cfg = config(name)?;
        // f32 weights on both sides (the CPU's 8-bit activation products and candle's CUDA
        // quantized products round differently); equal up to the first step whose top-2
        // margin is within the tolerance of f32 sums in another order.
        let mut rng = Rng(SplitMix64::new(43));
        let toks: Vec<u32> = (0..64)
            .map(|_| (rng.next() % cfg.vocab_size as u64) as u32)
            .collect();
        let cpu = Llama::dummy(&cfg, &Device::Cpu, QuantMode::Dequantized, 7)?;
        let (want, margins) = greedy_run(&cpu, &toks, 24)?;
        drop(cpu);
        let gpu = Llama::dummy(&cfg, dev, QuantMode::Dequantized, 7)?;
        let (got, _) = greedy_run(&gpu, &toks, 24)?;
        drop(gpu);
        const TIE: f32 = 1e-3;
        let limit = margins.iter().position(|&m| m < TIE).unwrap_or(want.len());
        let first_diff = want.iter().zip(&got).position(|(a, b)| a != b);
        let pass = want[..limit] == got[..limit];
        ok &= pass;
        println!(
            "PARITY\tgenerate {name}\tgreedy, f32 weights, 64-token prompt, 24 steps\tfirst near-tie {limit}, first difference {first_diff:?}\t{}",
            if pass { "ok" } else { "FAIL" }
        );
    }
    for name in &work.models {
        let cfg = config(name)?;
        for &mode in weights {
            let mut model = Llama::dummy(&cfg, dev, mode, 7)?;
            let form = match mode {
                QuantMode::Dequantized => "f32",
                _ => "Q4_1 (output Q8_0)",
            };
            let mb = model.weight_bytes() as f64 / 1e6;
            // Loads the kernels and warms cuBLAS and the memory pool before timing.
            generation_time(&model, dev, 2, 16, 3, chunk)?;
            for &b in batches {
                let (prefill, decode, host) =
                    generation_time(&model, dev, b, prompt, steps, chunk)?;
                let total = prefill + decode;
                let out_rate = (b * steps) as f64 / total;
                let step_ms = decode * 1e3 / steps.saturating_sub(1).max(1) as f64;
                let roofline = mb * 1e6 / (step_ms * 1e-3) / (peak_tbs * 1e12);
                println!(
                    "GENERATE\t{name} dummy {form}\tbatch={b} prompt={prompt} out={steps}\t{out_rate:.1} tok/s\tprefill {:.1} ms, decode {step_ms:.2} ms/step ({:.0} tok/s; {:.0}% of it in the host's forward calls), weights {mb:.0} MB a step = {:.1}% of {peak_tbs} TB/s",
                    prefill * 1e3,
                    b as f64 / (step_ms * 1e-3),
                    100.0 * host / decode.max(1e-9),
                    100.0 * roofline
                );
                if b == 1 {
                    // The per-step cost of cudarc's buffer events (on by default, off here).
                    track_buffer_events(dev, true);
                    let with = generation_time(&model, dev, b, prompt, steps, chunk);
                    track_buffer_events(dev, false);
                    let (_, with_decode, _) = with?;
                    let with_ms = with_decode * 1e3 / steps.saturating_sub(1).max(1) as f64;
                    println!(
                        "GENERATE\t{name} dummy {form}\tbatch=1, cudarc buffer events on\t{with_ms:.2} ms/step\twithout them {step_ms:.2} ms/step"
                    );
                }
                // The same prompts through the tensor-core prefill kernel (prefill only).
                model.set_tensor_core_prefill(true);
                let tc = generation_time(&model, dev, b, prompt, 1, chunk);
                model.set_tensor_core_prefill(false);
                let (tc_prefill, _, _) = tc?;
                println!(
                    "GENERATE\t{name} dummy {form}\tbatch={b} prompt={prompt}, tensor-core prefill\t{:.1} ms\tprefill through the decode kernel {:.1} ms ({:.2}x)",
                    tc_prefill * 1e3,
                    prefill * 1e3,
                    prefill / tc_prefill.max(1e-9)
                );
            }
            if mode != QuantMode::Dequantized {
                // Decode steps replayed from a CUDA graph, at the small batches where launches
                // set the pace.
                for &b in batches.iter().filter(|&&b| b <= 32) {
                    graph_rates(dev, name, &model, b, prompt, 32)?;
                }
                // The same model through the engine's scheduler (host work per step included).
                engine_rates(dev, name, &model, batches, prompt, steps, chunk)?;
            }
        }
    }
    Ok(ok)
}

/// The scheduler on the GPU: output tokens per second of `batch` requests submitted at once.
pub(crate) fn engine_bench(dev: &Device, work: &Workload, max_batch_tokens: usize) -> Result<()> {
    for name in &work.models {
        let cfg = Llama::read_hf_config(Path::new(&format!("models/configs/{name}.json")))?;
        let model = Llama::dummy(&cfg, dev, QuantMode::Quantized, 7)?;
        engine_rates(
            dev,
            name,
            &model,
            &work.batch,
            work.prompt,
            work.out,
            max_batch_tokens,
        )?;
    }
    Ok(())
}

/// [`engine_bench`] for one model: each batch size run plainly, then with the decode steps
/// replayed from CUDA graphs (the same prompts; greedy, so the texts should agree but for
/// near-ties, as the graphs' attention splits its positions differently).
pub(crate) fn engine_rates(
    dev: &Device,
    name: &str,
    model: &Llama,
    batches: &[usize],
    prompt: usize,
    out: usize,
    max_batch_tokens: usize,
) -> Result<()> {
    let cfg = model.config().clone();
    let text = TextSide::synthetic(cfg.vocab_size, cfg.max_position_embeddings)?;
    /// How a run goes: decode steps through CUDA graphs; the answer path's processors on every
    /// request; those processors on the host (each request asks for log-probabilities, which
    /// brings its logits there) instead of the edit and sampling kernels.
    #[derive(Clone, Copy, Default)]
    struct How {
        graphs: bool,
        processors: bool,
        host: bool,
    }
    struct Run {
        secs: f64,
        generated: usize,
        prefill: f64,
        texts: Vec<String>,
        replays: u64,
        recorded: u64,
    }
    impl Run {
        /// Requests whose texts equal those of the same requests in `other`.
        fn same_texts(&self, other: &Run) -> usize {
            self.texts
                .iter()
                .zip(&other.texts)
                .filter(|(a, b)| a == b)
                .count()
        }
    }
    // The answer path's logits processors: the citation guide over five passages, no 8-gram
    // twice (their edits run on the GPU beside the sampling kernel).
    let citation_vocab = Arc::new(CitationVocab::new(cfg.vocab_size, |id| {
        String::from_utf8_lossy(text.tokenizer.token_bytes(id)).into_owned()
    }));
    let run = |b: usize, prompt: usize, out: usize, how: How| -> Result<Run> {
        let mut rng = Rng(SplitMix64::new(53 + b as u64));
        let requests: Vec<GenerateRequest> = (0..b)
            .map(|_| {
                let ids = (0..prompt)
                    .map(|_| (rng.next() % cfg.vocab_size as u64) as u32)
                    .collect();
                let mut r = GenerateRequest::new(ids, out);
                r.ignore_eos = true;
                if how.processors {
                    r.processors
                        .push(Box::new(CitationGuide::new(5, citation_vocab.clone(), 3.0)));
                    r.processors.push(Box::new(NoRepeatNgram::new(8)));
                }
                if how.host {
                    r.logprobs = Some(0);
                }
                r
            })
            .collect();
        let cache = KvCache::with_tokens(&cfg, b * (prompt + out + 32));
        let sched = SchedulerConfig {
            max_running: b,
            max_batch_tokens,
            cuda_graphs: how.graphs,
        };
        let stats = EngineStats::default();
        dev.synchronize()?;
        let started = Instant::now();
        let results = run_offline(model, &text, sched, cache, requests, &stats)?;
        let secs = started.elapsed().as_secs_f64();
        let prefill = results
            .iter()
            .map(|r| r.stats.prefill.as_secs_f64())
            .sum::<f64>()
            / b as f64;
        Ok(Run {
            secs,
            generated: results.iter().map(|r| r.stats.generated_tokens).sum(),
            prefill,
            texts: results.into_iter().map(|r| r.text).collect(),
            replays: stats.graph_replays.load(Ordering::Relaxed),
            recorded: stats.graphs_recorded.load(Ordering::Relaxed),
        })
    };
    // Loads the kernels and warms cuBLAS and the memory pool before timing.
    run(2, 16, 4, How::default())?;
    for &b in batches {
        let plain = run(b, prompt, out, How::default())?;
        let graphs = match run(
            b,
            prompt,
            out,
            How {
                graphs: true,
                ..How::default()
            },
        ) {
            Ok(g) => Some(g),
            Err(e) => {
                println!("ENGINE\t{name} dummy Q4_1 (output Q8_0)\tbatch={b} prompt={prompt} out={out}, CUDA graphs\tERROR {e:#}");
                None
            }
        };
        for (r, how) in
            std::iter::once((&plain, "")).chain(graphs.iter().map(|g| (g, ", CUDA graphs")))
        {
            if r.generated != b * out {
                bail!("{} tokens generated of {}", r.generated, b * out);
            }
            println!(
                "ENGINE\t{name} dummy Q4_1 (output Q8_0)\tbatch={b} prompt={prompt} out={out}{how}\t{:.1} tok/s\t{:.2} s in all, time to first token {:.1} ms on average; {} steps replayed from {} graphs",
                r.generated as f64 / r.secs,
                r.secs,
                r.prefill * 1e3,
                r.replays,
                r.recorded
            );
        }
        if let Some(g) = &graphs {
            let same = plain.same_texts(g);
            println!(
                "ENGINE\t{name}\tbatch={b}, CUDA graphs against plain steps\t{same} of {b} texts equal\t{:.2}x tok/s",
                plain.secs / g.secs.max(1e-9)
            );
        }
        if (2..=32).contains(&b) {
            // The answer path's processors, their edits on the GPU (at the batch the issue's
            // engine goal names; the device time is short).
            let guided = How {
                processors: true,
                ..How::default()
            };
            let device = run(b, prompt, out, guided)?;
            let host = run(
                b,
                prompt,
                out,
                How {
                    host: true,
                    ..guided
                },
            )?;
            let same = device.same_texts(&host);
            println!(
                "ENGINE\t{name} dummy Q4_1 (output Q8_0)\tbatch={b} prompt={prompt} out={out}, citation guide + no-repeat 8-gram\t{:.1} tok/s\t{:.2}x the plain run's time; processors on the host: {:.1} tok/s, {same} of {b} texts equal (must be all)",
                device.generated as f64 / device.secs,
                device.secs / plain.secs.max(1e-9),
                host.generated as f64 / host.secs
            );
            if same != b {
                println!("PARITY\tengine processors {name}\tbatch={b}: {same} of {b} texts equal between the GPU edit path and the host\tFAIL");
            }
        }
    }
    Ok(())
}

/// Decode steps through the engine's CUDA graphs ([`DecodeGraphs`]) against plain forward
/// passes: `b` sequences prefilled with `prompt` tokens into two caches alike; one graph step
/// (recording the shape) and one replayed step, the replayed step's logits compared with the
/// plain pass's at the same position (the same tokens go to both); then `steps` plain steps
/// and `steps` replayed steps timed, each with its argmax read back. Prints one GRAPH line; an
/// error is reported there and ends only this experiment.
pub(crate) fn graph_rates(
    dev: &Device,
    name: &str,
    model: &Llama,
    b: usize,
    prompt: usize,
    steps: usize,
) -> Result<()> {
    match graph_run(dev, model, b, prompt, steps) {
        Ok((diff, plain_ms, graph_ms)) => println!(
            "GRAPH\t{name}\tbatch={b} prompt={prompt}\t{graph_ms:.3} ms/step replayed\tplain {plain_ms:.3} ms/step ({:.2}x); replayed step's logits vs plain: max difference {diff:.2e} of the largest",
            plain_ms / graph_ms.max(1e-9)
        ),
        Err(e) => println!("GRAPH\t{name}\tbatch={b} prompt={prompt}\tERROR {e:#}"),
    }
    Ok(())
}

/// [`graph_rates`]' run: (largest logit difference over the largest logit, plain ms/step,
/// replayed ms/step).
fn graph_run(
    dev: &Device,
    model: &Llama,
    b: usize,
    prompt: usize,
    steps: usize,
) -> Result<(f32, f64, f64)> {
    let cfg = model.config();
    let max_len = prompt + 2 * steps + 8;
    let (mut plain, mut graphed) = (
        KvCache::with_tokens(cfg, b * (max_len + 16)),
        KvCache::with_tokens(cfg, b * (max_len + 16)),
    );
    let mut rng = Rng(SplitMix64::new(59));
    let argmax = |t: &Tensor| -> Result<Vec<u32>> {
        Ok(t.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?)
    };
    let mut last = Vec::with_capacity(b);
    for s in 0..b {
        let toks: Vec<u32> = (0..prompt)
            .map(|_| (rng.next() % cfg.vocab_size as u64) as u32)
            .collect();
        let mut batch = Batch::new();
        batch.push(s as u64, &toks, 0);
        last.push(argmax(&model.forward(&batch, &mut plain, LogitsAt::LastOfEach)?)?[0]);
        model.forward(&batch, &mut graphed, LogitsAt::LastOfEach)?;
    }
    let step_batch = |last: &[u32], pos: usize| {
        let mut batch = Batch::new();
        for (s, &t) in last.iter().enumerate() {
            batch.push(s as u64, &[t], pos);
        }
        batch
    };
    let mut graphs = DecodeGraphs::new(b, b.max(prompt));
    let mut graph_step = |batch: &Batch, cache: &mut KvCache| -> Result<Tensor> {
        graphs
            .forward(model, batch, cache)?
            .context("no decode graph took the batch")
    };
    // The recording step, then a replayed one beside the plain pass at the same position.
    let mut pos = prompt;
    let mut diff = 0f32;
    for _ in 0..2 {
        let batch = step_batch(&last, pos);
        let want = model.forward(&batch, &mut plain, LogitsAt::LastOfEach)?;
        let got = graph_step(&batch, &mut graphed)?;
        let w = want.flatten_all()?.to_vec1::<f32>()?;
        let g = got.flatten_all()?.to_vec1::<f32>()?;
        let mut m = RowsMatch::default();
        m.add(&w, &g, cfg.vocab_size);
        diff = m.worst;
        last = argmax(&want)?;
        pos += 1;
    }
    // Timed: plain steps on one cache, replayed steps on the other.
    let (start_pos, start_last) = (pos, last.clone());
    dev.synchronize()?;
    let started = Instant::now();
    for _ in 0..steps {
        let batch = step_batch(&last, pos);
        last = argmax(&model.forward(&batch, &mut plain, LogitsAt::LastOfEach)?)?;
        pos += 1;
    }
    let plain_ms = started.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64;
    let (mut pos, mut last) = (start_pos, start_last);
    let started = Instant::now();
    for _ in 0..steps {
        let batch = step_batch(&last, pos);
        last = argmax(&graph_step(&batch, &mut graphed)?)?;
        pos += 1;
    }
    let graph_ms = started.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64;
    Ok((diff, plain_ms, graph_ms))
}
