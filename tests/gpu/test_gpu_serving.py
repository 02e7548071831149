"""The serving node on CUDA: one GPU worker per GPU (every visible GPU; the lent machine has 1, the test is
written for N) beside CPU workers, queries routed by size, the GPU worker's prefetch pipeline on, scores
equal to the TorchRec model's own forward."""
from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest
import torch

from tests.serving.conftest import ARCH, DENSE, TABLES, expected_scores, grpc_infer, make_dlrm, random_query

pytestmark = pytest.mark.gpu


def test_gpu_and_cpu_workers_serve_exact_scores(tmp_path, namespace):
    from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, RocksDBTierConfig, StorageConfig
    from torchrec_hps.serving import (InferenceServer, ModelRepository, SchedulerConfig, ServedModelConfig,
                                      ServerConfig)
    from torchrec_hps.serving.node import gpu_devices
    from torchrec_hps.storage import StorageHierarchy

    model = make_dlrm(seed=2)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    storage_cfg = StorageConfig(memory=MemoryTierConfig(capacity=200), rocksdb=RocksDBTierConfig(path=str(tmp_path / "db")))
    storage = StorageHierarchy.from_config(storage_cfg)
    gpus = gpu_devices(None)
    assert gpus, "no GPU visible"
    repo = ModelRepository(storage, HPSConfig(model=namespace, cache=CacheConfig(
        cache_ratio=0.1, min_cache_rows=1, hit_rate_threshold=1.0), storage=storage_cfg), devices=gpus + ["cpu"])
    repo.load(ServedModelConfig(name=namespace, path=str(tmp_path / "m.pt"), dense_in_features=DENSE, **ARCH), TABLES)
    server = InferenceServer(ServerConfig(http_port=0, grpc_port=0, scheduler=SchedulerConfig(
        batch_size=8, offload_threshold=16, cpu_workers=2, prefetch_min_batch=1)), repo, gpu_devices=gpus).start()
    try:
        gen = np.random.default_rng(0)
        queries = [random_query(int(n), gen) for n in gen.integers(1, 64, size=200)]
        target = f"127.0.0.1:{server.grpc_port}"
        with cf.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda q: grpc_infer(target, namespace, q), queries))
        for q, got in zip(queries, results):
            np.testing.assert_allclose(got, expected_scores(model, q), rtol=1e-4, atol=1e-5)
        stats = server.scheduler.stats()
        assert stats["gpu_queries"] > 0 and stats["cpu_queries"] > 0
        gpu_workers = [w for w in server.scheduler.workers if w.kind == "gpu"]
        assert len(gpu_workers) == len(gpus) and all(w.batches > 0 for w in gpu_workers)
        assert sum(w.prefetched for w in gpu_workers) > 0  # the pipeline ran
    finally:
        server.stop()
        storage.close()
