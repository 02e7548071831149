"""HPSEngine: what serves an HPSEmbeddingBagCollection's lookups (the module itself is a thin,
scriptable front that calls the `torchrec_hps::pooled_lookup` op, which calls this).

Data flow: KJT -> per pooling group, the cache (cache/cache_group.py: probe both levels for every id,
fetch what neither holds from the tiers, fbgemm TBE over the rows) -> pooled values in the tables' feature
order. A KJT already in the group's feature order goes straight to the group, whose kernels flag bad input;
anything else (another feature order, several groups, bad input) takes the checked path: the checks here
(clear errors), one feature permutation, then the groups. The engine is a plain object, not an nn.Module,
so that TorchScript and torch.export see only the front.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_hps.config import HPSConfig, TableSpec
from torchrec_hps.modules.cache import AsyncInserter, EmbeddingCacheGroup, TBECacheGroup
from torchrec_hps.modules.cache.cache_group import HASHED_ID_BOUND
from torchrec_hps.modules.feature_layout import FeatureLayout
from torchrec_hps.modules.latency import LatencyHistogram
from torchrec_hps.modules.kjt_checks import check_kjt_layout, check_lengths, describe_bad_id, out_of_range
from torchrec_hps.storage.hierarchy import StorageHierarchy

logger = logging.getLogger(__name__)

_POOLINGS = (PoolingType.SUM, PoolingType.MEAN)


def _pooling_mode(pooling: PoolingType):
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode

    return PoolingMode.SUM if pooling == PoolingType.SUM else PoolingMode.MEAN


def _version(t: Optional[torch.Tensor]) -> int:
    try:
        return -1 if t is None else t._version  # bumped by in-place writes
    except RuntimeError:  # inference-mode tensors keep no version counter: identity alone
        return -1


@dataclass
class _RegisteredBatch:
    """The caller's KJT tensors passed to prefetch() (the same objects, unmodified, mark its forward) and each
    group's token."""

    keys: List[str]
    tensors: tuple
    versions: tuple
    tokens: List[int]

    @staticmethod
    def of(features: KeyedJaggedTensor, tokens: List[int]) -> "_RegisteredBatch":
        tensors = (features.values(), features.lengths(), features.weights_or_none())
        return _RegisteredBatch(features.keys(), tensors, tuple(_version(t) for t in tensors), tokens)

    def matches(self, features: KeyedJaggedTensor) -> bool:
        tensors = (features.values(), features.lengths(), features.weights_or_none())
        return features.keys() == self.keys and all(a is b for a, b in zip(tensors, self.tensors)) and \
            tuple(_version(t) for t in tensors) == self.versions


