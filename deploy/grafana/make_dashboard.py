"""Writes dashboards/chat-serving.json. Rerun after changing a panel: python deploy/grafana/make_dashboard.py"""

from __future__ import annotations

import json
from pathlib import Path

PANELS: list[tuple[str, list[tuple[str, str]], str]] = [
    ("Generated tokens/s", [("rate", "sum(rate(toolkit_generated_tokens_total[1m]))")], "short"),
    ("Time to first token", [
        ("p50", "histogram_quantile(0.5, sum(rate(toolkit_time_to_first_token_seconds_bucket[5m])) by (le))"),
        ("p95", "histogram_quantile(0.95, sum(rate(toolkit_time_to_first_token_seconds_bucket[5m])) by (le))"),
    ], "s"),
    ("Inter-token latency", [
        ("p50", "histogram_quantile(0.5, sum(rate(toolkit_inter_token_latency_seconds_bucket[5m])) by (le))"),
        ("p95", "histogram_quantile(0.95, sum(rate(toolkit_inter_token_latency_seconds_bucket[5m])) by (le))"),
    ], "s"),
    ("Sequences per decode step (continuous batching)", [
        ("mean", "sum(rate(toolkit_batch_size_sum[1m])) / sum(rate(toolkit_batch_size_count[1m]))"),
    ], "short"),
    ("Active sequences and queue", [
        ("active", "sum(toolkit_active_sequences)"),
        ("queued", "sum(toolkit_queue_depth)"),
    ], "short"),
    ("KV cache in use", [("bytes", "sum(toolkit_kv_cache_bytes)")], "bytes"),
    ("Triton requests vs executions (dynamic batching)", [
        ("requests/s", "sum(rate(nv_inference_count[1m]))"),
        ("executions/s", "sum(rate(nv_inference_exec_count[1m]))"),
    ], "short"),
    ("Finished requests by reason", [
        ("{{finish_reason}}", "sum by (finish_reason) (rate(toolkit_requests_total[5m]))"),
    ], "reqps"),
    ("Gateway requests by status", [
        ("{{status}}", "sum by (status) (rate(gateway_requests_total[1m]))"),
    ], "reqps"),
    ("Gateway requests in flight", [("in flight", "sum(gateway_requests_in_flight)")], "short"),
    # Routing over the Triton replicas (one series per replica address, summed over gateway pods).
    ("Requests routed per Triton replica", [
        ("{{replica}}", "sum by (replica) (rate(gateway_triton_routed_requests_total[1m]))"),
    ], "reqps"),
    ("In flight per Triton replica", [
        ("{{replica}}", "sum by (replica) (gateway_triton_replica_in_flight)"),
    ], "short"),
    ("Outstanding tokens per Triton replica", [
        ("{{replica}}", "sum by (replica) (gateway_triton_replica_outstanding_tokens)"),
    ], "short"),
    ("Retries and ejections", [
        ("retried from {{replica}} ({{reason}})",
         "sum by (replica, reason) (increase(gateway_triton_retries_total[5m]))"),
        ("{{replica}} taken out ({{source}})",
         "sum by (replica, source) (increase(gateway_triton_ejections_total[5m]))"),
    ], "short"),
    ("Triton replicas the gateways know, and those ready", [
        ("known", "count(max by (url) (gateway_triton_endpoint_up))"),
        ("ready", "sum(max by (url) (gateway_triton_endpoint_up))"),
    ], "short"),
]


def dashboard() -> dict[str, object]:
    panels = []
    for i, (title, targets, unit) in enumerate(PANELS):
        panels.append({
            "id": i + 1,
            "type": "timeseries",
            "title": title,
            "datasource": {"type": "prometheus", "uid": "prometheus"},
            "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [
                {"refId": chr(65 + j), "expr": expr, "legendFormat": legend}
                for j, (legend, expr) in enumerate(targets)
            ],
        })
    return {
        "uid": "chat-serving",
        "title": "Chat serving (Triton + gateway)",
        "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).parent / "dashboards" / "chat-serving.json"
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
