//! `flotilla node`: the daemon. Loads the layered configuration, starts the node supervisor, and
//! turns SIGINT/SIGTERM into a clean leave.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use flotilla_actors::membership::{Identity, SharedIdentity};
use flotilla_actors::sessions::{Registry, ServeContext};
use flotilla_actors::supervisor::{NodeSupervisor, SupervisorArgs, SupervisorMsg};
use flotilla_config::{NodeConfig, Overrides};
use flotilla_engine::Model;
use ractor::Actor;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// TOML configuration file (layered over the built-in defaults, under FLOTILLA__SECTION__KEY variables and these flags).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Node name, unique in the cluster (node.name).
    #[arg(long)]
    pub name: Option<String>,
    /// Relative weight for placement (node.capacity).
    #[arg(long)]
    pub capacity: Option<f64>,
    /// IP:port the cluster server listens on (cluster.listen).
    #[arg(long)]
    pub cluster_listen: Option<String>,
    /// IP:port of the HTTP API (http.listen).
    #[arg(long)]
    pub http_listen: Option<String>,
    /// host:port of nodes to join through, comma-separated (cluster.seeds).
    #[arg(long, value_delimiter = ',')]
    pub seeds: Option<Vec<String>>,
    /// GGUF model file (model.path).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// Loads and validates the configuration from the file, the process environment and the flags.
pub fn config(args: &NodeArgs) -> anyhow::Result<NodeConfig> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let flags = Overrides {
        name: args.name.clone(),
        capacity: args.capacity,
        cluster_listen: args.cluster_listen.clone(),
        http_listen: args.http_listen.clone(),
        seeds: args.seeds.clone(),
        cookie: None,
        model: args.model.clone(),
    };
    let cfg = flotilla_config::load(args.config.as_deref(), &env, &flags)?;
    Ok(cfg.validate()?)
}

pub fn run(args: NodeArgs) -> anyhow::Result<i32> {
    let config = config(&args)?;
    let threads = if config.threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { config.threads };
    flotilla_engine::pool::set_global(threads);
    // The model's header and tokenizer (not its weights: workers load the layers the placement gives them).
    let model = Model::open(&config.model_path).with_context(|| format!("model.path: cannot open {}", config.model_path.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("flotilla-io").enable_all().build()?;
    rt.block_on(serve(config, model))
}

async fn serve(config: NodeConfig, model: Model) -> anyhow::Result<i32> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let exit_code = Arc::new(AtomicI32::new(1));
    let leave_timeout = config.leave_timeout;
    tracing::info!(name = %config.name, cluster = %config.cluster_listen, http = %config.http_listen, seeds = ?config.seed_addrs(), "flotilla node starting");
    let http =
        tokio::net::TcpListener::bind(config.http_listen).await.with_context(|| format!("http.listen: cannot listen on {}", config.http_listen))?;
    let identity: SharedIdentity =
        Arc::new(Mutex::new(Identity::new(config.name.clone(), config.cluster_addr(), config.http_listen.to_string(), config.capacity)));
    let registry = Registry::default();
    let model_id = config
        .model_id
        .clone()
        .unwrap_or_else(|| config.model_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()));
    flotilla_actors::metrics::init(&config.name, &model_id);
    let cfg = model.config().clone();
    let ctx = Arc::new(ServeContext::new(
        config.name.clone(),
        identity.clone(),
        registry.clone(),
        model.tokenizer().clone(),
        cfg.context_length,
        config.resume_wait,
    ));
    let max_body = config.max_body_bytes;
    let api_keys = config.api_keys.clone();
    let args = SupervisorArgs { config, exit_code: exit_code.clone(), identity, registry, n_layers: cfg.n_layers as u32 };
    let (sup, handle) = Actor::spawn(Some("supervisor".into()), NodeSupervisor, args).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let state = crate::http::AppState { ctx, model_id, chat: model.chat_template().clone(), api_keys };
    let app = crate::http::router(Arc::new(state), max_body);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(http, app).await {
            tracing::error!(error = %e, "the HTTP server stopped");
        }
    });
    let mut handle = handle;
    tokio::select! {
        r = &mut handle => {
            r.context("the node supervisor panicked")?;
            return Ok(exit_code.load(Ordering::SeqCst));
        }
        _ = term.recv() => sup.cast(SupervisorMsg::Leave("SIGTERM".into())).map_err(|e| anyhow::anyhow!("{e}"))?,
        _ = int.recv() => sup.cast(SupervisorMsg::Leave("SIGINT".into())).map_err(|e| anyhow::anyhow!("{e}"))?,
    }
    // Leaving: bounded, and a second signal ends it at once.
    tokio::select! {
        r = tokio::time::timeout(leave_timeout + Duration::from_secs(1), &mut handle) => match r {
            Ok(_) => Ok(exit_code.load(Ordering::SeqCst)),
            Err(_) => {
                tracing::error!(?leave_timeout, "leaving took too long; exiting anyway");
                Ok(1)
            }
        },
        _ = term.recv() => Ok(130),
        _ = int.recv() => Ok(130),
    }
}