class HPSEngine:
    """The cache groups, the tiers and the input checks behind one HPSEmbeddingBagCollection."""

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        config: HPSConfig,
        storage: Optional[StorageHierarchy] = None,
        is_weighted: bool = False,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        if not tables:
            raise ValueError("HPSEmbeddingBagCollection needs at least one table")
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"table names repeat: {names}")
        seen: Dict[str, str] = {}
        for t in tables:
            if t.pooling not in _POOLINGS:
                raise ValueError(f"table {t.name!r}: pooling {t.pooling} is not supported; expected SUM or MEAN")
            if is_weighted and t.pooling != PoolingType.SUM:
                raise ValueError(f"table {t.name!r}: weighted features need SUM pooling (as in TorchRec), got {t.pooling}")
            for f in t.feature_names:
                if f in seen:
                    raise ValueError(f"feature {f!r} is in tables {seen[f]!r} and {t.name!r}; a feature feeds one table")
                seen[f] = t.name
        self._configs = list(tables)
        self._is_weighted = is_weighted
        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" -> "cuda:N", as tensors report it
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.storage = storage if storage is not None else StorageHierarchy.from_config(config.storage)
        self._owns_storage = storage is None
        hashed = config.cache.hashed_ids
        # the tiers see the id space (any id >= 0 for hashed ids); the cache is sized by num_embeddings
        self.specs = [TableSpec(config.model, t.name, HASHED_ID_BOUND if hashed else t.num_embeddings,
                                t.embedding_dim) for t in tables]
        cache_specs = [TableSpec(config.model, t.name, t.num_embeddings, t.embedding_dim) for t in tables]
        self._spec_of = {spec.name: spec for spec in self.specs}
        self.storage.add_tables(self.specs)
        self.inserter = AsyncInserter() if config.cache.hit_rate_threshold < 1.0 else None

        # one cache group per pooling mode, fed by one permute of the KJT into group-major order
        layout = FeatureLayout.plan(tables)
        self._feature_names, self._dims, self._table_loc = layout.names, layout.dims, layout.table_loc
        groups: List[EmbeddingCacheGroup] = [
            TBECacheGroup([cache_specs[ti] for ti in g.tables], g.feature_tables, _pooling_mode(g.pooling),
                          self.storage, config.cache, self.device, inserter=self.inserter)
            for g in layout.groups]
        self.groups = groups
        self._group_features = [len(g.features) for g in layout.groups]  # features per group
        self._internal_names = [layout.names[f] for f in layout.internal]
        internal_tables = layout.internal_tables(tables)
        self._internal_tables = [t.name for t in internal_tables]
        self._internal_rows = [HASHED_ID_BOUND if hashed else t.num_embeddings for t in internal_tables]
        self._num_embeddings = torch.tensor(self._internal_rows, dtype=torch.int64, device=self.device)
        self._out_perm = None if layout.out_perm is None else torch.from_numpy(layout.out_perm).to(self.device)
        self._forward_stats = {"calls": 0, "ids": 0, "seconds": 0.0}
        self._unknown_ids = torch.zeros((), dtype=torch.int64, device=self.device)
        self.latency = LatencyHistogram()
        self._stats_lock = threading.Lock()
        self._stop_refresh = threading.Event()
        self._refresher = None
        if config.cache.refresh_interval > 0:  # HPS's periodic refresh of cached rows from the tiers
            self._refresher = threading.Thread(target=self._refresh_loop, name="hps-refresh", daemon=True)
            self._refresher.start()
        # one pooling group: lookups in its feature order go straight to it (its kernels flag bad input)
        self._fast_group = groups[0] if len(groups) == 1 else None
        # KJTs passed to prefetch(), newest last: the serving loop registers batch i+1 before batch i's forward
        self._prefetched: List[_RegisteredBatch] = []

    @property
    def feature_names(self) -> List[str]:
        return self._feature_names

    @property
    def dims(self) -> List[int]:
        return self._dims

    def lookup(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled embeddings [B, sum of dims], features in the tables' order."""
        t0 = time.perf_counter()
        pre = self._registered(features)
        if pre is not None:
            outs = [g.lookup_prefetched(token) for g, token in zip(self.groups, pre.tokens)]
            if all(o is not None for o in outs):
                return self._finish(outs, t0, features.values().numel())
        g = self._fast_group
        if g is not None:
            values, lengths = features.values(), features.lengths()
            weights = features.weights_or_none() if self._is_weighted else None
            weights_ok = weights is None if not self._is_weighted else (
                weights is not None and weights.dtype == torch.float32 and weights.numel() == values.numel())
            if (weights_ok and features.keys() == self._internal_names and values.device == self.device
                    and values.dim() == 1 and values.dtype in (torch.int32, torch.int64)
                    and lengths.dtype in (torch.int32, torch.int64)
                    and lengths.numel() % len(self._internal_names) == 0 and not features.variable_stride_per_key()):
                out = g.lookup(values, lengths, weights)
                if out is not None:
                    self._record(t0, values.numel())
                    return out
        return self._lookup_checked(features)

    def _lookup_checked(self, features: KeyedJaggedTensor) -> torch.Tensor:
        t0 = time.perf_counter()
        check_kjt_layout(features, self._feature_names, self._is_weighted)
        if features.keys() != self._internal_names:
            index = {k: i for i, k in enumerate(features.keys())}
            features = features.permute([index[k] for k in self._internal_names])
        if features.values().device != self.device:
            features = features.to(self.device)
        batch = features.stride()
        values = features.values()
        lengths = features.lengths()
        weights = features.weights_or_none() if self._is_weighted else None
        n_feat = len(self._internal_names)
        counts = lengths.view(n_feat, batch).sum(1) if batch else lengths.new_zeros(n_feat)
        # one device->host read for the checks and the sizes the host needs
        summary = torch.cat([lengths.amin().view(1) if lengths.numel() else lengths.new_zeros(1), counts]).tolist()
        host_counts = summary[1:]
        check_lengths(summary[0], host_counts, lengths, values, self._internal_names, batch)
        bad = out_of_range(values, counts, self._num_embeddings)
        self._unknown_ids += bad.sum()
        if self.config.cache.unknown_keys == "error" and bool(bad.any()):
            raise ValueError(describe_bad_id(values, bad, counts, self._internal_names, self._internal_tables,
                                             self._internal_rows))
        outs = []
        f_lo, v_lo = 0, 0
        for group, n_g in zip(self.groups, self._group_features):
            v_hi = v_lo + sum(host_counts[f_lo:f_lo + n_g])
            out = group.lookup(values[v_lo:v_hi], lengths[f_lo * batch:(f_lo + n_g) * batch],
                               weights[v_lo:v_hi] if weights is not None else None, allow_invalid=True)
            if out is None:  # the checks above rule out what the group refuses
                raise RuntimeError("a cache group refused a lookup that passed the engine's checks")
            outs.append(out)
            f_lo, v_lo = f_lo + n_g, v_hi
        return self._finish(outs, t0, values.numel())

    def _finish(self, outs: List[torch.Tensor], t0: float, n_ids: int) -> torch.Tensor:
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if self._out_perm is not None:
            out = out.index_select(1, self._out_perm)
        self._record(t0, n_ids)
        return out

    def prefetch(self, features: KeyedJaggedTensor) -> None:
        """Bring the batch's rows into the cache during the next lookup (see TBECacheGroup.prefetch): a serving
        loop calls it for batch i+1 before batch i's forward, so i+1's miss path and copy into HBM overlap
        batch i's dense layers. Pass the KJT on the host, pinned, to overlap its copy too, and pass the same
        KJT object to the forward, unmodified: its lookup then reads the prefetch's work on the device copy (no
        second probe, no host wait; TBECacheGroup.lookup_prefetched). Bad input is left to the batch's
        lookup, which reports it as usual."""
        caller = features
        check_kjt_layout(features, self._feature_names, self._is_weighted)
        if features.keys() != self._internal_names:
            index = {k: i for i, k in enumerate(features.keys())}
            features = features.permute([index[k] for k in self._internal_names])
        batch = features.stride()
        values, lengths = features.values(), features.lengths()
        weights = features.weights_or_none() if self._is_weighted else None
        if len(self.groups) == 1:
            tokens = [self.groups[0].prefetch(values, lengths, weights)]
        else:
            counts = lengths.view(len(self._internal_names), batch).sum(1).tolist() if batch else \
                [0] * len(self._internal_names)
            tokens, f_lo, v_lo = [], 0, 0
            for group, n_g in zip(self.groups, self._group_features):
                v_hi = v_lo + sum(counts[f_lo:f_lo + n_g])
                tokens.append(group.prefetch(values[v_lo:v_hi], lengths[f_lo * batch:(f_lo + n_g) * batch],
                                             weights[v_lo:v_hi] if weights is not None else None))
                f_lo, v_lo = f_lo + n_g, v_hi
        if all(tokens):  # 0: carried out at once (no device), nothing to reuse
            self._prefetched = self._prefetched[-1:] + [_RegisteredBatch.of(caller, tokens)]

    def _registered(self, features: KeyedJaggedTensor) -> Optional["_RegisteredBatch"]:
        """The registration of this KJT, if prefetched (it and older ones are dropped)."""
        registered = self._prefetched
        for i, pre in enumerate(registered):
            if pre.matches(features):
                self._prefetched = registered[i + 1:]
                return pre
        return None

    def _record(self, t0: float, n_ids: int) -> None:
        dt = time.perf_counter() - t0
        with self._stats_lock:
            s = self._forward_stats
            s["calls"] += 1
            s["ids"] += n_ids
            s["seconds"] += dt
        self.latency.observe(dt)

    def spec(self, table: str) -> TableSpec:
        """The table as the tiers see it (num_rows is the id bound: 2^63-1 for hashed ids)."""
        self._loc(table)  # an unknown table: a clear error
        return self._spec_of[table]

    # ---- cache control (the update path, pre-fill, refresh) ----
    def _loc(self, table: str):
        try:
            g, t = self._table_loc[table]
        except KeyError:
            raise ValueError(f"unknown table {table!r}; tables: {list(self._table_loc)}") from None
        return self.groups[g], t

    @staticmethod
    def _keys(keys: Union[torch.Tensor, np.ndarray, Sequence[int]]) -> np.ndarray:
        arr = keys.cpu().numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        return np.asarray(arr, dtype=np.int64).reshape(-1)

    def _checked_keys(self, table: str, keys) -> np.ndarray:
        k = self._keys(keys)
        n = self.spec(table).num_rows
        if k.size and (k.min() < 0 or k.max() >= n):
            bad = k[(k < 0) | (k >= n)][0]
            raise ValueError(f"table {table!r}: id {int(bad)} is out of range; expected 0 <= id < {n}")
        return k

    def invalidate(self, table: str, keys) -> None:
        group, t = self._loc(table)
        group.invalidate(t, np.unique(self._checked_keys(table, keys)))

    def update(self, table: str, keys, rows: torch.Tensor, unique: bool = False) -> int:
        """New rows for ids of `table` (the tiers are written separately, by the caller or the train
        bridge); cached copies are overwritten in place. Returns how many were cached. `unique`: the caller
        guarantees no repeated ids (saves a sort and a copy of the rows)."""
        group, t = self._loc(table)
        k = self._checked_keys(table, keys)
        dim = group.specs[t].dim
        if rows.shape != (len(k), dim):
            raise ValueError(f"table {table!r}: rows must have shape [{len(k)}, {dim}], got {list(rows.shape)}")
        if unique:
            return group.update(t, k, rows.float())
        uk, last = np.unique(k[::-1], return_index=True)  # repeated ids: the last row wins
        return group.update(t, uk, rows[torch.from_numpy(len(k) - 1 - last)].float())

    def prefill(self, table: str, keys) -> int:
        """Load rows for `keys` (hottest first, e.g. sorted by a key-frequency file) into the cache."""
        group, t = self._loc(table)
        k = self._checked_keys(table, keys)
        _, first = np.unique(k, return_index=True)
        return group.prefill(t, k[np.sort(first)])

    def refresh(self, table: Optional[str] = None) -> Dict[str, int]:
        names = [table] if table is not None else list(self._table_loc)
        out = {}
        for name in names:
            group, t = self._loc(name)
            out[name] = group.refresh(t)
        return out

    def _refresh_loop(self) -> None:
        cache = self.config.cache
        if self._stop_refresh.wait(cache.refresh_delay):
            return
        while True:
            try:
                self.refresh()
            except Exception:  # a tier down: keep serving what is cached, try again next interval
                logger.exception("periodic refresh failed")
            if self._stop_refresh.wait(cache.refresh_interval):
                return

    def wait_idle(self) -> None:
        """Block until background insertions queued so far are done."""
        if self.inserter is not None:
            self.inserter.wait_idle()

    def stats(self) -> Dict[str, Dict]:
        """Per table: cache counters, hit rate, and which storage tier served the misses; and the module's
        lookup latency."""
        storage = self.storage.stats()
        out: Dict[str, Dict] = {}
        for spec in self.specs:
            group, t = self._loc(spec.name)
            d = dict(group.table_stats(t))
            d["storage"] = storage.get(spec.key, {})
            out[spec.name] = d
        with self._stats_lock:
            fwd = dict(self._forward_stats)
        fwd["unknown_ids"] = int(self._unknown_ids)
        # prefetches launched on the device, and lookups that read their prefetch's work (no probe of their own)
        fwd["prefetches"] = sum(getattr(g, "prefetches", 0) for g in self.groups)
        fwd["prefetch_reused"] = sum(getattr(g, "prefetch_reused", 0) for g in self.groups)
        fwd.update(self.latency.percentiles_ms())
        out["_module"] = fwd
        return out

    def close(self) -> None:
        self._stop_refresh.set()
        if self._refresher is not None:
            self._refresher.join(timeout=30)
        for group in self.groups:
            group.close()
        if self.inserter is not None:
            self.inserter.close()
            self.inserter = None
        if self._owns_storage:
            self.storage.close()
