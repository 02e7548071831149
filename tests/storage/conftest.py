"""Tier fixtures over the real servers: each test gets its own namespace (model name) and cleans up."""
from __future__ import annotations

import pytest

from torchrec_hps.config import MemoryTierConfig, RedisTierConfig, RocksDBTierConfig, TableSpec
from torchrec_hps.storage import MemoryTier, RedisTier, RocksDBTier

TIER_KINDS = ["memory", "redis", "redis_cluster", "rocksdb"]


def make_tier(kind: str, request, tmp_path, **overrides):
    if kind == "memory":
        return MemoryTier(MemoryTierConfig(**overrides))
    if kind == "redis":
        return RedisTier(RedisTierConfig(url=request.getfixturevalue("redis_url"), **overrides))
    if kind == "redis_cluster":
        return RedisTier(RedisTierConfig(cluster_nodes=request.getfixturevalue("cluster_nodes"), **overrides))
    if kind == "rocksdb":
        return RocksDBTier(RocksDBTierConfig(path=str(tmp_path / f"rocksdb-{len(list(tmp_path.iterdir()))}"), **overrides))
    raise AssertionError(kind)


@pytest.fixture
def tier_factory(request, tmp_path):
    made = []

    def factory(kind: str, **overrides):
        tier = make_tier(kind, request, tmp_path, **overrides)
        made.append(tier)
        return tier

    yield factory
    for tier in made:
        if isinstance(tier, RedisTier):
            for table in tier.tables():
                tier.drop_table(table)
        tier.close()


@pytest.fixture(params=TIER_KINDS)
def tier(request, tier_factory):
    return tier_factory(request.param)


@pytest.fixture
def spec(namespace) -> TableSpec:
    return TableSpec(namespace, "t1", num_rows=10_000, dim=16)
