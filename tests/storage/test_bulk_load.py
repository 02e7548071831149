"""Bulk load of TorchRec weights into real tiers."""
from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from torchrec_hps.storage import StorageHierarchy, bulk_load, table_weights


def _ebc():
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=1000, feature_names=["f1"]),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=333, feature_names=["f2", "f3"]),
    ])


def test_load_module_in_chunks_into_full_copy_tiers(tier_factory, namespace):
    ebc = _ebc()
    red, rocks = tier_factory("redis_cluster"), tier_factory("rocksdb")
    specs = bulk_load([red, rocks], namespace, ebc, chunk_rows=128, progress=False)
    assert {(s.name, s.num_rows, s.dim) for s in specs} == {("t1", 1000, 8), ("t2", 333, 4)}
    for spec in specs:
        w = ebc.embedding_bags[spec.name].weight.detach()
        for tier in (red, rocks):
            assert tier.num_rows(spec.key) == spec.num_rows
            got, found = tier.get(spec.key, torch.arange(spec.num_rows))
            assert found.all()
            torch.testing.assert_close(got, w, rtol=0, atol=0)


def test_load_state_dict_of_a_model_through_the_hierarchy(tier_factory, namespace):
    model = torch.nn.Module()
    model.sparse = _ebc()
    state = model.state_dict()  # keys like 'sparse.embedding_bags.t1.weight'
    h = StorageHierarchy([tier_factory("memory", capacity=100), tier_factory("rocksdb")])
    bulk_load(h, namespace, state, chunk_rows=500, progress=False)
    res = h.get(f"{namespace}.t2", torch.tensor([0, 332]))
    torch.testing.assert_close(res.rows, state["sparse.embedding_bags.t2.weight"][[0, 332]], rtol=0, atol=0)


def test_resume_from_start_rows(tier_factory, namespace):
    ebc = _ebc()
    rocks = tier_factory("rocksdb")
    bulk_load(rocks, namespace, ebc, tables=["t1"], start_rows={"t1": 600}, progress=False)
    assert rocks.num_rows(f"{namespace}.t1") == 400
    assert not rocks.get(f"{namespace}.t1", torch.tensor([599]))[1].any()


def test_bad_sources():
    with pytest.raises(ValueError, match="no `embedding_bags"):
        table_weights({"dense.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"tables \['nope'\] are not in the source"):
        bulk_load([], "m", _ebc(), tables=["nope"], progress=False)
