//! Llama-family decoders from a GGUF file or a Hugging Face folder (`config.json` +
//! safetensors), run over packed variable-length sequences with a paged KV cache: Llama 2 and 3
//! (with Llama 3's rope scaling and optional attention biases), SmolLM2, Mistral and Qwen2/2.5
//! (biases on the Q, K and V projections). A sliding attention window (Mistral, Qwen2 with
//! `use_sliding_window`) caps the context at the window, inside which attention is exact.
//! [`Llama::dummy`] builds seeded random weights from a `config.json` alone, for benchmarks at
//! real model shapes.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::gguf::GgufFile;
use super::kv_cache::KvCache;
use super::{Batch, LogitsAt, Result};
use crate::error::{read_json, ModelError};
use crate::ops::paged_attention::{paged_attention, PagedGeometry};
use crate::ops::qmatmul::{self, QMatrix};
use crate::ops::rng::SplitMix64;

/// How rotary embeddings pair the dimensions of a head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension `i` pairs with `i + head_dim / 2` (Hugging Face checkpoints).
    #[default]
    Half,
    /// Dimension `2i` pairs with `2i + 1` (GGUF, whose converter permuted Q and K rows to match).
    Interleaved,
}

/// Shape of a Llama-family model, as in a Hugging Face `config.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// `llama` (also when absent), `mistral` or `qwen2`.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Biases on the Q, K, V and output projections (Llama's `attention_bias`).
    #[serde(default)]
    pub attention_bias: bool,
    /// Set when a head is not `hidden_size / num_attention_heads` wide.
    #[serde(default, rename = "head_dim")]
    pub head_dim_override: Option<usize>,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2 applies its window only when this is set.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(skip)]
    pub rope_style: RopeStyle,
}

/// `rope_scaling` of a `config.json`: `linear` (positions divided by `factor`) or `llama3`
/// (long wavelengths divided by `factor`, short ones kept, a smooth blend between).
#[derive(Clone, Debug, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default = "one")]
    pub factor: f64,
    #[serde(default = "one")]
    pub low_freq_factor: f64,
    #[serde(default = "four")]
    pub high_freq_factor: f64,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

impl LlamaConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim_override
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn is_qwen2(&self) -> bool {
        self.model_type.as_deref() == Some("qwen2")
    }

    /// Whether the Q, K and V projections carry biases.
    pub fn qkv_bias(&self) -> bool {
        self.is_qwen2() || self.attention_bias
    }

    /// The inverse frequency of each dimension pair, after `rope_scaling`.
    fn inv_freqs(&self) -> Vec<f32> {
        let hd = self.head_dim();
        // The power in f64, the inverse in f32, as the GGUF oracle (candle's quantized_llama)
        // computes it: a last-bit difference here moves logits through every layer.
        let base: Vec<f64> = (0..hd / 2)
            .map(|i| (1.0 / self.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32) as f64)
            .collect();
        let Some(sc) = &self.rope_scaling else {
            return base.iter().map(|&f| f as f32).collect();
        };
        match sc.rope_type.as_str() {
            "linear" => base.iter().map(|f| (f / sc.factor) as f32).collect(),
            "llama3" => {
                let old = sc
                    .original_max_position_embeddings
                    .unwrap_or(self.max_position_embeddings) as f64;
                let low_wavelen = old / sc.low_freq_factor;
                let high_wavelen = old / sc.high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / sc.factor
                        } else {
                            let smooth = (old / wavelen - sc.low_freq_factor)
                                / (sc.high_freq_factor - sc.low_freq_factor);
                            (1.0 - smooth) * f / sc.factor + smooth * f
                        };
                        scaled as f32
                    })
                    .collect()
            }
            _ => base.iter().map(|&f| f as f32).collect(),
        }
    }

    /// Checks what a Hugging Face `config.json` asks for and caps the context at a sliding
    /// window, inside which attention is exact.
    fn prepare_hf(&mut self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Unsupported(m));
        match self.model_type.as_deref() {
            None | Some("llama") | Some("mistral") | Some("qwen2") => {}
            Some(other) => return bad(format!("model_type `{other}` (llama, mistral, qwen2)")),
        }
        if let Some(sc) = &self.rope_scaling {
            if !matches!(sc.rope_type.as_str(), "default" | "linear" | "llama3") {
                return bad(format!("rope_scaling `{}` (linear, llama3)", sc.rope_type));
            }
        }
        let windowed = match self.model_type.as_deref() {
            Some("qwen2") => self.use_sliding_window.unwrap_or(false),
            _ => true,
        };
        if let (true, Some(w)) = (windowed, self.sliding_window) {
            self.max_position_embeddings = self.max_position_embeddings.min(w);
        }
        self.validate()
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Unsupported(m));
        if self.num_attention_heads == 0
            || (self.head_dim_override.is_none()
                && !self.hidden_size.is_multiple_of(self.num_attention_heads))
        {
            return bad(format!(
                "hidden_size {} over {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "{} heads over {kv} kv heads",
                self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!("odd head_dim {}", self.head_dim()));
        }
        Ok(())
    }

    /// Reads the shape from GGUF metadata (`general.architecture` must be `llama`).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let arch = file.string("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::Unsupported(format!(
                "GGUF architecture `{arch}` (only `llama`)"
            )));
        }
        let key = |k: &str| format!("llama.{k}");
        let heads = file.usize(&key("attention.head_count"))?;
        let hidden = file.usize(&key("embedding_length"))?;
        let vocab_size = match file.usize(&key("vocab_size")) {
            Ok(v) => v,
            Err(_) => file
                .content()
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| ModelError::Gguf("no vocabulary size".into()))?,
        };
        let cfg = Self {
            hidden_size: hidden,
            intermediate_size: file.usize(&key("feed_forward_length"))?,
            num_hidden_layers: file.usize(&key("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: Some(if file.has(&key("attention.head_count_kv")) {
                file.usize(&key("attention.head_count_kv"))?
            } else {
                heads
            }),
            vocab_size,
            rms_norm_eps: file.f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: file.f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            max_position_embeddings: file.usize(&key("context_length")).unwrap_or(4096),
            tie_word_embeddings: !file.has_tensor("output.weight"),
            model_type: None,
            attention_bias: false,
            head_dim_override: None,
            rope_scaling: None,
            sliding_window: None,
            use_sliding_window: None,
            rope_style: RopeStyle::Interleaved,
        };
        cfg.validate()?;
        if file.has(&key("rope.dimension_count"))
            && file.usize(&key("rope.dimension_count"))? != cfg.head_dim()
        {
            return Err(ModelError::Unsupported(
                "partial rotary embeddings (rope.dimension_count != head_dim)".into(),
            ));
        }
        Ok(cfg)
    }
}

