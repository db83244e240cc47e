//! The GPU check: parity of the CUDA paths against their CPU references, small runs for
//! compute-sanitizer, the similarity kernel variant sweep and the embedding bench. Built by
//! `scripts/gpu-build.sh`, run by `scripts/gpu-check.sh` on a GPU machine.
//!
//! Every result line starts with a tag (`PARITY`, `SWEEP`, `EMBED`) and is tab-separated, so
//! the script can make its table from them.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::{Parser, Subcommand};
use half::f16;

use cited::models::bert::{pooled, Bert, BertConfig};
use cited::models::kv_cache::KvCache;
use cited::models::llama::{Llama, QuantMode};
use cited::models::{Batch, LogitsAt};
use cited::ops::paged_attention::gpu::{Decode, VARIANTS as DECODE_VARIANTS};
use cited::ops::paged_attention::{paged_attention, PagedGeometry, SeqView};
use cited::ops::rng::SplitMix64;
use cited::ops::sampling::gpu::{Row, Step, Variant as SampleVariant};
use cited::ops::sampling::{
    apply_penalties, argmax, draw, kept_tokens, PenaltyEntry, SamplingParams,
};
use cited::ops::similarity::gpu::Search;
use cited::ops::similarity::{compare_hits, topk_cpu};
use cited::ops::similarity_variants::{Variant, VARIANTS};
use cited::ops::{bert_fused, keep_freed_memory};

#[derive(Parser)]
#[command(name = "gpu-check", about = "CUDA parity checks and benches of cited")]
struct Args {
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Similarity top-k and embeddings against the CPU references.
    Parity,
    /// Small runs of every kernel against its reference, for compute-sanitizer.
    Memcheck {
        /// Parts to run (similarity, embeddings, sampling, paged); all when empty.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Time every similarity variant over the benchmark shapes.
    Sweep {
        /// Corpus sizes.
        #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
        n: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "1,32,256")]
        nq: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_value = "10,100")]
        k: Vec<usize>,
        #[arg(long, default_value_t = 384)]
        d: usize,
        /// HBM bandwidth in TB/s for the fraction column (H200 4.8, H100 SXM 3.35).
        #[arg(long, default_value_t = 4.8)]
        peak_tbs: f64,
    },
    /// Where the time of one f16 embedding forward goes: whole forwards with 0, 1 and 6
    /// layers, and each candle operation of a layer alone on the same shapes.
    Profile {
        #[arg(long, default_value_t = 256)]
        batch: usize,
    },
    /// The generator end to end on the GPU with seeded dummy weights of real model shapes
    /// (`models/configs/`): greedy tokens against the CPU path (f32 weights on both, equal up
    /// to the first near-tie), then decode tokens per second at the given batch sizes (Q4_1
    /// weights, as `--load-format dummy` serves them). The generator still runs its attention
    /// on the host, so this is the baseline the GPU decode path is measured against.
    Generate {
        /// Shapes from `models/configs/` (building Llama-3.2-1B's random weights takes about
        /// half a minute of CPU per copy, so it is not in the default).
        #[arg(long, value_delimiter = ',', default_value = "smollm2-135m")]
        models: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "1,32")]
        batch: Vec<usize>,
        /// Prompt tokens of each timed sequence.
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        /// Timed decode steps.
        #[arg(long, default_value_t = 16)]
        steps: usize,
    },
    /// The sampling kernel against the CPU reference (f32 and bf16 logits, mixed settings,
    /// penalties and bans), then its time per step at the benchmark shapes.
    Sampling {
        /// Rows of the timed batch.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        #[arg(long, value_delimiter = ',', default_value = "32000,151936")]
        vocab: Vec<usize>,
        /// HBM bandwidth in TB/s for the one-pass floor (H200 4.8, H100 SXM 3.35).
        #[arg(long, default_value_t = 4.8)]
        peak_tbs: f64,
        /// Parity only, on small shapes (for compute-sanitizer).
        #[arg(long)]
        small: bool,
    },
    /// Decode attention over the paged cache: time per step and HBM fraction at the benchmark
    /// shapes (Llama-3-8B heads: 32 query, 8 KV, dim 128).
    Attention {
        /// HBM bandwidth in TB/s (H200 4.8, H100 SXM 3.35).
        #[arg(long, default_value_t = 4.8)]
        peak_tbs: f64,
    },
    /// Embeddings per second of MiniLM-shaped random weights in f16, 128-token texts.
    Embed {
        #[arg(long, value_delimiter = ',', default_value = "1,32,256")]
        batch: Vec<usize>,
    },
}

/// Seeded inputs.
struct Rng(SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Roughly normal: the sum of four uniforms, centred and scaled.
    fn normal(&mut self) -> f32 {
        let u: f32 = (0..4).map(|_| self.0.unit()).sum();
        (u - 2.0) * 1.7
    }

    fn halves(&mut self, len: usize) -> Vec<f16> {
        (0..len).map(|_| f16::from_f32(self.normal())).collect()
    }
}

