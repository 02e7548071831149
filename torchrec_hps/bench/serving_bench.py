"""Serving benchmark (`python -m apps.bench_serving`): latency-bounded QPS of the node under open-loop
Poisson load (loadgen.py, in its own process), side by side in one run:
  - the static default scheduler setting (SchedulerConfig()),
  - the best static setting of a sweep over batch_size (and offload_threshold where GPU workers exist),
  - the DeepRecSys hill climber, started from the default and tuned online (each probe first runs unmeasured
    at its rate, the climber on),
each as the highest rate whose p99 stays under each target; the node's offline peak (largest batches,
no latency bound: a closed loop with 64 queries in flight) in the same run; and the server's overhead per request (an empty model,
sequential requests over HTTP and gRPC)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Callable, Dict, Optional, Sequence

import torch


def _dlrm_server(tables: int, rows: int, dim: int, dense: int, cache_ratio: float, gpu_workers: int,
                 cpu_workers: int, tmp: str):
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM

    from torchrec_hps.config import CacheConfig, HPSConfig, MemoryTierConfig, StorageConfig
    from torchrec_hps.serving import (InferenceServer, ModelRepository, SchedulerConfig, ServedModelConfig,
                                      ServerConfig)
    from torchrec_hps.storage import StorageHierarchy

    configs = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows, feature_names=[f"f{i}"])
               for i in range(tables)]
    arch = dict(dense_arch_layer_sizes=[256, dim], over_arch_layer_sizes=[256, 128, 1])
    torch.manual_seed(0)
    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=configs), dense_in_features=dense, **arch)
    ckpt = os.path.join(tmp, "dlrm.pt")
    torch.save(model.state_dict(), ckpt)
    del model
    storage_cfg = StorageConfig(memory=MemoryTierConfig(capacity=rows))
    storage = StorageHierarchy.from_config(storage_cfg)
    hps = HPSConfig(model="bench", cache=CacheConfig(cache_ratio=cache_ratio), storage=storage_cfg)
    devices = ([f"cuda:{i}" for i in range(gpu_workers)] + (["cpu"] if cpu_workers else [])) or ["cpu"]
    repo = ModelRepository(storage, hps, devices=devices)
    repo.load(ServedModelConfig(name="dlrm", path=ckpt, dense_in_features=dense, **arch), configs)
    sched = SchedulerConfig(cpu_workers=cpu_workers, gpu_workers=gpu_workers)
    server = InferenceServer(ServerConfig(http_port=0, grpc_port=0, scheduler=sched), repo,
                             gpu_devices=[d for d in devices if d.startswith("cuda")]).start()
    return server, storage, [rows] * tables


def _loadgen(target: str, bounds: Sequence[int], qps: float, duration: float, p99_ms: Optional[float],
             size_mean: float, timeout_ms: float = 1000.0, warmup_s: float = 0.0,
             concurrency: Optional[int] = None) -> Dict:
    """One loadgen run (or max-QPS search) in its own process."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, "-m", "torchrec_hps.serving.loadgen", "--target", target, "--model", "dlrm",
           "--id-bounds", f"{bounds[0]},x{len(bounds)}", "--qps", str(qps), "--duration", str(duration),
           "--size-mean", str(size_mean), "--json", path]
    if p99_ms:
        cmd += ["--p99-target-ms", str(p99_ms), "--warmup", str(warmup_s)]
    if concurrency:
        cmd += ["--concurrency", str(concurrency)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
    with open(path) as f:
        out = json.load(f)
    os.unlink(path)
    return out


def _overhead(n: int = 400) -> Dict[str, float]:
    """Sequential round trips of a one-sample query to an empty model (its forward is one slice), from a
    client in its own process: what the server itself adds per request, over HTTP and gRPC."""
    from torchrec_hps.config import HPSConfig, MemoryTierConfig, StorageConfig
    from torchrec_hps.serving import InferenceServer, ModelRepository, SchedulerConfig, ServerConfig
    from torchrec_hps.serving.config import ServedModelConfig
    from torchrec_hps.serving.models import ServedVersion
    from torchrec_hps.serving.query import ModelSignature
    from torchrec_hps.storage import StorageHierarchy

    class Empty(torch.nn.Module):
        def forward(self, dense, features):
            return dense[:, 0]

    storage = StorageHierarchy.from_config(StorageConfig(memory=MemoryTierConfig(capacity=1)))
    repo = ModelRepository(storage, HPSConfig(model="empty"), devices=["cpu"])
    served = ServedVersion(config=ServedModelConfig(name="empty"), replicas={"cpu": Empty()},
                           signature=ModelSignature(features=("f",), id_bounds=(10,), dense_in_features=1))
    repo.add(served)  # a model with no tables: nothing to load
    server = InferenceServer(ServerConfig(http_port=0, grpc_port=0, scheduler=SchedulerConfig(
        cpu_workers=1, gpu_workers=0)), repo).start()
    try:
        out = json.loads(subprocess.run(
            [sys.executable, "-m", "torchrec_hps.serving.loadgen", "--target", f"127.0.0.1:{server.grpc_port}",
             "--http-target", f"127.0.0.1:{server.http_port}", "--model", "empty", "--sequential", str(n)],
            check=True, capture_output=True, text=True, timeout=600).stdout.strip().splitlines()[-1])
    finally:
        server.stop()
        storage.close()
    return out


def run_serving_bench(tables: int = 8, rows: int = 100_000, dim: int = 64, dense: int = 13, cache_ratio: float = 0.1,
                      gpu_workers: int = 0, cpu_workers: int = 2, p99_targets: Sequence[float] = (20.0, 50.0),
                      duration: float = 3.0, size_mean: float = 270.0, max_qps: float = 400.0,
                      batch_sizes: Sequence[int] = (32, 64, 128, 256, 512, 1024, 2048),
                      thresholds: Sequence[int] = (1, 64, 256), tune_s: float = 15.0, tuner_window: int = 64,
                      log: Callable[[str], None] = print) -> Dict:
    from torchrec_hps.serving import SchedulerConfig

    result: Dict = {"setup": dict(tables=tables, rows=rows, dim=dim, dense=dense, cache_ratio=cache_ratio,
                                  gpu_workers=gpu_workers, cpu_workers=cpu_workers, size_mean=size_mean,
                                  duration_s=duration, torch_threads=torch.get_num_threads())}
    result["overhead"] = _overhead()
    log(f"server overhead per request (empty model): {result['overhead']}")
    with tempfile.TemporaryDirectory() as tmp:
        server, storage, bounds = _dlrm_server(tables, rows, dim, dense, cache_ratio, gpu_workers, cpu_workers, tmp)
        target = f"127.0.0.1:{server.grpc_port}"
        sched = server.scheduler
        sched.config.tuner_window = tuner_window
        default = SchedulerConfig()

        def setting(batch_size: int, threshold: int, tune: bool = False) -> None:
            sched.set_tuning(False)
            sched.config.batch_size, sched.config.offload_threshold = batch_size, threshold
            if tune:
                sched.set_tuning(True)

        try:
            _loadgen(target, bounds, qps=max_qps / 8, duration=2.0, p99_ms=None, size_mean=size_mean)  # warm-up
            # offline peak: the largest batches, no latency bound: a closed loop keeping 64 queries in the node
            # (an open loop past capacity only grows the queue until deadlines expire)
            setting(2048, 1 if gpu_workers else 1 << 30)
            peak = _loadgen(target, bounds, qps=max_qps, duration=duration * 2, p99_ms=None, size_mean=size_mean,
                            timeout_ms=60_000, concurrency=64)
            result["offline_peak"] = peak
            log(f"offline peak: {peak['samples_per_s']:.0f} samples/s ({peak['achieved_qps']:.1f} QPS)")
            grid = [(b, t) for b in batch_sizes for t in (thresholds if gpu_workers and cpu_workers else
                                                         [default.offload_threshold])]
            for target_ms in p99_targets:
                row: Dict = {}
                setting(default.batch_size, default.offload_threshold)
                row["static_default"] = _loadgen(target, bounds, max_qps, duration, target_ms, size_mean)
                log(f"p99 <= {target_ms} ms: static default {row['static_default']['max_qps']:.1f} QPS")
                sweep = []
                for b, t in grid:
                    setting(b, t)
                    r = _loadgen(target, bounds, max_qps, duration, target_ms, size_mean)
                    sweep.append({"batch_size": b, "offload_threshold": t, **r})
                    log(f"  static batch_size={b} offload_threshold={t}: {r['max_qps']:.1f} QPS")
                row["sweep"] = sweep
                row["best_static"] = max(sweep, key=lambda r: r["max_qps"])
                # the climber, from the default, tunes online: each probe of the search first runs `tune_s`
                # unmeasured at its rate (the climber adapts to that load), then is measured with the climber on
                sched.config.p99_target_ms = target_ms  # the climber's target is the one measured against
                setting(default.batch_size, default.offload_threshold, tune=True)
                row["tuned"] = _loadgen(target, bounds, max_qps, duration, target_ms, size_mean, warmup_s=tune_s)
                row["tuned"]["setting"] = {"batch_size": sched.config.batch_size,
                                           "offload_threshold": sched.config.offload_threshold}
                row["tuned"]["tuner_windows"] = len(sched.tuner.history) if sched.tuner else 0
                log(f"  tuned: {row['tuned']['max_qps']:.1f} QPS at {row['tuned']['setting']}")
                d, b, t = row["static_default"]["max_qps"], row["best_static"]["max_qps"], row["tuned"]["max_qps"]
                row["ratios"] = {"tuned_vs_default": t / d if d else float("inf"),
                                 "tuned_vs_best_static": t / b if b else float("inf"),
                                 "latency_bounded_vs_offline_peak":
                                     row["tuned"].get("samples_per_s", 0.0) / max(peak["samples_per_s"], 1e-9)}
                log(f"  ratios: {row['ratios']}")
                result[f"p99_{target_ms:g}ms"] = row
        finally:
            server.stop()
            storage.close()
    return result
