//! `flotilla admin`: operator commands over the admin actor RPC.

use std::time::Duration;

use clap::{Args, Subcommand};
use flotilla_actors::client::admin_call;
use flotilla_actors::membership::state_name;
use flotilla_actors::{AdminReply, AdminRequest, ClusterStatus};
use flotilla_config::DEFAULT_COOKIE;

#[derive(Args, Debug)]
pub struct AdminArgs {
    /// Cluster address (host:port) of any node.
    #[arg(long, global = true, default_value = "127.0.0.1:7400", env = "FLOTILLA_ADMIN_NODE")]
    pub node: String,
    /// Cluster cookie (default: FLOTILLA_COOKIE, else the built-in loopback cookie).
    #[arg(long, global = true, env = "FLOTILLA_COOKIE", hide_env_values = true)]
    pub cookie: Option<String>,
    /// Seconds to wait for the whole call.
    #[arg(long, global = true, default_value_t = 5.0)]
    pub timeout: f64,
    /// Print one JSON object instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Members, leader, placement epoch, per-node load and recent membership events.
    Status,
    /// Stop giving NODE new work.
    Drain {
        #[arg(value_name = "NODE")]
        target: String,
    },
    /// Undo drain.
    Undrain {
        #[arg(value_name = "NODE")]
        target: String,
    },
    /// Ask the leader for a new placement.
    Rebalance,
    /// Make NODE drain, leave the cluster and exit.
    Shutdown {
        #[arg(value_name = "NODE")]
        target: String,
    },
    /// Chaos testing: make a supervised actor (membership or admin) on NODE panic; needs node.fault_injection there.
    InjectPanic {
        #[arg(value_name = "NODE")]
        target: String,
        /// membership or admin
        child: String,
    },
    /// Chaos testing: NODE closes its link to PEER and refuses reconnections both ways for --ms
    /// milliseconds (both stay connected to the other nodes); needs node.fault_injection on NODE.
    CutLink {
        #[arg(value_name = "NODE")]
        target: String,
        #[arg(value_name = "PEER")]
        peer: String,
        /// How long the link stays cut.
        #[arg(long, default_value_t = 3000)]
        ms: u64,
    },
}

pub fn run(args: AdminArgs) -> anyhow::Result<i32> {
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        anyhow::bail!("--timeout must be a positive number of seconds");
    }
    let req = match args.command {
        AdminCommand::Status => AdminRequest::Status,
        AdminCommand::Drain { target } => AdminRequest::Drain(target),
        AdminCommand::Undrain { target } => AdminRequest::Undrain(target),
        AdminCommand::Rebalance => AdminRequest::Rebalance,
        AdminCommand::Shutdown { target } => AdminRequest::Shutdown(target),
        AdminCommand::InjectPanic { target, child } => AdminRequest::InjectPanic { node: target, child },
        AdminCommand::CutLink { target, peer, ms } => AdminRequest::CutLink { node: target, peer, ms },
    };
    let cookie = args.cookie.unwrap_or_else(|| DEFAULT_COOKIE.to_string());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let reply = rt.block_on(admin_call(&args.node, &cookie, req, Duration::from_secs_f64(args.timeout)))?;
    match reply {
        AdminReply::Status(s) if args.json => println!("{}", serde_json::to_string_pretty(&s)?),
        AdminReply::Status(s) => print_status(&s),
        AdminReply::Done(msg) if args.json => println!("{}", serde_json::json!({ "ok": true, "message": msg })),
        AdminReply::Done(msg) => println!("{msg}"),
        AdminReply::Error(msg) => {
            if args.json {
                println!("{}", serde_json::json!({ "ok": false, "error": msg }));
            }
            anyhow::bail!("{msg}");
        }
    }
    Ok(0)
}

fn print_status(s: &ClusterStatus) {
    println!(
        "answered by {} · leader {} · placement epoch {} · protocol {}",
        s.node,
        s.leader.as_deref().unwrap_or("(none)"),
        s.placement_epoch,
        s.protocol_version
    );
    println!(
        "{:<16} {:<9} {:>14} {:<22} {:<22} {:>8} {:>5} {:>9} {:>8}",
        "NAME", "STATE", "INCARNATION", "CLUSTER", "HTTP", "CAPACITY", "PEERS", "UPTIME", "RSS MiB"
    );
    for m in &s.members {
        println!(
            "{:<16} {:<9} {:>14} {:<22} {:<22} {:>8.2} {:>5} {:>8.0}s {:>8.1}",
            m.name,
            state_name(m.state),
            m.incarnation,
            m.cluster_addr,
            m.http_addr,
            m.capacity,
            m.load.peers,
            m.load.uptime_s,
            m.load.rss_bytes as f64 / (1 << 20) as f64
        );
    }
    match &s.scheduler {
        Some(sch) => {
            let state = if sch.ready { "ready".to_string() } else { format!("not ready: {}", sch.error.as_deref().unwrap_or("loading")) };
            println!("placement ({state}; running {:?}, waiting {}):", sch.running, sch.waiting);
            if let Some(r) = &sch.rebalance {
                let from = r.from_epoch.map_or("none".to_string(), |e| e.to_string());
                match r.ready_at_ms {
                    None => println!(
                        "  rebalance in progress: epoch {from} -> {}, {} layers to load, for {:.1} s; waiting for {}",
                        r.epoch,
                        r.moved_layers,
                        flotilla_actors::membership::unix_ms().saturating_sub(r.planned_at_ms) as f64 / 1000.0,
                        r.pending.join(", ")
                    ),
                    Some(t) => println!(
                        "  last rebalance: epoch {from} -> {}, {} layers loaded, took {:.2} s",
                        r.epoch,
                        r.moved_layers,
                        t.saturating_sub(r.planned_at_ms) as f64 / 1000.0
                    ),
                }
            }
            if let Some(p) = &sch.placement {
                println!("  {:<8} {:<6} {:<16} {:<10} {:>6}", "REPLICA", "STAGE", "NODE", "LAYERS", "EPOCH");
                for (r, rep) in p.replicas.iter().enumerate() {
                    for (st, a) in rep.iter().enumerate() {
                        println!("  {:<8} {:<6} {:<16} {:<10} {:>6}", r, st, a.node, format!("{}..{}", a.start, a.end), p.epoch);
                    }
                }
            }
        }
        None => println!("placement: the leader's scheduler did not answer"),
    }
    if !s.workers.is_empty() {
        println!("workers:");
        println!("  {:<16} {:>6} {:>9} {:>6} {:>10} {:>9} {:>10}", "NODE", "EPOCH", "SEQUENCES", "QUEUE", "LASTBATCH", "BATCHES", "KV MiB");
        for w in &s.workers {
            println!(
                "  {:<16} {:>6} {:>9} {:>6} {:>10} {:>9} {:>10.1}",
                w.node,
                w.epoch,
                w.sequences,
                w.queue_depth,
                w.last_batch,
                w.batches,
                w.kv_bytes as f64 / (1 << 20) as f64
            );
        }
    }
    if !s.events.is_empty() {
        println!("recent membership events:");
        for e in s.events.iter().rev().take(10) {
            let from = e.from.map(state_name).unwrap_or("-");
            println!("  {} {:<16} {:>9} -> {:<9} {}", e.at_ms, e.node, from, state_name(e.to), e.reason);
        }
    }
}