fn to_f32(v: &[f16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// One similarity parity case on every variant that takes its k.
fn similarity_case(
    dev: &Device,
    rng: &mut Rng,
    (nq, n, d, k): (usize, usize, usize, usize),
    rows_per_part: Option<u32>,
) -> Result<bool> {
    let q = rng.halves(nq * d);
    let c = rng.halves(n * d);
    let want = topk_cpu(&to_f32(&q), &c, d, k)?;
    let qt = Tensor::from_vec(q, (nq, d), dev)?;
    let ct = Tensor::from_vec(c, (n, d), dev)?;
    // f32 sums of d products of values near 1: rounding differs by order, well under 1e-3.
    let tol = 2e-3 * (d as f32 / 384.0).sqrt().max(1.0);
    let mut all_ok = true;
    for v in VARIANTS
        .iter()
        .filter(|v| k as u32 <= v.max_k && d as u32 <= v.max_d)
    {
        let run = || -> Result<(u32, std::result::Result<(), String>)> {
            let mut s = Search::new(&qt, &ct, k, Some(v), rows_per_part)?;
            s.poison()?;
            s.launch()?;
            let got = s.read()?;
            Ok((s.rows_per_part(), compare_hits(&got, &want, tol)))
        };
        let (rpp, verdict) = match run() {
            Ok((rpp, verdict)) => (rpp.to_string(), verdict),
            Err(e) => ("?".to_string(), Err(format!("error {e}"))),
        };
        all_ok &= verdict.is_ok();
        println!(
            "PARITY\tsimilarity\t{}\tnq={nq} n={n} d={d} k={k} rows_per_part={rpp}\t{}",
            v.name,
            match &verdict {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("FAIL {e}"),
            }
        );
    }
    Ok(all_ok)
}

fn similarity_parity(dev: &Device, cases: &[(usize, usize, usize, usize)]) -> Result<bool> {
    let mut rng = Rng(SplitMix64::new(20261127));
    let mut ok = true;
    for &case in cases {
        ok &= similarity_case(dev, &mut rng, case, None)?;
    }
    // Many small parts: the merge sees parts * k candidates far beyond shared memory.
    ok &= similarity_case(dev, &mut rng, (5, 40_000, 64, 100), Some(37))?;
    ok &= similarity_case(dev, &mut rng, (2, 9_999, 384, 256), Some(100))?;
    Ok(ok)
}

/// MiniLM-shaped BERT config (all-MiniLM-L6-v2's shape).
/// An encoder config: vocabulary, hidden size, layers, heads, intermediate size, activation;
/// 512 positions, 2 token types.
fn bert_config(
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    intermediate: usize,
    act: &str,
) -> BertConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "intermediate_size": intermediate, "hidden_act": act,
        "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12
    }))
    .expect("valid config")
}

fn minilm_config() -> BertConfig {
    bert_config(30522, 384, 6, 12, 1536, "gelu")
}

/// A second encoder shape for parity: head dim 64 (the other attention kernel), tanh GELU,
/// hidden 256 (4 heads), 2 layers.
fn wide_head_config() -> BertConfig {
    bert_config(1000, 256, 2, 4, 1024, "gelu_new")
}

/// A third shape: hidden 320 (10 heads of 32, ReLU), a width the 16-byte norm kernels do not
/// take, so the embedding stage and the norms run their other path.
fn odd_width_config() -> BertConfig {
    bert_config(1000, 320, 2, 10, 640, "relu")
}

/// Writes seeded MiniLM-shaped weights as `model.safetensors` in `dir`.
fn write_minilm(dir: &Path) -> Result<BertConfig> {
    write_bert(dir, minilm_config(), 1.0)
}

/// Writes seeded weights of `cfg` as `model.safetensors` in `dir`; `qk_gain` scales the query
/// and key projections (larger: peakier attention).
fn write_bert(dir: &Path, cfg: BertConfig, qk_gain: f32) -> Result<BertConfig> {
    let mut rng = Rng(SplitMix64::new(7));
    let h = cfg.hidden_size;
    let mut w = std::collections::HashMap::new();
    let mut put = |name: String, shape: &[usize], scale: f32, offset: f32| -> Result<()> {
        let len: usize = shape.iter().product();
        let data: Vec<f32> = (0..len).map(|_| rng.normal() * scale + offset).collect();
        w.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    };
    put(
        "embeddings.word_embeddings.weight".into(),
        &[cfg.vocab_size, h],
        0.05,
        0.0,
    )?;
    put(
        "embeddings.position_embeddings.weight".into(),
        &[cfg.max_position_embeddings, h],
        0.02,
        0.0,
    )?;
    put(
        "embeddings.token_type_embeddings.weight".into(),
        &[2, h],
        0.02,
        0.0,
    )?;
    put("embeddings.LayerNorm.weight".into(), &[h], 0.02, 1.0)?;
    put("embeddings.LayerNorm.bias".into(), &[h], 0.02, 0.0)?;
    let s = 1.0 / (h as f32).sqrt() / 1.7;
    for i in 0..cfg.num_hidden_layers {
        let p = format!("encoder.layer.{i}");
        for m in ["query", "key", "value"] {
            let gain = if m == "value" { 1.0 } else { qk_gain };
            put(
                format!("{p}.attention.self.{m}.weight"),
                &[h, h],
                s * gain,
                0.0,
            )?;
            put(format!("{p}.attention.self.{m}.bias"), &[h], 0.02, 0.0)?;
        }
        put(
            format!("{p}.attention.output.dense.weight"),
            &[h, h],
            s,
            0.0,
        )?;
        put(format!("{p}.attention.output.dense.bias"), &[h], 0.02, 0.0)?;
        put(
            format!("{p}.attention.output.LayerNorm.weight"),
            &[h],
            0.02,
            1.0,
        )?;
        put(
            format!("{p}.attention.output.LayerNorm.bias"),
            &[h],
            0.02,
            0.0,
        )?;
        put(
            format!("{p}.intermediate.dense.weight"),
            &[cfg.intermediate_size, h],
            s,
            0.0,
        )?;
        put(
            format!("{p}.intermediate.dense.bias"),
            &[cfg.intermediate_size],
            0.02,
            0.0,
        )?;
        put(
            format!("{p}.output.dense.weight"),
            &[h, cfg.intermediate_size],
            s / 2.0,
            0.0,
        )?;
        put(format!("{p}.output.dense.bias"), &[h], 0.02, 0.0)?;
        put(format!("{p}.output.LayerNorm.weight"), &[h], 0.02, 1.0)?;
        put(format!("{p}.output.LayerNorm.bias"), &[h], 0.02, 0.0)?;
    }
    candle_core::safetensors::save(&w, dir.join("model.safetensors"))?;
    Ok(cfg)
}

