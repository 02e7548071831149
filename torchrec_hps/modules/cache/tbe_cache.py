"""The embedding cache of one pooling group: tables that share an fbgemm TBE whose rows are cache slots.

Per table, a dense int32 remap (row id -> slot) lives next to the TBE, on its device. Slots 0 and 1 of
every table hold the table's default vector: 0 means "not cached" (a miss), 1 "known absent from every
tier" (served the default without asking the tiers again, until `update`/`invalidate`). Cached rows take
slots 2 .. capacity+1. A lookup is: remap the ids (one gather), find the batch's unique misses, fetch them
from the storage hierarchy in one request per table, insert (evicting LRU/LFU slots that this batch does
not use), then run the TBE over the slots, so a hit costs one gather plus fbgemm's own pooled lookup.

Insertion mode per lookup and table, as HugeCTR HPS: below `hit_rate_threshold` (hit rate over the
batch's unique ids) the lookup waits for the rows; at or above it, misses get the default vector now and
an `AsyncInserter` fetches and inserts them in the background.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from torchrec_hps.config import CacheConfig, TableSpec
from torchrec_hps.eviction import FreeSlots, eviction_score
from torchrec_hps.modules.cache.cuda_graph import FLAG_MISS, AllHitPath
from torchrec_hps.modules.cache.interface import EmbeddingCacheGroup
from torchrec_hps.modules.cache.remap_kernel import ABSENT_SLOT, MISS_SLOT, RESERVED_SLOTS, RemapTables
from torchrec_hps.modules.cache.tbe_direct import bind_pooled_lookup
from torchrec_hps.storage.hierarchy import StorageHierarchy

logger = logging.getLogger(__name__)



@dataclass
class CacheTableStats:
    sync_lookups: int = 0  # lookups with misses that waited for the rows
    async_lookups: int = 0  # lookups with misses that served defaults and inserted in the background
    unique_misses: int = 0  # distinct ids fetched from the tiers
    inserted: int = 0
    evicted: int = 0
    not_found: int = 0  # distinct ids found in no tier (served the default vector)
    defaulted_async: int = 0  # distinct misses served the default vector while inserted in the background
    overflow_lookups: int = 0  # batches whose distinct ids did not fit the cache (served uncached)

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


class InvalidIdsError(ValueError):
    """Some ids are out of range and the config says that is an error (the engine names them)."""


class _TableSlots:
    """Host-side bookkeeping of one table's cache slots (LRU/LFU state lives on the device)."""

    def __init__(self, capacity: int, base: int) -> None:
        self.base = base  # offset of the table's slot 0 in the group's flat slot space
        self.free = FreeSlots(RESERVED_SLOTS, capacity)
        self.key_of_slot = np.full(capacity + RESERVED_SLOTS, -1, dtype=np.int64)


