"""Input checks for KeyedJaggedTensors entering an HPSEmbeddingBagCollection: each failure names the
feature (and table) and the bad value, and nothing is looked up."""
from __future__ import annotations

from typing import List, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def check_kjt_layout(kjt: KeyedJaggedTensor, features: Sequence[str], is_weighted: bool) -> None:
    """Features, dtypes and shapes (no device sync); raises ValueError."""
    if kjt.variable_stride_per_key():
        raise ValueError("HPSEmbeddingBagCollection: variable batch size per feature (VBE) KJTs are not supported")
    keys = kjt.keys()
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:  # before "missing": a repeated key takes another feature's place
        raise ValueError(f"input features repeat: {repeated} (keys {keys}); each feature must appear once")
    unknown = [k for k in keys if k not in set(features)]
    if unknown:
        raise ValueError(f"features {unknown} are not in the module's tables; expected features {list(features)}")
    missing = [f for f in features if f not in set(keys)]
    if missing:
        raise ValueError(f"features {missing} are missing from the input; the module's tables need {list(features)}")
    values = kjt.values()
    if values.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be int32 or int64, got {values.dtype} (features {keys})")
    if values.dim() != 1:
        raise ValueError(f"ids must be a 1-D tensor, got shape {tuple(values.shape)}")
    lengths = kjt.lengths()
    if lengths.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"lengths must be int32 or int64, got {lengths.dtype} (features {keys})")
    expected = len(keys) * kjt.stride()
    if lengths.numel() != expected:
        raise ValueError(f"lengths has {lengths.numel()} entries; expected {len(keys)} features x batch {kjt.stride()}"
                         f" = {expected}")
    if is_weighted:
        w = kjt.weights_or_none()
        if w is None:
            raise ValueError("the module is weighted (is_weighted=True) but the input KJT has no weights")
        if w.numel() != values.numel() or not w.is_floating_point():
            raise ValueError(f"weights must be one float per id: got {w.numel()} of {w.dtype} for {values.numel()} ids")


def check_lengths(min_length: int, counts: List[int], lengths: torch.Tensor, values: torch.Tensor,
                  features: List[str], batch: int) -> None:
    """Checks on values read back from the device in one sync (the engine batches them)."""
    if min_length < 0:
        f = int(torch.nonzero(lengths < 0)[0]) // max(batch, 1)
        raise ValueError(f"feature {features[f]!r}: negative bag length {min_length} (offsets must not decrease)")
    if sum(counts) != values.numel():
        raise ValueError(f"lengths add up to {sum(counts)} ids but values has {values.numel()} (features {features})")


def out_of_range(values: torch.Tensor, counts: torch.Tensor, num_embeddings: torch.Tensor) -> torch.Tensor:
    """Bool mask of ids outside [0, num_embeddings of their feature's table); values feature-major."""
    bound = torch.repeat_interleave(num_embeddings, counts, output_size=values.numel())
    return (values < 0) | (values >= bound)


def describe_bad_id(values: torch.Tensor, bad: torch.Tensor, counts: torch.Tensor, features: List[str],
                    tables: List[str], num_embeddings: List[int]) -> str:
    i = int(torch.nonzero(bad)[0])
    f = int(torch.searchsorted(torch.cumsum(counts, 0), torch.tensor(i, device=counts.device), right=True))
    return (f"feature {features[f]!r} (table {tables[f]!r}): id {int(values[i])} is out of range; expected "
            f"0 <= id < {num_embeddings[f]} ({int(bad.sum())} bad ids in the batch)")
