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
    /// After the runs, trace one more prefill and decode (and with `--batch`, the batched decode) on each
    /// pool of two or more threads and print (to standard error) where a step's time went: outside the
    /// parallel regions (the steps one thread runs while the others wait), and in each kind of region, its
    /// parts' times, how late the workers joined and how long the submitter waited for them.
    #[arg(long)]
    pub trace: bool,
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
    } else {
        print_report(&a, &report);
    }
    if a.trace {
        for (pool, option) in pools.iter().zip(["--threads", "--vs-threads"]).filter(|(p, _)| p.threads() > 1) {
            let (prefill, decode) = pool.install(|| traced_stream(pool, &shard, &tokens, a.gen_tokens))?;
            let name = format!("trace, {option} {}", pool.threads());
            eprint!("{name}: prefill of {} tokens\n{prefill}", tokens.len());
            eprint!("{name}: {} decode steps\n{decode}", a.gen_tokens);
            if let Some(b) = a.batch {
                let steps = pool.install(|| traced_batch(pool, &shard, &tokens, b, a.gen_tokens))?;
                eprint!("{name}: {} batched decode steps of {b} sequences\n{steps}", a.gen_tokens);
            }
        }
    }
    Ok(())
}

fn print_report(a: &EngineArgs, report: &Report) {
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
}

/// A prefill of `tokens`, then `gen` greedy decode steps after it: (prefill, decode) tok/s.
fn single_stream(shard: &Shard, tokens: &[u32], gen: usize) -> anyhow::Result<(f64, f64)> {
    let [start, prefilled, end] = stream(shard, tokens, gen, Instant::now)?;
    Ok((tokens.len() as f64 / (prefilled - start).as_secs_f64(), gen as f64 / (end - prefilled).as_secs_f64()))
}

/// A prefill of `tokens`, then `gen` greedy decode steps after it, on a new cache: `now()` before the
/// prefill, after it, and after the last step.
fn stream<T>(shard: &Shard, tokens: &[u32], gen: usize, now: impl Fn() -> T) -> anyhow::Result<[T; 3]> {
    let mut cache = shard.new_cache();
    let start = now();
    let mut logits = one(shard, &mut cache, tokens)?;
    let prefilled = now();
    for _ in 0..gen {
        let next = argmax(&logits);
        logits = one(shard, &mut cache, &[next])?;
    }
    Ok([start, prefilled, now()])
}

/// [`single_stream`] once more with `pool`'s regions traced: where the prefill's and the decode steps'
/// time went.
fn traced_stream(pool: &flotilla_engine::pool::Pool, shard: &Shard, tokens: &[u32], gen: usize) -> anyhow::Result<(StepTrace, StepTrace)> {
    let ([t0, t1, t2], regions) = traced(pool, |now| stream(shard, tokens, gen, now))?;
    Ok((StepTrace::of(t0..t1, 1, &regions), StepTrace::of(t1..t2, gen, &regions)))
}

/// `run` with `pool`'s regions traced, handed the trace's clock: what it returned, and the regions.
fn traced<T>(
    pool: &flotilla_engine::pool::Pool,
    run: impl FnOnce(&dyn Fn() -> u64) -> anyhow::Result<T>,
) -> anyhow::Result<(T, Vec<flotilla_engine::pool::RegionTrace>)> {
    pool.trace_start();
    let ran = run(&|| pool.trace_ns());
    let regions = pool.trace_stop();
    Ok((ran?, regions))
}

/// Where the time of some consecutive steps went, from a trace of their parallel regions.
#[derive(Debug, PartialEq)]
struct StepTrace {
    steps: usize,
    /// All the steps' time, and the part of it outside every region (ns).
    total: u64,
    outside: u64,
    /// By kind of region (parts or tasks, and the units they cover): the sums over its regions.
    kinds: std::collections::BTreeMap<(bool, usize), KindTimes>,
}

