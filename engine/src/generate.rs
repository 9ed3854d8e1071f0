//! In-process generation: a chain of shards driven token by token, with streaming text and stop handling.
//! The distributed runtime reproduces exactly this loop across nodes.

use std::time::Instant;

use serde::Serialize;

use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::sampling::{sample, SamplingParams};
use crate::shard::{hidden_from_bytes, hidden_to_bytes, SeqStep, Shard, StageInput, StageOutput};
use crate::tokenizer::Tokenizer;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
}

/// Where the time went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// The result of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_token_ids: Vec<u32>,
    /// Generated ids, without the end-of-sequence token that stopped them.
    pub output_token_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// Incremental detokenizer: turns generated ids into text deltas, holding back incomplete UTF-8 and
/// anything that may be the start of a stop string, and cutting the text before a stop string.
pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    stop: Vec<String>,
    ids: Vec<u32>,
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stopped: bool,
}

impl<'t> TextStream<'t> {
    /// A stream that ends at the first of `stop`.
    pub fn new(tokenizer: &'t Tokenizer, stop: &[String]) -> Self {
        Self { tokenizer, stop: stop.to_vec(), ids: Vec::new(), text: String::new(), emitted: 0, stopped: false }
    }

    /// Adds one token; returns the text that is now safe to show, and whether a stop string was reached.
    pub fn push(&mut self, id: u32) -> Result<(String, bool)> {
        if self.stopped {
            return Ok((String::new(), true));
        }
        self.ids.push(id);
        self.text = self.tokenizer.decode(&self.ids, true)?;
        let search_from = self.emitted.saturating_sub(self.stop.iter().map(|s| s.len()).max().unwrap_or(0));
        let search_from = floor_char_boundary(&self.text, search_from);
        let hit = self.stop.iter().filter_map(|s| self.text[search_from..].find(s.as_str()).map(|p| search_from + p)).min();
        if let Some(at) = hit {
            self.stopped = true;
            self.text.truncate(at);
            return Ok((self.take(at), true));
        }
        let mut complete = self.text.len();
        if self.text.ends_with('\u{FFFD}') {
            complete -= '\u{FFFD}'.len_utf8();
        }
        // Hold back the longest tail that could still grow into a stop string.
        let mut safe = complete;
        for s in &self.stop {
            if let Some(l) = (1..s.len()).rev().find(|&l| s.is_char_boundary(l) && self.text[..complete].ends_with(&s[..l])) {
                safe = safe.min(complete - l);
            }
        }
        Ok((self.take(safe.max(self.emitted)), false))
    }

    /// Everything not yet handed out (call once generation ends without a stop string).
    pub fn finish(&mut self) -> String {
        let end = self.text.len();
        self.take(end)
    }

    /// The whole text so far (cut at a stop string, if one was reached).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take(&mut self, upto: usize) -> String {
        let upto = floor_char_boundary(&self.text, upto);
        if upto <= self.emitted {
            return String::new();
        }
        let s = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        s
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Shards covering every layer, run one after another in this process.
pub struct Pipeline {
    shards: Vec<Shard>,
}

/// One sequence's caches across the pipeline.
pub struct PipelineCache {
    caches: Vec<KvCache>,
}

impl PipelineCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.caches.first().map_or(0, |c| c.len())
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Pipeline {
    /// Chains shards; they must cover the model's layers contiguously from first to last.
    pub fn new(shards: Vec<Shard>) -> Result<Self> {
        let bad = |reason: &str| EngineError::BadSplit { splits: Vec::new(), layers: 0, reason: reason.into() };
        let first = shards.first().ok_or_else(|| bad("a pipeline needs at least one shard"))?;
        let layers = first.config().n_layers;
        let mut next = 0;
        for s in &shards {
            if s.range().start != next {
                return Err(EngineError::BadSplit {
                    splits: shards.iter().map(|s| s.range().start).collect(),
                    layers,
                    reason: format!("shard {:?} does not start at layer {next}", s.range()),
                });
            }
            next = s.range().end;
        }
        if next != layers {
            return Err(EngineError::BadSplit {
                splits: shards.iter().map(|s| s.range().start).collect(),
                layers,
                reason: format!("shards end at layer {next}, not {layers}"),
            });
        }
        Ok(Self { shards })
    }

    /// The shards, first to last.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Empty caches for one sequence.
    pub fn new_cache(&self) -> PipelineCache {
        PipelineCache { caches: self.shards.iter().map(|s| s.new_cache()).collect() }
    }

    /// Feeds `tokens` to one sequence and returns the logits of its last position. Hidden states cross
    /// stage boundaries as wire bytes, as they do between nodes.
    pub fn step(&self, cache: &mut PipelineCache, tokens: &[u32]) -> Result<Vec<f32>> {
        let width = self.shards[0].config().n_embd;
        let mut hidden: Vec<f32> = Vec::new();
        for (i, (shard, c)) in self.shards.iter().zip(&mut cache.caches).enumerate() {
            let input = if i == 0 { StageInput::Tokens(tokens) } else { StageInput::Hidden(&hidden) };
            let mut out = shard.forward(&mut [SeqStep { cache: c, input }])?;
            match out.pop() {
                Some(StageOutput::Hidden(h)) => hidden = hidden_from_bytes(&hidden_to_bytes(&h), width)?,
                Some(StageOutput::Logits(l)) => return Ok(l),
                None => unreachable!("one output per sequence"),
            }
        }
        unreachable!("the last shard returns logits")
    }

    /// Generates from `prompt`, calling `on_text` with each piece of text as it becomes final.
    pub fn generate(&self, tokenizer: &Tokenizer, prompt: &[u32], params: &SamplingParams, mut on_text: impl FnMut(&str)) -> Result<Generation> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        let ctx = self.shards[0].config().context_length;
        if prompt.len() > ctx {
            return Err(EngineError::ContextOverflow { needed: prompt.len(), context: ctx });
        }
        let mut cache = self.new_cache();
        let mut stream = TextStream::new(tokenizer, &params.stop);
        let mut context = prompt.to_vec();
        let mut output = Vec::new();
        let t0 = Instant::now();
        let mut logits = self.step(&mut cache, prompt)?;
        let prefill = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let finish = loop {
            let tok = sample(&logits, params, output.len() as u64, &context, &output);
            if !params.ignore_eos && tokenizer.stop_ids().contains(&tok) {
                break FinishReason::Stop;
            }
            output.push(tok);
            context.push(tok);
            let (delta, stopped) = stream.push(tok)?;
            if !delta.is_empty() {
                on_text(&delta);
            }
            if stopped {
                break FinishReason::Stop;
            }
            if output.len() >= params.max_tokens as usize || cache.len() >= ctx {
                break FinishReason::Length;
            }
            logits = self.step(&mut cache, &[tok])?;
        };
        let rest = stream.finish();
        if !rest.is_empty() {
            on_text(&rest);
        }
        let decode = t1.elapsed().as_secs_f64();
        let decoded_steps = output.len().saturating_sub(1).max(1);
        let timings = Timings {
            prompt_tokens: prompt.len(),
            generated_tokens: output.len(),
            prefill_seconds: prefill,
            decode_seconds: decode,
            prefill_tok_s: prompt.len() as f64 / prefill.max(1e-9),
            decode_tok_s: decoded_steps as f64 / decode.max(1e-9),
        };
        Ok(Generation {
            prompt_token_ids: prompt.to_vec(),
            output_token_ids: output,
            text: stream.text().to_string(),
            finish_reason: finish,
            timings,
        })
    }
}
