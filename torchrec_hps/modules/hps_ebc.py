"""HPSEmbeddingBagCollection: a drop-in for TorchRec's EmbeddingBagCollection whose tables live in the
storage hierarchy and whose hot rows live in a cache (GPU HBM with CUDA, host memory without).

The module is a thin front: its forward is one `torchrec_hps::pooled_lookup` op call (see ops.py), so
models holding it can be scripted (directly or after torchrec.fx tracing) and exported with torch.export;
the lookups are served by its HPSEngine (engine.py).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Union

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_hps.config import HPSConfig
from torchrec_hps.modules.engine import HPSEngine
from torchrec_hps.modules.ops import engine_spec, in_process_lookup, register_engine
from torchrec_hps.storage.hierarchy import StorageHierarchy


@torch.fx.wrap
def hps_pooled_lookup(features: KeyedJaggedTensor, handle: str) -> torch.Tensor:
    # fx.wrap (which patches this module's globals, so it lives here, next to its caller): FX records one
    # call instead of tracing into the KJT, whose keys are known only at runtime
    if not torch.jit.is_scripting():
        out = in_process_lookup(features, handle)
        if out is not None:
            return out
    return torch.ops.torchrec_hps.pooled_lookup(features.values(), features.lengths(), features.weights_or_none(),
                                                ",".join(features.keys()), handle)


class HPSEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """KeyedJaggedTensor in, KeyedTensor out, as torchrec.EmbeddingBagCollection, with the same
    EmbeddingBagConfigs; `config` names the model (its namespace in the shared tiers), the cache and the
    tiers. Pass `storage` to share one hierarchy between several modules or models."""

    __jit_unused_properties__ = ["engine", "storage"]  # Python-side controls, not part of the scripted graph

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        config: HPSConfig,
        storage: Optional[StorageHierarchy] = None,
        is_weighted: bool = False,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        super().__init__()
        engine = HPSEngine(tables, config, storage=storage, is_weighted=is_weighted, device=device)
        self._engine = engine  # a plain object: TorchScript and export see only the attributes below
        self._handle: str = register_engine(engine, engine_spec(tables, config, is_weighted))
        self._feature_names: List[str] = list(engine.feature_names)
        self._dims: List[int] = list(engine.dims)
        self._configs = list(tables)
        self._weighted = is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        values = hps_pooled_lookup(features, self._handle)
        return KeyedTensor(keys=self._feature_names, length_per_key=self._dims, values=values)

    # ---- EmbeddingBagCollectionInterface ----
    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return self._weighted

    # ---- serving controls, delegated to the engine ----
    @property
    def engine(self) -> HPSEngine:
        return self._engine

    @property
    def storage(self) -> StorageHierarchy:
        return self._engine.storage

    def stats(self) -> Dict[str, Dict]:
        return self._engine.stats()

    def prefetch(self, features: KeyedJaggedTensor) -> None:
        """Bring a coming batch's rows into the cache on a side stream (fbgemm TBE's `prefetch` idea): call it
        for batch i+1 before batch i's forward (whose lookup launches it, overlapping i's dense layers);
        `forward(batch i+1)` then finds its rows, exact either way."""
        self._engine.prefetch(features)

    def invalidate(self, table: str, keys) -> None:
        self._engine.invalidate(table, keys)

    def update(self, table: str, keys, rows: torch.Tensor, unique: bool = False) -> int:
        return self._engine.update(table, keys, rows, unique=unique)

    def prefill(self, table: str, keys) -> int:
        return self._engine.prefill(table, keys)

    def prefill_from_counts(self, table: str, counts: torch.Tensor) -> int:
        """Pre-fill with the hottest rows first, from per-id lookup counts ([num_embeddings], e.g. a
        key-frequency file saved with torch.save)."""
        n = self._engine.spec(table).num_rows
        if counts.dim() != 1 or counts.numel() != n:
            raise ValueError(f"table {table!r}: counts must be 1-D with {n} entries (one per id), "
                             f"got shape {list(counts.shape)}")
        order = torch.argsort(counts, descending=True, stable=True)
        return self._engine.prefill(table, order[counts[order] > 0])

    def refresh(self, table: Optional[str] = None) -> Dict[str, int]:
        return self._engine.refresh(table)

    def cached_keys(self, table: str) -> np.ndarray:
        group, t = self._engine._loc(table)
        return group.cached_keys(t)

    def wait_idle(self) -> None:
        self._engine.wait_idle()

    def close(self) -> None:
        self._engine.close()
