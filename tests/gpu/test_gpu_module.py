"""The CUDA path: cache rows in HBM, remap on the device, fbgemm TBE (DEVICE). Collected only where CUDA
is available (the project's H100 runs); CI's CPU path is tested in tests/modules."""
from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection

from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, RocksDBTierConfig, StorageConfig
from torchrec_hps.modules import HPSEmbeddingBagCollection
from torchrec_hps.storage import StorageHierarchy, bulk_load
from tests.modules.conftest import TABLES, random_kjt

pytestmark = pytest.mark.gpu


def _setup(tmp_path, ratio, threshold):
    ref = EmbeddingBagCollection(tables=TABLES)
    storage = StorageHierarchy.from_config(StorageConfig(memory=MemoryTierConfig(capacity=100),
                                                         rocksdb=RocksDBTierConfig(path=str(tmp_path / "db"))))
    bulk_load(storage.tiers[-1:], "gpu", ref, progress=False)
    cfg = HPSConfig(model="gpu", cache=CacheConfig(cache_ratio=ratio, min_cache_rows=1, hit_rate_threshold=threshold))
    return ref, storage, HPSEmbeddingBagCollection(TABLES, cfg, storage=storage, device="cuda")


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


def test_cuda_graph_path_replays_all_hit_lookups_exactly(tmp_path):
    ref, storage, hps = _setup(tmp_path, 1.0, threshold=1.0)
    for t in TABLES:
        hps.prefill(t.name, torch.arange(t.num_embeddings))
    gen = torch.Generator().manual_seed(3)
    for batch in (8, 8, 32, 8):
        kjt = random_kjt(TABLES, batch, gen=gen)
        torch.testing.assert_close(hps(kjt.to(torch.device("cuda"))).values().cpu(), ref(kjt).values().detach(),
                                   rtol=1e-5, atol=1e-5)
    graphs = [g.graphs for g in hps.engine.groups]
    assert sum(g.replays for g in graphs) >= 4 * len(graphs) - 1 and sum(g.fallbacks for g in graphs) == 0
    s = hps.stats()["t3"]
    assert s["ids"] > 0 and s["hits"] == s["ids"]
    hps.close()
    storage.close()


def test_cuda_graph_path_falls_back_on_misses(tmp_path):
    ref, storage, hps = _setup(tmp_path, 0.1, threshold=1.0)
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        kjt = random_kjt(TABLES, 16, gen=gen)
        torch.testing.assert_close(hps(kjt.to(torch.device("cuda"))).values().cpu(), ref(kjt).values().detach(),
                                   rtol=1e-5, atol=1e-5)
    assert sum(g.graphs.fallbacks for g in hps.engine.groups) > 0
    with pytest.raises(ValueError, match="out of range"):
        from torchrec import KeyedJaggedTensor

        bad = KeyedJaggedTensor.from_lengths_sync(keys=["f1", "f3", "f2", "f4"], values=torch.tensor([1, 2, 3, 999]),
                                                  lengths=torch.tensor([1, 1, 1, 1]))
        hps(bad.to(torch.device("cuda")))
    hps.close()
    storage.close()
