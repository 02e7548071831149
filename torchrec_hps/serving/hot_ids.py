"""The live traffic's hottest ids per table, sampled from recent batches: what a new model version's cache
is warmed with before it takes traffic."""
from __future__ import annotations

import threading
from collections import deque
from typing import Deque, Dict, Sequence, Tuple

import torch
from torchrec import KeyedJaggedTensor


class HotIds:
    def __init__(self, keep_batches: int = 64) -> None:
        self._recent: Dict[str, Deque[Tuple[Tuple[str, ...], torch.Tensor, torch.Tensor]]] = {}
        self._keep = keep_batches
        self._lock = threading.Lock()

    def record(self, model: str, features: KeyedJaggedTensor) -> None:
        """Keep a reference to the batch's ids (nothing computed on the serving path)."""
        with self._lock:
            ring = self._recent.get(model)
            if ring is None:
                ring = self._recent[model] = deque(maxlen=self._keep)
            ring.append((tuple(features.keys()), features.values(), features.lengths()))

    def hottest(self, model: str, table_of_feature: Dict[str, str], limit: int) -> Dict[str, torch.Tensor]:
        """{table: up to `limit` ids, most looked-up first}, over the recorded batches."""
        with self._lock:
            ring = list(self._recent.get(model, ()))
        if not ring:
            return {}
        per_table: Dict[str, list] = {}
        for keys, values, lengths in ring:
            per_key = lengths.reshape(len(keys), -1).sum(1)
            for key, part in zip(keys, torch.split(values, per_key.tolist())):
                if key in table_of_feature:
                    per_table.setdefault(table_of_feature[key], []).append(part)
        out = {}
        for table, parts in per_table.items():
            ids, counts = torch.unique(torch.cat(parts), return_counts=True)
            out[table] = ids[torch.argsort(counts, descending=True, stable=True)[:limit]]
        return out


def feature_tables(tables: Sequence) -> Dict[str, str]:
    return {f: t.name for t in tables for f in t.feature_names}
