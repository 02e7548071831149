"""What the module needs from a cache: the interface a cache implementation (host, GPU) provides.

The module hands a group of tables (one pooling mode) a KJT's ids, lengths and weights, and gets
pooled embeddings back; everything about where rows live, how misses are fetched and what is evicted
stays behind this interface."""
from __future__ import annotations

import abc
from typing import Dict, Optional

import numpy as np
import torch


class EmbeddingCacheGroup(torch.nn.Module, abc.ABC):
    @abc.abstractmethod
    def lookup(self, values: torch.Tensor, lengths: torch.Tensor, per_sample_weights: Optional[torch.Tensor],
               allow_invalid: bool = False) -> Optional[torch.Tensor]:
        """Pooled embeddings [B, sum of feature dims] for a KJT's `values` and `lengths` (features in the
        group's order, feature-major), or None when the input needs the caller's checks: lengths that
        disagree with the ids, or ids out of range unless `allow_invalid` (they then get the default)."""

    @abc.abstractmethod
    def prefetch(self, values: torch.Tensor, lengths: torch.Tensor,
                 per_sample_weights: Optional[torch.Tensor] = None) -> int:
        """Bring a coming lookup's rows into the cache ahead of it (its misses fetched, its rows admitted),
        overlapped with the caller's work where the device allows; the lookup stays exact either way.
        Returns a token for lookup_prefetched."""

    @abc.abstractmethod
    def lookup_prefetched(self, token: int) -> Optional[torch.Tensor]:
        """The lookup of the batch that prefetch() returned `token` for (the same output as lookup() of it),
        or None when that batch is no longer the registered one (the caller then calls lookup)."""

    @abc.abstractmethod
    def invalidate(self, t: int, keys: np.ndarray) -> None:
        """Drop `keys` of table t from the cache."""

    @abc.abstractmethod
    def update(self, t: int, keys: np.ndarray, rows: torch.Tensor) -> int:
        """Overwrite the cached rows of distinct `keys` in place; returns how many were cached."""

    @abc.abstractmethod
    def prefill(self, t: int, keys: np.ndarray) -> int:
        """Load rows of `keys` (hottest first) from the tiers until the cache is full."""

    @abc.abstractmethod
    def refresh(self, t: int) -> int:
        """Re-read every cached row of table t from the tiers."""

    @abc.abstractmethod
    def cached_keys(self, t: int) -> np.ndarray:
        """Sorted ids of table t that are cached."""

    @abc.abstractmethod
    def table_stats(self, t: int) -> Dict[str, float]:
        """Counters of table t (hits, misses, inserts, evictions, ...)."""

    def close(self) -> None:
        """Release what the implementation holds (threads, CUDA graphs)."""
