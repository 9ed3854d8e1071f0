//! Tokenizer built from GGUF metadata: gpt2-style byte-level BPE with the pre-tokenizer named by
//! `tokenizer.ggml.pre`, or a SentencePiece-style (`llama`) vocabulary with byte fallback.

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{EngineError, Result};
use crate::gguf::{value_u64, GgufFile};

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types.
const TOKEN_CONTROL: u64 = 3;
const TOKEN_USER_DEFINED: u64 = 4;

/// Text to token ids and back, with the model's special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Prepend BOS when encoding a prompt.
    add_bos: bool,
    /// Control tokens that end generation besides EOS (e.g. `<|im_end|>`, `<|eot_id|>`).
    stop_ids: Vec<u32>,
    /// Token strings by id, for the chat template's special tokens.
    tokens: Vec<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab", &self.tokens.len()).field("bos", &self.bos).field("eos", &self.eos).finish()
    }
}

fn strings(g: &GgufFile, key: &str) -> Result<Vec<String>> {
    g.meta_array(key)?
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(EngineError::BadMetadata { key: key.into(), reason: format!("expected strings, found {other:?}") }),
        })
        .collect()
}

fn tk(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenize { reason: e.to_string() }
}

impl Tokenizer {
    /// Builds the tokenizer described by the GGUF metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.meta_str("tokenizer.ggml.model")?.to_string();
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let types: Vec<u64> = match g.meta("tokenizer.ggml.token_type") {
            Some(_) => g.meta_array("tokenizer.ggml.token_type")?.iter().map(|v| value_u64(v).unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let id = |k: &str| -> Result<Option<u32>> { Ok(g.meta_u64_opt(k)?.map(|v| v as u32)) };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let unk = id("tokenizer.ggml.unknown_token_id")?;
        let mut inner = match model.as_str() {
            "gpt2" => {
                let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or("default").to_string();
                let merges = strings(g, "tokenizer.ggml.merges")?;
                gpt2_tokenizer(&tokens, &merges, &pre)?
            }
            "llama" => {
                let scores: Vec<f32> = match g.meta("tokenizer.ggml.scores") {
                    Some(_) => g.meta_array("tokenizer.ggml.scores")?.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
                    None => (0..tokens.len()).map(|i| -(i as f32)).collect(),
                };
                let add_space = g.meta_bool_opt("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                spm_tokenizer(&tokens, &scores, unk.map(|u| tokens[u as usize].clone()), add_space)?
            }
            other => return Err(EngineError::UnsupportedTokenizer { reason: format!("tokenizer.ggml.model {other:?} (supported: gpt2, llama)") }),
        };
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == TOKEN_CONTROL))
            .collect();
        inner.add_special_tokens(&special);
        let add_bos = g.meta_bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(model == "llama");
        let mut stop_ids: Vec<u32> = ["<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<end_of_turn>"]
            .iter()
            .filter_map(|s| tokens.iter().position(|t| t == s))
            .filter(|&i| types.get(i) == Some(&TOKEN_CONTROL))
            .map(|i| i as u32)
            .collect();
        if let Some(e) = id("tokenizer.ggml.eot_token_id")? {
            stop_ids.push(e);
        }
        if let Some(e) = eos {
            stop_ids.push(e);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self { inner, bos, eos, add_bos, stop_ids, tokens })
    }

    /// Encodes text; special-token strings in the text (e.g. `<|im_start|>`) become their ids.
    /// Prepends BOS when the model asks for it and `add_bos` is set.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tk)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            if let Some(b) = self.bos {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text; control tokens are left out when `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tk)
    }

    /// Beginning-of-sequence id.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence id.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Ids that end generation (EOS and end-of-turn control tokens).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The token string of an id.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(|s| s.as_str())
    }

    /// Number of ids.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }
}

fn vocab_map(tokens: &[String]) -> Vocab {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        // keep the first id of a duplicated string, as llama.cpp does
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    vocab
}

fn split(pattern: &str) -> Result<PreTokenizerWrapper> {
    let s = Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false).map_err(tk)?;
    Ok(s.into())
}

/// Byte-level BPE (GPT-2 family) with the pre-tokenizer llama.cpp uses for `pre`.
fn gpt2_tokenizer(tokens: &[String], merges: &[String], pre: &str) -> Result<tokenizers::Tokenizer> {
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| EngineError::BadMetadata { key: "tokenizer.ggml.merges".into(), reason: format!("merge {m:?} has no space") })?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<_>>()?;
    let bpe = BPE::builder().vocab_and_merges(vocab_map(tokens), merges).build().map_err(tk)?;
    // ByteLevel's own regex is GPT-2's, the one llama.cpp uses for these pre-tokenizers.
    let byte_level = |regex: bool| PreTokenizerWrapper::from(ByteLevel::new(false, true, regex));
    let pre_tok: PreTokenizerWrapper = match pre {
        "default" | "gpt2" | "gpt-2" | "olmo" | "jais" | "phi-2" | "jina-es" | "jina-de" | "poro-chat" | "viking" | "mpt" => byte_level(true),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            PreSequence::new(vec![Digits::new(true).into(), byte_level(true)]).into()
        }
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" | "falcon3" | "pixtral" => {
            PreSequence::new(vec![split(LLAMA3_PATTERN)?, byte_level(false)]).into()
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => PreSequence::new(vec![split(QWEN2_PATTERN)?, byte_level(false)]).into(),
        other => return Err(EngineError::UnsupportedTokenizer { reason: format!("pre-tokenizer {other:?} of tokenizer.ggml.pre") }),
    };
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(pre_tok));
    t.with_decoder(Some(DecoderWrapper::from(ByteLevelDecoder::default())));
    Ok(t)
}

/// SentencePiece-style vocabulary as BPE with merges ranked by the merged token's score and byte fallback,
/// the way Hugging Face converts llama tokenizers.
fn spm_tokenizer(tokens: &[String], scores: &[f32], unk: Option<String>, add_space_prefix: bool) -> Result<tokenizers::Tokenizer> {
    let vocab = vocab_map(tokens);
    let mut ranked: Vec<(f32, u32, u32, String, String)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        let chars: Vec<(usize, char)> = t.char_indices().collect();
        for &(at, _) in chars.iter().skip(1) {
            let (a, b) = t.split_at(at);
            if let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) {
                ranked.push((scores.get(id).copied().unwrap_or(0.0), ia, ib, a.to_string(), b.to_string()));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges = ranked.into_iter().map(|(_, _, _, a, b)| (a, b)).collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(u) = unk {
        builder = builder.unk_token(u);
    }
    let bpe = builder.build().map_err(tk)?;
    let mut t = tokenizers::Tokenizer::new(bpe);
    let mut norms: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        norms.push(Prepend::new("▁".into()).into());
    }
    norms.push(Replace::new(" ", "▁").map_err(tk)?.into());
    t.with_normalizer(Some(NormalizerSequence::new(norms)));
    let mut decs: Vec<DecoderWrapper> = vec![Replace::new("▁", " ").map_err(tk)?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        decs.push(Strip::new(' ', 1, 0).into());
    }
    t.with_decoder(Some(DecoderSequence::new(decs)));
    Ok(t)
}