fn load_bert(dir: &Path, cfg: &BertConfig, dev: &Device, dtype: DType) -> Result<Bert> {
    // SAFETY: the file was written by this process and is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], dtype, dev)?
    };
    Ok(Bert::load(vb, cfg)?)
}

fn embed(model: &Bert, seqs: &[Vec<u32>]) -> Result<Tensor> {
    let batch = Batch::from_sequences(seqs);
    Ok(pooled(&model.forward(&batch)?, &batch)?)
}

/// `small` (for compute-sanitizer): a few short texts (one and two key chunks, partial query
/// tiles) through the fused path only.
fn embedding_parity(dev: &Device, small: bool) -> Result<bool> {
    let mut ok = true;
    for (name, cfg, gain, max_len) in [
        ("minilm", minilm_config(), 1.0, 256),
        ("head-dim-64 gelu-tanh", wide_head_config(), 3.0, 512),
        ("hidden-320 relu", odd_width_config(), 1.0, 256),
    ] {
        let max_len = if small { 130 } else { max_len };
        let dir = tempfile::tempdir()?;
        let cfg = write_bert(dir.path(), cfg, gain)?;
        let cpu = load_bert(dir.path(), &cfg, &Device::Cpu, DType::F32)?;
        let mut gpu = load_bert(dir.path(), &cfg, dev, DType::F16)?;
        let mut rng = Rng(SplitMix64::new(99));
        let mut lengths = vec![
            128usize, 128, 7, 256, 3, 100, 100, 100, 55, 1, 200, 31, 31, 64, 2, 129,
        ];
        if small {
            lengths = vec![1, 7, 64, 65, 130, 3];
        } else if max_len > 256 {
            lengths.extend([512, 300, 65, 63, 511]);
        }
        let seqs: Vec<Vec<u32>> = lengths
            .iter()
            .map(|&l| {
                (0..l)
                    .map(|_| (rng.next() % cfg.vocab_size as u64) as u32)
                    .collect()
            })
            .collect();
        let a = embed(&cpu, &seqs)?.to_vec2::<f32>()?;
        for fused in [true, false] {
            if small && !fused {
                continue;
            }
            gpu.set_fused(fused);
            let b = embed(&gpu, &seqs)?
                .to_device(&Device::Cpu)?
                .to_vec2::<f32>()?;
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>())
                .fold(f32::INFINITY, f32::min);
            let pass = worst >= 0.9999;
            ok &= pass;
            println!(
                "PARITY\tembeddings {name}\tf16-gpu-{}-vs-f32-cpu\t{} texts, lengths 1..{max_len}\t{} (lowest cosine {worst:.6})",
                if fused { "fused" } else { "unfused" },
                lengths.len(),
                if pass { "ok" } else { "FAIL" }
            );
        }
    }
    Ok(ok)
}

