//! The engine's error type: each variant names the step or invariant that failed.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model shard.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot open model file {path}: {source}")]
    OpenModel { path: PathBuf, source: std::io::Error },

    #[error("{path} is not a GGUF file (magic bytes {magic:02x?}, expected \"GGUF\")")]
    NotGguf { path: PathBuf, magic: Vec<u8> },

    #[error("cannot parse GGUF header of {path}: {reason}")]
    BadGgufHeader { path: PathBuf, reason: String },

    #[error("model file {path} is truncated: tensor {tensor} needs bytes up to {needed}, file has {size}")]
    Truncated { path: PathBuf, tensor: String, needed: u64, size: u64 },

    #[error("cannot read tensor {tensor}: {source}")]
    ReadTensor { tensor: String, source: std::io::Error },

    #[error("unsupported model architecture {arch:?} (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture { arch: String },

    #[error("metadata key {key} is missing")]
    MissingMetadata { key: String },

    #[error("metadata key {key} has the wrong type or value: {reason}")]
    BadMetadata { key: String, reason: String },

    #[error("tensor {name} is missing from the model file")]
    MissingTensor { name: String },

    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<usize>, actual: Vec<usize> },

    #[error("tensor {name} has type {dtype}, which this engine cannot multiply")]
    UnsupportedTensorType { name: String, dtype: String },

    #[error("layer range {start}..{end} is out of bounds for a model with {layers} layers")]
    LayerRangeOutOfBounds { start: usize, end: usize, layers: usize },

    #[error("invalid stage split {splits:?} for {layers} layers: {reason}")]
    BadSplit { splits: Vec<usize>, layers: usize, reason: String },

    #[error("sequence would reach {needed} tokens, beyond the context window of {context} tokens")]
    ContextOverflow { needed: usize, context: usize },

    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { id: u32, vocab: usize },

    #[error("stage input mismatch: {reason}")]
    StageInput { reason: String },

    #[error("hidden-state buffer of {bytes} bytes is not a whole number of {width}-wide f32 rows")]
    HiddenBytes { bytes: usize, width: usize },

    #[error("empty prompt: at least one token is needed")]
    EmptyPrompt,

    #[error("invalid sampling parameter {param}: {reason}")]
    InvalidSampling { param: &'static str, reason: String },

    #[error("unsupported tokenizer: {reason}")]
    UnsupportedTokenizer { reason: String },

    #[error("tokenizer failed: {reason}")]
    Tokenize { reason: String },

    #[error("chat template: {reason}")]
    ChatTemplate { reason: String },

    #[error("writing GGUF: {reason}")]
    WriteGguf { reason: String },
}

impl EngineError {
    /// A stable, low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::OpenModel { .. } => "open_model",
            Self::NotGguf { .. } => "not_gguf",
            Self::BadGgufHeader { .. } => "bad_gguf_header",
            Self::Truncated { .. } => "truncated",
            Self::ReadTensor { .. } => "read_tensor",
            Self::UnsupportedArchitecture { .. } => "unsupported_architecture",
            Self::MissingMetadata { .. } => "missing_metadata",
            Self::BadMetadata { .. } => "bad_metadata",
            Self::MissingTensor { .. } => "missing_tensor",
            Self::TensorShape { .. } => "tensor_shape",
            Self::UnsupportedTensorType { .. } => "unsupported_tensor_type",
            Self::LayerRangeOutOfBounds { .. } => "layer_range_out_of_bounds",
            Self::BadSplit { .. } => "bad_split",
            Self::ContextOverflow { .. } => "context_overflow",
            Self::TokenOutOfRange { .. } => "token_out_of_range",
            Self::StageInput { .. } => "stage_input",
            Self::HiddenBytes { .. } => "hidden_bytes",
            Self::EmptyPrompt => "empty_prompt",
            Self::InvalidSampling { .. } => "invalid_sampling",
            Self::UnsupportedTokenizer { .. } => "unsupported_tokenizer",
            Self::Tokenize { .. } => "tokenize",
            Self::ChatTemplate { .. } => "chat_template",
            Self::WriteGguf { .. } => "write_gguf",
        }
    }
}

/// Result alias for the engine.
pub type Result<T> = std::result::Result<T, EngineError>;
