"""HPSEmbeddingBagCollection against TorchRec's EmbeddingBagCollection with the same weights."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchrec import KeyedJaggedTensor

from torchrec_hps.config import CacheConfig
from tests.modules.conftest import SUM_TABLES, TABLES, random_kjt


def _assert_same(out, ref):
    assert out.keys() == ref.keys()
    assert out.length_per_key() == ref.length_per_key()
    torch.testing.assert_close(out.values(), ref.values().detach(), rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 24), ratio=st.sampled_from([0.02, 0.1, 0.5, 1.0]),
       eviction=st.sampled_from(["lru", "lfu"]), weighted=st.booleans(), shuffle=st.booleans())
def test_equals_torchrec_in_sync_mode(make_hps, seed, batch, ratio, eviction, weighted, shuffle):
    tables = SUM_TABLES if weighted else TABLES  # TorchRec pools weighted features with SUM only
    ref, hps = make_hps(tables=tables, cache=CacheConfig(min_cache_rows=1, cache_ratio=ratio, hit_rate_threshold=1.0,
                                                         eviction=eviction), weighted=weighted)
    gen = torch.Generator().manual_seed(seed)
    order = ["f4", "f2", "f1", "f3"] if shuffle else None
    for _ in range(3):  # repeated lookups: hits, misses, evictions and oversized batches all happen
        kjt = random_kjt(tables, batch, gen=gen, weighted=weighted, order=order)
        _assert_same(hps(kjt), ref(kjt))


def test_cache_far_smaller_than_tables_evicts_and_counts(make_hps):
    ref, hps = make_hps(cache=CacheConfig(min_cache_rows=1, cache_ratio=0.05, hit_rate_threshold=1.0))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        kjt = random_kjt(TABLES, 4, max_len=2, gen=gen)
        _assert_same(hps(kjt), ref(kjt))
    s = hps.stats()
    assert s["t3"]["capacity"] == 32 and s["t3"]["cached_rows"] <= 32  # 25 rows, rounded up to 2 sets of 16
    assert s["t3"]["evicted"] > 0 and s["t3"]["hits"] > 0 and s["t3"]["misses"] > 0
    assert s["t3"]["hits"] + s["t3"]["misses"] == s["t3"]["ids"] > 0
    assert 0 < s["t3"]["unique_misses"] <= s["t3"]["misses"]
    assert s["_module"]["calls"] == 20 and s["_module"]["p99_ms"] >= s["_module"]["p50_ms"] > 0


def _kjt(feature_ids):
    """One bag per feature, batch 1: {feature: [ids]} in TABLES' feature order."""
    feats = ["f1", "f3", "f2", "f4"]
    vals = [feature_ids.get(f, []) for f in feats]
    return KeyedJaggedTensor.from_lengths_sync(keys=feats, values=torch.tensor(sum(vals, []), dtype=torch.int64),
                                               lengths=torch.tensor([len(v) for v in vals]))


def test_lru_eviction_order(make_hps):
    # 16 rows = one set of 16 ways: the 17th id evicts the least recently used
    ref, hps = make_hps(cache=CacheConfig(cache_rows=16, hit_rate_threshold=1.0, eviction="lru"))
    for ids in [[k] for k in range(16)] + [[0], [16]]:  # 1 is the least recently used when 16 arrives
        hps(_kjt({"f4": ids}))
    assert hps.cached_keys("t3").tolist() == [0] + list(range(2, 17))


def test_lfu_eviction_order(make_hps):
    ref, hps = make_hps(cache=CacheConfig(cache_rows=16, hit_rate_threshold=1.0, eviction="lfu"))
    for ids in [[k] for k in range(16)] + [[k] for k in range(1, 16)] + [[16]]:  # 0 is used least often
        hps(_kjt({"f4": ids}))
    assert hps.cached_keys("t3").tolist() == list(range(1, 17))


def test_async_mode_serves_defaults_then_cached_rows(make_hps):
    ref, hps = make_hps(cache=CacheConfig(min_cache_rows=1, cache_ratio=1.0, hit_rate_threshold=0.0, default_value=0.5))
    kjt = random_kjt(TABLES, 8, gen=torch.Generator().manual_seed(3))
    first = hps(kjt).to_dict()
    # every id missed: the lookup did not wait, each bag of n ids pooled n default vectors
    lengths = kjt.lengths().view(4, 8)
    torch.testing.assert_close(first["f4"], 0.5 * lengths[3].float().unsqueeze(1).expand(8, 16))
    hps.wait_idle()
    _assert_same(hps(kjt), ref(kjt))
    s = hps.stats()["t3"]
    assert s["async_lookups"] >= 1 and s["defaulted_async"] > 0 and s["sync_lookups"] == 0
    assert s["inserted"] == s["defaulted_async"]


