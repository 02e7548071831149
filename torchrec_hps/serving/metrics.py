"""Prometheus metrics of the serving node, read from the scheduler's counters when scraped."""
from __future__ import annotations

from typing import Iterable


class SchedulerCollector:
    def __init__(self, scheduler, repository) -> None:
        self.scheduler, self.repository = scheduler, repository

    def collect(self) -> Iterable:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.scheduler.stats()
        queries = CounterMetricFamily("hps_server_queries", "queries answered, by outcome", labels=["outcome"])
        ok = s["queries"] - s["deadline_exceeded"] - s["failed"]
        for outcome, n in (("ok", ok), ("deadline_exceeded", s["deadline_exceeded"]), ("failed", s["failed"]),
                           ("refused_queue_full", s["refused_full"])):
            queries.add_metric([outcome], n)
        yield queries
        routed = CounterMetricFamily("hps_server_routed_queries", "queries by worker kind", labels=["worker"])
        routed.add_metric(["gpu"], s["gpu_queries"])
        routed.add_metric(["cpu"], s["cpu_queries"])
        yield routed
        yield CounterMetricFamily("hps_server_samples", "samples scored", value=s["samples"])
        for name, doc in (("queued_samples", "samples admitted and not yet answered"),
                          ("batch_size", "CPU batch size (the tuner's first knob)"),
                          ("offload_threshold", "query size from which queries go to the GPU (second knob)"),
                          ("p50_ms", "median latency of recent queries"),
                          ("p99_ms", "99th percentile latency of recent queries")):
            yield GaugeMetricFamily(f"hps_server_{name}", doc, value=s[name])
        loaded = GaugeMetricFamily("hps_server_model_loaded", "loaded model versions", labels=["model", "version",
                                                                                              "current"])
        for served in self.repository.all_versions():
            current = self.repository.get(served.name) is served
            loaded.add_metric([served.name, served.version, str(current).lower()], 1.0)
        yield loaded
