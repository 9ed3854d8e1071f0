#!/usr/bin/env python3
"""Writes the Grafana dashboards in dashboards/ from the panel lists below (run after editing them).

Each dashboard has a `$datasource` variable (Prometheus) and a `$node` variable (the `node` label of
flotilla's metrics); every panel query is PromQL over the metrics in docs/METRICS.md.
"""
import json
import pathlib

OUT = pathlib.Path(__file__).resolve().parent.parent / "dashboards"
N = 'node=~"$node"'


def q(expr, legend):
    return {"expr": expr, "legendFormat": legend}


def p50_p99(metric, sel=N, by=""):
    grp = f"le{', ' + by if by else ''}"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [
        q(f"histogram_quantile(0.5, sum by ({grp}) (rate({metric}_bucket{{{sel}}}[1m])))", "p50" + suffix),
        q(f"histogram_quantile(0.99, sum by ({grp}) (rate({metric}_bucket{{{sel}}}[1m])))", "p99" + suffix),
    ]


DASHBOARDS = {
    "flotilla-overview": (
        "flotilla: overview",
        [
            ("Generated tokens / s", "tps", [q(f"sum(rate(flotilla_generation_tokens_total{{{N}}}[1m]))", "generated"), q(f"sum(rate(flotilla_prompt_tokens_total{{{N}}}[1m]))", "prompt")]),
            ("Finished requests / s", "reqps", [q(f"sum by (finished_reason) (rate(flotilla_request_success_total{{{N}}}[1m]))", "{{finished_reason}}")]),
            ("Time to first token", "s", p50_p99("flotilla_time_to_first_token_seconds")),
            ("Inter-token latency", "s", p50_p99("flotilla_inter_token_latency_seconds")),
            ("End-to-end latency", "s", p50_p99("flotilla_e2e_request_latency_seconds")),
            ("Queue time", "s", p50_p99("flotilla_request_queue_time_seconds")),
            ("Requests running / waiting", "short", [q(f"sum(flotilla_num_requests_running{{{N}}})", "running"), q("sum(flotilla_num_requests_waiting)", "waiting (leader queue)")]),
            ("Failed requests / s", "reqps", [q(f"sum by (reason) (rate(flotilla_request_failures_total{{{N}}}[5m]))", "{{reason}}")]),
            ("Resumed requests (failover) / s", "reqps", [q(f"sum(rate(flotilla_requests_resumed_total{{{N}}}[5m]))", "resumed")]),
        ],
    ),
    "flotilla-cluster": (
        "flotilla: cluster",
        [
            ("Nodes by state (leader's view)", "short", [q("max by (state) (flotilla_cluster_nodes * on (node) group_left flotilla_is_leader)", "{{state}}")]),
            ("Nodes by state (each node's view)", "short", [q(f"flotilla_cluster_nodes{{{N}}}", "{{node}} {{state}}")]),
            ("Leader", "short", [q("max by (node) (flotilla_is_leader)", "{{node}}")]),
            ("Placement epoch and replicas", "short", [q("max(flotilla_placement_epoch)", "epoch"), q("max(flotilla_cluster_replicas)", "replicas")]),
            ("Rebalances (10 min)", "short", [q("sum(increase(flotilla_rebalances_total[10m]))", "rebalances")]),
            ("Requests running, whole cluster", "short", [q("sum(flotilla_cluster_requests_running)", "running")]),
            ("Heartbeat round trip p99", "s", [q(f"histogram_quantile(0.99, sum by (le, node, peer) (rate(flotilla_rpc_latency_seconds_bucket{{{N}}}[1m])))", "{{node}} -> {{peer}}")]),
            ("Heartbeat misses / s", "short", [q(f"sum by (node, peer) (rate(flotilla_heartbeat_misses_total{{{N}}}[5m]))", "{{node}} -> {{peer}}")]),
            ("Rejected connections and bad messages / s", "short", [q(f"sum by (node) (rate(flotilla_rejected_sessions_total{{{N}}}[5m]))", "rejected {{node}}"), q(f"sum by (node) (rate(flotilla_bad_messages_total{{{N}}}[5m]))", "bad {{node}}")]),
        ],
    ),
    "flotilla-node": (
        "flotilla: node",
        [
            ("Batch size", "short", p50_p99("flotilla_batch_size", by="node")),
            ("Stage forward time", "s", p50_p99("flotilla_stage_forward_seconds", by="node")),
            ("KV cache usage", "percentunit", [q(f"flotilla_kv_cache_usage_ratio{{{N}}}", "{{node}}")]),
            ("KV cache bytes", "bytes", [q(f"flotilla_kv_cache_bytes{{{N}}}", "{{node}}")]),
            ("Sequences and layers held", "short", [q(f"flotilla_sequences_held{{{N}}}", "sequences {{node}}"), q(f"flotilla_layers_held{{{N}}}", "layers {{node}}")]),
            ("Activation traffic to the next stage", "Bps", [q(f"sum by (node, peer) (rate(flotilla_activation_bytes_sent_total{{{N}}}[1m]))", "{{node}} -> {{peer}}")]),
            ("Shard load time", "s", [q(f"histogram_quantile(0.5, sum by (le, node) (rate(flotilla_shard_load_seconds_bucket{{{N}}}[1h])))", "{{node}}")]),
        ],
    ),
}


def dashboard(uid, title, panels):
    ds = {"type": "prometheus", "uid": "${datasource}"}
    out = []
    for i, (ptitle, unit, targets) in enumerate(panels):
        out.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": ptitle,
                "datasource": ds,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [dict(t, refId=chr(ord("A") + j), datasource=ds) for j, t in enumerate(targets)],
            }
        )
    return {
        "uid": uid,
        "title": title,
        "tags": ["flotilla"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "templating": {
            "list": [
                {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
                {
                    "name": "node",
                    "label": "Node",
                    "type": "query",
                    "datasource": ds,
                    "query": {"query": "label_values(flotilla_placement_epoch, node)", "refId": "node"},
                    "definition": "label_values(flotilla_placement_epoch, node)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                    "hide": 0,
                },
            ]
        },
        "panels": out,
    }


for uid, (title, panels) in DASHBOARDS.items():
    (OUT / f"{uid}.json").write_text(json.dumps(dashboard(uid, title, panels), indent=2) + "\n")
print("wrote", ", ".join(DASHBOARDS))
