//! The `flotilla` binary.

mod cmd;
mod http;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc: the engine's forward pass allocates and frees its activations,
/// 8-bit rows and kernel layouts layer by layer, and glibc's frees and consolidations took 15-20% of a
/// one-thread prefill (BENCHMARKS.md, 2026-12-02 Sapphire Rapids).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// flotilla: an elastic, actor-based LLM inference cluster.
#[derive(Parser)]
#[command(name = "flotilla", version, about)]
struct Cli {
    /// Log format on stderr (the level comes from RUST_LOG; default: info for `node`, warn otherwise).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a cluster node (the daemon).
    Node(cmd::node::NodeArgs),
    /// Operate a running cluster through any node's admin actor.
    Admin(cmd::admin::AdminArgs),
    /// Start a local N-node cluster on 127.0.0.1 and stop it on Ctrl-C.
    Up(cmd::up::UpArgs),
    /// Generate text from a prompt in this process (optionally split into pipeline stages).
    Generate(cmd::generate::GenerateArgs),
    /// Benchmarks (`flotilla bench engine`).
    Bench(cmd::bench::BenchArgs),
    /// Probe a node's HTTP endpoint (default `/ready`): exit 0 when it answers 200 (container health checks).
    Health(cmd::health::HealthArgs),
}

fn main() {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Node(_)) { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => fmt.init(),
        LogFormat::Json => fmt.json().init(),
    }
    let result = match cli.command {
        Command::Node(args) => cmd::node::run(args),
        Command::Admin(args) => cmd::admin::run(args),
        Command::Up(args) => cmd::up::run(args),
        Command::Generate(args) => cmd::generate::run(args).map(|()| 0),
        Command::Bench(args) => cmd::bench::run(args).map(|()| 0),
        Command::Health(args) => cmd::health::run(args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
