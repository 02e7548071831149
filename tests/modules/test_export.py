"""TorchScript and torch.export round trips of a swapped DLRM, loaded in a fresh process that only
imports torchrec_hps (the op builds the engine from the spec saved in the artifact)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
import torchrec

from tests.modules.test_swap import swapped_dlrm

LOADER = textwrap.dedent("""
    import sys, torch
    import torchrec_hps  # registers torchrec_hps::pooled_lookup
    from torchrec import KeyedJaggedTensor
    kind, artifact, data = sys.argv[1:]
    d = torch.load(data)
    if kind == "script":
        model = torch.jit.load(artifact)
    else:
        model = torch.export.load(artifact).module()
    for dense, keys, values, lengths, want in d:
        kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
        got = model(dense, kjt)
        assert torch.equal(got, want), (got - want).abs().max()
    print("fresh process ok", len(d))
""")


def _swapped(tmp_path, namespace):
    model, storage, batches, expected = swapped_dlrm(tmp_path, namespace, n_batches=3, batch=4, seed=7, cache_ratio=0.1)
    data = [(d, s.keys(), s.values(), s.lengths(), e) for (d, s), e in zip(batches, expected)]
    torch.save(data, tmp_path / "data.pt")
    return model, storage, batches, expected


def _run_fresh(kind, artifact, data):
    out = subprocess.run([sys.executable, "-c", LOADER, kind, str(artifact), str(data)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fresh process ok 3" in out.stdout


def test_torchscript_round_trip_in_a_fresh_process(tmp_path, namespace):
    model, storage, batches, expected = _swapped(tmp_path, namespace)
    scripted = torch.jit.script(torchrec.fx.symbolic_trace(model))  # torchrec's inference path: FX, then script
    with torch.no_grad():
        for (d, s), want in zip(batches, expected):
            torch.testing.assert_close(scripted(d, s), want, rtol=0, atol=0)
    scripted.save(str(tmp_path / "model.pt"))
    direct = torch.jit.script(model)  # the module also scripts without tracing
    torch.testing.assert_close(direct(*batches[0]), expected[0], rtol=0, atol=0)
    model.sparse_arch.embedding_bag_collection.close()
    storage.close()  # release RocksDB's lock for the fresh process
    _run_fresh("script", tmp_path / "model.pt", tmp_path / "data.pt")


def test_torch_export_round_trip_in_a_fresh_process(tmp_path, namespace):
    model, storage, batches, expected = _swapped(tmp_path, namespace)
    from torch.export import Dim, ShapesCollection

    dense, kjt = batches[0]
    shapes = ShapesCollection()  # the number of ids varies per batch: keep it (and the batch) symbolic
    shapes[dense] = {0: Dim.AUTO}
    shapes[kjt.values()] = {0: Dim.AUTO}
    shapes[kjt.lengths()] = {0: Dim.AUTO}
    ep = torch.export.export(model, batches[0], dynamic_shapes=shapes)
    torch.testing.assert_close(ep.module()(*batches[1]), expected[1], rtol=0, atol=0)
    assert "torchrec_hps.pooled_lookup" in str(ep.graph)
    torch.export.save(ep, str(tmp_path / "model.pt2"))
    model.sparse_arch.embedding_bag_collection.close()
    storage.close()
    _run_fresh("export", tmp_path / "model.pt2", tmp_path / "data.pt")
