"""The all-hit lookup of a cache group as one CUDA graph, with the host's only wait overlapped with the TBE.

Per (batch size, id-count bucket, weighted) a graph is captured over static buffers. From a KJT's ids and
lengths as they come (no engine checks, no KJT rebuild) it computes what the engine's checks and the
cache's remap compute on the eager path, in four Triton kernels: offsets, feature ends and the layout check
(offsets_kernel.py), ids -> slots with the range check and the LRU/LFU touch (remap_kernel.py), then the id
counters, added only if no flag is set. Three flags (an id missed the cache, an id is out of range, lengths
and ids disagree) land in pinned host memory, written in place by the kernels. Small batches run the TBE in
the graph too and copy its output out; larger ones run it right after the graph through a direct call of
fbgemm's op, so its output is a fresh tensor. The host reads the flags (they land while the TBE is queued):
all clear -> return the output; otherwise the caller falls back to the eager path, which redoes the lookup
with misses fetched or errors raised (a miss fallback skips its first touch: the slots were touched here
with the same tick).

Inputs are sanitized inside the graph (ids out of range or past the batch go to a sentinel remap entry,
offsets are clamped to the batch), so nothing reads out of bounds whatever the input; bad input only sets
a flag. The graph reads the remap and the TBE weights in place: inserts and evictions need no re-capture.
Without CUDA graphs (config, or a CPU group in tests) the same computation runs eagerly (torch versions of
the kernels on CPU).
"""
from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch

from torchrec_hps.modules.cache.offsets_kernel import (FLAG_LAYOUT, OffsetsScratch, commit_ids, fused_kernels,
                                                      offsets_and_checks)
from torchrec_hps.modules.cache.remap_kernel import remap_and_touch

if TYPE_CHECKING:
    from torchrec_hps.modules.cache.tbe_cache import TBECacheGroup

logger = logging.getLogger(__name__)

MIN_BUCKET = 1024
# Small batches run the TBE inside the graph too (its Python dispatch costs more than the kernel) and copy
# the output out; large ones run it after the graph, writing a fresh tensor (a copy would double the writes).
POOLED_IN_GRAPH_MAX_BYTES = 4 << 20
ZERO_COPY = True  # let the kernels use the pinned [n, tick] and flags buffers in place (tests turn it off)
FLAG_MISS, FLAG_INVALID = 1, 2  # set by remap_kernel; FLAG_LAYOUT (4) by offsets_kernel

__all__ = ["AllHitPath", "FLAG_INVALID", "FLAG_LAYOUT", "FLAG_MISS", "bucket_for"]


def bucket_for(n: int) -> int:
    return max(MIN_BUCKET, 1 << max(0, (n - 1).bit_length()))


