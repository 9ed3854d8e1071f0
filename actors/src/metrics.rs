//! Every Prometheus metric of a node, defined in one place with help text, units and buckets, in the
//! vocabulary vLLM users know (under the `flotilla_` prefix). Each process has one registry whose
//! metrics all carry the constant labels `node` and `model`; `docs/METRICS.md` lists them.

use std::collections::HashMap;
use std::sync::OnceLock;

use prometheus::{Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// Latency buckets in seconds, from a fast token to a long request.
const LATENCY: &[f64] = &[0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 40.0, 80.0];
/// Forward-pass buckets in seconds.
const FORWARD: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56];
/// Batch sizes (sequences per forward).
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0];
/// Peer round trips in seconds.
const RPC: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5];

pub struct Metrics {
    pub registry: Registry,
    // Requests (counted on the node that owns the request).
    pub requests_running: IntGauge,
    pub requests_waiting: IntGauge,
    pub request_success: IntCounterVec,
    pub request_failures: IntCounterVec,
    pub requests_resumed: IntCounter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub queue_time: Histogram,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    // Worker / stage.
    pub batch_size: Histogram,
    pub forward_seconds: Histogram,
    pub sequences_held: IntGauge,
    pub layers_held: IntGauge,
    pub kv_cache_bytes: IntGauge,
    pub kv_cache_usage: prometheus::Gauge,
    pub shard_load_seconds: Histogram,
    // Mesh.
    pub activation_bytes_sent: IntCounterVec,
    pub heartbeat_rtt: HistogramVec,
    pub heartbeat_misses: IntCounterVec,
    pub bad_messages: IntCounter,
    pub rejected_sessions: IntCounter,
    pub cluster_nodes: IntGaugeVec,
    pub placement_epoch: IntGauge,
    pub rebalances: IntCounter,
    pub is_leader: IntGauge,
    pub cluster_replicas: IntGauge,
    pub cluster_requests_running: IntGauge,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Sets this process's `node` and `model` labels; the first call wins. Call before serving.
pub fn init(node: &str, model: &str) -> &'static Metrics {
    METRICS.get_or_init(|| Metrics::new(node, model))
}

/// The process's metrics (unlabelled if `init` was never called, as in unit tests).
pub fn m() -> &'static Metrics {
    METRICS.get_or_init(|| Metrics::new("", ""))
}

/// The text exposition format of every metric.
pub fn render() -> String {
    let mut buf = Vec::new();
    TextEncoder::new().encode(&m().registry.gather(), &mut buf).expect("text encoding never fails on gathered families");
    String::from_utf8(buf).expect("the text format is UTF-8")
}

fn h(reg: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let x = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid histogram");
    reg.register(Box::new(x.clone())).expect("unique metric");
    x
}

fn c(reg: &Registry, name: &str, help: &str) -> IntCounter {
    let x = IntCounter::new(name, help).expect("valid counter");
    reg.register(Box::new(x.clone())).expect("unique metric");
    x
}

fn cv(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let x = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
    reg.register(Box::new(x.clone())).expect("unique metric");
    x
}

fn g(reg: &Registry, name: &str, help: &str) -> IntGauge {
    let x = IntGauge::new(name, help).expect("valid gauge");
    reg.register(Box::new(x.clone())).expect("unique metric");
    x
}

