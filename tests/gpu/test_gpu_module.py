"""The CUDA path: cache rows in HBM, remap on the device, fbgemm TBE (DEVICE). Collected only where CUDA
is available (the project's H100 runs); CI's CPU path is tested in tests/modules."""
from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection

from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, RocksDBTierConfig, StorageConfig
from torchrec_hps.modules import HPSEmbeddingBagCollection
from torchrec_hps.storage import StorageHierarchy, bulk_load
from tests.modules.conftest import SUM_TABLES, TABLES, random_kjt

pytestmark = pytest.mark.gpu


def _setup(tmp_path, ratio, threshold, tables=TABLES, **cache):
    ref = EmbeddingBagCollection(tables=tables)
    storage = StorageHierarchy.from_config(StorageConfig(memory=MemoryTierConfig(capacity=100),
                                                         rocksdb=RocksDBTierConfig(path=str(tmp_path / "db"))))
    bulk_load(storage.tiers[-1:], "gpu", ref, progress=False)
    cfg = HPSConfig(model="gpu", cache=CacheConfig(cache_ratio=ratio, min_cache_rows=1, hit_rate_threshold=threshold,
                                                   **cache))
    return ref, storage, HPSEmbeddingBagCollection(tables, cfg, storage=storage, device="cuda")


