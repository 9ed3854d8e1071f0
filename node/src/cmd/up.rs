//! `flotilla up`: a local N-node cluster of `flotilla node` processes on 127.0.0.1.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
    /// Cluster port of node1; node K listens on base + K - 1.
    #[arg(long, default_value_t = 7400)]
    pub cluster_port: u16,
    /// HTTP port of node1; node K listens on base + K - 1.
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// Configuration file every node reads (flags below override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// GGUF model file.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

struct Node {
    name: String,
    child: Child,
}

pub fn run(args: UpArgs) -> anyhow::Result<i32> {
    if args.nodes == 0 || args.nodes > 64 {
        anyhow::bail!("--nodes must be between 1 and 64");
    }
    for (what, base) in [("--cluster-port", args.cluster_port), ("--http-port", args.http_port)] {
        if base == 0 || base.checked_add(args.nodes - 1).is_none() {
            anyhow::bail!("{what} {base} leaves no room for {} nodes", args.nodes);
        }
    }
    let exe = std::env::current_exe().context("locating the flotilla binary")?;
    let seeds: Vec<String> = (0..args.nodes).map(|k| format!("127.0.0.1:{}", args.cluster_port + k)).collect();
    // Share the cores between the nodes unless told otherwise.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / args.nodes as usize).max(1).to_string();
    let mut nodes = Vec::new();
    println!("{:<8} {:<20} {:<20}", "NODE", "CLUSTER", "HTTP");
    for k in 0..args.nodes {
        let name = format!("node{}", k + 1);
        let cluster = format!("127.0.0.1:{}", args.cluster_port + k);
        let http = format!("127.0.0.1:{}", args.http_port + k);
        let mut cmd = Command::new(&exe);
        if std::env::var_os("FLOTILLA__NODE__THREADS").is_none() {
            cmd.env("FLOTILLA__NODE__THREADS", &threads);
        }
        cmd.arg("node").args(["--name", &name, "--cluster-listen", &cluster, "--http-listen", &http, "--seeds", &seeds.join(",")]);
        if let Some(c) = &args.config {
            cmd.arg("--config").arg(c);
        }
        if let Some(m) = &args.model {
            cmd.arg("--model").arg(m);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut nodes);
                return Err(e).context(format!("starting {name}"));
            }
        };
        prefix_lines(&name, child.stdout.take());
        prefix_lines(&name, child.stderr.take());
        println!("{name:<8} {cluster:<20} {http:<20}");
        nodes.push(Node { name, child });
    }
    println!(
        "{} nodes started. OpenAI API: http://127.0.0.1:{}/v1 (any node); `flotilla admin --node {} status` shows the cluster; Ctrl-C stops them all.",
        args.nodes, args.http_port, seeds[0]
    );
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let code = rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick() => {
                    let mut alive = 0;
                    for n in nodes.iter_mut() {
                        match n.child.try_wait() {
                            Ok(None) => alive += 1,
                            Ok(Some(status)) => {
                                if n.name != "-" {
                                    eprintln!("{} exited ({status})", n.name);
                                    n.name = "-".into();
                                }
                            }
                            Err(_) => {}
                        }
                    }
                    if alive == 0 {
                        return anyhow::Ok(1);
                    }
                }
            }
        }
        anyhow::Ok(0)
    })?;
    stop_all(&mut nodes);
    Ok(code)
}

/// Copies a node's output to stderr, each line prefixed with the node's name.
fn prefix_lines(name: &str, out: Option<impl Read + Send + 'static>) {
    let Some(out) = out else { return };
    let name = name.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            eprintln!("[{name}] {line}");
        }
    });
}

/// SIGTERM to every node (each leaves cleanly), then SIGKILL to any still running after 10 s.
fn stop_all(nodes: &mut [Node]) {
    for n in nodes.iter() {
        let _ = kill(Pid::from_raw(n.child.id() as i32), Signal::SIGTERM);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for n in nodes.iter_mut() {
        loop {
            match n.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if std::time::Instant::now() > deadline => {
                    let _ = n.child.kill();
                    let _ = n.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}
