//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::ops::Range;
use std::path::PathBuf;

use flotilla_engine::synthetic::{self, SyntheticSpec};
use flotilla_engine::{Model, Pipeline, Shard};

/// A synthetic model written to a temporary directory (removed on drop).
pub struct Synthetic {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

pub fn synthetic(spec: &SyntheticSpec) -> Synthetic {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("synthetic.gguf");
    synthetic::write(&path, spec).unwrap();
    Synthetic { dir, path }
}

/// The real default model; `make test` fetches it first.
pub fn real_model_path() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(flotilla_engine::DEFAULT_MODEL_PATH);
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh (make test does)", p.display());
    p
}

pub fn pipeline(model: &mut Model, ranges: &[Range<usize>]) -> Pipeline {
    Pipeline::new(model.load_shards(ranges).unwrap()).unwrap()
}

/// Greedy decoding of `steps` tokens; returns the tokens and the logits of every step.
pub fn decode(p: &Pipeline, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = p.new_cache();
    let mut logits = p.step(&mut cache, prompt).unwrap();
    let mut toks = Vec::new();
    let mut all = vec![logits.clone()];
    for _ in 0..steps {
        let t = flotilla_engine::sampling::argmax(&logits);
        toks.push(t);
        logits = p.step(&mut cache, &[t]).unwrap();
        all.push(logits.clone());
    }
    (toks, all)
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Asserts two logit vectors are bit-identical, reporting the first difference.
pub fn assert_bit_identical(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != b[i].to_bits()) {
        panic!("{what}: logits differ at {i}: {} vs {}", a[i], b[i]);
    }
}

/// Last-position logits of each sequence run alone through one full-model shard, fed in `chunks`.
pub fn run_chunked(shard: &Shard, tokens: &[u32], chunks: &[usize]) -> Vec<f32> {
    let mut cache = shard.new_cache();
    let mut at = 0;
    let mut out = Vec::new();
    for &c in chunks {
        let mut r = shard
            .forward(&mut [flotilla_engine::SeqStep { cache: &mut cache, input: flotilla_engine::StageInput::Tokens(&tokens[at..at + c]) }])
            .unwrap();
        out = r.pop().unwrap().into_logits().unwrap();
        at += c;
    }
    assert_eq!(at, tokens.len());
    out
}

/// Logits of the independent NumPy float64 reference (tests/reference/llama_ref.py).
pub fn reference_logits(model: &std::path::Path, prompts: &[Vec<u32>]) -> Vec<Vec<f64>> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference/llama_ref.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(model)
        .arg(serde_json::to_string(prompts).unwrap())
        .output()
        .expect("python3 must be installed (make test / .ci/run install numpy and gguf)");
    assert!(out.status.success(), "reference failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["logits"].as_array().unwrap().iter().map(|l| l.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect()
}

/// Largest absolute difference, and that difference relative to the reference's spread (max - min).
pub fn compare(ours: &[f32], reference: &[f64]) -> (f64, f64) {
    let max_diff = ours.iter().zip(reference).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
    let (lo, hi) = reference.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    (max_diff, max_diff / (hi - lo))
}
