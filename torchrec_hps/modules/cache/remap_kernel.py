"""ids -> cache slots in one pass: the fused kernel of the all-hit path.

Per id position p < n (ids feature-major, `ends[f]` = one past feature f's last id): find the feature,
check the id against its table's rows, read its slot from the remap (out-of-range ids and positions past
n read the sentinel entry, a reserved slot), write the slot, touch its LRU tick (and LFU count), and OR
into `flags` whether any id missed (bit 0) or was out of range (bit 1). On CUDA this is one Triton kernel
(the torch version took ~15 launches and as many passes over the ids); elsewhere the same computation
runs as torch ops (CPU tests, and the reference the kernel is tested against).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

try:  # Triton comes with torch on Linux; the kernel is only launched on CUDA tensors
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

BLOCK = 1024
# The slot layout the remap encodes, per table: 0 = not cached (a miss), 1 = known absent from every tier
# (both hold the default vector), cached rows from 2 on.
MISS_SLOT = 0
ABSENT_SLOT = 1
RESERVED_SLOTS = 2


@dataclass
class RemapTables:
    """Per feature (plus one dummy entry at index F for positions past the ids): the table's row count
    (0 for the dummy), its first remap entry (the sentinel for the dummy) and its first slot."""

    feature_rows: torch.Tensor
    feature_base: torch.Tensor
    feature_slot_base: torch.Tensor
    remap: torch.Tensor  # int32 [sum of rows + 1]; the last entry is the sentinel
    last_access: torch.Tensor  # int64 per slot
    freq: Optional[torch.Tensor]  # int64 per slot, LFU only


def remap_and_touch_torch(values: torch.Tensor, scalars: torch.Tensor, ends: torch.Tensor, t: RemapTables,
                          slots: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Reference implementation (any device). `scalars` = [n, tick]; writes `slots` [bucket] (int32) and
    ORs into `flags` [1] (int32); returns the feature index per position."""
    n, tick = scalars[0], scalars[1]
    positions = torch.arange(slots.numel(), device=slots.device)
    fidx = torch.searchsorted(ends, positions, right=True)
    live = positions < n
    v = values[:slots.numel()].to(torch.int64)
    in_range = (v >= 0) & (v < t.feature_rows[fidx])
    flat = torch.where(live & in_range, v + t.feature_base[fidx], t.feature_base[-1])
    slots.copy_(t.remap[flat])
    bits = ((live & (slots == MISS_SLOT)).any().to(torch.int32)
            + (live & ~in_range).any().to(torch.int32) * 2)
    flags.bitwise_or_(bits.view(1))
    gslots = (slots.to(torch.int64) + t.feature_slot_base[fidx])[live]
    t.last_access.index_put_((gslots,), tick.expand(gslots.shape))
    if t.freq is not None:
        t.freq.index_add_(0, gslots, torch.ones_like(gslots))
    return fidx


if triton is not None:

    @triton.jit
    def _remap_touch_kernel(values_ptr, scalars_ptr, ends_ptr, n_features, feature_rows_ptr, feature_base_ptr,
                            feature_slot_base_ptr, remap_ptr, last_access_ptr, freq_ptr, slots_ptr, flags_ptr,
                            bucket, MISS: tl.constexpr, SEARCH_STEPS: tl.constexpr, LFU: tl.constexpr,
                            BLOCK_SIZE: tl.constexpr):
        pos = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        in_bucket = pos < bucket
        n = tl.load(scalars_ptr)
        tick = tl.load(scalars_ptr + 1)
        # upper bound of pos in ends[0:F] (sorted): how many features end at or before pos
        lo = tl.zeros([BLOCK_SIZE], dtype=tl.int64)
        hi = tl.zeros([BLOCK_SIZE], dtype=tl.int64) + n_features
        for _ in tl.static_range(SEARCH_STEPS):
            active = lo < hi
            mid = (lo + hi) // 2
            e = tl.load(ends_ptr + mid, mask=active, other=0)
            right = active & (e <= pos)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(active & (~right), mid, hi)
        fidx = lo
        live = pos < n
        v = tl.load(values_ptr + pos, mask=live, other=0).to(tl.int64)
        rows = tl.load(feature_rows_ptr + fidx, mask=in_bucket, other=0)
        in_range = (v >= 0) & (v < rows)
        sentinel = tl.load(feature_base_ptr + n_features)
        flat = tl.where(live & in_range, v + tl.load(feature_base_ptr + fidx, mask=in_bucket, other=0), sentinel)
        slot = tl.load(remap_ptr + flat, mask=in_bucket, other=1)  # 1: ABSENT_SLOT
        tl.store(slots_ptr + pos, slot, mask=in_bucket)
        miss = live & (slot == MISS)
        bad = live & (~in_range)
        bits = tl.max(miss.to(tl.int32), axis=0) + 2 * tl.max(bad.to(tl.int32), axis=0)
        tl.atomic_or(flags_ptr, bits)
        gslot = slot.to(tl.int64) + tl.load(feature_slot_base_ptr + fidx, mask=in_bucket, other=0)
        # write the tick only where it changes: hot rows repeat within a batch, and reads are cheaper than
        # contended writes
        seen = tl.load(last_access_ptr + gslot, mask=live, other=0)
        tl.store(last_access_ptr + gslot, tick + tl.zeros([BLOCK_SIZE], dtype=tl.int64), mask=live & (seen != tick))
        if LFU:
            tl.atomic_add(freq_ptr + gslot, tl.zeros([BLOCK_SIZE], dtype=tl.int64) + 1, mask=live)


def remap_and_touch(values: torch.Tensor, scalars: torch.Tensor, ends: torch.Tensor, t: RemapTables,
                    slots: torch.Tensor, flags: torch.Tensor) -> None:
    """As remap_and_touch_torch, one kernel launch on CUDA (values int32 or int64, at least bucket long)."""
    if triton is None or not values.is_cuda:
        remap_and_touch_torch(values, scalars, ends, t, slots, flags)
        return
    bucket = slots.numel()
    n_features = ends.numel()
    steps = max(1, int(n_features).bit_length() + 1)
    freq = t.freq if t.freq is not None else t.last_access
    _remap_touch_kernel[(triton.cdiv(bucket, BLOCK),)](
        values, scalars, ends, n_features, t.feature_rows, t.feature_base, t.feature_slot_base, t.remap,
        t.last_access, freq, slots, flags, bucket, MISS=MISS_SLOT, SEARCH_STEPS=steps, LFU=t.freq is not None, BLOCK_SIZE=BLOCK)