impl Metrics {
    fn new(node: &str, model: &str) -> Self {
        let labels: HashMap<String, String> = [("node".to_string(), node.to_string()), ("model".to_string(), model.to_string())].into();
        let r = Registry::new_custom(None, Some(labels)).expect("valid labels");
        let cluster_nodes =
            IntGaugeVec::new(Opts::new("flotilla_cluster_nodes", "Members of the cluster by state, as this node sees them."), &["state"])
                .expect("valid gauge");
        r.register(Box::new(cluster_nodes.clone())).expect("unique metric");
        let heartbeat_rtt = HistogramVec::new(
            HistogramOpts::new("flotilla_rpc_latency_seconds", "Heartbeat round trip to each peer, in seconds.").buckets(RPC.to_vec()),
            &["peer"],
        )
        .expect("valid histogram");
        r.register(Box::new(heartbeat_rtt.clone())).expect("unique metric");
        let kv_cache_usage = prometheus::Gauge::new(
            "flotilla_kv_cache_usage_ratio",
            "KV cache positions held over the positions this stage could hold at full context for max_batch sequences (0..1).",
        )
        .expect("valid gauge");
        r.register(Box::new(kv_cache_usage.clone())).expect("unique metric");
        let me = Self {
            requests_running: g(&r, "flotilla_num_requests_running", "Requests this node owns that are generating."),
            requests_waiting: g(&r, "flotilla_num_requests_waiting", "Requests waiting in the active scheduler's queue (leader only; 0 elsewhere)."),
            request_success: cv(&r, "flotilla_request_success_total", "Requests finished, by finish reason (stop or length).", &["finished_reason"]),
            request_failures: cv(
                &r,
                "flotilla_request_failures_total",
                "Requests that did not finish, by reason: busy (429), unavailable (503), invalid (400), cancelled (client went away), failed.",
                &["reason"],
            ),
            requests_resumed: c(
                &r,
                "flotilla_requests_resumed_total",
                "Times a request resumed on a new pipeline after a failure or a placement change.",
            ),
            ttft: h(&r, "flotilla_time_to_first_token_seconds", "Time from admission request to the first generated token, in seconds.", LATENCY),
            itl: h(&r, "flotilla_inter_token_latency_seconds", "Time between consecutive generated tokens of a request, in seconds.", LATENCY),
            e2e: h(&r, "flotilla_e2e_request_latency_seconds", "Time from the request's start to its last token, in seconds.", LATENCY),
            queue_time: h(&r, "flotilla_request_queue_time_seconds", "Time a request waited for admission to a pipeline, in seconds.", LATENCY),
            prompt_tokens: c(&r, "flotilla_prompt_tokens_total", "Prompt tokens of requests this node owns (counted once per finished request)."),
            generation_tokens: c(&r, "flotilla_generation_tokens_total", "Tokens generated for requests this node owns."),
            batch_size: h(&r, "flotilla_batch_size", "Sequences in each batched forward of this node's stage.", BATCH),
            forward_seconds: h(&r, "flotilla_stage_forward_seconds", "Duration of each batched forward of this node's stage, in seconds.", FORWARD),
            sequences_held: g(&r, "flotilla_sequences_held", "Sequences with a KV cache on this node's stage."),
            layers_held: g(&r, "flotilla_layers_held", "Layers this node's worker holds."),
            kv_cache_bytes: g(&r, "flotilla_kv_cache_bytes", "Bytes of KV cache held on this node's stage."),
            kv_cache_usage,
            shard_load_seconds: h(&r, "flotilla_shard_load_seconds", "Time to load an assigned layer range, in seconds.", LATENCY),
            activation_bytes_sent: cv(
                &r,
                "flotilla_activation_bytes_sent_total",
                "Hidden-state bytes sent to the next stage, by peer node.",
                &["peer"],
            ),
            heartbeat_rtt,
            heartbeat_misses: cv(&r, "flotilla_heartbeat_misses_total", "Heartbeats to a peer that failed or timed out, by peer node.", &["peer"]),
            bad_messages: c(&r, "flotilla_bad_messages_total", "Messages from peers that did not decode (wrong protocol version, garbage)."),
            rejected_sessions: c(
                &r,
                "flotilla_rejected_sessions_total",
                "Cluster connections that closed before authenticating (wrong cookie, not a flotilla node).",
            ),
            cluster_nodes,
            placement_epoch: g(&r, "flotilla_placement_epoch", "The highest placement epoch this node knows."),
            rebalances: c(&r, "flotilla_rebalances_total", "New placements published by this node's scheduler (while it was the leader)."),
            is_leader: g(&r, "flotilla_is_leader", "1 on the node whose scheduler is active, 0 elsewhere."),
            cluster_replicas: g(&r, "flotilla_cluster_replicas", "Replicas in the current placement (leader only)."),
            cluster_requests_running: g(&r, "flotilla_cluster_requests_running", "Requests running on all replicas (leader only)."),
            registry: r,
        };
        // Label values known in advance exist from the start, at 0, so that rates and dashboards have series.
        for reason in ["stop", "length"] {
            me.request_success.with_label_values(&[reason]);
        }
        for reason in ["busy", "unavailable", "invalid", "cancelled", "failed"] {
            me.request_failures.with_label_values(&[reason]);
        }
        me
    }
}