def test_threshold_picks_the_mode_per_lookup(make_hps):
    ref, hps = make_hps(cache=CacheConfig(min_cache_rows=1, cache_ratio=1.0, hit_rate_threshold=0.6))
    hps.prefill("t3", list(range(10)))
    hps(_kjt({"f4": list(range(10)) + [11]}))  # 10 of 11 hit: >= 0.6 -> async
    hps.wait_idle()
    hps(_kjt({"f4": [20, 21, 22, 1]}))  # 1 of 4 hits: < 0.6 -> sync
    s = hps.stats()["t3"]
    assert (s["async_lookups"], s["sync_lookups"]) == (1, 1)


def test_ids_in_no_tier_get_the_default_vector(make_hps, tmp_path):
    ref, hps = make_hps(cache=CacheConfig(min_cache_rows=1, cache_ratio=0.5, hit_rate_threshold=1.0, default_value=-1.0), load=False)
    out = hps(_kjt({"f4": [5, 6]})).to_dict()["f4"]
    torch.testing.assert_close(out, torch.full((1, 16), -2.0))
    hps(_kjt({"f4": [5]}))  # known absent now: not asked of the tiers again
    s = hps.stats()["t3"]
    assert s["not_found"] == 2
    assert s["storage"]["keys"] == 2


def test_unknown_ids_error_or_default(make_hps):
    ref, hps = make_hps()
    with pytest.raises(ValueError, match=r"feature 'f4' \(table 't3'\): id 500 is out of range; expected 0 <= id < 500"):
        hps(_kjt({"f4": [1, 500]}))
    with pytest.raises(ValueError, match=r"feature 'f2' \(table 't2'\): id -1"):
        hps(_kjt({"f2": [-1]}))
    ref2, hps2 = make_hps(cache=CacheConfig(min_cache_rows=1, cache_ratio=0.5, hit_rate_threshold=1.0, unknown_keys="default",
                                            default_value=2.0), model="other")
    out = hps2(_kjt({"f4": [1, 500]})).to_dict()["f4"]
    w = ref2.embedding_bags["t3"].weight.detach()
    torch.testing.assert_close(out, (w[1] + 2.0).unsqueeze(0))
    assert hps2.stats()["_module"]["unknown_ids"] == 1


def _with_float_lengths(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    bad = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=kjt.weights_or_none())
    bad._lengths = bad._lengths.float()
    return bad


def test_bad_inputs_name_what_is_wrong(make_hps):
    ref, hps = make_hps(tables=SUM_TABLES, weighted=True)
    good = random_kjt(SUM_TABLES, 2, gen=torch.Generator().manual_seed(1), weighted=True)
    cases = [
        (KeyedJaggedTensor.from_lengths_sync(keys=["f1", "f2", "f3", "f4", "zz"], values=torch.tensor([1]),
                                             lengths=torch.tensor([1, 0, 0, 0, 0]), weights=torch.ones(1)),
         r"features \['zz'\] are not in the module's tables"),
        (KeyedJaggedTensor.from_lengths_sync(keys=["f1", "f2", "f3"], values=torch.tensor([1]),
                                             lengths=torch.tensor([1, 0, 0]), weights=torch.ones(1)),
         r"features \['f4'\] are missing"),
        (KeyedJaggedTensor(keys=good.keys(), values=good.values().float(), lengths=good.lengths(),
                           weights=good.weights()), "ids must be int32 or int64"),
        (KeyedJaggedTensor(keys=good.keys(), values=good.values()[:-1], lengths=good.lengths(),
                           weights=good.weights()[:-1]), "lengths add up to"),
        (KeyedJaggedTensor(keys=good.keys(), values=good.values(), lengths=good.lengths()),
         "has no weights"),
        (KeyedJaggedTensor(keys=good.keys(), values=torch.tensor([1, 2]),
                           lengths=torch.tensor([3, -1, 0, 0, 0, 0, 0, 0]), weights=torch.ones(2)),
         "feature 'f1': negative bag length"),
        # float lengths (torchrec 1.6's constructor asserts on them; a KJT built another way, e.g. from a
        # request, can carry them) used to reach repeat_interleave (NotImplementedError)
        (_with_float_lengths(good), r"lengths must be int32 or int64, got torch.float32"),
        # a repeated key used to be reported as another feature "missing"
        (KeyedJaggedTensor.from_lengths_sync(keys=["f1", "f2", "f3", "f3"], values=torch.tensor([1]),
                                             lengths=torch.tensor([1, 0, 0, 0]), weights=torch.ones(1)),
         r"input features repeat: \['f3'\]"),
    ]
    for kjt, message in cases:
        with pytest.raises(ValueError, match=message):
            hps(kjt)
    _assert_same(hps(good), ref(good))  # the module still works after rejected inputs


def test_empty_batch_and_empty_bags(make_hps):
    ref, hps = make_hps()
    empty = KeyedJaggedTensor.from_lengths_sync(keys=["f1", "f3", "f2", "f4"], values=torch.empty(0, dtype=torch.int64),
                                                lengths=torch.zeros(8, dtype=torch.int64))
    out = hps(empty)
    assert out.values().shape == (2, 8 + 8 + 4 + 16) and out.values().eq(0).all()
    _assert_same(out, ref(empty))
    no_batch = KeyedJaggedTensor.from_lengths_sync(keys=["f1", "f3", "f2", "f4"],
                                                   values=torch.empty(0, dtype=torch.int64),
                                                   lengths=torch.empty(0, dtype=torch.int64))
    assert hps(no_batch).values().shape == (0, 36)


