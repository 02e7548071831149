"""The DeepRecSys scheduler (ISCA'20): queries of at least `offload_threshold` samples go to the GPU
workers, smaller ones to CPU workers; each query is cut into slices of at most the batch size (so a large
query runs on several workers at once) and a worker coalesces queued slices of one model version up to its
batch size. Admission is bounded (queued samples), a query past its deadline is answered 504 without being
computed, and an optional hill climber (tuner.py) moves batch_size, then offload_threshold, online.

Data flow: frontend -> Scheduler.submit (admission, route, split) -> WorkQueue -> Worker (gather, the
model's forward on its device, scatter) -> the query's callback."""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from torchrec_hps.serving.config import SchedulerConfig
from torchrec_hps.serving.errors import DeadlineExceeded, NotReady, QueueFull, ServingFailed
from torchrec_hps.serving.hot_ids import HotIds
from torchrec_hps.serving.models import ModelRepository
from torchrec_hps.serving.query import Batch, Query, Slice, gather, padded, scatter, split
from torchrec_hps.serving.tuner import HillClimber, Knob


class WorkQueue:
    """Slices waiting for one kind of worker (GPU or CPU), oldest first."""

    def __init__(self) -> None:
        self._items: Deque[Slice] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._waiting = 0  # workers blocked in take(), with nothing to do

    def idle(self) -> bool:
        """Nothing queued and a worker waiting for work (a hint: read without the lock)."""
        return self._waiting > 0 and not self._items

    def put(self, slices: Sequence[Slice]) -> None:
        with self._cv:
            self._items.extend(slices)
            self._cv.notify(len(slices))

    def take(self, max_samples: int, timeout: float = 0.1) -> List[Slice]:
        """The oldest slice and the queued slices of the same model version after it, up to `max_samples`."""
        with self._cv:
            if not self._items:
                self._waiting += 1
                try:
                    if not self._cv.wait_for(lambda: self._items or self._closed, timeout):
                        return []
                finally:
                    self._waiting -= 1
            if not self._items:
                return []
            first = self._items.popleft()
            out, total = [first], first.size
            served = first.query.served
            kept: List[Slice] = []
            while self._items and total < max_samples:
                s = self._items[0]
                if total + s.size > max_samples:
                    break
                self._items.popleft()
                if s.query.served is served:
                    out.append(s)
                    total += s.size
                else:
                    kept.append(s)  # another model's slice waits for the next batch, in order
            self._items.extendleft(reversed(kept))
            return out

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __len__(self) -> int:
        return len(self._items)


