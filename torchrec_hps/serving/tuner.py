"""DeepRecSys's online tuner (ISCA'20): hill-climb the batch size, then the GPU offload threshold, for the
most latency-bounded throughput.

Each window of completed queries is scored by its p99 and by the node's capacity in it (samples per second
of worker busy time: what load the setting could carry). A setting that keeps p99 under the target is
better when its capacity is higher (headroom for more load); while the target is missed, lower p99 wins.
The climber doubles (then halves) one knob while the score improves, keeps the best value, moves to the
next knob, and starts over after a rest (traffic changes). A window counts only queries that arrived after
the last change, so a window never mixes two settings."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np


@dataclass
class Knob:
    name: str
    lo: int
    hi: int


@dataclass(frozen=True)
class Score:
    p99_s: float
    capacity: float  # samples per busy second

    def better_than(self, other: "Score", target_s: float, tolerance: float) -> bool:
        meets, other_meets = self.p99_s <= target_s, other.p99_s <= target_s
        if meets != other_meets:
            return meets
        if meets:
            return self.capacity > other.capacity * (1 + tolerance)
        return self.p99_s < other.p99_s * (1 - tolerance)


class HillClimber:
    def __init__(self, knobs: List[Knob], get: Callable[[str], int], set_: Callable[[str, int], None],
                 target_s: float, capacity: Callable[[], Tuple[float, float]], window: int = 256,
                 tolerance: float = 0.05, rest_windows: int = 8, clock: Optional[Callable[[], float]] = None) -> None:
        """`capacity()`: cumulative (samples served, worker busy seconds) of the node."""
        import time

        self.knobs, self._get, self._set = knobs, get, set_
        self.target_s, self._capacity = target_s, capacity
        self.window, self.tolerance, self.rest_windows = window, tolerance, rest_windows
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._latencies: List[float] = []
        self._since = self._clock()
        self._work_at_change = capacity()
        self._knob = 0
        self._direction = 1
        self._base: Optional[Tuple[int, Score]] = None  # the best value of this knob so far, and its score
        self._resting = 0
        self.history: List[Dict[str, float]] = []  # one entry per window: the setting and its score (reports)

    def observe(self, arrival: float, latency_s: float) -> None:
        """A completed query (its arrival time and its latency)."""
        with self._lock:
            if arrival < self._since:
                return  # queued under the previous setting
            self._latencies.append(latency_s)
            if len(self._latencies) >= self.window:
                samples, busy = self._capacity()
                s0, b0 = self._work_at_change
                score = Score(float(np.percentile(self._latencies, 99)), (samples - s0) / max(busy - b0, 1e-9))
                self._latencies = []
                self._step(score)
                self._since = self._clock()
                self._work_at_change = self._capacity()

    def _step(self, score: Score) -> None:
        self.history.append({**{k.name: self._get(k.name) for k in self.knobs}, "p99_ms": score.p99_s * 1e3,
                             "capacity": score.capacity})
        if self._resting:
            self._resting -= 1
            return
        knob = self.knobs[self._knob]
        value = self._get(knob.name)
        if self._base is None:  # first window of this knob: the baseline
            self._base = (value, score)
            self._propose(knob, value)
            return
        base_value, base_score = self._base
        if score.better_than(base_score, self.target_s, self.tolerance):
            self._base = (value, score)
            self._propose(knob, value)
            return
        self._set(knob.name, base_value)  # worse (or no better): back to the best value
        if self._direction == 1:  # doubling did not help: try halving from the best value
            self._direction = -1
            self._propose(knob, base_value)
        else:
            self._next_knob()

    def _propose(self, knob: Knob, value: int) -> None:
        nxt = value * 2 if self._direction == 1 else value // 2
        nxt = min(max(nxt, knob.lo), knob.hi)
        if nxt == value:
            if self._direction == 1:
                self._direction = -1
                nxt = min(max(value // 2, knob.lo), knob.hi)
            if nxt == value:
                self._next_knob()
                return
        self._set(knob.name, nxt)

    def _next_knob(self) -> None:
        self._knob += 1
        self._direction = 1
        self._base = None
        if self._knob >= len(self.knobs):
            self._knob = 0
            self._resting = self.rest_windows
