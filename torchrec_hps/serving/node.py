"""The serving node as a process (`torchrec-hps serve`): tiers from the config, the served model loaded
(swapped onto the tiers, bulk-loaded unless the tiers already hold it), one GPU worker per GPU, CPU
workers beside them, both protocols listening until SIGTERM/SIGINT (or a stop file), then a drain."""
from __future__ import annotations

import json
import os
import signal
import threading
from typing import Callable, Optional

from torchrec_hps.config_file import ServingConfig
from torchrec_hps.serving.config import ServedModelConfig
from torchrec_hps.serving.models import ModelRepository
from torchrec_hps.serving.server import InferenceServer


def gpu_devices(requested: Optional[int]) -> list:
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    n = available if requested is None else requested
    if n > available:
        raise ValueError(f"scheduler.gpu_workers={n}, but this node has {available} GPU(s)")
    return [f"cuda:{i}" for i in range(n)]


def run_server(cfg: ServingConfig, model: Optional[ServedModelConfig] = None, bulk_load: bool = True,
               stop_file: Optional[str] = None, log: Callable[[str], None] = print) -> int:
    from torchrec_hps.storage import StorageHierarchy

    model = model or cfg.serve
    if model is None:
        raise ValueError("no model to serve: the config needs a `serve` section (or pass --checkpoint/--torchscript)")
    if model.source == "torchrec" and not cfg.tables:
        raise ValueError("the config has no `tables`: a `torchrec` model is built from them")
    sched = cfg.server.scheduler
    gpus = gpu_devices(sched.gpu_workers)
    devices = gpus + (["cpu"] if sched.cpu_workers or not gpus else [])
    storage = StorageHierarchy.from_config(cfg.hps.storage)
    repository = ModelRepository(storage, cfg.hps, devices, kafka=cfg.kafka)
    repository.load(model, cfg.tables, bulk_load=bulk_load)
    server = InferenceServer(cfg.server, repository, gpu_devices=gpus, tables={model.name: cfg.tables}).start()
    log(json.dumps({"serving": model.name, "version": model.version, "http_port": server.http_port,
                    "grpc_port": server.grpc_port, "gpu_workers": len(gpus), "cpu_workers": sched.cpu_workers}))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(0.5):
        if stop_file and os.path.exists(stop_file):
            break
    log(json.dumps({"stopping": model.name, **server.scheduler.stats()}))
    server.stop()
    storage.close()
    return 0