/// Sums over the regions of one kind (ns).
#[derive(Debug, Default, PartialEq)]
struct KindTimes {
    regions: usize,
    /// open to the submitter's own part done
    own: u64,
    /// the submitter's own part done to the parts of the workers that had not joined done
    late_parts: u64,
    /// those done to end: the submitter waiting for the joined workers
    waited: u64,
    /// the joined workers': open to joining, and joining to finishing their work
    joins: usize,
    late: u64,
    worked: u64,
}

impl KindTimes {
    /// Open to end, summed.
    fn time(&self) -> u64 {
        self.own + self.late_parts + self.waited
    }
}

impl StepTrace {
    /// `steps` steps that ran in `span` (ns on the trace's clock), from the regions among `regions` that
    /// opened in it (the steps ran one after another on the submitting thread, so each of those regions
    /// also ended in it).
    fn of(span: std::ops::Range<u64>, steps: usize, regions: &[flotilla_engine::pool::RegionTrace]) -> Self {
        let mut kinds: std::collections::BTreeMap<(bool, usize), KindTimes> = Default::default();
        for r in regions.iter().filter(|r| span.contains(&r.open)) {
            let k = kinds.entry((r.parts, r.units)).or_default();
            k.regions += 1;
            k.own += r.own_done - r.open;
            k.late_parts += r.others_done - r.own_done;
            k.waited += r.end - r.others_done;
            for &(_, joined, left) in &r.workers {
                k.joins += 1;
                k.late += joined.saturating_sub(r.open);
                k.worked += left.saturating_sub(joined);
            }
        }
        let inside: u64 = kinds.values().map(KindTimes::time).sum();
        let total = span.end - span.start;
        StepTrace { steps, total, outside: total.saturating_sub(inside), kinds }
    }
}

impl std::fmt::Display for StepTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let steps = self.steps.max(1) as f64;
        let us = |ns: u64, n: usize| ns as f64 / n.max(1) as f64 / 1e3;
        writeln!(
            f,
            "  {:.1} us a step, {:.1}% of it outside the parallel regions. By kind of region: its count a step | us a region: all of it, the submitter's own part, the parts of workers that had not joined (run by the submitter), the submitter's wait for the joined workers | workers joined a region | us per joined worker: its lateness in joining, its part",
            self.total as f64 / steps / 1e3,
            100.0 * self.outside as f64 / self.total.max(1) as f64
        )?;
        for (&(parts, units), k) in &self.kinds {
            let kind = if parts { format!("parts of {units} units") } else { format!("{units} tasks") };
            writeln!(
                f,
                "  {kind:>22}: {:>6.1} a step | {:>8.2} {:>8.2} {:>6.2} {:>6.2} | {:>4.2} | {:>6.2} {:>8.2}",
                k.regions as f64 / steps,
                us(k.time(), k.regions),
                us(k.own, k.regions),
                us(k.late_parts, k.regions),
                us(k.waited, k.regions),
                k.joins as f64 / k.regions.max(1) as f64,
                us(k.late, k.joins),
                us(k.worked, k.joins)
            )?;
        }
        Ok(())
    }
}

/// `b` sequences (prompts of 1..16 of `tokens`) decoding `gen` steps together, one forward each: aggregate
/// tok/s.
fn batched(shard: &Shard, tokens: &[u32], b: usize, gen: usize) -> anyhow::Result<f64> {
    let [start, end] = batch(shard, tokens, b, gen, Instant::now)?;
    Ok((b * gen) as f64 / (end - start).as_secs_f64())
}

