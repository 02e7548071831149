"""The all-hit path (cache/cuda_graph.py) on CPU: on CUDA it runs as a graph, here its eager twin runs the
same computation, so its checks, sentinel padding, masked counters and fallbacks are exercised in CI.
The GPU run of the same path is tests/gpu."""
from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from torchrec_hps.config import CacheConfig
from torchrec_hps.modules.cache.cuda_graph import FLAG_INVALID, FLAG_LAYOUT, FLAG_MISS, AllHitPath
from tests.modules.conftest import SUM_TABLES, random_kjt


def _with_all_hit_path(hps):
    """Route the CPU engine through the all-hit path, as a CUDA engine is."""
    engine = hps.engine
    (group,) = engine.groups
    group.all_hit = AllHitPath(group, use_graphs=False)
    engine._fast_group = group
    return group


def _cache(ratio):
    return CacheConfig(cache_ratio=ratio, min_cache_rows=1, hit_rate_threshold=1.0)


@pytest.mark.parametrize("weighted", [False, True])
def test_all_hit_lookups_equal_torchrec_and_count_ids(make_hps, weighted):
    ref, hps = make_hps(SUM_TABLES, cache=_cache(1.0), weighted=weighted)
    group = _with_all_hit_path(hps)
    for t in SUM_TABLES:
        hps.prefill(t.name, torch.arange(t.num_embeddings))
    gen = torch.Generator().manual_seed(0)
    n_ids = 0
    for batch in (8, 8, 3, 40):
        kjt = random_kjt(SUM_TABLES, batch, gen=gen, weighted=weighted)
        n_ids += kjt.values().numel()
        torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
    assert group.all_hit.served == 4 and group.all_hit.fallbacks == 0
    stats = hps.stats()
    assert sum(stats[t.name]["ids"] for t in SUM_TABLES) == n_ids
    assert all(stats[t.name]["hits"] == stats[t.name]["ids"] for t in SUM_TABLES)


def test_int32_inputs_and_empty_batch(make_hps):
    ref, hps = make_hps(SUM_TABLES, cache=_cache(1.0))
    group = _with_all_hit_path(hps)
    for t in SUM_TABLES:
        hps.prefill(t.name, torch.arange(t.num_embeddings))
    kjt = random_kjt(SUM_TABLES, 16, gen=torch.Generator().manual_seed(1))
    kjt32 = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().int(), lengths=kjt.lengths().int())
    torch.testing.assert_close(hps(kjt32).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
    empty = random_kjt(SUM_TABLES, 4, max_len=0)
    assert hps(empty).values().abs().sum() == 0 and hps(empty).values().shape == (4, 36)
    assert group.all_hit.fallbacks == 0


def test_misses_fall_back_and_are_then_served(make_hps):
    ref, hps = make_hps(SUM_TABLES, cache=_cache(0.5))
    group = _with_all_hit_path(hps)
    kjt = random_kjt(SUM_TABLES, 16, gen=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
    assert group.all_hit.fallbacks == 1 and group.all_hit.served == 0
    torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
    assert group.all_hit.served == 1  # the rows fetched on the miss now hit
    s = hps.stats()
    n = kjt.values().numel()
    assert sum(s[t.name]["ids"] for t in SUM_TABLES) == 2 * n  # the fallback counted once, not twice
    assert sum(s[t.name]["misses"] for t in SUM_TABLES) > 0


def _flags_of(group, values, lengths):
    _, flags, _ = group.all_hit.lookup(torch.tensor(values), torch.tensor(lengths), None, tick=1)
    return flags


def test_flags_name_each_bad_input_and_nothing_is_counted(make_hps):
    ref, hps = make_hps(SUM_TABLES, cache=_cache(1.0))
    group = _with_all_hit_path(hps)
    for t in SUM_TABLES:
        hps.prefill(t.name, torch.arange(t.num_embeddings))
    ids_before = int(group._ids.sum())
    # features f1, f3 (t1, 200 rows), f2 (t2, 60), f4 (t3, 500); batch 1
    assert _flags_of(group, [1, 2, 3, 4], [1, 1, 1, 1]) == 0
    assert _flags_of(group, [1, 2, 60, 4], [1, 1, 1, 1]) == FLAG_INVALID  # f2's table has 60 rows
    assert _flags_of(group, [1, 2, 3, -1], [1, 1, 1, 1]) == FLAG_INVALID
    assert _flags_of(group, [1, 2, 3, 4], [1, 1, 1, 2]) == FLAG_LAYOUT  # lengths add up to 5, 4 ids
    assert _flags_of(group, [1, 2, 3, 4], [3, -1, 1, 1]) == FLAG_LAYOUT
    assert _flags_of(group, [1, 2, 3], [1, 1, 1, 1]) & FLAG_LAYOUT
    assert int(group._ids.sum()) == ids_before + 4  # only the one good lookup counted
    hps.invalidate("t3", [4])
    assert _flags_of(group, [1, 2, 3, 4], [1, 1, 1, 1]) == FLAG_MISS


def test_bad_inputs_still_get_the_checked_paths_errors(make_hps):
    ref, hps = make_hps(SUM_TABLES, cache=_cache(1.0))
    _with_all_hit_path(hps)
    keys = ["f1", "f3", "f2", "f4"]
    with pytest.raises(ValueError, match=r"feature 'f2' \(table 't2'\): id 60 is out of range"):
        hps(KeyedJaggedTensor(keys=keys, values=torch.tensor([1, 2, 60, 4]), lengths=torch.tensor([1, 1, 1, 1])))
    with pytest.raises(ValueError, match="negative bag length"):
        hps(KeyedJaggedTensor(keys=keys, values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([3, -1, 1, 1])))
    with pytest.raises(ValueError, match="lengths add up to 5 ids but values has 4"):
        hps(KeyedJaggedTensor(keys=keys, values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 2])))
    # a KJT in another feature order takes the checked path (one permute) and gives the same answer
    kjt = random_kjt(SUM_TABLES, 8, gen=torch.Generator().manual_seed(3), order=["f4", "f2", "f3", "f1"])
    torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)


def test_fp16_cached_rows(make_hps):
    ref, hps = make_hps(SUM_TABLES, cache=CacheConfig(cache_ratio=0.5, min_cache_rows=1, hit_rate_threshold=1.0,
                                                      cache_dtype="fp16"))
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        kjt = random_kjt(SUM_TABLES, 16, gen=gen)
        out = hps(kjt).values()
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref(kjt).values().detach(), rtol=2e-3, atol=2e-3)
    assert hps.engine.groups[0].weights[0].dtype == torch.float16
