"""The hierarchy over real tiers: order, promotion, write-through, faults, and a property test."""
from __future__ import annotations

import time

import numpy as np
import pytest
import redis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchrec_hps.config import RedisTierConfig, TableSpec
from torchrec_hps.storage import MISSING, RedisTier, StorageHierarchy, TierWriteError


@pytest.fixture
def three_tiers(tier_factory):
    return [tier_factory("memory", capacity=64, num_partitions=2), tier_factory("redis_cluster"), tier_factory("rocksdb")]


def test_highest_tier_wins_and_reports_its_source(three_tiers, spec):
    h = StorageHierarchy(three_tiers)
    h.add_tables([spec])
    mem, red, rocks = three_tiers
    rocks.put(spec.key, torch.arange(6), torch.full((6, spec.dim), 3.0))
    red.put(spec.key, torch.arange(4), torch.full((4, spec.dim), 2.0))
    mem.put(spec.key, torch.arange(2), torch.full((2, spec.dim), 1.0))
    res = h.get(spec.key, torch.arange(8))
    assert res.source.tolist() == [0, 0, 1, 1, 2, 2, MISSING, MISSING]
    assert res.rows[:, 0].tolist() == [1, 1, 2, 2, 3, 3, 0, 0]
    assert res.found.tolist() == [True] * 6 + [False] * 2
    st_ = h.stats()[spec.key]
    assert st_["served_by"] == {"memory": 2, "redis": 2, "rocksdb": 2} and st_["missing"] == 2


def test_rows_found_lower_are_promoted(three_tiers, spec):
    h = StorageHierarchy(three_tiers)
    h.add_tables([spec])
    three_tiers[2].put(spec.key, torch.arange(10), torch.randn(10, spec.dim))
    assert h.get(spec.key, torch.arange(10)).source.eq(2).all()
    assert h.get(spec.key, torch.arange(10)).source.eq(0).all()
    assert three_tiers[1].get(spec.key, torch.arange(10))[1].all()  # copied into Redis too
    assert h.stats()[spec.key]["promoted"] == 20


def test_promotion_is_configurable_per_tier(tier_factory, spec):
    mem = tier_factory("memory", promote=False)
    rocks = tier_factory("rocksdb")
    h = StorageHierarchy([mem, rocks])
    h.add_tables([spec])
    rocks.put(spec.key, torch.arange(3), torch.randn(3, spec.dim))
    h.get(spec.key, torch.arange(3))
    assert h.get(spec.key, torch.arange(3)).source.eq(1).all()
    assert mem.num_rows(spec.key) == 0


def test_put_writes_through_every_tier(three_tiers, spec):
    three_tiers[0].config.update_only_cached = False  # the memory tier takes every put too
    h = StorageHierarchy(three_tiers)
    h.add_tables([spec])
    rows = torch.randn(20, spec.dim)
    h.put(spec.key, torch.arange(20), rows)
    for tier in three_tiers:
        got, found = tier.get(spec.key, torch.arange(20))
        assert found.all(), tier.name
        torch.testing.assert_close(got, rows, rtol=0, atol=0)
    h.delete(spec.key, torch.arange(5))
    for tier in three_tiers:
        assert tier.get(spec.key, torch.arange(5))[1].sum() == 0, tier.name
    assert not h.get(spec.key, torch.arange(5)).found.any()


def test_a_cache_tier_updates_the_rows_it_holds_and_takes_no_others(three_tiers, spec):
    """update_only_cached (the memory tier's default): a put overwrites held rows, inserts none (an update
    stream must not evict the hot rows); the others are read from below, exactly, and promoted when read."""
    memory = three_tiers[0]
    h = StorageHierarchy(three_tiers)
    h.add_tables([spec])
    h.put(spec.key, torch.arange(20), torch.zeros(20, spec.dim))
    assert not memory.get(spec.key, torch.arange(20))[1].any()  # nothing inserted by the put
    h.get(spec.key, torch.arange(5))  # read: promoted into memory
    assert memory.get(spec.key, torch.arange(5))[1].all()
    new = torch.randn(20, spec.dim)
    h.put(spec.key, torch.arange(20), new)
    got, found = memory.get(spec.key, torch.arange(20))
    assert found.tolist() == [True] * 5 + [False] * 15
    torch.testing.assert_close(got[:5], new[:5], rtol=0, atol=0)  # held rows overwritten
    torch.testing.assert_close(h.get(spec.key, torch.arange(20)).rows, new, rtol=0, atol=0)


