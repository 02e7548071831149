"""Host-memory tier: a bounded, partitioned, thread-safe row cache per table (HPS's volatile hash map).

Layout per table: one row arena split into partitions: keys are spread over partitions by a multiplicative
hash, and each partition owns a slot range, a lock, a free-slot stack and its key -> slot index (key_index.py:
a vectorized hash table sized by the partition's slots, or one dense map shared by the partitions where the
id space is at most 4 rows per cached row), so memory follows the rows cached, not the id space.
Readers take no lock (a per-partition seqlock tells them to retry under the locks if a writer was active).
When a partition is full it evicts in bulk down to `resolution_target` of its slots (one O(slots)
selection per overflow, not per insert), as HPS's `overflow_resolution_target` does.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import threading
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch

from torchrec_hps.config import MemoryTierConfig, TableSpec
from torchrec_hps.eviction import FreeSlots, choose_victims
from torchrec_hps.storage.interface import StorageTier, group_by_partition
from torchrec_hps.storage.key_index import DENSE_ROWS_PER_SLOT, DenseIndex, KeyIndex


class _Partition(FreeSlots):
    """Slots [base, base + capacity) of the table's arena, with their own lock and free-slot stack."""

    def __init__(self, base: int, capacity: int) -> None:
        super().__init__(base, capacity)
        self.lock = threading.Lock()


