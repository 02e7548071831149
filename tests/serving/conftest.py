"""A served DLRM over real tiers (memory + RocksDB, Redis where a test asks), and stock OIP clients."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM

from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, RocksDBTierConfig, StorageConfig
from torchrec_hps.serving import InferenceServer, ModelRepository, SchedulerConfig, ServedModelConfig, ServerConfig
from torchrec_hps.storage import StorageHierarchy

TABLES = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
          for i, n in enumerate([1000, 50, 300])]
DENSE = 5
ARCH = dict(dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])


def make_dlrm(seed: int) -> DLRM:
    torch.manual_seed(seed)
    return DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=TABLES), dense_in_features=DENSE, **ARCH).eval()


@dataclass
class Query:
    dense: np.ndarray  # [n, DENSE] float32
    lengths: np.ndarray  # [F, n] int64
    values: np.ndarray  # int64, feature-major


def random_query(n: int, gen: np.random.Generator, max_len: int = 3, tables=TABLES, dense: int = DENSE) -> Query:
    lengths = gen.integers(0, max_len + 1, size=(len(tables), n))
    values = np.concatenate([gen.integers(0, t.num_embeddings, size=int(lengths[i].sum()))
                             for i, t in enumerate(tables)]).astype(np.int64)
    return Query(gen.standard_normal((n, dense), dtype=np.float32), lengths.astype(np.int64), values)


def expected_scores(model: torch.nn.Module, q: Query, tables=TABLES) -> np.ndarray:
    kjt = KeyedJaggedTensor(keys=[f for t in tables for f in t.feature_names], values=torch.from_numpy(q.values),
                            lengths=torch.from_numpy(q.lengths.reshape(-1)))
    with torch.no_grad():
        return model(torch.from_numpy(q.dense), kjt).reshape(-1).numpy()


@dataclass
class Served:
    server: InferenceServer
    model: DLRM  # the original TorchRec model (the reference)
    checkpoint: str
    storage: StorageHierarchy
    namespace: str
    tmp_path: object

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.server.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"


def start_server(tmp_path, name: str, scheduler: Optional[SchedulerConfig] = None, redis_url: Optional[str] = None,
                 kafka=None, seed: int = 0) -> Served:
    from torchrec_hps.config import RedisTierConfig

    model = make_dlrm(seed)
    ckpt = str(tmp_path / f"{name}-v1.pt")
    torch.save(model.state_dict(), ckpt)
    storage_cfg = StorageConfig(memory=MemoryTierConfig(capacity=200),
                                redis=RedisTierConfig(url=redis_url) if redis_url else None,
                                rocksdb=RocksDBTierConfig(path=str(tmp_path / "db")))
    hps = HPSConfig(model=name, cache=CacheConfig(min_cache_rows=1, cache_ratio=0.1, hit_rate_threshold=1.0),
                    storage=storage_cfg)
    storage = StorageHierarchy.from_config(storage_cfg)
    repo = ModelRepository(storage, hps, devices=["cpu"], kafka=kafka)
    cfg = ServedModelConfig(name=name, version=1, path=ckpt, dense_in_features=DENSE, **ARCH)
    repo.load(cfg, TABLES)
    server = InferenceServer(ServerConfig(http_port=0, grpc_port=0, scheduler=scheduler or SchedulerConfig(
        batch_size=16, cpu_workers=2, gpu_workers=0)), repo, tables={name: TABLES}).start()
    return Served(server, model, ckpt, storage, cfg.namespace, tmp_path)


@pytest.fixture
def served(tmp_path, namespace):
    s = start_server(tmp_path, namespace.replace("-", "_").replace(".", "_"))
    yield s
    s.server.stop()
    s.storage.close()


def http_inputs(q: Query, binary: bool = True):
    import tritonclient.http as httpclient

    inputs = []
    for name, arr, dt in (("dense_features", q.dense, "FP32"), ("sparse_lengths", q.lengths, "INT64"),
                          ("sparse_values", q.values, "INT64")):
        t = httpclient.InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(t)
    return inputs


def grpc_inputs(q: Query):
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, arr, dt in (("dense_features", q.dense, "FP32"), ("sparse_lengths", q.lengths, "INT64"),
                          ("sparse_values", q.values, "INT64")):
        t = grpcclient.InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def grpc_infer(target: str, model: str, q: Query) -> np.ndarray:
    """One query through a plain grpcio client over the protocol's messages (where tritonclient is absent)."""
    import grpc

    from torchrec_hps.serving.oip import grpc_predict_v2_pb2 as pb
    from torchrec_hps.serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    req = pb.ModelInferRequest(model_name=model)
    for name, arr, dt in (("dense_features", q.dense, "FP32"), ("sparse_lengths", q.lengths, "INT64"),
                          ("sparse_values", q.values, "INT64")):
        req.inputs.add(name=name, datatype=dt, shape=list(arr.shape))
        req.raw_input_contents.append(np.ascontiguousarray(arr).tobytes())
    with grpc.insecure_channel(target) as channel:
        resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=60)
    return np.frombuffer(resp.raw_output_contents[0], dtype=np.float32)


def check_http_scores(http_url: str, name: str, model: torch.nn.Module, sizes, seed: int, rtol: float = 1e-5,
                      atol: float = 1e-6) -> None:
    """Queries of these sizes through the stock HTTP client score as `model`'s own forward."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(http_url)
    gen = np.random.default_rng(seed)
    for n in sizes:
        q = random_query(n, gen)
        np.testing.assert_allclose(client.infer(name, http_inputs(q)).as_numpy("scores"), expected_scores(model, q),
                                   rtol=rtol, atol=atol)
