//! The model's hyper-parameters, read from GGUF metadata and checked once.

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: llama.cpp's "normal" mode, used by llama GGUFs (q/k rows are permuted at conversion).
    Interleaved,
    /// Halves `(i, i + d/2)`: llama.cpp's "neox" mode (Qwen2).
    Neox,
}

/// Hyper-parameters of a llama-family decoder.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    /// `general.architecture`.
    pub arch: String,
    /// `general.name`, or the file stem.
    pub name: String,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    /// Number of dimensions of each head that are rotated.
    pub rope_dims: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
    /// The output head reuses the token embedding.
    pub tied_embeddings: bool,
}

impl ModelConfig {
    /// Reads the config of a llama-family model from GGUF metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.meta_str("general.architecture")?.to_string();
        let rope_style = match arch.as_str() {
            "llama" | "mistral" => RopeStyle::Interleaved,
            "qwen2" => RopeStyle::Neox,
            _ => return Err(EngineError::UnsupportedArchitecture { arch }),
        };
        let key = |k: &str| format!("{arch}.{k}");
        let n_layers = g.meta_u64(&key("block_count"))? as usize;
        let n_embd = g.meta_u64(&key("embedding_length"))? as usize;
        let n_ff = g.meta_u64(&key("feed_forward_length"))? as usize;
        let n_head = g.meta_u64(&key("attention.head_count"))? as usize;
        let n_head_kv = g.meta_u64_opt(&key("attention.head_count_kv"))?.map(|v| v as usize).unwrap_or(n_head);
        let head_dim = match g.meta_u64_opt(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None if n_head > 0 => n_embd / n_head,
            None => 0,
        };
        let rope_dims = g.meta_u64_opt(&key("rope.dimension_count"))?.map(|v| v as usize).unwrap_or(head_dim);
        let rope_theta = g.meta_f64_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32;
        let rms_eps = g.meta_f64_opt(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5) as f32;
        let context_length = g.meta_u64_opt(&key("context_length"))?.map(|v| v as usize).unwrap_or(2048);
        let (emb_dims, _) = g.tensor_shape("token_embd.weight")?;
        let vocab_size = emb_dims.first().copied().unwrap_or(0);
        let tied_embeddings = !g.has_tensor("output.weight");
        let name = match g.meta_str("general.name") {
            Ok(n) => n.to_string(),
            Err(_) => g.path().file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        let cfg = Self {
            arch,
            name,
            n_layers,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            head_dim,
            rope_dims,
            rope_theta,
            rope_style,
            rms_eps,
            context_length,
            vocab_size,
            tied_embeddings,
        };
        cfg.validate()?;
        if emb_dims != [cfg.vocab_size, cfg.n_embd] {
            return Err(EngineError::TensorShape { name: "token_embd.weight".into(), expected: vec![cfg.vocab_size, cfg.n_embd], actual: emb_dims });
        }
        Ok(cfg)
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let fail = |key: &str, reason: String| Err(EngineError::BadMetadata { key: format!("{}.{key}", self.arch), reason });
        if self.n_layers == 0 {
            return fail("block_count", "must be at least 1".into());
        }
        if self.n_embd == 0 || self.n_ff == 0 || self.vocab_size == 0 {
            return fail("embedding_length", "model dimensions must be non-zero".into());
        }
        if self.n_head == 0 || self.n_head_kv == 0 || !self.n_head.is_multiple_of(self.n_head_kv) {
            return fail("attention.head_count_kv", format!("{} query heads cannot be grouped over {} kv heads", self.n_head, self.n_head_kv));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return fail("attention.key_length", format!("head dimension {} must be even and non-zero", self.head_dim));
        }
        if self.rope_dims > self.head_dim || !self.rope_dims.is_multiple_of(2) {
            return fail("rope.dimension_count", format!("{} must be even and at most the head dimension {}", self.rope_dims, self.head_dim));
        }
        if self.context_length == 0 {
            return fail("context_length", "must be at least 1".into());
        }
        Ok(())
    }

    /// Width of the concatenated query heads.
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
