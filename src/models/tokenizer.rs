//! The generator's tokenizer, built from GGUF metadata (the SmolLM2 package ships no
//! `tokenizer.json`), and a streaming detokenizer that never splits a UTF-8 character.
//!
//! Byte-level BPE from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`; the pre-tokenizer
//! named by `tokenizer.ggml.pre` (`smollm` first isolates every digit, then applies the GPT-2
//! split); control tokens (`token_type` 3, such as `<|im_start|>`) are matched in the text only
//! when the caller asks for special tokens, as llama.cpp does.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::Result;
use crate::error::ModelError;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: u32 = 3;
const TOKEN_TYPE_USER_DEFINED: u32 = 4;

/// Byte-level BPE tokenizer of a Llama-family GGUF.
pub struct BpeTokenizer {
    /// BPE and pre-tokenizer only; special tokens are split out before it sees the text.
    bpe: Tokenizer,
    /// Tokens matched verbatim in text: `(text, id, control)`, longest first.
    specials: Vec<(String, u32, bool)>,
    /// The bytes each token stands for.
    token_bytes: Vec<Vec<u8>>,
    /// Control tokens: never shown to a reader.
    is_control: Vec<bool>,
    /// Vocabulary strings by id, and the reverse map.
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    chat_template: Option<String>,
}

fn meta<'a>(ct: &'a Content, key: &str) -> Result<&'a Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| ModelError::Gguf(format!("missing metadata `{key}`")))
}

fn meta_strings(ct: &Content, key: &str) -> Result<Vec<String>> {
    meta(ct, key)?
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_string()?.clone()))
        .collect()
}

fn meta_u32(ct: &Content, key: &str) -> Option<u32> {
    match ct.metadata.get(key)? {
        Value::U32(v) => Some(*v),
        Value::I32(v) => u32::try_from(*v).ok(),
        Value::U64(v) => u32::try_from(*v).ok(),
        Value::I64(v) => u32::try_from(*v).ok(),
        _ => None,
    }
}

/// GPT-2's reversible map from bytes to printable characters, inverted: char -> byte.
fn unicode_to_byte() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut map = HashMap::with_capacity(256);
    let mut next = 256u32;
    for b in 0..=255u8 {
        let c = if printable(b) {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        map.insert(char::from_u32(c).expect("valid code point"), b);
    }
    map
}

