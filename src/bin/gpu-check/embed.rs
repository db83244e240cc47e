//! Embeddings: seeded BERT-family models written to disk, fused and unfused f16 parity against
//! the f32 CPU path, the throughput bench and the per-operation profile.

use super::*;

/// An encoder config: vocabulary, hidden size, layers, heads, intermediate size, activation;
/// 512 positions, 2 token types.
pub(crate) fn bert_config(
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

/// MiniLM-shaped BERT config (all-MiniLM-L6-v2's shape).
pub(crate) fn minilm_config() -> BertConfig {
    bert_config(30522, 384, 6, 12, 1536, "gelu")
}

/// A second encoder shape for parity: head dim 64 (the other attention kernel), tanh GELU,
/// hidden 256 (4 heads), 2 layers.
pub(crate) fn wide_head_config() -> BertConfig {
    bert_config(1000, 256, 2, 4, 1024, "gelu_new")
}

/// A third shape: hidden 320 (10 heads of 32, ReLU), a width the 16-byte norm kernels do not
/// take, so the embedding stage and the norms run their other path.
pub(crate) fn odd_width_config() -> BertConfig {
    bert_config(1000, 320, 2, 10, 640, "relu")
}

/// Writes seeded MiniLM-shaped weights as `model.safetensors` in `dir`.
pub(crate) fn write_minilm(dir: &Path) -> Result<BertConfig> {
    write_bert(dir, minilm_config(), 1.0)
}

/// Writes seeded weights of `cfg` as `model.safetensors` in `dir`; `qk_gain` scales the query
/// and key projections (larger: peakier attention).
pub(crate) fn write_bert(dir: &Path, cfg: BertConfig, qk_gain: f32) -> Result<BertConfig> {
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

/// The encoder written in `dir`, in `dtype` on `dev`.
pub(crate) fn load_bert(dir: &Path, cfg: &BertConfig, dev: &Device, dtype: DType) -> Result<Bert> {
    // SAFETY: the file was written by this process and is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], dtype, dev)?
    };
    Ok(Bert::load(vb, cfg)?)
}

/// Pooled, normalised embeddings of `seqs`, one row each.
pub(crate) fn embed(model: &Bert, seqs: &[Vec<u32>]) -> Result<Tensor> {
    let batch = Batch::from_sequences(seqs);
    Ok(pooled(&model.forward(&batch)?, &batch)?)
}

/// `small` (for compute-sanitizer): a few short texts (one and two key chunks, partial query
/// tiles) through the fused path only.
pub(crate) fn embedding_parity(dev: &Device, small: bool) -> Result<bool> {
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
        // Fused, fused with the up-projection's bias and activation in the GEMM epilogue
        // (cuBLASLt), then unfused.
        for (fused, lt) in [(true, false), (true, true), (false, false)] {
            if small && !fused {
                continue;
            }
            gpu.set_fused(fused);
            gpu.set_gemm_epilogue(lt);
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
                match (fused, lt) {
                    (true, true) => "fused+epilogue",
                    (true, false) => "fused",
                    _ => "unfused",
                },
                lengths.len(),
                if pass { "ok" } else { "FAIL" }
            );
        }
    }
    Ok(ok)
}

/// Texts per second of MiniLM-shaped f16 weights at each batch of 128-token texts, for every
/// path of the encoder on the GPU.
pub(crate) fn embed_bench(dev: &Device, batches: &[usize]) -> Result<()> {
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
        // Then the fused path with the up-projection's bias and GELU in the GEMM's epilogue.
        for (fused, keep, lt) in [
            (true, true, false),
            (true, false, false),
            (false, true, false),
            (true, true, true),
        ] {
            model.set_fused(fused);
            model.set_gemm_epilogue(lt);
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
                "EMBED\tcited f16 {}{}{}\tbatch={b}\t{:.3} ms\t{:.0} texts/s",
                if fused { "fused" } else { "unfused" },
                if lt { " + GEMM epilogue" } else { "" },
                if keep { "" } else { ", pool released" },
                med * 1e3,
                b as f64 / med
            );
        }
    }
    Ok(())
}

/// One timed operation of the profile.
type Op<'a> = Box<dyn Fn() -> Result<Tensor> + 'a>;

/// Where one f16 MiniLM forward of `b` texts spends its time: whole forwards with 0, 1 and 6
/// layers, then each candle operation of a layer alone on the same shapes.
pub(crate) fn profile(dev: &Device, b: usize) -> Result<()> {
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
