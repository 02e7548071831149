"""The lookup path (cache/lookup_path.py) on CPU: on CUDA it runs as a graph of Triton kernels, here their
torch twins run the same computation, so its checks, padding, counters, the miss path's re-run and the
HBM level's admission are exercised in CI (HBM_LEVEL_ON_CPU builds the HBM level in host memory). The GPU
run of the same path is tests/gpu."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, RocksDBTierConfig, StorageConfig
from torchrec_hps.modules import HPSEmbeddingBagCollection
from torchrec_hps.modules.cache import cache_group
from torchrec_hps.modules.cache.layout import ADMISSION, FLAG_INVALID, FLAG_LAYOUT, FLAG_MISS, NO_ROW, RESERVED_SLOTS
from torchrec_hps.storage import StorageHierarchy
from tests.modules.conftest import SUM_TABLES, TABLES, random_kjt


def _cache(ratio, **kw):
    return CacheConfig(cache_ratio=ratio, min_cache_rows=1, hit_rate_threshold=1.0, **kw)


def _group(hps):
    (group,) = hps.engine.groups
    return group


@pytest.mark.parametrize("weighted", [False, True])
def test_all_hit_lookups_equal_torchrec_and_count_ids(make_hps, weighted):
    ref, hps = make_hps(SUM_TABLES, cache=_cache(1.0), weighted=weighted)
    group = _group(hps)
    for t in SUM_TABLES:
        hps.prefill(t.name, torch.arange(t.num_embeddings))
    gen = torch.Generator().manual_seed(0)
    n_ids = 0
    for batch in (8, 8, 3, 40):
        kjt = random_kjt(SUM_TABLES, batch, gen=gen, weighted=weighted)
        n_ids += kjt.values().numel()
        torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
    assert group.path.runs == 4 and group.path.reruns == 0
    stats = hps.stats()
    assert sum(stats[t.name]["ids"] for t in SUM_TABLES) == n_ids
    assert all(stats[t.name]["hits"] == stats[t.name]["ids"] for t in SUM_TABLES)


def test_int32_inputs_and_empty_batch(make_hps):
    ref, hps = make_hps(SUM_TABLES, cache=_cache(1.0))
    group = _group(hps)
    for t in SUM_TABLES:
        hps.prefill(t.name, torch.arange(t.num_embeddings))
    kjt = random_kjt(SUM_TABLES, 16, gen=torch.Generator().manual_seed(1))
    kjt32 = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().int(), lengths=kjt.lengths().int())
    torch.testing.assert_close(hps(kjt32).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
    empty = random_kjt(SUM_TABLES, 4, max_len=0)
    assert hps(empty).values().abs().sum() == 0 and hps(empty).values().shape == (4, 36)
    assert group.path.reruns == 0


def test_misses_run_again_once_and_are_then_served(make_hps):
    ref, hps = make_hps(SUM_TABLES, cache=_cache(0.5))
    group = _group(hps)
    kjt = random_kjt(SUM_TABLES, 16, gen=torch.Generator().manual_seed(2))
    torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
    assert group.path.reruns == 1
    torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
    assert group.path.reruns == 1  # the rows fetched on the miss now hit
    s = hps.stats()
    n = kjt.values().numel()
    assert sum(s[t.name]["ids"] for t in SUM_TABLES) == 2 * n  # the re-run is not counted again
    assert 0 < sum(s[t.name]["misses"] for t in SUM_TABLES) <= n


def _flags_of(group, values, lengths, tick):
    _, flags, _ = group.path.run(torch.tensor(values), torch.tensor(lengths), None, tick=tick, count=True,
                                 allow_invalid=False)
    return flags


def test_flags_name_each_bad_input_and_nothing_is_counted(make_hps):
    ref, hps = make_hps(SUM_TABLES, cache=_cache(1.0))
    group = _group(hps)
    for t in SUM_TABLES:
        hps.prefill(t.name, torch.arange(t.num_embeddings))
    ids_before = int(group.totals[0].sum())
    # features f1, f3 (t1, 200 rows), f2 (t2, 60), f4 (t3, 500); batch 1
    assert _flags_of(group, [1, 2, 3, 4], [1, 1, 1, 1], 100) == 0
    assert _flags_of(group, [1, 2, 60, 4], [1, 1, 1, 1], 101) == FLAG_INVALID  # f2's table has 60 rows
    assert _flags_of(group, [1, 2, 3, -1], [1, 1, 1, 1], 102) == FLAG_INVALID
    assert _flags_of(group, [1, 2, 3, 4], [1, 1, 1, 2], 103) == FLAG_LAYOUT  # lengths add up to 5, 4 ids
    assert _flags_of(group, [1, 2, 3, 4], [3, -1, 1, 1], 104) == FLAG_LAYOUT
    assert _flags_of(group, [1, 2, 3], [1, 1, 1, 1], 105) & FLAG_LAYOUT
    assert int(group.totals[0].sum()) == ids_before + 4  # only the one good lookup counted
    hps.invalidate("t3", [4])
    assert _flags_of(group, [1, 2, 3, 4], [1, 1, 1, 1], 106) == FLAG_MISS


def test_bad_inputs_still_get_the_checked_paths_errors(make_hps):
    ref, hps = make_hps(SUM_TABLES, cache=_cache(1.0))
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
    assert _group(hps).host_rows.rows[0].dtype == torch.float16


def check_hbm_level(group) -> int:
    """The HBM level's invariants; returns how many rows it holds. Each HBM row is tagged with the host entry
    it copies, that entry points back at it, and the bytes equal the host row's."""
    hbm, index, host = group.hbm, group.index, group.host_rows
    tags = hbm.tags.long()
    held = torch.nonzero(tags >= 0).view(-1)
    assert torch.equal(hbm.rows_of(tags[held]), held), "a tag and its entry's way disagree"
    pointed = torch.nonzero(hbm.way_of_host >= 0).view(-1)
    assert torch.equal(torch.sort(tags[hbm.rows_of(pointed)]).values, torch.sort(pointed).values)
    assert bool((index.keys[tags[held]] >= 0).all()), "an HBM row copies an entry the host level dropped"
    table = torch.searchsorted(index.entry_base, tags[held], right=True) - 1
    lay = host.layout
    for r, e, t in zip(held.tolist(), tags[held].tolist(), table.tolist()):
        start = int(lay.word_offset[t]) + (RESERVED_SLOTS + e - int(index.entry_base[t])) * int(lay.row_words[t])
        n = int(lay.row_words[t])
        assert torch.equal(hbm.row_words[r, :n], lay.words[start:start + n]), f"HBM row {r} is not entry {e}'s row"
    return held.numel()


