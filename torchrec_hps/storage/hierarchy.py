"""The storage hierarchy: tiers chained top to bottom (memory -> Redis -> RocksDB, any may be left out).

- `get` asks each tier only for the keys still missing and returns, per key, the row from the highest tier
  that has it and which tier served it (-1: nowhere; the module decides the default vector). Rows found
  lower are copied up into tiers configured with `promote` (HPS's `cache_missed_embeddings`).
- `put` writes through bottom-up. The bottom tier holds the reference copy: if it fails the put raises and
  no tier above was touched. If a tier above fails part-way, the keys it may hold stale rows for are
  deleted there, or, if that fails too (server down), remembered as pending invalidations: reads skip that
  tier for those keys until the delete goes through. So no tier ever serves an older row than a put wrote.
- A tier that errors on `get` (server down) is counted and fallen through, never fatal.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence

import numpy as np
import torch

from torchrec_hps.config import StorageConfig, TableSpec
from torchrec_hps.storage.interface import (StorageTier, TierError, TierWriteError, as_key_array, as_row_array,
                                            last_occurrence)
from torchrec_hps.warnings_log import limited

logger = logging.getLogger(__name__)
_warnings = limited(logger)

MISSING = -1


class LookupResult(NamedTuple):
    rows: torch.Tensor  # [N, dim] float32, zeros where not found
    found: torch.Tensor  # [N] bool
    source: torch.Tensor  # [N] int8: index of the tier that served each key, MISSING if none


@dataclass
class HierarchyStats:
    lookups: int = 0
    keys: int = 0
    missing: int = 0
    promoted: int = 0
    tier_errors: int = 0
    write_errors: int = 0

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


class StorageHierarchy:
    def __init__(self, tiers: Sequence[StorageTier]) -> None:
        if not tiers:
            raise ValueError("a storage hierarchy needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.tiers: List[StorageTier] = list(tiers)
        self._specs: Dict[str, TableSpec] = {}
        self._locks: Dict[str, threading.Lock] = {}
        self._generation: Dict[str, int] = {}
        self._pending: List[Dict[str, np.ndarray]] = [{} for _ in tiers]
        self._served: Dict[str, np.ndarray] = {}
        self._stats: Dict[str, HierarchyStats] = {}
        self._stats_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: StorageConfig) -> "StorageHierarchy":
        from torchrec_hps.storage.memory import MemoryTier
        from torchrec_hps.storage.redis_tier import RedisTier
        from torchrec_hps.storage.rocksdb_tier import RocksDBTier

        tiers: List[StorageTier] = []
        if config.memory is not None:
            tiers.append(MemoryTier(config.memory))
        if config.redis is not None:
            tiers.append(RedisTier(config.redis))
        if config.rocksdb is not None:
            tiers.append(RocksDBTier(config.rocksdb))
        return cls(tiers)

    @property
    def tier_names(self) -> List[str]:
        return [t.name for t in self.tiers]

    def full_copy_tiers(self) -> List[StorageTier]:
        """Tiers a bulk load writes: all but memory tiers, which fill on demand (or the memory tier alone)."""
        tiers = [t for t in self.tiers if t.name != "memory"]
        return tiers or list(self.tiers)

    def tier(self, name: str) -> StorageTier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise ValueError(f"no tier named {name!r}; tiers: {self.tier_names}")

    def add_tables(self, specs: Iterable[TableSpec]) -> None:
        for spec in specs:
            for tier in self.tiers:
                tier.add_table(spec)
            if spec.key not in self._specs:
                self._specs[spec.key] = spec
                self._locks[spec.key] = threading.Lock()
                self._generation[spec.key] = 0
                self._served[spec.key] = np.zeros(len(self.tiers), dtype=np.int64)
                self._stats[spec.key] = HierarchyStats()

    def remove_tables(self, namespace: str) -> List[str]:
        """Remove every table of `namespace` from every tier and from the hierarchy (a model version's
        unload); returns the tables removed. Callers stop reading them first."""
        removed = [key for key, spec in self._specs.items() if spec.model == namespace]
        for key in removed:
            with self._locks[key]:
                for tier in self.tiers:
                    if key in tier.tables():
                        tier.remove_table(key)
                for pending in self._pending:
                    pending.pop(key, None)
            for d in (self._specs, self._generation, self._served, self._locks):
                d.pop(key, None)
            with self._stats_lock:
                self._stats.pop(key, None)
        return removed

    def spec(self, table: str) -> TableSpec:
        try:
            return self._specs[table]
        except KeyError:
            raise ValueError(f"unknown table {table!r}; registered tables: {sorted(self._specs)}") from None

    # ---- reads ----
    def get(self, table: str, keys: torch.Tensor) -> LookupResult:
        spec = self.spec(table)
        k = as_key_array(keys, spec)
        n = len(k)
        rows: Optional[torch.Tensor] = None  # allocated on first partial answer; one full answer is used as is
        source = np.full(n, MISSING, dtype=np.int8)
        remaining = np.arange(n)
        generation = self._generation[table]
        served_by: List[Optional[np.ndarray]] = [None] * len(self.tiers)
        errors = 0
        for i, tier in enumerate(self.tiers):
            if len(remaining) == 0:
                break
            ask = self._skip_pending(i, table, k, remaining)
            if len(ask) == 0:
                continue
            try:
                tier_rows, tier_found = tier.get(table, torch.from_numpy(k[ask]), checked=True)
            except TierError as e:  # a whole tier unreachable: fall through
                errors += 1
                _warnings.warn(("hierarchy.get", tier.name, table, type(e.__cause__ or e).__name__),
                               "tier %s failed on get(%s): %s; falling through", tier.name, table, e)
                continue
            f = tier_found.numpy()
            hit = ask[f]
            if len(hit):
                if rows is None and len(hit) == n:  # one tier had every key (in order): no copy
                    rows = tier_rows
                else:
                    if rows is None:
                        rows = torch.zeros(n, spec.dim, dtype=torch.float32)
                    rows[torch.from_numpy(hit)] = tier_rows[tier_found]
                source[hit] = i
                served_by[i] = hit
                remaining = remaining[source[remaining] == MISSING]
        if rows is None:
            rows = torch.zeros(n, spec.dim, dtype=torch.float32)
        self._promote(table, k, rows, served_by, generation)
        missing = int((source == MISSING).sum())
        with self._stats_lock:
            s = self._stats[table]
            s.lookups += 1
            s.keys += n
            s.missing += missing
            s.tier_errors += errors
            self._served[table] += np.bincount(source[source >= 0], minlength=len(self.tiers))
        found = torch.from_numpy(source != MISSING)
        return LookupResult(rows, found, torch.from_numpy(source))

    def _skip_pending(self, i: int, table: str, k: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Positions to ask tier i for: all but keys with a pending invalidation there."""
        pending = self._pending[i].get(table)
        if pending is None:
            return positions
        self._retry_invalidation(i, table)
        pending = self._pending[i].get(table)
        if pending is None:
            return positions
        return positions[~np.isin(k[positions], pending)]

    def _promote(self, table: str, k: np.ndarray, rows: torch.Tensor, served_by, generation: int) -> None:
        """Copy rows found in lower tiers into the tiers above them that promote."""
        jobs = []
        for j, hit in enumerate(served_by):
            if hit is None or j == 0:
                continue
            for u in range(j):
                if self.tiers[u].promote:
                    jobs.append((u, hit))
        if not jobs:
            return
        with self._locks[table]:
            if self._generation[table] != generation:
                return  # a put landed since these rows were read: they may be stale, don't copy them up
            promoted = 0
            for u, hit in jobs:
                uk, first = np.unique(k[hit], return_index=True)
                src = torch.from_numpy(hit[first])
                if self._write_upper(u, table, uk, rows[src]):
                    promoted += len(uk)
        with self._stats_lock:
            self._stats[table].promoted += promoted

    # ---- writes ----
    def put(self, table: str, keys: torch.Tensor, rows: torch.Tensor, logged: bool = True,
            unique: bool = False) -> None:
        """Write rows through every tier, bottom-up (see the module docstring for failure semantics).
        `logged=False`: the bottom tier may hold them in volatile memory until `persist` (StorageTier.put);
        `unique=True`: the caller guarantees distinct keys (no dedupe pass)."""
        spec = self.spec(table)
        k = as_key_array(keys, spec)
        as_row_array(rows, len(k), spec)  # all input checks before any tier is touched
        if len(k) == 0:
            return
        if not unique and len(np.unique(k)) != len(k):  # dedupe once (last row wins) for every tier
            idx = last_occurrence(k)
            k = k[idx]
            keys, rows = torch.from_numpy(k), rows[torch.from_numpy(idx)]
        with self._locks[table]:
            self._generation[table] += 1
            bottom = len(self.tiers) - 1
            self.tiers[bottom].put(table, keys, rows, unique=True, logged=logged)  # raises: nothing written above
            self._clear_pending(bottom, table, k)
            for u in range(bottom - 1, -1, -1):
                self._write_upper(u, table, k, rows, held_only=self.tiers[u].update_only_cached)

    def persist(self, tables: Sequence[str], wait: bool = True) -> None:
        """Make every row put to these tables durable in every tier (unlogged puts included); `wait=False`:
        start that (see `persisted`)."""
        for tier in self.tiers:
            for table in tables:
                tier.persist(table, wait)

    def persisted(self, tables: Sequence[str]) -> bool:
        """Whether every persist of these tables started so far has finished, in every tier."""
        return all(tier.persisted(table) for tier in self.tiers for table in tables)

    def delete(self, table: str, keys: torch.Tensor) -> None:
        spec = self.spec(table)
        k = np.unique(as_key_array(keys, spec))
        if len(k) == 0:
            return
        with self._locks[table]:
            self._generation[table] += 1
            bottom = len(self.tiers) - 1
            self.tiers[bottom].delete(table, torch.from_numpy(k))
            for u in range(bottom - 1, -1, -1):
                try:
                    self.tiers[u].delete(table, torch.from_numpy(k))
                except TierWriteError as e:
                    self._add_pending(u, table, e.keys)

    def _write_upper(self, u: int, table: str, k: np.ndarray, rows: torch.Tensor, held_only: bool = False) -> bool:
        """Put into a tier above the bottom (`held_only`: only rows it holds, see MemoryTierConfig
        .update_only_cached); on failure make sure it serves no stale rows for these keys."""
        tier = self.tiers[u]
        try:
            tier.put(table, torch.from_numpy(k), rows, unique=True, held_only=held_only)
        except TierWriteError as e:
            with self._stats_lock:
                self._stats[table].write_errors += len(e.keys)
            _warnings.warn(("hierarchy.put", tier.name, table, type(e.__cause__ or e).__name__),
                           "%s; invalidating those keys there", e)
            try:
                tier.delete(table, torch.from_numpy(e.keys))
            except TierWriteError as e2:
                self._add_pending(u, table, e2.keys)
            self._clear_pending(u, table, np.setdiff1d(k, e.keys))
            return False
        self._clear_pending(u, table, k)
        return True

    # ---- pending invalidations ----
    def _add_pending(self, i: int, table: str, keys: np.ndarray) -> None:
        old = self._pending[i].get(table)
        self._pending[i][table] = np.union1d(old, keys) if old is not None else np.unique(keys)
        _warnings.warn(("hierarchy.pending", self.tiers[i].name, table),
                       "tier %s: %d keys of %s pending invalidation", self.tiers[i].name,
                       len(self._pending[i][table]), table)

    def _clear_pending(self, i: int, table: str, written: np.ndarray) -> None:
        old = self._pending[i].get(table)
        if old is not None:
            left = np.setdiff1d(old, written)
            if len(left):
                self._pending[i][table] = left
            else:
                del self._pending[i][table]

    def _retry_invalidation(self, i: int, table: str) -> None:
        with self._locks[table]:
            pending = self._pending[i].get(table)
            if pending is None:
                return
            try:
                self.tiers[i].delete(table, torch.from_numpy(pending))
            except TierWriteError as e:
                self._pending[i][table] = np.unique(e.keys)
                return
            del self._pending[i][table]
            logger.info("tier %s: pending invalidations of %s applied", self.tiers[i].name, table)

    def pending_invalidations(self, table: str) -> Dict[str, int]:
        return {t.name: len(self._pending[i].get(table, ())) for i, t in enumerate(self.tiers)}

    # ---- stats ----
    def stats(self) -> Dict[str, Dict]:
        """Per table: hierarchy counters, keys served by each tier, and each tier's own stats."""
        out: Dict[str, Dict] = {}
        with self._stats_lock:
            for table, s in self._stats.items():
                d = s.as_dict()
                d["served_by"] = {t.name: int(c) for t, c in zip(self.tiers, self._served[table])}
                out[table] = d
        for tier in self.tiers:
            for table, ts in tier.stats().items():
                if table in out:
                    out[table].setdefault("tiers", {})[tier.name] = ts
        return out

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()
