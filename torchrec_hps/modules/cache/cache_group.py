"""The embedding cache of one pooling group: its tables' rows in two levels, read by one fbgemm TBE.

Data flow of a lookup (all tables of the group at once, no per-table or per-id Python):
KJT ids and lengths -> offsets and layout check (offsets_kernel.py) -> probe of the host level's index
(probe_kernel.py: each id's host row and HBM row, flags, counters) -> admission into HBM (hbm_level.py) ->
fbgemm's TBE, which reads each row from HBM, or from host-mapped memory in place where it is not in HBM
(lookup_path.py runs these as one CUDA graph). The host reads one flags word. Only if an id is in neither
level does the host step in (miss_path.py: one batched request per table to the tiers, rows into the host
level by one copy), and the lookup runs again.

Without CUDA there is no HBM level: the host level is the cache and the TBE runs on the host.
"""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from torchrec_hps.config import CacheConfig, TableSpec
from torchrec_hps.modules.cache.hbm_level import HBMLevel
from torchrec_hps.modules.cache.host_level import HostRows
from torchrec_hps.modules.cache.interface import EmbeddingCacheGroup
from torchrec_hps.modules.cache.layout import (ADMISSION, FLAG_INVALID, FLAG_LAYOUT, FLAG_MISS, MAX_TICK,
                                               RESERVED_SLOTS)
from torchrec_hps.modules.cache.lookup_path import LookupPath, Shape
from torchrec_hps.modules.cache.miss_path import AsyncInserter, fetch_misses, insert_rows, overwrite_uncached
from torchrec_hps.modules.cache.probe_kernel import ProbeTables
from torchrec_hps.modules.cache.resident import Residency
from torchrec_hps.modules.cache.set_index import SetIndex
from torchrec_hps.modules.cache.tbe_direct import bind_pooled_lookup, bind_resident_lookup, resident_binding_fits
from torchrec_hps.storage.hierarchy import StorageHierarchy

HASHED_ID_BOUND = (1 << 63) - 1
# Tests set this to build the HBM level in host memory on CPU, so CI runs its admission logic (the CPU
# TBE then reads every row from the host level, which the HBM rows copy exactly).
HBM_LEVEL_ON_CPU = False


@dataclass
class CacheTableStats:
    sync_lookups: int = 0  # lookups with misses that waited for the rows
    async_lookups: int = 0  # lookups with misses that served defaults and inserted in the background
    unique_misses: int = 0  # distinct ids fetched from the tiers
    inserted: int = 0  # into the host level
    evicted: int = 0  # from the host level
    not_found: int = 0  # distinct ids found in no tier (cached as the default vector)
    defaulted_async: int = 0  # distinct misses served the default vector while inserted in the background
    overflow_lookups: int = 0  # lookups whose new ids did not all fit their sets (served exactly, uncached)

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


@dataclass
class _Prefetch:
    """A batch registered by prefetch(): its ids on the device; once launched, its buffers, its tick and how
    many lookups/writes (_mark) had come before it."""

    values: torch.Tensor
    lengths: torch.Tensor
    weights: Optional[torch.Tensor]
    token: int
    shape: Optional[Shape] = None
    tick: int = 0
    marks: int = 0


