//! `flotilla bench engine`: prefill, decode and batched-decode throughput of the engine in this process.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Subcommand};
use flotilla_engine::{sampling::argmax, Model, SeqStep, Shard, StageInput, DEFAULT_MODEL_PATH};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Subcommand, Debug)]
pub enum BenchWhat {
    /// Engine throughput on one machine (no cluster).
    Engine(EngineArgs),
    /// Load on an OpenAI-compatible server: throughput, time to first token, inter-token latency.
    Load(crate::cmd::load::LoadArgs),
}

#[derive(Args, Debug)]
pub struct EngineArgs {
    #[arg(long, default_value = DEFAULT_MODEL_PATH, env = "FLOTILLA_MODEL")]
    pub model: PathBuf,
    /// Compute threads (a pool has at most 48; the report gives the count used).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens generated for the decode measurements.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Also measure aggregate decode throughput of this many concurrent sequences.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Timed runs per measurement (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    threads: usize,
    kernel: String,
    prompt_tokens: usize,
    gen_tokens: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_decode_tok_s: Option<f64>,
    runs: usize,
    /// Each compute thread's learnt share of the pool's speed at the end (`engine::pool`): far from
    /// even when a core ran slower than the other during the runs.
    thread_shares: Vec<f64>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchWhat::Engine(a) => engine(a),
        BenchWhat::Load(a) => crate::cmd::load::run(a),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Deterministic prompt ids of length `n` from ordinary text.
fn prompt(model: &Model, n: usize) -> anyhow::Result<Vec<u32>> {
    let text = "The history of navigation is a story of people learning to read the sky, the sea and the wind. ";
    let base = model.tokenizer().encode(text, false)?;
    Ok(base.iter().copied().cycle().take(n).collect())
}

fn one(shard: &Shard, cache: &mut flotilla_engine::KvCache, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
    let out = shard.forward(&mut [SeqStep { cache, input: StageInput::Tokens(tokens) }])?;
    out.into_iter().next().and_then(|o| o.into_logits()).context("the full model returns logits")
}

fn engine(a: EngineArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.runs >= 1 && a.prompt_tokens >= 1 && a.gen_tokens >= 1, "--runs, --prompt-tokens and --gen-tokens must be at least 1");
    anyhow::ensure!(a.batch != Some(0), "--batch must be at least 1");
    let mut model = Model::open(&a.model).with_context(|| format!("loading {}", a.model.display()))?;
    let layers = model.config().n_layers;
    let shard = model.load_shard(0..layers)?;
    let tokens = prompt(&model, a.prompt_tokens)?;
    let pool = flotilla_engine::pool::Pool::new(a.threads);
    let (prefill, decode, batched) = pool.install(|| -> anyhow::Result<(f64, f64, Option<f64>)> {
        let mut prefill = Vec::new();
        let mut decode = Vec::new();
        for run in 0..=a.runs {
            let mut cache = shard.new_cache();
            let t = Instant::now();
            let mut logits = one(&shard, &mut cache, &tokens)?;
            let p = a.prompt_tokens as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            for _ in 0..a.gen_tokens {
                let next = argmax(&logits);
                logits = one(&shard, &mut cache, &[next])?;
            }
            let d = a.gen_tokens as f64 / t.elapsed().as_secs_f64();
            if run > 0 {
                prefill.push(p);
                decode.push(d);
            }
        }
        let batched = match a.batch {
            None => None,
            Some(b) => {
                let mut rates = Vec::new();
                let short = &tokens[..tokens.len().min(16)];
                for run in 0..=a.runs {
                    let mut caches: Vec<_> = (0..b).map(|_| shard.new_cache()).collect();
                    let mut next: Vec<u32> = Vec::with_capacity(b);
                    for (i, c) in caches.iter_mut().enumerate() {
                        // different prompt lengths per sequence, as a server sees
                        let p = &short[..1 + i % short.len()];
                        next.push(argmax(&one(&shard, c, p)?));
                    }
                    let t = Instant::now();
                    for _ in 0..a.gen_tokens {
                        let inputs: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
                        let mut steps: Vec<SeqStep> =
                            caches.iter_mut().zip(&inputs).map(|(c, t)| SeqStep { cache: c, input: StageInput::Tokens(t) }).collect();
                        let out = shard.forward(&mut steps)?;
                        next = out.into_iter().map(|o| o.into_logits().map(|l| argmax(&l)).unwrap_or(0)).collect();
                    }
                    if run > 0 {
                        rates.push((b * a.gen_tokens) as f64 / t.elapsed().as_secs_f64());
                    }
                }
                Some(median(rates))
            }
        };
        Ok((median(prefill), median(decode), batched))
    })?;
    let report = Report {
        model: model.config().name.clone(),
        threads: pool.threads(),
        kernel: format!("{:?}", flotilla_engine::quant::simd::detected()),
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        prefill_tok_s: prefill,
        decode_tok_s: decode,
        batch: a.batch,
        batch_decode_tok_s: batched,
        runs: a.runs,
        thread_shares: pool.shares(),
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("model {} | threads {} | kernel {}", report.model, report.threads, report.kernel);
        println!("prefill ({} tokens): {:.1} tok/s", a.prompt_tokens, prefill);
        println!("decode  ({} tokens): {:.1} tok/s", a.gen_tokens, decode);
        if let (Some(b), Some(r)) = (a.batch, batched) {
            println!("batched decode ({b} sequences): {r:.1} tok/s aggregate ({:.1}x single-stream)", r / decode);
        }
        if report.thread_shares.len() > 1 {
            let shares: Vec<String> = report.thread_shares.iter().map(|s| format!("{:.0}%", s * 100.0)).collect();
            println!("threads' learnt shares of the speed: {}", shares.join(" / "));
        }
    }
    Ok(())
}