/// The pre-tokenizer llama.cpp applies for `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let gpt2 = ByteLevel::new(false, false, true);
    match pre {
        "gpt2" | "default" => Ok(gpt2.into()),
        "smollm" | "starcoder" | "refact" => {
            let digits = Split::new(
                SplitPattern::Regex(r"\p{N}".into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(ModelError::tokenizer)?;
            Ok(Sequence::new(vec![digits.into(), gpt2.into()]).into())
        }
        other => Err(ModelError::Unsupported(format!(
            "tokenizer pre-tokenizer `{other}` (known: gpt2, smollm)"
        ))),
    }
}

impl BpeTokenizer {
    /// Builds the tokenizer from a GGUF file's metadata.
    pub fn from_gguf(ct: &Content) -> Result<Self> {
        let model = meta(ct, "tokenizer.ggml.model")?.to_string()?;
        if model != "gpt2" {
            return Err(ModelError::Unsupported(format!(
                "tokenizer model `{model}` (only byte-level BPE, `gpt2`)"
            )));
        }
        let tokens = meta_strings(ct, "tokenizer.ggml.tokens")?;
        let merges = meta_strings(ct, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::Gguf(format!("malformed merge `{m}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let types: Vec<u32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()?
                .iter()
                .map(|t| t.to_i32().map(|t| t as u32).or_else(|_| t.to_u32()))
                .collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(ModelError::Gguf(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let pre = match ct.metadata.get("tokenizer.ggml.pre") {
            Some(v) => v.to_string()?.clone(),
            None => "gpt2".to_string(),
        };

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(ModelError::tokenizer)?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));

        let to_byte = unicode_to_byte();
        let mut specials = Vec::new();
        let mut is_control = vec![false; tokens.len()];
        let token_bytes = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .map(|(id, (text, &ty))| {
                if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED {
                    is_control[id] = ty == TOKEN_TYPE_CONTROL;
                    specials.push((text.clone(), id as u32, ty == TOKEN_TYPE_CONTROL));
                    return text.as_bytes().to_vec();
                }
                // A byte-level token maps char by char back to bytes; anything else is kept as text.
                text.chars()
                    .map(|c| to_byte.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| text.as_bytes().to_vec())
            })
            .collect();
        specials.retain(|(t, _, _)| !t.is_empty());
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        let chat_template = match ct.metadata.get("tokenizer.chat_template") {
            Some(v) => Some(v.to_string()?.clone()),
            None => None,
        };
        Ok(Self {
            bpe: tokenizer,
            specials,
            token_bytes,
            is_control,
            ids: tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i as u32))
                .collect(),
            tokens,
            bos: meta_u32(ct, "tokenizer.ggml.bos_token_id"),
            eos: meta_u32(ct, "tokenizer.ggml.eos_token_id"),
            chat_template,
        })
    }

    /// A byte-level tokenizer of `vocab` ids (at least 258) for engines over seeded random
    /// weights with no model file at hand (benchmarks, the GPU check): ids 0-255 are the bytes,
    /// the last id is the end-of-text control token `<|endoftext|>`, and every other id
    /// `n` is the text `t{n}`; no merges, so text encodes byte by byte.
    pub fn synthetic(vocab: usize) -> Result<Self> {
        use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};
        if vocab < 258 {
            return Err(ModelError::Invalid(format!(
                "a synthetic tokenizer needs at least 258 ids, not {vocab}"
            )));
        }
        let mut byte_chars: Vec<(u8, char)> =
            unicode_to_byte().into_iter().map(|(c, b)| (b, c)).collect();
        byte_chars.sort_unstable();
        let mut tokens: Vec<Value> = byte_chars
            .into_iter()
            .map(|(_, c)| Value::String(c.to_string()))
            .collect();
        tokens.extend((256..vocab - 1).map(|n| Value::String(format!("t{n}"))));
        tokens.push(Value::String("<|endoftext|>".into()));
        let mut types = vec![Value::I32(1); vocab - 1];
        types.push(Value::I32(TOKEN_TYPE_CONTROL as i32));
        let metadata = [
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            ("tokenizer.ggml.merges", Value::Array(Vec::new())),
            ("tokenizer.ggml.eos_token_id", Value::U32(vocab as u32 - 1)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Self::from_gguf(&Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        })
    }

    /// Token ids of `text`. With `parse_special`, control tokens written in the text (such as
    /// `<|im_start|>`) become their ids; without it they are tokenized as ordinary text, which is
    /// how untrusted text (a question, a passage) must be encoded.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for piece in self.split_specials(text, parse_special) {
            match piece {
                Piece::Special(id) => ids.push(id),
                Piece::Text(t) => {
                    let enc = self.bpe.encode(t, false).map_err(ModelError::tokenizer)?;
                    ids.extend_from_slice(enc.get_ids());
                }
            }
        }
        Ok(ids)
    }

    /// Splits `text` at special tokens, the longest first, as llama.cpp partitions it.
    fn split_specials<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Piece<'a>> {
        let mut pieces = vec![Piece::Text(text)];
        for (special, id, control) in &self.specials {
            if *control && !parse_special {
                continue;
            }
            let mut next = Vec::with_capacity(pieces.len());
            for piece in pieces {
                let Piece::Text(mut rest) = piece else {
                    next.push(piece);
                    continue;
                };
                while let Some(at) = rest.find(special.as_str()) {
                    if at > 0 {
                        next.push(Piece::Text(&rest[..at]));
                    }
                    next.push(Piece::Special(*id));
                    rest = &rest[at + special.len()..];
                }
                if !rest.is_empty() {
                    next.push(Piece::Text(rest));
                }
            }
            pieces = next;
        }
        pieces
    }

    /// Text of `ids`; control tokens are left out when `skip_control`. Invalid UTF-8 (a
    /// character cut at the end) is replaced with U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_control: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if skip_control && self.is_control(id) {
                continue;
            }
            bytes.extend_from_slice(self.token_bytes(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The bytes token `id` stands for (empty for an unknown id).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Whether `id` is a control token (chat markup, end of text).
    pub fn is_control(&self, id: u32) -> bool {
        self.is_control.get(id as usize).copied().unwrap_or(false)
    }

    /// The id of a token written exactly as in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.ids.get(token).copied()
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Tokens that end an assistant turn: the EOS id and the usual end-of-turn markers present in
    /// the vocabulary.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"]
            .iter()
            .filter_map(|t| self.token_id(t).filter(|&id| self.is_control(id)))
            .chain(self.eos)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The Jinja chat template stored in the GGUF, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The text of token `id`, as written in the vocabulary, for templates (`bos_token`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }
}

enum Piece<'a> {
    Text(&'a str),
    Special(u32),
}

/// Turns generated token ids into text as they arrive, holding back the bytes of a UTF-8
/// character until it is complete, so no client ever sees half a character.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token; returns the text that became complete (possibly empty). Control tokens
    /// add nothing.
    pub fn push(&mut self, tokenizer: &BpeTokenizer, id: u32) -> String {
        if tokenizer.is_control(id) {
            return String::new();
        }
        self.push_bytes(tokenizer.token_bytes(id))
    }

    /// Adds raw bytes; returns the longest complete UTF-8 text now available. Bytes that can never
    /// become valid UTF-8 are replaced with U+FFFD rather than held forever.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("valid prefix"),
                    );
                    match e.error_len() {
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: whatever is still held (a character cut short) comes out as U+FFFD.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection() {
        let m = unicode_to_byte();
        assert_eq!(m.len(), 256);
        let mut bytes: Vec<u8> = m.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
        assert_eq!(m[&'Ġ'], b' ');
        assert_eq!(m[&'Ċ'], b'\n');
        assert_eq!(m[&'a'], b'a');
    }

    #[test]
    fn synthetic_tokenizer_maps_ids_to_bytes_and_back() {
        let t = BpeTokenizer::synthetic(1000).unwrap();
        assert_eq!(t.vocab_size(), 1000);
        assert_eq!(t.eos_id(), Some(999));
        assert!(t.is_control(999));
        let text = "Stage IV, 2,225 patients\n";
        let ids = t.encode(text, false).unwrap();
        assert_eq!(ids.len(), text.len());
        assert!(ids.iter().all(|&id| id < 256));
        assert_eq!(t.decode(&ids, true), text);
        assert_eq!(t.token_bytes(b'A' as u32), b"A");
        assert_eq!(t.token_bytes(500), b"t500");
        assert!(BpeTokenizer::synthetic(100).is_err());
    }

    #[test]
    fn stream_decoder_holds_split_characters() {
        let mut d = StreamDecoder::new();
        let text = "é→😀x";
        let bytes = text.as_bytes();
        let mut out = String::new();
        for b in bytes {
            let piece = d.push_bytes(&[*b]);
            assert!(!piece.contains('\u{FFFD}'));
            out.push_str(&piece);
        }
        out.push_str(&d.finish());
        assert_eq!(out, text);
    }

    #[test]
    fn stream_decoder_replaces_invalid_bytes_instead_of_stalling() {
        let mut d = StreamDecoder::new();
        assert_eq!(d.push_bytes(&[0xFF, b'a']), "\u{FFFD}a");
        assert_eq!(d.push_bytes(&[0xE2, 0x86]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }
}
