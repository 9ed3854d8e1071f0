//! The `flotilla` binary.

mod cmd;

use clap::{Parser, Subcommand};

/// flotilla: an elastic, actor-based LLM inference cluster.
#[derive(Parser)]
#[command(name = "flotilla", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt in this process (optionally split into pipeline stages).
    Generate(cmd::generate::GenerateArgs),
    /// Benchmarks (`flotilla bench engine`).
    Bench(cmd::bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_writer(std::io::stderr).init();
    let result = match cli.command {
        Command::Generate(args) => cmd::generate::run(args),
        Command::Bench(args) => cmd::bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
