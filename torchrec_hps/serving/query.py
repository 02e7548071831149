"""A ranking query as the scheduler sees it, and how slices of queries become one model batch.

A query holds n samples: dense features [n, d], and per feature the ids of each sample (lengths [F, n],
values feature-major, as a KeyedJaggedTensor keeps them). The scheduler cuts queries into slices (a large
query into several, each a sub-batch) and a worker coalesces slices into one batch; `gather` builds that
batch with one index computation for every slice and feature (no per-feature loop), `Query.complete` writes
a slice's scores back and resolves the query once all its slices are done."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torchrec import KeyedJaggedTensor


@dataclass(frozen=True)
class ModelSignature:
    """What a served model takes: its sparse features in KJT order, each feature's id bound (for the 400 on
    a bad id: one bad query must not fail the batch it would share), the dense width, weighted or not."""

    features: Tuple[str, ...]
    id_bounds: Tuple[int, ...]
    dense_in_features: int
    weighted: bool = False


class Query:
    """One request: inputs, where its scores go, and the callback that answers it (called once, from the
    worker that finishes its last slice, or with an error)."""

    __slots__ = ("dense", "lengths", "values", "weights", "n", "_offsets", "deadline", "arrival", "scores",
                 "_remaining", "_lock", "_done", "served", "route", "request_id")

    def __init__(self, dense: torch.Tensor, lengths: torch.Tensor, values: torch.Tensor,
                 weights: Optional[torch.Tensor], deadline: float, done: Callable[["Query", Optional[BaseException]], None],
                 request_id: str = "") -> None:
        self.dense, self.lengths, self.values, self.weights = dense, lengths, values, weights
        self.n = int(dense.shape[0])
        self._offsets: Optional[torch.Tensor] = None
        self.arrival = time.monotonic()
        self.deadline = deadline
        self.scores = torch.empty(self.n, dtype=torch.float32)
        self._remaining = self.n
        self._lock = threading.Lock()
        self._done = done
        self.served = None  # the model version that serves it (set at admission)
        self.route = ""  # "gpu" or "cpu"
        self.request_id = request_id

    @property
    def offsets(self) -> torch.Tensor:
        """offsets[f, i]: where sample i's ids of feature f start in `values` (feature-major), [F, n + 1];
        built on first use (a query served whole never needs it)."""
        if self._offsets is None:
            f = self.lengths.shape[0]
            flat = torch.zeros(self.lengths.numel() + 1, dtype=torch.int64)
            torch.cumsum(self.lengths.reshape(-1), 0, out=flat[1:])
            self._offsets = torch.cat([flat[:-1].reshape(f, self.n), flat[self.n::self.n].reshape(f, 1)], dim=1) \
                if f else torch.zeros(0, self.n + 1, dtype=torch.int64)
        return self._offsets

    def complete(self, start: int, scores: torch.Tensor) -> None:
        if start == 0 and scores.numel() == self.n:  # served whole: its scores are these (no copy)
            self.scores = scores
        else:
            self.scores[start:start + scores.numel()] = scores
        with self._lock:
            self._remaining -= scores.numel()
            last = self._remaining == 0
        if last:
            self._done(self, None)

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self._remaining <= 0:
                return
            self._remaining = -1  # answered once; later slices of this query are skipped
        self._done(self, error)

    @property
    def failed(self) -> bool:
        return self._remaining < 0


@dataclass
class Slice:
    """Samples [start, stop) of a query."""

    query: Query
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class Batch:
    dense: torch.Tensor
    features: KeyedJaggedTensor
    slices: List[Slice] = field(default_factory=list)
    prefetched: bool = False  # registered with the model's HPS module: its forward takes these very features


def split(query: Query, piece: int) -> List[Slice]:
    """Cut a query into slices of at most `piece` samples."""
    return [Slice(query, a, min(a + piece, query.n)) for a in range(0, query.n, piece)]


def gather(slices: Sequence[Slice], signature: ModelSignature) -> Batch:
    """One batch from slices: dense rows concatenated, ids regrouped feature-major across slices."""
    if len(slices) == 1 and slices[0].size == slices[0].query.n:  # a whole query alone: its own tensors
        q = slices[0].query
        kjt = KeyedJaggedTensor(keys=list(signature.features), values=q.values, lengths=q.lengths.reshape(-1),
                                weights=q.weights if signature.weighted else None)
        return Batch(dense=q.dense, features=kjt, slices=list(slices))
    dense = torch.cat([s.query.dense[s.start:s.stop] for s in slices]) if len(slices) > 1 else \
        slices[0].query.dense[slices[0].start:slices[0].stop]
    lengths = torch.cat([s.query.lengths[:, s.start:s.stop] for s in slices], dim=1)
    queries = list({id(s.query): s.query for s in slices}.values())
    base = {id(q): b for q, b in zip(queries, _exclusive_cumsum([q.values.numel() for q in queries]))}
    # segment (slice j, feature f) = values [offsets[f, start], offsets[f, stop]) of slice j's query
    seg_start = torch.stack([s.query.offsets[:, s.start] + base[id(s.query)] for s in slices])  # [S, F]
    seg_stop = torch.stack([s.query.offsets[:, s.stop] + base[id(s.query)] for s in slices])
    starts, lens = seg_start.t().reshape(-1), (seg_stop - seg_start).t().reshape(-1)  # feature-major order
    total = int(lens.sum())
    index = torch.repeat_interleave(starts - torch.cumsum(lens, 0) + lens, lens, output_size=total) + \
        torch.arange(total, dtype=torch.int64)
    all_values = torch.cat([q.values for q in queries]) if len(queries) > 1 else queries[0].values
    values = all_values.index_select(0, index)
    weights = None
    if signature.weighted:
        all_w = torch.cat([q.weights for q in queries]) if len(queries) > 1 else queries[0].weights
        weights = all_w.index_select(0, index)
    kjt = KeyedJaggedTensor(keys=list(signature.features), values=values, lengths=lengths.reshape(-1),
                            weights=weights)
    return Batch(dense=dense, features=kjt, slices=list(slices))


MIN_GPU_BATCH = 64  # the smallest padded GPU batch


def padded(batch: Batch, minimum: int = MIN_GPU_BATCH) -> Batch:
    """The batch padded to a power of two of samples (zero dense rows, bags with no ids; their scores are
    dropped by scatter): a GPU worker's lookups then come in a few sizes, each with its captured CUDA graph,
    instead of a new capture for every coalesced size."""
    n = int(batch.dense.shape[0])
    size = max(minimum, 1 << max(0, (n - 1).bit_length()))
    if size == n:
        return batch
    f = len(batch.features.keys())
    dense = torch.cat([batch.dense, batch.dense.new_zeros(size - n, batch.dense.shape[1])])
    lengths = torch.cat([batch.features.lengths().view(f, n),
                         batch.features.lengths().new_zeros(f, size - n)], dim=1).reshape(-1)
    kjt = KeyedJaggedTensor(keys=batch.features.keys(), values=batch.features.values(), lengths=lengths,
                            weights=batch.features.weights_or_none())
    return Batch(dense=dense, features=kjt, slices=batch.slices)


def scatter(batch: Batch, scores: torch.Tensor) -> None:
    """Each slice's scores back to its query (resolving queries whose last slice this was)."""
    at = 0
    for s in batch.slices:
        if not s.query.failed:
            s.query.complete(s.start, scores[at:at + s.size])
        at += s.size


def _exclusive_cumsum(sizes: List[int]) -> List[int]:
    out, acc = [], 0
    for x in sizes:
        out.append(acc)
        acc += x
    return out
