"""TorchRec's quantized inference EBC (what `quantize_inference_model` makes) as float tables: the swap-in
reads its rows back out of fbgemm's IntNBit TBE (FP32, FP16 as stored; INT8 rowwise: value = q * scale +
shift, fp16 scale and shift per row), so a model already prepared for TorchRec inference can go onto the
parameter server too. The tiers and the cache then hold the rows as `CacheConfig.cache_dtype` says."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig

_FLOAT = {DataType.FP32: torch.float32, DataType.FP16: torch.float16}


def is_quantized_ebc(module: torch.nn.Module) -> bool:
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

    return isinstance(module, QuantEBC)


def dequantized_tables(qebc: torch.nn.Module) -> Tuple[List[EmbeddingBagConfig], Dict[str, torch.Tensor]]:
    """(the EBC's table configs as FP32, {"embedding_bags.<table>.weight": float32 [rows, dim]})."""
    configs = {c.name: c for c in qebc.embedding_bag_configs()}
    weights: Dict[str, torch.Tensor] = {}
    for tbe in qebc._emb_modules:  # fbgemm's IntNBit TBEs: the rows as they are stored
        for spec, (data, scale_shift) in zip(tbe.embedding_specs, tbe.split_embedding_weights()):
            name = spec[0]
            config = configs[name]
            dim = config.embedding_dim
            if config.data_type in _FLOAT:
                rows = data.contiguous().view(_FLOAT[config.data_type])[:, :dim].float()
            elif config.data_type == DataType.INT8:
                scale, shift = scale_shift.contiguous().view(torch.float16).float().unbind(1)
                rows = data[:, :dim].float() * scale[:, None] + shift[:, None]
            else:
                raise ValueError(f"table {name!r} is quantized to {config.data_type.name}: the swap-in reads FP32, "
                                 "FP16 and INT8 tables; quantize to one of those (or swap the float model)")
            weights[f"embedding_bags.{name}.weight"] = rows.cpu()
    missing = sorted(set(configs) - {k.split(".")[1] for k in weights})
    if missing:
        raise ValueError(f"the quantized EBC's TBEs hold no rows for tables {missing}")
    fp32 = [dataclasses.replace(c, data_type=DataType.FP32) for c in qebc.embedding_bag_configs()]
    return fp32, weights