@pytest.mark.parametrize("ratio", [0.01, 0.1, 1.0])
def test_cuda_module_equals_torchrec_sync(tmp_path, ratio):
    ref, storage, hps = _setup(tmp_path, ratio, threshold=1.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        kjt = random_kjt(TABLES, 32, gen=gen)
        out = hps(kjt.to(torch.device("cuda")))
        assert out.values().is_cuda
        torch.testing.assert_close(out.values().cpu(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
    assert hps.stats()["t3"]["hits"] > 0
    hps.close()
    storage.close()


@pytest.mark.parametrize("ratio", [0.1, 1.0])
def test_cuda_module_async_then_exact(tmp_path, ratio):
    ref, storage, hps = _setup(tmp_path, ratio, threshold=0.0)
    kjt = random_kjt(TABLES, 16, gen=torch.Generator().manual_seed(1))
    hps(kjt.to(torch.device("cuda")))  # all misses: defaults now, rows inserted in the background
    hps.wait_idle()
    if ratio == 1.0:
        torch.testing.assert_close(hps(kjt.to(torch.device("cuda"))).values().cpu(), ref(kjt).values().detach(),
                                   rtol=1e-5, atol=1e-5)
    assert hps.stats()["t3"]["async_lookups"] >= 1
    hps.close()
    storage.close()


@pytest.mark.parametrize("graphs,pooled_in_graph,weighted,zero_copy", [
    (True, True, False, True), (True, False, False, True), (True, False, True, True), (False, False, False, True),
    (True, True, False, False)])
def test_all_hit_path_serves_all_hit_lookups_exactly(tmp_path, monkeypatch, graphs, pooled_in_graph, weighted,
                                                     zero_copy):
    from torchrec_hps.modules.cache import cuda_graph

    if not pooled_in_graph:
        monkeypatch.setattr(cuda_graph, "POOLED_IN_GRAPH_MAX_BYTES", 0)
    monkeypatch.setattr(cuda_graph, "ZERO_COPY", zero_copy)
    ref = EmbeddingBagCollection(tables=SUM_TABLES, is_weighted=weighted)
    storage = StorageHierarchy.from_config(StorageConfig(memory=MemoryTierConfig(capacity=100),
                                                         rocksdb=RocksDBTierConfig(path=str(tmp_path / "db"))))
    bulk_load(storage.tiers[-1:], "gpu", ref, progress=False)
    cfg = HPSConfig(model="gpu", cache=CacheConfig(cache_ratio=1.0, min_cache_rows=1, hit_rate_threshold=1.0,
                                                   cuda_graphs=graphs))
    hps = HPSEmbeddingBagCollection(SUM_TABLES, cfg, storage=storage, device="cuda", is_weighted=weighted)
    for t in SUM_TABLES:
        hps.prefill(t.name, torch.arange(t.num_embeddings))
    gen = torch.Generator().manual_seed(3)
    n_ids, outs = 0, []
    for batch in (8, 8, 32, 8, 1):
        kjt = random_kjt(SUM_TABLES, batch, gen=gen, weighted=weighted)
        n_ids += kjt.values().numel()
        out = hps(kjt.to(torch.device("cuda"))).values()
        outs.append(out)
        torch.testing.assert_close(out.cpu(), ref(kjt).values().detach(), rtol=1e-5, atol=1e-5)
    assert outs[0].data_ptr() != outs[1].data_ptr()  # each lookup's output is its own tensor
    (group,) = hps.engine.groups
    assert group.all_hit.served == 5 and group.all_hit.fallbacks == 0
    shape = group.all_hit._shapes[(8, 1024, weighted)]
    assert (shape.graph is not None) == graphs and shape.pooled_in_graph == (graphs and pooled_in_graph)
    assert shape.zero_copy == zero_copy  # the H100 with Triton: kernels use the pinned buffers in place
    s = hps.stats()
    assert sum(s[t.name]["ids"] for t in SUM_TABLES) == n_ids
    assert all(s[t.name]["hits"] == s[t.name]["ids"] for t in SUM_TABLES)
    hps.close()
    storage.close()


@pytest.mark.parametrize("cache_dtype", ["fp32", "fp16"])
def test_all_hit_path_falls_back_on_misses_and_bad_input(tmp_path, cache_dtype):
    ref, storage, hps = _setup(tmp_path, 0.1, threshold=1.0, tables=SUM_TABLES, cache_dtype=cache_dtype)
    tol = 1e-5 if cache_dtype == "fp32" else 3e-3
    gen = torch.Generator().manual_seed(4)
    kjts = [random_kjt(SUM_TABLES, 16, gen=gen) for _ in range(3)]
    for kjt in kjts + kjts:
        torch.testing.assert_close(hps(kjt.to(torch.device("cuda"))).values().cpu(), ref(kjt).values().detach(),
                                   rtol=tol, atol=tol)
    (group,) = hps.engine.groups
    assert group.all_hit.fallbacks > 0
    from torchrec import KeyedJaggedTensor

    keys = ["f1", "f3", "f2", "f4"]
    cases = [([1, 2, 3, 999], [1, 1, 1, 1], "out of range"), ([1, 2, 3, 4], [3, -1, 1, 1], "negative bag length"),
             ([1, 2, 3, 4], [1, 1, 1, 2], "lengths add up to 5"), ([1, 2, 3, 4], [40, 0, 0, 0], "lengths add up to 40")]
    for values, lengths, message in cases:  # garbage in the graph's buffers must not crash the TBE
        with pytest.raises(ValueError, match=message):
            hps(KeyedJaggedTensor(keys=keys, values=torch.tensor(values, device="cuda"),
                                  lengths=torch.tensor(lengths, device="cuda")))
    kjt = kjts[0]
    torch.testing.assert_close(hps(kjt.to(torch.device("cuda"))).values().cpu(), ref(kjt).values().detach(),
                               rtol=tol, atol=tol)
    hps.close()
    storage.close()


def test_direct_tbe_call_equals_fbgemm_forward():
    from torchrec_hps.modules.cache.tbe_direct import bind_pooled_lookup
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    for ty in (SparseType.FP32, SparseType.FP16):
        tbe = IntNBitTableBatchedEmbeddingBagsCodegen([("a", 1000, 64, ty, EmbeddingLocation.DEVICE),
                                                       ("b", 300, 128, ty, EmbeddingLocation.DEVICE)],
                                                      device="cuda", output_dtype=SparseType.FP32)
        tbe.initialize_weights()
        for (w, _), dim in zip(tbe.split_embedding_weights(), (64, 128)):
            dtype = torch.float32 if ty == SparseType.FP32 else torch.float16
            w.view(dtype)[:, :dim].copy_(torch.randn(w.shape[0], dim, device="cuda"))
        lengths = torch.randint(0, 6, (2 * 64,), device="cuda")
        offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths).int()
        n = int(offsets[-1])
        idx = torch.randint(0, 300, (n,), device="cuda").int()
        torch.testing.assert_close(bind_pooled_lookup(tbe)(idx, offsets, None), tbe(idx, offsets))
