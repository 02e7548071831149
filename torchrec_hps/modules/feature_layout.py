"""Where each feature of a KJT goes: tables grouped by pooling mode (one cache group, one TBE each), and the
internal feature order in which each group's features are contiguous, so one permute of the KJT feeds
every group and one column permutation of the pooled output restores the tables' (config) order.
Planned once, from the table configs (as torchrec's GroupedEmbeddingConfig names a group)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType


@dataclass
class PoolingGroup:
    pooling: PoolingType
    tables: List[int]  # config indices of its tables
    features: List[int]  # config indices of its features, in internal order
    feature_tables: List[int]  # per feature, its table's index within this group


@dataclass
class FeatureLayout:
    names: List[str]  # features in config order (the output's order)
    dims: List[int]  # per feature, config order
    groups: List[PoolingGroup]
    internal: List[int]  # internal position -> config feature index (group-major)
    out_perm: Optional[np.ndarray]  # output columns in internal order -> config order; None if the same
    table_loc: Dict[str, Tuple[int, int]]  # table name -> (group, table index within the group)

    @classmethod
    def plan(cls, tables: Sequence[EmbeddingBagConfig]) -> "FeatureLayout":
        names = [f for t in tables for f in t.feature_names]
        feature_table = [i for i, t in enumerate(tables) for _ in t.feature_names]
        dims = [tables[i].embedding_dim for i in feature_table]
        by_pooling: Dict[PoolingType, List[int]] = {}
        for i, t in enumerate(tables):
            by_pooling.setdefault(t.pooling, []).append(i)
        groups: List[PoolingGroup] = []
        table_loc: Dict[str, Tuple[int, int]] = {}
        for pooling, tidx in by_pooling.items():
            local = {ti: j for j, ti in enumerate(tidx)}
            feats = [f for f, ti in enumerate(feature_table) if ti in local]
            for ti in tidx:
                table_loc[tables[ti].name] = (len(groups), local[ti])
            groups.append(PoolingGroup(pooling, tidx, feats, [local[feature_table[f]] for f in feats]))
        internal = [f for g in groups for f in g.features]
        cols = np.concatenate([[0], np.cumsum([dims[f] for f in internal])]).astype(np.int64)
        col_of = {f: np.arange(cols[i], cols[i + 1]) for i, f in enumerate(internal)}
        perm = np.concatenate([col_of[f] for f in range(len(names))]) if names else np.zeros(0, dtype=np.int64)
        out_perm = None if np.array_equal(perm, np.arange(len(perm))) else perm
        return cls(names, dims, groups, internal, out_perm, table_loc)

    def internal_tables(self, tables: Sequence[EmbeddingBagConfig]) -> List[EmbeddingBagConfig]:
        """The table of each feature, in internal order."""
        feature_table = [i for i, t in enumerate(tables) for _ in t.feature_names]
        return [tables[feature_table[f]] for f in self.internal]
