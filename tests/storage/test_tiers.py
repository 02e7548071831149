"""Round trips and input checks, the same for every tier (memory, Redis, Redis Cluster, RocksDB)."""
from __future__ import annotations

import time

import pytest
import torch

from torchrec_hps.config import TableSpec
from torchrec_hps.storage import TierError
from tests.storage.conftest import TIER_KINDS


def test_round_trip_missing_and_duplicates(tier, spec):
    tier.add_table(spec)
    keys = torch.randperm(spec.num_rows)[:3000]
    rows = torch.randn(3000, spec.dim)
    tier.put(spec.key, keys, rows)
    assert tier.num_rows(spec.key) == 3000
    absent = torch.tensor(sorted(set(range(spec.num_rows)) - set(keys.tolist()))[:5])
    query = torch.cat([keys[:100], absent, keys[:10]])  # hits, misses, repeated keys
    got, found = tier.get(spec.key, query)
    assert found.tolist() == [True] * 100 + [False] * 5 + [True] * 10
    torch.testing.assert_close(got[:100], rows[:100], rtol=0, atol=0)
    torch.testing.assert_close(got[105:], rows[:10], rtol=0, atol=0)
    assert torch.count_nonzero(got[100:105]) == 0
    s = tier.stats()[spec.key]
    assert (s["hits"], s["misses"]) == (110, 5)


def test_overwrite_last_write_wins_and_delete(tier, spec):
    tier.add_table(spec)
    keys = torch.tensor([5, 7, 5])
    rows = torch.randn(3, spec.dim)
    tier.put(spec.key, keys, rows)
    got, found = tier.get(spec.key, torch.tensor([5, 7]))
    assert found.all()
    torch.testing.assert_close(got, rows[[2, 1]], rtol=0, atol=0)
    tier.delete(spec.key, torch.tensor([5, 9]))
    got, found = tier.get(spec.key, torch.tensor([5, 7]))
    assert found.tolist() == [False, True]
    assert tier.num_rows(spec.key) == 1


def test_empty_batches(tier, spec):
    tier.add_table(spec)
    tier.put(spec.key, torch.empty(0, dtype=torch.int64), torch.empty(0, spec.dim))
    got, found = tier.get(spec.key, torch.empty(0, dtype=torch.int64))
    assert got.shape == (0, spec.dim) and found.shape == (0,)


