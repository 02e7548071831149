"""Bulk load: a TorchRec EmbeddingBagCollection's weights (module or state dict) into the storage tiers,
in chunks (memory bounded by `chunk_rows`, whatever the table size), with a tqdm progress bar."""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

from torchrec_hps.config import TableSpec
from torchrec_hps.storage.hierarchy import StorageHierarchy
from torchrec_hps.storage.interface import StorageTier

_WEIGHT_KEY = re.compile(r"(?:^|\.)embedding_bags\.([^.]+)\.weight$")


def table_weights(source: Union[torch.nn.Module, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """{table name: weight [rows, dim]} from an EmbeddingBagCollection, a model holding one, or a state
    dict with TorchRec's keys (`...embedding_bags.<table>.weight`)."""
    state = source.state_dict() if isinstance(source, torch.nn.Module) else source
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = _WEIGHT_KEY.search(key)
        if m is None:
            continue
        name = m.group(1)
        if name in out:
            raise ValueError(f"table {name!r} appears twice in the state dict (second key {key!r}); "
                             "load one EmbeddingBagCollection at a time")
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            raise ValueError(f"{key}: expected a 2-D weight tensor, got {getattr(value, 'shape', type(value))}")
        out[name] = value
    if not out:
        raise ValueError("no `embedding_bags.<table>.weight` entries found: expected a TorchRec "
                         "EmbeddingBagCollection (or its state dict)")
    return out


def bulk_load(
    target: Union[StorageHierarchy, StorageTier, Sequence[StorageTier]],
    model: str,
    source: Union[torch.nn.Module, Mapping[str, torch.Tensor]],
    chunk_rows: int = 65536,
    tables: Optional[Sequence[str]] = None,
    start_rows: Optional[Mapping[str, int]] = None,
    progress: bool = True,
    on_chunk: Optional[Callable[[str, int], None]] = None,
) -> List[TableSpec]:
    """Write every table of `source` under namespace `model`. `target` is a hierarchy (write-through,
    bottom-up) or one or more tiers (e.g. only the tiers that keep full copies). `start_rows` resumes a
    load that stopped part-way ({table: first row to write}); `on_chunk(table, rows_done)` is called after
    each chunk is written everywhere (to record progress). Returns the table specs it registered."""
    from tqdm import tqdm

    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows={chunk_rows} must be positive")
    weights = table_weights(source)
    if tables is not None:
        unknown = sorted(set(tables) - set(weights))
        if unknown:
            raise ValueError(f"tables {unknown} are not in the source; it has {sorted(weights)}")
        weights = {t: weights[t] for t in tables}
    specs = [TableSpec(model, name, w.shape[0], w.shape[1]) for name, w in weights.items()]
    sinks = [target] if isinstance(target, (StorageHierarchy, StorageTier)) else list(target)
    for sink in sinks:
        sink.add_tables(specs)
    start_rows = dict(start_rows or {})
    total = sum(w.shape[0] - start_rows.get(n, 0) for n, w in weights.items())
    with tqdm(total=total, unit="rows", unit_scale=True, disable=not progress, desc=f"load {model}") as bar:
        for spec in specs:
            w = weights[spec.name].detach()
            for lo in range(start_rows.get(spec.name, 0), spec.num_rows, chunk_rows):
                hi = min(lo + chunk_rows, spec.num_rows)
                keys = torch.arange(lo, hi, dtype=torch.int64)
                rows = w[lo:hi].to(device="cpu", dtype=torch.float32)  # one chunk materialized at a time
                for sink in sinks:
                    sink.put(spec.key, keys, rows)
                bar.update(hi - lo)
                if on_chunk is not None:
                    on_chunk(spec.name, hi)
    return specs
