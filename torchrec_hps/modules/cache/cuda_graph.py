"""CUDA-graph replay of a cache group's all-hit lookup (GPU only).

Per (batch size, id-count bucket) two graphs are captured over static buffers:
- `compute`: remap ids to slots, flag misses and invalid ids, run the TBE; it changes no state;
- `commit`: the side effects of an all-hit lookup (id counters, LRU/LFU touch).
A lookup copies its ids into the buffers (padding up to the bucket goes to a dummy feature whose ids land
on a sentinel remap entry that is never a miss), replays `compute`, reads the two flags (the one host sync),
and either replays `commit` and returns, or returns None so the eager path handles misses or bad ids (the
graph changed nothing). The graphs read the remap and the TBE weights in place, so inserts and evictions
done by the eager path need no re-capture.
"""
from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch

if TYPE_CHECKING:
    from torchrec_hps.modules.cache.tbe_cache import TBECacheGroup

MIN_BUCKET = 1024


def bucket_for(n: int) -> int:
    return max(MIN_BUCKET, 1 << max(0, (n - 1).bit_length()))


class _Captured:
    def __init__(self, group: "TBECacheGroup", batch: int, bucket: int, weighted: bool) -> None:
        from torchrec_hps.modules.cache.tbe_cache import ABSENT_SLOT, MISS_SLOT

        self.group, self.bucket = group, bucket
        dev = group.device
        n_features = group.n_features
        self.values = torch.zeros(bucket, dtype=torch.int64, device=dev)
        self.invalid = torch.zeros(bucket, dtype=torch.bool, device=dev)
        self.counts = torch.zeros(n_features + 1, dtype=torch.int64, device=dev)
        self.counts[n_features] = bucket
        self.offsets = torch.zeros(n_features * batch + 1, dtype=torch.int64, device=dev)
        self.weights = torch.zeros(bucket, dtype=torch.float32, device=dev) if weighted else None
        self.tick = torch.zeros((), dtype=torch.int64, device=dev)
        g = group

        def compute():
            fidx = torch.repeat_interleave(g._feature_arange, self.counts, output_size=bucket)
            flat = torch.where(self.invalid, torch.zeros_like(self.values), self.values) + g._feature_base[fidx]
            slots = g.remap[flat]
            miss = (slots == MISS_SLOT) & ~self.invalid
            flags = torch.stack([miss.any(), self.invalid.any()])
            out = g.tbe(torch.where(self.invalid, torch.full_like(slots, ABSENT_SLOT), slots), self.offsets,
                        self.weights)
            return fidx, slots, flags, out

        def commit():
            g._ids.index_add_(0, g._feature_table, self.counts)
            gslots = self.slots.to(torch.int64) + g._feature_slot_base[self.fidx]
            g.last_access[gslots] = self.tick
            if g.config.eviction == "lfu":
                g.freq.index_add_(0, gslots, torch.ones_like(gslots))

        # warm up on a side stream (lazy allocations, library handles), then capture; the buffers hold a
        # batch of empty bags, so the warm-up changes no counter or slot of a real table
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            self.fidx, self.slots, self.flags, self.out = compute()
            commit()
        torch.cuda.current_stream(dev).wait_stream(stream)
        # thread_local: other threads (the background inserter, other groups) keep using CUDA meanwhile.
        # No garbage collection during capture: collecting an old engine destroys its CUDA graphs, which
        # invalidates a capture in progress (seen on the H100: "operation failed due to a previous error
        # during capture" in the TBE, depending on GC timing).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self.compute_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.compute_graph, capture_error_mode="thread_local"):
                self.fidx, self.slots, self.flags, self.out = compute()
            self.commit_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.commit_graph, capture_error_mode="thread_local"):
                commit()
        finally:
            if gc_was_enabled:
                gc.enable()
        torch.cuda.synchronize(dev)


class GraphedAllHitPath:
    def __init__(self, group: "TBECacheGroup") -> None:
        self.group = group
        self._captures: Dict[Tuple[int, int, bool], _Captured] = {}
        self.replays = 0
        self.fallbacks = 0

    def release(self) -> None:
        """Drop the captured graphs (outside any capture, so their destruction is safe)."""
        self._captures.clear()

    def lookup(self, values: torch.Tensor, offsets: torch.Tensor, weights: Optional[torch.Tensor],
               counts: torch.Tensor, invalid: Optional[torch.Tensor], tick: int) -> Tuple[Optional[torch.Tensor], bool]:
        """(pooled output, False) when every id hit; (None, any_invalid) when the eager path must run."""
        n = values.numel()
        n_features = self.group.n_features
        batch = (offsets.numel() - 1) // max(n_features, 1)
        key = (batch, bucket_for(n), weights is not None)
        cap = self._captures.get(key)
        if cap is None:
            cap = self._captures[key] = _Captured(self.group, batch, key[1], weights is not None)
        cap.values[:n].copy_(values)
        cap.values[n:].zero_()
        if invalid is not None:
            cap.invalid[:n].copy_(invalid)
        else:
            cap.invalid[:n].zero_()
        cap.invalid[n:].zero_()
        cap.counts[:n_features].copy_(counts)
        cap.counts[n_features].fill_(cap.bucket - n)
        cap.offsets.copy_(offsets)
        if weights is not None:
            cap.weights[:n].copy_(weights)
        cap.tick.fill_(tick)
        cap.compute_graph.replay()
        any_miss, any_invalid = cap.flags.tolist()
        if any_miss or any_invalid:
            self.fallbacks += 1
            return None, bool(any_invalid)
        cap.commit_graph.replay()
        self.replays += 1
        return cap.out.clone(), False
