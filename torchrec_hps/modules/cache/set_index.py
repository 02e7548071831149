"""The host level's index: which ids of which table the cache holds, and where, in O(cached rows).

A set-associative table on the cache's device (like fbgemm's `lxu_cache_state`, but keyed by the raw id
and with each table owning a range of sets): entry e = set * WAYS + way holds one id (int64, EMPTY_KEY if
free), its last-access tick (int32; negative = inserted at that tick and not looked up since, which the
"second_access" admission reads) and, for LFU, a use count (uint8: the lookups that used the entry,
saturating at 255; hot entries then tie on it and go by recency). Entry e of table t is row
RESERVED_SLOTS + e - entry_base[t] of t's host rows, so no slot map is stored: 12 bytes per cached row
(13 with LFU), plus the HBM level's one-byte way per entry and 4-byte tag per HBM row (hbm_level.py).

Lookups probe it in a Triton kernel (probe_kernel.py); this file holds what the miss path, updates and
eviction do, as batched torch ops over all tables at once.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from torchrec_hps.modules.cache.layout import EMPTY_KEY, RESERVED_SLOTS, WAYS, set_of

_NEVER = torch.iinfo(torch.int64).max


def eviction_order(ticks: torch.Tensor, freq: Optional[torch.Tensor], occupied: torch.Tensor,
                   protect_tick: int) -> torch.Tensor:
    """Per way, lower = taken first: free ways, then LRU (or LFU, ties to LRU); ways used at
    `protect_tick` are never taken (_NEVER). Same shapes in, int64 out."""
    recency = ticks.to(torch.int64).abs()
    score = recency if freq is None else (freq.to(torch.int64) << 31) | recency
    score = torch.where(occupied, score, torch.full_like(score, -1))
    return torch.where(occupied & (recency == protect_tick), torch.full_like(score, _NEVER), score)


def ranks_within_runs(sorted_keys: torch.Tensor) -> torch.Tensor:
    """For a sorted 1-D tensor: each element's index within its run of equal values."""
    n = sorted_keys.numel()
    idx = torch.arange(n, device=sorted_keys.device)
    start = torch.ones(n, dtype=torch.bool, device=sorted_keys.device)
    if n > 1:
        start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return idx - torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 0).values


def pick_ways(sets: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Ways for new entries: `sets` [M] (the set of each newcomer), `score` [M, ways] (eviction_order of
    that set's ways, one row per newcomer). The k-th newcomer of a set (in order) takes the set's k-th
    lowest-scored way; -1 where none is left. Stable, so the Triton kernels pick the same ways."""
    ways = score.shape[1]
    order = torch.argsort(sets, stable=True)
    rank = torch.empty_like(order)
    rank[order] = ranks_within_runs(sets[order])
    ranked = torch.argsort(score, dim=1, stable=True)
    r = rank.clamp(max=ways - 1).view(-1, 1)
    way = ranked.gather(1, r).view(-1)
    ok = (rank < ways) & (score.gather(1, ranked.gather(1, r)).view(-1) != _NEVER)
    return torch.where(ok, way, torch.full_like(way, -1))


class SetIndex:
    """Per table a range of sets; `capacities[t]` is rounded up to whole sets. Tables with `whole[t]` (the
    capacity covers every id) are direct-mapped."""

    def __init__(self, capacities: Sequence[int], device: torch.device, lfu: bool,
                 whole: Optional[Sequence[bool]] = None) -> None:
        n_sets = np.array([max(1, -(-int(c) // WAYS)) for c in capacities], dtype=np.int64)
        self.direct = torch.tensor(list(whole) if whole is not None else [False] * len(n_sets), dtype=torch.bool,
                                   device=device)
        set_base = np.concatenate([[0], np.cumsum(n_sets)])
        self.device = device
        self.capacities = [int(s) * WAYS for s in n_sets]
        self.entry_base_np = set_base[:-1] * WAYS
        self.num_entries = int(set_base[-1]) * WAYS
        self.set_base = torch.tensor(set_base[:-1], dtype=torch.int64, device=device)
        self.n_sets = torch.tensor(n_sets, dtype=torch.int64, device=device)
        self.entry_base = torch.tensor(self.entry_base_np, dtype=torch.int64, device=device)
        self.keys = torch.full((self.num_entries,), EMPTY_KEY, dtype=torch.int64, device=device)
        self.ticks = torch.zeros(self.num_entries, dtype=torch.int32, device=device)
        self.freq = torch.zeros(self.num_entries, dtype=torch.uint8, device=device) if lfu else None

    def bytes_per_entry(self) -> int:
        return 8 + 4 + (1 if self.freq is not None else 0)

    def _sets(self, tables: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return set_of(ids, self.set_base[tables], self.n_sets[tables], self.direct[tables])

    def find(self, tables: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Entries of (table, id) pairs (int64, -1 where not held). No tick is touched."""
        if ids.numel() == 0:
            return ids.new_empty(0, dtype=torch.int64)
        sets = self._sets(tables, ids)
        match = self.keys.view(-1, WAYS)[sets] == ids.view(-1, 1)
        way = match.to(torch.int8).argmax(1)
        return torch.where(match.any(1), sets * WAYS + way, torch.full_like(sets, -1))

    def local_slots(self, tables: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
        """Rows in each table's host rows (the TBE's indices) of entries of those tables."""
        return RESERVED_SLOTS + entries - self.entry_base[tables]

    def insert(self, tables: torch.Tensor, ids: torch.Tensor, tick: int,
               protect_tick: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Insert (table, id) pairs, distinct and not held, evicting by policy in their sets (never an entry
        used at `protect_tick`). Returns (entries, -1 where the set had no room; evicted entries; their
        ids). The new entries carry tick -`tick` (inserted, not yet looked up)."""
        if ids.numel() == 0:
            empty = ids.new_empty(0, dtype=torch.int64)
            return empty, empty, empty
        sets = self._sets(tables, ids)
        base = (sets * WAYS).view(-1, 1) + torch.arange(WAYS, device=ids.device).view(1, -1)
        score = eviction_order(self.ticks[base], self.freq[base] if self.freq is not None else None,
                               self.keys[base] != EMPTY_KEY, protect_tick)
        # a direct-mapped table's id k always takes way k % WAYS (the probe reads that way alone)
        direct = self.direct[tables]
        way = torch.where(direct, ids % WAYS, pick_ways(sets, score))
        ok = way >= 0
        entries = torch.where(ok, sets * WAYS + way, torch.full_like(sets, -1))
        taken = entries[ok]
        old = self.keys[taken]
        was = old != EMPTY_KEY
        evicted, evicted_ids = taken[was], old[was]
        self.keys[taken] = ids[ok]
        self.ticks[taken] = -tick
        if self.freq is not None:
            self.freq[taken] = 1
        return entries, evicted, evicted_ids

    def remove(self, entries: torch.Tensor) -> None:
        self.keys[entries] = EMPTY_KEY
        self.ticks[entries] = 0

    def table_entries(self, t: int) -> torch.Tensor:
        """Occupied entries of table t."""
        lo = int(self.entry_base_np[t])
        span = self.keys[lo:lo + self.capacities[t]]
        return lo + torch.nonzero(span != EMPTY_KEY).view(-1)

    def rebase_ticks(self, by: int) -> None:
        """Shift every tick down by `by` (keeping signs and order), so int32 ticks never overflow."""
        mag = (self.ticks.abs() - by).clamp(min=1)
        self.ticks.copy_(torch.where(self.ticks == 0, self.ticks, torch.sign(self.ticks) * mag))
