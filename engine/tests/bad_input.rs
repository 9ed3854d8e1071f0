//! Bad input gives a clear error naming the problem, never a panic.
// `[0..n]`: a list of shard ranges that holds one shard (the whole model)
#![allow(clippy::single_range_in_vec_init)]

#[path = "support/common.rs"]
mod common;

use std::io::Write;

use common::*;
use flotilla_engine::synthetic::SyntheticSpec;
use flotilla_engine::{hidden_from_bytes, EngineError, Model, SamplingParams, SeqStep, StageInput};

fn open_err(bytes: &[u8]) -> EngineError {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
    Model::open(&p).unwrap_err()
}

#[test]
fn missing_file() {
    let e = Model::open("/nonexistent/model.gguf").unwrap_err();
    assert!(matches!(e, EngineError::OpenModel { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/model.gguf"), "{e}");
}

#[test]
fn not_a_gguf_file() {
    let e = open_err(b"PK\x03\x04 this is a zip, not a model");
    assert!(matches!(e, EngineError::NotGguf { .. }), "{e}");
    assert!(e.to_string().contains("not a GGUF file"), "{e}");
    assert!(matches!(open_err(b""), EngineError::NotGguf { .. }));
}

#[test]
fn truncated_file() {
    let m = synthetic(&SyntheticSpec::default());
    let bytes = std::fs::read(&m.path).unwrap();
    // Cut in the header: the parser says so.
    let e = open_err(&bytes[..200]);
    assert!(matches!(e, EngineError::BadGgufHeader { .. }), "{e}");
    // Cut in the tensor data: the header parses, loading the shard names the tensor.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.gguf");
    std::fs::write(&p, &bytes[..bytes.len() - 1000]).unwrap();
    let mut model = Model::open(&p).unwrap();
    let e = model.load_shard(0..4).unwrap_err();
    assert!(matches!(e, EngineError::Truncated { .. }), "{e}");
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn unsupported_architecture() {
    let m = synthetic(&SyntheticSpec { arch: "gpt2".into(), ..Default::default() });
    let e = Model::open(&m.path).unwrap_err();
    assert!(matches!(e, EngineError::UnsupportedArchitecture { .. }), "{e}");
    assert!(e.to_string().contains("\"gpt2\""), "{e}");
}

#[test]
fn prompt_longer_than_context() {
    let m = synthetic(&SyntheticSpec { context_length: 16, ..Default::default() });
    let mut model = Model::open(&m.path).unwrap();
    let p = pipeline(&mut model, &[0..4]);
    let prompt: Vec<u32> = (0..17).collect();
    let e = p.generate(model.tokenizer(), &prompt, &SamplingParams::greedy(4), |_| {}).unwrap_err();
    assert!(matches!(e, EngineError::ContextOverflow { needed: 17, context: 16 }), "{e}");
    // A prompt that fits stops with "length" when the window fills up.
    let g = p.generate(model.tokenizer(), &prompt[..14], &SamplingParams { ignore_eos: true, ..SamplingParams::greedy(100) }, |_| {}).unwrap();
    assert_eq!(g.finish_reason, flotilla_engine::FinishReason::Length);
    assert_eq!(g.output_token_ids.len(), 3);
}

#[test]
fn invalid_sampling_params_and_empty_prompt() {
    let m = synthetic(&SyntheticSpec::default());
    let mut model = Model::open(&m.path).unwrap();
    let p = pipeline(&mut model, &[0..4]);
    let bad = SamplingParams { temperature: -0.5, ..Default::default() };
    let e = p.generate(model.tokenizer(), &[1, 2], &bad, |_| {}).unwrap_err();
    assert!(e.to_string().contains("temperature"), "{e}");
    let e = p.generate(model.tokenizer(), &[], &SamplingParams::default(), |_| {}).unwrap_err();
    assert!(matches!(e, EngineError::EmptyPrompt), "{e}");
}

#[test]
fn bad_stage_inputs() {
    let m = synthetic(&SyntheticSpec::default());
    let mut model = Model::open(&m.path).unwrap();
    let first = model.load_shard(0..2).unwrap();
    let last = model.load_shard(2..4).unwrap();
    let mut c = first.new_cache();
    let e = first.forward(&mut [SeqStep { cache: &mut c, input: StageInput::Tokens(&[100_000]) }]).unwrap_err();
    assert!(matches!(e, EngineError::TokenOutOfRange { id: 100_000, .. }), "{e}");
    let e = first.forward(&mut [SeqStep { cache: &mut c, input: StageInput::Hidden(&[0.0; 64]) }]).unwrap_err();
    assert!(matches!(e, EngineError::StageInput { .. }), "{e}");
    let e = last.forward(&mut [SeqStep { cache: &mut c, input: StageInput::Hidden(&[0.0; 64]) }]).unwrap_err();
    assert!(e.to_string().contains("cache for layers"), "{e}");
    let mut c2 = last.new_cache();
    let e = last.forward(&mut [SeqStep { cache: &mut c2, input: StageInput::Hidden(&[0.0; 65]) }]).unwrap_err();
    assert!(matches!(e, EngineError::HiddenBytes { .. }), "{e}");
    assert!(c.is_empty() && c2.is_empty(), "a refused step must not touch the caches");
    assert!(hidden_from_bytes(&[0u8; 10], 64).is_err());
    let e = model.load_shard(3..9).unwrap_err();
    assert!(matches!(e, EngineError::LayerRangeOutOfBounds { start: 3, end: 9, layers: 4 }), "{e}");
}
