"""GPU benchmark (first cut): HPSEmbeddingBagCollection with every row cached in HBM vs fbgemm's IntNBit
TBE with all rows in HBM (EmbeddingLocation.DEVICE), on the same Zipf(1.09) batches, timed with CUDA
events in one run. Prints Mrows/s (table rows read per second = T*B*L / time) and the ratio."""
from __future__ import annotations

import statistics
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from torchrec_hps.bench.workload import ZipfKeys, zipf_kjt


def _time_ms(fn: Callable[[int], object], n_batches: int, reps: int) -> Tuple[float, float]:
    for i in range(3):
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
    return statistics.median(times), float(np.percentile(times, 99))


def run_gpu_bench(num_tables: int = 8, rows: int = 1_000_000, dim: int = 128,
                  shapes: Sequence[Tuple[int, int]] = ((16384, 1), (16384, 32), (256, 1)), reps: int = 30,
                  n_batches: int = 8, profile: bool = False, log: Callable[[str], None] = print) -> List[Dict]:
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
    from torchrec import EmbeddingBagConfig

    from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, StorageConfig
    from torchrec_hps.modules import HPSEmbeddingBagCollection
    from torchrec_hps.storage import StorageHierarchy

    dev = torch.device("cuda")
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows, feature_names=[f"f{i}"])
              for i in range(num_tables)]
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(rows, dim, generator=gen) for _ in range(num_tables)]
    ref = IntNBitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(t.name, rows, dim, SparseType.FP32, EmbeddingLocation.DEVICE) for t in tables],
        device=dev, output_dtype=SparseType.FP32)
    ref.initialize_weights()
    for (w, _), src in zip(ref.split_embedding_weights(), weights):
        w.view(torch.float32)[:, :dim].copy_(src)
    storage = StorageHierarchy.from_config(StorageConfig(memory=MemoryTierConfig(num_partitions=1)))
    cfg = HPSConfig(model="gpubench", cache=CacheConfig(cache_ratio=1.0, hit_rate_threshold=1.0))
    hps = HPSEmbeddingBagCollection(tables, cfg, storage=storage, device=dev)
    for t, w in zip(tables, weights):
        for lo in range(0, rows, 262144):
            storage.put(f"gpubench.{t.name}", torch.arange(lo, min(lo + 262144, rows)), w[lo:lo + 262144])
        hps.prefill(t.name, torch.arange(rows))
    log(f"{num_tables} tables x {rows:,} rows x {dim} fp32, all rows in HBM for both")
    samplers = [ZipfKeys(rows, 1.09, seed=i) for i in range(num_tables)]
    results = []
    for batch, bag in shapes:
        kjts = [zipf_kjt(samplers, [t.feature_names[0] for t in tables], batch, bag).to(dev) for _ in range(n_batches)]
        idx = [(k.values().int(), k.offsets().int()) for k in kjts]
        torch.testing.assert_close(hps(kjts[0]).values(), ref(*idx[0]), rtol=1e-5, atol=1e-5)
        ours_ms, ours_p99 = _time_ms(lambda i: hps(kjts[i]), n_batches, reps)
        ref_ms, ref_p99 = _time_ms(lambda i: ref(*idx[i]), n_batches, reps)
        n_rows = num_tables * batch * bag
        r = {"batch": batch, "bag": bag, "ours_ms": ours_ms, "ours_p99_ms": ours_p99, "fbgemm_device_ms": ref_ms,
             "fbgemm_p99_ms": ref_p99, "ours_mrows_s": n_rows / ours_ms / 1e3, "fbgemm_mrows_s": n_rows / ref_ms / 1e3,
             "ratio": ref_ms / ours_ms}
        results.append(r)
        if profile and (batch, bag) == tuple(shapes[0]):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for i in range(5):
                    hps(kjts[i % n_batches])
                torch.cuda.synchronize()
            log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50))
        log(f"B={batch:6d} L={bag:3d}  ours {ours_ms:.3f} ms ({r['ours_mrows_s']:.0f} Mrows/s, p99 {ours_p99:.3f})  "
            f"fbgemm DEVICE {ref_ms:.3f} ms ({r['fbgemm_mrows_s']:.0f} Mrows/s)  ours/fbgemm speed {r['ratio']:.2f}x")
    graphs = [g.graphs for g in hps.engine.groups if g.graphs is not None]
    log(f"CUDA graph replays {sum(g.replays for g in graphs)}, eager fallbacks {sum(g.fallbacks for g in graphs)}")
    hps.close()
    storage.close()
    return results
