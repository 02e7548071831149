"""Memory tier: eviction order per policy, resolution target, and lock-free reads under concurrent writes."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from torchrec_hps.config import MemoryTierConfig, TableSpec
from torchrec_hps.storage import MemoryTier

SPEC = TableSpec("m", "t", 1000, 4)


def _tier(**kw) -> MemoryTier:
    tier = MemoryTier(MemoryTierConfig(num_partitions=1, **kw))
    tier.add_table(SPEC)
    return tier


def _present(tier, keys) -> list:
    # read through the key->slot map, so that checking does not touch LRU/LFU state
    t = tier._tables[SPEC.key]
    keys = np.asarray(list(keys), dtype=np.int64)
    return [int(k) for k in keys[t.slots_of(keys) >= 0]]


def _put(tier, keys):
    keys = torch.as_tensor(keys)
    tier.put(SPEC.key, keys, keys.float().unsqueeze(1).repeat(1, 4))


def test_lru_evicts_least_recently_used():
    tier = _tier(capacity=10, overflow_policy="evict_lru", resolution_target=1.0)
    _put(tier, range(10))
    tier.get(SPEC.key, torch.arange(5))  # 0..4 are now the most recent
    _put(tier, range(10, 15))
    assert _present(tier, range(15)) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    assert tier.stats()[SPEC.key]["evictions"] == 5


def test_lfu_evicts_least_frequently_used_even_if_recent():
    tier = _tier(capacity=10, overflow_policy="evict_lfu", resolution_target=1.0)
    _put(tier, range(10))
    for _ in range(3):
        tier.get(SPEC.key, torch.arange(5, 10))
    tier.get(SPEC.key, torch.arange(5))  # recent but rarer
    _put(tier, range(10, 15))
    assert _present(tier, range(15)) == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]


def test_random_eviction_and_resolution_target():
    tier = _tier(capacity=10, overflow_policy="evict_random", resolution_target=0.5)
    _put(tier, range(10))
    _put(tier, [10])
    # evicts down to 50% of capacity to make room: 6 of the 10 go, the new row stays
    assert tier.num_rows(SPEC.key) == 5
    assert 10 in _present(tier, range(11))
    assert tier.stats()[SPEC.key]["evictions"] == 6


def test_lru_resolution_target_evicts_in_bulk():
    tier = _tier(capacity=10, overflow_policy="evict_lru", resolution_target=0.8)
    _put(tier, range(10))
    tier.get(SPEC.key, torch.arange(3, 10))
    _put(tier, [10])
    assert _present(tier, range(11)) == [3, 4, 5, 6, 7, 8, 9, 10]


def test_more_new_rows_than_capacity_keeps_the_last():
    tier = _tier(capacity=10)
    _put(tier, range(25))
    assert _present(tier, range(25)) == list(range(15, 25))
    rows, found = tier.get(SPEC.key, torch.arange(15, 25))
    assert found.all() and torch.equal(rows[:, 0], torch.arange(15, 25).float())


@pytest.mark.parametrize("num_partitions", [1, 4])
def test_whole_table_fits_with_any_partition_count(num_partitions):
    tier = MemoryTier(MemoryTierConfig(num_partitions=num_partitions))
    tier.add_table(SPEC)
    _put(tier, range(SPEC.num_rows))
    assert tier.num_rows(SPEC.key) == SPEC.num_rows


def test_concurrent_readers_never_see_torn_or_foreign_rows():
    """Writers keep overwriting and evicting (row value = key * 1000 + version) while readers check that
    every row they get is whole and belongs to the key they asked for."""
    spec = TableSpec("m", "big", 20_000, 32)
    tier = MemoryTier(MemoryTierConfig(capacity=5_000, num_partitions=4))
    tier.add_table(spec)
    stop = threading.Event()
    problems = []

    def writer(seed):
        rng = np.random.default_rng(seed)
        for version in range(1, 150):
            keys = torch.from_numpy(rng.choice(spec.num_rows, 2000, replace=False))
            rows = (keys.double() * 1000 + version).float().unsqueeze(1).repeat(1, spec.dim)
            tier.put(spec.key, keys, rows)
        stop.set()

    def reader(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            keys = torch.from_numpy(rng.integers(0, spec.num_rows, 4000))
            rows, found = tier.get(spec.key, keys)
            r = rows[found].double()
            k = keys[found].double()
            if not torch.equal(r.min(1).values, r.max(1).values):
                problems.append("torn row")
            if not torch.equal(torch.floor(r[:, 0] / 1000), k):
                problems.append("row of another key")

    threads = [threading.Thread(target=writer, args=(1,))] + [threading.Thread(target=reader, args=(s,)) for s in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not problems, problems[:5]
    assert tier.stats()[spec.key]["evictions"] > 0


@pytest.mark.parametrize("num_rows", [1_000, 10_000_000, 1_000_000_000, (1 << 63) - 1])
def test_index_memory_follows_the_rows_held_not_the_id_space(num_rows):
    """Up to 4 table rows per cached row a dense map (<= 16 B per cached row); beyond, a hash index whose
    bytes per cached row do not depend on the table's size (64-bit hashed ids too); lookups stay exact."""
    spec = TableSpec("m", "big", num_rows=num_rows, dim=4)
    tier = MemoryTier(MemoryTierConfig(capacity=1000, num_partitions=4))
    tier.add_table(spec)
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, num_rows, 3000))
    tier.put(spec.key, torch.from_numpy(keys), torch.from_numpy(keys).float().unsqueeze(1).repeat(1, 4))
    per_row = tier.index_bytes(spec.key) / tier.capacity(spec.key)
    assert per_row <= 40, per_row
    held = keys[tier._tables[spec.key].slots_of(keys) >= 0]
    assert tier.num_rows(spec.key) == len(held) <= tier.capacity(spec.key)
    rows, found = tier.get(spec.key, torch.from_numpy(keys))
    assert found.sum() == len(held)
    torch.testing.assert_close(rows[found][:, 0], torch.from_numpy(keys)[found].float())
    tier.delete(spec.key, torch.from_numpy(held[:100]))
    assert not tier.get(spec.key, torch.from_numpy(held[:100]))[1].any()