@pytest.mark.parametrize("admission", ["always", "second_access", "never"])
@pytest.mark.parametrize("ratio", [0.01, 0.1])
def test_hbm_level_admits_consistently(make_hps, monkeypatch, admission, ratio):
    monkeypatch.setattr(cache_group, "HBM_LEVEL_ON_CPU", True)
    ref, hps = make_hps(TABLES, cache=_cache(ratio, host_cache_ratio=0.4, admission=admission))
    gen = torch.Generator().manual_seed(5)
    for step in range(6):
        kjt = random_kjt(TABLES, 24, gen=gen)
        torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
        held = sum(check_hbm_level(g) for g in hps.engine.groups)
        if step == 0 and admission == "second_access":
            assert held == 0  # every row was read once so far
    if admission == "never":
        assert held == 0
    else:
        assert held > 0
        assert sum(hps.stats()[t.name]["hits"] for t in TABLES) > 0  # ids served from HBM
    hps.update("t1", torch.tensor([0, 1, 2, 3]), torch.full((4, 8), 7.0))
    for g in hps.engine.groups:
        check_hbm_level(g)  # updates reach the HBM copies


def test_hbm_rows_left_by_the_host_level_are_dropped(make_hps, monkeypatch):
    monkeypatch.setattr(cache_group, "HBM_LEVEL_ON_CPU", True)
    ref, hps = make_hps(SUM_TABLES, cache=_cache(0.1, host_cache_ratio=0.1))  # host level = HBM size
    gen = torch.Generator().manual_seed(6)
    for _ in range(8):  # the host level evicts: its HBM copies must go with it
        kjt = random_kjt(SUM_TABLES, 32, gen=gen)
        torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
        check_hbm_level(_group(hps))
    assert sum(hps.stats()[t.name]["evicted"] for t in SUM_TABLES) > 0
    hps.invalidate("t3", torch.arange(500))
    assert check_hbm_level(_group(hps)) >= 0 and len(hps.cached_keys("t3")) == 0


