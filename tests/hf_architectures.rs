//! Hugging Face architectures beyond plain Llama, on tiny seeded random models written as real
//! `config.json` + `model.safetensors`, against logits Python `transformers` computed once for
//! the same weights (`tests/fixtures/hf_<arch>_logits.json`, made by
//! `tests/fixtures/make_hf_logits.py`; see that script for the two commands). CI only reads the
//! fixtures.
//!
//! - `llama3`: Llama 3 rope scaling (`rope_type: llama3`, an original context short enough that
//!   the scaling changes these positions) and `attention_bias` (Q, K, V and output biases);
//! - `mistral`: grouped queries (4 heads on 1 KV head), an explicit `head_dim` other than
//!   `hidden_size / heads`, a sliding window wider than the sequence;
//! - `qwen2`: Q, K and V biases, tied embeddings, `rope_theta` 1e6.
//!
//! Tolerance: our KV cache holds f16, so keys and values are rounded to 11 significant bits
//! before attention; with these weights that moves logits by up to about 1e-3.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use cited::models::kv_cache::KvCache;
use cited::models::llama::{Llama, QuantMode};
use cited::models::{Batch, LogitsAt};
use common::Rng;
use serde_json::{json, Value};

const TOLERANCE: f32 = 5e-3;

struct Arch {
    name: &'static str,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ff: usize,
    tie: bool,
    qkv_bias: bool,
    o_bias: bool,
    config: Value,
}

fn archs() -> Vec<Arch> {
    vec![
        Arch {
            name: "llama3",
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            ff: 96,
            tie: false,
            qkv_bias: true,
            o_bias: true,
            config: json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "attention_bias": true, "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
            }),
        },
        Arch {
            name: "mistral",
            hidden: 64,
            heads: 4,
            kv_heads: 1,
            head_dim: 24,
            ff: 80,
            tie: false,
            qkv_bias: false,
            o_bias: false,
            config: json!({
                "architectures": ["MistralForCausalLM"], "model_type": "mistral",
                "head_dim": 24, "sliding_window": 128, "rope_theta": 10000.0,
            }),
        },
        Arch {
            name: "qwen2",
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            ff: 96,
            tie: true,
            qkv_bias: true,
            o_bias: false,
            config: json!({
                "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "rope_theta": 1000000.0, "use_sliding_window": false, "sliding_window": 32,
                "max_window_layers": 2,
            }),
        },
    ]
}

const VOCAB: usize = 97;
const LAYERS: usize = 2;

impl Arch {
    fn weights(&self, seed: u64) -> HashMap<String, Tensor> {
        let mut rng = Rng::new(seed);
        let (h, ff, hd) = (self.hidden, self.ff, self.head_dim);
        let (q, kv) = (self.heads * hd, self.kv_heads * hd);
        let s = 1.0 / (h as f32).sqrt();
        let mut w = HashMap::new();
        w.insert(
            "model.embed_tokens.weight".to_string(),
            rng.tensor(&[VOCAB, h], 1.0),
        );
        for i in 0..LAYERS {
            let p = format!("model.layers.{i}");
            let mut put = |n: &str, t: Tensor| {
                w.insert(format!("{p}.{n}"), t);
            };
            put(
                "input_layernorm.weight",
                (rng.tensor(&[h], 0.2) + 1.0).unwrap(),
            );
            put("self_attn.q_proj.weight", rng.tensor(&[q, h], s));
            put("self_attn.k_proj.weight", rng.tensor(&[kv, h], s));
            put("self_attn.v_proj.weight", rng.tensor(&[kv, h], s));
            if self.qkv_bias {
                put("self_attn.q_proj.bias", rng.tensor(&[q], 0.5));
                put("self_attn.k_proj.bias", rng.tensor(&[kv], 0.5));
                put("self_attn.v_proj.bias", rng.tensor(&[kv], 0.5));
            }
            put(
                "self_attn.o_proj.weight",
                rng.tensor(&[h, q], 1.0 / (q as f32).sqrt()),
            );
            if self.o_bias {
                put("self_attn.o_proj.bias", rng.tensor(&[h], 0.5));
            }
            put(
                "post_attention_layernorm.weight",
                (rng.tensor(&[h], 0.2) + 1.0).unwrap(),
            );
            put("mlp.gate_proj.weight", rng.tensor(&[ff, h], s));
            put("mlp.up_proj.weight", rng.tensor(&[ff, h], s));
            put(
                "mlp.down_proj.weight",
                rng.tensor(&[h, ff], 1.0 / (ff as f32).sqrt()),
            );
        }
        w.insert(
            "model.norm.weight".to_string(),
            (rng.tensor(&[h], 0.2) + 1.0).unwrap(),
        );
        if !self.tie {
            w.insert("lm_head.weight".to_string(), rng.tensor(&[VOCAB, h], 0.5));
        }
        w
    }

    fn write(&self, dir: &Path, seed: u64) -> f64 {
        let mut cfg = json!({
            "hidden_size": self.hidden, "intermediate_size": self.ff,
            "num_hidden_layers": LAYERS, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 256, "tie_word_embeddings": self.tie,
            "torch_dtype": "float32",
        });
        for (k, v) in self.config.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        let weights = self.weights(seed);
        candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
        weight_sum(&weights)
    }
}

