//! flotilla's inference engine: llama-family GGUF models split into layer-range shards whose batched
//! forward passes are bit-identical whatever the split, the batch or the thread count.

pub mod attention;
pub mod chat;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kv_cache;
pub mod model;
pub mod ops;
pub mod pool;
pub mod quant;
pub mod sampling;
pub mod shard;
pub mod synthetic;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::ModelConfig;
pub use error::{EngineError, Result};
pub use generate::{FinishReason, Generation, Pipeline, TextStream};
pub use kv_cache::KvCache;
pub use model::{split_at, split_even, Model};
pub use sampling::SamplingParams;
pub use shard::{hidden_from_bytes, hidden_to_bytes, SeqStep, Shard, StageInput, StageOutput};
pub use tokenizer::Tokenizer;

/// The model `make run` fetches, relative to the repository root.
pub const DEFAULT_MODEL_PATH: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
