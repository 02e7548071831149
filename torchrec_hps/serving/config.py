"""Server, scheduler and served-model configs: the same dataclass vocabulary as torchrec_hps.config (the CLI,
the config file's `server:` section and the TorchX component map onto these)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from torchrec_hps.config import _check_choice, _check_range, _check_types

MODEL_SOURCES = ("torchrec", "module", "torchscript")


@dataclass
class SchedulerConfig:
    """DeepRecSys's knobs (ISCA'20): queries of at least `offload_threshold` samples go to the GPU workers,
    the rest to CPU workers, split into (and coalesced up to) `batch_size` samples. `tune` lets a hill climber
    move batch_size, then offload_threshold, online against `p99_target_ms`."""

    batch_size: int = 256
    gpu_batch_size: int = 16384  # most samples one GPU forward takes (larger queries are split)
    # a GPU worker prefetches the next batch's rows during a forward only from this size: below it the side
    # stream's work costs more than it hides (H200, DLRM at 10%: B=2048 1.64 vs 1.28 ms, B=16384 3.67 vs 4.82)
    prefetch_min_batch: int = 8192
    offload_threshold: int = 64
    # a CPU-routed query of at most this many samples that finds a CPU worker idle (nothing queued) is served
    # in the thread that admits it, sparing the two thread hand-offs; 0: always through the queue
    inline_max_samples: int = 16
    cpu_workers: int = 2
    gpu_workers: Optional[int] = None  # None: one per visible GPU; 0: CPU only
    torch_threads: Optional[int] = None  # intra-op threads; None: the cores shared out among the CPU workers
    max_queued_samples: int = 1 << 17  # admission bound: beyond it a query is refused (429), nothing queued
    max_query_samples: int = 1 << 14  # larger queries are a 400
    deadline_ms: float = 1000.0  # default per-query deadline (a request may ask for less)
    tune: bool = False
    p99_target_ms: float = 20.0
    tuner_window: int = 256  # completed queries per tuner measurement

    def __post_init__(self) -> None:
        _check_types(self, "scheduler")
        for name in ("batch_size", "gpu_batch_size", "prefetch_min_batch", "offload_threshold", "max_queued_samples",
                     "max_query_samples", "tuner_window"):
            _check_range("scheduler", name, getattr(self, name), 1, 1 << 40)
        _check_range("scheduler", "cpu_workers", self.cpu_workers, 0, 1024)
        _check_range("scheduler", "inline_max_samples", self.inline_max_samples, 0, 1 << 40)
        for name in ("gpu_workers", "torch_threads"):
            if getattr(self, name) is not None:
                _check_range("scheduler", name, getattr(self, name), 0 if name == "gpu_workers" else 1, 1024)
        _check_range("scheduler", "deadline_ms", self.deadline_ms, 1e-3, 1e9)
        _check_range("scheduler", "p99_target_ms", self.p99_target_ms, 1e-3, 1e9)


@dataclass
class ServerConfig:
    """Where the node listens. `grpc_port=0` / `http_port=0` pick a free port; None turns that protocol off."""

    host: str = "127.0.0.1"
    http_port: Optional[int] = 8000
    grpc_port: Optional[int] = 8001
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        _check_types(self, "server")
        for name in ("http_port", "grpc_port"):
            if getattr(self, name) is not None:
                _check_range("server", name, getattr(self, name), 0, 65535)
        if self.http_port is None and self.grpc_port is None:
            raise ValueError("server: http_port and grpc_port are both null; the server needs one protocol")


@dataclass
class ServedModelConfig:
    """A model the server loads. `torchrec`: torchrec's DLRM over the config's tables (dense arch sizes below),
    weights from `path` (a TorchRec checkpoint) when given, swapped onto the tiers at load. `module`: a whole
    model saved with torch.save (any model holding TorchRec EBCs, also one passed through
    `quantize_inference_model`), swapped onto the tiers at load; `dense_in_features` is its dense width.
    `torchscript`: an artifact written by `torchrec_hps.serving.save_served_model` (a swapped model, scripted,
    with its signature)."""

    name: str
    version: int = 1
    source: str = "torchrec"
    path: Optional[str] = None
    dense_in_features: int = 13
    dense_arch_layer_sizes: List[int] = field(default_factory=lambda: [512, 256, 64])
    over_arch_layer_sizes: List[int] = field(default_factory=lambda: [512, 512, 256, 1])

    def __post_init__(self) -> None:
        _check_types(self, "model")
        _check_choice("model", "source", self.source, MODEL_SOURCES)
        _check_range("model", "version", self.version, 1, 1 << 62)
        if self.source in ("torchscript", "module") and not self.path:
            raise ValueError(f"model {self.name!r}: source {self.source!r} needs `path` (the saved model)")
        if not self.name or any(c in self.name for c in " ./{}"):
            raise ValueError(f"model.name={self.name!r}: non-empty, no spaces, dots, slashes or braces")

    @property
    def namespace(self) -> str:
        """The tables' namespace in the tiers: each version its own, so v2 loads beside v1 and v1's unload
        frees only v1's rows."""
        return f"{self.name}_v{self.version}"
