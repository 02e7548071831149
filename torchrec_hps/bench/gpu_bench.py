"""GPU benchmark: HPSEmbeddingBagCollection vs fbgemm's IntNBit TBE on a stream of new Zipf(1.09) batches,
timed with CUDA events in one run.

Traffic as in production: every timed batch is new (drawn on the GPU from one popularity order per table,
ranks scattered over the ids by a fixed permutation), after warm-up on other batches of the same stream, so
no cache can hold a replayed set of ids and the miss path is measured.
Variants, all over the same tables (rows generated once on the GPU, written to each):
- `fbgemm DEVICE`: every row in HBM (the speed of light for a pooled lookup);
- `fbgemm MANAGED_CACHING`: rows in UVM behind fbgemm's own HBM cache at `budget` of the rows (LRU);
- `ours all cached`: every row in our HBM level;
- `ours 10% sync` (`budget`): HBM level at `budget`, the host level (host-mapped, read by the GPU in place)
  holding every row, synchronous mode: exact output; one such variant per HBM admission policy asked for
  (`admissions`; "always" is the default's, unnamed, the others named after the policy).
Per call: median (p50) and p99 of CUDA-event times over `reps` new batches; Mrows/s = table rows read per
second (T*B*L / p50); hit rate: fbgemm's counters (share of each batch's distinct ids that were cached),
ours the share of ids served from HBM (per id).
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


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


class GPUZipfStream:
    """New batches of Zipf(alpha) ids per table, drawn on the GPU: one popularity order (a fixed permutation
    of the ids) for the whole stream, fresh draws for every batch."""

    def __init__(self, num_tables: int, rows: int, alpha: float, dev: torch.device, seed: int = 0) -> None:
        ranks = torch.arange(1, rows + 1, dtype=torch.float64, device=dev)
        cdf = torch.cumsum(ranks ** -alpha, 0)
        self.cdf = (cdf / cdf[-1]).float()
        gen = torch.Generator(device=dev).manual_seed(seed)
        self.perms = [torch.randperm(rows, generator=gen, device=dev) for _ in range(num_tables)]
        self.gen = gen
        self.rows = rows

    def batch(self, feature_names: Sequence[str], batch: int, bag: int):
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        n = batch * bag
        values = torch.cat([perm[torch.searchsorted(self.cdf, torch.rand(n, generator=self.gen, device=perm.device))
                                 .clamp(max=self.rows - 1)] for perm in self.perms])
        lengths = torch.full((len(feature_names) * batch,), bag, dtype=torch.int64, device=values.device)
        return KeyedJaggedTensor(keys=list(feature_names), values=values, lengths=lengths)


def _times_ms(fn: Callable[[int], object], warmup: int, reps: int) -> List[float]:
    """fn(i) for i in [0, warmup) untimed, then [warmup, warmup + reps) timed: each i is a new batch."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(warmup, warmup + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
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
                  reps: int = 30, warmup: int = 20, budget: float = 0.1, profile: bool = False,
                  admissions: Sequence[str] = ("always",), eviction: str = "lru",
                  log: Callable[[str], None] = print) -> List[Dict]:
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from torchrec import EmbeddingBagConfig

    from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, StorageConfig, table_key
    from torchrec_hps.modules import HPSEmbeddingBagCollection
    from torchrec_hps.storage import StorageHierarchy

    dev = torch.device("cuda")
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows, feature_names=[f"f{i}"])
              for i in range(num_tables)]
    names = [t.feature_names[0] for t in tables]
    specs = [(t.name, rows, dim) for t in tables]
    device_tbe = _fbgemm_tbe(specs, EmbeddingLocation.DEVICE, dev, budget)
    managed = _fbgemm_tbe(specs, EmbeddingLocation.MANAGED_CACHING, dev, budget)
    storage = StorageHierarchy.from_config(StorageConfig(memory=MemoryTierConfig(num_partitions=4)))

    def hps(ratio: float, admission: str = "always") -> HPSEmbeddingBagCollection:
        cfg = HPSConfig(model="gpubench", cache=CacheConfig(cache_ratio=ratio, host_cache_ratio=1.0,
                                                            hit_rate_threshold=1.0, admission=admission,
                                                            eviction=eviction))
        return HPSEmbeddingBagCollection(tables, cfg, storage=storage, device=dev)

    all_cached = hps(1.0)  # registers the tables with the storage
    budgeted = {f"ours {budget:.0%} sync" + ("" if a == "always" else f" {a}") + ("" if eviction == "lru" else
                f" {eviction}"): hps(budget, a) for a in admissions}
    ours_sync = next(iter(budgeted.values()))
    gen = torch.Generator(device=dev).manual_seed(0)
    chunk = 1 << 20
    for t, (w_dev, _), (w_uvm, _) in zip(tables, device_tbe.split_embedding_weights(), managed.split_embedding_weights()):
        w = torch.randn(rows, dim, generator=gen, device=dev)
        w_dev.view(torch.float32)[:, :dim].copy_(w)
        w_uvm.view(torch.float32)[:, :dim].copy_(w)
        for lo in range(0, rows, chunk):
            storage.put(table_key("gpubench", t.name), torch.arange(lo, min(lo + chunk, rows)), w[lo:lo + chunk].cpu())
        del w
    for module in (all_cached, *budgeted.values()):  # the host level holds every row (HPS: the full copy in memory)
        for t in tables:
            for lo in range(0, rows, chunk):
                module.prefill(t.name, torch.arange(lo, min(lo + chunk, rows)))
    (group,) = ours_sync.engine.groups
    log(f"{num_tables} tables x {rows:,} rows x {dim} fp32; HBM budget {budget:.0%} ({group.hbm.capacity:,} rows "
        f"shared by the tables); host level: every row; {torch.cuda.get_device_name()}; every timed batch new "
        f"({warmup} warm-up batches, {reps} timed)")

    stream = GPUZipfStream(num_tables, rows, 1.09, dev)
    results: List[GPUBenchRow] = []
    for batch, bag in shapes:
        kjts = [stream.batch(names, batch, bag) for _ in range(warmup + reps)]
        idx = [(k.values().int(), k.offsets().int()) for k in kjts]
        expect = device_tbe(*idx[-1])
        n_rows = num_tables * batch * bag
        shape_rows: List[GPUBenchRow] = []

        def add(variant: str, times: List[float], hit_rate: Optional[float]) -> None:
            p50 = statistics.median(times)
            device_p50 = shape_rows[0].p50_ms if shape_rows else p50
            shape_rows.append(GPUBenchRow(variant, batch, bag, p50, float(np.percentile(times, 99)),
                                          n_rows / p50 / 1e3, hit_rate, device_p50 / p50))

        add("fbgemm DEVICE", _times_ms(lambda i: device_tbe(*idx[i]), warmup, reps), None)
        for i in range(warmup):
            managed(*idx[i])
        managed.reset_uvm_cache_stats()
        times = _times_ms(lambda i: managed(*idx[i + warmup]), 0, reps)
        st = managed.get_uvm_cache_stats().tolist()  # [calls, requested, unique, unique misses, ...]
        add("fbgemm MANAGED_CACHING", times, 1 - st[3] / max(st[2], 1))
        torch.testing.assert_close(managed(*idx[-1]), expect, rtol=1e-5, atol=1e-5)
        add("ours all cached", _times_ms(lambda i: all_cached(kjts[i]), warmup, reps), None)
        torch.testing.assert_close(all_cached(kjts[-1]).values(), expect, rtol=1e-5, atol=1e-5)
        for variant, module in budgeted.items():
            for i in range(warmup):
                module(kjts[i])
            before = _served(module)
            times = _times_ms(lambda i: module(kjts[i + warmup]), 0, reps)
            ids, hits = (a - b for a, b in zip(_served(module), before))
            add(variant, times, hits / max(ids, 1))
            torch.testing.assert_close(module(kjts[-1]).values(), expect, rtol=1e-5, atol=1e-5)
        mc = shape_rows[1].p50_ms
        for r in shape_rows:
            log(f"B={batch:6d} L={bag:3d}  {r.variant:22s} p50 {r.p50_ms:7.3f} ms  p99 {r.p99_ms:7.3f} ms  "
                f"{r.mrows_s:8.0f} Mrows/s  hit {'-' if r.hit_rate is None else f'{r.hit_rate:.3f}':>5s}  "
                f"x DEVICE {r.vs_device:.2f}  x MANAGED_CACHING {mc / r.p50_ms:.2f}")
        results += shape_rows
        if profile:  # on new batches of the stream, as timed
            fresh = [stream.batch(names, batch, bag) for _ in range(12)]
            _profile("ours all cached", lambda i: all_cached(fresh[i]), f"B={batch} L={bag}", log)
            _profile(f"ours {budget:.0%} sync", lambda i: ours_sync(fresh[i + 6]), f"B={batch} L={bag}", log)
        del kjts, idx
    paths = [g.path for m in (all_cached, *budgeted.values()) for g in m.engine.groups]
    log(f"lookups: {sum(p.runs for p in paths)}, run again after the miss path: {sum(p.reruns for p in paths)}")
    log(f"index bytes per host-level row: {group.index_bytes() / sum(group.capacities):.1f}")
    for m in (all_cached, *budgeted.values()):
        m.close()
    storage.close()
    return [asdict(r) for r in results]


def _served(module):
    stats = [s for k, s in module.stats().items() if k != "_module"]
    return sum(s["ids"] for s in stats), sum(s["hits"] for s in stats)


def _profile(name: str, fn: Callable[[int], object], shape: str, log: Callable[[str], None]) -> None:
    # two warm-up steps keep the profiler's own start-up (CUPTI buffers, first-call costs) out of the table
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                schedule=torch.profiler.schedule(wait=0, warmup=2, active=4), acc_events=True) as prof:
        for i in range(6):
            fn(i)
            torch.cuda.synchronize()
            prof.step()
    log(f"profile: {name}, {shape}, 4 calls")
    log(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=48))
