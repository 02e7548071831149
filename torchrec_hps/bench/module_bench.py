"""Module benchmark (CPU or GPU): HPSEmbeddingBagCollection's steady-state hit rate and lookup latency
against batch size and cache ratio, on Zipf(1.09) ids over memory + RocksDB tiers, like HugeCTR HPS's
Figure 4; the cache is pre-filled with the hottest rows first; writes JSON and a PNG."""
from __future__ import annotations

import tempfile
import time
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch


def run_module_bench(num_tables: int = 4, rows: int = 100_000, dim: int = 64,
                     batches: Sequence[int] = (64, 256, 1024, 4096),
                     ratios: Sequence[float] = (0.01, 0.05, 0.2, 0.5), warmup: int = 5, measure: int = 20,
                     device: str = "cpu", log: Callable[[str], None] = print) -> List[Dict]:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    from torchrec_hps.workload import ZipfKeys, zipf_kjt
    from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, RocksDBTierConfig, StorageConfig
    from torchrec_hps.modules import HPSEmbeddingBagCollection
    from torchrec_hps.storage import StorageHierarchy, bulk_load

    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows, feature_names=[f"f{i}"])
              for i in range(num_tables)]
    features = [t.feature_names[0] for t in tables]
    results: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        storage = StorageHierarchy.from_config(StorageConfig(memory=MemoryTierConfig(capacity=rows // 5),
                                                             rocksdb=RocksDBTierConfig(path=f"{tmp}/db")))
        storage.add_tables(bulk_load(storage.tiers[-1:], "mbench", EmbeddingBagCollection(tables=tables),
                                     progress=False))
        for ratio in ratios:
            for batch in batches:
                hps = HPSEmbeddingBagCollection(tables, HPSConfig("mbench", CacheConfig(
                    cache_ratio=ratio, min_cache_rows=1, hit_rate_threshold=1.0)), storage=storage, device=device)
                samplers = [ZipfKeys(rows, 1.09, seed=i) for i in range(num_tables)]
                for t, sampler in zip(tables, samplers):  # pre-fill hottest first, as a serving node would
                    hps.prefill(t.name, sampler.perm[:int(ratio * rows)])
                kjts = [zipf_kjt(samplers, features, batch).to(torch.device(device)) for _ in range(warmup + measure)]
                with torch.no_grad():
                    for k in kjts[:warmup]:
                        hps(k)
                    before = {t.name: (hps.stats()[t.name]["ids"], hps.stats()[t.name]["hits"]) for t in tables}
                    lat = []
                    for k in kjts[warmup:]:
                        t0 = time.perf_counter()
                        hps(k)
                        if device != "cpu":
                            torch.cuda.synchronize()
                        lat.append(time.perf_counter() - t0)
                stats = hps.stats()
                ids = sum(stats[t.name]["ids"] - before[t.name][0] for t in tables)
                hits = sum(stats[t.name]["hits"] - before[t.name][1] for t in tables)
                r = {"cache_ratio": ratio, "batch": batch, "hit_rate": hits / ids,
                     "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3)}
                results.append(r)
                log(f"cache {ratio:5.2f}  B={batch:5d}  hit rate {r['hit_rate']:.3f}  p50 {r['p50_ms']:7.2f} ms  "
                    f"p99 {r['p99_ms']:7.2f} ms")
                hps.close()
        storage.close()
    return results


def plot_module_bench(results: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["cache_ratio"] for r in results})
    batches = sorted({r["batch"] for r in results})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for b in batches:
        pts = sorted((r["cache_ratio"], r["hit_rate"]) for r in results if r["batch"] == b)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {b}")
    ax1.set(xscale="log", xlabel="cache ratio", ylabel="hit rate (per id)", title="hit rate vs cache ratio")
    ax1.legend()
    for c in ratios:
        pts = sorted((r["batch"], r["p50_ms"]) for r in results if r["cache_ratio"] == c)
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"cache {c:g}")
    ax2.set(xscale="log", yscale="log", xlabel="batch size", ylabel="p50 lookup latency (ms)",
            title="latency vs batch size")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
