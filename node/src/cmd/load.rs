//! `flotilla bench load`: an OpenAI-compatible load generator. C client threads send N streamed
//! completion requests in total to one or more URLs and measure aggregate generated tokens per second,
//! time to first token and inter-token latency, and count errors.

use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Base URL of an OpenAI-compatible server (repeat to spread requests over several nodes).
    #[arg(long, required = true)]
    pub url: Vec<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Requests in total.
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Tokens generated per request (end of sequence is ignored, so every request generates exactly this many).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Model name sent in each request (default: none, the server's model).
    #[arg(long)]
    pub model: Option<String>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    #[arg(long)]
    pub json: bool,
}

/// Short prompts of 10 to 16 tokens, as in the llama.cpp server reference measurement.
const PROMPTS: [&str; 8] = [
    "Write a short story about a lighthouse keeper and a storm.",
    "Explain why the sky is blue to a curious child.",
    "List some good reasons to learn a second language today.",
    "Describe the smell of rain on a hot summer afternoon.",
    "What makes a good friend? Answer in a few sentences.",
    "Give me three tips for writing clear technical documentation.",
    "Tell me about the history of sailing ships in Europe.",
    "Summarize the plot of a mystery novel you would write.",
];

#[derive(Default)]
struct Samples {
    ttft: Vec<f64>,
    itl: Vec<f64>,
    tokens: usize,
    errors: usize,
    first_error: Option<String>,
}

#[derive(Serialize)]
struct Report {
    urls: Vec<String>,
    concurrency: usize,
    requests: usize,
    max_tokens: u32,
    completed: usize,
    errors: usize,
    wall_s: f64,
    generated_tokens: usize,
    generated_tok_s: f64,
    ttft_p50_s: f64,
    ttft_p99_s: f64,
    itl_p50_s: f64,
    itl_p99_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// One streamed request: (time to first token, gaps between later tokens, generated tokens).
fn one(agent: &ureq::Agent, url: &str, body: &Value) -> Result<(f64, Vec<f64>, usize), String> {
    let t0 = Instant::now();
    let resp = agent.post(&format!("{}/v1/completions", url.trim_end_matches('/'))).send_json(body.clone()).map_err(|e| match e {
        ureq::Error::Status(code, r) => format!("HTTP {code}: {}", r.into_string().unwrap_or_default()),
        e => e.to_string(),
    })?;
    let mut first = None;
    let mut last = t0;
    let mut gaps = Vec::new();
    let mut tokens = 0;
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("bad chunk {data:?}: {e}"))?;
        if let Some(err) = v.get("error") {
            return Err(err.to_string());
        }
        if let Some(u) = v.get("usage").and_then(|u| u["completion_tokens"].as_u64()) {
            tokens = u as usize;
        }
        let text = v["choices"][0]["text"].as_str().unwrap_or("");
        if !text.is_empty() {
            let now = Instant::now();
            match first {
                None => first = Some(now.duration_since(t0).as_secs_f64()),
                Some(_) => gaps.push(now.duration_since(last).as_secs_f64()),
            }
            last = now;
        }
    }
    Ok((first.ok_or("no text came back")?, gaps, tokens))
}

pub fn run(a: LoadArgs) -> anyhow::Result<()> {
    if a.concurrency == 0 || a.requests == 0 {
        anyhow::bail!("--concurrency and --requests must be at least 1");
    }
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(a.timeout)).max_idle_connections_per_host(a.concurrency).build();
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(Samples::default());
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..a.concurrency.min(a.requests) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= a.requests {
                    return;
                }
                let mut body = json!({ "prompt": PROMPTS[i % PROMPTS.len()], "max_tokens": a.max_tokens, "temperature": a.temperature,
                    "seed": i, "stream": true, "stream_options": { "include_usage": true }, "ignore_eos": true });
                if let Some(m) = &a.model {
                    body["model"] = json!(m);
                }
                let r = one(&agent, &a.url[i % a.url.len()], &body);
                let mut s = samples.lock().unwrap();
                match r {
                    Ok((ttft, gaps, tokens)) => {
                        s.ttft.push(ttft);
                        s.itl.extend(gaps);
                        s.tokens += tokens;
                    }
                    Err(e) => {
                        s.errors += 1;
                        s.first_error.get_or_insert(e);
                    }
                }
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    let mut s = samples.into_inner().unwrap();
    let r = Report {
        urls: a.url.clone(),
        concurrency: a.concurrency,
        requests: a.requests,
        max_tokens: a.max_tokens,
        completed: s.ttft.len(),
        errors: s.errors,
        wall_s: wall,
        generated_tokens: s.tokens,
        generated_tok_s: s.tokens as f64 / wall,
        ttft_p50_s: pct(&mut s.ttft, 0.5),
        ttft_p99_s: pct(&mut s.ttft, 0.99),
        itl_p50_s: pct(&mut s.itl, 0.5),
        itl_p99_s: pct(&mut s.itl, 0.99),
        first_error: s.first_error,
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} requests ({} errors) at concurrency {} in {:.2} s: {:.1} generated tok/s; TTFT p50 {:.3} s p99 {:.3} s; ITL p50 {:.1} ms p99 {:.1} ms",
            r.completed,
            r.errors,
            r.concurrency,
            r.wall_s,
            r.generated_tok_s,
            r.ttft_p50_s,
            r.ttft_p99_s,
            r.itl_p50_s * 1e3,
            r.itl_p99_s * 1e3
        );
        if let Some(e) = &r.first_error {
            println!("first error: {e}");
        }
    }
    Ok(())
}
