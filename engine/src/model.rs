//! A model file opened for serving: config, tokenizer, chat template, and shard loading by layer range.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use crate::chat::{ChatTemplate, CHATML};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::shard::Shard;
use crate::tokenizer::Tokenizer;

/// An opened GGUF model; shards are loaded from it on demand.
pub struct Model {
    gguf: GgufFile,
    cfg: Arc<ModelConfig>,
    tokenizer: Tokenizer,
    chat: ChatTemplate,
    /// Load shards with exact (unquantized-activation) matmuls.
    exact: bool,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").field("path", &self.gguf.path()).field("cfg", &self.cfg).finish()
    }
}

impl Model {
    /// Opens a GGUF file and reads its config, tokenizer and chat template (no weights yet).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let gguf = GgufFile::open(path)?;
        let cfg = Arc::new(ModelConfig::from_gguf(&gguf)?);
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        let source = gguf.meta_str("tokenizer.chat_template").unwrap_or(CHATML).to_string();
        let tok_str = |id: Option<u32>| id.and_then(|i| tokenizer.token(i)).unwrap_or("").to_string();
        let chat = ChatTemplate::new(&source, &tok_str(tokenizer.bos()), &tok_str(tokenizer.eos()))?;
        Ok(Self { gguf, cfg, tokenizer, chat, exact: false })
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &Arc<ModelConfig> {
        &self.cfg
    }

    /// The tokenizer built from the file's metadata.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template (the file's, or ChatML when it has none).
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.chat
    }

    /// Shards loaded from now on multiply exactly in f32 (slow; for checking against a float reference).
    pub fn set_exact_matmul(&mut self, exact: bool) {
        self.exact = exact;
    }

    /// Loads layers `range`, reading only their tensors.
    pub fn load_shard(&mut self, range: Range<usize>) -> Result<Shard> {
        Shard::load(&mut self.gguf, self.cfg.clone(), range, self.exact)
    }

    /// Loads the model as consecutive shards covering every layer.
    pub fn load_shards(&mut self, ranges: &[Range<usize>]) -> Result<Vec<Shard>> {
        ranges.iter().map(|r| self.load_shard(r.clone())).collect()
    }
}

/// Splits `layers` into `stages` contiguous ranges whose sizes differ by at most one (larger ones first).
pub fn split_even(layers: usize, stages: usize) -> Result<Vec<Range<usize>>> {
    if stages == 0 || stages > layers {
        return Err(EngineError::BadSplit { splits: vec![stages], layers, reason: format!("the number of stages must be between 1 and {layers}") });
    }
    let (base, extra) = (layers / stages, layers % stages);
    let mut start = 0;
    Ok((0..stages)
        .map(|s| {
            let len = base + usize::from(s < extra);
            let r = start..start + len;
            start += len;
            r
        })
        .collect())
}

/// Splits `layers` at the given boundaries (each strictly inside, increasing): `[10, 12]` gives 0..10, 10..12, 12..layers.
pub fn split_at(layers: usize, boundaries: &[usize]) -> Result<Vec<Range<usize>>> {
    let mut ranges = Vec::with_capacity(boundaries.len() + 1);
    let mut start = 0;
    for &b in boundaries.iter().chain(std::iter::once(&layers)) {
        if b <= start || b > layers {
            return Err(EngineError::BadSplit {
                splits: boundaries.to_vec(),
                layers,
                reason: "boundaries must increase strictly and lie inside 1..layers".into(),
            });
        }
        ranges.push(start..b);
        start = b;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_splits_cover_every_layer_once() {
        for layers in 1..40 {
            for stages in 1..=layers {
                let r = split_even(layers, stages).unwrap();
                assert_eq!(r.len(), stages);
                assert_eq!(r[0].start, 0);
                assert_eq!(r.last().unwrap().end, layers);
                assert!(r.windows(2).all(|w| w[0].end == w[1].start));
                let lens: Vec<usize> = r.iter().map(|x| x.len()).collect();
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
            }
        }
        assert!(split_even(30, 0).is_err());
        assert!(split_even(3, 4).is_err());
    }

    #[test]
    fn explicit_boundaries() {
        assert_eq!(split_at(30, &[1, 29]).unwrap(), vec![0..1, 1..29, 29..30]);
        assert!(split_at(30, &[0]).is_err());
        assert!(split_at(30, &[5, 5]).is_err());
        assert!(split_at(30, &[30]).is_err());
    }
}
