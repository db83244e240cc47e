//! BERT-family encoders (all-MiniLM-L6-v2 and kin) and the sentence [`Embedder`] built on them:
//! packed variable-length sequences in one forward, mean pooling, L2 normalisation.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;
use tokenizers::{Tokenizer, TruncationParams};

use super::{Batch, Result};
use crate::error::{read_json, ModelError};
use crate::ops::attention::attention;

/// The encoder's feed-forward activation, as named in `config.json`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The exact (erf) GELU that BERT's `"gelu"` means.
    Gelu,
    /// The tanh approximation.
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
    Relu,
}

/// `config.json` of a BERT-family encoder.
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_pos_type")]
    pub position_embedding_type: String,
}

fn default_act() -> Activation {
    Activation::Gelu
}
fn default_type_vocab() -> usize {
    2
}
fn default_ln_eps() -> f64 {
    1e-12
}
fn default_pos_type() -> String {
    "absolute".into()
}

struct BertLayer {
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

/// A BERT encoder: token ids in, one hidden state per token out.
pub struct Bert {
    word: Embedding,
    position: Embedding,
    /// Row 0 of the token-type table: every token is segment A in sentence embedding.
    token_type: Tensor,
    /// The whole token-type table, for pairs (a cross-encoder's segments A and B).
    token_types: Tensor,
    emb_norm: LayerNorm,
    layers: Vec<BertLayer>,
    cfg: BertConfig,
    /// Whether f16 forwards on CUDA go through the fused kernels (`kernels/bert.cu`).
    fused: bool,
    /// Whether the fused path runs the up-projection's bias and activation in the GEMM's
    /// epilogue (cuBLASLt, tanh GELU) instead of a kernel of its own; made on first use.
    #[cfg(feature = "cuda")]
    epilogues: Option<std::sync::OnceLock<Option<crate::ops::bert_fused::Epilogues>>>,
}

fn linear_fused(vb: &VarBuilder, names: &[&str], in_dim: usize, out_dim: usize) -> Result<Linear> {
    let mut ws = Vec::with_capacity(names.len());
    let mut bs = Vec::with_capacity(names.len());
    for name in names {
        let p = vb.pp(*name);
        ws.push(p.get((out_dim, in_dim), "weight")?);
        bs.push(p.get(out_dim, "bias")?);
    }
    Ok(Linear::new(
        Tensor::cat(&ws, 0)?,
        Some(Tensor::cat(&bs, 0)?),
    ))
}

impl Bert {
    /// Loads the encoder from a var builder over `model.safetensors` (with or without the
    /// `bert.` prefix).
    pub fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        if cfg.position_embedding_type != "absolute" {
            return Err(ModelError::Unsupported(format!(
                "position_embedding_type {:?}",
                cfg.position_embedding_type
            )));
        }
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(ModelError::Unsupported(format!(
                "hidden_size {} is not a multiple of {} heads",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let word = candle_nn::embedding(cfg.vocab_size, h, emb.pp("word_embeddings"))?;
        let position = candle_nn::embedding(
            cfg.max_position_embeddings,
            h,
            emb.pp("position_embeddings"),
        )?;
        let token_types = emb
            .pp("token_type_embeddings")
            .get((cfg.type_vocab_size, h), "weight")?;
        let token_type = token_types.narrow(0, 0, 1)?;
        let emb_norm = candle_nn::layer_norm(h, cfg.layer_norm_eps, emb.pp("LayerNorm"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let att = l.pp("attention");
                Ok(BertLayer {
                    qkv: linear_fused(&att.pp("self"), &["query", "key", "value"], h, h)?,
                    attn_out: candle_nn::linear(h, h, att.pp("output.dense"))?,
                    attn_norm: candle_nn::layer_norm(
                        h,
                        cfg.layer_norm_eps,
                        att.pp("output.LayerNorm"),
                    )?,
                    intermediate: candle_nn::linear(
                        h,
                        cfg.intermediate_size,
                        l.pp("intermediate.dense"),
                    )?,
                    output: candle_nn::linear(cfg.intermediate_size, h, l.pp("output.dense"))?,
                    out_norm: candle_nn::layer_norm(
                        h,
                        cfg.layer_norm_eps,
                        l.pp("output.LayerNorm"),
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word,
            position,
            token_type,
            token_types,
            emb_norm,
            layers,
            cfg: cfg.clone(),
            fused: true,
            #[cfg(feature = "cuda")]
            epilogues: None,
        })
    }

    /// Runs the fused path's up-projection with its bias and activation in the GEMM's
    /// epilogue (cuBLASLt; off by default). cuBLASLt's GELU is the tanh form, so for a model
    /// with the erf GELU this approximates it (checked against the CPU path by the GPU check).
    #[cfg(feature = "cuda")]
    pub fn set_gemm_epilogue(&mut self, on: bool) {
        self.epilogues = on.then(std::sync::OnceLock::new);
    }

    /// Turns the fused CUDA layer off or on (on by default; it applies to f16 on CUDA only), so
    /// the unfused path can be compared and timed on the same weights.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.token_type.device()
    }

    /// Hidden states of every packed token, `(num_tokens, hidden)`. Each sequence attends only to
    /// itself; there is no padding to mask.
    pub fn forward(&self, batch: &Batch) -> Result<Tensor> {
        self.forward_typed(batch, None)
    }

    /// [`Bert::forward`] with a segment id per token (`None`: all segment 0).
    pub fn forward_typed(&self, batch: &Batch, types: Option<&[u32]>) -> Result<Tensor> {
        let dev = self.device();
        if let Some(&p) = batch.positions().iter().max() {
            if p as usize >= self.cfg.max_position_embeddings {
                return Err(ModelError::Invalid(format!(
                    "position {p} beyond the encoder's {} positions",
                    self.cfg.max_position_embeddings
                )));
            }
        }
        let n = batch.num_tokens();
        let heads = self.cfg.num_attention_heads;
        let hd = self.cfg.hidden_size / heads;
        let scale = 1.0 / (hd as f64).sqrt();
        #[cfg(feature = "cuda")]
        if types.is_none() {
            if let Some(x) = self.forward_fused(batch)? {
                return Ok(x);
            }
        }
        let ids = Tensor::new(batch.input_ids(), dev)?;
        let pos = Tensor::new(batch.positions(), dev)?;
        // (n, hidden)
        let x = self
            .word
            .forward(&ids)?
            .add(&self.position.forward(&pos)?)?;
        let x = match types {
            None => x.broadcast_add(&self.token_type)?,
            Some(t) => {
                if t.len() != n || t.iter().any(|&s| s as usize >= self.cfg.type_vocab_size) {
                    return Err(ModelError::Invalid(format!(
                        "{} segment ids for {n} tokens, each below {}",
                        t.len(),
                        self.cfg.type_vocab_size
                    )));
                }
                x.add(&self.token_types.index_select(&Tensor::new(t, dev)?, 0)?)?
            }
        };
        let mut x = self.emb_norm.forward(&x)?;
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x)?; // (n, 3 * hidden)
            let split = |i: usize| -> Result<Tensor> {
                // (heads, n, hd)
                Ok(qkv
                    .narrow(1, i * self.cfg.hidden_size, self.cfg.hidden_size)?
                    .reshape((n, heads, hd))?
                    .transpose(0, 1)?
                    .contiguous()?)
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let mut outs = Vec::with_capacity(batch.num_seqs());
            for (start, len, count) in equal_length_runs(batch) {
                // `count` sequences of `len` tokens side by side: one batched attention with the
                // sequences as extra heads, (count * heads, len, hd).
                let run = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.narrow(1, start, len * count)?
                        .reshape((heads, count, len, hd))?
                        .transpose(0, 1)?
                        .reshape((count * heads, len, hd))?)
                };
                let o = attention(&run(&q)?, &run(&k)?, &run(&v)?, false, scale)?;
                // back to (heads, count * len, hd)
                outs.push(
                    o.reshape((count, heads, len, hd))?
                        .transpose(0, 1)?
                        .reshape((heads, count * len, hd))?,
                );
            }
            // (n, hidden)
            let a = Tensor::cat(&outs, 1)?
                .transpose(0, 1)?
                .reshape((n, self.cfg.hidden_size))?;
            let a = layer.attn_out.forward(&a)?;
            x = layer.attn_norm.forward(&(a + &x)?)?;
            let f = layer.intermediate.forward(&x)?;
            let f = match self.cfg.hidden_act {
                Activation::Gelu => f.gelu_erf()?,
                Activation::GeluNew => f.gelu()?,
                Activation::Relu => f.relu()?,
            };
            let f = layer.output.forward(&f)?;
            x = layer.out_norm.forward(&(f + &x)?)?;
        }
        Ok(x)
    }
}

#[cfg(feature = "cuda")]
impl Bert {
    /// The encoder through the fused CUDA kernels: the embedding lookups and their norm in one
    /// pass, then per layer cuBLAS GEMMs without their bias, attention straight from the QKV
    /// projection, bias + residual + LayerNorm and bias + activation each in one pass (8
    /// launches a layer). `None` where they do not apply (not f16 on CUDA, a shape the kernels
    /// do not take, turned off).
    fn forward_fused(&self, batch: &Batch) -> Result<Option<Tensor>> {
        use crate::ops::bert_fused::{self as fused, Act};
        let cfg = &self.cfg;
        let dtype = self.token_type.dtype();
        if !self.fused
            || !self.device().is_cuda()
            || dtype != DType::F16
            || !fused::supports(
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.intermediate_size,
            )
        {
            return Ok(None);
        }
        let act = match cfg.hidden_act {
            Activation::Gelu => Act::GeluErf,
            Activation::GeluNew => Act::GeluTanh,
            Activation::Relu => Act::Relu,
        };
        fn norm(n: &LayerNorm) -> Option<(&Tensor, &Tensor)> {
            n.bias().map(|b| (n.weight(), b))
        }
        let Some((eg, eb)) = norm(&self.emb_norm) else {
            return Ok(None);
        };
        let eps = cfg.layer_norm_eps;
        let starts: Vec<u32> = batch.cu_seqlens().iter().map(|&s| s as u32).collect();
        let starts = Tensor::new(starts.as_slice(), self.device())?;
        let longest = (0..batch.num_seqs())
            .map(|i| batch.seq_range(i).len())
            .max()
            .unwrap_or(0);
        // Word + segment A (as a bias row) + position, normalised: in one pass where the width
        // allows, else gathered by candle and normalised by the fused norm.
        let mut x = if fused::embed_norm_fits(cfg.hidden_size) {
            fused::embed_norm(
                batch.input_ids(),
                batch.positions(),
                self.word.embeddings(),
                self.position.embeddings(),
                &self.token_type,
                eg,
                eb,
                eps,
            )?
        } else {
            let dev = self.device();
            let word = self.word.forward(&Tensor::new(batch.input_ids(), dev)?)?;
            let position = self
                .position
                .forward(&Tensor::new(batch.positions(), dev)?)?;
            fused::add_norm(&word, &self.token_type, &position, eg, eb, eps)?
        };
        for layer in &self.layers {
            let (Some(bqkv), Some(bo), Some(bi), Some(bf), Some((ag, ab)), Some((og, ob))) = (
                layer.qkv.bias(),
                layer.attn_out.bias(),
                layer.intermediate.bias(),
                layer.output.bias(),
                norm(&layer.attn_norm),
                norm(&layer.out_norm),
            ) else {
                return Ok(None);
            };
            let qkv = x.matmul(&layer.qkv.weight().t()?)?;
            let a = fused::attention(&qkv, bqkv, &starts, longest, cfg.num_attention_heads)?;
            let a = a.matmul(&layer.attn_out.weight().t()?)?;
            x = fused::add_norm(&a, bo, &x, ag, ab, eps)?;
            let f = match self.epilogue_handle(&x) {
                Some(e) => e.linear_act(&x, layer.intermediate.weight(), bi, act)?,
                None => {
                    let f = x.matmul(&layer.intermediate.weight().t()?)?;
                    fused::bias_act(&f, bi, act)?
                }
            };
            let f = f.matmul(&layer.output.weight().t()?)?;
            x = fused::add_norm(&f, bf, &x, og, ob, eps)?;
        }
        Ok(Some(x))
    }
}

impl Bert {
    /// The cuBLASLt handle when the epilogue path is on and a handle could be made (else the
    /// GEMM + bias/activation kernel path runs; a failure to make one is logged once).
    #[cfg(feature = "cuda")]
    fn epilogue_handle(&self, like: &Tensor) -> Option<&crate::ops::bert_fused::Epilogues> {
        self.epilogues
            .as_ref()?
            .get_or_init(|| match crate::ops::bert_fused::Epilogues::new(like) {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(error = %e, "no cuBLASLt: the up-projection keeps its own bias kernel");
                    None
                }
            })
            .as_ref()
    }
}

/// Consecutive sequences of equal length: `(first token, length, how many)`.
fn equal_length_runs(batch: &Batch) -> Vec<(usize, usize, usize)> {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for s in 0..batch.num_seqs() {
        let r = batch.seq_range(s);
        match runs.last_mut() {
            Some((_, len, count)) if *len == r.len() => *count += 1,
            _ => runs.push((r.start, r.len(), 1)),
        }
    }
    runs
}

/// Mean of each sequence's rows, `(num_seqs, hidden)`, from packed `(num_tokens, hidden)`;
/// sequences of equal length side by side are pooled together (one reduction, not one each).
pub fn mean_pool(hidden: &Tensor, batch: &Batch) -> Result<Tensor> {
    let h = hidden.dim(1)?;
    let rows = equal_length_runs(batch)
        .into_iter()
        .map(|(start, len, count)| {
            hidden
                .narrow(0, start, len * count)?
                .reshape((count, len, h))?
                .mean(1)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// Unit-norm mean-pooled embeddings (num_seqs, hidden) f32 of an encoder's packed output: one
/// fused kernel for f16 on CUDA, else [`mean_pool`] in f32 and [`l2_normalize`] (the reference).
pub fn pooled(hidden: &Tensor, batch: &Batch) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if hidden.device().is_cuda()
        && hidden.dtype() == DType::F16
        && hidden.dim(1)? <= 1024
        && hidden.dim(1)?.is_multiple_of(2)
    {
        let starts: Vec<u32> = batch.cu_seqlens().iter().map(|&s| s as u32).collect();
        return Ok(crate::ops::bert_fused::pool_normalize(hidden, &starts)?);
    }
    let hidden = hidden.to_dtype(DType::F32)?;
    l2_normalize(&mean_pool(&hidden, batch)?)
}

/// Scales each row to unit L2 norm.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// f16 on GPUs, f32 on the CPU (whose f16 arithmetic is emulated and slow).
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::F16
    } else {
        DType::F32
    }
}

#[derive(Deserialize)]
struct SentenceConfig {
    max_seq_length: usize,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
}

/// A sentence embedder: tokenizer + encoder + mean pooling + L2 normalisation.
pub struct Embedder {
    model: Bert,
    tokenizer: Tokenizer,
    /// The same tokenizer without truncation, to measure texts.
    counter: Tokenizer,
    max_tokens: usize,
    identity: String,
}

impl Embedder {
    /// Loads a sentence-transformers folder: `config.json`, `model.safetensors`, `tokenizer.json`,
    /// and when present `sentence_bert_config.json` (the token limit) and `1_Pooling/config.json`
    /// (which must ask for mean pooling).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with_dtype(dir, device, default_dtype(device))
    }

