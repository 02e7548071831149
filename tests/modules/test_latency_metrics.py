"""The module's lookup latency as a Prometheus histogram: counts observed as lookups go, never falling."""
from __future__ import annotations

import torch

from torchrec_hps.metrics import HPSCollector
from tests.modules.conftest import random_kjt


def _histogram(hps):
    (hist,) = [m for m in HPSCollector(modules=[hps]).collect() if m.name == "hps_lookup_seconds"]
    count = [s.value for s in hist.samples if s.name == "hps_lookup_seconds_count"][0]
    return count, [s.value for s in hist.samples if s.name == "hps_lookup_seconds_bucket"]


def test_lookup_histogram_only_grows(make_hps):
    """It used to be rebuilt from a sliding window of 10,000 latencies: its count fell (5,001 after 10,001
    lookups), which Prometheus reads as a counter reset."""
    ref, hps = make_hps()
    kjt = random_kjt(hps.embedding_bag_configs(), 1, max_len=1, gen=torch.Generator().manual_seed(0))
    for _ in range(5000):
        hps(kjt)
    count, before = _histogram(hps)
    for _ in range(5001):
        hps(kjt)
    count2, after = _histogram(hps)
    assert (count, count2) == (5000.0, 10001.0)
    assert all(a >= b for a, b in zip(after, before)) and after[-1] == count2
    assert hps.stats()["_module"]["p99_ms"] >= hps.stats()["_module"]["p50_ms"] > 0
