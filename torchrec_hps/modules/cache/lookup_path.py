"""Every lookup's device work as one CUDA graph, with the host's only wait overlapped with the TBE.

Per (batch size, id-count bucket, weighted) a graph is captured over static buffers. From a KJT's ids and
lengths as they come (no engine checks, no KJT rebuild) it runs: offsets, feature ends and the layout check
(offsets_kernel.py); the probe of the host level's index for every id of every table (probe_kernel.py);
admission into HBM (hbm_level.py; rows staged for this lookup alone are reached only through its own locs); the
counters, added only for lookups that count (commit_counts). Where every row is resident (resident.py) one
range-check kernel takes the probe's and admission's place. The flags word lands in pinned host memory,
written in place by the kernels. The TBE runs inside the graph too, into one of a few output buffers the
graph owns (a ring): the buffer is handed out as the lookup's output and used again only once nothing
outside holds it (the storage's use count, as torch's CUDA-graph trees check), so no copy and no host
dispatch of fbgemm's op (~30 us) per lookup; while the caller holds every buffer, or where the output
would be large or the lookup weighted, the TBE runs after the graph through a direct call of the op into a
fresh tensor. The host reads the flags (an event recorded before the TBE: the host never waits for it):
no FLAG_MISS -> the output stands; otherwise the group's miss path inserts the missing rows and runs the
lookup again (with counting off: the first run counted it).

Inputs are sanitized inside the graph (ids out of range or past the batch read the default row, offsets are
clamped to the batch), so nothing reads out of bounds whatever the input; bad input only sets a flag. The
graph reads the index and both levels' rows in place: inserts and evictions need no re-capture. Without
CUDA graphs (config, or a CPU group) the same computation runs eagerly (torch versions on CPU).
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch

from torchrec_hps.modules.cache.hbm_level import CAND_PAD
from torchrec_hps.modules.cache.layout import FLAG_INVALID, FLAG_LAYOUT
from torchrec_hps.modules.cache.offsets_kernel import OffsetsScratch, commit_counts, fused_kernels, offsets_and_checks
from torchrec_hps.modules.cache.probe_kernel import ProbeOut, probe
from torchrec_hps.modules.cache.resident import resident_index

if TYPE_CHECKING:
    from torchrec_hps.modules.cache.cache_group import TBECacheGroup

logger = logging.getLogger(__name__)

MIN_BUCKET = 1024
# Output buffers of the graphs that run the TBE (the ring), and the largest output given one: the ring
# costs RING_SIZE outputs of HBM per shape, and saves the op's host dispatch, which matters where the
# lookup's device time is short (B=16384 x 8 tables x 128 fp32 at one id per bag: 64 MiB, ~60 us).
RING_SIZE = 2
RING_MAX_BYTES = 64 << 20
# A prefetch's copy kernel runs beside the caller's dense layers: a small grid of wide programs (many rows in
# flight each, the copy being bound by PCIe latency) takes the fewest SMs from them. Measured on the H200,
# DLRM B=16384 at 10% (ms per batch): 32 programs x 16 rows 3.88, 32 x 64 4.02, 16 x 64 3.17, 8 x 128 3.09.
PREFETCH_COPY_PROGRAMS = 8
PREFETCH_COPY_WORDS = 1 << 14  # 4-byte words per program and round (128 rows of 128 fp32)


def prefetch_copy_block(max_row_words: int) -> int:
    """Rows per program and round of a prefetch's copy: PREFETCH_COPY_WORDS in flight, a power of two."""
    return min(1024, 1 << max(0, (PREFETCH_COPY_WORDS // max(1, max_row_words)).bit_length() - 1))
ZERO_COPY = True  # let the kernels use the pinned scalars and flags buffers in place (tests turn it off)

__all__ = ["LookupPath", "Shape", "bucket_for"]


def bucket_for(n: int) -> int:
    return max(MIN_BUCKET, 1 << max(0, (n - 1).bit_length()))


@dataclass
class RingMember:
    """A graph that runs the whole lookup, TBE included, into its own output buffer."""

    graph: torch.cuda.CUDAGraph
    out: torch.Tensor
    flags_ready: torch.cuda.Event  # recorded inside the graph once the flags are written, before the TBE
    own_uses: int  # the buffer storage's use count while only the member holds it
    stream: Optional[int] = None  # the stream it last ran on (0 is the default stream's handle)

    def free(self, stream: int) -> bool:
        """Nothing outside holds the buffer, and work that read it was queued on `stream` (as torch's caching
        allocator reuses a freed block on its own stream only: another stream may still be reading it)."""
        return (self.stream is None or self.stream == stream) and _storage_uses(self.out) <= self.own_uses


def _storage_uses(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class Shape:
    """Static buffers (and the graphs, if any) for one (batch, bucket, weighted, prefetch, resident)."""

    def __init__(self, group: "TBECacheGroup", batch: int, bucket: int, use_graph: bool, ring: int,
                 prefetch: bool = False, resident: bool = False) -> None:
        dev = group.device
        cuda = dev.type == "cuda"
        F = group.n_features
        self.batch, self.bucket = batch, bucket
        self.prefetch = prefetch
        self.resident = resident
        self.values = torch.zeros(bucket, dtype=torch.int64, device=dev)
        self.lengths = torch.zeros(F * batch, dtype=torch.int64, device=dev)
        # the resident kernel writes the TBE's index (slots), the flags and counts, and locs at most
        self.probe_out = ProbeOut(
            slots=torch.zeros(bucket, dtype=torch.int32, device=dev),
            locs=torch.full((0 if resident and not group.resident_locs else bucket,), -1, dtype=torch.int32,
                            device=dev),
            entries=torch.full((0 if resident else bucket,), -1, dtype=torch.int32, device=dev),
            cand=torch.zeros(0 if resident else bucket, dtype=torch.int32, device=dev),
            cand_count=torch.zeros(1, dtype=torch.int32, device=dev),
            flags=torch.zeros(1, dtype=torch.int32, device=dev),
            counts=torch.zeros(4, F, dtype=torch.int64, device=dev))
        self.victims = torch.zeros(0 if resident else bucket, dtype=torch.int32, device=dev)
        # every buffer a graph writes is the shape's own: one shared by shapes and regrown would be freed
        # (and handed to other tensors) under the graphs captured before
        self.sort_idx = torch.empty(bucket if group.hbm is not None and not group.hbm.direct and not resident else 0,
                                    dtype=torch.int64, device=dev)
        self.offsets = torch.zeros(F * batch + 1, dtype=torch.int32, device=dev)
        self.ends = torch.zeros(F, dtype=torch.int64, device=dev)
        self.scratch = OffsetsScratch(F * batch, dev)
        # [n, tick, count, blocking flags] written by the host and flags read by it, in pinned memory: the
        # kernels read and write them in place where Triton accepts host-mapped pointers (checked in the
        # warm-up), else the graph copies them (two more nodes)
        self.zero_copy = ZERO_COPY and cuda and fused_kernels(self.lengths)
        self.scalars_host = torch.zeros(4, dtype=torch.int64, pin_memory=cuda)
        self.scalars_np = self.scalars_host.numpy()
        self.scalars = torch.zeros(4, dtype=torch.int64, device=dev)
        self.flags_host = torch.zeros(1, dtype=torch.int32, pin_memory=cuda)
        self.flags_np = self.flags_host.numpy()
        self.event = torch.cuda.Event() if cuda else None
        self.graph: Optional[torch.cuda.CUDAGraph] = None  # the lookup without the TBE
        self.ring: List[RingMember] = []
        if cuda:
            self._warm_up(group, pooled=ring > 0)
        if use_graph:
            self._capture(group, ring)

    # views the miss path reads
    @property
    def slots(self) -> torch.Tensor:
        return self.probe_out.slots

    @property
    def entries(self) -> torch.Tensor:
        return self.probe_out.entries

    @property
    def counts(self) -> torch.Tensor:
        return self.probe_out.counts

    def compute(self, g: "TBECacheGroup", flags_ready: Optional[torch.cuda.Event] = None,
                pooled: bool = False) -> Optional[torch.Tensor]:
        """The lookup's device work; with `pooled` the TBE too (over the whole bucket: the offsets bound
        what it reads), returning its output, after recording `flags_ready` if given."""
        F, B, o = g.n_features, self.batch, self.probe_out
        if not self.zero_copy:
            self.scalars.copy_(self.scalars_host, non_blocking=True)
        # offsets clamped to the batch's ids: each position's feature follows from them, so the TBE reads
        # every row against the table of the bag it sits in, whatever the input
        offsets_and_checks(self.lengths, self.scalars_host if self.zero_copy else self.scalars, self.scalars, F, B,
                           self.offsets, self.ends, o.flags, self.scratch)
        o.counts.zero_()
        if self.resident:
            resident_index(self.values, self.scalars, self.ends, g.probe_tables.feature_rows, g.resident_shift,
                           g.hbm is None, o.slots, o.flags, o.counts, o.locs if g.resident_locs else None,
                           g.probe_tables.feature_entry_base)
        else:
            o.cand_count.zero_()
            admits = g.hbm is not None and not g.hbm.direct  # an HBM holding every entry is filled on insert
            if admits:
                o.cand.fill_(CAND_PAD)
            probe(self.values, self.scalars, self.ends, g.probe_tables, o)
            if admits:
                g.hbm.admit(o.cand, o.cand_count, self.victims, self.scalars, g.host_rows.layout, o.entries, o.locs,
                            self.sort_idx, copy_programs=PREFETCH_COPY_PROGRAMS if self.prefetch else None,
                            copy_block=prefetch_copy_block(g.host_rows.layout.max_row_words) if self.prefetch else 0)
        commit_counts(o.flags, self.scalars, o.counts, g.totals, g.feature_table,
                      self.flags_host if self.zero_copy else None)
        if not self.zero_copy:
            self.flags_host.copy_(o.flags, non_blocking=True)
        if flags_ready is not None:
            flags_ready.record()
        return self.pooled(g, self.bucket, None) if pooled else None

    def pooled(self, g: "TBECacheGroup", n: int, weights: Optional[torch.Tensor]) -> torch.Tensor:
        """The TBE over the first n positions' rows, as this shape's kernels found them."""
        if self.resident and not g.resident_locs:
            return g.resident_lookup(self.slots[:n], self.offsets, weights)
        return g.pooled_lookup(self.slots[:n], self.offsets, weights, self.probe_out.locs[:n])

    def free_member(self, stream: int) -> Optional[RingMember]:
        for member in self.ring:
            if member.free(stream):
                return member
        return None

    def _warm_up(self, g: "TBECacheGroup", pooled: bool) -> None:
        """One run on an empty batch, on a side stream (lazy allocations, kernel compilation, library handles
        before any capture); it changes no counter and touches nothing. It also checks that the kernels can
        read and write the pinned host buffers in place, else falls back to copies."""
        for attempt in range(2):
            self.flags_np[0] = -1  # the empty batch must clear it
            self.scalars_np[:] = (0, 0, 0, 0)
            stream = torch.cuda.Stream(device=g.device)
            stream.wait_stream(torch.cuda.current_stream(g.device))
            try:
                with torch.cuda.stream(stream):
                    self.compute(g, pooled=pooled)
                torch.cuda.synchronize(g.device)
            except (ValueError, RuntimeError):
                if not self.zero_copy:
                    raise
            if int(self.flags_np[0]) == 0 or not self.zero_copy:
                break
            logger.warning("the lookup kernels could not use pinned host memory in place; copying instead")
            self.zero_copy = False
        torch.cuda.current_stream(g.device).wait_stream(stream)

    def _capture(self, g: "TBECacheGroup", ring: int) -> None:
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
            for _ in range(ring):
                graph, ready = torch.cuda.CUDAGraph(), torch.cuda.Event(external=True)
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    out = self.compute(g, flags_ready=ready, pooled=True)
                self.ring.append(RingMember(graph, out, ready, _storage_uses(out)))
        finally:
            if gc_was_enabled:
                gc.enable()
        torch.cuda.synchronize(dev)


class LookupPath:
    """Runs a group's lookups over per-shape buffers (graphs on CUDA); counts what it served and redid."""

    def __init__(self, group: "TBECacheGroup", use_graphs: bool) -> None:
        self.group = group
        self.use_graphs = use_graphs
        self._shapes: Dict[Tuple[int, int, bool], Shape] = {}
        self.runs = 0
        self.reruns = 0  # runs again after the miss path

    def release(self) -> None:
        """Drop the captured graphs (outside any capture, so their destruction is safe)."""
        self._shapes.clear()

    def shape_for(self, batch: int, n: int, weighted: bool, prefetch: bool = False, resident: bool = False) -> Shape:
        """A prefetch has its own buffers (it runs while the previous lookup's TBE may still read that
        lookup's) and no TBE in its graph."""
        g = self.group
        key = (batch, bucket_for(n), weighted, prefetch, resident)
        shape = self._shapes.get(key)
        if shape is None:
            ringed = self.use_graphs and not weighted and not prefetch and batch * g.tbe.total_D * 4 <= RING_MAX_BYTES
            shape = self._shapes[key] = Shape(g, batch, key[1], self.use_graphs, RING_SIZE if ringed else 0,
                                              prefetch, resident)
        return shape

    def run(self, values: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor], tick: int,
            count: bool, allow_invalid: bool, rerun: bool = False, prefetch: bool = False, wait: bool = True
            ) -> Tuple[Optional[torch.Tensor], int, Shape]:
        """(pooled output, flags, the shape's buffers). The output is exact where flags has no FLAG_MISS
        (ids flagged invalid read the default row). Needs lengths.numel() == n_features * batch.
        `rerun`: the run after the miss path (counted apart: `reruns`). `prefetch`: probe and admission only,
        on the prefetch buffers, no output (None); with `wait=False` the host does not wait for the flags
        (-1 is returned; read shape.flags_np once shape.event has completed)."""
        g = self.group
        resident = not prefetch and bool(g.residency)
        out, flags, shape = self._run(values, lengths, weights, tick, count, allow_invalid, prefetch, wait, resident)
        if resident and flags & FLAG_INVALID and not flags & FLAG_LAYOUT:  # the probe gives bad ids the default
            out = None
            out, flags, shape = self._run(values, lengths, weights, tick, count, allow_invalid, prefetch, wait, False)
        if rerun:
            self.reruns += 1
        else:
            self.runs += 1
        return out, flags, shape

    def _run(self, values: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor], tick: int,
             count: bool, allow_invalid: bool, prefetch: bool, wait: bool, resident: bool
             ) -> Tuple[Optional[torch.Tensor], int, Shape]:
        g = self.group
        n = values.numel()
        shape = self.shape_for(lengths.numel() // g.n_features, n, weights is not None, prefetch, resident)
        shape.values[:n].copy_(values)
        shape.lengths.copy_(lengths)
        # lookups that the engine will redo (bad input) are not counted; nor a resident run with a bad id
        # (the probe path runs it again)
        blocking = FLAG_LAYOUT if allow_invalid and not resident else FLAG_LAYOUT | FLAG_INVALID
        shape.scalars_np[:] = (n, tick, int(count), blocking)
        member = None
        if shape.ring:
            stream = torch.cuda.current_stream(g.device).cuda_stream
            member = shape.free_member(stream)
        ready = shape.event
        if member is not None:
            member.graph.replay()
            member.stream = stream
            ready = member.flags_ready
        elif shape.graph is not None:
            shape.graph.replay()
        else:
            shape.compute(g)
        if member is None and ready is not None:
            ready.record()
        out = None
        if not prefetch:
            # queued behind the graph; a ring member's buffer goes out as a view (its use count says when
            # nothing outside holds it any more)
            out = member.out.view(member.out.shape) if member is not None else shape.pooled(g, n, weights)
        if not wait:
            return None, -1, shape
        if ready is not None:
            ready.synchronize()
        return out, int(shape.flags_np[0]), shape
