"""The update wire format: round trips, and a decoder that rejects anything malformed with WireFormatError."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_hps.train_bridge.wire import MIN_SIZE, WireFormatError, decode, encode, encode_chunks


@given(n=st.integers(0, 50), dim=st.integers(1, 16), half=st.booleans(), seed=st.integers(0, 1000))
def test_round_trip(n, dim, half, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 2**40, n)
    rows = rng.standard_normal((n, dim)).astype(np.float16 if half else np.float32)
    got_ids, got_rows = decode(encode(ids, rows), expected_dim=dim)
    assert got_ids.tolist() == ids.tolist()
    assert torch.equal(got_rows, torch.from_numpy(rows.astype(np.float32)))


def test_chunks_respect_the_size_bound():
    ids, rows = np.arange(1000), np.ones((1000, 128), np.float32)
    msgs = encode_chunks(ids, rows, max_bytes=64 * 1024)
    assert len(msgs) > 1 and all(len(m) <= 64 * 1024 for m in msgs)
    assert torch.cat([decode(m)[0] for m in msgs]).tolist() == list(range(1000))


def test_each_kind_of_damage_has_its_reason():
    good = encode(np.arange(3), np.ones((3, 4), np.float32))
    cases = {
        b"XXXX" + good[4:]: "bad magic",
        good[:4] + b"\x07" + good[5:]: "unsupported version",
        good[:-1]: "does not match",
        good[:10]: "truncated",
        good[:-5] + bytes([good[-5] ^ 1]) + good[-4:]: "checksum",
    }
    reserved = bytearray(good[:-4])
    reserved[6] = 1  # the reserved u16 after magic, version, dtype; the checksum made valid again
    cases[bytes(reserved) + zlib.crc32(bytes(reserved)).to_bytes(4, "little")] = "reserved field is 1, must be 0"
    for data, reason in cases.items():
        with pytest.raises(WireFormatError, match=reason):
            decode(data)
    with pytest.raises(WireFormatError, match="dim 4 does not match the table's dim 8"):
        decode(good, expected_dim=8)


@settings(max_examples=300)
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes_only_raise_wire_errors(data):
    try:
        ids, rows = decode(data)
    except WireFormatError:
        return
    assert len(data) >= MIN_SIZE and rows.shape[0] == ids.shape[0]


@settings(max_examples=300)
@given(pos=st.integers(0, 10_000), byte=st.integers(0, 255), cut=st.integers(0, 10_000))
def test_fuzz_mutated_messages_never_decode_wrong(pos, byte, cut):
    good = encode(np.arange(5), np.arange(20, dtype=np.float32).reshape(5, 4))
    data = bytearray(good)
    data[pos % len(data)] = byte
    data = bytes(data[: len(data) - (cut % 3 == 0) * (cut % len(data))])
    try:
        ids, rows = decode(data)
    except WireFormatError:
        return
    assert data == good  # only an unchanged message decodes
