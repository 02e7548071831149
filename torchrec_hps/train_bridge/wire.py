"""The one wire format of embedding updates on Kafka (one message = rows of one table):

    magic  b"HPSU"   4 bytes
    version          u8   (1)
    dtype            u8   (0 = float32, 1 = float16)
    reserved         u16  (0)
    dim              u32
    count            u32
    ids              count x int64
    rows             count x dim x dtype
    crc32            u32  of every byte before it

All little-endian. Decoding checks every field and raises WireFormatError with the reason; nothing else.
"""
from __future__ import annotations

import struct
import zlib
from typing import List, Tuple

import numpy as np
import torch

MAGIC = b"HPSU"
VERSION = 1
_HEADER = struct.Struct("<4sBBHII")
_CRC = struct.Struct("<I")
_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}
_CODES = {np.dtype("<f4"): 0, np.dtype("<f2"): 1}
MIN_SIZE = _HEADER.size + _CRC.size


class WireFormatError(ValueError):
    pass


def encode(ids: np.ndarray, rows: np.ndarray) -> bytes:
    ids = np.ascontiguousarray(ids, dtype="<i8")
    rows = np.ascontiguousarray(rows)
    if rows.dtype not in _CODES:
        rows = rows.astype("<f4")
    if rows.ndim != 2 or rows.shape[0] != len(ids):
        raise ValueError(f"rows must be [{len(ids)}, dim], got {list(rows.shape)}")
    body = _HEADER.pack(MAGIC, VERSION, _CODES[rows.dtype], 0, rows.shape[1], len(ids)) + ids.tobytes() + rows.tobytes()
    return body + _CRC.pack(zlib.crc32(body))


def encode_chunks(ids: np.ndarray, rows: np.ndarray, max_bytes: int) -> List[bytes]:
    """Messages of at most `max_bytes` covering all (ids, rows), in order."""
    row_bytes = 8 + rows.shape[1] * rows.dtype.itemsize
    per_message = (max_bytes - MIN_SIZE) // row_bytes
    if per_message < 1:
        raise ValueError(f"max_bytes={max_bytes} cannot hold one row of {row_bytes} bytes")
    return [encode(ids[i:i + per_message], rows[i:i + per_message]) for i in range(0, len(ids), per_message)]


def decode(data: bytes, expected_dim: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 [N], rows float32 [N, dim]); raises WireFormatError on any inconsistency."""
    ids, rows = decode_arrays(data, expected_dim)
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(rows.astype(np.float32))


def decode_arrays(data: bytes, expected_dim: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """As `decode`, without a copy: read-only views into `data` (ids int64 [N], rows [N, dim] in the
    message's dtype), for a caller that concatenates messages anyway (the consumer)."""
    if data is None or len(data) < MIN_SIZE:
        raise WireFormatError(f"truncated: {0 if data is None else len(data)} bytes, header and checksum need {MIN_SIZE}")
    magic, version, code, reserved, dim, count = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireFormatError(f"unsupported version {version}, expected {VERSION}")
    if code not in _DTYPES:
        raise WireFormatError(f"unknown dtype code {code}")
    if reserved != 0:
        raise WireFormatError(f"reserved field is {reserved}, must be 0")
    dtype = _DTYPES[code]
    expected = MIN_SIZE + count * 8 + count * dim * dtype.itemsize
    if len(data) != expected:
        raise WireFormatError(f"size {len(data)} bytes does not match count {count} x dim {dim} ({expected} bytes)")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(memoryview(data)[:-_CRC.size]) != crc:
        raise WireFormatError("checksum mismatch")
    if expected_dim and dim != expected_dim:
        raise WireFormatError(f"dim {dim} does not match the table's dim {expected_dim}")
    ids = np.frombuffer(data, dtype="<i8", count=count, offset=_HEADER.size)
    rows = np.frombuffer(data, dtype=dtype, count=count * dim, offset=_HEADER.size + 8 * count).reshape(count, dim)
    return ids, rows
