"""Config files: our YAML/JSON layout and HugeCTR HPS's ps.json onto the dataclasses."""
from __future__ import annotations

import json

import pytest

from torchrec_hps.config_file import load_config

# The layout of HugeCTR HPS's documented ps.json (v24.06), trimmed to one model.
PS_JSON = {
    "supportlonglong": True,
    "volatile_db": {"type": "redis_cluster", "address": "127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002",
                    "user_name": "default", "password": "", "num_partitions": 8, "max_batch_size": 65536,
                    "overflow_policy": "evict_random", "overflow_margin": 10000000,
                    "overflow_resolution_target": 0.8, "initial_cache_rate": 1.0,
                    "cache_missed_embeddings": True, "update_filters": [".+"]},
    "persistent_db": {"type": "rocks_db", "path": "/tmp/rocksdb", "num_threads": 16, "read_only": False,
                      "max_batch_size": 65536, "update_filters": [".+"]},
    "update_source": {"type": "kafka_message_queue", "brokers": "127.0.0.1:9092", "poll_timeout_ms": 500,
                      "max_receive_buffer_size": 2000, "max_batch_size": 1000, "failure_backoff_ms": 50,
                      "max_commit_interval": 32},
    "models": [{"model": "dcn", "sparse_files": ["/model/dcn/0_sparse_file.model"],
                "dense_file": "/model/dcn/_dense_file.model", "network_file": "/model/dcn/dcn.json",
                "num_of_worker_buffer_in_pool": 4, "deployed_device_list": [0], "max_batch_size": 1024,
                "default_value_for_each_table": [0.0], "maxnum_catfeature_query_per_table_per_sample": [26],
                "embedding_vecsize_per_table": [16], "embedding_table_names": ["sparse_embedding1"],
                "hit_rate_threshold": 0.9, "gpucacheper": 0.5, "gpucache": True, "mystery_key": 1,
                "refresh_interval": 30, "refresh_delay": 5, "num_of_refresher_buffer_in_pool": 1}],
    "fuse_embedding_table": False,
}


def test_ps_json_maps_onto_our_config_and_reports_the_rest(tmp_path):
    path = tmp_path / "ps.json"
    path.write_text(json.dumps(PS_JSON))
    cfg = load_config(path)
    assert cfg.hps.model == "dcn"
    assert (cfg.hps.cache.cache_ratio, cfg.hps.cache.hit_rate_threshold) == (0.5, 0.9)
    r = cfg.hps.storage.redis
    assert r.cluster_nodes == ["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"]
    assert (r.num_partitions, r.username, r.password, r.promote) == (8, "default", None, True)
    assert cfg.hps.storage.rocksdb.path == "/tmp/rocksdb" and not cfg.hps.storage.rocksdb.read_only
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:9092" and cfg.kafka.poll_timeout == 0.5
    assert (cfg.hps.cache.refresh_interval, cfg.hps.cache.refresh_delay) == (30.0, 5.0)
    text = "\n".join(cfg.report)
    for key in ("model.mystery_key: unknown key", "model.sparse_files: ignored", "volatile_db.initial_cache_rate",
                "volatile_db.overflow_margin: ignored for redis_cluster", "update_source.max_commit_interval",
                "top.supportlonglong", "top.fuse_embedding_table: ignored (tables of one pooling mode",
                "model.num_of_refresher_buffer_in_pool: ignored",
                "tables sparse_embedding1 (dim 16) not created: ps.json gives no row counts"):
        assert key in text, key
    # HugeCTR's documented keys are never called unknown; only the made-up one is
    assert [line for line in cfg.report if "unknown key" in line] == ["model.mystery_key: unknown key, ignored"]


def test_ps_json_hash_map_volatile_db_and_bad_values(tmp_path):
    data = json.loads(json.dumps(PS_JSON))
    data["volatile_db"] = {"type": "parallel_hash_map", "num_partitions": 4, "overflow_margin": 1000,
                           "overflow_policy": "evict_least_used", "overflow_resolution_target": 0.5}
    path = tmp_path / "ps.json"
    path.write_text(json.dumps(data))
    mem = load_config(path).hps.storage.memory
    assert (mem.capacity, mem.num_partitions, mem.overflow_policy, mem.resolution_target) == (4000, 4, "evict_lfu", 0.5)
    data["volatile_db"]["overflow_policy"] = "evict_everything"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"volatile_db.overflow_policy='evict_everything' is not allowed; expected "
                                         r"one of \['evict_random', 'evict_least_used', 'evict_oldest'\]"):
        load_config(path)
    data["volatile_db"] = {"type": "memcached"}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="volatile_db.type='memcached' is not allowed"):
        load_config(path)
    with pytest.raises(ValueError, match=r"no model 'x'; models: \['dcn'\]"):
        load_config(path, model="x")


def test_our_yaml_layout(tmp_path):
    path = tmp_path / "hps.yaml"
    path.write_text("""
model: ctr_v1
cache: {cache_ratio: 0.05, hit_rate_threshold: 0.95, eviction: lfu}
storage:
  memory: {capacity: 1000, overflow_policy: evict_random}
  rocksdb: {path: /tmp/x}
kafka: {bootstrap_servers: "b:9092", publish_every_steps: 5}
tables:
  - {name: t0, num_embeddings: 100, embedding_dim: 8, feature_names: [f0, f1], pooling: mean}
""")
    cfg = load_config(path)
    assert cfg.hps.cache.eviction == "lfu" and cfg.hps.storage.memory.capacity == 1000
    assert cfg.kafka.publish_every_steps == 5
    assert cfg.tables[0].feature_names == ["f0", "f1"] and cfg.tables[0].pooling.name == "MEAN"


@pytest.mark.parametrize("text, message", [
    ("model: m\ncache: {eviction: fifo}\n", r"cache.eviction='fifo' is not allowed; expected one of \['lru', 'lfu'\]"),
    ("model: m\nstorage: {memory: {capasity: 3}}\n", r"storage.memory: unknown keys \['capasity'\]"),
    ("model: m\ncolour: red\n", r"config: unknown keys \['colour'\]"),
    ("cache: {}\n", "'model'"),
    ("model: m\ntables: [{name: t, num_embeddings: 3, embedding_dim: 2, pooling: max}]\n", "tables\\[0\\].pooling"),
    # wrong types used to reach a comparison and raise TypeError
    ("model: m\ncache: {cache_ratio: ten percent}\n", r"cache.cache_ratio='ten percent' is not a number"),
    ("model: m\nstorage: {memory: {capacity: lots}}\n", r"memory.capacity='lots' is not a whole number \(or null\)"),
    ("model: m\ncache: {cuda_graphs: maybe}\n", r"cache.cuda_graphs='maybe' is not true or false"),
])
def test_invalid_files_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(path)
