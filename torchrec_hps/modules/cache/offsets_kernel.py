"""A KJT's lengths -> the TBE's offsets, each feature's end and the layout check; and the lookup's counters
into the group's totals: the first and last kernels of the lookup's graph.

On CUDA these are three small Triton kernels (chunk sums; offsets, ends and the layout flag; counts and
the masked id counters) where torch needed about fifteen launches, and in a CUDA graph every node adds
latency to a lookup whatever its size. The torch versions are the reference and the CPU path.
Offsets are made safe whatever the input: lengths are clamped at 0 and offsets at n (the batch's id count),
so the TBE never reads past the ids; a negative length or lengths that do not add up to n set FLAG_LAYOUT.
"""
from __future__ import annotations

from typing import Optional

import torch

from torchrec_hps.modules.cache.layout import FLAG_LAYOUT

try:  # Triton comes with torch on Linux; the kernels are only launched on CUDA tensors
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

CHUNK = 1024
CHUNK_SUMS = 1024  # chunk sums read per round of the prefix


def offsets_and_checks_torch(lengths: torch.Tensor, scalars: torch.Tensor, n_features: int, batch: int,
                             offsets: torch.Tensor, ends: torch.Tensor, flags: torch.Tensor) -> None:
    """Writes offsets [F*B+1] (int32), ends [F] (int64: one past each feature's last id) and sets flags [1]
    to FLAG_LAYOUT or 0. `scalars[0]` is n."""
    n = scalars[0]
    layout_bad = lengths.sum() != n
    if lengths.numel():
        layout_bad = layout_bad | (lengths.amin() < 0)
    full = torch.minimum(torch.ops.fbgemm.asynchronous_complete_cumsum(lengths.clamp(min=0)), n)
    offsets.copy_(full)
    ends.copy_(full[torch.arange(1, n_features + 1, device=lengths.device) * batch])
    flags.copy_(layout_bad.to(torch.int32).view(1) * FLAG_LAYOUT)


def commit_counts_torch(flags: torch.Tensor, scalars: torch.Tensor, counts: torch.Tensor, totals: torch.Tensor,
                        feature_table: torch.Tensor, flags_out: Optional[torch.Tensor] = None) -> None:
    """totals[:, table] += counts[:, feature] if the lookup counts (scalars[2]) and no blocking flag
    (scalars[3]) is set; the flags are copied to `flags_out` if given."""
    gate = ((scalars[2] != 0) & ((flags[0].to(torch.int64) & scalars[3]) == 0)).to(torch.int64)
    totals.index_add_(1, feature_table, counts * gate)
    if flags_out is not None:
        flags_out.copy_(flags, non_blocking=True)


