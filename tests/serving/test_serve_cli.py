"""`torchrec-hps serve` as users run it: a separate process from a YAML config, a TorchRec checkpoint or a
TorchScript artifact, queried by a stock client, stopped by SIGTERM (drains, exits 0)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from tests.serving.conftest import (ARCH, DENSE, TABLES, check_http_scores, expected_scores, grpc_inputs,
                                    http_inputs, make_dlrm, random_query)


def _start(args, tmp_path) -> tuple:
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "apps.cli", "serve", *args], stdout=log, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        log.seek(0)
        for line in log.read().splitlines():
            if line.startswith('{"serving"'):
                return proc, json.loads(line), log
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    log.seek(0)
    proc.kill()
    pytest.fail(f"serve did not start:\n{log.read()[-3000:]}")


def _stop(proc, log) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, open(log.name).read()[-3000:]


def _config(tmp_path, name: str, **extra) -> str:
    cfg = {"model": name, "cache": {"cache_ratio": 0.1, "min_cache_rows": 1, "hit_rate_threshold": 1.0},
           "storage": {"memory": {"capacity": 200}, "rocksdb": {"path": str(tmp_path / "served-db")}},
           "tables": [{"name": t.name, "num_embeddings": t.num_embeddings, "embedding_dim": t.embedding_dim,
                       "feature_names": t.feature_names} for t in TABLES],
           "server": {"http_port": 0, "grpc_port": 0, "scheduler": {"cpu_workers": 2, "batch_size": 8}}, **extra}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_serve_a_checkpoint_from_the_cli(tmp_path, namespace):
    import torch

    model = make_dlrm(seed=4)
    torch.save(model.state_dict(), tmp_path / "dlrm.pt")
    cfg = _config(tmp_path, namespace, serve={"path": str(tmp_path / "dlrm.pt"), "dense_in_features": DENSE, **ARCH})
    proc, info, log = _start(["--config", cfg, "--tune"], tmp_path)
    try:
        check_http_scores(f"127.0.0.1:{info['http_port']}", namespace, model, sizes=(1, 30), seed=7)
    finally:
        _stop(proc, log)


def test_serve_a_torchscript_artifact_from_the_cli(tmp_path, namespace):
    import tritonclient.grpc as grpcclient

    from tests.modules.test_swap import swapped_dlrm
    from torchrec_hps.serving import save_served_model, signature_of

    swapped, storage, _, _ = swapped_dlrm(tmp_path, namespace, n_batches=1, batch=2, seed=5, cache_ratio=0.1)
    from tests.modules.test_swap import DLRM_TABLES, small_dlrm

    reference = small_dlrm()
    save_served_model(swapped, str(tmp_path / "model.pt"), signature_of(DLRM_TABLES, 5))
    swapped.sparse_arch.embedding_bag_collection.close()
    storage.close()  # the artifact's engine opens these tiers in the server process
    cfg = {"model": "scripted", "storage": {"memory": {"capacity": 10}},
           "server": {"http_port": 0, "grpc_port": 0, "scheduler": {"cpu_workers": 1}}}
    (tmp_path / "ts.yaml").write_text(yaml.safe_dump(cfg))
    proc, info, log = _start(["--config", str(tmp_path / "ts.yaml"), "--torchscript", str(tmp_path / "model.pt")],
                             tmp_path)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{info['grpc_port']}")
        gen = np.random.default_rng(8)
        for n in (1, 6):
            q = random_query(n, gen, max_len=2, tables=DLRM_TABLES, dense=5)
            np.testing.assert_allclose(client.infer("scripted", grpc_inputs(q)).as_numpy("scores"),
                                       expected_scores(reference, q, tables=DLRM_TABLES), rtol=1e-5, atol=1e-6)
    finally:
        _stop(proc, log)


def test_torchx_server_component_runs_the_node_and_stops_on_its_stop_file(tmp_path, namespace):
    import torch
    import tritonclient.http as httpclient
    from torchx.runner import get_runner
    from torchx.specs import AppState

    from apps import components

    model = make_dlrm(seed=6)
    torch.save(model.state_dict(), tmp_path / "dlrm.pt")
    import socket

    ports = []
    for _ in range(2):  # free ports for the role (a TorchX role names its ports up front)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    cfg = _config(tmp_path, namespace, serve={"path": str(tmp_path / "dlrm.pt"), "dense_in_features": DENSE, **ARCH})
    app = components.server(cfg, gpus=0, cpu_workers=1, http_port=ports[0], grpc_port=ports[1],
                            stop_file=str(tmp_path / "stop"))
    assert app.roles[0].resource.gpu == 0 and app.roles[0].port_map == {"http": ports[0], "grpc": ports[1]}
    assert components.server(cfg, gpus=2).roles[0].resource.gpu == 2
    runner = get_runner()
    handle = runner.run(app, scheduler="local_cwd", cfg={"log_dir": str(tmp_path / "torchx")})
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if client.is_model_ready(namespace):
                    break
            except Exception:
                pass
            time.sleep(0.5)
        q = random_query(5, np.random.default_rng(9))
        np.testing.assert_allclose(client.infer(namespace, http_inputs(q)).as_numpy("scores"),
                                   expected_scores(model, q), rtol=1e-5, atol=1e-6)
    finally:
        (tmp_path / "stop").write_text("stop")
    assert runner.wait(handle, wait_interval=1).state == AppState.SUCCEEDED
