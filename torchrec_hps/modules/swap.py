"""Swap-in: turn a trained TorchRec model into one served through the parameter server."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_hps.config import HPSConfig
from torchrec_hps.modules.hps_ebc import HPSEmbeddingBagCollection
from torchrec_hps.modules.quantized import dequantized_tables, is_quantized_ebc
from torchrec_hps.storage.bulk_load import bulk_load
from torchrec_hps.storage.hierarchy import StorageHierarchy


def swap_in_hps(
    model: torch.nn.Module,
    config: HPSConfig,
    storage: Optional[StorageHierarchy] = None,
    load: bool = True,
    progress: bool = False,
    device: Optional[torch.device] = None,
) -> Tuple[torch.nn.Module, StorageHierarchy]:
    """Replace every EmbeddingBagCollection in `model` (in place; TorchRec's float one, or the quantized one
    `quantize_inference_model` makes: FP32/FP16/INT8 tables, read back as floats) by an
    HPSEmbeddingBagCollection over `storage` (built from config.storage if not given), bulk-loading its
    weights into the tiers that keep full copies unless `load=False` (tables already loaded). Returns the
    model and the hierarchy."""
    found: List[Tuple[torch.nn.Module, str, torch.nn.Module]] = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, EmbeddingBagCollection) or is_quantized_ebc(child):
                found.append((parent, name, child))
    if not found and (isinstance(model, EmbeddingBagCollection) or is_quantized_ebc(model)):
        raise ValueError("pass a model that holds the EmbeddingBagCollection (or use HPSEmbeddingBagCollection "
                         "directly): the top-level module cannot be replaced in place")
    if not found:
        raise ValueError("no torchrec EmbeddingBagCollection found in the model")
    tables = [t.name for _, _, ebc in found for t in ebc.embedding_bag_configs()]
    if len(set(tables)) != len(tables):
        raise ValueError(f"table names repeat across the model's EmbeddingBagCollections ({tables}); they share "
                         f"one namespace ({config.model!r}) in the tiers")
    storage = storage if storage is not None else StorageHierarchy.from_config(config.storage)
    for parent, name, ebc in found:
        tables, weights = dequantized_tables(ebc) if is_quantized_ebc(ebc) else (ebc.embedding_bag_configs(), ebc)
        if load:
            bulk_load(storage.full_copy_tiers(), config.model, weights, progress=progress)
        hps = HPSEmbeddingBagCollection(tables, config, storage=storage, is_weighted=ebc.is_weighted(), device=device)
        setattr(parent, name, hps)
    return model, storage
