//! Greedy generation of one sequence: prefill the prompt, then one token per step until an
//! end-of-turn token or the token limit, text streamed through a [`StreamDecoder`].

use std::time::{Duration, Instant};

use candle_core::D;

use crate::models::kv_cache::KvCache;
use crate::models::llama::Llama;
use crate::models::tokenizer::{BpeTokenizer, StreamDecoder};
use crate::models::{Batch, LogitsAt, Result};

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model ended its turn.
    EndOfTurn,
    /// `max_new_tokens` were generated.
    Length,
    /// The client went away.
    Cancelled,
    /// A requested stop string appeared.
    StopString,
}

/// A finished generation with its timings.
#[derive(Clone, Debug)]
pub struct Generation {
    /// Generated ids, the stop token excluded.
    pub tokens: Vec<u32>,
    pub text: String,
    pub prompt_tokens: usize,
    pub stop: StopReason,
    /// Time of the prompt's forward pass (which also yields the first token).
    pub prefill: Duration,
    /// Time of the remaining forward passes, one per further token.
    pub decode: Duration,
}

/// Index of the largest logit of each row of `logits` `(rows, vocab)`.
pub fn argmax_rows(logits: &candle_core::Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// Greedy decoding of `prompt`; `on_text` receives the text as it becomes complete UTF-8.
pub fn generate_greedy(
    model: &Llama,
    tokenizer: &BpeTokenizer,
    prompt: &[u32],
    max_new_tokens: usize,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    const SEQ: u64 = 0;
    let stop_ids = tokenizer.stop_ids();
    let mut cache = KvCache::with_tokens(model.config(), prompt.len() + max_new_tokens);
    let mut decoder = StreamDecoder::new();
    let mut out = Generation {
        tokens: Vec::new(),
        text: String::new(),
        prompt_tokens: prompt.len(),
        stop: StopReason::Length,
        prefill: Duration::ZERO,
        decode: Duration::ZERO,
    };
    if max_new_tokens == 0 {
        return Ok(out);
    }
    let mut batch = Batch::new();
    batch.push(SEQ, prompt, 0);
    let started = Instant::now();
    let mut next = argmax_rows(&model.forward(&batch, &mut cache, LogitsAt::LastOfEach)?)?[0];
    out.prefill = started.elapsed();
    let started = Instant::now();
    loop {
        if stop_ids.contains(&next) {
            out.stop = StopReason::EndOfTurn;
            break;
        }
        out.tokens.push(next);
        let piece = decoder.push(tokenizer, next);
        if !piece.is_empty() {
            on_text(&piece);
            out.text.push_str(&piece);
        }
        if out.tokens.len() == max_new_tokens {
            break;
        }
        let mut batch = Batch::new();
        batch.push(SEQ, &[next], prompt.len() + out.tokens.len() - 1);
        next = argmax_rows(&model.forward(&batch, &mut cache, LogitsAt::LastOfEach)?)?[0];
    }
    out.decode = started.elapsed();
    let rest = decoder.finish();
    if !rest.is_empty() {
        on_text(&rest);
        out.text.push_str(&rest);
    }
    Ok(out)
}
