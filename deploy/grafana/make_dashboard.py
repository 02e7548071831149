"""Writes torchrec-hps.json, the Grafana dashboard of a torchrec-hps node (run it after editing the panels:
`python deploy/grafana/make_dashboard.py`; make test checks the JSON it wrote against this list, every
expression with promtool, and every metric against what a node exports)."""
from __future__ import annotations

import json
from pathlib import Path

M = '{instance=~"$instance", model=~"$model"}'
I = '{instance=~"$instance"}'
# (title, unit, [(legend, expr)]); two panels a row
PANELS = [
    ("Queries per second by outcome", "reqps",
     [("{{outcome}}", f"sum by (outcome) (rate(hps_server_queries_total{I}[$__rate_interval]))")]),
    ("Server latency (recent queries)", "ms",
     [("p50 {{instance}}", f"hps_server_p50_ms{I}"), ("p99 {{instance}}", f"hps_server_p99_ms{I}")]),
    ("Samples scored per second, queries by worker", "short",
     [("samples", f"sum(rate(hps_server_samples_total{I}[$__rate_interval]))"),
      ("queries to {{worker}}", f"sum by (worker) (rate(hps_server_routed_queries_total{I}[$__rate_interval]))")]),
    ("Scheduler knobs and queue", "short",
     [("batch size", f"hps_server_batch_size{I}"), ("offload threshold", f"hps_server_offload_threshold{I}"),
      ("queued samples", f"hps_server_queued_samples{I}")]),
    ("Cache hit rate per model", "percentunit",
     [("{{model}}", f"sum by (model) (rate(hps_cache_hits_total{M}[$__rate_interval])) / "
                    f"sum by (model) (rate(hps_lookup_ids_total{M}[$__rate_interval]))")]),
    ("Module lookup latency", "s",
     [("p50", f"histogram_quantile(0.5, sum by (le) (rate(hps_lookup_seconds_bucket{M}[$__rate_interval])))"),
      ("p99", f"histogram_quantile(0.99, sum by (le) (rate(hps_lookup_seconds_bucket{M}[$__rate_interval])))")]),
    ("Cache inserts, evictions, ids in no tier (per second)", "short",
     [("inserts", f"sum(rate(hps_cache_inserts_total{M}[$__rate_interval]))"),
      ("evictions", f"sum(rate(hps_cache_evictions_total{M}[$__rate_interval]))"),
      ("not found", f"sum(rate(hps_not_found_total{M}[$__rate_interval]))")]),
    ("Tier hit rate (keys asked of each tier)", "percentunit",
     [("{{tier}}", f"sum by (tier) (rate(hps_tier_hits_total{M}[$__rate_interval])) / "
                   f"sum by (tier) (rate(hps_tier_keys_total{M}[$__rate_interval]))")]),
    ("Tier errors (keys per second)", "short",
     [("get {{tier}}", f"sum by (tier) (rate(hps_tier_errors_total{M}[$__rate_interval]))"),
      ("write {{tier}}", f"sum by (tier) (rate(hps_tier_write_errors_total{M}[$__rate_interval]))")]),
    ("Degraded: servers down, masked keys", "short",
     [("down {{tier}}", f"max by (tier) (hps_tier_nodes_down{I})"),
      ("masked {{tier}}", f"sum by (tier) (hps_pending_invalidations{M})")]),
    ("Updates from Kafka: rows applied per second, messages rejected", "short",
     [("applied {{model}}", f"sum by (model) (rate(hps_update_applied_rows_total{M}[$__rate_interval]))"),
      ("rejected {{model}}", f"sum by (model) (rate(hps_update_rejected_messages_total{M}[$__rate_interval]))")]),
    ("Update lag (messages not applied)", "short",
     [("{{model}}", f"max by (model) (hps_update_lag_messages{M})")]),
    ("Warnings per second (counted even when the log is rate-limited)", "short",
     [("{{where}} {{subject}}", f"sum by (where, subject) (rate(hps_warnings_total{I}[$__rate_interval]))")]),
    ("Loaded model versions", "short",
     [("{{model}} v{{version}} current={{current}}", f"hps_server_model_loaded{I}")]),
]

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def dashboard() -> dict:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
            "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend, "datasource": DATASOURCE}
                        for j, (legend, expr) in enumerate(targets)],
        })

    def variable(name, query):
        return {"name": name, "type": "query", "datasource": DATASOURCE, "query": query, "refresh": 2,
                "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}}

    return {
        "uid": "torchrec-hps", "title": "torchrec-hps node", "tags": ["torchrec-hps", "recsys"],
        "schemaVersion": 39, "version": 1, "editable": True, "timezone": "browser", "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus", "current": {}},
            variable("instance", "label_values(hps_lookup_ids_total, instance)"),
            variable("model", "label_values(hps_lookup_ids_total, model)"),
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


PATH = Path(__file__).with_name("torchrec-hps.json")

if __name__ == "__main__":
    PATH.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {PATH}")
