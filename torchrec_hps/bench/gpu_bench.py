"""GPU benchmark: HPSEmbeddingBagCollection vs fbgemm's IntNBit TBE on the same Zipf(1.09) batches, timed
with CUDA events in one run.

Variants, all over the same tables (rows generated once on the GPU, written to each):
- `fbgemm DEVICE`: every row in HBM (the speed of light for a pooled lookup);
- `fbgemm MANAGED_CACHING`: rows in UVM behind fbgemm's own HBM cache at `budget` of the rows (LRU);
- `ours all cached`: our cache holding every row (prefilled);
- `ours sync`: our cache at `budget` of the rows, synchronous mode (misses fetched from the host memory
  tier before the lookup returns, so the output is exact).
Per call: median (p50) and p99 of CUDA-event times over `reps` calls rotating `n_batches` batches; Mrows/s
= table rows read per second (T*B*L / p50); hit rate = share of each batch's distinct ids per table that
were cached when it came (fbgemm's own counters for MANAGED_CACHING, ours from the cache's counters).
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from torchrec_hps.bench.workload import ZipfKeys, zipf_kjt

SHAPES = ((16384, 1), (16384, 32), (256, 1))


@dataclass
class GPUBenchRow:
    variant: str
    batch: int
    bag: int
    p50_ms: float
    p99_ms: float
    mrows_s: float
    hit_rate: Optional[float]  # distinct-id hit rate; None where everything is in HBM
    vs_device: float  # fbgemm DEVICE p50 / this p50 (1.0 = as fast)


def _times_ms(fn: Callable[[int], object], n_batches: int, reps: int, warmup: int) -> List[float]:
    for i in range(warmup):
        fn(i % n_batches)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % n_batches)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _fbgemm_tbe(specs, location, dev, budget: float):
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(name, rows, dim, SparseType.FP32, location) for name, rows, dim in specs],
        device=dev, output_dtype=SparseType.FP32, cache_load_factor=budget, gather_uvm_cache_stats=True)
    tbe.initialize_weights()
    return tbe


def run_gpu_bench(num_tables: int = 8, rows: int = 4_000_000, dim: int = 128, shapes: Sequence[Tuple[int, int]] = SHAPES,
                  reps: int = 30, n_batches: int = 8, budget: float = 0.1, profile: bool = False,
                  log: Callable[[str], None] = print) -> List[Dict]:
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from torchrec import EmbeddingBagConfig

    from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, StorageConfig
    from torchrec_hps.modules import HPSEmbeddingBagCollection
    from torchrec_hps.storage import StorageHierarchy

    dev = torch.device("cuda")
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows, feature_names=[f"f{i}"])
              for i in range(num_tables)]
    specs = [(t.name, rows, dim) for t in tables]
    device_tbe = _fbgemm_tbe(specs, EmbeddingLocation.DEVICE, dev, budget)
    managed = _fbgemm_tbe(specs, EmbeddingLocation.MANAGED_CACHING, dev, budget)
    storage = StorageHierarchy.from_config(StorageConfig(memory=MemoryTierConfig(num_partitions=4)))

    def hps(name: str, ratio: float) -> HPSEmbeddingBagCollection:
        cfg = HPSConfig(model="gpubench", cache=CacheConfig(cache_ratio=ratio, hit_rate_threshold=1.0))
        return HPSEmbeddingBagCollection(tables, cfg, storage=storage, device=dev)

    all_cached = hps("all", 1.0)  # registers the tables with the storage
    ours_sync = hps("sync", budget)
    gen = torch.Generator(device=dev).manual_seed(0)
    chunk = 1 << 20
    for t, (w_dev, _), (w_uvm, _) in zip(tables, device_tbe.split_embedding_weights(), managed.split_embedding_weights()):
        w = torch.randn(rows, dim, generator=gen, device=dev)
        w_dev.view(torch.float32)[:, :dim].copy_(w)
        w_uvm.view(torch.float32)[:, :dim].copy_(w)
        for lo in range(0, rows, chunk):
            storage.put(f"gpubench.{t.name}", torch.arange(lo, min(lo + chunk, rows)), w[lo:lo + chunk].cpu())
        del w
    for t in tables:
        all_cached.prefill(t.name, torch.arange(rows))
    log(f"{num_tables} tables x {rows:,} rows x {dim} fp32; HBM budget for the caches {budget:.0%}; "
        f"{torch.cuda.get_device_name()}")

    samplers = [ZipfKeys(rows, 1.09, seed=i) for i in range(num_tables)]
    results: List[GPUBenchRow] = []
    for batch, bag in shapes:
        kjts = [zipf_kjt(samplers, [t.feature_names[0] for t in tables], batch, bag).to(dev) for _ in range(n_batches)]
        idx = [(k.values().int(), k.offsets().int()) for k in kjts]
        distinct = [sum(int(torch.unique(v).numel()) for v in k.values().view(num_tables, -1)) for k in kjts]
        expect = device_tbe(*idx[0])
        n_rows = num_tables * batch * bag
        shape_rows: List[GPUBenchRow] = []

        def add(variant: str, times: List[float], hit_rate: Optional[float]) -> None:
            p50 = statistics.median(times)
            device_p50 = shape_rows[0].p50_ms if shape_rows else p50
            shape_rows.append(GPUBenchRow(variant, batch, bag, p50, float(np.percentile(times, 99)),
                                          n_rows / p50 / 1e3, hit_rate, device_p50 / p50))

        add("fbgemm DEVICE", _times_ms(lambda i: device_tbe(*idx[i]), n_batches, reps, 3), None)
        torch.testing.assert_close(managed(*idx[0]), expect, rtol=1e-5, atol=1e-5)
        _times_ms(lambda i: managed(*idx[i]), n_batches, 0, 2 * n_batches)
        managed.reset_uvm_cache_stats()
        times = _times_ms(lambda i: managed(*idx[i]), n_batches, reps, 0)
        st = managed.get_uvm_cache_stats().tolist()  # [calls, requested, unique, unique misses, ...]
        add("fbgemm MANAGED_CACHING", times, 1 - st[3] / max(st[2], 1))
        torch.testing.assert_close(all_cached(kjts[0]).values(), expect, rtol=1e-5, atol=1e-5)
        add("ours all cached", _times_ms(lambda i: all_cached(kjts[i]), n_batches, reps, 3), None)
        _times_ms(lambda i: ours_sync(kjts[i]), n_batches, 0, 2 * n_batches)
        before = _unique_misses(ours_sync)
        times = _times_ms(lambda i: ours_sync(kjts[i]), n_batches, reps, 0)
        misses = _unique_misses(ours_sync) - before
        add("ours sync", times, 1 - misses / sum(distinct[i % n_batches] for i in range(reps)))
        torch.testing.assert_close(ours_sync(kjts[0]).values(), expect, rtol=1e-5, atol=1e-5)
        mc = shape_rows[1].p50_ms
        for r in shape_rows:
            log(f"B={batch:6d} L={bag:3d}  {r.variant:22s} p50 {r.p50_ms:7.3f} ms  p99 {r.p99_ms:7.3f} ms  "
                f"{r.mrows_s:8.0f} Mrows/s  hit {'-' if r.hit_rate is None else f'{r.hit_rate:.3f}':>5s}  "
                f"x DEVICE {r.vs_device:.2f}  x MANAGED_CACHING {mc / r.p50_ms:.2f}")
        results += shape_rows
        if profile:
            _breakdown(all_cached, kjts, log)
            _tbe_in_graph_variant(all_cached, kjts, shape_rows[0].p50_ms, reps, log)
            for name, module in (("ours all cached", all_cached), ("ours sync", ours_sync)):
                _profile(name, lambda i: module(kjts[i % n_batches]), f"B={batch} L={bag}", log)
            _python_profile("ours sync", lambda i: ours_sync(kjts[i % n_batches]), f"B={batch} L={bag}", log)
    paths = [g.all_hit for m in (all_cached, ours_sync) for g in m.engine.groups if g.all_hit is not None]
    log(f"all-hit path: served {sum(p.served for p in paths)}, fell back {sum(p.fallbacks for p in paths)}")
    for m in (all_cached, ours_sync):
        m.close()
    storage.close()
    return [asdict(r) for r in results]


def _unique_misses(module) -> int:
    return sum(s["unique_misses"] for k, s in module.stats().items() if k != "_module")


def _profile(name: str, fn: Callable[[int], object], shape: str, log: Callable[[str], None]) -> None:
    # two warm-up steps keep the profiler's own start-up (CUPTI buffers, first-call costs) out of the table
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                schedule=torch.profiler.schedule(wait=0, warmup=2, active=4), acc_events=True) as prof:
        for i in range(6):
            fn(i)
            torch.cuda.synchronize()
            prof.step()
    log(f"profile: {name}, {shape}, 4 calls")
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=48))


def _breakdown(module, kjts, log: Callable[[str], None], reps: int = 20) -> None:
    """Where an all-hit lookup's time goes: host wall time per call (it waits for the flags), the graph's
    replay alone, and the TBE alone on the slots the graph wrote (CUDA events, medians)."""
    import time

    (group,) = module.engine.groups
    host = []
    for i in range(reps):
        t0 = time.perf_counter()
        module(kjts[i % len(kjts)])
        host.append((time.perf_counter() - t0) * 1e3)
    n = kjts[0].values().numel()
    shape = next(s for k, s in group.all_hit._shapes.items() if k[0] == kjts[0].stride() and k[1] >= n)
    module(kjts[0])

    def events(fn) -> float:
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    graph_ms = events(shape.graph.replay) if shape.graph is not None else float("nan")
    tbe_ms = events(lambda: group.pooled_lookup(shape.slots[:n], shape.offsets, None))
    log(f"breakdown: host wall per lookup {statistics.median(host):.3f} ms; graph replay alone {graph_ms:.3f} ms "
        f"(TBE inside: {shape.pooled_in_graph}, zero-copy flags: {shape.zero_copy}); TBE alone {tbe_ms:.3f} ms")


def _python_profile(name: str, fn: Callable[[int], object], shape: str, log: Callable[[str], None]) -> None:
    """The host's Python side (the miss path is host-bound): cProfile over 4 calls, top functions."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for i in range(4):
        fn(i)
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    log(f"python profile: {name}, {shape}, 4 calls\n" + out.getvalue())


def _tbe_in_graph_variant(module, kjts, device_p50: float, reps: int, log: Callable[[str], None]) -> None:
    """The all-cached lookup with the TBE captured in the graph at every size (its output copied out) instead
    of dispatched after it above POOLED_IN_GRAPH_MAX_BYTES: which is faster at this shape."""
    from torchrec_hps.modules.cache import cuda_graph

    (group,) = module.engine.groups
    saved = cuda_graph.POOLED_IN_GRAPH_MAX_BYTES
    cuda_graph.POOLED_IN_GRAPH_MAX_BYTES = 1 << 62
    group.all_hit.release()
    try:
        p50 = statistics.median(_times_ms(lambda i: module(kjts[i % len(kjts)]), len(kjts), reps, 3))
    finally:
        cuda_graph.POOLED_IN_GRAPH_MAX_BYTES = saved
        group.all_hit.release()
    log(f"variant: ours all cached with the TBE in the graph + output copy: p50 {p50:.3f} ms "
        f"({device_p50 / p50:.2f}x DEVICE)")