@pytest.mark.parametrize("ratio", [0.1, 1.0])
def test_an_hbm_level_holding_the_whole_host_level_is_written_on_insert(make_hps, monkeypatch, ratio):
    """HBM with a row for every host entry: inserts copy into both levels, lookups admit nothing (no sort,
    select or copy), and every id the host level holds is served from HBM."""
    monkeypatch.setattr(cache_group, "HBM_LEVEL_ON_CPU", True)
    ref, hps = make_hps(SUM_TABLES, cache=_cache(ratio, host_cache_ratio=ratio))
    group = _group(hps)
    assert group.hbm.direct and group.probe_tables.admission == ADMISSION["never"]
    gen = torch.Generator().manual_seed(8)

    def served():
        st = hps.stats()
        return (sum(st[t.name]["ids"] for t in SUM_TABLES), sum(st[t.name]["hits"] for t in SUM_TABLES))

    for _ in range(8):
        kjt = random_kjt(SUM_TABLES, 64, gen=gen)
        torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
        assert check_hbm_level(group) == int((group.index.keys >= 0).sum())  # every host entry, no more
        ids0, hits0 = served()
        torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
        ids1, hits1 = served()
        held = sum(int(np.isin(kjt[f].values().numpy(), hps.cached_keys(t.name)).sum())
                   for t in SUM_TABLES for f in t.feature_names)
        assert ids1 - ids0 == kjt.values().numel() and hits1 - hits0 == held  # every held id from HBM
        if ratio == 1.0:
            assert held == kjt.values().numel()
    if ratio < 1.0:
        assert sum(hps.stats()[t.name]["evicted"] for t in SUM_TABLES) > 0  # the HBM rows went with them
    hps.update("t3", torch.tensor([0, 1, 2]), torch.full((3, SUM_TABLES[-1].embedding_dim), 5.0))
    check_hbm_level(group)


def test_hashed_ids(tmp_path, namespace):
    """Raw 64-bit hashes as ids: num_embeddings only sizes the cache, the index holds any id >= 0."""
    tables = [EmbeddingBagConfig(name="h", embedding_dim=8, num_embeddings=1000, feature_names=["fh"])]
    # the memory tier holds hashed ids too (its index is sized by its rows, not the id space)
    storage = StorageHierarchy.from_config(StorageConfig(memory=MemoryTierConfig(capacity=100),
                                                         rocksdb=RocksDBTierConfig(path=str(tmp_path / "db"))))
    cfg = HPSConfig(model=namespace, cache=CacheConfig(cache_rows=64, min_cache_rows=1, hit_rate_threshold=1.0,
                                                       hashed_ids=True))
    hps = HPSEmbeddingBagCollection(tables, cfg, storage=storage)
    gen = torch.Generator().manual_seed(7)
    ids = torch.unique(torch.randint(0, 2**62, (300,), generator=gen) * 2 + 1)  # odd, up to 2^63-1
    rows = torch.randn(len(ids), 8, generator=gen)
    storage.put(hps.engine.specs[0].key, ids, rows)
    row_of = dict(zip(ids.tolist(), rows))
    try:
        for _ in range(4):
            pick = ids[torch.randint(0, len(ids), (40,), generator=gen)]
            lookup = torch.cat([pick, torch.tensor([2, 4])])  # two even ids: in no tier
            lengths = torch.tensor([2] * 21)
            out = hps(KeyedJaggedTensor(keys=["fh"], values=lookup, lengths=lengths)).values()
            want = torch.stack([sum((row_of.get(int(k), torch.zeros(8)) for k in lookup[2 * b:2 * b + 2]),
                                    torch.zeros(8)) for b in range(21)])
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert hps.stats()["h"]["not_found"] == 2
        with pytest.raises(ValueError, match="out of range"):
            hps(KeyedJaggedTensor(keys=["fh"], values=torch.tensor([-5]), lengths=torch.tensor([1])))
    finally:
        hps.close()
        storage.close()