fn embed_bench(dev: &Device, batches: &[usize]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = write_minilm(dir.path())?;
    let mut model = load_bert(dir.path(), &cfg, dev, DType::F16)?;
    let mut rng = Rng(SplitMix64::new(5));
    for &b in batches {
        let seqs: Vec<Vec<u32>> = (0..b)
            .map(|_| (0..128).map(|_| (rng.next() % 30522) as u32).collect())
            .collect();
        // The fused path with freed memory kept in the pool (the server's setting) and handed
        // back at each synchronisation (the driver's default), then the candle path.
        for (fused, keep) in [(true, true), (true, false), (false, true)] {
            model.set_fused(fused);
            keep_freed_memory(dev, keep)?;
            embed(&model, &seqs)?; // warm-up
            dev.synchronize()?;
            let mut times = Vec::new();
            let started = Instant::now();
            while times.len() < 5 || (times.len() < 50 && started.elapsed().as_secs_f64() < 2.0) {
                let t = Instant::now();
                let out = embed(&model, &seqs)?;
                dev.synchronize()?;
                times.push(t.elapsed().as_secs_f64());
                drop(out);
            }
            let med = median(times);
            println!(
                "EMBED\tcited f16 {}{}\tbatch={b}\t{:.3} ms\t{:.0} texts/s",
                if fused { "fused" } else { "unfused" },
                if keep { "" } else { ", pool released" },
                med * 1e3,
                b as f64 / med
            );
        }
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median milliseconds of `launch` on `stream`, timed with CUDA events, after one warm-up (module
/// load, first touch); at least 5 runs, up to 30 within `budget_s`.
fn time_launches(
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    budget_s: f64,
    mut launch: impl FnMut() -> Result<()>,
) -> Result<f64> {
    let timing =
        Some(candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    launch()?;
    stream.synchronize()?;
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 5 || (times.len() < 30 && started.elapsed().as_secs_f64() < budget_s) {
        let a = stream.record_event(timing)?;
        launch()?;
        let b = stream.record_event(timing)?;
        times.push(a.elapsed_ms(&b)? as f64);
    }
    Ok(median(times))
}

/// Median milliseconds of the search, timed with CUDA events.
fn time_search(s: &mut Search) -> Result<f64> {
    let stream = s.stream();
    time_launches(&stream, 0.8, || Ok(s.launch()?))
}

fn suits(v: &Variant, nq: usize) -> bool {
    match v.queries_per_block {
        1 => nq <= 32,
        q if q <= 16 => nq <= 256,
        _ => nq >= 8,
    }
}

fn sweep(
    dev: &Device,
    ns: &[usize],
    nqs: &[usize],
    ks: &[usize],
    d: usize,
    peak_tbs: f64,
) -> Result<()> {
    for &n in ns {
        // Generated on the device: a 10^7 x 384 corpus is 7.7 GB in f16.
        let corpus = Tensor::randn(0f32, 1.0, (n, d), dev)?.to_dtype(DType::F16)?;
        let bytes = (n * d * 2) as f64;
        for &nq in nqs {
            let queries = Tensor::randn(0f32, 1.0, (nq, d), dev)?.to_dtype(DType::F16)?;
            for &k in ks {
                for v in VARIANTS
                    .iter()
                    .filter(|v| k as u32 <= v.max_k && d as u32 <= v.max_d && suits(v, nq))
                {
                    let mut base = match Search::new(&queries, &corpus, k, Some(v), None) {
                        Ok(b) => b,
                        Err(e) => {
                            println!("SWEEP\tn={n}\tnq={nq}\tk={k}\t{}\tERROR {e}", v.name);
                            continue;
                        }
                    };
                    let rpp = base.rows_per_part();
                    // The part size is swept on the big corpus only.
                    let options: &[(&str, u32)] = if n >= 5_000_000 {
                        &[("1x", rpp), ("half", (rpp / 2).max(256)), ("2x", rpp * 2)]
                    } else {
                        &[("1x", rpp)]
                    };
                    for &(label, rows) in options {
                        let timed = if label == "1x" {
                            time_search(&mut base)
                        } else {
                            Search::new(&queries, &corpus, k, Some(v), Some(rows))
                                .map_err(anyhow::Error::from)
                                .and_then(|mut s| time_search(&mut s))
                        };
                        let ms = match timed {
                            Ok(ms) => ms,
                            Err(e) => {
                                println!("SWEEP\tn={n}\tnq={nq}\tk={k}\t{}\tERROR {e}", v.name);
                                continue;
                            }
                        };
                        let tbs = bytes / (ms / 1e3) / 1e12;
                        println!(
                            "SWEEP\tn={n}\tnq={nq}\tk={k}\t{}\trows_per_part={rows} ({label})\t{ms:.3} ms\t{tbs:.2} TB/s\t{:.0}% of {peak_tbs} TB/s",
                            v.name,
                            100.0 * tbs / peak_tbs
                        );
                    }
                }
            }
        }
        drop(corpus);
    }
    Ok(())
}

/// One timed operation of the profile.
type Op<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;

/// Median milliseconds of `f` (device synchronised around each run).
fn time_ms(dev: &Device, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut times = Vec::new();
    for _ in 0..15 {
        let t = Instant::now();
        let out = f()?;
        dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        drop(out);
    }
    Ok(median(times))
}

fn profile(dev: &Device, b: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = write_minilm(dir.path())?;
    let mut rng = Rng(SplitMix64::new(5));
    let seqs: Vec<Vec<u32>> = (0..b)
        .map(|_| (0..128).map(|_| (rng.next() % 30522) as u32).collect())
        .collect();
    let batch = Batch::from_sequences(&seqs);
    for layers in [0usize, 1, 6] {
        let mut c = cfg.clone();
        c.num_hidden_layers = layers;
        let mut model = load_bert(dir.path(), &c, dev, DType::F16)?;
        for fused in [true, false] {
            model.set_fused(fused);
            let ms = time_ms(dev, || Ok(model.forward(&batch)?))?;
            let how = if fused { "fused" } else { "unfused" };
            println!("PROFILE\tforward {how}, {layers} layers\tbatch={b}\t{ms:.3} ms");
        }
    }
    let n = b * 128;
    let (h, heads, hd, ff) = (384, 12, 32, 1536);
    let f16 = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(DType::F16)?)
    };
    let x = f16(&[n, h])?;
    let wqkv = f16(&[3 * h, h])?;
    let wup = f16(&[ff, h])?;
    let wdown = f16(&[h, ff])?;
    let up = f16(&[n, ff])?;
    let q = f16(&[b * heads, 128, hd])?;
    let scores = f16(&[b * heads, 128, 128])?;
    let lnw = f16(&[h])?;
    let lnb = f16(&[h])?;
    let packed = f16(&[heads, n, hd])?;
    let qkv = f16(&[n, 3 * h])?;
    let bqkv = f16(&[3 * h])?;
    let bup = f16(&[ff])?;
    let starts: Vec<u32> = (0..=b as u32).map(|i| i * 128).collect();
    let starts = Tensor::new(starts.as_slice(), dev)?;
    let ops: Vec<(&str, Op)> = vec![
        (
            "fused attention (n,1152)->(n,384)",
            Box::new(|| Ok(bert_fused::attention(&qkv, &bqkv, &starts, 128, heads)?)),
        ),
        (
            "fused add_norm (n,384)",
            Box::new(|| Ok(bert_fused::add_norm(&x, &lnb, &x, &lnw, &lnb, 1e-12)?)),
        ),
        (
            "fused bias_gelu (n,1536)",
            Box::new(|| Ok(bert_fused::bias_act(&up, &bup, bert_fused::Act::GeluErf)?)),
        ),
        (
            "matmul qkv (n,384)x(384,1152)",
            Box::new(|| Ok(x.matmul(&wqkv.t()?)?)),
        ),
        (
            "matmul up (n,384)x(384,1536)",
            Box::new(|| Ok(x.matmul(&wup.t()?)?)),
        ),
        (
            "matmul down (n,1536)x(1536,384)",
            Box::new(|| Ok(up.matmul(&wdown.t()?)?)),
        ),
        ("gelu_erf (n,1536)", Box::new(|| Ok(up.gelu_erf()?))),
        (
            "layer_norm (n,384)",
            Box::new(|| Ok(candle_nn::ops::layer_norm(&x, &lnw, &lnb, 1e-12)?)),
        ),
        (
            "softmax (b*12,128,128)",
            Box::new(|| Ok(candle_nn::ops::softmax_last_dim(&scores)?)),
        ),
        ("q k^T (b*12,128,32)", Box::new(|| Ok(q.matmul(&q.t()?)?))),
        (
            "attention op (b*12,128,32)",
            Box::new(|| Ok(cited::ops::attention::attention(&q, &q, &q, false, 0.17)?)),
        ),
        (
            "regroup heads (12,n,32)->(b*12,128,32)",
            Box::new(|| {
                Ok(packed
                    .reshape((heads, b, 128, hd))?
                    .transpose(0, 1)?
                    .reshape((b * heads, 128, hd))?)
            }),
        ),
        ("add (n,384)", Box::new(|| Ok((&x + &x)?))),
    ];
    for (name, op) in ops {
        let ms = time_ms(dev, op)?;
        println!("PROFILE\t{name}\tbatch={b}\t{ms:.3} ms");
    }
    Ok(())
}

/// Block ids `0..n` in a seeded random order (Fisher-Yates), so tables are not contiguous.
fn shuffled_blocks(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    order
}

/// A paged cache holding `lens` positions per sequence in shuffled blocks, random f16 K/V, and
/// one random query row per sequence (stride `width + 8`): (q, k, v, tables).
#[allow(clippy::type_complexity)]
fn paged_inputs(
    rng: &mut Rng,
    g: &PagedGeometry,
    lens: &[usize],
) -> (Vec<f32>, usize, Vec<f16>, Vec<f16>, Vec<Vec<u32>>) {
    let per: Vec<usize> = lens.iter().map(|l| l.div_ceil(g.block_size)).collect();
    let total: usize = per.iter().sum::<usize>() + 3;
    let order = shuffled_blocks(rng, total);
    let mut next = 0;
    let tables: Vec<Vec<u32>> = per
        .iter()
        .map(|&n| {
            let t = order[next..next + n].to_vec();
            next += n;
            t
        })
        .collect();
    let k = rng.halves(total * g.block_elems());
    let v = rng.halves(total * g.block_elems());
    let stride = g.heads * g.head_dim + 8;
    let q: Vec<f32> = (0..lens.len() * stride).map(|_| rng.normal()).collect();
    (q, stride, k, v, tables)
}

/// Decode attention on the GPU against the CPU path (itself tested against the plain candle
/// reference); prints one `PARITY` line per case.
fn paged_parity(dev: &Device, small: bool) -> Result<bool> {
    let mut rng = Rng(SplitMix64::new(29));
    let geo = |heads, kv_heads, head_dim, block_size| PagedGeometry {
        heads,
        kv_heads,
        head_dim,
        block_size,
    };
    // (geometry, context lengths, split length)
    let cases: Vec<(PagedGeometry, Vec<usize>, Option<u32>)> = if small {
        vec![
            (geo(9, 3, 64, 16), vec![1, 17, 40], None),
            (geo(8, 1, 128, 16), vec![33, 5], Some(16)),
        ]
    } else {
        vec![
            (geo(9, 3, 64, 16), vec![1, 17, 300, 1000], None),
            (geo(4, 4, 64, 16), vec![15, 16, 17, 513], None),
            (geo(32, 8, 128, 16), vec![5, 2049, 700], None),
            (geo(32, 8, 128, 16), vec![5, 2049, 700], Some(256)),
            (geo(24, 8, 128, 32), vec![3000, 1, 77], Some(64)),
            (geo(32, 4, 128, 16), vec![4100, 250], None),
            (geo(16, 16, 256, 16), vec![100, 9], None),
            (geo(8, 8, 32, 8), vec![31, 2], None),
        ]
    };
    let mut all_ok = true;
    for (g, lens, split) in cases {
        let (q, stride, k, v, tables) = paged_inputs(&mut rng, &g, &lens);
        let width = g.heads * g.head_dim;
        let scale = 1.0 / (g.head_dim as f32).sqrt();
        let seqs: Vec<SeqView<'_>> = lens
            .iter()
            .enumerate()
            .map(|(s, &len)| SeqView {
                tokens: s..s + 1,
                start: len - 1,
                blocks: &tables[s],
            })
            .collect();
        let mut want = vec![0f32; lens.len() * width];
        paged_attention(&g, &q, stride, &k, &v, &seqs, scale, &mut want)?;
        let qt = Tensor::from_vec(q, (lens.len(), stride), dev)?;
        let n = k.len();
        let kt = Tensor::from_vec(k, n, dev)?;
        let vt = Tensor::from_vec(v, n, dev)?;
        let table_refs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
        let lens32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        for variant in DECODE_VARIANTS {
            if !variant.supports(&g) {
                continue;
            }
            let run = || -> Result<(u32, Vec<f32>)> {
                let mut d = Decode::new(&g, &qt, &kt, &vt, &table_refs, &lens32, scale, split)?
                    .with_variant(variant)?;
                d.poison()?;
                d.launch()?;
                Ok((d.splits(), d.read()?))
            };
            let (verdict, splits) = match run() {
                Ok((splits, got)) => {
                    let diff =
                        got.iter()
                            .zip(&want)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, |m, d| {
                                if d.is_nan() || m.is_nan() {
                                    f32::NAN
                                } else {
                                    m.max(d)
                                }
                            });
                    // f16 K/V read exactly on both sides; f32 sums in another order and __expf.
                    if diff <= 2e-3 {
                        (format!("ok (max diff {diff:.2e})"), splits.to_string())
                    } else {
                        (format!("FAIL (max diff {diff:.2e})"), splits.to_string())
                    }
                }
                Err(e) => (format!("FAIL error {e}"), "?".into()),
            };
            all_ok &= verdict.starts_with("ok");
            println!(
            "PARITY\tpaged decode\theads={} kv={} dim={} block={} lens={lens:?} splits={splits} {variant:?}\t-\t{verdict}",
            g.heads, g.kv_heads, g.head_dim, g.block_size
        );
        }
    }
    Ok(all_ok)
}

/// Time per decode attention step at the shapes, with the HBM fraction of the K/V read.
fn attention_bench(dev: &Device, peak_tbs: f64) -> Result<()> {
    let mut rng = Rng(SplitMix64::new(31));
    let llama8b = PagedGeometry {
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        block_size: 16,
    };
    let smol = PagedGeometry {
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        block_size: 16,
    };
    for (name, g, batch, ctx) in [
        ("llama3-8b heads", llama8b, 64usize, 2048usize),
        ("llama3-8b heads", llama8b, 8, 32768),
        ("smollm2 heads", smol, 64, 2048),
    ] {
        // Blocks in a shuffled order; K, V and queries drawn on the device (their values do
        // not change the time).
        let per = ctx.div_ceil(g.block_size);
        let order = shuffled_blocks(&mut rng, batch * per);
        let tables: Vec<Vec<u32>> = order.chunks(per).map(|c| c.to_vec()).collect();
        let lens = vec![ctx; batch];
        let n = batch * per * g.block_elems();
        let kt = Tensor::randn(0f32, 1.0, n, dev)?.to_dtype(DType::F16)?;
        let vt = Tensor::randn(0f32, 1.0, n, dev)?.to_dtype(DType::F16)?;
        let qt = Tensor::randn(0f32, 1.0, (batch, g.heads * g.head_dim), dev)?;
        let table_refs: Vec<&[u32]> = tables.iter().map(|t| t.as_slice()).collect();
        let lens32: Vec<u32> = lens.iter().map(|&l| l as u32).collect();
        let scale = 1.0 / (g.head_dim as f32).sqrt();
        // Every variant at the default split length and at 256 and 1,024 positions per split.
        for variant in DECODE_VARIANTS.into_iter().filter(|v| v.supports(&g)) {
            for split in [None, Some(256), Some(1024)] {
                let mut d = Decode::new(&g, &qt, &kt, &vt, &table_refs, &lens32, scale, split)?
                    .with_variant(variant)?;
                let stream = d.stream();
                let ms = time_launches(&stream, 1.0, || Ok(d.launch()?))?;
                let bytes = (batch * ctx * g.kv_heads * g.head_dim * 2 * 2) as f64;
                let tbs = bytes / (ms * 1e-3) / 1e12;
                let label = if split.is_none() { " (default)" } else { "" };
                println!(
                    "ATTN\t{name}\tbatch={batch} ctx={ctx} splits={}{label} {variant:?}\t{ms:.3} ms\t{tbs:.2} TB/s\t{:.0}% of {peak_tbs} TB/s",
                    d.splits(),
                    100.0 * tbs / peak_tbs
                );
            }
        }
    }
    Ok(())
}

/// Greedy tokens of one sequence: `steps` tokens after `prompt` (prefilled in one batch), with
/// each step's top-2 logit margin.
fn greedy_run(model: &Llama, prompt: &[u32], steps: usize) -> Result<(Vec<u32>, Vec<f32>)> {
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
fn top2(row: &[f32]) -> (u32, f32) {
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

/// Decode tokens per second of `batch` sequences of `prompt` tokens each (prefilled first,
/// untimed), over `steps` greedy steps of the whole batch.
fn decode_rate(
    model: &Llama,
    dev: &Device,
    batch: usize,
    prompt: usize,
    steps: usize,
) -> Result<f64> {
    let cfg = model.config();
    let mut cache = KvCache::with_tokens(cfg, batch * (prompt + steps + 16));
    let mut rng = Rng(SplitMix64::new(41));
    let mut last = Vec::with_capacity(batch);
    for s in 0..batch {
        let toks: Vec<u32> = (0..prompt)
            .map(|_| (rng.next() % cfg.vocab_size as u64) as u32)
            .collect();
        let mut b = Batch::new();
        b.push(s as u64, &toks, 0);
        let logits = model.forward(&b, &mut cache, LogitsAt::LastOfEach)?;
        last.push(logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?[0]);
    }
    dev.synchronize()?;
    let started = Instant::now();
    for i in 0..steps {
        let mut b = Batch::new();
        for (s, &t) in last.iter().enumerate() {
            b.push(s as u64, &[t], prompt + i);
        }
        let logits = model.forward(&b, &mut cache, LogitsAt::LastOfEach)?;
        last = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
    }
    dev.synchronize()?;
    Ok((batch * steps) as f64 / started.elapsed().as_secs_f64())
}

/// The generator on the GPU: greedy parity with the CPU path, then decode rates.
fn generate_check(
    dev: &Device,
    models: &[String],
    batches: &[usize],
    prompt: usize,
    steps: usize,
) -> Result<bool> {
    let mut ok = true;
    for name in models {
        let cfg = Llama::read_hf_config(Path::new(&format!("models/configs/{name}.json")))?;
        // Parity: f32 weights on both sides (the CPU's 8-bit activation products and candle's
        // CUDA quantized products round differently); equal up to the first step whose top-2
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
        // Rates with Q4_1 weights (the output projection Q8_0).
        let model = Llama::dummy(&cfg, dev, QuantMode::Quantized, 7)?;
        for &b in batches {
            let rate = decode_rate(&model, dev, b, prompt, steps)?;
            println!(
                "GENERATE\t{name} dummy Q4_1\tbatch={b} prompt={prompt} steps={steps}\t{rate:.1} tok/s"
            );
        }
    }
    Ok(ok)
}

/// Settings of parity row `i`: greedy, and every filter alone and together.
fn sampling_params(i: usize, seed: u64) -> SamplingParams {
    let base = SamplingParams {
        temperature: 0.8,
        seed,
        ..SamplingParams::default()
    };
    match i % 10 {
        0 => SamplingParams {
            temperature: 0.0,
            ..base
        },
        // Past the fast variant's 1,024 candidates: its general path.
        8 => SamplingParams {
            top_k: 2000,
            top_p: 0.8,
            ..base
        },
        // A top-p that needs most of the tail: a third pass or the general path.
        9 => SamplingParams {
            top_p: 0.999,
            temperature: 1.5,
            ..base
        },
        1 => base,
        2 => SamplingParams { top_k: 50, ..base },
        3 => SamplingParams { top_p: 0.9, ..base },
        4 => SamplingParams {
            min_p: 0.05,
            temperature: 1.2,
            ..base
        },
        5 => SamplingParams {
            top_k: 40,
            top_p: 0.95,
            min_p: 0.02,
            ..base
        },
        6 => SamplingParams { top_k: 1, ..base },
        7 => SamplingParams {
            top_p: 0.5,
            repetition_penalty: 1.3,
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            temperature: 0.6,
            ..base
        },
        _ => unreachable!("i % 10"),
    }
}

/// Whether a sampled row's GPU token may differ from the CPU's by rounding alone: the top-p cut
/// moves when top-p shifts by 1e-4, or the target lies within 1e-4 of the mass of a boundary
/// of the GPU token.
fn sampling_boundary(row: &[f32], p: &SamplingParams, u: f32, got: u32) -> bool {
    for f in [1.0 - 1e-4, 1.0 + 1e-4] {
        let mut q = p.clone();
        q.top_p = (p.top_p * f).min(1.0);
        if p.top_p < 1.0 && kept_tokens(row, &q).0.len() != kept_tokens(row, p).0.len() {
            return true;
        }
    }
    let (kept, mass) = kept_tokens(row, p);
    let target = u as f64 * mass;
    let mut before = 0.0f64;
    for (id, w) in kept {
        let w = w as f64;
        if id == got {
            let tol = 1e-4 * mass;
            return (target - before).abs() < tol || (target - before - w).abs() < tol;
        }
        before += w;
    }
    false
}

/// The sampling kernel against the CPU reference; prints one `PARITY` line per case.
fn sampling_parity(dev: &Device, small: bool) -> Result<bool> {
    let mut rng = Rng(SplitMix64::new(17));
    let cases: &[(usize, usize)] = if small {
        &[(8, 1000), (5, 3001)]
    } else {
        &[(8, 1000), (16, 32003), (24, 49152), (16, 151936), (3, 7)]
    };
    let mut all_ok = true;
    for &(rows, vocab) in cases {
        for dtype in [DType::F32, DType::BF16] {
            // Rows of roughly normal logits times 3, a few tokens well above, and ties.
            let mut host: Vec<f32> = (0..rows * vocab)
                .map(|i| {
                    let x = rng.normal() * 3.0
                        + if rng.next().is_multiple_of(997) {
                            8.0
                        } else {
                            0.0
                        };
                    if i % 13 == 0 {
                        (x * 4.0).round() / 4.0
                    } else {
                        x
                    }
                })
                .collect();
            if dtype == DType::BF16 {
                host.iter_mut()
                    .for_each(|x| *x = half::bf16::from_f32(*x).to_f32());
            }
            let params: Vec<SamplingParams> =
                (0..rows).map(|i| sampling_params(i, rng.next())).collect();
            let steps: Vec<u64> = (0..rows).map(|_| rng.next() % 1000).collect();
            let penalties: Vec<Vec<PenaltyEntry>> = (0..rows)
                .map(|_| {
                    let mut ids: Vec<u32> = (0..20)
                        .map(|_| (rng.next() % vocab as u64) as u32)
                        .collect();
                    ids.sort_unstable();
                    ids.dedup();
                    ids.into_iter()
                        .map(|id| PenaltyEntry {
                            id,
                            count: 1 + (rng.next() % 4) as u32,
                            recent: rng.next().is_multiple_of(2),
                        })
                        .collect()
                })
                .collect();
            let bans: Vec<Vec<u32>> = (0..rows)
                .map(|_| (0..3).map(|_| (rng.next() % vocab as u64) as u32).collect())
                .collect();
            let reqs: Vec<Row<'_>> = (0..rows)
                .map(|i| Row {
                    params: &params[i],
                    step: steps[i],
                    penalties: &penalties[i],
                    bans: &bans[i],
                })
                .collect();
            let t = Tensor::from_vec(host.clone(), (rows, vocab), dev)?.to_dtype(dtype)?;
            for variant in [SampleVariant::General, SampleVariant::Fast] {
                let mut step = Step::new(&t, &reqs)?.with_variant(variant);
                step.poison()?;
                step.launch()?;
                let got = step.read()?;
                // Row 1 (a seeded draw) alone: the same token as inside the batch.
                let alone = {
                    let mut one = Step::new(&t.narrow(0, 1, 1)?.contiguous()?, &reqs[1..2])?
                        .with_variant(variant);
                    one.poison()?;
                    one.launch()?;
                    one.read()?[0]
                };
                let (mut exact, mut boundary, mut wrong) = (0, 0, Vec::new());
                for i in 0..rows {
                    let mut row = host[i * vocab..(i + 1) * vocab].to_vec();
                    apply_penalties(&mut row, &params[i], &penalties[i], &bans[i]);
                    let p = &params[i];
                    let want = if p.temperature == 0.0 {
                        argmax(&row)
                    } else {
                        argmax(&row).map(|_| draw(&row, p, SplitMix64::unit_at(p.seed, steps[i])))
                    };
                    if got[i] == want {
                        exact += 1;
                    } else if p.temperature > 0.0
                        && got[i].is_some_and(|g| {
                            sampling_boundary(&row, p, SplitMix64::unit_at(p.seed, steps[i]), g)
                        })
                    {
                        boundary += 1;
                    } else {
                        wrong.push(format!(
                            "row {i} ({}): gpu {:?} cpu {want:?}",
                            i % 10,
                            got[i]
                        ));
                    }
                }
                let ok = wrong.is_empty() && alone == got[1];
                all_ok &= ok;
                println!(
                "PARITY\tsampling {variant:?}\t{dtype:?} rows={rows} vocab={vocab}\texact={exact} boundary={boundary}\t{}{}",
                if ok { "ok" } else { "FAIL" },
                if alone == got[1] { String::new() } else { format!(" (row 1 alone {alone:?} vs {:?})", got[1]) },
            );
                for w in wrong.iter().take(5) {
                    println!("PARITY\tsampling {variant:?}\t{w}");
                }
            }
        }
    }
    Ok(all_ok)
}

/// Time per sampling step at `batch` x `vocab`, bf16 and f32 logits, three settings.
fn sampling_bench(dev: &Device, batch: usize, vocabs: &[usize], peak_tbs: f64) -> Result<()> {
    let mut rng = Rng(SplitMix64::new(23));
    let settings = [
        (
            "top_k50_top_p0.9",
            SamplingParams {
                temperature: 0.8,
                top_k: 50,
                top_p: 0.9,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
        (
            "top_p0.95",
            SamplingParams {
                temperature: 0.8,
                top_p: 0.95,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
        (
            "temperature0.8",
            SamplingParams {
                temperature: 0.8,
                seed: 1,
                ..SamplingParams::default()
            },
        ),
        ("greedy", SamplingParams::default()),
    ];
    for &vocab in vocabs {
        let host: Vec<f32> = (0..batch * vocab).map(|_| rng.normal() * 3.0).collect();
        for dtype in [DType::BF16, DType::F32] {
            let t = Tensor::from_vec(host.clone(), (batch, vocab), dev)?.to_dtype(dtype)?;
            for (name, p) in &settings {
                let reqs: Vec<Row<'_>> = (0..batch)
                    .map(|i| Row {
                        params: p,
                        step: i as u64,
                        penalties: &[],
                        bans: &[],
                    })
                    .collect();
                for variant in [SampleVariant::General, SampleVariant::Fast] {
                    let mut step = Step::new(&t, &reqs)?.with_variant(variant);
                    let stream = step.stream();
                    let ms = time_launches(&stream, 1.0, || Ok(step.launch()?))?;
                    let bytes = (batch * vocab * dtype.size_in_bytes()) as f64;
                    let floor_ms = bytes / (peak_tbs * 1e12) * 1e3;
                    println!(
                        "SAMPLE\t{name} {variant:?}\t{dtype:?} batch={batch} vocab={vocab}\t{ms:.3} ms\tone-pass floor {floor_ms:.3} ms ({:.1}%)",
                        100.0 * floor_ms / ms
                    );
                }
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dev = Device::new_cuda(args.device).context("opening the CUDA device")?;
    keep_freed_memory(&dev, true)?;
    match args.command {
        Cmd::Parity => {
            let cases = [
                (1, 1, 8, 1),
                (1, 1000, 8, 10),
                (3, 10_007, 384, 10),
                (17, 50_021, 384, 100),
                (70, 12_345, 392, 37),
                (33, 20_011, 1024, 256),
                (1, 300, 384, 256),
                (2, 100, 16, 256),
                (130, 3_001, 384, 1),
                (33, 5_000, 72, 50),
                (65, 3_000, 200, 128),
                (40, 2_000, 512, 128),
                (33, 4_000, 1024, 256),
            ];
            let a = similarity_parity(&dev, &cases)?;
            let b = embedding_parity(&dev, false)?;
            let c = sampling_parity(&dev, false)?;
            let d = paged_parity(&dev, false)?;
            if !(a && b && c && d) {
                bail!("parity failed");
            }
        }
        Cmd::Memcheck { only } => {
            let part = |p: &str| only.is_empty() || only.iter().any(|o| o == p);
            let mut ok = true;
            if part("similarity") {
                ok &= similarity_parity(&dev, &[(3, 1000, 64, 10), (40, 3000, 128, 50)])?;
            }
            if part("embeddings") {
                ok &= embedding_parity(&dev, true)?;
            }
            if part("sampling") {
                ok &= sampling_parity(&dev, true)?;
            }
            if part("paged") {
                ok &= paged_parity(&dev, true)?;
            }
            if !ok {
                bail!("parity failed under memcheck");
            }
        }
        Cmd::Sweep {
            n,
            nq,
            k,
            d,
            peak_tbs,
        } => sweep(&dev, &n, &nq, &k, d, peak_tbs)?,
        Cmd::Embed { batch } => embed_bench(&dev, &batch)?,
        Cmd::Attention { peak_tbs } => attention_bench(&dev, peak_tbs)?,
        Cmd::Sampling {
            batch,
            vocab,
            peak_tbs,
            small,
        } => {
            let ok = sampling_parity(&dev, small)?;
            if !small {
                sampling_bench(&dev, batch, &vocab, peak_tbs)?;
            }
            if !ok {
                bail!("sampling parity failed");
            }
        }
        Cmd::Profile { batch } => profile(&dev, batch)?,
        Cmd::Generate {
            models,
            batch,
            prompt,
            steps,
        } => {
            if !generate_check(&dev, &models, &batch, prompt, steps)? {
                bail!("generation parity failed");
            }
        }
    }
    Ok(())
}