class Worker(threading.Thread):
    """Runs batches of one queue on one device ("cpu" or "cuda:N"). A GPU worker pipelines: before batch i's
    forward it takes batch i+1 from the queue (whatever waits) and registers it for prefetch, so batch i's
    lookup launches i+1's miss path and copy into HBM on the cache's side stream, overlapping i's dense
    layers."""

    def __init__(self, scheduler: "Scheduler", queue: WorkQueue, device: str, kind: str, index: int) -> None:
        super().__init__(name=f"hps-{kind}-worker-{index}", daemon=True)
        self.scheduler, self.queue, self.device, self.kind = scheduler, queue, device, kind
        self.pipeline = device.startswith("cuda")
        self.batches = 0
        self.samples = 0
        self.busy_s = 0.0  # in forwards (the tuner's capacity: samples per busy second)
        self.prefetched = 0

    def run(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.device))
        while not self.scheduler.halted:
            ready = self._prepare(self.queue.take(self.scheduler.batch_limit(self.kind)))
            while ready is not None:
                following = self._prefetch_next() if self.pipeline else None
                self._run(ready)
                ready = following

    def serve(self, slices: List[Slice]) -> None:
        """Run slices in the calling thread (the scheduler's inline path)."""
        batch = self._prepare(slices)
        if batch is not None:
            self._run(batch)

    def _prepare(self, slices: List[Slice]) -> Optional[Batch]:
        """The live slices as one batch (queries past their deadline are answered 504 here)."""
        now = time.monotonic()
        live = []
        for s in slices:
            if s.query.failed:
                continue
            if now > s.query.deadline:
                s.query.fail(DeadlineExceeded(f"the query's deadline passed after "
                                              f"{(now - s.query.arrival) * 1e3:.1f} ms in the queue"))
                continue
            live.append(s)
        if not live:
            return None
        try:
            batch = gather(live, live[0].query.served.signature)
            return padded(batch) if self.pipeline else batch  # GPU: a few batch sizes, one graph each
        except Exception as e:
            self._fail(live, e)
            return None

    def _run(self, batch: Batch) -> None:
        served = batch.slices[0].query.served
        t0 = time.perf_counter()
        try:
            self.scheduler.hot_ids.record(served.name, batch.features)
            model = served.replica(self.device)
            dense, features = batch.dense, batch.features
            if self.device != "cpu":
                dense = dense.to(self.device, non_blocking=True)
                if not batch.prefetched:  # a prefetched KJT stays on the host: the module has its device copy
                    features = features.to(self.device)
            with torch.no_grad():
                out = model(dense, features)
            scatter(batch, out.reshape(-1).float().cpu())
        except Exception as e:  # the model failed on valid inputs: answer these queries, keep serving
            self._fail(batch.slices, e)
        self.busy_s += time.perf_counter() - t0
        self.batches += 1
        self.samples += sum(s.size for s in batch.slices)

    def _prefetch_next(self) -> Optional[Batch]:
        """The batch after the one about to run, if queries wait: registered for prefetch, so the coming
        forward's lookup brings its rows in while that forward's dense layers run."""
        following = self._prepare(self.queue.take(self.scheduler.batch_limit(self.kind), timeout=0.0))
        if following is not None and following.dense.shape[0] >= self.scheduler.config.prefetch_min_batch:
            modules = following.slices[0].query.served.modules_on(self.device)
            if len(modules) == 1:  # one HPS module takes the model's whole KJT (DLRM's sparse arch)
                try:
                    modules[0].prefetch(following.features)
                    following.prefetched = True
                    self.prefetched += 1
                except Exception:  # a prefetch is only ahead-of-time work: the forward does it again, exactly
                    pass
        return following

    @staticmethod
    def _fail(slices: List[Slice], e: Exception) -> None:
        served = slices[0].query.served
        for s in slices:
            s.query.fail(ServingFailed(f"model {served.name!r} v{served.version} failed: {type(e).__name__}: {e}"))


