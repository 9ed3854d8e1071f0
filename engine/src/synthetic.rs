//! Tiny synthetic GGUF models (random weights, byte-level vocabulary) so tests run without the real model.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{EngineError, Result};

/// Shape and format of a synthetic model.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    pub arch: String,
    pub layers: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub context_length: usize,
    /// Format of the layer matrices.
    pub dtype: GgmlDType,
    /// Format of the token embedding (and tied output).
    pub embd_dtype: GgmlDType,
    /// Write a separate `output.weight` instead of tying it to the embedding.
    pub untied_output: bool,
    /// Use a SentencePiece-style (`llama`) vocabulary with byte fallback instead of byte-level BPE.
    pub spm_vocab: bool,
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            arch: "llama".into(),
            layers: 4,
            n_embd: 64,
            n_ff: 96,
            n_head: 4,
            n_head_kv: 2,
            context_length: 256,
            dtype: GgmlDType::Q4_1,
            embd_dtype: GgmlDType::Q8_0,
            untied_output: false,
            spm_vocab: false,
            seed: 1,
        }
    }
}

/// GPT-2's reversible byte-to-character map (printable bytes map to themselves).
pub fn byte_to_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).expect("valid code point")
}

fn bl(s: &str) -> String {
    s.bytes().map(byte_to_char).collect()
}

/// Special tokens at ids 0, 1, 2 (as in SmolLM2), then the 256 bytes, then merged tokens.
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [(&str, &str); 12] = [
    (" ", "t"),
    ("h", "e"),
    (" t", "he"),
    ("i", "n"),
    (" ", "a"),
    ("e", "r"),
    ("o", "n"),
    (" ", "s"),
    ("e", "n"),
    ("a", "t"),
    ("1", "2"),
    (" ", "c"),
];

/// The synthetic vocabulary: token strings and the merges that build the multi-byte ones.
pub fn vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3; SPECIALS.len()];
    for b in 0..=255u8 {
        tokens.push(byte_to_char(b).to_string());
        types.push(1);
    }
    let mut merges = Vec::new();
    for (a, b) in MERGES {
        merges.push(format!("{} {}", bl(a), bl(b)));
        tokens.push(bl(&format!("{a}{b}")));
        types.push(1);
    }
    (tokens, merges, types)
}

/// A SentencePiece-style vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then pieces with scores.
pub fn spm_vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let pieces = ["▁", "t", "h", "e", "c", "a", "s", "o", "n", "▁t", "he", "▁the", "at", "▁c", "▁cat", "▁s", "on", "▁on", "in", "▁a"];
    tokens.extend(pieces.iter().map(|p| p.to_string()));
    types.extend(pieces.iter().map(|_| 1));
    let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
    (tokens, scores, types)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn tensor(&mut self, rows: usize, cols: usize, scale: f32, dtype: GgmlDType) -> Result<QTensor> {
        let v: Vec<f32> = (0..rows * cols).map(|_| self.next() * scale).collect();
        let dims: Vec<usize> = if rows == 1 { vec![cols] } else { vec![rows, cols] };
        let t = Tensor::from_vec(v, dims, &Device::Cpu).map_err(w)?;
        QTensor::quantize(&t, dtype).map_err(w)
    }
}

fn w(e: impl std::fmt::Display) -> EngineError {
    EngineError::WriteGguf { reason: e.to_string() }
}

/// Writes a synthetic model to `path`.
pub fn write(path: &Path, spec: &SyntheticSpec) -> Result<()> {
    let (tokens, merges, types, scores) = if spec.spm_vocab {
        let (t, sc, ty) = spm_vocab();
        (t, Vec::new(), ty, sc)
    } else {
        let (t, m, ty) = vocab();
        (t, m, ty, Vec::new())
    };
    let vocab_size = tokens.len();
    let head_dim = spec.n_embd / spec.n_head;
    let (d, ff, q_dim, kv_dim) = (spec.n_embd, spec.n_ff, spec.n_head * head_dim, spec.n_head_kv * head_dim);
    let mut rng = Rng(spec.seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    tensors.push(("token_embd.weight".into(), rng.tensor(vocab_size, d, 1.0, spec.embd_dtype)?));
    let norm = |rng: &mut Rng| -> Result<QTensor> {
        let v: Vec<f32> = (0..d).map(|_| 1.0 + 0.1 * rng.next()).collect();
        QTensor::quantize(&Tensor::from_vec(v, d, &Device::Cpu).map_err(w)?, GgmlDType::F32).map_err(w)
    };
    let s_in = 1.0 / (d as f32).sqrt() * 1.7;
    let s_ff = 1.0 / (ff as f32).sqrt() * 1.7;
    for i in 0..spec.layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        tensors.push((n("attn_norm.weight"), norm(&mut rng)?));
        tensors.push((n("attn_q.weight"), rng.tensor(q_dim, d, s_in, spec.dtype)?));
        tensors.push((n("attn_k.weight"), rng.tensor(kv_dim, d, s_in, spec.dtype)?));
        tensors.push((n("attn_v.weight"), rng.tensor(kv_dim, d, s_in, spec.dtype)?));
        tensors.push((n("attn_output.weight"), rng.tensor(d, q_dim, s_in, spec.dtype)?));
        tensors.push((n("ffn_norm.weight"), norm(&mut rng)?));
        tensors.push((n("ffn_gate.weight"), rng.tensor(ff, d, s_in, spec.dtype)?));
        tensors.push((n("ffn_up.weight"), rng.tensor(ff, d, s_in, spec.dtype)?));
        tensors.push((n("ffn_down.weight"), rng.tensor(d, ff, s_ff, spec.dtype)?));
    }
    tensors.push(("output_norm.weight".into(), norm(&mut rng)?));
    if spec.untied_output {
        tensors.push(("output.weight".into(), rng.tensor(vocab_size, d, 1.0, spec.embd_dtype)?));
    }
    let a = &spec.arch;
    let strs = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.clone())),
        ("general.name".into(), Value::String("synthetic".into())),
        (format!("{a}.block_count"), Value::U32(spec.layers as u32)),
        (format!("{a}.context_length"), Value::U32(spec.context_length as u32)),
        (format!("{a}.embedding_length"), Value::U32(d as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(ff as u32)),
        (format!("{a}.attention.head_count"), Value::U32(spec.n_head as u32)),
        (format!("{a}.attention.head_count_kv"), Value::U32(spec.n_head_kv as u32)),
        (format!("{a}.rope.freq_base"), Value::F32(10000.0)),
        (format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        ("tokenizer.ggml.tokens".into(), strs(&tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types.iter().map(|&t| Value::I32(t)).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.chat_template".into(), Value::String(crate::chat::CHATML.into())),
    ];
    if spec.spm_vocab {
        meta.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        meta.push(("tokenizer.ggml.scores".into(), Value::Array(scores.iter().map(|&s| Value::F32(s)).collect())));
        meta.push(("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)));
    } else {
        meta.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        meta.push(("tokenizer.ggml.pre".into(), Value::String("smollm".into())));
        meta.push(("tokenizer.ggml.merges".into(), strs(&merges)));
        meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(w)?);
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).map_err(w)?;
    std::io::Write::flush(&mut f).map_err(w)?;
    Ok(())
}
