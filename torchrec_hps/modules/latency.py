"""Lookup latency as Prometheus wants it: a cumulative histogram observed as lookups go (counts only grow,
so `rate()` and quantiles over it are right), plus a bounded window of recent latencies for p50/p99."""
from __future__ import annotations

import bisect
import threading
from collections import deque
from typing import Dict, List, Tuple

import numpy as np

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)  # seconds


class LatencyHistogram:
    window = 10000  # recent latencies kept for percentiles

    def __init__(self) -> None:
        self._counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one: above every bound
        self._sum = 0.0
        self._recent: deque = deque(maxlen=self.window)
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(LATENCY_BUCKETS, seconds)  # per lookup: numpy's call costs more than the search
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds
            self._recent.append(seconds)

    def buckets(self) -> Tuple[List[Tuple[str, float]], float]:
        """Cumulative (le, count) pairs ending with +Inf, and the sum: a Prometheus histogram."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cum = np.cumsum(counts)
        return [(str(b), float(c)) for b, c in zip(LATENCY_BUCKETS, cum[:-1])] + [("+Inf", float(cum[-1]))], total

    def percentiles_ms(self) -> Dict[str, float]:
        with self._lock:
            recent = np.asarray(self._recent) * 1e3
        if not len(recent):
            return {}
        return {"p50_ms": float(np.percentile(recent, 50)), "p99_ms": float(np.percentile(recent, 99))}
