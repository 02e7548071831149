"""Served models and their versions: load (swap onto the tiers, one replica per device), switch, unload.

A version's tables live in their own namespace (`<name>_v<version>`) in the shared tiers, so v2 bulk-loads
beside a serving v1; `ModelRepository.switch` is one pointer swap under a lock (queries admitted before it
finish on v1, later ones get v2), and `unload` waits for v1's in-flight queries, closes its modules and
removes its namespace from every tier (Redis keys, RocksDB column families)."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_hps.config import HPSConfig, KafkaConfig
from torchrec_hps.modules.hps_ebc import HPSEmbeddingBagCollection
from torchrec_hps.modules.swap import swap_in_hps
from torchrec_hps.serving.config import ServedModelConfig
from torchrec_hps.serving.errors import ModelNotFound, NotReady
from torchrec_hps.serving.query import MIN_GPU_BATCH, ModelSignature
from torchrec_hps.storage.hierarchy import StorageHierarchy

SIGNATURE_FILE = "torchrec_hps_signature.json"  # the extra file a TorchScript artifact carries
WARM_UP_MAX_BATCH = 4096  # padded sizes warmed before traffic: 64, 128, ..., 4096


def signature_of(tables: Sequence[EmbeddingBagConfig], dense_in_features: int, weighted: bool = False
                 ) -> ModelSignature:
    features = tuple(f for t in tables for f in t.feature_names)
    bounds = tuple(t.num_embeddings for t in tables for _ in t.feature_names)
    return ModelSignature(features=features, id_bounds=bounds, dense_in_features=dense_in_features,
                          weighted=weighted)


def save_served_model(model: torch.nn.Module, path: str, signature: ModelSignature) -> None:
    """Script a swapped model (torchrec's FX trace, then TorchScript) and save it with its signature."""
    import torchrec

    scripted = torch.jit.script(torchrec.fx.symbolic_trace(model))
    scripted.save(path, _extra_files={SIGNATURE_FILE: json.dumps(
        {"features": list(signature.features), "id_bounds": list(signature.id_bounds),
         "dense_in_features": signature.dense_in_features, "weighted": signature.weighted})})


def _dlrm(config: ServedModelConfig, tables: Sequence[EmbeddingBagConfig]) -> torch.nn.Module:
    from torchrec.models.dlrm import DLRM

    return DLRM(embedding_bag_collection=EmbeddingBagCollection(tables=list(tables)),
                dense_in_features=config.dense_in_features,
                dense_arch_layer_sizes=list(config.dense_arch_layer_sizes),
                over_arch_layer_sizes=list(config.over_arch_layer_sizes)).eval()


@dataclass
class ServedVersion:
    """One loaded version: a replica per device ("cpu", "cuda:0", ...), all over the same tiers."""

    config: ServedModelConfig
    signature: ModelSignature
    replicas: Dict[str, torch.nn.Module]
    hps_modules: List[HPSEmbeddingBagCollection] = field(default_factory=list)
    tables: List[str] = field(default_factory=list)
    consumer: Optional[object] = None
    _in_flight: int = 0
    _idle: threading.Condition = field(default_factory=threading.Condition)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def version(self) -> str:
        return str(self.config.version)

    def replica(self, device: str) -> torch.nn.Module:
        return self.replicas.get(device) or next(iter(self.replicas.values()))

    def modules_on(self, device: str) -> List[HPSEmbeddingBagCollection]:
        """The HPS modules of the replica on `device`."""
        return [m for m in self.hps_modules if str(m.engine.device) == device]

    def acquire(self) -> None:
        with self._idle:
            self._in_flight += 1

    def release(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def warm_up(self, max_batch: int = WARM_UP_MAX_BATCH) -> None:
        """Before traffic, on every GPU replica and for every padded size from MIN_GPU_BATCH to `max_batch`: a
        forward of an id-less batch, then one pipelined as the GPU worker does (prefetch of the next batch, the
        current batch's forward, which launches it, the next batch's forward). This compiles the cache's kernels and
        captures the graphs of those sizes (on first traffic the compiles held queries for seconds); it reads
        and caches no row. (Warming seven sizes was followed by an illegal memory access until each lookup
        shape got its own sort scratch: see HBMLevel.admit.)"""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        sig = self.signature
        for device, replica in self.replicas.items():
            if not device.startswith("cuda"):
                continue
            modules = self.modules_on(device)
            n = MIN_GPU_BATCH
            while n <= max(MIN_GPU_BATCH, max_batch):
                kjt = KeyedJaggedTensor(keys=list(sig.features), values=torch.zeros(0, dtype=torch.int64),
                                        lengths=torch.zeros(len(sig.features) * n, dtype=torch.int64),
                                        weights=torch.zeros(0) if sig.weighted else None)
                dense = torch.zeros(n, sig.dense_in_features, device=device)
                on_device = kjt.to(device)
                with torch.no_grad():
                    replica(dense, on_device)
                    if len(modules) == 1:  # as the GPU worker pipelines (scheduler.Worker._prefetch_next):
                        modules[0].prefetch(kjt)  # registered now, its graph launched by the next lookup,
                        replica(dense, on_device)
                        replica(dense, kjt)  # which this one reads
                n *= 2
            torch.cuda.synchronize(device)

    def prefill(self, hot_ids: Dict[str, torch.Tensor]) -> int:
        """Warm every replica's cache with `hot_ids` ({table: ids, hottest first})."""
        n = 0
        for module in self.hps_modules:
            names = {c.name for c in module.embedding_bag_configs()}
            for table, ids in hot_ids.items():
                if table in names and ids.numel():
                    n += module.prefill(table, ids)
        return n


class ModelRepository:
    """The models a node serves, over one storage hierarchy shared by every model and version."""

    def __init__(self, storage: StorageHierarchy, hps: HPSConfig, devices: Sequence[str],
                 kafka: Optional[KafkaConfig] = None) -> None:
        self.storage = storage
        self.hps = hps  # cache and tier settings; the namespace comes from each served model
        self.devices = list(devices) or ["cpu"]
        self.kafka = kafka
        self._current: Dict[str, ServedVersion] = {}
        self._versions: Dict[str, Dict[str, ServedVersion]] = {}
        self._lock = threading.Lock()

    # ---- what the scheduler reads ----
    def acquire(self, name: str, version: Optional[str] = None) -> ServedVersion:
        """The version a new query is served by (the current one unless `version` is named), held until
        the query releases it: under the lock, so a switch or unload cannot slip between lookup and hold."""
        with self._lock:
            served = self._get(name, version)
            served.acquire()
            return served

    def get(self, name: str, version: Optional[str] = None) -> ServedVersion:
        with self._lock:
            return self._get(name, version)

    def _get(self, name: str, version: Optional[str]) -> ServedVersion:
        if name not in self._versions:
            raise ModelNotFound(f"unknown model {name!r}; served models: {sorted(self._versions)}")
        if not version:
            if name not in self._current:
                raise NotReady(f"model {name!r} has no version ready yet")
            return self._current[name]
        try:
            return self._versions[name][str(version)]
        except KeyError:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: "
                                f"{sorted(self._versions[name])}") from None

    def names(self) -> List[str]:
        with self._lock:
            return sorted(self._current)

    def versions(self, name: str) -> List[str]:
        with self._lock:
            return sorted(self._versions.get(name, {}))

    def all_versions(self) -> List[ServedVersion]:
        with self._lock:
            return [v for vs in self._versions.values() for v in vs.values()]

    # ---- lifecycle ----
    def load(self, config: ServedModelConfig, tables: Sequence[EmbeddingBagConfig] = (),
             bulk_load: bool = True, make_current: bool = True,
             hot_ids: Optional[Callable[[], Dict[str, torch.Tensor]]] = None) -> ServedVersion:
        """Load a version: build it, bulk-load its weights into its namespace (unless `bulk_load=False`: the
        tiers already hold them, e.g. kept current by Kafka), warm its caches from `hot_ids()` (the live
        traffic's hottest ids), then make it current."""
        with self._lock:
            if str(config.version) in self._versions.get(config.name, {}):
                raise ValueError(f"model {config.name!r} version {config.version} is already loaded")
        if config.source == "torchscript":
            served = self._load_torchscript(config)
        else:
            served = self._load_swapped(config, tables, bulk_load)
        if self.kafka is not None and served.tables:
            from torchrec_hps.train_bridge import UpdateConsumer

            served.consumer = UpdateConsumer(self.kafka, config.name, self.storage, served.tables,
                                             modules=served.hps_modules, namespace=config.namespace,
                                             group_id=f"hps-{config.namespace}-{id(served):x}").start()
            # tiers filled from Kafka, not bulk-loaded: the version goes live only once its consumer has
            # applied everything published so far, else it would serve default rows for what is in flight
            if not bulk_load and not served.consumer.wait_caught_up(self.kafka.catch_up_timeout):
                self._close(served)
                self.storage.remove_tables(config.namespace)  # the rows it had applied: nothing half-loaded stays
                raise NotReady(f"model {config.name!r} v{config.version}: its update consumer did not catch up "
                               f"with the model's Kafka topics within kafka.catch_up_timeout="
                               f"{self.kafka.catch_up_timeout}s; the version was not loaded")
        if hot_ids is not None:
            served.prefill(hot_ids())
        served.warm_up()
        return self.add(served, make_current)

    def add(self, served: ServedVersion, make_current: bool = True) -> ServedVersion:
        """Serve a version built elsewhere (load() builds them; a benchmark's empty model has no tables)."""
        with self._lock:
            self._versions.setdefault(served.name, {})[served.version] = served
            if make_current:
                self._current[served.name] = served
        return served

    def switch(self, name: str, version: str) -> ServedVersion:
        """Make `version` the one new queries get (atomic; queries admitted before finish where they are)."""
        with self._lock:
            try:
                served = self._versions[name][str(version)]
            except KeyError:
                raise ModelNotFound(f"model {name!r} has no loaded version {version!r}") from None
            self._current[name] = served
            return served

    def unload(self, name: str, version: str, timeout: float = 60.0) -> List[str]:
        """Stop serving a version, wait for its in-flight queries, free its caches and its namespace in
        every tier. Returns the tier tables removed."""
        with self._lock:
            served = self._versions.get(name, {}).get(str(version))
            if served is None:
                raise ModelNotFound(f"model {name!r} has no loaded version {version!r}")
            if self._current.get(name) is served:
                del self._current[name]
            del self._versions[name][str(version)]
            if not self._versions[name]:
                del self._versions[name]
        if not served.wait_idle(timeout):
            raise TimeoutError(f"model {name!r} version {version}: queries still in flight after {timeout} s")
        self._close(served)
        return self.storage.remove_tables(served.config.namespace)

    def close(self) -> None:
        """Stop serving everything (a node shutting down): modules and consumers closed, the tiers keep every
        namespace (a restarted node serves them again without a bulk load)."""
        with self._lock:
            versions = [v for vs in self._versions.values() for v in vs.values()]
            self._versions.clear()
            self._current.clear()
        for served in versions:
            served.wait_idle(30)
            self._close(served)

    @staticmethod
    def _close(served: ServedVersion) -> None:
        if served.consumer is not None:
            served.consumer.stop()
        for module in served.hps_modules:
            module.close()

    # ---- builders ----
    def _load_swapped(self, config: ServedModelConfig, tables: Sequence[EmbeddingBagConfig],
                      bulk_load: bool) -> ServedVersion:
        """A replica per device, each swapped onto the shared tiers (the first one bulk-loads)."""
        build = self._module_builder(config) if config.source == "module" else self._dlrm_builder(config, tables)
        hps = HPSConfig(model=config.namespace, cache=self.hps.cache, storage=self.hps.storage)
        replicas: Dict[str, torch.nn.Module] = {}
        modules: List[HPSEmbeddingBagCollection] = []
        for i, device in enumerate(self.devices):
            replica = build()
            swap_in_hps(replica, hps, storage=self.storage, load=bulk_load and i == 0, device=torch.device(device))
            replica.to(device).eval()
            replicas[device] = replica
            modules += [m for m in replica.modules() if isinstance(m, HPSEmbeddingBagCollection)]
        served_tables = [c for m in modules[:len(modules) // len(self.devices)] for c in m.embedding_bag_configs()]
        return ServedVersion(config=config, signature=signature_of(served_tables, config.dense_in_features),
                             replicas=replicas, hps_modules=modules, tables=[t.name for t in served_tables])

    @staticmethod
    def _dlrm_builder(config: ServedModelConfig, tables: Sequence[EmbeddingBagConfig]):
        from torchrec_hps.loader import read_checkpoint

        if not tables:
            raise ValueError(f"model {config.name!r}: source 'torchrec' needs the tables (the config's `tables`)")
        model = _dlrm(config, tables)
        if config.path:
            state = read_checkpoint(config.path)
            state = state.state_dict() if isinstance(state, torch.nn.Module) else state
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if "embedding_bags" not in k]:
                raise ValueError(f"model {config.name!r}: checkpoint {config.path} does not fit the DLRM built from "
                                 f"the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
        dense_state = {k: v for k, v in model.state_dict().items() if "embedding_bags" not in k}
        first = [model]

        def build() -> torch.nn.Module:  # the checkpointed model, then its dense parts again for other devices
            if first:
                return first.pop()
            replica = _dlrm(config, tables)
            replica.load_state_dict(dense_state, strict=False)  # the tables come from the tiers
            return replica
        return build

    @staticmethod
    def _module_builder(config: ServedModelConfig):
        def build() -> torch.nn.Module:
            try:
                model = torch.load(config.path, map_location="cpu", weights_only=False)
            except (OSError, RuntimeError, ValueError) as e:
                raise ValueError(f"model {config.name!r}: cannot load {config.path}: {e}") from None
            if not isinstance(model, torch.nn.Module):
                raise ValueError(f"model {config.name!r}: {config.path} holds a {type(model).__name__}, not a "
                                 "saved nn.Module (source 'module'); a state dict goes with source 'torchrec'")
            return model.eval()
        return build

    def _load_torchscript(self, config: ServedModelConfig) -> ServedVersion:
        extra = {SIGNATURE_FILE: ""}
        try:
            module = torch.jit.load(config.path, _extra_files=extra)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"model {config.name!r}: cannot load TorchScript artifact {config.path}: {e}") from None
        if not extra[SIGNATURE_FILE]:
            raise ValueError(f"model {config.name!r}: {config.path} has no {SIGNATURE_FILE}; save it with "
                             "torchrec_hps.serving.save_served_model")
        sig = json.loads(extra[SIGNATURE_FILE])
        signature = ModelSignature(features=tuple(sig["features"]), id_bounds=tuple(sig["id_bounds"]),
                                   dense_in_features=int(sig["dense_in_features"]), weighted=bool(sig["weighted"]))
        # the artifact's engine (built from the spec it carries) serves on the host: one replica
        return ServedVersion(config=config, signature=signature, replicas={"cpu": module.eval()})
