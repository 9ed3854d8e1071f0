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
    /// Also measure with this many compute threads, run by run in turns with `--threads`, and report
    /// its speedups over `--threads`: each run's ratio to the `--threads` run beside it (before it in
    /// odd runs, after it in even ones), the median over the runs (a shared host's speed drifts
    /// between minutes; a pair of runs seconds apart sees the same host).
    #[arg(long)]
    pub vs_threads: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    kernel: String,
    prompt_tokens: usize,
    gen_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    runs: usize,
    #[serde(flatten)]
    figures: Figures,
    /// The same measurements with `--vs-threads` threads, in turns with these.
    #[serde(skip_serializing_if = "Option::is_none")]
    vs_threads: Option<VsReport>,
}

/// One thread count's figures: the medians over its runs, and its pool's learnt shares at the end.
#[derive(Serialize)]
struct Figures {
    threads: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_decode_tok_s: Option<f64>,
    /// Each run's batched decode over its single-stream decode, the median over the runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_over_decode: Option<f64>,
    /// Each compute thread's learnt share of the pool's speed at the end (`engine::pool`): far from
    /// even when a core ran slower than the other during the runs.
    thread_shares: Vec<f64>,
}

impl Figures {
    fn of(pool: &flotilla_engine::pool::Pool, r: &Runs) -> Self {
        Figures {
            threads: pool.threads(),
            prefill_tok_s: median(r.prefill.clone()),
            decode_tok_s: median(r.decode.clone()),
            batch_decode_tok_s: (!r.batched.is_empty()).then(|| median(r.batched.clone())),
            batch_over_decode: paired(&r.batched, &r.decode),
            thread_shares: pool.shares(),
        }
    }
}

/// The measurements with `--vs-threads` threads, and their speedups over `--threads`: each run's ratio
/// to the `--threads` run beside it, the median over the runs.
#[derive(Serialize)]
struct VsReport {
    #[serde(flatten)]
    figures: Figures,
    prefill_speedup: f64,
    decode_speedup: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_decode_speedup: Option<f64>,
}

/// One thread count's timed runs, in run order.
#[derive(Default)]
struct Runs {
    prefill: Vec<f64>,
    decode: Vec<f64>,
    batched: Vec<f64>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchWhat::Engine(a) => engine(a),
        BenchWhat::Load(a) => crate::cmd::load::run(a),
    }
}

/// The middle value, or the mean of the two middle values of an even count.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n.is_multiple_of(2) {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    } else {
        v[n / 2]
    }
}

