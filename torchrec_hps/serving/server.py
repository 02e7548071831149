"""The inference node: a ModelRepository (what is served), a Scheduler (who runs it), and the two Open
Inference Protocol frontends (HTTP and gRPC) on one asyncio loop in a background thread.

`InferenceServer.start()` returns once both ports listen; `stop()` drains: the frontends stop taking
requests, queued queries finish, the models are unloaded (unless kept for the caller)."""
from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from torchrec_hps import __version__
from torchrec_hps.serving.config import ServedModelConfig, ServerConfig
from torchrec_hps.serving.errors import ModelNotFound, RequestError
from torchrec_hps.serving.hot_ids import feature_tables
from torchrec_hps.serving.models import ModelRepository, ServedVersion
from torchrec_hps.serving.oip import tensors as oip
from torchrec_hps.serving.requests import parse_query_inputs
from torchrec_hps.serving.scheduler import Scheduler


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (uvicorn[standard] brings it): measured here, it takes ~0.1-0.2 ms off each
    request's round trip; else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class InferenceServer:
    def __init__(self, config: ServerConfig, repository: ModelRepository, gpu_devices: Sequence[str] = (),
                 tables: Optional[Dict[str, Sequence]] = None) -> None:
        """`tables`: each model's EmbeddingBagConfigs ({name: tables}), for loading new versions."""
        self.config = config
        self.repository = repository
        self.scheduler = Scheduler(config.scheduler, repository, gpu_devices)
        self.tables: Dict[str, Sequence] = dict(tables or {})
        self.http_port: Optional[int] = None
        self.grpc_port: Optional[int] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._started = threading.Event()
        self._stop: Optional[asyncio.Event] = None
        self._error: Optional[BaseException] = None
        self._lifecycle = threading.Lock()  # one load/unload at a time

    # ---- the protocol's questions ----
    def ready(self) -> bool:
        return self._started.is_set() and not self.scheduler.stopped and bool(self.repository.names())

    def model_ready(self, name: str, version: Optional[str] = None) -> bool:
        try:
            self.repository.get(name, version)
            return not self.scheduler.stopped
        except RequestError:
            return False

    def server_metadata(self) -> Dict[str, Any]:
        return {"name": "torchrec-hps", "version": __version__,
                "extensions": ["binary_tensor_data", "model_repository"]}

    def model_metadata(self, name: str, version: Optional[str] = None) -> Dict[str, Any]:
        served = self.repository.get(name, version)
        sig = served.signature
        return oip.metadata(name, self.repository.versions(name), list(sig.features), sig.dense_in_features,
                            sig.weighted)

    async def infer(self, name: str, version: Optional[str], tensors: Dict[str, np.ndarray],
                    timeout_ms: Optional[float] = None, request_id: str = "") -> Tuple[np.ndarray, str]:
        """Scores for one query and the version that served it; RequestError subclasses for the caller."""
        if timeout_ms is not None and (not isinstance(timeout_ms, (int, float)) or timeout_ms <= 0):
            raise RequestError(f"parameter timeout_ms={timeout_ms!r} must be a positive number of milliseconds")
        served = self.repository.get(name, version)
        dense, lengths, values, weights = parse_query_inputs(tensors, served.signature,
                                                             self.config.scheduler.max_query_samples)
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def settle(query, error) -> None:
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(query)

        here = threading.get_ident()

        def answer(query, error) -> None:  # from a worker, or from this thread (the scheduler's inline path)
            if threading.get_ident() == here:
                settle(query, error)
            else:
                loop.call_soon_threadsafe(settle, query, error)

        query = self.scheduler.submit(name, version, dense, lengths, values, weights, timeout_ms, answer,
                                      request_id)
        await future
        return query.scores.numpy(), query.served.version

    # ---- lifecycle ----
    def roll(self, config: ServedModelConfig, bulk_load: bool = True, unload_previous: bool = True,
             warm: bool = True) -> ServedVersion:
        """Load `config` (a new version, or a new model) beside what serves, warm its caches from the live
        traffic's hottest ids, switch to it atomically, then unload the version it replaces."""
        with self._lifecycle:
            tables = self.tables.get(config.name, ())
            try:
                previous: Optional[ServedVersion] = self.repository.get(config.name)
            except RequestError:
                previous = None
            hot = None
            if warm and tables:
                limit = max(self.repository.hps.cache.rows_for(t.num_embeddings) for t in tables)
                hot = lambda: self.scheduler.hot_ids.hottest(config.name, feature_tables(tables), limit)  # noqa: E731
            served = self.repository.load(config, tables, bulk_load=bulk_load, make_current=False, hot_ids=hot)
            self.repository.switch(config.name, served.version)
            if previous is not None and unload_previous:
                self.repository.unload(config.name, previous.version)
            return served

    async def load_model(self, name: str, params: Dict[str, Any]) -> str:
        """The repository extension's load: parameters name the new version (`version`, `path`, `source`,
        `bulk_load`, `unload_previous`); the model's other settings are those of its serving version."""
        try:
            base = self.repository.get(name).config
        except RequestError:
            raise ModelNotFound(f"model {name!r} is not served; start the server with it") from None
        allowed = {"version", "path", "source", "bulk_load", "unload_previous"}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise RequestError(f"load parameters {unknown} are unknown; allowed: {sorted(allowed)}")
        try:
            config = ServedModelConfig(name=name, version=params.get("version", base.version + 1),
                                       source=params.get("source", base.source), path=params.get("path", base.path),
                                       dense_in_features=base.dense_in_features,
                                       dense_arch_layer_sizes=base.dense_arch_layer_sizes,
                                       over_arch_layer_sizes=base.over_arch_layer_sizes)
        except ValueError as e:
            raise RequestError(str(e)) from None
        loop = asyncio.get_running_loop()
        try:
            served = await loop.run_in_executor(None, lambda: self.roll(
                config, bulk_load=bool(params.get("bulk_load", True)),
                unload_previous=bool(params.get("unload_previous", True))))
        except ValueError as e:
            raise RequestError(str(e)) from None
        return served.version

    async def unload_model(self, name: str, version: Optional[str] = None) -> List[str]:
        served = self.repository.get(name, version)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, lambda: self.repository.unload(name, served.version))

    # ---- metrics ----
    def metrics_text(self) -> Tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        from torchrec_hps.metrics import HPSCollector
        from torchrec_hps.serving.metrics import SchedulerCollector

        versions = self.repository.all_versions()
        registry = CollectorRegistry()
        # one module per version (replicas share the namespace, and Prometheus wants one sample per label set)
        registry.register(HPSCollector([v.hps_modules[0] for v in versions if v.hps_modules],
                                       [self.repository.storage], [v.consumer for v in versions if v.consumer]))
        registry.register(SchedulerCollector(self.scheduler, self.repository))
        return generate_latest(registry), CONTENT_TYPE_LATEST

    # ---- running ----
    def start(self, timeout: float = 60.0) -> "InferenceServer":
        self._thread = threading.Thread(target=self._run, name="hps-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the server did not start: {self._error!r}")
        return self

    def _run(self) -> None:
        self._loop = _new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as e:  # reported to start()'s caller
            self._error = e
            self._started.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        import uvicorn

        from torchrec_hps.serving.grpc_server import build_grpc_server
        from torchrec_hps.serving.http_server import build_app

        self._stop = asyncio.Event()
        grpc_server = http = None
        tasks = []
        if self.config.grpc_port is not None:
            grpc_server, self.grpc_port = build_grpc_server(self, f"{self.config.host}:{self.config.grpc_port}")
            await grpc_server.start()
        if self.config.http_port is not None:
            # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and without it
            # a response written in two parts waits ~40 ms for the client's delayed ACK (measured here)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.config.host, self.config.http_port))
            self.http_port = sock.getsockname()[1]
            http = uvicorn.Server(uvicorn.Config(build_app(self), log_level="warning", lifespan="off",
                                                 access_log=False, timeout_graceful_shutdown=5))
            tasks.append(asyncio.create_task(http.serve(sockets=[sock])))
            while not http.started and not tasks[0].done():
                await asyncio.sleep(0.01)
            if tasks[0].done():
                tasks[0].result()
        self._started.set()
        await self._stop.wait()
        if http is not None:
            http.should_exit = True
        if grpc_server is not None:
            await grpc_server.stop(grace=2.0)
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Stop taking requests, answer what is queued, stop the workers, close the models (their namespaces
        stay in the tiers: `unload_model` frees those)."""
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)
        self.scheduler.stop()
        self.repository.close()

    def __enter__(self) -> "InferenceServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
