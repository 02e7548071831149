"""Config files onto the project's dataclasses: our own YAML/JSON layout, and HugeCTR HPS's `ps.json` so
HPS users can migrate. Keys that do not map are reported by name (`ServingConfig.report`), never dropped
silently; invalid values raise ValueError naming the key and the allowed values.

Our layout (YAML or JSON):

    model: ctr_v1
    cache: {cache_ratio: 0.1, hit_rate_threshold: 0.9, eviction: lru, default_value: 0.0}
    storage:
      memory: {capacity: 1000000, overflow_policy: evict_lru}
      redis: {cluster_nodes: ["10.0.0.1:7000", "10.0.0.2:7000"]}
      rocksdb: {path: /var/lib/hps/rocksdb}
    kafka: {bootstrap_servers: "broker:9092"}
    tables:
      - {name: t0, num_embeddings: 1000000, embedding_dim: 128, feature_names: [f0], pooling: SUM}
    server: {http_port: 8000, grpc_port: 8001, scheduler: {cpu_workers: 2, tune: true, p99_target_ms: 20}}
    serve: {version: 1, source: torchrec, path: dlrm.pt, dense_in_features: 13,
            dense_arch_layer_sizes: [512, 256, 128], over_arch_layer_sizes: [1024, 1024, 512, 256, 1]}

`server` and `serve` (the served model; its name is `model`) are read by `torchrec-hps serve` only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from torchrec_hps.config import (CacheConfig, HPSConfig, KafkaConfig, MemoryTierConfig, RedisTierConfig,
                                 RocksDBTierConfig, StorageConfig, _build, hps_config_from_dict)
from torchrec_hps.serving.config import SchedulerConfig, ServedModelConfig, ServerConfig


@dataclass
class ServingConfig:
    hps: HPSConfig
    kafka: Optional[KafkaConfig] = None
    tables: List[Any] = field(default_factory=list)  # torchrec EmbeddingBagConfigs (may be empty)
    server: ServerConfig = field(default_factory=ServerConfig)
    serve: Optional[ServedModelConfig] = None
    report: List[str] = field(default_factory=list)  # keys that were not used, with why


def _read(path: Union[str, Path]) -> Any:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"cannot read config {p}: {e.strerror}") from None
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON: {e}") from None


def _tables(items: List[Dict[str, Any]], where: str) -> List[Any]:
    from torchrec import EmbeddingBagConfig
    from torchrec.modules.embedding_configs import PoolingType

    out = []
    for i, t in enumerate(items or []):
        allowed = {"name", "num_embeddings", "embedding_dim", "feature_names", "pooling"}
        unknown = sorted(set(t) - allowed)
        if unknown:
            raise ValueError(f"{where}[{i}]: unknown keys {unknown}; allowed keys: {sorted(allowed)}")
        pooling = str(t.get("pooling", "SUM")).upper()
        if pooling not in ("SUM", "MEAN"):
            raise ValueError(f"{where}[{i}].pooling={t.get('pooling')!r} is not allowed; expected one of ['SUM', 'MEAN']")
        out.append(EmbeddingBagConfig(name=t["name"], num_embeddings=int(t["num_embeddings"]),
                                      embedding_dim=int(t["embedding_dim"]),
                                      feature_names=list(t.get("feature_names", [t["name"]])),
                                      pooling=PoolingType[pooling]))
    return out


def load_config(path: Union[str, Path], model: Optional[str] = None) -> ServingConfig:
    """Read a config file (ours or HugeCTR's ps.json); `model` picks one of a ps.json's models."""
    data = _read(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    if "models" in data:
        return from_ps_json(data, model)
    data = dict(data)
    kafka = _build(KafkaConfig, data.pop("kafka", None), "kafka")
    tables = _tables(data.pop("tables", None), "tables")
    server_data = dict(data.pop("server", None) or {})
    scheduler = _build(SchedulerConfig, server_data.pop("scheduler", None), "server.scheduler") or SchedulerConfig()
    server = _build(ServerConfig, {**server_data, "scheduler": scheduler}, "server")
    serve_data = data.pop("serve", None)
    hps = hps_config_from_dict(data)
    serve = None
    if serve_data is not None:
        if not isinstance(serve_data, dict) or "name" in serve_data:
            raise ValueError("serve: expected a mapping without `name` (the served model is `model`)")
        serve = _build(ServedModelConfig, {"name": hps.model, **serve_data}, "serve")
    return ServingConfig(hps=hps, kafka=kafka, tables=tables, server=server, serve=serve)


# ---- HugeCTR HPS ps.json ----
_HPS_POLICIES = {"evict_random": "evict_random", "evict_least_used": "evict_lfu", "evict_oldest": "evict_lru"}
_NOT_USED = {
    "top": {"supportlonglong": "ids are always int64 here",
            "fuse_embedding_table": "tables of one pooling mode share one TBE here anyway"},
    "model": {"sparse_files": "load tables with `torchrec-hps load` from a TorchRec checkpoint",
              "dense_file": "dense parts stay in the TorchRec model", "network_file": "no HugeCTR network here",
              "deployed_device_list": "pass device= to the module", "max_batch_size": "no fixed batch size",
              "num_of_worker_buffer_in_pool": "no worker pool", "maxnum_catfeature_query_per_table_per_sample":
              "not needed", "gpucache": "the cache is always on (gpucacheper=1.0 caches every row)",
              "cache_refresh_percentage_per_iteration": "use refresh() on demand",
              "label_dim": "not used", "slot_num": "not used", "use_static_table": "not used",
              "use_context_stream": "not used", "fuse_embedding_table": "tables of one pooling mode share one "
              "TBE here anyway", "num_of_refresher_buffer_in_pool": "one refresher thread, no buffer pool",
              "refresh_interval": "mapped to cache.refresh_interval", "refresh_delay": "mapped to cache.refresh_delay",
              "embedding_cache_type":
              "one cache implementation", "enable_pagelock": "not used", "i64_input_key": "ids are int64"},
    "volatile_db": {"initial_cache_rate": "the memory tier fills on demand", "refresh_interval": "not supported yet",
                    "update_filters": "every table of the model is updated", "max_batch_size":
                    "applies to Redis only", "allocation_rate": "not used", "shared_memory_size": "not used",
                    "shared_memory_name": "not used", "max_get_batch_size": "not used",
                    "max_set_batch_size": "not used", "cache_missed_embeddings": "mapped to promote"},
    "persistent_db": {"update_filters": "every table of the model is updated", "max_batch_size": "not used",
                      "max_get_batch_size": "not used", "max_set_batch_size": "not used",
                      "num_threads": "mapped to read_threads"},
    "update_source": {"receive_buffer_size": "librdkafka defaults", "max_receive_buffer_size": "not used",
                      "max_batch_size": "not used", "failure_backoff_ms": "mapped to retry_backoff",
                      "max_commit_interval": "not mapped (a count of messages); commits are timed by kafka.commit_interval",
                      "poll_timeout_ms": "mapped to poll_timeout"},
}


def _take(d: Dict[str, Any], section: str, used: set, report: List[str]) -> None:
    for key in sorted(set(d) - used):
        why = _NOT_USED.get(section, {}).get(key)
        if why and why.startswith("mapped"):
            continue
        report.append(f"{section}.{key}: " + (f"ignored ({why})" if why else "unknown key, ignored"))


def from_ps_json(data: Dict[str, Any], model: Optional[str] = None) -> ServingConfig:
    report: List[str] = []
    models = data.get("models") or []
    if not models:
        raise ValueError("ps.json: 'models' is empty")
    names = [m.get("model") for m in models]
    if model is None:
        m = models[0]
        if len(models) > 1:
            report.append(f"models: {len(models)} models in the file, using {names[0]!r} (choose with --model)")
    elif model in names:
        m = models[names.index(model)]
    else:
        raise ValueError(f"ps.json: no model {model!r}; models: {names}")
    _take({k: v for k, v in data.items() if k not in ("models", "volatile_db", "persistent_db", "update_source")},
          "top", set(), report)

    storage = StorageConfig()
    vdb = data.get("volatile_db")
    if vdb:
        kind = vdb.get("type", "parallel_hash_map")
        promote = bool(vdb.get("cache_missed_embeddings", False))
        if kind in ("hash_map", "parallel_hash_map"):
            policy = vdb.get("overflow_policy", "evict_random")
            if policy not in _HPS_POLICIES:
                raise ValueError(f"volatile_db.overflow_policy={policy!r} is not allowed; expected one of "
                                 f"{list(_HPS_POLICIES)}")
            parts = int(vdb.get("num_partitions", 16))
            margin = vdb.get("overflow_margin")
            storage.memory = MemoryTierConfig(
                capacity=int(margin) * parts if margin is not None else None, num_partitions=parts,
                overflow_policy=_HPS_POLICIES[policy],
                resolution_target=float(vdb.get("overflow_resolution_target", 0.8)), promote=promote)
            used = {"type", "num_partitions", "overflow_margin", "overflow_policy", "overflow_resolution_target",
                    "cache_missed_embeddings"}
        elif kind == "redis_cluster":
            address = vdb.get("address", "")
            nodes = [a.strip() for a in address.split(",") if a.strip()]
            if not nodes:
                raise ValueError("volatile_db.address is required for type 'redis_cluster' (host:port,host:port)")
            storage.redis = RedisTierConfig(
                cluster_nodes=nodes, username=vdb.get("user_name") or None, password=vdb.get("password") or None,
                num_partitions=int(vdb.get("num_partitions", 16)),
                max_batch_size=int(vdb.get("max_batch_size", 4096)), promote=promote)
            used = {"type", "address", "user_name", "password", "num_partitions", "max_batch_size",
                    "cache_missed_embeddings"}
            for k in ("overflow_margin", "overflow_policy", "overflow_resolution_target"):
                if k in vdb:
                    report.append(f"volatile_db.{k}: ignored for redis_cluster (use Redis maxmemory policies)")
                    used.add(k)
        else:
            raise ValueError(f"volatile_db.type={kind!r} is not allowed; expected one of "
                             "['hash_map', 'parallel_hash_map', 'redis_cluster']")
        _take(vdb, "volatile_db", used, report)
    pdb = data.get("persistent_db")
    if pdb:
        kind = pdb.get("type", "rocks_db")
        if kind != "rocks_db":
            raise ValueError(f"persistent_db.type={kind!r} is not allowed; expected one of ['rocks_db']")
        storage.rocksdb = RocksDBTierConfig(path=pdb.get("path", ""), read_only=bool(pdb.get("read_only", False)),
                                            read_threads=max(1, min(int(pdb.get("num_threads", 2)), 16)))
        _take(pdb, "persistent_db", {"type", "path", "read_only"}, report)
    kafka = None
    src = data.get("update_source")
    if src:
        kind = src.get("type", "kafka_message_queue")
        if kind != "kafka_message_queue":
            raise ValueError(f"update_source.type={kind!r} is not allowed; expected one of ['kafka_message_queue']")
        kafka = KafkaConfig(bootstrap_servers=src.get("brokers", "127.0.0.1:9092"),
                            poll_timeout=float(src.get("poll_timeout_ms", 200)) / 1000.0,
                            retry_backoff=float(src.get("failure_backoff_ms", 500)) / 1000.0)
        _take(src, "update_source", {"type", "brokers"}, report)

    defaults = m.get("default_value_for_each_table", [0.0]) or [0.0]
    if len(set(float(v) for v in defaults)) > 1:
        report.append(f"model.default_value_for_each_table: per-table values {defaults} are not supported; "
                      f"using {float(defaults[0])} for every table")
    cache = CacheConfig(cache_ratio=float(m.get("gpucacheper", 0.2)),
                        hit_rate_threshold=float(m.get("hit_rate_threshold", 0.9)),
                        default_value=float(defaults[0]),
                        refresh_interval=float(m.get("refresh_interval", 0.0)),  # seconds, as HPS
                        refresh_delay=float(m.get("refresh_delay", 0.0)))
    tables = []
    names_t = m.get("embedding_table_names") or []
    dims = m.get("embedding_vecsize_per_table") or []
    if names_t and dims and len(names_t) != len(dims):
        raise ValueError(f"model.embedding_table_names has {len(names_t)} names but embedding_vecsize_per_table "
                         f"has {len(dims)} sizes")
    if names_t or dims:  # ps.json has no row counts: the tables themselves come from the TorchRec model
        named = ", ".join(f"{n} (dim {d})" for n, d in zip(names_t, dims)) if names_t and dims else \
            ", ".join(str(x) for x in (names_t or dims))
        report.append(f"model.embedding_table_names/embedding_vecsize_per_table: tables {named} not created: "
                      "ps.json gives no row counts; the tables, their sizes and names come from the TorchRec "
                      "model or checkpoint that `torchrec-hps load` or swap_in_hps reads")
    _take(m, "model", {"model", "gpucacheper", "hit_rate_threshold", "default_value_for_each_table",
                       "embedding_table_names", "embedding_vecsize_per_table", "refresh_interval", "refresh_delay"},
          report)
    hps = HPSConfig(model=m.get("model") or "model", cache=cache, storage=storage)
    return ServingConfig(hps=hps, kafka=kafka, tables=tables, report=report)