if triton is not None:

    @triton.jit
    def _chunk_sums_kernel(lengths_ptr, total, chunk_sums_ptr, chunk_neg_ptr, flags_ptr, scalars_src_ptr, scalars_ptr,
                           CH: tl.constexpr):
        pid = tl.program_id(0)
        idx = pid * CH + tl.arange(0, CH)
        lengths = tl.load(lengths_ptr + idx, mask=idx < total, other=0)
        tl.store(chunk_sums_ptr + pid, tl.sum(tl.maximum(lengths, 0), axis=0))
        tl.store(chunk_neg_ptr + pid, (tl.min(lengths, axis=0) < 0).to(tl.int32))
        if pid == 0:
            tl.store(flags_ptr, 0)
            # the scalars into device memory once (the source may be pinned host memory), for the later kernels
            for i in tl.static_range(4):
                tl.store(scalars_ptr + i, tl.load(scalars_src_ptr + i))

    @triton.jit
    def _offsets_kernel(lengths_ptr, total, chunk_sums_ptr, chunk_neg_ptr, n_chunks, scalars_ptr, offsets_ptr,
                        ends_ptr, batch, flags_ptr, LAYOUT: tl.constexpr, CH: tl.constexpr,
                        SUMS: tl.constexpr):
        # the earlier chunks' sums, SUMS at a time (a fixed width: one compiled kernel for every batch size)
        pid = tl.program_id(0)
        prefix = tl.zeros([], dtype=tl.int64)
        start = 0
        while start < pid:
            c = start + tl.arange(0, SUMS)
            prefix += tl.sum(tl.load(chunk_sums_ptr + c, mask=c < pid, other=0), axis=0)
            start += SUMS
        n = tl.load(scalars_ptr)
        idx = pid * CH + tl.arange(0, CH)
        live = idx < total
        lengths = tl.maximum(tl.load(lengths_ptr + idx, mask=live, other=0), 0)
        inclusive = tl.cumsum(lengths, axis=0) + prefix
        off = tl.minimum(inclusive, n)
        tl.store(offsets_ptr + idx + 1, off.to(tl.int32), mask=live)
        if pid == 0:
            tl.store(offsets_ptr, 0)
        is_end = live & ((idx + 1) % batch == 0)
        tl.store(ends_ptr + (idx + 1) // batch - 1, off, mask=is_end)
        if pid == n_chunks - 1:
            total_ids = tl.max(tl.where(live, inclusive, 0), axis=0)
            negative = tl.zeros([], dtype=tl.int32)
            start = 0
            while start < n_chunks:
                c = start + tl.arange(0, SUMS)
                negative = tl.maximum(negative, tl.max(tl.load(chunk_neg_ptr + c, mask=c < n_chunks, other=0), axis=0))
                start += SUMS
            bad = (total_ids != n) | (negative > 0)
            tl.atomic_or(flags_ptr, bad.to(tl.int32) * LAYOUT)

    @triton.jit
    def _commit_counts_kernel(flags_ptr, scalars_ptr, counts_ptr, n_features, totals_ptr, n_tables,
                              feature_table_ptr, flags_out_ptr, COPY_OUT: tl.constexpr, F_BLOCK: tl.constexpr):
        f = tl.arange(0, F_BLOCK)
        real = f < n_features
        flags = tl.load(flags_ptr)
        if COPY_OUT:  # to pinned host memory, read by the host in place (no copy node)
            tl.store(flags_out_ptr, flags)
        counted = (tl.load(scalars_ptr + 2) != 0) & ((flags.to(tl.int64) & tl.load(scalars_ptr + 3)) == 0)
        table = tl.load(feature_table_ptr + f, mask=real, other=0)
        for row in tl.static_range(4):
            c = tl.load(counts_ptr + row * n_features + f, mask=real, other=0)
            tl.atomic_add(totals_ptr + row * n_tables + table, c, mask=real & counted & (c != 0))


def fused_kernels(t: torch.Tensor) -> bool:
    """Whether these functions run Triton kernels on `t` (CUDA, Triton present, not empty)."""
    return triton is not None and t.is_cuda and t.numel() > 0


class OffsetsScratch:
    """Per-shape scratch buffers of the fused kernels (chunk sums and negative-length flags)."""

    def __init__(self, total: int, device: torch.device) -> None:
        self.n_chunks = max(1, -(-total // CHUNK))
        self.chunk_sums = torch.zeros(self.n_chunks, dtype=torch.int64, device=device)
        self.chunk_neg = torch.zeros(self.n_chunks, dtype=torch.int32, device=device)


def offsets_and_checks(lengths: torch.Tensor, scalars_src: torch.Tensor, scalars: torch.Tensor, n_features: int,
                       batch: int, offsets: torch.Tensor, ends: torch.Tensor, flags: torch.Tensor,
                       scratch: OffsetsScratch) -> None:
    """As offsets_and_checks_torch, after copying the scalars from `scalars_src` (with the fused kernels,
    pinned host memory read in place) into `scalars` on the device; two kernel launches on CUDA."""
    if not fused_kernels(lengths):
        if scalars_src is not scalars:
            scalars.copy_(scalars_src, non_blocking=True)
        offsets_and_checks_torch(lengths, scalars, n_features, batch, offsets, ends, flags)
        return
    total, grid = lengths.numel(), (scratch.n_chunks,)
    _chunk_sums_kernel[grid](lengths, total, scratch.chunk_sums, scratch.chunk_neg, flags, scalars_src, scalars,
                             CH=CHUNK)
    _offsets_kernel[grid](lengths, total, scratch.chunk_sums, scratch.chunk_neg, scratch.n_chunks, scalars, offsets,
                          ends, batch, flags, LAYOUT=FLAG_LAYOUT, CH=CHUNK, SUMS=CHUNK_SUMS)


def commit_counts(flags: torch.Tensor, scalars: torch.Tensor, counts: torch.Tensor, totals: torch.Tensor,
                  feature_table: torch.Tensor, flags_out: Optional[torch.Tensor] = None) -> None:
    """As commit_counts_torch; one kernel launch on CUDA (which may write `flags_out` in pinned host memory)."""
    if not fused_kernels(counts):
        commit_counts_torch(flags, scalars, counts, totals, feature_table, flags_out)
        return
    n_features = counts.shape[1]
    _commit_counts_kernel[(1,)](flags, scalars, counts, n_features, totals, totals.shape[1], feature_table,
                                flags_out if flags_out is not None else flags, COPY_OUT=flags_out is not None,
                                F_BLOCK=triton.next_power_of_2(n_features))
