"""The one interface every storage tier implements, with the input checks and stats they share.

All calls are batched: `keys` is a 1-D int64 CPU tensor of row ids in [0, num_rows), `rows` a float
tensor [N, dim]. Subclasses implement the `_get/_put/_delete/_num_rows` hooks on validated numpy arrays.
"""
from __future__ import annotations

import abc
import itertools
import logging
import operator
import threading
import time
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from torchrec_hps.config import TableSpec

logger = logging.getLogger(__name__)

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class TierError(RuntimeError):
    """A tier could not serve a request (server down, timeout); callers fall through to a lower tier."""


class TierWriteError(TierError):
    """A put or delete failed part-way. `keys` (per table) may hold old or new rows in this tier."""

    def __init__(self, tier: str, table: str, keys: np.ndarray, cause: BaseException) -> None:
        super().__init__(f"{tier}: write to table {table!r} failed for {len(keys)} keys: {cause}")
        self.tier = tier
        self.table = table
        self.keys = keys
        self.cause = cause


@dataclass
class TierStats:
    gets: int = 0  # get calls
    keys: int = 0  # keys asked for
    hits: int = 0
    misses: int = 0
    errors: int = 0  # keys asked for whose get failed (never more than `keys`)
    write_errors: int = 0  # keys whose put or delete failed
    puts: int = 0
    rows_written: int = 0
    deletes: int = 0
    evictions: int = 0
    get_seconds: float = 0.0
    put_seconds: float = 0.0

    def as_dict(self) -> Dict[str, float]:
        d = asdict(self)
        d["hit_rate"] = self.hits / self.keys if self.keys else 0.0
        d["mean_get_ms"] = 1e3 * self.get_seconds / self.gets if self.gets else 0.0
        return d


def as_key_array(keys: torch.Tensor, spec: TableSpec) -> np.ndarray:
    """Validate `keys` for `spec` and view them as an int64 numpy array (no copy when contiguous)."""
    if not isinstance(keys, torch.Tensor):
        raise ValueError(f"table {spec.key}: keys must be a torch.Tensor, got {type(keys).__name__}")
    if keys.dtype != torch.int64 or keys.dim() != 1:
        raise ValueError(f"table {spec.key}: keys must be a 1-D int64 tensor, got {keys.dtype} with shape "
                         f"{tuple(keys.shape)}")
    if keys.device.type != "cpu":
        raise ValueError(f"table {spec.key}: keys must be on the CPU, got {keys.device}")
    arr = keys.contiguous().numpy()
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= spec.num_rows:
            bad = lo if lo < 0 else hi
            raise ValueError(f"table {spec.key}: key {bad} is out of range; expected 0 <= key < {spec.num_rows}")
    return arr


def as_row_array(rows: torch.Tensor, n: int, spec: TableSpec) -> np.ndarray:
    if not isinstance(rows, torch.Tensor):
        raise ValueError(f"table {spec.key}: rows must be a torch.Tensor, got {type(rows).__name__}")
    if rows.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"table {spec.key}: rows must be float32 or float16, got {rows.dtype}")
    if rows.dim() != 2 or rows.shape[0] != n or rows.shape[1] != spec.dim:
        raise ValueError(f"table {spec.key}: rows must have shape [{n}, {spec.dim}] (one row of dim {spec.dim} "
                         f"per key), got {list(rows.shape)}")
    if rows.device.type != "cpu":
        raise ValueError(f"table {spec.key}: rows must be on the CPU, got {rows.device}")
    return rows.detach().contiguous().numpy()


_FIB = np.uint64(0x9E3779B97F4A7C15)


def partition_of(keys: np.ndarray, num_partitions: int) -> np.ndarray:
    """Partition of each key by Fibonacci hashing, so strided ids (all even, say) still spread evenly."""
    h = (keys.astype(np.uint64) * _FIB) >> np.uint64(40)
    return (h % np.uint64(num_partitions)).astype(np.int64)


def group_by_partition(keys: np.ndarray, num_partitions: int):
    """[(partition, positions in keys)] for the partitions that have keys, positions in input order."""
    if num_partitions == 1:
        return [(0, np.arange(len(keys)))]
    part = partition_of(keys, num_partitions)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(num_partitions + 1))
    return [(p, order[bounds[p]:bounds[p + 1]]) for p in range(num_partitions) if bounds[p + 1] > bounds[p]]


