"""Swap-in on a small TorchRec DLRM built from torchrec.models: same outputs, served through the tiers."""
from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM

from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, RocksDBTierConfig, StorageConfig
from torchrec_hps.modules import HPSEmbeddingBagCollection
from torchrec_hps.modules.swap import swap_in_hps
from tests.modules.conftest import random_kjt

DLRM_TABLES = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
               for i, n in enumerate([1000, 50, 300, 7])]


def small_dlrm() -> DLRM:
    torch.manual_seed(0)
    return DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=DLRM_TABLES), dense_in_features=5,
                dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1]).eval()


def swapped_dlrm(tmp_path, namespace, n_batches: int, batch: int, seed: int, cache_ratio: float):
    """A small DLRM, its outputs on random batches, then the same model swapped onto memory + RocksDB."""
    model = small_dlrm()
    gen = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(batch, 5, generator=gen), random_kjt(DLRM_TABLES, batch, gen=gen))
               for _ in range(n_batches)]
    with torch.no_grad():
        expected = [model(d, s) for d, s in batches]
    cfg = HPSConfig(model=namespace, cache=CacheConfig(min_cache_rows=1, cache_ratio=cache_ratio, hit_rate_threshold=1.0),
                    storage=StorageConfig(memory=MemoryTierConfig(capacity=100),
                                          rocksdb=RocksDBTierConfig(path=str(tmp_path / "db"))))
    model, storage = swap_in_hps(model, cfg)
    return model, storage, batches, expected


def test_swapped_dlrm_outputs_equal_the_original(tmp_path, namespace):
    model, storage, batches, expected = swapped_dlrm(tmp_path, namespace, n_batches=5, batch=6, seed=1,
                                                     cache_ratio=0.05)
    hps = model.sparse_arch.embedding_bag_collection
    assert isinstance(hps, HPSEmbeddingBagCollection)
    with torch.no_grad():
        for (d, s), want in zip(batches * 2, expected * 2):
            torch.testing.assert_close(model(d, s), want, rtol=0, atol=0)
    assert storage.tier("rocksdb").num_rows(f"{namespace}.t0") == 1000  # bulk-loaded, memory fills on demand
    assert hps.stats()["t0"]["hits"] > 0
    hps.close()
    storage.close()


def test_swap_needs_an_ebc():
    with pytest.raises(ValueError, match="no torchrec EmbeddingBagCollection"):
        swap_in_hps(torch.nn.Linear(2, 2), HPSConfig(model="m"))


@pytest.mark.parametrize("dtype", [torch.float, torch.half, torch.qint8])
def test_a_model_quantized_for_torchrec_inference_swaps_in(tmp_path, namespace, dtype):
    """quantize_inference_model's EBC (fbgemm IntNBit TBEs) onto the tiers: the swapped model scores like the
    quantized one (its rows read back exactly; INT8 dequantized as fbgemm does, rowwise scale and shift)."""
    import copy

    from torchrec.inference.modules import quantize_inference_model

    quantized = quantize_inference_model(copy.deepcopy(small_dlrm()), quantization_dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 5, generator=gen), random_kjt(DLRM_TABLES, 6, gen=gen)) for _ in range(3)]
    with torch.no_grad():
        expected = [quantized(d, s) for d, s in batches]
    cfg = HPSConfig(model=namespace, cache=CacheConfig(min_cache_rows=1, cache_ratio=0.1, hit_rate_threshold=1.0),
                    storage=StorageConfig(memory=MemoryTierConfig(capacity=100),
                                          rocksdb=RocksDBTierConfig(path=str(tmp_path / "db"))))
    model, storage = swap_in_hps(quantized, cfg)
    hps = model.sparse_arch.embedding_bag_collection
    assert isinstance(hps, HPSEmbeddingBagCollection)
    with torch.no_grad():
        for (d, s), want in zip(batches, expected):
            torch.testing.assert_close(model(d, s), want, rtol=1e-4, atol=1e-5)
    hps.close()
    storage.close()


def test_a_quantized_table_the_swap_cannot_read_is_named():
    import copy

    from torchrec.inference.modules import quantize_inference_model
    from torchrec_hps.modules.quantized import dequantized_tables

    quantized = quantize_inference_model(copy.deepcopy(small_dlrm()), quantization_dtype=torch.quint4x2)
    with pytest.raises(ValueError, match="table 't0' is quantized to INT4"):
        dequantized_tables(quantized.sparse_arch.embedding_bag_collection)
