"""Update-path benchmark against a real broker: applied rows/s of one consumer (memory + RocksDB tiers and
an HPS module cache), and publish-to-visible latency: from the trainer's publish() to the inference module
returning the new row, at a steady trickle of updates."""
from __future__ import annotations

import tempfile
import time
import uuid
from typing import Callable, Dict

import numpy as np
import torch


def run_update_bench(bootstrap: str, rows: int = 200_000, dim: int = 128, rounds: int = 100,
                     interval_s: float = 0.02, commit_interval: float = 1.0,
                     log: Callable[[str], None] = print) -> Dict[str, float]:
    """`commit_interval` as KafkaConfig's: 0 commits every batch after logged RocksDB writes."""
    from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

    from torchrec_hps.config import (CacheConfig, HPSConfig, KafkaConfig, MemoryTierConfig, RocksDBTierConfig,
                                     StorageConfig, TableSpec)
    from torchrec_hps.modules import HPSEmbeddingBagCollection
    from torchrec_hps.storage import StorageHierarchy
    from torchrec_hps.train_bridge import DeltaPublisher, UpdateConsumer

    model = f"bench_{uuid.uuid4().hex[:8]}"
    kafka = KafkaConfig(bootstrap_servers=bootstrap, poll_timeout=0.05, commit_interval=commit_interval)
    tables = [EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=rows, feature_names=["f"])]
    with tempfile.TemporaryDirectory() as tmp:
        storage = StorageHierarchy.from_config(StorageConfig(memory=MemoryTierConfig(capacity=rows // 10),
                                                             rocksdb=RocksDBTierConfig(path=f"{tmp}/db")))
        storage.add_tables([TableSpec(model, "t", rows, dim)])
        hps = HPSEmbeddingBagCollection(tables, HPSConfig(model, CacheConfig(cache_ratio=0.1, hit_rate_threshold=1.0)),
                                        storage=storage)
        pub = DeltaPublisher(kafka, model, ["t"])
        # 1) throughput: publish everything first, then time one consumer draining it
        data = torch.randn(rows, dim)
        t0 = time.perf_counter()
        for lo in range(0, rows, 20_000):
            pub.publish("t", torch.arange(lo, min(lo + 20_000, rows)), data[lo:lo + 20_000])
        pub.flush()
        publish_s = time.perf_counter() - t0
        consumer = UpdateConsumer(kafka, model, storage, ["t"], modules=[hps], group_id=f"{model}-a")
        t0 = time.perf_counter()
        first_at, first_rows = 0.0, 0  # after the first applied batch: the group join (0.2-1 s here) is behind
        while consumer.stats.applied_rows < rows and time.perf_counter() - t0 < 300:
            consumer.poll_once(max_messages=2000)
            if not first_at and consumer.stats.applied_rows:
                first_at, first_rows = time.perf_counter(), consumer.stats.applied_rows
        consumer.commit()  # durable and committed: the flush of unlogged rows is part of the cost
        end = time.perf_counter()
        apply_s = end - t0
        applied = consumer.stats.applied_rows
        steady = (applied - first_rows) / max(end - first_at, 1e-9)
        log(f"published {rows:,} rows of {dim * 4} B in {publish_s:.2f}s ({rows / publish_s / 1e3:.0f}K rows/s); "
            f"one consumer applied {applied:,} in {apply_s:.2f}s ({applied / apply_s / 1e3:.0f}K rows/s with its "
            f"group join; {steady / 1e3:.0f}K rows/s after its first batch)")
        consumer.start()  # 2) latency: a background consumer, one probe id updated every interval
        probe = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([7]), lengths=torch.tensor([1]))
        lat = []
        for r in range(rounds):
            value = float(10_000 + r)
            t0 = time.perf_counter()
            pub.publish("t", torch.tensor([7]), torch.full((1, dim), value))
            pub.flush()
            while time.perf_counter() - t0 < 10:
                with torch.no_grad():
                    if float(hps(probe).values()[0, 0]) == value:
                        break
                time.sleep(0.0005)
            lat.append(time.perf_counter() - t0)
            time.sleep(interval_s)
        consumer.stop()
        hps.close()
        storage.close()
    lat_ms = np.asarray(lat) * 1e3
    result = {"commit_interval": commit_interval, "rows": rows, "row_bytes": dim * 4, "publish_rows_per_s": rows / publish_s,
              "applied_rows_per_s": applied / apply_s, "steady_rows_per_s": steady, "latency_p50_ms": float(np.percentile(lat_ms, 50)),
              "latency_p99_ms": float(np.percentile(lat_ms, 99)), "rounds": rounds}
    log(f"publish-to-visible latency over {rounds} updates: p50 {result['latency_p50_ms']:.1f} ms, "
        f"p99 {result['latency_p99_ms']:.1f} ms")
    return result
