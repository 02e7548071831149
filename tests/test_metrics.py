"""Prometheus metrics exposed over HTTP from a module, its hierarchy and an update consumer."""
from __future__ import annotations

import socket

import torch
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

from torchrec_hps.config import CacheConfig, HPSConfig, KafkaConfig
from torchrec_hps.metrics import scrape, start_metrics_server
from torchrec_hps.modules import HPSEmbeddingBagCollection
from torchrec_hps.storage import StorageHierarchy, bulk_load
from torchrec_hps.train_bridge import UpdateConsumer
from tests.bridge.test_bridge import TABLES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoint(tier_factory, namespace, kafka_bootstrap):
    h = StorageHierarchy([tier_factory("memory", capacity=50), tier_factory("rocksdb")])
    h.add_tables(bulk_load(h.tiers[-1:], namespace, EmbeddingBagCollection(tables=TABLES), progress=False))
    hps = HPSEmbeddingBagCollection(TABLES, HPSConfig(namespace, CacheConfig(cache_ratio=0.1, min_cache_rows=1,
                                                                             hit_rate_threshold=1.0)), storage=h)
    consumer = UpdateConsumer(KafkaConfig(bootstrap_servers=kafka_bootstrap), namespace, h, ["t1", "t2"])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f1", "f2"], values=torch.tensor([1, 2, 2, 3]),
                                              lengths=torch.tensor([2, 1, 1, 0]))
    hps(kjt)
    hps(kjt)
    port = _free_port()
    server, thread = start_metrics_server(port, modules=[hps], hierarchies=[h], consumers=[consumer], addr="127.0.0.1")
    try:
        lines = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
        consumer.stop()
        hps.close()
    text = "\n".join(lines)
    assert f'hps_lookup_ids_total{{model="{namespace}",table="t1"}} 6.0' in text
    assert f'hps_cache_misses_total{{model="{namespace}",table="t1"}}' in text
    assert f'hps_tier_keys_total{{model="{namespace}",table="t1",tier="rocksdb"}}' in text
    assert f'hps_lookup_seconds_count{{model="{namespace}"}} 2.0' in text
    assert f'hps_update_lag_messages{{model="{namespace}"}} 0.0' in text

