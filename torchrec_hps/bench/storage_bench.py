"""Storage benchmark: rows/s of batched `get` per tier on Zipf keys, next to a naive client baseline
measured in the same run on the same batches:
- memory: a Python dict of rows and np.stack (the per-key structure HPS avoids);
- redis / redis_cluster: redis-py MGET of one string key per row (the same rows, loaded as plain keys);
- rocksdb: rocksdict multi-get of the batch's key list, as given, from the same column family.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from torchrec_hps.workload import ZipfKeys
from torchrec_hps.config import MemoryTierConfig, RedisTierConfig, RocksDBTierConfig, TableSpec
from torchrec_hps.storage import MemoryTier, RedisTier, RocksDBTier, StorageTier


@dataclass
class StorageBenchResult:
    tier: str
    batch: int
    ours_rows_per_s: float
    naive_rows_per_s: float
    unique_share: float  # distinct keys / keys in a batch

    @property
    def ratio(self) -> float:
        return self.ours_rows_per_s / self.naive_rows_per_s


def _rate(fn: Callable[[np.ndarray], object], batches: Sequence[np.ndarray], min_seconds: float) -> float:
    fn(batches[0])  # warm up
    n, t0, i = 0, time.perf_counter(), 0
    while True:
        fn(batches[i % len(batches)])
        n += len(batches[i % len(batches)])
        i += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds and i >= len(batches):
            return n / dt


def _naive_memory(spec: TableSpec, rows: np.ndarray):
    table = {int(k): rows[k] for k in range(spec.num_rows)}
    return lambda keys: np.stack([table[k] for k in keys.tolist()])


def _naive_redis(tier: RedisTier, spec: TableSpec, rows: np.ndarray, chunk: int = 20000):
    import redis
    from redis.cluster import ClusterNode, RedisCluster

    if tier.is_cluster:
        client = RedisCluster(startup_nodes=[ClusterNode(*a.rsplit(":", 1)) for a in tier.config.cluster_nodes])
        # keys share a hash tag per 1/64 of the ids, so MGET chunks stay on one slot per request
        name = lambda k: f"naive.{spec.key}.{{{k % 64}}}.{k}"  # noqa: E731
    else:
        client = redis.Redis.from_url(tier.config.url)
        name = lambda k: f"naive.{spec.key}.{k}"  # noqa: E731
    for lo in range(0, spec.num_rows, chunk):
        pipe = client.pipeline(transaction=False)
        for k in range(lo, min(lo + chunk, spec.num_rows)):
            pipe.set(name(k), rows[k].tobytes())
        pipe.execute()
    if tier.is_cluster:
        fetch = lambda keys: client.mget_nonatomic([name(k) for k in keys.tolist()])  # noqa: E731
    else:
        fetch = lambda keys: client.mget([name(k) for k in keys.tolist()])  # noqa: E731

    def cleanup():
        for lo in range(0, spec.num_rows, chunk):
            pipe = client.pipeline(transaction=False)
            for k in range(lo, min(lo + chunk, spec.num_rows)):
                pipe.delete(name(k))
            pipe.execute()
        client.close()

    return (lambda keys: np.frombuffer(b"".join(fetch(keys)), dtype=np.float32)), cleanup


def _naive_rocksdb(tier: RocksDBTier, spec: TableSpec):
    cf = tier._cfs[spec.key]
    return lambda keys: [v for v in cf.get([int(k).to_bytes(8, "big") for k in keys.tolist()])]


def run_storage_bench(
    num_rows: int = 500_000,
    dim: int = 128,
    batches: Sequence[int] = (1024, 16384),
    tiers: Sequence[str] = ("memory", "redis", "redis_cluster", "rocksdb"),
    redis_url: Optional[str] = None,
    cluster_nodes: Optional[List[str]] = None,
    rocksdb_path: Optional[str] = None,
    alpha: float = 1.09,
    min_seconds: float = 1.0,
    model: str = "bench",
    log: Callable[[str], None] = print,
) -> List[StorageBenchResult]:
    spec = TableSpec(model, "t", num_rows, dim)
    rows = np.random.default_rng(1).standard_normal((num_rows, dim), dtype=np.float32)
    zipf = ZipfKeys(num_rows, alpha, seed=2)
    key_sets = {b: [zipf.sample(b) for _ in range(max(4, 65536 // b))] for b in batches}
    results: List[StorageBenchResult] = []
    for kind in tiers:
        cleanup = None
        if kind == "memory":
            tier: StorageTier = MemoryTier(MemoryTierConfig())
        elif kind == "redis":
            tier = RedisTier(RedisTierConfig(url=redis_url))
        elif kind == "redis_cluster":
            tier = RedisTier(RedisTierConfig(cluster_nodes=list(cluster_nodes or [])))
        elif kind == "rocksdb":
            tier = RocksDBTier(RocksDBTierConfig(path=rocksdb_path))
        else:
            raise ValueError(f"unknown tier {kind!r}; expected memory, redis, redis_cluster or rocksdb")
        tier.add_table(spec)
        t0 = time.perf_counter()
        for lo in range(0, num_rows, 65536):
            hi = min(lo + 65536, num_rows)
            tier.put(spec.key, torch.arange(lo, hi), torch.from_numpy(rows[lo:hi]))
        log(f"{kind}: loaded {num_rows} rows in {time.perf_counter() - t0:.1f}s")
        if kind == "memory":
            naive = _naive_memory(spec, rows)
        elif kind.startswith("redis"):
            naive, cleanup = _naive_redis(tier, spec, rows)
        else:
            tier.flush()
            naive = _naive_rocksdb(tier, spec)
        ours = lambda keys: tier.get(spec.key, torch.from_numpy(keys))  # noqa: E731
        got, found = ours(key_sets[batches[0]][0])
        assert bool(found.all()) and np.array_equal(got.numpy(), rows[key_sets[batches[0]][0]]), f"{kind}: wrong rows"
        for b in batches:
            sets = key_sets[b]
            r = StorageBenchResult(kind, b, _rate(ours, sets, min_seconds), _rate(naive, sets, min_seconds),
                                   float(np.mean([len(np.unique(k)) / len(k) for k in sets])))
            results.append(r)
            log(f"{kind:14s} B={b:6d}  ours {r.ours_rows_per_s / 1e6:6.2f} Mrows/s  naive "
                f"{r.naive_rows_per_s / 1e6:6.2f} Mrows/s  ratio {r.ratio:5.2f}x  (unique {r.unique_share:.2f})")
        if hasattr(tier, "drop_table") and kind.startswith("redis"):
            tier.drop_table(spec.key)
        if cleanup:
            cleanup()
        tier.close()
    return results


def results_json(results: Sequence[StorageBenchResult], **meta) -> str:
    return json.dumps({"meta": meta, "results": [dict(asdict(r), ratio=r.ratio) for r in results]}, indent=2)


def results_table(results: Sequence[StorageBenchResult]) -> str:
    lines = ["| tier | batch | ours (Mrows/s) | naive client (Mrows/s) | ratio | unique keys/batch |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.tier} | {r.batch} | {r.ours_rows_per_s / 1e6:.2f} | {r.naive_rows_per_s / 1e6:.2f} | "
                     f"{r.ratio:.2f}x | {r.unique_share:.2f} |")
    return "\n".join(lines)
