//! `flotilla generate`: run the model in this process, streaming tokens to stdout.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use flotilla_engine::{split_at, split_even, ChatMessage, Model, Pipeline, SamplingParams, DEFAULT_MODEL_PATH};

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct GenerateArgs {
    /// GGUF model file.
    #[arg(long, default_value = DEFAULT_MODEL_PATH, env = "FLOTILLA_MODEL")]
    pub model: PathBuf,
    /// Prompt text (with --chat, the user message).
    #[arg(long)]
    pub prompt: String,
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (the template's default when absent).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Split the model into K in-process pipeline stages of near-equal size.
    #[arg(long, default_value_t = 1, conflicts_with = "split")]
    pub stages: usize,
    /// Split the model at these layer boundaries instead (e.g. 10,12 gives 0..10, 10..12, 12..end).
    #[arg(long, value_delimiter = ',')]
    pub split: Vec<usize>,
    /// Compute threads.
    #[arg(long, default_value_t = default_threads(), env = "FLOTILLA_THREADS")]
    pub threads: usize,
    /// Print one JSON object (ids, text, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let mut model = Model::open(&args.model).with_context(|| format!("loading model {}", args.model.display()))?;
    let layers = model.config().n_layers;
    let ranges = if args.split.is_empty() { split_even(layers, args.stages)? } else { split_at(layers, &args.split)? };
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ..SamplingParams::default()
    };
    params.validate()?;
    let text = if args.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &args.prompt));
        model.chat_template().render(&msgs, true)?
    } else {
        args.prompt.clone()
    };
    let prompt = model.tokenizer().encode(&text, true)?;
    let pipeline = Pipeline::new(model.load_shards(&ranges)?)?;
    let pool = flotilla_engine::pool::Pool::new(args.threads);
    let json = args.json;
    let generation = pool.install(|| {
        pipeline.generate(model.tokenizer(), &prompt, &params, |piece| {
            if !json {
                let mut out = std::io::stdout();
                let _ = out.write_all(piece.as_bytes());
                let _ = out.flush();
            }
        })
    })?;
    let mut stdout = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut stdout, &generation)?;
    }
    writeln!(stdout)?;
    Ok(())
}
