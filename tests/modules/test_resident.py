"""Lookups of a group whose every row is held (cache/resident.py): rows read by id, no probe, on the CPU path
(the kernel's torch twin; tests/gpu runs the same on CUDA). Exact output, counters as the probe path
counts them, and the probe path again as soon as a row is gone or an id is bad."""
from __future__ import annotations

import pytest
import torch
from torchrec import KeyedJaggedTensor

from torchrec_hps.config import CacheConfig
from torchrec_hps.modules.cache import cache_group
from tests.modules.conftest import SUM_TABLES, TABLES, random_kjt


def _cache(ratio: float, **kw) -> CacheConfig:
    return CacheConfig(cache_ratio=ratio, host_cache_ratio=ratio, min_cache_rows=1, hit_rate_threshold=1.0, **kw)


def _served(hps, tables):
    st = hps.stats()
    return sum(st[t.name]["ids"] for t in tables), sum(st[t.name]["hits"] for t in tables)


def _resident_runs(group) -> int:
    return sum(1 for key in group.path._shapes if key[4])


@pytest.mark.parametrize("two_levels", [False, True])
@pytest.mark.parametrize("tables", [SUM_TABLES, TABLES], ids=["sum", "sum+mean"])
def test_every_row_held_reads_rows_by_id_and_goes_back_to_the_probe_when_one_is_gone(make_hps, monkeypatch,
                                                                                     two_levels, tables):
    monkeypatch.setattr(cache_group, "HBM_LEVEL_ON_CPU", two_levels)
    ref, hps = make_hps(tables, cache=_cache(1.0))
    groups = hps.engine.groups
    assert all(g.residency.eligible for g in groups) and not any(bool(g.residency) for g in groups)
    for t in tables:
        hps.prefill(t.name, torch.arange(t.num_embeddings))
    assert all(bool(g.residency) for g in groups)
    gen = torch.Generator().manual_seed(0)
    ids0, hits0 = _served(hps, tables)
    n_ids = 0
    for batch in (8, 3, 40):
        kjt = random_kjt(tables, batch, gen=gen)
        n_ids += kjt.values().numel()
        torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
    ids1, hits1 = _served(hps, tables)
    assert ids1 - ids0 == n_ids and hits1 - hits0 == n_ids  # counted as the probe path counts them
    assert sum(int(g.totals[1].sum()) for g in groups) == (0 if two_levels else n_ids)  # not from HBM
    assert all(_resident_runs(g) > 0 and g.path.reruns == 0 for g in groups)
    assert all(len(g.path._shapes) == _resident_runs(g) for g in groups)  # no probe shape was needed

    # a row gone: the probe path serves (the miss path fetches it back), then reads by id again
    hps.invalidate("t1", torch.tensor([5, 7]))
    (g1,) = [g for g in groups if any(s.name == "t1" for s in g.specs)]
    assert not bool(g1.residency)
    keys = [f for t in tables for f in t.feature_names]  # batch of one: f1 = [5, 7], every other feature [1]
    kjt = KeyedJaggedTensor(keys=keys, values=torch.tensor([5, 7] + [1] * (len(keys) - 1)),
                            lengths=torch.tensor([2] + [1] * (len(keys) - 1)))
    torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
    assert g1.path.reruns == 1 and len(g1.path._shapes) > _resident_runs(g1)
    assert bool(g1.residency)  # the miss path put both rows back
    torch.testing.assert_close(hps(kjt).values(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
    assert g1.path.reruns == 1

    # updates reach the rows read by id
    hps.update("t1", torch.tensor([5]), torch.full((1, 8), 3.0))
    assert bool(g1.residency)
    out = hps(kjt).values()
    torch.testing.assert_close(out[0, :8], 3.0 + ref.embedding_bags["t1"].weight[7].detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unknown_keys", ["error", "default"])
def test_a_bad_id_gets_the_probe_paths_answer(make_hps, unknown_keys):
    ref, hps = make_hps(SUM_TABLES, cache=_cache(1.0, unknown_keys=unknown_keys))
    for t in SUM_TABLES:
        hps.prefill(t.name, torch.arange(t.num_embeddings))
    (group,) = hps.engine.groups
    assert bool(group.residency)
    bad = KeyedJaggedTensor(keys=["f1", "f3", "f2", "f4"], values=torch.tensor([1, 2, 60, 4]),
                            lengths=torch.tensor([1, 1, 1, 1]))  # t2 has 60 rows
    ids_before, _ = _served(hps, SUM_TABLES)
    if unknown_keys == "error":
        with pytest.raises(ValueError, match="out of range"):
            hps(bad)
        assert _served(hps, SUM_TABLES)[0] == ids_before  # neither run counted the refused lookup
        return
    out = hps(bad).values()
    assert torch.equal(out[0, 16:20], torch.zeros(4))  # f2's bad id: the default vector
    good = KeyedJaggedTensor(keys=["f1", "f3", "f2", "f4"], values=torch.tensor([1, 2, 4]),
                             lengths=torch.tensor([1, 1, 0, 1]))
    expect = ref(good).values().detach()
    torch.testing.assert_close(out[:, :16], expect[:, :16], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 20:], expect[:, 20:], rtol=1e-5, atol=1e-5)
    assert _served(hps, SUM_TABLES)[0] == ids_before + 4  # counted once, by the probe path's run


def test_tables_not_held_whole_are_never_read_by_id(make_hps):
    _, hps = make_hps(SUM_TABLES, cache=_cache(0.5))
    (group,) = hps.engine.groups
    assert not group.residency.eligible and not bool(group.residency)