/// Sum of every weight, in f64: ties a fixture to the weights it was computed from.
fn weight_sum(w: &HashMap<String, Tensor>) -> f64 {
    w.values()
        .map(|t| {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|&x| x as f64)
                .sum::<f64>()
        })
        .sum()
}

const SEED: u64 = 77;

fn tokens() -> Vec<u32> {
    Rng::new(3).tokens(40, VOCAB as u32)
}

/// Writes the fixture models into `$CITED_HF_FIXTURE_DIR/<arch>` for the reference script.
#[test]
#[ignore = "run by tests/fixtures/make_hf_logits.py's instructions, not in CI"]
fn write_fixture_models() {
    let root = std::env::var("CITED_HF_FIXTURE_DIR").expect("set CITED_HF_FIXTURE_DIR");
    for a in archs() {
        let sum = a.write(&Path::new(&root).join(a.name), SEED);
        std::fs::write(
            Path::new(&root).join(a.name).join("input.json"),
            json!({"tokens": tokens(), "weight_sum": sum}).to_string(),
        )
        .unwrap();
    }
}

#[test]
fn logits_match_transformers_for_llama3_mistral_and_qwen2() {
    for a in archs() {
        let fixture = common::fixture(&format!("hf_{}_logits.json", a.name));
        let dir = tempfile::tempdir().unwrap();
        let sum = a.write(dir.path(), SEED);
        let want_sum = fixture["weight_sum"].as_f64().unwrap();
        assert!(
            (sum - want_sum).abs() <= 1e-6 * (1.0 + want_sum.abs()),
            "{}: the fixture was computed from other weights ({sum} vs {want_sum})",
            a.name
        );
        let toks: Vec<u32> = serde_json::from_value(fixture["tokens"].clone()).unwrap();
        assert_eq!(toks, tokens());
        let want: Vec<Vec<f32>> = serde_json::from_value(fixture["logits"].clone()).unwrap();

        let model = Llama::from_hf_dir(dir.path(), &Device::Cpu, DType::F32).unwrap();
        let mut cache = KvCache::with_tokens(model.config(), 256);
        let got = model
            .forward(&Batch::from_sequences(&[&toks]), &mut cache, LogitsAt::All)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut worst = 0f32;
        for (g, w) in got.iter().zip(&want) {
            for (x, y) in g.iter().zip(w) {
                worst = worst.max((x - y).abs());
            }
        }
        eprintln!("{}: max logit difference {worst}", a.name);
        assert!(worst < TOLERANCE, "{}: {worst}", a.name);
        // The same model decoded token by token agrees with its own one-pass forward.
        let mut cache = KvCache::with_tokens(model.config(), 256);
        for (i, &t) in toks.iter().enumerate() {
            let mut b = Batch::new();
            b.push(0, &[t], i);
            let row = model
                .forward(&b, &mut cache, LogitsAt::LastOfEach)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (x, y) in row[0].iter().zip(&got[i]) {
                assert!((x - y).abs() < 1e-3, "{} step {i}", a.name);
            }
        }
    }
}

#[test]
fn dummy_weights_follow_the_config_shapes() {
    for a in archs() {
        let dir = tempfile::tempdir().unwrap();
        a.write(dir.path(), SEED);
        let cfg = Llama::read_hf_config(&dir.path().join("config.json")).unwrap();
        for mode in [QuantMode::Auto, QuantMode::Dequantized] {
            let m = Llama::dummy(&cfg, &Device::Cpu, mode, 5).unwrap();
            let mut cache = KvCache::with_tokens(m.config(), 64);
            let logits = m
                .forward(
                    &Batch::from_sequences(&[&tokens()[..9]]),
                    &mut cache,
                    LogitsAt::LastOfEach,
                )
                .unwrap();
            assert_eq!(logits.dims(), [1, VOCAB]);
            let v = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()) && v.iter().any(|&x| x != 0.0));
        }
    }
    // The same seed gives the same weights.
    let cfg = {
        let dir = tempfile::tempdir().unwrap();
        archs()[0].write(dir.path(), SEED);
        Llama::read_hf_config(&dir.path().join("config.json")).unwrap()
    };
    let run = || {
        let m = Llama::dummy(&cfg, &Device::Cpu, QuantMode::Dequantized, 9).unwrap();
        let mut cache = KvCache::with_tokens(m.config(), 64);
        m.forward(
            &Batch::from_sequences(&[&tokens()[..5]]),
            &mut cache,
            LogitsAt::LastOfEach,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
    };
    assert_eq!(run(), run());
}

#[test]
fn unsupported_configs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let a = &archs()[0];
    a.write(dir.path(), SEED);
    let path = dir.path().join("config.json");
    let base: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (key, value, mentions) in [
        ("model_type", json!("gemma"), "gemma"),
        (
            "rope_scaling",
            json!({"rope_type": "yarn", "factor": 4.0}),
            "yarn",
        ),
    ] {
        let mut cfg = base.clone();
        cfg[key] = value;
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err = Llama::read_hf_config(&path).unwrap_err().to_string();
        assert!(err.contains(mentions), "{err}");
    }
    // A sliding window caps the context.
    let mut cfg = base.clone();
    cfg["model_type"] = json!("mistral");
    cfg["sliding_window"] = json!(100);
    std::fs::write(&path, cfg.to_string()).unwrap();
    assert_eq!(
        Llama::read_hf_config(&path)
            .unwrap()
            .max_position_embeddings,
        100
    );
}