/// How GGUF matrices are computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QuantMode {
    /// Products on the quantized blocks (activations quantized to 8 bits on the fly): 4-8x less
    /// memory traffic per token. Q4_1 and Q8_0 matrices run on our AVX-512 VNNI kernels
    /// ([`crate::ops::qmatmul`]) where the CPU has them, other types on candle's. Our kernels
    /// compute each output row the same way whatever else is in the batch, so a request's text
    /// does not depend on the load, its prompt chunking or a cached prefix.
    #[default]
    Quantized,
    /// With our kernels, the same as `Quantized` (they beat candle's f32 GEMM at every row
    /// count). Without them (another CPU, another type), both forms are kept: one-row products
    /// on candle's quantized blocks, larger ones in f32.
    Auto,
    /// Matrices dequantized to f32 once at load; products in f32.
    Dequantized,
}

/// Rows from which [`QuantMode::Auto`] takes the f32 form when our kernels cannot take a
/// matrix: candle's quantized product only wins for a single row.
pub const DENSE_MIN_ROWS: usize = 2;

impl std::str::FromStr for QuantMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "quantized" => Ok(Self::Quantized),
            "dequantized" => Ok(Self::Dequantized),
            other => Err(format!(
                "unknown weight mode `{other}` (auto | quantized | dequantized)"
            )),
        }
    }
}

/// The quantized form of a weight matrix.
enum QuantForm {
    /// Repacked for our AVX-512 VNNI kernels (CPU).
    Ours(QMatrix),
    /// candle's quantized tensor (other types, other CPUs, GPUs).
    Candle(QMatMul),
}

/// A weight matrix `(out, in)` in the forms its [`QuantMode`] keeps (at least one), and its
/// bias if it has one.
struct Proj {
    quantized: Option<QuantForm>,
    dense: Option<QMatMul>,
    /// `(out,)`
    bias: Option<Tensor>,
}

impl Proj {
    fn dense(w: Tensor) -> Self {
        Self {
            quantized: None,
            dense: Some(QMatMul::Tensor(w)),
            bias: None,
        }
    }

    fn with_bias(mut self, bias: Option<Tensor>) -> Self {
        self.bias = bias;
        self
    }

