"""The `torchrec_hps::pooled_lookup` custom op: how a scripted or exported model reaches its engine.

The op's `handle` is the module's spec (tables + HPSConfig, as JSON) plus an instance id. In the process
that built the module the id finds its engine; in a fresh process that loaded a TorchScript or
torch.export artifact, the first call builds an engine from the spec (so the tiers it names must be
reachable and loaded) and later calls reuse it. `import torchrec_hps` registers the op.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import uuid
import weakref
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

from torchrec_hps.config import HPSConfig, hps_config_from_dict

if TYPE_CHECKING:
    from torchrec_hps.modules.engine import HPSEngine

_ENGINES: "weakref.WeakValueDictionary[str, HPSEngine]" = weakref.WeakValueDictionary()
_FROM_SPEC: Dict[str, "HPSEngine"] = {}  # engines built for loaded artifacts live as long as the process
_BUILD_LOCK = threading.Lock()


def engine_spec(tables: List[EmbeddingBagConfig], config: HPSConfig, is_weighted: bool) -> str:
    return json.dumps({
        "tables": [{"name": t.name, "embedding_dim": t.embedding_dim, "num_embeddings": t.num_embeddings,
                    "feature_names": list(t.feature_names), "pooling": t.pooling.name} for t in tables],
        "is_weighted": is_weighted,
        "config": dataclasses.asdict(config),
    }, sort_keys=True)


def register_engine(engine: "HPSEngine", spec: str) -> str:
    handle = f"{spec}#{uuid.uuid4().hex}"
    _ENGINES[handle] = engine
    return handle


def _engine_for(handle: str) -> "HPSEngine":
    engine = _ENGINES.get(handle)
    if engine is not None:
        return engine
    spec = handle.rsplit("#", 1)[0]
    with _BUILD_LOCK:
        engine = _FROM_SPEC.get(spec)
        if engine is None:
            from torchrec_hps.modules.engine import HPSEngine

            data: Dict[str, Any] = json.loads(spec)
            tables = [EmbeddingBagConfig(name=t["name"], embedding_dim=t["embedding_dim"],
                                         num_embeddings=t["num_embeddings"], feature_names=t["feature_names"],
                                         pooling=PoolingType[t["pooling"]]) for t in data["tables"]]
            engine = HPSEngine(tables, hps_config_from_dict(data["config"]), is_weighted=data["is_weighted"])
            _FROM_SPEC[spec] = engine
    return engine


def _spec_dims(handle: str) -> int:
    data = json.loads(handle.rsplit("#", 1)[0])
    return sum(t["embedding_dim"] * len(t["feature_names"]) for t in data["tables"])


@torch.jit.unused
def in_process_lookup(features: KeyedJaggedTensor, handle: str) -> Optional[torch.Tensor]:
    """Eager Python callers skip the op (its dispatch and the KJT rebuild cost as much as a small lookup):
    the engine is called directly unless something is tracing or compiling (then the op must be seen)."""
    values = features.values()
    if (type(values) is not torch.Tensor or torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
            or _current_dispatch_mode() is not None):
        return None
    return _engine_for(handle).lookup(features)


@torch.library.custom_op("torchrec_hps::pooled_lookup", mutates_args=())
def pooled_lookup(values: torch.Tensor, lengths: torch.Tensor, weights: Optional[torch.Tensor], keys: str,
                  handle: str) -> torch.Tensor:
    """Pooled embeddings [B, sum of dims] for a KJT given as (values, lengths, weights, ','-joined keys)."""
    kjt = KeyedJaggedTensor(keys=keys.split(",") if keys else [], values=values, lengths=lengths, weights=weights)
    return _engine_for(handle).lookup(kjt)


@pooled_lookup.register_fake
def _pooled_lookup_fake(values, lengths, weights, keys, handle):
    n_keys = len(keys.split(",")) if keys else 1
    return values.new_empty((lengths.shape[0] // n_keys, _spec_dims(handle)), dtype=torch.float32)