def test_bad_input_writes_nothing(three_tiers, spec):
    h = StorageHierarchy(three_tiers)
    h.add_tables([spec])
    with pytest.raises(ValueError, match=rf"{spec.key}.*\[3, {spec.dim}\]"):
        h.put(spec.key, torch.arange(3), torch.randn(3, spec.dim + 1))
    with pytest.raises(ValueError, match="out of range"):
        h.put(spec.key, torch.tensor([0, spec.num_rows]), torch.randn(2, spec.dim))
    assert all(t.num_rows(spec.key) == 0 for t in three_tiers)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "delete", "get"]),
                              st.lists(st.integers(0, 39), min_size=1, max_size=12)), min_size=1, max_size=12))
def test_property_hierarchy_returns_what_was_last_put(tier_factory, namespace, ops):
    spec = TableSpec(namespace, f"p{np.random.randint(1 << 30)}", 40, 4)
    tiers = [tier_factory("memory", capacity=8, num_partitions=2), tier_factory("redis"), tier_factory("rocksdb")]
    h = StorageHierarchy(tiers)
    h.add_tables([spec])
    truth = {}
    version = 0
    for op, keys in ops:
        k = torch.tensor(keys)
        if op == "put":
            version += 1
            rows = torch.stack([torch.full((4,), float(key * 100 + version)) for key in keys])
            h.put(spec.key, k, rows)
            truth.update({key: key * 100 + version for key in keys})
        elif op == "delete":
            h.delete(spec.key, k)
            for key in keys:
                truth.pop(key, None)
        res = h.get(spec.key, k)
        assert res.found.tolist() == [key in truth for key in keys]
        assert res.rows[:, 0].tolist() == [float(truth.get(key, 0)) for key in keys]
    for tier in tiers:
        tier.drop_table(spec.key) if hasattr(tier, "drop_table") else None


@pytest.mark.slow
def test_cluster_node_killed_mid_serving_falls_through_then_recovers(servers, tier_factory, spec):
    red = tier_factory("redis_cluster", retry_interval=0.3)
    rocks = tier_factory("rocksdb")
    h = StorageHierarchy([red, rocks])
    h.add_tables([spec])
    truth = torch.randn(spec.num_rows, spec.dim)
    h.put(spec.key, torch.arange(spec.num_rows), truth)
    victim = servers.cluster.nodes[1]
    rng = np.random.default_rng(0)
    try:
        for step in range(60):
            if step == 15:
                victim.kill()
            if step == 40:
                victim.start(fresh=False)
                servers.cluster.wait_ok()
                time.sleep(0.4)  # past retry_interval: the tier tries the node again
            keys = torch.from_numpy(rng.integers(0, spec.num_rows, 512))
            res = h.get(spec.key, keys)
            assert res.found.all(), f"step {step}: keys lost"
            torch.testing.assert_close(res.rows, truth[keys], rtol=0, atol=0)
            if 15 < step < 40:
                assert res.source.eq(1).any(), "keys of the dead node must come from RocksDB"
    finally:
        if not victim.is_up():
            victim.start(fresh=False)
        servers.cluster.wait_ok()
    assert red.stats()[spec.key]["errors"] > 0
    # Back in service: the restarted (empty) node refills by promotion, then Redis serves everything.
    h.get(spec.key, torch.arange(spec.num_rows))
    res = h.get(spec.key, torch.arange(spec.num_rows))
    assert res.source.eq(0).all()
    assert h.pending_invalidations(spec.key) == {"redis": 0, "rocksdb": 0}


