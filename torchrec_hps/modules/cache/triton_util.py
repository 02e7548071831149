"""Triton helpers the lookup's kernels share (imported only where Triton is)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _upper_bound(x, sorted_ptr, n, SEARCH_STEPS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """For each x, how many of sorted[0:n] are <= x (a position's feature, given the features' ends)."""
    lo = tl.zeros([BLOCK_SIZE], dtype=tl.int64)
    hi = tl.zeros([BLOCK_SIZE], dtype=tl.int64) + n
    for _ in tl.static_range(SEARCH_STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        e = tl.load(sorted_ptr + mid, mask=active, other=0)
        right = active & (e <= x)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & (~right), mid, hi)
    return lo

@triton.jit
def _count(counts_ptr, fidx, mask, n_features):
    # features are contiguous runs: one atomic each for the block's first and last feature, per-id atomics
    # only for features strictly between them (small batches)
    f_lo = tl.min(tl.where(mask, fidx, n_features), axis=0)
    f_hi = tl.max(tl.where(mask, fidx, -1), axis=0)
    c_lo = tl.sum((mask & (fidx == f_lo)).to(tl.int64), axis=0)
    c_hi = tl.sum((mask & (fidx == f_hi) & (f_hi != f_lo)).to(tl.int64), axis=0)
    tl.atomic_add(counts_ptr + f_lo, c_lo, mask=c_lo > 0)
    tl.atomic_add(counts_ptr + f_hi, c_hi, mask=c_hi > 0)
    mid = mask & (fidx > f_lo) & (fidx < f_hi)
    tl.atomic_add(counts_ptr + fidx, tl.full(fidx.shape, 1, tl.int64), mask=mid)
