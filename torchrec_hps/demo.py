"""The embedded demo behind `make demo`: a small DLRM (torchrec.models) with 26 sparse features over
Criteo-like table sizes scaled to this machine, trained a few hundred steps on synthetic Zipf(1.09) ids,
served through the parameter server with a cache far smaller than the tables; prints hit rates, which tier
served the misses, latency, and the equality check against the trained TorchRec model.

With no config, the tiers are a memory tier and RocksDB in a temporary folder (no server needed): the model
is trained, then swapped in. With a config that has `kafka`, the serving model is swapped in first (onto the
configured tiers) and the training runs with the train bridge on: every step's changed rows reach the
serving node through Kafka while it serves."""
from __future__ import annotations

import copy
import tempfile
import time
from typing import Callable, Dict, Optional

import torch

# Criteo Terabyte's 26 categorical cardinalities, capped (MLPerf caps at 40M; here at 200K for a laptop)
CRITEO_ROWS = [39884406, 39043, 17289, 7420, 20263, 3, 7120, 1543, 63, 38532951, 2953546, 403346, 10, 2208,
               11938, 155, 4, 976, 14, 39979771, 25641295, 39664984, 585935, 12972, 108, 36]


def _train(model, samplers, features, steps: int, batch_size: int, bridge=None) -> float:
    """SGD on a synthetic click label; returns the last loss."""
    from torchrec_hps.workload import zipf_kjt

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    loss = torch.zeros(())
    for _ in range(steps):
        dense = torch.randn(batch_size, 13)
        kjt = zipf_kjt(samplers, features, batch_size)
        label = (dense[:, 0] + 0.1 * torch.randn(batch_size) > 0).float().unsqueeze(1)
        loss = loss_fn(model(dense, kjt), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if bridge is not None:
            bridge.record(kjt)
            bridge.step_done()
    model.eval()
    return float(loss.detach())


def run_demo(batches: int = 40, batch_size: int = 512, max_rows: int = 200_000, dim: int = 16,
             cache_ratio: float = 0.05, train_steps: int = 200, path: Optional[str] = None, serving=None,
             log: Callable[[str], None] = print) -> Dict:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM

    from torchrec_hps.workload import ZipfKeys, zipf_kjt
    from torchrec_hps.config import (CacheConfig, HPSConfig, MemoryTierConfig, RocksDBTierConfig, StorageConfig,
                                     table_key)
    from torchrec_hps.modules.swap import swap_in_hps

    rows = [min(n, max_rows) for n in CRITEO_ROWS]
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"cat_{i}"])
              for i, n in enumerate(rows)]
    torch.manual_seed(0)
    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables), dense_in_features=13,
                 dense_arch_layer_sizes=[64, dim], over_arch_layer_sizes=[64, 1])
    samplers = [ZipfKeys(n, 1.09, seed=i) for i, n in enumerate(rows)]
    features = [t.feature_names[0] for t in tables]
    inputs = [(torch.randn(batch_size, 13), zipf_kjt(samplers, features, batch_size)) for _ in range(batches)]
    kafka = serving.kafka if serving is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        if serving is not None:
            config = copy.deepcopy(serving.hps)
            config.cache = CacheConfig(cache_ratio=cache_ratio, hit_rate_threshold=1.0)
        else:
            config = HPSConfig(model="demo_dlrm", cache=CacheConfig(cache_ratio=cache_ratio, hit_rate_threshold=1.0),
                               storage=StorageConfig(memory=MemoryTierConfig(capacity=20_000),
                                                     rocksdb=RocksDBTierConfig(path=path or f"{tmp}/rocksdb")))
        t0 = time.perf_counter()
        consumer = None
        if kafka is None:
            loss = _train(model, samplers, features, train_steps, 256)
            log(f"trained {train_steps} steps (loss {loss:.3f}) in {time.perf_counter() - t0:.1f}s")
            reference = copy.deepcopy(model)
            t0 = time.perf_counter()
            served, storage = swap_in_hps(model, config)
        else:
            from torchrec_hps.train_bridge import DeltaPublisher, EBCDeltaPublisher, UpdateConsumer

            served, storage = swap_in_hps(copy.deepcopy(model), config)
            names = [t.name for t in tables]
            consumer = UpdateConsumer(kafka, config.model, storage, names,
                                      modules=[served.sparse_arch.embedding_bag_collection]).start()
            bridge = EBCDeltaPublisher(model.sparse_arch.embedding_bag_collection,
                                       DeltaPublisher(kafka, config.model, names))
            loss = _train(model, samplers, features, train_steps, 256, bridge=bridge)
            bridge.publish_pending()
            deadline = time.monotonic() + 120
            while consumer.lag() > 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            log(f"trained {train_steps} steps (loss {loss:.3f}) with the train bridge on; the serving node applied "
                f"{consumer.stats.applied_rows:,} updated rows")
            # dense layers are redeployed as usual; the embeddings arrived through Kafka
            served.load_state_dict({k: v for k, v in model.state_dict().items() if "embedding_bags" not in k},
                                   strict=False)
            reference = model
        model = served
        log(f"loaded {sum(rows):,} rows of {len(rows)} tables into {', '.join(storage.tier_names)}; "
            f"cache: {cache_ratio:.0%} of each table")
        hps = model.sparse_arch.embedding_bag_collection
        max_err = 0.0
        with torch.no_grad():
            for dense, kjt in inputs:
                max_err = max(max_err, float((model(dense, kjt) - reference(dense, kjt)).abs().max()))
        stats = hps.stats()
        storage_stats = storage.stats()
        if consumer is not None:
            consumer.stop()
        hps.close()
        storage.close()
    ids = sum(stats[t.name]["ids"] for t in tables)
    hits = sum(stats[t.name]["hits"] for t in tables)
    served: Dict[str, int] = {}
    for t in tables:
        for tier, n in storage_stats[table_key(config.model, t.name)]["served_by"].items():
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
    log(f"equality with the trained TorchRec model: max |diff| = {max_err:.3g} -> {'OK' if ok else 'MISMATCH'}")
    return {"hit_rate": hits / ids, "served_by": served, "max_abs_diff": max_err, "ok": ok,
            "p50_ms": m["p50_ms"], "p99_ms": m["p99_ms"]}
