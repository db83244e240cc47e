//! Shared helpers of the integration tests: where the fetched models are, and tiny models with
//! seeded random weights written as real files so the real loading paths run.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run models/fetch.sh before the tests",
        path.display()
    );
    path
}

/// The fetched all-MiniLM-L6-v2 folder.
pub fn minilm_dir() -> PathBuf {
    require(repo().join("models/all-minilm-l6-v2/model.safetensors"));
    repo().join("models/all-minilm-l6-v2")
}

/// The fetched SmolLM2-135M-Instruct Q4_1 GGUF.
pub fn smollm2_gguf() -> PathBuf {
    require(repo().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

/// `corpus/` ingested once per test binary into a kept temporary folder; tests only read it.
pub fn corpus_store() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let e = cited::models::bert::Embedder::load(&minilm_dir(), &Device::Cpu).unwrap();
        let mut store = cited::index::store::SqliteStore::open(&dir.join("store.sqlite")).unwrap();
        let r = cited::ingest::ingest_paths(
            &mut store,
            &e,
            &[&repo().join("corpus")],
            &cited::ingest::IngestOptions::default(),
        )
        .unwrap();
        assert!(r.added >= 20, "the starter corpus ingests");
        dir
    })
}

pub fn fixture(name: &str) -> serde_json::Value {
    let path = repo().join("tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Seeded test data, the same on every machine.
pub struct Rng(cited::ops::rng::SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(cited::ops::rng::SplitMix64::new(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % n as u64) as u32
    }

    /// A tensor of the given shape, uniform in [-scale, scale).
    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| self.uniform() * scale).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    pub fn tokens(&mut self, n: usize, vocab: u32) -> Vec<u32> {
        (0..n).map(|_| self.below(vocab)).collect()
    }
}

/// A tiny BERT under Hugging Face names (`config.json` + `model.safetensors`, seeded weights,
/// hidden 32, 2 layers). With `head`: a sequence-classification model (`bert.` prefix, pooler,
/// one-logit classifier) with the MiniLM tokenizer beside it, a tiny cross-encoder.
pub fn write_tiny_bert(dir: &Path, vocab: usize, pos: usize, head: bool) -> serde_json::Value {
    let (h, ff, layers) = (32, 64, 2);
    let cfg = serde_json::json!({
        "vocab_size": vocab, "hidden_size": h, "num_hidden_layers": layers,
        "num_attention_heads": 4, "intermediate_size": ff, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "max_position_embeddings": pos, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "position_embedding_type": "absolute", "model_type": "bert", "num_labels": 1
    });
    let prefix = if head { "bert." } else { "" };
    let mut rng = Rng::new(42);
    let mut w = std::collections::HashMap::new();
    let mut put = |name: &str, shape: &[usize], scale: f32, offset: f32| {
        let name = if name.starts_with("classifier") {
            name.to_string()
        } else {
            format!("{prefix}{name}")
        };
        w.insert(name, (rng.tensor(shape, scale) + offset as f64).unwrap());
    };
    put("embeddings.word_embeddings.weight", &[vocab, h], 1.0, 0.0);
    put("embeddings.position_embeddings.weight", &[pos, h], 0.5, 0.0);
    put("embeddings.token_type_embeddings.weight", &[2, h], 0.5, 0.0);
    put("embeddings.LayerNorm.weight", &[h], 0.1, 1.0);
    put("embeddings.LayerNorm.bias", &[h], 0.1, 0.0);
    for i in 0..layers {
        let p = format!("encoder.layer.{i}");
        for m in ["query", "key", "value"] {
            put(&format!("{p}.attention.self.{m}.weight"), &[h, h], 0.3, 0.0);
            put(&format!("{p}.attention.self.{m}.bias"), &[h], 0.1, 0.0);
        }
        put(
            &format!("{p}.attention.output.dense.weight"),
            &[h, h],
            0.3,
            0.0,
        );
        put(&format!("{p}.attention.output.dense.bias"), &[h], 0.1, 0.0);
        put(
            &format!("{p}.attention.output.LayerNorm.weight"),
            &[h],
            0.1,
            1.0,
        );
        put(
            &format!("{p}.attention.output.LayerNorm.bias"),
            &[h],
            0.1,
            0.0,
        );
        put(
            &format!("{p}.intermediate.dense.weight"),
            &[ff, h],
            0.3,
            0.0,
        );
        put(&format!("{p}.intermediate.dense.bias"), &[ff], 0.1, 0.0);
        put(&format!("{p}.output.dense.weight"), &[h, ff], 0.2, 0.0);
        put(&format!("{p}.output.dense.bias"), &[h], 0.1, 0.0);
        put(&format!("{p}.output.LayerNorm.weight"), &[h], 0.1, 1.0);
        put(&format!("{p}.output.LayerNorm.bias"), &[h], 0.1, 0.0);
    }
    if head {
        put("pooler.dense.weight", &[h, h], 0.3, 0.0);
        put("pooler.dense.bias", &[h], 0.1, 0.0);
        put("classifier.weight", &[1, h], 0.5, 0.0);
        put("classifier.bias", &[1], 0.1, 0.0);
        std::fs::copy(
            minilm_dir().join("tokenizer.json"),
            dir.join("tokenizer.json"),
        )
        .unwrap();
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    cfg
}

/// Shape of a tiny Llama for tests.
#[derive(Clone, Copy, Debug)]
pub struct TinyLlama {
    pub vocab: usize,
    pub hidden: usize,
    pub ff: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tie: bool,
}

impl TinyLlama {
    pub const DEFAULT: Self = Self {
        vocab: 97,
        hidden: 64,
        ff: 96,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        tie: false,
    };

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Seeded weights under Hugging Face names.
    pub fn weights(&self, seed: u64) -> HashMap<String, Tensor> {
        let mut rng = Rng::new(seed);
        let (h, ff, hd) = (self.hidden, self.ff, self.head_dim());
        let mut w = HashMap::new();
        let mut put = |name: String, t: Tensor| {
            w.insert(name, t);
        };
        put(
            "model.embed_tokens.weight".into(),
            rng.tensor(&[self.vocab, h], 1.0),
        );
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            let s = 1.0 / (h as f32).sqrt();
            put(
                format!("{p}.input_layernorm.weight"),
                (rng.tensor(&[h], 0.2) + 1.0).unwrap(),
            );
            put(
                format!("{p}.self_attn.q_proj.weight"),
                rng.tensor(&[self.heads * hd, h], s),
            );
            put(
                format!("{p}.self_attn.k_proj.weight"),
                rng.tensor(&[self.kv_heads * hd, h], s),
            );
            put(
                format!("{p}.self_attn.v_proj.weight"),
                rng.tensor(&[self.kv_heads * hd, h], s),
            );
            put(
                format!("{p}.self_attn.o_proj.weight"),
                rng.tensor(&[h, self.heads * hd], s),
            );
            put(
                format!("{p}.post_attention_layernorm.weight"),
                (rng.tensor(&[h], 0.2) + 1.0).unwrap(),
            );
            put(format!("{p}.mlp.gate_proj.weight"), rng.tensor(&[ff, h], s));
            put(format!("{p}.mlp.up_proj.weight"), rng.tensor(&[ff, h], s));
            put(
                format!("{p}.mlp.down_proj.weight"),
                rng.tensor(&[h, ff], 1.0 / (ff as f32).sqrt()),
            );
        }
        put(
            "model.norm.weight".into(),
            (rng.tensor(&[h], 0.2) + 1.0).unwrap(),
        );
        if !self.tie {
            put("lm_head.weight".into(), rng.tensor(&[self.vocab, h], 0.5));
        }
        w
    }

    /// Writes `config.json` + `model.safetensors` into `dir`.
    pub fn write_hf(&self, dir: &Path, seed: u64) {
        let cfg = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": self.hidden,
            "intermediate_size": self.ff,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 256,
            "tie_word_embeddings": self.tie,
        });
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        candle_core::safetensors::save(&self.weights(seed), dir.join("model.safetensors")).unwrap();
    }

    /// Writes the same weights as a GGUF file the way llama.cpp's converter does: GGUF names, Q
    /// and K rows permuted for interleaved rotary embeddings, matrices stored as `dtype`.
    pub fn write_gguf(&self, path: &Path, seed: u64, dtype: GgmlDType) {
        self.write_gguf_with(path, seed, dtype, Vec::new())
    }

    /// A GGUF that also carries a byte-level BPE tokenizer of 97 tokens: the 94 printable ASCII
    /// characters other than space (ids 0..94), then `<|im_start|>`, `<|im_end|>` and
    /// `<|endoftext|>` as control tokens (94, 95, 96; the last two end a turn). No merges: one
    /// character, one token. Needs `vocab` 97.
    pub fn write_gguf_with_tokenizer(&self, path: &Path, seed: u64, dtype: GgmlDType) {
        assert_eq!(self.vocab, 97);
        let mut tokens: Vec<Value> = (b'!'..=b'~')
            .map(|c| Value::String((c as char).to_string()))
            .collect();
        let mut types = vec![Value::I32(1); tokens.len()];
        for special in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"] {
            tokens.push(Value::String(special.into()));
            types.push(Value::I32(3));
        }
        self.write_gguf_with(
            path,
            seed,
            dtype,
            vec![
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                ("tokenizer.ggml.tokens", Value::Array(tokens)),
                ("tokenizer.ggml.token_type", Value::Array(types)),
                ("tokenizer.ggml.merges", Value::Array(Vec::new())),
                ("tokenizer.ggml.eos_token_id", Value::U32(96)),
            ],
        )
    }

    fn write_gguf_with(&self, path: &Path, seed: u64, dtype: GgmlDType, extra: Vec<(&str, Value)>) {
        let w = self.weights(seed);
        let hd = self.head_dim();
        let permute = |t: &Tensor, heads: usize| {
            let (rows, cols) = t.dims2().unwrap();
            t.reshape((heads, 2, hd / 2, cols))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((rows, cols))
                .unwrap()
        };
        let q = |t: &Tensor, dt: GgmlDType| QTensor::quantize(t, dt).unwrap();
        let mut tensors: Vec<(String, QTensor)> = vec![
            (
                "token_embd.weight".into(),
                q(&w["model.embed_tokens.weight"], dtype),
            ),
            (
                "output_norm.weight".into(),
                q(&w["model.norm.weight"], GgmlDType::F32),
            ),
        ];
        if !self.tie {
            tensors.push(("output.weight".into(), q(&w["lm_head.weight"], dtype)));
        }
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            let b = format!("blk.{i}");
            let get = |n: &str| &w[&format!("{p}.{n}")];
            tensors.extend([
                (
                    format!("{b}.attn_norm.weight"),
                    q(get("input_layernorm.weight"), GgmlDType::F32),
                ),
                (
                    format!("{b}.attn_q.weight"),
                    q(&permute(get("self_attn.q_proj.weight"), self.heads), dtype),
                ),
                (
                    format!("{b}.attn_k.weight"),
                    q(
                        &permute(get("self_attn.k_proj.weight"), self.kv_heads),
                        dtype,
                    ),
                ),
                (
                    format!("{b}.attn_v.weight"),
                    q(get("self_attn.v_proj.weight"), dtype),
                ),
                (
                    format!("{b}.attn_output.weight"),
                    q(get("self_attn.o_proj.weight"), dtype),
                ),
                (
                    format!("{b}.ffn_norm.weight"),
                    q(get("post_attention_layernorm.weight"), GgmlDType::F32),
                ),
                (
                    format!("{b}.ffn_gate.weight"),
                    q(get("mlp.gate_proj.weight"), dtype),
                ),
                (
                    format!("{b}.ffn_up.weight"),
                    q(get("mlp.up_proj.weight"), dtype),
                ),
                (
                    format!("{b}.ffn_down.weight"),
                    q(get("mlp.down_proj.weight"), dtype),
                ),
            ]);
        }
        let u = |v: usize| Value::U32(v as u32);
        let metadata: Vec<(&str, Value)> = vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.embedding_length", u(self.hidden)),
            ("llama.feed_forward_length", u(self.ff)),
            ("llama.block_count", u(self.layers)),
            ("llama.attention.head_count", u(self.heads)),
            ("llama.attention.head_count_kv", u(self.kv_heads)),
            ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
            ("llama.rope.freq_base", Value::F32(10000.0)),
            ("llama.rope.dimension_count", u(hd)),
            ("llama.context_length", u(256)),
        ]
        .into_iter()
        .chain(extra)
        .collect();
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &md, &ts).unwrap();
    }
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
pub mod pdf;
