"""Warnings rate-limited per cause: a tier that is down for ten seconds logs one line per (tier, table, cause)
per interval, with how many were held back, instead of one per failed call (914 lines in 10 s were seen
during a Redis outage). Every occurrence is still counted, and the counts are Prometheus metrics
(`hps_warnings_total`), so an operator sees both the cause and how often."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, Tuple

Key = Tuple[str, ...]  # (where, cause, ...): e.g. ("hierarchy.get", "redis", "ctr.t0")


class RateLimitedWarnings:
    def __init__(self, logger: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.interval_s, self._clock = logger, interval_s, clock
        self._lock = threading.Lock()
        self._last: Dict[Key, float] = {}
        self._held: Dict[Key, int] = {}
        self._counts: Dict[Key, int] = {}

    def warn(self, key: Key, message: str, *args) -> None:
        """Log `message % args` unless this key logged within the interval; count it either way."""
        now = self._clock()
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return
            held = self._held.pop(key, 0)
            self._last[key] = now
        suffix = f" ({held} more like this in the last {self.interval_s:g} s)" if held else ""
        self.logger.warning(message + suffix, *args)

    def counts(self) -> Dict[Key, int]:
        with self._lock:
            return dict(self._counts)


def all_counts() -> Dict[Key, int]:
    """Every registered limiter's counts (for the metrics collector)."""
    out: Dict[Key, int] = {}
    for limiter in list(_REGISTRY):
        for key, n in limiter.counts().items():
            out[key] = out.get(key, 0) + n
    return out


_REGISTRY: "list[RateLimitedWarnings]" = []


def limited(logger: logging.Logger, interval_s: float = 10.0) -> RateLimitedWarnings:
    """A module's rate-limited warnings (registered for the metrics)."""
    limiter = RateLimitedWarnings(logger, interval_s)
    _REGISTRY.append(limiter)
    return limiter