class _Shape:
    """Static buffers (and the graph, if any) for one (batch, bucket, weighted)."""

    def __init__(self, group: "TBECacheGroup", batch: int, bucket: int, use_graph: bool, pooled_in_graph: bool) -> None:
        dev = group.device
        cuda = dev.type == "cuda"
        self.batch, self.bucket = batch, bucket
        self.values = torch.zeros(bucket, dtype=torch.int64, device=dev)
        self.lengths = torch.zeros(group.n_features * batch, dtype=torch.int64, device=dev)
        self.slots = torch.ones(bucket, dtype=torch.int32, device=dev)
        self.flags = torch.zeros(1, dtype=torch.int32, device=dev)
        self.offsets = torch.zeros(group.n_features * batch + 1, dtype=torch.int32, device=dev)
        self.ends = torch.zeros(group.n_features, dtype=torch.int64, device=dev)
        self.counts = torch.zeros(group.n_features, dtype=torch.int64, device=dev)
        self.scratch = OffsetsScratch(group.n_features * batch, dev)
        # [n, tick] written by the host and flags read by it, in pinned memory: the kernels read and write
        # them in place where Triton accepts host-mapped pointers (checked in the warm-up), else the graph
        # copies them (two more nodes)
        self.zero_copy = ZERO_COPY and cuda and fused_kernels(self.lengths)
        self.scalars_host = torch.zeros(2, dtype=torch.int64, pin_memory=cuda)
        self.scalars_np = self.scalars_host.numpy()
        self.scalars = torch.zeros(2, dtype=torch.int64, device=dev)
        self.flags_host = torch.zeros(1, dtype=torch.int32, pin_memory=cuda)
        self.flags_np = self.flags_host.numpy()
        self.event = torch.cuda.Event() if cuda else None
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: Optional[torch.Tensor] = None  # the pooled output, when the TBE runs inside the graph
        self.pooled_in_graph = pooled_in_graph
        if cuda:
            self._warm_up(group)
        if use_graph:
            self._capture(group)

    def compute(self, g: "TBECacheGroup") -> None:
        F, B = g.n_features, self.batch
        if not self.zero_copy:
            self.scalars.copy_(self.scalars_host, non_blocking=True)
        # offsets clamped to the batch's ids: each position's feature follows from them, so the TBE reads
        # every slot against the table of the bag it sits in, whatever the input
        offsets_and_checks(self.lengths, self.scalars_host if self.zero_copy else self.scalars, self.scalars, F, B,
                           self.offsets, self.ends, self.flags, self.scratch)
        remap_and_touch(self.values, self.scalars, self.ends, g.remap_tables, self.slots, self.flags)
        # id counters only if the lookup is served here (the eager fallback counts it otherwise)
        commit_ids(self.flags, self.ends, self.counts, g._ids, g._feature_table,
                   self.flags_host if self.zero_copy else None)
        if not self.zero_copy:
            self.flags_host.copy_(self.flags, non_blocking=True)
        if self.pooled_in_graph:
            self.out = g.pooled_lookup(self.slots, self.offsets, None)

    def _warm_up(self, g: "TBECacheGroup") -> None:
        """One run on an empty batch, on a side stream (lazy allocations, kernel compilation, library handles
        before any capture); it changes no counter and touches only a reserved slot. It also checks that the
        kernels can read and write the pinned host buffers in place, else falls back to copies."""
        for attempt in range(2):
            self.flags_np[0] = -1  # the empty batch must clear it
            stream = torch.cuda.Stream(device=g.device)
            stream.wait_stream(torch.cuda.current_stream(g.device))
            try:
                with torch.cuda.stream(stream):
                    self.compute(g)
                torch.cuda.synchronize(g.device)
            except (ValueError, RuntimeError):
                if not self.zero_copy:
                    raise
            if int(self.flags_np[0]) == 0 or not self.zero_copy:
                break
            logger.warning("the all-hit kernels could not use pinned host memory in place; copying instead")
            self.zero_copy = False
        torch.cuda.current_stream(g.device).wait_stream(stream)

    def _capture(self, g: "TBECacheGroup") -> None:
        dev = g.device
        # thread_local: other threads (the background inserter) keep using CUDA meanwhile. No garbage
        # collection during capture: collecting an old engine destroys its CUDA graphs, which invalidates a
        # capture in progress (seen on the H100, depending on GC timing).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.compute(g)
        finally:
            if gc_was_enabled:
                gc.enable()
        torch.cuda.synchronize(dev)


class AllHitPath:
    """Serves a group's lookups whose ids all hit the cache; says which other case it found otherwise."""

    def __init__(self, group: "TBECacheGroup", use_graphs: bool) -> None:
        self.group = group
        self.use_graphs = use_graphs
        self._shapes: Dict[Tuple[int, int, bool], _Shape] = {}
        self.served = 0
        self.fallbacks = 0

    def release(self) -> None:
        """Drop the captured graphs (outside any capture, so their destruction is safe)."""
        self._shapes.clear()

    def lookup(self, values: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor],
               tick: int) -> Tuple[Optional[torch.Tensor], int, _Shape]:
        """(pooled output or None, flags, the shape's buffers). Output only when flags == 0. Needs
        lengths.numel() == n_features * batch (the caller checks)."""
        g = self.group
        n = values.numel()
        batch = lengths.numel() // g.n_features
        key = (batch, bucket_for(n), weights is not None)
        shape = self._shapes.get(key)
        if shape is None:
            small = weights is None and batch * g.tbe.total_D * 4 <= POOLED_IN_GRAPH_MAX_BYTES
            shape = self._shapes[key] = _Shape(g, batch, key[1], self.use_graphs, self.use_graphs and small)
        shape.values[:n].copy_(values)
        shape.lengths.copy_(lengths)
        shape.scalars_np[0] = n
        shape.scalars_np[1] = tick
        if shape.graph is not None:
            shape.graph.replay()
        else:
            shape.compute(g)
        if shape.event is not None:
            shape.event.record()
        out = None
        if not shape.pooled_in_graph:
            out = g.pooled_lookup(shape.slots[:n], shape.offsets, weights)  # queued behind the graph
        if shape.event is not None:
            shape.event.synchronize()
        flags = int(shape.flags_np[0])
        if flags:
            self.fallbacks += 1
            return None, flags, shape
        self.served += 1
        return (shape.out.clone() if out is None else out), 0, shape
