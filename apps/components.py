"""TorchX components: `torchx run -s local_cwd apps/components.py:<name> --config hps.yaml ...`.

The same AppDefs go to Kubernetes or Slurm with `-s kubernetes` / `-s slurm` (set `image` to a container
holding this package and the pinned stack)."""
# no `from __future__ import annotations`: torchx reads these annotations at run time
import sys
from typing import Optional

import torchx.specs as specs

_IMAGE = "torchrec-hps:latest"


def _role(name: str, module: str, args: list, image: str, cpu: int, memMB: int, gpu: int = 0,
          port_map: Optional[dict] = None) -> specs.Role:
    # local_cwd runs the entrypoint in this checkout: use the interpreter that runs torchx (the venv's)
    return specs.Role(name=name, image=image, entrypoint=sys.executable, args=["-m", module, *args],
                      resource=specs.Resource(cpu=cpu, gpu=gpu, memMB=memMB), env={"PYTHONUNBUFFERED": "1"},
                      port_map=port_map or {})


def server(config: str, gpus: int = 0, cpu_workers: int = 2, http_port: int = 8000, grpc_port: int = 8001,
           checkpoint: Optional[str] = None, tune: bool = False, stop_file: Optional[str] = None,
           image: str = _IMAGE, cpu: int = 4, memMB: int = 16384) -> specs.AppDef:
    """The serving node (`torchrec-hps serve`): Open Inference Protocol over HTTP and gRPC, one GPU worker
    per requested GPU (the scheduler gives the role that many), `cpu_workers` CPU workers beside them."""
    args = ["serve", "--config", config, "--gpu-workers", str(gpus), "--cpu-workers", str(cpu_workers),
            "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--host", "0.0.0.0"]
    args += ["--checkpoint", checkpoint] if checkpoint else []
    args += ["--tune"] if tune else []
    args += ["--stop-file", stop_file] if stop_file else []
    return specs.AppDef(name="hps-server", roles=[_role("server", "apps.cli", args, image, cpu, memMB, gpu=gpus,
                                                        port_map={"http": http_port, "grpc": grpc_port})])


def trainer(config: str, steps: int = 100, checkpoint: Optional[str] = None, save: Optional[str] = None,
            image: str = _IMAGE, cpu: int = 2, memMB: int = 4096) -> specs.AppDef:
    """Trains the config's tables and publishes the changed rows to Kafka."""
    args = ["--config", config, "--steps", str(steps)]
    args += ["--checkpoint", checkpoint] if checkpoint else []
    args += ["--save", save] if save else []
    return specs.AppDef(name="hps-trainer", roles=[_role("trainer", "apps.train_node", args, image, cpu, memMB)])


def inference_node(config: str, duration: float = 30.0, group_id: Optional[str] = None,
                   metrics_port: Optional[int] = None, stop_file: Optional[str] = None, image: str = _IMAGE,
                   cpu: int = 2, memMB: int = 8192) -> specs.AppDef:
    """A synthetic node: draws its own Zipf lookups through HPSEmbeddingBagCollection while consuming
    updates (a soak/load driver for the tiers; `server` is the node that takes requests)."""
    args = ["--config", config, "--duration", str(duration)]
    args += ["--stop-file", stop_file] if stop_file else []
    args += ["--group-id", group_id] if group_id else []
    args += ["--metrics-port", str(metrics_port)] if metrics_port else []
    return specs.AppDef(name="hps-inference", roles=[_role("inference", "apps.serve_node", args, image, cpu, memMB)])


def bulk_loader(config: str, checkpoint: str, image: str = _IMAGE, cpu: int = 2, memMB: int = 4096) -> specs.AppDef:
    """Loads a TorchRec checkpoint into the tiers that keep full copies."""
    args = ["load", "--config", config, "--checkpoint", checkpoint, "--quiet"]
    return specs.AppDef(name="hps-bulk-loader", roles=[_role("loader", "apps.cli", args, image, cpu, memMB)])