/// The median of the runs' ratios `top[i] / bottom[i]`; `None` without runs.
fn paired(top: &[f64], bottom: &[f64]) -> Option<f64> {
    (!top.is_empty()).then(|| median(top.iter().zip(bottom).map(|(t, b)| t / b).collect()))
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
    let pools: Vec<_> = std::iter::once(a.threads).chain(a.vs_threads).map(flotilla_engine::pool::Pool::new).collect();
    let mut runs: Vec<Runs> = pools.iter().map(|_| Runs::default()).collect();
    // Run 0 is the warm-up. In each run every thread count measures the single stream, then the batch,
    // one right after the other, so the ratios compare runs seconds apart; the thread counts take turns
    // going first, so neither gains from its place.
    for run in 0..=a.runs {
        let order: Vec<usize> = if run % 2 == 1 { (0..pools.len()).collect() } else { (0..pools.len()).rev().collect() };
        for &i in &order {
            let (p, d) = pools[i].install(|| single_stream(&shard, &tokens, a.gen_tokens))?;
            if run > 0 {
                runs[i].prefill.push(p);
                runs[i].decode.push(d);
            }
        }
        if let Some(b) = a.batch {
            for &i in &order {
                let rate = pools[i].install(|| batched(&shard, &tokens, b, a.gen_tokens))?;
                if run > 0 {
                    runs[i].batched.push(rate);
                }
            }
        }
    }
    let kernel = format!("{:?}", flotilla_engine::quant::simd::detected());
    let base = &runs[0];
    let vs = (pools.len() > 1).then(|| {
        let r = &runs[1];
        VsReport {
            figures: Figures::of(&pools[1], r),
            prefill_speedup: paired(&r.prefill, &base.prefill).expect("at least one run"),
            decode_speedup: paired(&r.decode, &base.decode).expect("at least one run"),
            batch_decode_speedup: paired(&r.batched, &base.batched),
        }
    });
    let report = Report {
        model: model.config().name.clone(),
        kernel,
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        batch: a.batch,
        runs: a.runs,
        figures: Figures::of(&pools[0], base),
        vs_threads: vs,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let r = &report.figures;
    println!("model {} | threads {} | kernel {}", report.model, r.threads, report.kernel);
    println!("prefill ({} tokens): {:.1} tok/s", a.prompt_tokens, r.prefill_tok_s);
    println!("decode  ({} tokens): {:.1} tok/s", a.gen_tokens, r.decode_tok_s);
    if let (Some(b), Some(rate), Some(x)) = (a.batch, r.batch_decode_tok_s, r.batch_over_decode) {
        println!("batched decode ({b} sequences): {rate:.1} tok/s aggregate ({x:.2}x single-stream)");
    }
    print_shares(&r.thread_shares);
    if let Some(v) = &report.vs_threads {
        let f = &v.figures;
        println!("with {} threads, each run beside one with {}:", f.threads, r.threads);
        println!("prefill: {:.1} tok/s ({:.2}x)", f.prefill_tok_s, v.prefill_speedup);
        println!("decode:  {:.1} tok/s ({:.2}x)", f.decode_tok_s, v.decode_speedup);
        if let (Some(rate), Some(x), Some(up)) = (f.batch_decode_tok_s, f.batch_over_decode, v.batch_decode_speedup) {
            println!("batched decode: {rate:.1} tok/s aggregate ({x:.2}x single-stream; {up:.2}x)");
        }
        print_shares(&f.thread_shares);
    }
    Ok(())
}

/// A prefill of `tokens`, then `gen` greedy decode steps after it: (prefill, decode) tok/s.
fn single_stream(shard: &Shard, tokens: &[u32], gen: usize) -> anyhow::Result<(f64, f64)> {
    let mut cache = shard.new_cache();
    let t = Instant::now();
    let mut logits = one(shard, &mut cache, tokens)?;
    let prefill = tokens.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..gen {
        let next = argmax(&logits);
        logits = one(shard, &mut cache, &[next])?;
    }
    Ok((prefill, gen as f64 / t.elapsed().as_secs_f64()))
}

/// `b` sequences (prompts of 1..16 of `tokens`) decoding `gen` steps together, one forward each: aggregate
/// tok/s.
fn batched(shard: &Shard, tokens: &[u32], b: usize, gen: usize) -> anyhow::Result<f64> {
    let short = &tokens[..tokens.len().min(16)];
    let mut caches: Vec<_> = (0..b).map(|_| shard.new_cache()).collect();
    let mut next: Vec<u32> = Vec::with_capacity(b);
    for (i, c) in caches.iter_mut().enumerate() {
        // different prompt lengths per sequence, as a server sees
        let p = &short[..1 + i % short.len()];
        next.push(argmax(&one(shard, c, p)?));
    }
    let t = Instant::now();
    for _ in 0..gen {
        let inputs: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut steps: Vec<SeqStep> = caches.iter_mut().zip(&inputs).map(|(c, t)| SeqStep { cache: c, input: StageInput::Tokens(t) }).collect();
        let out = shard.forward(&mut steps)?;
        next = out.into_iter().map(|o| o.into_logits().map(|l| argmax(&l)).unwrap_or(0)).collect();
    }
    Ok((b * gen) as f64 / t.elapsed().as_secs_f64())
}

/// The threads' learnt shares, where a pool has more than one thread.
fn print_shares(shares: &[f64]) {
    if shares.len() > 1 {
        let shares: Vec<String> = shares.iter().map(|s| format!("{:.0}%", s * 100.0)).collect();
        println!("threads' learnt shares of the speed: {}", shares.join(" / "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle_or_the_mean_of_the_two_middles() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![7.0]), 7.0);
    }

    #[test]
    fn paired_is_the_median_of_each_runs_ratio() {
        // the ratio of the medians would be 4 / 1 = 4
        assert_eq!(paired(&[2.0, 9.0, 4.0], &[1.0, 3.0, 1.0]), Some(3.0));
        assert_eq!(paired(&[], &[]), None);
    }
}
