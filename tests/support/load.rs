//! The load the failover tests (tests/chaos.rs, tests/docker.rs) send: mixed prompts, alternately
//! greedy and seeded, end of sequence ignored so that every request runs its full length; and the
//! single-process engine's answers to it, cached in the target directory.

use std::path::PathBuf;

use flotilla_engine::{Model, Pipeline, SamplingParams};
use serde_json::{json, Value};

pub struct Case {
    pub prompt: String,
    pub temperature: f32,
    pub seed: u64,
    pub max_tokens: u32,
}

/// `n` requests; request `i` has seed `seed0 + i` and `min_tokens + (7 i mod 17)` tokens.
pub fn cases(n: usize, seed0: u64, min_tokens: u32) -> Vec<Case> {
    let prompts = [
        "The history of the lighthouse begins",
        "Explain how a compass works.",
        "Once upon a time",
        "A list of fruits: apple,",
        "The main causes of the French Revolution were",
        "def add(a, b):",
        "Dear team, this week we",
        "Why do cats purr? Because",
    ];
    (0..n)
        .map(|i| Case {
            prompt: format!("{} ({})", prompts[i % prompts.len()], i / prompts.len()),
            temperature: if i % 2 == 0 { 0.0 } else { 0.9 },
            seed: seed0 + i as u64,
            max_tokens: min_tokens + (i as u32 * 7) % 17,
        })
        .collect()
}

pub fn params(c: &Case) -> SamplingParams {
    // End of sequence is ignored so that every request runs its full length (and is in flight when the fault comes).
    SamplingParams { temperature: c.temperature, seed: c.seed, max_tokens: c.max_tokens, ignore_eos: true, ..SamplingParams::default() }
}

/// The request body for `/v1/completions`.
pub fn body(c: &Case) -> Value {
    json!({ "prompt": c.prompt, "max_tokens": c.max_tokens, "temperature": c.temperature, "seed": c.seed,
            "ignore_eos": true, "return_token_ids": true })
}

/// The single-process engine's tokens for every case, cached as `{name}.json` in the target directory.
#[allow(clippy::single_range_in_vec_init)] // one shard holding every layer
pub fn reference(name: &str, cases: &[Case]) -> Vec<Vec<u32>> {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.json"));
    if let Some(v) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<Vec<Vec<u32>>>(&b).ok()) {
        if v.len() == cases.len() {
            return v;
        }
    }
    let mut model = Model::open(super::model_path()).unwrap();
    let layers = model.config().n_layers;
    let pipeline = Pipeline::new(model.load_shards(&[0..layers]).unwrap()).unwrap();
    let out: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            let ids = model.tokenizer().encode(&c.prompt, true).unwrap();
            pipeline.generate(model.tokenizer(), &ids, &params(c), |_| {}).unwrap().output_token_ids
        })
        .collect();
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(&out).unwrap()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    out
}