class _Table:
    def __init__(self, spec: TableSpec, cfg: MemoryTierConfig, dtype: np.dtype) -> None:
        capacity = min(cfg.capacity or spec.num_rows, spec.num_rows)
        self.num_partitions = min(cfg.num_partitions, capacity)
        per_part = math.ceil(capacity / self.num_partitions)
        if self.num_partitions > 1:  # margin for hash imbalance, so a table that fits whole still does
            per_part += math.ceil(4 * math.sqrt(per_part))
        total = per_part * self.num_partitions
        if spec.num_rows <= DENSE_ROWS_PER_SLOT * total:
            dense = DenseIndex(spec.num_rows)
            self.indexes = [dense] * self.num_partitions
        else:
            self.indexes = [KeyIndex(per_part) for _ in range(self.num_partitions)]
        self.dense = isinstance(self.indexes[0], DenseIndex)
        self.rows = torch.from_numpy(np.empty((total, spec.dim), dtype=dtype))
        self.slot_key = np.full(total, -1, dtype=np.int64)
        self.last_access = np.zeros(total, dtype=np.int64)
        self.freq = np.zeros(total, dtype=np.int64)
        self.parts = [_Partition(p * per_part, per_part) for p in range(self.num_partitions)]
        # Seqlock: a partition's version is odd while a writer changes it; readers go lock-free and retry
        # under the locks if any version moved during their read.
        self.versions = np.zeros(self.num_partitions, dtype=np.int64)

    def split(self, keys: np.ndarray) -> List[Tuple[int, np.ndarray]]:
        return group_by_partition(keys, self.num_partitions)

    def slots_of(self, keys: np.ndarray) -> np.ndarray:
        """The slot of each key (-1: not held)."""
        if self.dense:
            return self.indexes[0].get(keys)
        out = np.empty(len(keys), dtype=np.int32)
        for p, pos in self.split(keys):
            out[pos] = self.indexes[p].get(keys[pos])
        return out

    def index_bytes(self) -> int:
        return self.indexes[0].nbytes() if self.dense else sum(i.nbytes() for i in self.indexes)

    @contextlib.contextmanager
    def writing(self, p: int) -> Iterator[_Partition]:
        part = self.parts[p]
        with part.lock:
            self.versions[p] += 1
            try:
                yield part
            finally:
                self.versions[p] += 1

    @contextlib.contextmanager
    def all_locks(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for part in self.parts:
                stack.enter_context(part.lock)
            yield


class MemoryTier(StorageTier):
    name = "memory"

    def __init__(self, config: MemoryTierConfig) -> None:
        super().__init__(config.storage_dtype, config.promote)
        self.config = config
        self._tables: Dict[str, _Table] = {}
        self._tick = itertools.count(1)
        self._rng = np.random.default_rng(config.seed)

    def _create_table(self, spec: TableSpec) -> None:
        self._tables[spec.key] = _Table(spec, self.config, self.storage_dtype)

    @property
    def update_only_cached(self) -> bool:  # type: ignore[override]
        return self.config.update_only_cached

    def _held(self, spec: TableSpec, keys: np.ndarray) -> np.ndarray:
        return self._tables[spec.key].slots_of(keys) >= 0

    def capacity(self, table: str) -> int:
        return sum(p.capacity for p in self._tables[self.spec(table).key].parts)

    def index_bytes(self, table: str) -> int:
        """Host memory of the table's key -> slot index."""
        return self._tables[self.spec(table).key].index_bytes()

    def _gather(self, t: _Table, keys: np.ndarray) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
        slots = t.slots_of(keys)
        hit = slots >= 0
        all_hit = bool(hit.all())
        out = torch.index_select(t.rows, 0, torch.from_numpy(slots if all_hit else np.where(hit, slots, 0)))
        if not all_hit:
            out[torch.from_numpy(~hit)] = 0
        return out, slots, hit

    def _get(self, spec: TableSpec, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        t = self._tables[spec.key]
        before = t.versions.copy()
        if not (before & 1).any():
            out, slots, hit = self._gather(t, keys)
            if not np.array_equal(before, t.versions):
                out = None
        else:
            out = None
        if out is None:  # a writer was active: read again under the locks
            with t.all_locks():
                out, slots, hit = self._gather(t, keys)
        # Access metadata is advisory (it only ranks eviction victims), so it is updated without locks.
        policy = self.config.overflow_policy
        if policy != "evict_random":
            hit_slots = slots[hit]
            t.last_access[hit_slots] = next(self._tick)
            if policy == "evict_lfu":
                t.freq[hit_slots] += 1
        if out.dtype != torch.float32:
            out = out.float()
        return out.numpy(), hit

    def _put(self, spec: TableSpec, keys: np.ndarray, rows: np.ndarray) -> None:
        t = self._tables[spec.key]
        tick = next(self._tick)
        evicted = 0
        rows_t = torch.from_numpy(rows)
        for p, pos in t.split(keys):
            pk, pr = keys[pos], rows_t[torch.from_numpy(pos)]
            index = t.indexes[p]
            with t.writing(p) as part:
                slots = index.get(pk)
                present = slots >= 0
                old = slots[present]
                t.rows[torch.from_numpy(old)] = pr[torch.from_numpy(present)]
                t.last_access[old] = tick  # protects them from the eviction below
                new_mask = ~present
                new_keys, new_rows = pk[new_mask], pr[torch.from_numpy(new_mask)]
                if len(new_keys) > part.capacity:  # more new rows than the partition holds: keep the last ones
                    new_keys, new_rows = new_keys[-part.capacity:], new_rows[-part.capacity:]
                if len(new_keys) > part.n_free:
                    evicted += self._evict(t, p, len(new_keys))
                new_slots = part.pop(len(new_keys))
                t.rows[torch.from_numpy(new_slots)] = new_rows
                t.slot_key[new_slots] = new_keys
                t.last_access[new_slots] = tick
                t.freq[new_slots] = 1
                index.insert(new_keys, new_slots.astype(np.int32))
        if evicted:
            self._count(spec.key, evictions=evicted)

    def _evict(self, t: _Table, p: int, incoming: int) -> int:
        """Free slots of partition p for `incoming` rows, evicting down to `resolution_target` of capacity."""
        part = t.parts[p]
        target_used = int(part.capacity * self.config.resolution_target)
        n = min(part.used, max(incoming - part.n_free, part.used + incoming - target_used))
        if n <= 0:
            return 0
        span = slice(part.base, part.base + part.capacity)
        occupied = part.base + np.flatnonzero(t.slot_key[span] >= 0)
        policy = self.config.overflow_policy.removeprefix("evict_")
        victims = choose_victims(occupied, n, policy, t.last_access, t.freq, self._rng)
        t.indexes[p].remove(t.slot_key[victims])
        t.slot_key[victims] = -1
        part.push(victims)
        return n

    def _delete(self, spec: TableSpec, keys: np.ndarray) -> None:
        t = self._tables[spec.key]
        for p, pos in t.split(keys):
            index = t.indexes[p]
            with t.writing(p) as part:
                pk = keys[pos]
                slots = index.get(pk)
                held = slots >= 0
                index.remove(pk[held])
                t.slot_key[slots[held]] = -1
                part.push(slots[held])

    def _num_rows(self, spec: TableSpec) -> int:
        return sum(p.used for p in self._tables[spec.key].parts)

    def _remove_table(self, spec: TableSpec) -> None:
        t = self._tables[spec.key]
        with t.all_locks():
            del self._tables[spec.key]

    def drop_table(self, table: str) -> None:
        spec = self.spec(table)
        t = self._tables[spec.key]
        with t.all_locks():
            self._tables[spec.key] = _Table(spec, self.config, self.storage_dtype)