def last_occurrence(keys: np.ndarray) -> np.ndarray:
    """Indices of the last occurrence of each distinct key (a put with repeated keys: last write wins)."""
    rev = keys[::-1]
    _, first_in_rev = np.unique(rev, return_index=True)
    return len(keys) - 1 - first_in_rev


class StorageTier(abc.ABC):
    """A level of the parameter server. Thread-safe; tables are registered with `add_table`."""

    name: str = "tier"

    def __init__(self, storage_dtype: str = "float32", promote: bool = True) -> None:
        self.storage_dtype = np.dtype(_NP_DTYPES[storage_dtype])
        self.promote = promote
        self._specs: Dict[str, TableSpec] = {}
        self._stats: Dict[str, TierStats] = {}
        self._stats_lock = threading.Lock()

    # ---- tables ----
    def add_table(self, spec: TableSpec) -> None:
        old = self._specs.get(spec.key)
        if old is not None:
            if old != spec:
                raise ValueError(f"{self.name}: table {spec.key} is already registered as {old}, not {spec}")
            return
        self._create_table(spec)
        self._specs[spec.key] = spec
        self._stats[spec.key] = TierStats()

    def add_tables(self, specs: Iterable[TableSpec]) -> None:
        for spec in specs:
            self.add_table(spec)

    def tables(self) -> List[str]:
        return list(self._specs)

    def spec(self, table: str) -> TableSpec:
        try:
            return self._specs[table]
        except KeyError:
            raise ValueError(f"{self.name}: unknown table {table!r}; registered tables: {sorted(self._specs)}") from None

    # ---- the batched API ----
    def get(self, table: str, keys: torch.Tensor, checked: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows for `keys` ([N, dim] float32; zeros where absent) and a bool mask of the keys found.
        `checked=True`: the caller (the hierarchy) already validated `keys`, so the range scan is skipped."""
        spec = self.spec(table)
        k = keys.numpy() if checked else as_key_array(keys, spec)
        t0 = time.perf_counter()
        rows, found = self._get(spec, k)
        dt = time.perf_counter() - t0
        hits = int(found.sum())
        with self._stats_lock:
            s = self._stats[table]
            s.gets += 1
            s.keys += len(k)
            s.hits += hits
            s.misses += len(k) - hits
            s.get_seconds += dt
        return torch.from_numpy(rows), torch.from_numpy(found)

    def put(self, table: str, keys: torch.Tensor, rows: torch.Tensor, unique: bool = False,
            held_only: bool = False, logged: bool = True) -> None:
        """Insert or overwrite rows; with repeated keys the last row wins (`unique=True`: the caller
        guarantees there are none, which saves a sort). `held_only`: overwrite only rows the tier holds
        (a cache above the reference copy). `logged=False`: the rows may stay in volatile memory until
        `persist(table)` (RocksDB: no write-ahead log), for a caller that can send them again after a
        crash (the update consumer, which commits its offsets only after persist). Raises TierWriteError
        on failure."""
        spec = self.spec(table)
        k = as_key_array(keys, spec)
        r = as_row_array(rows, len(k), spec)
        if len(k) == 0:
            return
        if not unique and len(np.unique(k)) != len(k):
            idx = last_occurrence(k)
            k, r = k[idx], r[idx]
        if held_only:
            held = self._held(spec, k)
            k, r = k[held], r[held]
            if len(k) == 0:
                return
        t0 = time.perf_counter()
        try:
            (self._put if logged else self._put_unlogged)(spec, k, r.astype(self.storage_dtype, copy=False))
        finally:
            with self._stats_lock:
                s = self._stats[table]
                s.puts += 1
                s.rows_written += len(k)
                s.put_seconds += time.perf_counter() - t0

    def persist(self, table: str, wait: bool = True) -> None:
        """Make every row put so far durable, unlogged ones included; `wait=False`: start that and return
        (`persisted` says when it is done). Tiers without an unlogged mode have nothing to do."""

    def persisted(self, table: str) -> bool:
        """Whether every persist started so far has finished."""
        return True

    def _put_unlogged(self, spec: TableSpec, keys: np.ndarray, rows: np.ndarray) -> None:
        self._put(spec, keys, rows)

    # which tiers take held_only puts (the hierarchy asks), and which of `keys` a tier holds
    update_only_cached = False

    def _held(self, spec: TableSpec, keys: np.ndarray) -> np.ndarray:
        return np.ones(len(keys), dtype=bool)

    def delete(self, table: str, keys: torch.Tensor) -> None:
        spec = self.spec(table)
        k = as_key_array(keys, spec)
        if len(k):
            self._delete(spec, np.unique(k))
            with self._stats_lock:
                self._stats[table].deletes += len(k)

    def num_rows(self, table: str) -> int:
        """Rows this tier holds for `table`."""
        return self._num_rows(self.spec(table))

    def drop_table(self, table: str) -> None:
        """Remove every row of `table` from this tier (the table stays registered)."""
        raise NotImplementedError(f"{self.name}: drop_table")

    def nodes_down(self) -> int:
        """Servers of this tier currently skipped as failed (0 for in-process tiers)."""
        return 0

    def remove_table(self, table: str) -> None:
        """Remove `table`'s rows and unregister it (a model version's unload frees its namespace)."""
        spec = self.spec(table)
        self._remove_table(spec)
        self._specs.pop(spec.key, None)
        with self._stats_lock:
            self._stats.pop(spec.key, None)

    def _remove_table(self, spec: TableSpec) -> None:
        self.drop_table(spec.key)  # tiers whose tables hold no other state need no more than the rows gone

    def stats(self) -> Dict[str, Dict[str, float]]:
        with self._stats_lock:
            return {t: s.as_dict() for t, s in self._stats.items()}

    def close(self) -> None:
        pass

    # ---- for subclasses ----
    def _count(self, table: str, **fields: int) -> None:
        with self._stats_lock:
            s = self._stats[table]
            for f, v in fields.items():
                setattr(s, f, getattr(s, f) + v)

    def _decode_rows(self, buf, n: int, dim: int) -> np.ndarray:
        """Rows stored as `storage_dtype` bytes -> float32 [n, dim]."""
        arr = np.frombuffer(buf, dtype=self.storage_dtype, count=n * dim).reshape(n, dim)
        return arr.astype(np.float32) if self.storage_dtype != np.float32 else arr

    def _rows_of_values(self, values: List[Optional[bytes]], positions: Optional[np.ndarray], n_unique: int,
                        inverse: np.ndarray, dim: int) -> Tuple[np.ndarray, np.ndarray]:
        """A get's (rows, found) for its keys from the stored values of its unique keys: `values[j]` is the
        value (None: absent) of unique key `positions[j]` (of key j where `positions` is None); unique keys
        not covered (a failed request) are absent. C-level passes over the values (map/filter/join, no
        per-row Python), the present rows joined with one zero row after them, and one gather: no
        intermediate array per unique key. A value of another size (not a row of this table) is skipped."""
        row_bytes = dim * self.storage_dtype.itemsize
        found = np.fromiter(map(operator.is_not, values, itertools.repeat(None)), dtype=bool, count=len(values))
        n_hit = int(found.sum())
        blob = b"".join(itertools.chain(filter(None, values), (bytes(row_bytes),)))
        if len(blob) != (n_hit + 1) * row_bytes:
            found = np.fromiter((v is not None and len(v) == row_bytes for v in values), dtype=bool,
                                count=len(values))
            n_hit = int(found.sum())
            blob = b"".join(itertools.chain((v for v, ok in zip(values, found) if ok), (bytes(row_bytes),)))
        at = np.full(n_unique, n_hit, dtype=np.int64)  # each unique key's row in blob; n_hit: the zero row
        hit = np.flatnonzero(found)
        at[hit if positions is None else positions[hit]] = np.arange(n_hit)
        row_of_key = at[inverse]
        return self._decode_rows(blob, n_hit + 1, dim)[row_of_key], row_of_key < n_hit

    @abc.abstractmethod
    def _create_table(self, spec: TableSpec) -> None: ...

    @abc.abstractmethod
    def _get(self, spec: TableSpec, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]: ...

    @abc.abstractmethod
    def _put(self, spec: TableSpec, keys: np.ndarray, rows: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _delete(self, spec: TableSpec, keys: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _num_rows(self, spec: TableSpec) -> int: ...
