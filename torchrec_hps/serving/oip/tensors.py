"""Open Inference Protocol (KServe v2) tensors <-> numpy: the JSON form, its binary-tensor extension and
the gRPC form (contents or raw_input_contents). Only decoding and encoding; what the tensors must be for a
ranking query is checked in serving/requests.py."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from torchrec_hps.serving.errors import RequestError

DTYPES: Dict[str, np.dtype] = {
    "BOOL": np.dtype(bool), "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
_GRPC_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                  "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                  "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                  "FP32": "fp32_contents", "FP64": "fp64_contents"}
HEADER_LENGTH = "inference-header-content-length"  # the binary extension's HTTP header


def _dtype(name: str, datatype: Any) -> np.dtype:
    try:
        return DTYPES[datatype]
    except (KeyError, TypeError):
        raise RequestError(f"input {name!r}: datatype {datatype!r} is not supported; expected one of "
                           f"{sorted(DTYPES)}") from None


def _shape(name: str, shape: Any) -> Tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                      for s in shape):
        raise RequestError(f"input {name!r}: shape {shape!r} must be a list of whole numbers >= 0")
    return tuple(int(s) for s in shape)


def _reshaped(name: str, flat: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    if flat.size != math.prod(shape):  # Python ints: no overflow, and no numpy call per input
        raise RequestError(f"input {name!r}: {flat.size} elements do not fill shape {list(shape)}")
    return flat.reshape(shape)


def decode_json_inputs(body: Dict[str, Any], binary: memoryview) -> Dict[str, np.ndarray]:
    """The request's inputs as arrays; `binary` is what follows the JSON header (binary extension)."""
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("field 'inputs' must be a non-empty list of tensors")
    out: Dict[str, np.ndarray] = {}
    at = 0
    for i, t in enumerate(inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise RequestError(f"inputs[{i}] must be an object with a string 'name'")
        name = t["name"]
        if name in out:
            raise RequestError(f"input {name!r} appears twice")
        dtype, shape = _dtype(name, t.get("datatype")), _shape(name, t.get("shape"))
        params = t.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(binary):
                raise RequestError(f"input {name!r}: binary_data_size {size!r} runs past the request body "
                                   f"({len(binary) - at} bytes left)")
            if size % dtype.itemsize:
                raise RequestError(f"input {name!r}: binary_data_size {size} is not a multiple of "
                                   f"{dtype.itemsize} bytes ({t['datatype']})")
            flat = np.frombuffer(binary[at:at + size], dtype=dtype)
            at += size
        else:
            if "data" not in t:
                raise RequestError(f"input {name!r}: no 'data' and no binary_data_size parameter")
            try:
                flat = np.asarray(t["data"], dtype=dtype).reshape(-1)
            except (ValueError, TypeError, OverflowError):
                raise RequestError(f"input {name!r}: 'data' is not a flat or nested list of {t['datatype']} "
                                   "values") from None
        out[name] = _reshaped(name, flat, shape)
    return out


def decode_grpc_inputs(request) -> Dict[str, np.ndarray]:
    if not request.inputs:
        raise RequestError("field 'inputs' must be a non-empty list of tensors")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    out: Dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        if t.name in out:
            raise RequestError(f"input {t.name!r} appears twice")
        dtype, shape = _dtype(t.name, t.datatype), tuple(int(s) for s in t.shape)
        if raw:
            if len(raw[i]) % dtype.itemsize:
                raise RequestError(f"input {t.name!r}: {len(raw[i])} raw bytes are not a multiple of "
                                   f"{dtype.itemsize} ({t.datatype})")
            flat = np.frombuffer(raw[i], dtype=dtype)
        else:
            field = _GRPC_CONTENTS.get(t.datatype)
            if field is None:
                raise RequestError(f"input {t.name!r}: {t.datatype} needs raw_input_contents")
            flat = np.asarray(getattr(t.contents, field), dtype=dtype)
        out[t.name] = _reshaped(t.name, flat, shape)
    return out


def wants_binary(body: Dict[str, Any], output: str) -> bool:
    """The binary extension: the request asks for an output in binary (per output, or for all)."""
    for o in body.get("outputs") or []:
        if isinstance(o, dict) and o.get("name") == output:
            return bool((o.get("parameters") or {}).get("binary_data", False))
    return bool((body.get("parameters") or {}).get("binary_data_output", False))


def encode_json_response(model: str, version: str, request_id: Optional[str], name: str, scores: np.ndarray,
                         binary: bool) -> Tuple[Dict[str, Any], bytes]:
    """The response header and, for a binary output, the bytes that follow it."""
    out: Dict[str, Any] = {"name": name, "datatype": "FP32", "shape": [int(scores.shape[0])]}
    tail = b""
    if binary:
        tail = np.ascontiguousarray(scores, dtype=np.float32).tobytes()
        out["parameters"] = {"binary_data_size": len(tail)}
    else:
        out["data"] = scores.tolist()
    head: Dict[str, Any] = {"model_name": model, "model_version": version, "outputs": [out]}
    if request_id:
        head["id"] = request_id
    return head, tail


def metadata(name: str, versions: List[str], features: List[str], dense: int, weighted: bool) -> Dict[str, Any]:
    inputs = [{"name": "dense_features", "datatype": "FP32", "shape": [-1, dense]},
              {"name": "sparse_lengths", "datatype": "INT64", "shape": [len(features), -1]},
              {"name": "sparse_values", "datatype": "INT64", "shape": [-1]}]
    if weighted:
        inputs.append({"name": "sparse_weights", "datatype": "FP32", "shape": [-1]})
    return {"name": name, "versions": versions, "platform": "torchrec_hps", "inputs": inputs,
            "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1]}],
            "parameters": {"sparse_features": features}}