@pytest.mark.slow
def test_interrupted_put_never_serves_stale_rows(tier_factory, redis_url, spec):
    """Redis stops taking writes (CLIENT PAUSE WRITE) during a put: it still holds the old rows, yet the
    hierarchy serves only the new ones, and cleans Redis up once it takes writes again."""
    red = tier_factory("redis", socket_timeout=0.3, retry_interval=0.2)
    rocks = tier_factory("rocksdb")
    h = StorageHierarchy([red, rocks])
    h.add_tables([spec])
    keys = torch.arange(100)
    old, new = torch.zeros(100, spec.dim), torch.ones(100, spec.dim)
    h.put(spec.key, keys, old)
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
    t_pause = time.monotonic()
    h.put(spec.key, keys, new)  # Redis times out; RocksDB has the new rows
    assert h.pending_invalidations(spec.key)["redis"] == 100
    observer = RedisTier(RedisTierConfig(url=redis_url))  # reads still work during a write pause
    observer.add_table(spec)
    stale, found = observer.get(spec.key, keys)
    assert found.all() and stale.eq(0).all(), "Redis still holds the old rows"
    observer.close()
    res = h.get(spec.key, keys)
    assert res.rows.eq(1).all() and res.source.eq(1).all()
    time.sleep(max(0.0, 1.7 - (time.monotonic() - t_pause)))
    res = h.get(spec.key, keys)  # pending invalidation goes through, rows are promoted again
    assert res.rows.eq(1).all()
    assert h.pending_invalidations(spec.key)["redis"] == 0
    assert h.get(spec.key, keys).source.eq(0).all()


@pytest.mark.slow
def test_bottom_tier_failure_raises_and_leaves_upper_tiers_untouched(servers, tier_factory, spec):
    mem = tier_factory("memory")
    red = tier_factory("redis")
    h = StorageHierarchy([mem, red])
    h.add_tables([spec])
    h.put(spec.key, torch.arange(5), torch.zeros(5, spec.dim))
    servers.redis.kill()
    try:
        with pytest.raises(TierWriteError, match=spec.key):
            h.put(spec.key, torch.arange(5), torch.ones(5, spec.dim))
        assert mem.get(spec.key, torch.arange(5))[0].eq(0).all()
    finally:
        servers.redis.start(fresh=False)


@pytest.mark.slow
def test_an_outage_logs_once_per_cause_and_interval_and_shows_as_gauges(servers, tier_factory, spec, caplog):
    """Redis killed under 200 gets of new keys: every get falls through to RocksDB and every promotion write
    to Redis fails; the warnings come once per (tier, table, cause) per interval, with how many were held
    back, each failure is still counted, and the metrics show the node down and the pending invalidations."""
    import logging

    from prometheus_client import generate_latest

    from torchrec_hps.metrics import make_registry
    from torchrec_hps.storage import hierarchy as hierarchy_module

    red, rocks = tier_factory("redis"), tier_factory("rocksdb")
    h = StorageHierarchy([red, rocks])
    h.add_tables([spec])
    rocks.put(spec.key, torch.arange(10_000), torch.ones(10_000, spec.dim))
    put_key = ("hierarchy.put", "redis", spec.key)

    def failed_puts() -> int:
        return sum(n for k, n in hierarchy_module._warnings.counts().items() if k[:3] == put_key)

    before = failed_puts()
    servers.redis.kill()
    try:
        with caplog.at_level(logging.WARNING, logger="torchrec_hps.storage"):
            for i in range(200):
                res = h.get(spec.key, torch.arange(i * 50, i * 50 + 50))
                assert res.found.all() and res.rows.eq(1).all()  # served by RocksDB
            text = generate_latest(make_registry(hierarchies=[h])).decode()
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("torchrec_hps.storage")]
        assert len(lines) <= 8, lines  # 200 failed promotions, a handful of lines
        assert failed_puts() - before == 200
        s = red.stats()[spec.key]  # errors count keys asked whose get failed; failed writes apart
        assert 0 < s["errors"] <= s["keys"] == 200 * 50 and s["write_errors"] >= 200 * 50
        assert 'hps_tier_nodes_down{tier="redis"} 1.0' in text
        assert f'hps_pending_invalidations{{model="{spec.model}",table="{spec.name}",tier="redis"}} 10000.0' in text
        assert f'hps_warnings_total{{subject="redis/{spec.key}/' in text
    finally:
        servers.redis.start(fresh=False)
    h.close()


def test_rate_limited_warnings_say_how_many_were_held_back(caplog):
    import logging

    from torchrec_hps.warnings_log import RateLimitedWarnings

    now = [0.0]
    limiter = RateLimitedWarnings(logging.getLogger("torchrec_hps.test"), interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="torchrec_hps.test"):
        for i in range(30):
            now[0] = i * 0.5  # 15 s of one failure every 0.5 s, and one other cause once
            limiter.warn(("a", "x"), "tier %s failed", "x")
        limiter.warn(("a", "y"), "tier %s failed", "y")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["tier x failed", "tier x failed (19 more like this in the last 10 s)", "tier y failed"]
    assert limiter.counts() == {("a", "x"): 30, ("a", "y"): 1}