@pytest.mark.parametrize("kind", TIER_KINDS)
def test_float16_storage(kind, tier_factory, spec):
    tier = tier_factory(kind, storage_dtype="float16")
    tier.add_table(spec)
    rows = torch.randn(50, spec.dim)
    tier.put(spec.key, torch.arange(50), rows)
    got, found = tier.get(spec.key, torch.arange(50))
    assert found.all() and got.dtype == torch.float32
    torch.testing.assert_close(got, rows.half().float(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", TIER_KINDS)
def test_two_models_share_a_tier_by_namespace(kind, tier_factory, namespace):
    tier = tier_factory(kind)
    a, b = TableSpec(f"{namespace}_a", "t", 100, 8), TableSpec(f"{namespace}_b", "t", 100, 8)
    tier.add_tables([a, b])
    tier.put(a.key, torch.arange(10), torch.ones(10, 8))
    tier.put(b.key, torch.arange(10), torch.full((10, 8), 2.0))
    assert tier.get(a.key, torch.arange(10))[0].eq(1).all()
    assert tier.get(b.key, torch.arange(10))[0].eq(2).all()
    tier.delete(a.key, torch.arange(10))
    assert not tier.get(a.key, torch.arange(10))[1].any()
    assert tier.get(b.key, torch.arange(10))[1].all()


def test_bad_input_names_table_and_expectation(tier, spec):
    tier.add_table(spec)
    tier.put(spec.key, torch.arange(4), torch.ones(4, spec.dim))
    cases = [
        (lambda: tier.get("nope.t", torch.arange(3)), "unknown table 'nope.t'"),
        (lambda: tier.get(spec.key, torch.arange(3, dtype=torch.int32)), "1-D int64"),
        (lambda: tier.get(spec.key, torch.zeros(2, 2, dtype=torch.int64)), "1-D int64"),
        (lambda: tier.get(spec.key, torch.tensor([1, -3])), "key -3 is out of range"),
        (lambda: tier.get(spec.key, torch.tensor([spec.num_rows])), f"key {spec.num_rows} is out of range"),
        (lambda: tier.put(spec.key, torch.arange(2), torch.ones(2, spec.dim + 1)), f"[2, {spec.dim}]"),
        (lambda: tier.put(spec.key, torch.arange(2), torch.ones(3, spec.dim)), f"[2, {spec.dim}]"),
        (lambda: tier.put(spec.key, torch.arange(2), torch.ones(2, spec.dim, dtype=torch.float64)), "float32 or float16"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as info:
            call()
        assert message in str(info.value)
        assert spec.key in str(info.value) or "nope.t" in str(info.value)
    # nothing was lost or changed by the rejected calls
    got, found = tier.get(spec.key, torch.arange(4))
    assert found.all() and got.eq(1).all() and tier.num_rows(spec.key) == 4


def test_conflicting_table_registration(tier, spec):
    tier.add_table(spec)
    tier.add_table(spec)  # same spec again: fine
    with pytest.raises(ValueError, match="already registered"):
        tier.add_table(TableSpec(spec.model, spec.name, spec.num_rows, spec.dim * 2))


def test_rocksdb_unwritable_path_fails_at_start(tmp_path):
    from torchrec_hps.config import RocksDBTierConfig
    from torchrec_hps.storage import RocksDBTier

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(TierError, match=str(blocker / "db")):
        RocksDBTier(RocksDBTierConfig(path=str(blocker / "db")))


def test_rocksdb_flush_and_persist_move_every_table_out_of_its_memtable(tmp_path, spec):
    """`flush()` and `persist(table)` reach the tables' own column families (rocksdict's flush covers one:
    the database's flushed only the default family, which holds no rows); unlogged rows survive a reopen
    once persisted."""
    from torchrec_hps.config import RocksDBTierConfig
    from torchrec_hps.storage import RocksDBTier

    other = TableSpec(spec.model, "other", 100, spec.dim)
    tier = RocksDBTier(RocksDBTierConfig(path=str(tmp_path / "db")))
    for s in (spec, other):
        tier.add_table(s)
        tier.put(s.key, torch.arange(10), torch.ones(10, s.dim), logged=False)
    level0 = lambda s: tier._cfs[s.key].property_int_value("rocksdb.num-files-at-level0")  # noqa: E731
    assert level0(spec) == 0 and level0(other) == 0  # all in the memtables
    tier.flush()
    assert level0(spec) == 1 and level0(other) == 1
    tier.put(spec.key, torch.arange(10, 20), torch.full((10, spec.dim), 2.0), logged=False)
    tier.persist(spec.key, wait=False)
    deadline = time.monotonic() + 30
    while not tier.persisted(spec.key) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tier.persisted(spec.key) and level0(spec) == 2
    tier.close()
    tier = RocksDBTier(RocksDBTierConfig(path=str(tmp_path / "db")))
    tier.add_table(spec)
    rows, found = tier.get(spec.key, torch.arange(20))
    assert found.all() and rows[10:].eq(2.0).all()
    tier.close()


def test_rocksdb_read_only_shares_a_volume(tmp_path, spec):
    from torchrec_hps.config import RocksDBTierConfig
    from torchrec_hps.storage import RocksDBTier

    writer = RocksDBTier(RocksDBTierConfig(path=str(tmp_path / "db")))
    writer.add_table(spec)
    writer.put(spec.key, torch.arange(10), torch.ones(10, spec.dim))
    writer.close()
    reader = RocksDBTier(RocksDBTierConfig(path=str(tmp_path / "db"), read_only=True))
    reader.add_table(spec)
    assert reader.get(spec.key, torch.arange(10))[1].all()
    with pytest.raises(Exception):
        reader.put(spec.key, torch.arange(2), torch.ones(2, spec.dim))
    with pytest.raises(TierError, match="no column family"):
        reader.add_table(TableSpec(spec.model, "other", 10, 4))
    reader.close()


def test_redis_rows_spread_over_all_cluster_nodes(tier_factory, spec):
    tier = tier_factory("redis_cluster")
    tier.add_table(spec)
    owners = {tier._owner(name) for name in tier.hash_names(spec)}
    assert len(owners) == 3, f"partitions of one table landed on {owners}"


def test_redis_unreachable_at_start_is_a_clear_error():
    from torchrec_hps.config import RedisTierConfig
    from torchrec_hps.storage import RedisTier

    with pytest.raises(TierError, match="127.0.0.1:1"):
        RedisTier(RedisTierConfig(url="redis://127.0.0.1:1"))
    with pytest.raises(TierError, match="no startup node"):
        RedisTier(RedisTierConfig(cluster_nodes=["127.0.0.1:1"]))
