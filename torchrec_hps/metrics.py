"""Prometheus metrics, read from the stats the module, the tiers and the update consumer already keep:
nothing is added to the lookup path; values are collected when Prometheus scrapes."""
from __future__ import annotations

from typing import Iterable, List, Sequence

from torchrec_hps.warnings_log import all_counts



class HPSCollector:
    """A prometheus_client collector over HPS modules, storage hierarchies and update consumers."""

    def __init__(self, modules: Sequence = (), hierarchies: Sequence = (), consumers: Sequence = ()) -> None:
        self.modules = list(modules)
        self.hierarchies = list(hierarchies)
        self.consumers = list(consumers)

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        def counter(name, doc, labels):
            return CounterMetricFamily(f"hps_{name}", doc, labels=labels)

        cache = {k: counter(k, d, ["model", "table"]) for k, d in [
            ("lookup_ids", "ids looked up"), ("cache_hits", "ids found in the cache"),
            ("cache_misses", "ids not in the cache"), ("cache_inserts", "rows inserted into the cache"),
            ("cache_evictions", "rows evicted from the cache"), ("not_found", "distinct ids found in no tier")]}
        hit_rate = GaugeMetricFamily("hps_cache_hit_rate", "cache hit rate per id", labels=["model", "table"])
        latency = HistogramMetricFamily("hps_lookup_seconds", "module lookup latency (host clock)", labels=["model"])
        for module in self.modules:
            model = module.engine.config.model
            stats = module.stats()
            for table, s in stats.items():
                if table == "_module":
                    continue
                labels = [model, table]
                for key, field in (("lookup_ids", "ids"), ("cache_hits", "hits"), ("cache_misses", "misses"),
                                   ("cache_inserts", "inserted"), ("cache_evictions", "evicted"),
                                   ("not_found", "not_found")):
                    cache[key].add_metric(labels, s[field])
                hit_rate.add_metric(labels, s["hit_rate"])
            buckets, total = module.engine.latency.buckets()  # cumulative: observed as lookups go
            latency.add_metric([model], buckets, total)
        yield from cache.values()
        yield hit_rate
        yield latency

        tier = {k: counter(k, d, ["model", "table", "tier"]) for k, d in [
            ("tier_keys", "keys asked of the tier"), ("tier_hits", "keys the tier had"),
            ("tier_errors", "keys asked for whose get failed on the tier"),
            ("tier_write_errors", "keys whose write (put or delete) failed on the tier"),
            ("tier_rows_written", "rows written"),
            ("tier_get_seconds", "time in tier gets")]}
        for h in self.hierarchies:
            for qualified, s in h.stats().items():
                model, table = qualified.split(".", 1)
                for name, ts in s.get("tiers", {}).items():
                    labels = [model, table, name]
                    tier["tier_keys"].add_metric(labels, ts["keys"])
                    tier["tier_hits"].add_metric(labels, ts["hits"])
                    tier["tier_errors"].add_metric(labels, ts["errors"])
                    tier["tier_write_errors"].add_metric(labels, ts["write_errors"])
                    tier["tier_rows_written"].add_metric(labels, ts["rows_written"])
                    tier["tier_get_seconds"].add_metric(labels, ts["get_seconds"])
        yield from tier.values()

        # degraded states as gauges: servers of a tier skipped as failed, keys a tier must not serve yet
        down = GaugeMetricFamily("hps_tier_nodes_down", "servers of the tier skipped as failed", labels=["tier"])
        pending = GaugeMetricFamily("hps_pending_invalidations", "keys the tier must not serve until a write "
                                    "lands (it failed during an update)", labels=["model", "table", "tier"])
        for h in self.hierarchies:
            for t in h.tiers:
                down.add_metric([t.name], t.nodes_down())
            for qualified in h.stats():
                model, table = qualified.split(".", 1)
                for name, n in h.pending_invalidations(qualified).items():
                    pending.add_metric([model, table, name], n)
        yield down
        yield pending
        warned = counter("warnings", "warnings raised (logged at most once per cause per interval)",
                         ["where", "subject"])
        for key, n in sorted(all_counts().items()):
            warned.add_metric([key[0], "/".join(key[1:])], n)
        yield warned

        applied = counter("update_applied_rows", "rows applied from Kafka", ["model"])
        rejected = counter("update_rejected_messages", "malformed update messages skipped", ["model"])
        lag = GaugeMetricFamily("hps_update_lag_messages", "update messages not yet applied", labels=["model"])
        for c in self.consumers:
            applied.add_metric([c.model], c.stats.applied_rows)
            rejected.add_metric([c.model], c.stats.rejected_messages)
            lag.add_metric([c.model], c.lag())
        yield applied
        yield rejected
        yield lag


def make_registry(modules: Sequence = (), hierarchies: Sequence = (), consumers: Sequence = ()):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(HPSCollector(modules, hierarchies, consumers))
    return registry


def start_metrics_server(port: int, modules: Sequence = (), hierarchies: Sequence = (), consumers: Sequence = (),
                         addr: str = "0.0.0.0"):
    """Serve /metrics on `port` for a serving process; returns (server, thread)."""
    from prometheus_client import start_http_server

    return start_http_server(port, addr=addr, registry=make_registry(modules, hierarchies, consumers))


def scrape(url: str, prefix: str = "hps_", timeout: float = 5.0) -> List[str]:
    """The lines of a /metrics page that start with `prefix` (what `torchrec-hps stats` prints)."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    return [line for line in text.splitlines() if line.startswith(prefix)]