    /// `x` `(rows, in)` -> `(rows, out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.product(x)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// Bytes a one-row product reads: the form it runs on, and the bias.
    fn bytes(&self) -> usize {
        let tensor = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let form = match (&self.quantized, &self.dense) {
            (Some(QuantForm::Ours(m)), _) => m.bytes(),
            (Some(QuantForm::Candle(q)), _) | (None, Some(q)) => match q {
                QMatMul::QTensor(q) => q.storage_size_in_bytes(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => tensor(t),
            },
            (None, None) => 0,
        };
        form + self.bias.as_ref().map_or(0, tensor)
    }

    fn product(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let quantized = match (&self.quantized, &self.dense) {
            (Some(q @ QuantForm::Ours(_)), _) => q,
            (Some(q), Some(d)) => {
                if rows >= DENSE_MIN_ROWS {
                    return Ok(d.forward(x)?);
                }
                q
            }
            (Some(q), None) => q,
            (None, Some(d)) => return Ok(d.forward(x)?),
            (None, None) => unreachable!("a projection keeps at least one form"),
        };
        match quantized {
            QuantForm::Candle(q) => Ok(q.forward(x)?),
            QuantForm::Ours(m) => {
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; rows * m.rows()];
                m.matmul(&xs, rows, &mut out)?;
                Ok(Tensor::from_vec(out, (rows, m.rows()), x.device())?)
            }
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    /// Q, K and V projections stacked: `(heads + 2 kv_heads) * head_dim` output rows.
    wqkv: Proj,
    wo: Proj,
    ffn_norm: Tensor,
    /// Gate and up projections stacked: `2 * intermediate` output rows.
    w_gate_up: Proj,
    w_down: Proj,
}

/// A Llama-family decoder.
pub struct Llama {
    /// `(vocab, hidden)` f32 lookup table.
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Proj,
    /// `(max_positions, head_dim / 2)`, row-major.
    cos_table: Vec<f32>,
    sin_table: Vec<f32>,
    /// The tables as `(max_positions, head_dim / 2)` tensors on a GPU, for its forward pass.
    #[cfg(feature = "cuda")]
    rope_on_device: std::sync::OnceLock<(Tensor, Tensor)>,
    /// Whether prompt chunks attend through the tensor-core prefill kernel on a GPU (else
    /// every token is a row of the decode kernel).
    #[cfg(feature = "cuda")]
    tensor_core_prefill: bool,
    cfg: LlamaConfig,
    device: Device,
}

/// Stacks matrices that share their input into one product (rows of a quantized matrix are
/// independent blocks, so stacking the bytes stacks the rows), in the forms `mode` keeps.
/// `dense` is the f32 form when the caller already holds it (the tied embedding table).
fn stack(
    parts: Vec<QTensor>,
    mode: QuantMode,
    device: &Device,
    dense: Option<&Tensor>,
) -> Result<Proj> {
    let dtype = parts[0].dtype();
    let cols = parts[0].shape().dims2()?.1;
    let same = parts
        .iter()
        .all(|p| p.dtype() == dtype && p.shape().dims2().map(|d| d.1).ok() == Some(cols));
    if !same {
        return Err(ModelError::Unsupported(
            "stacked projections of different types or widths".into(),
        ));
    }
    let float = matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    // candle's CPU dot products of these types take blocks in pairs; other widths would panic
    // there, so such a matrix is kept in f32 only.
    let step = match dtype {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => 2 * dtype.block_size(),
        _ => dtype.block_size(),
    };
    let ours = device.is_cpu() && QMatrix::supports(dtype, cols) && qmatmul::fast_path_available();
    let keep_quantized =
        mode != QuantMode::Dequantized && !float && (ours || cols.is_multiple_of(step));
    // Our kernels win at every row count, so `Auto` needs no f32 copy beside them.
    let keep_dense =
        mode == QuantMode::Dequantized || !keep_quantized || (mode == QuantMode::Auto && !ours);
    let dense = if keep_dense {
        Some(QMatMul::Tensor(match dense {
            Some(t) => t.clone(),
            None => {
                let ts = parts
                    .iter()
                    .map(|p| p.dequantize(device))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&ts, 0)?
            }
        }))
    } else {
        None
    };
    // The parts' blocks end to end: the stacked matrix, `rows` x `cols`.
    let stacked = |parts: &[QTensor]| -> Result<(usize, Vec<u8>)> {
        let rows = parts.iter().map(|p| p.shape().dims()[0]).sum();
        let mut bytes = Vec::new();
        for p in parts {
            bytes.extend_from_slice(&p.data()?);
        }
        Ok((rows, bytes))
    };
    let quantized = if !keep_quantized {
        None
    } else if ours {
        let (rows, bytes) = stacked(&parts)?;
        Some(QuantForm::Ours(QMatrix::from_ggml(
            dtype, rows, cols, &bytes,
        )?))
    } else if parts.len() == 1 {
        Some(QuantForm::Candle(QMatMul::QTensor(Arc::new(
            parts.into_iter().next().unwrap(),
        ))))
    } else {
        let (rows, bytes) = stacked(&parts)?;
        let storage = QStorage::from_data(Cow::Owned(bytes), device, dtype)?;
        Some(QuantForm::Candle(QMatMul::QTensor(Arc::new(QTensor::new(
            storage,
            (rows, cols),
        )?))))
    };
    Ok(Proj {
        quantized,
        dense,
        bias: None,
    })
}

/// Rotary tables `(max_positions, head_dim / 2)`, row-major: cos and sin of each position's
/// angle for each dimension pair.
fn rope_tables(cfg: &LlamaConfig) -> (Vec<f32>, Vec<f32>) {
    let half = cfg.head_dim() / 2;
    let inv = cfg.inv_freqs();
    let mut cos = Vec::with_capacity(cfg.max_position_embeddings * half);
    let mut sin = Vec::with_capacity(cfg.max_position_embeddings * half);
    for p in 0..cfg.max_position_embeddings {
        for f in &inv {
            let angle = p as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
}

impl Llama {
    /// Loads weights from an open GGUF file (`token_embd`, `blk.N.*`, `output_norm`, and
    /// `output` unless the embedding doubles as the output projection).
    pub fn from_gguf(file: &mut GgufFile, device: &Device, mode: QuantMode) -> Result<Self> {
        let cfg = LlamaConfig::from_gguf(file)?;
        let embd = file.tensor("token_embd.weight", device)?;
        let embed = embd.dequantize(device)?;
        let lm_head = if cfg.tie_word_embeddings {
            stack(vec![embd], mode, device, Some(&embed))?
        } else {
            let out = file.tensor("output.weight", device)?;
            stack(vec![out], mode, device, None)?
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let mut t = |name: &str| file.tensor(&format!("blk.{i}.{name}.weight"), device);
            let attn_norm = t("attn_norm")?.dequantize(device)?;
            let wqkv = stack(
                vec![t("attn_q")?, t("attn_k")?, t("attn_v")?],
                mode,
                device,
                None,
            )?;
            let wo = stack(vec![t("attn_output")?], mode, device, None)?;
            let ffn_norm = t("ffn_norm")?.dequantize(device)?;
            let w_gate_up = stack(vec![t("ffn_gate")?, t("ffn_up")?], mode, device, None)?;
            let w_down = stack(vec![t("ffn_down")?], mode, device, None)?;
            layers.push(Layer {
                attn_norm,
                wqkv,
                wo,
                ffn_norm,
                w_gate_up,
                w_down,
            });
        }
        let norm = file
            .tensor("output_norm.weight", device)?
            .dequantize(device)?;
        Self::assemble(cfg, embed, layers, norm, lm_head, device)
    }

    /// Loads a Hugging Face folder: `config.json` and every `*.safetensors` file in it.
    pub fn from_hf_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg = Self::read_hf_config(&dir.join("config.json"))?;
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(ModelError::io(
                dir.join("model.safetensors"),
                std::io::Error::new(std::io::ErrorKind::NotFound, "no *.safetensors"),
            ));
        }
        // SAFETY: the files are memory-mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device)? };
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let (hd, nh, nkv) = (cfg.head_dim(), cfg.num_attention_heads, cfg.num_kv_heads());
        let m = vb.pp("model");
        let embed = m.get((cfg.vocab_size, h), "embed_tokens.weight")?;
        let dense = |ts: Vec<Tensor>| -> Result<Proj> { Ok(Proj::dense(Tensor::cat(&ts, 0)?)) };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = m.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let p = l.pp("mlp");
            layers.push(Layer {
                attn_norm: l.get(h, "input_layernorm.weight")?,
                wqkv: dense(vec![
                    a.get((nh * hd, h), "q_proj.weight")?,
                    a.get((nkv * hd, h), "k_proj.weight")?,
                    a.get((nkv * hd, h), "v_proj.weight")?,
                ])?
                .with_bias(if cfg.qkv_bias() {
                    Some(Tensor::cat(
                        &[
                            a.get(nh * hd, "q_proj.bias")?,
                            a.get(nkv * hd, "k_proj.bias")?,
                            a.get(nkv * hd, "v_proj.bias")?,
                        ],
                        0,
                    )?)
                } else {
                    None
                }),
                wo: dense(vec![a.get((h, nh * hd), "o_proj.weight")?])?.with_bias(
                    if cfg.attention_bias {
                        Some(a.get(h, "o_proj.bias")?)
                    } else {
                        None
                    },
                ),
                ffn_norm: l.get(h, "post_attention_layernorm.weight")?,
                w_gate_up: dense(vec![
                    p.get((ff, h), "gate_proj.weight")?,
                    p.get((ff, h), "up_proj.weight")?,
                ])?,
                w_down: dense(vec![p.get((h, ff), "down_proj.weight")?])?,
            });
        }
        let norm = m.get(h, "norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            Proj::dense(embed.clone())
        } else {
            Proj::dense(vb.get((cfg.vocab_size, h), "lm_head.weight")?)
        };
        Self::assemble(cfg, embed, layers, norm, lm_head, device)
    }

