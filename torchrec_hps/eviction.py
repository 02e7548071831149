"""Slot bookkeeping shared by the memory tier and the module's embedding cache: a stack of free slots and
bulk victim selection by policy (one O(occupied) selection per overflow, never per key)."""
from __future__ import annotations

import numpy as np

POLICIES = ("lru", "lfu", "random")


class FreeSlots:
    """A stack of free slot ids in [base, base + capacity)."""

    def __init__(self, base: int, capacity: int) -> None:
        self.base = base
        self.capacity = capacity
        self._stack = np.arange(base + capacity - 1, base - 1, -1, dtype=np.int64)  # top = _stack[n_free - 1]
        self.n_free = capacity

    @property
    def used(self) -> int:
        return self.capacity - self.n_free

    def pop(self, n: int) -> np.ndarray:
        if n > self.n_free:
            raise RuntimeError(f"asked for {n} free slots, {self.n_free} left")
        slots = self._stack[self.n_free - n:self.n_free].copy()
        self.n_free -= n
        return slots

    def push(self, slots: np.ndarray) -> None:
        self._stack[self.n_free:self.n_free + len(slots)] = slots
        self.n_free += len(slots)


def choose_victims(candidates: np.ndarray, n: int, policy: str, last_access: np.ndarray, freq: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """`n` of the occupied slots `candidates` to evict: least recently used, least frequently used (ties to
    the least recently used) or uniformly random."""
    if n >= len(candidates):
        return candidates
    if n <= 0:
        return candidates[:0]
    if policy == "random":
        return rng.choice(candidates, size=n, replace=False)
    score = eviction_score(policy, last_access[candidates], freq[candidates])
    return candidates[np.argpartition(score, n - 1)[:n]]


def eviction_score(policy: str, last_access, freq):
    """Per slot, lower = evicted first: the last access tick (LRU), or the use count with ties to the least
    recently used (LFU). Works alike on numpy arrays and torch tensors (the GPU cache selects on the device)."""
    if policy == "lru":
        return last_access
    if policy == "lfu":
        return (freq.clip(max=(1 << 22) - 1) << 40) | (last_access & ((1 << 40) - 1))
    raise ValueError(f"unknown eviction policy {policy!r}; expected one of {list(POLICIES)}")