/// `b` sequences prefilled one by one, then `gen` decode steps of all of them in one forward each: `now()`
/// before the first of those steps and after the last.
fn batch<T>(shard: &Shard, tokens: &[u32], b: usize, gen: usize, now: impl Fn() -> T) -> anyhow::Result<[T; 2]> {
    let short = &tokens[..tokens.len().min(16)];
    let mut caches: Vec<_> = (0..b).map(|_| shard.new_cache()).collect();
    let mut next: Vec<u32> = Vec::with_capacity(b);
    for (i, c) in caches.iter_mut().enumerate() {
        // different prompt lengths per sequence, as a server sees
        let p = &short[..1 + i % short.len()];
        next.push(argmax(&one(shard, c, p)?));
    }
    let start = now();
    for _ in 0..gen {
        let inputs: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut steps: Vec<SeqStep> = caches.iter_mut().zip(&inputs).map(|(c, t)| SeqStep { cache: c, input: StageInput::Tokens(t) }).collect();
        let out = shard.forward(&mut steps)?;
        next = out.into_iter().map(|o| o.into_logits().map(|l| argmax(&l)).unwrap_or(0)).collect();
    }
    Ok([start, now()])
}

/// [`batched`] once more with `pool`'s regions traced: where its decode steps' time went.
fn traced_batch(pool: &flotilla_engine::pool::Pool, shard: &Shard, tokens: &[u32], b: usize, gen: usize) -> anyhow::Result<StepTrace> {
    let ([t0, t1], regions) = traced(pool, |now| batch(shard, tokens, b, gen, now))?;
    Ok(StepTrace::of(t0..t1, gen, &regions))
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
    fn a_step_trace_sums_each_kind_of_region_and_the_time_outside_them() {
        use flotilla_engine::pool::RegionTrace;
        // times in us, the trace's in ns
        let region = |parts, units, [open, own_done, others_done, end]: [u64; 4], workers: &[(u64, u64)]| RegionTrace {
            tasks: 2,
            parts,
            units,
            open: open * 1000,
            own_done: own_done * 1000,
            others_done: others_done * 1000,
            end: end * 1000,
            workers: workers.iter().map(|&(j, l)| (1, j * 1000, l * 1000)).collect(),
        };
        let regions = vec![
            // before the steps
            region(true, 36, [0, 5, 5, 8], &[]),
            region(true, 36, [100, 110, 110, 120], &[(101, 119)]),
            region(false, 3, [130, 150, 150, 160], &[(133, 158)]),
            region(true, 36, [200, 204, 204, 212], &[(203, 210)]),
            // the worker did not join: its part ran on the submitter
            region(true, 36, [250, 260, 270, 270], &[]),
            // after the steps (one opening right at their end)
            region(false, 3, [300, 301, 301, 302], &[]),
        ];
        let t = StepTrace::of(100_000..300_000, 2, &regions);
        assert_eq!((t.steps, t.total), (2, 200_000));
        assert_eq!(t.outside, 200_000 - (20 + 30 + 12 + 20) * 1000);
        assert_eq!(t.kinds.len(), 2);
        let k = |regions: usize, [own, late_parts, waited]: [u64; 3], joins: usize, late: u64, worked: u64| KindTimes {
            regions,
            own: own * 1000,
            late_parts: late_parts * 1000,
            waited: waited * 1000,
            joins,
            late: late * 1000,
            worked: worked * 1000,
        };
        assert_eq!(t.kinds[&(true, 36)], k(3, [24, 10, 18], 2, 4, 25));
        assert_eq!(t.kinds[&(false, 3)], k(1, [20, 0, 10], 1, 3, 25));
        assert_eq!((t.kinds[&(true, 36)].time(), t.kinds[&(false, 3)].time()), (52_000, 30_000));
        let text = t.to_string();
        assert!(text.starts_with("  100.0 us a step, 59.0% of it outside the parallel regions."), "{text}");
        assert!(text.contains("parts of 36 units:    1.5 a step |    17.33     8.00   3.33   6.00 | 0.67 |   2.00    12.50"), "{text}");
        assert!(text.contains("3 tasks:    0.5 a step |    30.00    20.00   0.00  10.00 | 1.00 |   3.00    25.00"), "{text}");
    }

    #[test]
    fn paired_is_the_median_of_each_runs_ratio() {
        // the ratio of the medians would be 4 / 1 = 4
        assert_eq!(paired(&[2.0, 9.0, 4.0], &[1.0, 3.0, 1.0]), Some(3.0));
        assert_eq!(paired(&[], &[]), None);
    }
}
