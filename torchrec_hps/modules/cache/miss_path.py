"""What happens on a miss: ids that neither level holds.

The probe flagged them (FLAG_MISS). Here, once per lookup for all tables of the group: the missing (table,
id) pairs are deduplicated on the device and come to the host sorted; per table the hit rate over the
lookup's distinct ids picks the mode, as HugeCTR HPS does: below `hit_rate_threshold` the lookup waits
(sync: one batched request per table to the tiers, one insert into the host level's index for every table,
the rows written into host memory by one copy per table, then the lookup runs again); at or above it the
ids get the default vector now and an AsyncInserter fetches and inserts them in the background.
Ids found in no tier are cached as the default vector (counted as not found), so they are not asked for
again until `update` or `invalidate`. A sync id whose set has no room left (every way used by this lookup)
is served exactly all the same: its table's features are recomputed from the fetched rows
(`overwrite_uncached`).
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import numpy as np
import torch

from torchrec_hps.modules.cache.layout import RESERVED_SLOTS

if TYPE_CHECKING:
    from torchrec_hps.modules.cache.cache_group import TBECacheGroup
    from torchrec_hps.modules.cache.lookup_path import Shape

logger = logging.getLogger(__name__)

Overflow = Tuple[np.ndarray, torch.Tensor]  # sorted ids that did not fit, their rows


def fetch_misses(g: "TBECacheGroup", shape: "Shape", n: int) -> Dict[int, Overflow]:
    """Handle the ids of the lookup in `shape` that neither level holds; returns, per table, the sync ids
    that did not fit and their rows."""
    values = shape.values[:n].to(torch.int64)
    fidx = torch.searchsorted(shape.ends, torch.arange(n, device=values.device), right=True)
    valid = (values >= 0) & (values < g.probe_tables.feature_rows[fidx])
    miss = valid & (shape.entries[:n] < 0)
    pairs = torch.unique(torch.stack([g.feature_table[fidx[miss]], values[miss]]), dim=1)  # sorted (table, id)
    n_tables = len(g.specs)
    if g.probe_tables.touch:  # distinct hits, counted by the probe
        hits = torch.zeros(n_tables, dtype=torch.int64, device=values.device).index_add_(0, g.feature_table,
                                                                                        shape.counts[3])
    else:  # the probe records no use: the lookup's distinct entries, here on the miss path only
        held = torch.unique(shape.entries[:n][shape.entries[:n] >= 0].to(torch.int64))
        hits = torch.bincount(torch.searchsorted(g.index.entry_base, held, right=True) - 1, minlength=n_tables)
    pairs_h, hits_h = pairs.cpu().numpy(), hits.cpu().numpy()
    n_miss = np.bincount(pairs_h[0], minlength=n_tables)
    starts = np.concatenate([[0], np.cumsum(n_miss)])
    batch: List[Tuple[int, np.ndarray, torch.Tensor, np.ndarray]] = []
    for t in np.flatnonzero(n_miss):  # tables with misses, each one request to its tiers
        keys = pairs_h[1][starts[t]:starts[t + 1]]
        s = g.stats_[t]
        s.unique_misses += len(keys)
        hit_rate = hits_h[t] / (hits_h[t] + len(keys))
        if hit_rate < g.config.hit_rate_threshold or g.inserter is None:
            s.sync_lookups += 1
            res = g.storage.get(g.specs[t].key, torch.from_numpy(keys))
            batch.append((int(t), keys, res.rows, res.found.numpy()))
        else:
            s.async_lookups += 1
            s.defaulted_async += len(keys)
            g.inserter.submit(g, int(t), keys)
    return insert_rows(g, batch, protect_tick=g._tick)


def insert_rows(g: "TBECacheGroup", batch: Sequence[Tuple[int, np.ndarray, torch.Tensor, np.ndarray]],
                protect_tick: int) -> Dict[int, Overflow]:
    """Insert (table, distinct ids not held, their rows, found-in-a-tier mask) for several tables at once:
    one index insert, the evicted entries dropped from HBM, one row copy per table into host memory. Ids
    found in no tier are cached as the default vector. Returns the ids that did not fit, per table."""
    batch = [b for b in batch if len(b[1])]
    if not batch:
        return {}
    tables = torch.from_numpy(np.concatenate([np.full(len(k), t, dtype=np.int64) for t, k, _, _ in batch]))
    ids = torch.from_numpy(np.concatenate([k for _, k, _, _ in batch]).astype(np.int64))
    tables_d, ids_d = tables.to(g.device), ids.to(g.device)
    entries, evicted, _ = g.index.insert(tables_d, ids_d, tick=g._tick, protect_tick=protect_tick)
    g.residency.changed()
    if g.hbm is not None:
        g.hbm.drop(evicted)
    slots = g.index.local_slots(tables_d, entries).cpu()
    fits = (entries >= 0).cpu()
    if evicted.numel():
        ev_tables = torch.searchsorted(g.index.entry_base, evicted, right=True) - 1
        for t, c in enumerate(torch.bincount(ev_tables, minlength=len(g.specs)).tolist()):
            g.stats_[t].evicted += c
    g.wait_for_device()  # the rows written next may belong to evicted entries a queued kernel still reads
    overflow: Dict[int, Overflow] = {}
    lo = 0
    for t, keys, rows, found in batch:
        hi = lo + len(keys)
        fit, at = fits[lo:hi], slots[lo:hi]
        found_t = torch.from_numpy(found)
        rows_full = rows.float().clone()  # aligned with keys
        rows_full[~found_t] = g.config.default_value
        g.host_rows.write(t, at[fit], rows_full[fit])
        s = g.stats_[t]
        s.inserted += int(fit.sum())
        s.not_found += int((~found_t).sum())
        if not bool(fit.all()):
            s.overflow_lookups += 1
            left = ~fit.numpy()
            order = np.argsort(keys[left], kind="stable")
            overflow[t] = (keys[left][order], rows_full[torch.from_numpy(left)][torch.from_numpy(order)])
        lo = hi
    if g.hbm is not None and g.hbm.direct:  # an HBM row for every entry: written with the host row, so
        g.hbm.fill(entries[fits.to(entries.device)], g._tick, g.host_rows.layout)  # lookups never admit
    return overflow


def overwrite_uncached(g: "TBECacheGroup", out: torch.Tensor, shape: "Shape", n: int, t: int, left: Overflow,
                       per_sample_weights) -> torch.Tensor:
    """Recompute the features of table t exactly: held rows from the host level, the rest from `left`."""
    from torch.nn.functional import embedding_bag

    keys = torch.from_numpy(left[0]).to(out.device)
    rows = left[1].to(out.device)
    batch = (shape.offsets.numel() - 1) // g.n_features
    ends = [0] + shape.ends.tolist()
    dims = [g.specs[ft].dim for ft in g.feature_table_list]
    col = np.concatenate([[0], np.cumsum(dims)])
    mode = "mean" if int(g.tbe.pooling_mode) == 1 else "sum"
    out = out.clone()
    for f, ft in enumerate(g.feature_table_list):  # cold path: only tables whose new ids overflowed
        if ft != t:
            continue
        lo, hi = ends[f], ends[f + 1]
        values = shape.values[lo:hi].to(torch.int64)
        feature_rows = g.host_rows.read(t, shape.slots[lo:hi])
        pos = torch.searchsorted(keys, values).clamp(max=len(keys) - 1)
        is_left = (keys[pos] == values) & (shape.slots[lo:hi] < RESERVED_SLOTS)
        feature_rows = torch.where(is_left.view(-1, 1), rows[pos], feature_rows)
        off = shape.offsets[f * batch:(f + 1) * batch + 1].to(torch.int64) - lo
        w = per_sample_weights[lo:hi] if per_sample_weights is not None else None
        out[:, col[f]:col[f + 1]] = embedding_bag(torch.arange(hi - lo, device=out.device), feature_rows, off,
                                                  mode=mode, per_sample_weights=w, include_last_offset=True)
    return out


class AsyncInserter:
    """One background thread that fetches and inserts rows for lookups in asynchronous mode."""

    def __init__(self) -> None:
        self._queue: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="hps-async-insert", daemon=True)
        self._thread.start()
        self.errors = 0

    def submit(self, group: "TBECacheGroup", t: int, keys: np.ndarray) -> None:
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