class TBECacheGroup(EmbeddingCacheGroup):
    """Cached tables of one pooling mode behind one fbgemm IntNBit TBE (FP32 or FP16 rows, FP32 output)."""

    def __init__(
        self,
        specs: Sequence[TableSpec],
        feature_tables: Sequence[int],
        pooling_mode,
        storage: StorageHierarchy,
        config: CacheConfig,
        device: torch.device,
    ) -> None:
        super().__init__()
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

        self.specs = list(specs)
        self.config = config
        self.storage = storage
        self.device = device
        self.capacities = [config.rows_for(s.num_rows) for s in self.specs]
        location = EmbeddingLocation.DEVICE if device.type == "cuda" else EmbeddingLocation.HOST
        row_type, row_dtype = (SparseType.FP16, torch.float16) if config.cache_dtype == "fp16" else \
            (SparseType.FP32, torch.float32)
        self.tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(s.name, c + RESERVED_SLOTS, s.dim, row_type, location)
                             for s, c in zip(self.specs, self.capacities)],
            feature_table_map=list(feature_tables),
            pooling_mode=pooling_mode,
            device=device,
            output_dtype=SparseType.FP32,
            bounds_check_mode=BoundsCheckMode.NONE,  # ids are checked by the module, slots are ours
        )
        self.tbe.initialize_weights()
        self.weights = [w.view(row_dtype)[:, :s.dim] for (w, _), s in zip(self.tbe.split_embedding_weights(), self.specs)]
        self.pooled_lookup = bind_pooled_lookup(self.tbe)
        for w in self.weights:
            w.fill_(config.default_value)
        bases = np.concatenate([[0], np.cumsum([s.num_rows for s in self.specs])])
        self.key_base = bases[:-1]
        # one entry past the last table: a sentinel (never a miss) that padded ids of CUDA graphs land on
        remap = torch.full((int(bases[-1]) + 1,), MISS_SLOT, dtype=torch.int32, device=device)
        remap[-1] = ABSENT_SLOT
        self.register_buffer("remap", remap, persistent=False)
        self.register_buffer("_bounds", torch.tensor(bases[1:-1], dtype=torch.int64, device=device), persistent=False)
        slot_bases = np.concatenate([[0], np.cumsum([c + RESERVED_SLOTS for c in self.capacities])])
        self.slots = [_TableSlots(c, int(b)) for c, b in zip(self.capacities, slot_bases[:-1])]
        n_features = self.n_features = len(feature_tables)
        # Per feature: its table's first id in the remap, first slot and row count, each with one extra entry
        # for the all-hit kernels' positions past the batch's ids (the sentinel, slot 0 of table 0, 0 rows);
        # and its table's index.
        ft = list(feature_tables)

        def per_feature(values, dummy) -> torch.Tensor:
            return torch.tensor(list(values) + [dummy], dtype=torch.int64, device=device)

        self.register_buffer("_feature_base", per_feature(self.key_base[ft], int(bases[-1])), persistent=False)
        self.register_buffer("_feature_slot_base", per_feature(slot_bases[ft], 0), persistent=False)
        self.register_buffer("_feature_rows", per_feature([self.specs[t].num_rows for t in ft], 0), persistent=False)
        self.register_buffer("_feature_table", torch.tensor(ft, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("_feature_arange", torch.arange(n_features, device=device), persistent=False)
        # LRU/LFU state and hit counters on the device, so the all-hit path never waits for the host
        self.register_buffer("last_access", torch.zeros(int(slot_bases[-1]), dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("freq", torch.zeros(int(slot_bases[-1]), dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("_ids", torch.zeros(len(self.specs), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("_misses", torch.zeros(len(self.specs), dtype=torch.int64, device=device),
                             persistent=False)
        self.stats_ = [CacheTableStats() for _ in self.specs]
        self.lock = threading.RLock()
        self._tick = 0
        self.inserter: Optional["AsyncInserter"] = None
        self.remap_tables = RemapTables(self._feature_rows, self._feature_base, self._feature_slot_base, self.remap,
                                        self.last_access, self.freq if config.eviction == "lfu" else None)
        # on CUDA, lookups try the all-hit path first (one graph replay or its eager twin, one overlapped wait)
        self.all_hit = AllHitPath(self, use_graphs=config.cuda_graphs) if device.type == "cuda" else None

    # ---- the lookup ----
    def forward(self, values: torch.Tensor, offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor],
                feature_counts: torch.Tensor, invalid: Optional[torch.Tensor] = None,
                invalid_is_error: bool = False) -> torch.Tensor:
        """Pooled embeddings [B, sum of feature dims] for ids `values` laid out feature-major as a KJT's
        (`feature_counts[f]` ids for feature f), `offsets` over the F*B bags. Ids flagged `invalid` get the
        default vector, or raise InvalidIdsError before anything changes if `invalid_is_error`. With every id
        cached this is a handful of device ops, one host sync (anything missing or invalid?) and the TBE."""
        with self.lock:
            self._next_tick()
            return self._eager(values, offsets, per_sample_weights, feature_counts, invalid, invalid_is_error)

    def _next_tick(self) -> None:
        # a plain attribute write: nn.Module.__setattr__ costs microseconds on the per-lookup path
        self.__dict__["_tick"] = self._tick + 1

    def lookup_kjt(self, values: torch.Tensor, lengths: torch.Tensor,
                   per_sample_weights: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The fast path (CUDA): a KJT's ids and lengths (features in this group's order, checks not yet
        done) -> pooled output, or None when the input needs the engine's checks (bad lengths or ids). Misses
        are handled here: the graph has validated the input, so the eager path runs without re-checking."""
        with self.lock:
            self._next_tick()
            out, flags, shape = self.all_hit.lookup(values, lengths, per_sample_weights, self._tick)
            if out is not None:
                return out
            if flags != FLAG_MISS:
                return None
            n = values.numel()
            return self._eager(shape.values[:n], shape.offsets, per_sample_weights, shape.counts, None, False,
                               touched=True)

    def _eager(self, values: torch.Tensor, offsets: torch.Tensor, per_sample_weights: Optional[torch.Tensor],
               feature_counts: torch.Tensor, invalid: Optional[torch.Tensor], invalid_is_error: bool,
               touched: bool = False) -> torch.Tensor:
        values = values.to(torch.int64)
        if invalid is not None:
            values = torch.where(invalid, torch.zeros_like(values), values)
        fidx = torch.repeat_interleave(self._feature_arange, feature_counts, output_size=values.numel())
        flat = values + self._feature_base[fidx]
        slots = self.remap[flat]
        miss = slots == MISS_SLOT
        if invalid is not None:
            miss &= ~invalid
        any_miss, any_invalid = torch.stack([miss.any(), invalid.any() if invalid is not None else
                                             miss.new_zeros(())]).tolist()
        if any_invalid and invalid_is_error:
            raise InvalidIdsError("ids out of range")
        self._ids.index_add_(0, self._feature_table, feature_counts.to(torch.int64))
        miss_per_feature = torch.zeros_like(self._feature_arange).index_add_(0, fidx, miss.to(torch.int64))
        self._misses.index_add_(0, self._feature_table, miss_per_feature)
        if not touched:  # (the all-hit path has touched them) before any eviction: protect this batch's hits
            self._touch(slots, fidx)
        overflow: Dict[int, Dict[str, np.ndarray]] = {}
        if any_miss:
            overflow = self._handle_misses(flat if invalid is None else flat[~invalid], flat[miss])
            slots = self.remap[flat]
            self._touch(slots, fidx)
        if invalid is not None:
            slots = torch.where(invalid, torch.full_like(slots, ABSENT_SLOT), slots)
        out = self.pooled_lookup(slots, offsets.to(slots.dtype), per_sample_weights)
        for t, rows_by_id in overflow.items():
            out = self._overwrite_uncached(out, t, flat, slots, rows_by_id, offsets, per_sample_weights,
                                           feature_counts)
        return out

    def _touch(self, slots: torch.Tensor, fidx: torch.Tensor) -> None:
        gslots = slots.to(torch.int64) + self._feature_slot_base[fidx]
        self.last_access[gslots] = self._tick
        if self.config.eviction == "lfu":
            self.freq.index_add_(0, gslots, torch.ones_like(gslots))

    def _handle_misses(self, flat: torch.Tensor, missing: torch.Tensor) -> Dict[int, Dict[str, np.ndarray]]:
        """Per table with misses: below the hit-rate threshold (over the batch's distinct ids) fetch and
        insert now; at or above it, queue them for the background inserter. Returns, for tables whose batch
        did not fit the cache, the rows of the ids left uncached."""
        # distinct ids and misses per table, counted where the ids are; only the misses come to the host
        n_tables = len(self.specs)
        umiss = torch.unique(missing)
        n_ids = torch.bincount(torch.searchsorted(self._bounds, torch.unique(flat), right=True), minlength=n_tables)
        n_miss = torch.bincount(torch.searchsorted(self._bounds, umiss, right=True), minlength=n_tables)
        counts = torch.stack([n_ids, n_miss]).cpu().numpy()
        n_ids, n_miss = counts[0], counts[1]
        umiss_h = umiss.cpu().numpy()
        starts = np.concatenate([[0], np.cumsum(n_miss)])  # unique ids are sorted: tables are contiguous runs
        overflow: Dict[int, Dict[str, np.ndarray]] = {}
        for t in np.flatnonzero(n_miss):
            s = self.stats_[t]
            s.unique_misses += int(n_miss[t])
            keys = umiss_h[starts[t]:starts[t + 1]] - self.key_base[t]
            hit_rate = 1.0 - n_miss[t] / n_ids[t]
            if hit_rate < self.config.hit_rate_threshold or self.inserter is None:
                s.sync_lookups += 1
                left = self._fetch_and_insert(t, keys, protect_tick=self._tick)
                if left is not None:
                    overflow[t] = left
            else:
                s.async_lookups += 1
                s.defaulted_async += len(keys)
                self.inserter.submit(self, t, keys)
        return overflow

    # ---- inserting ----
    def _fetch_and_insert(self, t: int, keys: np.ndarray, protect_tick: int) -> Optional[Dict[str, np.ndarray]]:
        """Fetch `keys` (unique, not cached) from the tiers and insert them. Returns the rows of keys that
        did not fit (only when this batch alone needs more slots than the cache has)."""
        spec = self.specs[t]
        res = self.storage.get(spec.key, torch.from_numpy(keys))
        found = res.found.numpy()
        absent = keys[~found]
        if len(absent):
            self.stats_[t].not_found += len(absent)
            self.remap[torch.from_numpy(absent + self.key_base[t]).to(self.device)] = ABSENT_SLOT
        fkeys = keys[found]
        frows = res.rows if len(fkeys) == len(keys) else res.rows[res.found]
        n_fit = self._insert(t, fkeys, frows, protect_tick)
        if n_fit == len(fkeys):
            return None
        self.stats_[t].overflow_lookups += 1
        return {"keys": fkeys[n_fit:], "rows": frows[n_fit:]}

    def _insert(self, t: int, keys: np.ndarray, rows: torch.Tensor, protect_tick: int) -> int:
        """Put rows into free slots, evicting slots not used at `protect_tick`; returns how many fit."""
        ts = self.slots[t]
        need = len(keys) - ts.free.n_free
        if need > 0:
            # evict a batch at once: one O(slots) selection every many lookups instead of every lookup
            n_evict = max(need, int(np.ceil(self.config.eviction_batch * self.capacities[t])))
            victims = self._choose_victims(t, n_evict, protect_tick)
            self._release(t, victims)
            self.stats_[t].evicted += len(victims)
        n = min(len(keys), ts.free.n_free)
        if n == 0:
            return 0
        slots = ts.free.pop(n)
        slots_dev = torch.from_numpy(slots).to(self.device)
        self._write_rows(t, slots_dev, rows[:n])
        self.remap[torch.from_numpy(keys[:n] + self.key_base[t]).to(self.device)] = slots_dev.to(torch.int32)
        ts.key_of_slot[slots] = keys[:n]
        gslots = slots_dev + ts.base
        self.last_access[gslots] = protect_tick
        self.freq[gslots] = 1
        self.stats_[t].inserted += n
        return n

    def _choose_victims(self, t: int, n: int, protect_tick: int) -> np.ndarray:
        """Up to n occupied slots of table t, not used at `protect_tick`, by policy: selected where the LRU/LFU
        state lives (on the GPU, one top-k; only the occupancy mask goes over and the victims come back)."""
        ts = self.slots[t]
        span = slice(ts.base, ts.base + len(ts.key_of_slot))
        last_access = self.last_access[span]
        occupied = torch.from_numpy(ts.key_of_slot >= 0).to(self.device)
        score = eviction_score(self.config.eviction, last_access, self.freq[span])
        never = torch.iinfo(torch.int64).max
        score = torch.where(occupied & (last_access != protect_tick), score, never)
        values, victims = torch.stack(torch.topk(score, min(n, score.numel()), largest=False, sorted=False)).cpu().numpy()
        return victims[values != never]

    def _write_rows(self, t: int, slots: torch.Tensor, rows: torch.Tensor) -> None:
        self.weights[t][slots] = rows.to(self.device, self.weights[t].dtype)

    def _release(self, t: int, slots: np.ndarray) -> None:
        ts = self.slots[t]
        if len(slots) == 0:
            return
        self.remap[torch.from_numpy(ts.key_of_slot[slots] + self.key_base[t]).to(self.device)] = MISS_SLOT
        ts.key_of_slot[slots] = -1
        ts.free.push(slots)

    def insert_missing(self, t: int, keys: np.ndarray) -> None:
        """Background insertion (AsyncInserter): fetch outside the lock, insert what is still missing."""
        spec = self.specs[t]
        with self.lock:
            keys = keys[self.remap[torch.from_numpy(keys + self.key_base[t]).to(self.device)].cpu().numpy() == MISS_SLOT]
        if len(keys) == 0:
            return
        res = self.storage.get(spec.key, torch.from_numpy(keys))
        with self.lock:
            # a concurrent update/invalidate may have run since: insert only what is still a miss
            still = self.remap[torch.from_numpy(keys + self.key_base[t]).to(self.device)].cpu().numpy() == MISS_SLOT
            found = res.found.numpy() & still
            absent = keys[~res.found.numpy() & still]
            if len(absent):
                self.stats_[t].not_found += len(absent)
                self.remap[torch.from_numpy(absent + self.key_base[t]).to(self.device)] = ABSENT_SLOT
            self._insert(t, keys[found], res.rows[torch.from_numpy(found)], protect_tick=self._tick)

    # ---- the uncached path for batches larger than the cache ----
    def _overwrite_uncached(self, out, t, flat, slots, left, offsets, per_sample_weights, feature_counts):
        """Recompute the features of table t exactly, from cached rows plus the rows that did not fit."""
        from torch.nn.functional import embedding_bag

        base = int(self.key_base[t])
        left_keys = torch.from_numpy(np.sort(left["keys"]) + base).to(flat.device)
        order = torch.from_numpy(np.argsort(left["keys"], kind="stable")).to(flat.device)
        table = torch.cat([self.weights[t].float(), left["rows"].to(self.weights[t].device)[order]])
        n_cache = self.weights[t].shape[0]
        # ids that did not fit -> rows appended after the cache's slots (found by binary search)
        pos = torch.searchsorted(left_keys, flat).clamp(max=len(left_keys) - 1)
        idx = torch.where(left_keys[pos] == flat, pos + n_cache, slots.to(torch.int64))
        fmap = self.tbe.feature_table_map
        bounds = torch.cumsum(torch.cat([feature_counts.new_zeros(1), feature_counts]), 0).tolist()
        n_features = len(fmap)
        batch = (offsets.numel() - 1) // n_features
        dims = [self.specs[fmap[f]].dim for f in range(n_features)]
        col = np.concatenate([[0], np.cumsum(dims)])
        mode = "mean" if int(self.tbe.pooling_mode) == 1 else "sum"
        out = out.clone()
        for f in range(n_features):
            if fmap[f] != t:
                continue
            lo, hi = bounds[f], bounds[f + 1]
            off = offsets[f * batch:(f + 1) * batch + 1].to(torch.int64) - lo
            w = per_sample_weights[lo:hi] if per_sample_weights is not None else None
            out[:, col[f]:col[f + 1]] = embedding_bag(idx[lo:hi], table, off, mode=mode, per_sample_weights=w,
                                                      include_last_offset=True)
        return out

    # ---- the update path ----
    def invalidate(self, t: int, keys: np.ndarray) -> None:
        """Forget `keys` of table t: the next lookup fetches them from the tiers."""
        with self.lock:
            gkeys = torch.from_numpy(keys + self.key_base[t]).to(self.device)
            cur = self.remap[gkeys].cpu().numpy()
            self._release(t, cur[cur >= RESERVED_SLOTS].astype(np.int64))
            self.remap[gkeys] = MISS_SLOT

    def update(self, t: int, keys: np.ndarray, rows: torch.Tensor) -> int:
        """New values for `keys`: cached rows are overwritten in place; ids known absent are forgotten so the
        next lookup fetches them. Returns the number of cached rows updated."""
        with self.lock:
            gkeys = torch.from_numpy(keys + self.key_base[t]).to(self.device)
            cur = self.remap[gkeys]
            cached = cur >= RESERVED_SLOTS
            self._write_rows(t, cur[cached].to(torch.int64), rows.to(self.device)[cached])
            self.remap[gkeys[cur == ABSENT_SLOT]] = MISS_SLOT
            return int(cached.sum())

    def prefill(self, t: int, keys: np.ndarray) -> int:
        """Insert rows for `keys` (hottest first) until the cache is full; returns how many went in."""
        with self.lock:
            gkeys = torch.from_numpy(keys + self.key_base[t]).to(self.device)
            keys = keys[(self.remap[gkeys] == MISS_SLOT).cpu().numpy()]
            keys = keys[:self.slots[t].free.n_free]
            if len(keys) == 0:
                return 0
            before = self.stats_[t].inserted
            self._fetch_and_insert(t, keys, protect_tick=-1)
            return self.stats_[t].inserted - before

    def refresh(self, t: int) -> int:
        """Re-read every cached row of table t from the tiers (rows gone from every tier are dropped)."""
        with self.lock:
            ts = self.slots[t]
            slots = RESERVED_SLOTS + np.flatnonzero(ts.key_of_slot[RESERVED_SLOTS:] >= 0)
            if len(slots) == 0:
                return 0
            keys = ts.key_of_slot[slots]
            res = self.storage.get(self.specs[t].key, torch.from_numpy(keys))
            found = res.found.numpy()
            self._write_rows(t, torch.from_numpy(slots[found]).to(self.device), res.rows[res.found])
            self._release(t, slots[~found])
            return int(found.sum())

    def cached_keys(self, t: int) -> np.ndarray:
        ts = self.slots[t]
        return np.sort(ts.key_of_slot[ts.key_of_slot >= 0])

    def close(self) -> None:
        if self.all_hit is not None:
            self.all_hit.release()
            self.all_hit = None

    def table_stats(self, t: int) -> Dict[str, float]:
        d = self.stats_[t].as_dict()
        ids, misses = int(self._ids[t]), int(self._misses[t])
        d.update(ids=ids, misses=misses, hits=ids - misses, hit_rate=(ids - misses) / ids if ids else 0.0)
        d["capacity"] = self.capacities[t]
        d["cached_rows"] = self.slots[t].free.used
        return d


class AsyncInserter:
    """One background thread that fetches and inserts rows for lookups in asynchronous mode."""

    def __init__(self) -> None:
        import queue

        self._queue: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="hps-async-insert", daemon=True)
        self._thread.start()
        self.errors = 0

    def submit(self, group: TBECacheGroup, t: int, keys: np.ndarray) -> None:
        self._queue.put((group, t, keys))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                group, t, keys = item
                group.insert_missing(t, keys)
            except Exception:  # keep serving: the next miss of these ids tries again
                self.errors += 1
                logger.exception("background insertion failed")
            finally:
                self._queue.task_done()

    def wait_idle(self) -> None:
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