class Scheduler:
    def __init__(self, config: SchedulerConfig, repository: ModelRepository, gpu_devices: Sequence[str]) -> None:
        self.config = config
        self.repository = repository
        self.hot_ids = HotIds()
        self.stopped = False  # no new queries
        self.halted = False  # workers exit (set once the queues drained)
        self._gpu, self._cpu = WorkQueue(), WorkQueue()
        self.workers: List[Worker] = [Worker(self, self._gpu, d, "gpu", i) for i, d in enumerate(gpu_devices)]
        self.workers += [Worker(self, self._cpu, "cpu", "cpu", i) for i in range(config.cpu_workers)]
        if not self.workers:
            raise ValueError("scheduler: no workers (cpu_workers=0 and no GPU)")
        self._has_gpu, self._has_cpu = bool(gpu_devices), config.cpu_workers > 0
        # a small query finding a CPU worker idle runs in the thread that admits it (no thread started)
        self.inline = Worker(self, self._cpu, "cpu", "inline", 0) if self._has_cpu else None
        if self._has_cpu:  # CPU workers side by side, each with a share of the cores (no oversubscription)
            torch.set_num_threads(config.torch_threads or max(1, (os.cpu_count() or 1) // config.cpu_workers))
        self._queued = 0  # samples admitted and not yet answered
        self._lock = threading.Lock()
        self.counts: Dict[str, int] = {"queries": 0, "samples": 0, "gpu_queries": 0, "cpu_queries": 0,
                                       "refused_full": 0, "deadline_exceeded": 0, "failed": 0}
        self._latencies: Deque[float] = deque(maxlen=8192)
        self.tuner: Optional[HillClimber] = None
        self.set_tuning(config.tune)
        for w in self.workers:
            w.start()

    def set_tuning(self, on: bool) -> None:
        """Start (from the current setting) or stop the online hill climber."""
        self.config.tune = on
        if not on:
            self.tuner = None
            return
        knobs = [Knob("batch_size", 8, self.config.max_query_samples)]
        if self._has_gpu and self._has_cpu:
            knobs.append(Knob("offload_threshold", 1, self.config.max_query_samples))
        self.tuner = HillClimber(knobs, lambda k: getattr(self.config, k), lambda k, v: setattr(self.config, k, v),
                                 target_s=self.config.p99_target_ms / 1e3, capacity=self.work,
                                 window=self.config.tuner_window)

    def work(self) -> Tuple[float, float]:
        """(samples served, worker busy seconds), summed over the workers."""
        workers = self.workers + ([self.inline] if self.inline is not None else [])
        return float(sum(w.samples for w in workers)), sum(w.busy_s for w in workers)

    def batch_limit(self, kind: str) -> int:
        return self.config.gpu_batch_size if kind == "gpu" else self.config.batch_size

    def submit(self, model: str, version: Optional[str], dense: torch.Tensor, lengths: torch.Tensor,
               values: torch.Tensor, weights: Optional[torch.Tensor], deadline_ms: Optional[float],
               done: Callable[[Query, Optional[BaseException]], None], request_id: str = "") -> Query:
        """Admit a query (checked inputs, see requests.py) or raise QueueFull / NotReady / ModelNotFound.
        `done(query, error)` is called once, from a worker thread."""
        if self.stopped:
            raise NotReady("the server is shutting down")
        served = self.repository.acquire(model, version)  # held: an unload waits for this query
        n = int(dense.shape[0])
        with self._lock:
            if self._queued + n > self.config.max_queued_samples:
                self.counts["refused_full"] += 1
                served.release()
                raise QueueFull(f"the queue is full ({self._queued} samples waiting, bound "
                                f"{self.config.max_queued_samples}); retry later")
            self._queued += n
        budget = min(deadline_ms, self.config.deadline_ms) if deadline_ms else self.config.deadline_ms

        def finished(q: Query, error: Optional[BaseException]) -> None:
            latency = time.monotonic() - q.arrival
            with self._lock:
                self._queued -= q.n
                self.counts["queries"] += 1
                self.counts["samples"] += q.n
                self.counts[f"{q.route}_queries"] += 1
                if isinstance(error, DeadlineExceeded):
                    self.counts["deadline_exceeded"] += 1
                elif error is not None:
                    self.counts["failed"] += 1
                else:
                    self._latencies.append(latency)
            q.served.release()
            tuner = self.tuner
            if tuner is not None and error is None:
                tuner.observe(q.arrival, latency)
            done(q, error)

        query = Query(dense, lengths, values, weights, time.monotonic() + budget / 1e3, finished, request_id)
        query.served = served
        gpu = self._has_gpu and (n >= self.config.offload_threshold or not self._has_cpu) \
            and served.config.source != "torchscript"
        if not gpu and not self._has_cpu:  # a host-only artifact on a GPU-only node: the GPU workers run it
            gpu = True
        query.route = "gpu" if gpu else "cpu"
        slices = split(query, self.batch_limit(query.route))
        if not gpu and len(slices) == 1 and n <= self.config.inline_max_samples and self._cpu.idle():
            # a CPU worker waits with nothing queued: serving the query here saves the two thread hand-offs
            # (the worker's wake-up and the answer's way back), most of a small query's server time
            self.inline.serve(slices)
        else:
            (self._gpu if gpu else self._cpu).put(slices)
        return query

    def stats(self) -> Dict[str, float]:
        with self._lock:
            lat = np.array(self._latencies) * 1e3 if self._latencies else np.zeros(1)
            out: Dict[str, float] = dict(self.counts)
            out.update(queued_samples=self._queued, p50_ms=float(np.percentile(lat, 50)),
                       p99_ms=float(np.percentile(lat, 99)))
        out.update(batch_size=self.config.batch_size, offload_threshold=self.config.offload_threshold,
                   gpu_queue=len(self._gpu), cpu_queue=len(self._cpu))
        return out

    def stop(self, timeout: float = 10.0) -> None:
        """Stop admitting; the workers finish what is queued, then exit."""
        self.stopped = True
        end = time.monotonic() + timeout
        while (len(self._gpu) or len(self._cpu)) and time.monotonic() < end:
            time.sleep(0.01)
        self.halted = True
        for q in (self._gpu, self._cpu):
            q.close()
        for w in self.workers:
            w.join(max(0.1, end - time.monotonic()))