    /// As [`Self::load`], with the weights and activations in `dtype`.
    pub fn load_with_dtype(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg: BertConfig = read_json(&dir.join("config.json"))?;
        let pooling = dir.join("1_Pooling/config.json");
        if pooling.exists() {
            let p: PoolingConfig = read_json(&pooling)?;
            if !p.pooling_mode_mean_tokens {
                return Err(ModelError::Unsupported(format!(
                    "{}: only mean pooling is implemented",
                    pooling.display()
                )));
            }
        }
        let st = dir.join("sentence_bert_config.json");
        let max_tokens = if st.exists() {
            read_json::<SentenceConfig>(&st)?.max_seq_length
        } else {
            cfg.max_position_embeddings
        }
        .min(cfg.max_position_embeddings);
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(ModelError::io(
                &weights,
                std::io::Error::new(std::io::ErrorKind::NotFound, "missing"),
            ));
        }
        // SAFETY: the file is memory-mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, device)? };
        let model = Bert::load(vb, &cfg)?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        // The shipped tokenizer pads and truncates to 128; we pack without padding and truncate at
        // the model's own limit, special tokens included.
        tokenizer.with_padding(None);
        let mut counter = tokenizer.clone();
        counter
            .with_truncation(None)
            .map_err(ModelError::tokenizer)?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(ModelError::tokenizer)?;
        let identity = format!(
            "bert h{} l{} v{} max{}",
            cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, max_tokens
        );
        Ok(Self {
            model,
            tokenizer,
            counter,
            max_tokens,
            identity,
        })
    }

    /// What a store records about the embedder its vectors came from: vectors of another
    /// model must not be mixed with them.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Tokens of `text`, special tokens excluded, without truncation.
    pub fn count_tokens(&self, text: &str) -> usize {
        count_with(&self.counter, text)
    }

    /// Token limit per text, special tokens included; longer texts are truncated.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Width of the embedding vectors.
    pub fn dim(&self) -> usize {
        self.model.config().hidden_size
    }

    /// Token ids of each text, with `[CLS]`/`[SEP]`, truncated to [`Self::max_tokens`].
    pub fn tokenize<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        texts
            .iter()
            .map(|t| {
                self.tokenizer
                    .encode(t.as_ref(), true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(ModelError::tokenizer)
            })
            .collect()
    }

    /// Unit-norm embeddings `(n, dim)` of already tokenized texts, all in one forward.
    pub fn embed_tokens(&self, sequences: &[Vec<u32>]) -> Result<Tensor> {
        if sequences.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.dim()),
                DType::F32,
                self.model.device(),
            )?);
        }
        if let Some(s) = sequences
            .iter()
            .find(|s| s.is_empty() || s.len() > self.max_tokens)
        {
            return Err(ModelError::Invalid(format!(
                "a sequence of {} tokens (allowed 1..={})",
                s.len(),
                self.max_tokens
            )));
        }
        let batch = Batch::from_sequences(sequences);
        pooled(&self.model.forward(&batch)?, &batch)
    }

    /// Unit-norm embeddings `(n, dim)` of `texts`, all in one forward.
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Tensor> {
        self.embed_tokens(&self.tokenize(texts)?)
    }
}

/// The embedder's token count, limit and identity, cloned off the model: what ingestion needs
/// where the weights are not (the server's embedder lives on the device worker).
#[derive(Clone)]
pub struct EmbedderText {
    counter: Tokenizer,
    max_tokens: usize,
    identity: String,
}

impl Embedder {
    pub fn text_side(&self) -> EmbedderText {
        EmbedderText {
            counter: self.counter.clone(),
            max_tokens: self.max_tokens,
            identity: self.identity.clone(),
        }
    }
}

impl EmbedderText {
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Token limit per text, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
}

impl crate::ingest::chunker::TokenCounter for EmbedderText {
    fn count(&self, text: &str) -> usize {
        count_with(&self.counter, text)
    }
}

/// Tokens of `text` by a tokenizer without truncation, special tokens excluded.
fn count_with(counter: &Tokenizer, text: &str) -> usize {
    counter
        .encode(text, false)
        .map(|e| e.len())
        .unwrap_or(usize::MAX)
}

impl crate::ingest::chunker::TokenCounter for Embedder {
    fn count(&self, text: &str) -> usize {
        self.count_tokens(text)
    }
}
