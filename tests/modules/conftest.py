"""Module fixtures: TorchRec reference EBCs and HPS modules over real tiers (memory + RocksDB by default)."""
from __future__ import annotations

from typing import List, Optional

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, RocksDBTierConfig, StorageConfig
from torchrec_hps.modules import HPSEmbeddingBagCollection
from torchrec_hps.storage import StorageHierarchy, bulk_load

TABLES = [
    EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=200, feature_names=["f1", "f3"]),
    EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=60, feature_names=["f2"], pooling=PoolingType.MEAN),
    EmbeddingBagConfig(name="t3", embedding_dim=16, num_embeddings=500, feature_names=["f4"]),
]

SUM_TABLES = [EmbeddingBagConfig(name=t.name, embedding_dim=t.embedding_dim, num_embeddings=t.num_embeddings,
                                 feature_names=t.feature_names) for t in TABLES]


def random_kjt(tables: List[EmbeddingBagConfig], batch: int, max_len: int = 5, gen: Optional[torch.Generator] = None,
               weighted: bool = False, order: Optional[List[str]] = None) -> KeyedJaggedTensor:
    feats = [(f, t.num_embeddings) for t in tables for f in t.feature_names]
    if order is not None:
        feats = sorted(feats, key=lambda x: order.index(x[0]))
    lengths, values = [], []
    for _, rows in feats:
        ln = torch.randint(0, max_len + 1, (batch,), generator=gen)
        lengths.append(ln)
        values.append(torch.randint(0, rows, (int(ln.sum()),), generator=gen))
    values_t = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
    weights = torch.rand(values_t.numel(), generator=gen) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=[f for f, _ in feats], values=values_t,
                                               lengths=torch.cat(lengths), weights=weights)


@pytest.fixture
def make_hps(tmp_path, namespace):
    made = []

    def factory(tables=TABLES, cache: Optional[CacheConfig] = None, weighted: bool = False, memory: bool = True,
                model: Optional[str] = None, storage: Optional[StorageHierarchy] = None, load: bool = True):
        ref = EmbeddingBagCollection(tables=tables, is_weighted=weighted)
        if storage is None:
            storage = StorageHierarchy.from_config(StorageConfig(
                memory=MemoryTierConfig(capacity=64) if memory else None,
                rocksdb=RocksDBTierConfig(path=str(tmp_path / f"rocksdb{len(made)}"))))
        name = model or namespace
        if load:
            bulk_load(storage.tiers[-1:], name, ref, progress=False)  # the full copy in the bottom tier
        cfg = HPSConfig(model=name, cache=cache or CacheConfig(min_cache_rows=1, cache_ratio=0.1, hit_rate_threshold=1.0))
        hps = HPSEmbeddingBagCollection(tables, cfg, storage=storage, is_weighted=weighted)
        made.append((hps, storage))
        return ref, hps

    yield factory
    closed = set()
    for hps, storage in made:
        hps.close()
        if id(storage) not in closed:
            closed.add(id(storage))
            storage.close()
