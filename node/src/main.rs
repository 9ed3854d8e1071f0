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

/// Keeps freed memory mapped instead of returning it to the OS: a batched decode step frees and then
/// allocates again buffers of megabytes (logits, a layer's activations), and with mimalloc's default
/// each came back as fresh pages the kernel zeroed, 4-5% of a 32-sequence step on the Zen 3 host
/// (`clear_page_erms` in `perf`, BENCHMARKS.md). The process then keeps its peak footprint, as
/// llama.cpp's preallocated buffers do. `MIMALLOC_PURGE_DELAY` (or the older `MIMALLOC_RESET_DELAY`) in the
/// environment still wins.
fn keep_freed_memory() {
    use std::ffi::{c_int, c_long};
    // mimalloc's `mi_option_purge_delay` (v2 and v3 headers), 1000 ms in the build we link (10 in older
    // ones); -1: never purge
    const PURGE_DELAY: c_int = 15;
    unsafe extern "C" {
        fn mi_option_get(option: c_int) -> c_long;
        fn mi_option_set(option: c_int, value: c_long);
    }
    // mimalloc reads its variables case-insensitively, and the old name too
    let set_in_env = std::env::vars_os()
        .any(|(k, _)| k.to_str().is_some_and(|k| k.eq_ignore_ascii_case("MIMALLOC_PURGE_DELAY") || k.eq_ignore_ascii_case("MIMALLOC_RESET_DELAY")));
    // SAFETY: plain C calls into the linked mimalloc (Cargo.lock pins it) with a valid option number.
    // The value is changed only while it is one of the purge delay's defaults: an option renumbered in
    // another mimalloc would be touched only if it held one of those values.
    unsafe {
        if !set_in_env && matches!(mi_option_get(PURGE_DELAY), 10 | 1000) {
            mi_option_set(PURGE_DELAY, -1);
        }
    }
}

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
    keep_freed_memory();
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