class TBECacheGroup(EmbeddingCacheGroup):
    """Tables of one pooling mode behind one fbgemm IntNBit TBE (FP32 or FP16 rows, FP32 output)."""

    def __init__(self, specs: Sequence[TableSpec], feature_tables: Sequence[int], pooling_mode,
                 storage: StorageHierarchy, config: CacheConfig, device: torch.device,
                 inserter: Optional[AsyncInserter] = None) -> None:
        super().__init__()
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

        self.specs = list(specs)
        self.config = config
        self.storage = storage
        self.device = device
        self.inserter = inserter
        cuda = device.type == "cuda"
        two_levels = cuda or HBM_LEVEL_ON_CPU
        host_rows = [config.host_rows_for(s.num_rows) if two_levels else config.rows_for(s.num_rows)
                     for s in self.specs]
        self.index = SetIndex(host_rows, device, lfu=config.eviction == "lfu",
                              whole=[r >= s.num_rows and not config.hashed_ids for r, s in zip(host_rows, self.specs)])
        self.capacities = self.index.capacities
        row_type, row_dtype = (SparseType.FP16, torch.float16) if config.cache_dtype == "fp16" else \
            (SparseType.FP32, torch.float32)
        location = EmbeddingLocation.MANAGED_CACHING if cuda else EmbeddingLocation.HOST
        self.tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(s.name, c + RESERVED_SLOTS, s.dim, row_type, location)
                             for s, c in zip(self.specs, self.capacities)],
            feature_table_map=list(feature_tables), pooling_mode=pooling_mode, device=device,
            output_dtype=SparseType.FP32,
            bounds_check_mode=BoundsCheckMode.NONE,  # ids are checked by the probe, rows are ours
            # fbgemm's own cache stays minimal (we pass our HBM rows to its kernel); its UVM weights, our
            # host level, are host-mapped: device-visible pinned memory, never managed memory
            cache_load_factor=1e-9, uvm_host_mapped=True)
        self.tbe.initialize_weights()
        self.host_rows = HostRows(self.tbe, self.specs, self.index, row_dtype, config.default_value)
        self.hbm: Optional[HBMLevel] = None
        if two_levels:
            hbm_rows = sum(config.rows_for(s.num_rows) for s in self.specs)
            if hbm_rows >= sum(host_rows):  # HBM holds the whole host level: one row per entry
                hbm_rows = self.index.num_entries
            self.hbm = HBMLevel(hbm_rows,
                                max(int(w.shape[1]) for w, _ in self.tbe.split_embedding_weights()),
                                self.index.ticks, device)
        self.pooled_lookup = bind_pooled_lookup(self.tbe, self.hbm.rows if (cuda and self.hbm) else None)
        self.n_features = len(feature_tables)
        self.feature_table_list = list(feature_tables)
        ft = self.feature_table_list
        bound = [HASHED_ID_BOUND if config.hashed_ids else self.specs[t].num_rows for t in ft]

        def per_feature(values, dummy) -> torch.Tensor:  # one extra entry for positions past the ids
            return torch.tensor(list(values) + [dummy], dtype=torch.int64, device=device)

        self.feature_table = torch.tensor(ft, dtype=torch.int64, device=device)
        # every table held whole and an HBM row for every entry: nothing is evicted or admitted, so
        # lookups record no use (ticks) and admit nothing (the HBM level is written on insert)
        all_direct = bool(self.index.direct[ft].all())
        hbm_whole = self.hbm is not None and self.hbm.direct
        self.probe_tables = ProbeTables(
            feature_rows=per_feature(bound, 0),
            feature_set_base=per_feature(self.index.set_base[ft].tolist(), 0),
            feature_n_sets=per_feature(self.index.n_sets[ft].tolist(), 1),
            feature_entry_base=per_feature(self.index.entry_base[ft].tolist(), 0),
            feature_direct=per_feature(self.index.direct[ft].tolist(), 0).to(torch.bool),
            keys=self.index.keys, ticks=self.index.ticks, freq=self.index.freq,
            hbm_way=self.hbm.way_of_host if self.hbm else None, hbm_n_sets=self.hbm.n_sets if self.hbm else 1,
            hbm_direct=hbm_whole,
            # HBM holding the whole host level is written with it (insert_rows): lookups admit nothing
            admission=ADMISSION["never"] if hbm_whole else ADMISSION[config.admission],
            all_direct=all_direct, touch=not (all_direct and (hbm_whole or self.hbm is None)))
        # every table held whole: once every id is held too, lookups read the rows by id (resident.py); on
        # CUDA from HBM, which must then hold every entry: as the tables' own rows where they have the HBM rows'
        # width, else as cache locations (one more int per id)
        hbm_reads = cuda and self.hbm is not None
        self.residency = Residency(self, all_direct and (self.hbm is None or hbm_whole))
        self.resident_locs = hbm_reads and not resident_binding_fits(self.tbe, self.hbm.rows)
        if hbm_reads and not self.resident_locs:
            self.resident_lookup = bind_resident_lookup(self.tbe, self.hbm.rows, self.index.entry_base_np)
            self.resident_shift = 0  # the id is the row past its table's first
        else:  # the host rows (the CPU path; on CUDA with the locations): id k is host row RESERVED_SLOTS + k
            self.resident_lookup = self.pooled_lookup
            self.resident_shift = RESERVED_SLOTS
        # per table: ids looked up, ids not served from HBM (the host level on CPU), ids in neither level,
        # distinct hits; counted on the device as lookups go
        self.totals = torch.zeros(4, len(self.specs), dtype=torch.int64, device=device)
        self.stats_ = [CacheTableStats() for _ in self.specs]
        self.lock = threading.RLock()
        self._tick = 0
        self._writes = [0] * len(self.specs)  # updates/invalidations per table: background inserts check them
        # prefetch (a side stream, ordered against the caller's stream by events; see prefetch())
        self._side: Optional[torch.cuda.Stream] = None
        self._prefetched: Optional[torch.cuda.Event] = None
        self._last_write: Optional[torch.cuda.Event] = None
        self._next: Optional[_Prefetch] = None  # a registered batch (ids on the device), launched by the next lookup
        self._inflight: Optional[_Prefetch] = None  # a launched prefetch whose flags are not read yet
        self._prefetched_batch: Optional[tuple] = None
        self._tokens = 0
        self._marks = 0  # lookups and writes so far (_mark): a prefetch's result stands while none comes between
        self.prefetches = 0
        self.prefetch_reused = 0  # lookups that read their prefetch's probe and admission (no probe of their own)
        self.path = LookupPath(self, use_graphs=config.cuda_graphs and cuda)

    # ---- the lookup ----
    def lookup(self, values: torch.Tensor, lengths: torch.Tensor, per_sample_weights: Optional[torch.Tensor],
               allow_invalid: bool = False) -> Optional[torch.Tensor]:
        """Pooled embeddings [B, sum of feature dims] for a KJT's ids and lengths (features in this group's
        order), or None when the input needs the engine's checks: lengths that disagree with the ids, or ids
        out of range (unless `allow_invalid`: the engine has checked them, and they get the default)."""
        with self.lock:
            self._after_prefetch()
            return self._lookup_locked(values, lengths, per_sample_weights, allow_invalid)

    def _lookup_locked(self, values: torch.Tensor, lengths: torch.Tensor, per_sample_weights: Optional[torch.Tensor],
                       allow_invalid: bool) -> Optional[torch.Tensor]:
        # the lookup of a batch just prefetched is not counted again (the prefetch counted its misses)
        count = self._prefetched_batch != (values.numel(), lengths.numel())
        self.__dict__["_prefetched_batch"] = None  # not nn.Module.__setattr__ (microseconds per lookup)
        self._next_tick()
        out, flags, shape = self.path.run(values, lengths, per_sample_weights, self._tick, count, allow_invalid)
        if flags & FLAG_LAYOUT or (flags & FLAG_INVALID and not allow_invalid):
            return None
        if flags & FLAG_MISS:
            overflow = fetch_misses(self, shape, values.numel())
            out = None  # (a graph's output buffer is used again only once nothing holds it)
            out, _, shape = self.path.run(values, lengths, per_sample_weights, self._tick, False, allow_invalid,
                                          rerun=True)
            for t, left in overflow.items():
                out = overwrite_uncached(self, out, shape, values.numel(), t, left, per_sample_weights)
        self._mark()
        self._launch_prefetch()
        return out

    def lookup_prefetched(self, token: int) -> Optional[torch.Tensor]:
        """The lookup of the batch prefetch() registered as `token`, on its device copy. If its prefetch found
        every id valid and in a level, and no lookup or write came between, the TBE reads the rows that
        probe and admission found: no second probe and no host wait on this lookup's flags (their
        admission and staged rows stand until the next admission, which is queued after this TBE).
        Otherwise an ordinary lookup of the copy; None (and nothing done) for a batch no longer registered."""
        with self.lock:
            pending = self._next
            if pending is not None and pending.token == token:  # registered, not launched yet: look it up now
                self._next = None
                self._after_prefetch()
                torch.cuda.current_stream(self.device).wait_stream(self._side)
                return self._lookup_locked(pending.values, pending.lengths, pending.weights, allow_invalid=False)
            pre = self._inflight
            if pre is None or pre.token != token:
                return None
            undisturbed = self._marks == pre.marks
            clean = self._after_prefetch() == 0
            if not (clean and undisturbed):
                return self._lookup_locked(pre.values, pre.lengths, pre.weights, allow_invalid=False)
            self.__dict__["_prefetched_batch"] = None
            n = pre.values.numel()
            out = self.pooled_lookup(pre.shape.slots[:n], pre.shape.offsets, pre.weights, pre.shape.probe_out.locs[:n])
            self.prefetch_reused += 1
            self._mark()
            self._launch_prefetch()
            return out

    # ---- prefetch: the next batch's misses and HBM admission while the caller's dense layers run ----
    def prefetch(self, values: torch.Tensor, lengths: torch.Tensor, per_sample_weights: Optional[torch.Tensor] = None
                 ) -> int:
        """Bring a coming batch's rows in during the next lookup: call it for batch i+1 before batch i's
        forward. Its ids are copied to the device now (on a side stream: pass pinned host tensors); right after
        batch i's TBE is queued, the probe and the admission into HBM (the copy over PCIe) run on the side
        stream, overlapping the dense layers the caller queues after the lookup; batch i+1's lookup reads the
        flags (the miss path for ids in neither level runs then, if any) and finds its rows. Exact whatever
        happens in between; on the host (no streams) it is carried out at once."""
        with self.lock:
            if self.device.type != "cuda":
                self._prefetch_now(values, lengths, per_sample_weights)
                return 0  # carried out: nothing registered
            if self._side is None:  # high priority: its copy gets SMs as the caller's GEMM blocks retire
                self._side = torch.cuda.Stream(device=self.device, priority=-1)
                self._prefetched = torch.cuda.Event()
            if values.device == self.device:  # made on the caller's stream: it may still be in the making
                self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                copies = [x.to(self.device, non_blocking=True) if x is not None else None
                          for x in (values, lengths, per_sample_weights)]
            self._tokens += 1
            self._next = _Prefetch(*copies, token=self._tokens)
            return self._tokens

    def _prefetch_now(self, values, lengths, weights) -> None:
        self._next_tick()
        _, flags, shape = self.path.run(values, lengths, weights, self._tick, True, True, prefetch=True)
        if flags & FLAG_MISS and not flags & FLAG_LAYOUT:
            fetch_misses(self, shape, values.numel())
            self.path.run(values, lengths, weights, self._tick, False, True, prefetch=True, rerun=True)
        self.__dict__["_prefetched_batch"] = (values.numel(), lengths.numel())
        self.prefetches += 1

    def _launch_prefetch(self) -> None:
        """After a lookup's TBE is queued: the registered batch's probe and admission on the side stream, the
        host not waiting (its flags are read by the next locked call)."""
        if self._next is None:
            return
        pre = self._next
        self._next = None
        self._side.wait_event(self._last_write)  # this lookup (its TBE reads the HBM rows) and any write
        with torch.cuda.stream(self._side):
            self._next_tick()
            _, _, pre.shape = self.path.run(pre.values, pre.lengths, pre.weights, self._tick, True, True,
                                            prefetch=True, wait=False)
            self._prefetched.record(self._side)
        pre.tick, pre.marks = self._tick, self._marks
        self._inflight = pre
        self.__dict__["_prefetched_batch"] = (pre.values.numel(), pre.lengths.numel())
        self.prefetches += 1

    def _after_prefetch(self) -> int:
        """Before any work on the caller's stream: a launched prefetch is complete (both change the levels);
        ids it found in neither level are fetched now, and admitted. Returns the prefetch's flags (0: none
        launched, or every id valid and in a level)."""
        pre = self._inflight
        if pre is None:
            return 0
        self._inflight = None
        self._prefetched.synchronize()
        torch.cuda.current_stream(self.device).wait_event(self._prefetched)
        flags = int(pre.shape.flags_np[0])
        if flags & FLAG_MISS and not flags & FLAG_LAYOUT:
            fetch_misses(self, pre.shape, pre.values.numel())
            self.path.run(pre.values, pre.lengths, pre.weights, pre.tick, False, True, prefetch=True, rerun=True)
        return flags

    def _mark(self) -> None:
        """Where the caller's stream stands after a lookup or a write: a launched prefetch starts there. The
        event is recorded only while a prefetch is registered: one is launched only right after a lookup's
        mark (and the stream's order puts every earlier write before it), and recording costs host time
        on every lookup (~5 us)."""
        if self._next is not None and self.device.type == "cuda":
            if self._last_write is None:
                self._last_write = torch.cuda.Event()
            self._last_write.record(torch.cuda.current_stream(self.device))
        self.__dict__["_marks"] = self._marks + 1

    def _next_tick(self) -> None:
        # a plain attribute write: nn.Module.__setattr__ costs microseconds on the per-lookup path
        tick = self._tick + 1
        if tick >= MAX_TICK:  # int32 ticks: shift every tick down, keeping the LRU order
            self.index.rebase_ticks(MAX_TICK // 2)  # the HBM level's order too (it reads these ticks)
            tick -= MAX_TICK // 2
        self.__dict__["_tick"] = tick

    def wait_for_device(self) -> None:
        """Before host rows are rewritten: the rewrite runs on the current stream, but a kernel queued on
        another stream (another thread's lookup) may still read them."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _held(self, t: int, keys: np.ndarray):
        ids = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.int64)).to(self.device)
        entries = self.index.find(torch.full_like(ids, t), ids)
        return entries, (entries >= 0).cpu().numpy()

    # ---- the update path ----
    def invalidate(self, t: int, keys: np.ndarray) -> None:
        """Forget `keys` of table t in both levels: the next lookup fetches them from the tiers."""
        with self.lock:
            self._after_prefetch()
            self._writes[t] += 1
            entries, held = self._held(t, keys)
            self._forget(entries[torch.from_numpy(held).to(self.device)])

    def update(self, t: int, keys: np.ndarray, rows: torch.Tensor) -> int:
        """New values for distinct `keys`: rows held in either level are overwritten in place. Returns how
        many were held."""
        with self.lock:
            self._after_prefetch()
            self._writes[t] += 1
            entries, held = self._held(t, keys)
            if not held.any():
                return 0
            mask = torch.from_numpy(held)
            self._rewrite(t, entries[mask.to(self.device)], rows[mask.to(rows.device)])
            return int(held.sum())

    def prefill(self, t: int, keys: np.ndarray) -> int:
        """Insert rows for `keys` (hottest first) while the host level has room; returns how many went in."""
        with self.lock:
            self._after_prefetch()
            _, held = self._held(t, keys)
            keys = keys[~held][:max(0, self.capacities[t] - self.cached_rows(t))]
            if len(keys) == 0:
                return 0
            res = self.storage.get(self.specs[t].key, torch.from_numpy(keys))
            before = self.stats_[t].inserted
            insert_rows(self, [(t, keys, res.rows, res.found.numpy())], protect_tick=-1)
            if self.hbm is not None:  # hottest first into HBM too, while it has room
                entries, held = self._held(t, keys)
                self.hbm.fill(entries[torch.from_numpy(held).to(self.device)], self._tick, self.host_rows.layout)
            self._mark()
            return self.stats_[t].inserted - before

    def refresh(self, t: int) -> int:
        """Re-read every cached row of table t from the tiers (rows gone from every tier are dropped)."""
        with self.lock:
            self._after_prefetch()
            entries = self.index.table_entries(t)
            if entries.numel() == 0:
                return 0
            keys = self.index.keys[entries].cpu().numpy()
            res = self.storage.get(self.specs[t].key, torch.from_numpy(keys))
            mask = res.found.to(self.device)
            self._rewrite(t, entries[mask], res.rows[res.found])
            self._forget(entries[~mask])
            return int(res.found.sum())

    def _rewrite(self, t: int, entries: torch.Tensor, rows: torch.Tensor) -> None:
        """New values for held entries of table t: their host rows, then their HBM copies."""
        self.wait_for_device()
        self.host_rows.write(t, self.index.local_slots(torch.full_like(entries, t), entries), rows)
        if self.hbm is not None:
            self.hbm.refresh(entries, self.host_rows.layout)
        self._mark()

    def _forget(self, entries: torch.Tensor) -> None:
        """Drop entries from both levels (HBM first: it is inclusive)."""
        if self.hbm is not None:
            self.hbm.drop(entries)
        self.index.remove(entries)
        self.residency.changed()
        self._mark()

    def insert_missing(self, t: int, keys: np.ndarray) -> None:
        """Background insertion (AsyncInserter): fetch outside the lock, insert what is still missing."""
        with self.lock:
            keys = keys[~self._held(t, keys)[1]]
            writes = self._writes[t]
        if len(keys) == 0:
            return
        res = self.storage.get(self.specs[t].key, torch.from_numpy(keys))
        with self.lock:
            if self._writes[t] != writes:  # rows read before an update may be stale: the next miss refetches
                return
            self._after_prefetch()
            still = ~self._held(t, keys)[1]  # another insert may have run since
            insert_rows(self, [(t, keys[still], res.rows[torch.from_numpy(still)], res.found.numpy()[still])],
                        protect_tick=self._tick)
            self._mark()

    # ---- introspection ----
    def cached_rows(self, t: int) -> int:
        return int(self.index.table_entries(t).numel())

    def cached_keys(self, t: int) -> np.ndarray:
        return np.sort(self.index.keys[self.index.table_entries(t)].cpu().numpy())

    def index_bytes(self) -> int:
        """Device memory of the index (host level's keys and ticks, and the HBM level's bookkeeping)."""
        n = self.index.num_entries * self.index.bytes_per_entry()
        return n + (self.hbm.index_bytes() if self.hbm is not None else 0)

    def close(self) -> None:
        with self.lock:
            self._next = None
            if self._inflight is not None:
                self._prefetched.synchronize()
                self._inflight = None
        self.path.release()

    def table_stats(self, t: int) -> Dict[str, float]:
        d = self.stats_[t].as_dict()
        ids, not_from_hbm, host_misses, _ = (int(x) for x in self.totals[:, t].tolist())
        misses = not_from_hbm if self.hbm is not None else host_misses  # not served by the fastest level
        d.update(ids=ids, misses=misses, hits=ids - misses, hit_rate=(ids - misses) / ids if ids else 0.0,
                 host_misses=host_misses, host_hit_rate=(ids - host_misses) / ids if ids else 0.0)
        d["capacity"] = self.capacities[t]
        d["cached_rows"] = self.cached_rows(t)
        if self.hbm is not None:
            d["hbm_capacity"] = self.hbm.capacity  # the group's HBM rows, shared by its tables
        return d