def test_update_invalidate_prefill_refresh(make_hps):
    ref, hps = make_hps(cache=CacheConfig(min_cache_rows=1, cache_ratio=0.2, hit_rate_threshold=1.0))
    assert hps.prefill("t3", [9, 8, 7]) == 3
    assert hps.cached_keys("t3").tolist() == [7, 8, 9]
    new = torch.full((2, 16), 7.0)
    assert hps.update("t3", [8, 100], new) == 1  # 8 cached, 100 not
    assert hps(_kjt({"f4": [8]})).to_dict()["f4"].eq(7.0).all()
    hps.refresh("t3")  # the tiers still hold the trained row: refresh brings it back
    w = ref.embedding_bags["t3"].weight.detach()
    torch.testing.assert_close(hps(_kjt({"f4": [8]})).to_dict()["f4"][0], w[8])
    hps.invalidate("t3", [8, 9])
    assert hps.cached_keys("t3").tolist() == [7]
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        hps.invalidate("nope", [1])
    with pytest.raises(ValueError, match=r"table 't3': id 999"):
        hps.update("t3", [999], torch.zeros(1, 16))
    with pytest.raises(ValueError, match=r"rows must have shape \[1, 16\]"):
        hps.update("t3", [1], torch.zeros(1, 8))


def test_prefill_hottest_first_from_counts(make_hps):
    ref, hps = make_hps(cache=CacheConfig(cache_rows=16, hit_rate_threshold=1.0))  # one set of 16 ways
    counts = torch.zeros(500)
    hot = torch.arange(20) * 7 + 3
    counts[hot] = torch.arange(20, 0, -1).float()  # hottest first
    assert hps.prefill_from_counts("t3", counts) == 16
    assert hps.cached_keys("t3").tolist() == sorted(hot[:16].tolist())
    with pytest.raises(ValueError, match="counts must be 1-D with 500 entries"):
        hps.prefill_from_counts("t3", torch.zeros(10))


def test_two_models_share_one_hierarchy_by_namespace(make_hps, namespace, tmp_path):
    from torchrec_hps.config import RocksDBTierConfig, StorageConfig
    from torchrec_hps.storage import StorageHierarchy

    shared = StorageHierarchy.from_config(StorageConfig(rocksdb=RocksDBTierConfig(path=str(tmp_path / "shared"))))
    ref_a, hps_a = make_hps(model=f"{namespace}_a", storage=shared)
    ref_b, hps_b = make_hps(model=f"{namespace}_b", storage=shared)
    kjt = random_kjt(TABLES, 4, gen=torch.Generator().manual_seed(5))
    _assert_same(hps_a(kjt), ref_a(kjt))
    _assert_same(hps_b(kjt), ref_b(kjt))
    assert not torch.equal(hps_a(kjt).values(), hps_b(kjt).values())


def test_weighted_mean_tables_are_rejected(make_hps):
    with pytest.raises(ValueError, match="table 't2': weighted features need SUM pooling"):
        make_hps(weighted=True)


def test_small_tables_are_cached_whole():
    cfg = CacheConfig(cache_ratio=0.01, min_cache_rows=1024)
    assert (cfg.rows_for(7), cfg.rows_for(5000), cfg.rows_for(1_000_000)) == (7, 1024, 10_000)
    assert CacheConfig(cache_rows=3).rows_for(100) == 3


def test_config_errors():
    with pytest.raises(ValueError, match=r"cache.eviction='fifo' is not allowed; expected one of \['lru', 'lfu'\]"):
        CacheConfig(eviction="fifo")
    with pytest.raises(ValueError, match="hit_rate_threshold"):
        CacheConfig(hit_rate_threshold=1.5)


def test_periodic_refresh_rereads_cached_rows(make_hps):
    """cache.refresh_interval (HugeCTR's refresh_interval): rows changed in the tiers behind the module's
    back (no update call, no Kafka) reach lookups within an interval or so."""
    import time

    ref, hps = make_hps(cache=CacheConfig(cache_ratio=1.0, min_cache_rows=1, hit_rate_threshold=1.0,
                                          refresh_interval=0.1))
    kjt = _kjt({"f4": [7]})
    before = hps(kjt).to_dict()["f4"][0]
    hps.engine.storage.put(hps.engine.specs[2].key, torch.tensor([7]), torch.full((1, 16), 5.0))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not bool(hps(kjt).to_dict()["f4"][0].eq(5.0).all()):
        time.sleep(0.05)
    assert bool(hps(kjt).to_dict()["f4"][0].eq(5.0).all()) and not bool(before.eq(5.0).all())
    assert hps.engine.specs[2].name == "t3"
