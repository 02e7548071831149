"""The README's usage example runs as written (against the test servers, RocksDB in a temp folder)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_storage_example_runs(servers, tmp_path, namespace):
    code = re.search(r"## Usage: the storage tiers\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = code.replace("/var/lib/hps/rocksdb", str(tmp_path / "rocksdb")).replace("ctr_model", namespace)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    h = scope["hierarchy"]
    assert scope["res"].found.all()
    assert h.stats()[f"{namespace}.t1"]["served_by"]["redis"] == 4
    h.tier("redis").drop_table(f"{namespace}.t1")
    h.close()


def test_readme_swap_in_example_runs(tmp_path, namespace):
    code = re.search(r"## Usage: swap a trained TorchRec model onto the parameter server\n\n```python\n(.*?)```",
                     README.read_text(), re.S).group(1)
    code = code.replace("/var/lib/hps/rocksdb", str(tmp_path / "rocksdb")).replace("ctr_v1", namespace)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["scores"].shape == (2, 1)
    hps = scope["model"].sparse_arch.embedding_bag_collection
    assert hps.stats()["t0"]["ids"] == 2
    hps.close()
    scope["storage"].close()


def test_readme_serving_client_example_runs(tmp_path):
    """The client snippet against a served 26-feature DLRM named `ctr` (the example's shapes)."""
    import torch
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM

    from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, StorageConfig
    from torchrec_hps.serving import InferenceServer, ModelRepository, SchedulerConfig, ServedModelConfig, ServerConfig
    from torchrec_hps.storage import StorageHierarchy

    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=100, feature_names=[f"f{i}"])
              for i in range(26)]
    arch = dict(dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    torch.manual_seed(0)
    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=tables), dense_in_features=13, **arch)
    torch.save(model.state_dict(), tmp_path / "ctr.pt")
    storage_cfg = StorageConfig(memory=MemoryTierConfig(capacity=100))
    storage = StorageHierarchy.from_config(storage_cfg)
    repo = ModelRepository(storage, HPSConfig(model="ctr", cache=CacheConfig(cache_ratio=0.1), storage=storage_cfg),
                           devices=["cpu"])
    repo.load(ServedModelConfig(name="ctr", path=str(tmp_path / "ctr.pt"), dense_in_features=13, **arch), tables)
    server = InferenceServer(ServerConfig(http_port=0, grpc_port=None, scheduler=SchedulerConfig(cpu_workers=1)),
                             repo).start()
    try:
        code = re.search(r"## Usage: serve ranking requests\n.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
        scope: dict = {}
        exec(compile(code.replace("127.0.0.1:8000", f"127.0.0.1:{server.http_port}"), "README.md", "exec"), scope)
        assert scope["scores"].shape == (2,)
    finally:
        server.stop()
        storage.close()
