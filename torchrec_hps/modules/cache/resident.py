"""Every row resident: a lookup reads its rows by id, no probe.

Where every table of a group is held whole (direct-mapped: id k of table t is entry base_t + k, with HBM
row base_t + k when HBM holds every entry) and every id of every table is held, the index can only say
"here", so the probe's reads of it are wasted: the lookup then runs one small kernel that checks each id
against its table's range and writes the TBE's index (the id itself, or the id's host row on CPU), and the
TBE reads the rows straight from HBM (fbgemm's DEVICE placement over our HBM rows, `tbe_direct.py`): fbgemm
DEVICE's own work, its bounds check and its kernel. Where the tables' rows differ in width from the HBM
rows (mixed dims: that placement needs one width) the kernel writes each id's HBM row too, and the TBE reads
those as cache locations. An id out of range only sets FLAG_INVALID (its
index is made safe), and the group then runs the probe path, which gives it the default row.

Whether every row is held is decided on the host (`Residency`): known true until a write removes an entry
(invalidate, a refresh that lost rows), re-checked on the device at the next lookup after inserts (one
reduction and one read per table, only then).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from torchrec_hps.modules.cache.layout import EMPTY_KEY, FLAG_INVALID, NO_ROW, NO_WAY

try:  # Triton comes with torch on Linux; the kernel is only launched on CUDA tensors
    import triton
    import triton.language as tl

    from torchrec_hps.modules.cache.triton_util import _count, _upper_bound
except ImportError:  # pragma: no cover
    triton = None

if TYPE_CHECKING:
    from torchrec_hps.modules.cache.cache_group import TBECacheGroup

BLOCK = 1024


class Residency:
    """Whether every id of every table of a group is held (both levels where there are two). Only a group
    whose tables are all direct-mapped can be resident (`eligible`)."""

    def __init__(self, group: "TBECacheGroup", eligible: bool) -> None:
        self.group = group
        self.eligible = eligible
        self._known: Optional[bool] = None if eligible else False

    def changed(self) -> None:
        """Entries came or went: re-check at the next lookup."""
        if self.eligible:
            self._known = None

    def __bool__(self) -> bool:
        if self._known is None:
            self._known = self._check()
        return self._known

    def _check(self) -> bool:
        g = self.group
        held = []
        for t, spec in enumerate(g.specs):  # a few tables, and only after a write
            lo = int(g.index.entry_base_np[t])
            if g.hbm is not None:  # HBM is inclusive: an entry with an HBM row is held in both levels
                held.append((g.hbm.way_of_host[lo:lo + spec.num_rows] != NO_WAY).all())
            else:
                held.append((g.index.keys[lo:lo + spec.num_rows] != EMPTY_KEY).all())
        return bool(torch.stack(held).all()) if held else False


def resident_index_torch(values: torch.Tensor, scalars: torch.Tensor, ends: torch.Tensor, feature_rows: torch.Tensor,
                         shift: int, count_host: bool, index: torch.Tensor, flags: torch.Tensor,
                         counts: torch.Tensor, locs: Optional[torch.Tensor] = None,
                         feature_entry_base: Optional[torch.Tensor] = None) -> None:
    """Reference (any device): index[p] = id + shift for each valid id of the first n = scalars[0] positions
    (0 for the rest and for ids out of range, which set FLAG_INVALID); counts[0] += ids per feature, and
    counts[1] too where `count_host` (no HBM level: every id is served from host rows). With `locs`, also
    each valid id's HBM row, its entry (its feature's first entry + id; NO_ROW elsewhere)."""
    bucket = index.numel()
    n = int(scalars[0])
    n_features = ends.numel()
    pos = torch.arange(bucket, device=index.device)
    fidx = torch.searchsorted(ends, pos, right=True)
    live = pos < n
    v = values[:bucket].to(torch.int64)
    valid = live & (v >= 0) & (v < feature_rows[fidx])
    index.copy_(torch.where(valid, v + shift, torch.zeros_like(v)).to(torch.int32))
    if locs is not None:
        locs.copy_(torch.where(valid, feature_entry_base[fidx] + v, torch.full_like(v, NO_ROW)).to(torch.int32))
    flags.bitwise_or_((live & ~valid).any().to(torch.int32).view(1) * FLAG_INVALID)
    per_feature = torch.bincount(fidx.clamp(max=n_features)[live], minlength=n_features + 1)[:n_features]
    counts[0] += per_feature
    if count_host:
        counts[1] += per_feature


if triton is not None:
    _INVALID, _NO_ROW = tl.constexpr(FLAG_INVALID), tl.constexpr(NO_ROW)

    @triton.jit
    def _resident_kernel(values_ptr, scalars_ptr, ends_ptr, n_features, rows_ptr, index_ptr, flags_ptr, counts_ptr,
                         locs_ptr, entry_base_ptr, bucket, shift, SEARCH_STEPS: tl.constexpr,
                         COUNT_HOST: tl.constexpr, LOCS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        pos = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_bucket = pos < bucket
        n = tl.load(scalars_ptr)
        fidx = _upper_bound(pos, ends_ptr, n_features, SEARCH_STEPS, BLOCK_SIZE)
        live = pos < n
        v = tl.load(values_ptr + pos, mask=live, other=0).to(tl.int64)
        valid = live & (v >= 0) & (v < tl.load(rows_ptr + fidx, mask=in_bucket, other=0))
        tl.store(index_ptr + pos, tl.where(valid, v + shift, 0).to(tl.int32), mask=in_bucket)
        if LOCS:
            base = tl.load(entry_base_ptr + fidx, mask=in_bucket, other=0)
            tl.store(locs_ptr + pos, tl.where(valid, base + v, _NO_ROW).to(tl.int32), mask=in_bucket)
        bad = tl.max((live & (~valid)).to(tl.int32), axis=0)
        tl.atomic_or(flags_ptr, bad * _INVALID, mask=bad != 0)
        _count(counts_ptr, fidx, live, n_features)
        if COUNT_HOST:
            _count(counts_ptr + n_features, fidx, live, n_features)


def resident_index(values: torch.Tensor, scalars: torch.Tensor, ends: torch.Tensor, feature_rows: torch.Tensor,
                   shift: int, count_host: bool, index: torch.Tensor, flags: torch.Tensor, counts: torch.Tensor,
                   locs: Optional[torch.Tensor] = None, feature_entry_base: Optional[torch.Tensor] = None) -> None:
    """As resident_index_torch; one kernel launch on CUDA."""
    args = (values, scalars, ends, feature_rows, shift, count_host, index, flags, counts, locs, feature_entry_base)
    if triton is None or not values.is_cuda:
        resident_index_torch(*args)
        return
    launch_resident_index(*args)


def launch_resident_index(values, scalars, ends, feature_rows, shift, count_host, index, flags, counts, locs=None,
                          feature_entry_base=None) -> None:
    bucket = index.numel()
    n_features = ends.numel()
    _resident_kernel[(triton.cdiv(bucket, BLOCK),)](
        values, scalars, ends, n_features, feature_rows, index, flags, counts,
        locs if locs is not None else index, feature_entry_base if locs is not None else feature_rows, bucket, shift,
        SEARCH_STEPS=max(1, int(n_features).bit_length() + 1), COUNT_HOST=count_host, LOCS=locs is not None,
        BLOCK_SIZE=BLOCK, num_warps=4)