    /// Reads and checks a Hugging Face `config.json`.
    pub fn read_hf_config(path: &Path) -> Result<LlamaConfig> {
        let mut cfg: LlamaConfig = read_json(path)?;
        cfg.rope_style = RopeStyle::Half;
        cfg.prepare_hf()?;
        Ok(cfg)
    }

    /// Seeded random weights of the shape `cfg` (normal, standard deviation 0.02; norms 1),
    /// computed as GGUF weights would be: matrices quantized to Q4_1 (the output projection to
    /// Q8_0) unless `mode` is [`QuantMode::Dequantized`]. For benchmarks at real model shapes
    /// (`--load-format dummy`); the text they produce means nothing. The rotary pairing is the
    /// config's (a `config.json` read by [`Llama::read_hf_config`] pairs halves).
    pub fn dummy(cfg: &LlamaConfig, device: &Device, mode: QuantMode, seed: u64) -> Result<Self> {
        let cfg = cfg.clone();
        cfg.validate()?;
        let mut rng = SplitMix64::new(seed);
        let mut random = |rows: usize, cols: usize| -> Result<Tensor> {
            let mut v = Vec::with_capacity(rows * cols);
            while v.len() < rows * cols {
                // Box-Muller: two normals from two uniforms.
                let (u1, u2) = (rng.unit().max(f32::MIN_POSITIVE), rng.unit());
                let r = (-2.0 * u1.ln()).sqrt() * 0.02;
                let t = 2.0 * std::f32::consts::PI * u2;
                v.push(r * t.cos());
                v.push(r * t.sin());
            }
            v.truncate(rows * cols);
            Ok(Tensor::from_vec(v, (rows, cols), device)?)
        };
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let (hd, nh, nkv) = (cfg.head_dim(), cfg.num_attention_heads, cfg.num_kv_heads());
        let quantizable = |cols: usize| cols.is_multiple_of(GgmlDType::Q4_1.block_size());
        let proj = |parts: Vec<Tensor>, dtype: GgmlDType| -> Result<Proj> {
            let cols = parts[0].dim(1)?;
            if mode == QuantMode::Dequantized || !quantizable(cols) {
                return Ok(Proj::dense(Tensor::cat(&parts, 0)?));
            }
            let qs = parts
                .iter()
                .map(|p| QTensor::quantize(p, dtype))
                .collect::<candle_core::Result<Vec<_>>>()?;
            stack(qs, mode, device, None)
        };
        let ones = Tensor::ones(h, DType::F32, device)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for _ in 0..cfg.num_hidden_layers {
            let qkv = vec![
                random(nh * hd, h)?,
                random(nkv * hd, h)?,
                random(nkv * hd, h)?,
            ];
            let bias = if cfg.qkv_bias() {
                Some(random(1, (nh + 2 * nkv) * hd)?.squeeze(0)?)
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: ones.clone(),
                wqkv: proj(qkv, GgmlDType::Q4_1)?.with_bias(bias),
                wo: proj(vec![random(h, nh * hd)?], GgmlDType::Q4_1)?,
                ffn_norm: ones.clone(),
                w_gate_up: proj(vec![random(ff, h)?, random(ff, h)?], GgmlDType::Q4_1)?,
                w_down: proj(vec![random(h, ff)?], GgmlDType::Q4_1)?,
            });
        }
        let embed = random(cfg.vocab_size, h)?;
        let lm_head = if cfg.tie_word_embeddings {
            proj(vec![embed.clone()], GgmlDType::Q8_0)?
        } else {
            proj(vec![random(cfg.vocab_size, h)?], GgmlDType::Q8_0)?
        };
        Self::assemble(cfg, embed, layers, ones, lm_head, device)
    }

    fn assemble(
        cfg: LlamaConfig,
        embed: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        lm_head: Proj,
        device: &Device,
    ) -> Result<Self> {
        let (cos_table, sin_table) = rope_tables(&cfg);
        Ok(Self {
            embed: embed.to_dtype(DType::F32)?,
            layers,
            norm,
            lm_head,
            cos_table,
            sin_table,
            #[cfg(feature = "cuda")]
            rope_on_device: std::sync::OnceLock::new(),
            #[cfg(feature = "cuda")]
            tensor_core_prefill: false,
            cfg,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Turns the tensor-core prefill kernel on or off for prompt chunks on a GPU (off by
    /// default until measured; pages of 16 positions and head dims 64 or 128 only, else the
    /// decode kernel serves every token either way).
    #[cfg(feature = "cuda")]
    pub fn set_tensor_core_prefill(&mut self, on: bool) {
        self.tensor_core_prefill = on;
    }

    /// Bytes of weights one decode step reads (every projection in the form a one-row product
    /// uses, the norms; the embedding table's one row per token left out): the memory traffic
    /// that bounds decoding at small batch.
    pub fn weight_bytes(&self) -> usize {
        let f32s = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.wqkv.bytes()
                    + l.wo.bytes()
                    + l.w_gate_up.bytes()
                    + l.w_down.bytes()
                    + f32s(&l.attn_norm)
                    + f32s(&l.ffn_norm)
            })
            .sum();
        layers + self.lm_head.bytes() + f32s(&self.norm)
    }

    /// Rotates the heads `first..first + count` of each row of `rows` (stride `stride`) in
    /// place by the angles of the row's position.
    fn rope(&self, rows: &mut [f32], stride: usize, positions: &[u32], first: usize, count: usize) {
        let hd = self.cfg.head_dim();
        let half = hd / 2;
        for (row, &pos) in rows.chunks_mut(stride).zip(positions) {
            let cos = &self.cos_table[pos as usize * half..][..half];
            let sin = &self.sin_table[pos as usize * half..][..half];
            for head in row[first * hd..(first + count) * hd].chunks_mut(hd) {
                for i in 0..half {
                    let (a, b) = match self.cfg.rope_style {
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        RopeStyle::Half => (i, i + half),
                    };
                    let (x0, x1) = (head[a], head[b]);
                    head[a] = x0 * cos[i] - x1 * sin[i];
                    head[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
    }

    /// Runs the batch, extending each sequence's history in `cache`; returns logits
    /// `(rows, vocab)` with one row per sequence (`LastOfEach`) or per token (`All`).
    ///
    /// Each sequence must continue its cached history: its first position equals the number of
    /// tokens cached for it. The cache must have the blocks for the batch's new positions
    /// ([`KvCache::blocks_needed`]); otherwise nothing is computed and an error returned.
    pub fn forward(&self, batch: &Batch, cache: &mut KvCache, at: LogitsAt) -> Result<Tensor> {
        let g = self.check_batch(batch, cache)?;
        cache.reserve(batch)?;
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = &self.device {
            if crate::ops::llama_fused::supports(&g) {
                return self.forward_gpu(cuda, batch, cache, at);
            }
        }
        self.forward_host(batch, cache, at, &g)
    }

    /// Checks that `batch` continues each sequence's history in `cache`, stays within the
    /// model's positions and vocabulary, and that the cache has the model's shape; returns the
    /// cache's geometry.
    fn check_batch(&self, batch: &Batch, cache: &KvCache) -> Result<PagedGeometry> {
        if batch.is_empty() {
            return Err(ModelError::Invalid("empty batch".into()));
        }
        for s in 0..batch.num_seqs() {
            let r = batch.seq_range(s);
            let first = batch.positions()[r.start] as usize;
            let cached = cache.seq_len(batch.seq_id(s));
            if first != cached {
                return Err(ModelError::Invalid(format!(
                    "sequence {} resumes at position {first} but {cached} tokens are cached",
                    batch.seq_id(s)
                )));
            }
            let last = first + r.len();
            if last > self.cfg.max_position_embeddings {
                return Err(ModelError::Invalid(format!(
                    "sequence {} reaches {last} tokens, beyond the model's {}",
                    batch.seq_id(s),
                    self.cfg.max_position_embeddings
                )));
            }
        }
        if let Some(&bad) = batch
            .input_ids()
            .iter()
            .find(|&&t| t as usize >= self.cfg.vocab_size)
        {
            return Err(ModelError::Invalid(format!(
                "token id {bad} outside the vocabulary"
            )));
        }
        let g = *cache.geometry();
        if (g.heads, g.kv_heads, g.head_dim)
            != (
                self.cfg.num_attention_heads,
                self.cfg.num_kv_heads(),
                self.cfg.head_dim(),
            )
        {
            return Err(ModelError::Invalid(format!(
                "a KV cache for {g:?} used with a model of another shape"
            )));
        }
        Ok(g)
    }

    /// [`Llama::forward`] on the host (the CPU, or a GPU whose geometry our kernels do not
    /// take), the batch checked and reserved.
    fn forward_host(
        &self,
        batch: &Batch,
        cache: &mut KvCache,
        at: LogitsAt,
        g: &PagedGeometry,
    ) -> Result<Tensor> {
        let g = *g;
        if cache.on_gpu() {
            return Err(ModelError::Invalid(
                "a KV cache on a GPU used by a model off it".into(),
            ));
        }
        let dev = &self.device;
        let n = batch.num_tokens();
        let (nh, nkv, hd) = (g.heads, g.kv_heads, g.head_dim);
        let eps = self.cfg.rms_norm_eps as f32;
        let scale = 1.0 / (hd as f32).sqrt();
        let stride = (nh + 2 * nkv) * hd;

        let ids = Tensor::new(batch.input_ids(), dev)?;
        let mut x = self.embed.index_select(&ids, 0)?; // (n, hidden)

        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            // (n, (nh + 2 nkv) * hd): each row holds its token's Q heads, K heads, V heads.
            let mut qkv = layer.wqkv.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            self.rope(&mut qkv, stride, batch.positions(), 0, nh + nkv);
            cache.write(li, batch, &qkv, stride, nh * hd, (nh + nkv) * hd)?;
            let mut o = vec![0f32; n * nh * hd];
            let (k, v, seqs) = cache.views(li, batch)?;
            paged_attention(&g, &qkv, stride, k, v, &seqs, scale, &mut o)?;
            let o = Tensor::from_vec(o, (n, nh * hd), dev)?;
            x = self.finish_layer(layer, x, &o)?;
        }
        self.logits(x, batch, at)
    }

    /// The rest of a layer after attention: `x` plus the output projection of the attention
    /// output `o` (n, heads * head_dim), then the gated feed-forward block with its residual.
    fn finish_layer(&self, layer: &Layer, x: Tensor, o: &Tensor) -> Result<Tensor> {
        let ff = self.cfg.intermediate_size;
        let x = (x + layer.wo.forward(o)?)?;
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.cfg.rms_norm_eps as f32)?;
        let gu = layer.w_gate_up.forward(&h)?; // (n, 2 * ff)
        let act = (candle_nn::ops::silu(&gu.narrow(1, 0, ff)?)? * gu.narrow(1, ff, ff)?)?;
        Ok((x + layer.w_down.forward(&act)?)?)
    }

    /// The output norm and projection of the rows `at` picks from the last hidden states.
    fn logits(&self, x: Tensor, batch: &Batch, at: LogitsAt) -> Result<Tensor> {
        let x = match at {
            LogitsAt::All => x,
            LogitsAt::LastOfEach => {
                let last = Tensor::new(batch.last_token_indices(), &self.device)?;
                x.index_select(&last, 0)?
            }
        };
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps as f32)?;
        self.lm_head.forward(&x)
    }

    /// The rotary angle tables on the model's device, made on first use.
    #[cfg(feature = "cuda")]
    fn device_rope_tables(&self) -> Result<&(Tensor, Tensor)> {
        if let Some(t) = self.rope_on_device.get() {
            return Ok(t);
        }
        let half = self.cfg.head_dim() / 2;
        let rows = self.cos_table.len() / half;
        let cos = Tensor::from_slice(&self.cos_table, (rows, half), &self.device)?;
        let sin = Tensor::from_slice(&self.sin_table, (rows, half), &self.device)?;
        Ok(self.rope_on_device.get_or_init(|| (cos, sin)))
    }

    /// [`Llama::forward`] on a CUDA device, the batch checked and reserved: the hidden states
    /// stay on the device; the rotary embedding, the K/V write and attention run as our kernels
    /// (`ops::llama_fused`) over the cache on the device.
    #[cfg(feature = "cuda")]
    fn forward_gpu(
        &self,
        cuda: &candle_core::cuda_backend::CudaDevice,
        batch: &Batch,
        cache: &mut KvCache,
        at: LogitsAt,
    ) -> Result<Tensor> {
        use crate::ops::llama_fused::Step;
        let g = *cache.geometry();
        cache.move_to_device(cuda)?;
        let mut step = {
            let (slots, tables) = cache.token_rows(batch);
            let seqs: Vec<_> = (0..batch.num_seqs()).map(|s| batch.seq_range(s)).collect();
            Step::new(
                cuda,
                &g,
                batch.positions(),
                &slots,
                &tables,
                cache.storage_blocks(),
                &seqs,
                self.tensor_core_prefill,
            )?
        };
        let ids = Tensor::new(batch.input_ids(), &self.device)?;
        let h = self.layers_gpu(&mut step, &ids, cache)?;
        let h = match at {
            LogitsAt::All => h,
            LogitsAt::LastOfEach => {
                let last = Tensor::new(batch.last_token_indices(), &self.device)?;
                h.index_select(&last, 0)?
            }
        };
        self.lm_head.forward(&h)
    }

    /// The layers and the final norm on the GPU from `step`'s rows and the token `ids` (u32 on
    /// the device), uploading nothing: (rows, hidden).
    #[cfg(feature = "cuda")]
    fn layers_gpu(
        &self,
        step: &mut crate::ops::llama_fused::Step,
        ids: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        use crate::ops::llama_fused::{add_norm, silu_mul};
        let g = *cache.geometry();
        let (cos, sin) = self.device_rope_tables()?;
        let interleaved = self.cfg.rope_style == RopeStyle::Interleaved;
        let eps = self.cfg.rms_norm_eps as f32;
        let scale = 1.0 / (g.head_dim as f32).sqrt();
        // (n, hidden)
        let mut x = self.embed.index_select(ids, 0)?;
        // The last block's output, added to the residual stream by the next norm's kernel.
        let mut pending: Option<Tensor> = None;
        for (li, layer) in self.layers.iter().enumerate() {
            let (x1, h) = add_norm(&x, pending.as_ref(), &layer.attn_norm, eps)?;
            let qkv = layer.wqkv.forward(&h)?.contiguous()?;
            let (k, v) = cache.device_layer(li)?;
            let q = step.rope_kv(&qkv, cos, sin, interleaved, k, v)?;
            let o = step.attend(&q, k, v, scale)?;
            let (x2, h) = add_norm(&x1, Some(&layer.wo.forward(&o)?), &layer.ffn_norm, eps)?;
            let act = silu_mul(&layer.w_gate_up.forward(&h)?.contiguous()?)?;
            pending = Some(layer.w_down.forward(&act)?);
            x = x2;
        }
        let (_, h) = add_norm(&x, pending.as_ref(), &self.norm, eps)?;
        Ok(h)
    }

    /// Grows candle's per-device workspaces for quantized products to what a forward pass of
    /// up to `max_tokens` rows needs, by running the widest product (the down projection)
    /// once at up to 8 rows and once at `max_tokens`. Those workspaces only grow, and a grown
    /// one replaces its buffer: a CUDA graph recorded before a larger batch came would keep
    /// the freed one.
    #[cfg(feature = "cuda")]
    pub fn reserve_workspaces(&self, max_tokens: usize) -> Result<()> {
        let Some(layer) = self.layers.first() else {
            return Ok(());
        };
        for rows in [max_tokens.min(8), max_tokens] {
            if rows > 0 {
                let x =
                    Tensor::zeros((rows, self.cfg.intermediate_size), DType::F32, &self.device)?;
                layer.w_down.forward(&x)?;
            }
        }
        Ok(())
    }

    /// Buffers for graph-capturable decode steps of `rows` sequences at contexts up to
    /// `max_len` positions: the rows ([`crate::ops::llama_fused::Step`]) and the token ids (u32)
    /// on the device, which [`Llama::prepare_decode`] fills and
    /// [`Llama::forward_decode_on_device`] reads. Moves `cache` to the device.
    #[cfg(feature = "cuda")]
    pub fn decode_buffers(
        &self,
        cache: &mut KvCache,
        rows: usize,
        max_len: usize,
    ) -> Result<(crate::ops::llama_fused::Step, Tensor)> {
        let Device::Cuda(cuda) = &self.device else {
            return Err(ModelError::Invalid("decode buffers are for a GPU".into()));
        };
        cache.move_to_device(cuda)?;
        let step = crate::ops::llama_fused::Step::with_capacity(
            cuda,
            cache.geometry(),
            rows,
            max_len,
            cache.storage_blocks(),
        )?;
        let ids = Tensor::zeros(rows, DType::U32, &self.device)?;
        Ok((step, ids))
    }

    /// Checks and reserves a decode batch (one token per sequence, at most as many as the
    /// buffers hold) and writes its rows and token ids into the buffers of
    /// [`Llama::decode_buffers`]; rows past the batch's sequences are padding on the cache's
    /// spare block ([`KvCache::padded_decode_rows`]), their logits meaningless.
    #[cfg(feature = "cuda")]
    pub fn prepare_decode(
        &self,
        batch: &Batch,
        cache: &mut KvCache,
        step: &mut crate::ops::llama_fused::Step,
        ids: &Tensor,
    ) -> Result<()> {
        self.check_batch(batch, cache)?;
        let rows = step.tokens();
        if batch.num_tokens() != batch.num_seqs() || batch.num_seqs() > rows {
            return Err(ModelError::Invalid(format!(
                "a decode batch holds one token per sequence, at most {rows}"
            )));
        }
        cache.reserve(batch)?;
        let (positions, slots, tables) = cache.padded_decode_rows(batch, rows)?;
        step.update(&positions, &slots, &tables)?;
        let mut tokens = batch.input_ids().to_vec();
        tokens.resize(rows, 0);
        crate::ops::llama_fused::write_u32(ids, &tokens)?;
        Ok(())
    }

    /// One decode step from the buffers [`Llama::prepare_decode`] filled: the logits of every
    /// row, (rows, vocab). Nothing is uploaded or read back, so the call can be captured in a
    /// CUDA graph and replayed after each `prepare_decode`.
    #[cfg(feature = "cuda")]
    pub fn forward_decode_on_device(
        &self,
        step: &mut crate::ops::llama_fused::Step,
        ids: &Tensor,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let h = self.layers_gpu(step, ids, cache)?;
        self.lm_head.forward(&h)
    }
}
