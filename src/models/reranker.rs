//! Cross-encoder reranking: a BERT-family encoder with a classification head (the shape in which
//! sentence-transformers `CrossEncoder` rerankers are published: `BertForSequenceClassification`)
//! reads the question and one passage together, `[CLS] question [SEP] passage [SEP]` with segment
//! ids 0 and 1; the first token's hidden state goes through the pooler (dense + tanh) and the
//! classifier, and the first logit is the passage's relevance. Optional: retrieval reranks only
//! when a model folder is given (`--reranker`); none ships with the project.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use tokenizers::{Tokenizer, TruncationParams, TruncationStrategy};

use super::bert::{Bert, BertConfig};
use super::{Batch, Result};
use crate::error::{read_json, ModelError};

/// The number of labels of a classification `config.json` (`num_labels`, else `id2label`'s size,
/// else 1).
#[derive(serde::Deserialize)]
struct Labels {
    num_labels: Option<usize>,
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A loaded cross-encoder.
pub struct CrossEncoder {
    model: Bert,
    pooler: Linear,
    classifier: Linear,
    tokenizer: Tokenizer,
}

impl CrossEncoder {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from `dir` (f32 on the CPU).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg: BertConfig = read_json(&dir.join("config.json"))?;
        let labels: Labels = read_json(&dir.join("config.json"))?;
        let num_labels = labels
            .num_labels
            .or(labels.id2label.map(|m| m.len()))
            .unwrap_or(1)
            .max(1);
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(ModelError::io(
                &weights,
                std::io::Error::new(std::io::ErrorKind::NotFound, "missing"),
            ));
        }
        // SAFETY: the file is memory-mapped read-only and not modified while the model lives.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, device)? };
        let model = Bert::load(vb.clone(), &cfg)?;
        let h = cfg.hidden_size;
        let base = if vb.contains_tensor("pooler.dense.weight") {
            vb.clone()
        } else {
            vb.pp("bert")
        };
        let pooler = candle_nn::linear(h, h, base.pp("pooler.dense"))?;
        let classifier = candle_nn::linear(h, num_labels, vb.pp("classifier"))?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: cfg.max_position_embeddings.min(512),
                strategy: TruncationStrategy::OnlySecond,
                ..Default::default()
            }))
            .map_err(ModelError::tokenizer)?;
        Ok(Self {
            model,
            pooler,
            classifier,
            tokenizer,
        })
    }

    /// Token ids and segment ids of `[CLS] query [SEP] passage [SEP]`, the passage cut to fit.
    pub fn encode(&self, query: &str, passage: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let e = self
            .tokenizer
            .encode((query, passage), true)
            .map_err(ModelError::tokenizer)?;
        Ok((e.get_ids().to_vec(), e.get_type_ids().to_vec()))
    }

    /// Relevance of each encoded pair, all in one packed forward.
    pub fn score_tokens(&self, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<f32>> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        if let Some((ids, types)) = pairs
            .iter()
            .find(|(ids, types)| ids.is_empty() || ids.len() != types.len())
        {
            return Err(ModelError::Invalid(format!(
                "a pair of {} tokens with {} segment ids",
                ids.len(),
                types.len()
            )));
        }
        let ids: Vec<&[u32]> = pairs.iter().map(|(i, _)| i.as_slice()).collect();
        let types: Vec<u32> = pairs.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let batch = Batch::from_sequences(&ids);
        let hidden = self.model.forward_typed(&batch, Some(&types))?;
        // The first token of each sequence.
        let firsts: Vec<u32> = batch.cu_seqlens()[..pairs.len()]
            .iter()
            .map(|&s| s as u32)
            .collect();
        let firsts = Tensor::new(firsts.as_slice(), hidden.device())?;
        let cls = hidden.index_select(&firsts, 0)?;
        let pooled = self.pooler.forward(&cls)?.tanh()?;
        let logits = self.classifier.forward(&pooled)?;
        Ok(logits.narrow(1, 0, 1)?.squeeze(1)?.to_vec1::<f32>()?)
    }

    /// Relevance of each passage to `query`.
    pub fn score(&self, query: &str, passages: &[&str]) -> Result<Vec<f32>> {
        let pairs = passages
            .iter()
            .map(|p| self.encode(query, p))
            .collect::<Result<Vec<_>>>()?;
        self.score_tokens(&pairs)
    }
}
