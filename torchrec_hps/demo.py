"""The embedded demo behind `make demo`: a small DLRM (torchrec.models) with 26 sparse features over
Criteo-like table sizes scaled to this machine, swapped onto the parameter server (memory tier + RocksDB in
a local folder: no server needed), served Zipf(1.09) ids through a cache far smaller than the tables;
prints hit rates, which tier served the misses, latency, and the equality check against the plain model."""
from __future__ import annotations

import copy
import tempfile
import time
from typing import Callable, Dict, Optional

import numpy as np
import torch

# Criteo Terabyte's 26 categorical cardinalities, capped (MLPerf caps at 40M; here at 200K for a laptop)
CRITEO_ROWS = [39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10, 2208,
               11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36]


def run_demo(batches: int = 40, batch_size: int = 512, max_rows: int = 200_000, dim: int = 16,
             cache_ratio: float = 0.05, path: Optional[str] = None, log: Callable[[str], None] = print) -> Dict:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM

    from torchrec_hps.bench.workload import ZipfKeys, zipf_kjt
    from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, RocksDBTierConfig, StorageConfig
    from torchrec_hps.modules.swap import swap_in_hps

    rows = [min(n, max_rows) for n in CRITEO_ROWS]
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"cat_{i}"])
              for i, n in enumerate(rows)]
    torch.manual_seed(0)
    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables), dense_in_features=13,
                 dense_arch_layer_sizes=[64, dim], over_arch_layer_sizes=[64, 1]).eval()
    reference = copy.deepcopy(model)
    samplers = [ZipfKeys(n, 1.09, seed=i) for i, n in enumerate(rows)]
    features = [t.feature_names[0] for t in tables]
    inputs = [(torch.randn(batch_size, 13), zipf_kjt(samplers, features, batch_size)) for _ in range(batches)]
    with tempfile.TemporaryDirectory() as tmp:
        config = HPSConfig(model="demo_dlrm", cache=CacheConfig(cache_ratio=cache_ratio, hit_rate_threshold=1.0),
                           storage=StorageConfig(memory=MemoryTierConfig(capacity=20_000),
                                                 rocksdb=RocksDBTierConfig(path=path or f"{tmp}/rocksdb")))
        t0 = time.perf_counter()
        model, storage = swap_in_hps(model, config)
        log(f"loaded {sum(rows):,} rows of {len(rows)} tables into RocksDB in {time.perf_counter() - t0:.1f}s; "
            f"cache: {cache_ratio:.0%} of each table")
        hps = model.sparse_arch.embedding_bag_collection
        max_err = 0.0
        with torch.no_grad():
            for dense, kjt in inputs:
                max_err = max(max_err, float((model(dense, kjt) - reference(dense, kjt)).abs().max()))
        stats = hps.stats()
        storage_stats = storage.stats()
        hps.close()
        storage.close()
    ids = sum(stats[t.name]["ids"] for t in tables)
    hits = sum(stats[t.name]["hits"] for t in tables)
    served: Dict[str, int] = {}
    for t in tables:
        for tier, n in storage_stats[f"demo_dlrm.{t.name}"]["served_by"].items():
            served[tier] = served.get(tier, 0) + n
    log(f"{batches} batches of {batch_size}: cache hit rate {hits / ids:.3f} over {ids:,} ids; distinct misses "
        f"served by " + ", ".join(f"{k} {v:,}" for k, v in served.items()))
    for t in sorted(tables, key=lambda t: -t.num_embeddings)[:5]:
        s = stats[t.name]
        log(f"  {t.name:4s} rows {t.num_embeddings:>7,}  cache {s['capacity']:>6,}  hit rate {s['hit_rate']:.3f}  "
            f"evicted {s['evicted']:,}")
    m = stats["_module"]
    log(f"sparse lookup latency p50 {m['p50_ms']:.2f} ms, p99 {m['p99_ms']:.2f} ms (26 tables, B={batch_size})")
    ok = max_err == 0.0
    log(f"equality with the plain TorchRec model: max |diff| = {max_err:.3g} -> {'OK' if ok else 'MISMATCH'}")
    return {"hit_rate": hits / ids, "served_by": served, "max_abs_diff": max_err, "ok": ok,
            "p50_ms": m["p50_ms"], "p99_ms": m["p99_ms"]}
