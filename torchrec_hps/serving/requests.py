"""What a ranking request must hold, checked before anything is queued: a query that would fail its batch
is a 400 naming the input, never an error for the other queries coalesced with it.

Inputs (names and layout as the model's metadata says):
  dense_features  FP32 [n, dense_in_features]
  sparse_lengths  INT32/INT64 [F, n]   ids per sample per feature, features in the model's order
  sparse_values   INT32/INT64 [sum(lengths)]  feature-major (all of feature 0's ids, then feature 1's, ...)
  sparse_weights  FP32 [sum(lengths)]  only for weighted models"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from torchrec_hps.serving.errors import RequestError
from torchrec_hps.serving.query import ModelSignature

INPUTS = ("dense_features", "sparse_lengths", "sparse_values", "sparse_weights")
_INT = (np.dtype(np.int32), np.dtype(np.int64))


def _take(tensors: Dict[str, np.ndarray], name: str, dtypes, ndim: int) -> np.ndarray:
    if name not in tensors:
        raise RequestError(f"input {name!r} is missing; a ranking request has inputs {list(INPUTS[:3])}")
    a = tensors[name]
    if a.dtype not in dtypes:
        raise RequestError(f"input {name!r}: datatype {a.dtype} is not accepted; expected one of "
                           f"{[str(d) for d in dtypes]}")
    if a.ndim != ndim:
        raise RequestError(f"input {name!r}: shape {list(a.shape)} has {a.ndim} dimensions, expected {ndim}")
    return a


def parse_query_inputs(tensors: Dict[str, np.ndarray], signature: ModelSignature, max_samples: int):
    """(dense [n, d] float32, lengths [F, n] int64, values int64, weights or None) as torch tensors."""
    unknown = sorted(set(tensors) - set(INPUTS))
    if unknown:
        raise RequestError(f"unknown inputs {unknown}; expected {list(INPUTS if signature.weighted else INPUTS[:3])}")
    dense = _take(tensors, "dense_features", (np.dtype(np.float32),), 2)
    n, d = dense.shape
    if n == 0:
        raise RequestError("input 'dense_features': the query has no samples (shape [0, d])")
    if n > max_samples:
        raise RequestError(f"input 'dense_features': {n} samples is more than this server takes in one query "
                           f"({max_samples}); split the query")
    if d != signature.dense_in_features:
        raise RequestError(f"input 'dense_features': shape {list(dense.shape)}; expected [n, "
                           f"{signature.dense_in_features}]")
    if not np.isfinite(dense).all():
        raise RequestError("input 'dense_features' holds NaN or infinite values")
    lengths = _take(tensors, "sparse_lengths", _INT, 2)
    f = len(signature.features)
    if lengths.shape != (f, n):
        raise RequestError(f"input 'sparse_lengths': shape {list(lengths.shape)}; expected [{f}, {n}] (features "
                           f"{list(signature.features)} x samples)")
    if (lengths < 0).any():
        raise RequestError("input 'sparse_lengths' holds negative lengths")
    values = _take(tensors, "sparse_values", _INT, 1)
    per_feature = lengths.sum(axis=1, dtype=np.int64)
    if values.shape[0] != int(per_feature.sum()):
        raise RequestError(f"input 'sparse_values': {values.shape[0]} ids, but sparse_lengths sum to "
                           f"{int(per_feature.sum())}")
    values = np.array(values, dtype=np.int64)  # a copy: request buffers are read-only
    # numpy, not torch, for these checks: on small queries torch's per-op cost is most of the request's
    bounds = np.repeat(np.asarray(signature.id_bounds, dtype=np.int64), per_feature)
    bad = (values < 0) | (values >= bounds)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        feature = int(np.searchsorted(np.cumsum(per_feature), i, side="right"))
        raise RequestError(f"input 'sparse_values'[{i}] = {int(values[i])} is out of range for feature "
                           f"{signature.features[feature]!r}: expected 0 <= id < {signature.id_bounds[feature]}")
    values_t = torch.from_numpy(values)
    weights = None
    if signature.weighted:
        w = _take(tensors, "sparse_weights", (np.dtype(np.float32),), 1)
        if w.shape[0] != values.shape[0]:
            raise RequestError(f"input 'sparse_weights': {w.shape[0]} weights for {values.shape[0]} ids")
        weights = torch.from_numpy(np.array(w))
    elif "sparse_weights" in tensors:
        raise RequestError("input 'sparse_weights': this model's features are not weighted")
    return (torch.from_numpy(np.array(dense)), torch.from_numpy(np.array(lengths, dtype=np.int64)),
            values_t, weights)