def test_index_memory_scales_with_cached_rows_not_table_rows(tmp_path, namespace):
    storage = StorageHierarchy.from_config(StorageConfig(rocksdb=RocksDBTierConfig(path=str(tmp_path / "db"))))
    sizes = {}
    for rows in (10_000_000, 100_000_000, 1_000_000_000):
        tables = [EmbeddingBagConfig(name=f"r{rows}", embedding_dim=16, num_embeddings=rows, feature_names=[f"f{rows}"])]
        cfg = HPSConfig(model=namespace, cache=CacheConfig(cache_rows=65536, hit_rate_threshold=1.0))
        hps = HPSEmbeddingBagCollection(tables, cfg, storage=storage)
        (group,) = hps.engine.groups
        sizes[rows] = group.index_bytes() / group.capacities[0]
        hps.close()
    storage.close()
    assert len(set(sizes.values())) == 1 and sizes[10_000_000] <= 16, sizes


@pytest.mark.parametrize("lfu", [False, True])
def test_both_levels_index_costs_at_most_16_bytes_per_host_row(lfu):
    """The device index of a GPU group (host index + HBM level at 10% of it), for a table of 1M rows, LRU
    and LFU; the HBM level is built on the CPU here, as the group builds it on CUDA."""
    from torchrec_hps.modules.cache.hbm_level import HBMLevel
    from torchrec_hps.modules.cache.set_index import SetIndex

    index = SetIndex([1_000_000], torch.device("cpu"), lfu=lfu)
    hbm = HBMLevel(index.num_entries // 10, 16, index.ticks, torch.device("cpu"))
    per_row = (index.num_entries * index.bytes_per_entry() + hbm.index_bytes()) / index.num_entries
    assert per_row <= 16, f"{per_row:.2f} bytes of index per host-level row"


def test_set_index_evicts_least_recently_used_and_spares_the_protected():
    from torchrec_hps.modules.cache.layout import WAYS
    from torchrec_hps.modules.cache.set_index import SetIndex

    index = SetIndex([WAYS], torch.device("cpu"), lfu=False)  # one set
    t = torch.zeros(WAYS, dtype=torch.int64)
    entries, evicted, _ = index.insert(t, torch.arange(WAYS), tick=1, protect_tick=1)
    assert bool((entries >= 0).all()) and evicted.numel() == 0
    index.ticks[entries] = torch.arange(WAYS, dtype=torch.int32) + 10  # id k last used at 10 + k
    index.ticks[entries[0]] = 50  # id 0 used in the current lookup (tick 50): protected
    new, evicted, evicted_ids = index.insert(torch.zeros(3, dtype=torch.int64), torch.tensor([100, 101, 102]),
                                             tick=50, protect_tick=50)
    assert sorted(evicted_ids.tolist()) == [1, 2, 3]  # the least recently used, not the protected id 0
    assert torch.equal(torch.sort(index.find(t[:4], torch.tensor([0, 100, 101, 102]))).values >= 0,
                       torch.ones(4, dtype=torch.bool))
    # a set whose every way was used by this lookup takes nothing
    index.ticks[:] = 60
    full, _, _ = index.insert(torch.zeros(1, dtype=torch.int64), torch.tensor([200]), tick=60, protect_tick=60)
    assert int(full[0]) == -1 and int(index.find(t[:1], torch.tensor([200]))[0]) == -1
    assert NO_ROW == -1 and np.all(index.keys.numpy() != 200)


@pytest.mark.parametrize("two_levels", [False, True])
def test_prefetch_brings_the_rows_in_and_the_lookup_stays_exact(make_hps, monkeypatch, two_levels):
    monkeypatch.setattr(cache_group, "HBM_LEVEL_ON_CPU", two_levels)
    # the host level holds every row (an id whose set is full is served uncached, and would miss again);
    # the HBM level 30%
    ref, hps = make_hps(TABLES, cache=_cache(0.3 if two_levels else 1.0, host_cache_ratio=1.0))
    gen = torch.Generator().manual_seed(9)
    n_ids = 0
    for step in range(5):
        kjt = random_kjt(TABLES, 24, gen=gen)
        n_ids += kjt.values().numel()
        hps.prefetch(kjt)
        groups = hps.engine.groups
        reruns = [g.path.reruns for g in groups]
        if step == 2:  # an update between the prefetch and the lookup is served, not the prefetched row
            ref.embedding_bags["t1"].weight.data[:5] = 3.0
            hps.update("t1", torch.arange(5), torch.full((5, 8), 3.0))
        torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
        assert [g.path.reruns for g in groups] == reruns  # the prefetch fetched every miss already
        if two_levels:
            for g in groups:
                check_hbm_level(g)
    s = hps.stats()
    assert sum(s[t.name]["ids"] for t in TABLES) == n_ids  # each batch counted once (at its prefetch)
    assert sum(g.prefetches for g in hps.engine.groups) == 5 * len(hps.engine.groups)
    other = random_kjt(TABLES, 24, gen=gen)  # a lookup of another batch than the prefetched one is exact too
    hps.prefetch(random_kjt(TABLES, 24, gen=gen))
    torch.testing.assert_close(hps(other).values(), ref(other).values().detach(), rtol=1e-5, atol=1e-5)


def test_lfu_counts_one_use_per_lookup_and_saturates():
    """The LFU count is a byte: the lookups that used an entry (ids repeated within one lookup count once),
    held at 255 rather than wrapping to 0 (a wrapped count would make the hottest entry the first victim)."""
    from torchrec_hps.modules.cache.layout import WAYS
    from torchrec_hps.modules.cache.probe_kernel import ProbeOut, ProbeTables, probe_torch
    from torchrec_hps.modules.cache.set_index import SetIndex

    index = SetIndex([WAYS], torch.device("cpu"), lfu=True)
    entries, _, _ = index.insert(torch.zeros(2, dtype=torch.int64), torch.tensor([3, 5]), tick=1, protect_tick=1)
    one = torch.zeros(1, dtype=torch.int64)
    tables = ProbeTables(feature_rows=torch.tensor([100, 0]), feature_set_base=one.repeat(2),
                         feature_n_sets=torch.ones(2, dtype=torch.int64), feature_entry_base=one.repeat(2),
                         feature_direct=torch.zeros(2, dtype=torch.bool), keys=index.keys, ticks=index.ticks,
                         freq=index.freq, hbm_way=None)
    values = torch.tensor([3, 3, 3, 5])

    def lookup(tick: int) -> None:
        i32 = lambda: torch.zeros(4, dtype=torch.int32)  # noqa: E731
        out = ProbeOut(i32(), i32(), i32(), i32(), torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                       torch.zeros(4, 1, dtype=torch.int64))
        probe_torch(values, torch.tensor([4, tick]), torch.tensor([4]), tables, out)

    lookup(2)
    assert index.freq[entries].tolist() == [2, 2]  # inserted (1), then one lookup, id 3 three times in it
    for tick in range(3, 303):
        lookup(tick)
    assert index.freq.dtype == torch.uint8 and index.freq[entries].tolist() == [255, 255]
